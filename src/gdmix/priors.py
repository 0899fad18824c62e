"""Published models read back: the ``prior:`` and ``warm_start:`` of a run.

Both name a published model directory (a run's ``models/``, any fsspec URL) holding a
name-term-value table per coordinate (``<url>/<coordinate>/``, ``schema.MODEL``). A
coordinate's models are matched to this run by model id (``global`` for the fixed effect,
else the entity id) and by (name, term) through this run's feature index of the
coordinate's bag; the intercept is ``(INTERCEPT)``. Features this run does not index are
dropped; a coordinate with no folder there has no prior (and starts at 0).

Prior penalty (README "Priors"): a coefficient θ_k with a prior mean μ_k and variance σ_k²
is penalised by (w/2)(θ_k − μ_k)²/σ_k² (w: ``prior.weight``) instead of its L2 term, so its
penalty weight is π_k = w/σ_k² and its centre c_k = μ_k; every other coefficient keeps
π_k = λ (λ·r for an intercept) and c_k = 0. A variance that is missing (a model trained
with ``variance: none``), NaN or ≤ 0 gives no prior; an infinite one a flat prior (π = 0).

Everything here is numpy/pyarrow over index space (``INTERCEPT`` = −1 stands for the
intercept): the solvers receive arrays, never this module's types.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gdmix import arrow_arrays as aa, layout, schema, storage
from gdmix.config import Config, Coordinate

INTERCEPT = -1  # the intercept's "feature index" in lookups


@dataclass
class CoordinateModels:
    """One coordinate's published models over this run's feature indexes.

    Model m (id ``ids[m]``) has intercept mean ``intercept[m]`` and variance
    ``intercept_var[m]`` (NaN: none; intercept 0 when the model has none), and features
    ``indices[ptr[m]:ptr[m+1]]`` (ascending) with ``mean`` and ``var`` (NaN: none)."""
    ids: pa.Array  # string
    intercept: np.ndarray
    intercept_var: np.ndarray
    ptr: np.ndarray  # int64
    indices: np.ndarray  # int32
    mean: np.ndarray
    var: np.ndarray

    @property
    def n_models(self) -> int:
        return len(self.ids)

    def positions(self, ids) -> np.ndarray:
        """Per id, its model's position here (−1: none)."""
        ids = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else pa.array(ids, pa.string())
        return pc.index_in(ids.cast(pa.string()), value_set=self.ids).fill_null(-1).to_numpy(
            zero_copy_only=False).astype(np.int64)

    def aligned(self, ids) -> "CoordinateModels":
        """The models of ``ids`` in that order (an id without one: an empty model)."""
        pos = self.positions(ids)
        has = pos >= 0
        p = np.where(has, pos, 0)
        lens = np.where(has, np.diff(self.ptr)[p], 0) if self.n_models else np.zeros(len(pos), np.int64)
        ptr = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        total = int(ptr[-1])
        flat = (np.repeat(self.ptr[:-1][p] - ptr[:-1], lens) + np.arange(total)) if total else np.zeros(0, np.int64)
        ids = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else pa.array(ids, pa.string())
        icp = np.where(has, self.intercept[p], 0.0) if self.n_models else np.zeros(len(pos))
        icp_var = np.where(has, self.intercept_var[p], np.nan) if self.n_models else np.full(len(pos), np.nan)
        return CoordinateModels(ids.cast(pa.string()), icp, icp_var, ptr, self.indices[flat], self.mean[flat],
                                self.var[flat])

    def lookup(self, model_ids, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mean, var) of each (model id, feature index) pair; var NaN where there is none
        (``features`` −1: the intercept)."""
        features = np.asarray(features, np.int64)
        pos = self.positions(model_ids)
        mean, var = np.zeros(len(features)), np.full(len(features), np.nan)
        icp = (features == INTERCEPT) & (pos >= 0)
        mean[icp], var[icp] = self.intercept[pos[icp]], self.intercept_var[pos[icp]]
        if len(self.indices):
            width = int(max(self.indices.max(initial=0), features.max(initial=0))) + 1
            keys = np.repeat(np.arange(self.n_models), np.diff(self.ptr)) * width + self.indices.astype(np.int64)
            q = np.where((pos >= 0) & (features >= 0), pos * width + features, -1)
            at = np.minimum(np.searchsorted(keys, q), len(keys) - 1)
            hit = (q >= 0) & (keys[at] == q)
            mean[hit], var[hit] = self.mean[at[hit]], self.var[at[hit]]
        return mean, var


def weights(var: np.ndarray, weight: float) -> np.ndarray:
    """Penalty weights w/σ² (NaN: no prior; σ² = ∞: 0)."""
    var = np.asarray(var, float)
    out = np.full(var.shape, np.nan)
    ok = np.isfinite(var) & (var > 0)
    out[ok] = weight / var[ok]
    out[np.isposinf(var)] = 0.0
    return out


def read(url: str, coordinate: str, feature_index: pa.Table) -> CoordinateModels | None:
    """The coordinate's models under ``url`` (None: the folder has none), matched to
    ``feature_index`` (schema.FEATURE_INDEX)."""
    folder = storage.join(url, coordinate)
    if not storage.exists(folder) or not storage.parquet_files(folder):
        return None
    t = storage.read_table(folder)
    n = t.num_rows
    ids = t.column(schema.MODEL_ID).combine_chunks().cast(pa.string())

    def long(column: str, value: str) -> pa.Table:
        if column not in t.column_names:
            return pa.table({"_m": pa.array([], pa.int64()), "name": pa.array([], pa.string()),
                             "term": pa.array([], pa.string()), value: pa.array([], pa.float64())})
        lists = t.column(column).combine_chunks()
        if lists.null_count == len(lists):
            lists = pa.array([[]] * len(lists), lists.type)
        items = pc.list_flatten(lists)
        parent = pc.list_parent_indices(lists)
        return pa.table({"_m": parent.cast(pa.int64()), "name": items.field("name"),
                         "term": pc.fill_null(items.field("term"), ""), value: items.field("value").cast(pa.float64())})

    means = long("means", "mean")
    variances = long("variances", "var")
    both = means.join(variances, keys=["_m", "name", "term"], join_type="left outer")
    is_icp = pc.equal(both.column("name"), schema.INTERCEPT_NAME).to_numpy(zero_copy_only=False)
    icp_rows = both.filter(pa.array(is_icp))
    intercept, intercept_var = np.zeros(n), np.full(n, np.nan)
    m = icp_rows.column("_m").to_numpy()
    intercept[m] = icp_rows.column("mean").to_numpy(zero_copy_only=False)
    intercept_var[m] = pc.fill_null(icp_rows.column("var"), np.nan).to_numpy(zero_copy_only=False)
    feats = both.filter(pa.array(~is_icp)).join(
        feature_index.select(["index", "name", "term"]), keys=["name", "term"], join_type="inner")
    feats = feats.sort_by([("_m", "ascending"), ("index", "ascending")])
    fm = feats.column("_m").to_numpy()
    ptr = np.concatenate([[0], np.cumsum(np.bincount(fm, minlength=n))]).astype(np.int64)
    return CoordinateModels(ids, intercept, intercept_var, ptr,
                            feats.column("index").to_numpy().astype(np.int32),
                            feats.column("mean").to_numpy(zero_copy_only=False).astype(np.float64),
                            pc.fill_null(feats.column("var"), np.nan).to_numpy(zero_copy_only=False).astype(np.float64))


def _for(url: str | None, workdir: str, coord: Coordinate) -> CoordinateModels | None:
    if not url:
        return None
    return read(url, coord.name, storage.read_table(layout.feature_index(workdir, coord.feature_bag)))


def prior_models(cfg: Config, workdir: str, coord: Coordinate) -> CoordinateModels | None:
    """The coordinate's prior models (``prior.models``), or None."""
    return _for(cfg.prior.models if cfg.prior else None, workdir, coord)


def warm_models(cfg: Config, workdir: str, coord: Coordinate) -> CoordinateModels | None:
    """The coordinate's warm-start models (``warm_start``), or None."""
    return _for(cfg.warm_start, workdir, coord)


def carried_models(cfg: Config, workdir: str, coord: Coordinate) -> CoordinateModels | None:
    """Models an entity without one tonight keeps: the prior's, else the warm start's."""
    return prior_models(cfg, workdir, coord) or warm_models(cfg, workdir, coord)


def default_weights(coord: Coordinate, n: int) -> np.ndarray:
    """λ per coefficient of a (intercept, n features) model, the intercept λ·r."""
    out = np.full(n + 1, float(coord.l2))
    out[0] = coord.l2 if coord.regularize_intercept else 0.0
    return out


def penalty_terms(coord: Coordinate, prior: CoordinateModels | None, weight: float, model_ids,
                  features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(π, c) of each (model id, feature index) coefficient (−1: an intercept)."""
    features = np.asarray(features, np.int64)
    pen = np.where(features == INTERCEPT, coord.l2 if coord.regularize_intercept else 0.0, float(coord.l2))
    ctr = np.zeros(len(features))
    if prior is not None and len(features):
        mean, var = prior.lookup(model_ids, features)
        w = weights(var, weight)
        has = ~np.isnan(w)
        pen[has], ctr[has] = w[has], mean[has]
    return pen, ctr


def penalty(coord: Coordinate, prior: CoordinateModels | None, weight: float, table: pa.Table) -> float:
    """Σ π/2 (θ − c)² over a coefficients table (schema.COEFFICIENTS): the coordinate's
    term of the objective, with the prior where it has one."""
    ids = table.column(schema.MODEL_ID).combine_chunks().cast(pa.string())
    lists = table.column(schema.INDICES).combine_chunks()
    feats = aa.to_numpy(pc.list_flatten(lists)).astype(np.int64)  # (aa: no pandas in the finish)
    vals = aa.to_numpy(pc.list_flatten(table.column(schema.VALUES).combine_chunks()))
    owner = ids.take(pc.list_parent_indices(lists))
    icp = aa.to_numpy(table.column(schema.INTERCEPT)).astype(np.float64)
    all_ids = pa.concat_arrays([ids, owner.cast(pa.string())]) if len(owner) else ids
    features = np.concatenate([np.full(len(icp), INTERCEPT), feats])
    theta = np.concatenate([icp, vals.astype(np.float64)])
    pen, ctr = penalty_terms(coord, prior, weight, all_ids, features)
    d = theta - ctr
    return 0.5 * float(np.sum(pen * d * d))

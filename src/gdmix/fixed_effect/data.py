"""Reading a fixed-effect step's inputs: partition shards, the feature count, warm start.

Plain numpy/pyarrow (no TensorFlow), shared by the workers and the stage.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from gdmix import layout, plan, priors, schema, sparse, storage
from gdmix.config import Config

PARTITION_SCHEMA = schema.partition_schema(random_effect=False, with_fixed_score=False)
SCORES_SCHEMA = schema.SCORES


@dataclass
class Shard:
    """One worker's rows: y, w, o and the sparse features x as CSR (float64)."""
    uid: np.ndarray
    y: np.ndarray
    w: np.ndarray
    offset: np.ndarray
    x: sparse.CSR

    @property
    def n_rows(self) -> int:
        return len(self.uid)


def shard_url(workdir: str, iteration: int, coordinate: str, split: str, index: int) -> str:
    return layout.shard(layout.partition(workdir, iteration, coordinate, split), index)


def prepared_alias(workdir: str, iteration: int, coordinate: str) -> dict | None:
    """The step's partition marker when its rows are the prepared split's (no partition
    written: ``gdmix.partition``), else None."""
    info = storage.done_info(layout.step_dir(workdir, iteration, coordinate), "partition") or {}
    return info if info.get("source") == "prepared" else None


def worker_rows(workdir: str, iteration: int, coordinate: str, split: str, index: int, workers: int,
                n_features: int) -> Shard:
    """Worker ``index``'s rows of the step: its partition shard, or, when the step reads
    the prepared split directly, its contiguous 1/``workers`` of those rows (only the row
    groups that hold them are read)."""
    alias = prepared_alias(workdir, iteration, coordinate)
    if alias is None:
        return read_shard(shard_url(workdir, iteration, coordinate, split, index), n_features)
    url = layout.prepared(workdir, split)
    n = int(alias["rows"][split])
    bag = alias["bag"]
    named = {schema.INDICES: schema.bag_indices(bag), schema.VALUES: schema.bag_values(bag)}
    source = pa.schema([f.with_name(named.get(f.name, f.name)) for f in PARTITION_SCHEMA])
    t = storage.read_row_range(url, n * index // workers, n * (index + 1) // workers, source)
    return _shard(t.rename_columns(PARTITION_SCHEMA.names), url, n_features)


def read_shard(url: str, n_features: int) -> Shard:
    """A partition shard folder (missing = empty shard), checked against the bag's size."""
    return _shard(storage.read_table(url, schema=PARTITION_SCHEMA), url, n_features)


def _shard(t: pa.Table, url: str, n_features: int) -> Shard:
    x = sparse.from_table(t, schema.INDICES, schema.VALUES)
    if len(x.indices) and (x.indices.min() < 0 or x.indices.max() >= n_features):
        raise ValueError(f"{url}: feature index out of range [0, {n_features}) "
                         f"(min {x.indices.min()}, max {x.indices.max()})")
    cols = {c: t.column(c).to_numpy().astype(np.float64) for c in (schema.LABEL, schema.WEIGHT, schema.OFFSET)}
    return Shard(uid=t.column(schema.UID).to_numpy().astype(np.int64), y=cols[schema.LABEL],
                 w=cols[schema.WEIGHT], offset=cols[schema.OFFSET], x=x)


def n_features(workdir: str, bag: str) -> int:
    return storage.read_table(layout.feature_index(workdir, bag), columns=["index"]).num_rows


def warm_start(cfg: Config, workdir: str, step: plan.Step, d: int) -> np.ndarray | None:
    """θ = [b, β] of the coordinate's latest model before this step; before its first step
    the ``warm_start`` model (matched by (name, term); features it lacks start at 0), or
    None: a cold start."""
    prev = plan.latest(cfg, step.coordinate, step)
    if prev is None:
        earlier = priors.warm_models(cfg, workdir, cfg.coordinate(step.coordinate))
        if earlier is None:
            return None
        m = earlier.aligned([schema.FIXED_EFFECT_MODEL_ID])
        theta = np.zeros(d + 1)
        theta[0] = m.intercept[0]
        theta[1:][m.indices] = m.mean
        return theta
    url = layout.coefficients(workdir, prev.iteration, prev.coordinate, step.coordinate)
    t = storage.read_table(url, schema=schema.COEFFICIENTS)
    rows = [i for i, m in enumerate(t.column(schema.MODEL_ID).to_pylist()) if m == schema.FIXED_EFFECT_MODEL_ID]
    if len(rows) != 1:
        raise ValueError(f"{url}: expected one {schema.FIXED_EFFECT_MODEL_ID!r} model for the warm "
                         f"start from {prev}, found {len(rows)}")
    row = t.slice(rows[0], 1)
    csr = sparse.from_table(row, schema.INDICES, schema.VALUES)
    if len(csr.indices) and csr.indices.max() >= d:
        raise ValueError(f"{url}: coefficient index {csr.indices.max()} out of range for {d} features")
    theta = np.zeros(d + 1)
    theta[0] = row.column(schema.INTERCEPT)[0].as_py()
    theta[1:][csr.indices] = csr.values
    return theta


def prior_penalty(cfg: Config, workdir: str, coord, d: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(π, c) of θ = [b, β] under ``prior:`` (``gdmix.priors``), or (None, None) without one."""
    models = priors.prior_models(cfg, workdir, coord)
    if models is None:
        return None, None
    ids = [schema.FIXED_EFFECT_MODEL_ID] * (d + 1)
    return priors.penalty_terms(coord, models, cfg.prior.weight, ids, np.arange(-1, d))


def coefficients_table(intercept: float, coef: np.ndarray, variances: np.ndarray | None = None) -> pa.Table:
    """The fixed effect's one-row schema.COEFFICIENTS table (dense: indices 0..d−1); with
    ``variances`` of θ = [b, β], COEFFICIENTS_WITH_VARIANCES."""
    d = len(coef)
    idx, val = sparse.to_arrow_lists(np.array([0, d]), np.arange(d), np.asarray(coef, dtype=np.float64))
    cols = [pa.array([schema.FIXED_EFFECT_MODEL_ID]), pa.array([float(intercept)]), idx, val]
    if variances is None:
        return pa.Table.from_arrays(cols, schema=schema.COEFFICIENTS)
    _, var = sparse.to_arrow_lists(np.array([0, d]), np.arange(d), np.asarray(variances[1:], dtype=np.float64))
    return pa.Table.from_arrays(cols + [pa.array([float(variances[0])]), var],
                                schema=schema.COEFFICIENTS_WITH_VARIANCES)


def scores_table(shard: Shard, intercept: float, coef: np.ndarray) -> pa.Table:
    """schema.SCORES of a shard: b + x·β, the coordinate's own contribution (no offset)."""
    score = intercept + shard.x.dot(np.asarray(coef, dtype=np.float64))
    return pa.Table.from_arrays([pa.array(shard.uid, type=pa.int64()), pa.array(score, type=pa.float64())],
                                schema=schema.SCORES)

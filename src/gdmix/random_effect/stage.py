"""The random-effect training stage: every entity's model, shard by shard, then scores.

``train_shard`` fits the active entities of one shard (a pod's job on a cluster);
``finish`` gathers the shards, takes the slow-direction step into the fixed effect when
one is trained (``gdmix.shift``), and writes coefficients and scores; ``train`` runs both
in one process (the embedded path).

The shift assumes the train partition holds every training row (active and passive), as
the partition stage writes it: then every row with a shared feature is either in an
active entity whose model has that feature, or a passive row the shift accounts for.

``max_samples`` (the active-data bound): an entity with more training rows trains on the
``max_samples`` of them with the smallest ``sample_key`` (ties by uid), a deterministic
choice the same on every rerun, iteration and shard layout; all its rows are still
scored. Its model then also lists, with coefficient 0, every feature that only its
unsampled rows have, so that "an entity's model has every feature of its rows" still
holds: the shift moves mass along a shared feature j only through the models that have
j, which keeps the score of every row of an active entity, sampled or not, unchanged.
The shift therefore stays the exact step on the objective over all training rows (the
one metrics report); unsampled rows are neither passive rows nor moved by it.
"""
from __future__ import annotations

import concurrent.futures as cf
import logging
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gdmix import layout, logistic, plan, priors, schema, shift, sparse, storage
from gdmix.config import Config, Coordinate, cpu_count
from gdmix.plan import Step
from gdmix.random_effect import scipy_solver as solver
from gdmix.random_effect.scipy_solver import Entities, Models

log = logging.getLogger(__name__)


# --- reading ------------------------------------------------------------------------------

def _read_shard(workdir: str, step: Step, split: str, shard: int, shifted: bool,
                grouped: bool = False) -> pa.Table:
    """A partition shard (a missing shard folder is an empty shard); ``grouped``: its rows
    sorted by (entity, uid), so each entity's rows are one contiguous block (the partition
    stage writes them in no particular order)."""
    url = layout.shard(layout.partition(workdir, step.iteration, step.coordinate, split), shard)
    rows = storage.read_table(url, schema=schema.partition_schema(True, shifted))
    return rows.sort_by([(schema.ENTITY_ID, "ascending"), (schema.UID, "ascending")]) if grouped else rows


def _groups(rows: pa.Table) -> tuple[pa.Array, np.ndarray]:
    """(entity ids, row_ptr): the runs of equal entity ids; each entity must be one run."""
    ent = rows.column(schema.ENTITY_ID).combine_chunks()
    n = len(ent)
    if n == 0:
        return pa.array([], pa.string()), np.zeros(1, np.int64)
    if ent.null_count:
        raise ValueError(f"partition rows with a null {schema.ENTITY_ID}")
    change = pc.not_equal(ent.slice(1), ent.slice(0, n - 1)).to_numpy(zero_copy_only=False)
    starts = np.concatenate([[0], np.flatnonzero(change) + 1]).astype(np.int64)
    ids = ent.take(pa.array(starts))
    if len(pc.unique(ids)) != len(ids):
        raise ValueError("partition shard rows are not grouped by entity_id (read them with grouped=True)")
    return ids, np.append(starts, n)


def _col(t: pa.Table, name: str) -> np.ndarray:
    return t.column(name).to_numpy().astype(np.float64)


def _positions(ids: pa.Array | pa.ChunkedArray, value_set: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """For each id, its position in ``value_set`` (-1 when absent)."""
    vs = value_set.combine_chunks() if isinstance(value_set, pa.ChunkedArray) else value_set
    return pc.index_in(ids, value_set=vs).fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)


def models_from_table(table: pa.Table) -> Models:
    csr = sparse.from_table(table, schema.INDICES, schema.VALUES)
    return Models(table.column(schema.INTERCEPT).to_numpy().astype(np.float64), csr.indptr,
                  csr.indices, csr.values)


def models_table(ids: pa.Array, models: Models,
                 variances: tuple[np.ndarray, np.ndarray] | None = None) -> pa.Table:
    """schema.COEFFICIENTS, or COEFFICIENTS_WITH_VARIANCES with ``variances`` = (intercept
    variances, variances parallel to ``models.values``)."""
    idx, val = sparse.to_arrow_lists(models.ptr, models.indices, models.values)
    cols = [pa.array(ids, pa.string()), pa.array(models.intercept, pa.float64()), idx, val]
    if variances is None:
        return pa.Table.from_arrays(cols, schema=schema.COEFFICIENTS)
    _, var = sparse.to_arrow_lists(models.ptr, models.indices, variances[1])
    return pa.Table.from_arrays(cols + [pa.array(variances[0], pa.float64()), var],
                                schema=schema.COEFFICIENTS_WITH_VARIANCES)


def variances_from_table(table: pa.Table) -> tuple[np.ndarray, np.ndarray] | None:
    """(intercept variances, flat variances) of a coefficients table, None without them."""
    if schema.VARIANCES not in table.column_names or table.column(schema.INTERCEPT_VARIANCE).null_count:
        return None
    var = pc.list_flatten(table.column(schema.VARIANCES).combine_chunks()).to_numpy(zero_copy_only=False)
    return table.column(schema.INTERCEPT_VARIANCE).to_numpy().astype(np.float64), var.astype(np.float64)


def _gather(models: Models, pos: np.ndarray) -> Models:
    """Models re-ordered to ``pos`` (-1 = no model: intercept 0, no coefficients)."""
    has = pos >= 0
    p = np.where(has, pos, 0)
    lens = np.where(has, np.diff(models.ptr)[p] if len(models.intercept) else 0, 0)
    ptr = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    starts = np.where(has, models.ptr[p] if len(models.intercept) else 0, 0)
    flat = np.repeat(starts - ptr[:-1], lens) + np.arange(ptr[-1])
    icp = np.where(has, models.intercept[p] if len(models.intercept) else 0.0, 0.0)
    return Models(icp.astype(np.float64), ptr, models.indices[flat], models.values[flat])


def _warm_start(cfg: Config, workdir: str, step: Step, ids: pa.Array) -> Models | None:
    """The coordinate's previous models by entity id; before its first step, the models of
    ``warm_start`` (matched by entity id and (name, term)), or None: a cold start."""
    prev = plan.latest(cfg, step.coordinate, step)
    if prev is None:
        earlier = priors.warm_models(cfg, workdir, cfg.coordinate(step.coordinate))
        if earlier is None:
            return None
        m = earlier.aligned(ids)
        return Models(m.intercept, m.ptr, m.indices, m.mean)
    table = storage.read_table(layout.coefficients(workdir, prev.iteration, prev.coordinate, step.coordinate))
    return _gather(models_from_table(table), _positions(ids, table.column(schema.MODEL_ID)))


def _prior(cfg: Config, workdir: str, coord: Coordinate, ids: pa.Array) -> solver.Prior | None:
    """The prior's centres and weights aligned with ``ids`` (None without ``prior:``)."""
    models = priors.prior_models(cfg, workdir, coord)
    if models is None:
        return None
    m = models.aligned(ids)
    w = cfg.prior.weight
    return solver.Prior(Models(m.intercept, m.ptr, m.indices, m.mean),
                        Models(priors.weights(m.intercept_var, w), m.ptr, m.indices, priors.weights(m.var, w)))


def _settings(coord: Coordinate) -> solver.Settings:
    return solver.Settings(coord.l2, coord.regularize_intercept, coord.tolerance, coord.max_iterations)


# --- the active-data bound (max_samples) -----------------------------------------------------

_P1, _P2, _P3, _P4, _P5 = (0x9E3779B185EBCA87, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9,
                           0x85EBCA77C2B2AE63, 0x27D4EB2F165667C5)
_M64 = (1 << 64) - 1
SAMPLE_SALT = 1  # keeps the sample apart from the validation split's xxhash64(split_seed, uid)


def _xxhash64_long(value, seed):
    """xxHash64 of one 8-byte long with ``seed``, as Spark's ``XXH64.hashLong``: ``value``
    a uint64 array or a Python int, ``seed`` likewise; uint64 results (wrapping arithmetic)."""
    if isinstance(value, np.ndarray):
        u = lambda x: np.uint64(x & _M64) if isinstance(x, int) else x  # noqa: E731
        rotl = lambda x, r: (x << np.uint64(r)) | (x >> np.uint64(64 - r))  # noqa: E731
        with np.errstate(over="ignore"):
            h = u(seed) + np.uint64(_P5 + 8)
            h = h ^ (rotl(value * np.uint64(_P2), 31) * np.uint64(_P1))
            h = rotl(h, 27) * np.uint64(_P1) + np.uint64(_P4)
            h = (h ^ (h >> np.uint64(33))) * np.uint64(_P2)
            h = (h ^ (h >> np.uint64(29))) * np.uint64(_P3)
            return h ^ (h >> np.uint64(32))
    rotl = lambda x, r: ((x << r) | (x >> (64 - r))) & _M64  # noqa: E731
    h = (seed + _P5 + 8) & _M64
    h ^= (rotl((value * _P2) & _M64, 31) * _P1) & _M64
    h = (rotl(h, 27) * _P1 + _P4) & _M64
    h = ((h ^ (h >> 33)) * _P2) & _M64
    h = ((h ^ (h >> 29)) * _P3) & _M64
    return h ^ (h >> 32)


def sample_key(uid: np.ndarray, seed: int) -> np.ndarray:
    """Each row's sampling key: Spark's ``xxhash64(seed, SAMPLE_SALT, uid)`` of three longs
    (``F.xxhash64(F.lit(seed).cast("long"), F.lit(1).cast("long"), F.col("uid"))``), as int64."""
    h = _xxhash64_long(SAMPLE_SALT & _M64, _xxhash64_long(seed & _M64, 42))
    return _xxhash64_long(np.asarray(uid, np.int64).view(np.uint64), h).view(np.int64)


def sampled(uid: np.ndarray, row_ptr: np.ndarray, max_samples: int, seed: int) -> np.ndarray:
    """Which rows an entity trains on (rows grouped by entity, ``row_ptr``): all of an entity
    with at most ``max_samples`` rows, else the ``max_samples`` with the smallest
    (``sample_key``, uid)."""
    counts = np.diff(row_ptr)
    keep = np.ones(len(uid), bool)
    if not len(uid) or counts.max() <= max_samples:
        return keep
    group = np.repeat(np.arange(len(counts)), counts)
    order = np.lexsort((uid, sample_key(uid, seed), group))  # by group, then key, then uid
    rank = np.empty(len(uid), np.int64)
    rank[order] = np.arange(len(uid)) - row_ptr[group[order]]
    return rank < max_samples


def _with_features_of(models: Models, row_ptr: np.ndarray, csr: sparse.CSR) -> Models:
    """``models`` (one per entity of ``row_ptr``) extended by a 0 coefficient for every
    feature of the entity's rows (``csr``) that the model lacks."""
    ent_of_nz = np.repeat(np.repeat(np.arange(len(row_ptr) - 1), np.diff(row_ptr)), np.diff(csr.indptr))
    nf = int(max(csr.indices.max(initial=-1), models.indices.max(initial=-1))) + 1
    model_ent = np.repeat(np.arange(models.n_models), np.diff(models.ptr))
    have = model_ent * nf + models.indices.astype(np.int64)  # ascending
    keys = np.union1d(ent_of_nz * nf + csr.indices.astype(np.int64), have)
    at = np.searchsorted(have, keys)
    found = at < len(have)
    found[found] = have[at[found]] == keys[found]
    values = np.zeros(len(keys))
    values[found] = models.values[at[found]]
    ptr = np.concatenate([[0], np.cumsum(np.bincount(keys // nf, minlength=models.n_models))]).astype(np.int64)
    return Models(models.intercept, ptr, (keys % nf).astype(np.int32), values)


# --- one shard ------------------------------------------------------------------------------

# The scipy reference: below this many training rows a shard is solved in this process:
# starting a pool of worker processes (≈ 1 s: interpreters, numpy and scipy imports) costs
# more than the solve itself (≈ 1 s of one core per 200k rows). The default solver needs no
# pool: its compiled kernel runs on threads.
POOL_MIN_ROWS = 200_000

def train_shard(cfg: Config, workdir: str, step: Step, shard: int,
                executor: cf.ProcessPoolExecutor | None = None) -> dict:
    """Fit every active entity of one shard; write its models and a done marker."""
    t0 = time.time()
    coord = cfg.coordinate(step.coordinate)
    if coord.is_fixed_effect:
        raise ValueError(f"{step.coordinate} is a fixed effect, not a random effect")
    rows = _read_shard(workdir, step, "train", shard, plan.shifts_fixed_effect(cfg, step), grouped=True)
    ids, row_ptr = _groups(rows)
    counts = np.diff(row_ptr)
    active = counts >= coord.min_samples
    rows = rows.filter(pa.array(np.repeat(active, counts)))
    ids = ids.filter(pa.array(active))
    active_ptr = np.concatenate([[0], np.cumsum(counts[active])]).astype(np.int64)
    all_rows, trained_ptr = rows, active_ptr
    if coord.max_samples is not None:  # the active-data bound: a hashed sample of big entities
        keep = sampled(rows.column(schema.UID).to_numpy(), active_ptr, coord.max_samples, cfg.data.split_seed)
        if not keep.all():
            rows = rows.filter(pa.array(keep))
            trained_ptr = np.concatenate([[0], np.cumsum(np.minimum(counts[active], coord.max_samples))]
                                         ).astype(np.int64)
    ent = Entities(trained_ptr, sparse.from_table(rows, schema.INDICES, schema.VALUES),
                   _col(rows, schema.LABEL), _col(rows, schema.WEIGHT), _col(rows, schema.OFFSET))
    warm = _warm_start(cfg, workdir, step, ids)
    prior = _prior(cfg, workdir, coord, ids)
    variances = None
    if coord.solver == "scipy":
        small = len(ent.label) < POOL_MIN_ROWS  # one process: a pool would cost more than it saves
        result = solver.solve(ent, _settings(coord), warm, workers=1 if small else cpu_count(cfg),
                              executor=None if small else executor, prior=prior)
    else:  # "vectorised" ("auto" resolved to it): the compiled kernel on threads
        from gdmix.random_effect import vectorised  # numba: only where the kernel runs

        result = vectorised.solve(ent, _settings(coord), warm, workers=cpu_count(cfg), prior=prior)
    models = result.models
    if rows is not all_rows:  # every feature of all an entity's rows, for the shift (see the top)
        models = _with_features_of(models, active_ptr, sparse.from_table(all_rows, schema.INDICES, schema.VALUES))
    if coord.variance != "none":  # of the trained rows' objective; a padded feature's is its penalty's
        if coord.solver == "scipy":
            variances = solver.variances(ent, _settings(coord), models, prior, coord.variance == "full")
        else:
            variances = vectorised.variances(ent, _settings(coord), models, prior, coord.variance == "full",
                                             workers=cpu_count(cfg))
    storage.write_table(layout.shard_coefficients(workdir, step.iteration, step.coordinate, shard),
                        models_table(ids, models, variances))
    not_converged = int((~result.converged).sum())
    separable = int(result.separable.sum())
    if not_converged:
        log.warning("%s shard %d: %d of %d entities did not converge within %d iterations; %d of them "
                    "are separable (l2 = 0, or an unpenalised intercept with one class: no finite "
                    "optimum, their coefficients grow with max_iterations)",
                    step, shard, not_converged, len(ids), coord.max_iterations, separable)
    info = {"shard": shard, "rows": int(row_ptr[-1]), "active_rows": int(counts[active].sum()),
            "trained_rows": int(trained_ptr[-1]),
            "sampled_entities": int((counts[active] > (coord.max_samples or np.inf)).sum()),
            "active_entities": int(active.sum()), "passive_entities": int((~active).sum()),
            "objective": float(result.objective.sum()), "not_converged": not_converged,
            "separable": separable, "max_iterations": int(result.iterations.max(initial=0)),
            "iterations": int(result.iterations.sum()), "warm_start": warm is not None,
            "seconds": round(time.time() - t0, 3)}
    storage.mark_done(layout.shard_dir(workdir, step.iteration, step.coordinate, shard), "train", info)
    return info


# --- after all shards -------------------------------------------------------------------------

def _scores(models: Models, pos: np.ndarray, csr: sparse.CSR, n_features: int) -> np.ndarray:
    """a_e + z_i·α_e per row (``pos``: the row's model, -1 = none, score 0)."""
    nf = max(n_features, 1)
    model_row = np.repeat(np.arange(models.n_models), np.diff(models.ptr))
    keys = model_row * nf + models.indices.astype(np.int64)  # ascending: models in order, indices sorted
    nz_row = csr.row_ids()
    q = pos[nz_row] * nf + csr.indices.astype(np.int64)
    at = np.minimum(np.searchsorted(keys, q), max(len(keys) - 1, 0))
    hit = (pos[nz_row] >= 0) & (len(keys) > 0)
    if len(keys):
        hit &= keys[at] == q
    contrib = np.where(hit, csr.values * (models.values[at] if len(keys) else 0.0), 0.0)
    icp = np.where(pos >= 0, models.intercept[np.maximum(pos, 0)] if models.n_models else 0.0, 0.0)
    return icp + np.bincount(nz_row, weights=contrib, minlength=csr.n_rows)


def _n_features(workdir: str, bag: str) -> int:
    return storage.read_table(layout.feature_index(workdir, bag), columns=["index"]).num_rows


class _Shift:
    """The shift's inputs gathered from the work directory, and its result."""

    def __init__(self, cfg: Config, workdir: str, step: Step, models: Models, ids: pa.Array):
        coord, fe = cfg.coordinate(step.coordinate), cfg.fixed_effect
        self.fe, self.models, self.ids = fe, models, ids
        self.weight = cfg.prior.weight if cfg.prior else 1.0
        self.fe_prior = priors.prior_models(cfg, workdir, fe)
        self.prior = priors.prior_models(cfg, workdir, coord)
        self.coord = coord
        fe_step = plan.latest(cfg, fe.name, step)
        fe_table = storage.read_table(layout.coefficients(workdir, fe_step.iteration, fe_step.coordinate, fe.name))
        if fe_table.num_rows != 1:
            raise ValueError(f"{fe.name}: expected one fixed-effect model, found {fe_table.num_rows}")
        self.n_random = _n_features(workdir, coord.feature_bag)
        fe_models = models_from_table(fe_table)
        self.fe_var = variances_from_table(fe_table)  # kept through the shift (see fixed_table)
        self.fe_icp = float(fe_models.intercept[0])
        self.fe_coef = np.zeros(_n_features(workdir, fe.feature_bag))
        self.fe_coef[fe_models.indices] = fe_models.values
        self.fe_stored = np.zeros(len(self.fe_coef), bool)
        self.fe_stored[fe_models.indices] = True
        self._fe_indices = fe_models.indices
        same = cfg.bag(fe.feature_bag).shares_values_with(cfg.bag(coord.feature_bag))
        self.fixed_idx, self.random_idx = shift.shared_features(
            storage.read_table(layout.feature_index(workdir, fe.feature_bag)),
            storage.read_table(layout.feature_index(workdir, coord.feature_bag)), same)
        self.direction = shift.directions(self.n_random, self.random_idx)
        ones = np.ones(len(self.random_idx))
        self.beta = np.concatenate([[self.fe_icp], self.fe_coef[self.fixed_idx]])
        self.pen_fixed = fe.l2 * np.concatenate([[1.0 if fe.regularize_intercept else 0.0], ones])
        self.pen_random = coord.l2 * np.concatenate([[1.0 if coord.regularize_intercept else 0.0], ones])
        self.t = np.zeros(len(self.beta))

    def solve(self, passive_rows: list[pa.Table]) -> None:
        """t, with the rows of entities without a model (their scores move with t)."""
        rows = pa.concat_tables(passive_rows) if passive_rows else None
        passive = None
        if rows is not None and rows.num_rows:
            passive = (sparse.from_table(rows, schema.INDICES, schema.VALUES), _col(rows, schema.OFFSET),
                       _col(rows, schema.LABEL), _col(rows, schema.WEIGHT))
        m = self.models
        weighted = None
        if self.fe_prior is not None or self.prior is not None:
            # per-coefficient weights and centres (a prior): the shift stays exact (gdmix.shift)
            fe_id = pa.array([schema.FIXED_EFFECT_MODEL_ID] * len(self.beta))
            fixed_feats = np.concatenate([[priors.INTERCEPT], self.fixed_idx])
            self.pen_fixed, fixed_centre = priors.penalty_terms(self.fe, self.fe_prior, self.weight, fe_id,
                                                                fixed_feats)
            owners = self.ids.take(pa.array(np.repeat(np.arange(m.n_models), np.diff(m.ptr))))
            icp_w, icp_c = priors.penalty_terms(self.coord, self.prior, self.weight, self.ids,
                                                np.full(m.n_models, priors.INTERCEPT))
            val_w, val_c = priors.penalty_terms(self.coord, self.prior, self.weight, owners, m.indices)
            weighted = (fixed_centre, icp_w, icp_c, val_w, val_c)
        p = shift.build_problem(m.intercept, m.indices, m.values, self.direction, self.beta,
                                self.pen_fixed, self.pen_random, passive, weighted)
        self.t = shift.solve(p)
        self.decrease = p.value(np.zeros(len(self.t))) - p.value(self.t)
        self.passive_rows = p.n_passive

    def apply(self) -> Models:
        m = self.models
        icp, values = shift.apply(self.t, m.intercept, m.indices, m.values, self.direction)
        self.fe_icp += self.t[0]
        self.fe_coef[self.fixed_idx] += self.t[1:]
        self.fe_stored[self.fixed_idx] = True
        self.t_random = np.zeros(self.n_random)  # per random-bag feature: the fixed score's change
        self.t_random[self.random_idx] = self.t[1:]
        return Models(icp, m.ptr, m.indices, values)

    def fixed_table(self) -> pa.Table:
        """The shifted fixed effect. Its variances are carried as they were: exact without
        passive rows (no training score moves, so its Hessian does not), else those of its
        own step (the passive rows' curvature moved with the shift)."""
        idx = np.flatnonzero(self.fe_stored)
        var = None
        if self.fe_var is not None:
            fe_var = np.full(len(self.fe_coef), np.nan)
            fe_var[self._fe_indices] = self.fe_var[1]
            var = (self.fe_var[0], fe_var[idx])
        return models_table(pa.array([schema.FIXED_EFFECT_MODEL_ID]),
                            Models(np.array([self.fe_icp]), np.array([0, len(idx)], np.int64),
                                   idx.astype(np.int32), self.fe_coef[idx]), var)

    def penalty(self) -> float:
        """The fixed effect's penalty term after the shift (with its prior, if any)."""
        return priors.penalty(self.fe, self.fe_prior, self.weight, self.fixed_table())


def _write_parts(url: str, tables: list[pa.Table], table_schema: pa.Schema) -> None:
    """A folder of part files, committed as a whole."""
    with storage.atomic_path(url) as tmp:
        storage.makedirs(tmp)
        for i, t in enumerate(tables or [table_schema.empty_table()]):
            storage.write_table(storage.join(tmp, f"part-{i:05d}.parquet"), t)


def finish(cfg: Config, workdir: str, step: Step) -> dict:
    """Gather the shards' models, shift into the fixed effect if trained, write scores."""
    t0 = time.time()
    coord = cfg.coordinate(step.coordinate)
    k, c = step.iteration, step.coordinate
    shard_infos = []
    for s in range(coord.shards):
        info = storage.done_info(layout.shard_dir(workdir, k, c, s), "train")
        if info is None:
            raise RuntimeError(f"{step}: shard {s} of {coord.shards} has not finished training")
        shard_infos.append(info)
    coefs = pa.concat_tables([storage.read_table(layout.shard_coefficients(workdir, k, c, s))
                              for s in range(coord.shards)], promote_options="default").combine_chunks()
    ids = coefs.column(schema.MODEL_ID).combine_chunks()
    models = models_from_table(coefs)
    variances = variances_from_table(coefs)  # a shift leaves them as they are: H_e does not move
    n_random = _n_features(workdir, coord.feature_bag)
    shifted = plan.shifts_fixed_effect(cfg, step)
    sh = None
    if shifted:
        sh = _Shift(cfg, workdir, step, models, ids)
        passive = []
        for s in range(coord.shards):
            rows = _read_shard(workdir, step, "train", s, True)
            passive.append(rows.filter(pa.array(_positions(rows.column(schema.ENTITY_ID), ids) < 0)))
        sh.solve(passive)
        models = sh.apply()
        _write_parts(layout.coefficients(workdir, k, c, cfg.fixed_effect.name), [sh.fixed_table()],
                     schema.COEFFICIENTS)
    _write_parts(layout.coefficients(workdir, k, c, c), [models_table(ids, models, variances)], schema.COEFFICIENTS)

    part_done = storage.done_info(layout.step_dir(workdir, k, c), "partition")
    rows_by_split, loss = {}, 0.0
    for split in layout.SPLITS:
        own, fixed, n_rows = [], [], 0
        for s in range(coord.shards):
            rows = _read_shard(workdir, step, split, s, shifted)
            csr = sparse.from_table(rows, schema.INDICES, schema.VALUES)
            score = _scores(models, _positions(rows.column(schema.ENTITY_ID), ids), csr, n_random)
            uid = rows.column(schema.UID)
            own.append(pa.table({schema.UID: uid, schema.SCORE: score}, schema=schema.SCORES))
            total = _col(rows, schema.OFFSET) + score
            if shifted:
                new_fixed = _col(rows, schema.FIXED_SCORE) + sh.t[0] + csr.dot(sh.t_random)
                fixed.append(pa.table({schema.UID: uid, schema.SCORE: new_fixed}, schema=schema.SCORES))
                total += new_fixed - _col(rows, schema.FIXED_SCORE)
            if split == "train":
                y, w = _col(rows, schema.LABEL), _col(rows, schema.WEIGHT)
                loss += logistic.loss(total, y, w)
            if own[-1].num_rows != rows.num_rows:
                raise RuntimeError(f"{step} {split} shard {s}: {own[-1].num_rows} scores for {rows.num_rows} rows")
            n_rows += rows.num_rows
        expected = (part_done or {}).get("rows", {}).get(split)
        if expected is not None and expected != n_rows:
            raise RuntimeError(f"{step} {split}: the partition stage wrote {expected} rows but the "
                               f"shards hold {n_rows}: a shard is missing or was rewritten")
        if split == "train" and n_rows != sum(i["rows"] for i in shard_infos):
            raise RuntimeError(f"{step} train: {n_rows} rows now, but the shards trained on "
                               f"{sum(i['rows'] for i in shard_infos)}: the partition changed after training")
        _write_parts(layout.scores(workdir, k, c, c, split), own, schema.SCORES)
        if shifted:
            _write_parts(layout.scores(workdir, k, c, cfg.fixed_effect.name, split), fixed, schema.SCORES)
        rows_by_split[split] = n_rows

    penalty = priors.penalty(coord, priors.prior_models(cfg, workdir, coord), cfg.prior.weight if cfg.prior else 1.0,
                             models_table(ids, models))
    info = {
        "rows": rows_by_split,
        "active_entities": sum(i["active_entities"] for i in shard_infos),
        "passive_entities": sum(i["passive_entities"] for i in shard_infos),
        "not_converged": sum(i["not_converged"] for i in shard_infos),
        # loss over all training rows + the penalties of the coordinates this step wrote
        "objective": loss + penalty + (sh.penalty() if sh else 0.0),
        "shifted": shifted,
        "seconds": round(time.time() - t0 + sum(i["seconds"] for i in shard_infos), 3),
    }
    if sh is not None:
        info["shift"] = {"directions": len(sh.t), "intercept": float(sh.t[0]),
                         "max_abs": float(np.max(np.abs(sh.t))), "decrease": float(sh.decrease),
                         "passive_rows": int(sh.passive_rows)}
    storage.mark_done(layout.step_dir(workdir, k, c), "train", info)
    return info


def train(cfg: Config, workdir: str, step: Step) -> dict:
    """Every shard in turn (sharing one process pool), then ``finish``: the embedded path."""
    coord = cfg.coordinate(step.coordinate)
    workers = cpu_count(cfg)
    partition = storage.done_info(layout.step_dir(workdir, step.iteration, step.coordinate), "partition") or {}
    rows = partition.get("rows", {}).get("train", POOL_MIN_ROWS)
    pooled = coord.solver == "scipy" and workers > 1 and rows >= POOL_MIN_ROWS
    executor = solver.make_executor(workers) if pooled else None
    try:
        for s in range(coord.shards):
            t0 = time.time()
            info = train_shard(cfg, workdir, step, s, executor=executor)
            print(f"{step} shard {s + 1}/{coord.shards}: {info['active_entities']} entities "
                  f"({info['passive_entities']} passive, {info['rows']} rows) in {time.time() - t0:.1f} s",
                  flush=True)
    except BaseException:
        if executor is not None:
            solver.terminate(executor)
            executor = None
        raise
    finally:
        if executor is not None:
            executor.shutdown(wait=True)
    return finish(cfg, workdir, step)

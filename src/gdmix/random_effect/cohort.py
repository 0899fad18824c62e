"""Per-cohort random effects: few, large entities solved as one data-parallel problem.

A coordinate whose entities are few and large (an occupation, a region × age band) gains
nothing from batching millions of tiny solves, and one entity's rows may not fit one
process. Instead its E active entities become one block-diagonal generalised linear model (the task's loss)
over D = E·(d+1) columns, solved by the fixed effect's TF workers in lockstep
(``cohort_worker``): row i of entity e maps its bag feature j to column e·(d+1) + 1 + j
and gets a 1 in column e·(d+1) (the entity's intercept), so

    F(α) = Σ_i w_i ℓ(o_i + x̃_i·α) + Σ_c pen_c/2 · α_c²,   pen_c = λ, or λ·r for intercept columns

is exactly Σ_e f_e(α_e) of the per-entity solver (``scipy_solver``): the same optimum,
written in the same per-entity ``schema.COEFFICIENTS`` format (an entity's model stores
every feature of its rows), so ``finish``, the shift, metrics and models are unchanged.
Rows of passive entities (fewer than ``min_samples`` rows) get no model, as there.
With ``max_samples``, an entity with more training rows trains on the same rows as there
(``sampling.sampled``: the smallest ``sampling.sample_key``, ties by uid): the launcher finds each
such entity's cut, the (key, uid) of its ``max_samples``-th row, in ``entities.parquet``,
and every worker keeps its rows at or below their entity's cut. An entity's model still
lists every feature of all its rows, as there, so the shift stays exact.

Choosing it: ``solver: data_parallel``, or ``solver: auto`` (``gdmix.kinds.per_cohort``).

Sharding: a data_parallel coordinate's rows are sharded by uid (not entity) into
``shards`` folders, and ``shards`` is its number of TF workers (worker w reads
``shard=w``): local processes in an embedded run, a TFJob's replicas on a cluster.
"""
from __future__ import annotations

import functools
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gdmix import config, layout, plan, schema, storage
from gdmix.config import Config
from gdmix.plan import Step

COMMAND_MODULE = "gdmix.random_effect.cohort_worker"
COMMAND = (sys.executable, "-m", COMMAND_MODULE)


def entities_url(workdir: str, step: Step) -> str:
    return storage.join(layout.step_dir(workdir, step.iteration, step.coordinate), "cohort", "entities.parquet")


def block_columns(indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, pos: np.ndarray,
                  d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR of the block design: row i (entity pos[i]) gets its intercept column
    pos·(d+1) first, then feature j at pos·(d+1) + 1 + j (ascending within the row)."""
    n = len(indptr) - 1
    lens = np.diff(indptr) + 1
    new_ptr = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    heads = new_ptr[:-1]
    is_feature = np.ones(new_ptr[-1], bool)
    is_feature[heads] = False
    base = pos.astype(np.int64) * (d + 1)
    cols = np.empty(new_ptr[-1], np.int64)
    vals = np.empty(new_ptr[-1], np.float64)
    cols[heads], vals[heads] = base, 1.0
    row = np.repeat(np.arange(n), np.diff(indptr))
    cols[is_feature] = base[row] + 1 + indices.astype(np.int64)
    vals[is_feature] = values
    return new_ptr, cols, vals


def penalty_vector(n_entities: int, d: int, l2: float, regularize_intercept: bool) -> np.ndarray:
    """Per-column L2 weights of θ = [b, blocks]: b (frozen at 0) none, intercepts λ·r, slopes λ."""
    block = np.full(d + 1, l2)
    block[0] = l2 if regularize_intercept else 0.0
    return np.concatenate([[0.0], np.tile(block, n_entities)])


def _active_entities(cfg: Config, workdir: str, step: Step, shifted: bool) -> tuple[pa.Table, list[int], int]:
    """(entity_id, rows) of the active entities, sorted by id; train rows per shard; passive entities."""
    coord = cfg.coordinate(step.coordinate)
    part = layout.partition(workdir, step.iteration, step.coordinate, "train")
    sch = schema.partition_schema(True, shifted)
    ids, per_shard = [], []
    for s in range(coord.shards):
        t = storage.read_table(layout.shard(part, s), columns=[schema.ENTITY_ID], schema=sch)
        ids.append(t.column(schema.ENTITY_ID))
        per_shard.append(t.num_rows)
    counts = pa.table({schema.ENTITY_ID: pa.chunked_array([c for a in ids for c in a.chunks], pa.string())}) \
        .group_by(schema.ENTITY_ID).aggregate([([], "count_all")]).rename_columns([schema.ENTITY_ID, "rows"])
    n_all = counts.num_rows
    counts = counts.filter(pc.greater_equal(counts.column("rows"), coord.min_samples)).sort_by(schema.ENTITY_ID)
    return counts, per_shard, n_all - counts.num_rows


CUT_KEY, CUT_UID = "cut_key", "cut_uid"  # entities.parquet: an entity's sample cut, null: all rows


def _sample_cuts(cfg: Config, workdir: str, step: Step, shifted: bool, active: pa.Table) -> pa.Table:
    """``active`` with each entity's sample cut (``CUT_KEY``, ``CUT_UID``): the largest
    (sample key, uid) of the ``max_samples`` rows it trains on; null for an entity that
    trains on all its rows (at most ``max_samples``)."""
    from gdmix.random_effect.sampling import sample_key, sampled

    coord = cfg.coordinate(step.coordinate)
    part = layout.partition(workdir, step.iteration, step.coordinate, "train")
    sch = schema.partition_schema(True, shifted)
    t = pa.concat_tables([storage.read_table(layout.shard(part, s), columns=[schema.ENTITY_ID, schema.UID],
                                             schema=sch) for s in range(coord.shards)])
    big = active.filter(pc.greater(active.column("rows"), coord.max_samples)).column(schema.ENTITY_ID)
    pos = pc.index_in(t.column(schema.ENTITY_ID), value_set=big.combine_chunks()).fill_null(-1) \
        .to_numpy(zero_copy_only=False)
    uid = t.column(schema.UID).to_numpy()[pos >= 0]
    pos = pos[pos >= 0]
    order = np.argsort(pos, kind="stable")  # rows grouped by entity, as the per-entity trainer has them
    uid, pos = uid[order], pos[order]
    row_ptr = np.concatenate([[0], np.cumsum(np.bincount(pos, minlength=len(big)))]).astype(np.int64)
    keep = sampled(uid, row_ptr, coord.max_samples, cfg.data.split_seed)
    kp, kk, ku = pos[keep], sample_key(uid, cfg.data.split_seed)[keep], uid[keep]
    o = np.lexsort((ku, kk, kp))  # by entity, then (key, uid): an entity's cut is its last
    last = o[np.append(kp[o][1:] != kp[o][:-1], True)] if len(o) else o
    cut_key, cut_uid = np.zeros(len(big), np.int64), np.zeros(len(big), np.int64)
    cut_key[kp[last]], cut_uid[kp[last]] = kk[last], ku[last]
    at = pc.index_in(active.column(schema.ENTITY_ID), value_set=big.combine_chunks()).fill_null(-1) \
        .to_numpy(zero_copy_only=False)
    null = at < 0
    return active.append_column(CUT_KEY, pa.array(np.where(null, 0, cut_key[at]), pa.int64(), mask=null)) \
        .append_column(CUT_UID, pa.array(np.where(null, 0, cut_uid[at]), pa.int64(), mask=null))


def solve(cfg: Config, workdir: str, step: Step, launcher=None) -> dict:
    """Solve the cohort coordinate on ``shards`` TF workers (``launcher``: local processes
    by default, or a TFJob) and mark every shard trained, as the per-entity shards would
    be: shard 0 holds every model (the chief wrote them). Returns the chief's status."""
    from gdmix.fixed_effect import launcher as launchers
    from gdmix.fixed_effect.worker import status_url

    t0 = time.time()
    coord = cfg.coordinate(step.coordinate)
    workdir = storage.absolute(workdir)
    if not storage.exists(storage.join(workdir, config.RUN_CONFIG)):
        config.snapshot(cfg.with_workdir(workdir))  # workers read the run's config from here
    shifted = plan.shifts_fixed_effect(cfg, step)
    active, per_shard, n_passive = _active_entities(cfg, workdir, step, shifted)
    if coord.max_samples is not None:
        active = _sample_cuts(cfg, workdir, step, shifted, active)
    storage.write_table(entities_url(workdir, step), active)
    k, c = step.iteration, step.coordinate
    for s in range(coord.shards):
        storage.remove(layout.shard_dir(workdir, k, c, s))
    run = functools.partial(launcher or launchers.run_local, command=COMMAND)
    run(workdir, step, coord.shards, cfg.timeouts.fixed_effect_seconds, cfg.timeouts.worker_exit_seconds)
    chief = storage.read_json(status_url(workdir, k, c, 0))
    n_active = active.num_rows
    for s in range(coord.shards):
        if s:
            storage.write_table(layout.shard_coefficients(workdir, k, c, s), schema.COEFFICIENTS.empty_table())
        elif not storage.exists(layout.shard_coefficients(workdir, k, c, 0)):
            raise RuntimeError(f"{step}: the cohort chief finished without writing the models")
        chief_shard = s == 0
        storage.mark_done(layout.shard_dir(workdir, k, c, s), "train", {
            "shard": s, "rows": per_shard[s], "active_entities": n_active if chief_shard else 0,
            "passive_entities": n_passive if chief_shard else 0,
            "not_converged": 0 if chief["converged"] or not chief_shard else n_active,
            "objective": chief["objective"] if chief_shard else 0.0,
            "seconds": round(time.time() - t0, 3) if chief_shard else 0.0})
    return chief

"""The random-effect training stage: every entity's model, shard by shard, then scores.

``train_shard`` fits the active entities of one shard (a pod's job on a cluster);
``finish`` gathers the shards, takes the slow-direction step into the fixed effect when
one is trained (``gdmix.shift``), and writes coefficients and scores; ``train`` runs both
in one process (the embedded path).

The shift assumes the train partition holds every training row (active and passive), as
the partition stage writes it: then every row with a shared feature is either in an
active entity whose model has that feature, or a passive row the shift accounts for.

``max_samples`` (the active-data bound): an entity with more training rows trains on the
``max_samples`` of them with the smallest ``sampling.sample_key`` (ties by uid), a deterministic
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
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gdmix import arrow_arrays as aa, l2, layout, losses, plan, priors, schema, sparse, storage
from gdmix.config import Config, Coordinate, cpu_count
from gdmix.plan import Step
from gdmix.random_effect import l2_auto, sampling
from gdmix.random_effect import scipy_solver as solver
from gdmix.random_effect.scipy_solver import Entities, Models
from gdmix.random_effect.shards import (BATCH_ROWS, column, gather, groups, iter_shard, models_from_table,
                                        models_table, positions, read_coefficients, read_shard,
                                        variances_from_table)

if TYPE_CHECKING:  # imported where a shift runs: it loads scipy.sparse
    from gdmix.random_effect.shift_step import FixedEffectShift

log = logging.getLogger(__name__)


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
    table = read_coefficients(layout.coefficients(workdir, prev.iteration, prev.coordinate, step.coordinate))
    return gather(models_from_table(table), positions(ids, table.column(schema.MODEL_ID)))


def _prior(cfg: Config, workdir: str, coord: Coordinate, ids: pa.Array) -> solver.Prior | None:
    """The prior's centres and weights aligned with ``ids`` (None without ``prior:``)."""
    models = priors.prior_models(cfg, workdir, coord)
    if models is None:
        return None
    m = models.aligned(ids)
    w = cfg.prior.weight
    return solver.Prior(Models(m.intercept, m.ptr, m.indices, m.mean),
                        Models(priors.weights(m.intercept_var, w), m.ptr, m.indices, priors.weights(m.var, w)))


def _release_unused() -> None:
    """Hand the memory Arrow's pool holds free back to the system, between the stage's phases.

    Arrow's buffers and numpy's arrays come from different allocators, so what Arrow frees
    (the decoder's scratch, a column sorted away, a scored batch) is of no use to numpy's next
    arrays (the solver's, the scores) until Arrow's pool hands it back; pyarrow's default pool
    (mimalloc) keeps freed pages for its own reuse until asked. The stage keeps that pool and
    asks here, after each phase. Measured on the step of ``benchmarks/random_effect_stage.py``
    (peak RSS of ``gdmix train`` on 86 MB of input, imports alone 221 MB; 3 runs each,
    interleaved, on a loaded machine, ``ARROW_DEFAULT_MEMORY_POOL`` set per run): this pool
    398-399 MB at 2.05 s CPU at best; the system allocator 357-378 MB at 2.15 s; jemalloc
    376-392 MB at 2.08 s. All three are within the target (about 2× the input above the
    imports, not 3×) at a CPU cost within the noise, and the default needs no process-wide
    switch (an embedded run's other stages keep their pool), so the stage keeps it; where
    the last 20-40 MB matter, ``ARROW_DEFAULT_MEMORY_POOL=system`` in the pod's environment
    gives them.
    """
    pa.default_memory_pool().release_unused()


def _settings(coord: Coordinate, task: str = "logistic") -> solver.Settings:
    return solver.Settings(coord.l2, coord.regularize_intercept, coord.tolerance, coord.max_iterations, task)


# --- one shard ------------------------------------------------------------------------------

# The scipy reference: below this many training rows a shard is solved in this process:
# starting a pool of worker processes (≈ 1 s: interpreters, numpy and scipy imports) costs
# more than the solve itself (≈ 1 s of one core per 200k rows). The default solver needs no
# pool: its compiled kernel runs on threads.
POOL_MIN_ROWS = 200_000

TRAIN_COLUMNS = [schema.UID, schema.LABEL, schema.WEIGHT, schema.OFFSET, schema.ENTITY_ID, schema.INDICES,
                 schema.VALUES]  # not the fixed score: only the finish's shift uses it


def train_shard(cfg: Config, workdir: str, step: Step, shard: int,
                executor: cf.ProcessPoolExecutor | None = None) -> dict:
    """Fit every active entity of one shard; write its models and a done marker."""
    t0 = time.time()
    coord = cfg.coordinate(step.coordinate)
    if coord.is_fixed_effect:
        raise ValueError(f"{step.coordinate} is a fixed effect, not a random effect")
    shard_rows = {}

    def active_only(keys: pa.Table) -> np.ndarray | None:
        """The grouped rows of the entities with at least ``min_samples`` rows (None: all)."""
        _, ptr = groups(keys)
        counts = np.diff(ptr)
        active = counts >= coord.min_samples
        shard_rows.update(rows=int(ptr[-1]), passive=int((~active).sum()))
        return None if active.all() else np.flatnonzero(np.repeat(active, counts))

    # passive entities' rows dropped in the grouping's one copy, not by a filter copying them all again
    rows = read_shard(workdir, step, "train", shard, plan.shifts_fixed_effect(cfg, step), grouped=True,
                      columns=TRAIN_COLUMNS, select=active_only)
    _release_unused()  # the decoder's and the sort's scratch, before numpy allocates the solver's arrays
    ids, active_ptr = groups(rows)
    counts = np.diff(active_ptr)
    all_rows, trained_ptr = rows, active_ptr
    if coord.max_samples is not None:  # the active-data bound: a hashed sample of big entities
        keep = sampling.sampled(aa.to_numpy(rows.column(schema.UID)), active_ptr, coord.max_samples, cfg.data.split_seed)
        if not keep.all():
            rows = rows.filter(aa.array(keep))
            trained_ptr = np.concatenate([[0], np.cumsum(np.minimum(counts, coord.max_samples))]).astype(np.int64)
    ent = Entities(trained_ptr, sparse.from_table(rows, schema.INDICES, schema.VALUES),
                   *(column(rows, n, writable=True) for n in (schema.LABEL, schema.WEIGHT, schema.OFFSET)))
    # The rows as Arrow are no longer needed (the solver's arrays are copies, or views that
    # keep their own buffers: the feature indices); only a sampled step's feature lists
    # are, for the models' padding below. Released before the solve allocates.
    # (Copies of label, weight and offset: the kernels are compiled for writable arrays.)
    all_bag = all_rows.select([schema.INDICES, schema.VALUES]) if rows is not all_rows else None
    del rows, all_rows
    _release_unused()
    warm = _warm_start(cfg, workdir, step, ids)
    prior = _prior(cfg, workdir, coord, ids)
    solve, variances_of = _solvers(cfg, coord, len(ent.label), executor)
    auto = coord.l2_auto is not None
    if auto:  # λ estimated from the data (docs/design.md §7); with one shard it settles within the step
        lam = l2.start_of(cfg, workdir, step, coord.name)
        from gdmix.random_effect.shift_step import n_features  # (scipy.sparse: only where it is used)

        est = l2_auto.settle(ent, coord, lam, warm, solve, n_features(workdir, coord.feature_bag),
                             l2_auto.ROUNDS if coord.shards == 1 else 1, cpu_count(cfg), cfg.task)
        result, prior, lam, moments, rounds = est.result, est.prior, est.used, est.moments, est.rounds
    else:
        result = solve(ent, warm, prior)
    variances = None
    models = result.models
    if all_bag is not None:  # every feature of all an entity's rows, for the shift (see the top)
        models = sampling.with_features_of(models, active_ptr,
                                           sparse.from_table(all_bag, schema.INDICES, schema.VALUES, np.float32))
    if coord.variance != "none":  # of the trained rows' objective; a padded feature's is its penalty's
        variances = variances_of(ent, models, prior, coord.variance == "full")
    storage.write_table(layout.shard_coefficients(workdir, step.iteration, step.coordinate, shard),
                        models_table(ids, models, variances))
    not_converged = int((~result.converged).sum())
    separable = int(result.separable.sum())
    if not_converged:
        log.warning("%s shard %d: %d of %d entities did not converge within %d iterations; %d of them "
                    "are separable (l2 = 0, or an unpenalised intercept with one class: no finite "
                    "optimum, their coefficients grow with max_iterations)",
                    step, shard, not_converged, len(ids), coord.max_iterations, separable)
    info = {"shard": shard, "rows": shard_rows["rows"], "active_rows": int(active_ptr[-1]),
            "trained_rows": int(trained_ptr[-1]),
            "sampled_entities": int((counts > (coord.max_samples or np.inf)).sum()),
            "active_entities": len(ids), "passive_entities": shard_rows["passive"],
            "objective": float(result.objective.sum()), "not_converged": not_converged,
            "separable": separable, "max_iterations": int(result.iterations.max(initial=0)),
            "iterations": int(result.iterations.sum()), "warm_start": warm is not None,
            "seconds": round(time.time() - t0, 3)}
    if auto:  # finish adds the shards' moments into the next λ
        info["l2"] = {"used": lam.to_json(), "moments": moments.to_json(), "rounds": [x.to_json() for x in rounds]}
    storage.mark_done(layout.shard_dir(workdir, step.iteration, step.coordinate, shard), "train", info)
    _release_unused()  # the shard's arrays, back to the system before the next reader
    return info


def _solvers(cfg: Config, coord: Coordinate, n_rows: int, executor):
    """(solve(ent, warm, prior[, workers]), variances(ent, models, prior, full)) of the coordinate's solver."""
    settings = _settings(coord, cfg.task)
    if coord.solver == "scipy":
        small = n_rows < POOL_MIN_ROWS  # one process: a pool would cost more than it saves
        return (lambda ent, warm, prior, workers=cpu_count(cfg): solver.solve(
                    ent, settings, warm, workers=1 if small else workers, executor=None if small else executor,
                    prior=prior),
                lambda ent, models, prior, full: solver.variances(ent, settings, models, prior, full))
    from gdmix.random_effect import vectorised  # "vectorised" ("auto" resolved to it); numba: only here

    return (lambda ent, warm, prior, workers=cpu_count(cfg): vectorised.solve(ent, settings, warm, workers=workers,
                                                                              prior=prior),
            lambda ent, models, prior, full: vectorised.variances(ent, settings, models, prior, full,
                                                                  workers=cpu_count(cfg)))


# --- after all shards -------------------------------------------------------------------------

# What the finish reads of each split: a validation row only needs scoring.
FINISH_COLUMNS = {"train": TRAIN_COLUMNS, "validation": [schema.UID, schema.ENTITY_ID, schema.INDICES, schema.VALUES]}


def _scores(models: Models, pos: np.ndarray, csr: sparse.CSR) -> np.ndarray:
    """a_e + z_i·α_e per row (``pos``: the row's model, -1 = none, score 0), compiled."""
    from gdmix.random_effect import row_scores  # numba: loaded where rows are scored

    return row_scores.scores(pos, csr.indptr, csr.indices, csr.values, models.ptr, models.indices,
                             models.values, models.intercept)


def _write_parts(url: str, tables: list[pa.Table], table_schema: pa.Schema) -> None:
    """A folder of part files, committed as a whole."""
    with storage.atomic_path(url) as tmp:
        storage.makedirs(tmp)
        for i, t in enumerate(tables or [table_schema.empty_table()]):
            storage.write_table(storage.join(tmp, f"part-{i:05d}.parquet"), t)


# The shift's passive rows: what ``FixedEffectShift.solve`` reads of them.
PASSIVE_COLUMNS = [schema.ENTITY_ID, schema.LABEL, schema.WEIGHT, schema.OFFSET, schema.INDICES, schema.VALUES]


def _passive_rows(workdir: str, step: Step, shards: int, ids: pa.Array, batch_rows: int) -> list[pa.Table]:
    """The training rows of the entities without a model, batch by batch: memory O(batch)
    plus the passive rows themselves, never a whole shard."""
    out = []
    for s in range(shards):
        for rows in iter_shard(workdir, step, "train", s, True, PASSIVE_COLUMNS, batch_rows):
            passive = positions(rows.column(schema.ENTITY_ID), ids) < 0
            if passive.any():
                out.append(rows.filter(aa.array(passive)))
    return out


@dataclass
class _Scored:
    own: pa.Table  # schema.SCORES: this coordinate's score of every row of the shard
    fixed: pa.Table | None  # the fixed effect's shifted scores (a shifting step's)
    loss: float  # Σ w ℓ over the shard's rows (train; 0 for validation)
    unseen_ids: int  # entities without a model (validation)
    unseen_rows: int


def _score_shard(cfg: Config, workdir: str, step: Step, split: str, shard: int, models: Models, ids: pa.Array,
                 sh: FixedEffectShift | None, batch_rows: int) -> _Scored:
    """One shard of a split scored batch by batch (``iter_shard``): memory O(batch) plus
    the shard's outputs (uid and score per row) and, for the training loss, three numbers
    a row, never the shard's rows at once."""
    shifted = sh is not None
    uids, own, fixed, no_model = [], [], [], []
    loss_terms = []  # (s, y, w) per batch: the loss is summed once per shard, as before batches
    for rows in iter_shard(workdir, step, split, shard, shifted,
                           FINISH_COLUMNS[split] + ([schema.FIXED_SCORE] if shifted else []), batch_rows):
        csr = sparse.from_table(rows, schema.INDICES, schema.VALUES, np.float32)  # as stored: no float64 copy
        pos = positions(rows.column(schema.ENTITY_ID), ids)
        score = _scores(models, pos, csr)
        if len(score) != rows.num_rows:
            raise RuntimeError(f"{step} {split} shard {shard}: {len(score)} scores for {rows.num_rows} rows")
        if split == "validation":  # entities live in one shard each: the shards' counts add up
            no_model.append(rows.column(schema.ENTITY_ID).filter(aa.array(pos < 0)))
        uids.append(rows.column(schema.UID))
        own.append(score)
        moved = 0.0  # the fixed effect's score change (the shift)
        if shifted:
            new_fixed = column(rows, schema.FIXED_SCORE) + sh.t[0] + csr.dot(sh.t_random)
            fixed.append(new_fixed)
            moved = new_fixed - column(rows, schema.FIXED_SCORE)
        if split == "train":
            loss_terms.append((column(rows, schema.OFFSET) + score + moved, column(rows, schema.LABEL),
                               column(rows, schema.WEIGHT)))
    # one part file per shard, in one chunk (built from the batches' chunks: a list of chunked
    # arrays would go through pa.array, which imports pandas)
    uid = pa.chunked_array([a for u in uids for a in u.chunks], pa.int64()).combine_chunks()
    missing = pa.chunked_array([a for m in no_model for a in m.chunks], pa.string())
    # One sum per shard (24 bytes a training row until here): the same objective, to the last
    # bit, as scoring whole shards; and one BLAS dot product, not one per batch (each wakes
    # the BLAS threads, which then spin: 23 small dots cost 15 times one large one).
    loss = losses.of(cfg.task).loss(*(np.concatenate(t) for t in zip(*loss_terms))) if loss_terms else 0.0
    return _Scored(_scores_table(uid, own), _scores_table(uid, fixed) if shifted else None, loss,
                   pc.count_distinct(missing).as_py() if len(missing) else 0, len(missing))


def _scores_table(uid: pa.Array, scores: list[np.ndarray]) -> pa.Table:
    return pa.table({schema.UID: uid, schema.SCORE: aa.array(np.concatenate(scores) if scores else np.zeros(0))},
                    schema=schema.SCORES)


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
    coefs = pa.concat_tables([read_coefficients(layout.shard_coefficients(workdir, k, c, s))
                              for s in range(coord.shards)]).combine_chunks()
    ids = coefs.column(schema.MODEL_ID).combine_chunks()
    models = models_from_table(coefs)
    variances = variances_from_table(coefs)  # a shift leaves them as they are: H_e does not move
    shifted = plan.shifts_fixed_effect(cfg, step)
    if coord.l2_auto is not None:  # before the shift, which reads this step's λ
        used = l2.L2.from_json(shard_infos[0]["l2"]["used"])
        moments = sum((l2_auto.Moments.from_json(i["l2"]["moments"]) for i in shard_infos[1:]),
                      l2_auto.Moments.from_json(shard_infos[0]["l2"]["moments"]))
        rounds = [l2.L2.from_json(x) for x in shard_infos[0]["l2"]["rounds"]] if coord.shards == 1 else []
        l2.write(workdir, step, used, l2_auto.update(used, moments, coord), rounds)
    # Each batch's entity lookup (pc.index_in) hashes every id again (≈ 0.1 µs each; a row
    # costs ≈ 2 µs to read and score): batches of an eighth of the ids keep that under half.
    batch_rows = max(BATCH_ROWS, len(ids) // 8)
    sh = None
    if shifted:
        from gdmix.random_effect.shift_step import FixedEffectShift  # scipy.sparse: only when shifting

        sh = FixedEffectShift(cfg, workdir, step, models, ids)
        sh.solve(_passive_rows(workdir, step, coord.shards, ids, batch_rows))
        models = sh.apply()
        _write_parts(layout.coefficients(workdir, k, c, cfg.fixed_effect.name), [sh.fixed_table()],
                     schema.COEFFICIENTS)
    _write_parts(layout.coefficients(workdir, k, c, c), [models_table(ids, models, variances)], schema.COEFFICIENTS)
    _release_unused()

    part_done = storage.done_info(layout.step_dir(workdir, k, c), "partition")
    rows_by_split, loss, unseen_ids, unseen_rows = {}, 0.0, 0, 0
    for split in layout.SPLITS:
        own, fixed, n_rows = [], [], 0
        for s in range(coord.shards):
            scored = _score_shard(cfg, workdir, step, split, s, models, ids, sh, batch_rows)
            own.append(scored.own)
            if shifted:
                fixed.append(scored.fixed)
            loss += scored.loss
            unseen_ids += scored.unseen_ids
            unseen_rows += scored.unseen_rows
            n_rows += scored.own.num_rows
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
        del own, fixed
        _release_unused()

    if coord.l2_auto is not None:
        penalty = l2.penalty(l2.l2_of(cfg, workdir, step, c), coord, models_table(ids, models))
    else:
        penalty = priors.penalty(coord, priors.prior_models(cfg, workdir, coord),
                                 cfg.prior.weight if cfg.prior else 1.0, models_table(ids, models))
    info = {
        "rows": rows_by_split,
        "active_entities": sum(i["active_entities"] for i in shard_infos),
        "passive_entities": sum(i["passive_entities"] for i in shard_infos),
        "not_converged": sum(i["not_converged"] for i in shard_infos),
        "unseen_entities": unseen_ids, "unseen_rows": unseen_rows,
        "outcome": entity_outcome(shard_infos, coord.max_iterations),
        # loss over all training rows + the penalties of the coordinates this step wrote
        "objective": loss + penalty + (sh.penalty() if sh else 0.0),
        "shifted": shifted,
        "seconds": round(time.time() - t0 + sum(i["seconds"] for i in shard_infos), 3),
    }
    if all("max_iterations" in i for i in shard_infos):  # the per-entity solvers' (not a cohort's)
        info["entity_iterations"] = {"max": max((i["max_iterations"] for i in shard_infos), default=0),
                                     "mean": sum(i["iterations"] for i in shard_infos)
                                     / max(1, sum(i["active_entities"] for i in shard_infos))}
    if coord.l2_auto is not None:
        info["l2"] = l2.read(workdir, step)
    if sh is not None:
        info["shift"] = {"directions": len(sh.t), "intercept": float(sh.t[0]),
                         "max_abs": float(np.max(np.abs(sh.t))), "decrease": float(sh.decrease),
                         "passive_rows": int(sh.passive_rows)}
    storage.mark_done(layout.step_dir(workdir, k, c), "train", info)
    return info


def entity_outcome(shard_infos: list[dict], max_iterations: int) -> str:
    """The per-entity solves' end in plain words (docs/design.md §3.2)."""
    active = sum(i["active_entities"] for i in shard_infos)
    stuck = sum(i["not_converged"] for i in shard_infos)
    separable = sum(i.get("separable", 0) for i in shard_infos)
    if not stuck:
        return f"all {active} entities converged (gradient ≤ tolerance)"
    why = f", {separable} of them separable (no finite optimum)" if separable else ""
    return f"{active - stuck} of {active} entities converged; {stuck} stopped at max_iterations {max_iterations}{why}"


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

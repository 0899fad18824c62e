"""One TF worker of a per-cohort random effect (see ``cohort`` for the block design).

    python -m gdmix.random_effect.cohort_worker --workdir W --iteration k --coordinate c

Worker w reads partition shard ``shard=w`` (rows sharded by uid), maps its rows to the
block columns, and sums loss/gradient/Hessian-vector products with the fixed effect's
``worker.Distributed`` all-reduce; every worker runs the same solver in lockstep. θ[0]
(the fixed-effect worker's global intercept) is frozen at 0: its gradient and Hessian
row/column are zeroed, so the solver never moves it, and the per-column penalty vector
expresses penalised or unpenalised entity intercepts. The chief writes every entity's
model; the exit protocol (final barrier, status files, prompt exit) is the fixed effect's.
"""
from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gdmix import config, layout, plan, priors, schema, sparse, storage
from gdmix import losses
from gdmix.fixed_effect import data, objective, solver
from gdmix.fixed_effect import worker as fe_worker
from gdmix.random_effect import cohort


def _rows(workdir: str, step: plan.Step, index: int, shifted: bool, ids: pa.Array, d: int,
          entities: pa.Table | None = None, seed: int = 0) -> tuple[data.Shard, np.ndarray]:
    """This worker's train rows of active entities, in the block design; and the block
    columns of all those rows (before ``max_samples`` keeps only the rows at or below their
    entity's cut in ``entities``: an entity's model lists every feature of all its rows)."""
    url = layout.shard(layout.partition(workdir, step.iteration, step.coordinate, "train"), index)
    t = storage.read_table(url, schema=schema.partition_schema(True, shifted))
    pos = pc.index_in(t.column(schema.ENTITY_ID), value_set=ids).fill_null(-1).to_numpy(zero_copy_only=False)
    t = t.filter(pa.array(pos >= 0))
    pos = pos[pos >= 0]
    x = sparse.from_table(t, schema.INDICES, schema.VALUES)
    if len(x.indices) and x.indices.max() >= d:
        raise ValueError(f"{url}: feature index {x.indices.max()} out of range for {d} features")
    ptr, cols, vals = cohort.block_columns(x.indptr, x.indices, x.values, pos, d)
    all_cols = cols
    if entities is not None and cohort.CUT_KEY in entities.column_names:  # the max_samples sample
        from gdmix.random_effect.sampling import sample_key

        cut = entities.column(cohort.CUT_KEY).combine_chunks()
        has_cut = cut.is_valid().to_numpy(zero_copy_only=False)[pos]
        ck = cut.fill_null(0).to_numpy()[pos]
        cu = entities.column(cohort.CUT_UID).combine_chunks().fill_null(0).to_numpy()[pos]
        uid = t.column(schema.UID).to_numpy().astype(np.int64)
        key = sample_key(uid, seed)
        keep = ~has_cut | (key < ck) | ((key == ck) & (uid <= cu))
        if not keep.all():
            t = t.filter(pa.array(keep))
            lens = np.diff(ptr)[keep]
            take = np.repeat(keep, np.diff(ptr))
            ptr = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
            cols, vals = cols[take], vals[take]
    col = {c: t.column(c).to_numpy().astype(np.float64) for c in (schema.LABEL, schema.WEIGHT, schema.OFFSET)}
    return data.Shard(uid=t.column(schema.UID).to_numpy().astype(np.int64), y=col[schema.LABEL],
                      w=col[schema.WEIGHT], offset=col[schema.OFFSET], x=sparse.CSR(ptr, cols, vals)), all_cols


def _block_positions(models: priors.CoordinateModels, d: int) -> tuple[np.ndarray, np.ndarray]:
    """θ positions of aligned models' intercepts and features (block design, θ[0] frozen)."""
    n = models.n_models
    icp = 1 + np.arange(n) * (d + 1)
    owner = np.repeat(np.arange(n), np.diff(models.ptr))
    return icp, 1 + owner * (d + 1) + 1 + models.indices.astype(np.int64)


def _prior(cfg, workdir: str, coord, ids: pa.Array, d: int, pen: np.ndarray) -> np.ndarray | None:
    """The prior's centres over θ, its weights written into ``pen`` (None: no prior)."""
    models = priors.prior_models(cfg, workdir, coord)
    if models is None:
        return None
    m = models.aligned(ids)
    keep = m.indices < d
    icp_at, feat_at = _block_positions(m, d)
    centre = np.zeros(len(pen))
    for at, mean, w in ((icp_at, m.intercept, priors.weights(m.intercept_var, cfg.prior.weight)),
                        (feat_at[keep], m.mean[keep], priors.weights(m.var[keep], cfg.prior.weight))):
        has = ~np.isnan(w)
        pen[at[has]], centre[at[has]] = w[has], mean[has]
    return centre


def _warm_start(cfg, workdir: str, step: plan.Step, ids: pa.Array, d: int) -> np.ndarray | None:
    prev = plan.latest(cfg, step.coordinate, step)
    if prev is None:  # the first step: the models of ``warm_start``, if any
        earlier = priors.warm_models(cfg, workdir, cfg.coordinate(step.coordinate))
        if earlier is None:
            return None
        m = earlier.aligned(ids)
        keep = m.indices < d
        icp_at, feat_at = _block_positions(m, d)
        theta = np.zeros(1 + len(ids) * (d + 1))
        theta[icp_at] = m.intercept
        theta[feat_at[keep]] = m.mean[keep]
        return theta
    t = storage.read_table(layout.coefficients(workdir, prev.iteration, prev.coordinate, step.coordinate))
    theta = np.zeros(1 + len(ids) * (d + 1))
    pos = pc.index_in(t.column(schema.MODEL_ID), value_set=ids).fill_null(-1).to_numpy(zero_copy_only=False)
    for p, b, idx, val in zip(pos, t.column(schema.INTERCEPT).to_pylist(), t.column(schema.INDICES).to_pylist(),
                              t.column(schema.VALUES).to_pylist()):
        if p >= 0:
            base = 1 + p * (d + 1)
            theta[base] = b
            theta[base + 1 + np.asarray(idx, np.int64)] = val
    return theta


def _models(theta: np.ndarray, present: np.ndarray, ids: pa.Array, d: int,
            variances: np.ndarray | None = None) -> pa.Table:
    """Per-entity schema.COEFFICIENTS rows; an entity's model stores every feature of its
    rows. ``variances`` over θ: COEFFICIENTS_WITH_VARIANCES."""
    blocks = theta[1:].reshape(len(ids), d + 1)
    has = present.reshape(len(ids), d + 1)[:, 1:] > 0
    ent, feat = np.nonzero(has)  # row-major: entities in order, features ascending
    ptr = np.concatenate([[0], np.cumsum(has.sum(axis=1))])
    idx, val = sparse.to_arrow_lists(ptr, feat.astype(np.int32), blocks[:, 1:][ent, feat])
    cols = [ids.cast(pa.string()), pa.array(blocks[:, 0], pa.float64()), idx, val]
    if variances is None:
        return pa.Table.from_arrays(cols, schema=schema.COEFFICIENTS)
    vb = variances[1:].reshape(len(ids), d + 1)
    _, var = sparse.to_arrow_lists(ptr, feat.astype(np.int32), vb[:, 1:][ent, feat])
    return pa.Table.from_arrays(cols + [pa.array(vb[:, 0], pa.float64()), var],
                                schema=schema.COEFFICIENTS_WITH_VARIANCES)


FULL_VARIANCE_MAX_CELLS = 1 << 24  # variance: full all-reduces E·(d+1)² Hessian block entries up to this


def _variances(dist, rows: data.Shard, theta: np.ndarray, pen: np.ndarray, n_ent: int, d: int,
               full: bool, task: str = "logistic") -> tuple[np.ndarray, str]:
    """Variances over θ from the block-diagonal Hessian H = Σ_i c_i x̃_i x̃_iᵀ + diag(π)
    (a row touches only its entity's block): 1/diag(H), or diag(H_e⁻¹) block by block
    from all-reduced E (d+1)×(d+1) blocks."""
    n_cols = len(theta) - 1
    x = rows.x.matrix(n_cols)  # columns: θ[1:]
    if full and n_ent * (d + 1) ** 2 <= FULL_VARIANCE_MAX_CELLS:
        c = losses.of(task).curvature(rows.offset + theta[0] + x @ theta[1:], rows.w)
        h = (x.T @ x.multiply(c[:, None]).tocsr()).tocoo()  # block-diagonal: a row has one entity
        blocks = np.zeros((n_ent, d + 1, d + 1))
        np.add.at(blocks, (h.row // (d + 1), h.row % (d + 1), h.col % (d + 1)), h.data)
        blocks = dist.all_sum(blocks.ravel()).reshape(blocks.shape)
        blocks[:, np.arange(d + 1), np.arange(d + 1)] += pen[1:].reshape(n_ent, d + 1)
        out = np.full(n_cols + 1, np.nan)
        for e in range(n_ent):  # few, large entities: one (d+1)² inverse each
            out[1 + e * (d + 1):1 + (e + 1) * (d + 1)] = objective.variances(h=blocks[e])
        return out, "full"
    diag = dist.all_sum(objective.data_hessian_diag(theta, x, rows.w, rows.offset, losses.of(task)))
    # entry 0 (θ[0], frozen) is never written
    return objective.variances(h_diag=diag + pen), "simple" if not full else "simple (too many cells for full)"


def train(workdir: str, iteration: int, coordinate: str) -> dict:
    index, n_workers = fe_worker.cluster_role()
    chief = index == 0
    started = time.time()
    cfg = config.load_run(workdir)
    coord = cfg.coordinate(coordinate)
    step = plan.Step(iteration, coordinate)
    d = data.n_features(workdir, coord.feature_bag)
    entities = storage.read_table(cohort.entities_url(workdir, step))
    ids = entities.column(schema.ENTITY_ID).combine_chunks()
    rows, all_cols = _rows(workdir, step, index, plan.shifts_fixed_effect(cfg, step), ids, d, entities,
                           cfg.data.split_seed)
    n_cols = len(ids) * (d + 1)
    theta0 = _warm_start(cfg, workdir, step, ids, d)
    pen = cohort.penalty_vector(len(ids), d, coord.l2, coord.regularize_intercept)
    centre = _prior(cfg, workdir, coord, ids, d, pen)  # a prior's centres; its weights go into pen
    if centre is None:
        centre = np.zeros(len(pen))

    tf = fe_worker.import_tensorflow_without_keras()

    dist = fe_worker.Distributed(fe_worker.cluster_strategy(tf), rows, n_cols, cfg.task)
    present = np.bincount(all_cols, minlength=n_cols).astype(np.float64)
    sums = dist.all_sum(np.concatenate([[rows.w.sum(), rows.n_rows, 1.0], present]))
    total_w, total_n, total_workers, present = sums[0], sums[1], sums[2], sums[3:]
    if int(round(total_workers)) != n_workers:
        raise RuntimeError(f"all-reduce saw {total_workers} workers, TF_CONFIG says {n_workers}")

    def fun_grad(theta):
        loss, g = dist.fun_grad(theta)
        g[0] = 0.0  # θ[0] frozen at 0: no global intercept in a per-entity model
        dev = theta - centre
        return loss + 0.5 * float(pen @ (dev * dev)), g + pen * dev

    def hessp(theta, v):
        v = v.copy()
        v[0] = 0.0
        out = dist.hessp(theta, v) + pen * v
        out[0] = 0.0
        return out

    if chief:
        print(f"[cohort {step}] {n_workers} worker(s), {int(total_n)} rows, {len(ids)} entities x "
              f"{d + 1} columns", flush=True)
    x0 = np.zeros(n_cols + 1) if theta0 is None else theta0
    theta, info = solver.solve(fun_grad, x0, gtol=objective.gtol(coord.tolerance, total_w),
                               max_iter=coord.max_iterations, hessp=hessp)
    if chief:
        print(f"[cohort {step}] {info.outcome} in {info.iterations} iterations: coordinate objective "
              f"{info.objective:.12g}, gradient {info.grad_inf:.3e}", flush=True)
    variances, variance_info = None, None
    if coord.variance != "none":  # every worker joins its all-reduce
        variances, variance_info = _variances(dist, rows, theta, pen, len(ids), d, coord.variance == "full",
                                                    cfg.task)
    if chief:
        storage.write_table(layout.shard_coefficients(workdir, iteration, coordinate, 0),
                            _models(theta, present, ids, d, variances))
    dist.all_sum([1.0])  # final barrier
    status = {"worker": index, "workers": n_workers, "rows": rows.n_rows, "total_rows": int(total_n),
              "seconds": round(time.time() - started, 3), **info.as_dict(),
              **({"variance": variance_info} if variance_info is not None else {})}
    storage.write_json(fe_worker.status_url(workdir, iteration, coordinate, index), status)
    fe_worker.wait_for_peers(workdir, iteration, coordinate, n_workers, cfg.timeouts.worker_exit_seconds)
    return status


def main(argv=None) -> None:
    from gdmix.fixed_effect.worker import run_main

    run_main("python -m gdmix.random_effect.cohort_worker", train, argv)


if __name__ == "__main__":
    main()

"""The per-entity scipy solver and the random-effect stage, on real scipy and real pools."""
from __future__ import annotations

import zlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import scipy.optimize as so
from scipy.special import expit

from gdmix import joint, layout, plan, schema, sparse, storage
from gdmix.random_effect import scipy_solver as solver
from gdmix.random_effect import stage
from gdmix.random_effect.scipy_solver import Entities, Models, Settings
from gdmix.sparse import CSR
from test_joint import _lists, make_workdir


def _entities(blocks):
    """Entities from a list of (dense z, y, w, o) per entity (columns = global indices)."""
    rows_idx, rows_val, y, w, o, ptr = [], [], [], [], [], [0]
    for z, yy, ww, oo in blocks:
        for r in z:
            nz = np.flatnonzero(r)
            rows_idx.append(nz)
            rows_val.append(r[nz])
        y.append(yy), w.append(ww), o.append(oo)
        ptr.append(ptr[-1] + len(yy))
    indptr = np.concatenate([[0], np.cumsum([len(i) for i in rows_idx])]).astype(np.int64)
    csr = CSR(indptr, np.concatenate(rows_idx).astype(np.int32), np.concatenate(rows_val))
    return Entities(np.array(ptr, np.int64), csr, np.concatenate(y), np.concatenate(w), np.concatenate(o))


def _direct(z, y, w, o, lam, reg):
    """A second, independent solve: exact Newton-CG with the full Hessian."""
    x1 = np.hstack([np.ones((len(y), 1)), z])
    pen = np.full(x1.shape[1], lam)
    pen[0] = lam if reg else 0.0

    def f(t):
        s = o + x1 @ t
        return w @ (np.logaddexp(0, s) - y * s) + 0.5 * pen @ (t * t)

    def g(t):
        return x1.T @ (w * (expit(o + x1 @ t) - y)) + pen * t

    def h(t):
        p = expit(o + x1 @ t)
        return x1.T @ (x1 * (w * p * (1 - p))[:, None]) + np.diag(pen)

    return so.minimize(f, np.zeros(x1.shape[1]), jac=g, hess=h, method="trust-exact", options={"gtol": 1e-13}).x


def _random_block(rng, n, p, col_offset=0, n_global=None):
    z = np.zeros((n, n_global or p))
    z[:, col_offset:col_offset + p] = rng.normal(size=(n, p))
    s = 0.5 + z @ rng.normal(size=z.shape[1])
    y = (rng.random(n) < expit(s)).astype(float)
    return z, y, rng.uniform(0.5, 2.0, n), rng.normal(0, 0.3, n)


def _model(models: Models, e: int) -> np.ndarray:
    return np.concatenate([[models.intercept[e]], models.values[models.ptr[e]:models.ptr[e + 1]]])


@pytest.mark.parametrize("reg", [True, False])
def test_entity_solves_match_a_direct_newton_solve(reg):
    rng = np.random.default_rng(0)
    # three entities on different global feature ranges (local indexing inside)
    blocks = [_random_block(rng, 40, 3, 0, 8), _random_block(rng, 25, 4, 3, 8), _random_block(rng, 12, 2, 6, 8)]
    res = solver.solve_block(_entities(blocks), Settings(l2=0.7, regularize_intercept=reg))
    assert res.converged.all()
    for e, (z, y, w, o) in enumerate(blocks):
        cols = np.flatnonzero(np.any(z != 0, axis=0))
        assert np.array_equal(res.models.indices[res.models.ptr[e]:res.models.ptr[e + 1]], cols)
        np.testing.assert_allclose(_model(res.models, e), _direct(z[:, cols], y, w, o, 0.7, reg), atol=1e-6, rtol=0)
        # optimality conditions of the intercept: penalised or not
        x = _model(res.models, e)
        resid = w @ (expit(o + x[0] + z[:, cols] @ x[1:]) - y)
        assert abs(resid + (0.7 * x[0] if reg else 0.0)) < 1e-7
        if not reg:
            assert abs(resid) < 1e-7  # unpenalised: calibrated per entity


def test_one_row_and_one_class_entities_are_finite_and_optimal():
    one_row = (np.array([[0.0, 2.0]]), np.array([1.0]), np.array([1.0]), np.array([0.3]))
    no_features = (np.zeros((1, 2)), np.array([0.0]), np.array([2.0]), np.array([0.0]))
    one_class = (np.array([[1.0, 0.5], [-1.0, 0.2], [0.3, 0.0]]), np.zeros(3), np.ones(3), np.zeros(3))
    ent = _entities([one_row, no_features, one_class])
    res = solver.solve_block(ent, Settings(l2=1.0))
    assert res.converged.all() and np.isfinite(res.models.values).all()
    # a featureless single row: the stationarity condition w (σ(o + a) − y) + λ a = 0
    a = res.models.intercept[1]
    assert res.models.ptr[2] - res.models.ptr[1] == 0
    assert abs(2.0 * expit(a) + a) < 1e-9 and a < 0
    for e, blk in enumerate([one_row, no_features, one_class]):
        z, y, w, o = blk
        cols = np.flatnonzero(np.any(z != 0, axis=0))
        np.testing.assert_allclose(_model(res.models, e), _direct(z[:, cols], y, w, o, 1.0, True), atol=1e-7)


def test_separable_entity_without_l2_stops_at_max_iterations_and_says_so():
    one_class = (np.array([[1.0], [2.0], [0.5]]), np.ones(3), np.ones(3), np.zeros(3))
    res = solver.solve_block(_entities([one_class]), Settings(l2=0.0, max_iterations=30))
    assert not res.converged[0] and res.separable[0]
    assert res.iterations[0] <= 30 and np.isfinite(_model(res.models, 0)).all()
    assert res.objective[0] < 0.1 * 3 * np.log(2)  # it did descend toward the infimum 0


def test_warm_start_reaches_the_same_optimum_faster():
    rng = np.random.default_rng(2)
    blocks = [_random_block(rng, int(rng.integers(5, 50)), 4) for _ in range(12)]
    ent = _entities(blocks)
    s = Settings(l2=0.5)
    cold = solver.solve_block(ent, s)
    warm = Models(cold.models.intercept + 0.01, cold.models.ptr, cold.models.indices.copy(),
                  cold.models.values * 1.01)
    # a warm model may name features the entity no longer has: they are ignored
    warm = Models.concat([Models(warm.intercept[:1], np.array([0, 1]), np.array([7], np.int32), np.array([5.0])),
                          warm.slice(1, 12)])
    again = solver.solve_block(ent, s, warm)
    np.testing.assert_allclose(again.models.values, cold.models.values, atol=1e-7)
    np.testing.assert_allclose(again.models.intercept, cold.models.intercept, atol=1e-7)
    assert again.iterations[1:].sum() < cold.iterations[1:].sum()


def _prepared_entities(rows: pa.Table, min_samples=1):
    """Entities (rows sorted by user) straight from prepared rows, for the 'u' bag."""
    rows = rows.sort_by([("user", "ascending"), ("uid", "ascending")])
    users = rows.column("user").to_numpy(zero_copy_only=False)
    ids, starts, counts = np.unique(users, return_index=True, return_counts=True)
    keep = np.repeat(counts >= min_samples, counts)
    rows, ids, counts = rows.filter(pa.array(keep)), ids[counts >= min_samples], counts[counts >= min_samples]
    ent = Entities(np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                   sparse.from_table(rows, "u_indices", "u_values"),
                   *(rows.column(c).to_numpy().astype(float) for c in ("label", "weight", "offset")))
    return ent, list(ids)


def _assert_matches_reference(models: Models, ids, ref_models, atol=1e-6):
    assert sorted(ids) == sorted(ref_models)
    for e, eid in enumerate(ids):
        r = ref_models[eid]
        assert models.intercept[e] == pytest.approx(r.intercept, abs=atol)
        idx = models.indices[models.ptr[e]:models.ptr[e + 1]]
        assert sorted(idx.tolist()) == sorted(r.coefficients)
        np.testing.assert_allclose(models.values[models.ptr[e]:models.ptr[e + 1]],
                                   [r.coefficients[j] for j in idx], atol=atol, rtol=0)


def _thread_counts() -> list[int]:
    from threadpoolctl import threadpool_info

    return [lib["num_threads"] for lib in threadpool_info()]


def test_pool_workers_run_one_blas_and_openmp_thread_each():
    """The scipy reference's workers: one process per core, one thread each (more threads
    per worker competed for the cores and made the whole stage 5× slower)."""
    ex = solver.make_executor(2)
    try:
        counts = [ex.submit(_thread_counts).result(timeout=120) for _ in range(4)]
    finally:
        ex.shutdown(wait=True)
    assert all(c and set(c) == {1} for c in counts), counts


def test_random_effect_only_problem_matches_the_joint_reference_with_a_process_pool(tmp_path):
    cfg, wd = make_workdir(tmp_path, fixed=False, n_entities=20)
    ref = joint.joint_optimum(cfg, wd)
    ent, ids = _prepared_entities(storage.read_table(layout.prepared(wd, "train")))
    s = Settings(l2=1.0)
    inline = solver.solve(ent, s)
    pooled = solver.solve(ent, s, workers=2, timeout=120)  # a real forkserver pool
    _assert_matches_reference(inline.models, ids, ref.coefficients["per_user"])
    np.testing.assert_array_equal(pooled.models.indices, inline.models.indices)
    np.testing.assert_allclose(pooled.models.values, inline.models.values, rtol=0, atol=1e-12)
    assert inline.objective.sum() == pytest.approx(ref.objective, rel=1e-10)


def test_a_solve_past_its_timeout_raises_and_leaves_no_worker(tmp_path):
    rng = np.random.default_rng(3)
    ent = _entities([_random_block(rng, 30, 3) for _ in range(8)])
    ex = solver.make_executor(2)
    try:
        with pytest.raises(TimeoutError):
            solver.solve(ent, Settings(l2=1.0), executor=ex, timeout=0.001)
    finally:
        procs = list(ex._processes.values())
        solver.terminate(ex)
    assert procs and not any(p.is_alive() for p in procs)


# --- the stage on a hand-built work directory -------------------------------------------------

def _fe_scores(rows: pa.Table, icp: float, coef: np.ndarray) -> np.ndarray:
    return icp + sparse.from_table(rows, "g_indices", "g_values").dot(coef)


def write_fixed_effect(wd, step, icp, coef):
    idx, val = _lists([np.arange(len(coef))], [np.asarray(coef, float)], pa.float64())
    storage.write_table(storage.join(layout.coefficients(wd, step.iteration, step.coordinate, "global"), "part-0.parquet"),
                   pa.Table.from_arrays([pa.array(["global"]), pa.array([float(icp)]), idx, val],
                                        schema=schema.COEFFICIENTS))


def write_partition(cfg, wd, step, fixed=None, skip_shards=()):
    """The partition stage's output for a random-effect step, by hand: offsets = input
    offset + the fixed effect's score (``fixed`` = (intercept, coefficients))."""
    coord = cfg.coordinate(step.coordinate)
    shifted = plan.shifts_fixed_effect(cfg, step)
    counts = {}
    for split in layout.SPLITS:
        rows = storage.read_table(layout.prepared(wd, split))
        fs = _fe_scores(rows, *fixed) if fixed else np.zeros(rows.num_rows)
        ent = pc.cast(rows.column("user"), pa.string())
        cols = {schema.UID: rows.column("uid"), schema.LABEL: rows.column("label"),
                schema.WEIGHT: rows.column("weight"),
                schema.OFFSET: pa.array(rows.column("offset").to_numpy() + fs),
                schema.ENTITY_ID: ent, schema.INDICES: rows.column("u_indices"), schema.VALUES: rows.column("u_values")}
        if shifted:
            cols[schema.FIXED_SCORE] = pa.array(fs)
        t = pa.table(cols, schema=schema.partition_schema(True, shifted))
        shard = np.array([zlib.crc32(e.encode()) % coord.shards for e in ent.to_pylist()])
        for s in range(coord.shards):
            part = t.filter(pa.array(shard == s))
            # In no particular order, as Spark writes them: the trainer groups rows by entity.
            part = part.take(pa.array(np.random.default_rng(s).permutation(part.num_rows)))
            if s not in skip_shards and part.num_rows:
                storage.write_table(storage.join(layout.shard(layout.partition(wd, step.iteration, step.coordinate, split), s),
                                       "part-0.parquet"), part)
        counts[split] = int(sum((shard == s).sum() for s in range(coord.shards) if s not in skip_shards))
    storage.mark_done(layout.step_dir(wd, step.iteration, step.coordinate), "partition", {"rows": counts})


def _read_scores(wd, step, coordinate, split):
    t = storage.read_table(layout.scores(wd, step.iteration, step.coordinate, coordinate, split))
    return dict(zip(t.column("uid").to_pylist(), t.column("score").to_pylist()))


@pytest.mark.parametrize("pool", [False, True])
def test_stage_trains_shards_scores_and_warm_starts(tmp_path, capsys, pool):
    """On one thread, and with pool on two (the compiled kernel's blocks on threads)."""
    cfg, wd = make_workdir(tmp_path, fixed=False, min_samples=3, shards=3, iterations=2, n_entities=24,
                           parallelism=2 if pool else 1)
    ref = joint.joint_optimum(cfg, wd)
    step = plan.Step(0, "per_user")
    write_partition(cfg, wd, step)
    info = stage.train(cfg, wd, step)
    assert "shard 3/3" in capsys.readouterr().out
    coefs = storage.read_table(layout.coefficients(wd, 0, "per_user", "per_user"))
    models, ids = stage.models_from_table(coefs), coefs.column("model_id").to_pylist()
    _assert_matches_reference(models, ids, ref.coefficients["per_user"])
    assert info["objective"] == pytest.approx(ref.objective, rel=1e-9)
    users = storage.read_table(layout.prepared(wd, "train")).column("user").to_numpy(zero_copy_only=False)
    n_users = len(set(users))
    assert info["active_entities"] == len(ids) and info["active_entities"] + info["passive_entities"] == n_users
    for split in layout.SPLITS:
        rows = storage.read_table(layout.prepared(wd, split))
        scores = _read_scores(wd, step, "per_user", split)
        assert len(scores) == rows.num_rows == info["rows"][split]
        # a row's score is its entity's model at its features, 0 without a model
        u, uid = rows.column("user").to_pylist(), rows.column("uid").to_pylist()
        csr = sparse.from_table(rows, "u_indices", "u_values")
        for i in range(0, rows.num_rows, 7):
            m = ref.coefficients["per_user"].get(u[i])
            a, b = csr.indptr[i], csr.indptr[i + 1]
            want = 0.0 if m is None else m.intercept + sum(
                v * m.coefficients[j] for j, v in zip(csr.indices[a:b], csr.values[a:b]))
            assert scores[uid[i]] == pytest.approx(want, abs=1e-6)
    # the next pass warm-starts from this one: already optimal, so (almost) no iterations
    step1 = plan.Step(1, "per_user")
    write_partition(cfg, wd, step1)
    for s in range(3):
        assert stage.train_shard(cfg, wd, step1, s)["max_iterations"] <= 2
    info1 = stage.finish(cfg, wd, step1)
    assert info1["objective"] == pytest.approx(info["objective"], rel=1e-12)


def test_stage_missing_shard_is_empty_and_unfinished_shards_fail_loudly(tmp_path):
    cfg, wd = make_workdir(tmp_path, fixed=False, shards=2, n_entities=6)
    step = plan.Step(0, "per_user")
    write_partition(cfg, wd, step, skip_shards=(1,))
    with pytest.raises(RuntimeError, match="shard 0 of 2 has not finished"):
        stage.finish(cfg, wd, step)
    info = stage.train_shard(cfg, wd, step, 1)
    assert info["rows"] == 0 and info["active_entities"] == 0
    stage.train_shard(cfg, wd, step, 0)
    done = stage.finish(cfg, wd, step)
    assert done["rows"]["train"] == storage.done_info(layout.step_dir(wd, 0, "per_user"), "partition")["rows"]["train"]


def test_stage_shift_moves_mass_into_the_fixed_effect(tmp_path):
    cfg, wd = make_workdir(tmp_path, min_samples=3, n_entities=24, shards=2)
    step = plan.Step(0, "per_user")
    assert plan.shifts_fixed_effect(cfg, step)
    fe_icp, fe_coef = 0.1, np.array([0.5, -0.2, 0.3])
    write_fixed_effect(wd, plan.Step(0, "global"), fe_icp, fe_coef)
    write_partition(cfg, wd, step, fixed=(fe_icp, fe_coef))
    info = stage.train(cfg, wd, step)
    assert info["shifted"] and info["shift"]["passive_rows"] > 0 and info["shift"]["decrease"] > 0
    # the objective the stage reports is the objective of what it wrote
    tables = {"global": storage.read_table(layout.coefficients(wd, 0, "per_user", "global")),
              "per_user": storage.read_table(layout.coefficients(wd, 0, "per_user", "per_user"))}
    after = joint.objective(cfg, wd, joint.coefficients_from_tables(cfg, wd, tables))
    assert info["objective"] == pytest.approx(after, rel=1e-12)
    # ... and lower than without the shift (the shards' models + the old fixed effect)
    pre = pa.concat_tables([storage.read_table(layout.shard_coefficients(wd, 0, "per_user", s)) for s in range(2)])
    before = joint.objective(cfg, wd, joint.coefficients_from_tables(cfg, wd, {
        "per_user": pre, "global": storage.read_table(layout.coefficients(wd, 0, "global", "global"))}))
    assert before - after == pytest.approx(info["shift"]["decrease"], rel=1e-6) and after < before
    fe = joint.coefficients_from_tables(cfg, wd, {"global": tables["global"]})["global"]
    pre_models, pre_ids = stage.models_from_table(pre), pre.column("model_id")
    for split in layout.SPLITS:
        rows = storage.read_table(layout.prepared(wd, split))
        uid = rows.column("uid").to_pylist()
        new_fixed = _read_scores(wd, step, "global", split)
        own = _read_scores(wd, step, "per_user", split)
        # the fixed effect's new scores are x·β' + b' (features matched across bag indexes)
        want = _fe_scores(rows, fe.intercept, fe.coefficients)
        np.testing.assert_allclose([new_fixed[u] for u in uid], want, atol=1e-12)
        if split == "train":
            # active rows' total scores are unchanged by the shift
            pos = stage.positions(pc.cast(rows.column("user"), pa.string()), pre_ids)
            old_own = stage._scores(pre_models, pos, sparse.from_table(rows, "u_indices", "u_values"))
            old_fixed = _fe_scores(rows, fe_icp, fe_coef)
            act = pos >= 0
            total_new = np.array([own[u] + new_fixed[u] for u in uid])
            np.testing.assert_allclose(total_new[act], (old_own + old_fixed)[act], atol=1e-12)
            assert not np.allclose(total_new[~act], (old_own + old_fixed)[~act])


def test_a_shard_and_the_finish_load_neither_spark_nor_pandas(tmp_path):
    """`gdmix random-effect --shard` / `--finish` (a pipeline's shard and finish tasks):
    the processes import only what they use (no pyspark, no pandas: 1-2 s of imports),
    with the shift into the fixed effect and passive entities, and score like in-process."""
    import json
    import os
    import subprocess
    import sys

    cfg, wd = make_workdir(tmp_path, min_samples=3, n_entities=24, shards=2)
    step = plan.Step(0, "per_user")
    write_fixed_effect(wd, plan.Step(0, "global"), 0.1, np.array([0.5, -0.2, 0.3]))
    storage.mark_done(layout.prepared_root(wd), "prepare", {"rows": {}})
    storage.mark_done(layout.step_dir(wd, 0, "global"), "train", {})
    write_partition(cfg, wd, step, fixed=(0.1, np.array([0.5, -0.2, 0.3])))
    code = ("import json, sys\nfrom gdmix import cli\n"
            "rc = cli.main(sys.argv[1:])\n"
            "print(json.dumps({'rc': rc, 'loaded': sorted(set(sys.modules) "
            "& {'pyspark', 'pandas', 'tensorflow', 'scipy.optimize', 'scipy.special'})}))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p.endswith("src"))}
    for extra in (["--shard", "0"], ["--shard", "1"], ["--finish"]):
        out = subprocess.run([sys.executable, "-c", code, "random-effect", "--workdir", wd, "--iteration", "0",
                              "--coordinate", "per_user", *extra], capture_output=True, text=True, timeout=300,
                             env=env)
        last = json.loads(out.stdout.strip().splitlines()[-1])
        assert last == {"rc": 0, "loaded": []}, (extra, out.stderr[-2000:])
    info = storage.done_info(layout.step_dir(wd, 0, "per_user"), "train")
    assert info["shifted"] and info["shift"]["passive_rows"] > 0
    got = {s: _read_scores(wd, step, "per_user", s) for s in layout.SPLITS}
    stage.train(cfg, wd, step)  # the same step in this process
    for s in layout.SPLITS:
        want = _read_scores(wd, step, "per_user", s)
        assert got[s].keys() == want.keys()
        np.testing.assert_allclose([got[s][u] for u in want], list(want.values()), rtol=0, atol=1e-12)


# --- the finish, batch by batch -----------------------------------------------------------------

def _outputs(wd, step, coordinates):
    """Every table the finish wrote (coefficients, scores of both splits), by name."""
    out = {}
    for d in coordinates:
        out[f"coefficients/{d}"] = storage.read_table(layout.coefficients(wd, step.iteration, step.coordinate, d))
        for split in layout.SPLITS:
            out[f"scores/{d}/{split}"] = storage.read_table(
                layout.scores(wd, step.iteration, step.coordinate, d, split))
    return out


def _finish_in_batches(monkeypatch, cfg, wd, step, batch_rows):
    """``stage.finish`` with batches of ``batch_rows`` rows; also what it read: the largest
    batch, and every file or folder it read whole."""
    from gdmix.random_effect import shards

    monkeypatch.setattr(stage, "BATCH_ROWS", batch_rows)
    largest, whole = [0], []
    iter_columns, read_columns = storage.iter_columns, storage.read_columns

    def batches(url, columns, sch, n):
        for b in iter_columns(url, columns, sch, n):
            largest[0] = max(largest[0], b.num_rows)
            yield b

    def read(url, columns, sch):
        whole.append(url)
        return read_columns(url, columns, sch)

    monkeypatch.setattr(storage, "iter_columns", batches)
    monkeypatch.setattr(storage, "read_columns", read)
    try:
        info = stage.finish(cfg, wd, step)
    finally:
        monkeypatch.setattr(storage, "iter_columns", iter_columns)
        monkeypatch.setattr(storage, "read_columns", read_columns)
        monkeypatch.setattr(stage, "BATCH_ROWS", shards.BATCH_ROWS)
    info.pop("seconds")
    return info, largest[0], whole


def _assert_same_finish(monkeypatch, cfg, wd, step, coordinates):
    """The finish in batches of 7 rows writes exactly what it writes reading each shard in one
    batch (the whole shard, as before batches), reports the same, and reads no split whole."""
    whole_info, largest, _ = _finish_in_batches(monkeypatch, cfg, wd, step, 10 ** 9)
    want = _outputs(wd, step, coordinates)
    n_train = whole_info["rows"]["train"]
    assert largest > 7 and n_train > 4 * 7
    info, largest, whole = _finish_in_batches(monkeypatch, cfg, wd, step, 7)
    assert largest == 7  # (24 entities: the id lookup's floor, 24 // 8, is below it)
    got = _outputs(wd, step, coordinates)
    for name, table in want.items():
        assert got[name].num_rows == table.num_rows and got[name].equals(table), name
    assert info == whole_info  # the objective too: its loss is still one sum per shard
    rows_url = layout.partition_root(wd, 0, step.coordinate)  # the rows (a later pass's: its offsets)
    assert not [u for u in whole if u.startswith(rows_url)], whole  # no rows read whole
    return info, whole


def test_the_finish_scores_in_bounded_batches_exactly_as_whole_shards(tmp_path, monkeypatch):
    """Several shards, the shift into the fixed effect (passive rows), entities unseen in
    validation: batches of 7 rows give the same files and record as whole shards."""
    cfg, wd = make_workdir(tmp_path, min_samples=3, n_entities=24, shards=2)
    step = plan.Step(0, "per_user")
    write_fixed_effect(wd, plan.Step(0, "global"), 0.1, np.array([0.5, -0.2, 0.3]))
    write_partition(cfg, wd, step, fixed=(0.1, np.array([0.5, -0.2, 0.3])))
    for s in range(2):
        stage.train_shard(cfg, wd, step, s)
    info, _ = _assert_same_finish(monkeypatch, cfg, wd, step, ["per_user", "global"])
    assert info["shifted"] and info["shift"]["passive_rows"] > 0 and info["unseen_entities"] > 0


def test_a_later_pass_with_offsets_only_scores_in_batches_with_its_offsets(tmp_path, monkeypatch):
    """A second pass whose partition holds only uid, offset, fixed_score (its rows are the
    first pass's): batches of 7 rows, each joined to its offsets by uid, give the same files
    and record as whole shards, and equal a partition of whole rows with those offsets."""
    cfg, wd = make_workdir(tmp_path, min_samples=3, n_entities=24, shards=2, iterations=2)
    fe = (0.1, np.array([0.5, -0.2, 0.3]))
    write_fixed_effect(wd, plan.Step(0, "global"), *fe)
    step0, step1 = plan.Step(0, "per_user"), plan.Step(1, "per_user")
    write_partition(cfg, wd, step0, fixed=fe)
    stage.train(cfg, wd, step0)
    fe1 = (-0.2, np.array([0.3, 0.1, -0.4]))  # the fixed effect's next pass moves every offset
    write_fixed_effect(wd, plan.Step(1, "global"), *fe1)
    write_partition(cfg, wd, step1, fixed=fe1)  # whole rows, the reference
    for s in range(2):
        stage.train_shard(cfg, wd, step1, s)
    reference = stage.finish(cfg, wd, step1)
    want = _outputs(wd, step1, ["per_user", "global"])
    counts = {}
    for split in layout.SPLITS:  # now only the offsets, in another order than the rows
        part = layout.partition(wd, 1, "per_user", split)
        for s in range(2):
            url = layout.shard(part, s)
            rows = storage.read_table(url).select(["uid", "offset", "fixed_score"])
            storage.remove(url)
            storage.write_table(storage.join(url, "part-0.parquet"),
                                rows.take(pa.array(np.arange(rows.num_rows)[::-1])))
            counts[split] = counts.get(split, 0) + rows.num_rows
    storage.mark_done(layout.step_dir(wd, 1, "per_user"), "partition", {"rows": counts, schema.ROWS_ITERATION: 0})
    info, whole = _assert_same_finish(monkeypatch, cfg, wd, step1, ["per_user", "global"])
    assert whole and all("iter-1" in u for u in whole if "partition" in u)  # the offsets, read whole
    got = _outputs(wd, step1, ["per_user", "global"])
    for name, table in want.items():
        assert got[name].equals(table), name
    assert info["objective"] == reference["objective"]
    assert info["shifted"] and info["shift"]["passive_rows"] > 0


def test_offsets_without_their_rows_stop_the_batched_finish_naming_both_files(tmp_path):
    """Offsets rewritten after the shards trained, as many as the rows but one under a uid
    no row has: the finish's batch join stops, naming both files and the count."""
    cfg, wd = make_workdir(tmp_path, fixed=False, n_entities=12, shards=1, iterations=2)
    step0, step1 = plan.Step(0, "per_user"), plan.Step(1, "per_user")
    write_partition(cfg, wd, step0)
    stage.train(cfg, wd, step0)
    counts = {}
    for split in layout.SPLITS:
        rows = storage.read_table(layout.shard(layout.partition(wd, 0, "per_user", split), 0))
        storage.write_table(storage.join(layout.shard(layout.partition(wd, 1, "per_user", split), 0), "part-0.parquet"),
                            rows.select(["uid", "offset"]))
        counts[split] = rows.num_rows
    storage.mark_done(layout.step_dir(wd, 1, "per_user"), "partition", {"rows": counts, schema.ROWS_ITERATION: 0})
    stage.train_shard(cfg, wd, step1, 0)
    url = storage.join(layout.shard(layout.partition(wd, 1, "per_user", "train"), 0), "part-0.parquet")
    offsets = storage.read_table(url)
    uid = offsets.column("uid").to_numpy().copy()
    uid[-1] += 10 ** 9
    storage.write_table(url, pa.table({"uid": uid, "offset": offsets.column("offset")}))
    n = counts["train"]
    with pytest.raises(ValueError, match=rf"iter-1/per_user/partition/train/shard=0 holds {n} offsets "
                                         rf"for the {n} rows of .*iter-0/per_user/partition/train/"
                                         r"shard=0 \(1 rows without one\)"):
        stage.finish(cfg, wd, step1)

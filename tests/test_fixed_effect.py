"""The fixed-effect stage with real TF worker processes (MultiWorkerMirroredStrategy on
loopback) against the single-process scipy reference."""
import functools
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pytest
import scipy.sparse as sp

from gdmix import config, layout, plan, schema, sparse, storage
from gdmix import kinds
from gdmix.fixed_effect import data, launcher, objective, solver, stage, worker

N_ROWS, N_FEATURES, N_VALIDATION = 2000, 20, 300
FE = "global"


def make_cfg(workdir, workers=1, iterations=1, hessian="auto", **timeouts):
    return config.parse({
        "name": "fe-test",
        "workdir": str(workdir),
        "data": {"train": "unused", "feature_bags": {"g": {"columns": [f"f{j}" for j in range(N_FEATURES)]}}},
        "iterations": iterations,
        "coordinates": [{"name": FE, "type": "fixed_effect", "feature_bag": "g", "l2": 2.0, "workers": workers,
                         "hessian": hessian}],
        "timeouts": {"fixed_effect_seconds": 240, "worker_exit_seconds": 10, **timeouts},
    })


def random_rows(n, seed):
    """Sparse rows (~30% dense, float32 values as the prepared data has), nonzero offsets/weights."""
    rng = np.random.default_rng(seed)
    X = sp.random(n, N_FEATURES, density=0.3, format="csr", random_state=rng,
                  data_rvs=lambda k: rng.normal(size=k)).astype(np.float32)
    X.sort_indices()
    beta = rng.normal(size=N_FEATURES)
    offset = rng.normal(scale=0.5, size=n)
    weight = rng.uniform(0.5, 2.0, size=n)
    label = (rng.uniform(size=n) < 1 / (1 + np.exp(-(offset - 0.4 + X @ beta)))).astype(np.float64)
    return X, label, weight, offset


def rows_table(uid, X, label, weight, offset):
    idx, val = sparse.to_arrow_lists(X.indptr, X.indices, X.data, value_type=pa.float32())
    return pa.Table.from_arrays([pa.array(uid, pa.int64()), pa.array(label), pa.array(weight), pa.array(offset),
                                 idx, val], schema=data.PARTITION_SCHEMA)


def write_partition(workdir, iteration, n_shards, seed=0):
    """Train/validation partitions of step (iteration, FE) split across n_shards; returns
    the whole train and validation data as (X, y, w, o, uid)."""
    out = {}
    for split, n, s in (("train", N_ROWS, seed), ("validation", N_VALIDATION, seed + 1)):
        X, y, w, o = random_rows(n, s)
        uid = np.arange(n, dtype=np.int64) + (0 if split == "train" else 10 ** 6)
        for k in range(n_shards):
            rows = np.arange(k, n, n_shards)
            storage.write_table(storage.join(data.shard_url(str(workdir), iteration, FE, split, k), "part-00000.parquet"),
                           rows_table(uid[rows], X[rows], y[rows], w[rows], o[rows]))
        out[split] = (X.astype(np.float64), y, w, o, uid)
    return out


def setup_workdir(workdir, workers=1, iterations=1, hessian="auto", **timeouts):
    cfg = make_cfg(workdir, workers, iterations, hessian, **timeouts)
    config.snapshot(cfg)
    storage.write_table(layout.feature_index(str(workdir), "g"), pa.table(
        {"index": pa.array(range(N_FEATURES), pa.int32()), "name": [f"f{j}" for j in range(N_FEATURES)],
         "term": [""] * N_FEATURES}, schema=schema.FEATURE_INDEX))
    return cfg


def read_coefficients(workdir, iteration):
    t = storage.read_table(layout.coefficients(str(workdir), iteration, FE, FE))
    assert t.schema.equals(schema.COEFFICIENTS) and t.num_rows == 1
    assert t.column("model_id")[0].as_py() == "global"
    assert t.column("indices")[0].as_py() == list(range(N_FEATURES))
    return t.column("intercept")[0].as_py(), np.array(t.column("values")[0].as_py())


def child_processes():
    """This test process's live worker children (workers are started as direct children).
    Children that other tests of the same session leave by design are not workers: the
    session's Spark JVM and multiprocessing's forkserver / resource tracker."""
    out = subprocess.run(["ps", "-o", "pid=,stat=,args=", "--ppid", str(os.getpid())],
                         capture_output=True, text=True, timeout=10).stdout
    live = [line.split(None, 2) for line in out.splitlines()]
    not_workers = ("ps ", "/usr/lib/jvm/", "java ")
    return [p for p in live if len(p) == 3 and not p[1].startswith("Z")
            and not p[2].startswith(not_workers) and "multiprocessing" not in p[2]]


@pytest.fixture(scope="module")
def reference_fit():
    X, y, w, o = random_rows(N_ROWS, 0)
    return objective.fit(X.astype(np.float64), y, w, o, l2=2.0, regularize_intercept=False)


# --- the reference ---------------------------------------------------------------------

def test_reference_gradient_and_hessian_match_finite_differences():
    X, y, w, o = random_rows(200, 5)
    X = X.astype(np.float64)
    rng = np.random.default_rng(1)
    theta, v = rng.normal(size=N_FEATURES + 1), rng.normal(size=N_FEATURES + 1)
    for reg in (False, True):
        f, g = objective.objective(theta, X, y, w, o, 0.7, reg)
        eps = 1e-6
        fd = (objective.objective(theta + eps * v, X, y, w, o, 0.7, reg)[0]
              - objective.objective(theta - eps * v, X, y, w, o, 0.7, reg)[0]) / (2 * eps)
        assert abs(fd - g @ v) < 1e-6 * max(1, abs(fd))
        hv = objective.data_hessp(theta, v, X, w, o) + objective.penalty_hessp(v, 0.7, reg)
        fd_h = (objective.objective(theta + eps * v, X, y, w, o, 0.7, reg)[1]
                - objective.objective(theta - eps * v, X, y, w, o, 0.7, reg)[1]) / (2 * eps)
        np.testing.assert_allclose(hv, fd_h, rtol=1e-5, atol=1e-6)
        H = objective.data_hessian(theta, X, w, o) + objective.penalty_hessian(N_FEATURES + 1, 0.7, reg)
        np.testing.assert_allclose(H, H.T, rtol=0, atol=1e-12)
        np.testing.assert_allclose(H @ v, hv, rtol=1e-12, atol=1e-10)
    # The intercept's penalty is optional: only it changes.
    f0 = objective.objective(theta, X, y, w, o, 0.7, False)[0]
    f1 = objective.objective(theta, X, y, w, o, 0.7, True)[0]
    assert f1 - f0 == pytest.approx(0.35 * theta[0] ** 2)
    # Stable for huge scores (no overflow to inf/nan).
    f, g = objective.objective(np.r_[800.0, np.zeros(N_FEATURES)], X, y, w, o, 0.0, False)
    assert np.isfinite(f) and np.all(np.isfinite(g))


def test_reference_fit_reaches_the_optimum(reference_fit):
    b, coef, info = reference_fit
    X, y, w, o = random_rows(N_ROWS, 0)
    X = X.astype(np.float64)
    f, g = objective.objective(np.r_[b, coef], X, y, w, o, 2.0, False)
    assert np.abs(g).max() < 1e-5 and f == pytest.approx(info.objective)
    b2, coef2, info2 = objective.fit(X, y, w, o, 2.0, False, newton=True)
    assert info2.converged and info2.method == "trust-krylov"
    np.testing.assert_allclose(np.r_[b2, coef2], np.r_[b, coef], atol=1e-7)
    fg = lambda t: objective.objective(t, X, y, w, o, 2.0, False)  # noqa: E731
    hess = lambda t: objective.data_hessian(t, X, w, o) + objective.penalty_hessian(len(t), 2.0, False)  # noqa: E731
    theta3, info3 = solver.solve(fg, np.zeros(N_FEATURES + 1), gtol=objective.gtol(1e-10, w.sum()),
                                 max_iter=100, hess=hess)
    assert info3.converged and info3.method == "trust-exact" and info3.hessp_calls == 0
    np.testing.assert_allclose(theta3, np.r_[b, coef], atol=1e-7)
    # Against an independent solver: sklearn's unregularised-intercept L2 logistic regression
    # minimises Σ w·loss + ‖β‖²/(2C); with offsets zero, compare on a fresh problem.
    sklearn = pytest.importorskip("sklearn.linear_model")
    zero = np.zeros_like(o)
    b3, coef3, _ = objective.fit(X, y, w, zero, 2.0, False)
    m = sklearn.LogisticRegression(C=0.5, tol=1e-12, max_iter=10000).fit(X, y, sample_weight=w)
    np.testing.assert_allclose(np.r_[m.intercept_, m.coef_[0]], np.r_[b3, coef3], atol=1e-5)


def test_newton_polish_finishes_a_stopped_solve():
    """When the trust-region stops early (here: an iteration cap), Newton steps judged by the
    gradient norm finish the solve to the tight tolerance."""
    X, y, w, o = random_rows(N_ROWS, 0)
    X = X.astype(np.float64)
    fg = lambda t: objective.objective(t, X, y, w, o, 2.0, False)  # noqa: E731
    hv = lambda t, v: objective.data_hessp(t, v, X, w, o) + objective.penalty_hessp(v, 2.0, False)  # noqa: E731
    gtol = objective.gtol(1e-10, w.sum())
    theta, info = solver.solve(fg, np.zeros(N_FEATURES + 1), gtol=gtol, max_iter=3, hessp=hv)
    assert info.iterations == 3 and 1 <= info.polish_steps <= 5
    assert info.converged and np.abs(fg(theta)[1]).max() == info.grad_inf <= gtol


def test_hessian_auto_weighs_forming_the_matrix_against_krylov_products():
    """The cost model's calibration points (benchmarks/RESULTS.md): a MovieLens-size shard
    takes the matrix, a 500k-row shard of 10 nonzeros per row the products."""
    assert worker.uses_hessian_matrix("auto", 44, pairs=40_000 * 10 ** 2, nonzeros=40_000 * 10)
    assert not worker.uses_hessian_matrix("auto", 200, pairs=500_000 * 11 ** 2, nonzeros=500_000 * 11)
    assert not worker.uses_hessian_matrix("auto", worker.HESSIAN_MATRIX_MAX_FEATURES + 1, pairs=1, nonzeros=1)
    assert worker.uses_hessian_matrix("matrix", 5000) and not worker.uses_hessian_matrix("products", 3)


# --- the stage's own checks (no workers) ------------------------------------------------

def test_stage_does_not_import_tensorflow():
    code = "import sys, gdmix.fixed_effect.stage; sys.exit('tensorflow' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def test_stage_checks_shards_and_row_counts(tmp_path):
    cfg = setup_workdir(tmp_path, workers=1)
    write_partition(tmp_path, 0, 2)  # two shards, one worker: shard=1 would be lost
    with pytest.raises(ValueError, match=r"partition/train has shards \['shard=1'\] but only 1 worker"):
        stage.train(cfg, str(tmp_path), plan.Step(0, FE))
    cfg = setup_workdir(tmp_path, workers=2)
    with pytest.raises(RuntimeError, match=f"train scores have 0 rows but the partition has {N_ROWS}"):
        stage.train(cfg, str(tmp_path), plan.Step(0, FE), launcher=lambda *args, **kw: None)  # wrote nothing
    assert storage.done_info(layout.step_dir(str(tmp_path), 0, FE), "train") is None
    with pytest.raises(ValueError, match="not a fixed effect"):
        stage.train(config.parse({**config.to_raw(cfg), "coordinates": [
            {"name": FE, "type": "random_effect", "feature_bag": "g", "entity": "u"}]}),
            str(tmp_path), plan.Step(0, FE))


# --- the stage, real TF workers -------------------------------------------------------

def run_stage(tmp_path, workers, hessian="auto"):
    cfg = setup_workdir(tmp_path, workers=workers, hessian=hessian)
    parts = write_partition(tmp_path, 0, workers)
    info = stage.train(cfg, str(tmp_path), plan.Step(0, FE))
    return info, parts


@pytest.mark.parametrize("workers,hessian", [(1, "auto"), (2, "matrix"), (2, "products")])
def test_workers_match_reference(tmp_path, workers, hessian, reference_fit, capsys):
    """Both Newton variants: the all-reduced Hessian matrix (auto here: 20 features) and
    one all-reduced Hessian-vector product per Krylov step."""
    info, parts = run_stage(tmp_path, workers, hessian)
    assert info["method"] == ("trust-krylov" if hessian == "products" else "trust-exact")
    assert (info["hessp_calls"] > 0) == (hessian == "products") and (info["hess_calls"] > 0) != (hessian == "products")
    b_ref, coef_ref, ref_info = reference_fit
    b, coef = read_coefficients(tmp_path, 0)
    np.testing.assert_allclose(np.r_[b, coef], np.r_[b_ref, coef_ref], atol=1e-6, rtol=0)
    assert info["converged"] and info["objective"] == pytest.approx(ref_info.objective, rel=1e-12)
    assert info["rows"] == {"train": N_ROWS, "validation": N_VALIDATION}
    assert storage.done_info(layout.step_dir(str(tmp_path), 0, FE), "train") == info
    # The chief's progress reached the parent's stdout.
    assert f"[fixed-effect iter-0/{FE}] {workers} worker(s), {N_ROWS} rows" in capsys.readouterr().out

    # Scores: b + x·β of the written coefficients, for every partition row, offset excluded.
    for split in layout.SPLITS:
        X, _, _, _, uid = parts[split]
        t = storage.read_table(layout.scores(str(tmp_path), 0, FE, FE, split))
        assert t.schema.equals(schema.SCORES) and t.num_rows == len(uid)
        order = np.argsort(t.column("uid").to_numpy())
        assert np.array_equal(t.column("uid").to_numpy()[order], uid)
        np.testing.assert_allclose(t.column("score").to_numpy()[order], b + X @ coef, atol=1e-10, rtol=0)
    assert not child_processes()


def test_warm_start_reaches_the_same_optimum(tmp_path, reference_fit):
    cfg = setup_workdir(tmp_path, workers=2, iterations=2)
    b_ref, coef_ref, _ = reference_fit
    # An earlier pass left a model near (not at) the optimum.
    rng = np.random.default_rng(3)
    storage.write_table(storage.join(layout.coefficients(str(tmp_path), 0, FE, FE), "part-00000.parquet"),
                   data.coefficients_table(b_ref + 0.05, coef_ref + rng.normal(scale=0.05, size=N_FEATURES)))
    write_partition(tmp_path, 1, 2)
    info = stage.train(cfg, str(tmp_path), plan.Step(1, FE))
    b, coef = read_coefficients(tmp_path, 1)
    np.testing.assert_allclose(np.r_[b, coef], np.r_[b_ref, coef_ref], atol=1e-6, rtol=0)
    cold_iterations = objective.fit(*random_rows(N_ROWS, 0), 2.0, False, newton=True)[2].iterations
    assert info["converged"] and info["iterations"] < cold_iterations


@pytest.mark.parametrize("split", ["train", "validation"])
def test_corrupt_shard_fails_clearly_and_leaves_no_process(tmp_path, split):
    """Train: worker 1 fails before TF starts. Validation: it fails after training, while
    its peer waits for it at the final barrier (and must be killed)."""
    cfg = setup_workdir(tmp_path, workers=2, fixed_effect_seconds=120)
    write_partition(tmp_path, 0, 2)
    bad = storage.join(data.shard_url(str(tmp_path), 0, FE, split, 1), "part-00000.parquet")
    with open(bad, "wb") as f:
        f.write(b"this is not parquet")
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"worker 1 of 2 exited with code 1(.|\n)*parquet"):
        stage.train(cfg, str(tmp_path), plan.Step(0, FE))
    assert time.monotonic() - t0 < 120
    assert not child_processes()
    assert storage.done_info(layout.step_dir(str(tmp_path), 0, FE), "train") is None


# A worker entry point for the failure tests: the real worker, except that worker 1 either
# never joins the cluster or finishes its work and then hangs instead of exiting.
MISBEHAVING_WORKER = """
import json, os, sys, time
from gdmix.fixed_effect import worker
index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
if index == 1 and sys.argv[1] == "never-joins":
    time.sleep(600)
if sys.argv[1] == "port-taken-once" and not os.path.exists(sys.argv[2] + ".tried"):
    open(sys.argv[2] + ".tried", "w").close()
    os._exit(worker.PORT_IN_USE_EXIT)
args = dict(zip(sys.argv[3::2], sys.argv[4::2]))
worker.train(args["--workdir"], int(args["--iteration"]), args["--coordinate"])
sys.stdout.flush()
if index == 1:
    time.sleep(600)  # hangs at exit
os._exit(0)
"""


def misbehaving(how, tmp_marker=""):
    command = (sys.executable, "-c", MISBEHAVING_WORKER, how, str(tmp_marker))
    return functools.partial(launcher.run_local, command=command)


def test_worker_that_never_joins_times_out(tmp_path):
    cfg = setup_workdir(tmp_path, workers=2, fixed_effect_seconds=8)
    write_partition(tmp_path, 0, 2)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"timed out after 8 s waiting for worker\(s\) \[0, 1\] of 2"):
        stage.train(cfg, str(tmp_path), plan.Step(0, FE), launcher=misbehaving("never-joins"))
    assert time.monotonic() - t0 < 30
    assert not child_processes()


def test_worker_hanging_at_exit_is_killed_and_counted_done(tmp_path, reference_fit, capsys):
    cfg = setup_workdir(tmp_path, workers=2, worker_exit_seconds=1)
    parts = write_partition(tmp_path, 0, 2)
    t0 = time.monotonic()
    info = stage.train(cfg, str(tmp_path), plan.Step(0, FE), launcher=misbehaving("hangs-at-exit"))
    assert time.monotonic() - t0 < 60
    assert "worker 1 finished but did not exit within 1 s; killed" in capsys.readouterr().err
    assert info["rows"] == {"train": N_ROWS, "validation": N_VALIDATION}
    b, coef = read_coefficients(tmp_path, 0)
    np.testing.assert_allclose(np.r_[b, coef], np.r_[reference_fit[0], reference_fit[1]], atol=1e-6, rtol=0)
    assert not child_processes()


def test_worker_reports_a_taken_port_and_the_launch_is_retried(tmp_path, capsys):
    # The real worker, told to bind a port someone else holds, exits with the retry code.
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        env = {**os.environ, "TF_CONFIG": launcher.tf_config([held.getsockname()[1]], 0)}
        setup_workdir(tmp_path)
        write_partition(tmp_path, 0, 1)
        r = subprocess.run([*launcher.WORKER_COMMAND, "--workdir", str(tmp_path), "--iteration", "0",
                            "--coordinate", FE], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == worker.PORT_IN_USE_EXIT, r.stderr[-2000:]
    assert "Could not start gRPC server" in r.stderr
    # The launcher starts the cluster again on other ports.
    cfg = setup_workdir(tmp_path)
    info = stage.train(cfg, str(tmp_path), plan.Step(0, FE),
                       launcher=misbehaving("port-taken-once", tmp_path / "marker"))
    assert (tmp_path / "marker.tried").exists() and info["converged"]
    assert "could not bind its port; starting again on other ports" in capsys.readouterr().err
    assert not child_processes()


# --- serving workers (the embedded driver starts them once per run) ---------------------------

def test_serving_workers_train_step_after_step_in_one_pair_of_processes(tmp_path, reference_fit):
    cfg = setup_workdir(tmp_path, workers=2, iterations=2)
    cluster = kinds.of(cfg.fixed_effect).serving_workers(cfg, cfg.fixed_effect)
    try:
        assert cluster is not None and len(child_processes()) == 2
        pids = [p.proc.pid for p in cluster.procs]
        # a small embedded input: they run at lower CPU priority (set as they start)
        want = min(os.getpriority(os.PRIO_PROCESS, 0) + stage.SMALL_INPUT_NICE, 19)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(os.getpriority(os.PRIO_PROCESS, p) != want for p in pids):
            time.sleep(0.1)
        assert [os.getpriority(os.PRIO_PROCESS, p) for p in pids] == [want, want]
        for k in range(2):  # iteration 1 warm-starts from iteration 0's model
            write_partition(tmp_path, k, 2)
            info = stage.train(cfg, str(tmp_path), plan.Step(k, FE), prestarted=cluster)
            b, coef = read_coefficients(tmp_path, k)
            np.testing.assert_allclose(np.r_[b, coef], np.r_[reference_fit[0], reference_fit[1]], atol=1e-6, rtol=0)
            assert info["converged"] and info["rows"] == {"train": N_ROWS, "validation": N_VALIDATION}
            assert [p.proc.pid for p in cluster.procs] == pids and all(p.proc.poll() is None for p in cluster.procs)
        assert info["iterations"] <= 2  # the warm start: the same processes, the new step's data
    finally:
        cluster.close()
    assert not child_processes()


def test_a_failed_step_closes_the_serving_workers_and_the_next_starts_its_own(tmp_path):
    cfg = setup_workdir(tmp_path, workers=2, fixed_effect_seconds=120)
    write_partition(tmp_path, 0, 2)
    bad = storage.join(data.shard_url(str(tmp_path), 0, FE, "train", 1), "part-00000.parquet")
    with open(bad, "wb") as f:
        f.write(b"this is not parquet")
    cluster = kinds.of(cfg.fixed_effect).serving_workers(cfg, cfg.fixed_effect)
    try:
        with pytest.raises(RuntimeError, match=r"worker 1 of 2 exited with code 1(.|\n)*parquet"):
            stage.train(cfg, str(tmp_path), plan.Step(0, FE), prestarted=cluster)
        assert not cluster.procs and not child_processes()
        write_partition(tmp_path, 0, 2)
        assert stage.train(cfg, str(tmp_path), plan.Step(0, FE), prestarted=cluster)["converged"]
        # serving workers of another size are left alone: the step starts its own
        other = launcher.prestart(1, 120)
        assert stage.train(cfg, str(tmp_path), plan.Step(0, FE), prestarted=other)["converged"]
        assert len(other.procs) == 1 and other.procs[0].proc.poll() is None
        other.close()
    finally:
        cluster.close()
    assert not child_processes()


def test_serving_workers_keep_their_priority_on_a_large_input(tmp_path, monkeypatch):
    from gdmix import spark as gspark

    cfg = setup_workdir(tmp_path, workers=1)
    monkeypatch.setattr(gspark, "C1_ONLY_MAX_INPUT_BYTES", -1)  # every input is large now
    cluster = kinds.of(cfg.fixed_effect).serving_workers(cfg, cfg.fixed_effect)
    try:
        args = cluster.procs[0].proc.args
        assert args[args.index("--nice") + 1] == "0"
    finally:
        cluster.close()
    assert not child_processes()


def test_a_serving_worker_gives_up_without_orders_or_without_its_launcher(tmp_path):
    # no order within its timeout: a clear error, a non-zero exit
    r = subprocess.run([*launcher.WORKER_COMMAND, "--serve", str(tmp_path), "--order-timeout", "1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "no order" in r.stderr
    # its launching process is killed: the worker notices and leaves (no orphan waits an hour)
    script = ("import time\nfrom gdmix.fixed_effect import launcher\n"
              "c = launcher.prestart(1, 3600)\nprint(c.procs[0].proc.pid, flush=True)\ntime.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(parent.stdout.readline())
    finally:
        parent.kill()
        parent.wait(timeout=30)

    def alive():
        try:
            with open(f"/proc/{pid}/stat") as fh:
                return fh.read().split()[2] != "Z"
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 90  # its TF import first, then the check
    while alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive()

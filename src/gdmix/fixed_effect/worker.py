"""One TF worker of the fixed-effect stage (an embedded subprocess or a TFJob replica).

    python -m gdmix.fixed_effect.worker --workdir W --iteration k --coordinate c

The cluster comes from ``TF_CONFIG`` exactly as a Kubeflow TFJob sets it. Worker w holds
its train shard as a float64 ``tf.sparse.SparseTensor`` and computes its rows' share of
the data loss, gradient and Hessian-vector products; ``MultiWorkerMirroredStrategy``'s
all-reduce sums the shares, the L2 penalty is added once after the sum, and every worker
runs the same deterministic solver (``solver.solve``) on the identical sums, so all step
in lockstep without a parameter server. Then the chief writes the coefficients, each
worker the scores of its train and validation shards, all meet at a final barrier, each
writes its status file, waits until every peer's status file is there (a peer may still be
pulling its share of the barrier) and exits at once (``os._exit``: a normal interpreter
exit after collectives hangs now and then).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import numpy as np

from gdmix import config, layout, losses, plan, storage, timing
from gdmix.fixed_effect import data, objective, solver

STATUS_DIR = "_fixed_effect_workers"


def status_dir(workdir: str, iteration: int, coordinate: str) -> str:
    """Where workers leave their status files (underscore: ignored by table readers)."""
    return storage.join(layout.step_dir(workdir, iteration, coordinate), STATUS_DIR)


def status_url(workdir: str, iteration: int, coordinate: str, index: int) -> str:
    return storage.join(status_dir(workdir, iteration, coordinate), f"worker-{index}.json")


PORT_IN_USE_EXIT = 75  # EX_TEMPFAIL: the launcher may retry on other ports
ORDER_POLL_S = 0.05


class PortInUse(RuntimeError):
    """This worker's TF_CONFIG port could not be bound."""


def cluster_role() -> tuple[int, int]:
    """(index, number of workers) from TF_CONFIG; a missing TF_CONFIG is a lone worker."""
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        return 0, 1
    tf_config = json.loads(raw)
    task = tf_config.get("task", {})
    if task.get("type", "worker") != "worker":
        raise ValueError(f"TF_CONFIG: task type {task.get('type')!r} is not 'worker'")
    n = len(tf_config.get("cluster", {}).get("worker", []))
    index = int(task.get("index", 0))
    if not 0 <= index < max(n, 1):
        raise ValueError(f"TF_CONFIG: task index {index} outside a cluster of {n} workers")
    return index, max(n, 1)


def tf_loss(tf, s, y, w, task: str = "logistic"):
    """Σ w ℓ(s, y) in TF, in the dtype of ``s`` (``gdmix.losses.Loss.loss``'s twin for the
    TF workers, linear and deep; tested against it): logistic softplus(s) − y s, linear
    ½(s − y)², poisson e^s − y s."""
    if task == "linear":
        return tf.reduce_sum(w * 0.5 * tf.square(s - y))
    if task == "poisson":
        return tf.reduce_sum(w * (tf.exp(s) - y * s))
    return tf.reduce_sum(w * (tf.nn.softplus(s) - y * s))


def tf_mean(tf, s, task: str = "logistic"):
    """μ(s): σ(s), s or e^s (``gdmix.losses.Loss.mean``'s twin)."""
    if task == "linear":
        return s
    if task == "poisson":
        return tf.exp(s)
    return tf.sigmoid(s)


def tf_residual(tf, s, y, w, task: str = "logistic"):
    """w (μ(s) − y) in TF (``gdmix.losses.Loss.residual``'s twin)."""
    return w * (tf_mean(tf, s, task) - y)


def tf_curvature(tf, s, w, task: str = "logistic"):
    """w ∂²ℓ/∂s²: w σ(s)(1 − σ(s)), w or w e^s (``gdmix.losses.Loss.curvature``'s twin)."""
    if task == "linear":
        return w * tf.ones_like(s)
    if task == "poisson":
        return w * tf.exp(s)
    p = tf.sigmoid(s)
    return w * p * (1.0 - p)


class Distributed:
    """The data sums of this worker's rows, all-reduced over the cluster."""

    def __init__(self, strategy, shard: data.Shard, d: int, task: str = "logistic"):
        import tensorflow as tf

        self.tf, self.task, self.loss = tf, task, losses.of(task)
        x = shard.x
        coo = np.stack([x.row_ids(), x.indices.astype(np.int64)], axis=1).reshape(-1, 2)
        self.X = tf.sparse.reorder(tf.sparse.SparseTensor(coo, x.values, dense_shape=[shard.n_rows, d]))
        self.shard, self.d = shard, d
        self.y, self.w, self.o = (tf.constant(a, dtype=tf.float64) for a in (shard.y, shard.w, shard.offset))
        self._fg = tf.function(lambda theta: reduce_sum(strategy, self._local_fg, theta))
        self._hv = tf.function(lambda theta, v: reduce_sum(strategy, self._local_hv, theta, v))
        self._sum = all_sum_function(strategy)

    def _matvec(self, v, transpose=False):
        tf = self.tf
        return tf.sparse.sparse_dense_matmul(self.X, v[:, None], adjoint_a=transpose)[:, 0]

    def _scores(self, theta):
        return self.o + theta[0] + self._matvec(theta[1:])

    def _local_fg(self, theta):
        # [loss, ∂/∂b, ∇_β] of Σ w ℓ(s, y)
        tf = self.tf
        s = self._scores(theta)
        loss = tf_loss(tf, s, self.y, self.w, self.task)
        r = tf_residual(tf, s, self.y, self.w, self.task)
        return tf.concat([[loss, tf.reduce_sum(r)], self._matvec(r, transpose=True)], axis=0)

    def _local_hv(self, theta, v):
        tf = self.tf
        u = tf_curvature(tf, self._scores(theta), self.w, self.task) * (v[0] + self._matvec(v[1:]))
        return tf.concat([[tf.reduce_sum(u)], self._matvec(u, transpose=True)], axis=0)

    def fun_grad(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        out = self._fg(self.tf.constant(theta, dtype=self.tf.float64)).numpy()
        return float(out[0]), out[1:]

    def hessp(self, theta: np.ndarray, v: np.ndarray) -> np.ndarray:
        tf = self.tf
        return self._hv(tf.constant(theta, dtype=tf.float64), tf.constant(v, dtype=tf.float64)).numpy()

    def hessian_diag(self, theta: np.ndarray) -> np.ndarray:
        """diag(∇²F_data) summed over workers: d + 1 numbers all-reduced."""
        sh = self.shard
        return self.all_sum(objective.data_hessian_diag(theta, sh.x.matrix(self.d), sh.w, sh.offset, self.loss))

    def hessian(self, theta: np.ndarray) -> np.ndarray:
        """∇²F_data summed over workers: this worker's [1 X]ᵀ D [1 X] (scipy, dense p × p),
        then one all-reduce of p² numbers."""
        sh = self.shard
        local = objective.data_hessian(theta, sh.x.matrix(self.d), sh.w, sh.offset, self.loss)
        return self.all_sum(local.ravel()).reshape(local.shape)

    def all_sum(self, values) -> np.ndarray:
        return self._sum(values)


def reduce_sum(strategy, local, *args):
    """Σ over the workers of ``local(*args)``, each computing its own part (inside a
    ``tf.function``); every worker gets the sum."""
    import tensorflow as tf

    def replica_fn(*a):
        # tf.identity: the reduced value must be a tensor made on this replica's device
        # (an argument passed straight through has none: "destinations can not be empty").
        value = tf.identity(local(*a))
        return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, value)

    return strategy.experimental_local_results(strategy.run(replica_fn, args=args))[0]


def all_sum_function(strategy):
    """values (float64 numpy) -> their sum over the workers, as numpy."""
    import tensorflow as tf

    summed = tf.function(lambda v: reduce_sum(strategy, lambda u: u, v))
    return lambda values: summed(tf.constant(np.asarray(values, dtype=np.float64))).numpy()


def import_tensorflow_without_keras():
    """``import tensorflow`` minus its eager Keras import, for workers that use no Keras.

    TF imports Keras (and, through Keras's wrappers, scikit-learn when installed) while it
    is imported: about 2 s of each worker's start on 2 shared cores, before any work. It
    skips that import when told to use the legacy ``tf_keras`` package and that package is
    absent, so that is what a linear worker process asks for (never the deep worker).
    """
    import importlib.util

    if importlib.util.find_spec("tf_keras") is None:
        os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    import tensorflow as tf

    return tf


_STRATEGY = []  # this process's one strategy: TF sets up collectives once per process


def cluster_strategy(tf):
    """The process's ``MultiWorkerMirroredStrategy`` (created on first use: it starts the
    gRPC server on this worker's TF_CONFIG port and joins the cluster). A worker serving
    several steps reuses it; raises PortInUse when the port was taken meanwhile."""
    if not _STRATEGY:
        try:
            _STRATEGY.append(tf.distribute.MultiWorkerMirroredStrategy())
        except tf.errors.UnknownError as e:
            if "Could not start gRPC server" in str(e):
                raise PortInUse(str(e)) from e
            raise
    return _STRATEGY[0]


FULL_VARIANCE_MAX_COEFFICIENTS = 4096  # variance: full all-reduces and inverts the (d+1)² Hessian up to this
HESSIAN_MATRIX_MAX_FEATURES = 1024  # hessian: auto never forms a larger (d+1)² matrix
# hessian: auto's cost model, in units of one multiply-add over a nonzero. Forming a
# worker's Hessian (a sparse X'DX product) costs ~6 per pair of nonzeros in a row; a
# Krylov solve takes ~13 Hessian-vector products per Newton iteration, each two passes
# over the nonzeros plus one all-reduce, whose latency (~10 ms on loopback) is worth
# ~5M. Measured: MovieLens-100K (40k rows of 9 nonzeros per worker) matrix 4× faster;
# 500k-1M rows of 10 nonzeros per worker, products 1.2-1.9× faster.
_PAIR_COST, _PRODUCTS_PER_ITERATION, _ALL_REDUCE_COST = 6.0, 13.0, 5e6


def uses_hessian_matrix(setting: str, d: int, pairs: float = 0.0, nonzeros: float = 0.0) -> bool:
    """Whether the Newton solver all-reduces the Hessian matrix (``matrix``) rather than
    one Hessian-vector product per Krylov step (``products``). ``auto`` weighs forming the
    matrix against a Krylov solve's products, per worker: ``pairs`` = Σ_rows (k+1)² and
    ``nonzeros`` = Σ_rows (k+1) of a worker's shard (averaged over workers), k = the
    row's features (+1: the intercept)."""
    if setting != "auto":
        return setting == "matrix"
    if d > HESSIAN_MATRIX_MAX_FEATURES:
        return False
    matrix_cost = _PAIR_COST * pairs + _ALL_REDUCE_COST
    products_cost = _PRODUCTS_PER_ITERATION * (2.0 * nonzeros + _ALL_REDUCE_COST)
    return matrix_cost <= products_cost


def train(workdir: str, iteration: int, coordinate: str) -> dict:
    index, n_workers = cluster_role()
    chief = index == 0
    started = time.time()
    clock = timing.Phases()
    cfg = config.load_run(workdir)
    coord = cfg.coordinate(coordinate)
    if not coord.is_fixed_effect:
        raise ValueError(f"coordinate {coordinate!r} is not a fixed effect")
    step = plan.Step(iteration, coordinate)
    # Read and check everything before TF starts, so bad input fails fast and clearly.
    d = data.n_features(workdir, coord.feature_bag)
    train_rows = data.worker_rows(workdir, iteration, coordinate, "train", index, n_workers, d)
    theta0 = data.warm_start(cfg, workdir, step, d)
    prior_w, prior_c = data.prior_penalty(cfg, workdir, coord, d)

    clock.lap("read")
    tf = import_tensorflow_without_keras()
    clock.lap("import_tf")
    dist = Distributed(cluster_strategy(tf), train_rows, d, cfg.task)
    # First collective: the global size, for the tolerance and a consistency check.
    k1 = np.diff(train_rows.x.indptr).astype(np.float64) + 1.0  # nonzeros per row, intercept included
    total_w, total_n, total_workers, total_pairs, total_nnz = dist.all_sum(
        [train_rows.w.sum(), train_rows.n_rows, 1.0, float(k1 @ k1), float(k1.sum())])
    if int(round(total_workers)) != n_workers:
        raise RuntimeError(f"all-reduce saw {total_workers} workers, TF_CONFIG says {n_workers}")
    clock.lap("cluster")

    def fun_grad(theta):
        loss, g = dist.fun_grad(theta)
        p, pg = objective.penalty(theta, coord.l2, coord.regularize_intercept, prior_w, prior_c)
        return loss + p, g + pg

    def hessp(theta, v):
        return dist.hessp(theta, v) + objective.penalty_hessp(v, coord.l2, coord.regularize_intercept, prior_w)

    def hess(theta):
        return dist.hessian(theta) + objective.penalty_hessian(d + 1, coord.l2, coord.regularize_intercept, prior_w)

    def progress(it, f, g_inf):
        if chief:
            print(f"[fixed-effect {step}] iteration {it} objective {f:.12g} grad_inf {g_inf:.3e}", flush=True)

    if chief:
        print(f"[fixed-effect {step}] {n_workers} worker(s), {int(total_n)} rows, {d} features, "
              f"{'warm' if theta0 is not None else 'cold'} start", flush=True)
    x0 = np.zeros(d + 1) if theta0 is None else theta0
    # Decided from all-reduced sums, so every worker makes the same choice (lockstep).
    matrix = uses_hessian_matrix(coord.hessian, d, total_pairs / n_workers, total_nnz / n_workers)
    theta, info = solver.solve(fun_grad, x0, gtol=objective.gtol(coord.tolerance, total_w),
                               max_iter=coord.max_iterations, hessp=None if matrix else hessp,
                               hess=hess if matrix else None, progress=progress)
    clock.lap("solve")
    if chief:
        print(f"[fixed-effect {step}] {info.outcome} in {info.iterations} iterations: coordinate objective "
              f"{info.objective:.12g}, gradient {info.grad_inf:.3e}", flush=True)

    b, beta = float(theta[0]), theta[1:]
    variances, variance_mode = None, coord.variance
    if coord.variance == "full" and d + 1 <= FULL_VARIANCE_MAX_COEFFICIENTS:
        variances = objective.variances(h=hess(theta))  # every worker joins the all-reduce
    elif coord.variance != "none":  # simple; or full over the bound: a (d+1)² matrix is too big
        if coord.variance == "full":
            variance_mode = f"simple (full needs d + 1 <= {FULL_VARIANCE_MAX_COEFFICIENTS})"
            if chief:
                print(f"[fixed-effect {step}] variance: full over {d + 1} coefficients exceeds "
                      f"{FULL_VARIANCE_MAX_COEFFICIENTS}: writing 1/diag(H) instead", flush=True)
        pen = objective.penalty_hessp(np.ones(d + 1), coord.l2, coord.regularize_intercept, prior_w)
        variances = objective.variances(h_diag=dist.hessian_diag(theta) + pen)
    clock.lap("variances")
    if chief:
        storage.write_table(storage.join(layout.coefficients(workdir, iteration, coordinate, coordinate), "part-00000.parquet"),
                       data.coefficients_table(b, beta, variances))
    rows = {"train": train_rows.n_rows}
    for split in layout.SPLITS:
        shard = train_rows if split == "train" else data.worker_rows(
            workdir, iteration, coordinate, split, index, n_workers, d)
        rows[split] = shard.n_rows
        storage.write_table(storage.join(layout.scores(workdir, iteration, coordinate, coordinate, split),
                               f"part-{index:05d}.parquet"), data.scores_table(shard, b, beta))
    # Final barrier: nobody leaves while a peer may still need a collective.
    dist.all_sum([1.0])
    clock.lap("write")
    status = {"worker": index, "workers": n_workers, "rows": rows, "total_rows": int(total_n),
              "total_weight": float(total_w), "seconds": round(time.time() - started, 3),
              "phases": clock.seconds, **info.as_dict(), "variance": variance_mode}
    storage.write_json(status_url(workdir, iteration, coordinate, index), status)
    # A worker that has its result of the barrier may still be serving its share of it to a
    # peer (receivers pull), so it leaves only once every peer has passed the barrier too.
    wait_for_peers(workdir, iteration, coordinate, n_workers, cfg.timeouts.worker_exit_seconds)
    return status


def wait_for_peers(workdir: str, iteration: int, coordinate: str, n_workers: int, timeout_s: float) -> bool:
    """Wait (bounded) until every worker has written its status file; False on timeout."""
    deadline = time.monotonic() + timeout_s
    pending = set(range(n_workers))
    while True:
        pending = {w for w in pending if not storage.exists(status_url(workdir, iteration, coordinate, w))}
        if not pending:
            return True
        if time.monotonic() > deadline:
            print(f"workers {sorted(pending)} did not finish within {timeout_s:g} s of this one", file=sys.stderr)
            return False
        time.sleep(0.05)


def wait_for_order(url: str, timeout_s: float, parent: int) -> dict:
    """The JSON at ``url`` once it exists. Raises when ``timeout_s`` passes first or when
    the launching process (pid ``parent``) is no longer this one's parent: it went away."""
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(url):
        if os.getppid() != parent:
            raise RuntimeError("the process that started this worker has gone away")
        if time.monotonic() > deadline:
            raise TimeoutError(f"serving worker: no order at {url} within {timeout_s:g} s")
        time.sleep(ORDER_POLL_S)
    with open(url) as fh:
        return json.load(fh)


def serve(orders: str, timeout_s: float, parent: int, train_fn, preload=None, nice: int = 0) -> None:
    """A worker that serves a run's steps: import what it needs once (``preload``: seconds
    of TF import, overlapping the stages before the first step), then train the step each
    order ``<orders>/order-<n>.json`` names (``{"workdir", "iteration", "coordinate"}``), n =
    0, 1, ..., in one process: one TF import and one cluster (``cluster_strategy``) for all
    of them. It ends when its launcher kills it (the run is over), when the launcher goes
    away, or when no order comes within ``timeout_s``. ``nice`` > 0 lowers its CPU priority
    for good (an unprivileged process cannot raise it again)."""
    if nice > 0:
        os.nice(nice)
    if preload is not None:
        preload()
    n = 0
    while True:
        order = wait_for_order(os.path.join(orders, f"order-{n}.json"), timeout_s, parent)
        train_fn(storage.absolute(order["workdir"]), int(order["iteration"]), order["coordinate"])
        sys.stdout.flush()
        n += 1


def run_main(prog: str, train_fn, argv=None, preload=None) -> None:
    """The entry of a worker process (linear, deep or cohort): train, report any error,
    then leave at once with an exit code the launcher understands, never hanging at exit.
    With ``--serve ORDERS`` it trains the steps it is ordered to, one after another (see
    ``serve``), instead of the one step its arguments name."""
    ap = argparse.ArgumentParser(prog=prog, description="a gdmix TF worker (TF_CONFIG gives its role)")
    ap.add_argument("--workdir")
    ap.add_argument("--iteration", type=int)
    ap.add_argument("--coordinate")
    ap.add_argument("--serve", metavar="ORDERS", help="serve the steps ordered in this folder")
    ap.add_argument("--order-timeout", type=float, default=3600.0, help="the longest wait for an order (s)")
    ap.add_argument("--parent", type=int, help="the launcher's pid (a serving worker leaves when it dies)")
    ap.add_argument("--nice", type=int, default=0, help="a serving worker's niceness increment")
    args = ap.parse_args(argv)
    if not args.serve and (args.workdir is None or args.iteration is None or args.coordinate is None):
        ap.error("--workdir, --iteration and --coordinate are required (or --serve)")
    code = 0
    try:
        if args.serve:
            serve(args.serve, args.order_timeout, args.parent or os.getppid(), train_fn, preload, args.nice)
        else:
            train_fn(storage.absolute(args.workdir), args.iteration, args.coordinate)
    except PortInUse:
        traceback.print_exc()
        code = PORT_IN_USE_EXIT
    except BaseException:  # noqa: BLE001 - report anything, then leave without hanging
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv=None) -> None:
    run_main("python -m gdmix.fixed_effect.worker", train, argv, preload=import_tensorflow_without_keras)


if __name__ == "__main__":
    main()

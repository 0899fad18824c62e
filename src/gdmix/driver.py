"""The embedded driver: the whole coordinate-descent run in one process.

It walks ``plan.steps`` and calls the same stage functions the KFP components call, with
one Spark session for the run. Finished stages (done markers) are skipped on a rerun, and
everything after the first stage that runs again is redone; a changed config starts over,
and a changed input reruns from the first stage that read it (``stages.resume_point``).

A step's metrics depend on its training only, and nothing depends on them but the final
report (the pipeline's DAG has the same edges), so they run in a background thread,
one step at a time, while the next steps partition and train; and the fixed-effect TF
workers are started once, while Spark prepares, and serve every fixed-effect step of the
run, while the random-effect kernel loads beside them (``Prestarted``).
"""
from __future__ import annotations

import concurrent.futures as cf
import threading
import time

import yaml

from gdmix import config as gconfig
from gdmix import kinds, lock, plan, stages, storage
from gdmix import spark as gspark
from gdmix.config import Config
from gdmix.fixed_effect import launcher as launchers

# What a run writes into its work directory (cleared on --restart or a changed config).
RUN_OUTPUTS = ("prepared", "models", "metrics.json", "objective.json", "report.html", gconfig.RUN_CONFIG)


class Progress:
    def __init__(self):
        self.t0 = time.time()
        self.timings: list[tuple[str, str, float]] = []
        self._lock = threading.Lock()

    def line(self, what: str, stage: str, seconds: float, detail: str = "") -> None:
        with self._lock:  # the background metrics report from their own thread
            self.timings.append((what, stage, seconds))
            print(f"[{time.time() - self.t0:7.1f}s] {what:<24} {stage:<10} {seconds:6.1f}s  {detail}", flush=True)


class BackgroundMetrics:
    """Steps' metrics stages, run one after another in one thread beside the main loop.

    ``check`` raises the first failure among those finished (the run stops at the next
    stage boundary); ``drain`` waits for all of them, at most ``timeout_s`` each, and on a
    timeout cancels the Spark jobs still running so the thread ends too."""

    def __init__(self, spark, timeout_s: float):
        self.spark, self.timeout_s = spark, timeout_s
        self.pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="gdmix-metrics")
        self.futures: list[tuple[str, cf.Future]] = []

    def submit(self, what: str, fn, *args) -> None:
        self.futures.append((what, self.pool.submit(fn, *args)))

    def check(self) -> None:
        for _, fut in self.futures:
            if fut.done():
                fut.result()

    def drain(self) -> None:
        try:
            for what, fut in self.futures:
                try:
                    fut.result(timeout=self.timeout_s)
                except cf.TimeoutError:
                    raise TimeoutError(f"{what} metrics did not finish within {self.timeout_s:g} s "
                                       "(timeouts.metrics_seconds)") from None
        finally:
            self.close()

    def close(self) -> None:
        """Stop: cancel what has not started and the Spark jobs of what has."""
        for _, fut in self.futures:
            fut.cancel()
        if any(not fut.done() for _, fut in self.futures):
            self.spark.sparkContext.cancelAllJobs()
        self.pool.shutdown(wait=False)


def clear(cfg: Config, workdir: str) -> None:
    for name in RUN_OUTPUTS:
        storage.remove(storage.join(workdir, name))
    for d in storage.list_dirs(workdir):
        if d.startswith("iter-"):
            storage.remove(storage.join(workdir, d))


def _same_config(cfg: Config, workdir: str) -> bool:
    url = storage.join(workdir, gconfig.RUN_CONFIG)
    if not storage.exists(url):
        return False
    with storage.open_file(url, "r") as f:
        old = yaml.safe_load(f)
    new = gconfig.to_raw(cfg)
    old["workdir"] = new["workdir"]
    return old == yaml.safe_load(yaml.safe_dump(new))


@lock.holding  # one run at a time in a work directory: _LOCK.json, a lease with a heartbeat
def run(cfg: Config, restart: bool = False, spark=None, launcher=None) -> list[dict]:
    """Run prepare and every coordinate-descent step; returns the metrics records.
    ``launcher`` runs TF workers (default: local processes, ``tfjob.select``'s choice
    from the CLI)."""
    kinds.validate(cfg)
    workdir = cfg.workdir
    progress = Progress()
    if restart or (storage.exists(storage.join(workdir, gconfig.RUN_CONFIG)) and not _same_config(cfg, workdir)):
        print(f"starting over in {workdir}" + ("" if restart else " (the config changed)"), flush=True)
        clear(cfg, workdir)
    gconfig.snapshot(cfg)
    ahead = Prestarted(cfg, workdir, launcher or launchers.run_local)
    try:
        return _run(cfg, workdir, spark, progress, ahead)
    finally:
        ahead.close()


class Prestarted:
    """Work started once, as prepare begins, for the steps to come: serving TF workers
    for the run's fixed-effect steps (their TF import overlaps Spark's first jobs; started
    before Spark, they slowed its start), instead of new processes importing TF on the
    critical path of each step; and each kind's ``warm_up`` (the random-effect kernel's
    load) on a thread. Serving workers only for local workers (embedded, no TFJob);
    closed when the run ends, whatever happens."""

    def __init__(self, cfg: Config, workdir: str, launcher):
        self.cfg, self.workdir, self.launcher = cfg, workdir, launcher
        self.cluster = None

    def start(self, skip: int = 0) -> None:
        """``skip``: the stages up to date (``stages.resume_point``); the steps trained after them."""
        to_train = {s.coordinate for i, (stage, s) in enumerate(stages.run_order(self.cfg))
                    if stage == "train" and i >= skip}
        coords = [c for c in self.cfg.coordinates if c.name in to_train]
        if self.cluster is None and self.launcher is launchers.run_local:
            for c in coords:
                self.cluster = kinds.of(c).serving_workers(self.cfg, c)
                if self.cluster is not None:
                    break
        for c in coords:  # a failure here resurfaces in the step that needs it
            threading.Thread(target=_warm_up, args=(self.cfg, c), name=f"warm-up-{c.name}", daemon=True).start()

    def context(self) -> kinds.TrainContext:
        return kinds.TrainContext(launcher=self.launcher, prestarted=self.cluster)

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.close()
            self.cluster = None


def _warm_up(cfg: Config, coord) -> None:
    try:
        kinds.of(coord).warm_up(cfg, coord)
    except Exception:  # noqa: BLE001 - the step that needs it reports it
        pass


def _run(cfg: Config, workdir: str, spark, progress: Progress, ahead: Prestarted) -> list[dict]:
    t = time.time()
    spark = spark or gspark.session(cfg, app=f"gdmix-{cfg.name}")
    progress.line("spark", "start", time.time() - t)

    skip, first, why = stages.resume_point(cfg, workdir)  # a changed input reruns from its first reader
    if skip:
        print(f"{skip} steps up to date, skipped (--restart to redo)", flush=True)
    if first is not None and (skip or why != stages.NOT_DONE):  # a first run says nothing
        print(f"running from {first}: {why}", flush=True)
    redo = False
    ahead.start(skip)
    if skip == 0:
        t = time.time()
        info = stages.prepare(cfg, workdir, spark)
        progress.line("prepare", "prepare", time.time() - t,
                      f"rows {info['rows']}, features {info.get('features')}")
        redo = True
    background = BackgroundMetrics(spark, cfg.timeouts.metrics_seconds)
    try:
        at = 0
        for step in plan.sequence(cfg):
            for stage in stages.stages_of(step):
                at += 1
                if not redo and at < skip:
                    continue
                redo = True
                background.check()
                t = time.time()
                if stage == "partition":
                    info = stages.partition(cfg, workdir, step, spark)
                    progress.line(str(step), stage, time.time() - t, f"rows {info['rows']}")
                elif stage == "train" and plan.is_joint(step):
                    info = stages.train(cfg, workdir, step)
                    progress.line(str(step), "accelerate", time.time() - t, _joint_detail(info))
                elif stage == "train":
                    info = stages.train(cfg, workdir, step, ahead.context())
                    progress.line(str(step), stage, time.time() - t, _train_detail(info))
                else:
                    background.submit(str(step), _metrics, cfg, workdir, step, spark, progress)
        t = time.time()
        background.drain()
        progress.line("metrics", "wait", time.time() - t, "for the metrics still running")
    finally:
        background.close()
    t = time.time()
    out = stages.finalize(cfg, workdir)
    progress.line("finalize", "report", time.time() - t, f"models and report in {workdir}")
    print_summary(out["metrics"], time.time() - progress.t0)
    if cfg.publish is not None:  # a refused publish raises PublishRefused (the CLI exits 3)
        from gdmix import publish

        t = time.time()
        info = publish.publish(cfg, workdir)
        progress.line("publish", "publish", time.time() - t, f"latest -> {info['version']} at {info['latest']}")
    return out["metrics"]


def _metrics(cfg: Config, workdir: str, step: plan.Step, spark, progress: Progress) -> dict:
    t = time.time()
    info = stages.metrics(cfg, workdir, step, spark)
    progress.line(str(step), "metrics", time.time() - t, _metrics_detail(info))
    return info


def _train_detail(info: dict) -> str:
    keys = ("objective", "iterations", "entities", "active", "passive")
    return ", ".join(f"{k} {info[k]:.6g}" if isinstance(info[k], float) else f"{k} {info[k]}"
                     for k in keys if k in info)


def _joint_detail(info: dict) -> str:
    return (f"objective {info['objective_before']:.9g} -> {info['objective']:.9g}, "
            f"CG iterations {info['cg_iterations']} (residual {info['cg_residual']:.1e}), "
            f"step length {info['step_length']:.4g}")


def _metrics_detail(r: dict) -> str:
    def f(v):
        return "n/a" if v is None else f"{v:.4f}"
    return f"AUC {f(r.get('auc'))}  logloss {f(r.get('logloss'))}  objective {r.get('objective'):.6f}"


def print_summary(records: list[dict], wall: float) -> None:
    print("\nvalidation metrics (cumulative score up to each coordinate)")
    print(f"{'iteration':>9}  {'coordinate':<16} {'AUC':>8} {'log loss':>9} {'objective':>14}")
    for r in records:
        auc = "n/a" if r.get("auc") is None else f"{r['auc']:.4f}"
        ll = "n/a" if r.get("logloss") is None else f"{r['logloss']:.4f}"
        print(f"{r['iteration']:>9}  {r['coordinate']:<16} {auc:>8} {ll:>9} {r.get('objective', float('nan')):>14.6f}")
    for r in records:  # metrics.collect marks a step whose objective rose (issue 17)
        if r.get("objective_warning"):
            print(f"WARNING: iter-{r['iteration']}/{r['coordinate']}: {r['objective_warning']}", flush=True)
    print(f"\nwall time {wall:.1f} s", flush=True)

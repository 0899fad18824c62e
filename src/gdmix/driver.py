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
import contextlib
import threading
import time

import yaml

from gdmix import config as gconfig
from gdmix import console as gconsole
from gdmix import grid, kinds, lock, plan, stages, storage
from gdmix import spark as gspark
from gdmix.config import Config
from gdmix.fixed_effect import launcher as launchers

# What a run writes into its work directory (cleared on --restart or a changed config).
RUN_OUTPUTS = ("prepared", "models", "metrics.json", "objective.json", "report.html", gconfig.RUN_CONFIG)


class Progress:
    """The run's lines: one per finished stage (``line``), and a moving line while a
    stage works (``working``, ``gdmix.console``)."""

    def __init__(self, console: gconsole.Console | None = None, spark=None):
        self.t0 = time.time()
        self.timings: list[tuple[str, str, float]] = []
        self.console, self.spark = console, spark
        self._lock = threading.Lock()

    def line(self, what: str, stage: str, seconds: float, detail: str = "") -> None:
        with self._lock:  # the background metrics report from their own thread
            self.timings.append((what, stage, seconds))
            print(f"[{time.time() - self.t0:7.1f}s] {what:<24} {stage:<10} {seconds:6.1f}s  {detail}".rstrip(),
                  flush=True)

    def working(self, label: str):
        """The moving line while the block runs (nothing without a console)."""
        if self.console is None:
            return contextlib.nullcontext()
        return self.console.working(label, self.spark)


class BackgroundMetrics:
    """Steps' metrics stages, run one after another in one thread beside the main loop,
    their output held (``Console.captured``) and printed whole, in plan order, by the main
    loop (``release``) between two of its own lines.

    ``check`` raises the first failure among those finished (the run stops at the next
    stage boundary); ``drain`` waits for all of them, at most ``timeout_s`` each, and on a
    timeout cancels the Spark jobs still running so the thread ends too."""

    def __init__(self, spark, timeout_s: float, console: gconsole.Console | None = None, done_line=None):
        self.spark, self.timeout_s, self.console = spark, timeout_s, console
        self.done_line = done_line  # (what, result): the line that says a stage finished
        self.pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="gdmix-metrics")
        self.futures: list[tuple[str, cf.Future]] = []
        self._released = 0

    def submit(self, what: str, fn, *args) -> None:
        if self.console is not None:
            self.futures.append((what, self.pool.submit(self._held, fn, *args)))
        else:
            self.futures.append((what, self.pool.submit(fn, *args)))

    def _held(self, fn, *args):
        text, result = self.console.captured(fn, *args)
        return _Held(text, result)

    def release(self) -> None:
        """Print the held output of the finished stages up to the first unfinished one."""
        while self._released < len(self.futures) and self.futures[self._released][1].done():
            fut = self.futures[self._released][1]
            self._released += 1
            if self.console is None or fut.cancelled():
                continue
            e = fut.exception()
            self.console.emit(getattr(e, "console_output", "") if e is not None else fut.result().text)
            if e is None and self.done_line is not None:
                self.done_line(self.futures[self._released - 1][0], fut.result().result)

    def check(self) -> None:
        self.release()
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
                    self.release()
        finally:
            self.close()

    def close(self) -> None:
        """Stop: cancel what has not started and the Spark jobs of what has."""
        for _, fut in self.futures:
            fut.cancel()
        if any(not fut.done() for _, fut in self.futures):
            self.spark.sparkContext.cancelAllJobs()
        self.pool.shutdown(wait=False)


class _Held:
    """A background stage's result and the output it printed."""

    def __init__(self, text: str, result):
        self.text, self.result = text, result


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
    if grid.gridded(cfg):  # l2: [λ, ...]: one run per grid point, each through this function
        return grid.search(cfg, lambda point: run(point, restart=restart, spark=spark, launcher=launcher))
    workdir = cfg.workdir
    with gconsole.installed() as con:
        progress = Progress(con)
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
    with progress.working("starting Spark"):
        spark = spark or gspark.session(cfg, app=f"gdmix-{cfg.name}")
    progress.spark = spark
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
        with progress.working("prepare (read, check, index and write the rows)"):
            info = stages.prepare(cfg, workdir, spark)
        progress.line("prepare", "prepare", time.time() - t,
                      f"rows {_rows(info['rows'])}, features {info.get('features')}")
        redo = True
    background = BackgroundMetrics(spark, cfg.timeouts.metrics_seconds, progress.console,
                                   lambda what, info: progress.line(what, "metrics", info["seconds"]["metrics"],
                                                                    _metrics_detail(cfg, info)))
    steps = plan.sequence(cfg)  # the joint steps included
    try:
        at = 0
        for k, step in enumerate(steps, start=1):
            for stage in stages.stages_of(step):
                at += 1
                if not redo and at < skip:
                    continue
                redo = True
                background.check()
                t = time.time()
                label = f"step {k} of {len(steps)} {step} {stage}"
                if stage == "partition":
                    with progress.working(label):
                        info = stages.partition(cfg, workdir, step, spark)
                    progress.line(str(step), stage, time.time() - t, f"rows {_rows(info['rows'])}")
                elif stage == "train" and plan.is_joint(step):
                    with progress.working(label):
                        info = stages.train(cfg, workdir, step)
                    progress.line(str(step), "accelerate", time.time() - t, _joint_detail(info))
                elif stage == "train":
                    with progress.working(label):
                        info = stages.train(cfg, workdir, step, ahead.context())
                    progress.line(str(step), stage, time.time() - t, _train_detail(info))
                else:
                    background.submit(str(step), stages.metrics, cfg, workdir, step, spark)
        t = time.time()
        with progress.working("waiting for the metrics still running"):
            background.drain()
        progress.line("metrics", "wait", time.time() - t, "for the metrics still running")
    finally:
        background.close()
    t = time.time()
    with progress.working("finalize (models and report)"):
        out = stages.finalize(cfg, workdir)
    progress.line("finalize", "report", time.time() - t, f"models and report in {workdir}")
    print_summary(out["metrics"], time.time() - progress.t0)
    if cfg.publish is not None:  # a refused publish raises PublishRefused (the CLI exits 3)
        from gdmix import publish

        t = time.time()
        info = publish.publish(cfg, workdir)
        progress.line("publish", "publish", time.time() - t, f"latest -> {info['version']} at {info['latest']}")
    return out["metrics"]


def _rows(rows) -> str:
    """Row counts by split: ``train 2254, validation 746``."""
    if isinstance(rows, dict):
        return ", ".join(f"{k} {v}" for k, v in rows.items())
    return str(rows)


def _train_detail(info: dict) -> str:
    """The step's own sub-problem (the coordinate objective, not the model's: the metrics
    line has that), its solver's work and outcome in plain words."""
    parts = []
    if isinstance(info.get("objective"), (int, float)):
        parts.append(f"coordinate objective {info['objective']:.6g}")
    if "iterations" in info:
        parts.append(f"{info['iterations']} iterations")
    elif "entity_iterations" in info:
        parts.append(f"≤ {info['entity_iterations']['max']} iterations per entity")
    if "active_entities" in info:
        parts.append(f"entities: {info['active_entities']} active, {info.get('passive_entities', 0)} passive"
                     + (f", {info['unseen_entities']} unseen in validation" if "unseen_entities" in info else ""))
    if info.get("outcome"):
        parts.append(info["outcome"])
    return ", ".join(parts)


def _joint_detail(info: dict) -> str:
    """The step's own sub-problem (F over the coordinates it moves) before and after, its work."""
    return (f"coordinate objective {info['objective_before']:.9g} -> {info['objective']:.9g}, "
            f"CG iterations {info['cg_iterations']} (residual {info['cg_residual']:.1e}), "
            f"step length {info['step_length']:.4g}")


# The two validation metrics the summary shows: a classification's, or a regression's
# (task: linear | poisson records rmse and poisson_deviance instead, docs/design.md §1.6).
_SHOWN = {"auc": ("auc", "AUC", "logloss", "log loss"), "rmse": ("rmse", "RMSE", "poisson_deviance", "deviance")}


def _shown(r: dict) -> tuple[str, str, str, str]:
    return _SHOWN["rmse" if "auc" not in r and "rmse" in r else "auc"]


def _metrics_detail(cfg: Config, r: dict) -> str:
    """Each figure once, by its name: validation metrics, train log loss, model objective
    (the whole F of docs/design.md §1.2 after the step)."""
    def f(v):
        return "n/a" if v is None else f"{v:.4f}"
    shown = "  ".join(f"{k} {f(r.get(k))}" for k in cfg.metrics)
    loss = "logloss" if cfg.task == "logistic" else "loss"
    train = f"  train {loss} {f(r['train_logloss'])}" if r.get("train_logloss") is not None else ""
    return f"validation {shown}{train}  model objective {r.get('objective'):.6f}"


def print_summary(records: list[dict], wall: float) -> None:
    a, a_name, b, b_name = _shown(records[0] if records else {})
    print("\nvalidation metrics (cumulative score up to each coordinate)")
    print(f"{'iteration':>9}  {'coordinate':<16} {a_name:>8} {b_name:>9} {'objective':>14}")
    for r in records:
        va = "n/a" if r.get(a) is None else f"{r[a]:.4f}"
        vb = "n/a" if r.get(b) is None else f"{r[b]:.4f}"
        print(f"{r['iteration']:>9}  {r['coordinate']:<16} {va:>8} {vb:>9} {r.get('objective', float('nan')):>14.6f}")
    for r in records:  # metrics.collect marks a step whose objective rose (issue 17)
        if r.get("objective_warning"):
            print(f"WARNING: iter-{r['iteration']}/{r['coordinate']}: {r['objective_warning']}", flush=True)
    print(f"\nwall time {wall:.1f} s", flush=True)

"""The embedded driver: the whole coordinate-descent run in one process.

It walks ``plan.steps`` and calls the same stage functions the KFP components call, with
one Spark session for the run. Finished stages (done markers) are skipped on a rerun, and
everything after the first stage that runs again is redone; a changed config starts over.
"""
from __future__ import annotations

import time

import yaml

from gdmix import config as gconfig
from gdmix import io, plan, stages
from gdmix import spark as gspark
from gdmix.config import Config

# What a run writes into its work directory (cleared on --restart or a changed config).
RUN_OUTPUTS = ("prepared", "models", "metrics.json", "objective.json", "report.html", gconfig.RUN_CONFIG)


class Progress:
    def __init__(self):
        self.t0 = time.time()
        self.timings: list[tuple[str, str, float]] = []

    def line(self, what: str, stage: str, seconds: float, detail: str = "") -> None:
        self.timings.append((what, stage, seconds))
        print(f"[{time.time() - self.t0:7.1f}s] {what:<24} {stage:<10} {seconds:6.1f}s  {detail}", flush=True)


def clear(cfg: Config, workdir: str) -> None:
    for name in RUN_OUTPUTS:
        io.remove(io.join(workdir, name))
    for d in io.list_dirs(workdir):
        if d.startswith("iter-"):
            io.remove(io.join(workdir, d))


def _same_config(cfg: Config, workdir: str) -> bool:
    url = io.join(workdir, gconfig.RUN_CONFIG)
    if not io.exists(url):
        return False
    with io.open_file(url, "r") as f:
        old = yaml.safe_load(f)
    new = gconfig.to_raw(cfg)
    old["workdir"] = new["workdir"]
    return old == yaml.safe_load(yaml.safe_dump(new))


def run(cfg: Config, restart: bool = False, spark=None) -> list[dict]:
    """Run prepare and every coordinate-descent step; returns the metrics records."""
    workdir = cfg.workdir
    progress = Progress()
    if restart or (io.exists(io.join(workdir, gconfig.RUN_CONFIG)) and not _same_config(cfg, workdir)):
        print(f"starting over in {workdir}" + ("" if restart else " (the config changed)"), flush=True)
        clear(cfg, workdir)
    gconfig.snapshot(cfg)
    t = time.time()
    spark = spark or gspark.session(cfg, app=f"gdmix-{cfg.name}")
    progress.line("spark", "start", time.time() - t)

    redo = False
    if stages.prepare_done(workdir) is None:
        t = time.time()
        info = stages.prepare(cfg, workdir, spark)
        progress.line("prepare", "prepare", time.time() - t,
                      f"rows {info['rows']}, features {info.get('features')}")
        redo = True
    for step in plan.steps(cfg):
        for stage in stages.STEP_STAGES:
            if not redo and stages.step_done(workdir, step, stage) is not None:
                continue
            redo = True
            t = time.time()
            if stage == "partition":
                info = stages.partition(cfg, workdir, step, spark)
                detail = f"rows {info['rows']}"
            elif stage == "train":
                info = stages.train(cfg, workdir, step)
                detail = _train_detail(info)
            else:
                info = stages.metrics(cfg, workdir, step, spark)
                detail = _metrics_detail(info)
            progress.line(str(step), stage, time.time() - t, detail)
    t = time.time()
    out = stages.finalize(cfg, workdir)
    progress.line("finalize", "report", time.time() - t, f"models and report in {workdir}")
    print_summary(out["metrics"], time.time() - progress.t0)
    return out["metrics"]


def _train_detail(info: dict) -> str:
    keys = ("objective", "iterations", "entities", "active", "passive")
    return ", ".join(f"{k} {info[k]:.6g}" if isinstance(info[k], float) else f"{k} {info[k]}"
                     for k in keys if k in info)


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
    print(f"\nwall time {wall:.1f} s", flush=True)

"""The fixed-effect stage: train the global logistic regression of one coordinate-descent
step with TF workers, then check and mark the step's outputs.

Runs in the parent process of the workers and never imports TensorFlow (seconds per
import); the workers do the numerical work (see ``worker``).
"""
from __future__ import annotations

import functools
import sys
import time

from gdmix import config, layout, plan, storage
from gdmix.config import Config
from gdmix.fixed_effect import data, launcher as launchers
from gdmix.fixed_effect.worker import status_url

STAGE = "train"
DNN_WORKER_COMMAND = (sys.executable, "-m", "gdmix.deep.worker")  # model: dnn


def partition_rows(workdir: str, step: plan.Step, split: str, workers: int) -> int:
    """Rows of a split over every worker's shard (a missing shard folder is empty)."""
    alias = data.prepared_alias(workdir, step.iteration, step.coordinate)
    if alias is not None:
        return int(alias["rows"][split])
    return sum(storage.read_table(data.shard_url(workdir, step.iteration, step.coordinate, split, w),
                             columns=["uid"], schema=data.PARTITION_SCHEMA).num_rows
               for w in range(workers))


def extra_shards(workdir: str, step: plan.Step, split: str, workers: int) -> list[str]:
    """Shard folders no worker would read (more shards than workers): data that would be lost."""
    names = storage.list_dirs(layout.partition(workdir, step.iteration, step.coordinate, split))
    known = {f"shard={w}" for w in range(workers)}
    return [n for n in names if n.startswith("shard=") and n not in known]


def default_launcher() -> launchers.Launcher:
    """The launcher ``GDMIX_LAUNCHER`` names: local processes, or a TFJob inside a cluster."""
    from gdmix.kfp import tfjob

    return tfjob.select()


SMALL_INPUT_NICE = 10


def prestart(cfg: Config) -> launchers.LocalCluster | None:
    """Serving workers for the run's linear fixed-effect steps (``launcher.prestart``), when
    they would run as local processes (an embedded run); None otherwise (a TFJob, or a
    deep or external fixed effect, or none).

    On a small input (``gdmix.spark.small_embedded_input``) they run at lower CPU priority
    (``SMALL_INPUT_NICE``): their TF import then yields the cores to prepare and the first
    partition, on the run's critical path, and their own steps take about a second each.
    MovieLens-100K end to end, two interleaved pairs: 60.1 and 60.5 s vs 62.0 and 64.8 s.
    On a larger input a step's training is long and would yield to the previous step's
    metrics, which are not on the critical path: normal priority there."""
    from gdmix import spark as gspark

    fixed = [c for c in cfg.coordinates if c.is_fixed_effect and c.model == "linear"]
    if not fixed or default_launcher() is not launchers.run_local:
        return None
    nice = SMALL_INPUT_NICE if gspark.small_embedded_input(cfg) else 0
    return launchers.prestart(fixed[0].workers, cfg.timeouts.fixed_effect_seconds, nice=nice)


def train(cfg: Config, workdir: str, step: plan.Step, launcher: launchers.Launcher | None = None,
          prestarted: launchers.LocalCluster | None = None) -> dict:
    """Train step ``step`` (a fixed-effect coordinate); return and record its info.

    ``launcher`` runs the workers (default: ``default_launcher()``); ``prestarted``
    (from ``prestart``): serving local workers that train the step when they fit it.
    """
    coord = cfg.coordinate(step.coordinate)
    if not coord.is_fixed_effect:
        raise ValueError(f"{step}: coordinate {coord.name!r} is a {coord.type}, not a fixed effect")
    if coord.model == "external":  # the user's own scores: nothing to train
        from gdmix.fixed_effect import external

        return external.train(cfg, workdir, step)
    workdir = storage.absolute(workdir)
    started = time.time()
    if not storage.exists(storage.join(workdir, config.RUN_CONFIG)):
        config.snapshot(cfg.with_workdir(workdir))  # workers read the run's config from here
    for split in layout.SPLITS:
        extra = extra_shards(workdir, step, split, coord.workers)
        if extra:
            raise ValueError(f"{step}: partition/{split} has shards {extra} but only "
                             f"{coord.workers} worker(s) to read them")
    # Outputs of an earlier attempt (maybe with more workers) must not mix with this one's.
    storage.remove(layout.coefficients(workdir, step.iteration, step.coordinate, step.coordinate))
    for split in layout.SPLITS:
        storage.remove(layout.scores(workdir, step.iteration, step.coordinate, step.coordinate, split))

    launcher = launcher or default_launcher()
    if prestarted is not None and launcher is launchers.run_local:
        launcher = functools.partial(launcher, prestarted=prestarted)
    if coord.model == "dnn":  # any launcher (local processes or a TFJob), the deep worker's entry
        launcher = functools.partial(launcher, command=DNN_WORKER_COMMAND)
    launcher(workdir, step, coord.workers, cfg.timeouts.fixed_effect_seconds, cfg.timeouts.worker_exit_seconds)

    rows = {}
    for split in layout.SPLITS:
        want = partition_rows(workdir, step, split, coord.workers)
        got = storage.read_table(layout.scores(workdir, step.iteration, step.coordinate, step.coordinate, split),
                            columns=["uid"], schema=data.SCORES_SCHEMA).num_rows
        if got != want:
            raise RuntimeError(f"{step}: {split} scores have {got} rows but the partition has {want}")
        rows[split] = want
    chief = storage.read_json(status_url(workdir, step.iteration, step.coordinate, 0))
    info = {"rows": rows, "workers": coord.workers, "objective": chief["objective"],
            "iterations": chief["iterations"], "evaluations": chief["evaluations"],
            "hessp_calls": chief["hessp_calls"], "hess_calls": chief.get("hess_calls", 0),
            "method": chief.get("method"), "grad_inf": chief["grad_inf"],
            "converged": chief["converged"], "message": chief["message"],
            "seconds": round(time.time() - started, 3)}
    storage.mark_done(layout.step_dir(workdir, step.iteration, step.coordinate), STAGE, info)
    return info

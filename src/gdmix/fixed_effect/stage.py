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
from gdmix.fixed_effect.solver import SolveInfo
from gdmix.fixed_effect.worker import status_url

STAGE = "train"
DNN_WORKER_COMMAND = (sys.executable, "-m", "gdmix.deep.worker")  # the deep fixed effect's workers


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


SMALL_INPUT_NICE = 10


def prestart(coord, order_timeout_s: float, nice: int = 0) -> launchers.LocalCluster:
    """Serving local workers for every step of a linear fixed effect (``launcher.prestart``):
    the embedded run's, one TF import per worker per run instead of per step.

    The driver runs them at ``nice`` ``SMALL_INPUT_NICE`` on a small input: their TF import
    then yields the cores to prepare and the first partition, on the run's critical path,
    and their own steps take about a second each (MovieLens-100K end to end, two
    interleaved pairs: 60.1 and 60.5 s vs 62.0 and 64.8 s). On a larger input a step's
    training is long and would yield to the previous step's metrics, which are not on the
    critical path: normal priority there."""
    return launchers.prestart(coord.workers, order_timeout_s, nice=nice)


def train(cfg: Config, workdir: str, step: plan.Step, launcher: launchers.Launcher | None = None,
          prestarted: launchers.LocalCluster | None = None,
          command: tuple[str, ...] | None = None) -> dict:
    """Train step ``step`` (a fixed-effect coordinate) on TF workers running ``command``
    (None: the launcher's default, the linear worker; or the deep one's); return and
    record its info.

    ``launcher`` runs the workers (default: local processes); ``prestarted`` (from
    ``prestart``): serving local workers that train the step when they fit it.
    """
    coord = cfg.coordinate(step.coordinate)
    if not coord.is_fixed_effect:
        raise ValueError(f"{step}: coordinate {coord.name!r} is a {coord.type}, not a fixed effect")
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

    launcher = launcher or launchers.run_local
    if prestarted is not None and launcher is launchers.run_local:
        launcher = functools.partial(launcher, prestarted=prestarted)
    if command is not None:  # a TFJob's pods run the same module
        launcher = functools.partial(launcher, command=command)
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
    solved = SolveInfo.from_status(chief)
    info = {"rows": rows, "workers": coord.workers, **solved.as_dict(), "seconds": round(time.time() - started, 3)}
    storage.mark_done(layout.step_dir(workdir, step.iteration, step.coordinate), STAGE, info)
    return info

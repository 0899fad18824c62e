"""The stage functions behind the CLI, the embedded driver and the KFP components.

One entry per stage, each reading and writing the work directory only. Heavy modules are
imported inside each function so a stage's process pays only for what it uses (the TF
trainer never starts a JVM; Spark stages never import TensorFlow).
"""
from __future__ import annotations

from gdmix import layout, storage
from gdmix.config import Config
from gdmix.plan import Step

# A step's stages, in order; each leaves a done marker in the step's folder.
STEP_STAGES = ("partition", "train", "metrics")


def prepare(cfg: Config, workdir: str, spark) -> dict:
    from gdmix.prepare import prepare as run

    return run(cfg, workdir, spark)


def partition(cfg: Config, workdir: str, step: Step, spark) -> dict:
    from gdmix.partition import partition as run

    return run(cfg, workdir, step, spark)


def train(cfg: Config, workdir: str, step: Step, prestarted=None) -> dict:
    """Train the step's coordinate: the fixed-effect trainer or every random-effect shard.
    ``prestarted``: the run's serving fixed-effect workers (``prestart``), if any."""
    from gdmix.random_effect import cohort

    if cfg.coordinate(step.coordinate).is_fixed_effect:
        from gdmix.fixed_effect.stage import train

        return train(cfg, workdir, step, prestarted=prestarted)
    if cohort.solver_of(cfg, workdir, step) == cohort.DATA_PARALLEL:
        run = cohort.train  # few large entities: one data-parallel problem on TF workers
    else:
        from gdmix.random_effect.stage import train as run
    return run(cfg, workdir, step)


def prestart(cfg: Config):
    """Fixed-effect workers started ahead to serve the run's fixed-effect steps (embedded
    runs with local workers), or None; pass it to ``train`` and ``close()`` it at the end."""
    from gdmix.fixed_effect.stage import prestart as run

    return run(cfg)


def metrics(cfg: Config, workdir: str, step: Step, spark) -> dict:
    from gdmix.metrics import collect, evaluate

    record = evaluate(cfg, workdir, step, spark)
    collect(cfg, workdir)
    return record


def finalize(cfg: Config, workdir: str) -> dict:
    """Collect metrics, export the final name-term-value models, write the run report."""
    from gdmix import models, report
    from gdmix.metrics import collect

    records = collect(cfg, workdir)
    exported = models.export(cfg, workdir)
    report_url = report.write(cfg, workdir)
    return {"metrics": records, "models": exported, "report": report_url}


def step_done(workdir: str, step: Step, stage: str) -> dict | None:
    return storage.done_info(layout.step_dir(workdir, step.iteration, step.coordinate), stage)


def prepare_done(workdir: str) -> dict | None:
    return storage.done_info(layout.prepared_root(workdir), "prepare")

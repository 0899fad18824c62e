"""The stage functions behind the CLI, the embedded driver and the KFP components.

One entry per stage, each reading and writing the work directory only. Heavy modules are
imported inside each function so a stage's process pays only for what it uses (the TF
trainer never starts a JVM; Spark stages never import TensorFlow).
"""
from __future__ import annotations

from gdmix import kinds, layout, storage
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


def train(cfg: Config, workdir: str, step: Step, ctx: kinds.TrainContext | None = None,
          shard: int | None = None, finish: bool = False) -> dict:
    """The one way a step trains, whatever runs it (the embedded driver, a CLI stage
    command, a pipeline task): the step's kind trains it whole, one of its shards
    (``shard``), or gathers its shards (``finish``)."""
    kind = kinds.for_step(cfg, workdir, step)
    ctx = ctx or kinds.TrainContext()
    if shard is not None:
        return kind.train_shard(cfg, workdir, step, shard, ctx)
    if finish:
        return kind.finish(cfg, workdir, step)
    return kind.train(cfg, workdir, step, ctx)


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

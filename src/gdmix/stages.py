"""The stage functions behind the CLI, the embedded driver and the KFP components.

One entry per stage, each reading and writing the work directory only. Heavy modules are
imported inside each function so a stage's process pays only for what it uses (the TF
trainer never starts a JVM; Spark stages never import TensorFlow).
"""
from __future__ import annotations

from gdmix import kinds, layout, plan, storage
from gdmix.config import Config
from gdmix.plan import Step

# A step's stages, in order; each leaves a done marker in the step's folder.
STEP_STAGES = ("partition", "train", "metrics")
JOINT_STAGES = ("train", "metrics")  # the joint step (plan.is_joint) reads the prepared rows: no partition


def stages_of(step: Step) -> tuple[str, ...]:
    return JOINT_STAGES if plan.is_joint(step) else STEP_STAGES


def run_order(cfg: Config) -> list[tuple[str, Step | None]]:
    """Every stage of a run in order, as (stage, step): prepare (step None), then each step's."""
    return [("prepare", None)] + [(stage, s) for s in plan.sequence(cfg) for stage in stages_of(s)]


def prepare(cfg: Config, workdir: str, spark) -> dict:
    from gdmix.prepare import prepare as run

    inputs = input_fingerprints(cfg)  # before reading: a change made meanwhile shows next time
    print_optional_columns(cfg)
    info = run(cfg, workdir, spark)
    _stamp(layout.prepared_root(workdir), "prepare", inputs)
    return info


def input_schema(url: str):
    """The Arrow schema of a Parquet input (a file, a folder or a glob: its first data
    file, as Spark finds them: ``storage.input_files``), read from the footer alone; None
    when there is no data file there."""
    import pyarrow.parquet as pq

    fs, _ = storage.filesystem(url)
    files = storage.input_files(url)
    if not files:
        return None
    with fs.open(files[0], "rb") as fh:
        return pq.read_schema(fh)


def print_optional_columns(cfg: Config) -> None:
    """Say which weight and offset columns the run reads (``checks.input_columns``); a
    configured one missing from the train input stops here, naming it."""
    from gdmix import checks

    d = cfg.data
    found = input_schema(d.train)
    if found is None:  # prepare says what is wrong with the path
        return
    cols = checks.input_columns(cfg, found.names, d.train)
    print(f"weight column: {cols.weight or 'none (every row weighs 1)'}", flush=True)
    print(f"offset column: {cols.offset or 'none (offset 0)'}", flush=True)


def partition(cfg: Config, workdir: str, step: Step, spark) -> dict:
    from gdmix.partition import partition as run

    inputs = upstream(cfg, workdir, step, "partition")
    info = run(cfg, workdir, step, spark)
    _stamp(layout.step_dir(workdir, step.iteration, step.coordinate), "partition", inputs)
    return info


def train(cfg: Config, workdir: str, step: Step, ctx: kinds.TrainContext | None = None,
          shard: int | None = None, finish: bool = False) -> dict:
    """The one way a step trains, whatever runs it (the embedded driver, a CLI stage
    command, a pipeline task): the step's kind trains it whole, one of its shards
    (``shard``), or gathers its shards (``finish``). The joint step (``plan.is_joint``)
    is ``gdmix.accelerate``'s."""
    if plan.is_joint(step):
        from gdmix import accelerate

        inputs = upstream(cfg, workdir, step, "train")
        info = accelerate.run(cfg, workdir, step)
        _stamp(layout.step_dir(workdir, step.iteration, step.coordinate), "train", inputs)
        return info
    kind = kinds.for_step(cfg, workdir, step)
    ctx = ctx or kinds.TrainContext()
    if shard is not None:
        return kind.train_shard(cfg, workdir, step, shard, ctx)
    inputs = upstream(cfg, workdir, step, "train")
    info = kind.finish(cfg, workdir, step) if finish else kind.train(cfg, workdir, step, ctx)
    _stamp(layout.step_dir(workdir, step.iteration, step.coordinate), "train", inputs)
    return info


def metrics(cfg: Config, workdir: str, step: Step, spark) -> dict:
    from gdmix.metrics import collect, evaluate

    inputs = upstream(cfg, workdir, step, "metrics")
    record = evaluate(cfg, workdir, step, spark)
    _stamp(layout.step_dir(workdir, step.iteration, step.coordinate), "metrics", inputs)
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


# --- what each stage read, for safe reruns ----------------------------------------------
#
# Every done marker records under INPUTS a fingerprint of what its stage read: prepare,
# its input files (``storage.fingerprint``: paths, sizes, modification times); a step's
# stage, the done markers of the stages whose outputs it read (a digest of each marker:
# a stage that ran again writes a different one). ``resume_point`` finds the first stage
# of a run whose marker is missing or whose inputs no longer match; the embedded driver
# reruns from there.

INPUTS = "inputs"
NOT_DONE = "not done yet"


def input_fingerprints(cfg: Config) -> dict[str, dict]:
    """The files prepare reads (and an external fixed effect's score file), by config key."""
    from gdmix.kinds import external

    d = cfg.data
    out = {"data.train": storage.fingerprint(d.train)}
    if d.validation:
        out["data.validation"] = storage.fingerprint(d.validation)
    for i, c in enumerate(cfg.coordinates):
        if c.external_scores and external.is_file(c.external_scores):
            out[f"coordinates[{i}].external_scores"] = storage.fingerprint(c.external_scores)
    return out


def _marker_digest(step_url: str, stage: str) -> str | None:
    import hashlib
    import json

    info = storage.done_info(step_url, stage)
    if info is None:
        return None
    return hashlib.sha256(json.dumps(info, sort_keys=True, default=str).encode()).hexdigest()[:16]


def upstream(cfg: Config, workdir: str, step: Step, stage: str) -> dict[str, str | None]:
    """The markers a step's stage depends on, by name, with their digests: partition reads
    the prepared rows and the scores up to the previous step (whose train marker stands
    for all of them: each stage records its own inputs in turn); train reads its
    partition, the joint step's train what partition would (it has none); metrics reads
    its training's scores."""
    here = layout.step_dir(workdir, step.iteration, step.coordinate)
    if stage == "partition" or (stage == "train" and plan.is_joint(step)):
        out = {"prepare": _marker_digest(layout.prepared_root(workdir), "prepare")}
        prev = plan.previous(cfg, step)
        if prev is not None:
            out[f"{prev} train"] = _marker_digest(layout.step_dir(workdir, prev.iteration, prev.coordinate), "train")
        return out
    before = {"train": "partition", "metrics": "train"}[stage]
    return {f"{step} {before}": _marker_digest(here, before)}


def _stamp(step_url: str, stage: str, inputs: dict) -> None:
    info = storage.done_info(step_url, stage)
    if info is not None:
        info[INPUTS] = inputs
        storage.mark_done(step_url, stage, info)


def _changed(recorded: dict | None, current: dict) -> str | None:
    """Why ``recorded`` inputs differ from ``current`` ones (None: they match)."""
    if recorded is None:
        return "no record of its inputs (a run from an older version)"
    for name, now in current.items():
        then = recorded.get(name)
        if then == now:
            continue
        if isinstance(now, dict):
            return f"{name} changed ({now['url']}: {now['files']} file(s), {now['bytes']} bytes)"
        return f"{name} ran again"
    gone = sorted(set(recorded) - set(current))
    return f"{gone[0]} is no longer an input" if gone else None


def resume_point(cfg: Config, workdir: str) -> tuple[int, str | None, str | None]:
    """(stages up to date, the first stage to run, why) over prepare and every step's
    stages in run order; (all, None, None) when every stage is up to date."""
    root = layout.prepared_root(workdir)
    order = run_order(cfg)
    for i, (stage, step) in enumerate(order):
        if step is None:
            info, current, label = storage.done_info(root, "prepare"), input_fingerprints(cfg), "prepare"
        else:
            info = step_done(workdir, step, stage)
            current, label = upstream(cfg, workdir, step, stage), f"{step} {stage}"
        why = NOT_DONE if info is None else _changed(info.get(INPUTS), current)
        if why is not None:
            return i, label, why
    return len(order), None, None

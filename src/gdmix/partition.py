"""The partition stage (Spark): offsets for one coordinate-descent step, rows sharded.

For step (k, c) every row's offset becomes the input offset plus the latest score of every
*other* trained coordinate; the trainer of c then fits c alone with those offsets fixed.
Rows are written sharded as ``shard=<s>`` folders, as the coordinate's kind asks
(``Kind.partitioning``): by entity (each shard holds whole entities; the trainer groups a
shard's rows by entity when it reads it) or by uid (one shard per TF worker). ``solver:
auto`` is resolved here into a kind, recorded in the done marker. A coordinate whose
workers can read the prepared split, trained before any other coordinate, gets no rows
(``reads_prepared``).

Rows grouped by entity are written once per run (``Partitioning.rows_once``): in the
coordinate's first pass. Between passes only the offsets change, so a later pass writes
per shard just ``uid``, ``offset`` (and ``fixed_score``), ``schema.offsets_schema``: it
reads and writes a few numbers per row instead of shuffling every row's features again.
Its done marker names the pass whose rows it completes (``ROWS_ITERATION``).
"""
from __future__ import annotations

import time

from gdmix import kinds, layout, plan, schema, storage
from gdmix import spark as gspark
from gdmix.config import Config
from gdmix.plan import Step


SPLIT = "_split"  # the split column of the one write (renamed away after it)
ROWS_ITERATION = schema.ROWS_ITERATION  # done-marker key: the pass whose partition holds the rows


class OutOfOrderError(RuntimeError):
    """A step was asked to run before the steps it depends on completed."""


def require_complete(cfg: Config, workdir: str, step: Step) -> dict[str, Step]:
    """The latest state before ``step``; refuses to go on when any part of it is unfinished."""
    if storage.done_info(layout.prepared_root(workdir), "prepare") is None:
        raise OutOfOrderError(f"{step}: the prepare stage has not completed in {workdir}")
    state = plan.state(cfg, step)
    prev = plan.previous(cfg, step)
    needed = set(state.values()) | ({prev} if prev else set())
    for s in sorted(needed, key=plan.sequence(cfg).index):
        if storage.done_info(layout.step_dir(workdir, s.iteration, s.coordinate), "train") is None:
            raise OutOfOrderError(
                f"{step} needs {s} to have finished training, but it has not: run the "
                f"iterations in order (iteration {s.iteration} first)")
    return state


# A score missing for a row after the joins fails the write with this text (raise_error).
NO_SCORE = "gdmix-no-score"


def _redo_train(workdir: str, s: Step) -> str:
    return (f"gdmix train --workdir {workdir} --iteration {s.iteration} --coordinate {s.coordinate} "
            "(a rerun of gdmix run redoes it and every later step)")


def _verified_inputs(cfg: Config, workdir: str, step: Step, state: dict[str, Step]) -> None:
    """The files this step reads hold what their writers' done markers recorded (footers
    only): the prepared splits, and every score file joined into the offsets, whose rows
    must be exactly the prepared split's (every trained coordinate scores every row)."""
    root = layout.prepared_root(workdir)
    rows_in = storage.done_info(root, "prepare")["rows"]
    redo = f"gdmix prepare --workdir {workdir} --config CONFIG (or gdmix run)"
    files = [(d, s) for d, s in state.items() if d != step.coordinate]
    if plan.shifts_fixed_effect(cfg, step):
        files.append((cfg.fixed_effect.name, state[cfg.fixed_effect.name]))
    for split in layout.SPLITS:
        storage.verify_rows(layout.prepared(workdir, split), int(rows_in[split]), root, "prepare", redo)
        for d, s in files:
            storage.verify_rows(layout.scores(workdir, s.iteration, s.coordinate, d, split), int(rows_in[split]),
                                layout.step_dir(workdir, s.iteration, s.coordinate), "train",
                                _redo_train(workdir, s))


def _scores(spark, workdir: str, s: Step, coordinate: str, split: str):
    url = layout.scores(workdir, s.iteration, s.coordinate, coordinate, split)
    return spark.read.schema(schema.SCORES_DDL).parquet(gspark.path(url))


def _score_or_fail(name: str, workdir: str, s: Step, coordinate: str, split: str):
    """The joined score, or (no score for this row's uid) the write fails naming the file."""
    from pyspark.sql import functions as F

    url = layout.scores(workdir, s.iteration, s.coordinate, coordinate, split)
    return F.coalesce(F.col(name), F.raise_error(F.concat(
        F.lit(f"{NO_SCORE}: {url} has no score for uid "), F.col(schema.UID).cast("string"),
        F.lit(f" of the prepared {split} split (step {s}) {NO_SCORE}"))))


def _offsets(spark, cfg, workdir, step, split, rows, state):
    """Add the other coordinates' latest scores to the offset: one left join on uid per
    score file. Spark broadcasts a small score file (no shuffle of the rows at all) and
    otherwise shuffles the rows once by uid for all the joins; a score file with a
    duplicate uid would duplicate rows, which the row count after the write catches."""
    from pyspark.sql import functions as F

    others = [(d, s) for d, s in state.items() if d != step.coordinate]
    total = F.col(schema.OFFSET)
    for i, (d, s) in enumerate(others):
        name = f"_other{i}"
        rows = rows.join(_scores(spark, workdir, s, d, split).withColumnRenamed(schema.SCORE, name),
                         schema.UID, "left")
        total = total + _score_or_fail(name, workdir, s, d, split)
    if others:
        rows = rows.withColumn(schema.OFFSET, total).drop(*[f"_other{i}" for i in range(len(others))])
    if plan.shifts_fixed_effect(cfg, step):
        fe = cfg.fixed_effect.name
        fixed = _scores(spark, workdir, state[fe], fe, split).withColumnRenamed(schema.SCORE, schema.FIXED_SCORE)
        rows = rows.join(fixed, schema.UID, "left").withColumn(
            schema.FIXED_SCORE, _score_or_fail(schema.FIXED_SCORE, workdir, state[fe], fe, split))
    return rows


def _no_score(workdir: str, state: dict[str, Step], error: str) -> None:
    """Turn the write's failure on a row without a score into a ``DamagedOutput`` that
    names the score file and removes its writer's done marker (so a rerun redoes it)."""
    if NO_SCORE not in error:
        return
    what = error.split(NO_SCORE + ": ", 1)[1].split(" " + NO_SCORE, 1)[0]
    for s in sorted(set(state.values()), key=lambda s: (s.iteration, s.coordinate)):
        if layout.step_dir(workdir, s.iteration, s.coordinate) + "/scores/" in what:
            storage.remove(storage.marker(layout.step_dir(workdir, s.iteration, s.coordinate), "train"))
            raise storage.DamagedOutput(f"{what}: the train stage's scores are incomplete; its done "
                                        f"marker is removed, redo it: {_redo_train(workdir, s)}") from None
    raise storage.DamagedOutput(what) from None


def _kind(cfg: Config, workdir: str, coord, spark) -> kinds.Kind:
    """The coordinate's kind; ``solver: auto`` resolved from the train split's entity counts."""
    from pyspark.sql import functions as F

    if not kinds.is_auto(coord):
        return kinds.of(coord)
    train = spark.read.parquet(gspark.path(layout.prepared(workdir, "train")))
    r = train.agg(F.count_distinct(F.col(coord.entity)).alias("e"), F.count(F.lit(1)).alias("n")).first()
    return kinds.resolve_auto(coord, int(r["e"]), int(r["n"]))


def reads_prepared(cfg: Config, step: Step, state: dict[str, Step]) -> bool:
    """A coordinate whose workers slice the prepared rows (``Partitioning.prepared_first``:
    ``gdmix.fixed_effect.data.worker_rows``), trained before any other coordinate (the
    first step of most runs): its offsets are the inputs' own, so nothing to partition."""
    coord = cfg.coordinate(step.coordinate)
    return (kinds.of(coord).partitioning(coord).prepared_first
            and all(d == step.coordinate for d in state) and not plan.shifts_fixed_effect(cfg, step))


def _alias_prepared(cfg: Config, workdir: str, step: Step, t0: float) -> dict:
    coord = cfg.coordinate(step.coordinate)
    storage.remove(layout.partition_root(workdir, step.iteration, step.coordinate))  # an earlier attempt's rows
    rows = storage.done_info(layout.prepared_root(workdir), "prepare")["rows"]
    for split in layout.SPLITS:  # what the workers will slice is what prepare wrote
        storage.verify_rows(layout.prepared(workdir, split), int(rows[split]), layout.prepared_root(workdir),
                            "prepare", f"gdmix prepare --workdir {workdir} --config CONFIG (or gdmix run)")
    info = {"rows": {s: int(rows[s]) for s in layout.SPLITS}, "kind": kinds.of(coord).name,
            "shards": kinds.of(coord).partitioning(coord).shards, "source": "prepared",
            "bag": coord.feature_bag, "seconds": round(time.time() - t0, 2)}
    storage.mark_done(layout.step_dir(workdir, step.iteration, step.coordinate), "partition", info)
    return info


def rows_from(cfg: Config, workdir: str, step: Step, kind: kinds.Kind) -> Step | None:
    """The step whose partition already holds this coordinate's rows, grouped as this step
    needs them (its first pass, same kind and shards), or None: this step writes rows."""
    coord = cfg.coordinate(step.coordinate)
    parts = kind.partitioning(coord)
    if not parts.rows_once or step.iteration == 0:
        return None
    first = Step(0, step.coordinate)
    info = storage.done_info(layout.step_dir(workdir, first.iteration, first.coordinate), "partition")
    if (info is None or info.get("kind") != kind.name or info.get("shards") != parts.shards
            or info.get(ROWS_ITERATION, first.iteration) != first.iteration or info.get("source") == "prepared"):
        return None
    return first


def partition(cfg: Config, workdir: str, step: Step, spark, reuse_rows: bool = True) -> dict:
    """Write ``iter-k/<c>/partition/{train,validation}/shard=<s>`` for step (k, c):
    whole rows, or (``rows_from``; ``reuse_rows=False`` forces whole rows) the offsets."""
    from pyspark.sql import functions as F

    t0 = time.time()
    state = require_complete(cfg, workdir, step)
    coord = cfg.coordinate(step.coordinate)
    if reads_prepared(cfg, step, state):
        return _alias_prepared(cfg, workdir, step, t0)
    _verified_inputs(cfg, workdir, step, state)
    kind = _kind(cfg, workdir, coord, spark)
    parts = kind.partitioning(coord)
    has_entity, n_shards = parts.entity_column, parts.shards
    first = rows_from(cfg, workdir, step, kind) if reuse_rows else None
    shifted = plan.shifts_fixed_effect(cfg, step)
    out_schema = schema.offsets_schema(shifted) if first else schema.partition_schema(has_entity, shifted)
    rows_in = storage.done_info(layout.prepared_root(workdir), "prepare")["rows"]
    frames = []
    for split in layout.SPLITS:
        rows = spark.read.parquet(gspark.path(layout.prepared(workdir, split)))
        rows = rows.select(  # the entity id is the shard key; later passes drop it after sharding
            schema.UID, schema.OFFSET,
            *([F.col(coord.entity).cast("string").alias(schema.ENTITY_ID)] if has_entity else []),
            *([] if first else [
                schema.LABEL, schema.WEIGHT,
                F.col(schema.bag_indices(coord.feature_bag)).alias(schema.INDICES),
                F.col(schema.bag_values(coord.feature_bag)).alias(schema.VALUES)]),
        )
        keep = out_schema.names + ([schema.ENTITY_ID] if first and has_entity else [])
        rows = _offsets(spark, cfg, workdir, step, split, rows, state).select(*keep)
        frames.append(rows.withColumn(SPLIT, F.lit(split)))
    # Both splits in one Spark job, written as split=<s>/shard=<k> and renamed to <s>/shard=<k>.
    rows = frames[0].unionByName(frames[1])
    key = F.col(schema.ENTITY_ID) if parts.by == "entity" else F.col(schema.UID)
    rows = rows.withColumn("shard", F.pmod(F.xxhash64(key), F.lit(n_shards)).cast("int"))
    if first:  # the shard is all the trainer needs of the entity: it has the first pass's rows
        rows = rows.drop(schema.ENTITY_ID)
    # One task per (split, shard), mostly; rows within a shard are in no particular order
    # (the random-effect trainer groups them by entity itself, in Arrow: far cheaper than
    # a Spark sort).
    rows = rows.repartition(2 * n_shards, SPLIT, "shard")
    counts = {}
    with storage.atomic_path(layout.partition_root(workdir, step.iteration, step.coordinate)) as tmp:
        try:
            rows.write.partitionBy(SPLIT, "shard").parquet(gspark.path(tmp))
        except Exception as e:  # noqa: BLE001 - a row without a score (raise_error above)
            _no_score(workdir, state, str(e))
            raise
        for split in layout.SPLITS:
            written, final = storage.join(tmp, f"{SPLIT}={split}"), storage.join(tmp, split)
            if storage.exists(written):
                storage.commit(written, final)
            else:  # a split without rows: written alone, as an empty split always was
                rows.where(F.col(SPLIT) == split).drop(SPLIT).write.partitionBy("shard").parquet(gspark.path(final))
            counts[split] = storage.parquet_rows(final)  # from the footers: no second Spark job
            if counts[split] != rows_in[split]:
                raise RuntimeError(f"{step} partition/{split}: wrote {counts[split]} rows but the prepared "
                                   f"{split} split has {rows_in[split]}: rows were lost or duplicated "
                                   "(a score file with duplicate uids?)")
    info = {"rows": counts, "kind": kind.name, "shards": n_shards, "seconds": round(time.time() - t0, 2)}
    if first:
        info[ROWS_ITERATION] = first.iteration
    storage.mark_done(layout.step_dir(workdir, step.iteration, step.coordinate), "partition", info)
    return info

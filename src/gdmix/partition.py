"""The partition stage (Spark): offsets for one coordinate-descent step, rows sharded.

For step (k, c) every row's offset becomes the input offset plus the latest score of every
*other* trained coordinate; the trainer of c then fits c alone with those offsets fixed.
Rows are written sharded as ``shard=<s>`` folders: for a random effect by entity (each
shard holds whole entities; the trainer sorts a shard's rows by entity when it reads it),
for the fixed effect by uid, one shard per TF worker. A per-cohort
random effect (``solver: data_parallel``, or ``auto`` resolved here and recorded in the
done marker) is sharded by uid too: its shards are its TF workers' rows. A fixed effect
trained before any other coordinate writes no rows: its workers read the prepared split
(``reads_prepared``).
"""
from __future__ import annotations

import time

from gdmix import layout, plan, schema, storage
from gdmix import spark as gspark
from gdmix.config import Config
from gdmix.plan import Step


SPLIT = "_split"  # the split column of the one write (renamed away after it)


class OutOfOrderError(RuntimeError):
    """A step was asked to run before the steps it depends on completed."""


def require_complete(cfg: Config, workdir: str, step: Step) -> dict[str, Step]:
    """The latest state before ``step``; refuses to go on when any part of it is unfinished."""
    if storage.done_info(layout.prepared_root(workdir), "prepare") is None:
        raise OutOfOrderError(f"{step}: the prepare stage has not completed in {workdir}")
    state = plan.state(cfg, step)
    prev = plan.previous(cfg, step)
    needed = set(state.values()) | ({prev} if prev else set())
    for s in sorted(needed, key=plan.steps(cfg).index):
        if storage.done_info(layout.step_dir(workdir, s.iteration, s.coordinate), "train") is None:
            raise OutOfOrderError(
                f"{step} needs {s} to have finished training, but it has not: run the "
                f"iterations in order (iteration {s.iteration} first)")
    return state


def _scores(spark, workdir: str, s: Step, coordinate: str, split: str):
    url = layout.scores(workdir, s.iteration, s.coordinate, coordinate, split)
    return spark.read.schema(schema.SCORES_DDL).parquet(gspark.path(url))


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
        total = total + F.coalesce(F.col(name), F.lit(0.0))
    if others:
        rows = rows.withColumn(schema.OFFSET, total).drop(*[f"_other{i}" for i in range(len(others))])
    if plan.shifts_fixed_effect(cfg, step):
        fe = cfg.fixed_effect.name
        fixed = _scores(spark, workdir, state[fe], fe, split).withColumnRenamed(schema.SCORE, schema.FIXED_SCORE)
        rows = rows.join(fixed, schema.UID, "left").fillna(0.0, subset=[schema.FIXED_SCORE])
    return rows


def _solver(cfg: Config, workdir: str, coord, spark) -> str:
    """A random effect's solver; ``auto`` is resolved from the train split's entity counts."""
    from pyspark.sql import functions as F

    from gdmix.random_effect import cohort

    if coord.solver != "auto":
        return coord.solver
    train = spark.read.parquet(gspark.path(layout.prepared(workdir, "train")))
    r = train.agg(F.count_distinct(F.col(coord.entity)).alias("e"), F.count(F.lit(1)).alias("n")).first()
    return cohort.choose(coord, int(r["e"]), int(r["n"]))


def reads_prepared(cfg: Config, step: Step, state: dict[str, Step]) -> bool:
    """A fixed effect trained by workers before any other coordinate (the first step of
    most runs): its offsets are the inputs' own, and its workers take contiguous slices of
    the prepared rows (``gdmix.fixed_effect.data.worker_rows``): nothing to partition."""
    coord = cfg.coordinate(step.coordinate)
    return (coord.is_fixed_effect and coord.model in ("linear", "dnn")
            and all(d == step.coordinate for d in state) and not plan.shifts_fixed_effect(cfg, step))


def _alias_prepared(cfg: Config, workdir: str, step: Step, t0: float) -> dict:
    coord = cfg.coordinate(step.coordinate)
    storage.remove(layout.partition_root(workdir, step.iteration, step.coordinate))  # an earlier attempt's rows
    rows = storage.done_info(layout.prepared_root(workdir), "prepare")["rows"]
    info = {"rows": {s: int(rows[s]) for s in layout.SPLITS}, "shards": coord.workers, "source": "prepared",
            "bag": coord.feature_bag, "seconds": round(time.time() - t0, 2)}
    storage.mark_done(layout.step_dir(workdir, step.iteration, step.coordinate), "partition", info)
    return info


def partition(cfg: Config, workdir: str, step: Step, spark) -> dict:
    """Write ``iter-k/<c>/partition/{train,validation}/shard=<s>`` for step (k, c)."""
    from pyspark.sql import functions as F

    t0 = time.time()
    state = require_complete(cfg, workdir, step)
    coord = cfg.coordinate(step.coordinate)
    if reads_prepared(cfg, step, state):
        return _alias_prepared(cfg, workdir, step, t0)
    is_re = not coord.is_fixed_effect
    n_shards = coord.shards if is_re else coord.workers
    solver = _solver(cfg, workdir, coord, spark) if is_re else None
    by_uid = not is_re or solver == "data_parallel"  # a cohort's shards are its TF workers' rows
    out_schema = schema.partition_schema(is_re, plan.shifts_fixed_effect(cfg, step))
    rows_in = storage.done_info(layout.prepared_root(workdir), "prepare")["rows"]
    frames = []
    for split in layout.SPLITS:
        rows = spark.read.parquet(gspark.path(layout.prepared(workdir, split)))
        rows = rows.select(
            schema.UID, schema.LABEL, schema.WEIGHT, schema.OFFSET,
            *([F.col(coord.entity).cast("string").alias(schema.ENTITY_ID)] if is_re else []),
            F.col(schema.bag_indices(coord.feature_bag)).alias(schema.INDICES),
            F.col(schema.bag_values(coord.feature_bag)).alias(schema.VALUES),
        )
        rows = _offsets(spark, cfg, workdir, step, split, rows, state).select(*out_schema.names)
        frames.append(rows.withColumn(SPLIT, F.lit(split)))
    # Both splits in one Spark job, written as split=<s>/shard=<k> and renamed to <s>/shard=<k>.
    rows = frames[0].unionByName(frames[1])
    key = F.col(schema.UID) if by_uid else F.col(schema.ENTITY_ID)
    rows = rows.withColumn("shard", F.pmod(F.xxhash64(key), F.lit(n_shards)).cast("int"))
    # One task per (split, shard), mostly; rows within a shard are in no particular order
    # (the random-effect trainer groups them by entity itself, in Arrow: far cheaper than
    # a Spark sort).
    rows = rows.repartition(2 * n_shards, SPLIT, "shard")
    counts = {}
    with storage.atomic_path(layout.partition_root(workdir, step.iteration, step.coordinate)) as tmp:
        rows.write.partitionBy(SPLIT, "shard").parquet(gspark.path(tmp))
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
    info = {"rows": counts, "shards": n_shards, "seconds": round(time.time() - t0, 2)}
    if solver:
        info["solver"] = solver
    storage.mark_done(layout.step_dir(workdir, step.iteration, step.coordinate), "partition", info)
    return info

"""The prepare stage: check the input, build feature indexes, index the rows, split.

Reads ``cfg.data.train`` (and ``cfg.data.validation``, or a deterministic hash split of
train) and writes, per docs/design.md §4.2 and ``gdmix.schema``:

    prepared/features/<bag>.parquet              index -> (name, term), from TRAIN only
    prepared/{train,validation}/part-*.parquet   uid, label, weight, offset, entity ids,
                                                  <bag>_indices, <bag>_values, [kind columns]

A coordinate's kind may check input columns of its own and add prepared columns
(``Kind.check_input``, ``Kind.prepared_columns``: an external fixed effect's score
column, a deep model's text tokens).

Feature index of a bag:
- ``columns`` bag: every configured column, in the configured order (name = column,
  term = ""), whether or not it is ever non-zero: the order the user wrote is kept.
- ``ntv`` bag: every distinct (name, term) pair seen in the train split (a null term
  reads as ""), sorted by (name, term). Bags reading the same column get the same index.

Row values: a null plain-column value or a null ntv value means "absent" (like 0);
zero values are dropped; duplicate (name, term) entries within one row's ntv bag are
summed (x·β is linear, so this is what listing a feature twice means); ntv features not
in the index (possible in validation only) are dropped. Indices are ascending.

Everything but the ntv lookup is plain Spark SQL (no shuffle); the ntv lookup is a
vectorised Arrow UDF (pyarrow only; pandas is not needed).
"""
from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from gdmix import bags, checks, kinds, layout, schema, storage, timing
from gdmix import spark as gspark
from gdmix.checks import InputError, col
from gdmix.config import Config

_HASH_BUCKETS = 1_000_000_000


def _read(spark, url: str) -> DataFrame:
    checks.check_file_schemas(url)  # one schema across the input's files, from their footers
    try:
        return spark.read.parquet(gspark.path(url))
    except Exception as e:  # Spark raises AnalysisException for a missing path / no files
        if "PATH_NOT_FOUND" in str(e) or "UNABLE_TO_INFER_SCHEMA" in str(e):
            raise InputError(f"{url}: no Parquet input found there") from None
        raise


def in_validation(uid: Column, seed: int, fraction: float) -> Column:
    """Whether a row belongs to the validation split: a seeded hash of its uid, so the
    split is the same on every run, on any number of partitions."""
    bucket = F.pmod(F.xxhash64(F.lit(int(seed)).cast("long"), uid.cast("long")), F.lit(_HASH_BUCKETS))
    return bucket < F.lit(int(round(fraction * _HASH_BUCKETS)))


# --- feature indexes ---------------------------------------------------------------------

def _ntv_pairs(df: DataFrame, column: str) -> list[tuple[str, str]]:
    has_term = "term" in {f.name for f in df.schema[column].dataType.elementType.fields}
    f = F.explode(col(column)).alias("f")
    term = F.coalesce(F.col("f.term"), F.lit("")) if has_term else F.lit("")
    rows = (df.select(f).where(F.col("f").isNotNull() & F.col("f.name").isNotNull())
            .select(F.col("f.name").alias("name"), term.alias("term")).distinct().collect())
    return sorted((r["name"], r["term"]) for r in rows)


def feature_indexes(cfg: Config, train: DataFrame) -> dict[str, pa.Table]:
    """One index per bag (schema.FEATURE_INDEX), built from the train split."""
    pairs_by_column: dict[str, list[tuple[str, str]]] = {}
    out = {}
    for name, bag in cfg.data.feature_bags.items():
        if bag.ntv:
            if bag.ntv not in pairs_by_column:
                pairs_by_column[bag.ntv] = _ntv_pairs(train, bag.ntv)
            pairs = pairs_by_column[bag.ntv]
        else:
            pairs = [(c, "") for c in bag.columns]
        out[name] = pa.table({
            "index": pa.array(np.arange(len(pairs), dtype=np.int32)),
            "name": pa.array([p[0] for p in pairs], pa.string()),
            "term": pa.array([p[1] for p in pairs], pa.string()),
        }, schema=schema.FEATURE_INDEX)
    return out


# --- indexing rows -----------------------------------------------------------------------

def indexed_rows(df: DataFrame, cfg: Config, indexes: dict[str, pa.Table],
                 extra: list[tuple[str, Column]] = ()) -> DataFrame:
    """The prepared rows of one split (schema documented in ``gdmix.schema``), then the
    coordinates' kinds' ``extra`` columns (name, expression)."""
    cols = checks.input_columns(cfg, df.columns)
    out = [
        col(cols.uid).cast("long").alias(schema.UID),
        col(cols.label).cast("double").alias(schema.LABEL),
        (col(cols.weight).cast("double") if cols.weight else F.lit(1.0)).alias(schema.WEIGHT),
        (col(cols.offset).cast("double") if cols.offset else F.lit(0.0)).alias(schema.OFFSET),
    ]
    for e in cols.entities:
        t = df.schema[e].dataType.typeName()
        out.append(col(e) if t == "string" else col(e).cast("long").alias(e))
    structs = {}  # bag -> the Arrow UDF's struct column (one per ntv source column)
    for name, bag in cfg.data.feature_bags.items():
        if bag.columns:
            ind, val = bags.columns_bag(bag)
            out += [ind.alias(schema.bag_indices(name)), val.alias(schema.bag_values(name))]
            continue
        s = f"__ntv_{bag.ntv}"
        if s not in structs.values():  # bags reading one column share one index: look up once
            t = indexes[name]
            udf = bags.ntv_lookup(list(zip(t.column("name").to_pylist(), t.column("term").to_pylist())))
            out.append(udf(col(bag.ntv)).alias(s))
        structs[name] = s
    names = [name for name, _ in extra]
    out += [expr.alias(name) for name, expr in extra]
    rows = df.select(*out)
    if structs:  # unpack the Arrow UDF's struct (evaluated once, then projected)
        unpack = {schema.bag_indices(b): col(s)["indices"] for b, s in structs.items()}
        unpack.update({schema.bag_values(b): col(s)["values"] for b, s in structs.items()})
        rows = rows.select(*[unpack[c].alias(c) if c in unpack else col(c)
                             for c in _output_order(cfg, cols) + names])
    return rows


def _output_order(cfg: Config, cols: checks.InputColumns) -> list[str]:
    names = [schema.UID, schema.LABEL, schema.WEIGHT, schema.OFFSET, *cols.entities]
    for b in cfg.data.feature_bags:
        names += [schema.bag_indices(b), schema.bag_values(b)]
    return names


# --- writing -----------------------------------------------------------------------------

def _check(df: DataFrame, cfg: Config, where: str, training: bool = False) -> int:
    """The input checks and each coordinate kind's own; the input's row count."""
    n = checks.check_input(df, cfg, where, training=training)
    for coord in cfg.coordinates:
        kinds.of(coord).check_input(df, cfg, coord, where)
    return n


def _no_overlap(train: DataFrame, val: DataFrame, cfg: Config, d) -> None:
    """A uid in both the train and the validation input leaks its label into validation."""
    uid = d.columns.uid
    both = (train.select(col(uid).cast("long").alias("u"))
            .join(val.select(col(uid).cast("long").alias("u")), "u")
            .agg(F.count(F.lit(1)).alias("n"), F.min("u").alias("first")).first())
    if both["n"]:
        raise InputError(f"{d.validation}: {both['n']} uid{'s' if both['n'] > 1 else ''} of the validation input "
                         f"also in the train input {d.train} (the first: {both['first']}): validation rows "
                         "must be held out of training")


def _active_entities(cfg: Config, train: DataFrame, where: str) -> None:
    """Every random effect has at least one entity with ``min_samples`` training rows (with
    min_samples 1 a non-empty train split has one; only larger bounds cost a Spark job)."""
    for i, coord in enumerate(cfg.coordinates):
        if coord.is_fixed_effect or coord.min_samples <= 1:
            continue
        r = train.groupBy(col(coord.entity)).count().agg(F.max("count").alias("most")).first()
        most = r["most"] or 0
        if most < coord.min_samples:
            raise InputError(f"{where}: coordinates[{i}] {coord.name!r}: no entity of column {coord.entity!r} "
                             f"has min_samples={coord.min_samples} training rows (the most is {most}): every "
                             "entity would be passive and the coordinate would train nothing")


def _write(rows: DataFrame, final_url: str) -> int:
    """Write via Spark into a temporary folder, then commit it into place."""
    with storage.atomic_path(final_url) as tmp:
        rows.write.mode("overwrite").parquet(gspark.path(tmp))
        n = storage.parquet_rows(tmp)
    return n


def prepare(cfg: Config, workdir: str, spark) -> dict:
    """Run the stage; returns (and records in the done marker) rows, features, seconds."""
    t0 = time.time()
    kinds.validate(cfg)
    root = layout.prepared_root(workdir)
    storage.remove(storage.marker(root, "prepare"))  # a rerun invalidates the old result first

    d = cfg.data
    clock = timing.Phases()
    train_in = _read(spark, d.train)
    n_in = _check(train_in, cfg, d.train, training=True)
    if d.validation:
        val_in = _read(spark, d.validation)
        n_in += _check(val_in, cfg, d.validation)
        _no_overlap(train_in, val_in, cfg, d)
        splits = {"train": train_in, "validation": val_in}
    else:
        v = in_validation(col(d.columns.uid), d.split_seed, d.validation_fraction)
        splits = {"train": train_in.where(~v), "validation": train_in.where(v)}
    clock.lap("read and check")

    _active_entities(cfg, splits["train"], d.train)
    indexes = feature_indexes(cfg, splits["train"])
    for bag, table in indexes.items():
        storage.write_table(layout.feature_index(workdir, bag), table)

    extra = [c for coord in cfg.coordinates  # learnt from the train split only
             for c in kinds.of(coord).prepared_columns(cfg, coord, workdir, splits["train"])]
    clock.lap("feature indexes")
    rows = {}
    for split, df in splits.items():
        rows[split] = _write(indexed_rows(df, cfg, indexes, extra), layout.prepared(workdir, split))
    if rows["train"] == 0:
        raise InputError(f"{d.train}: the train split is empty")
    if rows["train"] + rows["validation"] != n_in:
        raise RuntimeError(f"prepare: wrote {rows['train']} train + {rows['validation']} validation "
                           f"rows but the input has {n_in}: rows were lost or duplicated")

    clock.lap("index and write rows")
    info = {"rows": rows, "features": {b: t.num_rows for b, t in indexes.items()},
            "seconds": round(time.time() - t0, 3), "phases": clock.seconds}
    storage.mark_done(root, "prepare", info)
    feats = ", ".join(f"{b} {n}" for b, n in info["features"].items())
    phases = ", ".join(f"{k} {v:.1f}s" for k, v in clock.seconds.items())
    print(f"prepare: train {rows['train']} rows, validation {rows['validation']} rows; "
          f"features: {feats}; {info['seconds']:.1f}s ({phases})", flush=True)
    return info

"""The prepare stage: check the input, build feature indexes, index the rows, split.

Reads ``cfg.data.train`` (and ``cfg.data.validation``, or a deterministic hash split of
train) and writes, per DESIGN.md §2 and ``gdmix.schema``:

    prepared/features/<bag>.parquet              index -> (name, term), from TRAIN only
    prepared/{train,validation}/part-*.parquet   uid, label, weight, offset, entity ids,
                                                  [<coordinate>_external,] <bag>_indices, <bag>_values

``<coordinate>_external`` (float64) is an external fixed effect's score column, when its
``external_scores`` names an input column (see ``gdmix.fixed_effect.external``).

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
import pyarrow.compute as pc
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from gdmix import checks, layout, schema, storage, timing
from gdmix import spark as gspark
from gdmix.checks import InputError, col
from gdmix.config import Config, FeatureBag
from gdmix.fixed_effect import external

_SEP = "\x00"  # joins name and term into one lookup key; not expected inside names
_HASH_BUCKETS = 1_000_000_000


def _read(spark, url: str) -> DataFrame:
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

def _columns_bag(bag: FeatureBag) -> tuple[Column, Column]:
    """Plain numeric columns -> (indices, values): feature j is column j of the bag.

    Built with array_remove on a sentinel rather than filter/transform lambdas: those
    run interpreted, this compiles into the stage's generated code. Written as one SQL
    expression per array: building it from Column objects costs several py4j calls per
    column (seconds for a wide bag).
    """
    # Null = absent; the float32 cast comes first so a value that rounds to 0 is dropped too.
    v = [f"CAST({checks.sql_name(c)} AS FLOAT)" for c in bag.columns]
    indices = ", ".join(f"CASE WHEN {x} IS NOT NULL AND {x} != 0 THEN {j} ELSE -1 END" for j, x in enumerate(v))
    values = ", ".join(f"COALESCE({x}, CAST(0 AS FLOAT))" for x in v)
    return (F.expr(f"array_remove(array({indices}), -1)"),
            F.expr(f"array_remove(array({values}), CAST(0 AS FLOAT))"))


def index_ntv(lists: pa.Array, keys: pa.Array) -> pa.StructArray:
    """Index one Arrow batch of a list<struct<name, term, value>> column.

    ``keys`` holds name + _SEP + term for index 0..d-1. Returns struct<indices
    list<int32> ascending, values list<float32>>, duplicates summed, zeros and unknown
    features dropped, a null list read as empty.
    """
    if isinstance(lists, pa.ChunkedArray):
        lists = lists.combine_chunks()
    n = len(lists)
    flat = lists.flatten()  # respects null lists and slicing
    parent = pc.list_parent_indices(lists).to_numpy(zero_copy_only=False)
    fields = {flat.type.field(i).name: i for i in range(flat.type.num_fields)}
    name = pc.struct_field(flat, [fields["name"]])
    term = pc.struct_field(flat, [fields["term"]]) if "term" in fields else pa.nulls(len(flat), pa.string())
    value = pc.struct_field(flat, [fields["value"]]).cast(pa.float64())
    key = pc.binary_join_element_wise(name, pc.fill_null(term, ""), _SEP)
    idx = pc.index_in(key, value_set=keys)
    ok = pc.and_(pc.is_valid(idx), pc.is_valid(value))  # a null struct has null fields
    ok = pc.fill_null(ok, False).to_numpy(zero_copy_only=False)
    rows = parent[ok]
    cols = pc.fill_null(idx, 0).to_numpy(zero_copy_only=False)[ok].astype(np.int64)
    vals = pc.fill_null(value, 0.0).to_numpy(zero_copy_only=False)[ok]
    # Sort by (row, feature) and sum runs of the same (row, feature).
    order = np.lexsort((cols, rows))
    rows, cols, vals = rows[order], cols[order], vals[order]
    if len(rows):
        start = np.flatnonzero(np.r_[True, (rows[1:] != rows[:-1]) | (cols[1:] != cols[:-1])])
        rows, cols, vals = rows[start], cols[start], np.add.reduceat(vals, start)
    vals = vals.astype(np.float32)
    keep = vals != 0
    rows, cols, vals = rows[keep], cols[keep], vals[keep]
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(np.bincount(rows, minlength=n), out=offsets[1:])
    off = pa.array(offsets)
    return pa.StructArray.from_arrays(
        [pa.ListArray.from_arrays(off, pa.array(cols.astype(np.int32))),
         pa.ListArray.from_arrays(off, pa.array(vals, pa.float32()))],
        names=["indices", "values"])


def _ntv_udf(pairs: list[tuple[str, str]]):
    keys = pa.array([n + _SEP + t for n, t in pairs], pa.string())

    @F.arrow_udf("struct<indices: array<int>, values: array<float>>")
    def lookup(lists: pa.Array) -> pa.Array:
        return index_ntv(lists, keys)

    return lookup


def indexed_rows(df: DataFrame, cfg: Config, indexes: dict[str, pa.Table],
                 vocabs: dict[str, list[str]] | None = None) -> DataFrame:
    """The prepared rows of one split (schema documented in ``gdmix.schema``); ``vocabs``
    (text column -> words) adds each text column's ``<column>_tokens`` (``gdmix.deep.text``)."""
    from gdmix.deep import text as deep_text

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
    out += [col(src).cast("double").alias(dst) for src, dst in external.columns(cfg)]
    structs = {}  # bag -> the Arrow UDF's struct column (one per ntv source column)
    for name, bag in cfg.data.feature_bags.items():
        if bag.columns:
            ind, val = _columns_bag(bag)
            out += [ind.alias(schema.bag_indices(name)), val.alias(schema.bag_values(name))]
            continue
        s = f"__ntv_{bag.ntv}"
        if s not in structs.values():  # bags reading one column share one index: look up once
            t = indexes[name]
            udf = _ntv_udf(list(zip(t.column("name").to_pylist(), t.column("term").to_pylist())))
            out.append(udf(col(bag.ntv)).alias(s))
        structs[name] = s
    tokens = [deep_text.tokens_column(c) for c in (vocabs or {})]
    out += [deep_text.token_ids(c, w).alias(t) for (c, w), t in zip((vocabs or {}).items(), tokens)]
    rows = df.select(*out)
    if structs:  # unpack the Arrow UDF's struct (evaluated once, then projected)
        unpack = {schema.bag_indices(b): col(s)["indices"] for b, s in structs.items()}
        unpack.update({schema.bag_values(b): col(s)["values"] for b, s in structs.items()})
        rows = rows.select(*[unpack[c].alias(c) if c in unpack else col(c)
                             for c in _output_order(cfg, cols) + tokens])
    return rows


def _output_order(cfg: Config, cols: checks.InputColumns) -> list[str]:
    names = [schema.UID, schema.LABEL, schema.WEIGHT, schema.OFFSET, *cols.entities]
    names += [dst for _, dst in external.columns(cfg)]
    for b in cfg.data.feature_bags:
        names += [schema.bag_indices(b), schema.bag_values(b)]
    return names


# --- writing -----------------------------------------------------------------------------

def _write(rows: DataFrame, final_url: str) -> int:
    """Write via Spark into a temporary folder, then commit it into place."""
    with storage.atomic_path(final_url) as tmp:
        rows.write.mode("overwrite").parquet(gspark.path(tmp))
        n = storage.parquet_rows(tmp)
    return n


def prepare(cfg: Config, workdir: str, spark) -> dict:
    """Run the stage; returns (and records in the done marker) rows, features, seconds."""
    t0 = time.time()
    root = layout.prepared_root(workdir)
    storage.remove(storage.marker(root, "prepare"))  # a rerun invalidates the old result first

    d = cfg.data
    clock = timing.Phases()
    train_in = _read(spark, d.train)
    n_in = checks.check_input(train_in, cfg, d.train)
    external.check_input(train_in, cfg, d.train)
    if d.validation:
        val_in = _read(spark, d.validation)
        n_in += checks.check_input(val_in, cfg, d.validation)
        external.check_input(val_in, cfg, d.validation)
        splits = {"train": train_in, "validation": val_in}
    else:
        v = in_validation(col(d.columns.uid), d.split_seed, d.validation_fraction)
        splits = {"train": train_in.where(~v), "validation": train_in.where(v)}
    clock.lap("read and check")

    indexes = feature_indexes(cfg, splits["train"])
    for bag, table in indexes.items():
        storage.write_table(layout.feature_index(workdir, bag), table)

    from gdmix.deep import text as deep_text

    vocabs = deep_text.prepare_vocabs(cfg, workdir, splits["train"])  # dnn text towers, from train only
    clock.lap("feature indexes")
    rows = {}
    for split, df in splits.items():
        rows[split] = _write(indexed_rows(df, cfg, indexes, vocabs), layout.prepared(workdir, split))
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

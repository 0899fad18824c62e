"""Input checks, run by ``prepare`` before anything is trained.

Bad input should fail here, with a message a user can act on (the file, the column, the
row index within that file, and the uid), not as a NaN loss three stages later.

Cost: the schema checks are free; every row-level rule is one counter in a single
aggregation pass over the input. Only when a counter is non-zero do we go back and
locate the first offending row, using the Parquet reader's hidden ``_metadata`` columns.

Semantics checked (docs/design.md §4.1):
- required columns exist: uid, label, every random-effect entity column, every feature
  bag's source columns; weight/offset: under their default names used when present, under
  any other configured name required (``input_columns``);
- uid: integer, never null, unique within one input; label: never null, and per ``task``:
  logistic 0 or 1, linear a finite number, poisson a finite count or rate >= 0;
- weight: finite and >= 0; offset: finite (null is an error for both, since the column
  exists the value was meant to be there);
- entity ids: integer or string, never null;
- features: a null plain-column value or a null ntv value means "absent"; NaN, +-Inf or a
  magnitude beyond float32 (features are stored as float32) is an error; an ntv entry
  must have a name;
- the input has at least one row.
"""
from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from gdmix import storage
from gdmix.config import Config

FLOAT32_MAX = 3.4028234663852886e38


class InputError(ValueError):
    """The input data breaks the data contract; the message says where."""


def sql_name(name: str) -> str:
    """A column name quoted for SQL text (dots and odd characters are not struct paths)."""
    return "`" + name.replace("`", "``") + "`"


def col(name: str) -> Column:
    """A column by its exact name (dots and odd characters are not struct paths here)."""
    return F.col(sql_name(name))


@dataclass(frozen=True)
class InputColumns:
    """The input columns one run reads, resolved against one input's schema."""

    uid: str
    label: str
    weight: str | None  # None: absent from this input (or disabled): weight 1
    offset: str | None  # None: absent from this input (or disabled): offset 0
    entities: tuple[str, ...]
    plain: tuple[str, ...]  # numeric feature columns (any bag)
    ntv: tuple[str, ...]  # name-term-value feature columns (any bag)
    task: str = "logistic"  # what a label may be: logistic 0/1, linear finite, poisson finite >= 0


# The documented default names of the optional columns: used when the input has them.
OPTIONAL_DEFAULTS = {"weight": "weight", "offset": "offset"}


def input_columns(cfg: Config, present: list[str], where: str = "the input") -> InputColumns:
    """The columns the run reads from an input with columns ``present``. ``weight`` and
    ``offset`` are read only when configured: under their default names (``weight``,
    ``offset``) when the input has them; under any other configured name they must be
    there (a typo is an error, not an unweighted run); ``null`` turns them off. A column
    cannot be both one of them and a feature."""
    c = cfg.data.columns
    entities = tuple(dict.fromkeys(co.entity for co in cfg.coordinates if co.entity))
    bags = cfg.data.feature_bags.values()
    plain = tuple(dict.fromkeys(x for b in bags if b.columns for x in b.columns))

    def optional(key: str, name: str | None) -> str | None:
        if not name:
            return None
        if name not in present:
            if name == OPTIONAL_DEFAULTS[key]:
                return None
            raise InputError(f"{where}: column {name!r} (data.columns.{key}) is missing "
                             f"(columns present: {', '.join(present) or 'none'})")
        bag = next((b.name for b in bags if b.columns and name in b.columns), None)
        if bag is not None:
            raise InputError(f"{where}: column {name!r} is both the {key} (data.columns.{key}) and a "
                             f"feature of bag {bag!r}: set data.columns.{key}: null to use it as a "
                             f"feature only, or name another column")
        return name

    return InputColumns(
        uid=c.uid,
        label=c.label,
        weight=optional("weight", c.weight),
        offset=optional("offset", c.offset),
        entities=entities,
        plain=plain,
        ntv=tuple(dict.fromkeys(b.ntv for b in bags if b.ntv)),
        task=cfg.task,
    )


def _where(url: str) -> str:
    return url[len("file:"):] if url.startswith("file:") else url


# --- one schema across an input's files ---------------------------------------------------

def _type_key(t: pa.DataType):
    """A type as Parquet readers see it: list item names and nullability do not matter."""
    if pa.types.is_dictionary(t):
        return _type_key(t.value_type)
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return ("list", _type_key(t.value_type))
    if pa.types.is_struct(t):
        return ("struct", tuple((f.name, _type_key(f.type)) for f in t))
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "string"
    return str(t)


def _footer_schema(fs, path: str) -> pa.Schema:
    try:
        with fs.open(path, "rb") as f:
            return pq.read_schema(f)
    except Exception as e:  # noqa: BLE001 - a truncated or non-Parquet file
        raise InputError(f"{_where(path)}: not a readable Parquet file ({type(e).__name__}: {e})") from None


def check_file_schemas(url: str) -> list[str]:
    """Every file of one input has the same columns with the same types (Spark takes one
    file's schema and reads a column missing from another file as null, or fails deep in a
    task on a type that differs). Footers only: one small read per file. Returns the files."""
    fs, _ = storage.filesystem(url)
    files = storage.input_files(url)
    if not files:
        return files
    with ThreadPoolExecutor(max_workers=min(16, len(files))) as pool:
        schemas = list(pool.map(lambda p: _footer_schema(fs, p), files))
    ref_path = files[0]
    ref = {f.name: f.type for f in schemas[0]}
    for path, sch in zip(files[1:], schemas[1:]):
        got = {f.name: f.type for f in sch}
        for name in ref:
            if name not in got:
                raise InputError(f"{_where(path)}: column {name!r} is missing, but {_where(ref_path)} has it: "
                                 f"every file of the input {url} must have the same columns")
        for name in got:
            if name not in ref:
                raise InputError(f"{_where(path)}: column {name!r} is not in {_where(ref_path)}: "
                                 f"every file of the input {url} must have the same columns")
        for name, t in ref.items():
            if _type_key(got[name]) != _type_key(t):
                raise InputError(f"{_where(path)}: column {name!r} is {got[name]}, but {t} in "
                                 f"{_where(ref_path)}: every file of the input {url} must have the same types")
    return files


# --- schema -----------------------------------------------------------------------------

_INTEGRAL = (T.ByteType, T.ShortType, T.IntegerType, T.LongType)
_NUMERIC = (T.NumericType, T.BooleanType)


def _check_schema(df: DataFrame, cols: InputColumns, where: str) -> None:
    fields = {f.name: f.dataType for f in df.schema.fields}
    required = [c for c in (cols.uid, cols.label, *cols.entities, *cols.plain, *cols.ntv) if c]
    for name in required:
        if name not in fields:
            raise InputError(f"{where}: column {name!r} is missing "
                             f"(columns present: {', '.join(fields) or 'none'})")

    def bad_type(name, expected):
        raise InputError(f"{where}: column {name!r} must be {expected}, "
                         f"got {fields[name].simpleString()}")

    if not isinstance(fields[cols.uid], _INTEGRAL):
        bad_type(cols.uid, "an integer (uid)")
    for name in (cols.label, cols.weight, cols.offset, *cols.plain):
        if name and not isinstance(fields[name], _NUMERIC):
            bad_type(name, "numeric")
    for name in cols.entities:
        if not isinstance(fields[name], (*_INTEGRAL, T.StringType)):
            bad_type(name, "an integer or a string (entity id)")
    for name in cols.ntv:
        t = fields[name]
        ok = isinstance(t, T.ArrayType) and isinstance(t.elementType, T.StructType)
        if ok:
            sub = {f.name: f.dataType for f in t.elementType.fields}
            ok = (isinstance(sub.get("name"), T.StringType)
                  and isinstance(sub.get("value"), T.NumericType)
                  and isinstance(sub.get("term", T.StringType()), T.StringType))
        if not ok:
            bad_type(name, "list<struct<name: string, term: string, value: double>>")


# --- row rules --------------------------------------------------------------------------

def _not_finite(c: Column) -> Column:
    d = c.cast("double")
    return F.isnan(d) | (F.abs(d) > F.lit(FLOAT32_MAX))


def _rules(cols: InputColumns, fields: dict) -> list[tuple[str, str, Column, Column]]:
    """(column, problem, condition of an offending row, what to show of it), in report order."""
    rules = [(cols.uid, "uid is null", col(cols.uid).isNull(), F.lit(None))]
    if cols.label:  # None when scoring: new rows need no label
        label = col(cols.label).cast("double")
        if cols.task == "linear":
            bad, problem = label.isNull() | _not_finite(label), "label must be a finite number (task: linear)"
        elif cols.task == "poisson":
            bad = label.isNull() | _not_finite(label) | (label < 0)
            problem = "label must be a finite count or rate >= 0 (task: poisson)"
        else:
            bad, problem = label.isNull() | ~label.isin(0.0, 1.0), "label must be 0 or 1"
        rules.append((cols.label, problem, bad, col(cols.label).cast("string")))
    if cols.weight:
        w = col(cols.weight)
        rules.append((cols.weight, "weight is null, NaN or infinite",
                      w.isNull() | _not_finite(w), w.cast("string")))
        rules.append((cols.weight, "weight is negative", w.cast("double") < 0, w.cast("string")))
    if cols.offset:
        o = col(cols.offset)
        rules.append((cols.offset, "offset is null, NaN or infinite",
                      o.isNull() | _not_finite(o), o.cast("string")))
    for e in cols.entities:
        rules.append((e, "entity id is null", col(e).isNull(), F.lit(None)))
    for p in cols.plain:
        # Null means "absent" and is fine; NaN/Inf cannot be stored or trained on. SQL text:
        # one py4j call per column instead of ten (a bag may have hundreds of columns).
        d = f"CAST({sql_name(p)} AS DOUBLE)"
        rules.append((p, "feature value is NaN, infinite or beyond float32 range",
                      F.expr(f"COALESCE(isnan({d}) OR abs({d}) > {FLOAT32_MAX!r}, false)"),
                      F.expr(f"CAST({sql_name(p)} AS STRING)")))
    for n in cols.ntv:
        has_term = "term" in {f.name for f in fields[n].elementType.fields}

        def bad_value(x):
            return F.coalesce(x.isNotNull() & _not_finite(x["value"]), F.lit(False))

        def no_name(x):
            return x.isNotNull() & x["name"].isNull()

        def show(pred):
            first = F.filter(col(n), pred)[0]
            term = first["term"] if has_term else F.lit("")
            return F.concat_ws("", F.lit("(name="), first["name"], F.lit(", term="), term,
                               F.lit(", value="), first["value"].cast("string"), F.lit(")"))

        # array_max/min over the values compile to generated code (a lambda would run
        # interpreted); Spark orders NaN above every number, so NaN shows up as a max.
        values = col(n)["value"].cast("array<double>")
        out_of_range = (F.array_max(values) > F.lit(FLOAT32_MAX)) | (F.array_min(values) < F.lit(-FLOAT32_MAX))
        rules.append((n, "feature value is NaN, infinite or beyond float32 range",
                      F.coalesce(out_of_range, F.lit(False)), show(bad_value)))
        rules.append((n, "feature name is null",
                      F.coalesce(F.exists(col(n), no_name), F.lit(False)), show(no_name)))
    return rules


def _locate(df: DataFrame, cond: Column, cols: InputColumns, shown: Column):
    """The first offending row: (file, row index within the file, uid, shown value)."""
    return (df.where(cond)
            .select(F.col("_metadata.file_path").alias("f"), F.col("_metadata.row_index").alias("r"),
                    col(cols.uid).alias("u"), shown.alias("v"))
            .orderBy("f", "r").first())


def check_input(df: DataFrame, cfg: Config, where: str, scoring: bool = False, training: bool = False) -> int:
    """Check one input (a DataFrame read straight from Parquet, so ``_metadata`` works).

    ``where`` names the input in messages when no single file is to blame. Returns the
    number of rows; raises ``InputError`` on the first problem found. ``scoring``: rows
    to score (``gdmix score``), which need no label; every other rule holds for them too.
    ``training``: the train input, which must also hold both labels with positive weight.
    """
    cols = input_columns(cfg, df.columns, where)
    if scoring:
        cols = dataclasses.replace(cols, label=None, weight=None)
    _check_schema(df, cols, where)
    fields = {f.name: f.dataType for f in df.schema.fields}
    rules = _rules(cols, fields)

    aggs = [F.count(F.lit(1)).alias("rows"), F.count(col(cols.uid)).alias("uids"),
            F.count_distinct(col(cols.uid)).alias("distinct_uids")]
    aggs += [F.count_if(cond).alias(f"r{i}") for i, (_, _, cond, _) in enumerate(rules)]
    if training:  # the weight of each class, in the same pass
        w = col(cols.weight).cast("double") if cols.weight else F.lit(1.0)
        y = col(cols.label).cast("double")
        aggs += [F.sum(w * y).alias("w_pos"), F.sum(w * (F.lit(1.0) - y)).alias("w_neg"),
                 F.count_if(y == 1.0).alias("n_pos")]
    stats = df.agg(*aggs).first()

    if stats["rows"] == 0:
        raise InputError(f"{where}: the input has no rows")
    for i, (name, problem, cond, shown) in enumerate(rules):
        n_bad = stats[f"r{i}"]
        if n_bad:
            row = _locate(df, cond, cols, shown)
            value = f", got {row['v']}" if row["v"] is not None else ""
            uid = f" (uid {row['u']})" if row["u"] is not None else ""
            raise InputError(f"{_where(row['f'])}: row {row['r']}{uid}: column {name!r}: "
                             f"{problem}{value} ({n_bad} row{'s' if n_bad > 1 else ''} affected)")
    if stats["distinct_uids"] != stats["uids"]:
        _duplicate_uid(df, cols, stats["uids"] - stats["distinct_uids"])
    if training:
        _check_classes(stats, cols, where)
    return stats["rows"]


def _check_classes(stats, cols: InputColumns, where: str) -> None:
    """Both labels with positive total weight: else there is nothing to learn (an
    unpenalised intercept runs off towards ±infinity, a zero weight trains nothing)."""
    w_pos, w_neg, n = stats["w_pos"] or 0.0, stats["w_neg"] or 0.0, stats["rows"]
    weight = f" (column {cols.weight!r})" if cols.weight else ""
    if w_pos + w_neg <= 0.0:
        raise InputError(f"{where}: the total weight{weight} of the {n} training rows is 0: nothing to train on")
    if cols.task != "logistic":  # a regression has no classes: any labels are something to fit
        return
    if w_pos <= 0.0 or w_neg <= 0.0:
        only = 0 if w_pos <= 0.0 else 1
        detail = (f"all {n} rows have label {only}" if stats["n_pos"] in (0, n)
                  else f"the rows of label {1 - only} have weight 0")
        raise InputError(f"{where}: column {cols.label!r}: one class only ({detail}): a logistic model "
                         "needs rows of both labels with positive weight")


def _duplicate_uid(df: DataFrame, cols: InputColumns, n_extra: int) -> None:
    uid = col(cols.uid)
    dup = (df.groupBy(uid.alias("u")).count().where(F.col("count") > 1)
           .orderBy("u").first()["u"])
    rows = (df.where(uid == F.lit(dup))
            .select(F.col("_metadata.file_path").alias("f"), F.col("_metadata.row_index").alias("r"))
            .orderBy("f", "r").limit(2).collect())
    where = " and ".join(f"{_where(r['f'])} row {r['r']}" for r in rows)
    raise InputError(f"column {cols.uid!r}: duplicate uid {dup}: {where} "
                     f"({n_extra} duplicate row{'s' if n_extra > 1 else ''} in all)")

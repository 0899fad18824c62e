"""A fixed effect scored by the user's own model (``model: external``).

The model's term f(x_i; β) of docs/design.md §1 is replaced by a given score e_i, so

    s_i = o_i + e_i + Σ_c z_{c,i}·α_{c,e_c(i)}

and only the random effects are trained: e_i enters their offsets exactly as a linear
fixed effect's score does. There is no β, hence no penalty term for this coordinate.

``external_scores`` is either
- an input column name (a plain name: no ``/``, no ``:``, not ending in ``.parquet``):
  ``prepare`` checks it like the offset (numeric, never null, NaN or infinite) and
  carries it into the prepared rows as ``<coordinate>_external`` float64; or
- a Parquet file or folder of ``(uid, score)``: joined on uid here; every prepared row
  (train and validation) must have exactly one score, or the step fails naming the file.

The "train" step writes the scores (``schema.SCORES``) of both splits and an empty
coefficients table (no rows), so ``plan.state``, metrics (penalty 0) and ``models.export``
(an empty model) work unchanged. Scoring new data (``models.score``) reads the same
column from the new data, or joins the same Parquet file by uid: point the config at the
new data's scores.
"""
from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gdmix import layout, ntv, plan, schema, storage
from gdmix.config import FIXED_EFFECT, Config, ConfigError, Coordinate
from gdmix.kinds.base import Kind, Partitioning, TrainContext

STAGE = "train"


def is_file(value: str) -> bool:
    """Whether ``external_scores`` names a Parquet of (uid, score) rather than a column."""
    return "/" in value or ":" in value or value.endswith(".parquet")


def prepared_column(coord: Coordinate) -> str:
    """The prepared rows' column holding an external fixed effect's input-column scores."""
    return f"{coord.name}_external"


def check_input(df, coord: Coordinate, uid_column: str, where: str) -> None:
    """An external score column exists, is numeric, and every value is finite (one pass)."""
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    from gdmix.checks import InputError, col

    src = coord.external_scores
    fields = {f.name: f.dataType for f in df.schema.fields}
    if src not in fields:
        raise InputError(f"{where}: column {src!r} (external_scores of {coord.name}) is missing")
    if not isinstance(fields[src], (T.NumericType, T.BooleanType)):
        raise InputError(f"{where}: column {src!r} (external_scores) must be numeric, "
                         f"got {fields[src].simpleString()}")
    d = col(src).cast("double")
    bad = d.isNull() | F.isnan(d) | (F.abs(d) == float("inf"))
    n_bad = df.agg(F.count_if(bad).alias("b")).first()["b"]
    if n_bad:
        row = df.where(bad).select(col(uid_column).alias("u"), col(src).cast("string").alias("v")).first()
        raise InputError(f"{where}: column {src!r} (external_scores): score is null, NaN or infinite "
                         f"(uid {row['u']}, got {row['v']}; {n_bad} rows affected)")


def _from_file(url: str, uid: pa.Array) -> np.ndarray:
    """Each uid's score from a Parquet of (uid, score); every uid must have exactly one."""
    try:
        t = storage.read_table(url, columns=[schema.UID, schema.SCORE])
    except (FileNotFoundError, KeyError, pa.ArrowInvalid) as e:
        raise ValueError(f"{url}: cannot read external fixed-effect scores (uid, score): {e}") from None
    ids = t.column(schema.UID).cast(pa.int64()).combine_chunks()
    if len(pc.unique(ids)) != len(ids):
        raise ValueError(f"{url}: external scores have duplicate uids")
    pos = pc.index_in(uid, value_set=ids)
    if pos.null_count:
        missing = uid.filter(pc.is_null(pos)).slice(0, 5).to_pylist()
        raise ValueError(f"{url}: external scores have no score for {pos.null_count} input uid(s), "
                         f"e.g. {missing}: every row must have one")
    score = t.column(schema.SCORE).cast(pa.float64()).combine_chunks().take(pos).to_numpy(zero_copy_only=False)
    if not np.all(np.isfinite(score)):
        raise ValueError(f"{url}: external scores must be finite (NaN or infinite values found)")
    return score


def _train(cfg: Config, workdir: str, step: plan.Step) -> dict:
    """Write the external fixed effect's scores and an empty coefficients table."""
    t0 = time.time()
    coord = cfg.coordinate(step.coordinate)
    k, c = step.iteration, step.coordinate
    rows = {}
    for split in layout.SPLITS:
        src = coord.external_scores
        cols = [schema.UID] if is_file(src) else [schema.UID, prepared_column(coord)]
        t = storage.read_table(layout.prepared(workdir, split), columns=cols)
        uid = t.column(schema.UID).cast(pa.int64()).combine_chunks()
        if is_file(src):
            score = _from_file(src, uid)
        else:
            score = t.column(prepared_column(coord)).to_numpy().astype(np.float64)
        url = layout.scores(workdir, k, c, c, split)
        with storage.atomic_path(url) as tmp:
            storage.write_table(storage.join(tmp, "part-00000.parquet"),
                           pa.table({schema.UID: uid, schema.SCORE: pa.array(score, pa.float64())},
                                    schema=schema.SCORES))
        rows[split] = len(uid)
    url = layout.coefficients(workdir, k, c, c)
    with storage.atomic_path(url) as tmp:
        storage.write_table(storage.join(tmp, "part-00000.parquet"), schema.COEFFICIENTS.empty_table())
    info = {"rows": rows, "model": "external", "source": coord.external_scores, "objective_penalty": 0.0,
            "seconds": round(time.time() - t0, 3)}
    storage.mark_done(layout.step_dir(workdir, k, c), STAGE, info)
    return info


def score_frame(spark, coord: Coordinate, raw, uid_col: str):
    """(uid, ``<coordinate>_score``) of new raw data: its score column, or the Parquet joined by uid."""
    from pyspark.sql import functions as F

    from gdmix import spark as gspark
    from gdmix.checks import col

    name = f"{coord.name}_score"
    uid = col(uid_col).cast("long").alias(schema.UID)
    if not is_file(coord.external_scores):
        return raw.select(uid, col(coord.external_scores).cast("double").alias(name))
    scores = spark.read.parquet(gspark.path(coord.external_scores)).select(
        F.col(schema.UID).cast("long").alias(schema.UID), F.col(schema.SCORE).cast("double").alias(name))
    joined = raw.select(uid).join(scores, schema.UID, "left")
    missing = joined.where(F.col(name).isNull()).limit(5).collect()
    if missing:
        raise ValueError(f"{coord.external_scores}: external scores have no score for uid(s) "
                         f"{[r[schema.UID] for r in missing]} of the data being scored")
    return joined


def score_rows(coord: Coordinate, rows: pa.Table, uid_column: str) -> np.ndarray:
    """In memory, of raw rows (an Arrow table): the score column, or the Parquet of
    (uid, score) looked up by uid; every row must have one."""
    if not is_file(coord.external_scores):
        return rows.column(coord.external_scores).cast(pa.float64()).to_numpy(zero_copy_only=False)
    uid = rows.column(uid_column).cast(pa.int64()).combine_chunks()
    return _from_file(coord.external_scores, uid)


class External(Kind):
    name = "external"
    type = FIXED_EFFECT
    selector = ("external",)

    def validate(self, cfg, coord, path):
        if not coord.external_scores:
            raise ConfigError(f"{path}.external_scores: required with model: external "
                              "(an input column or a Parquet of uid, score)")

    def check_input(self, df, cfg, coord, where):
        if not is_file(coord.external_scores):
            check_input(df, coord, cfg.data.columns.uid, where)

    def prepared_columns(self, cfg, coord, workdir, train_df):
        from gdmix.checks import col

        if is_file(coord.external_scores):
            return []
        return [(prepared_column(coord), col(coord.external_scores).cast("double"))]

    def partitioning(self, coord):
        return Partitioning(by="uid", shards=1, entity_column=False)

    def train(self, cfg, workdir, step, ctx: TrainContext) -> dict:
        return _train(cfg, workdir, step)

    def export(self, cfg, workdir, coord, step) -> str:
        # No coefficients: the exported model is empty (scores come from the user).
        return ntv.write_model(layout.model(workdir, coord.name), schema.MODEL.empty_table())

    def score_frame(self, spark, cfg, coord, workdir, raw):
        return score_frame(spark, coord, raw, cfg.data.columns.uid)

    def in_memory_scorer(self, cfg, coord, models_url):
        uid_column = cfg.data.columns.uid
        return lambda rows: score_rows(coord, rows, uid_column)


KIND = External()

"""Final models as name-term-value records, and scoring new data with them.

A model row is ``model_id`` (``global`` for the fixed effect, the entity id otherwise),
``means`` and ``variances`` as ``list<struct<name, term, value>>``; the intercept is
``(INTERCEPT)`` with term ``""``. Internally stages keep coefficients by feature index
(``schema.COEFFICIENTS``); ``export`` translates them with the feature index once, at the
end. Scoring reads raw input (names and terms, not indices), so a saved model scores any
Parquet file with the bags' columns: an entity with no model contributes 0. An external
fixed effect (``model: external``) exports an empty model; scoring takes its score from
the data's ``external_scores`` column, or joins its Parquet of (uid, score) by uid.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from gdmix import layout, plan, schema, storage
from gdmix import spark as gspark
from gdmix.config import Config, FeatureBag


def _ntv_lists(offsets: np.ndarray, names: pa.Array, terms: pa.Array, values: np.ndarray) -> pa.Array:
    items = pa.StructArray.from_arrays([names, terms, pa.array(values, pa.float64())], ["name", "term", "value"])
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), items)


def to_ntv(coefficients: pa.Table, feature_index: pa.Table) -> pa.Table:
    """Coefficients by feature index → one name-term-value model per row (vectorised)."""
    n = coefficients.num_rows
    idx = coefficients.column(schema.INDICES).combine_chunks()
    val = coefficients.column(schema.VALUES).combine_chunks()
    old = idx.offsets.to_numpy().astype(np.int64)
    flat_idx = idx.values.to_numpy()[old[0]:old[-1]]
    flat_val = val.values.to_numpy()[old[0]:old[-1]]
    old = old - old[0]
    new = old + np.arange(n + 1)  # one more entry per model: the intercept, first
    heads = new[:-1]
    is_feature = np.ones(new[-1], dtype=bool)
    is_feature[heads] = False
    order = feature_index.sort_by("index")
    if not np.array_equal(order.column("index").to_numpy(), np.arange(order.num_rows)):
        raise ValueError("feature index is not a dense range 0..d-1")
    names = np.empty(new[-1], dtype=object)
    terms = np.empty(new[-1], dtype=object)
    names[heads], terms[heads] = schema.INTERCEPT_NAME, schema.INTERCEPT_TERM
    names[is_feature] = order.column("name").to_numpy(zero_copy_only=False)[flat_idx]
    terms[is_feature] = order.column("term").to_numpy(zero_copy_only=False)[flat_idx]
    values = np.empty(new[-1])
    values[heads] = coefficients.column(schema.INTERCEPT).to_numpy()
    values[is_feature] = flat_val
    means = _ntv_lists(new, pa.array(names, pa.string()), pa.array(terms, pa.string()), values)
    return pa.table({
        schema.MODEL_ID: coefficients.column(schema.MODEL_ID),
        "means": means,
        "variances": pa.nulls(n, schema.NTV),
    }, schema=schema.MODEL)


def export(cfg: Config, workdir: str) -> dict[str, str]:
    """Write ``models/<coordinate>/`` from each coordinate's latest coefficients."""
    out = {}
    for coord, s in plan.state(cfg, None).items():
        c = cfg.coordinate(coord)
        if c.model == "dnn":  # the Keras model and its vocabulary, not name-term-value records
            from gdmix.deep import scoring as dnn_scoring

            out[coord] = dnn_scoring.export(workdir, s.iteration, s.coordinate, coord)
            continue
        coefs = storage.read_table(layout.coefficients(workdir, s.iteration, s.coordinate, coord),
                              schema=schema.COEFFICIENTS)
        fidx = storage.read_table(layout.feature_index(workdir, c.feature_bag))
        url = layout.model(workdir, coord)
        # An external fixed effect has no coefficients: its model is empty (scores come from the user).
        table = schema.MODEL.empty_table() if c.model == "external" else to_ntv(coefs, fidx)
        with storage.atomic_path(url) as tmp:
            storage.write_table(storage.join(tmp, "part-00000.parquet"), table)
        out[coord] = url
    return out


# --- scoring new data (Spark) ----------------------------------------------------------

def bag_long(df, bag: FeatureBag, keys: list[str]):
    """A bag as long rows ``(*keys, name, term, value)``; values rounded through float32
    exactly as ``prepare`` stores them, nulls and zeros dropped, duplicates summed."""
    from pyspark.sql import functions as F

    if bag.ntv:
        long = df.select(*keys, F.explode(F.col(bag.ntv)).alias("f")).select(
            *keys, F.col("f.name").alias("name"), F.coalesce(F.col("f.term"), F.lit("")).alias("term"),
            F.col("f.value").alias("value"))
    else:
        items = [F.struct(F.lit(c).alias("name"), F.lit("").alias("term"),
                          F.col(c).cast("double").alias("value")) for c in bag.columns]
        long = df.select(*keys, F.explode(F.array(*items)).alias("f")).select(*keys, "f.name", "f.term", "f.value")
    long = long.where(F.col("value").isNotNull()).withColumn(
        "value", F.col("value").cast("float").cast("double"))
    long = long.groupBy(*keys, "name", "term").agg(F.sum("value").alias("value"))
    return long.where(F.col("value") != 0.0)


def _model_long(spark, url: str):
    from pyspark.sql import functions as F

    models = spark.read.parquet(gspark.path(url))
    return models.select(schema.MODEL_ID, F.explode("means").alias("m")).select(
        schema.MODEL_ID, F.col("m.name").alias("name"), F.col("m.term").alias("term"),
        F.col("m.value").alias("coef"))


def score(cfg: Config, workdir: str, data: str, out: str, spark) -> dict:
    """Score raw Parquet rows with ``models/``: ``uid``, ``score`` (offset + every
    coordinate) and ``<coordinate>_score`` columns, written to ``out``."""
    from pyspark.sql import functions as F

    cols = cfg.data.columns
    raw = spark.read.parquet(gspark.path(data))
    present = set(raw.columns)
    offset = F.col(cols.offset).cast("double") if cols.offset and cols.offset in present else F.lit(0.0)
    entity_cols = [c.entity for c in cfg.coordinates if not c.is_fixed_effect]
    base = raw.select(F.col(cols.uid).cast("long").alias(schema.UID), offset.alias(schema.OFFSET),
                      *[F.col(e).cast("string").alias(e) for e in entity_cols])
    result = base
    total = F.col(schema.OFFSET)
    for coord in cfg.coordinates:
        url = layout.model(workdir, coord.name)
        if not storage.exists(url):
            raise FileNotFoundError(f"{url}: no saved model for coordinate {coord.name!r}; train first")
        if coord.model == "external":  # the user's score column, or their Parquet joined by uid
            from gdmix.fixed_effect import external

            result = result.join(external.score_frame(spark, coord, raw, cols.uid), schema.UID, "left")
            total = total + F.col(f"`{coord.name}_score`")
            continue
        if coord.model == "dnn":  # the Keras model over the row's bag and text, indexed as prepare does
            from gdmix.deep import scoring as dnn_scoring

            result = result.join(dnn_scoring.score_frame(spark, cfg, coord, workdir, raw, cols.uid), schema.UID, "left")
            total = total + F.col(f"`{coord.name}_score`")
            continue
        model = _model_long(spark, url)
        key = [] if coord.is_fixed_effect else [coord.entity]
        feats = raw.select(F.col(cols.uid).cast("long").alias(schema.UID),
                           *[F.col(e).cast("string").alias(e) for e in key], *_bag_columns(cfg.bag(coord.feature_bag)))
        long = bag_long(feats, cfg.bag(coord.feature_bag), [schema.UID, *key])
        intercepts = model.where(F.col("name") == schema.INTERCEPT_NAME).select(
            schema.MODEL_ID, F.col("coef").alias("_b"))
        slopes = model.where(F.col("name") != schema.INTERCEPT_NAME)
        if coord.is_fixed_effect:
            long = long.withColumn(schema.MODEL_ID, F.lit(schema.FIXED_EFFECT_MODEL_ID))
            rows = base.select(schema.UID).withColumn(schema.MODEL_ID, F.lit(schema.FIXED_EFFECT_MODEL_ID))
        else:
            long = long.withColumnRenamed(coord.entity, schema.MODEL_ID)
            rows = base.select(schema.UID, F.col(coord.entity).alias(schema.MODEL_ID))
        dots = long.join(slopes, [schema.MODEL_ID, "name", "term"]).groupBy(schema.UID).agg(
            F.sum(F.col("value") * F.col("coef")).alias("_dot"))
        name = f"{coord.name}_score"
        part = (rows.join(intercepts, schema.MODEL_ID, "left").join(dots, schema.UID, "left")
                .select(schema.UID, (F.coalesce("_b", F.lit(0.0)) + F.coalesce("_dot", F.lit(0.0))).alias(name)))
        result = result.join(part, schema.UID, "left")
        total = total + F.col(name)
    result = result.select(schema.UID, total.alias(schema.SCORE),
                           *[F.col(f"`{c.name}_score`") for c in cfg.coordinates])
    n_in = raw.count()
    with storage.atomic_path(out) as tmp:
        result.write.parquet(gspark.path(tmp))
        n_out = spark.read.parquet(gspark.path(tmp)).count()
    if n_out != n_in:
        raise RuntimeError(f"score: {data} has {n_in} rows but {n_out} scores were written")
    return {"rows": n_out, "out": out}


def _bag_columns(bag: FeatureBag):
    from pyspark.sql import functions as F

    return [F.col(c) for c in bag.source]

"""Name-term-value models: the exported format, and scoring raw rows with it (Spark).

A model row is ``model_id`` (``global`` for a fixed effect, the entity id otherwise),
``means`` and ``variances`` as ``list<struct<name, term, value>>``; the intercept is
``(INTERCEPT)`` with term ``""``. Stages keep coefficients by feature index
(``schema.COEFFICIENTS``); ``to_ntv`` translates them with the bag's feature index once,
at export, with the coefficients' variances (``variance: simple | full``) as ``variances``
under the same (name, term) as ``means`` (null when not computed). With a ``prior`` or
``warm_start``, an entity that has no model tonight but one in those models keeps it,
copied as published, and the table gains a boolean ``carried_over`` column
(``schema.MODEL_WITH_CARRIED``; false for tonight's models). Scoring reads raw input (names and terms, not indices), so a saved model
scores any Parquet file with the bag's columns: an entity with no model contributes 0.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from gdmix import layout, schema, storage
from gdmix import spark as gspark
from gdmix.config import Config, Coordinate, FeatureBag
from gdmix.plan import Step


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
    names, terms = pa.array(names, pa.string()), pa.array(terms, pa.string())
    means = _ntv_lists(new, names, terms, values)
    variances = pa.nulls(n, schema.NTV)
    if (schema.VARIANCES in coefficients.column_names and n
            and coefficients.column(schema.INTERCEPT_VARIANCE).null_count == 0):
        var = coefficients.column(schema.VARIANCES).combine_chunks()
        flat_var = var.values.to_numpy(zero_copy_only=False)[var.offsets.to_numpy()[0]:var.offsets.to_numpy()[-1]]
        v = np.empty(new[-1])
        v[heads] = coefficients.column(schema.INTERCEPT_VARIANCE).to_numpy()
        v[is_feature] = flat_var
        variances = _ntv_lists(new, names, terms, v)
    return pa.table({
        schema.MODEL_ID: coefficients.column(schema.MODEL_ID),
        "means": means,
        "variances": variances,
    }, schema=schema.MODEL)


def write_model(url: str, table: pa.Table) -> str:
    """Commit a model table as ``url/part-00000.parquet``."""
    with storage.atomic_path(url) as tmp:
        storage.write_table(storage.join(tmp, "part-00000.parquet"), table)
    return url


def carried_over(cfg: Config, coord: Coordinate, models: pa.Table) -> pa.Table:
    """``models`` plus, with a ``prior`` (else a ``warm_start``), the published models of
    entities that have none in ``models``, as published, flagged ``carried_over``."""
    tonight = models.append_column(schema.CARRIED_OVER, pa.array([False] * models.num_rows, pa.bool_()))
    url = cfg.prior.models if cfg.prior else cfg.warm_start
    folder = storage.join(url, coord.name)
    if coord.is_fixed_effect or not storage.exists(folder) or not storage.parquet_files(folder):
        return tonight.cast(schema.MODEL_WITH_CARRIED)
    published = storage.read_table(folder, schema=schema.MODEL).select(schema.MODEL.names)
    import pyarrow.compute as pc

    ids = published.column(schema.MODEL_ID).combine_chunks()
    keep = pc.invert(pc.is_in(ids, value_set=models.column(schema.MODEL_ID).combine_chunks()))
    kept = published.filter(keep)
    kept = kept.append_column(schema.CARRIED_OVER, pa.array([True] * kept.num_rows, pa.bool_()))
    return pa.concat_tables([tonight.cast(schema.MODEL_WITH_CARRIED), kept.cast(schema.MODEL_WITH_CARRIED)])


def export(cfg: Config, workdir: str, coord: Coordinate, step: Step) -> str:
    """``models/<coordinate>/`` from the coefficients ``step`` wrote for ``coord`` (with
    ``prior`` or ``warm_start``: and the entities carried over, ``carried_over``)."""
    coefs = storage.read_table(layout.coefficients(workdir, step.iteration, step.coordinate, coord.name),
                               schema=schema.COEFFICIENTS_WITH_VARIANCES)
    fidx = storage.read_table(layout.feature_index(workdir, coord.feature_bag))
    table = to_ntv(coefs, fidx)
    if cfg.prior is not None or cfg.warm_start:
        table = carried_over(cfg, coord, table)
    return write_model(layout.model(workdir, coord.name), table)


# --- scoring raw rows (Spark) ----------------------------------------------------------

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


def _bag_columns(bag: FeatureBag):
    from pyspark.sql import functions as F

    return [F.col(c) for c in bag.source]


def score_frame(spark, cfg: Config, coord: Coordinate, workdir: str, raw):
    """(uid, ``<coordinate>_score``) of raw rows: intercept + the dot product of the row's
    bag with its model (the fixed effect's ``global`` model, or the row's entity's)."""
    from pyspark.sql import functions as F

    uid_col = cfg.data.columns.uid
    entity = None if coord.is_fixed_effect else coord.entity
    model = _model_long(spark, layout.model(workdir, coord.name))
    bag = cfg.bag(coord.feature_bag)
    key = [entity] if entity else []
    feats = raw.select(F.col(uid_col).cast("long").alias(schema.UID),
                       *[F.col(e).cast("string").alias(e) for e in key], *_bag_columns(bag))
    long = bag_long(feats, bag, [schema.UID, *key])
    intercepts = model.where(F.col("name") == schema.INTERCEPT_NAME).select(schema.MODEL_ID, F.col("coef").alias("_b"))
    slopes = model.where(F.col("name") != schema.INTERCEPT_NAME)
    if entity:
        long = long.withColumnRenamed(entity, schema.MODEL_ID)
        rows = raw.select(F.col(uid_col).cast("long").alias(schema.UID), F.col(entity).cast("string").alias(schema.MODEL_ID))
    else:
        long = long.withColumn(schema.MODEL_ID, F.lit(schema.FIXED_EFFECT_MODEL_ID))
        rows = raw.select(F.col(uid_col).cast("long").alias(schema.UID)).withColumn(
            schema.MODEL_ID, F.lit(schema.FIXED_EFFECT_MODEL_ID))
    dots = long.join(slopes, [schema.MODEL_ID, "name", "term"]).groupBy(schema.UID).agg(
        F.sum(F.col("value") * F.col("coef")).alias("_dot"))
    return (rows.join(intercepts, schema.MODEL_ID, "left").join(dots, schema.UID, "left")
            .select(schema.UID, (F.coalesce("_b", F.lit(0.0)) + F.coalesce("_dot", F.lit(0.0))).alias(f"{coord.name}_score")))

"""The final models of a run, and scoring new data with them.

``export`` writes ``models/<coordinate>/`` for every trained coordinate from the step
holding its latest model, or with ``select: {metric: m}`` its model as it stood after the
step best on m (``gdmix.metrics.select``: all coordinates' coefficients of that moment; a
random effect not trained by then exports an empty model, which scores every row 0);
``score`` adds every coordinate's score of raw rows (each kind scores its own: a
name-term-value model, a Keras model, the user's own scores). The name-term-value format
is described in ``gdmix.ntv``.
"""
from __future__ import annotations

from gdmix import kinds, layout, ntv, plan, schema, storage
from gdmix import spark as gspark
from gdmix.config import Config


def export(cfg: Config, workdir: str) -> dict[str, str]:
    """Write ``models/<coordinate>/`` from each coordinate's latest step, or with ``select``
    from the step holding its model after the selected step."""
    from gdmix.metrics import selected_step

    best = selected_step(cfg, workdir) if cfg.select else None
    state = plan.state(cfg, best, inclusive=True) if best is not None else plan.state(cfg, None)
    if best is not None:
        print(f"models: exporting the models after {best} (best validation {cfg.select})", flush=True)
    out = {}
    for name, step in state.items():
        coord = cfg.coordinate(name)
        out[name] = kinds.of(coord).export(cfg, workdir, coord, step)
    if best is not None:  # random effects not trained by the selected step: no entity has a model
        for coord in cfg.coordinates:
            if coord.name not in state and not coord.is_fixed_effect:
                out[coord.name] = ntv.write_model(layout.model(workdir, coord.name), schema.MODEL.empty_table())
    return out


def score_column(coordinate: str) -> str:
    """The output column of one coordinate's score: ``<coordinate>_score``, hyphens as
    underscores (a plain identifier in SQL and pandas)."""
    return f"{coordinate.replace('-', '_')}_score"


def unseen_column(coordinate: str) -> str:
    """A random effect's output column: true where the row's entity has no model."""
    return f"{coordinate.replace('-', '_')}_unseen"


def mean_column(task: str) -> str:
    """The scores' mean-response column: ``probability`` (logistic) or ``prediction``."""
    return "probability" if task == "logistic" else "prediction"


def score(cfg: Config, workdir: str, data: str, out: str, spark) -> dict:
    """Score raw Parquet rows with ``models/``: ``uid``, ``score`` (the linear predictor:
    offset + every coordinate; log-odds for the logistic task), the mean response —
    ``probability`` σ(score) for the logistic task, ``prediction`` (score itself, linear;
    e^score, poisson) for the others — per coordinate ``<coordinate>_score`` and per
    random effect ``<coordinate>_unseen``, written to ``out``.

    The rows are checked first as prepare checks its input, less the label and weight
    (``checks.check_input(scoring=True)``): one schema across the files, every column the
    models read present, no null or duplicate uid, no null entity id, no NaN or infinite
    feature or offset; an error names the file, the column and the row."""
    from pyspark.sql import functions as F

    from gdmix import task_metrics
    from gdmix.checks import InputError, check_file_schemas, check_input

    for coord in cfg.coordinates:  # before Spark reads anything
        url = layout.model(workdir, coord.name)
        if not storage.exists(url):
            raise FileNotFoundError(f"{url}: no saved model for coordinate {coord.name!r}; train first")
    check_file_schemas(data)
    try:
        raw = spark.read.parquet(gspark.path(data))
    except Exception as e:  # noqa: BLE001 - Spark's AnalysisException for no input
        if "PATH_NOT_FOUND" in str(e) or "UNABLE_TO_INFER_SCHEMA" in str(e):
            raise InputError(f"{data}: no Parquet input found there") from None
        raise
    n_in = check_input(raw, cfg, data, scoring=True)
    cols = cfg.data.columns
    present = set(raw.columns)
    offset = F.col(cols.offset).cast("double") if cols.offset and cols.offset in present else F.lit(0.0)
    result = raw.select(F.col(cols.uid).cast("long").alias(schema.UID), offset.alias(schema.OFFSET))
    total = F.col(schema.OFFSET)
    outputs = []
    for coord in cfg.coordinates:
        part = kinds.of(coord).score_frame(spark, cfg, coord, workdir, raw)
        name = score_column(coord.name)
        part = part.withColumnRenamed(f"{coord.name}_score", name)
        result = result.join(part, schema.UID, "left")
        total = total + F.col(name)
        outputs.append(F.col(name))
        if not coord.is_fixed_effect:  # which rows' entity has no model (scored 0 by it)
            ids = (spark.read.parquet(gspark.path(layout.model(workdir, coord.name)))
                   .select(F.col(schema.MODEL_ID).alias("_model")).distinct())
            seen = (raw.select(F.col(cols.uid).cast("long").alias(schema.UID),
                               F.col(coord.entity).cast("string").alias("_entity"))
                    .join(ids, F.col("_entity") == F.col("_model"), "left")
                    .select(schema.UID, F.col("_model").isNull().alias(unseen_column(coord.name))))
            result = result.join(seen, schema.UID, "left")
            outputs.append(F.col(unseen_column(coord.name)))
    result = result.select(schema.UID, total.alias(schema.SCORE),
                           task_metrics.mean_col(cfg.task, total).alias(mean_column(cfg.task)), *outputs)
    with storage.atomic_path(out) as tmp:
        result.write.parquet(gspark.path(tmp))
        n_out = storage.parquet_rows(tmp)
    if n_out != n_in:
        raise RuntimeError(f"score: {data} has {n_in} rows but {n_out} scores were written")
    return {"rows": n_out, "out": out}

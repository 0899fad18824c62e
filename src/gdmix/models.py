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


def score(cfg: Config, workdir: str, data: str, out: str, spark) -> dict:
    """Score raw Parquet rows with ``models/``: ``uid``, ``score`` (offset + every
    coordinate) and ``<coordinate>_score`` columns, written to ``out``."""
    from pyspark.sql import functions as F

    cols = cfg.data.columns
    raw = spark.read.parquet(gspark.path(data))
    present = set(raw.columns)
    offset = F.col(cols.offset).cast("double") if cols.offset and cols.offset in present else F.lit(0.0)
    result = raw.select(F.col(cols.uid).cast("long").alias(schema.UID), offset.alias(schema.OFFSET))
    total = F.col(schema.OFFSET)
    for coord in cfg.coordinates:
        url = layout.model(workdir, coord.name)
        if not storage.exists(url):
            raise FileNotFoundError(f"{url}: no saved model for coordinate {coord.name!r}; train first")
        part = kinds.of(coord).score_frame(spark, cfg, coord, workdir, raw)
        result = result.join(part, schema.UID, "left")
        total = total + F.col(f"`{coord.name}_score`")
    result = result.select(schema.UID, total.alias(schema.SCORE),
                           *[F.col(f"`{c.name}_score`") for c in cfg.coordinates])
    n_in = raw.count()
    with storage.atomic_path(out) as tmp:
        result.write.parquet(gspark.path(tmp))
        n_out = spark.read.parquet(gspark.path(tmp)).count()
    if n_out != n_in:
        raise RuntimeError(f"score: {data} has {n_in} rows but {n_out} scores were written")
    return {"rows": n_out, "out": out}

"""Scoring new raw rows with an exported deep model (``gdmix score``).

The rows are indexed exactly as prepare indexes them (its bag expressions with the saved
feature index, the text column with the saved vocabulary), collected to the driver, and
scored with the Keras model: the minimal path, for data that fits one process.
"""
from __future__ import annotations

import pyarrow as pa

from gdmix import layout, schema, sparse, storage
from gdmix.deep import model as dmodel, saved, text
from gdmix.deep.settings import DnnSettings

_IND, _VAL, _TOK = "__dnn_indices", "__dnn_values", "__dnn_tokens"


def score_frame(spark, cfg, coord, workdir: str, raw, uid_col: str):
    """A Spark frame ``(uid, <coordinate>_score)``: the deep model's logit of each raw row."""
    from pyspark.sql import functions as F

    from gdmix import bags
    from gdmix.checks import col

    model, meta = saved.load(layout.model(workdir, coord.name))
    st = DnnSettings(**{**meta["settings"], "hidden_units": tuple(meta["settings"]["hidden_units"])})
    bag = cfg.bag(coord.feature_bag)
    if bag.columns:
        ind, val = bags.columns_bag(bag)
    else:
        fidx = storage.read_table(layout.feature_index(workdir, coord.feature_bag)).sort_by("index")
        pairs = list(zip(fidx.column("name").to_pylist(), fidx.column("term").to_pylist()))
        s = bags.ntv_lookup(pairs)(col(bag.ntv))
        ind, val = s["indices"], s["values"]
    cols = [F.col(uid_col).cast("long").alias(schema.UID), ind.alias(_IND), val.alias(_VAL)]
    if st.text:
        cols.append(text.token_ids(st.text, meta["words"]).alias(_TOK))
    rows = raw.select(*cols).toArrow()
    x = sparse.from_table(rows, _IND, _VAL)
    tokens = dmodel.padded_tokens(rows.column(_TOK).to_pylist(), st.text_max_tokens) if st.text else None
    logits = saved.predict(model, dmodel.inputs(dmodel.dense_bag(x, meta["n_features"]), tokens))
    out = pa.table({schema.UID: rows.column(schema.UID), f"{coord.name}_score": pa.array(logits, pa.float64())})
    return spark.createDataFrame(out)


def export(workdir: str, step_iteration: int, step_coordinate: str, coordinate: str) -> str:
    """Copy the step's saved model to ``models/<coordinate>/``."""
    url = layout.model(workdir, coordinate)
    saved.copy(saved.step_model_dir(workdir, step_iteration, step_coordinate), url)
    return url

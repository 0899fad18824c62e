"""Scoring new raw rows with an exported deep model: ``gdmix score`` (Spark) and the
Python API (in memory).

The rows are indexed exactly as prepare indexes them (its bag expressions with the saved
feature index, the text column with the saved vocabulary), collected to the driver, and
scored with the Keras model: the minimal path, for data that fits one process. In memory
the same indexing is done with pyarrow (``bags.index_ntv``, ``text.tokenise``): a column
bag's feature j is column j rounded through float32 (null: 0), as ``bags.columns_bag``.
"""
from __future__ import annotations

import posixpath

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

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
    st = _settings(meta)
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


def _settings(meta: dict) -> DnnSettings:
    return DnnSettings(**{**meta["settings"], "hidden_units": tuple(meta["settings"]["hidden_units"])})


def _dense_columns(rows: pa.Table, columns, n_features: int) -> np.ndarray:
    out = np.zeros((rows.num_rows, n_features), dtype=np.float32)
    for j, c in enumerate(columns):
        out[:, j] = pc.fill_null(rows.column(c).cast(pa.float64()), 0.0).to_numpy().astype(np.float32)
    return out


def in_memory_scorer(cfg, coord, models_url: str):
    """The deep model's logit of each raw row (a pyarrow Table), in this process: what
    ``score_frame`` computes, to TF's float32 precision. A name-term-value bag is indexed
    with the run's feature index, ``prepared/features/<bag>.parquet`` beside ``models_url``."""
    from gdmix import bags

    model_url = storage.join(models_url, coord.name)
    if not storage.exists(storage.join(model_url, saved.META_FILE)):
        raise FileNotFoundError(f"{model_url}: no saved deep model for coordinate {coord.name!r}")
    model, meta = saved.load(model_url)
    st, bag, n = _settings(meta), cfg.bag(coord.feature_bag), meta["n_features"]
    keys = None
    if bag.ntv:
        index_url = layout.feature_index(posixpath.dirname(models_url.rstrip("/")), coord.feature_bag)
        if not storage.exists(index_url):
            raise FileNotFoundError(f"{index_url}: the feature index of bag {coord.feature_bag!r}, needed to "
                                    f"score coordinate {coord.name!r} in memory, is missing")
        fidx = storage.read_table(index_url).sort_by("index")
        keys = bags.index_keys(list(zip(fidx.column("name").to_pylist(), fidx.column("term").to_pylist())))
    needed = (*bag.source, *([st.text] if st.text else []))

    def score_rows(rows: pa.Table) -> np.ndarray:
        missing = [c for c in needed if c not in rows.column_names]
        if missing:
            raise KeyError(f"coordinate {coord.name!r}: column(s) {missing} missing from the rows to score")
        if keys is None:
            dense = _dense_columns(rows, bag.columns, n)
        else:
            indexed = bags.index_ntv(rows.column(bag.ntv), keys)
            x = sparse.from_table(pa.table({_IND: indexed.field("indices"), _VAL: indexed.field("values")}), _IND, _VAL)
            dense = dmodel.dense_bag(x, n)
        tokens = None
        if st.text:
            texts = [None if t is None else str(t) for t in rows.column(st.text).to_pylist()]
            tokens = dmodel.padded_tokens([text.tokenise(t, meta["words"]) for t in texts], st.text_max_tokens)
        return saved.predict(model, dmodel.inputs(dense, tokens))

    return score_rows


def export(workdir: str, step_iteration: int, step_coordinate: str, coordinate: str) -> str:
    """Copy the step's saved model to ``models/<coordinate>/``."""
    url = layout.model(workdir, coordinate)
    saved.copy(saved.step_model_dir(workdir, step_iteration, step_coordinate), url)
    return url

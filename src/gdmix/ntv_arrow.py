"""Name-term-value models scored in memory with pyarrow and numpy (no Spark).

The same arithmetic as ``gdmix.ntv.score_frame`` (what ``gdmix score`` runs in Spark),
on an Arrow table of raw rows: a coordinate's term of a row is its model's intercept plus
the dot product of the row's bag with the model's coefficients, where the model is the
fixed effect's ``global`` one or the row's entity's (its id as a string); a row whose
entity has no model, or a null entity, gets 0. A bag's values are read as ``prepare``
stores them: nulls skipped, each value rounded through float32; features the model does
not know contribute nothing. See ``gdmix.ntv`` for the model format.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gdmix import schema, storage
from gdmix.config import Config, Coordinate, FeatureBag

SEP = "\x00"  # joins model id, name and term into one lookup key


class Model:
    """One coordinate's exported model (``models/<coordinate>/``), indexed for lookups:
    intercepts by model id, coefficients by (model id, name, term)."""

    def __init__(self, table: pa.Table):
        ids = table.column(schema.MODEL_ID).cast(pa.string()).combine_chunks()
        means = table.column("means").combine_chunks()
        parent = pc.list_parent_indices(means)
        flat = means.flatten()
        name = pc.struct_field(flat, "name")
        term = pc.fill_null(pc.struct_field(flat, "term"), "")
        value = pc.struct_field(flat, "value").cast(pa.float64()).to_numpy(zero_copy_only=False)
        mid = ids.take(parent)
        is_b = pc.equal(name, schema.INTERCEPT_NAME).to_numpy(zero_copy_only=False)
        self.entities = len(ids)
        self.intercept_ids = mid.filter(pa.array(is_b))
        self.intercepts = value[is_b]
        slope = ~is_b
        self.keys = pc.binary_join_element_wise(mid.filter(pa.array(slope)), name.filter(pa.array(slope)),
                                                term.filter(pa.array(slope)), SEP)
        self.coefs = value[slope]

    @classmethod
    def read(cls, url: str) -> "Model":
        from gdmix import storage

        return cls(storage.read_table(url, columns=[schema.MODEL_ID, "means"]))


def _bag_long(rows: pa.Table, bag: FeatureBag) -> tuple[np.ndarray, pa.Array, pa.Array, np.ndarray]:
    """The bag of each row as long arrays (row, name, term, value); null values and null
    names dropped, values rounded through float32."""
    if bag.ntv:
        lists = rows.column(bag.ntv).combine_chunks()
        parent = pc.list_parent_indices(lists).to_numpy(zero_copy_only=False).astype(np.int64)
        flat = lists.flatten()
        fields = {flat.type.field(i).name for i in range(flat.type.num_fields)}
        name = pc.struct_field(flat, "name")
        term = pc.fill_null(pc.struct_field(flat, "term"), "") if "term" in fields \
            else pa.array([""] * len(flat), pa.string())
        value = pc.struct_field(flat, "value").cast(pa.float64())
        ok = pc.and_(pc.is_valid(name), pc.is_valid(value)).to_numpy(zero_copy_only=False)
        ok_a = pa.array(ok)
        values = value.filter(ok_a).to_numpy(zero_copy_only=False)
        return (parent[ok], name.filter(ok_a).cast(pa.string()), term.filter(ok_a).cast(pa.string()),
                values.astype(np.float32).astype(np.float64))
    parts_row, parts_name, parts_val = [], [], []
    for c in bag.columns:
        v = rows.column(c).cast(pa.float64()).combine_chunks()
        ok = v.is_valid().to_numpy(zero_copy_only=False)
        idx = np.flatnonzero(ok)
        parts_row.append(idx)
        parts_name.append(np.full(len(idx), c, dtype=object))
        parts_val.append(v.to_numpy(zero_copy_only=False)[ok].astype(np.float32).astype(np.float64))
    row = np.concatenate(parts_row) if parts_row else np.zeros(0, np.int64)
    names = pa.array(np.concatenate(parts_name) if parts_name else [], pa.string())
    return row, names, pa.array([""] * len(row), pa.string()), (np.concatenate(parts_val) if parts_val else np.zeros(0))


def score(rows: pa.Table, model: Model, bag: FeatureBag, entity: str | None) -> np.ndarray:
    """Each row's term of one coordinate: intercept + bag · coefficients of its model
    (``entity``: the random effect's entity column; None: the fixed effect's)."""
    n = rows.num_rows
    if entity is None:
        ids = pa.array([schema.FIXED_EFFECT_MODEL_ID] * n, pa.string())
    else:
        ids = rows.column(entity).cast(pa.string()).combine_chunks()
    at = pc.index_in(ids, value_set=model.intercept_ids)
    has_b = at.is_valid().to_numpy(zero_copy_only=False)
    out = np.zeros(n)
    out[has_b] = model.intercepts[pc.fill_null(at, 0).to_numpy(zero_copy_only=False)[has_b]]
    row, name, term, value = _bag_long(rows, bag)
    if len(row) and len(model.keys):
        keys = pc.binary_join_element_wise(ids.take(pa.array(row)), name, term, SEP)
        pos = pc.index_in(keys, value_set=model.keys)
        hit = pos.is_valid().to_numpy(zero_copy_only=False)
        coef = model.coefs[pc.fill_null(pos, 0).to_numpy(zero_copy_only=False)[hit]]
        out += np.bincount(row[hit], weights=value[hit] * coef, minlength=n)
    return out


def scorer(cfg: Config, coord: Coordinate, models_url: str):
    """The in-memory scorer of a coordinate with a name-term-value model (``score`` over
    its model in ``models_url``), refusing rows that lack its bag or entity columns."""
    url = storage.join(models_url, coord.name)
    if not storage.exists(url):
        raise FileNotFoundError(f"{url}: no saved model for coordinate {coord.name!r}")
    model, bag = Model.read(url), cfg.bag(coord.feature_bag)
    entity = None if coord.is_fixed_effect else coord.entity

    def score_rows(rows: pa.Table) -> np.ndarray:
        missing = [x for x in (*bag.source, *([entity] if entity else [])) if x not in rows.column_names]
        if missing:
            raise KeyError(f"coordinate {coord.name!r}: column(s) {missing} missing from the rows to score")
        return score(rows, model, bag, entity)

    return score_rows

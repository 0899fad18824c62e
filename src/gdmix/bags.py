"""Reading a feature bag out of raw input rows as sparse (indices, values) arrays.

One implementation for every reader: ``prepare`` indexes the training input with it, and
scoring new rows (a deep model's ``gdmix score``) indexes them the same way.

- a ``columns`` bag: feature j is column j of the bag (term ""); a null or zero value is
  absent (``columns_bag``, plain Spark SQL);
- an ``ntv`` bag: a list<struct<name, term, value>> column looked up in the bag's feature
  index (``ntv_lookup``: a vectorised Arrow UDF over ``index_ntv``).
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import Column
from pyspark.sql import functions as F

from gdmix import checks
from gdmix.config import FeatureBag

SEP = "\x00"  # joins name and term into one lookup key; not expected inside names


def index_keys(pairs: list[tuple[str, str]]) -> pa.Array:
    """The lookup keys of a feature index's (name, term) pairs, in index order."""
    return pa.array([n + SEP + t for n, t in pairs], pa.string())


def columns_bag(bag: FeatureBag) -> tuple[Column, Column]:
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

    ``keys`` holds name + SEP + term for index 0..d-1. Returns struct<indices
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
    key = pc.binary_join_element_wise(name, pc.fill_null(term, ""), SEP)
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


def ntv_lookup(pairs: list[tuple[str, str]]):
    keys = index_keys(pairs)

    @F.arrow_udf("struct<indices: array<int>, values: array<float>>")
    def lookup(lists: pa.Array) -> pa.Array:
        return index_ntv(lists, keys)

    return lookup

"""A random-effect step's partition shards and coefficients tables, as arrays.

Shards are read as written (rows in no particular order), whole or in batches of bounded
size, or whole and grouped by entity; a coefficients table (``schema.COEFFICIENTS``, with
variances or not) converts to and from the solvers' ``Models`` (flat CSR arrays, one model
per entity).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gdmix import arrow_arrays as aa, layout, schema, sparse, storage
from gdmix.plan import Step
from gdmix.random_effect.scipy_solver import Models


MOVING = (schema.OFFSET, schema.FIXED_SCORE)  # what a later pass's partition rewrites


def rows_iteration(workdir: str, step: Step) -> int:
    """The pass whose partition holds this step's rows (its own, unless its partition
    wrote only offsets: docs/design.md §4.5)."""
    info = storage.done_info(layout.step_dir(workdir, step.iteration, step.coordinate), "partition") or {}
    return int(info.get(schema.ROWS_ITERATION, step.iteration))


# Rows per batch of ``iter_shard``. Decoding a batch of list columns takes ≈ 700 bytes a
# row of Arrow memory (levels and buffers; ≈ 180 of them stay as the rows with a bag of
# ≈ 17 features), so ≈ 12 MB: small beside a shard, and the per-batch work (a
# compiled scoring call, a few array allocations) is still negligible at this size.
BATCH_ROWS = 16_384


def read_shard(workdir: str, step: Step, split: str, shard: int, shifted: bool,
               grouped: bool = False, columns: list[str] | None = None,
               select: Callable[[pa.Table], np.ndarray | None] | None = None) -> pa.Table:
    """A partition shard's ``columns`` (default: all; a missing shard folder is an empty
    shard), whole; ``grouped``: its rows sorted by (entity, uid), so each entity's rows
    are one contiguous block (the partition stage writes them in no particular order);
    ``select`` (grouped only): given the sorted rows' (entity_id, uid), the positions of
    those to keep (None: all), taken in the same one copy of each column as the sort.

    When the step's partition holds only offsets, the rows come from the pass that
    grouped them, with this step's offsets (and fixed scores) joined on by uid; a row
    without a new offset, or an offset without a row, is an error naming both files."""
    src = _source(workdir, step, split, shard, shifted, columns)
    # a column at a time, each one chunk: the sort's takes then copy each column once
    rows = storage.read_columns(src.url, src.columns, src.schema)
    if src.offsets is not None:
        rows = src.offsets.onto(rows, src.names)
    if not grouped:
        return rows
    order = pc.sort_indices(rows.select([schema.ENTITY_ID, schema.UID]),
                            sort_keys=[(schema.ENTITY_ID, "ascending"), (schema.UID, "ascending")])
    keep = None if select is None else select(rows.select([schema.ENTITY_ID, schema.UID]).take(order))
    if keep is not None:
        order = order.take(aa.array(np.asarray(keep, np.int64)))
    cols = {}
    for n in src.names:  # column by column, each unsorted one released as its copy is made (peak memory)
        cols[n] = rows.column(n).take(order)
        rows = rows.drop_columns([n])
    return pa.table(cols)


def iter_shard(workdir: str, step: Step, split: str, shard: int, shifted: bool,
               columns: list[str] | None = None, batch_rows: int = BATCH_ROWS):
    """``read_shard``'s rows (not grouped), in the same order, as tables of at most
    ``batch_rows`` rows: memory O(batch) (plus, when the partition holds only offsets,
    the shard's offsets: a few numbers a row), never the shard's rows at once."""
    src = _source(workdir, step, split, shard, shifted, columns)
    for batch in storage.iter_columns(src.url, src.columns, src.schema, batch_rows):
        yield batch if src.offsets is None else src.offsets.onto(batch, src.names)


@dataclass
class _Source:
    names: list[str]  # the columns wanted
    url: str  # the shard that holds the rows
    columns: list[str]  # what to read of it
    schema: pa.Schema
    offsets: "Offsets | None"  # this step's offsets to join on (a partition of offsets only)


def _source(workdir: str, step: Step, split: str, shard: int, shifted: bool, columns: list[str] | None) -> _Source:
    """Where a shard's rows are: this step's partition, or the pass that holds them and
    this step's offsets (read whole, checked against the rows' count)."""
    full = schema.partition_schema(True, shifted)
    names = list(columns or full.names)
    url = layout.shard(layout.partition(workdir, step.iteration, step.coordinate, split), shard)
    first = rows_iteration(workdir, step)
    if first == step.iteration:
        return _Source(names, url, names, full, None)
    base_url = layout.shard(layout.partition(workdir, first, step.coordinate, split), shard)
    offsets = Offsets(url, base_url, [n for n in names if n in MOVING], shifted, f"iter-{first}/{step.coordinate}")
    fixed = [n for n in names if n not in MOVING and n != schema.UID]
    return _Source(names, base_url, [schema.UID] + fixed, schema.partition_schema(True, False), offsets)


class Offsets:
    """A later pass's offsets of one shard (``uid``, ``offset``[, ``fixed_score``]: a few
    numbers a row, read whole), joined by uid onto batches of the rows of the pass that
    holds them (docs/design.md §4.5): sorted once, then a binary search per batch row."""

    def __init__(self, url: str, base_url: str, moving: list[str], shifted: bool, redo_from: str):
        self.url, self.base_url, self.redo_from = url, base_url, redo_from
        # one chunk per column: a take from several chunks would first concatenate them, per batch
        self.table = storage.read_columns(url, [schema.UID] + moving, schema.offsets_schema(shifted)).combine_chunks()
        uid = aa.to_numpy(self.table.column(schema.UID))
        self.order = np.argsort(uid, kind="stable")  # stable: of repeated uids, the first (as index_in)
        self.sorted = uid[self.order]
        if storage.parquet_rows(base_url) != self.table.num_rows:  # from the footers
            raise self._error()

    def positions(self, uid: np.ndarray) -> np.ndarray:
        """Each uid's row in the offsets table (-1: none)."""
        if not len(self.sorted):
            return np.full(len(uid), -1, np.int64)
        at = np.minimum(np.searchsorted(self.sorted, uid), len(self.sorted) - 1)
        return np.where(self.sorted[at] == uid, self.order[at], -1).astype(np.int64)

    def onto(self, base: pa.Table, names: list[str]) -> pa.Table:
        """``names`` of the ``base`` rows, the moving ones from the offsets."""
        pos = self.positions(aa.to_numpy(base.column(schema.UID)))
        if (pos < 0).any():
            raise self._error()
        take = aa.array(pos)
        return pa.table({n: base.column(n) if n not in MOVING else self.table.column(n).take(take) for n in names})

    def _error(self) -> ValueError:
        # only on this path: the rows' uids read whole, to say how many rows lack an offset
        base = aa.to_numpy(storage.read_columns(self.base_url, [schema.UID], schema.partition_schema(True, False))
                           .column(schema.UID))
        missing = int((self.positions(base) < 0).sum())
        return ValueError(f"{self.url} holds {self.table.num_rows} offsets for the {len(base)} rows of "
                          f"{self.base_url} ({missing} rows without one): redo the partitions from "
                          f"{self.redo_from} (gdmix run --restart)")


def groups(rows: pa.Table) -> tuple[pa.Array, np.ndarray]:
    """(entity ids, row_ptr): the runs of equal entity ids; each entity must be one run."""
    ent = rows.column(schema.ENTITY_ID).combine_chunks()
    n = len(ent)
    if n == 0:
        return aa.empty(pa.string()), np.zeros(1, np.int64)
    if ent.null_count:
        raise ValueError(f"partition rows with a null {schema.ENTITY_ID}")
    change = aa.to_numpy(pc.not_equal(ent.slice(1), ent.slice(0, n - 1)))
    starts = np.concatenate([[0], np.flatnonzero(change) + 1]).astype(np.int64)
    ids = ent.take(aa.array(starts))
    if len(pc.unique(ids)) != len(ids):
        raise ValueError("partition shard rows are not grouped by entity_id (read them with grouped=True)")
    return ids, np.append(starts, n)


def column(t: pa.Table, name: str, writable: bool = False) -> np.ndarray:
    """A numeric column as float64: a read-only view of a float64 column (no copy), a copy
    when ``writable`` (the compiled kernels are compiled, and cached on disk, for writable
    arrays: a read-only one would be a new signature to compile)."""
    return aa.to_numpy(t.column(name)).astype(np.float64, copy=writable)


def positions(ids: pa.Array | pa.ChunkedArray, value_set: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """For each id, its position in ``value_set`` (-1 when absent)."""
    vs = value_set.combine_chunks() if isinstance(value_set, pa.ChunkedArray) else value_set
    return aa.to_numpy(pc.index_in(ids, value_set=vs), fill=-1).astype(np.int64)


def read_coefficients(url: str) -> pa.Table:
    """A coefficients table (file or folder) with the variance columns, null when it has none."""
    return storage.read_columns(url, schema.COEFFICIENTS_WITH_VARIANCES.names, schema.COEFFICIENTS_WITH_VARIANCES)


def models_from_table(table: pa.Table) -> Models:
    csr = sparse.from_table(table, schema.INDICES, schema.VALUES)
    return Models(aa.to_numpy(table.column(schema.INTERCEPT)).astype(np.float64), csr.indptr,
                  csr.indices, csr.values)


def models_table(ids: pa.Array, models: Models,
                 variances: tuple[np.ndarray, np.ndarray] | None = None) -> pa.Table:
    """schema.COEFFICIENTS, or COEFFICIENTS_WITH_VARIANCES with ``variances`` = (intercept
    variances, variances parallel to ``models.values``)."""
    idx, val = sparse.to_arrow_lists(models.ptr, models.indices, models.values)
    cols = [ids.cast(pa.string()), aa.array(models.intercept, pa.float64()), idx, val]
    if variances is None:
        return pa.Table.from_arrays(cols, schema=schema.COEFFICIENTS)
    _, var = sparse.to_arrow_lists(models.ptr, models.indices, variances[1])
    return pa.Table.from_arrays(cols + [aa.array(variances[0], pa.float64()), var],
                                schema=schema.COEFFICIENTS_WITH_VARIANCES)


def variances_from_table(table: pa.Table) -> tuple[np.ndarray, np.ndarray] | None:
    """(intercept variances, flat variances) of a coefficients table, None without them."""
    if schema.VARIANCES not in table.column_names or table.column(schema.INTERCEPT_VARIANCE).null_count:
        return None
    var = aa.to_numpy(pc.list_flatten(table.column(schema.VARIANCES).combine_chunks()))
    return aa.to_numpy(table.column(schema.INTERCEPT_VARIANCE)).astype(np.float64), var.astype(np.float64)


def gather(models: Models, pos: np.ndarray) -> Models:
    """Models re-ordered to ``pos`` (-1 = no model: intercept 0, no coefficients)."""
    has = pos >= 0
    p = np.where(has, pos, 0)
    lens = np.where(has, np.diff(models.ptr)[p] if len(models.intercept) else 0, 0)
    ptr = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    starts = np.where(has, models.ptr[p] if len(models.intercept) else 0, 0)
    flat = np.repeat(starts - ptr[:-1], lens) + np.arange(ptr[-1])
    icp = np.where(has, models.intercept[p] if len(models.intercept) else 0.0, 0.0)
    return Models(icp.astype(np.float64), ptr, models.indices[flat], models.values[flat])

"""Rows of a sparse feature bag as CSR arrays, straight from Arrow list columns.

A ``list<int32>`` / ``list<float32>`` pair of columns is already CSR: the list offsets
are the row pointers. Reading them this way costs no Python object per row.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from gdmix import arrow_arrays as aa


@dataclass
class CSR:
    indptr: np.ndarray  # int64, n_rows + 1
    indices: np.ndarray  # int32
    values: np.ndarray  # float64

    @property
    def n_rows(self) -> int:
        return len(self.indptr) - 1

    def matrix(self, n_features: int):
        import scipy.sparse as sp  # only where a matrix is wanted: not in the random-effect shards

        return sp.csr_matrix((self.values, self.indices, self.indptr), shape=(self.n_rows, n_features))

    def row_ids(self) -> np.ndarray:
        return np.repeat(np.arange(self.n_rows), np.diff(self.indptr))

    def dot(self, coef: np.ndarray) -> np.ndarray:
        """Row-wise x_i · coef for a dense coefficient vector over the bag's features."""
        prod = self.values * coef[self.indices]
        return np.bincount(self.row_ids(), weights=prod, minlength=self.n_rows)


def _flat(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if arr.null_count:
        raise ValueError("feature list column has null rows")
    offsets = aa.to_numpy(arr.offsets).astype(np.int64)
    flat = aa.to_numpy(arr.values)
    start = offsets[0]
    return offsets - start, flat[start:offsets[-1]]


def from_arrow(indices: pa.ChunkedArray | pa.Array, values: pa.ChunkedArray | pa.Array,
               dtype=np.float64) -> CSR:
    """Two list columns as CSR; values as ``dtype`` (float64: a copy of float32 lists;
    float32: a view of them, for readers that only multiply)."""
    indptr, idx = _flat(indices)
    indptr2, val = _flat(values)
    if not np.array_equal(indptr, indptr2):
        raise ValueError("indices and values lists differ in length")
    return CSR(indptr, idx.astype(np.int32, copy=False), val.astype(dtype, copy=np.dtype(dtype) == np.float64))


def from_table(table: pa.Table, indices: str, values: str, dtype=np.float64) -> CSR:
    return from_arrow(table.column(indices), table.column(values), dtype)


def to_arrow_lists(indptr: np.ndarray, indices: np.ndarray, values: np.ndarray,
                   value_type=pa.float64()) -> tuple[pa.Array, pa.Array]:
    """CSR arrays back to a pair of Arrow list columns (no per-row Python objects)."""
    offs = aa.array(np.asarray(indptr, dtype=np.int32))
    return (pa.ListArray.from_arrays(offs, aa.array(np.asarray(indices, dtype=np.int32))),
            pa.ListArray.from_arrays(offs, aa.array(np.asarray(values), type=value_type)))

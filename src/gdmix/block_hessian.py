"""The diagonal blocks of H = XᵀDX + diag(p) for a design whose columns fall into groups
no row crosses (a random effect's: an entity's intercept and features are touched only by
that entity's rows), assembled densely, group by group, in one compiled pass over the rows.

The groups are the connected components of the graph joining the columns each row touches
(a union-find over the columns); H is block-diagonal over them. A row i adds
D_i x_ia x_ib to entry (a, b) of its group's block, so the pass costs Σ_i nnz_i² and
allocates only the blocks themselves (Σ_g k_g² numbers), never XᵀDX as a sparse matrix or
a per-entry index array: at 10M rows those took several times the design's own memory.
"""
from __future__ import annotations

import numba as nb
import numpy as np


@nb.njit(cache=True, nogil=True)
def _find(parent, j):
    root = j
    while parent[root] != root:
        root = parent[root]
    while parent[j] != root:  # path compression
        parent[j], j = root, parent[j]
    return root


@nb.njit(cache=True, nogil=True)
def _components(indptr, indices, n_cols):
    """Per column, its group's label 0..G-1 (groups numbered by their first column)."""
    parent = np.arange(n_cols)
    for i in range(len(indptr) - 1):
        a, b = indptr[i], indptr[i + 1]
        if b - a < 2:
            continue
        r0 = _find(parent, indices[a])
        for k in range(a + 1, b):
            r = _find(parent, indices[k])
            if r != r0:
                if r < r0:
                    parent[r0] = r
                    r0 = r
                else:
                    parent[r] = r0
    label = np.empty(n_cols, np.int64)
    ids = np.full(n_cols, -1, np.int64)
    g = 0
    for j in range(n_cols):
        r = _find(parent, j)
        if ids[r] < 0:
            ids[r] = g
            g += 1
        label[j] = ids[r]
    return label


@nb.njit(cache=True, nogil=True)
def _assemble(indptr, indices, values, curvature, label, local, size, offset, flat, diag):
    """flat[offset[g] + a·k + b] += D_i x_ia x_ib over every row (groups with offset < 0 are
    left out); diag[j] += D_i x_ij² for every column."""
    for i in range(len(indptr) - 1):
        a0, b0 = indptr[i], indptr[i + 1]
        if a0 == b0:
            continue
        d = curvature[i]
        for k in range(a0, b0):
            diag[indices[k]] += d * values[k] * values[k]
        g = label[indices[a0]]
        base = offset[g]
        if base < 0:
            continue
        k_g = size[g]
        for p in range(a0, b0):
            row = base + local[indices[p]] * k_g
            dv = d * values[p]
            for q in range(a0, b0):
                flat[row + local[indices[q]]] += dv * values[q]


def groups(indptr: np.ndarray, indices: np.ndarray, n_cols: int) -> np.ndarray:
    """Per column, the label of its group (the components no row crosses)."""
    return _components(np.ascontiguousarray(indptr, np.int64), np.ascontiguousarray(indices, np.int32), n_cols)


def dense_blocks(indptr, indices, values, curvature, label: np.ndarray, local: np.ndarray,
                 size: np.ndarray, offset: np.ndarray, total: int, n_cols: int) -> tuple[np.ndarray, np.ndarray]:
    """(flat blocks of XᵀDX, diag of XᵀDX): group g's k×k block at ``flat[offset[g]:][:k*k]``
    (row-major over ``local`` positions), groups with ``offset`` −1 left out; the diagonal
    for every column."""
    flat, diag = np.zeros(total), np.zeros(n_cols)
    _assemble(np.ascontiguousarray(indptr, np.int64), np.ascontiguousarray(indices, np.int32),
              np.ascontiguousarray(values, np.float64), np.ascontiguousarray(curvature, np.float64),
              label, np.ascontiguousarray(local, np.int64), np.ascontiguousarray(size, np.int64),
              np.ascontiguousarray(offset, np.int64), flat, diag)
    return flat, diag


def warm_up() -> float:
    """Compile the kernels (or load them from numba's cache) on a tiny design; the seconds
    it took. ``make install`` and the image build call it beside the random-effect kernels."""
    import time

    t0 = time.perf_counter()
    indptr, indices, values = np.array([0, 2, 3]), np.array([0, 1, 2], np.int32), np.array([1.0, 2.0, 3.0])
    label = groups(indptr, indices, 3)
    dense_blocks(indptr, indices, values, np.ones(2), label, np.array([0, 1, 0]), np.array([2, 1]),
                 np.array([0, 4]), 5, 3)
    return time.perf_counter() - t0

"""Each row's random-effect score, a_e + z_i·α_e, in one compiled pass over the rows.

Row i (CSR: ``indptr``, ``indices``, ``values``) belongs to model ``pos[i]`` (-1: its
entity has no model, score 0). A model's coefficients are its slice of the models' flat
CSR arrays (``ptr``, ``m_indices`` ascending, ``m_values``); each of the row's features is
found in it by binary search, so the cost is Σ_i nnz_i · log p_e with nothing allocated
per row: the numpy way (a global sort key per nonzero, a searchsorted over all of them)
took several times longer and as many temporary arrays as nonzeros.
"""
from __future__ import annotations

import numba as nb
import numpy as np


@nb.njit(cache=True, nogil=True)
def _scores(pos, indptr, indices, values, ptr, m_indices, m_values, intercept, out):
    for i in range(len(pos)):
        m = pos[i]
        if m < 0:
            out[i] = 0.0
            continue
        s = intercept[m]
        a, b = ptr[m], ptr[m + 1]
        for k in range(indptr[i], indptr[i + 1]):
            j = indices[k]
            lo, hi = a, b
            while lo < hi:  # the first model feature >= j
                mid = (lo + hi) >> 1
                if m_indices[mid] < j:
                    lo = mid + 1
                else:
                    hi = mid
            if lo < b and m_indices[lo] == j:
                s += values[k] * m_values[lo]
        out[i] = s


def _floats(values: np.ndarray) -> np.ndarray:
    """float32 (as rows store them: no copy) or float64."""
    return np.ascontiguousarray(values, np.float32 if values.dtype == np.float32 else np.float64)


def scores(pos: np.ndarray, indptr: np.ndarray, indices: np.ndarray, values: np.ndarray,
           ptr: np.ndarray, m_indices: np.ndarray, m_values: np.ndarray, intercept: np.ndarray) -> np.ndarray:
    """Row scores (float64) of rows ``pos`` → model, rows and models as flat CSR arrays."""
    out = np.empty(len(pos), np.float64)
    _scores(np.ascontiguousarray(pos, np.int64), np.ascontiguousarray(indptr, np.int64),
            np.ascontiguousarray(indices, np.int32), _floats(values),
            np.ascontiguousarray(ptr, np.int64), np.ascontiguousarray(m_indices, np.int32),
            np.ascontiguousarray(m_values, np.float64), np.ascontiguousarray(intercept, np.float64), out)
    return out

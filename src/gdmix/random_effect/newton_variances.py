"""Coefficient variances of the per-entity models the compiled kernel solved (``newton``):
with H_e the Hessian of entity e's objective at its model (loss plus penalty, prior
included, as ``newton.solve_entities`` forms it), 1/diag(H_e) or diag(H_e⁻¹). One compiled
pass over flat arrays, reusing the kernel's element, penalty and Hessian routines.
"""
from __future__ import annotations

import math

import numba as nb
import numpy as np

from gdmix.random_effect.newton import LOGISTIC, _JIT, _elements, _hessian, _mean, _penalties, cholesky


@nb.njit(**_JIT)
def model_scratch(row_ptr, indptr, coef_ptr, n_features):
    """Work arrays for ``hessian_at_model`` sized for the largest entity: (q, el_ptr,
    el_slot, el_val, seen, pos, pen, ctr, max_p)."""
    m = len(row_ptr) - 1
    max_rows, max_nz, max_p = 0, 0, 1
    for e in range(m):
        max_rows = max(max_rows, row_ptr[e + 1] - row_ptr[e])
        max_nz = max(max_nz, indptr[row_ptr[e + 1]] - indptr[row_ptr[e]])
        max_p = max(max_p, 1 + coef_ptr[e + 1] - coef_ptr[e])
    return (np.empty(max_rows), np.empty(max_rows + 1, np.int64), np.empty(max_nz, np.int64), np.empty(max_nz),
            np.full(n_features, -1, np.int32), np.empty(n_features, np.int32), np.empty(max_p), np.empty(max_p),
            max_p)


@nb.njit(**_JIT)
def hessian_at_model(e, row_ptr, indptr, indices, values, weight, offset,
                     prior_icp_mean, prior_icp_prec, prior_ptr, prior_idx, prior_mean, prior_prec,
                     l2, regularize_intercept, n_features, coef_ptr, coef_idx, coef_val, intercept, task,
                     q, el_ptr, el_slot, el_val, seen, pos, pen, ctr, h):
    """H_e of entity e at its solved model into h[:p, :p] (loss + penalty, prior included,
    as ``newton.solve_entities`` forms it), with q the rows' mean responses and el_* the
    rows' elements in model slots; returns p (1 + the model's features)."""
    c0, c1 = coef_ptr[e], coef_ptr[e + 1]
    p = 1 + c1 - c0
    for a in range(c1 - c0):
        j = coef_idx[c0 + a]
        seen[j] = e
        pos[j] = a
    r0, r1 = row_ptr[e], row_ptr[e + 1]
    z0, z1 = indptr[r0], indptr[r1]
    _elements(indptr[r0:r1 + 1], indices[z0:z1], values[z0:z1], pos, el_ptr, el_slot, el_val)
    _penalties(e, l2, regularize_intercept, prior_icp_mean, prior_icp_prec, prior_ptr, prior_idx,
               prior_mean, prior_prec, n_features, seen, pos, p, pen, ctr)
    for i in range(r1 - r0):
        v = offset[r0 + i] + intercept[e]
        for k in range(el_ptr[i], el_ptr[i + 1]):
            v += coef_val[c0 + el_slot[k] - 1] * el_val[k]
        q[i] = _mean(task, v)
    _hessian(task, r1 - r0, weight[r0:r1], q, el_ptr, el_slot, el_val, pen, p, h)
    return p


@nb.njit(**_JIT)
def entity_variances(row_ptr, indptr, indices, values, weight, offset,
                     prior_icp_mean, prior_icp_prec, prior_ptr, prior_idx, prior_mean, prior_prec,
                     l2, regularize_intercept, n_features, coef_ptr, coef_idx, coef_val, intercept, full,
                     var_icp, var_val, task=LOGISTIC):
    """Coefficient variances of every entity's solved model (``coef_*``, ``intercept``: the
    kernel's output, whose indices are F_e ascending): with H_e the Hessian of f_e at the
    model (loss + penalty, as in ``solve_entities``), 1/diag(H_e) (``full`` False) or
    diag(H_e⁻¹) (True: Cholesky H = LLᵀ, then diag(H⁻¹)_k = Σ_i (L⁻¹)_ik², each column of
    L⁻¹ by forward substitution). A singular H gives inf (simple) or NaN (full)."""
    q, el_ptr, el_slot, el_val, seen, pos, pen, ctr, max_p = model_scratch(row_ptr, indptr, coef_ptr, n_features)
    z = np.empty(max_p)
    h = np.empty((max_p, max_p))
    for e in range(len(row_ptr) - 1):
        c0 = coef_ptr[e]
        p = hessian_at_model(e, row_ptr, indptr, indices, values, weight, offset,
                             prior_icp_mean, prior_icp_prec, prior_ptr, prior_idx, prior_mean, prior_prec,
                             l2, regularize_intercept, n_features, coef_ptr, coef_idx, coef_val, intercept, task,
                             q, el_ptr, el_slot, el_val, seen, pos, pen, ctr, h)
        if not full:
            var_icp[e] = 1.0 / h[0, 0] if h[0, 0] > 0.0 else math.inf
            for a in range(1, p):
                var_val[c0 + a - 1] = 1.0 / h[a, a] if h[a, a] > 0.0 else math.inf
            continue
        if not cholesky(h, p):  # H = L Lᵀ in the lower triangle
            var_icp[e] = math.nan
            for a in range(1, p):
                var_val[c0 + a - 1] = math.nan
            continue
        # H⁻¹ = L⁻ᵀ L⁻¹, so [H⁻¹]_aa = Σ_i (L⁻¹)_ia²: the squared norm of column a of L⁻¹,
        # which solves L z = e_a (z_i = 0 for i < a). pen is free now: it takes the results.
        for a in range(p):
            acc = 0.0
            for i in range(a, p):
                v = 1.0 if i == a else 0.0
                for k in range(a, i):
                    v -= h[i, k] * z[k]
                z[i] = v / h[i, i]
                acc += z[i] * z[i]
            pen[a] = acc
        var_icp[e] = pen[0]
        for a in range(1, p):
            var_val[c0 + a - 1] = pen[a]

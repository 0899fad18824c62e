"""Per-entity generalised linear models by damped Newton, compiled (numba) over flat arrays.

Same problem as ``scipy_solver`` (the reference this is tested against). Entity e owns
rows R_e and the features F_e present in them (local indexing); with x_i = (1, z_i) and
α = (a, b) ∈ R^{p_e}, p_e = 1 + |F_e|,

    f_e(α) = Σ_{i∈R_e} w_i ℓ(s_i, y_i) + ½ Σ_k π_k α_k²,   s_i = o_i + x_i·α,
    g_e    = Σ_{i∈R_e} w_i (μ(s_i) − y_i) x_i + π ∘ α,
    H_e    = Σ_{i∈R_e} w_i μ'(s_i) x_i x_iᵀ + diag(π),

with the task's loss (``gdmix.losses``, chosen by its ``code``: 0 logistic ℓ = log(1 + e^s)
− y s, μ = σ; 1 linear ½(s − y)², μ = s, μ' = 1, where one Newton step is exact; 2
poisson e^s − y s, μ = μ' = e^s, whose curvature grows fast with s: the Armijo
backtracking below keeps every step a decrease, and an overflowing e^s makes f infinite,
which the line search rejects).

π_k = λ for coefficients, λ·r for the intercept (r = 1 when it is penalised). With a
prior (``gdmix.priors``) a coefficient that has one gets its own weight and centre: the
term becomes ½ π_k (α_k − c_k)² with π_k = w/σ_k², c_k = μ_k (so g_e gains π∘(α − c)).

Each entity takes Newton steps

    (H_e + μ I) δ = −g_e,    μ = 1e-12 · max(1, max diag H_e)

(μ only keeps the solve defined where H_e is singular: λ = 0, or an unpenalised intercept
whose weights σ(1 − σ) underflow; when the Cholesky factorisation still meets a
non-positive pivot μ grows 1000× and it retries, a Levenberg step that is still a descent
direction; past μ = 1 it takes the gradient step −g / max diag H), then backtracking
α ← α + t δ with t = 2^{-j} the first to satisfy Armijo's condition
f(α + tδ) ≤ f(α) + 10⁻⁴ t gᵀδ (up to rounding of f: 10⁻¹² (|f| + 1)). It stops
when max_k |g_k| ≤ tolerance · max(1, Σ_{i∈R_e} w_i) (the reference's rule), after
``max_iterations`` steps, or when no step length decreases f. It is converged when the
rule holds (to 10× as the reference allows) and it is not separable, with the reference's
definition (λ = 0 and the fitted x·α classifies every weighted row with a positive margin,
or r = 0 and one class: no finite optimum).

Why compiled and per entity, not batched array operations: a random-effect coordinate is
millions of problems of p ≈ 10–30, where numpy's batched linear algebra pays one library
call and several array passes per system and per step (measured: about half the time of
the batched-numpy solver this replaced went to the per-system LAPACK calls and
triangular-substitution passes). One compiled pass over an entity's rows keeps its
p × p Hessian, gradient and scores in cache and does only the arithmetic: rows are
sparse, so the Hessian costs Σ_i nnz_i² (the row's element pairs, slots ascending), the
Cholesky p³/6, the rest O(nnz).

The kernel is compiled once per machine (``cache=True``: numba's on-disk cache beside this
file, or its user cache directory when that is read-only) and reused by every process.
"""
from __future__ import annotations

import math

import numba as nb
import numpy as np

_ARMIJO = 1e-4
_HALVINGS = 60
_DAMPING = 1e-12
_DAMPING_GROWTH = 1e3
_JIT = dict(cache=True, nogil=True, fastmath={"contract", "nsz"})


@nb.njit(inline="always", **_JIT)
def _softplus(s):
    return max(s, 0.0) + math.log1p(math.exp(-abs(s)))


@nb.njit(inline="always", **_JIT)
def _sigmoid(s):
    if s >= 0.0:
        return 1.0 / (1.0 + math.exp(-s))
    z = math.exp(s)
    return z / (1.0 + z)


LOGISTIC, LINEAR, POISSON = 0, 1, 2  # task codes: gdmix.losses.Loss.code


@nb.njit(inline="always", **_JIT)
def _mean(task, s):
    """μ(s) of the task."""
    if task == LINEAR:
        return s
    if task == POISSON:
        return math.exp(s)
    return _sigmoid(s)


@nb.njit(inline="always", **_JIT)
def _ell(task, s, y):
    """ℓ(s, y) of the task."""
    if task == LINEAR:
        return 0.5 * (s - y) * (s - y)
    if task == POISSON:
        return math.exp(s) - y * s
    return _softplus(s) - y * s


@nb.njit(inline="always", **_JIT)
def _curvature(task, q):
    """∂²ℓ/∂s² from q = μ(s): σ(1 − σ), 1 or e^s."""
    if task == LINEAR:
        return 1.0
    if task == POISSON:
        return q
    return q * (1.0 - q)


@nb.njit(**_JIT)
def count_features(row_ptr, indptr, indices, n_features):
    """|F_e| per entity: the distinct features of its rows (indices < n_features)."""
    m = len(row_ptr) - 1
    out = np.zeros(m, np.int64)
    seen = np.full(n_features, -1, np.int32)  # the last entity that had feature j
    for e in range(m):
        d = 0
        for k in range(indptr[row_ptr[e]], indptr[row_ptr[e + 1]]):
            j = indices[k]
            if seen[j] != e:
                seen[j] = e
                d += 1
        out[e] = d
    return out


@nb.njit(**_JIT)
def _local_columns(e, indices, z0, z1, seen, pos, cols):
    """F_e ascending into cols (d of them); pos[j] = the local index of feature j."""
    d = 0
    for k in range(z0, z1):
        j = indices[k]
        if seen[j] != e:
            seen[j] = e
            t = d  # insertion: F_e is small
            while t > 0 and cols[t - 1] > j:
                cols[t] = cols[t - 1]
                t -= 1
            cols[t] = j
            d += 1
    for a in range(d):
        pos[cols[a]] = a
    return d


@nb.njit(**_JIT)
def _elements(e_indptr, e_indices, e_values, pos, el_ptr, el_slot, el_val):
    """One entity's rows as (local slot, value) elements, slots ascending within a row and a
    feature repeated in a row summed into one element: el_ptr[i]:el_ptr[i+1] is row i."""
    n = len(e_indptr) - 1
    z0 = e_indptr[0]
    at = 0
    for i in range(n):
        el_ptr[i] = at
        start = at
        for k in range(e_indptr[i] - z0, e_indptr[i + 1] - z0):
            sl = 1 + pos[e_indices[k]]
            v = e_values[k]
            j = at  # insertion into the row's ascending run
            merged = False
            while j > start and el_slot[j - 1] >= sl:
                if el_slot[j - 1] == sl:
                    el_val[j - 1] += v
                    merged = True
                    break
                j -= 1
            if merged:
                continue
            for t in range(at, j, -1):
                el_slot[t] = el_slot[t - 1]
                el_val[t] = el_val[t - 1]
            el_slot[j] = sl
            el_val[j] = v
            at += 1
    el_ptr[n] = at


@nb.njit(**_JIT)
def _value(task, n, s, y, w, x, pen, ctr, p):
    f = 0.0
    for i in range(n):
        f += w[i] * _ell(task, s[i], y[i])
    for a in range(p):
        f += 0.5 * pen[a] * (x[a] - ctr[a]) * (x[a] - ctr[a])
    return f


@nb.njit(**_JIT)
def _penalties(e, l2, regularize_intercept, prior_icp_mean, prior_icp_prec, prior_ptr, prior_idx,
               prior_mean, prior_prec, n_features, seen, pos, p, pen, ctr):
    """pen, ctr of entity e: λ (λ·r for the intercept) around 0, or a prior's weight and
    mean where it has one (``prior_ptr`` of length 0: no prior; a NaN weight: none).
    ``seen``/``pos``: entity e's local columns (``_local_columns``). Returns whether the
    intercept has a prior."""
    pen[0] = l2 if regularize_intercept else 0.0
    ctr[0] = 0.0
    for a in range(1, p):
        pen[a] = l2
        ctr[a] = 0.0
    icp_prior = False
    if len(prior_ptr) > 0:
        if not math.isnan(prior_icp_prec[e]):
            pen[0] = prior_icp_prec[e]
            ctr[0] = prior_icp_mean[e]
            icp_prior = True
        for k in range(prior_ptr[e], prior_ptr[e + 1]):
            j = prior_idx[k]
            if 0 <= j < n_features and seen[j] == e and not math.isnan(prior_prec[k]):
                pen[1 + pos[j]] = prior_prec[k]
                ctr[1 + pos[j]] = prior_mean[k]
    return icp_prior


@nb.njit(**_JIT)
def _hessian(task, n, w, q, el_ptr, el_slot, el_val, pen, p, h):
    """Lower triangle of H (rows of h) from the means q = μ(s); returns max(1, max diag H)."""
    for a in range(p):
        for b in range(a + 1):
            h[a, b] = 0.0
    for i in range(n):
        c = w[i] * _curvature(task, q[i])
        h[0, 0] += c
        for k in range(el_ptr[i], el_ptr[i + 1]):
            sa = el_slot[k]
            cv = c * el_val[k]
            h[sa, 0] += cv
            for j in range(el_ptr[i], k + 1):  # slots ascending: el_slot[j] ≤ sa
                h[sa, el_slot[j]] += cv * el_val[j]
    top = 1.0
    for a in range(p):
        h[a, a] += pen[a]
        top = max(top, h[a, a])
    return top


@nb.njit(**_JIT)
def cholesky(h, p):
    """The lower triangle of h[:p, :p] (H) overwritten by L, LLᵀ = H, row by row so the
    inner products run over contiguous memory. False, with h spoiled, when a pivot is not
    positive (H not numerically positive definite)."""
    for j in range(p):
        for i in range(j, p):
            v = h[i, j]
            for k in range(j):
                v -= h[i, k] * h[j, k]
            if i == j:
                if not v > 0.0:
                    return False
                h[j, j] = math.sqrt(v)
            else:
                h[i, j] = v / h[j, j]
    return True


@nb.njit(**_JIT)
def cholesky_solve(h, p, rhs, out):
    """out = H⁻¹ rhs for H given by the lower triangle of h[:p, :p] (overwritten by L:
    ``cholesky``). False, with h spoiled, when H is not numerically positive definite."""
    if not cholesky(h, p):
        return False
    for i in range(p):  # L y = rhs
        v = rhs[i]
        for k in range(i):
            v -= h[i, k] * out[k]
        out[i] = v / h[i, i]
    for i in range(p - 1, -1, -1):  # Lᵀ x = y
        v = out[i]
        for k in range(i + 1, p):
            v -= h[k, i] * out[k]
        out[i] = v / h[i, i]
    return True


@nb.njit(**_JIT)
def solve_entities(row_ptr, indptr, indices, values, label, weight, offset,
                   warm_icp, warm_ptr, warm_idx, warm_val,
                   prior_icp_mean, prior_icp_prec, prior_ptr, prior_idx, prior_mean, prior_prec,
                   l2, regularize_intercept, tolerance, max_iterations, max_dim, n_features,
                   coef_ptr, coef_idx, coef_val, intercept, objective, iterations, converged, separable, stop,
                   task=LOGISTIC):
    """Solve every entity with at most ``max_dim`` coefficients; write its model at
    coef_ptr[e] (feature indices ascending), objective, iterations and flags. Entities over
    ``max_dim`` are left untouched (iterations −1) for the caller. ``warm_ptr`` of length 0:
    cold start; ``prior_ptr`` of length 0: no prior (see ``_penalties``). Returns early, the rest unsolved, once another thread sets ``stop[0]``."""
    m = len(row_ptr) - 1
    max_rows, max_nz, max_p = 0, 0, 1
    for e in range(m):
        p_e = 1 + coef_ptr[e + 1] - coef_ptr[e]
        if p_e > max_dim:
            continue
        max_rows = max(max_rows, row_ptr[e + 1] - row_ptr[e])
        max_nz = max(max_nz, indptr[row_ptr[e + 1]] - indptr[row_ptr[e]])
        max_p = max(max_p, p_e)
    s = np.empty(max_rows)
    st = np.empty(max_rows)
    u = np.empty(max_rows)
    q = np.empty(max_rows)
    el_ptr = np.empty(max_rows + 1, np.int64)
    el_slot = np.empty(max_nz, np.int64)
    el_val = np.empty(max_nz)
    seen = np.full(n_features, -1, np.int32)  # the last entity that had feature j
    pos = np.empty(n_features, np.int32)
    x = np.empty(max_p)
    xt = np.empty(max_p)
    g = np.empty(max_p)
    rhs = np.empty(max_p)
    delta = np.empty(max_p)
    pen = np.empty(max_p)
    ctr = np.empty(max_p)
    h = np.empty((max_p, max_p))
    warm = len(warm_ptr) > 0
    for e in range(m):
        if stop[0] != 0:
            return
        d = coef_ptr[e + 1] - coef_ptr[e]
        p = d + 1
        if p > max_dim:
            iterations[e] = -1
            continue
        r0, r1 = row_ptr[e], row_ptr[e + 1]
        n = r1 - r0
        z0, z1 = indptr[r0], indptr[r1]
        cols = coef_idx[coef_ptr[e]:coef_ptr[e + 1]]
        _local_columns(e, indices, z0, z1, seen, pos, cols)
        _elements(indptr[r0:r1 + 1], indices[z0:z1], values[z0:z1], pos, el_ptr, el_slot, el_val)
        y, w, o = label[r0:r1], weight[r0:r1], offset[r0:r1]
        icp_prior = _penalties(e, l2, regularize_intercept, prior_icp_mean, prior_icp_prec, prior_ptr,
                               prior_idx, prior_mean, prior_prec, n_features, seen, pos, p, pen, ctr)
        max_pen = 0.0
        for a in range(p):
            max_pen = max(max_pen, pen[a])
        wsum = 0.0
        for i in range(n):
            wsum += w[i]
        gtol = tolerance * max(1.0, wsum)
        for a in range(p):
            x[a] = 0.0
        if warm:
            x[0] = warm_icp[e]
            for k in range(warm_ptr[e], warm_ptr[e + 1]):
                j = warm_idx[k]
                if 0 <= j < n_features and seen[j] == e:  # a feature the entity still has
                    x[1 + pos[j]] = warm_val[k]
        for i in range(n):
            v = o[i] + x[0]
            for k in range(el_ptr[i], el_ptr[i + 1]):
                v += x[el_slot[k]] * el_val[k]
            s[i] = v
        f = _value(task, n, s, y, w, x, pen, ctr, p)
        its = 0
        gmax = 0.0
        while True:
            for a in range(p):
                g[a] = pen[a] * (x[a] - ctr[a])
            for i in range(n):
                q[i] = _mean(task, s[i])
                r = w[i] * (q[i] - y[i])
                g[0] += r
                for k in range(el_ptr[i], el_ptr[i + 1]):
                    g[el_slot[k]] += r * el_val[k]
            gmax = 0.0
            for a in range(p):
                gmax = max(gmax, abs(g[a]))
            if not gmax > gtol or its >= max_iterations:
                break
            for a in range(p):
                rhs[a] = -g[a]
            mu = _DAMPING
            while True:
                top = _hessian(task, n, w, q, el_ptr, el_slot, el_val, pen, p, h)
                for a in range(p):
                    h[a, a] += mu * top
                if cholesky_solve(h, p, rhs, delta):
                    break
                if mu > 1.0:  # not even H + top·I factors (non-finite H): a gradient step
                    for a in range(p):
                        delta[a] = rhs[a] / top
                    break
                mu *= _DAMPING_GROWTH
            gd = 0.0
            for a in range(p):
                gd += g[a] * delta[a]
            for i in range(n):
                v = delta[0]
                for k in range(el_ptr[i], el_ptr[i + 1]):
                    v += delta[el_slot[k]] * el_val[k]
                u[i] = v
            slack = 1e-12 * (abs(f) + 1.0)
            t = 1.0
            ft = f
            accepted = False
            for _ in range(_HALVINGS):
                for i in range(n):
                    st[i] = s[i] + t * u[i]
                for a in range(p):
                    xt[a] = x[a] + t * delta[a]
                ft = _value(task, n, st, y, w, xt, pen, ctr, p)
                if ft <= f + _ARMIJO * t * gd + slack:
                    accepted = True
                    break
                t *= 0.5
            its += 1
            if not accepted:
                break  # no step length decreases f: as far as this precision goes
            f = ft
            for i in range(n):
                s[i] = st[i]
            for a in range(p):
                x[a] = xt[a]
        # the reference's separability test (logistic; poisson: an unpenalised intercept
        # over all-zero counts drifts to −∞; linear always has a finite optimum)
        n_pos, n_one, n_zero, n_wrong = 0, 0, 0, 0
        for i in range(n):
            if w[i] > 0:
                n_pos += 1
                n_one += y[i] == 1.0
                n_zero += y[i] == 0.0
                n_wrong += (2.0 * y[i] - 1.0) * (s[i] - o[i]) <= 0.0
        sep = False
        if task == LOGISTIC and max_pen == 0.0 and n_wrong == 0:
            sep = True
        if task == LOGISTIC and not regularize_intercept and not icp_prior and (n_one == n_pos or n_zero == n_pos):
            sep = True
        if task == POISSON and not regularize_intercept and not icp_prior and n_zero == n_pos:
            sep = True
        sep = sep and n_pos > 0
        intercept[e] = x[0]
        for a in range(d):
            coef_val[coef_ptr[e] + a] = x[1 + a]
        objective[e] = f
        iterations[e] = its
        separable[e] = sep
        converged[e] = gmax <= 10.0 * gtol and not sep

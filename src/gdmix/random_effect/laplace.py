"""Per-coefficient terms of the Laplace marginal likelihood's gradient in λ (docs/design.md §7).

For entity e at its mode θ̂ (H = A(θ̂) + diag(π), A = Σ_i w_i σ_i(1−σ_i) x_i x_iᵀ the data
Hessian, x_i = (1, z_i)), the derivative of −½ log det H in λ_k has, besides −½ [H⁻¹]_kk,
a part through the mode: A moves with θ̂, and ∂θ̂/∂λ_k = −θ̂_k H⁻¹ e_k, so

    ∂/∂λ_k (−½ log det H) = −½ [H⁻¹]_kk + ½ θ̂_k g_k,
    g = H⁻¹ Σ_i w_i c'(s_i) (x_iᵀ H⁻¹ x_i) x_i,

c(s) = ∂²ℓ/∂s² the task's curvature (logistic σ(1−σ), so c' = σ(1−σ)(1−2σ); linear 1,
c' = 0: the update is then exact EM; Poisson e^s, c' = e^s).

``terms`` returns v_k = [H⁻¹]_kk − θ̂_k g_k for every coefficient: the effective posterior
variance that enters the update of λ (``l2_auto``). Without the second part (the update
then is the EM / PQL one) λ comes out 20–30 % too large on binary data with 50 rows per
entity; with it, within a few per cent (tests/test_l2_auto.py). One compiled pass per
entity: H, its Cholesky factor and full inverse (p × p, p small), then one pass over the
entity's rows, reusing the Newton kernel's element, penalty and Hessian routines.
"""
from __future__ import annotations

import numba as nb
import numpy as np

from gdmix import losses
from gdmix.random_effect.newton import LINEAR, LOGISTIC, POISSON, _JIT, cholesky
from gdmix.random_effect.newton_variances import hessian_at_model, model_scratch
from gdmix.random_effect.scipy_solver import Entities, Models, Prior, Settings
from gdmix.random_effect.vectorised import PAIRS_PER_BLOCK, _c, _prior_args, per_model_blocks


@nb.njit(inline="always", **_JIT)
def _curvature_slope(task, q):
    """d/ds of the loss's curvature, from q = μ(s): σ(1−σ)(1−2σ), 0 or e^s."""
    if task == LINEAR:
        return 0.0
    if task == POISSON:
        return q
    return q * (1.0 - q) * (1.0 - 2.0 * q)


@nb.njit(**_JIT)
def entity_terms(row_ptr, indptr, indices, values, weight, offset,
                 prior_icp_mean, prior_icp_prec, prior_ptr, prior_idx, prior_mean, prior_prec,
                 l2, regularize_intercept, n_features, coef_ptr, coef_idx, coef_val, intercept,
                 v_icp, v_val, task=LOGISTIC):
    """v_k = [H⁻¹]_kk − θ̂_k g_k of every coefficient of every entity's solved model
    (``coef_*``, ``intercept``: the kernel's output, indices ascending). NaN where H is
    not numerically positive definite."""
    q, el_ptr, el_slot, el_val, seen, pos, pen, ctr, max_p = model_scratch(row_ptr, indptr, coef_ptr, n_features)
    z = np.empty(max_p)
    col = np.empty(max_p)
    r = np.empty(max_p)
    h = np.empty((max_p, max_p))
    hinv = np.empty((max_p, max_p))
    for e in range(len(row_ptr) - 1):
        c0 = coef_ptr[e]
        n = row_ptr[e + 1] - row_ptr[e]
        w = weight[row_ptr[e]:row_ptr[e + 1]]
        p = hessian_at_model(e, row_ptr, indptr, indices, values, weight, offset,
                             prior_icp_mean, prior_icp_prec, prior_ptr, prior_idx, prior_mean, prior_prec,
                             l2, regularize_intercept, n_features, coef_ptr, coef_idx, coef_val, intercept, task,
                             q, el_ptr, el_slot, el_val, seen, pos, pen, ctr, h)
        if not cholesky(h, p):
            v_icp[e] = np.nan
            for a in range(1, p):
                v_val[c0 + a - 1] = np.nan
            continue
        for a in range(p):  # column a of H⁻¹: L z = e_a, then Lᵀ col = z
            for i in range(p):
                v = 1.0 if i == a else 0.0
                for k in range(i):
                    v -= h[i, k] * z[k]
                z[i] = v / h[i, i]
            for i in range(p - 1, -1, -1):
                v = z[i]
                for k in range(i + 1, p):
                    v -= h[k, i] * col[k]
                col[i] = v / h[i, i]
            for i in range(p):
                hinv[i, a] = col[i]
        for a in range(p):
            r[a] = 0.0
        for i in range(n):  # r = Σ_i w σ(1−σ)(1−2σ) (x_iᵀ H⁻¹ x_i) x_i, x_i = (1, elements)
            lev = hinv[0, 0]
            for k in range(el_ptr[i], el_ptr[i + 1]):
                sk, vk = el_slot[k], el_val[k]
                lev += 2.0 * vk * hinv[sk, 0]
                for j in range(el_ptr[i], el_ptr[i + 1]):
                    lev += vk * el_val[j] * hinv[sk, el_slot[j]]
            t = w[i] * _curvature_slope(task, q[i]) * lev
            r[0] += t
            for k in range(el_ptr[i], el_ptr[i + 1]):
                r[el_slot[k]] += t * el_val[k]
        for a in range(p):
            g = 0.0
            for b in range(p):
                g += hinv[a, b] * r[b]
            theta = intercept[e] if a == 0 else coef_val[c0 + a - 1]
            if a == 0:
                v_icp[e] = hinv[0, 0] - theta * g
            else:
                v_val[c0 + a - 1] = hinv[a, a] - theta * g


def terms_block(ent: Entities, settings: Settings, models: Models, prior: Prior | None) -> tuple[np.ndarray, np.ndarray]:
    """(v of the intercepts, v parallel to ``models.values``) of one block."""
    f = ent.features
    indices, coef_idx = _c(f.indices, np.int32), _c(models.indices, np.int32)
    n_features = int(max(indices.max(initial=-1), coef_idx.max(initial=-1))) + 1
    icp, val = np.zeros(ent.n_entities), np.zeros(len(models.values))
    entity_terms(_c(ent.row_ptr, np.int64), _c(f.indptr, np.int64), indices, _c(f.values, np.float64),
                 _c(ent.weight, np.float64), _c(ent.offset, np.float64), *_prior_args(prior, lambda i: i),
                 float(settings.l2), bool(settings.regularize_intercept), n_features,
                 _c(models.ptr, np.int64), coef_idx, _c(models.values, np.float64),
                 _c(models.intercept, np.float64), icp, val, losses.of(settings.task).code)
    return icp, val


def terms(ent: Entities, settings: Settings, models: Models, prior: Prior | None = None,
          workers: int = 1, pairs_per_block: int = PAIRS_PER_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """``terms_block`` over blocks of bounded work on ``workers`` threads."""
    return per_model_blocks(ent, models, prior, lambda e, m, pr: terms_block(e, settings, m, pr),
                            workers, pairs_per_block, "laplace")


def warm_up() -> float:
    """Compile the kernel (or load it from numba's cache) on a tiny problem; the seconds
    it took. ``make install`` and the image build call it beside the Newton kernel's."""
    import time

    from gdmix.random_effect.vectorised import solve_block
    from gdmix.sparse import CSR

    t0 = time.perf_counter()
    ent = Entities(np.array([0, 2, 3]), CSR(np.array([0, 1, 3, 3]), np.array([0, 0, 1], np.int32),
                                            np.array([1.0, -0.5, 2.0])),
                   np.array([1.0, 0.0, 1.0]), np.ones(3), np.zeros(3))
    settings = Settings(l2=1.0)
    terms_block(ent, settings, solve_block(ent, settings).models, None)
    return time.perf_counter() - t0

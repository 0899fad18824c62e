"""Single-process reference solution of the fixed-effect problem (numpy + scipy).

    F(b, β) = Σ_i w_i ℓ(s_i, y_i) + λ/2 ‖β‖² (+ λ/2 b² if the intercept
              is regularised),   s_i = o_i + b + x_i·β

    ∂F/∂b = Σ_i r_i (+ λ b),  ∇_β F = Xᵀ r + λ β,   r_i = w_i (μ(s_i) − y_i)

with the task's loss ℓ and mean μ (``gdmix.losses``; logistic: softplus(s) − y s, σ(s)).

Parameters are packed as θ = [b, β_0, …, β_{d−1}]. The loss is a sum, not a mean. This
is the correctness reference for the distributed TF workers; it shares ``penalty`` and
the solver with them, so the two differ only in how the data sums are computed.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from gdmix import losses

from gdmix.fixed_effect import solver


def penalty_weights(n: int, l2: float, regularize_intercept: bool) -> np.ndarray:
    """π of θ = [b, β] (n = d + 1): λ, the intercept λ·r."""
    out = np.full(n, float(l2))
    if not regularize_intercept:
        out[0] = 0.0
    return out


def penalty(theta: np.ndarray, l2: float, regularize_intercept: bool, weights: np.ndarray | None = None,
            centre: np.ndarray | None = None) -> tuple[float, np.ndarray]:
    """½ Σ_k π_k (θ_k − c_k)² and its gradient (added once, after the data sums are
    reduced). Default π: the L2 rule; default c: 0. A prior (``gdmix.priors``) gives
    per-coefficient ``weights`` (w/σ²) and ``centre`` (μ)."""
    pw = penalty_weights(len(theta), l2, regularize_intercept) if weights is None else weights
    dev = theta if centre is None else theta - centre
    g = pw * dev
    return 0.5 * float(g @ dev), g


LOGISTIC = losses.of("logistic")


def data_loss(theta: np.ndarray, X: sp.csr_matrix, y, w, offset, loss: losses.Loss = LOGISTIC) -> tuple[float, np.ndarray]:
    """Σ_i w_i ℓ(s_i, y_i) and its gradient in θ (no penalty)."""
    s = offset + theta[0] + X @ theta[1:]
    r = loss.residual(s, y, w)
    g = np.empty_like(theta)
    g[0] = r.sum()
    g[1:] = X.T @ r
    return loss.loss(s, y, w), g


def data_hessp(theta: np.ndarray, v: np.ndarray, X: sp.csr_matrix, w, offset, loss: losses.Loss = LOGISTIC) -> np.ndarray:
    """(∇²F_data) v = [1 X]ᵀ D [1 X] v,  D = diag(w_i ∂²ℓ/∂s²(s_i))."""
    s = offset + theta[0] + X @ theta[1:]
    u = loss.curvature(s, w) * (v[0] + X @ v[1:])
    out = np.empty_like(v)
    out[0] = u.sum()
    out[1:] = X.T @ u
    return out


def data_hessian(theta: np.ndarray, X: sp.csr_matrix, w, offset, loss: losses.Loss = LOGISTIC) -> np.ndarray:
    """∇²F_data = [1 X]ᵀ D [1 X] as a dense (d+1) × (d+1) matrix (for small d)."""
    s = offset + theta[0] + X @ theta[1:]
    c = loss.curvature(s, w)
    Xc = X.multiply(c[:, None]).tocsr()
    h = np.empty((len(theta), len(theta)))
    h[0, 0] = c.sum()
    h[0, 1:] = h[1:, 0] = np.asarray(Xc.sum(axis=0)).ravel()
    h[1:, 1:] = (X.T @ Xc).toarray()
    return h


def data_hessian_diag(theta: np.ndarray, X: sp.csr_matrix, w, offset, loss: losses.Loss = LOGISTIC) -> np.ndarray:
    """diag([1 X]ᵀ D [1 X]) = (Σ_i c_i, Σ_i c_i x_ij²), c = w ∂²ℓ/∂s²: O(nnz), any d."""
    s = offset + theta[0] + X @ theta[1:]
    c = loss.curvature(s, w)
    return np.concatenate([[c.sum()], X.multiply(X).T @ c])


def penalty_hessian(n: int, l2: float, regularize_intercept: bool, weights: np.ndarray | None = None) -> np.ndarray:
    return np.diag(penalty_hessp(np.ones(n), l2, regularize_intercept, weights))


def penalty_hessp(v: np.ndarray, l2: float, regularize_intercept: bool,
                  weights: np.ndarray | None = None) -> np.ndarray:
    return (penalty_weights(len(v), l2, regularize_intercept) if weights is None else weights) * v


def variances(h_diag: np.ndarray | None = None, h: np.ndarray | None = None) -> np.ndarray:
    """1/diag(H) from ``h_diag``, or diag(H⁻¹) from the matrix ``h`` (NaN if singular)."""
    if h is not None:
        try:
            return np.diag(np.linalg.inv(h)).copy()
        except np.linalg.LinAlgError:
            return np.full(len(h), np.nan)
    with np.errstate(divide="ignore"):
        return 1.0 / np.asarray(h_diag, float)


def objective(theta: np.ndarray, X: sp.csr_matrix, y, w, offset, l2: float,
              regularize_intercept: bool, task_loss: losses.Loss = LOGISTIC) -> tuple[float, np.ndarray]:
    """F(θ) and ∇F(θ), θ = [b, β]."""
    theta = np.asarray(theta, dtype=np.float64)
    loss, g = data_loss(theta, X, y, w, offset, task_loss)
    p, pg = penalty(theta, l2, regularize_intercept)
    return loss + p, g + pg


def gtol(tolerance: float, total_weight: float) -> float:
    """The gradient ∞-norm target: the config's tolerance relative to the data size Σw."""
    return tolerance * max(1.0, float(total_weight))


def fit(X: sp.csr_matrix, y, w, offset, l2: float, regularize_intercept: bool, x0=None,
        tol: float = 1e-10, max_iter: int = 1000, newton: bool = False,
        task: str = "logistic") -> tuple[float, np.ndarray, dict]:
    """Minimise F; returns (intercept, coef, info). ``x0`` is a warm start θ = [b, β].

    Plain L-BFGS-B by default (an independent check of the workers' trust-region Newton
    solver); ``newton=True`` uses the workers' method with exact Hessian-vector products.
    """
    X = sp.csr_matrix(X, dtype=np.float64)
    y, w, offset = (np.asarray(a, dtype=np.float64) for a in (y, w, offset))
    d = X.shape[1]
    theta0 = np.zeros(d + 1) if x0 is None else np.asarray(x0, dtype=np.float64)
    if theta0.shape != (d + 1,):
        raise ValueError(f"x0 has shape {theta0.shape}, expected ({d + 1},)")
    loss = losses.of(task)
    hessp = None
    if newton:
        def hessp(t, v):
            return data_hessp(t, v, X, w, offset, loss) + penalty_hessp(v, l2, regularize_intercept)
    theta, info = solver.solve(lambda t: objective(t, X, y, w, offset, l2, regularize_intercept, loss),
                               theta0, gtol=gtol(tol, w.sum()), max_iter=max_iter, hessp=hessp)
    return float(theta[0]), theta[1:], info

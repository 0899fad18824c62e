"""The exact step along the flat directions of plain block coordinate descent.

After a random-effect coordinate c is trained with the fixed effect's scores as offsets,
some directions change no training score of an active entity: the "shared" directions S,
namely the intercept and every feature j of c's bag that the fixed effect's bag also has
(same name and term) when both bags read the same input columns (so x_ij = z_ij).
Moving t_j from every model of c that has feature j into the fixed effect,

    β_j += t_j,      α_{e,j} −= t_j   for e ∈ E_j (the entities whose model has feature j),

keeps s_i for rows of active entities, while rows of passive entities (no model) move by
x_i·t. Plain block descent only crawls along S (the penalties drag a little per pass), so
we take the exact step: minimise over t ∈ R^|S| the convex

    g(t) = Σ_{passive i} w_i ℓ(s_i + x_i·t)
           + Σ_j pf_j/2 (β_j + t_j)² + Σ_j pc_j/2 Σ_{e∈E_j} (α_ej − t_j)²,

where ℓ(s) is the task's loss (``gdmix.losses``; logistic log(1+exp(s)) − y s, with μ = σ
below; linear ½(s − y)², μ = s; poisson e^s − y s, μ = e^s), pf_j = λ_f r^f_j, pc_j = λ_c r^c_j (r = 0 for an
unpenalised intercept, else 1). With A_j = Σ_{e∈E_j} α_ej and n_j = |E_j|:

    ∇g = Xᵀ w (μ(s + X t) − y) + pf∘(β + t) − pc∘(A − n∘t)
    ∇²g = Xᵀ diag(w μ'(s + X t)) X + diag(pf + pc∘n).

Without passive rows it separates: t_j = (pc_j A_j − pf_j β_j) / (pf_j + pc_j n_j).
With passive rows: damped Newton (backtracking on g). A direction with zero curvature
(∇²g_jj = 0: no penalty, no passive row) is flat for g too, and stays at t_j = 0.
The step never increases the objective: t = 0 is feasible.

With a prior (``gdmix.priors``) each coefficient has its own penalty weight and centre:
β_j's term is pf_j/2 (β_j + t_j − cf_j)², α_ej's is p_ej/2 (α_ej − t_j − c_ej)². Then g has
the same form with β_j → β_j − cf_j, pc_j n_j → N_j = Σ_{e∈E_j} p_ej and
pc_j A_j → A'_j = Σ_{e∈E_j} p_ej (α_ej − c_ej) (pc set to 1), so the closed form
t_j = (A'_j − pf_j (β_j − cf_j)) / (pf_j + N_j) and the Newton solve stay exact:
``build_problem`` takes the per-coefficient weights and centres.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import scipy.sparse as sp

from gdmix import losses


@dataclass
class Problem:
    """The arrays of g, one entry per shared direction (conventionally the intercept first)."""
    beta: np.ndarray  # the fixed effect's coefficient of each direction
    alpha_sum: np.ndarray  # A_j = Σ_{e∈E_j} α_ej
    alpha_count: np.ndarray  # n_j = |E_j|
    pen_fixed: np.ndarray  # λ_f r^f_j
    pen_random: np.ndarray  # λ_c r^c_j
    passive_x: sp.csr_matrix | None = None  # (m, |S|): passive rows' value per direction (intercept: 1)
    passive_score: np.ndarray | None = None  # their current total score s_i
    passive_label: np.ndarray | None = None
    passive_weight: np.ndarray | None = None
    loss: losses.Loss = losses.of("logistic")  # the task's loss on the passive rows

    @property
    def n_passive(self) -> int:
        return 0 if self.passive_x is None else self.passive_x.shape[0]

    def value(self, t: np.ndarray) -> float:
        """g(t) up to a constant that does not depend on t (the Σ α² term)."""
        t = np.asarray(t, float)
        v = 0.5 * float(np.sum(self.pen_fixed * (self.beta + t) ** 2))
        v += 0.5 * float(np.sum(self.pen_random * (self.alpha_count * t * t - 2 * self.alpha_sum * t)))
        if self.n_passive:
            s = self.passive_score + self.passive_x @ t
            v += self.loss.loss(s, self.passive_label, self.passive_weight)
        return v

    def gradient(self, t: np.ndarray) -> np.ndarray:
        g = self.pen_fixed * (self.beta + t) - self.pen_random * (self.alpha_sum - self.alpha_count * t)
        if self.n_passive:
            s = self.passive_score + self.passive_x @ t
            g = g + self.passive_x.T @ self.loss.residual(s, self.passive_label, self.passive_weight)
        return g

    def hessian(self, t: np.ndarray) -> np.ndarray:
        h = np.diag(self.pen_fixed + self.pen_random * self.alpha_count).astype(float)
        if self.n_passive:
            d = sp.diags(self.loss.curvature(self.passive_score + self.passive_x @ t, self.passive_weight))
            x = self.passive_x
            h = h + np.asarray((x.T @ d @ x).todense())
        return h


def solve(problem: Problem, tol: float = 1e-12, max_iterations: int = 100) -> np.ndarray:
    """The minimiser t of g (zeros for flat directions); see the module docstring."""
    d = len(problem.beta)
    t = np.zeros(d)
    curv0 = np.diag(problem.hessian(t))
    free = curv0 > 0
    if not free.any():
        return t
    if problem.n_passive == 0:
        num = problem.pen_random * problem.alpha_sum - problem.pen_fixed * problem.beta
        t[free] = num[free] / curv0[free]
        return t
    # Stop when the gradient is negligible relative to the problem's scale.
    scale = max(1.0, float(np.sum(problem.passive_weight)), float(curv0.max()))
    value = problem.value(t)
    for _ in range(max_iterations):
        g = problem.gradient(t)[free]
        if np.max(np.abs(g)) <= tol * scale:
            break
        h = problem.hessian(t)[np.ix_(free, free)]
        try:
            step = np.linalg.solve(h, -g)
        except np.linalg.LinAlgError:
            step = np.linalg.lstsq(h, -g, rcond=None)[0]
        slope = float(g @ step)
        if slope >= 0:  # numerically no descent left
            break
        a = 1.0
        while True:
            cand = t.copy()
            cand[free] += a * step
            new = problem.value(cand)
            if new <= value + 1e-4 * a * slope or a < 1e-10:
                break
            a *= 0.5
        if new > value:  # no decrease possible at machine precision
            break
        t, value = cand, new
    return t


def shared_features(fixed_index: pa.Table, random_index: pa.Table, same_source: bool) -> tuple[np.ndarray, np.ndarray]:
    """(fixed-bag indices, random-bag indices) of the features both bags share.

    Bags share a feature only when they read the same input columns (``same_source``)
    and the feature has the same (name, term) in both feature indexes (schema.FEATURE_INDEX).
    Sorted by the random bag's index.
    """
    if not same_source:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    f = fixed_index.select(["index", "name", "term"]).rename_columns(["fixed", "name", "term"])
    r = random_index.select(["index", "name", "term"]).rename_columns(["random", "name", "term"])
    j = f.join(r, keys=["name", "term"], join_type="inner").sort_by("random")
    return (j.column("fixed").to_numpy().astype(np.int64), j.column("random").to_numpy().astype(np.int64))


def directions(n_random: int, random_idx: np.ndarray) -> np.ndarray:
    """Per random-bag feature index, its shared direction (1..|S|-1; 0 is the intercept) or -1."""
    out = np.full(n_random, -1, np.int64)
    out[np.asarray(random_idx, np.int64)] = np.arange(1, len(random_idx) + 1)
    return out


def build_problem(intercepts: np.ndarray, indices: np.ndarray, values: np.ndarray, direction: np.ndarray,
                  beta: np.ndarray, pen_fixed: np.ndarray, pen_random: np.ndarray,
                  passive=None, weighted=None, task: str = "logistic") -> Problem:
    """g's arrays from the random-effect models (one intercept each; all their coefficients
    flattened: ``indices`` random-bag feature indices, ``values``) and, optionally, the
    passive rows as ``(csr, score, label, weight)`` with ``csr`` a ``gdmix.sparse.CSR`` over
    the random bag. ``weighted``: per-coefficient penalties (a prior), as
    ``(fixed_centre, intercept_weight, intercept_centre, value_weight, value_centre)``
    (per direction; per model; per entry of ``values``), replacing ``pen_random`` and
    centring ``beta`` (see the module docstring)."""
    d = len(beta)
    dj = direction[indices]
    m = dj >= 0
    if weighted is None:
        alpha_sum = np.concatenate([[float(np.sum(intercepts))], np.bincount(dj[m] - 1, values[m], d - 1)])
        alpha_count = np.concatenate([[len(intercepts)], np.bincount(dj[m] - 1, minlength=d - 1)]).astype(float)
        p = Problem(np.asarray(beta, float), alpha_sum, alpha_count, np.asarray(pen_fixed, float),
                    np.asarray(pen_random, float))
    else:
        fixed_centre, icp_w, icp_c, val_w, val_c = weighted
        alpha_sum = np.concatenate([[float(np.sum(icp_w * (intercepts - icp_c)))],
                                    np.bincount(dj[m] - 1, val_w[m] * (values[m] - val_c[m]), d - 1)])
        alpha_count = np.concatenate([[float(np.sum(icp_w))], np.bincount(dj[m] - 1, val_w[m], d - 1)])
        p = Problem(np.asarray(beta, float) - fixed_centre, alpha_sum, alpha_count, np.asarray(pen_fixed, float),
                    np.ones(d))
    if passive is not None and passive[0].n_rows:
        csr, score, label, weight = passive
        n = csr.n_rows
        dr = direction[csr.indices]
        keep = dr >= 0
        rows = np.concatenate([np.arange(n), csr.row_ids()[keep]])
        cols = np.concatenate([np.zeros(n, np.int64), dr[keep]])
        vals = np.concatenate([np.ones(n), csr.values[keep]])
        p.passive_x = sp.csr_matrix((vals, (rows, cols)), shape=(n, d))
        p.passive_score = np.asarray(score, float)
        p.passive_label = np.asarray(label, float)
        p.passive_weight = np.asarray(weight, float)
        p.loss = losses.of(task)
    return p


def apply(t: np.ndarray, intercepts: np.ndarray, indices: np.ndarray, values: np.ndarray,
          direction: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The random-effect models after the step: (intercepts − t_0, α_ej − t_j on shared j).
    The fixed effect gains +t (its intercept t_0, its shared coefficients t_1..)."""
    dj = direction[indices]
    m = dj >= 0
    new_values = np.array(values, float, copy=True)
    new_values[m] -= t[dj[m]]
    return np.asarray(intercepts, float) - t[0], new_values

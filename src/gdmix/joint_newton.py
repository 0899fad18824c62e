"""One inexact Newton step on the joint objective, preconditioned by the block solves
(docs/design.md §2.5).

The objective of docs/design.md §1 over the coordinates' stacked coefficients θ = (θ_1, …,
θ_B), one block per coordinate with design X_b (the entity-crossed columns of a random
effect, [1 | x] of a fixed effect), per-column penalty weights p and centres c:

    F(θ) = Σ_i w_i ℓ(s_i, y_i) + ½ Σ_k p_k (θ_k − c_k)²,     s = o + Σ_b X_b θ_b,
    g    = ∇F  = (X_bᵀ r)_b + p ∘ (θ − c),                   r = w ∘ (μ(s) − y),
    H v  = (X_bᵀ (D ∘ Σ_b' X_b' v_b'))_b + p ∘ v,           D = w μ'(s),

with ℓ the task's loss and μ its mean response (``gdmix.losses``; logistic: μ = σ).

Block coordinate descent solves each diagonal block H_bb exactly but couples blocks only
through the scores, one block at a time: with crossed effects (per-user and per-movie
models, both touching every row) the error along the few directions that mix blocks
shrinks by a constant factor per pass. Conjugate gradients on H d = −g with the
block-diagonal preconditioner M = blockdiag(H_11, …, H_BB) (block Jacobi) removes them:
M⁻¹H has its eigenvalues clustered near 1 except the few slow coupling directions, and CG
removes one of those per iteration. A random effect's H_bb is itself block-diagonal by
entity (entities own disjoint rows), so M⁻¹ is one small dense solve per entity plus one
(d+1)×(d+1) solve for the fixed effect, the very systems the block solvers factor.

CG stops when ‖H d + g‖ ≤ ``rtol``·‖g‖ or after ``max_iterations`` (an inexact Newton
step: the closer to the optimum, the smaller the forcing term must be for fast local
convergence; a fixed small ``rtol`` gives it), or at a direction of non-positive curvature
(H is positive semi-definite: only rounding gives one; CG then keeps what it has).

The step length is exact: s is linear in θ, so along θ + t d, with u = X d (one more
product with the blocks),

    φ(t)   = Σ_i w_i ℓ(s_i + t u_i, y_i) + ½ Σ_k p_k (θ_k − c_k + t d_k)²,
    φ'(t)  = Σ_i r_i(t) u_i + Σ_k p_k d_k (θ_k − c_k + t d_k),
    φ''(t) = Σ_i D_i(t) u_i² + Σ_k p_k d_k²,

a one-dimensional convex problem solved by safeguarded Newton inside a bracket. The step
is taken only when φ(t) < φ(0): otherwise t = 0 and θ is kept (the plain pass's point), so
F never rises.

Cost: one HVP per CG iteration, i.e. one product with every X_b and every X_bᵀ (a pass
over each coordinate's rows); Xv and Xᵀr are sums and concatenations of per-coordinate
pieces, so each runs where the coordinate's rows live, with one all-reduce of the row
vector per product. The preconditioner's factorisations are per coordinate (per entity).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from gdmix import block_hessian, losses

def _dot(a: np.ndarray, b: np.ndarray) -> float:
    """a·b without BLAS: a threaded BLAS dot on a busy machine waits on its threads, which
    for vectors of this size costs 100× the arithmetic (measured: 6 ms against 50 µs)."""
    return float(np.sum(a * b))


def _norm(a: np.ndarray) -> float:
    return _dot(a, a) ** 0.5


RTOL = 1e-10  # CG's relative residual: the step is nearly the exact Newton step
MAX_CG = 100  # CG iterations at most (one Hessian-vector product each)


@dataclass
class Problem:
    """F's data: per coordinate block its design (rows × its columns), penalty weights and
    centres; the rows' labels, weights and offsets (every other coordinate's score included);
    the task's loss (``gdmix.losses``: ℓ, its residual w(μ(s) − y) and curvature w μ'(s))."""
    blocks: list[sp.csr_matrix]
    penalty: list[np.ndarray]
    centre: list[np.ndarray]
    y: np.ndarray
    w: np.ndarray
    o: np.ndarray
    loss: losses.Loss = losses.of(losses.LOGISTIC)

    def __post_init__(self):
        self.starts = np.cumsum([0] + [x.shape[1] for x in self.blocks])
        self.pen = np.concatenate(self.penalty) if self.penalty else np.zeros(0)
        self.ctr = np.concatenate(self.centre) if self.centre else np.zeros(0)

    def parts(self, v: np.ndarray) -> list[np.ndarray]:
        return [v[a:b] for a, b in zip(self.starts[:-1], self.starts[1:])]

    def apply(self, v: np.ndarray) -> np.ndarray:
        """X v = Σ_b X_b v_b: one piece per coordinate, summed."""
        out = np.zeros(len(self.y))
        for x, part in zip(self.blocks, self.parts(v)):
            out += x @ part
        return out

    def apply_t(self, r: np.ndarray) -> np.ndarray:
        """Xᵀ r = (X_bᵀ r)_b: one piece per coordinate, concatenated."""
        return np.concatenate([x.T @ r for x in self.blocks])  # a CSC view: no transposed copy held

    def scores(self, theta: np.ndarray) -> np.ndarray:
        return self.o + self.apply(theta)

    def value(self, theta: np.ndarray, s: np.ndarray | None = None) -> float:
        s = self.scores(theta) if s is None else s
        dev = theta - self.ctr
        return self.loss.loss(s, self.y, self.w) + 0.5 * _dot(self.pen, dev * dev)

    def gradient(self, theta: np.ndarray, s: np.ndarray) -> np.ndarray:
        return self.apply_t(self.loss.residual(s, self.y, self.w)) + self.pen * (theta - self.ctr)


# A connected block of H_bb up to this many columns is inverted densely (an entity's model,
# a small fixed effect); a larger one (a fixed effect over a big vocabulary) by sparse LU.
DENSE_MAX = 512


class _BlockDiagonalInverse:
    """x ↦ H⁻¹x for H = XᵀDX + diag(p) + ridge, which is block-diagonal over the groups of
    columns no row crosses (``gdmix.block_hessian``: an entity's intercept and features in a
    random effect's block; every column of a fixed effect's). The groups of up to
    ``DENSE_MAX`` columns are assembled densely in one pass over the rows and those of each
    size inverted as one batch; a larger one (a fixed effect over a big vocabulary) is
    formed as a sparse matrix and factorised by sparse LU. A tiny ridge 10⁻¹²·max diag
    keeps an unpenalised, data-less column from making a block singular. Neither XᵀDX
    nor a per-entry index array is ever formed for the small groups: one sparse LU of a
    million-entity block ran out of SuperLU's workspace, and the sparse assembly took
    several times the design's memory."""

    def __init__(self, x: sp.csr_matrix, curvature: np.ndarray, penalty: np.ndarray):
        n = x.shape[1]
        label = block_hessian.groups(x.indptr, x.indices, n)
        sizes = np.bincount(label, minlength=int(label.max(initial=-1)) + 1)
        order = np.argsort(label, kind="stable")  # columns grouped by group, ascending within
        starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        local = np.empty(n, np.int64)
        local[order] = np.arange(n) - starts[label[order]]  # a column's place within its group
        small = sizes <= DENSE_MAX
        # the small groups' blocks laid out by size, so those of one size are one contiguous run
        laid = np.argsort(np.where(small, sizes, 0), kind="stable")
        laid = laid[small[laid]]
        ends = np.cumsum(sizes[laid].astype(np.int64) ** 2)
        offset = np.full(len(sizes), -1, np.int64)
        offset[laid] = ends - sizes[laid].astype(np.int64) ** 2
        flat, diag = block_hessian.dense_blocks(x.indptr, x.indices, x.data, curvature, label, local, sizes,
                                                offset, int(ends[-1]) if len(ends) else 0, n)
        diag += penalty
        ridge = 1e-12 * max(1.0, float(diag.max(initial=0.0)))
        j = np.flatnonzero(small[label])
        flat[offset[label[j]] + local[j] * (sizes[label[j]] + 1)] += penalty[j] + ridge
        self.dense, self.sparse = [], []  # (columns (m, k), inverses (m, k, k)); (columns, solve)
        for k in np.unique(sizes[laid]):
            g = laid[sizes[laid] == k]
            at = offset[g[0]]
            blocks = flat[at:at + len(g) * k * k].reshape(len(g), k, k)
            self.dense.append((order[starts[g][:, None] + np.arange(k)], np.linalg.inv(blocks)))
        del flat
        for g in np.flatnonzero(~small):
            c = order[starts[g]:starts[g + 1]]
            xc = x[:, c]
            h = xc.T @ (sp.diags(curvature) @ xc) + sp.diags(penalty[c] + ridge)
            self.sparse.append((c, spla.factorized(h.tocsc())))

    def __call__(self, r: np.ndarray) -> np.ndarray:
        out = np.empty_like(r)
        for cols, inv in self.dense:
            out[cols] = np.einsum("mij,mj->mi", inv, r[cols])
        for cols, solve in self.sparse:
            out[cols] = solve(r[cols])
        return out


class BlockJacobi:
    """M⁻¹ = blockdiag(H_bb)⁻¹ at the scores s: each coordinate's own Hessian, inverted
    once (a random effect's block is block-diagonal by entity, so its inverse is each
    entity's own: ``_BlockDiagonalInverse``)."""

    def __init__(self, problem: Problem, curvature: np.ndarray):
        self.problem = problem
        self.solves = [_BlockDiagonalInverse(x, curvature, p) for x, p in zip(problem.blocks, problem.penalty)]

    def __call__(self, r: np.ndarray) -> np.ndarray:
        return np.concatenate([solve(part) for solve, part in zip(self.solves, self.problem.parts(r))])


def pcg(hessp, g: np.ndarray, precond, rtol: float = RTOL, max_iterations: int = MAX_CG):
    """Approximately solve H d = −g by preconditioned conjugate gradients from d = 0;
    returns (d, iterations, ‖H d + g‖/‖g‖)."""
    gnorm = _norm(g)
    d = np.zeros_like(g)
    if gnorm == 0.0:
        return d, 0, 0.0
    r = -g.copy()
    z = precond(r)
    p = z.copy()
    rz = _dot(r, z)
    it = 0
    for it in range(1, max_iterations + 1):
        hp = hessp(p)
        curv = _dot(p, hp)
        if curv <= 0.0 or not np.isfinite(curv):  # H ⪰ 0: only rounding; keep what we have
            it -= 1
            break
        a = rz / curv
        d += a * p
        r -= a * hp
        if _norm(r) <= rtol * gnorm:
            break
        z = precond(r)
        rz_new = _dot(r, z)
        p = z + (rz_new / rz) * p
        rz = rz_new
    return d, it, _norm(r) / gnorm


def line_search(problem: Problem, theta: np.ndarray, s: np.ndarray, d: np.ndarray, u: np.ndarray,
                max_iterations: int = 100) -> float:
    """The minimiser t ≥ 0 of φ(t) = F(θ + t d) (u = X d), by safeguarded Newton in a bracket."""
    dev, pd, pdd = theta - problem.ctr, problem.pen * d, _dot(problem.pen, d * d)
    pdev = _dot(pd, dev)
    y, w = problem.y, problem.w

    def slope(t):
        st = s + t * u
        return (_dot(problem.loss.residual(st, y, w), u) + pdev + t * pdd,
                _dot(problem.loss.curvature(st, w), u * u) + pdd)

    g0, _ = slope(0.0)
    if not g0 < 0.0:  # not a descent direction: no step
        return 0.0
    lo, hi, t = 0.0, None, 1.0
    while hi is None:  # bracket the minimiser: φ' < 0 at lo, ≥ 0 at hi
        gt, _ = slope(t)
        if gt >= 0.0:
            hi = t
        elif t > 1e8:
            return t
        else:
            lo, t = t, 2.0 * t
    t = min(1.0, hi)
    scale = abs(g0)
    for _ in range(max_iterations):
        gt, ht = slope(t)
        if abs(gt) <= 1e-14 * scale or hi - lo <= 1e-15 * hi:
            break
        if gt < 0.0:
            lo = t
        else:
            hi = t
        nt = t - gt / ht if ht > 0 else 0.5 * (lo + hi)
        t = nt if lo < nt < hi else 0.5 * (lo + hi)
    return t


@dataclass
class StepResult:
    theta: np.ndarray
    objective_before: float
    objective_after: float
    step_length: float  # t (0: the step would not lower F; θ kept)
    cg_iterations: int
    cg_residual: float  # ‖H d + g‖ / ‖g‖ where CG stopped
    gradient_norm: float  # ‖∇F‖∞ at the starting point


def step(problem: Problem, theta: np.ndarray, direction: np.ndarray | None = None,
         rtol: float = RTOL, max_iterations: int = MAX_CG) -> StepResult:
    """θ + t d with d the block-Jacobi PCG Newton direction (or ``direction``, given) and t
    the exact line search; θ unchanged when F would not decrease (see the module docstring)."""
    s = problem.scores(theta)
    f0 = problem.value(theta, s)
    g = problem.gradient(theta, s)
    its, res = 0, 0.0
    if direction is None:
        curv = problem.loss.curvature(s, problem.w)

        def hessp(v):
            return problem.apply_t(curv * problem.apply(v)) + problem.pen * v

        direction, its, res = pcg(hessp, g, BlockJacobi(problem, curv), rtol, max_iterations)
    u = problem.apply(direction)
    t = line_search(problem, theta, s, direction, u)
    if t > 0.0:
        cand = theta + t * direction
        f1 = problem.value(cand, s + t * u)
        if f1 < f0:
            return StepResult(cand, f0, f1, t, its, res, float(np.max(np.abs(g), initial=0.0)))
    return StepResult(theta.copy(), f0, f0, 0.0, its, res, float(np.max(np.abs(g), initial=0.0)))


def minimise(problem: Problem, theta: np.ndarray, gtol: float = 1e-8, max_steps: int = 30
             ) -> tuple[np.ndarray, list[StepResult]]:
    """Newton's method on F from θ: ``step`` until ‖∇F‖∞ ≤ ``gtol`` at a step's start, or no
    step lowers F (at machine precision), or ``max_steps``. F is convex and each step
    exact in its line search, so near the optimum it converges quadratically: a reference
    optimum for problems too large for ``gdmix.joint``'s direct solve. Returns the last θ
    and every step's result (the last one's ``gradient_norm`` certifies the point)."""
    history = []
    for _ in range(max_steps):
        res = step(problem, theta)
        history.append(res)
        theta = res.theta
        if res.gradient_norm <= gtol or res.step_length == 0.0:
            break
    return theta, history

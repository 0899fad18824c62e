"""Per-entity logistic regressions solved many at a time: batched Newton on flat arrays.

Same problem as ``scipy_solver`` (the reference this is tested against). Entity e owns
rows R_e and the features F_e present in them (local indexing); with x_i = (1, z_i) and
α = (a, b) ∈ R^{p_e}, p_e = 1 + |F_e|,

    f_e(α) = Σ_{i∈R_e} w_i [log(1 + exp(s_i)) − y_i s_i] + ½ Σ_k π_k α_k²,   s_i = o_i + x_i·α,
    g_e    = Σ_{i∈R_e} w_i (σ(s_i) − y_i) x_i + π ∘ α,
    H_e    = Σ_{i∈R_e} w_i σ(s_i)(1 − σ(s_i)) x_i x_iᵀ + diag(π),

π_k = λ for coefficients, λ·r for the intercept (r = 1 when it is penalised).

Every entity of a block takes damped Newton steps together:

    (H_e + μ_e I) δ_e = −g_e,    μ_e = 1e-12 · max(1, max diag H_e),

(μ only keeps the solve defined where H_e is singular: λ = 0, or an unpenalised intercept
whose weights σ(1 − σ) underflow), then a backtracking line search per entity,
α_e ← α_e + t_e δ_e with t_e = 2^{-j} the first to satisfy Armijo's condition
f_e(α_e + t δ_e) ≤ f_e(α_e) + 10⁻⁴ t g_eᵀδ_e (up to rounding of f_e). An entity stops when
max_k |g_e,k| ≤ tolerance · max(1, Σ_{i∈R_e} w_i), the reference's rule; it is converged
when that holds (to 10× as the reference allows) and it is not separable, with the
reference's definition of separable (λ = 0 and the fitted x·α classifies every weighted
row with a positive margin, or r = 0 and one class: no finite optimum; the loop then
stops at ``max_iterations`` or when the gradient underflows the tolerance).

How the arrays are laid out (no Python loop per row or per entity on the hot path):

- the coefficients of all entities of a block are one flat vector, entity e's at
  ``xoff[e] : xoff[e] + p_e`` (intercept first, then F_e ascending), entities ordered by
  p_e so the entities of one dimension are one contiguous run;
- each row becomes its "elements": (position in α, value), the intercept first, then its
  features by local slot, a repeated feature summed into one element; as a CSR matrix X
  (rows × the block's coefficients, built once per block) s = o + X x and
  g = Xᵀ r + π ∘ α;
- H_e is the sum over rows of the upper-triangle products v_a v_b of the row's elements:
  a sparse matrix M (one column per row, one entry per element pair, indexed by its slot
  in the packed H), built once per block (rows of equal element count at a time), gives
  every entity's packed H as one product M c, c_i = w_i σ(s_i)(1 − σ(s_i)); the work is
  Σ_i nnz_i², not Σ_e |R_e| p_e² (rows are sparse);
- the p_e × p_e systems of one dimension are solved as one batch: a batched Cholesky
  that reads the upper triangles in place, then vectorised triangular substitution
  (``_batched_solve``);
- a step moves the scores by t_e X δ, which the line search has already formed, so the
  scores are updated, not recomputed;
- when fewer than half of a block's entities are still iterating the block is rebuilt
  from the unfinished entities only, so the tail costs what it touches.

Entities with more than ``MAX_DIM`` coefficients go to the reference scipy solver (their
dense H would be large and they are rare). Blocks are bounded in size (``PAIRS_PER_BLOCK``
Hessian products), so memory stays bounded; blocks run over a process pool.
"""
from __future__ import annotations

import concurrent.futures as cf
import time

import numpy as np
import scipy.sparse as sp
from scipy.special import expit

from gdmix.random_effect import scipy_solver
from gdmix.random_effect.scipy_solver import (DEFAULT_TIMEOUT_SECONDS, Entities, Models, Result, Settings,
                                              make_executor, terminate)
from gdmix.sparse import CSR

__all__ = ["solve", "solve_block", "make_executor", "terminate", "MAX_DIM", "PAIRS_PER_BLOCK"]

MAX_DIM = 256  # entities with more coefficients are solved by the scipy reference
PAIRS_PER_BLOCK = 2_000_000  # Hessian products per block: ~12 bytes each (value, int32 slot) while it is solved
_ARMIJO = 1e-4
_HALVINGS = 60
_DAMPING = 1e-12
_CHOLESKY_MIN_BATCH = 32  # below this a batched LU solve beats 2p vectorised substitution steps
REBUILD_MIN = 512  # rebuilding a block smaller than this costs more than it saves


# --- gathering entities -------------------------------------------------------------------

def _segments(starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """The indices start_k .. start_k + len_k - 1 of every segment, concatenated."""
    total = int(lens.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    ends = np.cumsum(lens)
    return np.repeat(starts - (ends - lens), lens) + np.arange(total)


def take(ent: Entities, idx: np.ndarray) -> Entities:
    """Entities ``idx`` (in that order) as one self-contained block."""
    return _take(ent, idx)[0]


def _take(ent: Entities, idx: np.ndarray):
    """(take(ent, idx), the rows taken, the nonzeros taken)."""
    counts = np.diff(ent.row_ptr)
    rows = _segments(ent.row_ptr[:-1][idx], counts[idx])
    f = ent.features
    nnz = np.diff(f.indptr)[rows]
    nz = _segments(f.indptr[:-1][rows], nnz)
    sub = Entities(np.concatenate([[0], np.cumsum(counts[idx])]).astype(np.int64),
                   CSR(np.concatenate([[0], np.cumsum(nnz)]).astype(np.int64), f.indices[nz], f.values[nz]),
                   ent.label[rows], ent.weight[rows], ent.offset[rows])
    return sub, rows, nz


def _take_local(ent: Entities, idx: np.ndarray, local):
    """take(ent, idx) and its ``_local_columns``, derived from ``local`` (those of ``ent``)
    without sorting again: an entity's local columns do not depend on where it sits."""
    keys, inv, big, _, _ = local
    sub, _, nz = _take(ent, idx)
    k_ent = keys // big
    d = np.bincount(k_ent, minlength=ent.n_entities)[idx]
    kptr = np.concatenate([[0], np.cumsum(np.bincount(k_ent, minlength=ent.n_entities))])
    kpos = _segments(kptr[:-1][idx], d)
    new_keys = np.repeat(np.arange(len(idx), dtype=np.int64), d) * big + (keys[kpos] - k_ent[kpos] * big)
    remap = np.empty(len(keys), np.int64)
    remap[kpos] = np.arange(len(kpos))
    row_ent = np.repeat(np.arange(len(idx)), np.diff(sub.row_ptr))
    nz_ent = np.repeat(row_ent, np.diff(sub.features.indptr))
    return sub, (new_keys, remap[inv[nz]], big, row_ent, nz_ent)


def take_models(m: Models, idx: np.ndarray) -> Models:
    lens = np.diff(m.ptr)[idx]
    flat = _segments(m.ptr[:-1][idx], lens)
    return Models(m.intercept[idx], np.concatenate([[0], np.cumsum(lens)]).astype(np.int64),
                  m.indices[flat], m.values[flat])


def _local_columns(ent: Entities, extra_max: int = -1):
    """Per entity, its features ascending: (keys ent·G + feature sorted, inverse per nonzero, G)."""
    f = ent.features
    row_ent = np.repeat(np.arange(ent.n_entities), np.diff(ent.row_ptr))
    nz_ent = np.repeat(row_ent, np.diff(f.indptr))
    g_max = max(int(f.indices.max()) if len(f.indices) else -1, extra_max)
    big = g_max + 1 if g_max >= 0 else 1
    keys, inv = np.unique(nz_ent * big + f.indices.astype(np.int64), return_inverse=True)
    return keys, inv.reshape(-1), big, row_ent, nz_ent


# --- one block of entities of increasing dimension ------------------------------------------

def _csr(data: np.ndarray, indices: np.ndarray, indptr: np.ndarray, shape: tuple[int, int]) -> sp.csr_matrix:
    """A CSR matrix on these arrays, with 32-bit indices where they fit (faster products)."""
    small = max(shape) < 2**31 - 1 and len(data) < 2**31 - 1
    it = np.int32 if small else np.int64
    return sp.csr_matrix((data, indices.astype(it, copy=False), indptr.astype(it, copy=False)), shape=shape)



def _pair_matrix(k, el_ptr, el_slot, el_val, row_hoff, row_p, size):
    """M (CSC, packed Hessian entries × rows) with M[hoff + p·a + b, i] = v_a v_b summed over
    row i's element pairs a ≤ b.

    Rows are taken in runs of equal element count k: each run's pairs are one (rows,
    k(k+1)/2) gather with the same upper-triangle pattern, so no index array the size of
    all pairs is built."""
    order = np.argsort(k, kind="stable")
    sorted_k = k[order]
    cuts = np.concatenate([[0], np.flatnonzero(np.diff(sorted_k)) + 1, [len(k)]])
    vals, keys = [], []
    for a, b in zip(cuts[:-1], cuts[1:]):
        rows = order[a:b]
        kv = int(sorted_k[a])
        at = el_ptr[rows][:, None] + np.arange(kv)
        v, slot = el_val[at], el_slot[at]
        iu, ju = np.triu_indices(kv)
        vals.append((v[:, iu] * v[:, ju]).ravel())
        keys.append((row_hoff[rows, None] + slot[:, iu] * row_p[rows, None] + slot[:, ju]).ravel())
    data = np.concatenate(vals) if vals else np.zeros(0)
    idx = np.concatenate(keys) if keys else np.zeros(0, np.int64)
    n_pairs = k * (k + 1) // 2
    ptr = np.concatenate([[0], np.cumsum(n_pairs)]).astype(np.int64)
    if not np.all(order[1:] > order[:-1]):
        # Back to row order, so M c scatters each entity's rows into its own packed block
        # (in k order the scatter would jump across the whole block: cache misses).
        at_sorted = np.empty(len(k), np.int64)
        at_sorted[order] = np.concatenate([[0], np.cumsum(n_pairs[order])[:-1]])
        back = _segments(at_sorted, n_pairs)
        data, idx = data[back], idx[back]
    return _csr(data, idx, ptr, (len(k), size)).T


class _Block:
    """The flat arrays of a block whose entities are ordered by dimension p_e."""

    def __init__(self, ent: Entities, settings: Settings, local=None):
        m, n = ent.n_entities, int(ent.row_ptr[-1])
        f = ent.features
        keys, inv, big, row_ent, nz_ent = _local_columns(ent) if local is None else local
        u_ent = keys // big
        self.cols = (keys - u_ent * big).astype(np.int32)
        d = np.bincount(u_ent, minlength=m)
        self.col_ptr = np.concatenate([[0], np.cumsum(d)]).astype(np.int64)
        self.p = d + 1
        if np.any(np.diff(self.p) < 0):
            raise ValueError("entities of a block must be ordered by dimension")
        self.m, self.n = m, n
        self.xoff = self.col_ptr[:-1] + np.arange(m)
        self.nx = int(self.col_ptr[-1]) + m
        self.x_ent = np.repeat(np.arange(m), self.p)
        self.row_ent = row_ent
        self.y, self.w, self.o = ent.label, ent.weight, ent.offset
        self.pen = np.full(self.nx, float(settings.l2))
        self.pen[self.xoff] = settings.l2 if settings.regularize_intercept else 0.0
        self.gtol = settings.tolerance * np.maximum(1.0, np.bincount(row_ent, self.w, minlength=m))

        # A row's nonzeros at their local slots, ascending, a repeated feature summed into one.
        nnz = np.diff(f.indptr)
        nz_row = np.repeat(np.arange(n), nnz)
        slot = 1 + inv - self.col_ptr[nz_ent]
        vals = f.values
        span = int(self.p.max()) if m else 1
        ek = nz_row * span + slot
        if len(ek) > 1 and np.any(ek[1:] <= ek[:-1]):
            order = np.argsort(ek, kind="stable")
            ek, vals = ek[order], vals[order]
            new = np.concatenate([[True], ek[1:] != ek[:-1]])
            if not new.all():
                starts = np.flatnonzero(new)
                vals, ek = np.add.reduceat(vals, starts), ek[starts]
            nz_row = ek // span
            slot = ek - nz_row * span
            nnz = np.bincount(nz_row, minlength=n)
        del ek, nz_ent, inv

        # Elements: each row's intercept (slot 0, value 1), then its nonzeros. As a CSR
        # matrix X over the block's flat coefficients: s = o + X x, g = Xᵀ r + π ∘ α.
        k = nnz + 1
        el_ptr = np.concatenate([[0], np.cumsum(k)]).astype(np.int64)
        n_el = int(el_ptr[-1])
        nz_at = np.arange(len(slot)) + nz_row + 1
        el_slot = np.zeros(n_el, np.int64)
        el_slot[nz_at] = slot
        el_val = np.ones(n_el)
        el_val[nz_at] = vals
        del nz_at, nz_row, slot, vals
        el_x = np.repeat(self.xoff[row_ent], k) + el_slot
        self.X = _csr(el_val, el_x, el_ptr, (n, self.nx))

        # Hessians, packed upper triangles: H_e[a, b] = Σ_rows c_i v_a v_b over the row's
        # element pairs a ≤ b (slots ascending), so packed = M c for a sparse M with one
        # column per row (its pairs), built once per block: the work is Σ_i nnz_i².
        self.hoff = np.concatenate([[0], np.cumsum(self.p * self.p)]).astype(np.int64)
        self.H = _pair_matrix(k, el_ptr, el_slot, el_val, self.hoff[row_ent], self.p[row_ent],
                            int(self.hoff[-1]))
        # runs of equal dimension: (first entity, end, p)
        cut = np.flatnonzero(np.diff(self.p)) + 1
        edges = np.concatenate([[0], cut, [m]]).astype(np.int64)
        self.groups = [(int(a), int(b), int(self.p[a])) for a, b in zip(edges[:-1], edges[1:]) if b > a]

    def scores(self, x: np.ndarray) -> np.ndarray:
        return self.o + self.X @ x

    def value(self, s: np.ndarray, x: np.ndarray) -> np.ndarray:
        loss = np.bincount(self.row_ent, self.w * (np.logaddexp(0.0, s) - self.y * s), minlength=self.m)
        return loss + 0.5 * np.bincount(self.x_ent, self.pen * x * x, minlength=self.m)

    def gradient(self, s: np.ndarray, x: np.ndarray, q: np.ndarray | None = None) -> np.ndarray:
        """g at scores s (q = σ(s) when the caller has it)."""
        res = self.w * ((expit(s) if q is None else q) - self.y)
        return self.X.T @ res + self.pen * x

    def gmax(self, g: np.ndarray) -> np.ndarray:
        return np.maximum.reduceat(np.abs(g), self.xoff) if self.m else np.zeros(0)

    def packed_hessians(self, c: np.ndarray) -> np.ndarray:
        """Σ_i c_i x_i x_iᵀ per entity, upper triangles, entity e's p_e × p_e at hoff[e]."""
        return self.H @ c

    def newton_step(self, q: np.ndarray, g: np.ndarray, active: np.ndarray) -> np.ndarray:
        """δ with (H_e + μ_e I) δ_e = −g_e for active entities, 0 elsewhere; q = σ(s)."""
        packed = self.packed_hessians(self.w * q * (1.0 - q))
        delta = np.zeros(self.nx)
        for a, b, p in self.groups:
            act = active[a:b]
            n_act = int(act.sum())
            if n_act == 0:
                continue
            sel = slice(None) if n_act == b - a else np.flatnonzero(act)
            upper = packed[self.hoff[a]:self.hoff[b]].reshape(b - a, p, p)[sel]  # a copy, or a view of packed
            diag = np.einsum("kii->ki", upper)  # a writable view of the diagonals
            x0 = int(self.xoff[a])
            diag += self.pen[x0:x0 + (b - a) * p].reshape(b - a, p)[sel]
            diag += _DAMPING * np.maximum(1.0, diag.max(axis=1, keepdims=True))
            rhs = -g[x0:x0 + (b - a) * p].reshape(b - a, p)[sel]
            view = delta[x0:x0 + (b - a) * p].reshape(b - a, p)
            view[sel] = _batched_solve(upper, rhs)
        return delta

    def line_search(self, s, x, f, g, delta, active):
        """Per-entity backtracking; returns (t per entity, accepted f, stalled entities,
        u = X δ: the scores move by t_e u along the step)."""
        u = self.X @ delta
        gd = np.bincount(self.x_ent, g * delta, minlength=self.m)
        slack = 1e-12 * (np.abs(f) + 1.0)  # rounding of f_e: a step at the optimum is no loss
        t = np.where(active, 1.0, 0.0)
        f_new = f.copy()
        # The full step for every entity at once (δ = 0 off the active ones): it is taken by
        # almost all, so only the few that backtrack are gathered.
        ft = self.value(s + u, x + delta)
        ok = active & (ft <= f + _ARMIJO * gd + slack)
        f_new[ok] = ft[ok]
        pending = active & ~ok
        t[pending] = 0.5
        for _ in range(_HALVINGS - 1):
            if not pending.any():
                break
            rows = np.flatnonzero(pending[self.row_ent])
            xs = np.flatnonzero(pending[self.x_ent])
            re, xe = self.row_ent[rows], self.x_ent[xs]
            st = s[rows] + t[re] * u[rows]
            xt = x[xs] + t[xe] * delta[xs]
            ft = (np.bincount(re, self.w[rows] * (np.logaddexp(0.0, st) - self.y[rows] * st), minlength=self.m)
                  + 0.5 * np.bincount(xe, self.pen[xs] * xt * xt, minlength=self.m))
            ok = pending & (ft <= f + _ARMIJO * t * gd + slack)
            f_new[ok] = ft[ok]
            pending &= ~ok
            t[pending] *= 0.5
        t[pending] = 0.0
        return t, f_new, pending, u


def _batched_solve(upper: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """x_k with H_k x_k = rhs_k, H_k symmetric positive definite given by its upper triangle
    (the lower one is ignored).

    Cholesky H = RᵀR (LAPACK reads one triangle: no mirroring), then the two triangular
    solves Rᵀy = rhs, Rx = y as p vectorised steps each over the whole batch, batch index
    last so every step is one contiguous array operation. numpy has no batched triangular
    solve, and its batched LU solve costs 2–3× the Cholesky; for small batches the 2p
    steps' overhead costs more than that, so those go to LU."""
    n, p = rhs.shape
    if n >= _CHOLESKY_MIN_BATCH:
        try:
            r = np.linalg.cholesky(upper, upper=True)
        except np.linalg.LinAlgError:
            pass  # not numerically positive definite (an unpenalised, saturated intercept)
        else:
            rt = np.ascontiguousarray(r.transpose(1, 2, 0))  # (p, p, batch)
            x = np.ascontiguousarray(rhs.T)
            for i in range(p):  # Rᵀ y = rhs: row i of R is column i of Rᵀ
                x[i] /= rt[i, i]
                x[i + 1:] -= rt[i, i + 1:] * x[i]
            for i in range(p - 1, -1, -1):  # R x = y
                x[i] /= rt[i, i]
                x[:i] -= rt[:i, i] * x[i]
            return x.T
    h = np.triu(upper) + np.triu(upper, 1).transpose(0, 2, 1)
    try:
        return np.linalg.solve(h, rhs[..., None])[..., 0]
    except np.linalg.LinAlgError:
        # one exactly singular system in the batch (damping makes this all but impossible)
        return np.stack([np.linalg.lstsq(hk, rk, rcond=None)[0] for hk, rk in zip(h, rhs)])


def _newton(blk: _Block, x: np.ndarray, budget: np.ndarray, can_stop_early: bool):
    """Iterate until every entity stops, or (``can_stop_early``) fewer than half go on.

    Returns (x, iterations per entity, still-iterating mask)."""
    its = np.zeros(blk.m, np.int64)
    stalled = np.zeros(blk.m, bool)
    s = blk.scores(x)
    f = blk.value(s, x)
    while True:
        q = expit(s)
        g = blk.gradient(s, x, q)
        active = (blk.gmax(g) > blk.gtol) & (its < budget) & ~stalled
        n_act = int(active.sum())
        if n_act == 0 or (can_stop_early and n_act < 0.5 * blk.m):
            return x, its, active
        delta = blk.newton_step(q, g, active)
        t, f, stuck, u = blk.line_search(s, x, f, g, delta, active)
        stalled |= stuck
        x = x + t[blk.x_ent] * delta
        s = s + t[blk.row_ent] * u  # = o + X x, without another product
        its += active


def _separable(blk: _Block, s: np.ndarray, settings: Settings) -> np.ndarray:
    """The reference's test, per entity: no finite optimum."""
    pos = blk.w > 0
    n_pos = np.bincount(blk.row_ent, pos, minlength=blk.m)
    out = np.zeros(blk.m, bool)
    if settings.l2 == 0:
        margin = (2 * blk.y - 1) * (s - blk.o)
        out |= np.bincount(blk.row_ent, pos & (margin <= 0), minlength=blk.m) == 0
    if not settings.regularize_intercept:
        n_one = np.bincount(blk.row_ent, pos & (blk.y == 1), minlength=blk.m)
        n_zero = np.bincount(blk.row_ent, pos & (blk.y == 0), minlength=blk.m)
        out |= (n_one == n_pos) | (n_zero == n_pos)
    return out & (n_pos > 0)


def _warm_x(ent: Entities, blk: _Block, warm: Models) -> np.ndarray:
    """Starting α: the warm model's values at the entity's features (others 0)."""
    x = np.zeros(blk.nx)
    x[blk.xoff] = warm.intercept
    if len(warm.indices):
        keys, _, big, _, _ = _local_columns(ent, int(warm.indices.max()))
        w_ent = np.repeat(np.arange(blk.m), np.diff(warm.ptr))
        wkey = w_ent * big + warm.indices.astype(np.int64)
        at = np.minimum(np.searchsorted(keys, wkey), max(len(keys) - 1, 0))
        hit = keys[at] == wkey if len(keys) else np.zeros(len(wkey), bool)
        x[blk.xoff[w_ent[hit]] + 1 + (at[hit] - blk.col_ptr[w_ent[hit]])] = warm.values[hit]
    return x


def _solve_sorted(ent: Entities, settings: Settings, warm: Models | None, rebuild_min: int,
                  local=None) -> Result:
    """Entities ordered by dimension: Newton on the block, rebuilt as entities finish."""
    blk = _Block(ent, settings, local)
    x = np.zeros(blk.nx) if warm is None else _warm_x(ent, blk, warm)
    its = np.zeros(blk.m, np.int64)
    todo = np.arange(blk.m)
    sub, sub_ent = blk, ent
    while len(todo):
        at = _segments(blk.xoff[todo], blk.p[todo])
        xs, its_s, still = _newton(sub, x[at], settings.max_iterations - its[todo],
                                   can_stop_early=sub.m >= rebuild_min)
        x[at] = xs
        its[todo] += its_s
        if not still.any():
            break
        todo = todo[still]
        sub_ent = take(sub_ent, np.flatnonzero(still))
        sub = _Block(sub_ent, settings)
    s = blk.scores(x)
    g = blk.gradient(s, x)
    sep = _separable(blk, s, settings)
    conv = (blk.gmax(g) <= 10 * blk.gtol) & ~sep
    is_coef = np.ones(blk.nx, bool)
    is_coef[blk.xoff] = False
    models = Models(x[blk.xoff].copy(), blk.col_ptr, blk.cols, x[is_coef])
    return Result(models, blk.value(s, x), its, conv, sep)


def _place(result: Result, order: np.ndarray, n: int) -> Result:
    """Rows of ``result`` (entities ``order``) put back at their positions 0..n-1."""
    back = np.empty(n, np.int64)
    back[order] = np.arange(n)
    m = take_models(result.models, back)
    return Result(m, result.objective[back], result.iterations[back], result.converged[back],
                  result.separable[back])


def solve_block(ent: Entities, settings: Settings, warm: Models | None = None,
                max_dim: int = MAX_DIM, rebuild_min: int = REBUILD_MIN) -> Result:
    """Solve every entity of a block in this process (the vectorised path); entities with
    more than ``max_dim`` coefficients by the scipy reference; the block is rebuilt from the
    unfinished entities when it has at least ``rebuild_min`` and fewer than half go on."""
    n = ent.n_entities
    if n == 0:
        return scipy_solver.solve_block(ent, settings, warm)
    local = _local_columns(ent)
    keys, big = local[0], local[2]
    p = np.bincount(keys // big, minlength=n) + 1
    small = p <= max_dim
    order = np.concatenate([np.flatnonzero(small)[np.argsort(p[small], kind="stable")], np.flatnonzero(~small)])
    n_small = int(small.sum())
    parts = []
    if n_small:
        idx = order[:n_small]
        sub, sub_local = _take_local(ent, idx, local)
        del local
        parts.append(_solve_sorted(sub, settings, None if warm is None else take_models(warm, idx),
                                   rebuild_min, sub_local))
    if n_small < n:
        idx = order[n_small:]
        parts.append(scipy_solver.solve_block(take(ent, idx), settings,
                                              None if warm is None else take_models(warm, idx)))
    return _place(Result.concat(parts), order, n)


# --- all entities, over a pool ------------------------------------------------------------

def _block_ranges(ent: Entities, n_min: int, pairs_per_block: int) -> list[tuple[int, int]]:
    """Contiguous entity ranges of about equal Hessian work, at most ``pairs_per_block``
    each (one entity may exceed it), and at least ``n_min`` of them when there are enough."""
    n_ent = ent.n_entities
    if n_ent == 0:
        return []
    k = np.diff(ent.features.indptr) + 1.0
    per_row = k * (k + 1) / 2 + 4  # pairs + the per-row work
    cum = np.concatenate([[0.0], np.cumsum(per_row)])[ent.row_ptr]
    n_blocks = int(min(n_ent, max(n_min, np.ceil(cum[-1] / pairs_per_block))))
    targets = np.linspace(0, cum[-1], n_blocks + 1)[1:-1]
    cuts = np.unique(np.concatenate([[0], np.searchsorted(cum, targets), [n_ent]]))
    return [(int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]


def solve(ent: Entities, settings: Settings, warm: Models | None = None, workers: int = 1,
          executor: cf.ProcessPoolExecutor | None = None,
          timeout: float = DEFAULT_TIMEOUT_SECONDS, chunks_per_worker: int = 4,
          pairs_per_block: int = PAIRS_PER_BLOCK) -> Result:
    """Solve every entity, block by block (bounded memory), over a process pool when
    ``workers > 1`` or ``executor`` is given. Same contract as ``scipy_solver.solve``:
    ``warm`` is aligned with the entities; TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    pooled = executor is not None or workers > 1
    n_workers = (max(1, getattr(executor, "_max_workers", workers)) if executor is not None else workers)
    ranges = _block_ranges(ent, n_workers * chunks_per_worker if pooled else 1, pairs_per_block)
    if not ranges:
        return scipy_solver.solve_block(ent, settings, warm)

    def args(a, b):
        return ent.slice(a, b), settings, None if warm is None else warm.slice(a, b)

    if not pooled:
        parts = []
        for a, b in ranges:
            if time.monotonic() > deadline:
                raise TimeoutError(f"random-effect solve did not finish within {timeout:.0f} s")
            parts.append(solve_block(*args(a, b)))
        return Result.concat(parts)
    own = executor is None
    pool = make_executor(workers) if own else executor
    futures = []
    try:
        # Submit a bounded window ahead so the parent never holds every block's copy at once.
        window = 2 * n_workers
        parts = []
        pending = iter(ranges)
        for a, b in pending:
            futures.append(pool.submit(solve_block, *args(a, b)))
            if len(futures) >= window:
                break
        done_i = 0
        while done_i < len(futures):
            remaining = deadline - time.monotonic()
            try:
                parts.append(futures[done_i].result(timeout=max(remaining, 0.0)))
            except cf.TimeoutError:
                raise TimeoutError(f"random-effect solve did not finish within {timeout:.0f} s") from None
            futures[done_i] = None  # drop the finished future (and its result's copy)
            done_i += 1
            nxt = next(pending, None)
            if nxt is not None:
                futures.append(pool.submit(solve_block, *args(*nxt)))
    except BaseException:
        if own:
            terminate(pool)
        else:
            for fut in futures:
                if fut is not None:
                    fut.cancel()
        raise
    if own:
        pool.shutdown(wait=True)
    return Result.concat(parts)

"""Per-entity generalised linear models with scipy: the reference random-effect solver.

Entity e owns rows R_e and the features F_e that occur in those rows (local indexing).
Its model α = (a, b) ∈ R^{1+|F_e|} minimises

    f_e(α) = Σ_{i∈R_e} w_i ℓ(s_i, y_i) + λ/2 (‖b‖² + r a²),
    s_i    = o_i + a + z_i·b,                  r = 1 if the intercept is penalised else 0,
    ∇f_e   = Σ_{i∈R_e} w_i (μ(s_i) − y_i) (1, z_i) + λ (r a, b),

with the task's loss ℓ and mean μ (``gdmix.losses``; logistic: log(1 + e^s) − y s, σ(s)).
The separability below is the logistic task's (poisson: an unpenalised intercept over
all-zero counts; linear: none).

one ``scipy.optimize.minimize(method="L-BFGS-B", jac=True)`` per entity (GDMix's approach;
kept as the reference a vectorised solver is tested against). With λ > 0 (and r = 1)
f_e is strongly convex, so entities with one row or one class have a finite optimum.
With λ = 0 and rows that the fitted (s − o) classifies with a positive margin, or with
r = 0 and rows of one class, there is none (the loss keeps falling along the fitted
direction): the solve stops at ``max_iterations`` or once the gradient underflows the
tolerance, and the entity is reported as separable, not converged.

With a prior (``Prior``: per entity and coefficient a mean c_k and a weight π_k = w/σ_k²)
a coefficient that has one is penalised by π_k/2 (α_k − c_k)² instead of its L2 term.

Entities travel to worker processes in chunks of contiguous arrays (rows grouped by
entity + per-entity row offsets), never one Python object per row.
"""
from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
import time
from dataclasses import dataclass

import numpy as np

from gdmix import losses
from gdmix.sparse import CSR

DEFAULT_TIMEOUT_SECONDS = 3600.0  # the whole solve; a hung worker never hangs the stage
_DENSE_CELLS = 200_000  # build an entity's design densely below this many cells


@dataclass
class Entities:
    """Rows grouped by entity: entity e's rows are ``row_ptr[e]:row_ptr[e+1]``."""
    row_ptr: np.ndarray  # int64, n_entities + 1, starts at 0
    features: CSR  # the rows' features, global bag indices
    label: np.ndarray
    weight: np.ndarray
    offset: np.ndarray

    @property
    def n_entities(self) -> int:
        return len(self.row_ptr) - 1

    def slice(self, e0: int, e1: int) -> "Entities":
        """Entities e0..e1-1 as a self-contained block (arrays rebased to 0)."""
        r0, r1 = int(self.row_ptr[e0]), int(self.row_ptr[e1])
        f = self.features
        n0, n1 = int(f.indptr[r0]), int(f.indptr[r1])
        return Entities(self.row_ptr[e0:e1 + 1] - r0,
                        CSR(f.indptr[r0:r1 + 1] - n0, f.indices[n0:n1], f.values[n0:n1]),
                        self.label[r0:r1], self.weight[r0:r1], self.offset[r0:r1])


@dataclass
class Models:
    """One model per entity: an intercept and coefficients over global feature indices
    (``indices[ptr[e]:ptr[e+1]]`` ascending; every feature of the entity's rows is stored,
    zeros included, so "the model has feature j" is well defined)."""
    intercept: np.ndarray  # float64, n
    ptr: np.ndarray  # int64, n + 1
    indices: np.ndarray  # int32
    values: np.ndarray  # float64

    @property
    def n_models(self) -> int:
        return len(self.intercept)

    def slice(self, e0: int, e1: int) -> "Models":
        a, b = int(self.ptr[e0]), int(self.ptr[e1])
        return Models(self.intercept[e0:e1], self.ptr[e0:e1 + 1] - a, self.indices[a:b], self.values[a:b])

    @staticmethod
    def empty(n: int) -> "Models":
        return Models(np.zeros(n), np.zeros(n + 1, np.int64), np.zeros(0, np.int32), np.zeros(0))

    @staticmethod
    def concat(parts: list["Models"]) -> "Models":
        if not parts:
            return Models.empty(0)
        ptr = [np.zeros(1, np.int64)]
        base = 0
        for m in parts:
            ptr.append(m.ptr[1:] + base)
            base += int(m.ptr[-1])
        return Models(np.concatenate([m.intercept for m in parts]), np.concatenate(ptr),
                      np.concatenate([m.indices for m in parts]).astype(np.int32),
                      np.concatenate([m.values for m in parts]))


@dataclass
class Prior:
    """A prior aligned with the entities: ``mean`` holds each coefficient's centre and
    ``weight`` (same ptr and indices) its penalty weight w/σ²; an intercept weight of NaN
    means "no prior" (its L2 rule applies), as does a feature that is not listed."""
    mean: Models
    weight: Models

    def slice(self, e0: int, e1: int) -> "Prior":
        return Prior(self.mean.slice(e0, e1), self.weight.slice(e0, e1))


def penalty_of(cols: np.ndarray, settings: "Settings", prior: Prior | None, e: int) -> tuple[np.ndarray, np.ndarray]:
    """(π, c) over entity e's coefficients (intercept, then ``cols`` ascending)."""
    pen = np.full(1 + len(cols), float(settings.l2))
    pen[0] = settings.l2 if settings.regularize_intercept else 0.0
    ctr = np.zeros(1 + len(cols))
    if prior is not None:
        if not np.isnan(prior.weight.intercept[e]):
            pen[0], ctr[0] = prior.weight.intercept[e], prior.mean.intercept[e]
        a, b = int(prior.mean.ptr[e]), int(prior.mean.ptr[e + 1])
        pidx, pw, pm = prior.mean.indices[a:b], prior.weight.values[a:b], prior.mean.values[a:b]
        at = np.minimum(np.searchsorted(cols, pidx), max(len(cols) - 1, 0))
        ok = (len(cols) > 0) & ~np.isnan(pw)
        if len(cols):
            ok &= cols[at] == pidx
        pen[1 + at[ok]], ctr[1 + at[ok]] = pw[ok], pm[ok]
    return pen, ctr


@dataclass(frozen=True)
class Settings:
    l2: float
    regularize_intercept: bool = True
    tolerance: float = 1e-10  # projected-gradient tolerance per unit of the entity's weight
    max_iterations: int = 1000
    task: str = "logistic"  # the loss (gdmix.losses)


@dataclass
class Result:
    models: Models
    objective: np.ndarray  # f_e at the solution, per entity
    iterations: np.ndarray  # L-BFGS-B iterations, per entity
    converged: np.ndarray  # bool: gradient below tolerance at a finite optimum
    separable: np.ndarray  # bool: no finite optimum (see the module docstring)

    @staticmethod
    def concat(parts: list["Result"]) -> "Result":
        return Result(Models.concat([p.models for p in parts]),
                      np.concatenate([p.objective for p in parts]) if parts else np.zeros(0),
                      np.concatenate([p.iterations for p in parts]) if parts else np.zeros(0, np.int64),
                      np.concatenate([p.converged for p in parts]) if parts else np.zeros(0, bool),
                      np.concatenate([p.separable for p in parts]) if parts else np.zeros(0, bool))


def _design(cols_local: np.ndarray, row_local: np.ndarray, vals: np.ndarray, n: int, p: int):
    if n * p <= _DENSE_CELLS:
        z = np.zeros((n, p))
        np.add.at(z, (row_local, cols_local), vals)
        return z
    import scipy.sparse as sp

    return sp.csr_matrix((vals, (row_local, cols_local)), shape=(n, p))


def solve_entity(z, y, w, o, settings: Settings, x0: np.ndarray, pen: np.ndarray | None = None,
                 ctr: np.ndarray | None = None):
    """Minimise f_e from ``x0`` = (a, b); returns (x, f, iterations, converged, separable).
    ``pen``, ``ctr``: per-coefficient penalty weights and centres (default: the L2 rule)."""
    lam = settings.l2
    r = 1.0 if settings.regularize_intercept else 0.0
    if pen is None:
        pen = np.full(len(x0), float(lam))
        pen[0] = lam * r
    if ctr is None:
        ctr = np.zeros(len(x0))

    loss = losses.of(settings.task)

    def fg(x):
        s = o + x[0] + z @ x[1:]
        dx = x - ctr
        f = loss.loss(s, y, w) + 0.5 * float(pen @ (dx * dx))
        res = loss.residual(s, y, w)
        g = pen * dx
        g[0] += res.sum()
        g[1:] += z.T @ res
        return f, g

    import scipy.optimize as so  # here: the default solver's shards never load it

    # The gradient is a sum over the entity's rows: scale the tolerance by their weight.
    gtol = settings.tolerance * max(1.0, float(w.sum()))
    out = so.minimize(fg, x0, jac=True, method="L-BFGS-B",
                      options={"maxiter": settings.max_iterations, "gtol": gtol,
                               "ftol": 1e-15, "maxcor": 20})
    x = out.x
    f, g = fg(x)
    # A line search that stalls at machine precision is still an exact solve.
    converged = bool(out.success or np.max(np.abs(g), initial=0.0) <= 10 * gtol)
    # No finite optimum: the fitted direction itself separates the rows (λ = 0), or an
    # unpenalised intercept faces one class.
    pos = w > 0
    if settings.task == "logistic":
        margin = (2 * y[pos] - 1) * (x[0] + z @ x[1:])[pos]
        separable = bool(pos.any() and ((not np.any(pen > 0) and np.all(margin > 0))
                                        or (pen[0] == 0 and r == 0 and np.all(y[pos] == y[pos][0]))))
    else:  # poisson: e^s → 0 fits all-zero counts only at an intercept of −∞
        separable = bool(settings.task == "poisson" and pos.any() and pen[0] == 0 and r == 0
                         and np.all(y[pos] == 0))
    return x, f, int(out.nit), converged and not separable, separable


def solve_block(ent: Entities, settings: Settings, warm: Models | None = None,
                prior: Prior | None = None) -> Result:
    """Solve every entity of a block in this process, one scipy solve each."""
    n_ent = ent.n_entities
    f = ent.features
    intercept = np.zeros(n_ent)
    ptr = np.zeros(n_ent + 1, np.int64)
    idx_parts, val_parts = [], []
    obj = np.zeros(n_ent)
    its = np.zeros(n_ent, np.int64)
    conv = np.zeros(n_ent, bool)
    sep = np.zeros(n_ent, bool)
    for e in range(n_ent):
        r0, r1 = int(ent.row_ptr[e]), int(ent.row_ptr[e + 1])
        n0, n1 = int(f.indptr[r0]), int(f.indptr[r1])
        gidx = f.indices[n0:n1]
        cols, local = np.unique(gidx, return_inverse=True)
        row_local = np.repeat(np.arange(r1 - r0), np.diff(f.indptr[r0:r1 + 1]))
        z = _design(local, row_local, f.values[n0:n1], r1 - r0, len(cols))
        x0 = np.zeros(1 + len(cols))
        if warm is not None:
            a, b = int(warm.ptr[e]), int(warm.ptr[e + 1])
            x0[0] = warm.intercept[e]
            widx, wval = warm.indices[a:b], warm.values[a:b]
            pos = np.searchsorted(cols, widx)
            ok = pos < len(cols)
            ok[ok] = cols[pos[ok]] == widx[ok]
            x0[1 + pos[ok]] = wval[ok]
        pen, ctr = penalty_of(cols, settings, prior, e)
        x, obj[e], its[e], conv[e], sep[e] = solve_entity(
            z, ent.label[r0:r1], ent.weight[r0:r1], ent.offset[r0:r1], settings, x0, pen, ctr)
        intercept[e] = x[0]
        idx_parts.append(cols.astype(np.int32))
        val_parts.append(x[1:])
        ptr[e + 1] = ptr[e] + len(cols)
    models = Models(intercept, ptr,
                    np.concatenate(idx_parts).astype(np.int32) if idx_parts else np.zeros(0, np.int32),
                    np.concatenate(val_parts) if val_parts else np.zeros(0))
    return Result(models, obj, its, conv, sep)


def _chunks(row_ptr: np.ndarray, n_chunks: int) -> list[tuple[int, int]]:
    """Contiguous entity ranges with about equal row counts."""
    n_ent = len(row_ptr) - 1
    if n_ent == 0:
        return []
    n_chunks = max(1, min(n_chunks, n_ent))
    targets = np.linspace(0, row_ptr[-1], n_chunks + 1)[1:-1]
    cuts = np.unique(np.concatenate([[0], np.searchsorted(row_ptr, targets), [n_ent]]))
    return [(int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]


def _worker_init():
    """One thread per worker for BLAS and OpenMP. The per-entity problems are tiny and the
    pool already has a process per core: more threads only compete for the cores. Set
    through threadpoolctl because the libraries are loaded before this runs (unpickling
    this function imports this module, numpy and scipy), so environment variables set
    here come too late; measured: the whole scipy stage 44.7 s with the workers' threads,
    9.1 s with one each."""
    from threadpoolctl import threadpool_limits

    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # for what loads later
        os.environ[var] = "1"
    threadpool_limits(1)


def make_executor(workers: int) -> cf.ProcessPoolExecutor:
    """A process pool that is safe when the parent holds a JVM or threads (no fork)."""
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    return cf.ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context(method),
                                  initializer=_worker_init)


def terminate(executor: cf.ProcessPoolExecutor) -> None:
    """Stop a pool now, killing workers still running (a timed-out solve leaves none behind)."""
    procs = list((getattr(executor, "_processes", None) or {}).values())
    executor.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():
            p.kill()


def solve(ent: Entities, settings: Settings, warm: Models | None = None, workers: int = 1,
          executor: cf.ProcessPoolExecutor | None = None,
          timeout: float = DEFAULT_TIMEOUT_SECONDS, chunks_per_worker: int = 4,
          prior: Prior | None = None) -> Result:
    """Solve every entity, over a process pool when ``workers > 1`` or ``executor`` is given.

    ``warm`` (aligned with the entities) holds starting coefficients by global feature
    index; features missing from it start at 0. Raises TimeoutError after ``timeout``
    seconds in all (the pool it made is then terminated).
    """
    if executor is None and workers <= 1:
        return solve_block(ent, settings, warm, prior)
    n_workers = workers if executor is None else max(1, getattr(executor, "_max_workers", workers))
    ranges = _chunks(ent.row_ptr, n_workers * chunks_per_worker)
    if not ranges:
        return solve_block(ent, settings, warm, prior)
    own = executor is None
    pool = make_executor(workers) if own else executor
    deadline = time.monotonic() + timeout
    futures = []
    try:
        futures += [pool.submit(solve_block, ent.slice(a, b), settings,
                               None if warm is None else warm.slice(a, b),
                               None if prior is None else prior.slice(a, b)) for a, b in ranges]
        parts = []
        for fut in futures:
            remaining = deadline - time.monotonic()
            try:
                parts.append(fut.result(timeout=max(remaining, 0.0)))
            except cf.TimeoutError:
                raise TimeoutError(f"random-effect solve did not finish within {timeout:.0f} s") from None
    except BaseException:
        if own:
            terminate(pool)
        else:
            for fut in futures:
                fut.cancel()
        raise
    if own:
        pool.shutdown(wait=True)
    return Result.concat(parts)


def variances(ent: Entities, settings: Settings, models: Models, prior: Prior | None = None,
              full: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(intercept variances, coefficient variances parallel to ``models.values``) of solved
    models: with H_e = Σ_i w_i σ(1−σ) x_i x_iᵀ + diag(π) the Hessian of f_e at the model,
    1/diag(H_e) or, ``full``, diag(H_e⁻¹). The reference: dense numpy, one entity at a time."""
    f = ent.features
    icp = np.zeros(ent.n_entities)
    val = np.zeros(len(models.values))
    for e in range(ent.n_entities):
        r0, r1 = int(ent.row_ptr[e]), int(ent.row_ptr[e + 1])
        n0, n1 = int(f.indptr[r0]), int(f.indptr[r1])
        m0, m1 = int(models.ptr[e]), int(models.ptr[e + 1])
        cols = models.indices[m0:m1]
        x = np.zeros((r1 - r0, 1 + len(cols)))
        x[:, 0] = 1.0
        row_local = np.repeat(np.arange(r1 - r0), np.diff(f.indptr[r0:r1 + 1]))
        np.add.at(x, (row_local, 1 + np.searchsorted(cols, f.indices[n0:n1])), f.values[n0:n1])
        theta = np.concatenate([[models.intercept[e]], models.values[m0:m1]])
        c = losses.of(settings.task).curvature(ent.offset[r0:r1] + x @ theta, ent.weight[r0:r1])
        pen, _ = penalty_of(cols, settings, prior, e)
        h = x.T @ (c[:, None] * x) + np.diag(pen)
        if full:
            try:
                v = np.diag(np.linalg.inv(h))
            except np.linalg.LinAlgError:
                v = np.full(len(theta), np.nan)
        else:
            with np.errstate(divide="ignore"):
                v = 1.0 / np.diag(h)
        icp[e], val[m0:m1] = v[0], v[1:]
    return icp, val

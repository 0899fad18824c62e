"""Random effects for many entities at once: the compiled Newton kernel over flat arrays.

Same problem and contract as ``scipy_solver`` (the per-entity reference, kept and tested
against); the solver itself, with its mathematics, is ``gdmix.random_effect.newton``. This
module feeds it: entities arrive as one CSR of rows grouped by entity (``Entities``), are
cut into blocks of bounded work (``PAIRS_PER_BLOCK`` Hessian products, so memory stays
bounded and the cores are kept busy to the end), and the blocks run on threads — the
kernel releases the GIL, so no block is copied to another process — or on a process pool
when one is given. Each block is one kernel call: no Python per row or per entity.
Entities with more than ``MAX_DIM`` coefficients go to the reference scipy solver (rare;
their dense p × p Hessian would dominate the block's scratch memory).
"""
from __future__ import annotations

import concurrent.futures as cf
import time

import numpy as np

from gdmix import losses
from gdmix.random_effect import newton, newton_variances, scipy_solver
from gdmix.random_effect.scipy_solver import (DEFAULT_TIMEOUT_SECONDS, Entities, Models, Prior, Result,
                                              Settings, make_executor, terminate)
from gdmix.sparse import CSR

__all__ = ["solve", "solve_block", "variances", "warm_up", "make_executor", "terminate", "MAX_DIM", "PAIRS_PER_BLOCK"]

MAX_DIM = 256  # entities with more coefficients are solved by the scipy reference
PAIRS_PER_BLOCK = 2_000_000  # Hessian products per block: its share of the work and of the scratch memory
DENSE_FEATURES_MAX = 1 << 22  # feature indices the kernel indexes directly (2 int32 each per thread)


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
    counts = np.diff(ent.row_ptr)
    rows = _segments(ent.row_ptr[:-1][idx], counts[idx])
    f = ent.features
    nnz = np.diff(f.indptr)[rows]
    nz = _segments(f.indptr[:-1][rows], nnz)
    return Entities(np.concatenate([[0], np.cumsum(counts[idx])]).astype(np.int64),
                    CSR(np.concatenate([[0], np.cumsum(nnz)]).astype(np.int64), f.indices[nz], f.values[nz]),
                    ent.label[rows], ent.weight[rows], ent.offset[rows])


def take_models(m: Models, idx: np.ndarray) -> Models:
    lens = np.diff(m.ptr)[idx]
    flat = _segments(m.ptr[:-1][idx], lens)
    return Models(m.intercept[idx], np.concatenate([[0], np.cumsum(lens)]).astype(np.int64),
                  m.indices[flat], m.values[flat])


def take_prior(p: Prior | None, idx: np.ndarray) -> Prior | None:
    return None if p is None else Prior(take_models(p.mean, idx), take_models(p.weight, idx))


_NO_MODELS = (np.zeros(0), np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0))


def _prior_args(prior: Prior | None, remap) -> tuple:
    """The kernel's six prior arrays (empty pointers: no prior)."""
    if prior is None:
        return np.zeros(0), np.zeros(0), np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0), np.zeros(0)
    return (_c(prior.mean.intercept, np.float64), _c(prior.weight.intercept, np.float64),
            _c(prior.mean.ptr, np.int64), remap(_c(prior.mean.indices, np.int32)),
            _c(prior.mean.values, np.float64), _c(prior.weight.values, np.float64))


def _remap(vocab):
    """Global feature indices → the block's dense numbering (-1: not in the block)."""
    if vocab is None:
        return lambda idx: idx

    def remap(idx):
        if not len(vocab):
            return np.full(len(idx), -1, np.int32)
        at = np.minimum(np.searchsorted(vocab, idx), len(vocab) - 1)
        return np.where(vocab[at] == idx, at, -1).astype(np.int32)
    return remap


# --- one block: one kernel call -------------------------------------------------------------

def solve_block(ent: Entities, settings: Settings, warm: Models | None = None,
                max_dim: int = MAX_DIM, stop: np.ndarray | None = None, prior: Prior | None = None) -> Result:
    """Solve every entity of a block in this thread; those with more than ``max_dim``
    coefficients by the scipy reference. ``stop``: a one-element int array another thread
    sets to abandon the block (the result is then incomplete: the caller raises)."""
    n = ent.n_entities
    f = ent.features
    # One array type per argument: the kernel is compiled (and cached) for exactly these.
    row_ptr, indptr = _c(ent.row_ptr, np.int64), _c(f.indptr, np.int64)
    indices, values = _c(f.indices, np.int32), _c(f.values, np.float64)
    cold = warm is None
    if cold:  # no pointers: the kernel starts every entity at 0
        warm = Models(np.zeros(0), np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0))
    warm_idx = _c(warm.indices, np.int32)
    n_features = int(indices.max()) + 1 if len(indices) else 0
    vocab = None
    if n_features > DENSE_FEATURES_MAX and n_features > 4 * len(indices):
        # The kernel keeps two ints per feature index; over a huge, sparse vocabulary (an
        # item-id bag of millions) number this block's features densely first.
        vocab, inverse = np.unique(indices, return_inverse=True)
        indices, n_features = inverse.astype(np.int32).reshape(-1), len(vocab)
        warm_idx = _remap(vocab)(warm_idx)  # -1: not in the block
    d = newton.count_features(row_ptr, indptr, indices, n_features)
    ptr = np.concatenate([[0], np.cumsum(d)]).astype(np.int64)
    models = Models(np.zeros(n), ptr, np.zeros(int(ptr[-1]), np.int32), np.zeros(int(ptr[-1])))
    res = Result(models, np.zeros(n), np.zeros(n, np.int64), np.zeros(n, bool), np.zeros(n, bool))
    newton.solve_entities(row_ptr, indptr, indices, values, _c(ent.label, np.float64),
                          _c(ent.weight, np.float64), _c(ent.offset, np.float64),
                          _c(warm.intercept, np.float64), _c(warm.ptr, np.int64), warm_idx,
                          _c(warm.values, np.float64), *_prior_args(prior, _remap(vocab)),
                          float(settings.l2), bool(settings.regularize_intercept), float(settings.tolerance),
                          int(settings.max_iterations), int(max_dim), n_features,
                          models.ptr, models.indices, models.values, models.intercept,
                          res.objective, res.iterations, res.converged, res.separable,
                          np.zeros(1, np.int64) if stop is None else stop, losses.of(settings.task).code)
    if vocab is not None:
        models.indices[:] = vocab[models.indices]
    big = np.flatnonzero(res.iterations < 0)  # over max_dim: left to the reference
    if len(big) and (stop is None or not stop[0]):
        ref = scipy_solver.solve_block(take(ent, big), settings, None if cold else take_models(warm, big),
                                       take_prior(prior, big))
        at = _segments(ptr[big], d[big])
        models.indices[at], models.values[at] = ref.models.indices, ref.models.values
        models.intercept[big] = ref.models.intercept
        for name in ("objective", "iterations", "converged", "separable"):
            getattr(res, name)[big] = getattr(ref, name)
    return res


def _c(a: np.ndarray, dtype) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=dtype)


def warm_up() -> float:
    """Compile the kernel (or load it from numba's on-disk cache) now; returns the seconds
    it took. ``make install`` and the container image build call it, so no run pays for
    the compilation (≈ 10 s); loading it from the cache takes about a second."""
    t0 = time.perf_counter()
    ent = Entities(np.array([0, 2, 3]), CSR(np.array([0, 1, 3, 3]), np.array([0, 0, 1], np.int32),
                                            np.array([1.0, -0.5, 2.0])),
                   np.array([1.0, 0.0, 1.0]), np.ones(3), np.zeros(3))
    cold = solve_block(ent, Settings(l2=1.0))
    solve_block(ent, Settings(l2=1.0), cold.models)
    for full in (False, True):
        variances_block(ent, Settings(l2=1.0), cold.models, full=full)
    return time.perf_counter() - t0



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
          executor: cf.Executor | None = None,
          timeout: float = DEFAULT_TIMEOUT_SECONDS, chunks_per_worker: int = 4,
          pairs_per_block: int = PAIRS_PER_BLOCK, prior: Prior | None = None) -> Result:
    """Solve every entity, block by block (bounded memory): on ``workers`` threads (the
    kernel runs without the GIL), or on ``executor`` when one is given (a process pool
    works too: each block is then pickled to its worker). Same contract as
    ``scipy_solver.solve``: ``warm`` is aligned with the entities; TimeoutError after
    ``timeout`` seconds, and the threads are stopped at their next entity first."""
    deadline = time.monotonic() + timeout
    pooled = executor is not None or workers > 1
    n_workers = (max(1, getattr(executor, "_max_workers", workers)) if executor is not None else workers)
    ranges = _block_ranges(ent, n_workers * chunks_per_worker if pooled else 1, pairs_per_block)
    if not ranges:
        return scipy_solver.solve_block(ent, settings, warm, prior)
    own = pooled and executor is None
    pool = cf.ThreadPoolExecutor(workers, thread_name_prefix="random-effect") if own else executor
    # a flag the kernel reads before each entity; a process pool's workers cannot see it
    stop = np.zeros(1, np.int64) if not pooled or isinstance(pool, cf.ThreadPoolExecutor) else None

    def args(a, b):
        return (ent.slice(a, b), settings, None if warm is None else warm.slice(a, b), MAX_DIM, stop,
                None if prior is None else prior.slice(a, b))

    def late():
        return TimeoutError(f"random-effect solve did not finish within {timeout:.0f} s")

    if not pooled:
        parts = []
        for a, b in ranges:
            if time.monotonic() > deadline:
                raise late()
            parts.append(solve_block(*args(a, b)))
        return Result.concat(parts)
    futures = []
    try:
        # A bounded window of blocks ahead: a process pool never holds every block's copy.
        parts = []
        pending = iter(ranges)
        for a, b in pending:
            futures.append(pool.submit(solve_block, *args(a, b)))
            if len(futures) >= 2 * n_workers:
                break
        for i in range(len(ranges)):
            try:
                parts.append(futures[i].result(timeout=max(deadline - time.monotonic(), 0.0)))
            except cf.TimeoutError:
                raise late() from None
            futures[i] = None  # drop the finished future (and its result's copy)
            nxt = next(pending, None)
            if nxt is not None:
                futures.append(pool.submit(solve_block, *args(*nxt)))
    except BaseException:
        if stop is not None:
            stop[0] = 1
        for fut in futures:
            if fut is not None:
                fut.cancel()
        if own:
            pool.shutdown(wait=True)  # the running kernels return at their next entity
        raise
    if own:
        pool.shutdown(wait=True)
    return Result.concat(parts)


# --- variances ------------------------------------------------------------------------------

def variances_block(ent: Entities, settings: Settings, models: Models, prior: Prior | None = None,
                    full: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(intercept variances, variances parallel to ``models.values``) of a block's solved
    models, by one compiled pass (``newton_variances.entity_variances``)."""
    f = ent.features
    indices = _c(f.indices, np.int32)
    coef_idx = _c(models.indices, np.int32)
    n_features = int(max(indices.max(initial=-1), coef_idx.max(initial=-1))) + 1
    vocab = None
    if n_features > DENSE_FEATURES_MAX and n_features > 4 * len(indices):
        vocab = np.unique(np.concatenate([indices, coef_idx]))
        remap = _remap(vocab)
        indices, coef_idx, n_features = remap(indices), remap(coef_idx), len(vocab)
    icp = np.zeros(ent.n_entities)
    val = np.zeros(len(models.values))
    newton_variances.entity_variances(_c(ent.row_ptr, np.int64), _c(f.indptr, np.int64), indices, _c(f.values, np.float64),
                            _c(ent.weight, np.float64), _c(ent.offset, np.float64), *_prior_args(prior, _remap(vocab)),
                            float(settings.l2), bool(settings.regularize_intercept), n_features,
                            _c(models.ptr, np.int64), coef_idx, _c(models.values, np.float64),
                            _c(models.intercept, np.float64), bool(full), icp, val, losses.of(settings.task).code)
    return icp, val


def per_model_blocks(ent: Entities, models: Models, prior: Prior | None, block_fn, workers: int,
                     pairs_per_block: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(per intercept, parallel to ``models.values``) of ``block_fn(ent, models, prior)`` over
    blocks of bounded work on ``workers`` threads (the kernels release the GIL)."""
    ranges = _block_ranges(ent, workers * 4 if workers > 1 else 1, pairs_per_block)
    if not ranges:
        return np.zeros(ent.n_entities), np.zeros(len(models.values))

    def one(ab):
        a, b = ab
        return block_fn(ent.slice(a, b), models.slice(a, b), None if prior is None else prior.slice(a, b))

    if workers > 1 and len(ranges) > 1:
        with cf.ThreadPoolExecutor(workers, thread_name_prefix=name) as pool:
            parts = list(pool.map(one, ranges))
    else:
        parts = [one(r) for r in ranges]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def variances(ent: Entities, settings: Settings, models: Models, prior: Prior | None = None,
              full: bool = False, workers: int = 1,
              pairs_per_block: int = PAIRS_PER_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """``variances_block`` over blocks of bounded work on ``workers`` threads."""
    return per_model_blocks(ent, models, prior, lambda e, m, pr: variances_block(e, settings, m, pr, full),
                            workers, pairs_per_block, "variances")

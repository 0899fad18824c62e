"""The active-data bound (``max_samples``): which training rows of a big entity train it.

An entity with more than ``max_samples`` training rows trains on the rows with the
smallest ``sample_key`` (Spark's ``xxhash64`` of (salted split seed, uid), reproduced in
numpy; ties by uid), so reruns and every process agree; all its rows are still scored.
``with_features_of`` then lists, with value 0, the features only its unsampled rows have,
so the re-centring step moves every row of the entity consistently (docs/design.md §1.4).
"""
from __future__ import annotations

import numpy as np

from gdmix import sparse
from gdmix.random_effect.scipy_solver import Models

_P1, _P2, _P3, _P4, _P5 = (0x9E3779B185EBCA87, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9,
                           0x85EBCA77C2B2AE63, 0x27D4EB2F165667C5)
_M64 = (1 << 64) - 1
SAMPLE_SALT = 1  # keeps the sample apart from the validation split's xxhash64(split_seed, uid)


def _xxhash64_long(value, seed):
    """xxHash64 of one 8-byte long with ``seed``, as Spark's ``XXH64.hashLong``: ``value``
    a uint64 array or a Python int, ``seed`` likewise; uint64 results (wrapping arithmetic)."""
    if isinstance(value, np.ndarray):
        u = lambda x: np.uint64(x & _M64) if isinstance(x, int) else x  # noqa: E731
        rotl = lambda x, r: (x << np.uint64(r)) | (x >> np.uint64(64 - r))  # noqa: E731
        with np.errstate(over="ignore"):
            h = u(seed) + np.uint64(_P5 + 8)
            h = h ^ (rotl(value * np.uint64(_P2), 31) * np.uint64(_P1))
            h = rotl(h, 27) * np.uint64(_P1) + np.uint64(_P4)
            h = (h ^ (h >> np.uint64(33))) * np.uint64(_P2)
            h = (h ^ (h >> np.uint64(29))) * np.uint64(_P3)
            return h ^ (h >> np.uint64(32))
    rotl = lambda x, r: ((x << r) | (x >> (64 - r))) & _M64  # noqa: E731
    h = (seed + _P5 + 8) & _M64
    h ^= (rotl((value * _P2) & _M64, 31) * _P1) & _M64
    h = (rotl(h, 27) * _P1 + _P4) & _M64
    h = ((h ^ (h >> 33)) * _P2) & _M64
    h = ((h ^ (h >> 29)) * _P3) & _M64
    return h ^ (h >> 32)


def sample_key(uid: np.ndarray, seed: int) -> np.ndarray:
    """Each row's sampling key: Spark's ``xxhash64(seed, SAMPLE_SALT, uid)`` of three longs
    (``F.xxhash64(F.lit(seed).cast("long"), F.lit(1).cast("long"), F.col("uid"))``), as int64."""
    h = _xxhash64_long(SAMPLE_SALT & _M64, _xxhash64_long(seed & _M64, 42))
    return _xxhash64_long(np.asarray(uid, np.int64).view(np.uint64), h).view(np.int64)


def sampled(uid: np.ndarray, row_ptr: np.ndarray, max_samples: int, seed: int) -> np.ndarray:
    """Which rows an entity trains on (rows grouped by entity, ``row_ptr``): all of an entity
    with at most ``max_samples`` rows, else the ``max_samples`` with the smallest
    (``sample_key``, uid)."""
    counts = np.diff(row_ptr)
    keep = np.ones(len(uid), bool)
    if not len(uid) or counts.max() <= max_samples:
        return keep
    group = np.repeat(np.arange(len(counts)), counts)
    order = np.lexsort((uid, sample_key(uid, seed), group))  # by group, then key, then uid
    rank = np.empty(len(uid), np.int64)
    rank[order] = np.arange(len(uid)) - row_ptr[group[order]]
    return rank < max_samples


def with_features_of(models: Models, row_ptr: np.ndarray, csr: sparse.CSR) -> Models:
    """``models`` (one per entity of ``row_ptr``) extended by a 0 coefficient for every
    feature of the entity's rows (``csr``) that the model lacks."""
    ent_of_nz = np.repeat(np.repeat(np.arange(len(row_ptr) - 1), np.diff(row_ptr)), np.diff(csr.indptr))
    nf = int(max(csr.indices.max(initial=-1), models.indices.max(initial=-1))) + 1
    model_ent = np.repeat(np.arange(models.n_models), np.diff(models.ptr))
    have = model_ent * nf + models.indices.astype(np.int64)  # ascending
    keys = np.union1d(ent_of_nz * nf + csr.indices.astype(np.int64), have)
    at = np.searchsorted(have, keys)
    found = at < len(have)
    found[found] = have[at[found]] == keys[found]
    values = np.zeros(len(keys))
    values[found] = models.values[at[found]]
    ptr = np.concatenate([[0], np.cumsum(np.bincount(keys // nf, minlength=models.n_models))]).astype(np.int64)
    return Models(models.intercept, ptr, (keys % nf).astype(np.int32), values)

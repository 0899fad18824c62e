"""Synthetic random-effect data shaped like real per-user problems, built with array ops.

Activity is skewed (log-normal rows per entity, mean ≈ ``mean_rows``, a long tail of heavy
users); each entity uses 10–30 features of a 1024-feature vocabulary; each row carries
1 + Poisson(4) of its entity's features (at most all of them); labels come from a true
per-entity logistic model, with offsets and weights.
"""
from __future__ import annotations

import numpy as np

from gdmix.random_effect.scipy_solver import Entities
from gdmix.sparse import CSR

VOCABULARY = 1024


def entities(n_entities: int, mean_rows: float = 10.0, seed: int = 0, max_rows: int = 5000) -> Entities:
    rng = np.random.default_rng(seed)
    sigma = 1.0
    mu = np.log(mean_rows - 1.0) - 0.5 * sigma * sigma  # 1 + lognormal with mean mean_rows − 1
    counts = np.minimum(1 + np.round(rng.lognormal(mu, sigma, n_entities)), max_rows).astype(np.int64)
    d = rng.integers(10, 31, n_entities)
    base = rng.integers(0, VOCABULARY, n_entities)
    stride = 2 * rng.integers(0, VOCABULARY // 2, n_entities) + 1  # odd: d distinct features
    n = int(counts.sum())
    row_ent = np.repeat(np.arange(n_entities), counts)
    k = np.minimum(1 + rng.poisson(4.0, n), d[row_ent])
    indptr = np.concatenate([[0], np.cumsum(k)]).astype(np.int64)
    nz_row = np.repeat(np.arange(n), k)
    nz_ent = row_ent[nz_row]
    t = np.arange(indptr[-1]) - indptr[nz_row]
    slot = (rng.integers(0, 1 << 30, n)[nz_row] + t) % d[nz_ent]  # consecutive slots: distinct per row
    indices = ((base[nz_ent] + slot * stride[nz_ent]) % VOCABULARY).astype(np.int32)
    values = rng.normal(size=len(indices))
    # true model: per-entity intercept, coefficient per (entity, slot) from a hash of the pair
    icp = rng.normal(-0.3, 1.0, n_entities)
    coef = 0.5 * np.sin(12.9898 * nz_ent + 78.233 * slot) * 2.0
    offset = rng.normal(0.0, 0.5, n)
    s = offset + icp[row_ent] + np.bincount(nz_row, values * coef, minlength=n)
    label = (rng.random(n) < 1.0 / (1.0 + np.exp(-s))).astype(np.float64)
    weight = rng.uniform(0.5, 2.0, n)
    return Entities(np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                    CSR(indptr, indices, values), label, weight, offset)


def nbytes(ent: Entities) -> int:
    f = ent.features
    return sum(a.nbytes for a in (ent.row_ptr, f.indptr, f.indices, f.values, ent.label, ent.weight, ent.offset))

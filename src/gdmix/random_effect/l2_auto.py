"""``l2: auto``: λ of a random effect estimated from its entities (docs/design.md §7).

With the prior α_{e,k} ~ N(0, 1/λ_k) on entity e's coefficient k, the Laplace
approximation of the marginal likelihood at the entities' modes θ̂_e, whose Hessians
H_e = A_e + diag(λ) include the penalty, is stationary in λ_g (g: a group of
coefficients sharing one λ: the intercepts, one feature, or the whole coordinate) where

    n_g = Σ_{(e,k)∈g} (θ̂_{e,k}² λ_g + λ_g [H_e⁻¹]_kk)      (n_g: the coefficients of g)

MacKay's fixed-point form of it, λ_g ← γ_g / Σ θ̂², γ_g = n_g − λ_g Σ [H_e⁻¹]_kk (the
number of coefficients the data determine), is used; where γ_g ≤ 0 or Σ θ̂² = 0 the
EM form λ_g ← n_g / Σ (θ̂² + [H_e⁻¹]_kk) (always positive) takes over. Both have the same
fixed points. The sums are additive over entities, so shards add their ``Moments``.

A feature no entity of the step holds keeps its λ (an entity's model holds only the
features of its rows; for the others the posterior equals the prior, which leaves the
stationarity condition unchanged). λ is kept within [LAMBDA_MIN, LAMBDA_MAX]: a group
whose coefficients all vanish would otherwise run off to infinity.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gdmix.config import Coordinate
from gdmix.l2 import L2
from gdmix.random_effect.scipy_solver import Models, Prior, Settings

LAMBDA_MIN, LAMBDA_MAX = 1e-6, 1e8
ROUNDS = 20  # inner updates of one step at most (one shard); later passes go on from where it stopped
THREADS_MIN_ROWS = 500_000  # below, a round runs in one thread: starting threads costs more than it saves
RTOL = 1e-3  # ... until no prior variance 1/λ moves by more than this times the largest


@dataclass
class Moments:
    """Per group, over the entities' coefficients: their count, Σ θ̂² and Σ [H⁻¹]_kk.
    Index 0: the intercepts; 1 + j: feature j of the bag."""
    n: np.ndarray
    s2: np.ndarray
    v: np.ndarray

    def __add__(self, other: "Moments") -> "Moments":
        return Moments(self.n + other.n, self.s2 + other.s2, self.v + other.v)

    def to_json(self) -> dict:
        return {"n": self.n.tolist(), "s2": self.s2.tolist(), "v": self.v.tolist()}

    @staticmethod
    def from_json(d: dict) -> "Moments":
        return Moments(*(np.asarray(d[k], float) for k in ("n", "s2", "v")))


def moments(models: Models, var_icp: np.ndarray, var_val: np.ndarray, n_features: int) -> Moments:
    """The sums of ``models`` (solved) with each coefficient's effective posterior
    variance (``laplace.terms``: [H_e⁻¹]_kk less the mode's part)."""
    idx = 1 + models.indices.astype(np.int64)
    m = n_features + 1
    n = np.bincount(idx, minlength=m).astype(float)
    s2 = np.bincount(idx, weights=models.values ** 2, minlength=m)
    v = np.bincount(idx, weights=var_val, minlength=m)
    n[0], s2[0], v[0] = models.n_models, float(models.intercept @ models.intercept), float(var_icp.sum())
    return Moments(n, s2, v)


def _fixed_point(lam: np.ndarray, n: np.ndarray, s2: np.ndarray, v: np.ndarray) -> np.ndarray:
    gamma = n - lam * v
    mackay = np.divide(gamma, s2, out=np.zeros_like(lam), where=s2 > 0)
    em = np.divide(n, s2 + v, out=np.copy(lam), where=(s2 + v) > 0)
    out = np.where((gamma > 0) & (s2 > 0), mackay, em)
    out = np.where(n > 0, out, lam)  # no coefficient of the group in this step: unchanged
    return np.clip(out, LAMBDA_MIN, LAMBDA_MAX)


def update(lam: L2, m: Moments, coord: Coordinate) -> L2:
    """One fixed-point update of λ from the step's moments (``coord.l2_auto`` says the groups)."""
    penalised_icp = coord.regularize_intercept
    if coord.l2_auto == "coordinate":  # one λ over every penalised coefficient
        take = slice(0, None) if penalised_icp else slice(1, None)
        new = float(_fixed_point(np.array([lam.features]), np.array([m.n[take].sum()]),
                                 np.array([m.s2[take].sum()]), np.array([m.v[take].sum()]))[0])
        return L2(new, new)
    nf = len(m.n) - 1
    per = lam.per_feature if lam.per_feature is not None else np.full(nf, float(lam.features))
    current = np.concatenate([[lam.intercept], per])
    new = _fixed_point(current, m.n, m.s2, m.v)
    if not penalised_icp:
        new[0] = lam.intercept
    return L2(float(new[0]), float(np.median(new[1:])) if nf else lam.features, new[1:])


def settled(a: L2, b: L2) -> bool:
    """Whether the prior variances 1/λ moved by at most ``RTOL`` of the largest of them
    from ``a`` to ``b``. On the variance scale, a group heading for variance 0 (a feature
    the data do not support: λ grows by a few per cent a round, for ever) settles once
    its variance is negligible beside the others, as its coefficients then are."""
    nf = max(len(x.per_feature) for x in (a, b) if x.per_feature is not None) if (
        a.per_feature is not None or b.per_feature is not None) else 0
    va, vb = (1.0 / np.array([x.intercept, x.features, *x.feature_weights(np.arange(nf))]) for x in (a, b))
    return bool(np.all(np.abs(va - vb) <= RTOL * max(va.max(), vb.max())))


class PriorOf:
    """λ as the solvers' per-coefficient prior (centre 0, weight λ_j; intercept λ_0, or
    none when unpenalised) over each entity's features (those of its rows, ascending):
    the layout is found once, the weights per λ."""

    def __init__(self, coord: Coordinate, row_ptr: np.ndarray, row_of_nz: np.ndarray, feature_of_nz: np.ndarray,
                 n_features: int):
        self.coord, n_ent = coord, len(row_ptr) - 1
        ent_of_row = np.repeat(np.arange(n_ent, dtype=np.int64), np.diff(row_ptr))
        nf = max(n_features, 1)
        keys = np.unique(ent_of_row[row_of_nz] * nf + feature_of_nz.astype(np.int64))
        ent, self.feat = keys // nf, (keys % nf).astype(np.int32)
        self.ptr = np.concatenate([[0], np.cumsum(np.bincount(ent, minlength=n_ent))]).astype(np.int64)
        self.mean = Models(np.zeros(n_ent), self.ptr, self.feat, np.zeros(len(self.feat)))

    def __call__(self, lam: L2) -> Prior:
        n_ent = len(self.ptr) - 1
        icp_w = np.full(n_ent, lam.intercept if self.coord.regularize_intercept else np.nan)
        return Prior(self.mean, Models(icp_w, self.ptr, self.feat, lam.feature_weights(self.feat).astype(np.float64)))


def prior_of(lam: L2, coord: Coordinate, row_ptr: np.ndarray, row_of_nz: np.ndarray,
             feature_of_nz: np.ndarray, n_features: int) -> Prior:
    """``PriorOf`` for one λ."""
    return PriorOf(coord, row_ptr, row_of_nz, feature_of_nz, n_features)(lam)


@dataclass
class Estimate:
    result: object  # the solver's Result at λ = used
    prior: Prior  # λ = used as the solvers' prior (for the variances written with the models)
    used: L2
    moments: Moments  # at the modes of ``used``
    rounds: list[L2]  # the update after each round; the last is the next step's λ


def settle(ent, coord: Coordinate, lam: L2, warm: Models | None, solve, n_features: int,
           rounds: int = ROUNDS, workers: int = 1, task: str = "logistic") -> Estimate:
    """Alternate the entities' modes at λ (``solve(ent, warm, prior, workers)``, warm-started from
    the last round) and the update of λ from them (their ``laplace.terms``) until λ
    settles (``RTOL``) or ``rounds`` rounds. The other coordinates' scores (the offsets)
    stay fixed: this maximises the step's own approximate marginal likelihood."""
    from gdmix.random_effect import laplace  # numba: only where the kernel runs

    prior_for = PriorOf(coord, ent.row_ptr, ent.features.row_ids(), ent.features.indices, n_features)
    settings = Settings(lam.features, coord.regularize_intercept, task=task)  # each coefficient's λ: in the prior
    workers = workers if len(ent.label) >= THREADS_MIN_ROWS else 1
    history = []
    for r in range(rounds):
        prior = prior_for(lam)
        result = solve(ent, warm, prior, workers)
        m = moments(result.models, *laplace.terms(ent, settings, result.models, prior, workers), n_features)
        new = update(lam, m, coord)
        history.append(new)
        if settled(lam, new) or r == rounds - 1:
            return Estimate(result, prior, lam, m, history)
        lam, warm = new, result.models
    raise ValueError("rounds must be at least 1")

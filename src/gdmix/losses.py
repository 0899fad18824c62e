"""The per-row loss of each task (the config's top-level ``task``), written once.

A run fits one generalised linear model: the score s (docs/design.md §1.1) is the
natural parameter and the task fixes the loss on it. Per row, with label y:

    logistic  y ∈ {0, 1}   ℓ = log(1 + e^s) − y s    ∂ℓ/∂s = σ(s) − y   ∂²ℓ/∂s² = σ(s)(1 − σ(s))   mean σ(s)
    linear    y finite     ℓ = ½ (s − y)²            ∂ℓ/∂s = s − y      ∂²ℓ/∂s² = 1                mean s
    poisson   y ≥ 0        ℓ = e^s − y s             ∂ℓ/∂s = e^s − y    ∂²ℓ/∂s² = e^s              mean e^s

(linear: Gaussian negative log-likelihood with unit variance; poisson: log link, the
constant log y! dropped). In each case ∂ℓ/∂s = μ(s) − y with μ the mean response, and
∂²ℓ/∂s² = μ'(s) > 0, so ℓ is convex in s and F (§1.2) stays one convex problem.

Every numpy backend (the fixed-effect reference, the scipy per-entity solver, the shift,
the joint optimum, the trainers' reported objectives) calls these through ``Loss``; the TF
workers and the compiled kernel keep their own copies in their own arithmetic, selected by
``Loss.code``, and are tested against these.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gdmix import logistic
from gdmix.config import TASKS

LOGISTIC, LINEAR, POISSON = TASKS


@dataclass(frozen=True)
class Loss:
    """One task's loss ℓ(s, y), summed over rows with weights w."""
    task: str
    code: int  # the compiled kernel's and the TF workers' switch: the index in TASKS

    def mean(self, s: np.ndarray) -> np.ndarray:
        """μ(s): the predicted mean response (probability, value or rate)."""
        s = np.asarray(s, dtype=np.float64)
        if self.task == LOGISTIC:
            return logistic.sigmoid(s)
        if self.task == LINEAR:
            return s
        return np.exp(s)

    def loss(self, s: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
        """Σ_i w_i ℓ(s_i, y_i)."""
        if self.task == LOGISTIC:
            return logistic.loss(s, y, w)
        if self.task == LINEAR:
            d = s - y
            return float(w @ (0.5 * d * d))
        with np.errstate(over="ignore"):  # e^s = inf: an infinite loss the line searches reject
            return float(w @ (np.exp(s) - y * s))

    def residual(self, s: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
        """∂ loss / ∂ s_i = w_i (μ(s_i) − y_i)."""
        if self.task == LOGISTIC:
            return logistic.residual(s, y, w)
        with np.errstate(over="ignore"):
            return w * (self.mean(s) - y)

    def curvature(self, s: np.ndarray, w: np.ndarray) -> np.ndarray:
        """∂² loss / ∂ s_i² = w_i μ'(s_i)."""
        if self.task == LOGISTIC:
            return logistic.curvature(s, w)
        if self.task == LINEAR:
            return np.asarray(w, dtype=np.float64) * np.ones_like(np.asarray(s, dtype=np.float64))
        with np.errstate(over="ignore"):
            return w * np.exp(s)

    def bad_labels(self, y: np.ndarray) -> np.ndarray:
        """A mask of the labels this task does not accept (NaN is always bad)."""
        y = np.asarray(y, dtype=np.float64)
        if self.task == LOGISTIC:
            return ~((y == 0.0) | (y == 1.0))
        if self.task == LINEAR:
            return ~np.isfinite(y)
        return ~(np.isfinite(y) & (y >= 0.0))

    @property
    def labels(self) -> str:
        """What the task's labels must be, for error messages."""
        return {LOGISTIC: "0 or 1", LINEAR: "a finite number", POISSON: "a finite count or rate >= 0"}[self.task]


_LOSSES = {t: Loss(t, i) for i, t in enumerate(TASKS)}


def of(task: str) -> Loss:
    """The loss of ``task`` (one of ``TASKS``)."""
    try:
        return _LOSSES[task]
    except KeyError:
        raise ValueError(f"task: must be one of {TASKS}, got {task!r}") from None

"""The logistic loss of the objective (docs/design.md §1), written once.

For scores s, labels y ∈ {0, 1} and weights w, per row

    ℓ(s, y) = log(1 + e^s) − y·s,   ∂ℓ/∂s = σ(s) − y,   ∂²ℓ/∂s² = σ(s)(1 − σ(s)),

with σ(s) = 1 / (1 + e^−s). ``log(1 + e^s)`` is computed as ``logaddexp(0, s)`` and σ as
1/(1 + e^−s) for s ≥ 0 and e^s/(1 + e^s) below, so neither overflows for any finite s;
that σ is the compiled kernel's arithmetic, as fast as scipy's ``expit`` and without
importing scipy.special (0.1 s of every random-effect process's start). Every numpy backend (the
fixed-effect reference, the scipy per-entity solver, the shift, the joint optimum, the
trainers' reported objectives) calls these; the TF workers and the compiled kernel
keep their own copies in their own arithmetic and are tested against these functions.
"""
from __future__ import annotations

import numpy as np


def softplus(s: np.ndarray) -> np.ndarray:
    """log(1 + e^s), elementwise."""
    return np.logaddexp(0.0, s)


def sigmoid(s: np.ndarray) -> np.ndarray:
    """σ(s) = 1 / (1 + e^−s), elementwise."""
    z = np.exp(-np.abs(s))
    return np.where(s >= 0, 1.0 / (1.0 + z), z / (1.0 + z))


def loss(s: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
    """Σ_i w_i [log(1 + e^{s_i}) − y_i s_i]."""
    return float(w @ (softplus(s) - y * s))


def residual(s: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """∂ loss / ∂ s_i = w_i (σ(s_i) − y_i)."""
    return w * (sigmoid(s) - y)


def curvature(s: np.ndarray, w: np.ndarray) -> np.ndarray:
    """∂² loss / ∂ s_i² = w_i σ(s_i)(1 − σ(s_i))."""
    p = sigmoid(s)
    return w * p * (1.0 - p)

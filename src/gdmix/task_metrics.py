"""Validation metrics and the training loss of the regression tasks (``task: linear |
poisson``), in Spark and in numpy (the reference the Spark forms are tested against).

With μ_i = μ(s_i) the mean response of the row's full score (``gdmix.losses``) and
weights w:

    rmse              = sqrt( Σ w (μ − y)² / Σ w )
    poisson_deviance  = Σ w · 2 [y log(y/μ) − (y − μ)] / Σ w     (y log(y/μ) = 0 at y = 0)

the second the mean Poisson deviance (sklearn's ``mean_poisson_deviance``). The training
loss is Σ w ℓ(s, y) with the task's ℓ (linear ½(s − y)², poisson e^s − y s), the loss
term of the objective the trainers minimise.
"""
from __future__ import annotations

import math

import numpy as np

from gdmix.auc import sigmoid, softplus


def rmse(mu: np.ndarray, y: np.ndarray, w: np.ndarray | None = None) -> float:
    w = np.ones_like(y, dtype=np.float64) if w is None else w
    return math.sqrt(float(w @ ((mu - y) ** 2)) / float(w.sum()))


def poisson_deviance(mu: np.ndarray, y: np.ndarray, w: np.ndarray | None = None) -> float:
    w = np.ones_like(y, dtype=np.float64) if w is None else w
    with np.errstate(divide="ignore", invalid="ignore"):
        ylog = np.where(y > 0, y * np.log(np.where(y > 0, y, 1.0) / mu), 0.0)
    return float(w @ (2.0 * (ylog - (y - mu)))) / float(w.sum())


def mean_col(task: str, s):
    """μ(s) as a Spark Column."""
    from pyspark.sql import functions as F

    if task == "linear":
        return s
    if task == "poisson":
        return F.exp(s)
    return sigmoid(s)


def loss_col(task: str, s, y):
    """ℓ(s, y) as a Spark Column."""
    from pyspark.sql import functions as F

    if task == "linear":
        return F.lit(0.5) * (s - y) * (s - y)
    if task == "poisson":
        return F.exp(s) - y * s
    return softplus(s) - y * s


def sums(df, task: str, score: str, label: str, weight: str, where) -> dict:
    """Σw, Σ w (μ − y)² and Σ w · deviance over the rows ``where`` selects, one Spark job;
    then the metrics (None without weight)."""
    from pyspark.sql import functions as F

    s, y, w = F.col(score), F.col(label), F.col(weight)
    mu = mean_col(task, s)
    ylog = F.when(y > 0, y * F.log(y / mu)).otherwise(F.lit(0.0))
    r = df.agg(F.sum(F.when(where, w)).alias("w"),
               F.sum(F.when(where, w * (mu - y) * (mu - y))).alias("sq"),
               F.sum(F.when(where, w * F.lit(2.0) * (ylog - (y - mu)))).alias("dev")).first()
    total = float(r["w"] or 0.0)
    if total <= 0:
        return {"rmse": None, "poisson_deviance": None}
    return {"rmse": math.sqrt(max(float(r["sq"]), 0.0) / total),
            "poisson_deviance": float(r["dev"]) / total if task == "poisson" else None}

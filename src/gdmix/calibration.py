"""Calibration and the score histogram by label, as binned aggregates of a scored Spark
DataFrame (one job; only ``bins`` rows reach the driver, never the data's rows).

The predicted probability p = σ(s) of every row falls into one of ``bins`` equal bins of
[0, 1] (bin b holds b/B ≤ p < (b+1)/B; p = 1 goes to the last). Per bin, with row weights w:

    mean predicted probability  Σ w p / Σ w
    observed rate               Σ w y / Σ w
    positives, negatives        row counts with y = 1 and y = 0 (the histogram by label)

A calibrated model has observed rate ≈ mean predicted probability in every bin with
weight. Empty bins have None for both means.
"""
from __future__ import annotations

BINS = 20


def binned(df, score: str, label: str, weight: str, bins: int = BINS, where=None) -> dict:
    """{"bins", "edges", "weight", "mean_predicted", "observed_rate", "positives",
    "negatives"} of the rows of ``df`` (``where``: a Column selecting them), lists of
    ``bins`` values each (``edges``: bins + 1)."""
    from pyspark.sql import functions as F

    from gdmix.auc import sigmoid

    rows = df if where is None else df.where(where)
    p = sigmoid(F.col(score))
    y, w = F.col(label), F.col(weight)
    b = F.least(F.floor(p * bins).cast("int"), F.lit(bins - 1))
    agg = (rows.select(b.alias("b"), p.alias("p"), y.alias("y"), w.alias("w"))
           .groupBy("b").agg(F.sum("w").alias("w"), F.sum(F.col("w") * F.col("p")).alias("wp"),
                             F.sum(F.col("w") * F.col("y")).alias("wy"),
                             F.count_if(F.col("y") > 0.5).alias("pos"), F.count_if(F.col("y") <= 0.5).alias("neg"))
           .collect())
    out = {"bins": bins, "edges": [i / bins for i in range(bins + 1)], "weight": [0.0] * bins,
           "mean_predicted": [None] * bins, "observed_rate": [None] * bins,
           "positives": [0] * bins, "negatives": [0] * bins}
    for r in agg:
        i = int(r["b"])
        wt = float(r["w"] or 0.0)
        out["weight"][i] = wt
        out["positives"][i], out["negatives"][i] = int(r["pos"]), int(r["neg"])
        if wt > 0:
            out["mean_predicted"][i] = float(r["wp"]) / wt
            out["observed_rate"][i] = float(r["wy"]) / wt
    return out

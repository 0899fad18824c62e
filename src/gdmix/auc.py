"""Exact binary-classification metrics of a scored Spark DataFrame: AUC, AUPR, log loss, ROC.

The AUC is the Mann-Whitney statistic (ties count one half), equal to sklearn's
``roc_auc_score``, not Spark's binned ``BinaryClassificationMetrics``. Row weights act as
frequencies throughout (with unit weights this is the plain, unweighted metric).

How: aggregate the rows per distinct score into (positive weight, negative weight), then
walk the scores in descending order keeping cumulative sums. To stay distributed, the
distinct scores are range-partitioned; each partition computes local cumulative sums and
adds the totals of the partitions above it (a handful of numbers, computed on the
driver). The partitioned aggregate is checkpointed first, so both passes see the same
partitions.
"""
from __future__ import annotations

import math

import numpy as np

S, POS, NEG, ROWS, PID = "s", "pos", "neg", "rows", "pid"
ROC_POINTS = 200  # the ROC curve is downsampled to about this many points


def softplus(col):
    """log(1 + exp(s)) without overflow: max(s, 0) + log1p(exp(-|s|))."""
    from pyspark.sql import functions as F

    return F.greatest(col, F.lit(0.0)) + F.log1p(F.exp(-F.abs(col)))


def by_score(df, score: str, label: str, weight: str):
    """Rows grouped by distinct score: positive weight, negative weight, row count, loss."""
    from pyspark.sql import functions as F

    s, y, w = F.col(score), F.col(label), F.col(weight)
    return df.groupBy(s.alias(S)).agg(
        F.sum(w * y).alias(POS),
        F.sum(w * (F.lit(1.0) - y)).alias(NEG),
        F.count(F.lit(1)).alias(ROWS),
    )


def binary_metrics(df, score: str = "s", label: str = "label", weight: str = "weight",
                   roc_points: int = ROC_POINTS) -> dict:
    """AUC, AUPR (average precision), weighted mean log loss, ROC curve and row count.

    Metrics that are undefined (no positives, no negatives, no weight) are None.
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    spark = df.sparkSession
    parts = int(spark.conf.get("spark.sql.shuffle.partitions", "8"))
    grouped = (by_score(df, score, label, weight)
               .repartitionByRange(parts, F.col(S))
               .withColumn(PID, F.spark_partition_id())
               .localCheckpoint(eager=True))

    # Per-partition totals, and the loss (softplus(s)·W − s·W⁺ is Σ w·[softplus(s) − y·s]).
    totals = grouped.groupBy(PID).agg(
        F.sum(POS).alias(POS), F.sum(NEG).alias(NEG), F.sum(ROWS).alias(ROWS),
        F.sum(softplus(F.col(S)) * (F.col(POS) + F.col(NEG)) - F.col(S) * F.col(POS)).alias("loss"),
        F.min(S).alias("smin"),
        F.sum(F.when(F.isnan(S) | (F.abs(S) == float("inf")), F.col(ROWS)).otherwise(0)).alias("bad"),
    ).collect()
    bad = sum(r["bad"] for r in totals)
    if bad:
        raise ValueError(f"{bad} rows have a non-finite score (NaN or infinite)")
    n = sum(r[ROWS] for r in totals)
    p_total = sum(r[POS] for r in totals)
    n_total = sum(r[NEG] for r in totals)
    w_total = p_total + n_total
    out = {"rows": n, "positives": p_total, "negatives": n_total,
           "logloss": sum(r["loss"] for r in totals) / w_total if w_total > 0 else None,
           "auc": None, "aupr": None, "roc": None}
    if not (p_total > 0 and n_total > 0):
        return out

    # Weight above each partition (partitions hold ascending score ranges).
    above = {}
    acc_p = acc_n = 0.0
    for r in sorted(totals, key=lambda r: r[PID], reverse=True):
        above[r[PID]] = (acc_p, acc_n)
        acc_p += r[POS]
        acc_n += r[NEG]
    offsets = spark.createDataFrame([(k, v[0], v[1]) for k, v in above.items()],
                                    f"{PID} int, p_above double, n_above double")

    # tp/fp: weight of positives/negatives scoring >= s (a threshold at s).
    w = (Window.partitionBy(PID).orderBy(F.col(S).desc())
         .rowsBetween(Window.unboundedPreceding, Window.currentRow))
    cum = (grouped.join(F.broadcast(offsets), PID)
           .withColumn("tp", F.col("p_above") + F.sum(POS).over(w))
           .withColumn("fp", F.col("n_above") + F.sum(NEG).over(w)))
    # Mann-Whitney: each negative beats no positive above it, ties with its own group's
    # positives count half. AP: precision at each threshold, weighted by the recall gained.
    sums = cum.agg(
        F.sum(F.col(NEG) * (F.col("tp") - F.col(POS) + F.col(POS) / 2)).alias("auc"),
        F.sum(F.when(F.col(POS) > 0, F.col(POS) * F.col("tp") / (F.col("tp") + F.col("fp")))
              .otherwise(0.0)).alias("ap"),
    ).first()
    out["auc"] = sums["auc"] / (p_total * n_total)
    out["aupr"] = sums["ap"] / p_total

    # ROC: keep the last threshold of each 1/roc_points step of (fpr + tpr)/2, which
    # spaces points evenly along the curve, and the lowest score: the point (1, 1).
    k = float(roc_points)
    pos_ = (F.col("tp") / p_total + F.col("fp") / n_total) / 2
    prev = ((F.col("tp") - F.col(POS)) / p_total + (F.col("fp") - F.col(NEG)) / n_total) / 2
    smin = min(r["smin"] for r in totals if r["smin"] is not None)
    pts = (cum.where((F.floor(pos_ * k) > F.floor(prev * k)) | (F.col(S) == smin))
           .select(S, "tp", "fp").collect())
    pts.sort(key=lambda r: r[S], reverse=True)
    out["roc"] = roc_curve([r[S] for r in pts], [r["fp"] / n_total for r in pts],
                           [r["tp"] / p_total for r in pts])
    return out


def roc_curve(thresholds, fpr, tpr) -> dict:
    """The ROC points (by descending threshold, the last at the lowest score) with (0, 0)
    prepended (threshold just above the top score: no row is predicted positive)."""
    top = math.nextafter(thresholds[0], math.inf) if thresholds else 1.0
    def tidy(v):  # monotone despite the last-bit differences of sums taken in another order
        v = np.clip(np.maximum.accumulate(np.concatenate([[0.0], np.asarray(v, np.float64)])), 0.0, 1.0)
        if len(v) > 1:
            v[-1] = 1.0
        return [float(x) for x in v]

    return {"fpr": tidy(fpr), "tpr": tidy(tpr), "thresholds": [top] + [float(t) for t in thresholds]}


def auc_reference(scores, labels, weights=None) -> float:
    """Exact (weighted) Mann-Whitney AUC in numpy: the reference for tests."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    w = np.ones_like(s) if weights is None else np.asarray(weights, dtype=np.float64)
    uniq, inv = np.unique(s, return_inverse=True)  # ascending distinct scores
    pos = np.bincount(inv, weights=w * y, minlength=len(uniq))
    neg = np.bincount(inv, weights=w * (1 - y), minlength=len(uniq))
    neg_below = np.cumsum(neg) - neg
    return float(np.sum(pos * (neg_below + neg / 2)) / (pos.sum() * neg.sum()))

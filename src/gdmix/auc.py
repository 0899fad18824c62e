"""Exact binary-classification metrics of a scored Spark DataFrame: AUC, AUPR, log loss,
RMSE, ROC, and per-entity AUC and precision@k.

The AUC is the Mann-Whitney statistic (ties count one half), equal to sklearn's
``roc_auc_score``, not Spark's binned ``BinaryClassificationMetrics``. Row weights act as
frequencies throughout (with unit weights this is the plain, unweighted metric).

How: aggregate the rows per distinct score into (positive weight, negative weight), then
walk the scores in descending order keeping cumulative sums. When the per-score table
has at most ``DRIVER_GROUPS`` scores (≈ 100 MB; known in advance from the row count, or
else counted after a checkpoint), the walk is done on the driver in numpy: one Arrow
transfer instead of several Spark jobs. Otherwise it stays distributed: the distinct scores are range-partitioned, each partition
computes local cumulative sums and adds the totals of the partitions above it (a handful
of numbers, computed on the driver). Both walks keep the same ROC points.

RMSE is that of the probability σ(s) against the label, weighted:
sqrt(Σ w (σ(s) − y)² / Σ w).

Per-entity metrics (``per_entity_metrics``) group the rows by an entity column:

- ``auc@<entity>``: the AUC of each entity's rows (as above: weighted, ties one half),
  over the entities whose rows hold positive weight of both labels, averaged with each
  entity weighted by its rows' total weight (its row count with unit weights); also the
  number of those entities.
- ``precision@<k>@<entity>``: for each entity with at least k rows, the fraction of
  positives among its k highest-scored rows, averaged over those entities (each counts
  once); also their number. Ties in score are broken by uid, ascending (of two rows with
  the same score, the one with the smaller uid ranks higher), so the value is exact and
  deterministic. Row weights do not enter precision@k: it counts rows.
"""
from __future__ import annotations

import math

import numpy as np
from scipy.special import expit

S, POS, NEG, ROWS, PID = "s", "pos", "neg", "rows", "pid"
ROC_POINTS = 200  # the ROC curve is downsampled to about this many points
DRIVER_GROUPS = 4_000_000  # distinct scores up to which the walk runs on the driver


def softplus(col):
    """log(1 + exp(s)) without overflow: max(s, 0) + log1p(exp(-|s|))."""
    from pyspark.sql import functions as F

    return F.greatest(col, F.lit(0.0)) + F.log1p(F.exp(-F.abs(col)))


def sigmoid(col):
    """σ(s) = 1 / (1 + exp(−s)) as a Spark Column (exp overflows to infinity: σ = 0, exact)."""
    from pyspark.sql import functions as F

    return F.lit(1.0) / (F.lit(1.0) + F.exp(-col))


def squared_error(s, pos, neg):
    """Σ w (σ(s) − y)² of a score group: pos·σ(−s)² + neg·σ(s)² (no cancellation near 1)."""
    return pos * sigmoid(-s) * sigmoid(-s) + neg * sigmoid(s) * sigmoid(s)


def by_score(df, score: str, label: str, weight: str, rows=None, extra: dict | None = None):
    """Rows grouped by distinct score: positive weight, negative weight, row count, and a
    sum of each ``extra`` column (name -> numeric Column). ``rows``: a Column counting the
    rows a record stands for (default 1 each)."""
    from pyspark.sql import functions as F

    s, y, w = F.col(score), F.col(label), F.col(weight)
    return df.groupBy(s.alias(S)).agg(
        F.sum(w * y).alias(POS),
        F.sum(w * (F.lit(1.0) - y)).alias(NEG),
        (F.count(F.lit(1)) if rows is None else F.sum(rows)).alias(ROWS),
        *[F.sum(c).alias(name) for name, c in (extra or {}).items()],
    )


def binary_metrics(df, score: str = "s", label: str = "label", weight: str = "weight",
                   roc_points: int = ROC_POINTS, driver_groups: int = DRIVER_GROUPS) -> dict:
    """AUC, AUPR (average precision), weighted mean log loss, ROC curve and row count.

    Metrics that are undefined (no positives, no negatives, no weight) are None.
    """
    return grouped_metrics(by_score(df, score, label, weight), roc_points, driver_groups)


def grouped_metrics(grouped, roc_points: int = ROC_POINTS, driver_groups: int = DRIVER_GROUPS,
                    extra: tuple[str, ...] = (), max_groups: int | None = None) -> dict:
    """``binary_metrics`` of a ``by_score`` frame; the totals of its ``extra`` columns are
    returned under "extra", and when any is non-zero the caller has a problem to report,
    so nothing else is computed. ``max_groups``: a known bound on the frame's rows (e.g.
    the row count of the data); within ``driver_groups`` the frame goes to the driver in
    one Spark job, with no checkpoint and no separate totals job."""
    from pyspark.sql import functions as F

    if max_groups is not None and max_groups <= driver_groups:
        t = grouped.select(S, POS, NEG, ROWS, *extra).toArrow()
        return _driver_metrics({c: t.column(c).to_numpy(zero_copy_only=False) for c in t.column_names},
                               extra, roc_points)
    grouped = grouped.localCheckpoint(eager=True)
    # Totals, and the loss (softplus(s)·W − s·W⁺ is Σ w·[softplus(s) − y·s]).
    t = grouped.agg(
        F.count(F.lit(1)).alias("groups"), F.sum(POS).alias(POS), F.sum(NEG).alias(NEG),
        F.sum(ROWS).alias(ROWS),
        F.sum(softplus(F.col(S)) * (F.col(POS) + F.col(NEG)) - F.col(S) * F.col(POS)).alias("loss"),
        F.sum(squared_error(F.col(S), F.col(POS), F.col(NEG))).alias("sq"),
        F.sum(F.when(F.isnan(S) | (F.abs(S) == float("inf")), F.col(ROWS)).otherwise(0)).alias("bad"),
        *[F.sum(name).alias(name) for name in extra],
    ).first()
    out = {"rows": int(t[ROWS] or 0), "extra": {name: t[name] or 0 for name in extra}}
    if any(out["extra"].values()):
        return out
    if t["bad"]:
        raise ValueError(f"{t['bad']} rows have a non-finite score (NaN or infinite)")
    p_total, n_total = float(t[POS] or 0.0), float(t[NEG] or 0.0)
    w_total = p_total + n_total
    out.update(positives=p_total, negatives=n_total,
               logloss=float(t["loss"]) / w_total if w_total > 0 else None,
               rmse=math.sqrt(max(float(t["sq"]), 0.0) / w_total) if w_total > 0 else None,
               auc=None, aupr=None, roc=None)
    if not (p_total > 0 and n_total > 0):
        return out
    if t["groups"] <= driver_groups:
        table = grouped.select(S, POS, NEG).toArrow()
        out.update(ranking_metrics(table.column(S).to_numpy(), table.column(POS).to_numpy(),
                                   table.column(NEG).to_numpy(), roc_points))
    else:
        out.update(_distributed_ranking(grouped, p_total, n_total, roc_points))
    return out


def _driver_metrics(cols: dict[str, np.ndarray], extra: tuple[str, ...], roc_points: int) -> dict:
    """``grouped_metrics`` on the driver, from the per-score columns (nulls read as 0)."""
    s = cols[S].astype(np.float64)
    pos, neg, rows = (np.nan_to_num(cols[c].astype(np.float64)) for c in (POS, NEG, ROWS))
    out = {"rows": int(rows.sum()), "extra": {name: int(np.nansum(cols[name])) for name in extra}}
    if any(out["extra"].values()):
        return out
    bad = ~np.isfinite(s)
    if bad.any():
        raise ValueError(f"{int(rows[bad].sum())} rows have a non-finite score (NaN or infinite)")
    p_total, n_total = float(pos.sum()), float(neg.sum())
    w_total = p_total + n_total
    loss = float(np.sum(np.logaddexp(0.0, s) * (pos + neg) - s * pos))
    sq = float(np.sum(pos * expit(-s) ** 2 + neg * expit(s) ** 2))
    out.update(positives=p_total, negatives=n_total, logloss=loss / w_total if w_total > 0 else None,
               rmse=math.sqrt(sq / w_total) if w_total > 0 else None, auc=None, aupr=None, roc=None)
    if p_total > 0 and n_total > 0:
        out.update(ranking_metrics(s, pos, neg, roc_points))
    return out


def ranking_metrics(s, pos, neg, roc_points: int = ROC_POINTS) -> dict:
    """AUC, AUPR and ROC from per-score weights (any order; each score once), in numpy.

    With the scores descending, tp/fp are the cumulative positive/negative weights at or
    above each score (a threshold at s). AUC (Mann–Whitney): Σ neg·(tp − pos + pos/2)/(P·N),
    ties counting one half; AP: Σ pos·tp/(tp + fp) / P.
    """
    order = np.argsort(-np.asarray(s, np.float64), kind="stable")
    s, pos, neg = (np.asarray(a, np.float64)[order] for a in (s, pos, neg))
    tp, fp = np.cumsum(pos), np.cumsum(neg)
    p_total, n_total = tp[-1], fp[-1]
    auc = float(np.sum(neg * (tp - pos / 2)) / (p_total * n_total))
    has_pos = pos > 0
    aupr = float(np.sum(pos[has_pos] * tp[has_pos] / (tp[has_pos] + fp[has_pos])) / p_total)
    k = float(roc_points)
    at = np.floor(k * (tp / p_total + fp / n_total) / 2)
    before = np.floor(k * ((tp - pos) / p_total + (fp - neg) / n_total) / 2)
    keep = (at > before) | (s == s[-1])
    return {"auc": auc, "aupr": aupr,
            "roc": roc_curve(list(s[keep]), list(fp[keep] / n_total), list(tp[keep] / p_total))}


def _distributed_ranking(grouped, p_total: float, n_total: float, roc_points: int) -> dict:
    """``ranking_metrics`` on a per-score frame too large for the driver: range partitions."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    spark = grouped.sparkSession
    parts = int(spark.conf.get("spark.sql.shuffle.partitions", "8"))
    grouped = (grouped.repartitionByRange(parts, F.col(S))
               .withColumn(PID, F.spark_partition_id())
               .localCheckpoint(eager=True))
    totals = grouped.groupBy(PID).agg(F.sum(POS).alias(POS), F.sum(NEG).alias(NEG),
                                      F.min(S).alias("smin")).collect()
    out = {}

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
    out["auc"] = float(sums["auc"]) / (p_total * n_total)
    out["aupr"] = float(sums["ap"]) / p_total

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


def per_entity_metrics(df, entity: str, score: str, label: str, weight: str, uid: str,
                       auc: bool = True, ks: tuple[int, ...] = ()) -> dict:
    """Per-entity AUC and precision@k of the rows of ``df`` grouped by its ``entity``
    column (see the module docstring); rows with a null entity are left out. Returns
    ``{"auc": value, "auc.entities": n, "precision@<k>": value, "precision@<k>.entities": n}``
    for what is asked (``auc``; each k of ``ks``), a value None when no entity qualifies."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    rows = df.where(F.col(entity).isNotNull()).select(
        F.col(entity).alias("e"), F.col(score).alias(S), F.col(label).alias("y"), F.col(weight).alias("w"),
        F.col(uid).alias("u"))
    out = {}
    if auc:
        # Per (entity, distinct score): positive and negative weight; walking an entity's
        # scores upwards, each positive beats the negatives below it, ties count half.
        g = rows.groupBy("e", S).agg(F.sum(F.col("w") * F.col("y")).alias(POS),
                                     F.sum(F.col("w") * (F.lit(1.0) - F.col("y"))).alias(NEG))
        up = Window.partitionBy("e").orderBy(S).rowsBetween(Window.unboundedPreceding, Window.currentRow)
        g = g.withColumn("neg_le", F.sum(NEG).over(up))
        per = g.groupBy("e").agg(F.sum(F.col(POS) * (F.col("neg_le") - F.col(NEG) / 2)).alias("num"),
                                 F.sum(POS).alias("p"), F.sum(NEG).alias("n"))
        r = per.where((F.col("p") > 0) & (F.col("n") > 0)).agg(
            F.sum((F.col("p") + F.col("n")) * F.col("num") / (F.col("p") * F.col("n"))).alias("wauc"),
            F.sum(F.col("p") + F.col("n")).alias("w"), F.count(F.lit(1)).alias("entities")).first()
        n = int(r["entities"] or 0)
        out["auc"] = float(r["wauc"]) / float(r["w"]) if n else None
        out["auc.entities"] = n
    if ks:
        # Rank each entity's rows by score, descending, ties by uid ascending: exact, deterministic.
        rank = Window.partitionBy("e").orderBy(F.col(S).desc(), F.col("u").asc())
        ranked = rows.select("e", "y", F.row_number().over(rank).alias("r"))
        per = ranked.groupBy("e").agg(F.count(F.lit(1)).alias("rows"),
                                      *[F.sum(F.when(F.col("r") <= k, F.col("y")).otherwise(0.0)).alias(f"hits{k}")
                                        for k in ks])
        r = per.agg(*[F.sum(F.when(F.col("rows") >= k, F.col(f"hits{k}") / k)).alias(f"sum{k}") for k in ks],
                    *[F.count_if(F.col("rows") >= k).alias(f"n{k}") for k in ks]).first()
        for k in ks:
            n = int(r[f"n{k}"] or 0)
            out[f"precision@{k}"] = float(r[f"sum{k}"]) / n if n else None
            out[f"precision@{k}.entities"] = n
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

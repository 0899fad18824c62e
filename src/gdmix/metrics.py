"""The metrics stage: how good the model is after a coordinate-descent step.

The full model's score of a row is its input offset plus the latest score of every
trained coordinate (DESIGN.md §1; a coordinate without a score for a row adds 0). On
validation rows we report exact AUC, AUPR and log loss (and an ROC curve for the UI);
on training rows the objective that coordinate descent minimises, so a run can be
checked to decrease it step by step.
"""
from __future__ import annotations

from gdmix import io, layout, plan, schema
from gdmix.auc import binary_metrics, softplus
from gdmix.config import Config
from gdmix.plan import Step
from gdmix.spark import path as spark_path

FULL_SCORE = "_s"
OBJECTIVE_KEYS = ("iteration", "coordinate", "objective", "train_loss", "penalty")


def roc_path(workdir: str, iteration: int, coordinate: str) -> str:
    """The step's validation ROC curve: {"fpr": [...], "tpr": [...], "thresholds": [...]}."""
    return io.join(layout.step_dir(workdir, iteration, coordinate), "roc.json")


# --- reading the work directory ----------------------------------------------------------

def _has_parquet(url: str) -> bool:
    fs, p = io.filesystem(url)
    if not fs.exists(p):
        return False
    if not fs.isdir(p):
        return p.endswith(".parquet")
    return any(f.endswith(".parquet") and not f.rsplit("/", 1)[-1].startswith(("_", "."))
               for f in fs.find(p))


def _prepared(spark, workdir: str, split: str):
    """The split's rows (uid, label, weight, offset), or None when the split has none."""
    from pyspark.sql import functions as F

    url = layout.prepared(workdir, split)
    if not _has_parquet(url):
        return None
    df = spark.read.parquet(spark_path(url))
    have = set(df.columns)
    return df.select(
        F.col(schema.UID).cast("long").alias(schema.UID),
        F.col(schema.LABEL).cast("double").alias(schema.LABEL),
        (F.col(schema.WEIGHT).cast("double") if schema.WEIGHT in have else F.lit(1.0)).alias(schema.WEIGHT),
        (F.col(schema.OFFSET).cast("double") if schema.OFFSET in have else F.lit(0.0)).alias(schema.OFFSET),
    )


def _scores(spark, url: str, what: str):
    """A coordinate's (uid, score) for one split; a trained coordinate must have the folder."""
    from pyspark.sql import functions as F

    if not io.exists(url):
        raise FileNotFoundError(f"metrics: no scores for {what} at {url}")
    if not _has_parquet(url):  # an empty folder: no row has a score (e.g. no entity models)
        return spark.createDataFrame([], "uid long, score double")
    df = spark.read.parquet(spark_path(url))
    return df.select(F.col(schema.UID).cast("long").alias(schema.UID),
                     F.col(schema.SCORE).cast("double").alias(schema.SCORE))


def _check_scores(scores, rows, what: str) -> None:
    """Fail loudly on uids a score file should not have: unknown ones and duplicates (one job)."""
    from pyspark.sql import functions as F

    bad = (scores.groupBy(schema.UID).agg(F.count(F.lit(1)).alias("n"))
           .join(rows.select(schema.UID, F.lit(True).alias("known")), schema.UID, "left")
           .where(F.col("known").isNull() | (F.col("n") > 1))
           .limit(20).collect())
    order = lambda u: (u is None, u or 0)  # noqa: E731  (a null uid sorts last)
    unknown = sorted((r[schema.UID] for r in bad if r["known"] is None), key=order)[:5]
    if unknown:
        raise ValueError(f"metrics: scores of {what} have uids that are not in the prepared "
                         f"rows, e.g. {unknown}")
    dups = sorted((r[schema.UID] for r in bad if r["n"] > 1), key=order)[:5]
    if dups:
        raise ValueError(f"metrics: scores of {what} have duplicate uids, e.g. {dups}")


def scored_rows(spark, workdir: str, split: str, state: dict[str, Step]):
    """(rows with the full model score in column ``_s``, prepared row count), or (None, 0)."""
    from pyspark.sql import functions as F

    rows = _prepared(spark, workdir, split)
    if rows is None:
        return None, 0
    df, total = rows, F.col(schema.OFFSET)
    for i, (d, s) in enumerate(state.items()):
        url = layout.scores(workdir, s.iteration, s.coordinate, d, split)
        what = f"coordinate {d!r} ({split}, written by step {s})"
        sc = _scores(spark, url, what)
        _check_scores(sc, rows, what)
        col = f"_score{i}"
        df = df.join(sc.withColumnRenamed(schema.SCORE, col), schema.UID, "left")
        total = total + F.coalesce(F.col(col), F.lit(0.0))
    return df.withColumn(FULL_SCORE, total), rows.count()


def _conserved(n_prepared: int, n_joined: int, split: str) -> None:
    if n_prepared != n_joined:
        raise ValueError(f"metrics: joining scores changed the {split} row count "
                         f"from {n_prepared} to {n_joined}")


# --- the training objective ---------------------------------------------------------------

def train_loss(df) -> tuple[float, int]:
    """(Σ w·[log(1+exp(s)) − y·s], rows) over scored rows: the objective's loss term (a sum)."""
    from pyspark.sql import functions as F

    s = F.col(FULL_SCORE)
    r = df.agg(
        F.sum(F.col(schema.WEIGHT) * (softplus(s) - F.col(schema.LABEL) * s)).alias("loss"),
        F.count(F.lit(1)).alias("rows"),
        F.sum(F.when(F.isnan(s) | (F.abs(s) == float("inf")), 1).otherwise(0)).alias("bad"),
    ).first()
    if r["bad"]:
        raise ValueError(f"metrics: {r['bad']} training rows have a non-finite score")
    return float(r["loss"] or 0.0), int(r["rows"])


def penalties(cfg: Config, workdir: str, state: dict[str, Step], spark) -> dict[str, float]:
    """λ_d/2 · Σ_models (‖values‖² [+ intercept²]) of each coordinate's latest coefficients."""
    from pyspark.sql import functions as F

    out = {}
    for d, s in state.items():
        c = cfg.coordinate(d)
        url = layout.coefficients(workdir, s.iteration, s.coordinate, d)
        if not io.exists(url):
            raise FileNotFoundError(f"metrics: no coefficients for coordinate {d!r} at {url} "
                                    f"(written by step {s})")
        if not _has_parquet(url):
            out[d] = 0.0
            continue
        coef = spark.read.parquet(spark_path(url))
        sq = F.aggregate(F.col(schema.VALUES), F.lit(0.0), lambda acc, v: acc + v * v)
        if c.regularize_intercept:
            sq = sq + F.col(schema.INTERCEPT) * F.col(schema.INTERCEPT)
        total = coef.agg(F.sum(sq)).first()[0] or 0.0
        out[d] = c.l2 / 2 * float(total)
    return out


# --- the stage ------------------------------------------------------------------------------

def evaluate(cfg: Config, workdir: str, step: Step, spark) -> dict:
    """Validation metrics and training objective of the model as it stands after ``step``."""
    state = plan.state(cfg, step, inclusive=True)
    record = {"iteration": step.iteration, "coordinate": step.coordinate,
              "auc": None, "logloss": None, "aupr": None}

    val, n_val = scored_rows(spark, workdir, "validation", state)
    roc = None
    if val is not None:
        m = binary_metrics(val, score=FULL_SCORE, label=schema.LABEL, weight=schema.WEIGHT)
        _conserved(n_val, m["rows"], "validation")
        record.update(auc=m["auc"], logloss=m["logloss"], aupr=m["aupr"])
        roc = m["roc"]

    train, n_train = scored_rows(spark, workdir, "train", state)
    if train is None:
        raise FileNotFoundError(f"metrics: no prepared training rows at {layout.prepared(workdir, 'train')}")
    loss, n_joined = train_loss(train)
    _conserved(n_train, n_joined, "train")
    pen = penalties(cfg, workdir, state, spark)
    penalty = sum(pen.values())
    record.update(objective=loss + penalty, train_loss=loss, penalty=penalty,
                  penalties=pen, rows={"train": n_train, "validation": n_val})

    if roc is not None:
        io.write_json(roc_path(workdir, step.iteration, step.coordinate), roc)
    io.write_json(layout.step_metrics(workdir, step.iteration, step.coordinate), record)
    io.mark_done(layout.step_dir(workdir, step.iteration, step.coordinate), "metrics", record)
    print(f"metrics {step}: AUC {_fmt(record['auc'])}  log loss {_fmt(record['logloss'])}  "
          f"objective {record['objective']:.6f}", flush=True)
    return record


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def records(cfg: Config, workdir: str) -> list[dict]:
    """Every evaluated step's record, in plan order."""
    out = []
    for s in plan.steps(cfg):
        if io.done_info(layout.step_dir(workdir, s.iteration, s.coordinate), "metrics") is None:
            continue
        url = layout.step_metrics(workdir, s.iteration, s.coordinate)
        if io.exists(url):
            out.append(io.read_json(url))
    return out


def collect(cfg: Config, workdir: str) -> list[dict]:
    """Write the run's metrics.json (all step records) and objective.json; return the records."""
    recs = records(cfg, workdir)
    io.write_json(layout.metrics(workdir), recs)
    io.write_json(layout.objective(workdir), [{k: r.get(k) for k in OBJECTIVE_KEYS} for r in recs])
    return recs

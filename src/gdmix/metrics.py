"""The metrics stage: how good the model is after a coordinate-descent step.

The full model's score of a row is its input offset plus the latest score of every
trained coordinate (docs/design.md §1; a coordinate without a score for a row adds 0). On
validation rows we report what the config's ``metrics:`` lists, exactly: AUC, AUPR, log
loss, RMSE of σ(s), per-entity AUC ``auc@<entity>`` and ``precision@<k>@<entity>`` (each
with ``<name>.entities``, the entities it averages over; definitions in ``gdmix.auc``),
and an ROC curve for the UI; for ``task: linear | poisson`` (docs/design.md §1.6) the RMSE
of the mean response and the mean Poisson deviance instead (``gdmix.task_metrics``); on
training rows the objective that coordinate descent
minimises, so a run can be checked to decrease it step by step.

With ``select: {metric: m}`` the run's models are those of the step best on m
(``select``); ``collect`` marks that step's record in ``metrics.json`` with
``"selected": true`` (every other record ``false``).
"""
from __future__ import annotations

import sys

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from gdmix import calibration, kinds, layout, plan, schema, storage, task_metrics
from gdmix.auc import by_score, grouped_metrics, per_entity_metrics
from gdmix.config import Config
from gdmix.metric_names import LOWER_IS_BETTER, per_entity_metric
from gdmix.plan import Step
from gdmix.spark import path as spark_path

FULL_SCORE = "_s"
OBJECTIVE_KEYS = ("iteration", "coordinate", "objective", "train_loss", "penalty")


def roc_path(workdir: str, iteration: int, coordinate: str) -> str:
    """The step's validation ROC curve: {"fpr": [...], "tpr": [...], "thresholds": [...]}."""
    return storage.join(layout.step_dir(workdir, iteration, coordinate), "roc.json")


# --- reading the work directory ----------------------------------------------------------

ROW, DUP = "_row", "_dup"  # per uid: prepared rows (1, or 0 for a score of an unknown uid),
#                            the most score rows any one coordinate has (1, or > 1: duplicates)


def _has_parquet(url: str) -> bool:
    return bool(storage.parquet_files(url))


def _score_urls(workdir: str, split: str, state: dict[str, Step]) -> list[tuple[str, str]]:
    """(url, what) of every trained coordinate's scores of ``split``; they must exist."""
    out = []
    for d, s in state.items():
        url = layout.scores(workdir, s.iteration, s.coordinate, d, split)
        what = f"coordinate {d!r} ({split}, written by step {s})"
        if not storage.exists(url):
            raise FileNotFoundError(f"metrics: no scores for {what} at {url}")
        out.append((url, what))
    return out


def entity_key(column: str) -> str:
    """The name of an entity column in the frame ``scored_rows`` returns."""
    return f"_entity:{column}"


_SPARK_TYPES = {"int8": "byte", "int16": "short", "int32": "int", "int64": "long", "string": "string",
                "large_string": "string", "uint8": "short", "uint16": "int", "uint32": "long"}


def _read_schema(url: str, entities: tuple[str, ...]) -> str:
    """The prepared rows' read schema: the keys, plus the entity columns with their types
    from a Parquet footer (an explicit read schema spares Spark a footer-reading job)."""
    if not entities:
        return schema.PREPARED_KEYS
    fs, _ = storage.filesystem(url)
    with fs.open(storage.parquet_files(url)[0], "rb") as f:
        types = pq.read_schema(f)
    out = []
    for e in entities:
        if e not in types.names:
            raise ValueError(f"metrics: the prepared rows at {url} have no entity column {e!r}")
        out.append(f"`{e}` {_SPARK_TYPES.get(str(types.field(e).type), 'string')}")
    return ", ".join([schema.PREPARED_KEYS, *out])


def scored_rows(spark, workdir: str, split: str, state: dict[str, Step], entities: tuple[str, ...] = ()):
    """Per uid: label, weight, the full model score ``_s``, and the checks' counts (``_row``:
    prepared rows with that uid, ``_dup``: most score rows of one coordinate), and each of
    ``entities`` (columns of the prepared rows, as strings, named ``entity_key(column)``);
    or None when the split has no rows. One shuffle: the prepared rows and every score file
    are stacked and grouped by uid (a left join per coordinate would shuffle once per
    coordinate), and explicit read schemas spare Spark a footer-reading job per folder."""
    from pyspark.sql import functions as F

    url = layout.prepared(workdir, split)
    if not _has_parquet(url):
        return None
    rows = spark.read.schema(_read_schema(url, entities)).parquet(spark_path(url))
    ent = [F.col(f"`{e}`").cast("string").alias(entity_key(e)) for e in entities]
    no_ent = [F.lit(None).cast("string").alias(entity_key(e)) for e in entities]
    parts = [rows.select(schema.UID, schema.LABEL, schema.WEIGHT, F.col(schema.OFFSET).alias(FULL_SCORE),
                         F.lit(-1).alias("_k"), *ent)]
    score_urls = [u for u, _ in _score_urls(workdir, split, state)]
    for k, u in enumerate(score_urls):
        if _has_parquet(u):  # an empty folder: no row has a score (e.g. no entity models)
            sc = spark.read.schema(schema.SCORES_DDL).parquet(spark_path(u))
            parts.append(sc.select(schema.UID, F.lit(None).cast("double").alias(schema.LABEL),
                                   F.lit(None).cast("double").alias(schema.WEIGHT),
                                   F.col(schema.SCORE).alias(FULL_SCORE), F.lit(k).alias("_k"), *no_ent))
    stacked = parts[0]
    for p in parts[1:]:
        stacked = stacked.unionByName(p)
    k = F.col("_k")
    per_coordinate = [F.count_if(k == i) for i in range(len(score_urls))] or [F.lit(0)]
    return stacked.groupBy(schema.UID).agg(
        F.max(schema.LABEL).alias(schema.LABEL), F.max(schema.WEIGHT).alias(schema.WEIGHT),
        F.sum(FULL_SCORE).alias(FULL_SCORE), F.count_if(k < 0).alias(ROW),
        (F.greatest(*per_coordinate, F.lit(0)) if len(per_coordinate) > 1 else per_coordinate[0]).alias(DUP),
        *[F.max(F.col(f"`{entity_key(e)}`")).alias(entity_key(e)) for e in entities])


def _check_counts(spark, workdir: str, split: str, state, n_prepared: int, n_read: int,
                  unknown: int, dups: int) -> None:
    """Raise on what the counts of ``scored_rows`` show; name example uids when scores are bad."""
    if unknown or dups:
        rows = spark.read.schema(schema.PREPARED_KEYS).parquet(spark_path(layout.prepared(workdir, split)))
        for url, what in _score_urls(workdir, split, state):
            if _has_parquet(url):
                _name_bad_uids(spark.read.schema(schema.SCORES_DDL).parquet(spark_path(url)), rows, what)
        raise ValueError(f"metrics: the scores of the {split} split have {unknown} unknown and {dups} "
                         "duplicated uids")
    if n_prepared != n_read:
        raise ValueError(f"metrics: read {n_read} {split} rows but {n_prepared} were prepared")


def _name_bad_uids(scores, rows, what: str) -> None:
    """Fail with examples of uids a score file should not have: unknown ones and duplicates."""
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


# --- the training objective ---------------------------------------------------------------

def train_loss(df, task: str = "logistic") -> dict:
    """Σ w·ℓ(s, y) over the rows of ``scored_rows`` (the objective's loss term, the task's ℓ:
    ``gdmix.task_metrics.loss_col``), with the counts the checks need: rows, unknown uids,
    duplicated uids, non-finite scores."""
    from pyspark.sql import functions as F

    s, known = F.col(FULL_SCORE), F.col(ROW) > 0
    y = F.col(schema.LABEL)
    ell = task_metrics.loss_col(task, s, y)
    r = df.agg(
        F.sum(F.when(known, F.col(schema.WEIGHT) * ell)).alias("loss"),
        F.sum(F.when(known, F.col(schema.WEIGHT))).alias("weight"),
        F.sum(ROW).alias("rows"), F.count_if(~known).alias("unknown"), F.count_if(F.col(DUP) > 1).alias("dups"),
        F.count_if(known & (F.isnan(s) | (F.abs(s) == float("inf")))).alias("bad"),
    ).first()
    return {"loss": float(r["loss"] or 0.0), "weight": float(r["weight"] or 0.0), "rows": int(r["rows"] or 0),
            "unknown": int(r["unknown"] or 0), "dups": int(r["dups"] or 0), "bad": int(r["bad"] or 0)}


def penalties(cfg: Config, workdir: str, state: dict[str, Step]) -> dict[str, float]:
    """λ_d/2 · Σ_models (‖values‖² [+ intercept²]) of each coordinate's latest coefficients,
    streamed from the Parquet files with pyarrow (a small table: no Spark job)."""
    out = {}
    for d, s in state.items():
        c = cfg.coordinate(d)
        url = layout.coefficients(workdir, s.iteration, s.coordinate, d)
        if not storage.exists(url):
            raise FileNotFoundError(f"metrics: no coefficients for coordinate {d!r} at {url} "
                                    f"(written by step {s})")
        if c.l2_auto is not None:  # λ estimated by the step (gdmix.l2)
            from gdmix import l2

            out[d] = l2.penalty(l2.l2_of(cfg, workdir, s, d), c, storage.read_table(url, schema=schema.COEFFICIENTS))
            continue
        if cfg.prior is not None:  # per-coefficient weights and centres (gdmix.priors)
            from gdmix import priors

            table = storage.read_table(url, schema=schema.COEFFICIENTS)
            out[d] = priors.penalty(c, priors.prior_models(cfg, workdir, c) if table.num_rows else None,
                                    cfg.prior.weight, table)
            continue
        total = 0.0
        columns = [schema.VALUES] + ([schema.INTERCEPT] if c.regularize_intercept else [])
        for batch in storage.iter_batches(url, columns):
            v = pc.list_flatten(batch.column(schema.VALUES)).to_numpy(zero_copy_only=False)
            total += float(np.dot(v, v))
            if c.regularize_intercept:
                b = batch.column(schema.INTERCEPT).to_numpy(zero_copy_only=False)
                total += float(np.dot(b, b))
        out[d] = c.l2 / 2 * total
    return out


# --- the stage ------------------------------------------------------------------------------

def record_keys(cfg: Config) -> list[str]:
    """The validation keys of a step's record: the configured metrics, each per-entity
    metric followed by ``<name>.entities``."""
    out = []
    for m in cfg.metrics:
        out += [m, f"{m}.entities"] if per_entity_metric(m) else [m]
    return out


def _per_entity(cfg: Config, val) -> dict:
    """The configured per-entity metrics of the scored validation rows, by name."""
    from pyspark.sql import functions as F

    wanted: dict[str, list] = {}
    for m in cfg.metrics:
        p = per_entity_metric(m)
        if p is not None:
            wanted.setdefault(p.entity, []).append(p)
    out = {}
    rows = val.where(F.col(ROW) > 0)
    for e, ps in wanted.items():
        ks = tuple(sorted({p.k for p in ps if p.kind == "precision"}))
        r = per_entity_metrics(rows, f"`{entity_key(e)}`", FULL_SCORE, schema.LABEL, schema.WEIGHT,
                               schema.UID, auc=any(p.kind == "auc" for p in ps), ks=ks)
        for p in ps:
            key = "auc" if p.kind == "auc" else f"precision@{p.k}"
            out[p.name], out[f"{p.name}.entities"] = r[key], r[f"{key}.entities"]
    return out


def evaluate(cfg: Config, workdir: str, step: Step, spark) -> dict:
    """Validation metrics and training objective of the model as it stands after ``step``;
    the train log loss (Σ w ℓ / Σ w); what the step's partition and training recorded
    (``step_summary``); and for the run's last step, the configured metrics on training
    rows too (``train_metrics``) and the validation calibration and score histogram by
    label (``gdmix.calibration``)."""
    import time

    started = time.time()
    last = step == plan.sequence(cfg)[-1]  # the run's last step (a joint step, with acceleration)
    state = plan.state(cfg, step, inclusive=True)
    record = {"iteration": step.iteration, "coordinate": step.coordinate, **{k: None for k in record_keys(cfg)}}
    entities = tuple(dict.fromkeys(p.entity for p in map(per_entity_metric, cfg.metrics) if p))

    n_val, roc = 0, None
    val = scored_rows(spark, workdir, "validation", state, entities)
    if val is not None:
        from pyspark.sql import functions as F

        if entities:  # read twice: by score, then by entity
            val = val.localCheckpoint(eager=True)
        known = F.col(ROW) > 0
        if cfg.task != "logistic":  # regression: rmse / poisson_deviance of the mean response
            n_val = storage.parquet_rows(layout.prepared(workdir, "validation"))
            c = val.agg(F.sum(ROW).alias("rows"), F.count_if(~known).alias("unknown"),
                        F.count_if(F.col(DUP) > 1).alias("dups")).first()
            _check_counts(spark, workdir, "validation", state, n_val, int(c["rows"] or 0),
                          int(c["unknown"] or 0), int(c["dups"] or 0))
            m = task_metrics.sums(val, cfg.task, FULL_SCORE, schema.LABEL, schema.WEIGHT, known)
            record.update({k: m[k] for k in cfg.metrics if k in m})
            val = None
    if val is not None:
        from pyspark.sql import functions as F

        known = F.col(ROW) > 0
        grouped = by_score(val, score=FULL_SCORE, label=schema.LABEL, weight=schema.WEIGHT, rows=F.col(ROW),
                           extra={"unknown": (~known).cast("long"), "dups": (F.col(DUP) > 1).cast("long")})
        n_val = storage.parquet_rows(layout.prepared(workdir, "validation"))
        m = grouped_metrics(grouped, extra=("unknown", "dups"), max_groups=n_val)
        _check_counts(spark, workdir, "validation", state, n_val, m["rows"], **m["extra"])
        record.update({k: m[k] for k in cfg.metrics if k in m})  # what the config's metrics: asks for
        if entities:
            record.update(_per_entity(cfg, val))
        roc = m["roc"]
        if last:
            record["calibration"] = calibration.binned(val, FULL_SCORE, schema.LABEL, schema.WEIGHT, where=known)

    train = scored_rows(spark, workdir, "train", state)
    if train is None:
        raise FileNotFoundError(f"metrics: no prepared training rows at {layout.prepared(workdir, 'train')}")
    t = train_loss(train, cfg.task)
    n_train = storage.parquet_rows(layout.prepared(workdir, "train"))
    _check_counts(spark, workdir, "train", state, n_train, t["rows"], t["unknown"], t["dups"])
    if t["bad"]:
        raise ValueError(f"metrics: {t['bad']} training rows have a non-finite score")
    pen = penalties(cfg, workdir, state)
    penalty = sum(pen.values())
    loss = t["loss"]
    record.update(objective=loss + penalty, train_loss=loss, penalty=penalty,
                  train_logloss=loss / t["weight"] if t["weight"] > 0 else None,  # the task's mean loss
                  penalties=pen, rows={"train": n_train, "validation": n_val})
    if not plan.is_joint(step) and cfg.coordinate(step.coordinate).l2_auto is not None:  # the λ it estimated
        from gdmix import l2

        record["l2"] = l2.read(workdir, step)["used"]
    if last:
        record["train_metrics"] = _train_metrics(cfg, train, n_train)
    record.update(step_summary(workdir, step))
    record["seconds"]["metrics"] = round(time.time() - started, 3)

    if roc is not None:
        storage.write_json(roc_path(workdir, step.iteration, step.coordinate), roc)
    storage.write_json(layout.step_metrics(workdir, step.iteration, step.coordinate), record)
    storage.mark_done(layout.step_dir(workdir, step.iteration, step.coordinate), "metrics", record)
    _warn_rise(cfg, workdir, step, record)
    return record


def _train_metrics(cfg: Config, train, n_train: int) -> dict:
    """The configured global metrics (AUC, AUPR, log loss, RMSE) on the training rows."""
    from pyspark.sql import functions as F

    known = F.col(ROW) > 0
    if cfg.task != "logistic":  # regression: rmse / poisson_deviance of the mean response
        m = task_metrics.sums(train, cfg.task, FULL_SCORE, schema.LABEL, schema.WEIGHT, known)
        return {k: m[k] for k in cfg.metrics if k in m}
    grouped = by_score(train.where(known), score=FULL_SCORE, label=schema.LABEL,
                       weight=schema.WEIGHT, rows=F.col(ROW))
    m = grouped_metrics(grouped, max_groups=n_train)
    return {k: m[k] for k in cfg.metrics if k in m}


# What a step's record keeps of its train done marker: time, solver work and outcome, and
# for a per-entity kind the entity counts (active: has a model; passive: too few rows;
# unseen: validation entities without a model).
TRAIN_SUMMARY_KEYS = ("objective", "iterations", "converged", "outcome", "grad_inf", "method",
                      "active_entities", "passive_entities", "unseen_entities", "unseen_rows",
                      "not_converged", "entity_iterations")


def step_summary(workdir: str, step: Step) -> dict:
    """{"seconds": {partition, train}, "training": {...}} from the step's done markers: the
    report's per-stage times and solver figures, recorded with the metrics."""
    here = layout.step_dir(workdir, step.iteration, step.coordinate)
    part = storage.done_info(here, "partition") or {}
    train = storage.done_info(here, "train") or {}
    training = {k: train[k] for k in TRAIN_SUMMARY_KEYS if k in train}
    if "objective" in training:  # the step's own sub-problem, not the model's F
        training["coordinate_objective"] = training.pop("objective")
    return {"seconds": {"partition": part.get("seconds"), "train": train.get("seconds")}, "training": training}


# Block coordinate descent never raises the objective (docs/design.md §2.1); a rise beyond
# this relative amount is rounding no longer: a lost or stale input, or a solver stopped early.
OBJECTIVE_RISE_TOLERANCE = 1e-8


def objective_rises(cfg: Config, recs: list[dict], indexed: bool = False) -> list:
    """A warning per step whose training objective is above the previous evaluated step's
    by more than rounding (none for a run with a coordinate whose kind is not convex: a
    deep fixed effect, nor for a step of an ``l2: auto`` coordinate); with ``indexed``, (index in ``recs``, warning) pairs."""
    if not all(kinds.of(c).convex for c in cfg.coordinates):
        return []
    out = []
    for i, (prev, r) in enumerate(zip(recs, recs[1:]), start=1):
        a, b = prev.get("objective"), r.get("objective")
        if r["coordinate"] != plan.JOINT and cfg.coordinate(r["coordinate"]).l2_auto is not None:
            continue  # the step changed its λ (l2: auto): a new objective, not comparable
        if a is None or b is None or b - a <= OBJECTIVE_RISE_TOLERANCE * max(1.0, abs(a)):
            continue
        out.append(f"the training objective rose from {a:.9g} after iter-{prev['iteration']}/{prev['coordinate']} "
                   f"to {b:.9g} after iter-{r['iteration']}/{r['coordinate']} (+{(b - a) / max(1.0, abs(a)):.2e} "
                   "relative): coordinate descent never raises it; suspect a lost or stale file or a solver "
                   "that stopped early")
        if indexed:
            out[-1] = (i, out[-1])
    return out


def _warn_rise(cfg: Config, workdir: str, step: Step, record: dict) -> None:
    """Compare with the previous step's recorded objective, when it has one; warn loudly."""
    steps = plan.sequence(cfg)
    i = steps.index(step)
    if i == 0:
        return
    prev = steps[i - 1]
    url = layout.step_metrics(workdir, prev.iteration, prev.coordinate)
    if not storage.exists(url):
        return
    for w in objective_rises(cfg, [storage.read_json(url), record]):
        print(f"WARNING: {step}: {w}", flush=True)
        print(f"gdmix: WARNING: {step}: {w}", file=sys.stderr, flush=True)


def records(cfg: Config, workdir: str) -> list[dict]:
    """Every evaluated step's record, in plan order (joint steps included)."""
    out = []
    for s in plan.sequence(cfg):
        if storage.done_info(layout.step_dir(workdir, s.iteration, s.coordinate), "metrics") is None:
            continue
        url = layout.step_metrics(workdir, s.iteration, s.coordinate)
        if storage.exists(url):
            out.append(storage.read_json(url))
    return out


def selectable(cfg: Config, step: Step) -> bool:
    """Whether the model after ``step`` can be exported as it stood: every fixed effect has
    been trained by then (a random effect not yet trained exports an empty model, under
    which every row scores 0, as the metrics stage scored that step)."""
    state = plan.state(cfg, step, inclusive=True)
    return all(c.name in state for c in cfg.coordinates if c.is_fixed_effect)


def select(cfg: Config, recs: list[dict]) -> dict | None:
    """The record of the step whose models the run exports, with ``select: {metric: m}``:
    the best value of m (lowest for log loss and RMSE, else highest) among the steps after
    which every fixed effect has a model (``selectable``); of equal values the later step.
    None without ``select``, or when no such step has a value of m (no validation rows):
    then the run exports the last step, as without ``select``."""
    if cfg.select is None:
        return None
    sign = -1.0 if cfg.select in LOWER_IS_BETTER else 1.0
    best = None
    for r in recs:
        v = r.get(cfg.select)
        if v is None or not selectable(cfg, Step(r["iteration"], r["coordinate"])):
            continue
        if best is None or sign * v >= sign * best[cfg.select]:
            best = r
    return best


def selected_step(cfg: Config, workdir: str) -> Step | None:
    """The step ``select`` chooses from the evaluated steps' records, or None (the last)."""
    best = select(cfg, records(cfg, workdir))
    return None if best is None else Step(best["iteration"], best["coordinate"])


def collect(cfg: Config, workdir: str) -> list[dict]:
    """Write the run's metrics.json (all step records) and objective.json; return the records.
    With ``select``, every record has ``selected``: true for the step ``select`` chooses."""
    recs = records(cfg, workdir)
    if cfg.select is not None:
        best = select(cfg, recs)
        for r in recs:
            r["selected"] = best is not None and (r["iteration"], r["coordinate"]) == (
                best["iteration"], best["coordinate"])
    for r in recs:
        r.pop("objective_warning", None)
    for i, w in objective_rises(cfg, recs, indexed=True):
        recs[i]["objective_warning"] = w
    storage.write_json(layout.metrics(workdir), recs)
    storage.write_json(layout.objective(workdir), [{k: r.get(k) for k in OBJECTIVE_KEYS} for r in recs])
    return recs

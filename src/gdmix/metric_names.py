"""The names of the validation metrics a run can record (the ``metrics:`` key).

Metrics of the whole validation split (``KNOWN_METRICS``), and per-entity ones:
``auc@<entity column>`` and ``precision@<k>@<entity column>``, the column a random
effect's ``entity``. ``parse_metrics`` checks a ``metrics:`` list against the coordinates.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from gdmix.config_keys import ConfigError

KNOWN_METRICS = ("auc", "logloss", "aupr", "rmse", "poisson_deviance")  # validation metrics of the whole split
DEFAULT_METRICS = ("auc", "logloss", "aupr")  # what the metrics stage records without ``metrics:``
LOWER_IS_BETTER = ("logloss", "rmse", "poisson_deviance")  # for ``select``: every other metric is better higher
# Metrics that need 0/1 labels and probabilities: the logistic task's only.
CLASSIFICATION_METRICS = ("auc", "logloss", "aupr")
# Without ``metrics:``, per task (``task:``, gdmix.losses).
_TASK_DEFAULTS = {"logistic": DEFAULT_METRICS, "linear": ("rmse",), "poisson": ("rmse", "poisson_deviance")}


def default_metrics(task: str) -> tuple[str, ...]:
    """What the metrics stage records for ``task`` when the config lists none."""
    return _TASK_DEFAULTS[task]
# Per-entity metrics: ``auc@<entity column>`` and ``precision@<k>@<entity column>``, the
# column a random effect's ``entity`` (see ``per_entity_metric``).
_PER_ENTITY_METRIC = re.compile(r"^(auc|precision@([0-9]+))@(.+)$")


@dataclass(frozen=True)
class PerEntityMetric:
    """A parsed ``auc@<entity>`` or ``precision@<k>@<entity>`` (``k`` None for auc)."""
    name: str  # the metric as written, also its key in a step's record
    kind: str  # "auc" or "precision"
    entity: str  # the entity column (a random effect's ``entity``)
    k: int | None = None


def per_entity_metric(name: str) -> PerEntityMetric | None:
    """The parsed per-entity metric ``name``, or None for a metric of the whole split."""
    m = _PER_ENTITY_METRIC.match(name)
    if m is None:
        return None
    kind = "auc" if m.group(1) == "auc" else "precision"
    return PerEntityMetric(name, kind, m.group(3), int(m.group(2)) if m.group(2) else None)


def parse_metrics(raw, coords, task: str = "logistic") -> tuple[str, ...]:
    """The ``metrics:`` list: metrics of the whole split, or per entity of a random effect.
    Classification metrics (auc, logloss, aupr, per-entity auc and precision) need the
    logistic task's 0/1 labels."""
    if not isinstance(raw, list):
        raise ConfigError(f"metrics: expected a list of metric names, got {raw!r}")
    entities = sorted({c.entity for c in coords if not c.is_fixed_effect})
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, str):
            raise ConfigError(f"metrics[{i}]: expected a metric name, got {m!r}")
        p = per_entity_metric(m)
        if p is None:
            if m not in KNOWN_METRICS:
                raise ConfigError(f"metrics[{i}]: unknown metric {m!r} (known: {KNOWN_METRICS}, "
                                  "auc@<entity column>, precision@<k>@<entity column>)")
        else:
            if p.k is not None and p.k < 1:
                raise ConfigError(f"metrics[{i}]: k in {m!r} must be >= 1")
            if p.entity not in entities:
                raise ConfigError(f"metrics[{i}]: {p.entity!r} in {m!r} is not the entity column of a "
                                  f"random effect (entity columns: {entities})")
        if task != "logistic" and (p is not None or m in CLASSIFICATION_METRICS):
            raise ConfigError(f"metrics[{i}]: {m!r} needs 0/1 labels: task {task!r} records "
                              "rmse or poisson_deviance")
        if m == "poisson_deviance" and task != "poisson":
            raise ConfigError(f"metrics[{i}]: 'poisson_deviance' needs task: poisson (the task is {task!r})")
        if m in out:
            raise ConfigError(f"metrics[{i}]: {m!r} is listed twice")
        out.append(m)
    return tuple(out)

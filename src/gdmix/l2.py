"""The L2 weight λ of a coordinate in a step: the configured number, or ``l2: auto``'s estimate.

One lookup, ``l2_of(cfg, workdir, step, coordinate)``, for everything that needs a
coordinate's penalty: the random-effect step that trains with it, the shift step
(docs/design.md §2.3), the objective the metrics report, the joint reference's penalty
and the report. With a number (or a grid point, ``gdmix.grid``), λ is that number.

With ``l2: auto`` (random effects, docs/design.md §7) λ is estimated between steps: a
step trains with the λ the coordinate's previous step handed on (``next`` of its
``l2.json``; the configured ``initial`` before its first step), and writes under its
step folder ``l2.json`` = {used: the λ its models were trained with, next: the update
from its models and their posterior variances, rounds: the λ of each inner update}. The
KFP pipeline's next component of the coordinate reads the same file, so no value travels
outside the work directory. ``per_feature`` holds one λ per feature of the coordinate's
bag (indexed by the bag's feature index) and one for the intercepts; ``coordinate`` one
for all (intercept included when it is penalised).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gdmix import layout, plan, schema, storage
from gdmix.config import Config, Coordinate
from gdmix.plan import Step

FILE = "l2.json"
INTERCEPT = -1  # the intercept's "feature index", as in gdmix.priors


@dataclass(frozen=True)
class L2:
    """λ of one coordinate: ``intercept`` for its intercepts (applied when the coordinate
    penalises them), ``features`` for every feature, unless ``per_feature`` (a λ per
    index of the bag's feature index) is given."""
    intercept: float
    features: float
    per_feature: np.ndarray | None = None

    def feature_weights(self, features: np.ndarray) -> np.ndarray:
        """λ of each feature index."""
        features = np.asarray(features, np.int64)
        if self.per_feature is None:
            return np.full(len(features), float(self.features))
        return self.per_feature[features]

    def weights(self, coord: Coordinate, features: np.ndarray) -> np.ndarray:
        """The penalty weight π of each coefficient (feature index −1: an intercept, λ·r)."""
        features = np.asarray(features, np.int64)
        icp = features == INTERCEPT
        out = np.empty(len(features))
        out[icp] = self.intercept if coord.regularize_intercept else 0.0
        out[~icp] = self.feature_weights(features[~icp])
        return out

    def to_json(self) -> dict:
        out = {"intercept": float(self.intercept), "features": float(self.features)}
        if self.per_feature is not None:
            out["per_feature"] = [float(v) for v in self.per_feature]
        return out

    @staticmethod
    def from_json(d: dict) -> "L2":
        pf = d.get("per_feature")
        return L2(float(d["intercept"]), float(d["features"]), None if pf is None else np.asarray(pf, float))

    def summary(self) -> str:
        if self.per_feature is None:
            return f"{self.features:.4g}" if self.intercept == self.features else \
                f"intercept {self.intercept:.4g}, features {self.features:.4g}"
        pf = self.per_feature
        return (f"intercept {self.intercept:.4g}, features {len(pf)}: median {np.median(pf):.4g} "
                f"[{pf.min():.4g}, {pf.max():.4g}]") if len(pf) else f"intercept {self.intercept:.4g}"


def configured(coord: Coordinate) -> L2:
    """The configured λ (auto: its start)."""
    return L2(float(coord.l2), float(coord.l2))


def file_of(workdir: str, step: Step) -> str:
    return storage.join(layout.step_dir(workdir, step.iteration, step.coordinate), FILE)


def read(workdir: str, step: Step) -> dict | None:
    url = file_of(workdir, step)
    return storage.read_json(url) if storage.exists(url) else None


def write(workdir: str, step: Step, used: L2, next_: L2, rounds: list[L2]) -> None:
    storage.write_json(file_of(workdir, step), {"used": used.to_json(), "next": next_.to_json(),
                                                "rounds": [r.to_json() for r in rounds]})


def start_of(cfg: Config, workdir: str, step: Step, coordinate: str) -> L2:
    """The λ a step of ``coordinate`` at ``step`` starts from: the ``next`` of the
    coordinate's last earlier step that wrote one, else the configured start."""
    coord = cfg.coordinate(coordinate)
    if coord.l2_auto is None:
        return configured(coord)
    steps = plan.steps(cfg)
    for s in reversed(steps[:steps.index(step)]):
        if s.coordinate == coordinate:
            doc = read(workdir, s)
            if doc is not None:
                return L2.from_json(doc["next"])
    return configured(coord)


def l2_of(cfg: Config, workdir: str, step: Step | None, coordinate: str) -> L2:
    """The λ of ``coordinate`` in ``step`` (None: after the whole run): the λ its models
    were trained with once the step trained it (``used``), else the λ it starts from."""
    coord = cfg.coordinate(coordinate)
    if coord.l2_auto is None:
        return configured(coord)
    if step is None or step.coordinate != coordinate:
        step = plan.latest(cfg, coordinate, step, inclusive=step is not None)
        if step is None:
            return configured(coord)
    doc = read(workdir, step)
    return L2.from_json(doc["used"]) if doc is not None else start_of(cfg, workdir, step, coordinate)


def penalty(lam: L2, coord: Coordinate, table: pa.Table) -> float:
    """Σ π/2 θ² over a coefficients table (schema.COEFFICIENTS) with λ = ``lam``."""
    lists = table.column(schema.INDICES).combine_chunks()
    feats = pc.list_flatten(lists).to_numpy(zero_copy_only=False).astype(np.int64)
    vals = pc.list_flatten(table.column(schema.VALUES).combine_chunks()).to_numpy(zero_copy_only=False)
    icp = table.column(schema.INTERCEPT).to_numpy().astype(np.float64)
    pen = lam.weights(coord, np.concatenate([np.full(len(icp), INTERCEPT), feats]))
    theta = np.concatenate([icp, vals.astype(np.float64)])
    return 0.5 * float(np.sum(pen * theta * theta))


def joint_penalties(cfg: Config, workdir: str, step: Step | None = None):
    """``gdmix.joint``'s ``penalties`` callable with every coordinate's λ at ``step``
    (None: after the run): the reference optimum of the objective the run minimised last."""
    def penalties(coord: Coordinate, model_ids, features):
        features = np.asarray(features, np.int64)
        return l2_of(cfg, workdir, step, coord.name).weights(coord, features), np.zeros(len(features))
    return penalties

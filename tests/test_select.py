"""``select: {metric: m}``: the run exports the models of the step best on m.

A hand-built work directory of four steps (fixed effect ``global``, random effect
``per_user``, two iterations), each step's coefficients and scores written so that the
steps validate differently: real metrics stages (local Spark) evaluate them, then the
finalize stage, the report, publish and the KFP finalize component are checked.

    step              writes             validation score (offset 0)       AUC      log loss
    iter-0/global     global             perfect ranking, shifted by +30   1.0      huge
    iter-0/per_user   per_user, global   small scale, some signal          middle   middle
    iter-1/global     global             a good, calibrated signal         < 1      the lowest
    iter-1/per_user   per_user, global   noise                             ~0.5     large
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from gdmix import config, layout, metrics, publish, schema, stages, storage
from gdmix.plan import Step

ROOT = Path(__file__).resolve().parents[1]
FE, RE = "global", "per_user"
S0, S1, S2, S3 = Step(0, FE), Step(0, RE), Step(1, FE), Step(1, RE)
WRITES = {S0: (FE,), S1: (RE, FE), S2: (FE,), S3: (RE, FE)}
USERS = [f"user{i}" for i in range(6)]


def raw(workdir, **over):
    return {
        "name": "select-test", "workdir": str(workdir), "iterations": 2,
        "acceleration": "none",  # the steps' files are written by hand, the joint step's not among them
        "data": {"train": "unused", "feature_bags": {"g": {"columns": ["a"]}, "u": {"columns": ["b"]}}},
        "coordinates": [
            {"name": FE, "type": "fixed_effect", "feature_bag": "g", "l2": 2.0},
            {"name": RE, "type": "random_effect", "feature_bag": "u", "entity": "user", "l2": 3.0},
        ],
        "metrics": ["auc", "logloss", "rmse"],
        **over,
    }


def sigmoid(s):
    return 1 / (1 + np.exp(-s))


def table_to(url, t):
    storage.write_table(storage.join(url, "part-00000.parquet"), t)


class Work:
    """The work directory; ``coef[(step, coordinate)]``: (intercept, value of its one feature)
    of every model that step wrote (model ids ``global`` or ``USERS``)."""

    def __init__(self, workdir):
        self.workdir = str(workdir)
        rng = np.random.default_rng(11)
        for bag, name in (("g", "a"), ("u", "b")):
            storage.write_table(layout.feature_index(self.workdir, bag),
                                pa.table({"index": pa.array([0], pa.int32()), "name": [name], "term": [""]},
                                         schema=schema.FEATURE_INDEX))
        self.coef = {}
        for step, coords in WRITES.items():
            for c in coords:
                ids = ["global"] if c == FE else USERS
                self.coef[(step, c)] = {m: (float(rng.normal()), float(rng.normal())) for m in ids}
                t = pa.table({"model_id": ids, "intercept": [self.coef[(step, c)][m][0] for m in ids],
                              "indices": [[0] for _ in ids], "values": [[self.coef[(step, c)][m][1]] for m in ids]},
                             schema=schema.COEFFICIENTS)
                table_to(layout.coefficients(self.workdir, step.iteration, step.coordinate, c), t)
        self.val = None
        uid0 = 0
        for split, n in (("train", 200), ("validation", 300)):
            uid = np.arange(uid0, uid0 + n, dtype=np.int64)
            uid0 += n
            y = (rng.random(n) < 0.4).astype(float)
            w = rng.uniform(0.5, 2.0, n)
            table_to(layout.prepared(self.workdir, split), pa.table({
                "uid": uid, "label": y, "weight": w, "offset": np.zeros(n),
                "user": rng.choice(USERS, n)}))
            scores = {  # (step, coordinate) -> this split's scores
                (S0, FE): 4 * (2 * y - 1) + 30,
                (S1, RE): 0.5 * (y - 0.5) + rng.normal(0, 0.3, n), (S1, FE): np.zeros(n),
                (S2, FE): 2 * (2 * y - 1) + rng.normal(0, 0.7, n),
                (S3, RE): np.zeros(n), (S3, FE): rng.normal(0, 5, n),
            }
            for (step, c), s in scores.items():
                table_to(layout.scores(self.workdir, step.iteration, step.coordinate, c, split),
                         pa.table({"uid": uid, "score": s}, schema=schema.SCORES))
            if split == "validation":
                self.val = (y, w, {S0: scores[(S0, FE)], S1: scores[(S1, RE)] + scores[(S1, FE)],
                                   S2: scores[(S1, RE)] + scores[(S2, FE)],
                                   S3: scores[(S3, RE)] + scores[(S3, FE)]})

    def model(self, coordinate):
        """{model_id: (intercept, value of the feature)} of the exported ``models/<coordinate>/``."""
        t = storage.read_table(layout.model(self.workdir, coordinate)).to_pylist()
        out = {}
        for r in t:
            means = {m["name"]: m["value"] for m in r["means"]}
            out[r["model_id"]] = (means.get(schema.INTERCEPT_NAME, 0.0), means.get("a" if coordinate == FE else "b"))
        return out


@pytest.fixture(scope="module")
def evaluated(spark, tmp_path_factory):
    """The work directory with every step evaluated (metrics do not depend on ``select``)."""
    root = tmp_path_factory.mktemp("select")
    work = Work(root / "runs" / "run-1")
    cfg = config.parse(raw(work.workdir))
    recs = {s: metrics.evaluate(cfg, work.workdir, s, spark) for s in (S0, S1, S2, S3)}
    return root, work, recs


def finalize(work, root, **over):
    cfg = config.parse(raw(work.workdir, **over))
    config.snapshot(cfg)
    return cfg, stages.finalize(cfg, work.workdir)


def test_the_steps_validate_as_designed(evaluated):
    _, work, recs = evaluated
    y, w, s = work.val
    for step, r in recs.items():  # the metrics the selection reads are the real ones
        assert r["auc"] == pytest.approx(roc_auc_score(y, s[step], sample_weight=w), abs=1e-12)
        exact = np.sum(w * (np.logaddexp(0, s[step]) - y * s[step])) / w.sum()  # sklearn's log_loss
        assert r["logloss"] == pytest.approx(exact, rel=1e-12)  # loses digits at |s| ~ 30
        if step != S0:
            assert r["logloss"] == pytest.approx(log_loss(y, sigmoid(s[step]), sample_weight=w), abs=1e-9)
    auc = {k: r["auc"] for k, r in recs.items()}
    loss = {k: r["logloss"] for k, r in recs.items()}
    assert auc[S0] == 1.0 > max(auc[S1], auc[S2], auc[S3])
    assert loss[S2] < min(loss[S0], loss[S1], loss[S3])
    assert auc[S2] < 1.0 and auc[S3] < auc[S2]


def test_select_exports_an_earlier_steps_models(evaluated):
    """iter-1/global has the lowest log loss: its fixed effect (written by iter-1/global) and
    the random effect as it stood then (written by iter-0/per_user) are exported, not the
    last step's. Lower is better for log loss."""
    root, work, recs = evaluated
    cfg, out = finalize(work, root, select={"metric": "logloss"})
    assert cfg.select == "logloss"
    assert work.model(FE) == work.coef[(S2, FE)]
    assert work.model(RE) == work.coef[(S1, RE)]
    assert work.model(FE) != work.coef[(S3, FE)] and work.model(RE) != work.coef[(S3, RE)]

    saved = storage.read_json(layout.metrics(work.workdir))
    assert [r["selected"] for r in saved] == [False, False, True, False]
    assert [(r["iteration"], r["coordinate"], r["logloss"]) for r in saved] == [
        (s.iteration, s.coordinate, recs[s]["logloss"]) for s in (S0, S1, S2, S3)]
    assert out["metrics"] == saved

    page = open(layout.report(work.workdir)).read()
    assert f"Exported models: those after iter-1/{FE}</b>, the step with the best validation logloss" in page
    assert page.count("&#9664; exported") == 1
    assert "<th>RMSE</th>" in page and "<th>selected</th>" in page


def test_select_a_step_before_the_random_effect_is_trained(evaluated, spark, tmp_path):
    """iter-0/global has the best AUC: its fixed effect, and an empty per_user model (no
    entity has one yet), which scores every row 0, as the metrics stage scored that step."""
    from gdmix import models

    root, work, recs = evaluated
    cfg, _ = finalize(work, root, select={"metric": "auc"})
    assert work.model(FE) == work.coef[(S0, FE)]
    assert storage.read_table(layout.model(work.workdir, RE)).num_rows == 0
    assert [r["selected"] for r in storage.read_json(layout.metrics(work.workdir))] == [True, False, False, False]
    # gdmix score with those models: the fixed effect's score alone.
    raw_rows = tmp_path / "raw.parquet"
    storage.write_table(str(raw_rows), pa.table({"uid": [1, 2], "a": [0.5, -1.0], "b": [2.0, 3.0],
                                                 "user": ["user0", "user1"]}))
    models.score(cfg, work.workdir, str(raw_rows), str(tmp_path / "scored"), spark)
    got = storage.read_table(str(tmp_path / "scored")).sort_by("uid")
    icp, a = work.coef[(S0, FE)]["global"]
    assert got.column("score").to_pylist() == pytest.approx([icp + 0.5 * a, icp - 1.0 * a], abs=1e-6)
    assert got.column(f"{RE}_score").to_pylist() == [0.0, 0.0]


def test_rmse_is_lower_is_better(evaluated):
    _, work, recs = evaluated
    cfg = config.parse(raw(work.workdir, select={"metric": "rmse"}))
    rmse = {s: recs[s]["rmse"] for s in (S0, S1, S2, S3)}
    assert metrics.selected_step(cfg, work.workdir) == min(rmse, key=rmse.get) != max(rmse, key=rmse.get)


def test_without_select_the_last_step_is_exported(evaluated):
    root, work, _ = evaluated
    finalize(work, root)
    assert work.model(FE) == work.coef[(S3, FE)]
    assert work.model(RE) == work.coef[(S3, RE)]
    saved = storage.read_json(layout.metrics(work.workdir))
    assert all("selected" not in r for r in saved)  # metrics.json as before


def test_select_only_steps_with_a_value(evaluated):
    """Steps without a value of the metric are skipped; with none, the last step (None)."""
    _, work, recs = evaluated
    cfg = config.parse(raw(work.workdir, select={"metric": "auc"}))
    no_s0 = [dict(recs[s], auc=None) if s == S0 else recs[s] for s in (S0, S1, S2, S3)]
    best = max((S1, S2, S3), key=lambda s: recs[s]["auc"])
    assert (metrics.select(cfg, no_s0)["iteration"], metrics.select(cfg, no_s0)["coordinate"]) == (
        best.iteration, best.coordinate)
    assert metrics.select(cfg, [dict(recs[s], auc=None) for s in (S0, S1, S2, S3)]) is None
    equal = [dict(recs[s], auc=0.7) for s in (S0, S1, S2, S3)]  # ties: the later step
    assert (metrics.select(cfg, equal)["iteration"], metrics.select(cfg, equal)["coordinate"]) == (1, RE)


def test_select_config_errors(tmp_path):
    with pytest.raises(config.ConfigError, match=r"select.metric: 'aupr' is not one of the configured metrics"):
        config.parse(raw(tmp_path, select={"metric": "aupr"}))
    with pytest.raises(config.ConfigError, match=r"select.metrik: unknown key"):
        config.parse(raw(tmp_path, select={"metric": "auc", "metrik": "auc"}))
    cfg = config.parse(raw(tmp_path, metrics=["auc@user"], select={"metric": "auc@user"}))
    assert config.parse(config.to_raw(cfg)) == cfg and config.to_raw(cfg)["select"] == {"metric": "auc@user"}
    assert "select" not in config.to_raw(config.parse(raw(tmp_path)))


def test_publish_gates_on_the_selected_steps_auc(evaluated):
    root, work, recs = evaluated
    cfg, _ = finalize(work, root, select={"metric": "logloss"}, publish={"to": str(root / "published")})
    pointer = publish.publish(cfg, work.workdir)
    assert pointer["auc"] == recs[S2]["auc"] != recs[S3]["auc"]
    rec = json.loads((Path(pointer["url"]) / "publish.json").read_text())
    assert rec["auc_of"] == "the selected step" and rec["step"]["iteration"] == 1 and rec["step"]["coordinate"] == FE


def _finalize_component():
    spec = importlib.util.spec_from_file_location("gdmix_components_finalize",
                                                  ROOT / "components" / "finalize" / "component.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_finalize_component_logs_the_selected_step(evaluated, tmp_path):
    from kfp.dsl import HTML, Metrics

    root, work, recs = evaluated
    config.snapshot(config.parse(raw(work.workdir, select={"metric": "logloss"})))
    report, final = HTML(name="report", uri=str(tmp_path / "report.html")), Metrics(name="m", uri=str(tmp_path / "m"))
    _finalize_component().finalize(str(root / "runs"), "run-1", report, final)
    m = final.metadata
    assert m["auc"] == recs[S3]["auc"]  # the last step's, as before
    assert (m["selected_iteration"], m["selected_step"]) == (1.0, 2.0)
    assert m["selected_auc"] == recs[S2]["auc"] and m["selected_logloss"] == recs[S2]["logloss"]
    assert "selected_selected" not in m and "selected_coordinate" not in m


def test_a_step_before_the_fixed_effect_is_trained_is_not_selected(tmp_path):
    """With the random effect first, the model after iter-0/per_user has no fixed effect to
    export, whatever its validation value: the best of the later steps is selected."""
    r = raw(tmp_path, select={"metric": "auc"})
    r["coordinates"] = r["coordinates"][::-1]
    cfg = config.parse(r)
    recs = [{"iteration": 0, "coordinate": RE, "auc": 0.9}, {"iteration": 0, "coordinate": FE, "auc": 0.7},
            {"iteration": 1, "coordinate": RE, "auc": 0.8}, {"iteration": 1, "coordinate": FE, "auc": 0.6}]
    assert metrics.select(cfg, recs) == recs[2]
    assert not metrics.selectable(cfg, Step(0, RE)) and metrics.selectable(cfg, Step(0, FE))


def test_metrics_component_logs_every_numeric_key(evaluated, tmp_path):
    """The KFP metrics component on one step: every numeric value of its record, the new
    metrics included (per-entity ones with their entity counts), nothing nested."""
    from kfp.dsl import ClassificationMetrics, Metrics

    root, work, recs = evaluated
    config.snapshot(config.parse(raw(work.workdir, metrics=["auc", "rmse", "auc@user", "precision@2@user"])))
    spec = importlib.util.spec_from_file_location("gdmix_components_metrics",
                                                  ROOT / "components" / "metrics" / "component.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    m, roc = Metrics(name="m", uri=str(tmp_path / "m")), ClassificationMetrics(name="r", uri=str(tmp_path / "r"))
    module.metrics(str(root / "runs"), "run-1", 1, FE, m, roc)
    rec = storage.read_json(layout.step_metrics(work.workdir, 1, FE))
    assert set(m.metadata) == {"auc", "rmse", "auc@user", "auc@user.entities", "precision@2@user",
                               "precision@2@user.entities", "objective", "train_loss", "penalty",
                               "train_logloss"}
    assert m.metadata["rmse"] == recs[S2]["rmse"] and m.metadata["auc@user"] == rec["auc@user"]
    assert m.metadata["auc@user.entities"] == len(USERS) == rec["auc@user.entities"]

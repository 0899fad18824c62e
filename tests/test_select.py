"""``select: {metric: m}``: the run exports the models of the step best on m.

A hand-built work directory of four steps (fixed effect ``global``, random effect
``per_user``, two iterations), each step's coefficients and scores written so that the
steps validate differently: real metrics stages (local Spark) evaluate them, then the
finalize stage, the report, publish and the KFP finalize component are checked.

    step              writes             validation score (offset 0)         AUC      log loss
    iter-0/global     global             perfect and calibrated              1.0      small, but per_user untrained
    iter-0/per_user   per_user, global   small scale, some signal            middle   the lowest of the rest
    iter-1/global     global             sharp signal, shifted by -20        highest  huge
    iter-1/per_user   per_user, global   noise                               ~0.5     large
"""
from __future__ import annotations

import dataclasses
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
                (S0, FE): 4 * (2 * y - 1),
                (S1, RE): 0.5 * (y - 0.5) + rng.normal(0, 0.3, n), (S1, FE): np.zeros(n),
                (S2, FE): 10 * (y + rng.normal(0, 0.3, n)) - 20,
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
        assert r["logloss"] == pytest.approx(log_loss(y, sigmoid(s[step]), sample_weight=w), abs=1e-9)
    auc = {k: r["auc"] for k, r in recs.items()}
    loss = {k: r["logloss"] for k, r in recs.items()}
    assert auc[S0] == 1.0 and loss[S0] < min(loss[S1], loss[S2], loss[S3])  # best, but per_user untrained
    assert auc[S2] > max(auc[S1], auc[S3])
    assert loss[S1] < min(loss[S2], loss[S3])


def test_select_auc_exports_an_earlier_steps_models(evaluated):
    """iter-1/global validates best among the steps after which both coordinates have a
    model: its fixed effect (written by iter-1/global) and the random effect as it stood
    then (written by iter-0/per_user) are exported, not the last step's."""
    root, work, recs = evaluated
    cfg, out = finalize(work, root, select={"metric": "auc"})
    assert cfg.select == "auc"
    assert work.model(FE) == work.coef[(S2, FE)]
    assert work.model(RE) == work.coef[(S1, RE)]
    assert work.model(FE) != work.coef[(S3, FE)]

    saved = storage.read_json(layout.metrics(work.workdir))
    assert [r["selected"] for r in saved] == [False, False, True, False]
    assert [(r["iteration"], r["coordinate"], r["auc"]) for r in saved] == [
        (s.iteration, s.coordinate, recs[s]["auc"]) for s in (S0, S1, S2, S3)]
    assert out["metrics"] == saved

    page = open(layout.report(work.workdir)).read()
    assert f"Exported models: those after iter-1/{FE}</b>, the step with the best validation auc" in page
    assert page.count("&#9664; exported") == 1
    assert "<th>RMSE</th>" in page and "<th>selected</th>" in page


def test_lower_is_better_for_logloss_and_rmse(evaluated):
    root, work, recs = evaluated
    finalize(work, root, select={"metric": "logloss"})
    assert work.model(FE) == work.coef[(S1, FE)]  # iter-0/per_user: lowest log loss
    assert work.model(RE) == work.coef[(S1, RE)]
    assert [r["selected"] for r in storage.read_json(layout.metrics(work.workdir))] == [False, True, False, False]

    cfg = config.parse(raw(work.workdir, select={"metric": "rmse"}))
    rmse = {s: recs[s]["rmse"] for s in (S1, S2, S3)}
    assert metrics.selected_step(cfg, work.workdir) == min(rmse, key=rmse.get)


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
    no_s2 = [dict(recs[s], auc=None) if s == S2 else recs[s] for s in (S0, S1, S2, S3)]
    assert metrics.select(cfg, no_s2)["coordinate"] == RE and metrics.select(cfg, no_s2)["iteration"] == 0
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
    cfg, _ = finalize(work, root, select={"metric": "auc"}, publish={"to": str(root / "published")})
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
    config.snapshot(config.parse(raw(work.workdir, select={"metric": "auc"})))
    report, final = HTML(name="report", uri=str(tmp_path / "report.html")), Metrics(name="m", uri=str(tmp_path / "m"))
    _finalize_component().finalize(str(root / "runs"), "run-1", report, final)
    m = final.metadata
    assert m["auc"] == recs[S3]["auc"]  # the last step's, as before
    assert (m["selected_iteration"], m["selected_step"]) == (1.0, 2.0)
    assert m["selected_auc"] == recs[S2]["auc"] and m["selected_logloss"] == recs[S2]["logloss"]
    assert "selected_selected" not in m and "selected_coordinate" not in m

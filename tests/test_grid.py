"""``l2: [λ, ...]`` (gdmix.grid): the embedded search picks the λ that a direct search
over the joint optima (gdmix.joint) picks, and leaves the chosen run's outputs, the grid
table and its plot in the work directory."""
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest

from gdmix import auc, config, driver, grid, joint, layout, schema, sparse, storage
from gdmix.config_keys import ConfigError
from gdmix.data import synthetic

GRID = [0.03, 1.0, 30.0]


def _raw(data_dir, workdir, user_l2=GRID, iterations=5):
    return {
        "name": "grid", "workdir": str(workdir),
        "data": {"train": str(data_dir / "train"), "validation_fraction": 0.3,
                 "feature_bags": {"per_user": {"ntv": "global_features"}, "per_item": {"ntv": "item_features"}}},
        "iterations": iterations,
        "coordinates": [
            {"name": "per-user", "type": "random_effect", "entity": "user_id", "feature_bag": "per_user",
             "l2": user_l2},
            {"name": "per-item", "type": "random_effect", "entity": "item_id", "feature_bag": "per_item", "l2": 3.0},
        ],
        "metrics": ["auc", "logloss"],
    }


def _validation_auc(cfg, workdir, solution) -> float:
    """AUC on the prepared validation rows of the joint solution's models."""
    rows = storage.read_table(layout.prepared(workdir, "validation"))
    s = rows.column(schema.OFFSET).to_numpy().astype(float).copy()
    for c in cfg.coordinates:
        models = solution.coefficients[c.name]
        ids = pc.cast(rows.column(c.entity), "string").to_pylist()
        csr = sparse.from_table(rows, schema.bag_indices(c.feature_bag), schema.bag_values(c.feature_bag))
        for i, eid in enumerate(ids):
            m = models.get(eid)
            if m is None:
                continue
            lo, hi = csr.indptr[i], csr.indptr[i + 1]
            s[i] += m.intercept + sum(m.coefficients.get(int(j), 0.0) * v
                                      for j, v in zip(csr.indices[lo:hi], csr.values[lo:hi]))
    y, w = rows.column(schema.LABEL).to_numpy(), rows.column(schema.WEIGHT).to_numpy()
    return auc.ranking_metrics(s, w * y, w * (1 - y))["auc"]


@pytest.mark.slow
def test_grid_picks_the_lambda_of_a_direct_search_over_joint_optima(tmp_path, spark):
    synthetic.generate(str(tmp_path / "data"), n_rows=3000, n_users=50, n_items=20, seed=11)
    cfg = config.parse(_raw(tmp_path / "data", tmp_path / "work"))
    records = driver.run(cfg, spark=spark)
    doc = storage.read_json(storage.join(cfg.workdir, grid.GRID_JSON))
    assert [p["l2"] for p in doc["points"]] == sorted(GRID, reverse=True)  # the path: largest λ first
    # the direct search: the joint optimum at every grid λ, scored on validation by the same metric
    prepared = doc["points"][0]["workdir"]
    direct = {}
    for lam in GRID:
        point = grid.point_config(cfg, {"per-user": lam, "per-item": 3.0}, prepared, None)
        direct[lam] = _validation_auc(point, prepared, joint.joint_optimum(point, prepared))
    run_auc = {p["l2"]: p["auc"] for p in doc["points"]}
    print("validation AUC by λ: joint", direct, "run", run_auc)
    assert doc["chosen"]["per-user"] == max(direct, key=direct.get)
    for lam in GRID:  # each point is (close to) its joint optimum
        assert run_auc[lam] == pytest.approx(direct[lam], abs=2e-3)
    assert len(set(round(v, 3) for v in direct.values())) == len(GRID), "the grid must discriminate"
    # the chosen point's outputs are the run's
    assert storage.read_json(layout.metrics(cfg.workdir)) == records
    assert records[-1]["auc"] == pytest.approx(run_auc[doc["chosen"]["per-user"]])
    assert storage.exists(layout.model(cfg.workdir, "per-user"))
    page = open(layout.report(cfg.workdir)).read()
    assert "l2 grid search" in page and page.count("data:image/png;base64") >= 3


def _two_grids(tmp_path):
    """A config with both random effects gridded, and each point's AUC (per-user best at
    λ = 1, per-item at λ = 20)."""
    raw = _raw(tmp_path, tmp_path / "work", user_l2=[1.0, 10.0])
    raw["coordinates"][1]["l2"] = [2.0, 20.0, 200.0]
    return config.parse(raw), {("per-user", 10.0): 0.70, ("per-user", 1.0): 0.72,
                               ("per-item", 200.0): 0.71, ("per-item", 20.0): 0.74, ("per-item", 2.0): 0.73}


def test_several_gridded_coordinates_are_searched_one_at_a_time(tmp_path):
    """Σ |grid| points, not Π: each coordinate's grid with the others at their best."""
    cfg, auc_of = _two_grids(tmp_path)
    seen = []

    def run_point(point):
        lam = {c.name: c.l2 for c in point.coordinates}
        searching = "per-user" if len(seen) < 2 else "per-item"
        seen.append((searching, lam, point.warm_start))
        storage.makedirs(point.workdir)
        for name in grid.COPIED:
            storage.write_json(storage.join(point.workdir, name), {"point": lam})
        storage.write_text(layout.report(point.workdir), "<html><body></body></html>")
        return [{"iteration": 0, "coordinate": "per-item", "auc": auc_of[(searching, lam[searching])]}]

    grid.search(cfg, run_point)
    assert [s[1] for s in seen] == [  # largest λ first; per-item searched with per-user at its best (1)
        {"per-user": 10.0, "per-item": 200.0}, {"per-user": 1.0, "per-item": 200.0},
        {"per-user": 1.0, "per-item": 200.0}, {"per-user": 1.0, "per-item": 20.0}, {"per-user": 1.0, "per-item": 2.0}]
    assert seen[0][2] is None and seen[1][2].endswith("grid/per-user=10/models")  # warm starts along the path
    doc = storage.read_json(storage.join(cfg.workdir, grid.GRID_JSON))
    assert doc["chosen"] == {"per-user": 1.0, "per-item": 20.0}
    assert [p["chosen"] for p in doc["points"]] == [False, True, False, True, False]
    assert storage.read_json(layout.metrics(cfg.workdir)) == {"point": {"per-user": 1.0, "per-item": 20.0}}


def test_the_pipeline_branches_and_selects_reach_the_same_choice(tmp_path):
    """On a cluster: each coordinate's points (cluster_point) read the λ earlier selects
    chose; select after each coordinate's branches gives the embedded search's grid.json
    (less the warm starts: every branch starts cold)."""
    cfg, auc_of = _two_grids(tmp_path)
    seen = []
    for c in cfg.coordinates:
        for lam in grid.path(c):  # the branches, in any order
            point = grid.cluster_point(cfg, c.name, lam)
            seen.append({k.name: k.l2 for k in point.coordinates})
            assert point.warm_start is None and point.workdir == grid.point_dir(cfg.workdir, c.name, lam)
            storage.makedirs(point.workdir)
            for name in grid.COPIED:
                storage.write_json(storage.join(point.workdir, name), {"point": seen[-1]})
            storage.write_json(layout.metrics(point.workdir),
                               [{"iteration": 0, "coordinate": "per-item", "auc": auc_of[(c.name, lam)]}])
            storage.write_text(layout.report(point.workdir), "<html><body></body></html>")
        doc = grid.select(cfg, c.name)
    assert seen == [{"per-user": 10.0, "per-item": 200.0}, {"per-user": 1.0, "per-item": 200.0},
                    {"per-user": 1.0, "per-item": 200.0}, {"per-user": 1.0, "per-item": 20.0},
                    {"per-user": 1.0, "per-item": 2.0}]
    assert doc["chosen"] == {"per-user": 1.0, "per-item": 20.0}
    assert [p["chosen"] for p in doc["points"]] == [False, True, False, True, False]
    assert storage.read_json(layout.metrics(cfg.workdir)) == [{"iteration": 0, "coordinate": "per-item",
                                                              "auc": 0.74}]
    assert "l2 grid search" in Path(layout.report(cfg.workdir)).read_text()
    assert grid.select(cfg, "per-user")["chosen"] == doc["chosen"]  # a rerun of a select changes nothing


@pytest.mark.parametrize("l2, message", [
    ([], "empty grid"),
    ([1.0, -2.0], "must be > 0"),
    ([1.0, 0.0], "must be > 0"),
    ([1.0, 1.0], "repeats"),
    ("often", "expected float, a list of floats"),
    ({"auto": "sometimes"}, "must be one of"),
    ({"auto": "coordinate", "initial": 0}, "must be > 0"),
])
def test_bad_l2_values_are_named(tmp_path, l2, message):
    with pytest.raises(ConfigError, match=message) as e:
        config.parse(_raw(tmp_path, tmp_path / "w", user_l2=l2))
    assert "coordinates[0].l2" in str(e.value)


def test_auto_is_refused_on_a_fixed_effect_and_with_a_prior(tmp_path):
    raw = _raw(tmp_path, tmp_path / "w", user_l2=1.0)
    raw["data"]["feature_bags"]["global"] = {"ntv": "global_features"}
    raw["coordinates"].insert(0, {"name": "global", "type": "fixed_effect", "feature_bag": "global", "l2": "auto"})
    with pytest.raises(ConfigError, match=r"coordinates\[0\].l2: auto is for random effects"):
        config.parse(raw)
    raw = _raw(tmp_path, tmp_path / "w", user_l2="auto")
    raw["prior"] = {"models": str(tmp_path / "m")}
    with pytest.raises(ConfigError, match=r"coordinates\[0\].l2: auto does not combine with prior"):
        config.parse(raw)


def test_grids_and_auto_survive_the_config_snapshot(tmp_path):
    raw = _raw(tmp_path, tmp_path / "w")
    raw["coordinates"][1]["l2"] = {"auto": "per_feature", "initial": 5}
    cfg = config.parse(raw)
    assert cfg.coordinates[0].l2_grid == tuple(GRID) and cfg.coordinates[0].l2 == max(GRID)
    assert cfg.coordinates[1].l2_auto == "per_feature" and cfg.coordinates[1].l2 == 5.0
    assert config.parse(config.to_raw(cfg)).coordinates == cfg.coordinates

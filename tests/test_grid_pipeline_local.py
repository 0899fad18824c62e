"""An l2 grid on a cluster (pipelines/gdmix_pipeline.py): the gridded pipeline runs end to
end under kfp.local (SubprocessRunner, this interpreter), each point a parallel branch in
its own work directory, and grid-select picks the λ the embedded search (gdmix run) picks."""
import json
import warnings
from pathlib import Path

import pytest
import yaml

from gdmix import config, driver, grid, layout, storage
from gdmix.data import synthetic
from test_pipeline_local import local_pipeline

pytestmark = pytest.mark.slow

GRID = [1.0, 1000.0]  # far apart: cold (branch) and warm (embedded path) starts pick the same


def write_config(root: Path) -> Path:
    synthetic.generate(str(root / "data"), n_rows=1500, n_users=30, n_items=12, seed=5)
    raw = {
        "name": "grid-kfp-local", "workdir": str(root / "unused"),
        "data": {"train": str(root / "data" / "train"), "validation_fraction": 0.3,
                 "feature_bags": {"per_user": {"ntv": "global_features"}, "per_item": {"ntv": "item_features"}}},
        "iterations": 1,
        "coordinates": [
            {"name": "per-user", "type": "random_effect", "entity": "user_id", "feature_bag": "per_user",
             "l2": GRID, "shards": 2},
            {"name": "per-item", "type": "random_effect", "entity": "item_id", "feature_bag": "per_item", "l2": 3.0},
        ],
        "metrics": ["auc", "logloss"],
        "parallelism": 1,
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, spark):
    root = tmp_path_factory.mktemp("grid-kfp-local")
    cfg_path = write_config(root)
    embedded = config.load(str(cfg_path), workdir=str(root / "embedded"))
    driver.run(embedded, spark=spark)
    pipeline = local_pipeline(root, cfg_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipeline(config=str(cfg_path), runs_root=str(root / "runs"), iterations=[0])
    (run,) = (root / "runs").iterdir()
    return embedded, root, run


def test_the_pipeline_picks_the_embedded_lambda(runs):
    embedded, _, run = runs
    ours = storage.read_json(str(run / grid.GRID_JSON))
    theirs = storage.read_json(storage.join(embedded.workdir, grid.GRID_JSON))
    assert ours["metric"] == theirs["metric"] == "auc"
    assert ours["chosen"] == theirs["chosen"]
    assert [(p["coordinate"], p["l2"]) for p in ours["points"]] == [("per-user", 1000.0), ("per-user", 1.0)]
    assert all(p["auc"] is not None for p in ours["points"])


def test_each_branch_worked_in_its_own_directory_and_the_choice_is_copied(runs):
    _, _, run = runs
    for lam in GRID:
        point = grid.point_dir(str(run), "per-user", lam)
        assert storage.exists(layout.metrics(point)), point
        assert config.load_run(point).coordinate("per-user").l2 == lam
    doc = storage.read_json(str(run / grid.GRID_JSON))
    assert storage.read_json(str(run / "metrics.json")) == storage.read_json(layout.metrics(doc["chosen_workdir"]))
    assert "l2 grid search" in (run / "report.html").read_text()


def test_the_path_start_matches_the_embedded_point(runs):
    """The largest λ starts cold in both (the embedded path warm-starts only later points)."""
    embedded, _, run = runs
    ours = storage.read_json(layout.metrics(grid.point_dir(str(run), "per-user", max(GRID))))
    theirs = storage.read_json(layout.metrics(grid.point_dir(embedded.workdir, "per-user", max(GRID))))
    for a, b in zip(ours, theirs, strict=True):
        assert a["auc"] == pytest.approx(b["auc"], rel=1e-8)


def test_grid_select_logged_every_branch_as_kfp_metrics(runs):
    _, root, _ = runs
    outputs = [json.loads(p.read_text()) for p in (root / "kfp-root").rglob("executor_output.json")]
    logged = [a["metadata"] for o in outputs for name, arts in o.get("artifacts", {}).items()
              for a in arts["artifacts"] if name == "grid_metrics"]
    assert len(logged) == 1 and logged[0]["chosen_l2"] in GRID
    assert {k for k in logged[0] if k != "chosen_l2"} == {f"per-user={v:g}: auc" for v in GRID}

"""The compiled pipeline runs end to end under kfp.local (SubprocessRunner, this
interpreter) and trains the same models, with the same metrics, as the embedded driver
(a linear fixed effect, a per-entity and a per-cohort random effect); a step run out of
order fails with a clear error."""
import importlib.util
import json
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml

from gdmix import config, driver, layout, plan, storage

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
ITERATIONS = 2


def load_pipeline_module():
    spec = importlib.util.spec_from_file_location("gdmix_pipeline", ROOT / "pipelines" / "gdmix_pipeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def small_problem(out: Path, rows=1200, users=30, items=12, seed=7):
    """A small GLMix problem: plain numeric features, per-user and per-item effects."""
    rng = np.random.default_rng(seed)
    user = rng.integers(0, users, rows)
    item = rng.integers(0, items, rows)
    x = rng.normal(size=(rows, 3))
    s = 0.3 + x @ [0.8, -0.5, 0.2] + rng.normal(0, 0.7, users)[user] + rng.normal(0, 0.5, items)[item] \
        + rng.normal(0, 0.4, users)[user] * x[:, 0]
    label = (rng.random(rows) < 1 / (1 + np.exp(-s))).astype(np.int64)
    table = pa.table({"uid": np.arange(rows, dtype=np.int64), "label": label, "user_id": user.astype(np.int64),
                      "item_id": item.astype(np.int64), "x0": x[:, 0], "x1": x[:, 1], "x2": x[:, 2]})
    (out / "train").mkdir(parents=True)
    import pyarrow.parquet as pq

    pq.write_table(table, out / "train" / "part-0.parquet")


def write_config(root: Path) -> Path:
    small_problem(root / "data")
    raw = {
        "name": "kfp-local",
        "workdir": str(root / "unused"),
        "data": {"train": str(root / "data" / "train"), "validation_fraction": 0.25,
                 "feature_bags": {"global": {"columns": ["x0", "x1", "x2"]},
                                  "per_user": {"columns": ["x0"]}}},
        "iterations": ITERATIONS,
        "coordinates": [
            {"name": "global", "type": "fixed_effect", "feature_bag": "global", "l2": 1.0, "workers": 1},
            {"name": "per-user", "type": "random_effect", "entity": "user_id", "feature_bag": "per_user",
             "l2": 2.0, "shards": 2},
            # a per-cohort random effect, as examples/movielens-cohort.yaml has: one training
            # task on TF workers (a TFJob on a cluster), not a shard fan-out
            {"name": "per-item", "type": "random_effect", "entity": "item_id", "feature_bag": "per_user",
             "l2": 3.0, "solver": "data_parallel", "shards": 2},
        ],
        "parallelism": 1,
        "publish": {"to": str(root / "published")},
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def local_pipeline(root: Path, cfg_path: Path):
    """The pipeline built for the config at ``cfg_path``, kfp.local's subprocess runner set up
    with its pipeline root under ``root``; call it inside ``warnings.catch_warnings()``."""
    from kfp import local

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root / "kfp-root"),
               raise_on_error=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "non-Python base image" notes from the local runner
        return load_pipeline_module().build(config.load(str(cfg_path)), work_volume=None)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, spark):
    root = tmp_path_factory.mktemp("kfp-local")
    cfg_path = write_config(root)
    embedded = config.load(str(cfg_path), workdir=str(root / "embedded"))
    driver.run(embedded, spark=spark)

    pipeline = local_pipeline(root, cfg_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipeline(config=str(cfg_path), runs_root=str(root / "runs"), iterations=list(range(ITERATIONS)))
        (first,) = (root / "runs").iterdir()  # the run's own work directory, named by its run id
        before = files_of(first)
        # A second run (one pass only) into the same runs root and pipeline root.
        pipeline(config=str(cfg_path), runs_root=str(root / "runs"), iterations=[0])
    (second,) = set((root / "runs").iterdir()) - {first}
    assert files_of(first) == before, "the second run touched the first run's files"
    (root / "kfp").symlink_to(first)
    return embedded, root, second


def files_of(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


def model_values(workdir: str, coordinate: str) -> dict:
    t = storage.read_table(layout.model(workdir, coordinate)).to_pylist()
    return {(str(r["model_id"]), m["name"], m["term"]): m["value"] for r in t for m in r["means"]}


def test_same_models_as_the_embedded_driver(runs):
    cfg, root, _ = runs
    for c in cfg.coordinates:
        ours, theirs = model_values(str(root / "kfp"), c.name), model_values(cfg.workdir, c.name)
        assert ours.keys() == theirs.keys() and len(ours) > 0
        diff = max(abs(ours[k] - theirs[k]) for k in ours)
        assert diff <= 1e-8, f"{c.name}: coefficients differ by {diff}"


def test_same_metrics_as_the_embedded_driver(runs):
    cfg, root, _ = runs
    ours = storage.read_json(layout.metrics(str(root / "kfp")))
    theirs = storage.read_json(layout.metrics(cfg.workdir))
    assert [(r["iteration"], r["coordinate"]) for r in ours] == [(r["iteration"], r["coordinate"]) for r in theirs]
    # every coordinate's step and, the three being convex, each pass's joint step (docs/design.md §2.5)
    assert [(r["iteration"], r["coordinate"]) for r in ours] == [(s.iteration, s.coordinate)
                                                                 for s in plan.sequence(cfg)]
    assert len(ours) == ITERATIONS * (len(cfg.coordinates) + 1)
    for a, b in zip(ours, theirs):
        for key in ("auc", "logloss", "objective"):
            assert a[key] == pytest.approx(b[key], rel=1e-8, abs=1e-10), (a["iteration"], a["coordinate"], key)


def test_kfp_artifacts(runs):
    """The metrics steps published Metrics and a ROC curve; finalize the HTML report."""
    _, root, _ = runs
    outputs = [json.loads(p.read_text()) for p in (root / "kfp-root").rglob("executor_output.json")]
    metrics = [a for o in outputs for name, arts in o.get("artifacts", {}).items() for a in arts["artifacts"]
               if name in ("step_metrics", "final_metrics")]
    assert metrics and all(0.5 < m["metadata"]["auc"] <= 1 and m["metadata"]["objective"] > 0 for m in metrics)
    rocs = [a for o in outputs for name, arts in o.get("artifacts", {}).items() for a in arts["artifacts"]
            if name == "roc"]
    assert rocs and all(len(r["metadata"]["confidenceMetrics"]) > 2 for r in rocs)
    reports = list((root / "kfp-root").rglob("report"))
    assert reports and "<html" in reports[0].read_text().lower()


def test_a_step_out_of_order_fails_clearly(runs, tmp_path, capfd):
    """Iteration 1 before iteration 0 (on a prepared work directory) is refused."""
    cfg, root, _ = runs
    gp = load_pipeline_module()
    workdir = tmp_path / "work"
    run_cfg = config.load(str(root / "config.yaml"), workdir=str(workdir))
    config.snapshot(run_cfg)
    storage.mark_done(layout.prepared_root(str(workdir)), "prepare", {"rows": 0})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        partition = gp.load_components()["partition"]
        with pytest.raises(RuntimeError, match="FAILURE"):
            partition(runs_root=str(tmp_path), run_id="work", iteration=1, coordinate="global")
    captured = capfd.readouterr()
    text = captured.out + captured.err
    assert "gdmix: out of order" in text and "run the iterations in order (iteration 0 first)" in text


def test_two_runs_keep_their_own_work_directories_and_the_last_is_published(runs):
    """The second run (iteration 0 only) exported its own iteration-0 models, not the
    first run's iteration-1 models, and published them as latest."""
    cfg, root, second = runs
    first = (root / "kfp").resolve()
    assert first != second and first.parent == second.parent
    second_metrics = storage.read_json(layout.metrics(str(second)))
    assert {r["iteration"] for r in second_metrics} == {0}
    assert model_values(str(second), "per-user") != model_values(str(first), "per-user")
    latest = json.loads((root / "published" / "latest.json").read_text())
    assert latest["workdir"] == str(second) and latest["auc"] == pytest.approx(second_metrics[-1]["auc"])
    # one version per run: the embedded driver's and the two pipeline runs'
    versions = {v.name.split("-", 1)[1] for v in (root / "published" / "versions").iterdir()}
    assert versions == {"embedded", first.name, second.name}

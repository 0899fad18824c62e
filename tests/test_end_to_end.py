"""The whole embedded run on a small synthetic problem, checked against mathematics:
the coordinate-descent objective against the joint optimum of the same objective."""

import numpy as np
import pytest

from gdmix import config, driver, layout, models, plan, schema, storage
from gdmix.data import synthetic

pytestmark = pytest.mark.slow

ITERATIONS = 8


def synthetic_config(data_dir, workdir, iterations=ITERATIONS, workers=1, acceleration="none"):
    """Plain block descent (with §2.3) unless ``acceleration`` (tests/test_accelerate.py takes the joint step)."""
    return config.parse({
        "acceleration": acceleration,
        "name": "synthetic-e2e",
        "workdir": str(workdir),
        "data": {
            "train": str(data_dir / "train"),
            "validation_fraction": 0.25,
            "feature_bags": {
                "global": {"ntv": "global_features"},
                "per_user": {"ntv": "global_features"},
                "per_item": {"ntv": "item_features"},
            },
        },
        "iterations": iterations,
        "coordinates": [
            {"name": "global", "type": "fixed_effect", "feature_bag": "global", "l2": 1.0, "workers": workers},
            {"name": "per-user", "type": "random_effect", "entity": "user_id", "feature_bag": "per_user",
             "l2": 2.0, "shards": 2},
            {"name": "per-item", "type": "random_effect", "entity": "item_id", "feature_bag": "per_item",
             "l2": 3.0, "min_samples": 3},
        ],
    })


@pytest.fixture(scope="module")
def trained(tmp_path_factory, spark):
    root = tmp_path_factory.mktemp("e2e")
    synthetic.generate(str(root / "data"), n_rows=3000, n_users=80, n_items=30, seed=3)
    cfg = synthetic_config(root / "data", root / "work")
    records = driver.run(cfg, spark=spark)
    return cfg, records


def test_objective_reaches_the_joint_optimum(trained):
    from gdmix import joint

    cfg, _ = trained
    objective = storage.read_json(layout.objective(cfg.workdir))
    assert len(objective) == ITERATIONS * len(cfg.coordinates)
    values = np.array([r["objective"] for r in objective])
    # every block step minimises exactly (to solver tolerance): never an increase
    assert np.all(np.diff(values) <= 1e-9 * np.abs(values[1:])), values
    joint = joint.joint_optimum(cfg, cfg.workdir)
    gap = (values[-1] - joint.objective) / abs(joint.objective)
    print(f"relative objective gap after {ITERATIONS} iterations: {gap:.3e} "
          f"(final {values[-1]:.10f}, joint optimum {joint.objective:.10f})")
    assert -1e-9 <= gap <= 1e-5


def test_metrics_json_and_report(trained):
    cfg, records = trained
    saved = storage.read_json(layout.metrics(cfg.workdir))
    assert [(r["iteration"], r["coordinate"]) for r in saved] == \
        [(s.iteration, s.coordinate) for s in plan.steps(cfg)]
    assert all(0.5 < r["auc"] <= 1.0 for r in saved)
    assert saved[-1]["auc"] > saved[0]["auc"], "random effects must add signal on this data"
    html = open(layout.report(cfg.workdir)).read()
    assert "data:image/png;base64" in html


def test_saved_models_score_like_training(trained, spark, tmp_path):
    cfg, _ = trained
    out = str(tmp_path / "scores")
    models.score(cfg, cfg.workdir, cfg.data.train, out, spark)
    scored = storage.read_table(out)
    got = dict(zip(scored.column("uid").to_numpy(), scored.column("score").to_numpy()))
    state = plan.state(cfg, None)
    n = 0
    for split in layout.SPLITS:
        rows = storage.read_table(layout.prepared(cfg.workdir, split), columns=["uid", "offset"])
        total = dict(zip(rows.column("uid").to_numpy(), rows.column("offset").to_numpy()))
        for coord, s in state.items():
            sc = storage.read_table(layout.scores(cfg.workdir, s.iteration, s.coordinate, coord, split))
            for u, v in zip(sc.column("uid").to_numpy(), sc.column("score").to_numpy()):
                total[u] += v
        for u, v in total.items():
            assert abs(got[u] - v) <= 1e-9 * max(1.0, abs(v)), (split, u, got[u], v)
            n += 1
    assert n == scored.num_rows


def test_models_are_name_term_value(trained):
    cfg, _ = trained
    fe = storage.read_table(layout.model(cfg.workdir, "global"))
    assert fe.schema.equals(schema.MODEL)
    assert fe.column("model_id").to_pylist() == ["global"]
    first = fe.column("means")[0].as_py()[0]
    assert first["name"] == "(INTERCEPT)" and first["term"] == ""
    items = storage.read_table(layout.model(cfg.workdir, "per-item"))
    # passive items (fewer than min_samples rows) have no model
    assert 0 < items.num_rows <= 30


def test_rerun_skips_finished_stages(trained, spark, capsys):
    cfg, records = trained
    again = driver.run(cfg, spark=spark)
    out = capsys.readouterr().out
    assert " partition " not in out and " train " not in out
    assert again == records


def test_rows_grouped_once_train_the_models_of_a_full_partition_every_pass(tmp_path, spark, monkeypatch):
    """Later passes' partitions hold only uid and offsets (fixed scores), and the models
    equal those of a run that re-partitions whole rows every pass (docs/design.md §4.5)."""
    import functools

    from gdmix import partition

    synthetic.generate(str(tmp_path / "data"), n_rows=2000, n_users=60, n_items=25, seed=5)
    once = synthetic_config(tmp_path / "data", tmp_path / "once", iterations=2)
    driver.run(once, spark=spark)
    for c, cols in (("per-user", ["uid", "offset", "fixed_score"]), ("per-item", ["uid", "offset", "fixed_score"])):
        assert storage.done_info(layout.step_dir(once.workdir, 1, c), "partition")["rows_iteration"] == 0
        for split in layout.SPLITS:
            for url in storage.parquet_files(layout.partition(once.workdir, 1, c, split)):
                assert storage.read_table(url).column_names == cols, url
    every = synthetic_config(tmp_path / "data", tmp_path / "every", iterations=2)
    monkeypatch.setattr(partition, "partition", functools.partial(partition.partition, reuse_rows=False))
    driver.run(every, spark=spark)
    assert "rows_iteration" not in storage.done_info(layout.step_dir(every.workdir, 1, "per-user"), "partition")
    for c in ("global", "per-user", "per-item"):
        s = plan.latest(once, c, None)
        a = storage.read_table(layout.coefficients(once.workdir, s.iteration, s.coordinate, c)).sort_by("model_id")
        b = storage.read_table(layout.coefficients(every.workdir, s.iteration, s.coordinate, c)).sort_by("model_id")
        assert a.column("model_id").equals(b.column("model_id")) and a.num_rows > 1 or c == "global"
        np.testing.assert_allclose(a.column("intercept").to_numpy(), b.column("intercept").to_numpy(),
                                   rtol=0, atol=1e-9)
        va = np.concatenate([np.asarray(v, float) for v in a.column("values").to_pylist()] or [[]])
        vb = np.concatenate([np.asarray(v, float) for v in b.column("values").to_pylist()] or [[]])
        np.testing.assert_allclose(va, vb, rtol=0, atol=1e-9)

"""model: external: a fixed effect whose scores come from the user's own model.

Random effects trained on the input's offset (no fixed effect) must equal those trained
with an external fixed effect that supplies the same values as its scores, from a column
or from a Parquet of (uid, score); through the real embedded driver."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gdmix import config, driver, layout, models, plan, schema, stages, storage
from gdmix.data import synthetic

pytestmark = pytest.mark.slow


def _config(data_dir, workdir, fixed=None, offset="offset"):
    coords = [{"name": "per-user", "type": "random_effect", "entity": "user_id",
               "feature_bag": "per_user", "l2": 2.0}]
    if fixed:
        coords.insert(0, {"name": "mine", "type": "fixed_effect", "feature_bag": "per_user",
                          "model": "external", "external_scores": fixed})
    return config.parse({
        "name": "external", "workdir": str(workdir), "iterations": 1,
        "data": {"train": str(data_dir / "train"), "validation_fraction": 0.25,
                 "columns": {"offset": offset},
                 "feature_bags": {"per_user": {"ntv": "user_features"}}},
        "coordinates": coords,
    })


def _models(cfg) -> dict[str, np.ndarray]:
    s = plan.latest(cfg, "per-user", None)
    t = storage.read_table(layout.coefficients(cfg.workdir, s.iteration, s.coordinate, "per-user"))
    return {m: np.r_[b, v] for m, b, v in zip(t.column(schema.MODEL_ID).to_pylist(),
                                                 t.column(schema.INTERCEPT).to_pylist(),
                                                 t.column(schema.VALUES).to_pylist())}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, spark):
    root = tmp_path_factory.mktemp("external")
    synthetic.generate(str(root / "data"), n_rows=1500, n_users=30, n_items=10, seed=5, offset=True)
    raw = pq.read_table(root / "data" / "train")
    scores = str(root / "scores.parquet")
    pq.write_table(pa.table({"uid": raw.column("uid"), "score": raw.column("offset")}), scores)
    cfgs = {
        "offset": _config(root / "data", root / "w-offset"),
        "column": _config(root / "data", root / "w-column", fixed="offset", offset=None),
        "file": _config(root / "data", root / "w-file", fixed=scores, offset=None),
    }
    records = {k: driver.run(c, spark=spark) for k, c in cfgs.items()}
    return root, cfgs, records


def test_external_scores_act_as_the_offset(runs):
    _, cfgs, records = runs
    base = _models(cfgs["offset"])
    assert len(base) == 30
    for kind in ("column", "file"):
        got = _models(cfgs[kind])
        assert got.keys() == base.keys()
        worst = max(np.max(np.abs(got[m] - base[m])) for m in base)
        assert worst < 1e-8, (kind, worst)
        # same validation AUC, and the external coordinate adds no penalty
        assert records[kind][-1]["auc"] == pytest.approx(records["offset"][-1]["auc"], abs=1e-12)
        assert records[kind][-1]["penalties"]["mine"] == 0.0


def test_missing_uid_is_a_clear_error(runs):
    root, cfgs, _ = runs
    bad = str(root / "partial.parquet")
    t = pq.read_table(cfgs["file"].coordinate("mine").external_scores)
    pq.write_table(t.slice(1), bad)
    cfg = _config(root / "data", cfgs["file"].workdir, fixed=bad, offset=None)
    with pytest.raises(ValueError, match="partial.parquet.*no score for 1 input uid"):
        stages.train(cfg, cfg.workdir, plan.Step(0, "mine"))


def test_saved_model_scores_new_data_with_the_column(runs, spark, tmp_path):
    _, cfgs, _ = runs
    cfg = cfgs["column"]
    assert storage.read_table(layout.model(cfg.workdir, "mine")).num_rows == 0  # nothing to export
    out = str(tmp_path / "scored")
    models.score(cfg, cfg.workdir, cfg.data.train, out, spark)
    got = pq.read_table(out).sort_by("uid")
    raw = pq.read_table(cfg.data.train).sort_by("uid")
    np.testing.assert_allclose(got.column("mine_score").to_numpy(), raw.column("offset").to_numpy())
    np.testing.assert_allclose(got.column("score").to_numpy(),
                               got.column("mine_score").to_numpy() + got.column("per_user_score").to_numpy())

"""The Python API (``from gdmix import GLMix``): in-memory scoring equals ``gdmix score``
(Spark) to 1e-9 on hand-made models, each coordinate's term equals a plain-Python
evaluation of the model, and ``fit`` trains through the embedded driver."""
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import gdmix
from gdmix import GLMix, config, kinds, layout, models, ntv, schema, storage

NTV = pa.list_(pa.struct([("name", pa.string()), ("term", pa.string()), ("value", pa.float64())]))


def _model(rows: dict[str, dict[tuple[str, str], float]]) -> pa.Table:
    ids, means = [], []
    for mid, coefs in rows.items():
        ids.append(mid)
        means.append([{"name": n, "term": t, "value": v} for (n, t), v in coefs.items()])
    return pa.table({schema.MODEL_ID: pa.array(ids, pa.string()), "means": pa.array(means, NTV),
                     "variances": pa.nulls(len(ids), NTV)}, schema=schema.MODEL)


B = ("(INTERCEPT)", "")
GLOBAL = {"global": {B: 0.3, ("x0", ""): 0.7, ("x1", ""): -1.2, ("never", ""): 5.0}}
PER_USER = {str(u): {B: 0.1 * u - 0.2, ("genre", "drama"): 0.5 + u, ("genre", "comedy"): -0.25 * u,
                     ("age", ""): 0.01 * u} for u in range(5)}  # user 5: no model (unseen)
PER_ITEM = {"a": {B: -0.4, ("x1", ""): 2.0}, "b": {B: 0.6}}  # item "c": no model


def _rows(n=60, seed=4) -> pa.Table:
    rng = np.random.default_rng(seed)
    x0 = [None if i % 7 == 3 else float(v) for i, v in enumerate(rng.normal(size=n))]
    x1 = [0.1 * (i % 5) for i in range(n)]  # 0.1 is not a float32: scoring rounds like prepare
    lists = []
    for i in range(n):
        if i % 11 == 5:
            lists.append(None)
            continue
        items = [{"name": "genre", "term": "drama", "value": 1.0},
                 {"name": "genre", "term": "comedy", "value": float(rng.normal())},
                 {"name": "genre", "term": "drama", "value": 0.5},  # a repeat: summed
                 {"name": "age", "term": None, "value": float(20 + i)},  # a null term is ""
                 {"name": "unknown", "term": "", "value": 3.0},  # no coefficient: nothing
                 {"name": "genre", "term": "comedy", "value": None}]  # a null value: absent
        lists.append(items[: 1 + i % len(items)])
    return pa.table({
        "uid": pa.array(np.arange(100, 100 + n), pa.int64()),
        "label": pa.array(rng.integers(0, 2, n), pa.int64()),
        "offset": pa.array(rng.normal(0, 0.1, n)),
        "user_id": pa.array(np.arange(n) % 6, pa.int64()),
        "item": pa.array(["abc"[i % 3] for i in range(n)], pa.string()),
        "x0": pa.array(x0, pa.float64()), "x1": pa.array(x1, pa.float64()),
        "feats": pa.array(lists, NTV),
    })


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    cfg = kinds.parse_config({
        "name": "api", "workdir": str(root / "run"),
        "data": {"train": str(root / "data.parquet"),
                 "feature_bags": {"g": {"columns": ["x0", "x1"]}, "u": {"ntv": "feats"}, "i": {"columns": ["x1"]}}},
        "coordinates": [
            {"name": "global", "type": "fixed_effect", "feature_bag": "g"},
            {"name": "per-user", "type": "random_effect", "entity": "user_id", "feature_bag": "u"},
            {"name": "per-item", "type": "random_effect", "entity": "item", "feature_bag": "i"}],
    })
    for name, m in (("global", GLOBAL), ("per-user", PER_USER), ("per-item", PER_ITEM)):
        ntv.write_model(layout.model(cfg.workdir, name), _model(m))
    config.snapshot(cfg)
    rows = _rows()
    pq.write_table(rows, root / "data.parquet")
    return cfg, rows, root


def _f32(v):
    return float(np.float32(v))


def _by_hand(rows: pa.Table) -> dict[str, list[float]]:
    """Each coordinate's term, one row at a time in plain Python (the oracle)."""
    out = {"global": [], "per-user": [], "per-item": []}
    for r in rows.to_pylist():
        g = GLOBAL["global"]
        out["global"].append(g[B] + sum(_f32(r[c]) * g[(c, "")] for c in ("x0", "x1") if r[c] is not None))
        m = PER_USER.get(str(r["user_id"]))
        s = 0.0
        if m:
            s = m[B] + sum(_f32(f["value"]) * m.get((f["name"], f["term"] or ""), 0.0)
                           for f in (r["feats"] or []) if f["value"] is not None)
        out["per-user"].append(s)
        m = PER_ITEM.get(r["item"])
        out["per-item"].append(0.0 if m is None else m[B] + _f32(r["x1"]) * m.get(("x1", ""), 0.0))
    return out


def test_version_and_lazy_import():
    assert gdmix.__version__ and gdmix.__version__[0].isdigit()
    assert GLMix.__module__ == "gdmix.api"


def test_each_coordinate_term_matches_the_model_by_hand(run):
    cfg, rows, _ = run
    model = GLMix.load(layout.model(cfg.workdir, "x").rsplit("/", 1)[0])
    parts = model.decompose(rows, as_arrow=True)
    hand = _by_hand(rows)
    for name, expected in hand.items():
        np.testing.assert_allclose(parts.column(name).to_numpy(), expected, rtol=0, atol=1e-12)
    assert parts.column("per-user").to_numpy()[np.arange(60) % 6 == 5].tolist() == [0.0] * 10  # unseen
    offset = rows.column("offset").to_numpy()
    s = model.decision_function(rows)
    np.testing.assert_allclose(s, offset + sum(np.array(v) for v in hand.values()), rtol=0, atol=1e-12)
    p = model.predict_proba(rows)
    assert p.shape == (60, 2)
    np.testing.assert_allclose(p[:, 1], [1 / (1 + math.exp(-v)) for v in s], rtol=1e-12)
    np.testing.assert_allclose(p.sum(axis=1), 1.0)


def test_in_memory_scores_equal_gdmix_score(run, spark, tmp_path):
    cfg, rows, root = run
    out = str(tmp_path / "scores")
    models.score(cfg, cfg.workdir, str(root / "data.parquet"), out, spark)
    spark_scores = storage.read_table(out).sort_by("uid")
    ours = GLMix.load(f"{cfg.workdir}/models").decompose(str(root / "data.parquet"), as_arrow=True).sort_by("uid")
    assert spark_scores.column("uid").to_pylist() == ours.column("uid").to_pylist()
    diff = np.abs(spark_scores.column("score").to_numpy() - ours.column("score").to_numpy())
    assert diff.max() <= 1e-9


def test_load_needs_the_run_config_or_one_given(run, tmp_path):
    cfg, rows, _ = run
    copied = tmp_path / "published" / "models"
    storage.makedirs(str(copied.parent))
    import shutil

    shutil.copytree(f"{cfg.workdir}/models", copied)
    with pytest.raises(FileNotFoundError, match="config.yaml: no run config beside"):
        GLMix.load(str(copied))
    again = GLMix.load(str(copied), config=config.to_raw(cfg))
    np.testing.assert_array_equal(again.decision_function(rows), GLMix.load(f"{cfg.workdir}/models").decision_function(rows))
    with pytest.raises(KeyError, match="'uid'"):
        again.decision_function(rows.drop_columns(["uid"]))
    with pytest.raises(RuntimeError, match="call fit"):
        GLMix.from_config(config.to_raw(cfg)).decision_function(rows)


def test_a_deep_fixed_effect_without_its_saved_model_is_named(run):
    """A dnn coordinate is scored in memory from its saved Keras model (tests/test_deep.py);
    a models folder without one is an error naming the folder."""
    cfg, rows, _ = run
    raw = config.to_raw(cfg)
    raw["coordinates"][0].update(model="dnn", dnn={"hidden_units": [4]})
    with pytest.raises(FileNotFoundError, match=r"models/global: no saved deep model for coordinate 'global'"):
        GLMix.load(f"{cfg.workdir}/models", config=raw)


def test_fit_trains_scores_and_skips_a_repeat(tmp_path, spark, capsys):
    pd = pytest.importorskip("pandas")
    rng = np.random.default_rng(2)
    n = 300
    user = rng.integers(0, 8, n)
    x = rng.normal(size=n)
    label = (rng.random(n) < 1 / (1 + np.exp(-(2.0 * x + 1.5 * (user % 3 - 1))))).astype(int)
    df = pd.DataFrame({"uid": np.arange(n), "label": label, "user": user, "x": x})
    model = GLMix.from_config({
        "name": "fit", "iterations": 1, "parallelism": 1,
        "data": {"feature_bags": {"u": {"columns": ["x"]}}},
        "coordinates": [{"name": "per-user", "type": "random_effect", "entity": "user", "feature_bag": "u"}],
    }, workdir=str(tmp_path / "run"))
    assert model.fit(df) is model
    assert model.metrics_ and model.metrics_[-1]["auc"] > 0.6
    s = model.decision_function(df)
    assert s.shape == (n,) and np.isfinite(s).all()
    np.testing.assert_array_equal(GLMix.load(str(tmp_path / "run" / "models")).decision_function(df), s)
    capsys.readouterr()
    model.fit(df)  # the same rows: the written input is kept, nothing reruns
    assert "4 steps up to date, skipped" in capsys.readouterr().out
    parts = model.decompose(df)
    assert list(parts.columns) == ["uid", "offset", "per-user", "score", "probability"]
    np.testing.assert_allclose(parts["score"].to_numpy(), s)


def test_an_external_fixed_effect_scores_its_column(run, spark, tmp_path):
    """``model: external`` with a score column: the column is the fixed effect's term."""
    cfg, rows, root = run
    raw = config.to_raw(cfg)
    raw["coordinates"][0].update(model="external", external_scores="mine")
    raw["workdir"] = str(tmp_path / "ext")
    ext = kinds.parse_config(raw)
    ntv.write_model(layout.model(ext.workdir, "global"), schema.MODEL.empty_table())
    for name, m in (("per-user", PER_USER), ("per-item", PER_ITEM)):
        ntv.write_model(layout.model(ext.workdir, name), _model(m))
    config.snapshot(ext)
    mine = np.linspace(-1, 1, rows.num_rows)
    data = str(tmp_path / "with-mine.parquet")
    pq.write_table(rows.append_column("mine", pa.array(mine)), data)
    parts = GLMix.load(f"{ext.workdir}/models").decompose(data, as_arrow=True)
    np.testing.assert_array_equal(parts.column("global").to_numpy(), mine)
    out = str(tmp_path / "scores")
    models.score(ext, ext.workdir, data, out, spark)
    theirs = storage.read_table(out).sort_by("uid").column("score").to_numpy()
    assert np.abs(theirs - parts.sort_by("uid").column("score").to_numpy()).max() <= 1e-9

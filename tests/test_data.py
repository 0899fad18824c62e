"""The demo datasets: the synthetic generator and the MovieLens-100K conversion."""
from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gdmix import schema, storage
from gdmix.data import movielens, synthetic


# --- synthetic ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("syn"))
    info = synthetic.generate(out, n_rows=3000, n_users=60, n_items=25, seed=7,
                              weight=True, offset=True, chunk_rows=1000)
    return out, info, storage.read_table(os.path.join(out, "train")), json.load(open(info["truth"]))


def test_synthetic_shapes(syn):
    out, info, t, truth = syn
    assert info["files"] == 3 and len(os.listdir(os.path.join(out, "train"))) == 3
    assert t.num_rows == 3000 and sorted(t["uid"].to_pylist()) == list(range(3000))
    for c, typ in (("uid", pa.int64()), ("label", pa.float64()), ("weight", pa.float64()),
                   ("offset", pa.float64()), ("user_id", pa.int64()), ("item_id", pa.string()),
                   ("global_features", schema.NTV), ("user_features", schema.NTV),
                   ("item_features", schema.NTV)):
        assert t.schema.field(c).type == typ, c
    assert set(t["label"].to_pylist()) == {0.0, 1.0}
    assert set(t["weight"].to_pylist()) <= {0.5, 1.0, 2.0}
    assert len(truth["per_user"]["ids"]) == 60 and len(truth["per_item"]["intercept"]) == 25
    assert np.shape(truth["per_user"]["coefficients"]) == (60, 4)
    assert np.shape(truth["per_item"]["coefficients"]) == (25, 3)
    assert [(c["name"], c["term"]) for c in truth["global"]["coefficients"]] == (
        [("g", str(j)) for j in range(5)] + [("u", str(j)) for j in range(4)])
    assert info["bags"]["per_user"] == info["bags"]["global"]  # shared source column


def test_synthetic_user_bag_is_a_subset_of_the_global_bag(syn):
    _, _, t, _ = syn
    for g, u in zip(t["global_features"].to_pylist()[:200], t["user_features"].to_pylist()[:200]):
        assert u == [e for e in g if e["name"] == "u"]


def test_synthetic_activity_is_skewed(syn):
    _, _, t, _ = syn
    counts = np.bincount(t["user_id"].to_numpy(), minlength=60)
    assert counts[0] > 5 * np.median(counts)  # entity 0 is the heaviest by design
    assert counts.min() < counts.max() / 10


def _dense(column, feats, n):
    x = np.zeros((n, len(feats)))
    pos = {f: j for j, f in enumerate(feats)}
    for i, row in enumerate(column.to_pylist()):
        for e in row:
            x[i, pos[(e["name"], e["term"])]] = e["value"]
    return x


def test_synthetic_labels_follow_the_true_model(syn):
    _, _, t, truth = syn
    n = t.num_rows
    g = truth["global"]
    feats = [(c["name"], c["term"]) for c in g["coefficients"]]
    xg = _dense(t["global_features"], feats, n)
    xu = _dense(t["user_features"], [tuple(f) for f in truth["per_user"]["features"]], n)
    xi = _dense(t["item_features"], [tuple(f) for f in truth["per_item"]["features"]], n)
    users = t["user_id"].to_numpy()
    items = np.array([int(s[4:]) for s in t["item_id"].to_pylist()])
    pu, pi = truth["per_user"], truth["per_item"]
    logit = (t["offset"].to_numpy() + g["intercept"] + xg @ [c["value"] for c in g["coefficients"]]
             + np.asarray(pu["intercept"])[users] + np.sum(xu * np.asarray(pu["coefficients"])[users], 1)
             + np.asarray(pi["intercept"])[items] + np.sum(xi * np.asarray(pi["coefficients"])[items], 1))
    y = t["label"].to_numpy()
    p = 1 / (1 + np.exp(-logit))
    assert abs(p.mean() - y.mean()) < 0.04
    assert y[logit > 1].mean() > 0.6 > 0.4 > y[logit < -1].mean()
    # Calibrated within bins of the true probability.
    for lo, hi in ((0.0, 0.3), (0.3, 0.7), (0.7, 1.0)):
        m = (p >= lo) & (p < hi)
        assert abs(y[m].mean() - p[m].mean()) < 0.06, (lo, hi)


def test_synthetic_is_deterministic(tmp_path):
    a = synthetic.generate(str(tmp_path / "a"), 500, 10, 5, seed=3, chunk_rows=200)
    b = synthetic.generate(str(tmp_path / "b"), 500, 10, 5, seed=3, chunk_rows=200)
    c = synthetic.generate(str(tmp_path / "c"), 500, 10, 5, seed=4, chunk_rows=200)
    ta, tb, tc = (storage.read_table(x["train"]) for x in (a, b, c))
    assert ta.equals(tb)
    assert not ta.equals(tc)
    assert json.load(open(a["truth"])) == json.load(open(b["truth"]))
    assert "weight" not in ta.column_names and "offset" not in ta.column_names
    # A smaller rerun into the same folder leaves no stale part files.
    synthetic.generate(str(tmp_path / "a"), 100, 10, 5, seed=3, chunk_rows=200)
    assert storage.read_table(a["train"]).num_rows == 100


def test_synthetic_plain_columns(tmp_path):
    info = synthetic.generate(str(tmp_path), 400, 10, 5, ntv=False, presence=0.5)
    t = storage.read_table(info["train"])
    cols = [f"g_{j}" for j in range(5)] + [f"u_{j}" for j in range(4)] + [f"i_{j}" for j in range(3)]
    assert all(c in t.column_names for c in cols)
    assert "global_features" not in t.column_names
    assert 0.3 < t["g_0"].null_count / 400 < 0.7  # absent features are null
    assert info["bags"]["global"]["columns"] == cols[:9]
    assert info["bags"]["per_item"]["columns"] == cols[9:]


# --- MovieLens ---------------------------------------------------------------------------

def _raw(raw_dir):
    os.makedirs(raw_dir, exist_ok=True)
    pq.write_table(pa.table({
        "user_id": [1, 1, 2, 3, 3, 3], "movie_id": [10, 20, 10, 30, 20, 10],
        "rating": [5, 3, 4, 1, 4, 2], "timestamp": [0] * 6}), os.path.join(raw_dir, "ratings.parquet"))
    pq.write_table(pa.table({
        "user_id": [1, 2, 3], "age": [20, 30, 40], "gender": ["M", "F", "M"],
        "occupation": ["writer", "other", "writer"], "zip_code": ["1", "2", "3"]}),
        os.path.join(raw_dir, "users.parquet"))
    items = {"movie_id": [10, 20, 30], "movie_title": ["a", "b", "c"],
             "release_date": ["01-Jan-1990", "01-Jan-2000", None]}
    for g in movielens.GENRES:
        items[g] = [1 if g == "Comedy" else 0, 1 if g in ("Sci-Fi", "Action") else 0, 0]
    pq.write_table(pa.table(items), os.path.join(raw_dir, "items.parquet"))
    return raw_dir


def test_movielens_convert(tmp_path):
    raw = _raw(str(tmp_path / "raw"))
    info = movielens.convert(raw, str(tmp_path / "out"), seed=0, validation_fraction=0.5)
    tr = pq.read_table(tmp_path / "out/train/part-0.parquet")
    va = pq.read_table(tmp_path / "out/validation/part-0.parquet")
    assert tr.num_rows + va.num_rows == 6 and info["rows"] == {"train": tr.num_rows, "validation": va.num_rows}
    rows = {r["uid"]: r for r in pa.concat_tables([tr, va]).to_pylist()}
    assert sorted(rows) == list(range(6))  # uid = the rating's row number
    assert [rows[i]["label"] for i in range(6)] == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]  # rating > 3
    assert [rows[i]["rating"] for i in range(6)] == [5.0, 3.0, 4.0, 1.0, 4.0, 2.0]  # task: linear's label
    assert [(rows[i]["user_id"], rows[i]["movie_id"]) for i in range(6)] == [
        (1, 10), (1, 20), (2, 10), (3, 30), (3, 20), (3, 10)]
    r0, r1, r3 = rows[0], rows[1], rows[3]
    assert (r0["gender_m"], r0["gender_f"], r0["occ_writer"], r0["occ_other"]) == (1.0, 0.0, 1.0, 0.0)
    assert [rows[i]["occupation"] for i in range(4)] == ["writer", "writer", "other", "writer"]
    assert r0["age"] == pytest.approx(-1.224744871)  # (20 - 30) / std(20, 30, 40)
    assert r0["genre_comedy"] == 1.0 and r0["genre_action"] == 0.0
    assert r1["genre_sci_fi"] == 1.0 and r1["genre_action"] == 1.0 and r1["genre_children_s"] == 0.0
    assert (r0["year"], r1["year"]) == (-1.0, 1.0)  # standardised over known years
    assert r3["year"] is None  # unknown release date: absent
    bags = info["bags"]
    assert bags["global"] == bags["per_movie"] + bags["per_user"]
    assert len(bags["per_user"]) == 20 and bags["per_user"][-1] == "year"
    assert set(bags["global"]) <= set(tr.column_names)
    # The same seed gives the same split.
    movielens.convert(raw, str(tmp_path / "again"), seed=0, validation_fraction=0.5)
    assert pq.read_table(tmp_path / "again/train/part-0.parquet").equals(tr)


def test_movielens_daily_slices_are_in_time_order(tmp_path):
    raw = _raw(str(tmp_path / "raw"))
    ratings = pq.read_table(os.path.join(raw, "ratings.parquet"))
    # times out of uid order, one tie: day slices follow time, then uid
    pq.write_table(ratings.set_column(3, "timestamp", pa.array([50, 10, 40, 30, 10, 60])),
                   os.path.join(raw, "ratings.parquet"))
    info = movielens.daily(raw, str(tmp_path / "daily"))
    parts = {k: pq.read_table(tmp_path / "daily" / k / "part-0.parquet") for k in info["rows"]}
    order = [u for k in ("day1/train", "day1/validation", "day2/train", "day2/validation")
             for u in parts[k].column("uid").to_pylist()]
    assert order == [1, 4, 3, 2, 0, 5]  # by (timestamp, uid): every row once, earlier days first
    assert sum(info["rows"].values()) == 6 and all(t.column_names == parts["day1/train"].column_names
                                                  for t in parts.values())
    assert "timestamp" in parts["day1/train"].column_names


def test_movielens_example_config_matches_converted_columns(tmp_path):
    from gdmix import config

    cfg = config.load(os.path.join(os.path.dirname(__file__), "..", "examples", "movielens.yaml"))
    raw = _raw(str(tmp_path / "raw"))
    # The tiny table has 2 occupations; the example lists ML-100K's 21. The non-occupation
    # columns and their order must agree.
    bags = movielens.feature_columns(raw)
    assert [c for c in cfg.bag("per_user").columns] == bags["per_user"]
    no_occ = [c for c in cfg.bag("per_movie").columns if not c.startswith("occ_")]
    assert no_occ == [c for c in bags["per_movie"] if not c.startswith("occ_")]
    assert {c.entity for c in cfg.coordinates if c.entity} == {"user_id", "movie_id"}


@pytest.mark.slow
def test_movielens_real_data(tmp_path):
    raw = movielens.fetch(str(tmp_path / "raw"))
    info = movielens.convert(raw, str(tmp_path / "out"))
    assert sum(info["rows"].values()) == 100_000
    assert (info["users"], info["movies"]) == (943, 1682)
    assert info["positive_rate"] == pytest.approx(0.554, abs=0.0005)
    assert 0.19 < info["rows"]["validation"] / 100_000 < 0.21
    from gdmix import config

    cfg = config.load(os.path.join(os.path.dirname(__file__), "..", "examples", "movielens.yaml"))
    for name in ("global", "per_user", "per_movie"):
        assert list(cfg.bag(name).columns) == info["bags"][name], name


def test_synthetic_example_config_prepares(spark, tmp_path):
    """examples/synthetic.yaml on generated data: the shared bag gets the global index."""
    import dataclasses

    from gdmix import config, layout
    from gdmix.prepare import prepare

    synthetic.generate(str(tmp_path / "data"), 1500, 30, 10, seed=1, offset=True)
    cfg = config.load(os.path.join(os.path.dirname(__file__), "..", "examples", "synthetic.yaml"))
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train=str(tmp_path / "data/train")))
    wd = str(tmp_path / "work")
    info = prepare(cfg, wd, spark)
    assert info["features"] == {"global": 9, "per_user": 9, "per_item": 3}
    assert sum(info["rows"].values()) == 1500
    g = storage.read_table(layout.feature_index(wd, "global"))
    assert g.equals(storage.read_table(layout.feature_index(wd, "per_user")))
    t = storage.read_table(layout.prepared(wd, "train"))
    assert t["global_indices"].equals(t["per_user_indices"])
    assert set(t["offset"].to_pylist()) != {0.0}  # the generated offset column is used

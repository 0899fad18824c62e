"""The deep fixed effect (``model: dnn``): real TF worker processes under
MultiWorkerMirroredStrategy, the saved model, scoring, and a tiny coordinate-descent run."""
import numpy as np
import pyarrow as pa
import pytest

from gdmix import config, kinds, layout, plan, schema, sparse, stages, storage
from gdmix.config import ConfigError
from gdmix.deep import model as dmodel, saved, settings, text
from gdmix.fixed_effect import data

FE = "deep"
N_FEATURES = 6
WORDS = ["red", "blue", "green", "big", "small", "old", "new"]
DNN = {"hidden_units": [8], "text": "title", "text_max_tokens": 4, "text_embedding_dim": 4,
       "batch_size": 64, "epochs": 4, "patience": 2, "learning_rate": 0.02, "seed": 3}


def make_cfg(workdir, workers=1, iterations=1, dnn=DNN):
    return kinds.parse_config({
        "name": "deep-test", "workdir": str(workdir),
        "data": {"train": "unused", "feature_bags": {"g": {"columns": [f"f{j}" for j in range(N_FEATURES)]}}},
        "iterations": iterations,
        "coordinates": [{"name": FE, "type": "fixed_effect", "feature_bag": "g", "model": "dnn",
                         "workers": workers, "dnn": dnn}],
        "timeouts": {"fixed_effect_seconds": 240, "worker_exit_seconds": 10},
    })


def synthetic(n, seed):
    """Rows whose label depends on the bag and on the words of a short title."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, N_FEATURES)).astype(np.float32)
    X[rng.uniform(size=X.shape) < 0.3] = 0.0
    titles = [" ".join(rng.choice(WORDS + ["rare"], size=rng.integers(0, 4))) for _ in range(n)]
    word_effect = np.array([t.count("red") - t.count("blue") for t in titles], dtype=np.float64)
    offset = rng.normal(scale=0.3, size=n)
    logit = offset + X[:, 0] - np.abs(X[:, 1]) + 1.5 * word_effect
    y = (rng.uniform(size=n) < 1 / (1 + np.exp(-logit))).astype(np.float64)
    return X, titles, y, rng.uniform(0.5, 2.0, size=n), offset


def setup_workdir(workdir, workers, iterations=1, dnn=DNN, n_train=1200, n_val=400):
    """A work directory as prepare and partition leave it for step (0, FE): the feature
    index, the vocabulary, prepared rows with tokens, partition shards (one per worker)."""
    cfg = make_cfg(workdir, workers, iterations, dnn)
    config.snapshot(cfg)
    w = str(workdir)
    storage.write_table(layout.feature_index(w, "g"), pa.table(
        {"index": pa.array(range(N_FEATURES), pa.int32()), "name": [f"f{j}" for j in range(N_FEATURES)],
         "term": [""] * N_FEATURES}, schema=schema.FEATURE_INDEX))
    text.save_vocab(text.vocab_url(w, FE), "title", WORDS)
    out = {}
    for split, n, seed in (("train", n_train, 0), ("validation", n_val, 1)):
        X, titles, y, wt, o = synthetic(n, seed)
        uid = np.arange(n, dtype=np.int64) * 7 + (0 if split == "train" else 10 ** 6)
        tokens = [text.tokenise(t, WORDS) for t in titles]
        storage.write_table(storage.join(layout.prepared(w, split), "part-0.parquet"), pa.table(
            {"uid": uid, "title_tokens": pa.array(tokens, pa.list_(pa.int32()))}))
        out[split] = (X, tokens, y, wt, o, uid)
    write_partitions(w, 0, workers, out)
    return cfg, out


def write_partitions(workdir, iteration, workers, rows):
    for split, (X, _, y, wt, o, uid) in rows.items():
        csr = sparse.CSR(*_csr(X))
        for k in range(workers):
            r = np.arange(k, len(uid), workers)
            sub = _csr(X[r])
            idx, val = sparse.to_arrow_lists(sub[0], sub[1], sub[2], value_type=pa.float32())
            storage.write_table(storage.join(data.shard_url(workdir, iteration, FE, split, k), "part-00000.parquet"),
                           pa.Table.from_arrays([pa.array(uid[r]), pa.array(y[r]), pa.array(wt[r]),
                                                 pa.array(o[r]), idx, val], schema=data.PARTITION_SCHEMA))
        del csr


def _csr(X):
    nz = X != 0
    indptr = np.r_[0, np.cumsum(nz.sum(axis=1))].astype(np.int64)
    cols = np.nonzero(nz)[1].astype(np.int32)
    return indptr, cols, X[nz].astype(np.float64)


def read_scores(workdir, iteration, split):
    t = storage.read_table(layout.scores(str(workdir), iteration, FE, FE, split)).sort_by("uid")
    return t.column("uid").to_numpy(), t.column("score").to_numpy()


def status(workdir, iteration, index=0):
    from gdmix.fixed_effect.worker import status_url

    return storage.read_json(status_url(str(workdir), iteration, FE, index))


def test_settings_errors_name_the_key():
    assert settings.parse({}, "x").hidden_units == (32,)
    assert settings.of(make_cfg("/tmp/w"), make_cfg("/tmp/w").coordinates[0]).text == "title"
    # Checked when the config loads, the error naming the key.
    with pytest.raises(ConfigError, match=r"coordinates\[0\]\.dnn\.hidden_units: expected a list"):
        make_cfg("/tmp/w", dnn={"hidden_units": [8, 0]})
    with pytest.raises(ConfigError, match=r"coordinates\[0\]\.dnn\.epoch: unknown key"):
        make_cfg("/tmp/w", dnn={"epoch": 3})
    with pytest.raises(ConfigError, match=r"coordinates\[0\]\.dnn\.learning_rate: must be > 0"):
        make_cfg("/tmp/w", dnn={"learning_rate": 0})


def test_tokenise_and_padding():
    assert text.tokenise("Red, BIG  red!", WORDS) == [2, 5, 2]
    assert text.tokenise("purple", WORDS) == [text.OOV]
    pad = dmodel.padded_tokens([[2, 3, 4], [], [5, 6, 7, 8, 2]], 4)
    assert pad.tolist() == [[2, 3, 4, 0], [text.OOV, 0, 0, 0], [5, 6, 7, 8]]


def test_in_memory_scores_equal_spark_scores_for_a_column_bag(tmp_path, spark):
    """The Python API's scorer of a deep model (pyarrow + TF in this process) against
    ``gdmix score``'s Spark path, on rows with null features, a null title and unknown words."""
    import keras

    from gdmix import GLMix
    from gdmix.deep import scoring

    w = str(tmp_path / "w")
    cfg = make_cfg(w)
    st = settings.of(cfg, cfg.coordinates[0])
    keras.utils.set_random_seed(7)
    net = dmodel.build(N_FEATURES, st, len(WORDS) + 2)
    saved.save(net, layout.model(w, FE), N_FEATURES, st, WORDS)
    rng = np.random.default_rng(2)
    cols = {f"f{j}": pa.array([None if rng.random() < 0.2 else float(v) for v in rng.normal(size=40)], pa.float64())
            for j in range(N_FEATURES)}
    titles = [None, "", "purple haze", "Red, BIG red!"] + [" ".join(rng.choice(WORDS, 3)) for _ in range(36)]
    rows = pa.table({"uid": pa.array(range(40), pa.int64()), **cols, "title": titles})
    mem = scoring.in_memory_scorer(cfg, cfg.coordinates[0], f"{w}/models")(rows)
    frame = scoring.score_frame(spark, cfg, cfg.coordinates[0], w, spark.createDataFrame(rows), "uid").toArrow()
    want = dict(zip(frame.column("uid").to_pylist(), frame.column(f"{FE}_score").to_pylist()))
    np.testing.assert_allclose(mem, [want[u] for u in range(40)], rtol=0, atol=1e-6)
    assert np.std(mem) > 1e-3  # not a constant
    api = GLMix.load(f"{w}/models", config=config.to_raw(cfg)).decision_function(rows)
    np.testing.assert_allclose(api, mem, rtol=0, atol=1e-12)
    with pytest.raises(KeyError, match=r"\['title'\] missing"):
        GLMix.load(f"{w}/models", config=config.to_raw(cfg)).decision_function(rows.drop_columns(["title"]))


@pytest.fixture(scope="module")
def one_and_two(tmp_path_factory):
    """The same step trained by one worker and by two (row-interleaved shards)."""
    out = {}
    for workers in (1, 2):
        w = tmp_path_factory.mktemp(f"deep{workers}")
        cfg, rows = setup_workdir(w, workers, iterations=2)
        info = stages.train(cfg, str(w), plan.Step(0, FE))
        out[workers] = (w, cfg, rows, info)
    return out


def test_two_workers_match_one(one_and_two):
    """Batches are global (seeded by uid), so two workers take one worker's steps; only
    the all-reduce's float32 summation order differs, so scores agree to float32 rounding,
    not bitwise (measured: 9.5e-7 at most on scores up to 5.5; allowed 1e-5)."""
    (w1, *_, info1), (w2, *_, info2) = one_and_two[1], one_and_two[2]
    assert info1["rows"] == info2["rows"] == {"train": 1200, "validation": 400}
    for split in ("train", "validation"):
        u1, s1 = read_scores(w1, 0, split)
        u2, s2 = read_scores(w2, 0, split)
        assert np.array_equal(u1, u2)
        assert np.abs(s1 - s2).max() < 1e-5, np.abs(s1 - s2).max()
        assert np.abs(s1).max() > 0.1  # the model learned something non-trivial
    st1, st2 = status(w1, 0), status(w2, 0)
    assert st1["best_epoch"] == st2["best_epoch"] >= 1
    assert st1["validation_auc"] > 0.7  # the bag and the words both matter in this data
    assert abs(st1["objective"] - st2["objective"]) < 1e-3 * st1["objective"]


def test_saved_model_and_checkpoint_score_like_training(one_and_two):
    import tensorflow as tf

    w, cfg, rows, _ = one_and_two[2]
    X, tokens, *_ , uid = rows["validation"]
    st = settings.of(cfg, cfg.coordinates[0])
    inputs = [X, dmodel.padded_tokens(tokens, st.text_max_tokens)]
    u, trained = read_scores(w, 0, "validation")
    order = np.argsort(uid)
    assert np.array_equal(uid[order], u)
    model, meta = saved.load(saved.step_model_dir(str(w), 0, FE))
    assert meta["n_features"] == N_FEATURES and meta["words"] == WORDS
    np.testing.assert_allclose(saved.predict(model, inputs)[order], trained, rtol=0, atol=1e-6)
    # The best epoch's checkpoint restores the same weights into a fresh model.
    fresh = dmodel.build(N_FEATURES, st, len(WORDS) + 2)
    tf.train.Checkpoint(model=fresh).read(storage.join(saved.checkpoint_dir(str(w), 0, FE), "best")).expect_partial()
    np.testing.assert_allclose(saved.predict(fresh, inputs)[order], trained, rtol=0, atol=1e-6)
    # The empty coefficients table: the metrics stage adds no penalty for the deep model.
    assert storage.read_table(layout.coefficients(str(w), 0, FE, FE)).num_rows == 0


@pytest.mark.slow
def test_warm_start_from_previous_iteration(one_and_two):
    w, cfg, rows, _ = one_and_two[1]
    write_partitions(str(w), 1, 1, rows)  # same rows and offsets in iteration 1
    stages.train(cfg, str(w), plan.Step(1, FE))
    before, after = status(w, 0), status(w, 1)
    # Epoch 0 of iteration 1 evaluates the warm-started model: iteration 0's best.
    assert after["history"][0]["validation_auc"] == pytest.approx(before["validation_auc"], abs=1e-9)
    assert after["validation_auc"] >= before["validation_auc"]


@pytest.mark.slow
def test_driver_run_with_a_dnn_fixed_effect(tmp_path, spark):
    """prepare tokenises a title column, the deep fixed effect trains, the per-user random
    effect takes its scores as offsets, export and ``score`` reproduce the training scores."""
    import pyarrow.parquet as pq

    from gdmix import driver, models
    from gdmix.data import synthetic

    synthetic.generate(str(tmp_path / "data"), n_rows=1500, n_users=30, n_items=20, seed=5)
    for part in (tmp_path / "data" / "train").glob("part-*.parquet"):
        t = pq.read_table(part)
        items = [str(i) for i in t.column("item_id").to_pylist()]
        t = t.append_column("title", pa.array([f"{WORDS[sum(map(ord, i)) % 7]} film {i}" for i in items]))
        pq.write_table(t, part)
    cfg = config.parse({
        "name": "deep-e2e", "workdir": str(tmp_path / "work"),
        "data": {"train": str(tmp_path / "data" / "train"), "validation_fraction": 0.25,
                 "feature_bags": {"global": {"ntv": "global_features"}, "per_user": {"ntv": "item_features"}}},
        "iterations": 1,
        "coordinates": [
            {"name": "global", "type": "fixed_effect", "feature_bag": "global", "model": "dnn", "workers": 2,
             "dnn": {**DNN, "epochs": 2}},
            {"name": "per-user", "type": "random_effect", "entity": "user_id", "feature_bag": "per_user", "l2": 2.0},
        ],
    })
    records = driver.run(cfg, spark=spark)
    w = cfg.workdir
    vocab = text.load_vocab(text.vocab_url(w, "global"))
    assert vocab["column"] == "title" and "film" in vocab["words"] and "red" in vocab["words"]
    prepared = storage.read_table(layout.prepared(w, "train"), columns=["uid", "offset", "title_tokens"])
    assert all(len(t) == 3 for t in prepared.column("title_tokens").to_pylist())
    # The random effect's offsets are the input offset plus the deep model's scores.
    fe = storage.read_table(layout.scores(w, 0, "global", "global", "train"))
    fe_score = dict(zip(fe.column("uid").to_pylist(), fe.column("score").to_pylist()))
    base = dict(zip(prepared.column("uid").to_pylist(), prepared.column("offset").to_pylist()))
    re_rows = storage.read_table(layout.partition(w, 0, "per-user", "train"), columns=["uid", "offset"])
    assert re_rows.num_rows == len(base)
    for u, o in zip(re_rows.column("uid").to_pylist(), re_rows.column("offset").to_pylist()):
        assert o == pytest.approx(base[u] + fe_score[u], abs=1e-12)
    assert len({round(v, 6) for v in fe_score.values()}) > 10  # not a constant
    last = [r for r in records if r["coordinate"] == "per-user"][-1]
    assert last["auc"] > 0.5
    # gdmix score: the exported Keras model and the saved vocabulary score raw rows like training.
    out = str(tmp_path / "scored")
    models.score(cfg, w, cfg.data.train, out, spark)
    scored = storage.read_table(out)
    got = dict(zip(scored.column("uid").to_pylist(), scored.column("global_score").to_pylist()))
    for split in layout.SPLITS:
        sc = storage.read_table(layout.scores(w, 0, "global", "global", split))
        for u, v in zip(sc.column("uid").to_pylist(), sc.column("score").to_pylist()):
            assert abs(got[u] - v) <= 1e-6, (split, u, got[u], v)
    # The Python API scores the same rows in memory (the name-term-value bag indexed with
    # the run's feature index), equal to `gdmix score` to TF's float32 precision.
    from gdmix import GLMix

    parts = GLMix.load(f"{w}/models").decompose(cfg.data.train, as_arrow=True)
    total = dict(zip(scored.column("uid").to_pylist(), scored.column("score").to_pylist()))
    for u, fe_v, s_v in zip(parts.column("uid").to_pylist(), parts.column("global").to_pylist(),
                            parts.column("score").to_pylist()):
        assert abs(fe_v - got[u]) <= 1e-6 and abs(s_v - total[u]) <= 1e-6, (u, fe_v, got[u])


def test_movielens_dnn_example_reads_the_converted_title(tmp_path):
    import os

    import pyarrow.parquet as pq

    from gdmix.data import movielens

    cfg = config.load(os.path.join(os.path.dirname(__file__), "..", "examples", "movielens-dnn.yaml"))
    st = settings.of(cfg, cfg.fixed_effect)
    assert cfg.fixed_effect.model == "dnn" and st.text == "title"
    assert [c.entity for c in cfg.coordinates[1:]] == ["user_id", "movie_id"]
    raw = tmp_path / "raw"
    raw.mkdir()
    pq.write_table(pa.table({"user_id": [1, 2], "movie_id": [10, 20], "rating": [5, 2], "timestamp": [0, 0]}),
                   raw / "ratings.parquet")
    pq.write_table(pa.table({"user_id": [1, 2], "age": [20, 30], "gender": ["M", "F"],
                             "occupation": ["writer", "other"], "zip_code": ["1", "2"]}), raw / "users.parquet")
    items = {"movie_id": [10, 20], "movie_title": ["Toy Story (1995)", "Heat (1995)"],
             "release_date": ["01-Jan-1995", "01-Jan-1995"]}
    items.update({g: [0, 1] for g in movielens.GENRES})
    pq.write_table(pa.table(items), raw / "items.parquet")
    movielens.convert(str(raw), str(tmp_path / "out"), validation_fraction=0.5)
    rows = pa.concat_tables([pq.read_table(tmp_path / "out" / s / "part-0.parquet") for s in ("train", "validation")])
    titles = dict(zip(rows.column("movie_id").to_pylist(), rows.column(st.text).to_pylist()))
    assert titles == {10: "Toy Story (1995)", 20: "Heat (1995)"}
    assert text.tokenise(titles[10], ["toy", "story", "1995"]) == [2, 3, 4]

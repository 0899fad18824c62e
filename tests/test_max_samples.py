"""``max_samples``: an entity with more training rows trains on a hashed sample of that
many (the rows with the smallest ``sampling.sample_key``, ties by uid), all its rows scored.

A hand-built partition of one random-effect step: entity ``big`` has 50 rows, ``mid`` 12,
``one`` 1 (passive: min_samples 2); max_samples 20. Its model is compared with a direct
scipy fit on exactly the 20 rows the hash picks; with a trained fixed effect the shift
must keep the score of every row of an active entity, sampled or not.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from scipy.optimize import minimize

from gdmix import config, layout, schema, storage
from gdmix.plan import Step
from gdmix.random_effect import cohort, cohort_worker, sampling, stage

FE, RE = "global", "per_user"
FEATURES = ["x0", "x1", "x2", "x3"]  # x3: only in rows of `big` that the sample leaves out
MAX, MIN, L2, SEED = 20, 2, 0.5, 7
SIZES = {"big": 50, "mid": 12, "one": 1}


def make_cfg(wd, fixed_effect=False, solver="vectorised", max_samples=MAX):
    coords = [{"name": RE, "type": "random_effect", "feature_bag": "u", "entity": "user", "l2": L2,
               "min_samples": MIN, "max_samples": max_samples, "solver": solver, "tolerance": 1e-13}]
    if fixed_effect:
        coords.insert(0, {"name": FE, "type": "fixed_effect", "feature_bag": "g", "l2": 1.0})
    return config.parse({
        "name": "max-samples", "workdir": str(wd), "iterations": 1,
        "data": {"train": "unused", "split_seed": SEED,
                 "feature_bags": {"g": {"columns": FEATURES}, "u": {"columns": FEATURES}}},
        "coordinates": coords,
    })


def sigmoid(s):
    return 1 / (1 + np.exp(-s))


class Data:
    """Train and validation rows of the three entities (dense features, x3 sparse)."""

    def __init__(self, seed=0):
        rng = np.random.default_rng(seed)
        self.split = {}
        uid0 = 10
        for split in ("train", "validation"):
            user = np.concatenate([[e] * n for e, n in SIZES.items()])
            n = len(user)
            uid = uid0 + rng.permutation(1000)[:n].astype(np.int64) * 7  # not in row order
            uid0 += 100_000
            x = rng.normal(0, 1, (n, 4))
            x[:, 3] = 0.0
            y = (rng.random(n) < sigmoid(x[:, 0] - 0.5 * x[:, 1])).astype(float)
            self.split[split] = dict(uid=uid, user=user, x=x, y=y, w=rng.uniform(0.5, 2.0, n),
                                     o=rng.normal(0, 0.3, n))
        t = self.split["train"]
        big = np.flatnonzero(t["user"] == "big")
        self.picked = big[np.argsort(sampling.sample_key(t["uid"][big], SEED), kind="stable")[:MAX]]
        left_out = np.setdiff1d(big, self.picked)
        t["x"][left_out[:3], 3] = [1.5, -2.0, 0.75]  # a feature the sample never sees


def write(cfg, wd, data, step, fixed=None):
    """Feature indexes and the step's partition (one shard); ``fixed``: (icp, coef) of a
    trained fixed effect, whose scores join the offsets (``fixed_score``)."""
    for bag in ("g", "u"):
        storage.write_table(layout.feature_index(str(wd), bag), pa.table(
            {"index": pa.array(range(4), pa.int32()), "name": FEATURES, "term": [""] * 4},
            schema=schema.FEATURE_INDEX))
    for split, d in data.split.items():
        fs = np.zeros(len(d["uid"])) if fixed is None else fixed[0] + d["x"] @ fixed[1]
        idx = [[j for j in range(4) if row[j] != 0] for row in d["x"]]
        cols = {"uid": d["uid"], "label": d["y"], "weight": d["w"], "offset": d["o"] + fs,
                "entity_id": d["user"], "indices": idx,
                "values": [[np.float32(row[j]) for j in ix] for row, ix in zip(d["x"], idx)]}
        if fixed is not None:
            cols["fixed_score"] = fs
        t = pa.table(cols, schema=schema.partition_schema(True, fixed is not None))
        url = layout.shard(layout.partition(str(wd), step.iteration, step.coordinate, split), 0)
        storage.write_table(storage.join(url, "part-00000.parquet"), t)
    if fixed is not None:
        icp, coef = fixed
        storage.write_table(storage.join(layout.coefficients(str(wd), 0, FE, FE), "part-00000.parquet"), pa.table(
            {"model_id": ["global"], "intercept": [icp], "indices": [list(range(4))], "values": [list(coef)]},
            schema=schema.COEFFICIENTS))


def direct_fit(d, rows):
    """argmin Σ w ℓ(o + b + x·α) + λ/2 (b² + ‖α_used‖²) over ``rows`` (scipy, Newton-CG):
    (intercept, α over FEATURES, 0 where no row has the feature)."""
    x = d["x"][rows].astype(np.float32).astype(np.float64)
    used = np.flatnonzero(np.any(x != 0, axis=0))
    z = np.hstack([np.ones((len(rows), 1)), x[:, used]])
    y, w, o = d["y"][rows], d["w"][rows], d["o"][rows]

    def f(t):
        s = o + z @ t
        return np.sum(w * (np.logaddexp(0, s) - y * s)) + L2 / 2 * t @ t

    def g(t):
        return z.T @ (w * (sigmoid(o + z @ t) - y)) + L2 * t

    def h(t):
        p = sigmoid(o + z @ t)
        return (z.T * (w * p * (1 - p))) @ z + L2 * np.eye(len(t))

    t = minimize(f, np.zeros(z.shape[1]), jac=g, hess=h, method="Newton-CG", options={"xtol": 1e-14}).x
    alpha = np.zeros(4)
    alpha[used] = t[1:]
    return t[0], alpha


def model_of(wd, step, entity):
    t = storage.read_table(layout.coefficients(str(wd), step.iteration, step.coordinate, RE)).to_pylist()
    (r,) = [r for r in t if r["model_id"] == entity]
    return r["intercept"], dict(zip(r["indices"], r["values"]))


def scores_of(wd, step, coordinate, split):
    t = storage.read_table(layout.scores(str(wd), step.iteration, step.coordinate, coordinate, split))
    return dict(zip(t.column("uid").to_pylist(), t.column("score").to_pylist()))


def test_sample_key_is_sparks_xxhash64(spark):
    from pyspark.sql import functions as F

    uid = np.array([0, 1, -1, 42, 2**62 + 12345, -(2**63), 2**63 - 1, 987654321], np.int64)
    df = spark.createDataFrame([(int(u),) for u in uid], "uid long")
    for seed in (0, SEED, -3):
        got = [r[0] for r in df.select(F.xxhash64(F.lit(seed).cast("long"), F.lit(sampling.SAMPLE_SALT).cast("long"),
                                                  F.col("uid"))).collect()]
        assert list(sampling.sample_key(uid, seed)) == got


def test_sampled_takes_the_smallest_keys_per_entity():
    rng = np.random.default_rng(1)
    counts = np.array([3, 25, 20, 21, 1])
    row_ptr = np.concatenate([[0], np.cumsum(counts)])
    uid = rng.permutation(10_000)[:counts.sum()].astype(np.int64)
    keep = sampling.sampled(uid, row_ptr, 20, SEED)
    key = sampling.sample_key(uid, SEED)
    for e, (a, b) in enumerate(zip(row_ptr[:-1], row_ptr[1:])):
        want = np.zeros(b - a, bool)
        want[np.argsort(key[a:b])[:20]] = True
        assert np.array_equal(keep[a:b], want), e
    assert keep.sum() == 3 + 20 + 20 + 20 + 1
    assert not np.array_equal(keep, sampling.sampled(uid, row_ptr, 20, SEED + 1))  # the seed matters
    # Ties in key (not seen with a 64-bit hash, but defined): the smaller uid first.
    same = np.array([5, 3, 9], np.int64)
    orig = sampling.sample_key
    try:
        sampling.sample_key = lambda u, s: np.zeros(len(u), np.int64)
        assert list(sampling.sampled(same, np.array([0, 3]), 2, SEED)) == [True, True, False]
    finally:
        sampling.sample_key = orig


@pytest.mark.parametrize("solver", ["vectorised", "scipy"])
def test_big_entity_trains_on_the_hashed_sample_and_scores_all_rows(tmp_path, solver):
    data = Data()
    cfg = make_cfg(tmp_path, solver=solver)
    step = Step(0, RE)
    write(cfg, tmp_path, data, step)
    info = stage.train(cfg, str(tmp_path), step)
    t = data.split["train"]
    shard = storage.done_info(layout.shard_dir(str(tmp_path), 0, RE, 0), "train")
    assert (shard["rows"], shard["trained_rows"], shard["sampled_entities"]) == (63, 20 + 12, 1)
    assert (info["active_entities"], info["passive_entities"]) == (2, 1)

    for entity, rows in (("big", data.picked), ("mid", np.flatnonzero(t["user"] == "mid"))):
        icp, alpha = direct_fit(t, rows)
        got_icp, got = model_of(tmp_path, step, entity)
        assert got_icp == pytest.approx(icp, abs=1e-6)
        assert [got.get(j, 0.0) for j in range(4)] == pytest.approx(list(alpha), abs=1e-6)
    # The model of `big` lists x3 (only in its unsampled rows) with 0; a fit on all 50 rows differs.
    assert model_of(tmp_path, step, "big")[1][3] == 0.0
    all_icp, _ = direct_fit(t, np.flatnonzero(t["user"] == "big"))
    assert abs(all_icp - model_of(tmp_path, step, "big")[0]) > 1e-3

    # Every row is scored, the unsampled rows of `big` with its model; `one` (passive) scores 0.
    for split, d in data.split.items():
        sc = scores_of(tmp_path, step, RE, split)
        assert len(sc) == len(d["uid"]) == 63
        for e in SIZES:
            rows = np.flatnonzero(d["user"] == e)
            icp, m = model_of(tmp_path, step, e) if e != "one" else (0.0, {})
            x = d["x"][rows].astype(np.float32).astype(np.float64)
            want = icp + x @ np.array([m.get(j, 0.0) for j in range(4)])
            assert [sc[u] for u in d["uid"][rows]] == pytest.approx(list(want), abs=1e-12)


def test_reruns_agree(tmp_path):
    data = Data()
    models = []
    for run in ("a", "b"):
        wd = tmp_path / run
        cfg = make_cfg(wd)
        write(cfg, wd, data, Step(0, RE))
        stage.train(cfg, str(wd), Step(0, RE))
        models.append(storage.read_table(layout.coefficients(str(wd), 0, RE, RE)).to_pylist())
    assert models[0] == models[1]


@pytest.mark.parametrize("augment", [True, False])
def test_the_shift_keeps_every_score_of_an_active_entity(tmp_path, monkeypatch, augment):
    """After a fixed effect (x3 shared, β3 ≠ 0) the step shifts mass into it. The total score
    of every train row of `big` and `mid`, sampled or not, is the one their fitted models give
    before the shift. Without the zero x3 coefficient in `big`'s model (``augment=False``,
    the mistake this guards against) the unsampled rows with x3 would move by t3·x3."""
    if not augment:
        monkeypatch.setattr(sampling, "with_features_of", lambda models, row_ptr, csr: models)
    data = Data()
    cfg = make_cfg(tmp_path, fixed_effect=True)
    step = Step(0, RE)
    fixed = (0.3, np.array([0.8, -0.4, 0.2, 0.6]))
    write(cfg, tmp_path, data, step, fixed)
    info = stage.train(cfg, str(tmp_path), step)
    assert info["shifted"] and info["shift"]["decrease"] >= 0 and info["shift"]["passive_rows"] == 1

    t = data.split["train"]
    re_sc, fe_sc = scores_of(tmp_path, step, RE, "train"), scores_of(tmp_path, step, FE, "train")
    moved = []
    for e, rows in (("big", np.flatnonzero(t["user"] == "big")), ("mid", np.flatnonzero(t["user"] == "mid"))):
        fixed_score = fixed[0] + t["x"] @ fixed[1]  # as the partition carries it
        icp, alpha = direct_fit(dict(t, o=t["o"] + fixed_score), data.picked if e == "big" else rows)
        x = t["x"][rows].astype(np.float32).astype(np.float64)  # the stored feature values
        before = fixed_score[rows] + icp + x @ alpha  # fixed + random score, before the shift
        after = np.array([fe_sc[u] + re_sc[u] for u in t["uid"][rows]])
        moved.append(np.abs(after - before).max())
    shift_x3 = storage.read_table(layout.coefficients(str(tmp_path), 0, RE, FE)).column("values")[0][3].as_py()
    assert abs(shift_x3 - fixed[1][3]) > 1e-3  # the shift moved mass along x3
    if augment:
        assert max(moved) < 1e-6
    else:
        assert moved[0] > 1e-3 and moved[1] < 1e-6


def test_cohort_workers_keep_the_same_rows(tmp_path):
    """The per-cohort path: the launcher's cuts and a worker's filter keep exactly the rows
    ``sampling.sampled`` picks, and the block columns of all rows (x3 of `big` included)."""
    data = Data()
    cfg = make_cfg(tmp_path, solver="data_parallel")
    step = Step(0, RE)
    write(cfg, tmp_path, data, step)
    active, _, n_passive = cohort._active_entities(cfg, str(tmp_path), step, False)
    active = cohort._sample_cuts(cfg, str(tmp_path), step, False, active)
    assert n_passive == 1 and active.column(schema.ENTITY_ID).to_pylist() == ["big", "mid"]
    assert active.column(cohort.CUT_KEY).null_count == 1  # `mid` keeps all its rows
    ids = active.column(schema.ENTITY_ID).combine_chunks()
    shard, all_cols = cohort_worker._rows(str(tmp_path), step, 0, False, ids, 4, active, SEED)
    t = data.split["train"]
    want = np.concatenate([data.picked, np.flatnonzero(t["user"] == "mid")])
    assert sorted(shard.uid) == sorted(t["uid"][want])
    assert 0 * 5 + 1 + 3 in all_cols and 0 * 5 + 1 + 3 not in shard.x.indices  # big's x3: column 4
    assert shard.x.indptr[-1] == len(shard.x.indices)


@pytest.mark.slow
def test_cohort_solver_trains_on_the_same_sample(tmp_path):
    """A whole per-cohort step (one TF worker process) gives the per-entity models: the
    same hashed sample of `big`, the same stored features (x3 with 0)."""
    data = Data()
    step = Step(0, RE)
    models = {}
    for solver in ("vectorised", "data_parallel"):
        wd = tmp_path / solver
        cfg = make_cfg(wd, solver=solver)
        write(cfg, wd, data, step)
        if solver == "data_parallel":
            cohort.solve(cfg, str(wd), step)
            stage.finish(cfg, str(wd), step)
        else:
            stage.train(cfg, str(wd), step)
        models[solver] = {e: model_of(wd, step, e) for e in ("big", "mid")}
    for e in ("big", "mid"):
        (a_icp, a), (b_icp, b) = models["vectorised"][e], models["data_parallel"][e]
        assert a.keys() == b.keys() and (e != "big" or 3 in a)
        assert b_icp == pytest.approx(a_icp, abs=1e-6)
        assert [b[j] for j in sorted(b)] == pytest.approx([a[j] for j in sorted(a)], abs=1e-6)

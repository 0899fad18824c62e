"""Priors (``prior: {models, weight}``) and entities carried over: reading published
models back, the exact shift under per-coefficient penalties, and the whole run against
the joint optimum of the prior-penalised objective."""
from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pytest
import scipy.optimize as so

from gdmix import config, driver, layout, ntv, plan, priors, schema, shift, sparse, storage
from gdmix.data import synthetic


def _ntv(items):
    return [{"name": n, "term": t, "value": v} for n, t, v in items]


def test_read_matches_names_terms_and_ids(tmp_path):
    """Published models → this run's feature indexes: by (name, term), unknown features
    dropped, the intercept apart, variances matched to means, NaN where missing."""
    url = str(tmp_path / "models")
    table = pa.table({
        "model_id": ["a", "b", "c"],
        "means": [_ntv([("(INTERCEPT)", "", 0.5), ("x", "1", 2.0), ("gone", "", 9.0), ("y", "", -1.0)]),
                  _ntv([("y", "", 3.0)]),
                  _ntv([("(INTERCEPT)", "", -2.0)])],
        "variances": [_ntv([("(INTERCEPT)", "", 0.25), ("y", "", 4.0), ("x", "1", 0.5), ("gone", "", 1.0)]),
                      None,
                      _ntv([("(INTERCEPT)", "", 0.0)])],
    }, schema=schema.MODEL)
    ntv.write_model(storage.join(url, "per-user"), table)
    fidx = pa.table({"index": pa.array([0, 1, 2], pa.int32()), "name": ["y", "z", "x"], "term": ["", "", "1"]},
                    schema=schema.FEATURE_INDEX)
    m = priors.read(url, "per-user", fidx)
    assert priors.read(url, "per-item", fidx) is None
    assert m.ids.to_pylist() == ["a", "b", "c"]
    np.testing.assert_array_equal(m.intercept, [0.5, 0.0, -2.0])
    np.testing.assert_array_equal(m.intercept_var[:1], [0.25])
    assert np.isnan(m.intercept_var[1]) and m.intercept_var[2] == 0.0
    assert m.ptr.tolist() == [0, 2, 3, 3]
    assert m.indices.tolist() == [0, 2, 0] and m.mean.tolist() == [-1.0, 2.0, 3.0]
    assert m.var[:2].tolist() == [4.0, 0.5] and np.isnan(m.var[2])
    mean, var = m.lookup(["c", "a", "a", "zz", "b"], np.array([-1, 2, 1, -1, 0]))
    assert mean.tolist()[:3] == [-2.0, 2.0, 0.0] and var[1] == 0.5 and np.isnan(var[2]) and np.isnan(var[3])
    w = priors.weights(np.array([0.5, 0.0, np.nan, np.inf]), 2.0)
    assert w[0] == 4.0 and np.isnan(w[1]) and np.isnan(w[2]) and w[3] == 0.0
    al = m.aligned(pa.array(["c", "x", "a"]))
    assert al.ptr.tolist() == [0, 0, 0, 2] and al.mean.tolist() == [-1.0, 2.0] and np.isnan(al.intercept_var[1])
    coord = config.Coordinate(name="per-user", type="random_effect", feature_bag="u", l2=3.0,
                              regularize_intercept=False, entity="user_id")
    coef = pa.table({"model_id": ["a", "b"], "intercept": [1.0, 2.0],
                     "indices": pa.array([[0, 1], [0]], pa.list_(pa.int32())),
                     "values": pa.array([[1.0, 5.0], [0.0]], pa.list_(pa.float64()))}, schema=schema.COEFFICIENTS)
    # a: intercept (prior w 1/0.25 = 4 at 0.5), y (1/4 at -1), z (no prior: λ=3 at 0); b: y λ (no variance)
    want = 0.5 * (4 * 0.5 ** 2 + 0.25 * 2.0 ** 2 + 3 * 25.0 + 0.0 + 3 * 0.0)
    assert priors.penalty(coord, m, 1.0, coef) == pytest.approx(want)


def test_shift_with_prior_is_the_exact_minimiser():
    """The closed form and the Newton solve of the weighted shift minimise the penalised
    objective along the shared directions, checked against a generic minimiser."""
    rng = np.random.default_rng(4)
    n_ent, n_random = 7, 5
    direction = shift.directions(n_random, np.array([1, 3]))
    ptr = np.arange(0, 3 * n_ent + 1, 3)
    indices = np.concatenate([np.sort(rng.choice(n_random, 3, replace=False)) for _ in range(n_ent)])
    values = rng.normal(size=len(indices))
    icp = rng.normal(size=n_ent)
    beta = rng.normal(size=3)
    pen_f = np.array([0.0, 1.5, 0.7])
    icp_w, icp_c = rng.uniform(0.2, 3, n_ent), rng.normal(size=n_ent)
    val_w, val_c = rng.uniform(0.2, 3, len(values)), rng.normal(size=len(values))
    fixed_c = rng.normal(size=3)
    m = direction[indices]

    def full(t, passive=None):
        f = 0.5 * np.sum(pen_f * (beta + t - fixed_c) ** 2)
        f += 0.5 * np.sum(icp_w * (icp - t[0] - icp_c) ** 2)
        moved = values - np.where(m >= 0, t[np.maximum(m, 0)], 0.0)
        f += 0.5 * np.sum(val_w * (moved - val_c) ** 2)
        if passive is not None:
            csr, s, y, w = passive
            xt = t[0] + csr.dot(np.where(direction >= 0, t[np.maximum(direction, 0)], 0.0))
            z = s + xt
            f += np.sum(w * (np.logaddexp(0, z) - y * z))
        return f

    weighted = (fixed_c, icp_w, icp_c, val_w, val_c)
    rows = (sparse.CSR(np.array([0, 2, 3, 3]), np.array([1, 3, 0], np.int32), np.array([1.0, -2.0, 0.5])),
            np.array([0.3, -1.0, 2.0]), np.array([1.0, 0.0, 1.0]), np.array([1.0, 2.0, 0.5]))
    for passive in (None, rows):
        p = shift.build_problem(icp, indices, values, direction, beta, pen_f, np.ones(3), passive, weighted)
        t = shift.solve(p)
        ref = so.minimize(lambda t: full(t, passive), np.zeros(3), method="BFGS", options={"gtol": 1e-12}).x
        np.testing.assert_allclose(t, ref, atol=1e-6)
        assert full(t, passive) <= full(np.zeros(3), passive)
        # Problem.value differs from the full objective by a constant only
        assert p.value(t) - p.value(np.zeros(3)) == pytest.approx(full(t, passive) - full(np.zeros(3), passive),
                                                                  rel=1e-9, abs=1e-12)


# --- the whole run: day 1, then day 2 with day 1 as the prior -------------------------------

ITERATIONS = 8


def day_config(data_dir, workdir, iterations=ITERATIONS, **top):
    from test_end_to_end import synthetic_config

    cfg = synthetic_config(data_dir, workdir, iterations=iterations)
    coords = tuple(dataclasses.replace(c, variance="simple") for c in cfg.coordinates)
    return dataclasses.replace(cfg, coordinates=coords, **top)


@pytest.fixture(scope="module")
def days(tmp_path_factory, spark):
    root = tmp_path_factory.mktemp("priors")
    synthetic.generate(str(root / "d1"), n_rows=3000, n_users=80, n_items=30, seed=3)
    synthetic.generate(str(root / "d2"), n_rows=2000, n_users=60, n_items=30, seed=4)
    day1 = day_config(root / "d1", root / "w1")
    driver.run(day1, spark=spark)
    models = layout.model(day1.workdir, "").rstrip("/")
    day2 = day_config(root / "d2", root / "w2", prior=config.Prior(models=models, weight=0.5))
    driver.run(day2, spark=spark)
    return day1, day2


def penalties_of(cfg):
    cache = {c.name: priors.prior_models(cfg, cfg.workdir, c) for c in cfg.coordinates}
    return lambda c, ids, feats: priors.penalty_terms(c, cache[c.name], cfg.prior.weight, ids, feats)


@pytest.mark.slow
def test_prior_run_reaches_the_joint_optimum_of_the_penalised_objective(days):
    from gdmix import joint

    day1, day2 = days
    assert config.parse(config.to_raw(day2)).prior == day2.prior
    pens = penalties_of(day2)
    recorded = np.array([r["objective"] for r in storage.read_json(layout.objective(day2.workdir))])
    assert np.all(np.diff(recorded) <= 1e-9 * np.abs(recorded[1:])), recorded
    sol = joint.joint_optimum(day2, day2.workdir, penalties=pens)
    gap = (recorded[-1] - sol.objective) / abs(sol.objective)
    # the recorded objective is the penalised one at the trained coefficients
    state = plan.state(day2, None)
    tables = {d: storage.read_table(layout.coefficients(day2.workdir, s.iteration, s.coordinate, d),
                                    schema=schema.COEFFICIENTS) for d, s in state.items()}
    at_trained = joint.objective(day2, day2.workdir, joint.coefficients_from_tables(day2, day2.workdir, tables),
                                 penalties=pens)
    plain = joint.joint_optimum(day2, day2.workdir)
    print(f"prior run: relative gap to the penalised joint optimum {gap:.3e} (final {recorded[-1]:.10f}, "
          f"optimum {sol.objective:.10f}; without the prior {plain.objective:.10f})")
    assert at_trained == pytest.approx(recorded[-1], rel=1e-9)
    assert -1e-9 <= gap <= 1e-6
    # the prior moves the optimum: its models differ from the plain objective's
    fe, fe_plain = sol.coefficients["global"], plain.coefficients["global"]
    assert np.max(np.abs(fe.coefficients - fe_plain.coefficients)) > 1e-3
    trained = joint.coefficients_from_tables(day2, day2.workdir, tables)
    np.testing.assert_allclose(trained["global"].coefficients, fe.coefficients, atol=1e-4)


@pytest.mark.slow
def test_entities_absent_tonight_are_carried_over(days):
    day1, day2 = days
    old = storage.read_table(layout.model(day1.workdir, "per-user"))
    new = storage.read_table(layout.model(day2.workdir, "per-user"))
    assert new.schema.equals(schema.MODEL_WITH_CARRIED)
    carried = new.filter(pa.compute.equal(new.column("carried_over"), True))
    tonight = new.filter(pa.compute.equal(new.column("carried_over"), False))
    last = plan.latest(day2, "per-user", None)
    trained = storage.read_table(layout.coefficients(day2.workdir, last.iteration, last.coordinate, "per-user"))
    assert sorted(tonight.column("model_id").to_pylist()) == sorted(trained.column("model_id").to_pylist())
    day2_users = set(storage.read_table(layout.prepared(day2.workdir, "train"), columns=["user_id"])
                     .column("user_id").cast(pa.string()).to_pylist())
    ids = carried.column("model_id").to_pylist()
    # users 60..79 exist only on day 1: each keeps day 1's model, means and variances as published
    assert {str(u) for u in range(60, 80)} <= set(ids)
    assert not set(ids) & set(tonight.column("model_id").to_pylist())
    before = {m: (a, v) for m, a, v in zip(*(old.column(c).to_pylist() for c in ("model_id", "means", "variances")))}
    for m, a, v in zip(*(carried.column(c).to_pylist() for c in ("model_id", "means", "variances"))):
        assert (a, v) == before[m] and v is not None
        assert m not in day2_users or m not in tonight.column("model_id").to_pylist()
    fe = storage.read_table(layout.model(day2.workdir, "global"))
    assert fe.column("carried_over").to_pylist() == [False]


@pytest.mark.slow
def test_prior_with_the_cohort_solver(days, tmp_path, spark):
    """The per-cohort solver (TF workers, block-diagonal) minimises the prior penalty too:
    day 2 again with per-item solved as one data-parallel problem, against the joint
    optimum of the same prior-penalised objective."""
    from gdmix import joint

    _, day2 = days
    coords = tuple(dataclasses.replace(c, solver="data_parallel", shards=1) if c.name == "per-item" else c
                   for c in day2.coordinates)
    cfg = dataclasses.replace(day2, coordinates=coords, workdir=str(tmp_path / "w"), iterations=4)
    driver.run(cfg, spark=spark)
    assert storage.done_info(layout.step_dir(cfg.workdir, 0, "per-item"), "train")["solver"] == "data_parallel"
    recorded = [r["objective"] for r in storage.read_json(layout.objective(cfg.workdir))]
    sol = joint.joint_optimum(cfg, cfg.workdir, penalties=penalties_of(cfg))
    gap = (recorded[-1] - sol.objective) / abs(sol.objective)
    print(f"cohort prior run: relative gap {gap:.3e}")
    assert -1e-9 <= gap <= 1e-6
    items = storage.read_table(layout.model(cfg.workdir, "per-item"))
    assert items.column("variances").null_count == 0  # variance: simple through the cohort workers


def test_config_keys_are_checked_and_round_trip(tmp_path):
    from helpers import raw_config

    raw = raw_config(tmp_path, warm_start="gs://b/models", prior={"models": "gs://b/models"})
    raw["coordinates"][1]["variance"] = "full"
    cfg = config.parse(raw)
    assert cfg.prior == config.Prior(models="gs://b/models", weight=1.0) and cfg.warm_start == "gs://b/models"
    assert cfg.coordinate("per-user").variance == "full" and cfg.coordinate("global").variance == "none"
    assert config.parse(config.to_raw(cfg)) == dataclasses.replace(cfg, source=None)
    for bad, msg in (({"prior": {"models": "x", "weight": -1}}, "prior.weight"),
                     ({"prior": {"weight": 1.0}}, "prior.models"),
                     ({"prior": {"models": "x", "centre": 1}}, "prior.centre")):
        with pytest.raises(config.ConfigError, match=msg):
            config.parse(raw_config(tmp_path, **bad))
    raw = raw_config(tmp_path)
    raw["coordinates"][0]["variance"] = "diag"
    with pytest.raises(config.ConfigError, match=r"coordinates\[0\].variance"):
        config.parse(raw)

"""``l2: auto`` (docs/design.md §7): λ of a random effect estimated by the Laplace
marginal likelihood, checked against known variances, and a whole run with it checked
against the joint optimum at the λ it ended with."""
import numpy as np
import pytest

from gdmix import config, driver, joint, l2, layout, plan, storage
from gdmix.config import Coordinate
from gdmix.data import synthetic
from gdmix.l2 import L2
from gdmix.random_effect import l2_auto, vectorised
from gdmix.random_effect.scipy_solver import Entities, Settings
from gdmix.sparse import CSR


def _entities(sd_intercept: float, sd_slopes: np.ndarray, n_entities=2000, rows=50, seed=0) -> Entities:
    """Binary rows of ``n_entities`` entities with coefficients drawn from N(0, sd²):
    intercept sd_intercept, slope j sd_slopes[j]; features N(0, 1), every row has all."""
    rng = np.random.default_rng(seed)
    d = len(sd_slopes)
    a = rng.normal(0, sd_intercept, n_entities)
    b = rng.normal(0, 1, (n_entities, d)) * sd_slopes
    x = rng.normal(0, 1, (n_entities * rows, d))
    owner = np.repeat(np.arange(n_entities), rows)
    logit = a[owner] + np.einsum("ij,ij->i", x, b[owner])
    y = (rng.random(len(x)) < 1 / (1 + np.exp(-logit))).astype(float)
    csr = CSR(np.arange(0, x.size + 1, d).astype(np.int64), np.tile(np.arange(d, dtype=np.int32), len(x)),
              x.reshape(-1))
    return Entities(np.arange(0, len(x) + 1, rows).astype(np.int64), csr, y, np.ones(len(x)), np.zeros(len(x)))


def _settle(ent, mode, d):
    coord = Coordinate(name="u", type="random_effect", feature_bag="b", entity="u", l2_auto=mode,
                       regularize_intercept=True)
    settings = Settings(1.0)
    est = l2_auto.settle(ent, coord, L2(1.0, 1.0), None,
                         lambda e, w, p, k: vectorised.solve(e, settings, w, workers=k, prior=p), d, workers=2)
    assert len(est.rounds) < l2_auto.ROUNDS, "λ did not settle"
    assert l2_auto.settled(est.used, est.rounds[-1])
    return est.used


def test_per_feature_recovers_known_variances():
    """2,000 entities × 50 binary rows: intercept sd 1, slopes sd 0.5 and 0.8 → λ = 1, 4, 1.5625."""
    sd = np.array([0.5, 0.8])
    lam = _settle(_entities(1.0, sd), "per_feature", len(sd))
    truth = np.concatenate([[1.0], 1 / sd ** 2])
    got = np.concatenate([[lam.intercept], lam.per_feature])
    print("per-feature λ", got, "truth", truth)
    np.testing.assert_allclose(got, truth, rtol=0.10)


def test_per_coordinate_recovers_a_known_variance():
    """One sd (0.7) for the intercept and both slopes → one λ = 1/0.49."""
    lam = _settle(_entities(0.7, np.array([0.7, 0.7]), seed=1), "coordinate", 2)
    print("per-coordinate λ", lam.features, "truth", 1 / 0.49)
    assert lam.per_feature is None and lam.intercept == lam.features
    assert lam.features == pytest.approx(1 / 0.49, rel=0.10)


def test_without_the_mode_term_lambda_is_biased():
    """The part of d(log det H)/dλ through the mode (gdmix.random_effect.laplace) is what
    removes the bias: dropping it (the EM / PQL update) overestimates the slopes' λ by over 15 %."""
    ent = _entities(1.0, np.array([0.5, 0.8]))
    coord = Coordinate(name="u", type="random_effect", feature_bag="b", entity="u", l2_auto="per_feature",
                       regularize_intercept=True)
    settings = Settings(1.0)
    lam = L2(1.0, 1.0)
    for _ in range(200):
        prior = l2_auto.prior_of(lam, coord, ent.row_ptr, ent.features.row_ids(), ent.features.indices, 2)
        models = vectorised.solve(ent, settings, None, workers=2, prior=prior).models
        m = l2_auto.moments(models, *vectorised.variances(ent, settings, models, prior, full=True, workers=2), 2)
        new = l2_auto.update(lam, m, coord)
        if l2_auto.settled(lam, new):
            break
        lam = new
    print("EM/PQL λ", lam)
    assert np.all(lam.per_feature > 1.15 / np.array([0.25, 0.64]))  # λ of the slopes: over 15 % too large


def test_a_feature_no_entity_holds_keeps_its_lambda():
    coord = Coordinate(name="u", type="random_effect", feature_bag="b", entity="u", l2_auto="per_feature",
                       regularize_intercept=True)
    m = l2_auto.Moments(np.array([10.0, 5.0, 0.0]), np.array([2.0, 1.0, 0.0]), np.array([1.0, 0.5, 0.0]))
    new = l2_auto.update(L2(3.0, 3.0, np.array([3.0, 7.0])), m, coord)
    assert new.per_feature[1] == 7.0
    assert new.intercept == pytest.approx((10 - 3 * 1.0) / 2.0)  # MacKay: γ / Σθ²


@pytest.mark.slow
def test_a_run_with_auto_ends_at_the_joint_optimum_of_its_lambda(tmp_path, spark):
    """Both random effects estimated (one per feature, one per coordinate, two shards: one
    update per step there); the last step's λ has settled, and the run's final objective
    is the joint optimum's with those λ."""
    synthetic.generate(str(tmp_path / "data"), n_rows=4000, n_users=60, n_items=25, seed=5)
    cfg = config.parse({
        "name": "auto", "workdir": str(tmp_path / "work"),
        "data": {"train": str(tmp_path / "data" / "train"), "validation_fraction": 0.25,
                 "feature_bags": {"global": {"ntv": "global_features"}, "per_user": {"ntv": "global_features"},
                                  "per_item": {"ntv": "item_features"}}},
        "iterations": 8,
        "coordinates": [
            {"name": "global", "type": "fixed_effect", "feature_bag": "global", "l2": 1.0, "workers": 1},
            {"name": "per-user", "type": "random_effect", "entity": "user_id", "feature_bag": "per_user",
             "l2": {"auto": "per_feature", "initial": 10.0}},
            {"name": "per-item", "type": "random_effect", "entity": "item_id", "feature_bag": "per_item",
             "l2": "auto", "shards": 2},
        ],
    })
    driver.run(cfg, spark=spark)
    for s in plan.steps(cfg):
        doc = l2.read(cfg.workdir, s)
        assert (doc is not None) == (s.coordinate != "global"), s
    user = [L2.from_json(l2.read(cfg.workdir, plan.Step(k, "per-user"))["used"]) for k in range(8)]
    item = [L2.from_json(l2.read(cfg.workdir, plan.Step(k, "per-item"))["used"]) for k in range(8)]
    print("per-user λ by pass", [u.summary() for u in user])
    print("per-item λ by pass", [i.summary() for i in item])
    assert user[0].per_feature is not None and item[0].per_feature is None
    assert user[-1].intercept != 10.0  # moved from its start
    assert item[-1].features == pytest.approx(item[-2].features, rel=1e-3)  # settled over the passes
    recs = storage.read_json(layout.metrics(cfg.workdir))
    assert [r.get("l2") is not None for r in recs] == [r["coordinate"] != "global" for r in recs]
    assert L2.from_json(recs[-1]["l2"]).features == item[-1].features
    assert "Estimated l2 (auto)" in open(layout.report(cfg.workdir)).read()
    values = [r["objective"] for r in storage.read_json(layout.objective(cfg.workdir))]
    ref = joint.joint_optimum(cfg, cfg.workdir, penalties=l2.joint_penalties(cfg, cfg.workdir))
    gap = (values[-1] - ref.objective) / abs(ref.objective)
    print(f"gap to the joint optimum at the final λ: {gap:.3e}")
    assert -1e-9 <= gap <= 1e-5


def test_the_scipy_reference_solver_gives_the_same_lambda():
    """The estimate depends on the modes only: the per-entity reference (L-BFGS-B) and the
    compiled kernel agree on λ."""
    from gdmix.random_effect import scipy_solver

    ent = _entities(1.0, np.array([0.5, 0.8]), n_entities=50, rows=40, seed=2)
    coord = Coordinate(name="u", type="random_effect", feature_bag="b", entity="u", l2_auto="per_feature",
                       regularize_intercept=True)
    settings = Settings(1.0)
    got = {}
    for name, solve in (("vectorised", lambda e, w, p, k: vectorised.solve(e, settings, w, workers=1, prior=p)),
                        ("scipy", lambda e, w, p, k: scipy_solver.solve(e, settings, w, workers=1, prior=p))):
        est = l2_auto.settle(ent, coord, L2(1.0, 1.0), None, solve, 2)
        got[name] = np.concatenate([[est.used.intercept], est.used.per_feature])
    np.testing.assert_allclose(got["scipy"], got["vectorised"], rtol=1e-5)


def test_linear_task_recovers_known_variances():
    """task: linear (unit noise variance, the loss ½(s − y)²): the Laplace approximation is
    exact, and λ = 1/σ² per group comes back from 1,000 entities × 20 rows."""
    rng = np.random.default_rng(4)
    n_ent, rows, sd = 1000, 20, np.array([1.0, 0.5, 0.8])
    theta = rng.normal(0, 1, (n_ent, 3)) * sd
    x = rng.normal(0, 1, (n_ent * rows, 2))
    owner = np.repeat(np.arange(n_ent), rows)
    y = theta[owner, 0] + np.einsum("ij,ij->i", x, theta[owner, 1:]) + rng.normal(0, 1, len(x))
    ent = Entities(np.arange(0, len(x) + 1, rows).astype(np.int64),
                   CSR(np.arange(0, x.size + 1, 2).astype(np.int64), np.tile(np.arange(2, dtype=np.int32), len(x)),
                       x.reshape(-1)), y, np.ones(len(x)), np.zeros(len(x)))
    coord = Coordinate(name="u", type="random_effect", feature_bag="b", entity="u", l2_auto="per_feature",
                       regularize_intercept=True)
    settings = Settings(1.0, task="linear")
    est = l2_auto.settle(ent, coord, L2(1.0, 1.0), None,
                         lambda e, w, p, k: vectorised.solve(e, settings, w, workers=k, prior=p), 2, task="linear")
    got = np.concatenate([[est.used.intercept], est.used.per_feature])
    print("linear task λ", got, "truth", 1 / sd ** 2)
    np.testing.assert_allclose(got, 1 / sd ** 2, rtol=0.10)

"""The slow-direction step: closed form, damped Newton, and its effect on block descent."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import scipy.optimize as so
import scipy.sparse as sp
from scipy.special import expit

from gdmix import joint, layout, schema, shift, sparse, storage
from gdmix.random_effect import scipy_solver as solver
from gdmix.random_effect import stage
from gdmix.random_effect.scipy_solver import Entities, Settings
from test_joint import make_workdir


def _problem(rng, d, passive_rows=0):
    p = shift.Problem(beta=rng.normal(size=d), alpha_sum=rng.normal(size=d) * 3,
                      alpha_count=rng.integers(1, 20, d).astype(float),
                      pen_fixed=np.concatenate([[0.0], np.full(d - 1, 0.5)]),
                      pen_random=np.full(d, 2.0))
    if passive_rows:
        x = rng.normal(size=(passive_rows, d))
        x[:, 0] = 1.0
        x[rng.random(x.shape) < 0.3] = 0.0
        x[:, 0] = 1.0
        p.passive_x = sp.csr_matrix(x)
        p.passive_score = rng.normal(size=passive_rows)
        p.passive_label = (rng.random(passive_rows) < 0.5).astype(float)
        p.passive_weight = rng.uniform(0.5, 2, passive_rows)
    return p


def test_closed_form_zeroes_the_gradient_and_lowers_the_objective():
    p = _problem(np.random.default_rng(0), 5)
    t = shift.solve(p)
    assert np.max(np.abs(p.gradient(t))) < 1e-12
    assert p.value(t) < p.value(np.zeros(5))
    # the intercept direction: only the entities' penalty acts, so t_0 = mean intercept
    assert t[0] == pytest.approx(p.alpha_sum[0] / p.alpha_count[0], rel=1e-14)


@pytest.mark.parametrize("d", [1, 4])
def test_newton_with_passive_rows_matches_a_brute_force_minimisation(d):
    p = _problem(np.random.default_rng(d), d, passive_rows=40)
    t = shift.solve(p)
    brute = so.minimize(p.value, np.zeros(d), method="Nelder-Mead" if d == 1 else "BFGS",
                        options={"xatol": 1e-12, "fatol": 1e-14} if d == 1 else {"gtol": 1e-11})
    np.testing.assert_allclose(t, brute.x, atol=1e-6)
    assert p.value(t) <= brute.fun + 1e-12
    assert np.max(np.abs(p.gradient(t))) < 1e-9


def test_flat_directions_stay_at_zero():
    p = _problem(np.random.default_rng(3), 3, passive_rows=10)
    p.pen_fixed[2] = p.pen_random[2] = 0.0
    p.passive_x = sp.csr_matrix(p.passive_x.toarray() * [1, 1, 0])
    t = shift.solve(p)
    assert t[2] == 0.0 and t[0] != 0.0
    assert np.max(np.abs(p.gradient(t))) < 1e-9


def _index(names):
    return pa.table({"index": pa.array(range(len(names)), pa.int32()), "name": [n for n, _ in names],
                     "term": [t for _, t in names]}, schema=schema.FEATURE_INDEX)


def test_shared_features_match_name_and_term_only_for_the_same_source():
    fixed = _index([("a", ""), ("b", "x"), ("c", ""), ("d", "")])
    rand = _index([("c", ""), ("b", "y"), ("a", ""), ("e", "")])
    f, r = shift.shared_features(fixed, rand, same_source=True)
    assert r.tolist() == [0, 2] and f.tolist() == [2, 0]  # b differs in term, d/e in one bag only
    f, r = shift.shared_features(fixed, rand, same_source=False)
    assert len(f) == len(r) == 0


# --- block coordinate descent in memory --------------------------------------------------------

class _Loop:
    """Fixed effect (scipy, in the test) + per-user random effect (our solver) + shift."""

    def __init__(self, cfg, wd):
        self.cfg, self.wd = cfg, wd
        rows = storage.read_table(layout.prepared(wd, "train")).sort_by([("user", "ascending"), ("uid", "ascending")])
        self.y, self.w, self.o = (rows.column(c).to_numpy().astype(float) for c in ("label", "weight", "offset"))
        self.xg = sparse.from_table(rows, "g_indices", "g_values").matrix(3)
        self.xg1 = sp.hstack([np.ones((rows.num_rows, 1)), self.xg], format="csr")
        users = rows.column("user").to_numpy(zero_copy_only=False)
        ids, counts = np.unique(users, return_counts=True)
        re, fe = cfg.coordinate("per_user"), cfg.fixed_effect
        self.re, self.fe = re, fe
        self.active_rows = np.repeat(counts >= re.min_samples, counts)
        self.ids = list(ids[counts >= re.min_samples])
        self.csr = sparse.from_table(rows, "u_indices", "u_values")
        act = rows.filter(pa.array(self.active_rows))
        self.ent_ptr = np.concatenate([[0], np.cumsum(counts[counts >= re.min_samples])]).astype(np.int64)
        self.act_csr = sparse.from_table(act, "u_indices", "u_values")
        pas = rows.filter(pa.array(~self.active_rows))
        self.pas_csr = sparse.from_table(pas, "u_indices", "u_values")
        self.pos = np.full(rows.num_rows, -1)
        self.pos[self.active_rows] = np.repeat(np.arange(len(self.ids)), counts[counts >= re.min_samples])
        self.theta = np.zeros(4)  # fixed intercept + 3 coefficients
        self.models = None
        self.fixed_idx, self.random_idx = shift.shared_features(
            storage.read_table(layout.feature_index(wd, "g")), storage.read_table(layout.feature_index(wd, "u")), True)
        self.direction = shift.directions(3, self.random_idx)

    def re_score(self):
        if self.models is None:
            return np.zeros(len(self.y))
        return stage._scores(self.models, self.pos, self.csr)

    def fe_step(self):
        off = self.o + self.re_score()
        pen = np.array([0.0, 1, 1, 1]) * self.fe.l2
        x, y, w = self.xg1, self.y, self.w

        def fg(t):
            s = off + x @ t
            return (w @ (np.logaddexp(0, s) - y * s) + 0.5 * pen @ (t * t),
                    x.T @ (w * (expit(s) - y)) + pen * t)

        def hess(t):
            p = expit(off + x @ t)
            return (x.T @ sp.diags(w * p * (1 - p)) @ x).toarray() + np.diag(pen)

        self.theta = so.minimize(fg, self.theta, jac=True, hess=hess, method="trust-exact",
                                 options={"gtol": 1e-12}).x

    def re_step(self, with_shift):
        fs = self.xg1 @ self.theta
        a = self.active_rows
        ent = Entities(self.ent_ptr, self.act_csr, self.y[a], self.w[a], (self.o + fs)[a])
        re = self.re
        self.models = solver.solve(ent, Settings(re.l2, re.regularize_intercept, re.tolerance, re.max_iterations),
                                   self.models).models
        if not with_shift:
            return
        m = self.models
        p = shift.build_problem(
            m.intercept, m.indices, m.values, self.direction,
            np.concatenate([[self.theta[0]], self.theta[1 + self.fixed_idx]]),
            self.fe.l2 * np.array([0.0, 1, 1, 1]), re.l2 * np.array([1.0, 1, 1, 1]),
            (self.pas_csr, (self.o + fs)[~a], self.y[~a], self.w[~a]))
        t = shift.solve(p)
        before_scores = fs + self.re_score()
        icp, vals = shift.apply(t, m.intercept, m.indices, m.values, self.direction)
        self.models = solver.Models(icp, m.ptr, m.indices, vals)
        self.theta[0] += t[0]
        self.theta[1 + self.fixed_idx] += t[1:]
        after_scores = self.xg1 @ self.theta + self.re_score()
        # the step leaves every active row's score as it was
        np.testing.assert_allclose(after_scores[a], before_scores[a], rtol=0, atol=1e-12)

    def objective(self):
        m = self.models
        users = {eid: joint.EntityModel(float(m.intercept[e]), dict(zip(
            m.indices[m.ptr[e]:m.ptr[e + 1]].tolist(), m.values[m.ptr[e]:m.ptr[e + 1]].tolist())))
            for e, eid in enumerate(self.ids)}
        return joint.objective(self.cfg, self.wd, {
            "global": joint.FixedModel(self.theta[0], self.theta[1:]), "per_user": users})


def _gaps(cfg, wd, best, with_shift, passes=8):
    loop = _Loop(cfg, wd)
    gaps = []
    for _ in range(passes):
        loop.fe_step()
        loop.re_step(with_shift)
        gaps.append((loop.objective() - best) / abs(best))
    return gaps


def test_block_descent_with_the_shift_reaches_the_joint_optimum_in_8_passes(tmp_path):
    cfg, wd = make_workdir(tmp_path, min_samples=3, n_entities=30, icp_mean=1.5)
    best = joint.joint_optimum(cfg, wd).objective
    with_shift = _gaps(cfg, wd, best, True)
    without = _gaps(cfg, wd, best, False)
    assert min(with_shift) > -1e-12 and min(without) > -1e-12  # never below the optimum
    assert with_shift[-1] < 1e-6
    assert np.all(np.diff(with_shift) <= 1e-12)  # descent: every pass lowers the objective
    assert without[-1] > 100 * max(with_shift[-1], 1e-10)  # plain block descent crawls
    assert without[-1] > 1e-6

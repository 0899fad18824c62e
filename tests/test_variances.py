"""Coefficient variances (``variance: simple | full``) against a direct numpy computation:
H formed densely from each entity's rows, then 1/diag(H) and diag(H⁻¹)."""
from __future__ import annotations

import time

import numpy as np
import pytest
from scipy.special import expit

from gdmix.random_effect import scipy_solver, vectorised
from gdmix.random_effect.scipy_solver import Models, Prior, Settings
from test_vectorised import random_entities


def dense_hessians(ent, models, pen_of):
    """Per entity, H = Σ_i w_i σ(s_i)(1 − σ(s_i)) x_i x_iᵀ + diag(π), x_i = (1, z_i) over the
    model's columns, built row by row from the raw CSR (repeated features summed)."""
    out = []
    f = ent.features
    for e in range(ent.n_entities):
        cols = list(models.indices[models.ptr[e]:models.ptr[e + 1]])
        theta = np.concatenate([[models.intercept[e]], models.values[models.ptr[e]:models.ptr[e + 1]]])
        h = np.diag(pen_of(e, cols)).astype(float)
        for i in range(ent.row_ptr[e], ent.row_ptr[e + 1]):
            x = np.zeros(1 + len(cols))
            x[0] = 1.0
            for k in range(f.indptr[i], f.indptr[i + 1]):
                x[1 + cols.index(f.indices[k])] += f.values[k]
            q = expit(ent.offset[i] + x @ theta)
            h += ent.weight[i] * q * (1 - q) * np.outer(x, x)
        out.append(h)
    return out


def l2_pen(settings):
    def pen(e, cols):
        p = np.full(1 + len(cols), settings.l2)
        p[0] = settings.l2 if settings.regularize_intercept else 0.0
        return p
    return pen


def flat(models, icp, val, e):
    return np.concatenate([[icp[e]], val[models.ptr[e]:models.ptr[e + 1]]])


@pytest.mark.parametrize("full", [False, True])
def test_entity_variances_match_dense_numpy(full):
    ent = random_entities(5, n_entities=30)
    settings = Settings(l2=1.5)
    res = vectorised.solve(ent, settings)
    hs = dense_hessians(ent, res.models, l2_pen(settings))
    icp, val = vectorised.variances(ent, settings, res.models, full=full)
    ricp, rval = scipy_solver.variances(ent, settings, res.models, full=full)
    for e, h in enumerate(hs):
        want = np.diag(np.linalg.inv(h)) if full else 1.0 / np.diag(h)
        np.testing.assert_allclose(flat(res.models, icp, val, e), want, rtol=1e-10)
        np.testing.assert_allclose(flat(res.models, ricp, rval, e), want, rtol=1e-10)
    assert np.all(val > 0) and np.all(icp > 0)
    if full:  # the full variance of a coefficient is never below 1/H_kk (Cauchy-Schwarz)
        sicp, sval = vectorised.variances(ent, settings, res.models, full=False)
        assert np.all(val >= sval * (1 - 1e-12)) and np.any(val > sval * 1.01)


def random_prior(ent, models, seed):
    """A prior on about half of each entity's coefficients (and on half the intercepts),
    plus features the entity does not have (ignored)."""
    rng = np.random.default_rng(seed)
    n = ent.n_entities
    icp_w = np.where(rng.random(n) < 0.5, rng.uniform(0.1, 5.0, n), np.nan)
    icp_m = rng.normal(0, 1, n)
    ptr, idx, mean, weight = [0], [], [], []
    for e in range(n):
        cols = models.indices[models.ptr[e]:models.ptr[e + 1]]
        keep = cols[rng.random(len(cols)) < 0.5]
        extra = np.array([500 + e], np.int32)  # not in the entity's rows
        ids = np.unique(np.concatenate([keep, extra])).astype(np.int32)
        idx.append(ids), mean.append(rng.normal(0, 1, len(ids))), weight.append(rng.uniform(0.1, 5.0, len(ids)))
        ptr.append(ptr[-1] + len(ids))
    ptr = np.array(ptr, np.int64)
    idx = np.concatenate(idx)
    return Prior(Models(icp_m, ptr, idx, np.concatenate(mean)), Models(icp_w, ptr, idx, np.concatenate(weight)))


def test_prior_penalty_in_kernel_and_reference():
    """With per-coefficient centres and weights both solvers reach the same optimum, its
    gradient (from the dense numpy form of f_e) vanishes, and the variances use the prior's
    weights."""
    ent = random_entities(11, n_entities=25)
    settings = Settings(l2=2.0, regularize_intercept=False, tolerance=1e-12)
    prior = random_prior(ent, vectorised.solve(ent, settings).models, 3)
    fast = vectorised.solve(ent, settings, prior=prior)
    ref = scipy_solver.solve(ent, settings, prior=prior)
    # an unpenalised intercept without a prior over one class has no finite optimum
    np.testing.assert_array_equal(fast.separable, ref.separable)
    ok = ~ref.separable
    assert ok.sum() >= 20 and fast.separable.any()
    assert not fast.separable[~np.isnan(prior.weight.intercept)].any()
    np.testing.assert_allclose(fast.models.intercept[ok], ref.models.intercept[ok], atol=1e-6)
    per = np.repeat(ok, np.diff(fast.models.ptr))
    np.testing.assert_allclose(fast.models.values[per], ref.models.values[per], atol=1e-6)
    np.testing.assert_allclose(fast.objective[ok], ref.objective[ok], rtol=1e-9)
    m = fast.models

    def pen_ctr(e):
        cols = m.indices[m.ptr[e]:m.ptr[e + 1]]
        return scipy_solver.penalty_of(cols, settings, prior, e)

    f = ent.features
    moved = 0
    for e in np.flatnonzero(ok):
        pen, ctr = pen_ctr(e)
        cols = list(m.indices[m.ptr[e]:m.ptr[e + 1]])
        theta = flat(m, m.intercept, m.values, e)
        g = pen * (theta - ctr)
        for i in range(ent.row_ptr[e], ent.row_ptr[e + 1]):
            x = np.zeros(len(theta))
            x[0] = 1
            for k in range(f.indptr[i], f.indptr[i + 1]):
                x[1 + cols.index(f.indices[k])] += f.values[k]
            g += ent.weight[i] * (expit(ent.offset[i] + x @ theta) - ent.label[i]) * x
        assert np.max(np.abs(g)) <= 1e-8 * max(1, ent.weight[ent.row_ptr[e]:ent.row_ptr[e + 1]].sum())
        moved += int(np.any(ctr != 0))
    assert moved > ok.sum() // 2
    hs = dense_hessians(ent, m, lambda e, cols: pen_ctr(e)[0])
    icp, val = vectorised.variances(ent, settings, m, prior=prior, full=True)
    for e in np.flatnonzero(ok):
        h = hs[e]
        np.testing.assert_allclose(flat(m, icp, val, e), np.diag(np.linalg.inv(h)), rtol=1e-10)


def test_variance_pass_is_fast():
    """The compiled pass over many entities: no per-entity Python (printed for the report)."""
    from test_vectorised import random_entities as re_

    parts = [re_(s, n_entities=200) for s in range(10)]
    from gdmix.random_effect.scipy_solver import Entities
    from gdmix.sparse import CSR

    def cat(ps):
        rp, ip, base_r, base_n = [np.zeros(1, np.int64)], [np.zeros(1, np.int64)], 0, 0
        for p in ps:
            rp.append(p.row_ptr[1:] + base_r)
            ip.append(p.features.indptr[1:] + base_n)
            base_r += p.row_ptr[-1]
            base_n += p.features.indptr[-1]
        return Entities(np.concatenate(rp), CSR(np.concatenate(ip), np.concatenate([p.features.indices for p in ps]),
                                                 np.concatenate([p.features.values for p in ps])),
                        *(np.concatenate([getattr(p, a) for p in ps]) for a in ("label", "weight", "offset")))

    ent = cat(parts)
    settings = Settings(l2=1.0)
    res = vectorised.solve(ent, settings)
    vectorised.variances_block(ent.slice(0, 5), settings, res.models.slice(0, 5), full=True)  # compiled
    t0 = time.perf_counter()
    icp, val = vectorised.variances(ent, settings, res.models, full=True)
    fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    ricp, rval = scipy_solver.variances(ent, settings, res.models, full=True)
    slow = time.perf_counter() - t0
    np.testing.assert_allclose(val, rval, rtol=1e-9)
    print(f"variances of {ent.n_entities} entities: compiled {fast * 1e3:.1f} ms, numpy loop {slow * 1e3:.1f} ms")
    assert fast < slow


# --- through the stages: fixed effect (TF workers), per-entity, per-cohort ------------------

def _dense_check(rows, table, l2, regularize_intercept, full, entity=True):
    """Every model's variances against H formed densely from its training rows."""
    from gdmix import schema

    by_entity = {}
    ent_col = rows.column(schema.ENTITY_ID).to_pylist() if entity else [schema.FIXED_EFFECT_MODEL_ID] * rows.num_rows
    for i, e in enumerate(ent_col):
        by_entity.setdefault(e, []).append(i)
    o, w = rows.column(schema.OFFSET).to_numpy(), rows.column(schema.WEIGHT).to_numpy()
    idx, val = rows.column(schema.INDICES).to_pylist(), rows.column(schema.VALUES).to_pylist()
    checked = 0
    for mid, b, fi, fv, bv, vv in zip(*(table.column(c).to_pylist() for c in (
            schema.MODEL_ID, schema.INTERCEPT, schema.INDICES, schema.VALUES, schema.INTERCEPT_VARIANCE,
            schema.VARIANCES))):
        col = {j: k + 1 for k, j in enumerate(fi)}
        theta = np.array([b] + fv)
        h = np.diag([l2 if regularize_intercept else 0.0] + [l2] * len(fi))
        for i in by_entity[mid]:
            x = np.zeros(len(theta))
            x[0] = 1.0
            for j, v in zip(idx[i], val[i]):
                x[col[j]] += v
            q = expit(o[i] + x @ theta)
            h += w[i] * q * (1 - q) * np.outer(x, x)
        want = np.diag(np.linalg.inv(h)) if full else 1.0 / np.diag(h)
        np.testing.assert_allclose([bv] + vv, want, rtol=1e-7, err_msg=str(mid))
        checked += 1
    return checked


@pytest.mark.slow
@pytest.mark.parametrize("fe_mode,user_mode,item_mode", [("full", "simple", "full"), ("simple", "full", "simple")])
def test_stages_write_variances(tmp_path, spark, fe_mode, user_mode, item_mode):
    import pyarrow as pa

    from gdmix import config, driver, layout, schema, storage
    from gdmix.data import synthetic

    synthetic.generate(str(tmp_path / "data"), n_rows=1500, n_users=12, n_items=4, seed=5, offset=True)
    cfg = config.parse({
        "name": "variances", "workdir": str(tmp_path / "work"), "iterations": 1,
        "data": {"train": str(tmp_path / "data" / "train"), "validation_fraction": 0.25,
                 "feature_bags": {"g": {"ntv": "global_features"}, "u": {"ntv": "user_features"},
                                  "i": {"ntv": "item_features"}}},
        "coordinates": [
            {"name": "global", "type": "fixed_effect", "feature_bag": "g", "l2": 1.0, "variance": fe_mode},
            {"name": "per-user", "type": "random_effect", "entity": "user_id", "feature_bag": "u",
             "l2": 2.0, "variance": user_mode},
            {"name": "per-item", "type": "random_effect", "entity": "item_id", "feature_bag": "i",
             "l2": 3.0, "solver": "data_parallel", "variance": item_mode},
        ],
    })
    driver.run(cfg, spark=spark)
    wd = cfg.workdir
    # the fixed effect's first step reads the prepared rows: offsets are the input's
    prepared = storage.read_table(layout.prepared(wd, "train"))
    fe_rows = pa.table({schema.OFFSET: prepared.column(schema.OFFSET), schema.WEIGHT: prepared.column(schema.WEIGHT),
                        schema.INDICES: prepared.column("g_indices"), schema.VALUES: prepared.column("g_values")})
    fe = storage.read_table(layout.coefficients(wd, 0, "global", "global"))
    assert _dense_check(fe_rows, fe, 1.0, False, fe_mode == "full", entity=False) == 1
    # the random effects: their shards' models (before the shift, which leaves H_e as it is)
    for name, l2, full in (("per-user", 2.0, user_mode == "full"), ("per-item", 3.0, item_mode == "full")):
        rows = storage.read_table(layout.partition(wd, 0, name, "train"))
        table = storage.read_table(layout.shard_coefficients(wd, 0, name, 0))
        assert _dense_check(rows, table, l2, True, full) >= 4
    # exported: the same (name, term) in means and variances, all positive
    for name in ("global", "per-user", "per-item"):
        m = storage.read_table(layout.model(wd, name))
        for means, var in zip(m.column("means").to_pylist(), m.column("variances").to_pylist()):
            assert [(x["name"], x["term"]) for x in means] == [(x["name"], x["term"]) for x in var]
            assert all(x["value"] > 0 for x in var)
    # the shift carried the fixed effect's variances through the random-effect steps
    last = storage.read_table(layout.coefficients(wd, 0, "per-item", "global"))
    assert last.column(schema.VARIANCES).to_pylist() == fe.column(schema.VARIANCES).to_pylist()


def test_fixed_effect_hessian_diagonal():
    """The fixed effect's O(nnz) diag(H) (``simple``) is the dense Hessian's diagonal."""
    import scipy.sparse as sp

    from gdmix.fixed_effect import objective

    rng = np.random.default_rng(2)
    x = sp.random(300, 12, density=0.3, format="csr", random_state=3)
    theta, w, o = rng.normal(size=13), rng.uniform(0.5, 2, 300), rng.normal(size=300)
    np.testing.assert_allclose(objective.data_hessian_diag(theta, x, w, o),
                               np.diag(objective.data_hessian(theta, x, w, o)), rtol=1e-12)
    pen = objective.penalty_weights(13, 0.5, False)
    h = objective.data_hessian(theta, x, w, o) + np.diag(pen)
    np.testing.assert_allclose(objective.variances(h=h), np.diag(np.linalg.inv(h)), rtol=1e-12)
    assert np.isinf(objective.variances(h_diag=np.array([0.0, 2.0]))[0])

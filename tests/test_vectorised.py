"""The vectorised random-effect solver against the scipy reference, on real solves."""
from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest
from scipy.special import expit

from gdmix import layout, plan, storage
from gdmix.random_effect import scipy_solver
from gdmix.random_effect import newton, stage, vectorised
from gdmix.random_effect.scipy_solver import Entities, Models, Settings
from gdmix.sparse import CSR
from test_random_effect import write_partition
from test_joint import make_workdir


def random_entities(seed: int, n_entities: int = 24, n_global: int = 120) -> Entities:
    """Entities with 1..30 features and 1..50 rows, weights, offsets, rows without features,
    repeated features in a row, one-row and one-class entities."""
    rng = np.random.default_rng(seed)
    row_ptr, indptr, idx, val, y, w, o = [0], [0], [], [], [], [], []
    for e in range(n_entities):
        n = 1 if e % 7 == 0 else int(rng.integers(1, 51))
        d = int(rng.integers(1, 31))
        feats = rng.choice(n_global, d, replace=False)
        true = rng.normal(0, 1, n_global)
        for _ in range(n):
            k = int(rng.integers(0, min(d, 8) + 1))
            f = rng.choice(feats, k, replace=True)  # repeats: the solvers sum them
            v = rng.normal(size=k)
            idx.append(f), val.append(v)
            indptr.append(indptr[-1] + k)
        s = rng.normal(0, 1) + np.array([true[i] @ v for i, v in zip(idx[-n:], val[-n:])])
        yy = (rng.random(n) < expit(s)).astype(float)
        if e % 5 == 1:
            yy[:] = float(e % 2)  # one class
        y.append(yy), w.append(rng.uniform(0.2, 3.0, n)), o.append(rng.normal(0, 0.7, n))
        row_ptr.append(row_ptr[-1] + n)
    return Entities(np.array(row_ptr, np.int64),
                    CSR(np.array(indptr, np.int64), np.concatenate(idx).astype(np.int32), np.concatenate(val)),
                    np.concatenate(y), np.concatenate(w), np.concatenate(o))


def _per_coef_entity(models: Models) -> np.ndarray:
    return np.repeat(np.arange(models.n_models), np.diff(models.ptr))


def assert_same_solution(fast, ref, coef_atol=1e-6, obj_rtol=1e-9):
    """Same local features per entity; at finite optima the same coefficients and objective."""
    np.testing.assert_array_equal(fast.models.ptr, ref.models.ptr)
    np.testing.assert_array_equal(fast.models.indices, ref.models.indices)
    np.testing.assert_array_equal(fast.separable, ref.separable)
    finite = ~ref.separable
    assert fast.converged[finite].all()
    assert np.isfinite(fast.models.values).all() and np.isfinite(fast.models.intercept).all()
    np.testing.assert_allclose(fast.models.intercept[finite], ref.models.intercept[finite], atol=coef_atol, rtol=0)
    on = finite[_per_coef_entity(ref.models)]
    np.testing.assert_allclose(fast.models.values[on], ref.models.values[on], atol=coef_atol, rtol=0)
    np.testing.assert_allclose(fast.objective[finite], ref.objective[finite], rtol=obj_rtol, atol=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("reg", [True, False])
def test_matches_the_scipy_reference_on_random_problems(seed, reg):
    ent = random_entities(seed)
    s = Settings(l2=[0.3, 1.0, 2.5][seed], regularize_intercept=reg)
    ref, fast = scipy_solver.solve_block(ent, s), vectorised.solve_block(ent, s)
    assert_same_solution(fast, ref)
    finite = ~ref.separable
    assert fast.objective[finite].sum() <= ref.objective[finite].sum() * (1 + 1e-12)
    if reg:
        assert not ref.separable.any()
    else:
        # an unpenalised intercept facing one class: no finite optimum, both flag it and
        # both get the loss down to the tolerance's level (the infimum is the penalty 0)
        assert ref.separable.sum() >= 5
        sep = ref.separable
        scale = np.add.reduceat(ent.weight, ent.row_ptr[:-1])[sep]
        assert np.all(fast.objective[sep] <= 1e-8 * scale) and np.all(ref.objective[sep] <= 1e-8 * scale)
    # a Newton method: a handful of iterations where L-BFGS needs tens
    assert fast.iterations[~fast.separable].max() <= 12
    assert fast.iterations.sum() < ref.iterations.sum()


@pytest.mark.parametrize("reg", [True, False])
def test_hundreds_of_entities_match_the_scipy_reference(reg):
    ent = random_entities(11, n_entities=600)
    s = Settings(l2=0.8, regularize_intercept=reg)
    assert_same_solution(vectorised.solve_block(ent, s), scipy_solver.solve_block(ent, s))


def test_cholesky_solve_reads_the_lower_triangle_and_reports_an_indefinite_matrix():
    rng = np.random.default_rng(5)
    for p in (1, 2, 7, 31):
        z = rng.normal(size=(p + 3, p))
        h = z.T @ z + 0.1 * np.eye(p)
        rhs = rng.normal(size=p)
        scratch = np.tril(h) + np.triu(rng.normal(size=(p, p)), 1)  # garbage above: never read
        out = np.empty(p)
        assert newton.cholesky_solve(scratch, p, rhs, out)
        np.testing.assert_allclose(out, np.linalg.solve(h, rhs), rtol=1e-9, atol=1e-12)
    bad = np.diag(np.r_[np.ones(3), -1.0, np.ones(2)])
    assert not newton.cholesky_solve(bad, 6, np.ones(6), np.empty(6))


def test_one_row_featureless_and_one_class_entities_have_finite_optima():
    # (z rows as dicts) one row; a row without features; one class over three rows
    ent = Entities(np.array([0, 1, 2, 5]),
                   CSR(np.array([0, 1, 1, 3, 5, 6]), np.array([4, 0, 2, 0, 2, 0], np.int32),
                       np.array([2.0, 1.0, 0.5, -1.0, 0.2, 0.3])),
                   np.array([1.0, 0.0, 0.0, 0.0, 0.0]), np.array([1.0, 2.0, 1.0, 1.0, 1.0]),
                   np.array([0.3, 0.0, 0.0, 0.0, 0.0]))
    s = Settings(l2=1.0)
    fast = vectorised.solve_block(ent, s)
    assert_same_solution(fast, scipy_solver.solve_block(ent, s))
    # the featureless row: stationarity w (σ(o + a) − y) + λ a = 0 by hand
    a = fast.models.intercept[1]
    assert fast.models.ptr[2] - fast.models.ptr[1] == 0 and abs(2.0 * expit(a) + a) < 1e-10
    np.testing.assert_array_equal(fast.models.indices, [4, 0, 2])


def test_without_l2_separable_entities_stop_and_are_flagged_others_converge():
    separable = (np.array([[1.0], [2.0], [0.5]]), np.ones(3))  # one class, λ = 0
    rng = np.random.default_rng(5)
    z = rng.normal(size=(40, 2))
    mixed = (z, (rng.random(40) < expit(z @ [1.0, -0.5])).astype(float))  # overlapping classes
    rows = [separable, mixed]
    idx = [np.flatnonzero(r) for z_, _ in rows for r in z_]
    val = [r[np.flatnonzero(r)] for z_, _ in rows for r in z_]
    ent = Entities(np.array([0, 3, 43]),
                   CSR(np.concatenate([[0], np.cumsum([len(i) for i in idx])]), np.concatenate(idx).astype(np.int32),
                       np.concatenate(val)),
                   np.concatenate([y for _, y in rows]), np.ones(43), np.zeros(43))
    s = Settings(l2=0.0, max_iterations=30)
    fast, ref = vectorised.solve_block(ent, s), scipy_solver.solve_block(ent, s)
    assert fast.separable.tolist() == ref.separable.tolist() == [True, False]
    assert not fast.converged[0] and fast.converged[1]
    assert fast.iterations[0] <= 30 and np.isfinite(fast.models.values).all()
    assert fast.objective[0] < 0.01 * 3 * np.log(2)  # it descended toward the infimum 0
    np.testing.assert_allclose(fast.models.values[1:], ref.models.values[1:], atol=1e-6)
    assert fast.objective[1] == pytest.approx(ref.objective[1], rel=1e-9)


def test_warm_start_from_nearby_models_takes_fewer_steps_to_the_same_optimum():
    ent = random_entities(3)
    s = Settings(l2=0.8)
    cold = vectorised.solve_block(ent, s)
    rng = np.random.default_rng(0)
    m = cold.models
    warm = Models(m.intercept + 1e-3 * rng.normal(size=m.n_models), m.ptr.copy(), m.indices.copy(),
                  m.values + 1e-3 * rng.normal(size=len(m.values)))
    # a warm model may name a feature the entity no longer has (ignored), and miss one (0)
    lens = np.diff(warm.ptr)
    first = int(np.flatnonzero(lens >= 2)[0])
    a = int(warm.ptr[first])
    warm.indices[a] = 10_000
    again = vectorised.solve_block(ent, s, warm)
    assert_same_solution(again, cold, coef_atol=1e-8, obj_rtol=1e-12)
    assert again.iterations.sum() < cold.iterations.sum()
    ref = scipy_solver.solve_block(ent, s, warm)
    assert_same_solution(again, ref)


def test_a_huge_sparse_vocabulary_is_renumbered_per_block_to_the_same_models(monkeypatch):
    """Feature indices in the hundreds of millions (an id bag): the block's features are
    numbered densely for the kernel, and the models and warm starts keep the global ones."""
    ent = random_entities(8, n_entities=30)
    s = Settings(l2=0.6)
    plain = vectorised.solve_block(ent, s)
    spread = np.int32(3_000_017)
    wide = dataclasses.replace(ent, features=CSR(ent.features.indptr, ent.features.indices * spread + 11,
                                                 ent.features.values))
    monkeypatch.setattr(vectorised, "DENSE_FEATURES_MAX", 1000)  # as if these were a real id bag
    got = vectorised.solve_block(wide, s)
    np.testing.assert_array_equal(got.models.indices, plain.models.indices * spread + 11)
    np.testing.assert_allclose(got.models.values, plain.models.values, atol=1e-12, rtol=0)
    np.testing.assert_allclose(got.objective, plain.objective, rtol=1e-13)
    # a warm start by global index (one feature the block does not have, ignored)
    warm = dataclasses.replace(got.models, indices=got.models.indices.copy())
    warm.indices[0] = 2_000_000_000
    again = vectorised.solve_block(wide, s, warm)
    assert again.iterations.sum() < got.iterations.sum()
    np.testing.assert_allclose(again.models.values, got.models.values, atol=1e-8, rtol=0)


def test_large_entities_threads_and_a_process_pool_give_the_same_result():
    ent = random_entities(4, n_entities=60)
    s = Settings(l2=0.5)
    plain = vectorised.solve_block(ent, s)
    # entities above max_dim go to the scipy reference, in their places
    mixed = vectorised.solve_block(ent, s, max_dim=8)
    dims = np.diff(plain.models.ptr) + 1
    assert (dims > 8).any() and (dims <= 8).any()
    assert_same_solution(mixed, plain)
    assert mixed.iterations[dims > 8].min() > plain.iterations[dims > 8].max()  # L-BFGS counts
    # many small blocks on threads, on a real process pool, and one by one: the same answer
    ex = vectorised.make_executor(2)
    try:
        for kw in ({"workers": 2}, {"executor": ex}, {}):
            again = vectorised.solve(ent, s, timeout=120, pairs_per_block=500, **kw)
            np.testing.assert_array_equal(again.models.indices, plain.models.indices)
            np.testing.assert_allclose(again.models.values, plain.models.values, atol=1e-12, rtol=0)
            np.testing.assert_allclose(again.objective, plain.objective, rtol=1e-13)
            np.testing.assert_array_equal(again.iterations, plain.iterations)
    finally:
        vectorised.terminate(ex)


def test_a_solve_past_its_timeout_raises_and_leaves_no_worker_or_thread():
    ent = random_entities(6)
    ex = vectorised.make_executor(2)
    try:
        with pytest.raises(TimeoutError):
            vectorised.solve(ent, Settings(l2=1.0), executor=ex, timeout=0.001, pairs_per_block=200)
    finally:
        procs = list(ex._processes.values())
        vectorised.terminate(ex)
    assert procs and not any(p.is_alive() for p in procs)
    # on threads: the kernel reads the stop flag before each entity, so the pool drains
    big = random_entities(7, n_entities=400)
    with pytest.raises(TimeoutError):
        vectorised.solve(big, Settings(l2=1.0), workers=2, timeout=0.0, pairs_per_block=200)
    assert not [t for t in threading.enumerate() if t.name.startswith("random-effect")]
    stop = np.ones(1, np.int64)
    cut = vectorised.solve_block(big, Settings(l2=1.0), stop=stop)  # stopped before the first entity
    assert (cut.iterations == 0).all() and not cut.converged.any()


def test_stage_with_the_vectorised_solver_writes_the_reference_models(tmp_path, monkeypatch):
    monkeypatch.setattr(stage, "POOL_MIN_ROWS", 0)  # the scipy solve on its process pool, as on big shards
    cfgs = {}
    for name in ("scipy", "vectorised"):
        cfg, wd = make_workdir(tmp_path / name, fixed=False, min_samples=2, shards=2, n_entities=24,
                               parallelism=2)
        cfg = dataclasses.replace(cfg, coordinates=tuple(dataclasses.replace(c, solver=name)
                                                         for c in cfg.coordinates))
        step = plan.Step(0, "per_user")
        write_partition(cfg, wd, step)
        cfgs[name] = (stage.train(cfg, wd, step), storage.read_table(layout.coefficients(wd, 0, "per_user", "per_user")))
    (info_s, coef_s), (info_v, coef_v) = cfgs["scipy"], cfgs["vectorised"]
    assert coef_v.column("model_id").to_pylist() == coef_s.column("model_id").to_pylist()
    ms, mv = stage.models_from_table(coef_s), stage.models_from_table(coef_v)
    np.testing.assert_array_equal(mv.indices, ms.indices)
    np.testing.assert_allclose(mv.intercept, ms.intercept, atol=1e-6, rtol=0)
    np.testing.assert_allclose(mv.values, ms.values, atol=1e-6, rtol=0)
    assert info_v["objective"] == pytest.approx(info_s["objective"], rel=1e-9)
    assert info_v["not_converged"] == 0 and info_v["active_entities"] == info_s["active_entities"]


def test_config_selects_the_solver_and_defaults_to_vectorised(tmp_path):
    from gdmix import config, kinds
    cfg, _ = make_workdir(tmp_path, fixed=False, n_entities=3)
    assert cfg.coordinate("per_user").solver == "vectorised"
    raw = config.to_raw(cfg)
    raw["coordinates"][0]["solver"] = "scipy"
    assert config.parse(raw).coordinate("per_user").solver == "scipy"
    raw["coordinates"][0]["solver"] = "newton"
    with pytest.raises(config.ConfigError, match=r"coordinates\[0\]\.solver"):
        kinds.parse_config(raw)


def test_kernel_hessian_assembly_equals_the_dense_per_entity_sums():
    """The kernel's sparse assembly (repeats summed, unsorted rows) against dense x_i x_iᵀ sums."""
    ent = random_entities(3, n_entities=40)
    rng = np.random.default_rng(7)
    # shuffle the nonzeros inside each row: the kernel must not rely on sorted rows
    f = ent.features
    perm = np.concatenate([a + rng.permutation(b - a) for a, b in zip(f.indptr[:-1], f.indptr[1:])])
    fi, fv, fp = f.indices[perm], f.values[perm], f.indptr
    n_feat = int(fi.max()) + 1
    seen, pos = np.full(n_feat, -1, np.int32), np.empty(n_feat, np.int32)
    checked = 0
    for e in range(ent.n_entities):
        r0, r1 = ent.row_ptr[e], ent.row_ptr[e + 1]
        n = r1 - r0
        cols = np.empty(n_feat, np.int32)
        d = newton._local_columns(e, fi, fp[r0], fp[r1], seen, pos, cols)
        np.testing.assert_array_equal(cols[:d], np.unique(fi[fp[r0]:fp[r1]]))
        el_ptr, el_slot, el_val = np.empty(n + 1, np.int64), np.empty(fp[r1] - fp[r0], np.int64), np.empty(fp[r1] - fp[r0])
        newton._elements(fp[r0:r1 + 1], fi[fp[r0]:fp[r1]], fv[fp[r0]:fp[r1]], pos, el_ptr, el_slot, el_val)
        p = d + 1
        z = np.zeros((n, p))
        z[:, 0] = 1.0
        for i in range(r0, r1):
            for j, v in zip(fi[fp[i]:fp[i + 1]], fv[fp[i]:fp[i + 1]]):
                z[i - r0, 1 + np.searchsorted(cols[:d], j)] += v
        q = expit(rng.normal(size=n))
        w = ent.weight[r0:r1]
        pen = np.full(p, 0.7)
        h = rng.normal(size=(p, p))  # garbage: the kernel zeroes the triangle it fills
        top = newton._hessian(newton.LOGISTIC, n, w, q, el_ptr, el_slot, el_val, pen, p, h)
        dense = z.T @ ((w * q * (1 - q))[:, None] * z) + np.diag(pen)
        np.testing.assert_allclose(np.tril(h), np.tril(dense), rtol=1e-10, atol=1e-12)
        assert top == pytest.approx(max(1.0, dense.diagonal().max()), rel=1e-12)
        checked += int(el_ptr[n] < fp[r1] - fp[r0])  # rows with a repeated feature merged
    assert checked > 0

"""The joint Newton step (docs/design.md §2.5): the step alone against exact mathematics,
block coordinate descent with and without it against the joint optimum (in memory, on
crossed per-user and per-item slopes), and the embedded run that takes it as a step."""
from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pytest
import scipy.optimize as so
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from gdmix import accelerate, config, joint, joint_newton, layout, logistic, plan, schema, sparse, storage
from gdmix.plan import Step


def _lists(ptr, idx, val):
    return sparse.to_arrow_lists(ptr, idx, val, pa.float32())


def crossed_rows(rng, n, n_users, n_items, uid0=0, zipf=1.1):
    """Prepared rows of a crossed GLMix: users with 3 dense features, items with 6 binary
    "genres"; the truth has per-user slopes on the genres and per-item slopes on the user
    features, both entity popularities skewed (a few heavy entities, a tail of light ones)."""
    pu = 1.0 / np.arange(1, n_users + 1) ** zipf
    pi = 1.0 / np.arange(1, n_items + 1) ** zipf
    user = rng.choice(n_users, n, p=pu / pu.sum())
    item = rng.choice(n_items, n, p=pi / pi.sum())
    ufeat = rng.normal(size=(n_users, 3)).astype(np.float32).astype(float)
    genres = (rng.random((n_items, 6)) < 0.3).astype(float)
    genres[:, 0] = 1.0  # every item has one genre: the bags are never empty
    xu, xi = ufeat[user], genres[item]
    truth = (0.2 + xu @ [0.5, -0.3, 0.2] + xi @ rng.normal(0, 0.3, 6)
             + rng.normal(0, 0.8, n_users)[user] + rng.normal(0, 0.8, n_items)[item]
             + np.sum(xi * rng.normal(0, 0.5, (n_users, 6))[user], axis=1)
             + np.sum(xu * rng.normal(0, 0.5, (n_items, 3))[item], axis=1))
    y = (rng.random(n) < 1 / (1 + np.exp(-truth))).astype(float)
    g = np.hstack([xu, xi])  # global: user features 0-2, genres 3-8
    gp = np.arange(0, 9 * n + 1, 9)
    gi = np.tile(np.arange(9), n)
    keep = g.ravel() != 0
    gptr = np.concatenate([[0], np.cumsum(keep.reshape(n, 9).sum(1))])
    g_idx, g_val = _lists(gptr, gi[keep], g.ravel()[keep])
    ikeep = xi.ravel() != 0
    iptr = np.concatenate([[0], np.cumsum(ikeep.reshape(n, 6).sum(1))])
    u_idx, u_val = _lists(iptr, np.tile(np.arange(6), n)[ikeep], xi.ravel()[ikeep])  # per-user bag: genres
    m_idx, m_val = _lists(np.arange(0, 3 * n + 1, 3), np.tile(np.arange(3), n), xu.ravel())  # per-item: user
    del gp
    return pa.table({
        schema.UID: pa.array(np.arange(uid0, uid0 + n), pa.int64()), schema.LABEL: pa.array(y),
        schema.WEIGHT: pa.array(np.ones(n)), schema.OFFSET: pa.array(np.zeros(n)),
        "user": pa.array([f"u{u}" for u in user]), "item": pa.array(item.astype(np.int64)),
        "g_indices": g_idx, "g_values": g_val, "u_indices": u_idx, "u_values": u_val,
        "m_indices": m_idx, "m_values": m_val})


def crossed_workdir(tmp_path, *, n=3000, n_users=120, n_items=60, re_l2=(2.0, 3.0), min_samples=3,
                    iterations=3, acceleration="newton", seed=0):
    wd = str(tmp_path / "wd")
    cfg = config.parse({
        "name": "crossed", "workdir": wd, "iterations": iterations, "acceleration": acceleration,
        "data": {"train": "unused", "feature_bags": {
            "g": {"columns": [f"g{j}" for j in range(9)]}, "u": {"columns": [f"genre{j}" for j in range(6)]},
            "m": {"columns": [f"user{j}" for j in range(3)]}}},
        "coordinates": [
            {"name": "global", "type": "fixed_effect", "feature_bag": "g", "l2": 1.0},
            {"name": "per-user", "type": "random_effect", "entity": "user", "feature_bag": "u",
             "l2": re_l2[0], "min_samples": min_samples},
            {"name": "per-item", "type": "random_effect", "entity": "item", "feature_bag": "m",
             "l2": re_l2[1], "min_samples": min_samples}]})
    rng = np.random.default_rng(seed)
    config.snapshot(cfg)
    storage.write_table(storage.join(layout.prepared(wd, "train"), "part-0.parquet"),
                        crossed_rows(rng, n, n_users, n_items))
    storage.write_table(storage.join(layout.prepared(wd, "validation"), "part-0.parquet"),
                        crossed_rows(rng, n // 4, n_users, n_items, uid0=10 * n))
    for bag, k in (("g", 9), ("u", 6), ("m", 3)):
        storage.write_table(layout.feature_index(wd, bag), pa.table(
            {"index": pa.array(np.arange(k), pa.int32()), "name": [f"{bag}{j}" for j in range(k)],
             "term": [""] * k}, schema=schema.FEATURE_INDEX))
    return cfg, wd


def _problem(cfg, wd):
    rows = storage.read_table(layout.prepared(wd, "train"))
    blocks = joint._blocks(cfg, wd, rows)
    return joint.problem(rows, blocks), blocks


def block_solve(prob, theta, b, tol=1e-10):
    """Coordinate b minimised exactly with the others fixed (what a coordinate's step does):
    Newton on its block, each step's length by the exact line search."""
    lo, hi = prob.starts[b], prob.starts[b + 1]
    for _ in range(50):
        s = prob.scores(theta)
        g = prob.gradient(theta, s)[lo:hi]
        if np.max(np.abs(g)) <= tol * max(1.0, prob.w.sum()):
            break
        x = prob.blocks[b]
        h = (x.T @ sp.diags(logistic.curvature(s, prob.w)) @ x + sp.diags(prob.penalty[b])).tocsc()
        d = np.zeros(len(theta))
        d[lo:hi] = spla.spsolve(h, -g)
        theta = joint_newton.step(prob, theta, direction=d).theta
    return theta


def descent(prob, passes, accelerate_each_pass):
    theta, values = np.zeros(prob.starts[-1]), []
    for _ in range(passes):
        for b in range(len(prob.blocks)):
            theta = block_solve(prob, theta, b)
            values.append(prob.value(theta))
        if accelerate_each_pass:
            theta = joint_newton.step(prob, theta).theta
            values.append(prob.value(theta))
    return np.array(values)


# --- the step alone ----------------------------------------------------------------------

def test_the_pcg_direction_is_the_newton_direction_and_the_line_search_is_exact(tmp_path):
    cfg, wd = crossed_workdir(tmp_path, n=1500, n_users=60, n_items=30)
    prob, _ = _problem(cfg, wd)
    rng = np.random.default_rng(1)
    theta = rng.normal(0, 0.3, prob.starts[-1])
    s = prob.scores(theta)
    g = prob.gradient(theta, s)
    curv = logistic.curvature(s, prob.w)
    x = sp.hstack(prob.blocks, format="csr")
    h = (x.T @ sp.diags(curv) @ x + sp.diags(prob.pen)).tocsc()
    exact = spla.spsolve(h, -g)
    d, its, res = joint_newton.pcg(lambda v: prob.apply_t(curv * prob.apply(v)) + prob.pen * v, g,
                                   joint_newton.BlockJacobi(prob, curv))
    assert res <= joint_newton.RTOL and its < joint_newton.MAX_CG
    np.testing.assert_allclose(d, exact, rtol=0, atol=1e-7 * np.max(np.abs(exact)))
    # the line search: the minimiser of φ(t) = F(θ + t d), against scipy's bounded search
    t = joint_newton.line_search(prob, theta, s, d, prob.apply(d))
    ref = so.minimize_scalar(lambda a: prob.value(theta + a * d), bounds=(0, 4), method="bounded",
                             options={"xatol": 1e-10})
    assert t == pytest.approx(ref.x, abs=1e-6)
    assert prob.value(theta + t * d) <= ref.fun + 1e-9


@pytest.mark.parametrize("dense_max", [joint_newton.DENSE_MAX, 3])
def test_the_preconditioner_is_the_inverse_of_each_coordinates_own_hessian(tmp_path, monkeypatch, dense_max):
    """M⁻¹r by per-entity dense inverses (and sparse LU for components over ``DENSE_MAX``
    columns) equals a sparse solve with blockdiag(H_bb)."""
    monkeypatch.setattr(joint_newton, "DENSE_MAX", dense_max)
    cfg, wd = crossed_workdir(tmp_path, n=1500, n_users=60, n_items=30)
    prob, blocks = _problem(cfg, wd)
    rng = np.random.default_rng(4)
    curv = logistic.curvature(prob.scores(rng.normal(0, 0.3, prob.starts[-1])), prob.w)
    m = joint_newton.BlockJacobi(prob, curv)
    if dense_max == 3:
        assert all(solve.sparse for solve in m.solves)  # entities of 4+ columns, the fixed effect's 10
    else:
        assert not any(solve.sparse for solve in m.solves)
    for solve, b in zip(m.solves[1:], blocks[1:]):  # one component per entity with a model
        assert sum(len(cols) for cols, _ in solve.dense) + len(solve.sparse) == len(b.entity_ids) > 20
    h = sp.block_diag([x.T @ sp.diags(curv) @ x + sp.diags(p) for x, p in zip(prob.blocks, prob.penalty)],
                      format="csc")
    r = rng.normal(size=prob.starts[-1])
    np.testing.assert_allclose(m(r), spla.spsolve(h, r), rtol=1e-8, atol=1e-10)


def test_the_step_lowers_f_and_a_bad_direction_is_refused(tmp_path):
    cfg, wd = crossed_workdir(tmp_path, n=1500, n_users=60, n_items=30)
    prob, _ = _problem(cfg, wd)
    theta = np.random.default_rng(2).normal(0, 0.3, prob.starts[-1])
    res = joint_newton.step(prob, theta)
    assert res.objective_after < res.objective_before
    assert res.objective_after == pytest.approx(prob.value(res.theta), rel=1e-14)
    assert res.step_length > 0 and res.cg_iterations > 0
    # a damped Newton step from a random point: the gradient falls (quadratically only near the optimum)
    g1 = prob.gradient(res.theta, prob.scores(res.theta))
    assert np.max(np.abs(g1)) < 0.5 * res.gradient_norm
    # an ascent direction (+∇F): no t > 0 lowers F, so θ is kept as it was
    up = prob.gradient(theta, prob.scores(theta))
    bad = joint_newton.step(prob, theta, direction=up)
    assert bad.step_length == 0.0 and np.array_equal(bad.theta, theta)
    assert bad.objective_after == bad.objective_before
    # a direction that overshoots (100 × Newton's): the line search shortens it, F still falls
    far = joint_newton.step(prob, theta, direction=100 * (res.theta - theta) / res.step_length)
    assert 0 < far.step_length < 0.05 and far.objective_after < far.objective_before


def test_newtons_method_from_zero_is_the_joint_optimum(tmp_path):
    """``minimise`` (the reference optimum for problems too large for a direct solve): the
    direct solve's objective to 1e-12, F falling at every step, quadratically at the end."""
    cfg, wd = crossed_workdir(tmp_path, n=1500, n_users=60, n_items=30)
    best = joint.joint_optimum(cfg, wd).objective
    prob, _ = _problem(cfg, wd)
    theta, history = joint_newton.minimise(prob, np.zeros(prob.starts[-1]), gtol=1e-9)
    assert prob.value(theta) == pytest.approx(best, rel=1e-12)
    assert len(history) <= 12 and history[-1].gradient_norm <= 1e-9
    assert all(h.objective_after < h.objective_before for h in history[:-1])
    grads = [h.gradient_norm for h in history]
    assert grads[-1] < 1e-3 * grads[-2] ** 1.5  # quadratic convergence, not a constant factor


# --- block coordinate descent with and without the step ----------------------------------

@pytest.mark.parametrize("case", [
    # small crossed problem: light penalties, passive entities (min_samples 3)
    dict(n=3000, n_users=120, n_items=60, re_l2=(2.0, 3.0), min_samples=3),
    # MovieLens-like: heavier entities (about 80 rows per user, 160 per item) and l2 = 10
    dict(n=8000, n_users=100, n_items=50, re_l2=(10.0, 10.0), min_samples=1),
], ids=["crossed", "movielens-like"])
def test_three_passes_with_the_step_reach_the_joint_optimum(tmp_path, case):
    cfg, wd = crossed_workdir(tmp_path, **case)
    best = joint.joint_optimum(cfg, wd).objective
    prob, _ = _problem(cfg, wd)
    with_step = descent(prob, 3, True)
    plain = descent(prob, 3, False)
    gap, gap_plain = (with_step[-1] - best) / abs(best), (plain[-1] - best) / abs(best)
    print(f"relative gap after 3 passes: {gap:.2e} with the joint step, {gap_plain:.2e} without")
    assert np.all(np.diff(with_step) <= 1e-12 * np.abs(with_step[1:]))  # F never rises
    assert -1e-12 <= gap <= 1e-6
    assert gap_plain > 1e-5 and gap_plain > 1000 * max(gap, 1e-12)


# --- the step in a run -------------------------------------------------------------------

def test_the_plan_places_the_step_after_each_pass_and_it_writes_the_convex_coordinates(tmp_path):
    cfg, _ = crossed_workdir(tmp_path, iterations=2)
    seq = plan.sequence(cfg)
    assert [str(s) for s in seq] == ["iter-0/global", "iter-0/per-user", "iter-0/per-item", "iter-0/_joint",
                                     "iter-1/global", "iter-1/per-user", "iter-1/per-item", "iter-1/_joint"]
    assert plan.steps(cfg) == [s for s in seq if not plan.is_joint(s)]
    assert plan.writes(cfg, Step(0, "_joint")) == ("global", "per-user", "per-item")
    assert plan.latest(cfg, "per-user", Step(1, "per-user")) == Step(0, "_joint")
    assert plan.previous(cfg, Step(1, "global")) == Step(0, "_joint")
    assert plan.state(cfg, None) == {c: Step(1, "_joint") for c in ("global", "per-user", "per-item")}
    off = dataclasses.replace(cfg, acceleration="none")
    assert plan.sequence(off) == plan.steps(off) and plan.accelerated(off) == ()
    held = dataclasses.replace(cfg, coordinates=(cfg.coordinates[0], dataclasses.replace(
        cfg.coordinates[1], max_samples=50), cfg.coordinates[2]))
    assert plan.accelerated(held) == ("global", "per-item")  # a sampled coordinate is held fixed
    with pytest.raises(config.ConfigError, match="acceleration: must be one of"):
        config.parse({**config.to_raw(cfg), "acceleration": "anderson"})
    raw = config.to_raw(cfg)
    raw["coordinates"][1]["name"] = "_joint"
    with pytest.raises(config.ConfigError, match=r"coordinates\[1\]\.name: '_joint' is reserved"):
        config.parse(raw)


def test_the_step_reads_and_writes_the_work_directory(tmp_path):
    """One pass trained in memory and written as the steps write it; the joint step then
    reads it back, takes the step and writes coefficients and scores that reproduce F."""
    cfg, wd = crossed_workdir(tmp_path, iterations=1)
    prob, blocks = _problem(cfg, wd)
    theta = np.zeros(prob.starts[-1])
    for b in range(3):
        theta = block_solve(prob, theta, b)
    train = storage.read_table(layout.prepared(wd, "train"))
    val = storage.read_table(layout.prepared(wd, "validation"))
    state = plan.state(cfg, Step(0, "_joint"))  # the fixed effect's latest: the last shift
    for b, part in zip(blocks, prob.parts(theta)):
        name, at = b.coordinate.name, state[b.coordinate.name]
        storage.write_table(storage.join(layout.coefficients(wd, 0, at.coordinate, name), "p.parquet"),
                            joint.table_of(b, part))
        for split, rows, x in (("train", train, b.x), ("validation", val, joint.design(b, val))):
            storage.write_table(storage.join(layout.scores(wd, 0, at.coordinate, name, split), "p.parquet"),
                                pa.table({"uid": rows.column("uid"), "score": pa.array(x @ part)},
                                         schema=schema.SCORES))
    info = accelerate.run(cfg, wd, Step(0, "_joint"))
    assert info["objective_before"] == pytest.approx(prob.value(theta), rel=1e-13)
    assert info["objective"] < info["objective_before"] and info["step_length"] > 0
    # what it wrote is the new point: F from the files, and scores = the design times the models
    tables = {c: storage.read_table(layout.coefficients(wd, 0, "_joint", c)) for c in info["coordinates"]}
    after = np.concatenate([joint.theta_of(b, tables[b.coordinate.name], "t") for b in blocks])
    assert prob.value(after) == pytest.approx(info["objective"], rel=1e-13)
    assert joint.objective(cfg, wd, joint.coefficients_from_tables(cfg, wd, tables)) == pytest.approx(
        info["objective"], rel=1e-12)
    for b, part in zip(blocks, prob.parts(after)):
        got = storage.read_table(layout.scores(wd, 0, "_joint", b.coordinate.name, "validation"))
        np.testing.assert_allclose(got.column("score").to_numpy(), joint.design(b, val) @ part, atol=1e-12)
    # a missing score row is an error naming the file
    held = dataclasses.replace(cfg, coordinates=(cfg.coordinates[0], dataclasses.replace(
        cfg.coordinates[1], max_samples=10_000), cfg.coordinates[2]))
    url = layout.scores(wd, 0, "per-user", "per-user", "train")
    storage.write_table(storage.join(url, "p.parquet"), storage.read_table(url).slice(1))
    with pytest.raises(ValueError, match=r"per-user/scores/per-user/train: 2999 scores for 3000 train rows; none for uid 0"):
        accelerate.run(held, wd, Step(0, "_joint"))


@pytest.mark.slow
def test_an_embedded_run_with_the_step_reaches_the_joint_optimum_in_three_passes(tmp_path_factory, spark):
    from gdmix import driver, stages
    from gdmix.data import synthetic
    from test_end_to_end import synthetic_config

    root = tmp_path_factory.mktemp("accel")
    synthetic.generate(str(root / "data"), n_rows=3000, n_users=80, n_items=30, seed=3)
    cfg = synthetic_config(root / "data", root / "work", iterations=3, acceleration="newton")
    driver.run(cfg, spark=spark)
    recs = storage.read_json(layout.objective(cfg.workdir))
    assert [(r["iteration"], r["coordinate"]) for r in recs] == [(s.iteration, s.coordinate)
                                                                 for s in plan.sequence(cfg)]
    values = np.array([r["objective"] for r in recs])
    assert np.all(np.diff(values) <= 1e-9 * np.abs(values[1:])), values
    best = joint.joint_optimum(cfg, cfg.workdir).objective
    gap = (values[-1] - best) / abs(best)
    print(f"relative gap after 3 passes with the joint step: {gap:.2e}")
    assert -1e-9 <= gap <= 1e-6
    # the exported models are the last joint step's
    info = stages.step_done(cfg.workdir, Step(2, "_joint"), "train")
    assert info["coordinates"] == ["global", "per-user", "per-item"]
    # a rerun of the finished run skips every stage, the joint steps included
    assert stages.resume_point(cfg, cfg.workdir)[1] is None


def test_reruns_skip_the_done_joint_step_and_redo_it_after_its_inputs_change(tmp_path):
    from gdmix import driver, stages

    cfg, wd = crossed_workdir(tmp_path, iterations=2)
    storage.mark_done(layout.prepared_root(wd), "prepare", {"rows": 1})
    stages._stamp(layout.prepared_root(wd), "prepare", stages.input_fingerprints(cfg))
    for stage, step in stages.run_order(cfg)[1:]:
        inputs = stages.upstream(cfg, wd, step, stage)
        storage.mark_done(layout.step_dir(wd, step.iteration, step.coordinate), stage, {"seconds": 1})
        stages._stamp(layout.step_dir(wd, step.iteration, step.coordinate), stage, inputs)
    order = stages.run_order(cfg)
    assert [(st, str(s)) for st, s in order[9:13]] == [
        ("metrics", "iter-0/per-item"), ("train", "iter-0/_joint"), ("metrics", "iter-0/_joint"),
        ("partition", "iter-1/global")]
    assert stages.resume_point(cfg, wd) == (len(order), None, None)  # all done: nothing to redo
    # the last coordinate trained again: the joint step reads it, so it is redone
    last = layout.step_dir(wd, 0, "per-item")
    inputs = stages.upstream(cfg, wd, Step(0, "per-item"), "train")
    storage.mark_done(last, "train", {"seconds": 2})
    stages._stamp(last, "train", inputs)
    assert stages.resume_point(cfg, wd) == (9, "iter-0/per-item metrics", "iter-0/per-item train ran again")
    stages._stamp(layout.step_dir(wd, 0, "per-item"), "metrics", stages.upstream(cfg, wd, Step(0, "per-item"),
                                                                                  "metrics"))
    assert stages.resume_point(cfg, wd) == (10, "iter-0/_joint train", "iter-0/per-item train ran again")
    # the joint step redone: the next pass's first partition reads its marker
    joint_dir = layout.step_dir(wd, 0, "_joint")
    inputs = stages.upstream(cfg, wd, Step(0, "_joint"), "train")
    storage.mark_done(joint_dir, "train", {"seconds": 3})
    stages._stamp(joint_dir, "train", inputs)
    stages._stamp(joint_dir, "metrics", stages.upstream(cfg, wd, Step(0, "_joint"), "metrics"))
    assert stages.resume_point(cfg, wd) == (12, "iter-1/global partition", "iter-0/_joint train ran again")
    # a changed acceleration setting is a changed config: the driver starts over
    assert driver._same_config(cfg, wd)
    assert not driver._same_config(dataclasses.replace(cfg, acceleration="none"), wd)

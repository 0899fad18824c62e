"""The joint-optimum reference: a real trust-region Newton solve on hand-built prepared rows.

``make_workdir`` (also used by test_random_effect.py and test_shift.py) writes a small
GLMix problem by hand: a config snapshot, feature indexes and prepared Parquet rows.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from gdmix import config, joint, layout, schema, sparse, storage

NAMES = ("a", "b", "c")
# The per-user bag reads the same columns but indexes them in another order, so code that
# moves mass between the bags must match features by (name, term), not by index.
U_ORDER = ("c", "a", "b")


def _lists(per_row_idx, per_row_val, value_type=pa.float32()):
    ptr = np.concatenate([[0], np.cumsum([len(i) for i in per_row_idx])])
    idx = np.concatenate(per_row_idx).astype(np.int32) if per_row_idx else np.zeros(0, np.int32)
    val = np.concatenate(per_row_val) if per_row_val else np.zeros(0)
    return sparse.to_arrow_lists(ptr, idx, val, value_type)


def _rows(rng, counts, ent_icp, ent_slope, uid0, int_ids, unseen=0):
    """Prepared rows: features a, b always, c half the time; labels from a true GLMix."""
    beta = np.array([0.8, -0.5, 0.4])
    ent = np.repeat(np.arange(len(counts)), counts)
    if unseen:
        ent = np.concatenate([ent, np.full(unseen, len(counts))])
        ent_icp = np.append(ent_icp, 0.0)
        ent_slope = np.vstack([ent_slope, np.zeros(3)])
    n = len(ent)
    x = rng.normal(size=(n, 3)).astype(np.float32).astype(np.float64)
    has_c = rng.random(n) < 0.5
    x[~has_c, 2] = 0.0
    offset = rng.normal(0, 0.2, n)
    s = offset + 0.3 + x @ beta + ent_icp[ent] + np.sum(x * ent_slope[ent], axis=1)
    y = (rng.random(n) < 1 / (1 + np.exp(-s))).astype(float)
    w = rng.uniform(0.5, 1.5, n)
    g_idx, g_val, u_idx, u_val = [], [], [], []
    for i in range(n):
        feats = [0, 1, 2] if has_c[i] else [0, 1]
        g_idx.append(np.array(feats))
        g_val.append(x[i, feats])
        u = sorted((U_ORDER.index(NAMES[f]), x[i, f]) for f in feats)
        u_idx.append(np.array([a for a, _ in u]))
        u_val.append(np.array([b for _, b in u]))
    gi, gv = _lists(g_idx, g_val)
    ui, uv = _lists(u_idx, u_val)
    users = pa.array(ent.astype(np.int64)) if int_ids else pa.array([f"u{e:03d}" for e in ent])
    return pa.table({
        schema.UID: pa.array(np.arange(uid0, uid0 + n), pa.int64()),
        schema.LABEL: pa.array(y), schema.WEIGHT: pa.array(w), schema.OFFSET: pa.array(offset),
        "user": users,
        "g_indices": gi, "g_values": gv, "u_indices": ui, "u_values": uv,
    })


def make_config(workdir, *, fixed=True, fe_l2=1.0, re_l2=1.0, min_samples=1, regularize_intercept=True,
                shards=1, parallelism=1, iterations=1, tolerance=1e-10, max_iterations=1000):
    coords = []
    if fixed:
        coords.append({"name": "global", "type": "fixed_effect", "feature_bag": "g", "l2": fe_l2})
    coords.append({"name": "per_user", "type": "random_effect", "feature_bag": "u", "entity": "user",
                   "l2": re_l2, "min_samples": min_samples, "regularize_intercept": regularize_intercept,
                   "shards": shards, "tolerance": tolerance, "max_iterations": max_iterations})
    return config.parse({
        "name": "t", "workdir": str(workdir),
        "data": {"train": "unused", "feature_bags": {"g": {"columns": list(NAMES)}, "u": {"columns": list(NAMES)}}},
        "iterations": iterations, "coordinates": coords, "parallelism": parallelism,
    })


def make_workdir(tmp_path, *, n_entities=30, max_rows=30, seed=0, int_ids=False, icp_mean=1.0, **cfg_kw):
    """A work directory with a config snapshot, feature indexes and prepared rows."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, max_rows + 1, n_entities)
    counts[:3] = [1, 2, 3]  # tiny entities: passive under min_samples=3, one-row, ...
    icp = rng.normal(icp_mean, 0.7, n_entities)
    slope = rng.normal(0, 0.4, (n_entities, 3))
    wd = str(tmp_path / "wd")
    cfg = make_config(wd, **cfg_kw)
    config.snapshot(cfg)
    storage.write_table(storage.join(layout.prepared(wd, "train"), "part-0.parquet"),
                   _rows(rng, counts, icp, slope, 0, int_ids))
    storage.write_table(storage.join(layout.prepared(wd, "validation"), "part-0.parquet"),
                   _rows(rng, np.maximum(counts // 4, 1), icp, slope, 100_000, int_ids, unseen=5))
    for bag, names in (("g", NAMES), ("u", U_ORDER)):
        storage.write_table(layout.feature_index(wd, bag), pa.table(
            {"index": pa.array(np.arange(3), pa.int32()), "name": list(names), "term": [""] * 3},
            schema=schema.FEATURE_INDEX))
    return cfg, wd


def _perturbed(coefs, rng, h):
    out = {}
    for name, m in coefs.items():
        if isinstance(m, joint.FixedModel):
            out[name] = joint.FixedModel(m.intercept + h * rng.normal(), m.coefficients + h * rng.normal(size=len(m.coefficients)))
        else:
            out[name] = {e: joint.EntityModel(em.intercept + h * rng.normal(),
                                                  {j: v + h * rng.normal() for j, v in em.coefficients.items()})
                         for e, em in m.items()}
    return out


def test_joint_optimum_is_stationary_and_matches_objective(tmp_path):
    cfg, wd = make_workdir(tmp_path, min_samples=3)
    sol = joint.joint_optimum(cfg, wd)
    rows = storage.read_table(layout.prepared(wd, "train"))
    assert sol.gradient_norm <= 1e-12 * float(np.sum(rows.column("weight").to_numpy()))
    assert sol.objective == pytest.approx(joint.objective(cfg, wd, sol.coefficients), rel=1e-13)
    # passive entities (1 and 2 rows) have no model; active ones have an intercept + their features
    users = sol.coefficients["per_user"]
    assert "u000" not in users and "u001" not in users and "u002" in users
    ids, counts = np.unique(rows.column("user").to_numpy(zero_copy_only=False), return_counts=True)
    assert set(users) == set(ids[counts >= 3]) and len(users) < len(ids)
    assert set(users["u002"].coefficients) <= {0, 1, 2}
    # stationary: random perturbations only increase F, symmetric differences vanish
    rng = np.random.default_rng(1)
    for _ in range(3):
        seed = int(rng.integers(1 << 30))
        up, down = (joint.objective(cfg, wd, _perturbed(sol.coefficients, np.random.default_rng(seed), h))
                    for h in (1e-5, -1e-5))
        assert up > sol.objective and down > sol.objective
        assert abs(up - down) / 2e-5 < 1e-6  # the directional derivative


def test_objective_of_no_model_is_the_offset_loss(tmp_path):
    cfg, wd = make_workdir(tmp_path)
    rows = storage.read_table(layout.prepared(wd, "train"))
    y, w, o = (rows.column(c).to_numpy() for c in ("label", "weight", "offset"))
    expected = float(w @ (np.logaddexp(0, o) - y * o))
    assert joint.objective(cfg, wd, {}) == pytest.approx(expected, rel=1e-14)


def test_unpenalised_fixed_intercept_is_stationary_with_int_ids(tmp_path):
    # Integer entity ids are read as strings; the optimum is flat in every intercept.
    cfg, wd = make_workdir(tmp_path, int_ids=True, n_entities=10)
    sol = joint.joint_optimum(cfg, wd)
    assert set(sol.coefficients["per_user"]) == {str(i) for i in range(10)}
    fe = sol.coefficients["global"]
    h = 1e-4

    def at(delta):
        return joint.objective(cfg, wd, dict(sol.coefficients, **{
            "global": joint.FixedModel(fe.intercept + delta, fe.coefficients)}))

    assert abs(at(h) - at(-h)) / (2 * h) < 1e-6
    assert at(h) > sol.objective and at(10 * h) > at(h)


def test_coefficient_tables_round_trip(tmp_path):
    cfg, wd = make_workdir(tmp_path, n_entities=8)
    sol = joint.joint_optimum(cfg, wd)
    fe = sol.coefficients["global"]
    users = sol.coefficients["per_user"]
    ids = sorted(users)
    fi, fv = _lists([np.arange(3)], [fe.coefficients], pa.float64())
    ri, rv = _lists([np.array(sorted(users[e].coefficients)) for e in ids],
                    [np.array([users[e].coefficients[j] for j in sorted(users[e].coefficients)]) for e in ids],
                    pa.float64())
    tables = {
        "global": pa.Table.from_arrays([pa.array(["global"]), pa.array([fe.intercept]), fi, fv], schema=schema.COEFFICIENTS),
        "per_user": pa.Table.from_arrays([pa.array(ids), pa.array([users[e].intercept for e in ids]), ri, rv],
                                         schema=schema.COEFFICIENTS),
    }
    back = joint.coefficients_from_tables(cfg, wd, tables)
    assert joint.objective(cfg, wd, back) == pytest.approx(sol.objective, rel=1e-14)

"""Per-cohort random effects: the block-diagonal data-parallel problem (solver: data_parallel)
gives the same per-entity models as the per-entity solver."""
import numpy as np
import pytest
import scipy.sparse as sp

from gdmix import config, driver, kinds, layout, plan, schema, storage
from gdmix.data import synthetic
from gdmix.random_effect import cohort
from helpers import make_config


def test_auto_rule():
    c = make_config("/tmp/unused").coordinate("per-user")
    auto = c.__class__(**{**c.__dict__, "solver": "auto"})
    assert kinds.resolve_auto(auto, 21, 80_000).name == "per_cohort"
    assert kinds.resolve_auto(auto, 21, 20_000).name == "per_entity"  # < 1000 rows per entity
    assert kinds.resolve_auto(auto, 65, 10_000_000).name == "per_entity"  # too many entities
    assert kinds.resolve_auto(c, 2, 10_000_000).name == "per_entity"  # an explicit solver is kept
    assert kinds.of(auto).name == "per_entity"  # planned (and compiled) as per-entity shards


def test_block_design_scores_each_entity_with_its_own_block():
    rng = np.random.default_rng(0)
    d, n_ent = 3, 4
    x = sp.random(10, d, density=0.6, format="csr", random_state=1)
    pos = rng.integers(0, n_ent, 10)
    ptr, cols, vals = cohort.block_columns(x.indptr.astype(np.int64), x.indices, x.data, pos, d)
    blocks = rng.normal(size=(n_ent, d + 1))
    got = sp.csr_matrix((vals, cols, ptr), shape=(10, n_ent * (d + 1))) @ blocks.ravel()
    want = blocks[pos, 0] + np.einsum("ij,ij->i", x.toarray(), blocks[pos, 1:])
    np.testing.assert_allclose(got, want)
    assert all(np.all(np.diff(cols[ptr[i]:ptr[i + 1]]) > 0) for i in range(10))  # ascending per row
    pen = cohort.penalty_vector(n_ent, d, 2.0, regularize_intercept=False)
    assert pen[0] == 0 and list(pen[1:d + 2]) == [0.0, 2.0, 2.0, 2.0] and len(pen) == 1 + n_ent * (d + 1)


def _config(data_dir, workdir, solver, item_solver=None):
    return config.parse({
        "name": "cohort", "workdir": str(workdir), "iterations": 1,
        "acceleration": "none",  # the solvers' own models compared, not the joint step's
        "data": {"train": str(data_dir / "train"), "validation_fraction": 0.25,
                 "feature_bags": {"u": {"ntv": "user_features"}, "i": {"ntv": "item_features"}}},
        "coordinates": [
            {"name": "per-user", "type": "random_effect", "entity": "user_id", "feature_bag": "u",
             "l2": 2.0, "regularize_intercept": False, "solver": solver, "shards": 2},
            {"name": "per-item", "type": "random_effect", "entity": "item_id", "feature_bag": "i",
             "l2": 3.0, "solver": item_solver or solver, "shards": 2, "min_samples": 30},
        ],
    })


def _models(cfg, coordinate):
    s = plan.latest(cfg, coordinate, None)
    t = storage.read_table(layout.coefficients(cfg.workdir, s.iteration, s.coordinate, coordinate))
    return {m: (b, i, v) for m, b, i, v in zip(*(t.column(c).to_pylist() for c in
                                                 (schema.MODEL_ID, schema.INTERCEPT, schema.INDICES, schema.VALUES)))}


@pytest.mark.slow
def test_cohort_solver_equals_the_per_entity_solver(tmp_path, spark):
    synthetic.generate(str(tmp_path / "data"), n_rows=1200, n_users=5, n_items=6, seed=7, offset=True)
    ref = _config(tmp_path / "data", tmp_path / "ref", "vectorised")
    # per-item: auto resolves to vectorised here (200 rows per item < 1000): one TF launch only
    dp = _config(tmp_path / "data", tmp_path / "dp", "data_parallel", item_solver="auto")
    ref_records, dp_records = driver.run(ref, spark=spark), driver.run(dp, spark=spark)
    for coord in ("per-user", "per-item"):
        a, b = _models(ref, coord), _models(dp, coord)
        assert a.keys() == b.keys() and len(a) >= 3
        for m in a:
            assert a[m][1] == b[m][1], (coord, m)  # the same stored features
            assert abs(a[m][0] - b[m][0]) < 1e-6, (coord, m)
            np.testing.assert_allclose(a[m][2], b[m][2], atol=1e-6)
    done = storage.done_info(layout.step_dir(dp.workdir, 0, "per-user"), "train")
    assert done["solver"] == "data_parallel" and done["workers"] == 2 and done["converged"]
    assert done["active_entities"] == 5
    assert storage.done_info(layout.step_dir(dp.workdir, 0, "per-item"), "partition")["kind"] == "per_entity"
    assert dp_records[-1]["auc"] == pytest.approx(ref_records[-1]["auc"], abs=1e-6)

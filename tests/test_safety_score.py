"""``gdmix score`` checks its rows as prepare does and writes probability and per-coordinate
columns (issue 17 case 3). Models are written by hand; real Spark scores them."""
from __future__ import annotations

import math
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gdmix import cli, layout, ntv, schema, storage
from gdmix.checks import InputError
from gdmix.models import score
from helpers import make_config

B, A, B_COEF = 0.5, 2.0, -1.0  # fixed effect: intercept, coefficient of a and of b
USER_MODELS = {"1": (0.25, 3.0), "2": (-0.5, 1.0)}  # per-user: intercept, coefficient of b


def _model(rows):
    return pa.table({
        "model_id": [m for m, _ in rows],
        "means": [[{"name": n, "term": "", "value": v} for n, v in feats] for _, feats in rows],
        "variances": [None] * len(rows)}, schema=schema.MODEL)


@pytest.fixture
def trained(tmp_path):
    wd = str(tmp_path / "wd")
    cfg = make_config(wd)
    ntv.write_model(layout.model(wd, "global"), _model([("global", [("(INTERCEPT)", B), ("a", A), ("b", B_COEF)])]))
    ntv.write_model(layout.model(wd, "per-user"), _model(
        [(e, [("(INTERCEPT)", b), ("b", c)]) for e, (b, c) in USER_MODELS.items()]))
    return cfg, wd


def _data(path, uid=(1, 2, 3), a=(1.0, 0.0, -1.0), b=(0.5, 1.0, None), user=(1, 2, 7), drop=()):
    cols = {"uid": pa.array(uid, pa.int64()), "a": pa.array(a, pa.float64()), "b": pa.array(b, pa.float64()),
            "user_id": pa.array(user, pa.int64())}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.table({k: v for k, v in cols.items() if k not in drop}), path)
    return path


def test_scores_probability_and_unseen(spark, trained, tmp_path):
    cfg, wd = trained
    data = _data(str(tmp_path / "in/part-0.parquet"))
    out = str(tmp_path / "scored")
    assert score(cfg, wd, data, out, spark)["rows"] == 3
    t = storage.read_table(out).sort_by("uid")
    assert t.column_names == ["uid", "score", "probability", "global_score", "per_user_score", "per_user_unseen"]
    fe = [B + A * 1.0 + B_COEF * 0.5, B + B_COEF * 1.0, B - A]
    re = [0.25 + 3.0 * 0.5, -0.5 + 1.0, 0.0]  # user 7 has no model: 0
    assert t.column("global_score").to_pylist() == pytest.approx(fe, abs=1e-12)
    assert t.column("per_user_score").to_pylist() == pytest.approx(re, abs=1e-12)
    s = [f + r for f, r in zip(fe, re)]
    assert t.column("score").to_pylist() == pytest.approx(s, abs=1e-12)
    assert t.column("probability").to_pylist() == pytest.approx([1 / (1 + math.exp(-v)) for v in s], abs=1e-12)
    assert t.column("per_user_unseen").to_pylist() == [False, False, True]


@pytest.mark.parametrize("case, kwargs, message", [
    ("missing feature", {"drop": ("b",)}, r"column 'b' is missing \(columns present: uid, a, user_id\)"),
    ("missing entity", {"drop": ("user_id",)}, r"column 'user_id' is missing"),
    ("missing uid", {"drop": ("uid",)}, r"column 'uid' is missing"),
    ("NaN feature", {"a": (1.0, float("nan"), 0.0)}, r"row 1 \(uid 2\): column 'a': feature value is NaN"),
    ("infinite feature", {"b": (float("inf"), 0.0, 0.0)}, r"row 0 \(uid 1\): column 'b': feature value is NaN"),
    ("null uid", {"uid": (1, None, 3)}, r"row 1: column 'uid': uid is null"),
    ("duplicate uid", {"uid": (1, 1, 3)}, r"column 'uid': duplicate uid 1: .* row 0 and .* row 1"),
])
def test_bad_rows_are_named(spark, trained, tmp_path, case, kwargs, message):
    cfg, wd = trained
    data = _data(str(tmp_path / "in/part-0.parquet"), **kwargs)
    with pytest.raises(InputError, match=message):
        score(cfg, wd, data, str(tmp_path / "scored"), spark)
    assert not storage.exists(str(tmp_path / "scored"))


def test_schema_drift_across_scoring_files(spark, trained, tmp_path):
    cfg, wd = trained
    _data(str(tmp_path / "in/part-0.parquet"))
    bad = _data(str(tmp_path / "in/part-1.parquet"), uid=(4, 5, 6), drop=("b",))
    with pytest.raises(InputError, match=rf"^{bad}: column 'b' is missing"):
        score(cfg, wd, str(tmp_path / "in"), str(tmp_path / "scored"), spark)


def test_cli_says_bad_input_in_one_line(trained, tmp_path, capsys):
    cfg, wd = trained
    cfg_path = tmp_path / "c.yaml"
    import yaml

    from gdmix import config
    cfg_path.write_text(yaml.safe_dump(config.to_raw(cfg)))
    data = _data(str(tmp_path / "in/part-0.parquet"), drop=("a",))
    rc = cli.main(["score", str(cfg_path), "--data", data, "--out", str(tmp_path / "o"), "--workdir", wd])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("gdmix: bad input: ") and "column 'a' is missing" in err and "Traceback" not in err

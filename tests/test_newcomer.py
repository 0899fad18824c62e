"""A newcomer with their own data (issue 14): a Parquet file -> ``gdmix init`` -> ``gdmix
check`` -> ``gdmix run`` -> changed data -> ``gdmix run`` again (it says what reruns and the
model changes) -> scores from the Python API equal to ``gdmix score``. Also the pieces on
their own: explicit weight and offset columns, data paths relative to the config file."""
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from gdmix import GLMix, checks, cli, config, kinds, stages, storage


def _rows(n=600, users=20, seed=11, flip=False) -> dict:
    rng = np.random.default_rng(seed)
    user = rng.integers(0, users, n)
    age = rng.integers(18, 70, n).astype(float)
    spend = rng.normal(size=n)
    s = -0.5 + 0.03 * (age - 40) + 1.2 * spend + rng.normal(0, 1.0, users)[user]
    label = (rng.random(n) < 1 / (1 + np.exp(-s))).astype(np.int64)
    if flip:
        label = 1 - label
    return {"uid": np.arange(n, dtype=np.int64), "label": label, "user_id": user.astype(np.int64),
            "age": age, "spend": spend, "city": [("north", "south", "east")[i % 3] for i in range(n)]}


def _write(path, columns: dict) -> None:
    """As a newcomer does: with pandas (pyarrow alone where pandas is not installed)."""
    try:
        import pandas as pd
    except ImportError:
        pq.write_table(pa.table(columns), path)
        return
    pd.DataFrame(columns).to_parquet(path, index=False)


def _main(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.slow
def test_the_newcomers_path(tmp_path, capsys, monkeypatch):
    home = tmp_path / "project"
    home.mkdir()
    monkeypatch.chdir(tmp_path)  # elsewhere: the config's paths must not depend on it
    data = home / "clicks.parquet"
    _write(data, _rows())
    cfg_path = str(home / "clicks.yaml")

    code, out, err = _main(capsys, "init", "--data", str(data), "--out", cfg_path)
    assert code == 0, err
    written = json.loads(out)
    assert (written["uid"], written["label"], written["entity"]) == ("uid", "label", "user_id")
    assert written["features"] == ["age", "spend"] and written["ignored"] == ["city"]
    raw = yaml.safe_load(open(cfg_path))
    assert raw["data"]["train"] == "clicks.parquet"  # relative to the config file
    assert [c["type"] for c in raw["coordinates"]] == ["fixed_effect", "random_effect"]
    raw["parallelism"] = 1
    open(cfg_path, "w").write(yaml.safe_dump(raw))

    code, out, err = _main(capsys, "check", cfg_path)
    assert code == 0, err
    checked = json.loads(out)
    assert checked["ok"] and checked["inputs"]["data.train"]["url"] == str(data)
    assert checked["inputs"]["data.train"]["rows"] == 600

    code, out, err = _main(capsys, "run", cfg_path)
    assert code == 0, err
    assert "weight column: none (every row weighs 1)" in out and "offset column: none (offset 0)" in out
    workdir = raw["workdir"]
    before = {c: storage.read_table(f"{workdir}/models/{c}").to_pylist() for c in ("global", "per-user_id")}

    _write(data, _rows(flip=True))  # the same file, the labels flipped
    code, out, err = _main(capsys, "run", cfg_path)
    assert code == 0, err
    assert "running from prepare: data.train changed" in out and str(data) in out
    assert " train " in out
    after = {c: storage.read_table(f"{workdir}/models/{c}").to_pylist() for c in before}
    assert after["global"] != before["global"] and after["per-user_id"] != before["per-user_id"]

    code, out, err = _main(capsys, "run", cfg_path)  # nothing changed since
    assert code == 0, err
    assert "steps up to date, skipped (--restart to redo)" in out and "running from" not in out

    scores = str(tmp_path / "scores")
    code, _, err = _main(capsys, "score", cfg_path, "--data", str(data), "--out", scores)
    assert code == 0, err
    cli_scores = storage.read_table(scores).sort_by("uid")
    model = GLMix.load(f"{workdir}/models")
    ours = model.decision_function(str(data))
    order = pq.read_table(data).column("uid").to_numpy()
    np.testing.assert_array_equal(np.sort(order), cli_scores.column("uid").to_numpy())
    diff = np.abs(cli_scores.column("score").to_numpy() - ours[np.argsort(order)])
    assert diff.max() <= 1e-9
    p = model.predict_proba(str(data))[:, 1]
    assert ((p > 0.5) == (ours > 0)).all()


# --- the pieces ------------------------------------------------------------------------

def _config_file(folder, train="clicks.parquet", columns=None, bag=("age", "spend")) -> str:
    raw = {"name": "c", "workdir": str(folder / "run"),
           "data": {"train": train, "feature_bags": {"g": {"columns": list(bag)}}},
           "coordinates": [{"name": "global", "type": "fixed_effect", "feature_bag": "g"},
                           {"name": "per-user", "type": "random_effect", "entity": "user_id", "feature_bag": "g"}]}
    if columns is not None:
        raw["data"]["columns"] = columns
    path = folder / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_relative_data_paths_resolve_against_the_config_folder(tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    home.mkdir()
    _write(home / "clicks.parquet", _rows(n=40))
    monkeypatch.chdir(tmp_path)
    cfg = config.load(_config_file(home))
    assert cfg.data.train == str(home / "clicks.parquet")
    assert config.load_run  # the snapshot keeps the resolved path: a pod reads the same file
    assert config.to_raw(cfg)["data"]["train"] == str(home / "clicks.parquet")

    code, _, err = _main(capsys, "check", _config_file(home, train="nothing/here.parquet"))
    assert code == 2 and f"{home}/nothing/here.parquet: no Parquet input found there" in err

    # a config written before the rule, its data relative to the current directory: still
    # read, with a warning that says where it looked
    (tmp_path / "old").mkdir()
    _write(tmp_path / "old" / "rows.parquet", _rows(n=40))
    cfg = config.load(_config_file(home, train="old/rows.parquet"))
    assert cfg.data.train == str(tmp_path / "old" / "rows.parquet")
    assert f"is not in the config file's folder ({home})" in capsys.readouterr().err


def test_weight_and_offset_are_explicit(tmp_path, capsys):
    rows = _rows(n=40)
    _write(tmp_path / "clicks.parquet", rows)
    load = kinds.load_config

    cfg = load(_config_file(tmp_path))
    stages.print_optional_columns(cfg)
    assert capsys.readouterr().out.splitlines() == ["weight column: none (every row weighs 1)",
                                                    "offset column: none (offset 0)"]
    code, _, err = _main(capsys, "check", _config_file(tmp_path, columns={"weight": "wieght"}))
    assert code == 2
    assert "column 'wieght' (data.columns.weight) is missing" in err and str(tmp_path / "clicks.parquet") in err

    _write(tmp_path / "clicks.parquet", {**rows, "weight": np.full(40, 2.0), "w2": np.ones(40)})
    stages.print_optional_columns(load(_config_file(tmp_path)))
    assert "weight column: weight" in capsys.readouterr().out
    stages.print_optional_columns(load(_config_file(tmp_path, columns={"weight": "w2", "offset": None})))
    assert capsys.readouterr().out.splitlines() == ["weight column: w2", "offset column: none (offset 0)"]
    with pytest.raises(checks.InputError, match="'weight' is both the weight .* and a feature of bag 'g'"):
        stages.print_optional_columns(load(_config_file(tmp_path, bag=("age", "weight"))))
    cols = checks.input_columns(load(_config_file(tmp_path, columns={"weight": None}), ), ["weight", "uid"])
    assert cols.weight is None


def test_check_names_a_missing_column_and_a_bad_type(tmp_path, capsys):
    rows = _rows(n=40)
    _write(tmp_path / "clicks.parquet", {**rows, "user_id": rows["user_id"].astype(float)})
    code, _, err = _main(capsys, "check", _config_file(tmp_path))
    assert code == 2 and "column 'user_id' must be an integer or a string (entity id), got double" in err
    code, _, err = _main(capsys, "check", _config_file(tmp_path, bag=("age", "spnd")))
    assert code == 2 and "column 'spnd' is missing" in err  # missing columns first
    _write(tmp_path / "clicks.parquet", rows)
    code, out, err = _main(capsys, "check", _config_file(tmp_path))
    assert code == 0 and json.loads(out)["coordinates"] == ["global (linear)", "per-user (per_entity)"]
    bad = _config_file(tmp_path)
    text = open(bad).read().replace("fixed_effect", "fixed_efect")
    open(bad, "w").write(text)
    code, _, err = _main(capsys, "check", bad)
    assert code == 2 and "coordinates[0].type" in err


def test_init_refuses_to_overwrite_and_needs_uid_and_label(tmp_path, capsys):
    _write(tmp_path / "x.parquet", {"a": np.arange(5, dtype=np.int64), "f": np.linspace(0, 1, 5)})
    code, _, err = _main(capsys, "init", "--data", str(tmp_path / "x.parquet"), "--out", str(tmp_path / "x.yaml"))
    assert code == 2 and "found no label column" in err  # "a" is unique: taken as the uid
    (tmp_path / "y.yaml").write_text("keep")
    _write(tmp_path / "y.parquet", _rows(n=40))
    with pytest.raises(SystemExit, match="y.yaml exists"):
        cli.main(["init", "--data", str(tmp_path / "y.parquet"), "--out", str(tmp_path / "y.yaml")])
    assert (tmp_path / "y.yaml").read_text() == "keep"

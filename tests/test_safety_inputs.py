"""Input checks beyond one file (issue 17 cases 1, 4, 7): one schema across an input's
part files, degenerate training data, train/validation overlap, truncated files."""
from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gdmix import checks, config, storage
from gdmix.checks import InputError
from gdmix.prepare import prepare


def part(path, uid, label=None, drop=(), f2_type=pa.float64(), weight=None, user=None):
    n = len(uid)
    cols = {
        "uid": pa.array(uid, pa.int64()),
        "label": pa.array(label if label is not None else [float(u % 2) for u in uid], pa.float64()),
        "user_id": pa.array(user if user is not None else [u % 3 for u in uid], pa.int64()),
        "f1": pa.array([1.0 + u for u in uid], pa.float64()),
        "f2": pa.array([0.5 * u for u in uid], pa.float64()).cast(f2_type),
        "f4": pa.array([2.0] * n, pa.float64()),
    }
    if weight is not None:
        cols["weight"] = pa.array(weight, pa.float64())
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.table({k: v for k, v in cols.items() if k not in drop}), path)
    return path


def cfg_for(tmp_path, train, validation=None, min_samples=1):
    data = {"train": str(train), "feature_bags": {"g": {"columns": ["f1", "f2", "f4"]},
                                                  "u": {"columns": ["f1"]}}}
    if validation:
        data["validation"] = str(validation)
    return config.parse({
        "name": "t", "workdir": str(tmp_path / "work"), "data": data, "iterations": 1,
        "coordinates": [
            {"name": "global", "type": "fixed_effect", "feature_bag": "g"},
            {"name": "per-user", "type": "random_effect", "entity": "user_id", "feature_bag": "u",
             "min_samples": min_samples}]})


# --- case 1: schema drift across part files ---------------------------------------------

def test_part_without_a_feature_column_is_named(spark, tmp_path):
    part(str(tmp_path / "in/part-0.parquet"), list(range(0, 20)))
    bad = part(str(tmp_path / "in/part-1.parquet"), list(range(20, 40)), drop=("f4",))
    with pytest.raises(InputError) as e:
        prepare(cfg_for(tmp_path, tmp_path / "in"), str(tmp_path / "work"), spark)
    assert str(e.value).startswith(f"{bad}: column 'f4' is missing")
    assert not storage.exists(str(tmp_path / "work/prepared/train"))


def test_part_with_a_column_of_another_type_is_named(spark, tmp_path):
    part(str(tmp_path / "in/part-0.parquet"), list(range(0, 20)))
    bad = part(str(tmp_path / "in/part-1.parquet"), list(range(20, 40)), f2_type=pa.string())
    with pytest.raises(InputError) as e:
        prepare(cfg_for(tmp_path, tmp_path / "in"), str(tmp_path / "work"), spark)
    assert str(e.value).startswith(f"{bad}: column 'f2' is string, but double in ")


def test_truncated_part_is_named(tmp_path):
    part(str(tmp_path / "in/part-0.parquet"), list(range(0, 20)))
    bad = part(str(tmp_path / "in/part-1.parquet"), list(range(20, 40)))
    data = open(bad, "rb").read()
    open(bad, "wb").write(data[: len(data) // 2])
    with pytest.raises(InputError, match=rf"^{bad}: not a readable Parquet file"):
        checks.check_file_schemas(str(tmp_path / "in"))


def test_same_schema_across_parts_and_glob_and_hidden_files(tmp_path):
    a = part(str(tmp_path / "in/part-0.parquet"), [1, 2])
    b = part(str(tmp_path / "in/sub/part-1.parquet"), [3, 4])
    part(str(tmp_path / "in/_tmp/part-9.parquet"), [5], drop=("f4",))  # hidden: Spark skips it too
    open(tmp_path / "in/_SUCCESS", "w").close()
    assert checks.check_file_schemas(str(tmp_path / "in")) == [a, b]
    assert checks.check_file_schemas(str(tmp_path / "in/*.parquet")) == [a]


# --- case 4: degenerate training data ---------------------------------------------------

def test_one_class_is_an_error_naming_the_input(spark, tmp_path):
    part(str(tmp_path / "in/part-0.parquet"), list(range(30)), label=[1.0] * 30)
    with pytest.raises(InputError, match=r"in: column 'label': one class only \(all 30 rows have label 1\)"):
        prepare(cfg_for(tmp_path, tmp_path / "in"), str(tmp_path / "work"), spark)


def test_one_class_by_weight_is_an_error(spark, tmp_path):
    uid = list(range(30))
    part(str(tmp_path / "in/part-0.parquet"), uid, weight=[0.0 if u % 2 else 1.0 for u in uid])
    with pytest.raises(InputError, match=r"one class only \(the rows of label 1 have weight 0\)"):
        prepare(cfg_for(tmp_path, tmp_path / "in"), str(tmp_path / "work"), spark)


def test_zero_total_weight_is_an_error(spark, tmp_path):
    part(str(tmp_path / "in/part-0.parquet"), list(range(30)), weight=[0.0] * 30)
    with pytest.raises(InputError, match=r"the total weight \(column 'weight'\) of the 30 training rows is 0"):
        prepare(cfg_for(tmp_path, tmp_path / "in"), str(tmp_path / "work"), spark)


def test_random_effect_without_an_active_entity_is_an_error(spark, tmp_path):
    uid = list(range(40))
    part(str(tmp_path / "in/part-0.parquet"), uid, user=uid)  # one row per user
    with pytest.raises(InputError, match=r"coordinates\[1\] 'per-user': no entity of column 'user_id' has "
                                         r"min_samples=3 training rows \(the most is 1\)"):
        prepare(cfg_for(tmp_path, tmp_path / "in", min_samples=3), str(tmp_path / "work"), spark)


def test_uid_in_train_and_validation_is_an_error_with_the_count(spark, tmp_path):
    part(str(tmp_path / "tr/part-0.parquet"), list(range(0, 30)))
    part(str(tmp_path / "va/part-0.parquet"), list(range(27, 40)))
    with pytest.raises(InputError) as e:
        prepare(cfg_for(tmp_path, tmp_path / "tr", tmp_path / "va"), str(tmp_path / "work"), spark)
    assert str(e.value).startswith(f"{tmp_path / 'va'}: 3 uids of the validation input also in the train input "
                                   f"{tmp_path / 'tr'} (the first: 27)")


def test_held_out_validation_and_enough_entities_prepare_fine(spark, tmp_path):
    part(str(tmp_path / "tr/part-0.parquet"), list(range(0, 30)))
    part(str(tmp_path / "va/part-0.parquet"), list(range(30, 40)))
    info = prepare(cfg_for(tmp_path, tmp_path / "tr", tmp_path / "va", min_samples=3), str(tmp_path / "work"), spark)
    assert info["rows"] == {"train": 30, "validation": 10}

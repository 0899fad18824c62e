"""The prepare stage and the input checks, on tiny hand-made Parquet inputs (real Spark)."""
from __future__ import annotations

import math
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gdmix import checks, config, layout, schema, storage
from gdmix.checks import InputError
from gdmix.bags import index_ntv
from gdmix.prepare import in_validation, prepare

INPUT = pa.schema([
    ("uid", pa.int64()), ("label", pa.float64()), ("weight", pa.float64()), ("offset", pa.float64()),
    ("user_id", pa.int64()), ("item_id", pa.string()), ("a", pa.float64()), ("b", pa.float64()),
    ("feats", schema.NTV),
])


def ntv(*entries):
    return [{"name": n, "term": t, "value": v} for n, t, v in entries]


def write(path, rows: dict, drop=(), sch=INPUT):
    sch = pa.schema([f for f in sch if f.name not in drop])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.table({f.name: rows[f.name] for f in sch}, schema=sch), path)
    return path


def raw_cfg(workdir, train, validation=None, bags=None, columns=None, **data):
    d = {"train": str(train), "feature_bags": bags or {
        "g": {"columns": ["b", "a"]}, "u": {"ntv": "feats"}, "i": {"columns": ["a"]}}}
    if validation:
        d["validation"] = str(validation)
    if columns is not None:
        d["columns"] = columns
    d.update(data)
    return config.parse({
        "name": "t", "workdir": str(workdir), "data": d, "iterations": 1,
        "coordinates": [
            {"name": "global", "type": "fixed_effect", "feature_bag": "g"},
            {"name": "per-user", "type": "random_effect", "entity": "user_id", "feature_bag": "u"},
            {"name": "per-item", "type": "random_effect", "entity": "item_id", "feature_bag": "i"},
        ]})


def by_uid(table: pa.Table) -> dict:
    return {r["uid"]: r for r in table.to_pylist()}


# --- the happy path: a hand-computed expectation -----------------------------------------

TRAIN = {
    "uid": [10, 11, 12, 13], "label": [1.0, 0.0, 1.0, 0.0],
    "user_id": [1, 2, 1, 3], "item_id": ["x", "y", "y", "x"],
    "a": [1.0, 0.0, -0.0, 2.0], "b": [None, 3.0, None, -1.0],
    "feats": [ntv(("k", "", 2.0), ("j", "t", 1.0), ("k", None, 0.5)),  # k twice: summed
              ntv(("j", "", 0.0), ("a", "", -1.0)),  # a zero value: indexed, not stored
              None,  # no bag at all: empty
              ntv(("j", "t", None), ("a", "", 1.0))],  # a null value: absent
}
VALIDATION = {
    "uid": [20], "label": [1.0], "user_id": [9], "item_id": ["z"], "a": [1.5], "b": [0.25],
    "feats": [ntv(("zz", "", 1.0), ("j", "", 2.0))],  # zz is not in the train index
}


@pytest.fixture(scope="module")
def prepared(spark, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prep")
    cols = ("uid", "label", "user_id", "item_id", "a", "b", "feats")
    tr = write(str(tmp / "in/train/part-0.parquet"), TRAIN, drop=("weight", "offset"))
    va = write(str(tmp / "in/validation/part-0.parquet"), VALIDATION, drop=("weight", "offset"))
    assert pq.read_schema(tr).names == list(cols)
    cfg = raw_cfg(tmp / "work", tmp / "in/train", tmp / "in/validation/*.parquet")
    info = prepare(cfg, str(tmp / "work"), spark)
    return cfg, str(tmp / "work"), info


def test_feature_indexes(prepared):
    _, wd, info = prepared
    idx = {b: storage.read_table(layout.feature_index(wd, b)) for b in ("g", "u", "i")}
    assert idx["u"].schema == schema.FEATURE_INDEX
    # ntv: distinct (name, term) seen in train, sorted; a null term reads as "".
    assert list(zip(idx["u"]["name"].to_pylist(), idx["u"]["term"].to_pylist())) == [
        ("a", ""), ("j", ""), ("j", "t"), ("k", "")]
    assert idx["u"]["index"].to_pylist() == [0, 1, 2, 3]
    # columns: the configured order, every column, term "".
    assert idx["g"]["name"].to_pylist() == ["b", "a"] and idx["g"]["term"].to_pylist() == ["", ""]
    assert idx["i"]["name"].to_pylist() == ["a"]
    assert info["features"] == {"g": 2, "u": 4, "i": 1}


def test_rows_indexed_against_hand_computed(prepared):
    _, wd, info = prepared
    t = storage.read_table(layout.prepared(wd, "train"))
    assert t.schema.field("uid").type == pa.int64()
    assert t.schema.field("user_id").type == pa.int64()
    assert t.schema.field("item_id").type == pa.string()
    for c, typ in (("label", pa.float64()), ("weight", pa.float64()), ("offset", pa.float64())):
        assert t.schema.field(c).type == typ
    assert t.schema.field("u_indices").type.value_type == pa.int32()
    assert t.schema.field("u_values").type.value_type == pa.float32()
    rows = by_uid(t)
    expect = {  # uid: (g, u, i) as (indices, values)
        10: (([1], [1.0]), ([2, 3], [1.0, 2.5]), ([0], [1.0])),
        11: (([0], [3.0]), ([0], [-1.0]), ([], [])),
        12: (([], []), ([], []), ([], [])),
        13: (([0, 1], [-1.0, 2.0]), ([0], [1.0]), ([0], [2.0])),
    }
    assert set(rows) == set(expect)
    for uid, bags in expect.items():
        r = rows[uid]
        for bag, (ind, val) in zip(("g", "u", "i"), bags):
            assert (r[f"{bag}_indices"], r[f"{bag}_values"]) == (ind, val), (uid, bag)
        # No weight/offset column in the data: the defaults.
        assert r["weight"] == 1.0 and r["offset"] == 0.0
    assert [rows[u]["item_id"] for u in (10, 11)] == ["x", "y"]
    assert rows[13]["label"] == 0.0 and rows[10]["label"] == 1.0

    v = by_uid(storage.read_table(layout.prepared(wd, "validation")))
    # zz is unknown to the train index: dropped; (j, "") keeps its train index 1.
    assert (v[20]["u_indices"], v[20]["u_values"]) == ([1], [2.0])
    assert (v[20]["g_indices"], v[20]["g_values"]) == ([0, 1], [0.25, 1.5])
    assert info["rows"] == {"train": 4, "validation": 1}


def test_done_marker_and_atomic_layout(prepared):
    _, wd, info = prepared
    done = storage.done_info(layout.prepared_root(wd), "prepare")
    assert done["rows"] == info["rows"] and done["features"] == info["features"]
    assert done["seconds"] > 0
    parts = [f for f in os.listdir(layout.prepared(wd, "train")) if f.endswith(".parquet")]
    assert parts and all(f.startswith("part-") for f in parts)
    leftovers = [f for f in os.listdir(os.path.join(wd, "prepared")) if f.startswith("_tmp")]
    assert leftovers == []


def test_index_ntv_batch_function():
    """The Arrow lookup on its own: slicing, null lists, null structs, float32 rounding."""
    arr = pa.array([ntv(("x", "", 1.0)), None, ntv(("y", "", 1e-50), ("x", "", 2.0), ("x", "", 3.0)),
                    [None, {"name": "y", "term": "", "value": 4.0}]], schema.NTV)
    keys = pa.array(["x\x00", "y\x00"])
    out = index_ntv(arr.slice(1), keys)  # sliced: offsets must be honoured
    assert out.field("indices").to_pylist() == [[], [0], [1]]
    assert out.field("values").to_pylist() == [[], [5.0], [4.0]]  # 1e-50 is 0 in float32
    # Structs without a term field (term reads as "") and with float32 values.
    no_term = pa.array([[{"name": "y", "value": 2.0}, {"name": "q", "value": 1.0}]],
                       pa.list_(pa.struct([("name", pa.string()), ("value", pa.float32())])))
    out = index_ntv(no_term, keys)
    assert (out.field("indices").to_pylist(), out.field("values").to_pylist()) == ([[1]], [[2.0]])


# --- split, defaults, conservation -------------------------------------------------------

def _many(n, start=0):
    return {"uid": list(range(start, start + n)), "label": [float(i % 2) for i in range(n)],
            "weight": [2.0] * n, "offset": [0.5] * n, "user_id": [i % 7 for i in range(n)],
            "item_id": [f"i{i % 5}" for i in range(n)], "a": [1.0 + i for i in range(n)],
            "b": [0.0] * n, "feats": [ntv((f"f{i % 3}", "", 1.0)) for i in range(n)]}


def test_hash_split_is_deterministic_and_conserves_rows(spark, tmp_path):
    n = 200
    write(str(tmp_path / "in/part-0.parquet"), _many(120))
    write(str(tmp_path / "in/part-1.parquet"), _many(80, start=120))
    splits = []
    for run, seed in (("a", 3), ("c", 4)):
        cfg = raw_cfg(tmp_path / run, tmp_path / "in", split_seed=seed, validation_fraction=0.25)
        info = prepare(cfg, str(tmp_path / run), spark)
        assert info["rows"]["train"] + info["rows"]["validation"] == n
        tr = set(storage.read_table(layout.prepared(str(tmp_path / run), "train"))["uid"].to_pylist())
        va = set(storage.read_table(layout.prepared(str(tmp_path / run), "validation"))["uid"].to_pylist())
        assert not tr & va and tr | va == set(range(n))
        splits.append(va)
    assert splits[0] != splits[1]  # another seed: another split
    assert 25 <= len(splits[0]) <= 75  # about a quarter
    # The written split is the documented hash rule: a pure function of (seed, uid), so
    # the same on every run and any partitioning.
    df = spark.read.parquet(str(tmp_path / "in"))
    expect = {r["uid"] for r in df.where(in_validation(df["uid"], 3, 0.25)).select("uid").collect()}
    assert expect == splits[0]


def test_index_from_train_split_only(spark, tmp_path):
    rows = _many(60)
    cfg = raw_cfg(tmp_path / "w", tmp_path / "in", split_seed=0)
    write(str(tmp_path / "in/part-0.parquet"), rows)
    df = spark.read.parquet(str(tmp_path / "in"))
    val_uid = df.where(in_validation(df["uid"], 0, 0.2)).first()["uid"]
    rows["feats"][val_uid] = ntv(("only-in-validation", "", 1.0))
    write(str(tmp_path / "in/part-0.parquet"), rows)
    prepare(cfg, str(tmp_path / "w"), spark)
    names = storage.read_table(layout.feature_index(str(tmp_path / "w"), "u"))["name"].to_pylist()
    assert names == ["f0", "f1", "f2"]
    v = by_uid(storage.read_table(layout.prepared(str(tmp_path / "w"), "validation")))
    assert v[val_uid]["u_indices"] == []


def test_weight_and_offset_used_or_disabled(spark, tmp_path):
    write(str(tmp_path / "in/part-0.parquet"), _many(10))
    cfg = raw_cfg(tmp_path / "w1", tmp_path / "in", validation_fraction=0.1)
    prepare(cfg, str(tmp_path / "w1"), spark)
    t = storage.read_table(layout.prepared(str(tmp_path / "w1"), "train"))
    assert set(t["weight"].to_pylist()) == {2.0} and set(t["offset"].to_pylist()) == {0.5}
    cfg = raw_cfg(tmp_path / "w2", tmp_path / "in", validation_fraction=0.1,
                  columns={"weight": None, "offset": None})
    prepare(cfg, str(tmp_path / "w2"), spark)
    t = storage.read_table(layout.prepared(str(tmp_path / "w2"), "train"))
    assert set(t["weight"].to_pylist()) == {1.0} and set(t["offset"].to_pylist()) == {0.0}


def test_renamed_columns(spark, tmp_path):
    rows = _many(10)
    rows["id"], rows["y"] = rows.pop("uid"), rows.pop("label")
    sch = pa.schema([pa.field("id", pa.int32()) if f.name == "uid" else
                     pa.field("y", pa.int64()) if f.name == "label" else f for f in INPUT])
    rows["y"] = [int(x) for x in rows["y"]]
    write(str(tmp_path / "in/p.parquet"), rows, sch=sch)
    cfg = raw_cfg(tmp_path / "w", tmp_path / "in", validation_fraction=0.1,
                  columns={"uid": "id", "label": "y"})
    info = prepare(cfg, str(tmp_path / "w"), spark)
    t = storage.read_table(layout.prepared(str(tmp_path / "w"), "train"))
    assert t.schema.field("uid").type == pa.int64() and t.schema.field("label").type == pa.float64()
    assert sum(info["rows"].values()) == 10


# --- bad input: each names the file, the column, the row and the uid ---------------------

def _bad(column, value):
    def mutate(rows):
        rows[column][2] = value
    return mutate


def _bad_ntv(rows):
    rows["feats"][2] = ntv(("f0", "", 1.0), ("f1", "", math.inf))


def _nan_ntv(rows):
    rows["feats"][2] = ntv(("f0", "", math.nan))


def _no_name_ntv(rows):
    rows["feats"][2] = ntv((None, "", 1.0))


def _dup(rows):
    rows["uid"][2] = 1  # uid 1 is row 1 of part-0


BAD = {
    "label-2": (_bad("label", 2.0), "label", "0 or 1"),
    "label-null": (_bad("label", None), "label", "0 or 1"),
    "nan-feature": (_bad("a", math.nan), "a", "NaN"),
    "inf-feature": (_bad("b", -math.inf), "b", "infinite"),
    "huge-feature": (_bad("b", 1e39), "b", "float32"),
    "inf-ntv": (_bad_ntv, "feats", "infinite"),
    "nan-ntv": (_nan_ntv, "feats", "value=NaN"),
    "null-name-ntv": (_no_name_ntv, "feats", "name is null"),
    "nan-weight": (_bad("weight", math.nan), "weight", "NaN"),
    "negative-weight": (_bad("weight", -1.0), "weight", "negative"),
    "inf-offset": (_bad("offset", math.inf), "offset", "infinite"),
    "null-user": (_bad("user_id", None), "user_id", "null"),
    "null-item": (_bad("item_id", None), "item_id", "null"),
    "null-uid": (_bad("uid", None), "uid", "null"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_row_is_located(spark, tmp_path, case):
    mutate, column, problem = BAD[case]
    write(str(tmp_path / "in/part-0.parquet"), _many(4))
    rows = _many(4, start=4)
    mutate(rows)
    write(str(tmp_path / "in/part-1.parquet"), rows)
    cfg = raw_cfg(tmp_path / "w", tmp_path / "in")
    with pytest.raises(InputError) as e:
        checks.check_input(spark.read.parquet(str(tmp_path / "in")), cfg, str(tmp_path / "in"))
    msg = str(e.value)
    assert "part-1.parquet: row 2" in msg, msg
    assert f"column '{column}'" in msg and problem in msg, msg
    if case != "null-uid":
        assert "(uid 6)" in msg, msg


def test_duplicate_uid_names_both_rows(spark, tmp_path):
    write(str(tmp_path / "in/part-0.parquet"), _many(4))
    rows = _many(4, start=4)
    _dup(rows)
    write(str(tmp_path / "in/part-1.parquet"), rows)
    cfg = raw_cfg(tmp_path / "w", tmp_path / "in")
    with pytest.raises(InputError) as e:
        prepare(cfg, str(tmp_path / "w"), spark)  # through the stage, not just the check
    msg = str(e.value)
    assert "duplicate uid 1" in msg and "column 'uid'" in msg, msg
    assert "part-0.parquet row 1" in msg and "part-1.parquet row 2" in msg, msg
    assert storage.done_info(layout.prepared_root(str(tmp_path / "w")), "prepare") is None


def test_missing_column_lists_present(spark, tmp_path):
    write(str(tmp_path / "in/part-0.parquet"), _many(4), drop=("user_id",))
    cfg = raw_cfg(tmp_path / "w", tmp_path / "in")
    with pytest.raises(InputError) as e:
        prepare(cfg, str(tmp_path / "w"), spark)
    msg = str(e.value)
    assert str(tmp_path / "in") in msg and "column 'user_id' is missing" in msg, msg
    assert "columns present: uid, label, weight, offset, item_id, a, b, feats" in msg, msg


def test_missing_validation_column(spark, tmp_path):
    write(str(tmp_path / "tr/p.parquet"), _many(4))
    write(str(tmp_path / "va/p.parquet"), _many(2, start=4), drop=("feats",))
    cfg = raw_cfg(tmp_path / "w", tmp_path / "tr", tmp_path / "va")
    with pytest.raises(InputError, match=r"va: column 'feats' is missing"):
        prepare(cfg, str(tmp_path / "w"), spark)


def test_wrong_type_and_empty_and_absent_input(spark, tmp_path):
    rows = _many(3)
    rows["label"] = ["yes", "no", "yes"]
    sch = pa.schema([pa.field("label", pa.string()) if f.name == "label" else f for f in INPUT])
    write(str(tmp_path / "s/p.parquet"), rows, sch=sch)
    cfg = raw_cfg(tmp_path / "w", tmp_path / "s")
    with pytest.raises(InputError, match="column 'label' must be numeric, got string"):
        prepare(cfg, str(tmp_path / "w"), spark)

    write(str(tmp_path / "e/p.parquet"), {k: [] for k in INPUT.names})
    cfg = raw_cfg(tmp_path / "w", tmp_path / "e")
    with pytest.raises(InputError, match="has no rows"):
        prepare(cfg, str(tmp_path / "w"), spark)

    cfg = raw_cfg(tmp_path / "w", tmp_path / "nothing-here")
    with pytest.raises(InputError, match="no Parquet input"):
        prepare(cfg, str(tmp_path / "w"), spark)


def test_null_feature_value_is_absent_not_an_error(spark, tmp_path):
    rows = _many(4)
    rows["a"][1] = None
    rows["feats"][2] = ntv(("f0", "", None))
    write(str(tmp_path / "in/p.parquet"), rows)
    cfg = raw_cfg(tmp_path / "w", tmp_path / "in", validation_fraction=0.01, split_seed=1)
    assert checks.check_input(spark.read.parquet(str(tmp_path / "in")), cfg, "in") == 4


def test_a_pandas_nan_is_absent_a_stored_nan_an_error(spark, tmp_path):
    """What the docs say (docs/internals.md "Input rules"): pandas writes a float column's
    NaN as null, which prepare reads as "feature absent"; a NaN stored as a value stops it."""
    pd = pytest.importorskip("pandas")
    rows = {k: v for k, v in _many(4).items() if k != "feats"}
    rows["a"][1] = math.nan
    pd.DataFrame(rows).to_parquet(str(tmp_path / "pandas.parquet"), index=False)
    a = pq.read_table(str(tmp_path / "pandas.parquet")).column("a")
    assert a.null_count == 1  # written as null, not as a NaN value
    cfg = raw_cfg(tmp_path / "w", tmp_path / "pandas.parquet", bags={b: {"columns": ["a", "b"]} for b in "gui"})
    assert checks.check_input(spark.read.parquet(str(tmp_path / "pandas.parquet")), cfg, "pandas") == 4
    pq.write_table(pa.table({**rows, "a": pa.array(rows["a"], pa.float64(), from_pandas=False)}),
                   str(tmp_path / "arrow.parquet"))
    with pytest.raises(InputError, match=r"column 'a'.*NaN"):
        checks.check_input(spark.read.parquet(str(tmp_path / "arrow.parquet")), cfg, "arrow")

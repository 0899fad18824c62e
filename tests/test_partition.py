import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gdmix import config, layout, schema, storage
from gdmix.partition import OutOfOrderError, partition
from gdmix.plan import Step
from helpers import make_config


def _prepared(workdir, split, n, seed):
    rng = np.random.default_rng(seed)
    uid = np.arange(n, dtype=np.int64) + (0 if split == "train" else 10_000)
    lens = rng.integers(0, 3, n)
    offs = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    idx = pa.ListArray.from_arrays(pa.array(offs), pa.array(np.zeros(offs[-1], np.int32)))
    val = pa.ListArray.from_arrays(pa.array(offs), pa.array(rng.normal(size=offs[-1]).astype(np.float32)))
    t = pa.table({"uid": uid, "label": rng.integers(0, 2, n).astype(float), "weight": np.ones(n),
                  "offset": rng.normal(size=n), "user_id": rng.integers(0, 7, n),
                  "g_indices": idx, "g_values": val, "u_indices": idx, "u_values": val})
    storage.write_table(storage.join(layout.prepared(workdir, split), "part-0.parquet"), t)
    return t


@pytest.fixture
def workdir(tmp_path):
    wd = str(tmp_path / "wd")
    cfg = make_config(wd, acceleration="none")  # steps written by hand: no joint step between passes
    config.snapshot(cfg)
    tables = {s: _prepared(wd, s, n, i) for i, (s, n) in enumerate([("train", 300), ("validation", 80)])}
    storage.mark_done(layout.prepared_root(wd), "prepare", {"rows": {s: t.num_rows for s, t in tables.items()}})
    return cfg, wd, tables


def _scores(wd, step, coord, tables, fn):
    for split, t in tables.items():
        uid = t.column("uid").to_numpy()
        storage.write_table(storage.join(layout.scores(wd, step.iteration, step.coordinate, coord, split), "part-0.parquet"),
                       pa.table({"uid": uid, "score": fn(uid)}, schema=schema.SCORES))
    storage.mark_done(layout.step_dir(wd, step.iteration, step.coordinate), "train", {})


def test_offsets_and_shards(spark, workdir):
    cfg, wd, tables = workdir
    _scores(wd, Step(0, "global"), "global", tables, lambda u: u * 0.001)
    # the random-effect step at iteration 0 sees the fixed effect's scores as offsets
    info = partition(cfg, wd, Step(0, "per-user"), spark)
    assert info["rows"] == {"train": 300, "validation": 80}
    for split, t in tables.items():
        base = layout.partition(wd, 0, "per-user", split)
        seen = []
        for s in range(2):
            shard = storage.read_table(layout.shard(base, s))
            ent = shard.column("entity_id").to_pylist()
            seen.append(set(ent))
            uid = shard.column("uid").to_numpy()
            expect = dict(zip(t.column("uid").to_numpy(), t.column("offset").to_numpy()))
            np.testing.assert_allclose(shard.column("offset").to_numpy(),
                                       [expect[u] + u * 0.001 for u in uid], rtol=0, atol=1e-12)
            np.testing.assert_allclose(shard.column("fixed_score").to_numpy(), uid * 0.001, atol=1e-12)
        assert not (seen[0] & seen[1]), "an entity lives in exactly one shard"


def test_out_of_order_refused(spark, workdir):
    cfg, wd, tables = workdir
    with pytest.raises(OutOfOrderError, match="needs iter-0/per-user to have finished"):
        partition(cfg, wd, Step(1, "global"), spark)


def test_duplicate_scores_detected(spark, workdir):
    cfg, wd, tables = workdir
    _scores(wd, Step(0, "global"), "global", tables, lambda u: u * 0.0)
    # a second part file repeating the uids: rows would be duplicated by the join
    t = tables["train"]
    storage.write_table(storage.join(layout.scores(wd, 0, "global", "global", "train"), "part-1.parquet"),
                   pa.table({"uid": t.column("uid"), "score": np.zeros(t.num_rows)}, schema=schema.SCORES))
    with pytest.raises(RuntimeError, match="rows were lost or duplicated"):
        partition(cfg, wd, Step(0, "per-user"), spark)


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_the_first_fixed_effect_step_reads_the_prepared_rows_its_workers_slice(spark, workdir, monkeypatch, workers):
    """Nothing is partitioned for a fixed effect before any other coordinate: its workers
    take contiguous slices of the prepared split, the same rows and offsets a Spark
    partition by uid would give them, each row exactly once."""
    from gdmix import partition as part
    from gdmix.fixed_effect import data

    cfg, wd, tables = workdir
    raw = config.to_raw(cfg)
    raw["coordinates"][0]["workers"] = workers
    cfg = config.parse(raw)
    step = Step(0, "global")
    info = partition(cfg, wd, step, spark)
    assert info["source"] == "prepared" and info["rows"] == {"train": 300, "validation": 80}
    assert not storage.exists(layout.partition_root(wd, 0, "global"))  # no rows written
    monkeypatch.setattr(part, "reads_prepared", lambda *a: False)
    spark_info = partition(cfg, wd, Step(0, "global"), spark)  # the Spark way, for comparison
    assert "source" not in spark_info
    storage.mark_done(layout.step_dir(wd, 0, "global"), "partition", info)  # back to the prepared rows
    for split, t in tables.items():
        sliced = [data.worker_rows(wd, 0, "global", split, w, workers, 2) for w in range(workers)]
        sharded = [data.read_shard(data.shard_url(wd, 0, "global", split, w), 2) for w in range(workers)]
        uid = np.concatenate([s.uid for s in sliced])
        np.testing.assert_array_equal(uid, t.column("uid").to_numpy())  # contiguous, in order, once
        assert max(s.n_rows for s in sliced) - min(s.n_rows for s in sliced) <= 1
        for name in ("y", "w", "offset"):
            by_uid = dict(zip(np.concatenate([s.uid for s in sharded]), np.concatenate([getattr(s, name) for s in sharded])))
            np.testing.assert_array_equal(np.concatenate([getattr(s, name) for s in sliced]), [by_uid[u] for u in uid])
        row = {int(u): (s.x.indices[s.x.indptr[i]:s.x.indptr[i + 1]].tolist(), s.x.values[s.x.indptr[i]:s.x.indptr[i + 1]].tolist())
               for s in sharded for i, u in enumerate(s.uid)}
        for s in sliced:
            for i, u in enumerate(s.uid):
                assert (s.x.indices[s.x.indptr[i]:s.x.indptr[i + 1]].tolist(),
                        s.x.values[s.x.indptr[i]:s.x.indptr[i + 1]].tolist()) == row[int(u)]


def test_a_row_range_reads_only_across_the_files_and_row_groups_that_hold_it(tmp_path):
    url = str(tmp_path / "rows")
    sch = pa.schema([("uid", pa.int64())])
    os.makedirs(url)
    for k, n in enumerate([5, 0, 12]):  # an empty file between two of 2 and 3 row groups
        pq.write_table(pa.table({"uid": np.arange(100 * k, 100 * k + n)}), f"{url}/part-{k}.parquet", row_group_size=4)
    every = np.r_[np.arange(5), np.arange(200, 212)]
    for a, b in [(0, 17), (3, 9), (5, 6), (16, 17), (7, 7), (0, 0)]:
        np.testing.assert_array_equal(storage.read_row_range(url, a, b, sch).column("uid").to_numpy(), every[a:b])


def test_column_batches_are_read_columns_rows_in_bounded_batches(tmp_path):
    """``storage.iter_columns`` (the random-effect finish's reader): the rows and order of
    ``read_columns`` (casts, a column a file lacks as nulls, an empty file between two of
    several row groups), never more than ``batch_rows`` rows at a time."""
    url = str(tmp_path / "rows")
    sch = pa.schema([("uid", pa.int64()), ("v", pa.float64())])
    os.makedirs(url)
    for k, n in enumerate([5, 0, 12]):
        cols = {"uid": pa.array(np.arange(100 * k, 100 * k + n), pa.int32())}  # cast to int64 on reading
        if k != 2:  # the last file has no "v": nulls
            cols["v"] = pa.array(np.arange(n) * 0.5)
        pq.write_table(pa.table(cols), f"{url}/part-{k}.parquet", row_group_size=4)
    whole = storage.read_columns(url, ["v", "uid"], sch)
    assert whole.num_rows == 17 and whole.column("v").null_count == 12
    for n in (1, 3, 4, 100):
        batches = list(storage.iter_columns(url, ["v", "uid"], sch, n))
        assert all(0 < b.num_rows <= n for b in batches) and len(batches) >= -(-17 // n)
        assert pa.concat_tables(batches).equals(whole), n
    assert [b.num_rows for b in storage.iter_columns(url, ["v"], sch, 100)][-1] == 12  # nulls only: counted
    assert list(storage.iter_columns(str(tmp_path / "none"), ["uid"], sch, 4)) == []
    with pytest.raises(ValueError, match="batch_rows"):
        next(storage.iter_columns(url, ["uid"], sch, 0))


def test_a_later_pass_writes_only_the_offsets_and_reads_back_the_rows_of_a_full_partition(spark, workdir):
    cfg, wd, tables = workdir
    from gdmix.random_effect.shards import read_shard

    _scores(wd, Step(0, "global"), "global", tables, lambda u: u * 0.001)
    partition(cfg, wd, Step(0, "per-user"), spark)
    _scores(wd, Step(0, "per-user"), "per-user", tables, lambda u: np.sin(u))
    _scores(wd, Step(0, "per-user"), "global", tables, lambda u: u * 0.002)
    _scores(wd, Step(1, "global"), "global", tables, lambda u: np.cos(u))
    info = partition(cfg, wd, Step(1, "per-user"), spark)
    assert info["rows_iteration"] == 0 and info["rows"] == {"train": 300, "validation": 80}
    for split in tables:
        for s in range(2):
            url = layout.shard(layout.partition(wd, 1, "per-user", split), s)
            assert storage.read_table(url).column_names == ["uid", "offset", "fixed_score"]
    joined = {(split, s): read_shard(wd, Step(1, "per-user"), split, s, True, grouped=True)
              for split in tables for s in range(2)}
    full = partition(cfg, wd, Step(1, "per-user"), spark, reuse_rows=False)
    assert "rows_iteration" not in full
    for (split, s), rows in joined.items():
        expect = read_shard(wd, Step(1, "per-user"), split, s, True, grouped=True)
        assert rows.num_rows == expect.num_rows and rows.num_rows > 0
        assert rows.equals(expect), (split, s)
        t = tables[split]
        by_uid = dict(zip(t.column("uid").to_numpy(), t.column("offset").to_numpy()))
        uid = rows.column("uid").to_numpy()
        np.testing.assert_allclose(rows.column("offset").to_numpy(),
                                   [by_uid[u] + np.cos(u) for u in uid], rtol=0, atol=1e-12)
        np.testing.assert_allclose(rows.column("fixed_score").to_numpy(), np.cos(uid), rtol=0, atol=1e-12)


def test_offsets_missing_a_row_are_an_error_naming_both_files(spark, workdir):
    cfg, wd, tables = workdir
    from gdmix.random_effect.shards import read_shard

    _scores(wd, Step(0, "global"), "global", tables, lambda u: u * 0.0)
    partition(cfg, wd, Step(0, "per-user"), spark)
    _scores(wd, Step(0, "per-user"), "per-user", tables, lambda u: u * 0.0)
    _scores(wd, Step(0, "per-user"), "global", tables, lambda u: u * 0.0)
    _scores(wd, Step(1, "global"), "global", tables, lambda u: u * 0.0)
    partition(cfg, wd, Step(1, "per-user"), spark)
    url = layout.shard(layout.partition(wd, 1, "per-user", "train"), 0)
    part = storage.parquet_files(url)[0]
    t = pq.read_table(part)
    pq.write_table(t.slice(1), part)
    with pytest.raises(ValueError, match=r"iter-1/per-user/partition/train/shard=0 holds \d+ offsets for the "
                                         r"\d+ rows of .*iter-0/per-user/partition/train/shard=0"):
        read_shard(wd, Step(1, "per-user"), "train", 0, True)

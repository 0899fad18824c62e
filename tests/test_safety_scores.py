"""A lost, partial or damaged file between stages is an error naming it and the stage to
redo, never offsets silently filled with 0 (issue 17 cases 2 and 7)."""
from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pytest

from gdmix import layout, schema, storage
from gdmix.partition import partition
from gdmix.plan import Step
from test_partition import workdir  # noqa: F401 - the partition tests' prepared work directory (a fixture)


def _scores(wd, tables, keep=lambda uid: uid):
    """The fixed effect's step (0, global): two part files per split."""
    for split, t in tables.items():
        uid = keep(t.column("uid").to_numpy())
        half = len(uid) // 2
        for i, part in enumerate((uid[:half], uid[half:])):
            storage.write_table(storage.join(layout.scores(wd, 0, "global", "global", split), f"part-{i}.parquet"),
                                pa.table({"uid": part, "score": part * 0.001}, schema=schema.SCORES))
    storage.mark_done(layout.step_dir(wd, 0, "global"), "train", {})


def test_complete_scores_partition_fine(spark, workdir):
    cfg, wd, tables = workdir
    _scores(wd, tables)
    assert partition(cfg, wd, Step(0, "per-user"), spark)["rows"] == {"train": 300, "validation": 80}


def test_lost_score_file_names_it_and_the_step_to_redo(spark, workdir):
    cfg, wd, tables = workdir
    _scores(wd, tables)
    lost = storage.join(layout.scores(wd, 0, "global", "global", "train"), "part-1.parquet")
    os.remove(lost)
    with pytest.raises(storage.DamagedOutput) as e:
        partition(cfg, wd, Step(0, "per-user"), spark)
    msg = str(e.value)
    assert msg.startswith(f"{layout.scores(wd, 0, 'global', 'global', 'train')}: 150 rows, but 300 expected")
    assert "gdmix train --workdir" in msg and "--iteration 0 --coordinate global" in msg
    # the damaged step's done marker is gone: a rerun retrains it instead of trusting it
    assert storage.done_info(layout.step_dir(wd, 0, "global"), "train") is None
    assert not storage.exists(layout.partition_root(wd, 0, "per-user"))


def test_score_file_with_the_right_count_but_wrong_uids_is_caught_by_the_join(spark, workdir):
    cfg, wd, tables = workdir
    _scores(wd, tables, keep=lambda uid: np.where(uid == 7, 99_999, uid))  # uid 7 has no score
    with pytest.raises(storage.DamagedOutput) as e:
        partition(cfg, wd, Step(0, "per-user"), spark)
    assert str(e.value).startswith(f"{layout.scores(wd, 0, 'global', 'global', 'train')} has no score for uid 7")
    assert storage.done_info(layout.step_dir(wd, 0, "global"), "train") is None


def test_truncated_prepared_file_is_named(spark, workdir):
    cfg, wd, tables = workdir
    _scores(wd, tables)
    f = storage.join(layout.prepared(wd, "validation"), "part-0.parquet")
    data = open(f, "rb").read()
    open(f, "wb").write(data[: len(data) // 3])
    with pytest.raises(storage.DamagedOutput) as e:
        partition(cfg, wd, Step(0, "per-user"), spark)
    assert str(e.value).startswith(f"{f}: unreadable")
    assert "gdmix prepare" in str(e.value)
    assert storage.done_info(layout.prepared_root(wd), "prepare") is None


def test_first_fixed_effect_step_checks_the_prepared_rows_too(spark, workdir):
    cfg, wd, tables = workdir
    os.remove(storage.join(layout.prepared(wd, "train"), "part-0.parquet"))
    with pytest.raises(storage.DamagedOutput, match="prepared/train: no data files"):
        partition(cfg, wd, Step(0, "global"), spark)


def test_row_count_of_a_truncated_file_names_it(tmp_path):
    f = str(tmp_path / "t" / "part-0.parquet")
    storage.write_table(f, pa.table({"uid": np.arange(100)}))
    data = open(f, "rb").read()
    open(f, "wb").write(data[:20])
    with pytest.raises(storage.DamagedOutput, match=rf"^{f}: not a readable Parquet file"):
        storage.parquet_rows(str(tmp_path / "t"))


def test_verify_rows_accepts_an_empty_output_without_files(tmp_path):
    assert storage.verify_rows(str(tmp_path / "none"), 0, str(tmp_path), "train", "redo") == 0
    storage.mark_done(str(tmp_path), "train", {})
    with pytest.raises(storage.DamagedOutput, match="none: no data files"):
        storage.verify_rows(str(tmp_path / "none"), 5, str(tmp_path), "train", "redo")
    assert storage.done_info(str(tmp_path), "train") is None

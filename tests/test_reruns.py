"""Safe reruns: every done marker records what its stage read, and ``gdmix run`` reruns
from the first stage whose inputs changed, saying how many it skipped and why it reruns."""
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gdmix import config, driver, layout, stages, storage


def _write(path, labels, seed=1):
    rng = np.random.default_rng(seed)
    n = len(labels)
    pq.write_table(pa.table({"uid": np.arange(n, dtype=np.int64), "label": labels,
                             "user_id": (np.arange(n) % 7).astype(np.int64), "x0": rng.normal(size=n)}), path)


def test_fingerprint_sees_a_rewrite_an_added_file_and_a_glob(tmp_path):
    d = tmp_path / "train"
    d.mkdir()
    _write(d / "a.parquet", np.array([0, 1] * 10))
    first = storage.fingerprint(str(d))
    assert first["files"] == 1 and first["bytes"] == os.path.getsize(d / "a.parquet")
    assert storage.fingerprint(str(d)) == first  # reading changes nothing
    time.sleep(0.01)
    _write(d / "a.parquet", np.array([1, 0] * 10))
    assert storage.fingerprint(str(d))["digest"] != first["digest"]
    _write(d / "b.parquet", np.array([1, 0] * 10))
    assert storage.fingerprint(str(d))["files"] == 2
    assert storage.fingerprint(str(d / "*.parquet"))["files"] == 2
    assert storage.fingerprint(str(tmp_path / "none"))["files"] == 0


def test_changed_training_data_reruns_from_prepare(tmp_path, spark, capsys):
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    labels = (rng.random(400) < 0.4).astype(np.int64)
    _write(data / "part-0.parquet", labels)
    cfg = config.parse({
        "name": "reruns", "workdir": str(tmp_path / "work"),
        "data": {"train": str(data), "validation_fraction": 0.25,
                 "feature_bags": {"u": {"columns": ["x0"]}}},
        "iterations": 1, "parallelism": 1,
        "coordinates": [{"name": "per-user", "type": "random_effect", "entity": "user_id",
                         "feature_bag": "u", "l2": 1.0}],
    })
    driver.run(cfg, spark=spark)
    first = capsys.readouterr().out
    assert "up to date" not in first
    marker = storage.done_info(layout.prepared_root(cfg.workdir), "prepare")
    assert marker[stages.INPUTS]["data.train"]["files"] == 1
    model = storage.read_table(layout.model(cfg.workdir, "per-user")).to_pylist()

    driver.run(cfg, spark=spark)  # nothing changed: every stage skipped, and it says so
    again = capsys.readouterr().out
    assert "4 steps up to date, skipped (--restart to redo)" in again
    assert "running from" not in again and " partition " not in again

    _write(data / "part-0.parquet", 1 - labels)  # the same file, other labels
    assert stages.resume_point(cfg, cfg.workdir)[1:] == (
        "prepare", f"data.train changed ({data}: 1 file(s), {os.path.getsize(data / 'part-0.parquet')} bytes)")
    driver.run(cfg, spark=spark)
    third = capsys.readouterr().out
    assert "running from prepare: data.train changed" in third
    assert "prepare: train" in third and " train " in third
    changed = storage.read_table(layout.model(cfg.workdir, "per-user")).to_pylist()
    assert changed != model


def test_a_redone_step_reruns_the_stages_after_it(tmp_path):
    """A step's stage records the markers it read: one rewritten upstream marker makes the
    first stage that read it the resume point."""
    cfg = config.parse({
        "name": "chain", "workdir": str(tmp_path / "work"),
        "data": {"train": str(tmp_path / "nothing"), "feature_bags": {"u": {"columns": ["x0"]}}},
        "iterations": 2,
        "coordinates": [{"name": "a", "type": "random_effect", "entity": "e", "feature_bag": "u"}],
    })
    wd = cfg.workdir
    storage.mark_done(layout.prepared_root(wd), "prepare", {"rows": 1})
    stages._stamp(layout.prepared_root(wd), "prepare", stages.input_fingerprints(cfg))
    from gdmix import plan

    for step in plan.steps(cfg):
        for stage in stages.STEP_STAGES:
            inputs = stages.upstream(cfg, wd, step, stage)
            storage.mark_done(layout.step_dir(wd, step.iteration, step.coordinate), stage, {"seconds": 1})
            stages._stamp(layout.step_dir(wd, step.iteration, step.coordinate), stage, inputs)
    assert stages.resume_point(cfg, wd) == (7, None, None)
    step_a = layout.step_dir(wd, 0, "a")
    inputs = stages.upstream(cfg, wd, plan.Step(0, "a"), "train")
    storage.mark_done(step_a, "train", {"seconds": 2})  # iter-0/a trained again
    stages._stamp(step_a, "train", inputs)
    assert stages.resume_point(cfg, wd) == (3, "iter-0/a metrics", "iter-0/a train ran again")
    storage.remove(storage.marker(step_a, "train"))
    assert stages.resume_point(cfg, wd) == (2, "iter-0/a train", "not done yet")

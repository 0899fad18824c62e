"""Issue 17 case 2 end to end: a score file lost after a run, later steps rerun. The rerun
stops naming the file and the step to redo (never offsets filled with 0); the next rerun
retrains that step and ends with the first run's metrics."""
from __future__ import annotations

import os

import pytest

from gdmix import config, driver, layout, storage
from gdmix.data import synthetic

pytestmark = pytest.mark.slow


def test_lost_score_file_stops_the_rerun_then_the_next_rerun_recovers(tmp_path, spark, capsys):
    synthetic.generate(str(tmp_path / "data"), n_rows=1500, n_users=40, n_items=20, seed=5)
    cfg = config.parse({
        "name": "lost-scores", "workdir": str(tmp_path / "work"),
        "data": {"train": str(tmp_path / "data" / "train"), "validation_fraction": 0.25,
                 "feature_bags": {"global": {"ntv": "global_features"}, "per_user": {"ntv": "global_features"}}},
        "iterations": 2,
        "coordinates": [
            {"name": "global", "type": "fixed_effect", "feature_bag": "global", "l2": 1.0},
            {"name": "per-user", "type": "random_effect", "entity": "user_id", "feature_bag": "per_user", "l2": 2.0}],
    })
    wd = cfg.workdir
    first = driver.run(cfg, spark=spark)
    assert not any(r.get("objective_warning") for r in first)

    scores = layout.scores(wd, 1, "global", "global", "train")
    lost = storage.parquet_files(scores)[-1]
    os.remove(lost)
    storage.remove(storage.marker(layout.step_dir(wd, 1, "per-user"), "partition"))  # rerun the later steps
    with pytest.raises(storage.DamagedOutput) as e:
        driver.run(cfg, spark=spark)
    assert str(e.value).startswith(scores)
    assert "--iteration 1 --coordinate global" in str(e.value)
    assert storage.done_info(layout.step_dir(wd, 1, "global"), "train") is None
    assert not os.path.exists(lock_file := storage.join(wd, "_LOCK.json")), lock_file  # released on failure

    capsys.readouterr()
    again = driver.run(cfg, spark=spark)
    out = capsys.readouterr().out
    assert "iter-1/global" in out and " train " in out  # the damaged step was retrained
    assert len(again) == len(first)
    for a, b in zip(first, again):
        assert (a["iteration"], a["coordinate"]) == (b["iteration"], b["coordinate"])
        assert b["auc"] == pytest.approx(a["auc"], abs=1e-9)
        assert b["objective"] == pytest.approx(a["objective"], rel=1e-9)

"""A ``gs://`` work directory for the Python stages, against a real GCS JSON-API server
(``gcp-storage-emulator``, started by the ``gcs_emulator`` fixture).

Spark has no GCS connector here, so the Spark stages (prepare, partition) run on a local
work directory, which is then copied into the bucket; the Python stages run through the
CLI in their own processes, as pipeline steps do, once on the ``gs://`` copy and once on
the local one, and must write the same coefficients, scores and models.
"""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from gdmix import config, layout, stages, storage
from gdmix.data import synthetic
from gdmix.plan import Step

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-10


# --- the storage primitives on gs:// ------------------------------------------------------

@pytest.mark.timeout(60)  # gcsfs's mv retries objects.moveTo for 30 s per object where it is missing
def test_atomic_writes_listing_and_markers_on_gcs(gcs_emulator):
    fs, bucket = gcs_emulator
    wd = f"gs://{bucket}/unit"
    storage.write_json(storage.join(wd, "a", "x.json"), {"a": np.int64(1)})
    assert storage.read_json(storage.join(wd, "a", "x.json")) == {"a": 1}
    t = pa.table({"uid": pa.array([3, 1, 2], pa.int64())})
    storage.write_table(storage.join(wd, "t", "part-0.parquet"), t)
    assert storage.read_table(storage.join(wd, "t")).equals(t)
    assert storage.parquet_rows(storage.join(wd, "t")) == 3
    batches = list(storage.iter_columns(storage.join(wd, "t"), ["uid"], t.schema, 2))  # the finish's reader
    assert [b.num_rows for b in batches] == [2, 1] and pa.concat_tables(batches).equals(t)

    folder = storage.join(wd, "dir")
    for parts in ([[1, 2], [3]], [[9]]):  # written, then replaced as a whole
        with storage.atomic_path(folder) as tmp:
            for i, uids in enumerate(parts):
                storage.write_table(storage.join(tmp, f"sub/part-{i}.parquet"), pa.table({"uid": uids}))
    assert storage.read_table(folder).column("uid").to_pylist() == [9]
    with pytest.raises(RuntimeError), storage.atomic_path(folder) as tmp:  # a crash keeps the old one
        storage.write_table(storage.join(tmp, "part-0.parquet"), pa.table({"uid": [7]}))
        raise RuntimeError("the stage failed")
    assert storage.read_table(folder).column("uid").to_pylist() == [9]
    single = storage.join(wd, "one", "model.keras")  # a file committed whole (as deep/saved.py does)
    for text in ("first", "second"):
        with storage.atomic_path(single) as tmp:
            with storage.open_file(tmp, "w") as f:
                f.write(text)
    with storage.open_file(single, "r") as f:
        assert f.read() == "second"
    # no temporary objects left behind, and the listing sees folders only
    assert not [p for p in fs.find(f"{bucket}/unit") if "_tmp-" in p], fs.find(f"{bucket}/unit")
    assert storage.list_dirs(wd) == ["a", "dir", "one", "t"]
    assert storage.list_dirs(storage.join(wd, "nothing")) == []

    assert storage.done_info(wd, "train") is None
    storage.mark_done(wd, "train", {"rows": 3})
    assert storage.done_info(wd, "train") == {"rows": 3}
    storage.remove(storage.join(wd, "dir"))
    assert not storage.exists(storage.join(wd, "dir"))
    assert storage.size_bytes(storage.join(wd, "t")) > 0


# --- the Python stages through the CLI on gs:// ---------------------------------------------

def _gdmix(*args, timeout=600):
    """One stage in its own process, as a pipeline step runs it; returns its seconds."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "gdmix.cli", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"gdmix {' '.join(args)}: exit {proc.returncode}\n{proc.stderr[-4000:]}"
    return time.monotonic() - t0


def _rows(url, key):
    table = storage.read_table(url)
    assert table.num_rows > 0, url
    return sorted(table.to_pylist(), key=lambda r: r[key])


WORST = [0.0]


def _close(a, b, where):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{where}[{i}]")
    elif isinstance(a, float):
        assert abs(a - b) <= TOL * max(1.0, abs(a)), (where, a, b)
        WORST[0] = max(WORST[0], abs(a - b))
    else:
        assert a == b, (where, a, b)


def _same(local_wd, gcs_wd, url_of, key):
    a, b = _rows(url_of(local_wd), key), _rows(url_of(gcs_wd), key)
    _close(a, b, url_of(""))
    return len(a)


def _upload(fs, local_dir, gcs_url):
    fs.put(str(local_dir), gcs_url[len("gs://"):], recursive=True)
    assert storage.exists(storage.join(gcs_url, "config.yaml"))


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_python_stages_on_a_gs_workdir_equal_the_local_ones(gcs_emulator, spark, tmp_path):
    fs, bucket = gcs_emulator
    info = synthetic.generate(str(tmp_path / "data"), n_rows=1500, n_users=40, n_items=15, seed=5)
    local = tmp_path / "work"
    cfg = config.parse({
        "name": "gcs",
        "workdir": str(local),
        "data": {"train": info["train"], "validation_fraction": 0.25, "feature_bags": {
            "global": {"ntv": "global_features"}, "per_user": {"ntv": "global_features"}}},
        "iterations": 1,
        "coordinates": [
            {"name": "global", "type": "fixed_effect", "feature_bag": "global", "l2": 1.0, "workers": 1},
            {"name": "per-user", "type": "random_effect", "entity": "user_id", "feature_bag": "per_user",
             "l2": 2.0, "shards": 2},
        ],
        "parallelism": 1,
        "acceleration": "none",  # the stages run one by one below, without the pass's joint step
    })
    config.snapshot(cfg)
    times = {}
    # Spark, locally: prepare and the fixed effect's partition (it reads prepared/ directly)
    stages.prepare(cfg, str(local), spark)
    fe, re_ = Step(0, "global"), Step(0, "per-user")
    stages.partition(cfg, str(local), fe, spark)

    # the fixed effect, on gs:// and on a local copy of the same work directory
    fe_local = tmp_path / "work-fe"
    shutil.copytree(local, fe_local)
    fe_gcs = f"gs://{bucket}/runs/fe"
    _upload(fs, local, fe_gcs)
    step_args = ["--iteration", "0", "--coordinate", "global"]
    times["fixed-effect gs://"] = _gdmix("fixed-effect", "--workdir", fe_gcs, *step_args)
    times["fixed-effect local"] = _gdmix("fixed-effect", "--workdir", str(fe_local), *step_args)
    assert storage.done_info(layout.step_dir(fe_gcs, 0, "global"), "train") is not None
    n = _same(str(fe_local), fe_gcs, lambda w: layout.coefficients(w, 0, "global", "global"), "model_id")
    assert n == 1
    for split in layout.SPLITS:
        _same(str(fe_local), fe_gcs, lambda w: layout.scores(w, 0, "global", "global", split), "uid")

    # the random effect after the fixed effect: partitioned by Spark locally, then copied
    shutil.rmtree(local)
    shutil.copytree(fe_local, local)
    stages.partition(cfg, str(local), re_, spark)
    re_gcs = f"gs://{bucket}/runs/re"
    _upload(fs, local, re_gcs)
    step_args = ["--iteration", "0", "--coordinate", "per-user"]
    for wd, where in ((re_gcs, "gs://"), (str(local), "local")):
        t = sum(_gdmix("random-effect", "--workdir", wd, *step_args, "--shard", str(s)) for s in range(2))
        t += _gdmix("random-effect", "--workdir", wd, *step_args, "--finish")
        times[f"random-effect (2 shards + finish) {where}"] = t
        times[f"finalize {where}"] = _gdmix("finalize", "--workdir", wd)
    for s in range(2):
        assert storage.done_info(layout.shard_dir(re_gcs, 0, "per-user", s), "train") is not None
    n = _same(str(local), re_gcs, lambda w: layout.coefficients(w, 0, "per-user", "per-user"), "model_id")
    assert n > 20, "most of the 40 users have a model"
    for split in layout.SPLITS:
        for coord in ("per-user", "global"):  # the step also shifts mass into the fixed effect
            url = (lambda w: layout.scores(w, 0, "per-user", coord, split))
            if storage.exists(url(str(local))):
                _same(str(local), re_gcs, url, "uid")
    for coord in ("global", "per-user"):
        assert _same(str(local), re_gcs, lambda w: layout.model(w, coord), "model_id") >= 1
    _close(storage.read_json(layout.metrics(str(local))), storage.read_json(layout.metrics(re_gcs)), "metrics.json")
    assert fs.exists(f"{bucket}/runs/re/report.html")
    assert not [p for p in fs.find(f"{bucket}/runs") if "_tmp-" in p], "temporary objects left behind"
    print(f"largest difference gs:// vs local {WORST[0]:.2e}; seconds per stage:",
          {k: round(v, 1) for k, v in times.items()})

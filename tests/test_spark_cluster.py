"""The Spark stages unchanged on a real Spark standalone cluster (a master and a worker
started by the ``spark_standalone`` fixture, executors in their own JVMs): the whole run,
through the CLI with ``spark.master: spark://...``, trains the models local mode trains."""
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from gdmix import config, driver, layout, spark_cds, storage
from gdmix.data import synthetic

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-8


def _raw(data, workdir, **spark):
    return {
        "name": "standalone",
        "workdir": str(workdir),
        "data": {"train": data["train"], "validation_fraction": 0.25, "feature_bags": {
            "global": {"ntv": "global_features"}, "per_user": {"ntv": "global_features"},
            "per_item": {"ntv": "item_features"}}},
        "iterations": 1,
        "coordinates": [
            {"name": "global", "type": "fixed_effect", "feature_bag": "global", "l2": 1.0, "workers": 1},
            {"name": "per-user", "type": "random_effect", "entity": "user_id", "feature_bag": "per_user",
             "l2": 2.0, "shards": 2},
            {"name": "per-item", "type": "random_effect", "entity": "item_id", "feature_bag": "per_item",
             "l2": 3.0},
        ],
        "parallelism": 1,
        **({"spark": spark} if spark else {}),
    }


def _models(workdir, coord):
    rows = storage.read_table(layout.model(workdir, coord)).to_pylist()
    return {r["model_id"]: {(m["name"], m["term"]): m["value"] for m in r["means"]} for r in rows}


@pytest.mark.timeout(420)
def test_a_run_on_a_standalone_cluster_trains_the_local_models(spark_standalone, spark, tmp_path):
    master, state = spark_standalone
    data = synthetic.generate(str(tmp_path / "data"), n_rows=2000, n_users=50, n_items=20, seed=11)

    t0 = time.monotonic()
    local = config.parse(_raw(data, tmp_path / "local"))
    driver.run(local, spark=spark)
    t_local = time.monotonic() - t0

    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(_raw(data, tmp_path / "cluster", master=master, driver_memory="1g",
                                        executors=1, executor_cores=1, executor_memory="1g")))
    # The driver's address as a pipeline step gives it (the pod IP, here loopback's), bound
    # on every interface: no SPARK_LOCAL_IP.
    env = {**{k: v for k, v in os.environ.items() if k != "SPARK_LOCAL_IP"}, "GDMIX_POD_IP": "127.0.0.1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "gdmix.cli", "run", str(path)], env=env, capture_output=True,
                          text=True, timeout=360)
    t_cluster = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-6000:]

    # it ran on the cluster: one application, with the worker's core, now finished
    apps = [a for a in state().get("completedapps", []) if a["name"] == "gdmix-standalone"]
    assert len(apps) == 1 and apps[0]["cores"] >= 1, state().get("completedapps")
    assert not state().get("activeapps"), "the run left its application running"

    cluster = config.load(str(path))
    worst = 0.0
    for coord in ("global", "per-user", "per-item"):
        a, b = _models(local.workdir, coord), _models(cluster.workdir, coord)
        assert a.keys() == b.keys(), coord
        assert len(a) >= (1 if coord == "global" else 10), coord
        for model_id, means in a.items():
            assert means.keys() == b[model_id].keys(), (coord, model_id)
            got = np.array([b[model_id][k] for k in means])
            np.testing.assert_allclose(got, list(means.values()), rtol=TOL, atol=TOL, err_msg=f"{coord} {model_id}")
            worst = max(worst, float(np.max(np.abs(got - list(means.values())), initial=0.0)))
    ma, mb = (storage.read_json(layout.metrics(w)) for w in (local.workdir, cluster.workdir))
    assert [(r["iteration"], r["coordinate"]) for r in ma] == [(r["iteration"], r["coordinate"]) for r in mb]
    for ra, rb in zip(ma, mb):
        for k in ("auc", "logloss", "objective"):
            assert abs(ra[k] - rb[k]) <= TOL * max(1.0, abs(ra[k])), (ra["coordinate"], k, ra[k], rb[k])
    print(f"largest model coefficient difference {worst:.2e}; local run {t_local:.1f} s; standalone cluster run (own driver JVM) {t_cluster:.1f} s; "
          f"driver class-data-sharing archive: {spark_cds.java_option() or 'none'}")

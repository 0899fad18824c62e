import builtins
import logging
import os

import pytest

_PRINT = builtins.print


@pytest.fixture(autouse=True)
def _print_restored():
    """kfp.local wraps ``builtins.print`` to indent a task's logs (``indented_print``); when
    a ParallelFor's tasks run concurrently their wrappers can be restored out of order, and
    an indenting print outlives the pipeline run. Every test starts with the real one."""
    builtins.print = _PRINT
    yield
    builtins.print = _PRINT


os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# py4j logs each connection it closes at INFO, some at interpreter exit, after pytest has
# closed the streams its log capture writes to ("--- Logging error ---").
logging.getLogger("py4j").setLevel(logging.WARNING)


@pytest.fixture(scope="session")
def spark():
    """One real local Spark session for the whole test run (start-up costs 6-17 s); the
    tests' inputs are all small, so it JIT-compiles as an embedded run on them does."""
    from gdmix import spark as gspark

    s = gspark.session(app="gdmix-tests", small_input=True)
    yield s
    s.stop()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc, timeout=20.0) -> None:
    """End a process this fixture started (its own process group), killing it if need be."""
    import signal
    import subprocess

    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=timeout)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=timeout)


@pytest.fixture(scope="module")
def gcs_emulator(tmp_path_factory):
    """A real GCS JSON-API server (``gcp-storage-emulator``, in memory) on a free loopback
    port, for this process and the stage processes it starts: ``STORAGE_EMULATOR_HOST``
    points gcsfs at it. Yields ``(fs, bucket)``: a gcsfs filesystem and an empty bucket."""
    import shutil
    import subprocess
    import sys
    import time
    import urllib.request

    exe = shutil.which("gcp-storage-emulator", path=os.path.dirname(sys.executable)) \
        or pytest.fail("gcp-storage-emulator is not installed (pip install -e '.[test]')")
    port = _free_port()
    host = f"http://127.0.0.1:{port}"
    log = open(tmp_path_factory.mktemp("gcs") / "emulator.log", "wb")
    proc = subprocess.Popen([exe, "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory", "-q"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    mp = pytest.MonkeyPatch()
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{host}/storage/v1/b?project=test", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the GCS emulator did not start (exit status {proc.poll()}); see {log.name}")
                time.sleep(0.1)
        mp.setenv("STORAGE_EMULATOR_HOST", host)
        # gcsfs otherwise probes the bucket's type over gRPC first (a 60 s stall here)
        mp.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
        import gcsfs

        gcsfs.GCSFileSystem.clear_instance_cache()
        fs = gcsfs.GCSFileSystem(project="test", token="anon")
        bucket = "gdmix-test"
        fs.mkdir(bucket)
        assert bucket in [b.rstrip("/") for b in fs.ls("")], "the emulator did not create the bucket"
        yield fs, bucket
    finally:
        mp.undo()
        _stop(proc)
        log.close()
        import gcsfs

        gcsfs.GCSFileSystem.clear_instance_cache()  # instances that point at the stopped server


def _wait_for(predicate, timeout: float, what: str, procs=()):
    import time

    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except OSError:
            value = None
        if value:
            return value
        dead = [p.args for p in procs if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            pytest.fail(f"{what}: {'exited: ' + str(dead) if dead else f'not within {timeout:.0f} s'}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def spark_standalone(tmp_path_factory):
    """A real Spark standalone cluster from the pyspark distribution: a master and one
    worker (1 core, 2 GiB) on loopback, executors in their own JVMs. Yields
    ``(master_url, state)``: ``state()`` is the master's JSON status. Everything it starts
    (master, worker, executors and their Python workers: one process group each) is
    killed at teardown."""
    import json
    import subprocess
    import urllib.request

    import pyspark

    spark_home = os.path.dirname(pyspark.__file__)
    root = tmp_path_factory.mktemp("spark-standalone")
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    env = {**os.environ, "SPARK_HOME": spark_home, "SPARK_LOCAL_IP": "127.0.0.1",
           "SPARK_WORKER_DIR": str(root / "work"), "SPARK_LOG_DIR": str(root / "logs"),
           "SPARK_DAEMON_MEMORY": "512m",
           # executors' Python workers import gdmix (the stages' Arrow UDFs) from this tree
           "PYTHONPATH": os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH", "")) if p)}
    port, web = _free_port(), _free_port()
    master_url = f"spark://127.0.0.1:{port}"
    procs, logs = [], []

    def start(name, *args):
        log = open(root / f"{name}.log", "wb")
        logs.append(log)
        procs.append(subprocess.Popen([os.path.join(spark_home, "bin", "spark-class"), *args], env=env,
                                      stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

    def state():
        with urllib.request.urlopen(f"http://127.0.0.1:{web}/json/", timeout=5) as r:
            return json.load(r)

    try:
        start("master", "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1", "--port", str(port),
              "--webui-port", str(web))
        _wait_for(state, 90, f"the Spark master (log: {root / 'master.log'})", procs)
        start("worker", "org.apache.spark.deploy.worker.Worker", master_url, "--host", "127.0.0.1",
              "--webui-port", str(_free_port()), "--cores", "1", "--memory", "2g", "--work-dir", str(root / "work"))
        _wait_for(lambda: [w for w in state().get("workers", []) if w.get("state") == "ALIVE"], 90,
                  f"a Spark worker registering with the master (log: {root / 'worker.log'})", procs)
        yield master_url, state
    finally:
        for p in reversed(procs):  # the worker first: its executors are in its process group
            _stop(p)
        for log in logs:
            log.close()


@pytest.fixture(scope="session")
def cli_run(tmp_path_factory):
    """``gdmix run`` as a user starts it: a subprocess on a small synthetic problem (two
    passes over a fixed effect and two random effects, one with passive entities), its
    output a pipe (not a terminal) with the plain progress line every second. Returns
    (config, completed process); the report tests read its work directory."""
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    from gdmix import config
    from gdmix.data import synthetic

    root = tmp_path_factory.mktemp("cli-run")
    synthetic.generate(str(root / "data"), n_rows=3000, n_users=80, n_items=30, seed=3)
    raw = {
        "name": "cli-run", "workdir": str(root / "work"),
        "data": {"train": str(root / "data" / "train"), "validation_fraction": 0.25,
                 "feature_bags": {"global": {"ntv": "global_features"}, "per_user": {"ntv": "global_features"},
                                  "per_item": {"ntv": "item_features"}}},
        "iterations": 2,
        "coordinates": [
            {"name": "global", "type": "fixed_effect", "feature_bag": "global", "l2": 1.0},
            {"name": "per-user", "type": "random_effect", "entity": "user_id", "feature_bag": "per_user", "l2": 2.0},
            # about half the items have fewer training rows: passive, and unseen in validation
            {"name": "per-item", "type": "random_effect", "entity": "item_id", "feature_bag": "per_item",
             "l2": 3.0, "min_samples": 75},
        ],
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "GDMIX_PROGRESS_SECONDS": "1"}
    proc = subprocess.run([sys.executable, "-m", "gdmix.cli", "run", str(path)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return config.parse(raw), proc

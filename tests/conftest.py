import logging
import os

import pytest

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

"""The work-directory lease (issue 17 case 6), with real second processes."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from gdmix import cli, driver, lock
from helpers import make_config

HOLDER = """
import sys, time
from gdmix import lock
lease = lock.Lease(sys.argv[1], what="holder-test").acquire()
print("held", flush=True)
time.sleep(float(sys.argv[2]))
lease.release()
print("released", flush=True)
"""


def _holder(wd, seconds, timeout="120"):
    env = {**os.environ, "GDMIX_LOCK_TIMEOUT": timeout}
    p = subprocess.Popen([sys.executable, "-c", HOLDER, wd, str(seconds)], stdout=subprocess.PIPE, text=True,
                         env=env, start_new_session=True)
    assert p.stdout.readline().strip() == "held"
    return p


def _end(p):
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
    p.wait(timeout=30)


def test_second_run_refused_naming_the_holder_then_free_after_release(tmp_path):
    wd = str(tmp_path / "wd")
    p = _holder(wd, 2)
    try:
        with pytest.raises(lock.LockHeld) as e:
            lock.Lease(wd).acquire()
        assert f"in use by holder-test on host {socket.gethostname()} (pid {p.pid}" in str(e.value)
        # the embedded driver takes the lease before anything else: refused, nothing written
        with pytest.raises(lock.LockHeld):
            driver.run(make_config(wd))
        assert sorted(os.listdir(wd)) == ["_LOCK.json"]
    finally:
        assert p.stdout.readline().strip() == "released"
        p.wait(timeout=30)
    assert not os.path.exists(lock.lock_url(wd))  # released at exit
    with lock.Lease(wd) as lease:
        assert json.load(open(lock.lock_url(wd)))["pid"] == os.getpid() == lease.info["pid"]
    assert not os.path.exists(lock.lock_url(wd))


def test_stage_command_refused_while_a_run_holds_the_workdir(tmp_path, capsys):
    wd = str(tmp_path / "wd")
    p = _holder(wd, 60)
    try:
        rc = cli.main(["partition", "--workdir", wd, "--iteration", "0", "--coordinate", "global"])
        err = capsys.readouterr().err
        assert rc == 1
        assert err.startswith("gdmix: work directory in use: gdmix partition: ") and f"pid {p.pid}" in err
        assert err.count("\n") == 1
    finally:
        _end(p)


def test_heartbeat_keeps_a_live_holder_and_a_killed_one_is_taken_over(tmp_path, capsys):
    wd = str(tmp_path / "wd")
    p = _holder(wd, 60, timeout="0.4")  # heartbeat every 0.1 s
    try:
        first = json.load(open(lock.lock_url(wd)))["heartbeat"]
        time.sleep(1.0)  # well past the timeout: a live holder keeps its lease fresh
        assert json.load(open(lock.lock_url(wd)))["heartbeat"] > first
        with pytest.raises(lock.LockHeld):
            lock.Lease(wd, timeout=0.4).acquire()
        os.killpg(p.pid, signal.SIGKILL)  # kill -9: no release
        p.wait(timeout=30)
        assert os.path.exists(lock.lock_url(wd))
        with lock.Lease(wd, timeout=0.4):
            assert json.load(open(lock.lock_url(wd)))["pid"] == os.getpid()
        assert "taking over the lock of holder-test" in capsys.readouterr().out
    finally:
        _end(p)


def _foreign(wd, age):
    os.makedirs(wd, exist_ok=True)
    with open(lock.lock_url(wd), "w") as f:
        json.dump({"what": "gdmix run x", "host": "another-host", "pid": 4242, "started": "then",
                   "token": "t", "heartbeat": time.time() - age}, f)


def test_a_lock_of_another_host_counts_by_its_heartbeat(tmp_path):
    wd = str(tmp_path / "wd")
    _foreign(wd, age=5)
    with pytest.raises(lock.LockHeld, match="in use by gdmix run x on host another-host"):
        lock.Lease(wd, timeout=120).acquire()
    _foreign(wd, age=500)  # stale: its owner stopped beating 500 s ago
    with lock.Lease(wd, timeout=120):
        assert json.load(open(lock.lock_url(wd)))["host"] == socket.gethostname()


def test_memory_workdir_is_a_config_error(capsys):
    rc = cli.main(["metrics", "--workdir", "memory://w", "--iteration", "0", "--coordinate", "g"])
    assert rc == 2
    assert capsys.readouterr().err.startswith("gdmix: config error: workdir: memory://w: a memory:// work directory")

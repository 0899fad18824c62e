"""Temporary folders a killed writer leaves are removed by the next writer (issue 17 case 8)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile

import pytest

from gdmix import storage
from gdmix.fixed_effect import launcher

KILLED_WRITER = """
import sys, time
from gdmix import storage
with storage.atomic_path(sys.argv[1]) as tmp:
    storage.write_json(storage.join(tmp, "half.json"), {"x": 1})
    print(tmp, flush=True)
    time.sleep(60)
"""


def test_a_killed_writers_temporary_is_removed_by_the_rerun(tmp_path):
    final = str(tmp_path / "wd" / "prepared" / "train")
    p = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, final], stdout=subprocess.PIPE, text=True,
                         start_new_session=True)
    tmp = p.stdout.readline().strip()
    os.killpg(p.pid, signal.SIGKILL)  # kill -9: no clean-up runs
    p.wait(timeout=30)
    assert os.path.basename(tmp).startswith("_tmp-train-") and os.path.exists(tmp)
    other = tmp_path / "wd" / "prepared" / "_tmp-validation-0123456789ab"
    other.mkdir()
    with storage.atomic_path(final) as again:
        storage.write_json(storage.join(again, "whole.json"), {"x": 2})
    assert sorted(os.listdir(tmp_path / "wd" / "prepared")) == ["_tmp-validation-0123456789ab", "train"]
    assert os.listdir(final) == ["whole.json"]


def test_a_failed_write_leaves_no_temporary(tmp_path):
    final = str(tmp_path / "out")
    with pytest.raises(RuntimeError):
        with storage.atomic_path(final) as tmp:
            storage.write_json(storage.join(tmp, "a.json"), {})
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


KILLED_LAUNCHER = """
import sys, time
from gdmix.fixed_effect import launcher
c = launcher.LocalCluster(1, (sys.executable, "-c", "pass"))
print(c.logs.name, flush=True)
time.sleep(60)
"""


def test_a_killed_launchers_log_folder_is_removed_by_the_next(tmp_path):
    p = subprocess.Popen([sys.executable, "-c", KILLED_LAUNCHER], stdout=subprocess.PIPE, text=True,
                         start_new_session=True)
    logs = p.stdout.readline().strip()
    os.killpg(p.pid, signal.SIGKILL)
    p.wait(timeout=30)
    assert os.path.basename(logs).startswith("gdmix-fe-") and os.path.isdir(logs)
    mine = tempfile.mkdtemp(prefix="gdmix-fe-")  # a live owner's folder (this process) stays
    with open(os.path.join(mine, launcher.OWNER), "w") as f:
        f.write(str(os.getpid()))
    try:
        c = launcher.LocalCluster(1, (sys.executable, "-c", "pass"))
        c.close()
        assert not os.path.exists(logs)
        assert os.path.isdir(mine)
        assert not os.path.exists(c.logs.name)  # closed: its own folder is gone too
    finally:
        storage.remove(mine)

"""The Spark driver's class-data-sharing archive: built whole or not at all, then mapped."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from gdmix import spark as gspark
from gdmix import spark_cds


def test_the_option_names_an_archive_only_when_one_exists(tmp_path, monkeypatch):
    path = tmp_path / "a.jsa"
    monkeypatch.setenv("GDMIX_SPARK_CDS", str(path))
    assert spark_cds.java_option() == ""
    path.write_bytes(b"x")
    assert spark_cds.java_option() == f"-XX:SharedArchiveFile={path}"
    assert f"-XX:SharedArchiveFile={path}" in gspark.driver_java_options(None)
    monkeypatch.setenv("GDMIX_SPARK_CDS", "off")
    assert spark_cds.java_option() == "" and "SharedArchiveFile" not in gspark.driver_java_options(None)


def test_a_build_past_its_timeout_leaves_no_archive_and_no_process(tmp_path):
    path = tmp_path / "a.jsa"
    with pytest.raises(subprocess.TimeoutExpired):
        spark_cds.build(str(path), timeout=8)  # the child is still in its JVM's first jobs
    assert os.listdir(tmp_path) == []
    assert _processes_naming(str(path)) == []  # the child and its JVM (-XX:ArchiveClassesAtExit=...)


@pytest.mark.slow
def test_a_built_archive_is_mapped_by_the_driver_jvm(tmp_path):
    path = str(tmp_path / "spark.jsa")
    assert spark_cds.build(path) == path and os.path.getsize(path) > 10 * 2**20
    probe = ("import os, sys\n"
             "from pyspark import SparkContext\n"
             "from gdmix import spark as gspark\n"
             "s = gspark.session(app='cds-probe', small_input=True)\n"
             "assert s.range(10).count() == 10\n"
             "pid = SparkContext._gateway.proc.pid\n"
             "pids = [pid] + [int(p) for p in open(f'/proc/{pid}/task/{pid}/children').read().split()]\n"
             "maps = ''.join(open(f'/proc/{p}/maps').read() for p in pids if os.path.exists(f'/proc/{p}/maps'))\n"
             "print('MAPPED' if sys.argv[1] in maps else 'NOT MAPPED')\n")
    out = subprocess.run([sys.executable, "-c", probe, path], env=dict(os.environ, GDMIX_SPARK_CDS=path),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "MAPPED" in out.stdout and "NOT MAPPED" not in out.stdout, out.stdout


def _processes_naming(text: str) -> list[int]:
    out = []
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if text.encode() in fh.read():
                    out.append(int(pid))
        except (OSError, ValueError):
            pass
    return out

"""Every failure reaches the user as one ``gdmix:`` line with a documented exit code
(2 bad input or config, 1 runtime), ``--debug`` for the trace (issue 17 case 7)."""
from __future__ import annotations

import errno

import pytest
import yaml

from gdmix import cli
from helpers import raw_config


def _config(tmp_path, **over):
    raw = raw_config(tmp_path / "wd", train=tmp_path / "nothing", **over)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


@pytest.mark.parametrize("spark, message", [
    ({"master": "bogus://nowhere"}, "spark.master: expected local, local[N], local[*], spark://"),
    ({"driver_memory": "lots"}, "spark.driver_memory: expected a JVM memory size such as 4g or 512m, got 'lots'"),
    ({"executor_memory": "4 GB"}, "spark.executor_memory: expected a JVM memory size"),
])
def test_bogus_spark_settings_are_config_errors(tmp_path, capsys, spark, message):
    assert cli.main(["plan", _config(tmp_path, spark=spark)]) == 2
    line = _one_line(capsys)
    assert line.startswith("gdmix: config error: ") and message in line


@pytest.mark.parametrize("master", ["local", "local[*]", "local[4]", "local[2, 3]", "spark://h:7077",
                                    "k8s://https://kubernetes.default.svc", "yarn", "local-cluster[2,1,1024]"])
def test_real_masters_pass(tmp_path, capsys, master):
    assert cli.main(["plan", _config(tmp_path, spark={"master": master, "driver_memory": "512m"})]) == 0


def test_metrics_not_a_list_is_a_config_error(tmp_path, capsys):
    assert cli.main(["plan", _config(tmp_path, metrics=5)]) == 2
    assert _one_line(capsys) .startswith("gdmix: config error: ")


def test_read_only_workdir_is_one_line(tmp_path, capsys):
    cfg = _config(tmp_path)
    rc = cli.main(["prepare", "--config", cfg, "--workdir", "/sys/gdmix-read-only-test"])
    assert rc == 1
    line = _one_line(capsys)
    assert line.startswith("gdmix: permission denied: /sys/gdmix-read-only-test")


def test_debug_shows_the_trace(tmp_path):
    cfg = _config(tmp_path)
    with pytest.raises(PermissionError):
        cli.main(["prepare", "--config", cfg, "--workdir", "/sys/gdmix-read-only-test", "--debug"])


def test_failure_lines():
    assert cli.failure_line(OSError(errno.ENOSPC, "No space left on device", "/w/x")) == \
        "no space left on the device: /w/x"
    java = ("An error occurred while calling o42.parquet.\n: org.apache.spark.SparkException: "
            "Job aborted due to stage failure: boom in /w/part-1.parquet\n\tat org.apache.Foo(Foo.scala:1)\n")
    assert cli.failure_line(RuntimeError(java)) == (
        "RuntimeError: org.apache.spark.SparkException: Job aborted due to stage failure: boom in /w/part-1.parquet")
    assert "Spark could not start" in cli.failure_line(RuntimeError("[JAVA_GATEWAY_EXITED] Java gateway ..."))
    assert len(cli.failure_line(ValueError("x" * 5000))) < 500

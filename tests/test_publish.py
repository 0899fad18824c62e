"""The publish stage on real work directories: finalize's outputs with their real shapes
(models/<coordinate>/part-00000.parquet in the model schema, metrics.json as
``metrics.collect`` writes it, report.html), published through the CLI and the function."""
import importlib.util
import json
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from gdmix import config, layout, schema, storage
from gdmix.cli import main
from gdmix.publish import PublishRefused, publish
from helpers import raw_config

ROOT = Path(__file__).resolve().parents[1]


def finished_run(tmp_path, name, auc, **gates):
    """A work directory as a successful run leaves it, with validation AUC ``auc`` at its
    last step (an earlier step has a different AUC, so using the wrong record shows)."""
    wd = tmp_path / "runs" / name
    raw = raw_config(wd, publish={"to": str(tmp_path / "published"), **gates})
    cfg = config.parse(raw)
    config.snapshot(cfg)
    for c in cfg.coordinates:
        model = pa.table({
            schema.MODEL_ID: ["global" if c.is_fixed_effect else "u1"],
            "means": [[{"name": schema.INTERCEPT_NAME, "term": "", "value": auc},
                       {"name": "b", "term": "", "value": -1.5}]],
            "variances": [None],
        }, schema=schema.MODEL)
        storage.write_table(storage.join(layout.model(str(wd), c.name), "part-00000.parquet"), model)
    records = [{"iteration": 0, "coordinate": "global", "auc": 0.51, "logloss": 0.69, "aupr": 0.5,
                "objective": 10.0},
               {"iteration": 0, "coordinate": "per-user", "auc": auc, "logloss": 0.6, "aupr": 0.6,
                "objective": 9.0}]
    storage.write_json(layout.metrics(str(wd)), records)
    storage.write_text(layout.report(str(wd)), f"<html><body>report of {name}</body></html>")
    return cfg


def cli_publish(wd, capsys):
    rc = main(["publish", "--workdir", str(wd)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def files_under(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_first_publish_copies_the_run_and_moves_latest(tmp_path, capsys):
    cfg = finished_run(tmp_path, "run-a", 0.71, min_auc=0.6)
    rc, out, err = cli_publish(cfg.workdir, capsys)
    assert rc == 0, err
    to = tmp_path / "published"
    latest = json.loads((to / "latest.json").read_text())
    assert set(latest) == {"version", "url", "auc", "published_at", "workdir"}
    assert latest["auc"] == 0.71 and latest["workdir"] == cfg.workdir
    assert latest["version"].endswith("Z-run-a") and latest["version"][:8].isdigit()
    version = to / "versions" / latest["version"]
    assert latest["url"] == str(version)
    assert json.loads(out[out.index("{"):])["version"] == latest["version"]
    # every output of the run, byte for byte, plus the record of the decision
    copied = files_under(version)
    wd = Path(cfg.workdir)
    for rel in ("metrics.json", "report.html", "models/global/part-00000.parquet",
                "models/per-user/part-00000.parquet"):
        assert copied[rel] == (wd / rel).read_bytes(), rel
    assert set(copied) == {"metrics.json", "report.html", "publish.json",
                           "models/global/part-00000.parquet", "models/per-user/part-00000.parquet"}
    record = json.loads(copied["publish.json"])
    assert record["auc"] == 0.71 and record["latest_moved"] and record["refused"] is None
    assert record["previous_latest"] is None and record["gates"]["min_auc"] == 0.6
    assert record["step"]["coordinate"] == "per-user"
    # a reader of the published model gets the run's coefficients
    table = storage.read_table(str(version / "models" / "global"))
    assert table.column("means").to_pylist()[0][0]["value"] == 0.71
    assert not [p for p in to.rglob("_tmp-*")], "temporary files left behind"


def test_a_better_run_moves_latest_and_both_versions_stay(tmp_path):
    a = finished_run(tmp_path, "run-a", 0.71, min_auc=0.6, max_auc_drop=0.01)
    b = finished_run(tmp_path, "run-b", 0.74, min_auc=0.6, max_auc_drop=0.01)
    first = publish(a, a.workdir, now=datetime(2026, 11, 29, 3, 15, tzinfo=timezone.utc))
    second = publish(b, b.workdir, now=datetime(2026, 11, 30, 3, 15, tzinfo=timezone.utc))
    assert first["version"] == "20261129T031500Z-run-a"
    assert second["version"] == "20261130T031500Z-run-b"
    assert second["previous_latest"] == {"version": first["version"], "auc": 0.71}
    to = tmp_path / "published"
    latest = json.loads((to / "latest.json").read_text())
    assert latest["version"] == second["version"] and latest["auc"] == 0.74
    assert latest["published_at"] == "2026-11-30T03:15:00Z"
    assert sorted(p.name for p in (to / "versions").iterdir()) == [first["version"], second["version"]]


def test_min_auc_refusal_keeps_latest_and_says_why(tmp_path, capsys):
    a = finished_run(tmp_path, "run-a", 0.71, min_auc=0.6)
    assert cli_publish(a.workdir, capsys)[0] == 0
    latest = tmp_path / "published" / "latest.json"
    before = latest.read_bytes()
    b = finished_run(tmp_path, "run-b", 0.55, min_auc=0.6)
    rc, out, err = cli_publish(b.workdir, capsys)
    assert rc == 3
    assert err.startswith("gdmix: publish refused: validation AUC 0.550000 is below publish.min_auc 0.6")
    old = json.loads(before)["version"]
    assert f"latest not moved (still {old} (AUC 0.71))" in err
    assert latest.read_bytes() == before
    kept = [p for p in (tmp_path / "published" / "versions").iterdir() if p.name.endswith("-run-b")]
    assert len(kept) == 1 and str(kept[0]) in err
    record = json.loads((kept[0] / "publish.json").read_text())
    assert record["latest_moved"] is False and "publish.min_auc 0.6" in record["refused"]
    assert (kept[0] / "models" / "per-user" / "part-00000.parquet").exists()


def test_max_auc_drop_refusal_keeps_latest_and_a_small_drop_passes(tmp_path, capsys):
    a = finished_run(tmp_path, "run-a", 0.80, max_auc_drop=0.01)
    assert cli_publish(a.workdir, capsys)[0] == 0
    latest = tmp_path / "published" / "latest.json"
    before = latest.read_bytes()
    b = finished_run(tmp_path, "run-b", 0.78, max_auc_drop=0.01)
    rc, _, err = cli_publish(b.workdir, capsys)
    assert rc == 3
    assert ("validation AUC 0.780000 is 0.020000 below the current latest's 0.800000 "
            f"(version {json.loads(before)['version']}), more than publish.max_auc_drop 0.01") in err
    assert latest.read_bytes() == before
    # exactly at the allowed drop (0.80 - 0.79 is not exactly 0.01 in floats) it moves
    c = finished_run(tmp_path, "run-c", 0.79, max_auc_drop=0.01)
    rc, _, err = cli_publish(c.workdir, capsys)
    assert rc == 0, err
    assert json.loads(latest.read_text())["version"].endswith("-run-c")


def test_an_unfinished_run_is_refused_and_nothing_is_published(tmp_path, capsys):
    cfg = finished_run(tmp_path, "run-a", 0.71)
    (Path(cfg.workdir) / "report.html").unlink()
    storage.remove(layout.model(cfg.workdir, "per-user"))
    rc, _, err = cli_publish(cfg.workdir, capsys)
    assert rc == 3
    assert "has not finished: no report.html, models/per-user" in err
    assert not (tmp_path / "published").exists()


def test_a_gate_without_a_validation_auc_is_refused(tmp_path):
    cfg = finished_run(tmp_path, "run-a", 0.71, min_auc=0.5)
    records = storage.read_json(layout.metrics(cfg.workdir))
    records[-1]["auc"] = None
    storage.write_json(layout.metrics(cfg.workdir), records)
    with pytest.raises(PublishRefused, match="no validation AUC"):
        publish(cfg, cfg.workdir)
    assert not (tmp_path / "published" / "latest.json").exists()


def test_publishing_a_run_again_reuses_its_version(tmp_path):
    cfg = finished_run(tmp_path, "run-a", 0.71, min_auc=0.75)
    with pytest.raises(PublishRefused):
        publish(cfg, cfg.workdir, now=datetime(2026, 11, 30, 3, 0, tzinfo=timezone.utc))
    copied = tmp_path / "published" / "versions" / "20261130T030000Z-run-a" / "report.html"
    inode = copied.stat().st_ino
    # the gate is lowered and the same run published again (or the step retried)
    lower = config.parse({**config.to_raw(cfg), "publish": {"to": cfg.publish.to, "min_auc": 0.7}})
    out = publish(lower, cfg.workdir, now=datetime(2026, 11, 30, 4, 0, tzinfo=timezone.utc))
    assert out["reused_version"] and out["version"] == "20261130T030000Z-run-a"
    versions = tmp_path / "published" / "versions"
    assert [p.name for p in versions.iterdir()] == ["20261130T030000Z-run-a"]
    record = json.loads((versions / out["version"] / "publish.json").read_text())
    assert record["latest_moved"] is True and record["gates"]["min_auc"] == 0.7
    assert copied.stat().st_ino == inode, "the version was copied a second time"


def test_publish_without_the_mapping_is_a_config_error(tmp_path, capsys):
    cfg = finished_run(tmp_path, "run-a", 0.71)
    raw = config.to_raw(cfg)
    del raw["publish"]
    config.snapshot(config.parse(raw))
    rc, _, err = cli_publish(cfg.workdir, capsys)
    assert rc == 2 and "config error: publish: not configured" in err


@pytest.mark.parametrize("value, message", [
    ({}, "publish.to: required key is missing"),
    ("gs://bucket/models", "publish: expected a mapping"),
    ({"to": ""}, "publish.to: expected str"),
    ({"to": "/m", "min_auc": 1.0}, "publish.min_auc: must be between 0 and 1"),
    ({"to": "/m", "min_auc": 0}, "publish.min_auc: must be between 0 and 1"),
    ({"to": "/m", "min_auc": "high"}, "publish.min_auc: expected float"),
    ({"to": "/m", "max_auc_drop": -0.01}, "publish.max_auc_drop: must be >= 0"),
    ({"to": "/m", "latest": "x"}, "publish.latest: unknown key"),
])
def test_config_errors_name_the_key(tmp_path, value, message):
    with pytest.raises(config.ConfigError, match=message):
        config.parse(raw_config(tmp_path, publish=value))


@pytest.mark.parametrize("value", [
    {"to": "gs://bucket/models/movielens", "min_auc": 0.7, "max_auc_drop": 0.0},
    {"to": "/models/x", "max_auc_drop": 0.02},
    None,
])
def test_config_snapshot_round_trips(tmp_path, value):
    raw = raw_config(tmp_path / "wd")
    if value is not None:
        raw["publish"] = value
    cfg = config.parse(raw)
    config.snapshot(cfg)
    again = config.load_run(str(tmp_path / "wd"))
    assert again.publish == cfg.publish
    assert config.to_raw(again) == config.to_raw(cfg)
    written = yaml.safe_load((tmp_path / "wd" / "config.yaml").read_text())
    assert written.get("publish") == value
    if value is not None:
        assert again.publish.to == value["to"] and again.publish.min_auc == value.get("min_auc")


def _component_module():
    spec = importlib.util.spec_from_file_location("gdmix_components_publish",
                                                  ROOT / "components" / "publish" / "component.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_component_compiles_and_runs_the_cli(tmp_path):
    from kfp import compiler

    module = _component_module()
    path = tmp_path / "publish.yaml"
    compiler.Compiler().compile(module.component("registry.example/gdmix-trainer:1"), str(path))
    spec = yaml.safe_load(path.read_text())
    (executor,) = spec["deploymentSpec"]["executors"].values()
    assert executor["container"]["image"] == "registry.example/gdmix-trainer:1"
    assert 'main(["publish", "--workdir", workdir])' in executor["container"]["command"][-1]
    assert list(spec["root"]["inputDefinitions"]["parameters"]) == ["run_id", "runs_root"]
    # the function itself, as the step runs it: success returns latest.json's URL ...
    finished_run(tmp_path, "run-a", 0.71, min_auc=0.6)
    assert module.publish(str(tmp_path / "runs"), "run-a") == str(tmp_path / "published" / "latest.json")
    # ... a refusal fails the step with a message that says latest stayed
    finished_run(tmp_path, "run-b", 0.5, min_auc=0.6)
    with pytest.raises(RuntimeError, match="refused to move latest"):
        module.publish(str(tmp_path / "runs"), "run-b")
    assert json.loads((tmp_path / "published" / "latest.json").read_text())["version"].endswith("-run-a")


def test_latest_is_replaced_by_a_move_never_removed_first(tmp_path, monkeypatch):
    """A reader polling latest.json must always find one: the new pointer is moved over the
    old (a rename), the old is never deleted first."""
    from fsspec.implementations.local import LocalFileSystem

    a = finished_run(tmp_path, "run-a", 0.71)
    b = finished_run(tmp_path, "run-b", 0.72)
    publish(a, a.workdir)
    removed, real_rm = [], LocalFileSystem.rm

    def rm(self, path, *args, **kwargs):
        removed.append(str(path))
        return real_rm(self, path, *args, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "rm", rm)
    publish(b, b.workdir)
    assert not [p for p in removed if p.endswith("/latest.json")]
    assert json.loads((tmp_path / "published" / "latest.json").read_text())["version"].endswith("-run-b")


def test_component_under_kfp_local(tmp_path, capfd):
    """The compiled step, run by kfp.local in its own process as a cluster would run it."""
    import warnings

    from kfp import local

    comp = _component_module().component()
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp-root"),
               raise_on_error=True)
    finished_run(tmp_path, "run-a", 0.71, max_auc_drop=0.01)
    finished_run(tmp_path, "run-b", 0.65, max_auc_drop=0.01)
    latest = tmp_path / "published" / "latest.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "non-Python base image" notes from the local runner
        task = comp(runs_root=str(tmp_path / "runs"), run_id="run-a")
        assert task.output == str(latest)
        before = latest.read_bytes()
        capfd.readouterr()
        with pytest.raises(RuntimeError):
            comp(runs_root=str(tmp_path / "runs"), run_id="run-b")
    log = capfd.readouterr()
    log = log.out + log.err
    assert "publish refused: validation AUC 0.650000 is 0.060000 below the current latest's 0.710000" in log
    assert "refused to move latest" in log
    assert latest.read_bytes() == before
    assert json.loads(before)["version"].endswith("-run-a")


def test_publish_to_another_filesystem(tmp_path):
    """``to`` as a URL of another fsspec filesystem (memory://, as gs:// would be): the run
    is copied across filesystems and the pointer moved there."""
    import fsspec

    to = f"memory://published-{tmp_path.name}"
    a = finished_run(tmp_path, "run-a", 0.71, max_auc_drop=0.01)
    b = finished_run(tmp_path, "run-b", 0.60, max_auc_drop=0.01)
    a, b = (config.parse({**config.to_raw(c), "publish": {"to": to, "max_auc_drop": 0.01}}) for c in (a, b))
    out = publish(a, a.workdir)
    assert out["url"] == f"{to}/versions/{out['version']}"
    fs = fsspec.filesystem("memory")
    with fs.open(f"{to}/versions/{out['version']}/models/global/part-00000.parquet", "rb") as f:
        assert f.read() == (Path(a.workdir) / "models/global/part-00000.parquet").read_bytes()
    before = storage.read_json(f"{to}/latest.json")
    with pytest.raises(PublishRefused, match="0.110000 below"):
        publish(b, b.workdir)
    assert storage.read_json(f"{to}/latest.json") == before
    assert len(storage.list_dirs(f"{to}/versions")) == 2

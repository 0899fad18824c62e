import json

import yaml

from gdmix import cli, config, plan
from helpers import raw_config


def test_plan_command_prints_the_plan(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw_config(tmp_path / "wd", iterations=3)))
    assert cli.main(["plan", str(path)]) == 0
    printed = json.loads(capsys.readouterr().out)
    cfg = config.load(str(path))
    assert [(p["iteration"], p["coordinate"]) for p in printed] == \
        [(s.iteration, s.coordinate) for s in plan.sequence(cfg)]
    assert printed[1]["writes"] == ["per-user", "global"]


def test_config_errors_exit_2_with_the_key(tmp_path, capsys):
    raw = raw_config(tmp_path / "wd")
    raw["coordinates"][1]["l2"] = -3
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert cli.main(["run", str(path)]) == 2
    assert "coordinates[1].l2: must be >= 0" in capsys.readouterr().err


def test_out_of_order_stage_exits_2(tmp_path, capsys):
    cfg = config.parse(raw_config(tmp_path / "wd"))
    config.snapshot(cfg)
    # no prepare yet: the partition stage refuses (before any Spark work)
    assert cli.main(["partition", "--workdir", str(tmp_path / "wd"), "--iteration", "1",
                     "--coordinate", "global"]) == 2
    assert "prepare stage has not completed" in capsys.readouterr().err

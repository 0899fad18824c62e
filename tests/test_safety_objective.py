"""A training objective that rises across a coordinate-descent step beyond rounding is a
loud warning in the metrics log, metrics.json, the driver's summary and the report (issue 17 case 2)."""
from __future__ import annotations

from gdmix import config, layout, metrics, report, storage
from gdmix.driver import print_summary
from gdmix.plan import Step
from helpers import make_config, raw_config


def _rec(k, c, obj):
    return {"iteration": k, "coordinate": c, "objective": obj, "auc": 0.7, "logloss": 0.6}


def test_rise_beyond_rounding_is_flagged_and_rounding_is_not(tmp_path):
    cfg = make_config(tmp_path)
    recs = [_rec(0, "global", 100.0), _rec(0, "per-user", 90.0), _rec(1, "global", 90.0 + 1e-9),
            _rec(1, "per-user", 95.0)]
    out = metrics.objective_rises(cfg, recs, indexed=True)
    assert [i for i, _ in out] == [3]
    assert "rose from 90 after iter-1/global to 95 after iter-1/per-user" in out[0][1]


def test_dnn_runs_are_not_flagged(tmp_path):
    raw = raw_config(tmp_path)
    raw["coordinates"][0]["model"] = "dnn"
    cfg = config.parse(raw)
    assert metrics.objective_rises(cfg, [_rec(0, "global", 1.0), _rec(0, "per-user", 2.0)]) == []


def _write_step(wd, k, c, obj):
    rec = _rec(k, c, obj)
    storage.write_json(layout.step_metrics(wd, k, c), rec)
    storage.mark_done(layout.step_dir(wd, k, c), "metrics", rec)


def test_collect_report_and_summary_carry_the_warning(tmp_path, capsys):
    wd = str(tmp_path / "wd")
    cfg = make_config(wd)
    _write_step(wd, 0, "global", 100.0)
    _write_step(wd, 0, "per-user", 120.0)
    recs = metrics.collect(cfg, wd)
    assert "objective_warning" not in recs[0] and "rose from 100" in recs[1]["objective_warning"]
    assert storage.read_json(layout.metrics(wd))[1]["objective_warning"] == recs[1]["objective_warning"]
    html = report.render(cfg, wd, recs)
    assert "WARNING: the training objective rose from 100" in html
    print_summary(recs, 1.0)
    assert "WARNING: iter-0/per-user: the training objective rose from 100" in capsys.readouterr().out


def test_warn_rise_prints_at_the_step(tmp_path, capsys):
    wd = str(tmp_path / "wd")
    cfg = make_config(wd)
    _write_step(wd, 0, "global", 100.0)
    metrics._warn_rise(cfg, wd, Step(0, "per-user"), _rec(0, "per-user", 101.0))
    out = capsys.readouterr()
    assert "WARNING: iter-0/per-user: the training objective rose" in out.out
    assert out.err.startswith("gdmix: WARNING: iter-0/per-user")
    metrics._warn_rise(cfg, wd, Step(0, "per-user"), _rec(0, "per-user", 99.0))
    assert capsys.readouterr().out == ""

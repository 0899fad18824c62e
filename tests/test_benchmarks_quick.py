"""The benchmarks' quick mode runs end to end (a smoke test: no timing assertions)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_random_effect_benchmark_quick_mode(tmp_path):
    out = tmp_path / "re.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "random_effect.py"), "--quick", "--workers", "2",
                           "--out", str(out)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| entities | rows |" in proc.stdout
    report = json.loads(out.read_text())
    (row,) = report["rows"]
    assert row["entities"] == 2000 and row["scipy_entities_timed"] == 300 and row["scipy_extrapolated"]
    # both solvers reached the same optimum on the compared entities
    assert row["max_abs_rel_diff"] < 1e-9 and row["entities_worse_1e-8"] == 0
    assert row["vectorised_not_converged"] == 0
    assert report["machine"]["cores"] >= 1 and report["command"]


def test_fixed_effect_benchmark_small_run(tmp_path):
    out = tmp_path / "fe.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fixed_effect.py"), "--rows", "3000",
                           "--features", "20", "--nnz", "4", "--workers", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    lbfgs, newton, tf2 = report["runs"]
    assert report["rows"] == 3000 and "2 worker(s)" in tf2["solver"]
    # the same objective from every solver; the workers' Newton method converged
    assert tf2["converged"] and newton["converged"]
    assert abs(tf2["rel_diff_vs_lbfgs"]) < 1e-9 and abs(newton["objective"] - lbfgs["objective"]) < 1e-9 * lbfgs["objective"]


def test_end_to_end_benchmark_reads_the_driver_progress_lines():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import end_to_end
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    text = ("[    9.1s] spark                    start         9.1s  \n"
            "[   20.0s] iter-0/global            train        10.5s  objective 5.1, iterations 7\n"
            "[   24.0s] iter-0/per-user          train         4.0s  objective 3.2\n"
            "[   25.0s] iter-0/per-user          metrics       1.0s  AUC 0.7000\n"
            "not a progress line 3.0s\n")
    recs = end_to_end.parse(text)
    assert [(r["what"], r["stage"], r["seconds"]) for r in recs] == [
        ("spark", "start", 9.1), ("iter-0/global", "train", 10.5), ("iter-0/per-user", "train", 4.0),
        ("iter-0/per-user", "metrics", 1.0)]
    types = {"global": "fixed_effect", "per-user": "random_effect"}
    assert [end_to_end.kind(r, types) for r in recs] == [
        "spark start", "train (fixed effect)", "train (random effect)", "metrics"]

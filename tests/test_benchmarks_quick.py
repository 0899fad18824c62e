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

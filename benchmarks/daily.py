"""The nightly retrain on MovieLens-100K in time order (README "Nightly retrain").

Day 1 trains ``examples/movielens-daily.yaml`` (the first 80% of ratings by time, with
coefficient variances). Day 2 trains on the next 10% and validates on the last 10%, three
ways, each ``gdmix run`` as a whole process from a fresh work directory:

- ``prior``: ``examples/movielens-daily-day2.yaml``, day 1's models as the prior;
- ``cold``: the same config without the prior (day 2's data alone);
- ``warm start``: without the prior, starting from day 1's models (``warm_start``).

For each: the validation AUC after the last step, the wall time, and the solver work the
done markers record (the fixed effect's Newton iterations; the random effects' entity
Newton iterations, summed over shards). Fetches the data first when missing.

    python benchmarks/daily.py --results benchmarks/RESULTS.md
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import yaml

from end_to_end import gdmix  # the CLI beside this interpreter (benchmarks/ is on sys.path)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DAY1 = os.path.join(ROOT, "examples", "movielens-daily.yaml")
DAY2 = os.path.join(ROOT, "examples", "movielens-daily-day2.yaml")
DATA = os.path.join(ROOT, "data", "ml100k-daily")


def solver_work(workdir: str) -> dict[str, int]:
    """Per coordinate, the solver iterations its train done markers record over the run:
    a fixed effect's Newton iterations, a random effect's entity Newton iterations (summed
    over its shards)."""
    out: dict[str, int] = {}
    for it in sorted(d for d in os.listdir(workdir) if d.startswith("iter-")):
        for coord in sorted(os.listdir(os.path.join(workdir, it))):
            step = os.path.join(workdir, it, coord)
            shards = os.path.join(step, "shards")
            dirs = [os.path.join(shards, s) for s in sorted(os.listdir(shards))] if os.path.isdir(shards) else [step]
            for d in dirs:
                marker = os.path.join(d, "_DONE-train.json")
                if os.path.exists(marker):
                    with open(marker) as fh:
                        out[coord] = out.get(coord, 0) + int(json.load(fh).get("iterations", 0))
    return out


def run(config: str, workdir: str, timeout: float) -> dict:
    env = {**os.environ, "SPARK_LOCAL_IP": os.environ.get("SPARK_LOCAL_IP", "127.0.0.1")}
    t = time.perf_counter()
    p = subprocess.run([gdmix(), "run", config, "--workdir", workdir, "--restart"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t
    if p.returncode:
        raise RuntimeError(f"gdmix run {config} exited with {p.returncode}:\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}")
    records = json.load(open(os.path.join(workdir, "metrics.json")))
    last = next((r for r in records if r.get("selected")), records[-1])
    return {"wall_s": round(wall, 1), "auc": last["auc"], "logloss": last["logloss"],
            "auc_by_user": last.get("auc@user_id"), "work": solver_work(workdir)}


def variant(config: str, tmp: str, name: str, drop_prior: bool, warm_start: str | None) -> str:
    raw = yaml.safe_load(open(config))
    here = os.path.dirname(config)  # the copy lives elsewhere: its relative inputs made absolute
    for key in ("train", "validation"):
        raw["data"][key] = os.path.normpath(os.path.join(here, raw["data"][key]))
    if drop_prior:
        raw.pop("prior", None)
    if warm_start:
        raw["warm_start"] = warm_start
    path = os.path.join(tmp, f"{name}.yaml")
    with open(path, "w") as fh:
        yaml.safe_dump(raw, fh, sort_keys=False)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(HERE, "results", "daily.json"))
    ap.add_argument("--results", help="rewrite this benchmark's block of this Markdown file (RESULTS.md)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds before a run is killed")
    args = ap.parse_args(argv)
    if not os.path.exists(os.path.join(DATA, "day2", "validation")):
        subprocess.run([gdmix(), "movielens", "--daily", "--out", DATA], check=True, cwd=ROOT, timeout=600)
    runs = os.path.join(ROOT, "runs", "movielens-daily")  # the examples' prior path points here
    out = {}
    with tempfile.TemporaryDirectory(prefix="bench-daily-") as tmp:
        out["day 1"] = run(DAY1, os.path.join(runs, "day1"), args.timeout)
        day1_models = os.path.join(runs, "day1", "models")
        out["day 2, prior from day 1"] = run(DAY2, os.path.join(runs, "day2"), args.timeout)
        out["day 2, cold"] = run(variant(DAY2, tmp, "cold", True, None), os.path.join(tmp, "cold"), args.timeout)
        out["day 2, warm start from day 1"] = run(variant(DAY2, tmp, "warm", True, day1_models),
                                                 os.path.join(tmp, "warm"), args.timeout)
    lines = ["| run | validation AUC | per-user AUC | log loss | wall s | solver iterations (fixed; per-user; per-movie) |",
             "|---|---:|---:|---:|---:|---|"]
    for name, r in out.items():
        w = r["work"]
        lines.append(f"| {name} | {r['auc']:.4f} | {r['auc_by_user'] or float('nan'):.4f} | {r['logloss']:.4f} | "
                     f"{r['wall_s']:.1f} | {w.get('global', 0)}; {w.get('per-user', 0)}; {w.get('per-movie', 0)} |")
    table = "\n".join(lines)
    print(table)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=1)
    if args.results:
        sys.path.insert(0, HERE)
        import results_md

        results_md.update(args.results, "daily", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""End to end: ``gdmix run`` on a config (default MovieLens-100K, 3 coordinates, 2
iterations), embedded, from a fresh work directory; where the time goes per stage.

Runs the CLI as a subprocess (``--restart``, so nothing is skipped), reads the driver's
progress lines (``[  t s] <what> <stage> <seconds>s  <detail>``) and sums their seconds by
kind: Spark start, prepare, partition, train (fixed effect / random effect apart),
metrics, finalize; the rest of the wall time is the CLI's start-up (interpreter, imports)
and Spark's shutdown. Fetches MovieLens first if ``data/ml100k`` is missing.

    python benchmarks/end_to_end.py --out benchmarks/results/end_to_end.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
LINE = re.compile(r"^\[\s*([\d.]+)s\]\s+(\S+)\s+(\S+)\s+([\d.]+)s\s*(.*)$")


def gdmix() -> str:
    exe = os.path.join(os.path.dirname(sys.executable), "gdmix")
    return exe if os.path.exists(exe) else "gdmix"


def parse(stdout: str) -> list[dict]:
    out = []
    for line in stdout.splitlines():
        m = LINE.match(line.strip())
        if m:
            out.append({"at": float(m[1]), "what": m[2], "stage": m[3], "seconds": float(m[4]), "detail": m[5]})
    return out


def kind(rec: dict, types: dict[str, str]) -> str:
    if rec["stage"] == "train":
        coord = rec["what"].split("/", 1)[-1]
        return "train (fixed effect)" if types.get(coord) == "fixed_effect" else "train (random effect)"
    return {"start": "spark start", "report": "finalize"}.get(rec["stage"], rec["stage"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=os.path.join(ROOT, "examples", "movielens.yaml"))
    ap.add_argument("--workdir", help="default: a temporary directory")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    with open(args.config) as fh:
        raw = yaml.safe_load(fh)
    types = {c["name"]: c["type"] for c in raw["coordinates"]}
    if "ml100k" in str(raw["data"]["train"]) and not os.path.exists(os.path.join(ROOT, "data", "ml100k")):
        subprocess.run([gdmix(), "movielens", "--out", os.path.join(ROOT, "data", "ml100k")], check=True, cwd=ROOT)

    env = {**os.environ, "SPARK_LOCAL_IP": os.environ.get("SPARK_LOCAL_IP", "127.0.0.1")}
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        wd = args.workdir or os.path.join(tmp, "run")
        load0 = os.getloadavg()
        t = time.perf_counter()
        r0 = os.times()
        proc = subprocess.run([gdmix(), "run", args.config, "--workdir", wd, "--restart"], cwd=ROOT, env=env,
                              capture_output=True, text=True)
        wall = time.perf_counter() - t
        r1 = os.times()
    if proc.returncode:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        return proc.returncode
    recs = parse(proc.stdout)
    by_kind: dict[str, float] = {}
    for r in recs:
        k = kind(r, types)
        by_kind[k] = round(by_kind.get(k, 0.0) + r["seconds"], 2)
    staged = sum(r["seconds"] for r in recs)
    by_kind["CLI start-up, Spark stop, other"] = round(wall - staged, 2)
    auc = re.findall(r"^\s*\d+\s+\S+\s+([\d.]+)\s+[\d.]+\s+[\d.]+\s*$", proc.stdout, re.M)
    out = {"config": os.path.relpath(args.config, ROOT), "wall_s": round(wall, 2),
           "children_cpu_s": round((r1.children_user - r0.children_user) + (r1.children_system - r0.children_system), 1),
           "by_kind_s": by_kind, "steps": recs, "final_validation_auc": float(auc[-1]) if auc else None,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": f"{platform.machine()}, {os.cpu_count()} cpus", "load_before": load0,
           "load_after": os.getloadavg()}
    for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"{k:<34} {v:7.1f} s  {100 * v / wall:5.1f} %")
    print(f"{'wall':<34} {wall:7.1f} s   (children CPU {out['children_cpu_s']} s; final AUC {out['final_validation_auc']})")
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``l2: auto`` against the hand-set λ: validation AUC and wall time on MovieLens-100K.

Runs ``gdmix run CONFIG --restart`` (the CLI, a subprocess, a fresh temporary work
directory) for the demo config (examples/movielens.yaml, hand-set λ) and the estimated
one (examples/movielens-auto.yaml), interleaved ``--repeats`` times so both see the same
machine load; reports each run's wall time (the driver's own "wall time" line) and final
validation AUC, the median time ratio auto / demo, and the λ each auto coordinate ended
with (its last step's l2.json).

    python benchmarks/l2_auto.py --repeats 2 --out benchmarks/results/l2_auto.json --results benchmarks/RESULTS.md
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CONFIGS = {"demo": os.path.join(ROOT, "examples", "movielens.yaml"),
           "auto": os.path.join(ROOT, "examples", "movielens-auto.yaml")}
WALL = re.compile(r"^wall time ([\d.]+) s", re.M)


def run_once(config: str, workdir: str, timeout_s: float) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, "-m", "gdmix.cli", "run", config, "--workdir", workdir, "--restart"],
                          capture_output=True, text=True, timeout=timeout_s, env=os.environ.copy())
    if proc.returncode != 0:
        raise RuntimeError(f"gdmix run {config} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    with open(os.path.join(workdir, "metrics.json")) as f:
        last = json.load(f)[-1]
    # CPU of the processes the run reaped: the driver process and its TF workers (Spark's
    # JVM is left to exit after the driver, so it is not counted)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {"wall_s": float(WALL.findall(proc.stdout)[-1]), "cpu_s": round(cpu, 1), "auc": last["auc"],
            "logloss": last.get("logloss")}


def final_lambdas(workdir: str) -> dict:
    """Each auto coordinate's λ of its last step (iter-K/<coordinate>/l2.json)."""
    out = {}
    for it in sorted((d for d in os.listdir(workdir) if d.startswith("iter-")), key=lambda d: int(d[5:])):
        for coord in sorted(os.listdir(os.path.join(workdir, it))):
            path = os.path.join(workdir, it, coord, "l2.json")
            if os.path.exists(path):
                with open(path) as f:
                    out[coord] = json.load(f)["used"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds before one run is killed")
    ap.add_argument("--out")
    ap.add_argument("--results", help="rewrite this benchmark's block of this Markdown file (RESULTS.md)")
    args = ap.parse_args(argv)
    runs, lambdas = [], {}
    with tempfile.TemporaryDirectory(prefix="gdmix-l2-auto-") as tmp:
        for r in range(args.repeats):
            for name in ("demo", "auto") if r % 2 == 0 else ("auto", "demo"):
                wd = os.path.join(tmp, f"{name}-{r}")
                rec = {"config": name, "repeat": r, **run_once(CONFIGS[name], wd, args.timeout)}
                print(json.dumps(rec), flush=True)
                runs.append(rec)
                if name == "auto":
                    lambdas = final_lambdas(wd)
    med = {n: statistics.median(x["wall_s"] for x in runs if x["config"] == n) for n in CONFIGS}
    cpu = {n: statistics.median(x["cpu_s"] for x in runs if x["config"] == n) for n in CONFIGS}
    auc = {n: statistics.median(x["auc"] for x in runs if x["config"] == n) for n in CONFIGS}
    doc = {"runs": runs, "median_wall_s": med, "median_auc": auc, "ratio_auto_to_demo": med["auto"] / med["demo"],
           "median_cpu_s": cpu, "cpu_ratio_auto_to_demo": cpu["auto"] / cpu["demo"],
           "lambdas": lambdas, "load_average_end": os.getloadavg()}
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1)
    lines = ["| config | runs | validation AUC | wall s (median) | wall s (each) | CPU s (median) |",
             "|---|---:|---:|---:|---|---:|"]
    for n in CONFIGS:
        each = [x["wall_s"] for x in runs if x["config"] == n]
        lines.append(f"| {n} (`{os.path.relpath(CONFIGS[n], ROOT)}`) | {len(each)} | {auc[n]:.4f} | "
                     f"{med[n]:.1f} | {', '.join(f'{w:.1f}' for w in each)} | {cpu[n]:.1f} |")
    lines += ["", f"auto / demo (medians, interleaved runs): wall time **{doc['ratio_auto_to_demo']:.2f}×**, "
              f"CPU time of the run's reaped processes (the driver and its TF workers, not Spark's JVM) "
              f"**{doc['cpu_ratio_auto_to_demo']:.2f}×**.", "",
              "| coordinate | λ intercept | λ per feature: median [min, max] |", "|---|---:|---|"]
    for coord, lam in lambdas.items():
        pf = lam.get("per_feature") or [lam["features"]]
        lines.append(f"| {coord} | {lam['intercept']:.3g} | {statistics.median(pf):.3g} [{min(pf):.3g}, {max(pf):.3g}] |")
    print("\n".join(lines))
    if args.results:
        sys.path.insert(0, HERE)
        import results_md

        results_md.update(args.results, "l2_auto", "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""End to end: ``gdmix run`` on a config (default MovieLens-100K, 3 coordinates, 2
iterations), embedded, from a fresh work directory; where the time goes per stage.

Runs the CLI as a subprocess (``--restart``, so nothing is skipped), reads the driver's
progress lines (``[  t s] <what> <stage> <seconds>s  <detail>``) and sums their seconds by
kind: Spark start, prepare, partition, train (fixed effect / random effect apart),
the wait for the last metrics, finalize; the rest of the wall time is the CLI's start-up
(interpreter, imports) and Spark's shutdown. The metrics stages run beside the next steps
(a background thread of the driver): their seconds are listed but not part of that sum.
Fetches MovieLens first if ``data/ml100k`` is missing.

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
import threading
import time

import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import process_tree  # noqa: E402

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


BACKGROUND = "metrics (beside the next steps)"


def kind(rec: dict, types: dict[str, str]) -> str:
    """What a progress line's seconds were spent on; BACKGROUND: not on the run's critical
    path (the driver runs a step's metrics while the next steps partition and train)."""
    if rec["stage"] == "metrics":
        return BACKGROUND
    if rec["stage"] == "wait":
        return "waiting for the last metrics"
    if rec["stage"] == "train":
        coord = rec["what"].split("/", 1)[-1]
        return "train (fixed effect)" if types.get(coord) == "fixed_effect" else "train (random effect)"
    return {"start": "spark start", "report": "finalize", "accelerate": "joint Newton step"}.get(rec["stage"], rec["stage"])


def run_streamed(cmd: list[str], env: dict, timeout_s: float, echo: bool,
                 memory: dict | None = None) -> tuple[int, str]:
    """Run ``cmd`` (stderr into stdout), echoing its lines as they come when ``echo``;
    killed after ``timeout_s`` (returns code -9 then). ``memory``: filled with the peak
    resident bytes of the process tree (``peak_rss``: the driver, Spark's JVM, TF workers)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    timer = threading.Timer(timeout_s, proc.kill)
    timer.start()
    watch = process_tree.Watch(proc.pid, 0.05) if memory is not None else None
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if echo:
                print(line, end="", flush=True)
        proc.wait(timeout=60)
    finally:
        timer.cancel()
        if watch is not None:
            watch.stop()
            memory["peak_rss"] = watch.peak
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, "".join(lines)


def synthetic_config(rows: int, users: int, items: int, global_features: int = 5, user_features: int = 4) -> str:
    """The synthetic example's config pointed at a generated problem of this size (made
    once, kept under data/; the per-user bag holds the global and the user features);
    returns the config's path."""
    shape = "" if (global_features, user_features) == (5, 4) else f"-{global_features}g{user_features}u"
    data = os.path.join(ROOT, "data", f"synthetic-{rows}-{users}-{items}{shape}")
    if not os.path.exists(os.path.join(data, "train")):
        subprocess.run([gdmix(), "synth", "--out", data, "--rows", str(rows), "--users", str(users),
                        "--items", str(items), "--global-features", str(global_features),
                        "--user-features", str(user_features)], check=True, cwd=ROOT, timeout=3600)
    with open(os.path.join(ROOT, "examples", "synthetic.yaml")) as fh:
        raw = yaml.safe_load(fh)
    raw["name"] = f"synthetic-{rows}"
    raw["data"]["train"] = os.path.join(data, "train")
    path = os.path.join(data, "config.yaml")
    with open(path, "w") as fh:
        yaml.safe_dump(raw, fh, sort_keys=False)
    return path


def one_run(args, env: dict, types: dict[str, str]) -> dict | None:
    """One ``gdmix run`` from a fresh work directory: its wall time by kind (None: it failed)."""
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        wd = args.workdir or os.path.join(tmp, "run")
        load0 = os.getloadavg()
        t = time.perf_counter()
        r0, memory = os.times(), {}
        returncode, stdout = run_streamed([gdmix(), "run", args.config, "--workdir", wd, "--restart"], env,
                                          args.timeout, echo=args.progress, memory=memory)
        wall = time.perf_counter() - t
        r1 = os.times()
    if returncode:
        sys.stderr.write(stdout[-8000:] + f"\ngdmix run exited with {returncode}\n")
        return None
    recs = parse(stdout)
    by_kind: dict[str, float] = {}
    for r in recs:
        k = kind(r, types)
        by_kind[k] = round(by_kind.get(k, 0.0) + r["seconds"], 2)
    staged = sum(r["seconds"] for r in recs if kind(r, types) != BACKGROUND)
    by_kind["CLI start-up, Spark stop, other"] = round(wall - staged, 2)
    auc = re.findall(r"^\s*\d+\s+\S+\s+([\d.]+)\s+[\d.]+\s+[\d.]+\s*$", stdout, re.M)
    return {"config": os.path.relpath(args.config, ROOT), "wall_s": round(wall, 2),
            "peak_rss_gb": round(memory["peak_rss"] / 2**30, 2),
            "children_cpu_s": round((r1.children_user - r0.children_user) + (r1.children_system - r0.children_system), 1),
            "by_kind_s": by_kind, "steps": recs, "final_validation_auc": float(auc[-1]) if auc else None,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cpus", "load_before": load0,
            "load_after": os.getloadavg()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=os.path.join(ROOT, "examples", "movielens.yaml"))
    ap.add_argument("--workdir", help="default: a temporary directory")
    ap.add_argument("--out")
    ap.add_argument("--results", help="rewrite this benchmark's block of this Markdown file (RESULTS.md)")
    ap.add_argument("--timeout", type=float, default=4 * 3600, help="seconds before the run is killed")
    ap.add_argument("--progress", action="store_true", help="echo the run's output as it comes")
    ap.add_argument("--synthetic", type=int, nargs=3, metavar=("ROWS", "USERS", "ITEMS"),
                    help="run examples/synthetic.yaml on a generated problem of this size instead "
                         "(data made once with `gdmix synth` under data/)")
    ap.add_argument("--compare", nargs="*", default=[], metavar="LABEL=PYTHONPATH",
                    help="also run these source trees (e.g. before=/tmp/main/src), interleaved with this one")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each tree (interleaved); the best is reported")
    ap.add_argument("--block", help="the RESULTS.md block to rewrite (default: end_to_end[_synthetic])")
    args = ap.parse_args(argv)
    block = "end_to_end"
    if args.synthetic:
        args.config, block = synthetic_config(*args.synthetic), "end_to_end_synthetic"
    block = args.block or block
    with open(args.config) as fh:
        raw = yaml.safe_load(fh)
    types = {c["name"]: c["type"] for c in raw["coordinates"]}
    if "ml100k" in str(raw["data"]["train"]) and not os.path.exists(os.path.join(ROOT, "data", "ml100k")):
        subprocess.run([gdmix(), "movielens", "--out", os.path.join(ROOT, "data", "ml100k")], check=True, cwd=ROOT)

    env = {**os.environ, "SPARK_LOCAL_IP": os.environ.get("SPARK_LOCAL_IP", "127.0.0.1")}
    trees = [("this tree", env.get("PYTHONPATH", ""))] + [tuple(c.split("=", 1)) for c in args.compare]
    runs: dict[str, list[dict]] = {}
    for r in range(args.repeats):  # interleaved: each tree's runs see the same load over time
        for label, pythonpath in trees:
            out = one_run(args, {**env, "PYTHONPATH": pythonpath}, types)
            if out is None:
                return 1
            runs.setdefault(label, []).append(out)
            if len(trees) > 1 or args.repeats > 1:
                print(f"repeat {r + 1}: {label}: wall {out['wall_s']:.1f} s", flush=True)
    out = min(runs["this tree"], key=lambda o: o["wall_s"])
    wall, by_kind = out["wall_s"], out["by_kind_s"]
    for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"{k:<34} {v:7.1f} s  {100 * v / wall:5.1f} %")
    print(f"(shares of the wall time; '{BACKGROUND}' overlaps the other kinds, which add up to the wall)")
    print(f"{'wall':<34} {wall:7.1f} s   (children CPU {out['children_cpu_s']} s; final AUC {out['final_validation_auc']})")
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump({**out, "runs": runs} if len(runs) > 1 or args.repeats > 1 else out, fh, indent=1)
    if args.results:
        sys.path.insert(0, HERE)
        import results_md

        rows = [f"| {k} | {v:.1f} | {100 * v / wall:.1f} % |" for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])]
        compare = []
        if len(trees) > 1:
            compare = ["", f"Compared, interleaved, best of {args.repeats} (wall s; final validation AUC):", "",
                       "| code | wall s (each run) | best | AUC | vs this tree |", "|---|---|---:|---:|---:|"]
            for label, _ in trees:
                best = min(o["wall_s"] for o in runs[label])
                each = ", ".join(f"{o['wall_s']:.1f}" for o in runs[label])
                compare.append(f"| {label} | {each} | {best:.1f} | "
                               f"{runs[label][0]['final_validation_auc']} | {best / wall:.2f}× |")
        results_md.update(args.results, block, "\n".join([
            f"`{out['config']}`: final validation AUC {out['final_validation_auc']}; peak resident memory of "
            f"the run's process tree (driver, Spark's JVM, TF workers) {out['peak_rss_gb']:.2f} GB.", "",
            "| kind | seconds | share of wall |", "|---|---:|---:|", *rows, f"| **wall** | **{wall:.1f}** | |", "",
            f"*{BACKGROUND}* runs beside the other stages (not on the critical path); the other "
            "rows add up to the wall time.", *compare]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

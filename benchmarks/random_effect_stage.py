"""The random-effect stage as a user runs it: the whole ``gdmix train`` process of one
per-entity step (interpreter, imports, reading the partition, the solve, scores and
models written), the default solver against ``solver: scipy``, with the peak RSS of the
process tree against the size of what the stage reads.

The problem: ``gdmix synth`` rows (``--rows``, ``--users``; 10 global + 10 user features
in one name-term-value column, which the per-user bag reads: 20 features) under a config
with the per-user random effect alone, prepared and partitioned once by the CLI. Each
repeat then trains the same partition with each solver, interleaved, from a fresh
process; ``--pythonpath`` adds other source trees (e.g. the code before a change) run the
same way on the same partition.

*Input* is the partition's two splits (what the stage reads) as Arrow tables in memory;
*peak RSS* the largest sum of the resident sets of the process and its children, sampled
every 10 ms from /proc; *above imports*: that peak less the RSS of a process that only
imports what the stage imports (interpreter, numpy, pyarrow, numba: the floor of any
process running the stage). *CPU s* is the process tree's user + system time (its pool
workers included): on a loaded machine it moves far less than the wall time, so the
speed-up is given by both. ``solver: scipy`` runs ``--scipy-repeats`` times (it takes
minutes; 0: not run, and the table says so), the default solver ``--repeats`` times;
``--pythonpath`` trees run the default solver only (the scipy reference is the same code
in both).

    python benchmarks/random_effect_stage.py --rows 470000 --users 30000 --results benchmarks/RESULTS.md
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import process_tree  # noqa: E402
COORD = "per-user"


def timed(cmd: list[str], env: dict, timeout_s: float) -> tuple[float, int, float]:
    """(wall seconds, peak RSS of the process tree, CPU seconds of the tree) of ``cmd``;
    killed after ``timeout_s``."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group: a timeout ends its pool too
    watch = process_tree.Watch(proc.pid, 0.01)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
        watch.stop()
        print(f"{' '.join(cmd)}: still running after {timeout_s:.0f} s ({watch.cpu_s:.0f} s CPU), killed", flush=True)
        return float("inf"), watch.peak, watch.cpu_s
    finally:
        watch.stop()
    wall = time.perf_counter() - t
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{out[-4000:]}")
    return wall, watch.peak, watch.cpu_s  # (to the last 10 ms sample)


def imports_rss(env: dict) -> int:
    """RSS of a process that imports what a random-effect stage imports and loads its
    compiled kernels, and does nothing else."""
    code = ("import importlib\n"
            "for m in ('gdmix.cli', 'gdmix.kinds', 'gdmix.random_effect.stage', 'gdmix.random_effect.vectorised',"
            " 'gdmix.random_effect.row_scores', 'pyarrow.parquet'):\n"
            "    try:\n        importlib.import_module(m)\n    except ImportError:\n        pass\n"
            "from gdmix.random_effect import vectorised\nvectorised.warm_up()  # the compiled kernels, loaded\n"
            "try:\n    from gdmix.random_effect import row_scores\n"
            "    import numpy as np\n    z = np.zeros(1, np.int64)\n"
            "    row_scores.scores(z - 1, np.zeros(2, np.int64), np.zeros(0, np.int32), np.zeros(0), z[:1] * 0,"
            " np.zeros(0, np.int32), np.zeros(0), np.zeros(0))\nexcept ImportError:\n    pass\n"
            "print(open('/proc/self/status').read().split('VmRSS:')[1].split()[0])")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, check=True)
    return int(out.stdout.strip()) * 1024


def problem(rows: int, users: int, env: dict) -> str:
    """A prepared and partitioned work directory (made once under data/); its path."""
    data = os.path.join(ROOT, "data", f"re-stage-{rows}-{users}")
    wd = os.path.join(data, "work")
    if os.path.exists(os.path.join(wd, "iter-0", COORD, "_DONE-partition.json")):
        return wd
    py = [sys.executable, "-m", "gdmix.cli"]
    if not os.path.exists(os.path.join(data, "train")):
        from gdmix.data import synthetic

        synthetic.generate(data, n_rows=rows, n_users=users, n_items=10, n_global=10, n_user_features=10,
                           weight=True, offset=True, seed=1)
    cfg = {"name": "re-stage", "workdir": wd,
           "data": {"train": os.path.join(data, "train"), "validation_fraction": 0.2,
                    "feature_bags": {"per_user": {"ntv": "global_features"}}},
           "iterations": 1,
           "coordinates": [{"name": COORD, "type": "random_effect", "entity": "user_id",
                            "feature_bag": "per_user", "l2": 1.0}]}
    path = os.path.join(data, "config.yaml")
    with open(path, "w") as fh:
        yaml.safe_dump(cfg, fh, sort_keys=False)
    subprocess.run(py + ["prepare", "--config", path, "--workdir", wd], check=True, cwd=ROOT, env=env, timeout=1800)
    subprocess.run(py + ["partition", "--workdir", wd, "--iteration", "0", "--coordinate", COORD],
                   check=True, cwd=ROOT, env=env, timeout=1800)
    return wd


def with_solver(wd: str, solver: str, dest: str) -> str:
    """A copy of the work directory whose config snapshot names ``solver`` (no step trained)."""
    shutil.copytree(wd, dest, ignore=shutil.ignore_patterns("shards", "scores", "coefficients", "_DONE-train.json"))
    with open(os.path.join(dest, "config.yaml")) as fh:
        raw = yaml.safe_load(fh)
    raw["workdir"] = dest
    raw["coordinates"][0]["solver"] = solver
    with open(os.path.join(dest, "config.yaml"), "w") as fh:
        yaml.safe_dump(raw, fh, sort_keys=False)
    return dest


def input_bytes(wd: str) -> int:
    """The partition's two splits as Arrow tables in memory: what the stage reads."""
    import pyarrow.dataset as pads

    return sum(pads.dataset(os.path.join(wd, "iter-0", COORD, "partition", s), format="parquet",
                            partitioning="hive").to_table().nbytes for s in ("train", "validation"))


def clear(wd: str) -> None:
    step = os.path.join(wd, "iter-0", COORD)
    for name in ("shards", "scores", "coefficients"):
        shutil.rmtree(os.path.join(step, name), ignore_errors=True)
    for name in ("_DONE-train.json",):
        if os.path.exists(os.path.join(step, name)):
            os.remove(os.path.join(step, name))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=470_000)
    ap.add_argument("--users", type=int, default=30_000)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--scipy-repeats", type=int, default=1)
    ap.add_argument("--pythonpath", nargs="*", default=[], metavar="LABEL=SRC",
                    help="also run these source trees (e.g. before=/tmp/base/src), same partition")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--out")
    ap.add_argument("--results", help="rewrite this benchmark's block of this Markdown file (RESULTS.md)")
    args = ap.parse_args(argv)
    env = {**os.environ, "SPARK_LOCAL_IP": os.environ.get("SPARK_LOCAL_IP", "127.0.0.1"),
           "TF_CPP_MIN_LOG_LEVEL": "2"}
    wd = problem(args.rows, args.users, env)
    size = input_bytes(wd)
    trees = [("this tree", env.get("PYTHONPATH", ""))] + [tuple(p.split("=", 1)) for p in args.pythonpath]
    floor = {label: imports_rss({**env, "PYTHONPATH": pp}) for label, pp in trees}
    results: dict[tuple[str, str], list[tuple[float, int, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-re-stage-") as tmp:
        solvers = ("vectorised", "scipy") if args.scipy_repeats > 0 else ("vectorised",)
        dirs = {s: with_solver(wd, s, os.path.join(tmp, s)) for s in solvers}
        for r in range(max(args.repeats, args.scipy_repeats)):
            for label, pp in trees:
                for solver, d in dirs.items():
                    n = args.scipy_repeats if solver == "scipy" else args.repeats
                    if r >= n or (solver == "scipy" and label != trees[0][0]):
                        continue
                    clear(d)
                    cmd = [sys.executable, "-m", "gdmix.cli", "train", "--workdir", d, "--iteration", "0",
                           "--coordinate", COORD]
                    wall, peak, cpu = timed(cmd, {**env, "PYTHONPATH": pp}, args.timeout)
                    results.setdefault((label, solver), []).append((wall, peak, cpu))
                    print(f"repeat {r + 1}: {label:<10} {solver:<10} {wall:7.2f} s wall, {cpu:7.2f} s CPU, peak "
                          f"RSS {peak / 1e6:5.0f} MB ({(peak - floor[label]) / 1e6:.0f} MB above imports)",
                          flush=True)
    # a scipy run past --timeout counts as (inf wall, its CPU so far): the speed-ups are then lower bounds;
    # --scipy-repeats 0: not run, its figures None
    sci = results.get((trees[0][0], "scipy"))
    sci_wall, sci_cpu = (min(w for w, _, _ in sci), min(c for _, _, c in sci)) if sci else (None, None)
    table = []
    for label, _ in trees:
        runs = results[(label, "vectorised")]
        vec, cpu, peak = min(w for w, _, _ in runs), min(c for _, _, c in runs), max(p for _, p, _ in runs)
        table.append({"code": label, "vectorised_s": round(vec, 2), "vectorised_cpu_s": round(cpu, 2),
                      "scipy_s": None if sci is None else round(sci_wall, 2),
                      "scipy_cpu_s": None if sci is None else round(sci_cpu, 2),
                      "speedup": None if sci is None else sci_wall / vec,
                      "speedup_cpu": None if sci is None else round(sci_cpu / cpu, 1),
                      "peak_rss_mb": round(peak / 1e6), "imports_rss_mb": round(floor[label] / 1e6),
                      "peak_over_input": round(peak / size, 2),
                      "above_imports_over_input": round((peak - floor[label]) / size, 2)})
    print(json.dumps(table, indent=1))
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump({"rows": args.rows, "users": args.users, "input_bytes": size, "table": table,
                       "runs": {f"{k[0]}/{k[1]}": v for k, v in results.items()}}, fh, indent=1)
    if args.results:
        sys.path.insert(0, HERE)
        import results_md

        killed = sci_wall == float("inf")  # scipy ran past --timeout: its figures are lower bounds
        sci_txt = ("not run" if sci is None else f"> {args.timeout:.0f} (killed) / > {sci_cpu:.0f}" if killed
                   else f"{sci_wall:.2f} / {sci_cpu:.2f}")

        def speedup(t):
            if sci is None:
                return "not run | "
            if killed:
                return f"**> {args.timeout / t['vectorised_s']:.0f}× / > {t['speedup_cpu']:.1f}×** | "
            return f"**{t['speedup']:.1f}× / {t['speedup_cpu']:.1f}×** | "

        lines = [f"| {t['code']} | {t['vectorised_s']:.2f} / {t['vectorised_cpu_s']:.2f} | {sci_txt} | "
                 + speedup(t) +
                 f"{t['peak_rss_mb']} ({t['peak_over_input']:.1f}×) | {t['imports_rss_mb']} | "
                 f"**{t['above_imports_over_input']:.2f}×** |" for t in table]
        results_md.update(args.results, "random_effect_stage", "\n".join([
            f"`gdmix train` of one per-entity step, whole processes: {args.rows:,} synthetic rows, "
            f"{args.users:,} users, 20 features; input (the partition's two splits in Arrow) "
            f"{size / 1e6:.0f} MB. Default solver: best of {args.repeats}; `solver: scipy` (this tree's, "
            f"the same code as before): " + (f"best of {args.scipy_repeats}" if sci else "not run")
            + "; interleaved.", "",
            "| code | default solver: wall s / CPU s | `solver: scipy`: wall s / CPU s | speed-up (wall / CPU) "
            "| peak RSS MB (/ input) | imports alone MB | peak above imports / input |",
            "|---|---:|---:|---:|---:|---:|---:|", *lines]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

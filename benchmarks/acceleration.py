"""The joint Newton step (docs/design.md §2.5): ``gdmix run`` with ``acceleration: newton``
against ``acceleration: none`` (plain block descent with §2.3), interleaved, on one config
(default MovieLens-100K, 3 coordinates); the relative gap to the joint optimum and the
validation AUC after each pass, the time at which each pass ends and the wall time of each run.

Each run is the CLI in a subprocess from a fresh work directory (``--restart``); the
objective and AUC per step come from its ``metrics.json``; the joint optimum is
``gdmix.joint.joint_optimum`` on the first run's prepared rows (the same rows for every
run: prepare is deterministic). The ratio of the wall times is taken within this run, so
the machine's load weighs on both sides alike; the order alternates between repeats, so
neither setting always finds the caches warmed by the other.

    python benchmarks/acceleration.py --passes 3 --repeats 3 --out benchmarks/results/acceleration.json \\
        --results benchmarks/RESULTS.md
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import end_to_end  # noqa: E402  (the CLI path and the streamed subprocess)

ROOT = end_to_end.ROOT
SETTINGS = ("newton", "none")


def _config(src: str, tmp: str, acceleration: str, passes: int) -> str:
    with open(src) as fh:
        raw = yaml.safe_load(fh)
    base = os.path.dirname(os.path.abspath(src))
    for k in ("train", "validation"):  # relative input paths are the config file's
        if raw["data"].get(k) and not os.path.isabs(raw["data"][k]) and "://" not in raw["data"][k]:
            raw["data"][k] = os.path.normpath(os.path.join(base, raw["data"][k]))
    raw.update(iterations=passes, acceleration=acceleration)
    path = os.path.join(tmp, f"{acceleration}.yaml")
    with open(path, "w") as fh:
        yaml.safe_dump(raw, fh, sort_keys=False)
    return path


def _passes(records: list[dict]) -> list[dict]:
    """Per pass, the record of its last step (the joint step when there is one)."""
    last = {}
    for r in records:
        last[r["iteration"]] = r
    return [last[k] for k in sorted(last)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=os.path.join(ROOT, "examples", "movielens.yaml"))
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3, help="runs of each setting, interleaved")
    ap.add_argument("--out")
    ap.add_argument("--results", help="rewrite this benchmark's block of this Markdown file (RESULTS.md)")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--block", default="acceleration", help="the RESULTS.md block to rewrite")
    ap.add_argument("--no-joint", action="store_true",
                    help="no joint solve (too large for one): gaps against the lowest objective any run reached")
    args = ap.parse_args(argv)

    env = {**os.environ, "SPARK_LOCAL_IP": os.environ.get("SPARK_LOCAL_IP", "127.0.0.1")}
    runs = {a: [] for a in SETTINGS}
    optimum = None
    with tempfile.TemporaryDirectory(prefix="bench-accel-") as tmp:
        for rep in range(args.repeats):
            for acc in (SETTINGS if rep % 2 == 0 else SETTINGS[::-1]):  # alternate who runs first (warm caches)
                cfg = _config(args.config, tmp, acc, args.passes)
                wd = os.path.join(tmp, f"run-{acc}-{rep}")
                t = time.perf_counter()
                rc, stdout = end_to_end.run_streamed([end_to_end.gdmix(), "run", cfg, "--workdir", wd, "--restart"],
                                                     env, args.timeout, echo=False)
                wall = time.perf_counter() - t
                if rc:
                    sys.stderr.write(stdout[-8000:] + f"\ngdmix run exited with {rc}\n")
                    return rc or 1
                with open(os.path.join(wd, "metrics.json")) as fh:
                    recs = json.load(fh)
                lines = end_to_end.parse(stdout)
                joint_s = sum(r["seconds"] for r in lines if r["stage"] == "accelerate")
                ends = [max(r["at"] for r in lines if r["what"].startswith(f"iter-{k}/")
                            and r["stage"] in ("train", "accelerate")) for k in range(args.passes)]
                runs[acc].append({"wall_s": round(wall, 2), "joint_step_s": round(joint_s, 2),
                                  "passes": [{"objective": p["objective"], "auc": p.get("auc"), "end_s": e}
                                             for p, e in zip(_passes(recs), ends)]})
                print(f"{acc:<7} run {rep}: wall {wall:6.1f} s, joint steps {joint_s:5.1f} s, final objective "
                      f"{recs[-1]['objective']:.6f}, AUC {recs[-1].get('auc')}", flush=True)
                if optimum is None and not args.no_joint:
                    from gdmix import config as gconfig
                    from gdmix import joint

                    t = time.perf_counter()
                    optimum = joint.joint_optimum(gconfig.load_run(wd), wd).objective
                    print(f"joint optimum {optimum:.6f} ({time.perf_counter() - t:.1f} s)", flush=True)

    reference = "joint optimum (`gdmix.joint`)"
    if args.no_joint:
        optimum = min(p["objective"] for a in SETTINGS for r in runs[a] for p in r["passes"])
        reference = "lowest objective any run reached (no joint solve at this size: the gaps are lower bounds)"

    def gap(v):
        return (v - optimum) / abs(optimum)

    config = os.path.relpath(args.config, ROOT) if args.config.startswith(ROOT) else args.config
    out = {"config": config, "passes": args.passes, "repeats": args.repeats,
           "reference_objective": optimum, "reference": reference, "runs": runs,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": f"{platform.machine()}, {os.cpu_count()} cpus", "load_after": os.getloadavg()}
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB -> GiB: the largest child
    out["largest_process_gb"] = round(peak_gb, 2)
    rows = []
    for acc in SETTINGS:
        first = runs[acc][0]["passes"]
        for k, p in enumerate(first):
            end = statistics.median(r["passes"][k]["end_s"] for r in runs[acc])
            rows.append(f"| {acc} | {k + 1} | {p['objective']:.6f} | {gap(p['objective']):.1e} | "
                        f"{p['auc']:.4f} | {end:.1f} |")
    walls = {a: statistics.median(r["wall_s"] for r in runs[a]) for a in SETTINGS}
    joint_s = statistics.median(r["joint_step_s"] for r in runs["newton"])
    for r in rows:
        print(r)
    print(f"median wall: newton {walls['newton']:.1f} s, none {walls['none']:.1f} s "
          f"(ratio {walls['newton'] / walls['none']:.2f}); joint steps {joint_s:.1f} s per run")
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump(out, fh, indent=1)
    if args.results:
        import results_md

        results_md.update(args.results, args.block, "\n".join([
            f"`{out['config']}`, {args.passes} passes; reference objective {optimum:.6f}: the {reference}.", "",
            "| acceleration | after pass | objective | relative gap | validation AUC | pass ends at (s) |",
            "|---|---:|---:|---:|---:|---:|", *rows, "",
            "*pass ends at*: seconds from the run's start to the end of the pass's last training "
            "or joint step (median over the runs).", "",
            f"Wall time, median of {args.repeats} interleaved runs each: newton {walls['newton']:.1f} s, "
            f"none {walls['none']:.1f} s (ratio {walls['newton'] / walls['none']:.2f}); the joint steps "
            f"{joint_s:.1f} s of the newton run. Largest process of any run: {peak_gb:.2f} GB resident."]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

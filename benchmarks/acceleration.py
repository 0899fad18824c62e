"""The joint Newton step (docs/design.md §2.5): ``gdmix run`` with ``acceleration: newton``
against ``acceleration: none`` (plain block descent with §2.3), interleaved, on one config
(default MovieLens-100K, 3 coordinates); the relative gap to the joint optimum and the
validation AUC after each pass, the time at which each pass ends and the wall time of each run.

Each run is the CLI in a subprocess from a fresh work directory (``--restart``); the
objective and AUC per step come from its ``metrics.json``; the joint optimum is
``gdmix.joint.joint_optimum`` on the first run's prepared rows (the same rows for every
run: prepare is deterministic), or with ``--reference newton`` (problems too large for a
direct solve) Newton's method on the same objective from the newton run's last point,
to a gradient of 1e-8 (``gdmix.joint_newton.minimise``), with that optimum's validation
AUC. Memory is the peak resident set of each run's whole process tree. The ratio of the wall times is taken within this run, so
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


def _joint_reference(wd: str) -> tuple[float, str]:
    from gdmix import config, joint

    return joint.joint_optimum(config.load_run(wd), wd).objective, "joint optimum (`gdmix.joint`)"


def _newton_reference(wd: str) -> tuple[float, str]:
    """Newton's method on F (``joint_newton.minimise``) from the run's last point: the
    optimum to ‖∇F‖∞ ≤ 1e-8, and its validation AUC (exact, ``gdmix.auc.auc_reference``)."""
    from gdmix import accelerate, config, joint, joint_newton, layout, plan, schema, storage
    from gdmix.auc import auc_reference

    cfg = config.load_run(wd)
    moved = plan.accelerated(cfg)
    point = accelerate.load(cfg, wd, plan.state(cfg, None), moved)
    if point.held:
        raise SystemExit(f"--reference newton: {point.held} are held fixed by the joint step; use --reference joint")
    theta, history = joint_newton.minimise(point.problem, point.theta, gtol=1e-8)
    val = storage.read_table(layout.prepared(wd, "validation"), columns=accelerate.columns(cfg, moved))
    score = val.column(schema.OFFSET).to_numpy().astype(float) + sum(
        joint.design(b, val) @ part for b, part in zip(point.blocks, point.problem.parts(theta)))
    auc = auc_reference(score, val.column(schema.LABEL).to_numpy(), val.column(schema.WEIGHT).to_numpy())
    last = history[-1]
    return last.objective_after, (f"joint optimum by Newton's method from the newton run's last point "
                                  f"({len(history)} steps, ‖∇F‖∞ {last.gradient_norm:.1e} at the last one's start; "
                                  f"validation AUC {auc:.4f})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=os.path.join(ROOT, "examples", "movielens.yaml"))
    ap.add_argument("--synthetic", type=int, nargs=5, metavar=("ROWS", "USERS", "ITEMS", "GLOBAL", "USER"),
                    help="instead of --config: examples/synthetic.yaml on a generated problem of this size "
                         "(GLOBAL global and USER user features; the per-user bag has both)")
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3, help="runs of each setting, interleaved")
    ap.add_argument("--out")
    ap.add_argument("--results", help="rewrite this benchmark's block of this Markdown file (RESULTS.md)")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--block", default="acceleration", help="the RESULTS.md block to rewrite")
    ap.add_argument("--reference", choices=("joint", "newton"), default="joint",
                    help="the optimum the gaps are measured to: `gdmix.joint`'s direct solve, or (for problems "
                         "too large for it) Newton's method on F from the first newton run's last point")
    args = ap.parse_args(argv)
    if args.synthetic:
        args.config = end_to_end.synthetic_config(*args.synthetic)

    env = {**os.environ, "SPARK_LOCAL_IP": os.environ.get("SPARK_LOCAL_IP", "127.0.0.1")}
    runs = {a: [] for a in SETTINGS}
    optimum, reference = None, None
    with tempfile.TemporaryDirectory(prefix="bench-accel-") as tmp:
        for rep in range(args.repeats):
            for acc in (SETTINGS if rep % 2 == 0 else SETTINGS[::-1]):  # alternate who runs first (warm caches)
                cfg = _config(args.config, tmp, acc, args.passes)
                wd = os.path.join(tmp, f"run-{acc}-{rep}")
                t, memory = time.perf_counter(), {}
                rc, stdout = end_to_end.run_streamed([end_to_end.gdmix(), "run", cfg, "--workdir", wd, "--restart"],
                                                     env, args.timeout, echo=False, memory=memory)
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
                                  "peak_rss_gb": round(memory["peak_rss"] / 2**30, 2),
                                  "passes": [{"objective": p["objective"], "auc": p.get("auc"), "end_s": e}
                                             for p, e in zip(_passes(recs), ends)]})
                print(f"{acc:<7} run {rep}: wall {wall:6.1f} s, joint steps {joint_s:5.1f} s, final objective "
                      f"{recs[-1]['objective']:.6f}, AUC {recs[-1].get('auc')}, process tree peak "
                      f"{runs[acc][-1]['peak_rss_gb']:.2f} GB", flush=True)
                if optimum is None and (args.reference == "joint" or acc == "newton"):
                    t = time.perf_counter()
                    optimum, reference = (_joint_reference if args.reference == "joint" else _newton_reference)(wd)
                    print(f"reference {optimum:.6f}: {reference} ({time.perf_counter() - t:.1f} s)", flush=True)

    def gap(v):
        return (v - optimum) / abs(optimum)

    config = os.path.relpath(args.config, ROOT) if args.config.startswith(ROOT) else args.config
    out = {"config": config, "passes": args.passes, "repeats": args.repeats,
           "reference_objective": optimum, "reference": reference, "runs": runs,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": f"{platform.machine()}, {os.cpu_count()} cpus", "load_after": os.getloadavg()}
    peaks = {a: max(r["peak_rss_gb"] for r in runs[a]) for a in SETTINGS}  # the process tree's, per setting
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
            f"{joint_s:.1f} s of the newton run. Peak resident memory of the run's process tree (driver, Spark's JVM, "
            f"TF workers): newton {peaks['newton']:.2f} GB, none {peaks['none']:.2f} GB."]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

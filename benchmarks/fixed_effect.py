"""Fixed effect: the TF MultiWorkerMirroredStrategy stage (1 and 2 local workers) vs scipy
L-BFGS-B (``fixed_effect.objective.fit``) on the same objective and the same rows.

The data: ``--rows`` sparse rows over ``--features`` features (``--nnz`` nonzeros per row,
float32 values as prepared data has), labels from a true logistic model, offsets and
weights; a validation split of 10 %. The stage runs exactly as in a pipeline step: a work
directory with the config snapshot, the feature index and partition shards, one worker
process per shard on loopback (``launcher.run_local``), coefficients and scores written.
Reported per solver: wall seconds (the stage: launch to checked outputs, TF start-up
included; the chief's own ``seconds`` from its status), iterations and the objective.

    python benchmarks/fixed_effect.py --rows 1000000 --out benchmarks/results/fixed_effect.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import scipy.sparse as sp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import results_md  # noqa: E402

from gdmix import config, layout, plan, schema, sparse, storage
from gdmix.fixed_effect import data, launcher, objective, stage
from gdmix.fixed_effect.worker import status_url

FE = "global"


def rows(n: int, d: int, nnz: int, seed: int):
    rng = np.random.default_rng(seed)
    cols = rng.integers(0, d, size=(n, nnz))
    cols.sort(axis=1)
    X = sp.csr_matrix((rng.normal(size=n * nnz).astype(np.float32), cols.ravel().astype(np.int32),
                       np.arange(0, n * nnz + 1, nnz, dtype=np.int64)), shape=(n, d))
    X.sum_duplicates()
    beta = rng.normal(scale=0.3, size=d)
    o = rng.normal(scale=0.5, size=n)
    w = rng.uniform(0.5, 2.0, size=n)
    y = (rng.uniform(size=n) < 1 / (1 + np.exp(-(o - 0.4 + X @ beta)))).astype(np.float64)
    return X, y, w, o


def table(uid, X, y, w, o) -> pa.Table:
    idx, val = sparse.to_arrow_lists(X.indptr, X.indices, X.data, value_type=pa.float32())
    return pa.Table.from_arrays([pa.array(uid, pa.int64()), pa.array(y), pa.array(w), pa.array(o), idx, val],
                                schema=data.PARTITION_SCHEMA)


def workdir_for(root: str, workers: int, d: int, l2: float, parts: dict,
                hessian: str = "auto") -> tuple[config.Config, str]:
    wd = os.path.join(root, f"w{workers}-{hessian}")
    cfg = config.parse({
        "name": "bench-fe", "workdir": wd,
        "data": {"train": "unused", "feature_bags": {"g": {"columns": [f"f{j}" for j in range(d)]}}},
        "iterations": 1,
        "coordinates": [{"name": FE, "type": "fixed_effect", "feature_bag": "g", "l2": l2, "workers": workers,
                         "hessian": hessian}],
        "timeouts": {"fixed_effect_seconds": 3000, "worker_exit_seconds": 30},
    })
    config.snapshot(cfg)
    storage.write_table(layout.feature_index(wd, "g"), pa.table(
        {"index": pa.array(range(d), pa.int32()), "name": [f"f{j}" for j in range(d)], "term": [""] * d},
        schema=schema.FEATURE_INDEX))
    for split, (X, y, w, o, uid) in parts.items():
        for k in range(workers):
            r = np.arange(k, len(uid), workers)
            storage.write_table(storage.join(data.shard_url(wd, 0, FE, split, k), "part-00000.parquet"),
                           table(uid[r], X[r], y[r], w[r], o[r]))
    return cfg, wd


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--features", type=int, default=200)
    ap.add_argument("--nnz", type=int, default=10)
    ap.add_argument("--l2", type=float, default=1.0)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--hessian", nargs="+", default=["auto"], choices=["auto", "matrix", "products"],
                    help="the TF stage's Newton variant(s) to time")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out")
    ap.add_argument("--results", help="rewrite this benchmark's block of this Markdown file (RESULTS.md)")
    args = ap.parse_args(argv)

    n_val = args.rows // 10
    Xt, yt, wt, ot = rows(args.rows, args.features, args.nnz, args.seed)
    Xv, yv, wv, ov = rows(n_val, args.features, args.nnz, args.seed + 1)
    parts = {"train": (Xt, yt, wt, ot, np.arange(args.rows, dtype=np.int64)),
             "validation": (Xv, yv, wv, ov, np.arange(n_val, dtype=np.int64) + 10 ** 9)}
    X64 = Xt.astype(np.float64)
    out = {"rows": args.rows, "features": args.features, "nnz_per_row": args.nnz, "l2": args.l2,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": f"{platform.machine()}, {os.cpu_count()} cpus, load {os.getloadavg()}", "runs": []}

    ref_obj = None
    for name, newton in (("scipy L-BFGS-B (objective.fit)", False),
                         ("scipy trust-krylov Newton, one process (objective.fit newton=True)", True)):
        t, c = time.perf_counter(), time.process_time()
        b, beta, info = objective.fit(X64, yt, wt, ot, l2=args.l2, regularize_intercept=False, newton=newton)
        out["runs"].append({"solver": name, "wall_s": round(time.perf_counter() - t, 2),
                            "cpu_s": round(time.process_time() - c, 2), "iterations": info.iterations,
                            "objective": info.objective, "converged": info.converged,
                            "grad_inf": info.grad_inf, "message": info.message})
        print(out["runs"][-1], flush=True)
        ref_obj = info.objective if ref_obj is None else ref_obj

    with tempfile.TemporaryDirectory(prefix="bench-fe-") as root:
        for workers, hessian in [(w, h) for h in args.hessian for w in args.workers]:
            cfg, wd = workdir_for(root, workers, args.features, args.l2, parts, hessian)
            t = time.perf_counter()
            sinfo = stage.train(cfg, wd, plan.Step(0, FE), launcher=launcher.run_local)
            wall = time.perf_counter() - t
            chief = storage.read_json(status_url(wd, 0, FE, 0))
            out["runs"].append({"solver": f"TF MultiWorkerMirroredStrategy, {workers} worker(s)",
                                "wall_s": round(wall, 2), "chief_seconds": chief.get("seconds"),
                                "iterations": sinfo["iterations"], "objective": sinfo["objective"],
                                "converged": sinfo["converged"], "grad_inf": sinfo["grad_inf"],
                                "message": sinfo["message"], "method": sinfo["method"],
                                "phases": chief.get("phases"),
                                "rel_diff_vs_lbfgs": (sinfo["objective"] - ref_obj) / abs(ref_obj)})
            print(out["runs"][-1], flush=True)
    out["load_after"] = os.getloadavg()
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump(out, fh, indent=1)
    if args.results:
        results_md.update(args.results, "fixed_effect", markdown_table(out))
    return 0


def markdown_table(out: dict) -> str:
    lines = [f"{out['rows']:,} rows × {out['features']} features ({out['nnz_per_row']} nonzeros per row), "
             f"λ = {out['l2']:g}.", "",
             "| solver | wall s | iterations | objective | ‖∇F‖∞ at the end | converged |",
             "|---|---:|---:|---|---:|---|"]
    for r in out["runs"]:
        name = r["solver"] + (f" ({r['method']})" if r.get("method") else "")
        lines.append(f"| {name} | {r['wall_s']:.2f} | {r['iterations']} | {r['objective']!r} | "
                     f"{r['grad_inf']:.1e} | {'yes' if r['converged'] else 'no'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

"""Random-effect training: the vectorised solver vs the per-entity scipy loop (GDMix's way).

Both run from this process on the same synthetic entities (``synthetic.py``), each the way
the stage runs it with ``--workers`` cores, both to the stage's default tolerance: the
vectorised solver's compiled kernel on that many threads (loaded before the clock), the
scipy loop over a process pool of that many workers (started, and the solver run once in
every worker, before its clock). Above ``--scipy-max`` entities
the scipy loop runs on a random sample of ``--sample`` entities and its time is
extrapolated by the entity count (the table says so): rows per entity are heavy-tailed,
so a small sample's time is noisy (2,000 entities: 1.0-2.0 s for the same work).
Reported per size: wall time of each, the speed ratio, the objectives (sum over the
compared entities, and the largest per-entity relative difference (f_vec − f_scipy)/f_scipy,
positive = vectorised worse), and memory: the input arrays and the process's peak RSS
above what it held before the vectorised solve (sampled every 2 ms; the solve's outputs,
block copies and kernel scratch).

    python benchmarks/random_effect.py --sizes 10000 100000 1000000
    python benchmarks/random_effect.py --quick        # seconds; no timing claims
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import threading
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny per-entity problems: no BLAS threads
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import results_md  # noqa: E402
import synthetic  # noqa: E402

from gdmix.random_effect import scipy_solver, vectorised  # noqa: E402
from gdmix.random_effect.scipy_solver import Settings  # noqa: E402

TIMEOUT_S = 3600.0


def _solve_scipy(ent, settings) -> int:
    scipy_solver.solve_block(ent, settings)
    time.sleep(0.2)  # hold the worker so the other workers take the other tasks
    return os.getpid()


def warm_up(pool, workers: int, ent, settings) -> None:
    """The scipy loop once in every worker before the clocks: a worker's first task imports
    its modules (scipy.sparse, scipy.optimize: tenths of a second)."""
    small = vectorised.take(ent, np.arange(min(64, ent.n_entities)))
    pids = {f.result(timeout=120) for f in [pool.submit(_solve_scipy, small, settings) for _ in range(2 * workers)]}
    if len(pids) < workers:
        print(f"warm-up reached {len(pids)} of {workers} workers", file=sys.stderr)


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakRss:
    """The process's peak RSS while the block runs, sampled on a thread."""

    def __enter__(self):
        self.before = self.peak = _rss_mb()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._done.wait(0.002):
            self.peak = max(self.peak, _rss_mb())

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join(timeout=10)
        self.peak = max(self.peak, _rss_mb())


def run_size(n: int, workers: int, scipy_max: int, sample: int, seed: int, l2: float) -> dict:
    ent = synthetic.entities(n, seed=seed)
    settings = Settings(l2=l2)
    input_mb = synthetic.nbytes(ent) / 2**20
    row = {"entities": n, "rows": int(ent.row_ptr[-1]), "nonzeros": int(len(ent.features.indices)),
           "input_mb": round(input_mb, 1), "workers": workers, "load_before": os.getloadavg()}

    row["kernel_load_s"] = round(vectorised.warm_up(), 2)  # numba's cache (compiled by make install)
    with PeakRss() as mem:
        t0 = time.perf_counter()
        fast = vectorised.solve(ent, settings, workers=workers, timeout=TIMEOUT_S)
        row["vectorised_s"] = time.perf_counter() - t0
    row["rss_before_mb"] = round(mem.before, 1)
    row["solve_peak_mb"] = round(mem.peak - mem.before, 1)
    row["peak_vs_input"] = round((input_mb + row["solve_peak_mb"]) / input_mb, 2)
    # The scipy loop's pool, started and warmed before its clock (the stage, too, keeps
    # one pool for all its shards); its start-up is reported on its own.
    t0 = time.perf_counter()
    pool = vectorised.make_executor(workers)
    row["pool_start_s"] = round(time.perf_counter() - t0, 2)
    warm_up(pool, workers, ent, settings)
    try:
        _scipy(row, ent, fast, settings, pool, n, scipy_max, sample, seed)
    finally:
        vectorised.terminate(pool)
    row["load_after"] = os.getloadavg()
    return row


def _scipy(row, ent, fast, settings, pool, n, scipy_max, sample, seed):
    row["vectorised_iterations_mean"] = round(float(fast.iterations.mean()), 2)
    row["vectorised_not_converged"] = int((~fast.converged & ~fast.separable).sum())

    if n <= scipy_max:
        idx = np.arange(n)
        sub = ent
    else:
        rng = np.random.default_rng(seed + 1)
        idx = np.sort(rng.choice(n, sample, replace=False))
        sub = vectorised.take(ent, idx)
    t0 = time.perf_counter()
    ref = scipy_solver.solve(sub, settings, executor=pool, timeout=TIMEOUT_S)
    measured = time.perf_counter() - t0
    row["scipy_entities_timed"] = len(idx)
    row["scipy_measured_s"] = measured
    row["scipy_s"] = measured * n / len(idx)
    row["scipy_extrapolated"] = bool(len(idx) < n)
    row["speedup"] = row["scipy_s"] / row["vectorised_s"]

    finite = ~ref.separable
    f_fast, f_ref = fast.objective[idx][finite], ref.objective[finite]
    rel = (f_fast - f_ref) / np.abs(f_ref)
    row["objective_vectorised"] = float(f_fast.sum())
    row["objective_scipy"] = float(f_ref.sum())
    row["max_rel_diff"] = float(rel.max(initial=0.0))  # > 0: the vectorised solve is worse
    row["max_abs_rel_diff"] = float(np.abs(rel).max(initial=0.0))
    row["entities_worse_1e-8"] = int((rel > 1e-8).sum())
    row["scipy_not_converged"] = int((~ref.converged & finite).sum())
    row["separable"] = int(ref.separable.sum())


def machine() -> dict:
    mem = ""
    try:
        with open("/proc/meminfo") as fh:
            mem = f"{int(fh.readline().split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    return {"cores": os.cpu_count(), "memory": mem, "python": platform.python_version(),
            "numpy": np.__version__, "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "platform": platform.platform()}


def table(rows: list[dict]) -> str:
    head = ("| entities | rows | input MB | vectorised s | scipy loop s | speed-up | objective vec / scipy "
            "(entities compared) | max rel diff per entity | solve's peak RSS above input MB | "
            "peak / input |\n"
            "|---:|---:|---:|---:|---|---:|---|---:|---:|---:|\n")
    out = []
    for r in rows:
        scipy_s = f"{r['scipy_s']:.1f}"
        if r["scipy_extrapolated"]:
            scipy_s += f" (extrapolated from {r['scipy_entities_timed']} sampled: {r['scipy_measured_s']:.1f} s)"
        out.append(f"| {r['entities']:,} | {r['rows']:,} | {r['input_mb']} | {r['vectorised_s']:.2f} | {scipy_s} | "
                   f"{r['speedup']:.0f}× | {r['objective_vectorised']:.9g} / {r['objective_scipy']:.9g} "
                   f"({r['scipy_entities_timed']:,}) | {r['max_rel_diff']:.1e} | {r['solve_peak_mb']} | "
                   f"{r['peak_vs_input']} |")
    return head + "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--scipy-max", type=int, default=100_000, help="above this many entities, sample the scipy loop")
    ap.add_argument("--sample", type=int, default=20_000, help="entities the scipy loop solves when sampled")
    ap.add_argument("--l2", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a small smoke run (CI): 2,000 entities, 300 sampled")
    ap.add_argument("--out", help="write the rows and the machine as JSON here")
    ap.add_argument("--results", help="rewrite this benchmark's block of this Markdown file (RESULTS.md)")
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.scipy_max, args.sample = [2_000], 500, 300
    rows = []
    for n in args.sizes:
        row = run_size(n, args.workers, args.scipy_max, args.sample, args.seed, args.l2)
        print(json.dumps(row), flush=True)
        rows.append(row)
    print()
    print(table(rows))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump({"machine": machine(), "command": " ".join(sys.argv), "rows": rows}, fh, indent=1)
    if args.results:
        results_md.update(args.results, "random_effect", table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

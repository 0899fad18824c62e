"""CPU time per entity of each random-effect solver, in this one process (no pool).

Wall-clock ratios on a shared machine move with the load; CPU time in one process is the
steadier measure of the solvers themselves. The vectorised solver runs on all
``--entities``; the scipy loop on the first ``--sample`` of them. ``--against REV`` also
times the vectorised solver as it was at git revision REV (interleaved with the current
one, ``--repeats`` times each; the minimum is reported), to measure a change.

    python benchmarks/random_effect_cpu.py --entities 20000 --sample 1000
    python benchmarks/random_effect_cpu.py --entities 100000 --sample 0 --against 803e227 --repeats 3
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import synthetic  # noqa: E402

from gdmix.random_effect import scipy_solver, vectorised  # noqa: E402
from gdmix.random_effect.scipy_solver import Settings  # noqa: E402


def module_at(rev: str):
    """The vectorised solver's module as it was at git revision ``rev``."""
    src = subprocess.run(["git", "show", f"{rev}:src/gdmix/random_effect/vectorised.py"], cwd=os.path.dirname(HERE),
                         capture_output=True, text=True, check=True).stdout
    fd, path = tempfile.mkstemp(suffix=".py", prefix="vectorised_at_")
    with os.fdopen(fd, "w") as fh:
        fh.write(src)
    spec = importlib.util.spec_from_file_location(f"vectorised_at_{rev}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    os.unlink(path)
    return mod


def cpu(fn) -> tuple[float, object]:
    t = time.process_time()
    out = fn()
    return time.process_time() - t, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entities", type=int, default=20_000)
    ap.add_argument("--sample", type=int, default=1_000, help="entities the scipy loop solves (0: skip it)")
    ap.add_argument("--against", help="a git revision: also time its vectorised solver")
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args(argv)
    ent = synthetic.entities(args.entities)
    s = Settings(l2=1.0)
    n = ent.n_entities
    solvers = {"vectorised": vectorised}
    if args.against:
        solvers[f"vectorised at {args.against}"] = module_at(args.against)
    best = {k: float("inf") for k in solvers}
    objective = {}
    for _ in range(max(1, args.repeats)):
        for name, mod in solvers.items():
            t, res = cpu(lambda: mod.solve(ent, s))
            best[name] = min(best[name], t)
            objective[name] = float(res.objective.sum())
    line = [f"load {os.getloadavg()[0]:.1f}"]
    for name in solvers:
        line.append(f"{name} {best[name] / n * 1e3:.4f} ms/entity (objective {objective[name]:.10g})")
    if args.against:
        line.append(f"change {best[f'vectorised at {args.against}'] / best['vectorised']:.2f}x")
    if args.sample:
        sub = vectorised.take(ent, np.arange(min(args.sample, n)))
        ref, _ = cpu(lambda: scipy_solver.solve_block(sub, s))
        ref /= sub.n_entities
        fast = best["vectorised"] / n
        line.append(f"scipy loop {ref * 1e3:.3f} ms/entity, ratio {ref / fast:.1f}")
    print(", ".join(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())

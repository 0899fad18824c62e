"""CPU time per entity of each random-effect solver, in this one process (no pool).

Wall-clock ratios on a shared machine move with the load; CPU time in one process is the
steadier measure of the solvers themselves. The vectorised solver runs on all
``--entities``; the scipy loop on the first ``--sample`` of them.

    python benchmarks/random_effect_cpu.py --entities 20000 --sample 1000
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import synthetic  # noqa: E402

from gdmix.random_effect import scipy_solver, vectorised  # noqa: E402
from gdmix.random_effect.scipy_solver import Settings  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entities", type=int, default=20_000)
    ap.add_argument("--sample", type=int, default=1_000)
    args = ap.parse_args(argv)
    ent = synthetic.entities(args.entities)
    s = Settings(l2=1.0)
    sub = vectorised.take(ent, np.arange(min(args.sample, args.entities)))
    t = time.process_time()
    scipy_solver.solve_block(sub, s)
    ref = (time.process_time() - t) / sub.n_entities
    t = time.process_time()
    vectorised.solve(ent, s)
    fast = (time.process_time() - t) / ent.n_entities
    print(f"scipy loop {ref * 1e3:.3f} ms/entity, vectorised {fast * 1e3:.4f} ms/entity, ratio {ref / fast:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

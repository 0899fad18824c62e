"""Where a pipeline run works: ``<runs_root>/<run id>``, one work directory per KFP run.

Every step of a run computes it from the same two inputs (the ``runs_root`` pipeline
parameter and KFP's run-id placeholder), so recurring runs never share iteration state,
and no step's output has to travel into the iteration loop (kfp.local 2.17 resolves an
upstream task's output inside a ParallelFor to the loop item).
"""
from __future__ import annotations

from gdmix import storage


def workdir_of(runs_root: str, run_id: str) -> str:
    if not run_id or "/" in run_id or run_id.startswith("{{"):
        raise ValueError(f"run_id: expected the KFP run's id, got {run_id!r}")
    return storage.join(runs_root, run_id)

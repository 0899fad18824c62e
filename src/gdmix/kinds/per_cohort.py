"""Kind ``per_cohort``: few, large entities (an occupation, a region × age band) solved
as one block-diagonal problem by data-parallel TF workers (``gdmix.random_effect.cohort``;
a TFJob on a cluster); rows sharded by uid over ``shards`` workers.

``solver: auto`` picks this kind when the train split has at most ``AUTO_MAX_ENTITIES``
entities with at least ``AUTO_MIN_ROWS_PER_ENTITY`` rows each on average (``suits``),
else ``per_entity``; the partition stage resolves it once and records it. A coordinate
chosen so runs in a pipeline compiled for per-entity shards: shard 0 then solves every
entity (its workers local to that pod) and the other shards have nothing to do.
"""
from __future__ import annotations

from gdmix import layout, storage
from gdmix.config import RANDOM_EFFECT
from gdmix.fixed_effect.worker import status_url
from gdmix.kinds.base import NameTermValueKind, Partitioning, TrainContext
from gdmix.random_effect import cohort, stage

AUTO_MAX_ENTITIES = 64
AUTO_MIN_ROWS_PER_ENTITY = 1000


class PerCohort(NameTermValueKind):
    name = "per_cohort"
    type = RANDOM_EFFECT
    selector = ("data_parallel",)
    tf_workers = True

    def suits(self, n_entities: int, n_rows: int) -> bool:
        return 0 < n_entities <= AUTO_MAX_ENTITIES and n_rows >= AUTO_MIN_ROWS_PER_ENTITY * n_entities

    def partitioning(self, coord):
        return Partitioning(by="uid", shards=coord.shards, entity_column=True)

    def train(self, cfg, workdir, step, ctx: TrainContext) -> dict:
        chief = cohort.solve(cfg, workdir, step, ctx.launcher)
        return self._finish(cfg, workdir, step, chief)

    def train_shard(self, cfg, workdir, step, shard, ctx: TrainContext) -> dict:
        if shard:
            return {"shard": shard, "solved_by": "shard 0 (one data-parallel problem)"}
        chief = cohort.solve(cfg, workdir, step, ctx.launcher)
        return {"shard": 0, "objective": chief["objective"], "converged": chief["converged"]}

    def finish(self, cfg, workdir, step) -> dict:
        chief = storage.read_json(status_url(workdir, step.iteration, step.coordinate, 0))
        return self._finish(cfg, workdir, step, chief)

    def _finish(self, cfg, workdir, step, chief: dict) -> dict:
        info = stage.finish(cfg, workdir, step)
        info.update(solver="data_parallel", workers=cfg.coordinate(step.coordinate).shards,
                    iterations=chief["iterations"], converged=chief["converged"], grad_inf=chief["grad_inf"],
                    outcome=chief.get("outcome") or info["outcome"])  # one Newton solve: its outcome
        storage.mark_done(layout.step_dir(workdir, step.iteration, step.coordinate), "train", info)
        return info


KIND = PerCohort()

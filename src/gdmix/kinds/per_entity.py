"""Kind ``per_entity``: a logistic regression per entity (member, item, ...), millions
of tiny problems solved by a compiled damped-Newton kernel on all cores (``solver:
vectorised``) or the per-entity scipy reference (``solver: scipy``); rows sharded by
entity, one pipeline task per shard, then a finish (``gdmix.random_effect.stage``)."""
from __future__ import annotations

from gdmix.config import RANDOM_EFFECT
from gdmix.kinds.base import NameTermValueKind, SHARDED, Partitioning, TrainContext
from gdmix.random_effect import stage

VECTORISED, SCIPY = "vectorised", "scipy"


class PerEntity(NameTermValueKind):
    name = "per_entity"
    type = RANDOM_EFFECT
    selector = (VECTORISED, SCIPY)
    pipeline_tasks = SHARDED

    def partitioning(self, coord):
        return Partitioning(by="entity", shards=coord.shards, entity_column=True)

    def train(self, cfg, workdir, step, ctx: TrainContext) -> dict:
        return stage.train(cfg, workdir, step)

    def train_shard(self, cfg, workdir, step, shard, ctx: TrainContext) -> dict:
        return stage.train_shard(cfg, workdir, step, shard)

    def finish(self, cfg, workdir, step) -> dict:
        return stage.finish(cfg, workdir, step)

    def warm_up(self, cfg, coord) -> None:
        if coord.solver != SCIPY:  # numba's import and the cached kernel's load (≈ 1 s)
            from gdmix.random_effect import vectorised

            vectorised.warm_up()
        if coord.l2_auto is not None:  # the estimate's kernel (docs/design.md §7)
            from gdmix.random_effect import laplace

            laplace.warm_up()


KIND = PerEntity()

"""Kind ``linear``: the fixed effect as a logistic regression over the global bag,
solved by Newton's method on data-parallel TF workers (``gdmix.fixed_effect``)."""
from __future__ import annotations

from gdmix import spark as gspark
from gdmix.config import FIXED_EFFECT
from gdmix.kinds.base import NameTermValueKind, Partitioning, TrainContext


def _stage():
    """The fixed-effect stage (its workers' launcher, scipy): loaded when this kind trains,
    not by every process that looks a kind up (a random-effect shard's)."""
    from gdmix.fixed_effect import stage

    return stage


class Linear(NameTermValueKind):
    name = "linear"
    type = FIXED_EFFECT
    selector = ("linear",)
    tf_workers = True

    def partitioning(self, coord):
        return Partitioning(by="uid", shards=coord.workers, entity_column=False, prepared_first=True)

    def train(self, cfg, workdir, step, ctx: TrainContext) -> dict:
        return _stage().train(cfg, workdir, step, launcher=ctx.launcher, prestarted=ctx.prestarted)

    def serving_workers(self, cfg, coord):
        """At lower CPU priority on a small input (``stage.prestart``)."""
        stage = _stage()
        nice = stage.SMALL_INPUT_NICE if gspark.small_embedded_input(cfg) else 0
        return stage.prestart(coord, cfg.timeouts.fixed_effect_seconds, nice)


KIND = Linear()

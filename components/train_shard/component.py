"""KFP lightweight component: one shard of a sharded kind (``gdmix train --shard S``)."""
from kfp import dsl

from gdmix.kfp.images import image

IMAGE_KIND = "trainer"


def train_shard(workdir: str, iteration: int, coordinate: str, shard: int):
    """Train one shard of a coordinate whose kind trains by shard (a per-entity random
    effect: every entity of the shard).

    Args:
        workdir: the run's work directory (holds the config snapshot from prepare).
        iteration: coordinate-descent pass, from 0.
        coordinate: the coordinate's name.
        shard: shard index, 0 .. shards-1 (the coordinate's ``shards``).
    """
    from gdmix.cli import main

    rc = main(["train", "--workdir", workdir, "--iteration", str(int(iteration)),
               "--coordinate", coordinate, "--shard", str(int(shard))])
    if rc:
        raise RuntimeError(f"gdmix train --shard {shard} exited with code {rc}")


def component(base_image: str | None = None):
    return dsl.component(train_shard, base_image=base_image or image(IMAGE_KIND), install_kfp_package=False)

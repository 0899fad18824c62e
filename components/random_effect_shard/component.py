"""KFP lightweight component: one random-effect shard (``gdmix random-effect --shard S``)."""
from kfp import dsl

from gdmix.kfp.images import image

IMAGE_KIND = "trainer"


def random_effect_shard(workdir: str, iteration: int, coordinate: str, shard: int):
    """Train the models of every entity in one shard of a random-effect coordinate.

    Args:
        workdir: the run's work directory (holds the config snapshot from prepare).
        iteration: coordinate-descent pass, from 0.
        coordinate: the random-effect coordinate's name.
        shard: entity shard index, 0 .. shards-1 (the coordinate's ``shards``).
    """
    from gdmix.cli import main

    rc = main(["random-effect", "--workdir", workdir, "--iteration", str(int(iteration)),
               "--coordinate", coordinate, "--shard", str(int(shard))])
    if rc:
        raise RuntimeError(f"gdmix random-effect --shard {shard} exited with code {rc}")


def component(base_image: str | None = None):
    return dsl.component(random_effect_shard, base_image=base_image or image(IMAGE_KIND),
                         install_kfp_package=False)

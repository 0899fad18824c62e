"""KFP lightweight component: combine a random effect's shards (``gdmix random-effect --finish``)."""
from kfp import dsl

from gdmix.kfp.images import image

IMAGE_KIND = "trainer"


def random_effect_finish(workdir: str, iteration: int, coordinate: str):
    """After every shard: combine the shards' models, score, mark the step trained.

    Args:
        workdir: the run's work directory (holds the config snapshot from prepare).
        iteration: coordinate-descent pass, from 0.
        coordinate: the random-effect coordinate's name.
    """
    from gdmix.cli import main

    rc = main(["random-effect", "--workdir", workdir, "--iteration", str(int(iteration)),
               "--coordinate", coordinate, "--finish"])
    if rc:
        raise RuntimeError(f"gdmix random-effect --finish exited with code {rc}")


def component(base_image: str | None = None):
    return dsl.component(random_effect_finish, base_image=base_image or image(IMAGE_KIND),
                         install_kfp_package=False)

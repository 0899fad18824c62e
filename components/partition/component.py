"""KFP lightweight component: the partition stage (``gdmix partition``)."""
from kfp import dsl

from gdmix.kfp.images import image

IMAGE_KIND = "spark"


def partition(workdir: str, iteration: int, coordinate: str):
    """Offsets from the other coordinates' latest scores; rows sharded for the trainer.

    Refuses to run before the steps it depends on have finished (out of order).

    Args:
        workdir: the run's work directory (holds the config snapshot from prepare).
        iteration: coordinate-descent pass, from 0.
        coordinate: coordinate name from the config.
    """
    from gdmix.cli import main

    rc = main(["partition", "--workdir", workdir, "--iteration", str(int(iteration)), "--coordinate", coordinate])
    if rc:
        raise RuntimeError(f"gdmix partition exited with code {rc}")


def component(base_image: str | None = None):
    return dsl.component(partition, base_image=base_image or image(IMAGE_KIND), install_kfp_package=False)

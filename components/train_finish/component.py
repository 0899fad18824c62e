"""KFP lightweight component: gather a sharded kind's shards (``gdmix train --finish``)."""
from kfp import dsl

from gdmix.kfp.images import image

IMAGE_KIND = "trainer"


def train_finish(runs_root: str, run_id: str, iteration: int, coordinate: str):
    """After every shard: combine the shards' models, score, mark the step trained.

    Args:
        runs_root: the folder of the runs' work directories (pipeline parameter).
        run_id: the KFP run's id; the run works in ``<runs_root>/<run_id>``.
        iteration: coordinate-descent pass, from 0.
        coordinate: the coordinate's name.
    """
    from gdmix.cli import main
    from gdmix.kfp.runs import workdir_of

    workdir = workdir_of(runs_root, run_id)
    rc = main(["train", "--workdir", workdir, "--iteration", str(int(iteration)),
               "--coordinate", coordinate, "--finish"])
    if rc:
        raise RuntimeError(f"gdmix train --finish exited with code {rc}")


def component(base_image: str | None = None):
    return dsl.component(train_finish, base_image=base_image or image(IMAGE_KIND), install_kfp_package=False)

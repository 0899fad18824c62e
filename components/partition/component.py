"""KFP lightweight component: the partition stage (``gdmix partition``)."""
from kfp import dsl

from gdmix.kfp.images import image

IMAGE_KIND = "spark"


def partition(runs_root: str, run_id: str, iteration: int, coordinate: str):
    """Offsets from the other coordinates' latest scores; rows sharded for the trainer.

    Refuses to run before the steps it depends on have finished (out of order).

    Args:
        runs_root: the folder of the runs' work directories (pipeline parameter).
        run_id: the KFP run's id; the run works in ``<runs_root>/<run_id>``.
        iteration: coordinate-descent pass, from 0.
        coordinate: coordinate name from the config.
    """
    from gdmix.cli import main
    from gdmix.kfp.runs import workdir_of

    workdir = workdir_of(runs_root, run_id)
    rc = main(["partition", "--workdir", workdir, "--iteration", str(int(iteration)), "--coordinate", coordinate])
    if rc:
        raise RuntimeError(f"gdmix partition exited with code {rc}")


def component(base_image: str | None = None):
    return dsl.component(partition, base_image=base_image or image(IMAGE_KIND), install_kfp_package=False)

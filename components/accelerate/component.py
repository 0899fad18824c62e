"""KFP lightweight component: the joint Newton step at the end of a pass (``gdmix train
--coordinate _joint``, docs/design.md §2.5)."""
from kfp import dsl

from gdmix.kfp.images import image

IMAGE_KIND = "trainer"


def accelerate(runs_root: str, run_id: str, iteration: int):
    """After a pass's last coordinate: one preconditioned Newton step on the joint objective
    over the convex coordinates (numpy/scipy over the prepared rows), written as those
    coordinates' latest models and scores.

    Args:
        runs_root: the folder of the runs' work directories (pipeline parameter).
        run_id: the KFP run's id; the run works in ``<runs_root>/<run_id>``.
        iteration: coordinate-descent pass, from 0.
    """
    from gdmix.cli import main
    from gdmix.kfp.runs import workdir_of

    workdir = workdir_of(runs_root, run_id)
    rc = main(["train", "--workdir", workdir, "--iteration", str(int(iteration)), "--coordinate", "_joint"])
    if rc:
        raise RuntimeError(f"gdmix train (the joint step) exited with code {rc}")


def component(base_image: str | None = None):
    return dsl.component(accelerate, base_image=base_image or image(IMAGE_KIND), install_kfp_package=False)

"""KFP lightweight component: the fixed-effect stage (``gdmix fixed-effect``)."""
from kfp import dsl

from gdmix.kfp.images import image

IMAGE_KIND = "trainer"


def fixed_effect(workdir: str, iteration: int, coordinate: str):
    """Train the global logistic regression of one step on TF workers, then score.

    The workers are local processes, or, inside a cluster (``GDMIX_LAUNCHER``), a
    Kubeflow TFJob of the coordinate's ``workers`` replicas that this step creates,
    watches and deletes (see ``gdmix.kfp.tfjob``).

    Args:
        workdir: the run's work directory (holds the config snapshot from prepare).
        iteration: coordinate-descent pass, from 0.
        coordinate: the fixed-effect coordinate's name.
    """
    from gdmix.cli import main

    rc = main(["fixed-effect", "--workdir", workdir, "--iteration", str(int(iteration)), "--coordinate", coordinate])
    if rc:
        raise RuntimeError(f"gdmix fixed-effect exited with code {rc}")


def component(base_image: str | None = None):
    return dsl.component(fixed_effect, base_image=base_image or image(IMAGE_KIND), install_kfp_package=False)

"""KFP lightweight component: train one coordinate-descent step as one task (``gdmix train``)."""
from kfp import dsl

from gdmix.kfp.images import image

IMAGE_KIND = "trainer"


def train(runs_root: str, run_id: str, iteration: int, coordinate: str):
    """Train one step of a coordinate whose kind trains as one task (a linear or deep
    fixed effect, external scores, a per-cohort random effect), then score.

    TF workers run as local processes, or, inside a cluster (``GDMIX_LAUNCHER``), as a
    Kubeflow TFJob that this step creates, watches and deletes (see ``gdmix.kfp.tfjob``).

    Args:
        runs_root: the folder of the runs' work directories (pipeline parameter).
        run_id: the KFP run's id; the run works in ``<runs_root>/<run_id>``.
        iteration: coordinate-descent pass, from 0.
        coordinate: the coordinate's name.
    """
    from gdmix.cli import main
    from gdmix.kfp.runs import workdir_of

    workdir = workdir_of(runs_root, run_id)
    rc = main(["train", "--workdir", workdir, "--iteration", str(int(iteration)), "--coordinate", coordinate])
    if rc:
        raise RuntimeError(f"gdmix train exited with code {rc}")


def component(base_image: str | None = None):
    return dsl.component(train, base_image=base_image or image(IMAGE_KIND), install_kfp_package=False)

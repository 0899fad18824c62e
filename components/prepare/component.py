"""KFP lightweight component: the prepare stage (``gdmix prepare``) in a run's own work directory."""
from kfp import dsl

from gdmix.kfp.images import image

IMAGE_KIND = "spark"


def prepare(config: str, runs_root: str, run_id: str):
    """Check the input, build the feature indexes, index the rows, split off validation,
    in this run's own work directory ``<runs_root>/<run_id>``.

    Also writes the config snapshot (``<workdir>/config.yaml``) every later step reads.

    Args:
        config: path or URL of the run's YAML config (local to the step, gs://, ...).
        runs_root: the folder of the runs' work directories (pipeline parameter).
        run_id: the KFP run's id; the run works in ``<runs_root>/<run_id>``.
    """
    from gdmix.cli import main
    from gdmix.kfp.runs import workdir_of

    workdir = workdir_of(runs_root, run_id)
    rc = main(["prepare", "--config", config, "--workdir", workdir])
    if rc:
        raise RuntimeError(f"gdmix prepare exited with code {rc}")


def component(base_image: str | None = None):
    return dsl.component(prepare, base_image=base_image or image(IMAGE_KIND), install_kfp_package=False)

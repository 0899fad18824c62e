"""KFP lightweight component: the prepare stage (``gdmix prepare``)."""
from kfp import dsl

from gdmix.kfp.images import image

IMAGE_KIND = "spark"


def prepare(config: str, workdir: str):
    """Check the input, build the feature indexes, index the rows, split off validation.

    Also writes the config snapshot (``<workdir>/config.yaml``) every later step reads.

    Args:
        config: path or URL of the run's YAML config (local to the step, gs://, ...).
        workdir: the run's work directory (a path on the shared volume, gs://...).
    """
    from gdmix.cli import main

    rc = main(["prepare", "--config", config, "--workdir", workdir])
    if rc:
        raise RuntimeError(f"gdmix prepare exited with code {rc}")


def component(base_image: str | None = None):
    return dsl.component(prepare, base_image=base_image or image(IMAGE_KIND), install_kfp_package=False)

"""KFP lightweight component: the prepare stage (``gdmix prepare``) of a run's own work directory."""
from kfp import dsl

from gdmix.kfp.images import image

IMAGE_KIND = "spark"


def prepare(config: str, runs_root: str, run_id: str) -> str:
    """Check the input, build the feature indexes, index the rows, split off validation,
    in this run's own work directory ``<runs_root>/<run_id>``; returns that directory,
    which every later step of the run reads and writes.

    Also writes the config snapshot (``<workdir>/config.yaml``) every later step reads.

    Args:
        config: path or URL of the run's YAML config (local to the step, gs://, ...).
        runs_root: the folder holding one work directory per run (shared volume, gs://...).
        run_id: the pipeline run's id (KFP's ``PIPELINE_JOB_ID_PLACEHOLDER``).
    """
    from gdmix import storage
    from gdmix.cli import main

    workdir = storage.join(runs_root, run_id)
    rc = main(["prepare", "--config", config, "--workdir", workdir])
    if rc:
        raise RuntimeError(f"gdmix prepare exited with code {rc}")
    return workdir


def component(base_image: str | None = None):
    return dsl.component(prepare, base_image=base_image or image(IMAGE_KIND), install_kfp_package=False)

"""KFP lightweight component: the publish stage (``gdmix publish``)."""
from kfp import dsl

from gdmix.kfp.images import image

IMAGE_KIND = "trainer"


def publish(runs_root: str, run_id: str) -> str:
    """Copy the finished run (models/, metrics.json, report.html) to ``publish.to`` as a
    dated version and move ``latest.json`` to it when the config's AUC gates hold.

    Run after finalize. Retrying it is safe: a second publish of the same work directory
    reuses the run's version instead of copying it again.

    Args:
        runs_root: the folder of the runs' work directories (pipeline parameter).
        run_id: the KFP run's id; the run works in ``<runs_root>/<run_id>``.

    Returns:
        The URL of the ``latest.json`` that now points at this run's version.
    """
    from gdmix import config, storage
    from gdmix.cli import main
    from gdmix.kfp.runs import workdir_of
    from gdmix.publish import LATEST

    workdir = workdir_of(runs_root, run_id)
    refused = 3  # gdmix publish's exit code when latest was not moved (the source of this
    #              function is all the step runs: module-level names do not exist there)
    rc = main(["publish", "--workdir", workdir])
    if rc == refused:
        raise RuntimeError("gdmix publish refused to move latest (the reason and the figures are "
                           "in the log above); the old latest stays, this run's version is kept "
                           "for inspection")
    if rc:
        raise RuntimeError(f"gdmix publish exited with code {rc}")
    return storage.join(storage.absolute(config.load_run(workdir).publish.to), LATEST)


def component(base_image: str | None = None):
    return dsl.component(publish, base_image=base_image or image(IMAGE_KIND), install_kfp_package=False)

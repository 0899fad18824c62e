"""KFP lightweight component: the finalize stage (``gdmix finalize``)."""
from kfp import dsl
from kfp.dsl import HTML, Metrics, Output

from gdmix.kfp.images import image

IMAGE_KIND = "trainer"


def finalize(workdir: str, report: Output[HTML], final_metrics: Output[Metrics]):
    """Write metrics.json, the final models (``models/<coordinate>/``) and report.html.

    Publishes the run report as an ``HTML`` artifact and the last step's metrics as
    ``Metrics``.

    Args:
        workdir: the run's work directory.
        report: out: a copy of ``<workdir>/report.html``.
        final_metrics: out: auc, logloss, aupr, objective of the last evaluated step.
    """
    from gdmix import layout, storage
    from gdmix.cli import main

    rc = main(["finalize", "--workdir", workdir])
    if rc:
        raise RuntimeError(f"gdmix finalize exited with code {rc}")
    with storage.open_file(layout.report(workdir), "rb") as src, open(report.path, "wb") as dst:
        dst.write(src.read())
    records = storage.read_json(layout.metrics(workdir))
    if records:
        for key in ("auc", "logloss", "aupr", "objective"):
            if records[-1].get(key) is not None:
                final_metrics.log_metric(key, float(records[-1][key]))


def component(base_image: str | None = None):
    return dsl.component(finalize, base_image=base_image or image(IMAGE_KIND), install_kfp_package=False)

"""KFP lightweight component: the metrics stage (``gdmix metrics``), shown in the KFP UI."""
from kfp import dsl
from kfp.dsl import ClassificationMetrics, Metrics, Output

from gdmix.kfp.images import image

IMAGE_KIND = "spark"


def metrics(runs_root: str, run_id: str, iteration: int, coordinate: str,
            step_metrics: Output[Metrics], roc: Output[ClassificationMetrics]):
    """The configured validation metrics and the training objective after one step.

    Runs ``gdmix metrics``, then publishes every numeric key of the step's ``metrics.json``
    (the configured metrics, per-entity ones with their ``.entities`` counts, objective,
    train loss, penalty) as KFP ``Metrics`` and its ``roc.json`` (fpr, tpr, thresholds) as
    ``ClassificationMetrics``.

    Args:
        runs_root: the folder of the runs' work directories (pipeline parameter).
        run_id: the KFP run's id; the run works in ``<runs_root>/<run_id>``.
        iteration: coordinate-descent pass, from 0.
        coordinate: coordinate name from the config.
        step_metrics: out: every numeric value of the step's record but its iteration.
        roc: out: the validation ROC curve.
    """
    from gdmix import layout, storage
    from gdmix.cli import main
    from gdmix.kfp.runs import workdir_of
    from gdmix.metrics import roc_path

    workdir = workdir_of(runs_root, run_id)
    k = int(iteration)  # a loop item may arrive as a JSON number (0.0)
    rc = main(["metrics", "--workdir", workdir, "--iteration", str(k), "--coordinate", coordinate])
    if rc:
        raise RuntimeError(f"gdmix metrics exited with code {rc}")
    record = storage.read_json(layout.step_metrics(workdir, k, coordinate))
    for key, value in record.items():  # nested ones (penalties, rows) and nulls are not metrics
        if key != "iteration" and isinstance(value, (int, float)) and not isinstance(value, bool):
            step_metrics.log_metric(key, float(value))
    if storage.exists(roc_path(workdir, k, coordinate)):
        curve = storage.read_json(roc_path(workdir, k, coordinate))
        roc.log_roc_curve(curve["fpr"], curve["tpr"], curve["thresholds"])


def component(base_image: str | None = None):
    return dsl.component(metrics, base_image=base_image or image(IMAGE_KIND), install_kfp_package=False)

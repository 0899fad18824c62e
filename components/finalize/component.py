"""KFP lightweight component: the finalize stage (``gdmix finalize``)."""
from kfp import dsl
from kfp.dsl import HTML, Metrics, Output

from gdmix.kfp.images import image

IMAGE_KIND = "trainer"


def finalize(runs_root: str, run_id: str, report: Output[HTML], final_metrics: Output[Metrics]):
    """Write metrics.json, the final models (``models/<coordinate>/``) and report.html.

    Publishes the run report as an ``HTML`` artifact and the last step's metrics as
    ``Metrics``; with ``select:`` in the config also the step whose models were exported:
    ``selected_iteration``, ``selected_step`` (its position in the plan, from 0) and its
    metrics as ``selected_<key>``.

    Args:
        runs_root: the folder of the runs' work directories (pipeline parameter).
        run_id: the KFP run's id; the run works in ``<runs_root>/<run_id>``.
        report: out: a copy of ``<workdir>/report.html``.
        final_metrics: out: auc, logloss, aupr, objective of the last evaluated step, and
            the selected step's (see above).
    """
    from gdmix import config, layout, plan, storage
    from gdmix.cli import main
    from gdmix.kfp.runs import workdir_of

    workdir = workdir_of(runs_root, run_id)
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
        chosen = next((r for r in records if r.get("selected") is True), None)
        if chosen is not None:
            steps = plan.sequence(config.load_run(workdir))
            final_metrics.log_metric("selected_iteration", float(chosen["iteration"]))
            final_metrics.log_metric("selected_step", float(
                steps.index(plan.Step(chosen["iteration"], chosen["coordinate"]))))
            for key, value in chosen.items():
                if key not in ("iteration", "selected") and isinstance(value, (int, float)) \
                        and not isinstance(value, bool):
                    final_metrics.log_metric(f"selected_{key}", float(value))


def component(base_image: str | None = None):
    return dsl.component(finalize, base_image=base_image or image(IMAGE_KIND), install_kfp_package=False)

"""KFP lightweight component: keep the best point of one coordinate's l2 grid (``gdmix grid-select``)."""
from kfp import dsl
from kfp.dsl import HTML, Metrics, Output

from gdmix.kfp.images import image

IMAGE_KIND = "trainer"


def grid_select(runs_root: str, run_id: str, coordinate: str, grid_metrics: Output[Metrics],
                report: Output[HTML]):
    """After every branch of ``coordinate``'s grid: pick the best point by the config's
    ``select`` metric, copy its models, metrics.json, objective.json and report into the
    run's work directory with ``grid.json`` (every point so far), which the next search's
    branches read for the λ chosen here.

    Args:
        runs_root: the folder of the runs' work directories (pipeline parameter).
        run_id: the KFP run's id; the run works in ``<runs_root>/<run_id>``.
        coordinate: the gridded coordinate searched.
        grid_metrics: out: each point's metric as ``<coordinate>=<λ>``, and ``chosen_l2``.
        report: out: the run's report with the grid table and plot so far.
    """
    from gdmix import layout, storage
    from gdmix.cli import main
    from gdmix.grid import GRID_JSON
    from gdmix.kfp.runs import workdir_of

    workdir = workdir_of(runs_root, run_id)
    rc = main(["grid-select", "--workdir", workdir, "--coordinate", coordinate])
    if rc:
        raise RuntimeError(f"gdmix grid-select exited with code {rc}")
    doc = storage.read_json(storage.join(workdir, GRID_JSON))
    for point in doc["points"]:
        if point["coordinate"] == coordinate and point.get(doc["metric"]) is not None:
            grid_metrics.log_metric(f"{coordinate}={point['l2']:g}: {doc['metric']}", float(point[doc["metric"]]))
    grid_metrics.log_metric("chosen_l2", float(doc["chosen"][coordinate]))
    with storage.open_file(layout.report(workdir), "rb") as src, open(report.path, "wb") as dst:
        dst.write(src.read())


def component(base_image: str | None = None):
    return dsl.component(grid_select, base_image=base_image or image(IMAGE_KIND), install_kfp_package=False)

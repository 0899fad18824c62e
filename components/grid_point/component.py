"""KFP lightweight component: prepare one point of an l2 grid (``gdmix grid-point``)."""
from kfp import dsl

from gdmix.kfp.images import image

IMAGE_KIND = "spark"


def grid_point(config: str, runs_root: str, run_id: str, coordinate: str, l2: str):
    """Prepare a grid branch's own work directory ``<workdir>/grid/<coordinate>=<l2>``:
    the run config with ``coordinate`` at λ = ``l2``, every other gridded coordinate at the
    λ the searches before chose (``<workdir>/grid.json``), then the prepare stage there.

    Args:
        config: path or URL of the run's YAML config.
        runs_root: the folder of the runs' work directories (pipeline parameter).
        run_id: the KFP run's id; the run works in ``<runs_root>/<run_id>``.
        coordinate: the gridded coordinate this search varies.
        l2: this branch's λ (a grid value, as ``%g`` writes it).
    """
    from gdmix.cli import main
    from gdmix.kfp.runs import workdir_of

    workdir = workdir_of(runs_root, run_id)
    rc = main(["grid-point", "--config", config, "--workdir", workdir, "--coordinate", coordinate, "--l2", l2])
    if rc:
        raise RuntimeError(f"gdmix grid-point exited with code {rc}")


def component(base_image: str | None = None):
    return dsl.component(grid_point, base_image=base_image or image(IMAGE_KIND), install_kfp_package=False)

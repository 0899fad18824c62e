"""KFP lightweight component: one shard of a sharded kind (``gdmix train --shard S``)."""
from kfp import dsl

from gdmix.kfp.images import image

IMAGE_KIND = "trainer"


def train_shard(runs_root: str, run_id: str, iteration: int, coordinate: str, shard: int):
    """Train one shard of a coordinate whose kind trains by shard (a per-entity random
    effect: every entity of the shard).

    Args:
        runs_root: the folder of the runs' work directories (pipeline parameter).
        run_id: the KFP run's id; the run works in ``<runs_root>/<run_id>``.
        iteration: coordinate-descent pass, from 0.
        coordinate: the coordinate's name.
        shard: shard index, 0 .. shards-1 (the coordinate's ``shards``).
    """
    from gdmix.cli import main
    from gdmix.kfp.runs import workdir_of

    workdir = workdir_of(runs_root, run_id)
    rc = main(["train", "--workdir", workdir, "--iteration", str(int(iteration)),
               "--coordinate", coordinate, "--shard", str(int(shard))])
    if rc:
        raise RuntimeError(f"gdmix train --shard {shard} exited with code {rc}")


def component(base_image: str | None = None):
    return dsl.component(train_shard, base_image=base_image or image(IMAGE_KIND), install_kfp_package=False)

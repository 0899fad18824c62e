"""The GDMix training pipeline (KFP v2), built from a run config.

    prepare ─▶ ParallelFor(iterations, parallelism=1)          the loop node
                 for each coordinate, in the plan's order:
                   partition ─▶ train ─▶ (the next coordinate's partition)
                                      └─▶ metrics    (beside the next coordinates; nothing waits
                                                      for it but the next iteration and finalize)
                 then, with acceleration (gdmix.plan.accelerated): accelerate ─▶ metrics
                   (the joint Newton step after the pass's last train, docs/design.md §2.5)
                   train, as the coordinate's kind trains (gdmix.kinds):
                         one task: train (TF workers as a TFJob on a cluster)
                       | sharded: a sub-pipeline ParallelFor(shards) train_shard ─▶ train_finish
             ─▶ finalize

With ``l2: [λ, ...]`` on some coordinates (gdmix.grid, docs/design.md §7.4), for each
gridded coordinate in config order:

    ParallelFor(its grid values)     a branch per point, caching off, started cold:
        grid_point ─▶ ParallelFor(iterations) ... ─▶ finalize   in <run>/grid/<coordinate>=<λ>
    ─▶ grid_select                   keeps the best; the next coordinate's branches hold it

The structure (coordinates, their order, each one's kind, shard counts) is fixed at
compile time from the config and ``gdmix.plan``; the config path, the runs root and the
iteration list are runtime parameters. Each run works in its own directory
``<runs_root>/<KFP run id>`` (every step computes it: ``gdmix.kfp.runs``), so recurring runs never share
iteration state and their TFJobs (named from a hash of the work directory) never collide;
with ``publish:`` in the config a last step publishes the models (``gdmix.publish``). The images are chosen at compile time
(``--registry``/``--tag`` or ``GDMIX_REGISTRY``/``GDMIX_IMAGE_TAG``).

    python pipelines/gdmix_pipeline.py examples/movielens.yaml --out pipelines/gdmix_pipeline.yaml
"""

import argparse
import functools
import importlib.util
import sys
from pathlib import Path

from kfp import compiler, dsl, kubernetes

from gdmix import config as gconfig
from gdmix import grid, kinds, plan
from gdmix.kfp.images import image

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("prepare", "partition", "train", "train_shard", "train_finish", "accelerate", "metrics", "finalize",
          "publish", "grid_point", "grid_select")

# Requests / memory limits per step (the pod that runs the stage; Spark stages run their
# driver here, or with spark.master k8s://... also executors elsewhere).
RESOURCES = {
    "prepare": ("2", "6Gi", "8Gi"),
    "partition": ("2", "6Gi", "8Gi"),
    "train": ("1", "2Gi", "4Gi"),  # on a cluster a TFJob's launcher runs here, its workers elsewhere
    "train_shard": ("2", "4Gi", "8Gi"),
    "train_finish": ("1", "2Gi", "4Gi"),
    "accelerate": ("2", "4Gi", "8Gi"),  # the training rows and the crossed design in memory
    "metrics": ("2", "6Gi", "8Gi"),
    "finalize": ("1", "2Gi", "4Gi"),
    "publish": ("1", "1Gi", "2Gi"),
    "grid_point": ("2", "6Gi", "8Gi"),  # a grid branch's prepare
    "grid_select": ("1", "1Gi", "2Gi"),
}
# A one-node kind/minikube cluster of 4 CPUs (``make run-local``, ``--resources local``): what
# fits beside Kubernetes and KFP themselves (docs/cluster.md, "Scheduling and sizing"), the
# two TF workers of the example's fixed effect included (``LOCAL_TFJOB_WORKER``).
RESOURCES_LOCAL = {
    "prepare": ("1", "3Gi", "5Gi"),  # the Spark driver's 4g heap: a limit above it
    "partition": ("1", "3Gi", "5Gi"),
    "train": ("250m", "512Mi", "1Gi"),
    "train_shard": ("1", "2Gi", "4Gi"),
    "train_finish": ("250m", "1Gi", "2Gi"),
    "accelerate": ("500m", "1Gi", "2Gi"),
    "metrics": ("1", "3Gi", "5Gi"),
    "finalize": ("250m", "1Gi", "2Gi"),
    "publish": ("250m", "512Mi", "1Gi"),
    "grid_point": ("1", "3Gi", "5Gi"),
    "grid_select": ("250m", "512Mi", "1Gi"),
}
LOCAL_TFJOB_WORKER = ("500m", "1536Mi")  # per TF worker, unless the coordinate sets cpu/memory
RESOURCE_PROFILES = {"cluster": RESOURCES, "local": RESOURCES_LOCAL}
NOT_RETRIED = ("finalize", "publish")  # a refused publish is a decision, not a transient failure
RETRIES = 2  # transient failures (a preempted node, a storage hiccup); stages redo atomically

# On a cluster: the work directory volume every step (and every TFJob worker) mounts.
WORK_VOLUME = "gdmix-work"
MOUNT_PATH = "/gdmix"
CONFIG_DIR = "/opt/gdmix/examples"  # examples/ as copied into the images


def load_components(registry: str | None = None, tag: str | None = None) -> dict:
    """Each stage's component (components/<stage>/component.py) on its image."""
    out = {}
    for stage in STAGES:
        path = ROOT / "components" / stage / "component.py"
        spec = importlib.util.spec_from_file_location(f"gdmix_components_{stage}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        out[stage] = module.component(image(module.IMAGE_KIND, registry, tag))
    return out


def coordinate_order(cfg: gconfig.Config) -> list[str]:
    """The coordinates of one pass in the plan's order (the same in every pass)."""
    steps = plan.steps(cfg)
    passes = {}
    for s in steps:
        passes.setdefault(s.iteration, []).append(s.coordinate)
    orders = {tuple(v) for v in passes.values()}
    if len(orders) != 1:  # pragma: no cover - the plan repeats one order per pass
        raise ValueError(f"the plan's passes differ in order: {sorted(orders)}")
    return list(orders.pop())


SPARK_STAGES = ("prepare", "partition", "metrics", "grid_point")


def _configure(task, stage: str, name: str, work_volume: str | None, spark_image: str = "",
               resources: dict = RESOURCES):
    cpu, memory, memory_limit = resources[stage]
    task.set_display_name(name)
    task.set_caching_options(False)  # every step reads or writes iteration state in the workdir
    if stage not in NOT_RETRIED:
        task.set_retry(num_retries=RETRIES, backoff_duration="30s", backoff_factor=2.0,
                       backoff_max_duration="600s")
    task.set_cpu_request(cpu)
    task.set_memory_request(memory)
    task.set_memory_limit(memory_limit)
    if work_volume:
        kubernetes.mount_pvc(task, pvc_name=work_volume, mount_path=MOUNT_PATH)
    if stage in SPARK_STAGES:  # spark.master k8s://: a client-mode driver in this pod (gdmix.spark)
        kubernetes.use_field_path_as_env(task, env_name="GDMIX_POD_IP", field_path="status.podIP")
        kubernetes.use_field_path_as_env(task, env_name="GDMIX_POD_NAME", field_path="metadata.name")
        task.set_env_variable("GDMIX_SPARK_IMAGE", spark_image)
    return task


def _run_args(runs_root, run_id, point: tuple | None = None) -> dict:
    """A stage's ``runs_root``/``run_id``: the run's, or in a grid branch the point's, so that
    it works in ``<run workdir>/grid/<coordinate>=<λ>`` (gdmix.grid.point_dir). Built where a
    component takes them: kfp.local 2.17 passes such a string into a sub-pipeline as null."""
    if point is None:
        return {"runs_root": runs_root, "run_id": run_id}
    coordinate, l2 = point
    return {"runs_root": f"{runs_root}/{run_id}/grid", "run_id": f"{coordinate}={l2}"}


def _sharded(comps: dict, coord: gconfig.Coordinate, work_volume: str | None, configure=_configure,
             searched: str | None = None):
    """One step of a sharded kind: a ParallelFor over its shards, then finish.

    A sub-pipeline taking the iteration as an input: the nested loop then never refers to
    the outer loop's item (kfp.local 2.17 resolves an outer loop item inside a nested
    ParallelFor to the inner item). ``searched``: in a branch of that coordinate's l2 grid
    (the run id and the branch's λ come in as inputs).
    """
    name = coord.name
    if searched is not None:
        return _sharded_point(comps, coord, work_volume, configure, searched)

    @dsl.pipeline(name=f"{name}-shards-and-finish", description=f"train {name}: {coord.shards} shard(s), then finish")
    def sharded(runs_root: str, iteration: int):
        _shards_then_finish(comps, coord, {"runs_root": runs_root, "run_id": dsl.PIPELINE_JOB_ID_PLACEHOLDER},
                            iteration, configure, work_volume)

    return sharded


def _shards_then_finish(comps: dict, coord: gconfig.Coordinate, run: dict, iteration, configure,
                        work_volume: str | None) -> None:
    """Inside a sub-pipeline: the coordinate's shards in parallel, then its finish."""
    name = coord.name
    with dsl.ParallelFor(items=list(range(coord.shards)), parallelism=coord.shards, name=f"{name}-shards") as s:
        shard = configure(comps["train_shard"](**run, iteration=iteration, coordinate=name, shard=s),
                          "train_shard", f"{name}: shard", work_volume)
    configure(comps["train_finish"](**run, iteration=iteration, coordinate=name),
              "train_finish", f"{name}: finish", work_volume).after(shard)


def _sharded_point(comps: dict, coord: gconfig.Coordinate, work_volume: str | None, configure, searched: str):
    name = coord.name

    @dsl.pipeline(name=f"{name}-shards-and-finish-in-{searched}-grid",
                  description=f"train {name}: {coord.shards} shard(s), then finish, in a point of {searched}'s grid")
    def sharded(runs_root: str, run_id: str, l2: str, iteration: int):
        _shards_then_finish(comps, coord, _run_args(runs_root, run_id, (searched, l2)), iteration, configure,
                            work_volume)

    return sharded


def _passes(cfg, comps, order, run: dict, iterations, first, train_sharded, configure, work_volume,
            trainer_image: str, spark_image: str, resources: str):
    """The iterations loop (each pass: every coordinate's partition ─▶ train ─▶ metrics, then
    the joint step) after ``first``, then finalize; ``train_sharded(name, k)`` adds a sharded
    kind's fan-out. Returns the finalize task."""
    with dsl.ParallelFor(items=iterations, parallelism=1, name="iterations") as k:
        last = first
        for name in order:
            kind = kinds.of(cfg.coordinate(name))
            part = configure(comps["partition"](**run, iteration=k, coordinate=name),
                              "partition", f"{name}: partition", work_volume, spark_image).after(last)
            if kind.pipeline_tasks == kinds.SHARDED:
                trained = train_sharded(name, k).after(part)
                trained.set_display_name(f"{name}: train ({kind.name}, by shard)")
            else:
                trained = configure(comps["train"](**run, iteration=k, coordinate=name),
                                     "train", f"{name}: train ({kind.name})", work_volume).after(part)
                if kind.tf_workers:
                    trained.set_env_variable("GDMIX_LAUNCHER", "auto")
                    trained.set_env_variable("GDMIX_TFJOB_IMAGE", trainer_image)
                    if resources == "local":  # the TF workers' size when the coordinate sets none
                        trained.set_env_variable("GDMIX_TFJOB_CPU", LOCAL_TFJOB_WORKER[0])
                        trained.set_env_variable("GDMIX_TFJOB_MEMORY", LOCAL_TFJOB_WORKER[1])
                    if work_volume:
                        trained.set_env_variable("GDMIX_WORK_PVC", work_volume)
                        trained.set_env_variable("GDMIX_WORK_MOUNT", MOUNT_PATH)
            configure(comps["metrics"](**run, iteration=k, coordinate=name),
                       "metrics", f"{name}: metrics", work_volume, spark_image).after(trained)
            last = trained
        if plan.accelerated(cfg):  # the joint step after the pass's last coordinate
            joint = configure(comps["accelerate"](**run, iteration=k), "accelerate",
                              "joint Newton step", work_volume).after(last)
            configure(comps["metrics"](**run, iteration=k, coordinate=plan.JOINT),
                       "metrics", "joint step: metrics", work_volume, spark_image).after(joint)
            last = joint
    return configure(comps["finalize"](**run), "finalize", "finalize", work_volume).after(last)


def _grid_point(cfg, comps, order, searched: str, work_volume, configure, trainer_image, spark_image, resources):
    """One branch of ``searched``'s l2 grid: a whole run of the plan (grid_point, i.e.
    prepare at the branch's λ, the passes, finalize) in the point's own work directory."""
    fan_outs = {c: _sharded(comps, cfg.coordinate(c), work_volume, configure, searched)
                for c in order if kinds.of(cfg.coordinate(c)).pipeline_tasks == kinds.SHARDED}

    @dsl.pipeline(name=f"{searched}-grid-point", description=f"one point of {searched}'s l2 grid: a whole run")
    def point(config: str, runs_root: str, run_id: str, l2: str, iterations: list):
        prep = configure(comps["grid_point"](config=config, runs_root=runs_root, run_id=run_id,
                                             coordinate=searched, l2=l2),
                         "grid_point", f"{searched}: prepare the point", work_volume, spark_image)
        _passes(cfg, comps, order, _run_args(runs_root, run_id, (searched, l2)), iterations, prep,
                lambda name, k: fan_outs[name](runs_root=runs_root, run_id=run_id, l2=l2, iteration=k)
                .set_caching_options(False),
                configure, work_volume, trainer_image, spark_image, resources)

    return point


def _grid_searches(cfg, comps, points: dict, config, runs_root, iterations, work_volume, configure):
    """Each gridded coordinate in config order: its points as parallel branches, then
    grid_select keeps the best, which the next coordinate's branches hold (gdmix.grid).
    ``points``: each gridded coordinate's branch (``_grid_point``)."""
    last = None
    for c in (c for c in cfg.coordinates if c.l2_grid is not None):
        point = points[c.name]
        values = [f"{v:g}" for v in grid.path(c)]  # as grid.point_dir names the points
        with dsl.ParallelFor(items=values, parallelism=len(values), name=f"{c.name}-grid") as lam:
            branch = point(config=config, runs_root=runs_root, run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, l2=lam,
                           iterations=iterations)
            branch.set_display_name(f"{c.name}: one l2 of {values}")
            branch.set_caching_options(False)  # the point's files are in this run's work directory
            if last is not None:
                branch.after(last)
        last = configure(comps["grid_select"](runs_root=runs_root, run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                                              coordinate=c.name),
                         "grid_select", f"{c.name}: keep the best l2", work_volume).after(branch)
    return last


def build(cfg: gconfig.Config, registry: str | None = None, tag: str | None = None,
          work_volume: str | None = WORK_VOLUME, config_url: str | None = None,
          runs_root_url: str | None = None, resources: str = "cluster"):
    """The pipeline function for ``cfg``'s structure; compile it or call it under kfp.local.

    ``work_volume``: the PVC mounted at ``/gdmix`` in every step and TFJob worker (None:
    no volume, e.g. a gs:// work directory). ``resources``: the steps' requests, a key of
    ``RESOURCE_PROFILES`` (``local``: a 4-CPU kind/minikube node).
    """
    if resources not in RESOURCE_PROFILES:
        raise ValueError(f"resources: one of {sorted(RESOURCE_PROFILES)}, got {resources!r}")
    if grid.gridded(cfg):  # l2: auto needs nothing here: λ travels in the work directory
        grid.refuse_publish(cfg)
    configure = functools.partial(_configure, resources=RESOURCE_PROFILES[resources])
    comps = load_components(registry, tag)
    trainer_image, spark_image = image("trainer", registry, tag), image("spark", registry, tag)
    order = coordinate_order(cfg)
    default_config = config_url or f"{CONFIG_DIR}/{Path(cfg.source or cfg.name + '.yaml').name}"
    default_runs_root = runs_root_url or f"{MOUNT_PATH}/runs/{cfg.name}"
    default_iterations = list(range(cfg.iterations))

    fan_outs = {c: _sharded(comps, cfg.coordinate(c), work_volume, configure)
                for c in order if kinds.of(cfg.coordinate(c)).pipeline_tasks == kinds.SHARDED
                and not grid.gridded(cfg)}
    points = {c.name: _grid_point(cfg, comps, order, c.name, work_volume, configure, trainer_image, spark_image,
                                  resources) for c in cfg.coordinates if c.l2_grid is not None}

    @dsl.pipeline(name=f"gdmix-{cfg.name}",
                  description=f"GDMix coordinate descent over {', '.join(order)} (built from {cfg.name})")
    def gdmix_pipeline(config: str = default_config, runs_root: str = default_runs_root,
                       iterations: list = default_iterations):
        """GDMix training.

        Args:
            config: path or URL of the run config YAML, as the steps see it.
            runs_root: each run works in its own ``<runs_root>/<run id>`` (on the shared
                volume, or gs://...), so scheduled runs never share iteration state.
            iterations: the coordinate-descent passes to run, in order (0, 1, ...).
        """
        if grid.gridded(cfg):  # l2: [λ, ...]: parallel branches per gridded coordinate
            _grid_searches(cfg, comps, points, config, runs_root, iterations, work_volume, configure)
            return
        run = _run_args(runs_root, dsl.PIPELINE_JOB_ID_PLACEHOLDER)  # <runs_root>/<run id>
        prep = configure(comps["prepare"](config=config, **run), "prepare", "prepare", work_volume, spark_image)
        final = _passes(cfg, comps, order, run, iterations, prep,
                        lambda name, k: fan_outs[name](runs_root=runs_root, iteration=k),
                        configure, work_volume, trainer_image, spark_image, resources)
        if cfg.publish is not None:
            configure(comps["publish"](**run), "publish", "publish", work_volume).after(final)

    return gdmix_pipeline


def compile_pipeline(config_path: str, out: str, registry: str | None = None, tag: str | None = None,
                     work_volume: str | None = WORK_VOLUME, config_url: str | None = None,
                     runs_root_url: str | None = None, resources: str = "cluster") -> str:
    cfg = kinds.load_config(config_path)
    pipeline = build(cfg, registry, tag, work_volume, config_url, runs_root_url, resources)
    compiler.Compiler().compile(pipeline, package_path=out)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="compile the GDMix KFP pipeline for a config")
    ap.add_argument("config", help="run config YAML: its coordinates fix the pipeline's structure")
    ap.add_argument("--out", default=str(ROOT / "pipelines" / "gdmix_pipeline.yaml"))
    ap.add_argument("--registry", help="image registry (default $GDMIX_REGISTRY or localhost)")
    ap.add_argument("--tag", help="image tag (default $GDMIX_IMAGE_TAG or the package version)")
    ap.add_argument("--work-volume", default=WORK_VOLUME,
                    help=f"PVC mounted at {MOUNT_PATH} in every step; '' for none (gs:// workdir)")
    ap.add_argument("--config-url", help=f"default of the config parameter (default {CONFIG_DIR}/<file>)")
    ap.add_argument("--runs-root-url", help=f"default of the runs_root parameter (default {MOUNT_PATH}/runs/<name>)")
    ap.add_argument("--resources", choices=sorted(RESOURCE_PROFILES), default="cluster",
                    help="the steps' requests: cluster (default), or local (a 4-CPU kind/minikube node)")
    args = ap.parse_args(argv)
    out = compile_pipeline(args.config, args.out, args.registry, args.tag, args.work_volume or None,
                           args.config_url, args.runs_root_url, args.resources)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

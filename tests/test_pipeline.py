"""The compiled KFP pipeline: a valid PipelineSpec, the loop structure the plan asks for,
one component per stage, no caching, retries and resources, and the checked-in YAML current."""
import importlib.util
import warnings
from pathlib import Path

import pytest
import yaml
from google.protobuf import json_format
from kfp.pipeline_spec import pipeline_spec_pb2

from gdmix import config, kinds, plan
from gdmix.kfp.images import DEFAULT_REGISTRY, default_tag

ROOT = Path(__file__).resolve().parents[1]
CHECKED_IN = ROOT / "pipelines" / "gdmix_pipeline.yaml"
EXAMPLE = ROOT / "examples" / "movielens.yaml"
STAGES = ("prepare", "partition", "train", "train_shard", "train_finish", "accelerate",
          "metrics", "finalize")


def load_pipeline_module():
    spec = importlib.util.spec_from_file_location("gdmix_pipeline", ROOT / "pipelines" / "gdmix_pipeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gp():
    return load_pipeline_module()


def compile_to(gp, cfg_path, out, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gp.compile_pipeline(str(cfg_path), str(out), registry=DEFAULT_REGISTRY, tag=default_tag(), **kw)
    docs = list(yaml.safe_load_all(out.read_text()))
    return docs[0], (docs[1] if len(docs) > 1 else None)


def test_checked_in_yaml_is_current(gp, tmp_path):
    spec, platform = compile_to(gp, EXAMPLE, tmp_path / "p.yaml")
    checked = list(yaml.safe_load_all(CHECKED_IN.read_text()))
    assert checked[0] == spec and (checked[1] if len(checked) > 1 else None) == platform, \
        "pipelines/gdmix_pipeline.yaml is stale: run `make compile` and commit it"


@pytest.fixture(scope="module")
def compiled(gp, tmp_path_factory):
    """A config with a fixed effect and two random effects, one with 3 shards."""
    raw = yaml.safe_load(EXAMPLE.read_text())
    raw["coordinates"][1]["shards"] = 3
    raw["iterations"] = 3
    path = tmp_path_factory.mktemp("cfg") / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    spec, platform = compile_to(gp, path, path.parent / "p.yaml")
    return config.load(str(path)), spec, platform


def test_parses_as_pipeline_spec(compiled):
    _, spec, _ = compiled
    msg = json_format.ParseDict(spec, pipeline_spec_pb2.PipelineSpec())
    assert msg.pipeline_info.name == "gdmix-movielens"
    assert set(msg.root.input_definitions.parameters) == {"config", "runs_root", "iterations"}
    assert msg.root.input_definitions.parameters["iterations"].default_value.list_value.values[2].number_value == 2


def test_checked_in_yaml_loads_as_a_kfp_component():
    from kfp import components

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        comp = components.load_component_from_file(str(CHECKED_IN))
    assert comp.name == "gdmix-movielens"
    assert set(comp.component_spec.inputs) == {"config", "runs_root", "iterations"}


def _loop(tasks):
    loops = {n: t for n, t in tasks.items() if "parameterIterator" in t}
    return loops


def test_iteration_loop_runs_one_pass_at_a_time(compiled):
    cfg, spec, _ = compiled
    root = spec["root"]["dag"]["tasks"]
    loops = _loop(root)
    assert len(loops) == 1
    (loop_name, loop), = loops.items()
    assert loop["iteratorPolicy"] == {"parallelismLimit": 1}
    assert loop["parameterIterator"]["items"] == {"inputParameter": "pipelinechannel--iterations"}
    assert loop["dependentTasks"] == ["prepare"]
    assert root["finalize"]["dependentTasks"] == [loop_name]
    assert spec["root"]["inputDefinitions"]["parameters"]["iterations"]["defaultValue"] == \
        list(range(cfg.iterations))


def _body(spec):
    (loop_name, loop), = _loop(spec["root"]["dag"]["tasks"]).items()
    return spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"]


def _coordinate(task):
    return task["inputs"]["parameters"]["coordinate"]["runtimeValue"]["constant"]


def test_loop_body_follows_the_plan(compiled):
    """partition -> train -> metrics per coordinate, the next coordinate's partition after
    this one's train (its metrics run beside it), in the plan's order."""
    cfg, spec, _ = compiled
    body = _body(spec)
    order = [s.coordinate for s in plan.steps(cfg) if s.iteration == 0]
    parts = {_coordinate(t): n for n, t in body.items() if t["componentRef"]["name"].startswith("comp-partition")}
    mets = {_coordinate(t): n for n, t in body.items() if t["componentRef"]["name"].startswith("comp-metrics")}
    joint = plan.JOINT if plan.accelerated(cfg) else None
    assert list(parts) and set(parts) == set(order) == set(mets) - {joint}
    previous_train = None
    for name in order:
        part = body[parts[name]]
        assert part.get("dependentTasks", []) == ([previous_train] if previous_train else [])
        (train_name,) = body[mets[name]]["dependentTasks"]
        train = body[train_name]
        if kinds.of(cfg.coordinate(name)).pipeline_tasks == kinds.ONE_TASK:
            assert train["componentRef"]["name"].startswith("comp-train")
            assert not train["componentRef"]["name"].startswith("comp-train-shard")
            assert _coordinate(train) == name
            assert train["dependentTasks"] == [parts[name]]
        else:  # a sub-pipeline: the shard fan-out, then finish
            assert train["dependentTasks"] == [parts[name]]
            assert "componentInputParameter" in train["inputs"]["parameters"]["iteration"]
            sub = spec["components"][train["componentRef"]["name"]]["dag"]["tasks"]
            (shard_loop_name,) = [n for n, t in sub.items() if "parameterIterator" in t]
            shard_loop = sub[shard_loop_name]
            items = yaml.safe_load(shard_loop["parameterIterator"]["items"]["raw"])
            assert items == list(range(cfg.coordinate(name).shards))
            assert shard_loop["iteratorPolicy"]["parallelismLimit"] == cfg.coordinate(name).shards
            (finish_name,) = [n for n in sub if n != shard_loop_name]
            assert sub[finish_name]["componentRef"]["name"].startswith("comp-train-finish")
            assert sub[finish_name]["dependentTasks"] == [shard_loop_name]
            inner = spec["components"][shard_loop["componentRef"]["name"]]["dag"]["tasks"]
            (shard_task,) = inner.values()
            assert shard_task["componentRef"]["name"].startswith("comp-train-shard")
            assert _coordinate(shard_task) == name
            assert "componentInputParameter" in shard_task["inputs"]["parameters"]["shard"]
        previous_train = train_name
    # the joint step after the pass's last train, its metrics beside the next pass
    assert joint is not None, "the example's three convex coordinates get the joint step"
    (acc_name,) = [n for n, t in body.items() if t["componentRef"]["name"].startswith("comp-accelerate")]
    assert body[acc_name]["dependentTasks"] == [previous_train]
    assert body[mets[joint]]["dependentTasks"] == [acc_name]


def _all_tasks(spec):
    yield from spec["root"]["dag"]["tasks"].items()
    for c in spec["components"].values():
        yield from c.get("dag", {}).get("tasks", {}).items()


def test_every_step_uncached_retried_and_sized(compiled):
    _, spec, _ = compiled
    executors = spec["deploymentSpec"]["executors"]
    steps = [(n, t) for n, t in _all_tasks(spec)
             if "executorLabel" in spec["components"][t["componentRef"]["name"]]]
    assert len(steps) > len(STAGES)
    for name, task in steps:
        assert task["cachingOptions"] == {}, f"{name}: caching must be off (enableCache false)"
        if not name.startswith("finalize"):
            assert task["retryPolicy"]["maxRetryCount"] >= 1, name
        container = executors[spec["components"][task["componentRef"]["name"]]["executorLabel"]]["container"]
        assert container["resources"]["resourceCpuRequest"] and container["resources"]["resourceMemoryRequest"]


def test_a_lightweight_component_per_stage_on_the_project_images(compiled):
    _, spec, platform = compiled
    executors = spec["deploymentSpec"]["executors"]
    by_function = {}
    for label, ex in executors.items():
        c = ex["container"]
        fn = c["args"][c["args"].index("--function_to_execute") + 1]
        by_function.setdefault(fn, []).append((label, c))
    assert set(by_function) == set(STAGES)
    tag = default_tag()
    for fn, entries in by_function.items():
        for label, c in entries:
            assert c["image"].startswith(f"{DEFAULT_REGISTRY}/gdmix-") and c["image"].endswith(f":{tag}")
            assert "kfp.dsl.executor_main" in " ".join(c["command"])
            assert "pip install" not in " ".join(c["command"]), "kfp comes with the image"
            assert "from gdmix.cli import main" in c["command"][-1]
            # every step mounts the work volume on a cluster
            assert platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"][label]["pvcMount"][0][
                "mountPath"] == "/gdmix"
    (label, fe), = by_function["train"][:1]
    env = {e["name"]: e["value"] for e in fe["env"]}
    assert env["GDMIX_LAUNCHER"] == "auto" and env["GDMIX_TFJOB_IMAGE"].startswith(f"{DEFAULT_REGISTRY}/gdmix-trainer:")


def test_image_is_chosen_at_compile_time(gp, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gp.compile_pipeline(str(EXAMPLE), str(tmp_path / "p.yaml"), registry="gcr.io/acme", tag="7.1",
                            work_volume=None)
    spec, *rest = list(yaml.safe_load_all((tmp_path / "p.yaml").read_text()))
    images = {ex["container"]["image"] for ex in spec["deploymentSpec"]["executors"].values()}
    assert images == {"gcr.io/acme/gdmix-spark:7.1", "gcr.io/acme/gdmix-trainer:7.1"}
    assert not rest or "pvcMount" not in str(rest[0])


def test_submit_arguments():
    from gdmix.kfp import submit

    assert submit.parameters("gs://b/c.yaml", None, "0, 1,2") == {"config": "gs://b/c.yaml", "iterations": [0, 1, 2]}
    assert submit.cron_expression("0 3 * * *") == "0 0 3 * * *"
    assert submit.cron_expression("0 0 3 * * *") == "0 0 3 * * *"
    with pytest.raises(SystemExit, match="--cron"):
        submit.cron_expression("daily")
    with pytest.raises(SystemExit, match="--iterations"):
        submit.parameters(None, None, "one")


def test_each_run_works_in_its_own_directory(compiled):
    """Every step gets runs_root and KFP's run-id placeholder: <runs_root>/<run id>."""
    _, spec, _ = compiled

    def tasks(dag):
        for t in dag["tasks"].values():
            yield t
            comp = spec["components"][t["componentRef"]["name"]]
            if "dag" in comp:
                yield from tasks(comp["dag"])

    executed = [t for t in tasks(spec["root"]["dag"]) if "dag" not in spec["components"][t["componentRef"]["name"]]]
    assert len(executed) > 8
    for t in executed:
        params = t["inputs"]["parameters"]
        assert params["run_id"]["runtimeValue"]["constant"] == "{{$.pipeline_job_uuid}}", t["taskInfo"]
        assert params["runs_root"]["componentInputParameter"].endswith("runs_root"), t["taskInfo"]
        assert "workdir" not in params


def test_spark_steps_can_start_executors_on_kubernetes(compiled):
    """prepare, partition and metrics learn their pod's IP and name (a k8s:// client-mode
    driver binds there and owns its executors) and the Spark image for the executors."""
    _, spec, platform = compiled
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    by_function = {}
    for label, ex in spec["deploymentSpec"]["executors"].items():
        fn = ex["container"]["command"][-1].split("def ", 1)[1].split("(", 1)[0]
        by_function.setdefault(fn, []).append((label, ex))
    for fn in ("prepare", "partition", "metrics"):
        for label, ex in by_function[fn]:
            fields = {f["name"]: f["fieldPath"] for f in executors[label]["fieldPathAsEnv"]}
            assert fields == {"GDMIX_POD_IP": "status.podIP", "GDMIX_POD_NAME": "metadata.name"}
            env = {e["name"]: e["value"] for e in ex["container"]["env"]}
            assert env["GDMIX_SPARK_IMAGE"].split("/")[-1].startswith("gdmix-spark:")
    for label, ex in by_function["train_shard"]:
        assert "fieldPathAsEnv" not in executors[label]


def test_the_local_profile_fits_a_four_cpu_node(gp, tmp_path):
    """``--resources local`` (make run-local): every step's requests from RESOURCES_LOCAL,
    and the TF workers sized by the step's env; the busiest moment (a metrics step beside
    the next coordinate's training and two 500m TF workers) stays under 2.5 CPUs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gp.compile_pipeline(str(EXAMPLE), str(tmp_path / "p.yaml"), resources="local")
    spec, *_ = list(yaml.safe_load_all((tmp_path / "p.yaml").read_text()))
    cpus = {}
    for ex in spec["deploymentSpec"]["executors"].values():
        c = ex["container"]
        fn = c["command"][-1].split("def ", 1)[1].split("(", 1)[0]
        cpus[fn] = c["resources"]["cpuRequest"]
        assert c["resources"]["memoryRequest"] <= c["resources"]["memoryLimit"]
        if fn == "train":
            env = {e["name"]: e["value"] for e in c["env"]}
            assert (env["GDMIX_TFJOB_CPU"], env["GDMIX_TFJOB_MEMORY"]) == gp.LOCAL_TFJOB_WORKER
    assert cpus["metrics"] + cpus["train"] + 2 * 0.5 <= 2.5
    with pytest.raises(ValueError, match="resources"):
        gp.build(config.load(str(EXAMPLE)), resources="huge")


def test_auto_l2_compiles(gp, tmp_path):
    """l2: auto needs no pipeline change (λ travels in the work directory, gdmix.l2)."""
    spec, _ = compile_to(gp, ROOT / "examples" / "movielens-auto.yaml", tmp_path / "auto.yaml")
    assert spec["pipelineInfo"]["name"]


def _tasks(spec, dag_name=None) -> dict:
    dag = spec["root"]["dag"] if dag_name is None else spec["components"][dag_name]["dag"]
    return dag["tasks"]


@pytest.fixture(scope="module")
def gridded(gp, tmp_path_factory):
    """Two gridded coordinates (one sharded): a ParallelFor of branches per coordinate."""
    raw = yaml.safe_load(EXAMPLE.read_text())
    raw["coordinates"][1]["l2"] = [0.1, 10.0, 1.0]
    raw["coordinates"][2]["l2"] = [1.0, 100.0]
    path = tmp_path_factory.mktemp("grid") / "grid.yaml"
    path.write_text(yaml.safe_dump(raw))
    spec, _ = compile_to(gp, path, path.parent / "p.yaml")
    return config.load(str(path)), spec


def test_a_grid_compiles_to_parallel_branches_then_a_select(gridded):
    cfg, spec = gridded
    root = _tasks(spec)
    searched = [c for c in cfg.coordinates if c.l2_grid is not None]
    for i, c in enumerate(searched):
        (loop_name, loop), = [(n, t) for n, t in root.items() if t["taskInfo"]["name"] == f"{c.name}-grid"]
        values = loop["parameterIterator"]["items"]["raw"]
        assert yaml.safe_load(values) == [f"{v:g}" for v in sorted(c.l2_grid, reverse=True)]
        select = next(t for t in root.values() if t.get("inputs", {}).get("parameters", {})
                      .get("coordinate", {}).get("runtimeValue", {}).get("constant") == c.name)
        assert select["componentRef"]["name"].startswith("comp-grid-select")
        assert loop_name in select["dependentTasks"]  # the select waits for every branch
        (branch,) = _tasks(spec, loop["componentRef"]["name"]).values()
        assert branch["cachingOptions"] == {}  # caching off (enableCache absent)
        if i:  # the second search starts after the first one's select
            assert any(d.startswith("grid-select") for d in loop.get("dependentTasks", []))
        point = spec["components"][branch["componentRef"]["name"]]["dag"]["tasks"]
        prep = next(t for t in point.values() if t["componentRef"]["name"].startswith("comp-grid-point"))
        assert prep["inputs"]["parameters"]["coordinate"]["runtimeValue"]["constant"] == c.name
    # every task of a branch works in the point's directory <run>/grid/<coordinate>=<λ>
    text = yaml.safe_dump(spec)
    assert "/grid" in text and "prepare" not in [t["componentRef"]["name"] for t in root.values()]


def test_every_component_of_a_grid_has_caching_off(gridded):
    _, spec = gridded
    for name, comp in spec["components"].items():
        for task in comp.get("dag", {}).get("tasks", {}).values():
            assert not task.get("cachingOptions", {}).get("enableCache"), (name, task)


def test_a_grid_with_publish_is_refused(gp, tmp_path):
    raw = yaml.safe_load(EXAMPLE.read_text())
    raw["coordinates"][2]["l2"] = [1.0, 10.0]
    raw["publish"] = {"to": str(tmp_path / "pub")}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match="publish: an l2 grid run publishes nothing itself"):
        compile_to(gp, path, tmp_path / "grid-p.yaml")

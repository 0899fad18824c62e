"""The fixed-effect TFJob object and the launcher selection (no cluster here: the object is
checked structurally and its pod template against the Kubernetes schema)."""
import re

import pytest

from gdmix.fixed_effect import launcher as launchers
from gdmix.kfp import tfjob
from gdmix.plan import Step

SETTINGS = tfjob.Settings(image="localhost/gdmix-trainer:0.1.0", namespace="kubeflow",
                          service_account="gdmix-pipeline", cpu="2", memory="3Gi", memory_limit="6Gi",
                          pvc="gdmix-work", mount_path="/gdmix")


def test_tfjob_object():
    step = Step(1, "global")
    job = tfjob.build("/gdmix/runs/movielens", step, 3, SETTINGS, timeout_s=3600)
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "TFJob"
    meta = job["metadata"]
    assert meta["namespace"] == "kubeflow"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", meta["name"]) and len(meta["name"]) <= tfjob.MAX_NAME
    assert meta["labels"]["gdmix.io/iteration"] == "1" and meta["labels"]["gdmix.io/coordinate"] == "global"
    assert job["spec"]["runPolicy"] == {"cleanPodPolicy": "All", "backoffLimit": 0, "activeDeadlineSeconds": 3600}
    assert set(job["spec"]["tfReplicaSpecs"]) == {"Worker"}  # MultiWorkerMirrored: no chief, no PS
    worker = job["spec"]["tfReplicaSpecs"]["Worker"]
    assert worker["replicas"] == 3 and worker["restartPolicy"] == "Never"
    pod = worker["template"]["spec"]
    assert pod["serviceAccountName"] == "gdmix-pipeline"
    (c,) = pod["containers"]
    assert c["name"] == "tensorflow"  # the container the operator injects TF_CONFIG into
    assert c["image"] == "localhost/gdmix-trainer:0.1.0"
    assert c["command"] == ["python3", "-m", "gdmix.fixed_effect.worker", "--workdir", "/gdmix/runs/movielens",
                            "--iteration", "1", "--coordinate", "global"]
    assert c["resources"] == {"requests": {"cpu": "2", "memory": "3Gi"}, "limits": {"memory": "6Gi"}}
    assert c["volumeMounts"] == [{"name": "work", "mountPath": "/gdmix"}]
    assert pod["volumes"] == [{"name": "work", "persistentVolumeClaim": {"claimName": "gdmix-work"}}]
    assert worker["template"]["metadata"]["labels"] == meta["labels"]


def test_pod_template_is_a_valid_kubernetes_pod_template():
    kv = pytest.importorskip("kubernetes_validate")
    job = tfjob.build("gs://bucket/runs/x", Step(0, "global"), 2, SETTINGS)
    template = {"apiVersion": "v1", "kind": "PodTemplate",
                "metadata": {"name": "t", "namespace": "kubeflow"},
                "template": job["spec"]["tfReplicaSpecs"]["Worker"]["template"]}
    kv.validate(template, "1.30", strict=True)
    template["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"] = ["2"]
    with pytest.raises(kv.ValidationError):
        kv.validate(template, "1.30", strict=True)


def test_job_names_are_unique_per_run_and_step_and_short():
    long = Step(12, "a-very-long-coordinate-name-that-goes-on-and-on-and-on")
    names = {tfjob.job_name(w, s) for w in ("/a", "/b") for s in (Step(0, "global"), Step(1, "global"), long)}
    assert len(names) == 6
    assert all(len(n) <= tfjob.MAX_NAME and not n.endswith("-") for n in names)


def test_state_of_a_job():
    assert tfjob.state({}) == ("Pending", "")
    running = {"status": {"conditions": [{"type": "Created", "status": "True"},
                                         {"type": "Running", "status": "True"}],
                          "replicaStatuses": {"Worker": {"active": 2}}}}
    assert tfjob.state(running)[0] == "Running"
    assert tfjob.replica_summary(running) == "active 2"
    failed = {"status": {"conditions": [{"type": "Running", "status": "False"},
                                        {"type": "Failed", "status": "True", "message": "worker 1 exited 1"}]}}
    assert tfjob.state(failed) == ("Failed", "worker 1 exited 1")
    done = {"status": {"conditions": [{"type": "Running", "status": "False"}, {"type": "Succeeded", "status": "True"}]}}
    assert tfjob.state(done)[0] == "Succeeded"


def test_launcher_selection():
    assert tfjob.select(env={}) is launchers.run_local
    assert tfjob.select(env={"KUBERNETES_SERVICE_HOST": "10.0.0.1"}) is tfjob.launch
    assert tfjob.select(env={"KUBERNETES_SERVICE_HOST": "10.0.0.1", "GDMIX_LAUNCHER": "local"}) is launchers.run_local
    assert tfjob.select("tfjob", env={}) is tfjob.launch
    with pytest.raises(ValueError, match="unknown fixed-effect launcher"):
        tfjob.select(env={"GDMIX_LAUNCHER": "slurm"})


def test_settings_from_the_step_environment():
    with pytest.raises(RuntimeError, match="GDMIX_TFJOB_IMAGE"):
        tfjob.Settings.from_env({})
    s = tfjob.Settings.from_env({"GDMIX_TFJOB_IMAGE": "img:1", "GDMIX_NAMESPACE": "team",
                                 "GDMIX_WORK_PVC": "vol", "GDMIX_TFJOB_CPU": "4"})
    assert (s.image, s.namespace, s.pvc, s.cpu, s.service_account) == ("img:1", "team", "vol", "4", "gdmix-pipeline")


def test_deep_fixed_effect_pods_run_the_deep_worker():
    from gdmix.fixed_effect.stage import DNN_WORKER_COMMAND

    module = DNN_WORKER_COMMAND[DNN_WORKER_COMMAND.index("-m") + 1]
    job = tfjob.build("/gdmix/runs/x", Step(0, "global"), 2, SETTINGS, module=module)
    spec = job["spec"]["tfReplicaSpecs"]["Worker"]["template"]["spec"]
    assert spec["containers"][0]["command"][:3] == ["python3", "-m", "gdmix.deep.worker"]
    linear = tfjob.build("/gdmix/runs/x", Step(0, "global"), 2, SETTINGS)
    assert linear["spec"]["tfReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["command"][2] \
        == "gdmix.fixed_effect.worker"

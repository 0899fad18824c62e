"""The fixed-effect TFJob object and launcher (no cluster here: the object is checked against
the Training Operator v1.8.1 CRD schema and its pod template against the Kubernetes schema;
the launcher runs against a scripted fake of the two Kubernetes APIs it calls)."""
import io
import re
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from gdmix.fixed_effect import launcher as launchers
from gdmix.kfp import tfjob, tfjob_settings
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
    assert job["spec"]["runPolicy"] == {"cleanPodPolicy": "All", "backoffLimit": 0, "activeDeadlineSeconds": 3600,
                                        "ttlSecondsAfterFinished": tfjob_settings.TTL_S}
    assert "ownerReferences" not in meta  # no pod identity in SETTINGS
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
    with pytest.raises(ValueError, match="GDMIX_LAUNCHER: unknown launcher .slurm."):
        tfjob.select(env={"GDMIX_LAUNCHER": "slurm"})


def test_settings_from_the_step_environment():
    with pytest.raises(RuntimeError, match="GDMIX_TFJOB_IMAGE"):
        tfjob.Settings.from_env({})
    s = tfjob.Settings.from_env({"GDMIX_TFJOB_IMAGE": "img:1", "GDMIX_NAMESPACE": "team",
                                 "GDMIX_WORK_PVC": "vol", "GDMIX_TFJOB_CPU": "4"})
    assert (s.image, s.namespace, s.pvc, s.cpu, s.service_account) == ("img:1", "team", "vol", "4", "gdmix-pipeline")
    assert (s.memory, s.memory_limit, s.unschedulable_s) == ("2Gi", "4Gi", tfjob_settings.UNSCHEDULABLE_S)


def test_settings_take_the_coordinates_cpu_and_memory_over_the_environment():
    env = {"GDMIX_TFJOB_IMAGE": "img:1", "GDMIX_TFJOB_CPU": "4", "GDMIX_TFJOB_MEMORY": "8Gi"}
    s = tfjob.Settings.from_env(env, cpu="500m", memory="1536Mi")
    assert (s.cpu, s.memory, s.memory_limit) == ("500m", "1536Mi", "1536Mi")  # the config's memory is the limit too
    s = tfjob.Settings.from_env({**env, "GDMIX_TFJOB_MEMORY_LIMIT": "3Gi"}, memory="1536Mi")
    assert (s.cpu, s.memory, s.memory_limit) == ("4", "1536Mi", "3Gi")
    s = tfjob.Settings.from_env(env)
    assert (s.cpu, s.memory, s.memory_limit) == ("4", "8Gi", "4Gi")
    job = tfjob.build("/w", Step(0, "global"), 3, tfjob.Settings.from_env(env, cpu="250m", memory="1Gi"))
    c = job["spec"]["tfReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    assert c["resources"] == {"requests": {"cpu": "250m", "memory": "1Gi"}, "limits": {"memory": "1Gi"}}


def test_deep_fixed_effect_pods_run_the_deep_worker():
    from gdmix.fixed_effect.stage import DNN_WORKER_COMMAND

    module = DNN_WORKER_COMMAND[DNN_WORKER_COMMAND.index("-m") + 1]
    job = tfjob.build("/gdmix/runs/x", Step(0, "global"), 2, SETTINGS, module=module)
    spec = job["spec"]["tfReplicaSpecs"]["Worker"]["template"]["spec"]
    assert spec["containers"][0]["command"][:3] == ["python3", "-m", "gdmix.deep.worker"]
    linear = tfjob.build("/gdmix/runs/x", Step(0, "global"), 2, SETTINGS)
    assert linear["spec"]["tfReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["command"][2] \
        == "gdmix.fixed_effect.worker"


# ---- the Training Operator v1.8.1 CRD schema ----------------------------------------------

SCHEMA_PATH = Path(__file__).parent / "schemas" / "tfjob-v1.8.1.openapi.yaml"


def _strict(node):
    """The CRD's structural schema with unknown fields refused: where an object lists its
    properties and neither allows extra ones nor preserves unknown fields, add
    ``additionalProperties: false`` (what ``kubectl apply --validate=strict`` reports; without
    it the API server silently prunes a misspelt field)."""
    if isinstance(node, dict):
        node = {k: _strict(v) for k, v in node.items()}
        if "properties" in node and "additionalProperties" not in node \
                and not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
        return node
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


@pytest.fixture(scope="module")
def crd_validator():
    jsonschema = pytest.importorskip("jsonschema")
    text = SCHEMA_PATH.read_text()
    assert "kubeflow/training-operator v1.8.1" in text.splitlines()[1]
    schema = _strict(yaml.safe_load(text))
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def _errors(validator, obj):
    return sorted(".".join(map(str, e.absolute_path)) + ": " + e.message for e in validator.iter_errors(obj))


OWNED = tfjob.Settings(image="localhost/gdmix-trainer:0.1.0-abc", namespace="kubeflow", pvc="gdmix-work",
                       pod_annotations={"gke-gcsfuse/volumes": "true"},
                       owner=("gdmix-movielens-abcde-system-container-impl-123", "0b3f4a1e-6c2d-4e55-9a43-1b8b2f1c9d10"))


@pytest.mark.parametrize("settings,workdir", [(SETTINGS, "/gdmix/runs/movielens"), (OWNED, "gs://bucket/runs/x"),
                                              (tfjob.Settings(image="i", ttl_s=None, clean_pod_policy="None"), "/w")])
def test_tfjob_object_is_valid_against_the_training_operator_crd(crd_validator, settings, workdir):
    job = tfjob.build(workdir, Step(2, "global"), 4, settings, timeout_s=3600)
    assert _errors(crd_validator, job) == []


def test_the_crd_schema_catches_what_the_operator_would_refuse_or_drop(crd_validator):
    job = tfjob.build("/w", Step(0, "global"), 2, SETTINGS, timeout_s=60)
    bad = yaml.safe_load(yaml.safe_dump(job))
    bad["spec"]["tfReplicaSpecs"]["Worker"]["replicas"] = "2"  # a string where int32 is required
    assert any("replicas" in e for e in _errors(crd_validator, bad))
    bad = yaml.safe_load(yaml.safe_dump(job))
    bad["spec"]["runPolicy"]["backoffLimits"] = 0  # misspelt: pruned silently by the API server
    assert any("backoffLimits" in e for e in _errors(crd_validator, bad))
    bad = yaml.safe_load(yaml.safe_dump(job))
    bad["spec"]["tfReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"] \
        = "2 cores"  # not a Kubernetes quantity
    assert any("cpu" in e for e in _errors(crd_validator, bad))
    bad = yaml.safe_load(yaml.safe_dump(job))
    del bad["spec"]["tfReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["name"]  # required
    assert any("'name' is a required property" in e for e in _errors(crd_validator, bad))


def test_worker_pod_annotations_for_a_bucket_volume():
    s = tfjob.Settings.from_env({"GDMIX_TFJOB_IMAGE": "i", "GDMIX_WORK_POD_ANNOTATIONS": "gke-gcsfuse/volumes=true, a=b"})
    assert s.pod_annotations == {"gke-gcsfuse/volumes": "true", "a": "b"}
    template = tfjob.build("/w", Step(0, "global"), 2, s)["spec"]["tfReplicaSpecs"]["Worker"]["template"]
    assert template["metadata"]["annotations"] == {"gke-gcsfuse/volumes": "true", "a": "b"}
    assert "annotations" not in tfjob.build("/w", Step(0, "global"), 2, SETTINGS)["spec"]["tfReplicaSpecs"][
        "Worker"]["template"]["metadata"]
    with pytest.raises(RuntimeError, match="GDMIX_WORK_POD_ANNOTATIONS"):
        tfjob.Settings.from_env({"GDMIX_TFJOB_IMAGE": "i", "GDMIX_WORK_POD_ANNOTATIONS": "novalue"})


def test_owner_reference_to_the_step_pod(monkeypatch):
    monkeypatch.setattr(tfjob_settings, "_pod_namespace", lambda: "kubeflow")
    env = {"GDMIX_TFJOB_IMAGE": "img:1", "KFP_POD_NAME": "run-xyz-impl-1", "KFP_POD_UID": "uid-1"}
    s = tfjob.Settings.from_env(env)
    assert s.namespace == "kubeflow" and s.owner == ("run-xyz-impl-1", "uid-1")
    meta = tfjob.build("/w", Step(0, "global"), 2, s)["metadata"]
    assert meta["ownerReferences"] == [{"apiVersion": "v1", "kind": "Pod", "name": "run-xyz-impl-1", "uid": "uid-1",
                                        "controller": False, "blockOwnerDeletion": False}]
    # the object metadata, owner included, is valid Kubernetes ObjectMeta
    kv = pytest.importorskip("kubernetes_validate")
    kv.validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta}, "1.30", strict=True)
    # GDMIX_POD_* when KFP's variables are absent; none without both name and uid
    assert tfjob.Settings.from_env({"GDMIX_TFJOB_IMAGE": "i", "GDMIX_POD_NAME": "p", "GDMIX_POD_UID": "u"}).owner \
        == ("p", "u")
    assert tfjob.Settings.from_env({"GDMIX_TFJOB_IMAGE": "i", "KFP_POD_NAME": "p"}).owner is None
    # a job in another namespace cannot be owned by this pod (the GC would delete it at once)
    assert tfjob.Settings.from_env({**env, "GDMIX_NAMESPACE": "team"}).owner is None
    monkeypatch.setattr(tfjob_settings, "_pod_namespace", lambda: None)
    assert tfjob.Settings.from_env(env).owner is None


def test_coordinate_resources_come_from_the_run_config(tmp_path):
    from gdmix import config

    cfg = config.load(str(Path(__file__).resolve().parents[1] / "examples" / "movielens.yaml"))
    assert tfjob.coordinate_resources(str(tmp_path), Step(0, "global")) == (None, None)  # no snapshot yet
    config.snapshot(cfg.with_workdir(str(tmp_path)))
    assert tfjob.coordinate_resources(str(tmp_path), Step(0, "global")) == (None, None)  # keys not set
    raw = config.to_raw(cfg)
    raw["coordinates"][0].update(cpu="750m", memory="1536Mi")
    config.snapshot(config.parse(raw).with_workdir(str(tmp_path)))
    assert tfjob.coordinate_resources(str(tmp_path), Step(1, "global")) == ("750m", "1536Mi")
    raw["coordinates"][0]["memory"] = "lots"
    with pytest.raises(config.ConfigError, match="memory"):
        config.parse(raw)


# ---- the launcher against a scripted fake cluster -------------------------------------------

class FakeStream:
    def __init__(self, chunks):
        self.chunks, self.released = chunks, False

    def stream(self, n):
        yield from self.chunks

    def release_conn(self):
        self.released = True


def pod(name, phase, conditions=(), waiting=None):
    status = {"phase": phase, "conditions": list(conditions)}
    if waiting:
        status["containerStatuses"] = [{"name": "tensorflow", "state": {"waiting": waiting}}]
    return {"metadata": {"name": name}, "status": status}


def job_status(*conds, **replicas):
    out = {"conditions": [{"type": c, "status": "True", "message": m} for c, m in conds]}
    if replicas:
        out["replicaStatuses"] = {"Worker": replicas}
    return out


class FakeCluster:
    """CustomObjectsApi + CoreV1Api, enough for ``launch``: poll i returns script[i]
    (job status, worker pods), the last entry repeating; ``on_poll[i]`` runs at poll i."""

    def __init__(self, script, logs=None, on_poll=None):
        self.script, self.logs, self.on_poll = script, logs or {}, on_poll or {}
        self.created, self.deleted, self.exists, self.polls = [], [], False, 0
        self.followed = []

    def _404(self):
        from kubernetes.client.exceptions import ApiException

        return ApiException(status=404, reason="Not Found")

    def create_namespaced_custom_object(self, group, version, ns, plural, body):
        assert (group, version, plural) == ("kubeflow.org", "v1", "tfjobs")
        self.created.append(body)
        self.exists = True

    def get_namespaced_custom_object(self, group, version, ns, plural, name):
        if not self.exists:
            raise self._404()
        n, i = self.polls, min(self.polls, len(self.script) - 1)
        self.polls += 1
        if n in self.on_poll:
            self.on_poll[n]()
        return {"metadata": {"name": name}, "status": self.script[i][0]}

    def delete_namespaced_custom_object(self, group, version, ns, plural, name, propagation_policy=None):
        if not self.exists:
            raise self._404()
        assert propagation_policy == "Foreground"
        self.deleted.append(name)
        self.exists = False

    def list_namespaced_pod(self, ns, label_selector):
        assert label_selector.startswith("training.kubeflow.org/job-name=")
        return SimpleNamespace(items=self.script[min(self.polls - 1, len(self.script) - 1)][1])

    def read_namespaced_pod_log(self, name, ns, container, follow=False, _preload_content=True, tail_lines=None):
        assert container == "tensorflow"
        if follow:
            self.followed.append(name)
            return FakeStream(self.logs.get(name, []))
        return "".join(c.decode() for c in self.logs.get(name, []))[-2000:]


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setattr(tfjob, "POLL_S", 0.01)


def run_launch(cluster, workdir, settings=SETTINGS, workers=2, timeout_s=30.0):
    out = io.StringIO()
    try:
        tfjob.launch(str(workdir), Step(0, "global"), workers, timeout_s, 5.0, settings=settings,
                     clients=(cluster, cluster), out=out)
    finally:
        cluster.output = out.getvalue()


def test_launch_streams_each_workers_log_into_the_steps_log(tmp_path, fast):
    w0, w1 = "gdmix-i0-global-x-worker-0", "gdmix-i0-global-x-worker-1"
    cluster = FakeCluster(
        [(job_status(("Created", "")), [pod(w0, "Pending"), pod(w1, "Pending")]),
         (job_status(("Running", ""), active=2), [pod(w0, "Running"), pod(w1, "Running")]),
         (job_status(("Running", ""), active=2), [pod(w0, "Running"), pod(w1, "Running")]),
         (job_status(("Succeeded", ""), succeeded=2), [])],
        logs={w0: [b"iter 1 objective 0.69\nit", b"er 2 objective 0.51\n"], w1: [b"worker 1 ready\n"]})
    run_launch(cluster, tmp_path)
    out = cluster.output
    assert f"[{w0}] iter 1 objective 0.69\n" in out and f"[{w0}] iter 2 objective 0.51\n" in out  # split chunks joined
    assert f"[{w1}] worker 1 ready" in out
    assert sorted(cluster.followed) == [w0, w1]  # each followed once, although seen running twice
    assert "Succeeded" in out
    assert cluster.deleted == [cluster.created[0]["metadata"]["name"]] and not cluster.exists


def test_a_failed_job_reports_the_streamed_tail_although_its_pods_are_gone(tmp_path, fast):
    w0, w1 = "j-worker-0", "j-worker-1"
    cluster = FakeCluster(
        [(job_status(("Running", ""), active=2), [pod(w0, "Running"), pod(w1, "Running")]),
         (job_status(("Running", ""), active=2), [pod(w0, "Running"), pod(w1, "Running")]),
         # the operator deleted the pods (backoffLimit 0) and then marked the job failed
         (job_status(("Running", ""), ("Failed", "Job has failed because it has reached the specified backoff limit")),
          [])],
        logs={w0: [b"iter 1\n"], w1: [b"loading shard 1\nTraceback (most recent call last):\nValueError: bad row 7\n"]})
    with pytest.raises(RuntimeError) as e:
        run_launch(cluster, tmp_path)
    msg = str(e.value)
    assert "failed: Job has failed because it has reached the specified backoff limit" in msg
    assert f"--- {w1} (last 3 lines) ---" in msg and "ValueError: bad row 7" in msg
    assert not cluster.exists and len(cluster.deleted) == 1


def test_an_unschedulable_worker_fails_fast_with_the_schedulers_reason(tmp_path, fast):
    unschedulable = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                     "message": "0/1 nodes are available: 1 Insufficient cpu."}
    settings = tfjob.Settings(image="i", namespace="kubeflow", cpu="1", memory="2Gi", unschedulable_s=0.05)
    cluster = FakeCluster([(job_status(("Created", ""), active=1),
                            [pod("j-worker-0", "Running"), pod("j-worker-1", "Pending", [unschedulable])])])
    with pytest.raises(RuntimeError) as e:
        run_launch(cluster, tmp_path, settings=settings, timeout_s=60.0)
    msg = str(e.value)
    assert "cannot start worker pod j-worker-1" in msg and "Insufficient cpu" in msg
    assert "2 worker(s) of 1 CPU / 2Gi" in msg
    assert cluster.polls < 100  # long before the 60 s timeout
    assert not cluster.exists
    assert cluster.output.count("j-worker-1 cannot start yet: unschedulable") == 1  # said once, not per poll


def test_a_pod_waiting_for_the_scheduler_or_an_image_pull(tmp_path, fast):
    # Pending without a blocker (being scheduled, pulling): no failure, whatever the time.
    settings = tfjob.Settings(image="i", namespace="kubeflow", unschedulable_s=0.0)
    cluster = FakeCluster([(job_status(("Created", "")), [pod("j-worker-0", "Pending")])] * 5
                          + [(job_status(("Succeeded", "")), [])])
    run_launch(cluster, tmp_path, settings=settings, workers=1)
    assert cluster.polls == 6
    # An image that cannot be pulled counts like an unschedulable pod.
    stuck = pod("j-worker-0", "Pending", waiting={"reason": "ImagePullBackOff",
                                                 "message": "Back-off pulling image \"localhost/gdmix-trainer:x\""})
    cluster = FakeCluster([(job_status(("Created", "")), [stuck])])
    with pytest.raises(RuntimeError, match="ImagePullBackOff: Back-off pulling image"):
        run_launch(cluster, tmp_path, settings=settings, workers=1)


def test_pod_blocker_reads_kubernetes_client_models():
    from kubernetes.client import (V1ContainerState, V1ContainerStateWaiting, V1ContainerStatus, V1ObjectMeta,
                                   V1Pod, V1PodCondition, V1PodStatus)

    p = V1Pod(metadata=V1ObjectMeta(name="p"), status=V1PodStatus(phase="Pending", conditions=[
        V1PodCondition(type="PodScheduled", status="False", reason="Unschedulable",
                       message="0/3 nodes are available: 3 Insufficient memory.")]))
    assert tfjob.pod_blocker(p) == "unschedulable: 0/3 nodes are available: 3 Insufficient memory."
    p.status.conditions = [V1PodCondition(type="PodScheduled", status="True")]
    assert tfjob.pod_blocker(p) is None
    p.status.container_statuses = [V1ContainerStatus(
        name="tensorflow", image="i", image_id="", ready=False, restart_count=0,
        state=V1ContainerState(waiting=V1ContainerStateWaiting(reason="ErrImagePull", message="not found")))]
    assert tfjob.pod_blocker(p) == "ErrImagePull: not found"
    p.status.phase = "Running"
    assert tfjob.pod_blocker(p) is None


def test_sigterm_deletes_the_job_and_restores_the_handler(tmp_path, fast):
    before = signal.getsignal(signal.SIGTERM)
    cluster = FakeCluster([(job_status(("Running", ""), active=2), [])],
                          on_poll={2: lambda: signal.raise_signal(signal.SIGTERM)})
    delete = cluster.delete_namespaced_custom_object

    def delete_under_a_second_sigterm(*args, **kwargs):
        if cluster.exists:  # the cleanup, not the check for an earlier attempt's job before create
            signal.raise_signal(signal.SIGTERM)  # ignored while the job is being deleted
        return delete(*args, **kwargs)

    cluster.delete_namespaced_custom_object = delete_under_a_second_sigterm
    with pytest.raises(tfjob.Terminated) as e:
        run_launch(cluster, tmp_path)
    assert e.value.code == 128 + signal.SIGTERM
    assert cluster.deleted and not cluster.exists
    assert "terminated (SIGTERM): deleting the job" in cluster.output
    assert signal.getsignal(signal.SIGTERM) is before


def test_launch_takes_worker_resources_from_the_coordinates_config(tmp_path, fast, monkeypatch):
    from gdmix import config

    raw = config.to_raw(config.load(str(Path(__file__).resolve().parents[1] / "examples" / "movielens.yaml")))
    raw["coordinates"][0].update(cpu="500m", memory="1536Mi")
    config.snapshot(config.parse(raw).with_workdir(str(tmp_path)))
    monkeypatch.setenv("GDMIX_TFJOB_IMAGE", "localhost/gdmix-trainer:t")
    monkeypatch.setenv("GDMIX_TFJOB_CPU", "3")
    monkeypatch.setattr(tfjob_settings, "_pod_namespace", lambda: None)
    cluster = FakeCluster([(job_status(("Succeeded", "")), [])])
    out = io.StringIO()
    tfjob.launch(str(tmp_path), Step(0, "global"), 2, 30.0, 5.0, clients=(cluster, cluster), out=out)
    c = cluster.created[0]["spec"]["tfReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    assert c["resources"] == {"requests": {"cpu": "500m", "memory": "1536Mi"}, "limits": {"memory": "1536Mi"}}
    assert "2 worker(s) of 500m CPU / 1536Mi" in out.getvalue()

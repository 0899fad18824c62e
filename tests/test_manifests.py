"""manifests/: built-in kinds pass kubernetes-validate (offline, strict), kustomizations
reference pinned remote bases or files that exist, RBAC grants what KFP, Argo, the TFJob
launcher and Spark drivers need (REQUIREMENTS, each with its upstream source) and no more,
and names agree with the pipeline and the TFJob launcher."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from gdmix.kfp import submit, tfjob

kv = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "manifests"
K8S_VERSION = "1.30"
CLUSTER_SCOPED = {"PersistentVolume"}
STORAGE_OVERLAYS = ("filestore", "nfs", "gcs-fuse-csi")


def documents():
    for path in sorted(MANIFESTS.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield path.relative_to(MANIFESTS), doc


def kubernetes_objects():
    return [(p, d) for p, d in documents()
            if d.get("kind") not in ("Kustomization", "Cluster") and "kustomize" not in d.get("apiVersion", "")]


def by_kind(kind):
    return [d for _, d in kubernetes_objects() if d["kind"] == kind]


def test_every_built_in_object_is_valid():
    objects = kubernetes_objects()
    assert {d["kind"] for _, d in objects} >= {"ServiceAccount", "Role", "RoleBinding", "PersistentVolumeClaim", "Job",
                                               "PersistentVolume", "ConfigMap"}
    for path, doc in objects:
        kv.validate(doc, K8S_VERSION, strict=True)  # raises with the path of the bad field


def test_the_validator_catches_a_bad_object():
    (pvc,) = by_kind("PersistentVolumeClaim")
    bad = {**pvc, "spec": {**pvc["spec"], "accessMode": ["ReadWriteOnce"]}}  # misspelt field
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, K8S_VERSION, strict=True)


def test_kustomizations_use_pinned_remote_bases_or_local_files():
    remote = []
    for path, doc in documents():
        if doc.get("kind") != "Kustomization":
            continue
        assert doc["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
        for res in doc["resources"]:
            if res.startswith(("github.com/", "https://")):
                assert re.search(r"\?ref=v?\d+\.\d+\.\d+$", res), f"{path}: {res} is not pinned to a release"
                remote.append(res)
            else:
                assert (MANIFESTS / path.parent / res).exists(), f"{path}: {res} does not exist"
    assert any("kubeflow/pipelines" in r for r in remote)
    assert any("kubeflow/training-operator" in r for r in remote)
    assert not list(MANIFESTS.rglob("*crd*")), "remote bases, not vendored copies"


def test_kind_cluster_config():
    (cluster,) = [d for _, d in documents() if d.get("kind") == "Cluster"]
    assert cluster["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    roles = [n["role"] for n in cluster["nodes"]]
    assert roles == ["control-plane"], "one node: the ReadWriteOnce work volume is shared by every step"


# What each consumer of the gdmix-pipeline service account needs, read from the upstream
# sources at the versions this project pins (KFP 2.14.3, the Argo Workflows v3.6.7 it pins in
# its go.mod line 8, Training Operator v1.8.1) and from our own launcher.
# (consumer, apiGroup, resource, verb, resourceName or None: any name)
KFP_ARTIFACT_SECRET = "mlpipeline-minio-artifact"
REQUIREMENTS = [
    # KFP launcher, every step pod: launcher_v2.go:209 opens the pipeline root's bucket with
    # objectstore.OpenBucket (object_store.go:40), which for minio/s3 reads the credentials
    # secret (object_store.go:296, Secrets(namespace).Get); the default secret name is
    # config/env.go:40 (minioArtifactSecretName), used for the minio provider at env.go:172.
    ("kfp-launcher", "", "secrets", "get", KFP_ARTIFACT_SECRET),
    # KFP root driver: driver/root_dag.go:90 calls config.FromConfigMap, which gets the
    # "kfp-launcher" config map (config/env.go:36 name, env.go:63 ConfigMaps().Get).
    ("kfp-driver", "", "configmaps", "get", "kfp-launcher"),
    # KFP driver, kubernetes-platform tasks: driver/k8s.go:927 gets its own pod
    # (publishDriverExecution) to record the pod's UID.
    ("kfp-driver", "", "pods", "get", None),
    # Argo executor (wait container), v3.6.7: workflow/executor/taskresult.go:82 creates the
    # node's WorkflowTaskResult, taskresult.go:30 and :48 patch it; docs/workflow-rbac.md
    # lines 11-28 give exactly this as the executor's minimum for >= v3.4. Not needed in
    # v3.6.7: pods patch (executor.go:883 AddAnnotation has no caller), pods/log (logs are
    # read from the emissary's files, executor.go:667 saveLogToFile), secrets (artifact
    # credentials are mounted as volumes, executor.go:658 GetSecret).
    ("argo-executor", "argoproj.io", "workflowtaskresults", "create", None),
    ("argo-executor", "argoproj.io", "workflowtaskresults", "patch", None),
    # TFJob launcher: src/gdmix/kfp/tfjob.py launch() creates, polls and deletes its TFJob
    # (create_/get_/delete_namespaced_custom_object), lists the workers' pods by the
    # operator's label (training.kubeflow.org/job-name, training-operator v1.8.1
    # pkg/apis/kubeflow.org/v1/common_types.go:34) and follows their logs.
    ("tfjob-launcher", "kubeflow.org", "tfjobs", "create", None),
    ("tfjob-launcher", "kubeflow.org", "tfjobs", "get", None),
    ("tfjob-launcher", "kubeflow.org", "tfjobs", "delete", None),
    ("tfjob-launcher", "", "pods", "list", None),
    ("tfjob-launcher", "", "pods/log", "get", None),
    # Spark driver on Kubernetes (apache/spark resource-managers/kubernetes/core,
    # scheduler/cluster/k8s; read at commits 00c026d9 and 0132955c):
    # ExecutorPodsAllocator gets the driver pod by name and waits for it to be ready
    # (a watch); creates executor pods and deletes them by label (a collection delete);
    # the watch/polling snapshot sources list and watch them; KubernetesClusterSchedulerBackend
    # labels each executor pod with its id (patch), creates the executors' config map
    # (setUpExecutorConfigMap) and deletes it by label at stop; the allocator lists the PVCs
    # its executors mount before reusing them.
    ("spark-driver", "", "pods", "get", None),
    ("spark-driver", "", "pods", "list", None),
    ("spark-driver", "", "pods", "watch", None),
    ("spark-driver", "", "pods", "create", None),
    ("spark-driver", "", "pods", "patch", None),
    ("spark-driver", "", "pods", "delete", None),
    ("spark-driver", "", "pods", "deletecollection", None),
    ("spark-driver", "", "configmaps", "create", None),
    ("spark-driver", "", "configmaps", "list", None),
    ("spark-driver", "", "configmaps", "delete", None),
    ("spark-driver", "", "configmaps", "deletecollection", None),
    ("spark-driver", "", "persistentvolumeclaims", "get", None),
    ("spark-driver", "", "persistentvolumeclaims", "list", None),
]


def _allows(rule, group, resource, verb, name):
    """Whether one RBAC rule allows the request (as the API server's RBAC authorizer
    matches: group, resource and verb listed; resourceNames empty or naming the object)."""
    return (group in rule.get("apiGroups", []) and resource in rule.get("resources", [])
            and verb in rule.get("verbs", [])
            and (not rule.get("resourceNames") or (name is not None and name in rule["resourceNames"])))


def the_role():
    (role,) = by_kind("Role")
    return role


def test_rbac_binds_the_pipeline_service_account_to_its_role():
    (sa,) = by_kind("ServiceAccount")
    (binding,) = by_kind("RoleBinding")
    role = the_role()
    assert not by_kind("ClusterRole") and not by_kind("ClusterRoleBinding")
    assert sa["metadata"]["name"] == submit.SERVICE_ACCOUNT == tfjob.Settings(image="x").service_account
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                    "namespace": sa["metadata"]["namespace"]}]


@pytest.mark.parametrize("consumer,group,resource,verb,name", REQUIREMENTS,
                         ids=[f"{r[0]}:{r[3]}:{r[2]}" for r in REQUIREMENTS])
def test_rbac_grants_what_each_consumer_needs(consumer, group, resource, verb, name):
    rules = the_role()["rules"]
    assert any(_allows(r, group, resource, verb, name) for r in rules), \
        f"{consumer} needs {verb} on {group or 'core'}/{resource}" + (f" {name!r}" if name else "")


def test_rbac_grants_nothing_beyond_the_requirements():
    needed = {(g, r, v) for _, g, r, v, _ in REQUIREMENTS}
    for rule in the_role()["rules"]:
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[field], f"no wildcards: {rule}"
        for g in rule["apiGroups"]:
            for r in rule["resources"]:
                for v in rule["verbs"]:
                    assert (g, r, v) in needed, f"{v} on {g or 'core'}/{r} is not in REQUIREMENTS"


def test_rbac_secrets_are_readable_by_name_only():
    secret_rules = [r for r in the_role()["rules"] if "secrets" in r["resources"]]
    assert secret_rules, "the KFP launcher must read its artifact-store secret"
    for rule in secret_rules:
        assert rule["resourceNames"] == [KFP_ARTIFACT_SECRET] and rule["verbs"] == ["get"]
    assert not any(_allows(r, "", "secrets", "get", "some-other-secret") for r in the_role()["rules"])
    assert not any(_allows(r, "", "secrets", v, None) for r in the_role()["rules"] for v in ("list", "watch"))


def test_rbac_matcher_is_not_vacuous():
    # The matcher itself: a name-restricted rule does not allow another name, nor a list.
    rule = {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["a"], "verbs": ["get"]}
    assert _allows(rule, "", "secrets", "get", "a")
    assert not _allows(rule, "", "secrets", "get", "b")
    assert not _allows(rule, "", "secrets", "get", None)
    assert not _allows(rule, "argoproj.io", "secrets", "get", "a")
    # The bug this replaces: a role without the launcher's and executor's rules fails.
    without = [r for r in the_role()["rules"] if "secrets" not in r["resources"]
               and "workflowtaskresults" not in r["resources"]]
    missing = [req for req in REQUIREMENTS if not any(_allows(r, *req[1:]) for r in without)]
    assert {req[0] for req in missing} == {"kfp-launcher", "argo-executor"}


def test_work_volume_matches_the_pipeline_and_jobs():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gdmix_pipeline", ROOT / "pipelines" / "gdmix_pipeline.py")
    gp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gp)
    (pvc,) = by_kind("PersistentVolumeClaim")
    assert pvc["metadata"]["name"] == gp.WORK_VOLUME
    namespaces = {d["metadata"].get("namespace") for _, d in kubernetes_objects() if d["kind"] not in CLUSTER_SCOPED}
    assert namespaces == {"kubeflow"}, "everything lives in the KFP standalone namespace"
    assert all("namespace" not in d["metadata"] for _, d in kubernetes_objects() if d["kind"] in CLUSTER_SCOPED)
    (job,) = by_kind("Job")
    pod = job["spec"]["template"]["spec"]
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == gp.WORK_VOLUME
    assert pod["containers"][0]["volumeMounts"][0]["mountPath"] == gp.MOUNT_PATH
    assert pod["securityContext"]["runAsNonRoot"] is True


# ---- make run-local --wait: progress, not a silent timeout (gdmix.kfp.submit.wait_for_run) ----

def _task(tid, name, state, error=None, pod_name=None):
    from types import SimpleNamespace as NS

    return NS(task_id=tid, display_name=name, state=state, error=NS(message=error) if error else None,
              pod_name=pod_name)


class _FakeKfp:
    """kfp.Client.get_run over a script of (run state, tasks); a fake clock advances per poll."""

    def __init__(self, script):
        self.script, self.calls, self.now = script, 0, 0.0

    def get_run(self, run_id):
        from types import SimpleNamespace as NS

        state, tasks = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        return NS(run_id=run_id, state=state, error=None, run_details=NS(task_details=tasks))

    def clock(self):
        return self.now

    def sleep(self, s):
        self.now += s


def _wait(fake, timeout_s, **kw):
    import io

    out = io.StringIO()
    rc = submit.wait_for_run(fake, "r1", timeout_s, poll_s=10, out=out, clock=fake.clock, sleep=fake.sleep, **kw)
    return rc, out.getvalue()


def test_wait_reports_each_state_change_and_succeeds():
    prep = lambda s: _task("t1", "prepare", s)  # noqa: E731
    fake = _FakeKfp([("PENDING", []), ("RUNNING", [prep("RUNNING")]), ("RUNNING", [prep("RUNNING")]),
                     ("RUNNING", [prep("SUCCEEDED"), _task("t2", "global: partition", "RUNNING")]),
                     ("SUCCEEDED", [prep("SUCCEEDED"), _task("t2", "global: partition", "SUCCEEDED")])])
    rc, out = _wait(fake, 900)
    assert rc == 0
    lines = out.splitlines()
    assert [l.split("] ", 1)[1] for l in lines] == [
        "run PENDING", "run RUNNING", "  prepare: RUNNING", "  prepare: SUCCEEDED", "  global: partition: RUNNING",
        "run SUCCEEDED", "  global: partition: SUCCEEDED", "run r1 SUCCEEDED: 2/2 task(s) ended"]


def test_wait_gives_up_with_what_is_still_running_and_says_so():
    fake = _FakeKfp([("RUNNING", [_task("t1", "prepare", "SUCCEEDED"),
                                  _task("t2", "global: fixed effect", "RUNNING")])])
    rc, out = _wait(fake, 300, progress_s=60)
    assert rc == submit.EXIT_TIMEOUT
    assert "gave up waiting after 300 s: run r1 is still RUNNING, 1/2 task(s) ended; running: global: fixed effect" \
        in out
    heartbeats = [l for l in out.splitlines() if "still RUNNING: 1/2 task(s) ended; running: global: fixed effect" in l]
    assert len(heartbeats) == 4  # at 60, 120, 180, 240 s: never silent for longer than progress_s
    assert fake.now == 300  # slept up to the timeout, not past it


def test_wait_ends_on_a_cancelled_or_failed_run_naming_the_failed_step():
    # kfp.Client.wait_for_run_completion would wait forever on CANCELED (not in its finish states)
    rc, out = _wait(_FakeKfp([("CANCELED", [_task("t1", "prepare", "CANCELED")])]), 900)
    assert rc == 1 and "run r1 CANCELED" in out
    fake = _FakeKfp([("FAILED", [_task("t1", "prepare", "SUCCEEDED"),
                                 _task("t2", "global: fixed effect", "FAILED", error="TFJob failed: worker 1",
                                       pod_name="gdmix-abc-123")])])
    rc, out = _wait(fake, 900)
    assert rc == 1
    assert "failed: global: fixed effect: TFJob failed: worker 1 (pod gdmix-abc-123)" in out
    assert fake.calls == 1


def test_run_local_waits_with_progress():
    mk = (ROOT / "mk" / "kfp.mk").read_text()
    recipe = mk.split("\nrun-local:", 1)[1].split("\n\n", 1)[0]
    assert "gdmix.kfp.submit run" in recipe and "--wait $(KFP_WAIT_S)" in recipe
    src = (ROOT / "src" / "gdmix" / "kfp" / "submit.py").read_text()
    assert "wait_for_run(kfp_client, result.run_id, args.wait" in src
    assert "wait_for_run_completion(result" not in src


# ---- the work volume: the base's storage parameter and the ReadWriteMany overlays ------------

KUBECTL = shutil.which("kubectl")


def kustomize(path: Path) -> list[dict]:
    """``kubectl kustomize`` (kustomize built into kubectl; offline for local bases)."""
    if KUBECTL is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed")
    out = subprocess.run([KUBECTL, "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def one(objs, kind):
    (obj,) = [o for o in objs if o["kind"] == kind]
    return obj


@pytest.mark.parametrize("path", ["gdmix"] + [f"storage/{o}" for o in STORAGE_OVERLAYS])
def test_rendered_work_volume_manifests_are_valid(path):
    objs = kustomize(MANIFESTS / path)
    for obj in objs:
        kv.validate(obj, K8S_VERSION, strict=True)
    kinds = sorted(o["kind"] for o in objs)
    assert "ConfigMap" not in kinds, "the storage parameters are kustomize-only (local-config), never applied"
    # every variant keeps the same identity and role as the base
    base = kustomize(MANIFESTS / "gdmix")
    for kind in ("ServiceAccount", "Role", "RoleBinding"):
        assert one(objs, kind) == one(base, kind)
    pvc = one(objs, "PersistentVolumeClaim")
    assert pvc["metadata"] == one(base, "PersistentVolumeClaim")["metadata"]
    assert pvc["metadata"]["namespace"] == "kubeflow"


def test_the_base_work_volume_takes_its_class_from_the_storage_parameter(tmp_path):
    pvc = one(kustomize(MANIFESTS / "gdmix"), "PersistentVolumeClaim")
    params = yaml.safe_load((MANIFESTS / "gdmix" / "storage-params.yaml").read_text())
    assert params["metadata"]["annotations"]["config.kubernetes.io/local-config"] == "true"
    assert pvc["spec"]["storageClassName"] == params["data"]["storageClassName"] == "standard"
    assert pvc["spec"]["accessModes"] == [params["data"]["accessMode"]] == ["ReadWriteOnce"]
    # change the parameter in a copy: the claim follows
    copy = tmp_path / "gdmix"
    shutil.copytree(MANIFESTS / "gdmix", copy)
    params["data"].update(storageClassName="fast-rwx", accessMode="ReadWriteMany", size="50Gi")
    (copy / "storage-params.yaml").write_text(yaml.safe_dump(params))
    pvc = one(kustomize(copy), "PersistentVolumeClaim")
    assert pvc["spec"]["storageClassName"] == "fast-rwx"
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["spec"]["resources"]["requests"]["storage"] == "50Gi"


@pytest.mark.parametrize("overlay", STORAGE_OVERLAYS)
def test_storage_overlays_give_a_read_write_many_volume_that_binds(overlay):
    objs = kustomize(MANIFESTS / "storage" / overlay)
    pvc = one(objs, "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    pvs = [o for o in objs if o["kind"] == "PersistentVolume"]
    if overlay == "filestore":  # dynamically provisioned by GKE's Filestore CSI class
        assert not pvs and pvc["spec"]["storageClassName"] == "standard-rwx"
        return
    (pv,) = pvs  # statically bound: the claim names the volume and the volume the claim
    assert "namespace" not in pv["metadata"]
    assert pvc["spec"]["volumeName"] == pv["metadata"]["name"]
    assert pv["spec"]["claimRef"] == {"namespace": pvc["metadata"]["namespace"], "name": pvc["metadata"]["name"]}
    assert pv["spec"]["storageClassName"] == pvc["spec"]["storageClassName"]
    assert "ReadWriteMany" in pv["spec"]["accessModes"]
    assert pv["spec"]["persistentVolumeReclaimPolicy"] == "Retain"

    def gib(q):
        return int(q[:-2]) * {"Gi": 1, "Ti": 1024}[q[-2:]]

    assert gib(pv["spec"]["capacity"]["storage"]) >= gib(pvc["spec"]["resources"]["requests"]["storage"])
    if overlay == "nfs":
        assert set(pv["spec"]["nfs"]) == {"server", "path"}
    else:
        assert pv["spec"]["csi"]["driver"] == "gcsfuse.csi.storage.gke.io"
        assert {"uid=1000", "gid=1000", "implicit-dirs"} <= set(pv["spec"]["mountOptions"])


def test_each_storage_overlay_is_documented_and_selectable():
    readme = (MANIFESTS / "storage" / "README.md").read_text()
    documented = set(re.findall(r"^## (\S+)$", readme, re.M))
    assert documented == set(STORAGE_OVERLAYS) == {p.name for p in (MANIFESTS / "storage").iterdir() if p.is_dir()}
    mk = (ROOT / "mk" / "kfp.mk").read_text()
    assert "manifests/storage/$(WORK_STORAGE)" in mk and "kubectl apply -k $(WORK_MANIFESTS)" in mk

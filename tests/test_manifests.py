"""manifests/: built-in kinds pass kubernetes-validate (offline, strict), kustomizations
reference pinned remote bases or files that exist, RBAC grants what the steps need and no
more, and names agree with the pipeline and the TFJob launcher."""
import re
from pathlib import Path

import pytest
import yaml

from gdmix.kfp import submit, tfjob

kv = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "manifests"
K8S_VERSION = "1.30"


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
    assert {d["kind"] for _, d in objects} >= {"ServiceAccount", "Role", "RoleBinding", "PersistentVolumeClaim", "Job"}
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


def test_rbac_lets_steps_run_tfjobs_and_spark_executors_and_nothing_more():
    (sa,) = by_kind("ServiceAccount")
    (role,) = by_kind("Role")
    (binding,) = by_kind("RoleBinding")
    assert not by_kind("ClusterRole") and not by_kind("ClusterRoleBinding")
    assert sa["metadata"]["name"] == submit.SERVICE_ACCOUNT == tfjob.Settings(image="x").service_account
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                    "namespace": sa["metadata"]["namespace"]}]
    grants = {}
    for rule in role["rules"]:
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[field], f"no wildcards: {rule}"
        for group in rule["apiGroups"]:
            for res in rule["resources"]:
                grants.setdefault((group, res), set()).update(rule["verbs"])
    assert {"create", "get", "watch", "delete"} <= grants[("kubeflow.org", "tfjobs")]
    for res in ("pods", "services", "configmaps"):
        assert {"create", "get", "list", "watch", "delete"} <= grants[("", res)]
    assert grants[("", "pods/log")] == {"get"}
    allowed = {("kubeflow.org", "tfjobs"), ("kubeflow.org", "tfjobs/status"), ("", "pods"), ("", "services"),
               ("", "configmaps"), ("", "pods/log"), ("", "persistentvolumeclaims")}
    assert set(grants) <= allowed, f"more than the steps need: {set(grants) - allowed}"
    assert "secrets" not in str(role["rules"])


def test_work_volume_matches_the_pipeline_and_jobs():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gdmix_pipeline", ROOT / "pipelines" / "gdmix_pipeline.py")
    gp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gp)
    (pvc,) = by_kind("PersistentVolumeClaim")
    assert pvc["metadata"]["name"] == gp.WORK_VOLUME
    namespaces = {d["metadata"].get("namespace") for _, d in kubernetes_objects()}
    assert namespaces == {"kubeflow"}, "everything lives in the KFP standalone namespace"
    (job,) = by_kind("Job")
    pod = job["spec"]["template"]["spec"]
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == gp.WORK_VOLUME
    assert pod["containers"][0]["volumeMounts"][0]["mountPath"] == gp.MOUNT_PATH
    assert pod["securityContext"]["runAsNonRoot"] is True

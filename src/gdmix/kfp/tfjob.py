"""The fixed-effect workers as a Kubeflow Training Operator ``TFJob`` (``kubeflow.org/v1``).

``build`` makes the TFJob object of one fixed-effect step: ``workers`` replicas of the
trainer image running the worker entry point

    python -m gdmix.fixed_effect.worker --workdir W --iteration K --coordinate C

(the operator sets ``TF_CONFIG``; the work directory is a shared volume or ``gs://``).
``launch`` has the signature of a fixed-effect launcher (``gdmix.fixed_effect.launcher``):
it creates the job with the ``kubernetes`` client, polls it until it succeeds, fails or
times out, streams its state changes to the log, raises on failure (with the tail of the
failed worker's log) and deletes the job in every case.

``select`` picks the launcher from ``GDMIX_LAUNCHER``: ``local`` (processes on this
machine), ``tfjob``, or ``auto`` (default: ``tfjob`` inside a Kubernetes pod, else local).
The TFJob's settings come from the environment the pipeline step sets (``Settings.from_env``).
"""
from __future__ import annotations

import hashlib
import os
import re
import sys
import time
from dataclasses import dataclass, field

from gdmix import plan, storage

GROUP, VERSION, PLURAL, KIND = "kubeflow.org", "v1", "tfjobs", "TFJob"
CONTAINER = "tensorflow"  # the container name the Training Operator expects
JOB_NAME_LABEL = "training.kubeflow.org/job-name"
SA_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
MAX_NAME = 48  # pods/services are named <job>-worker-<i>: keep them under 63 characters
POLL_S = 5.0
LOG_TAIL_LINES = 40


@dataclass(frozen=True)
class Settings:
    """Where and how the TFJob runs (from ``GDMIX_TFJOB_*`` / ``GDMIX_WORK_*``)."""

    image: str
    namespace: str = "default"
    service_account: str = "gdmix-pipeline"
    cpu: str = "1"
    memory: str = "2Gi"
    memory_limit: str | None = "4Gi"
    pvc: str | None = None  # the work-directory volume, mounted in every worker
    mount_path: str = "/gdmix"
    clean_pod_policy: str = "All"  # delete worker pods when the job ends (logs read before)
    image_pull_policy: str = "IfNotPresent"
    labels: dict = field(default_factory=dict)

    @classmethod
    def from_env(cls, env=None) -> "Settings":
        env = os.environ if env is None else env
        image = env.get("GDMIX_TFJOB_IMAGE")
        if not image:
            raise RuntimeError("GDMIX_TFJOB_IMAGE is not set: the TFJob launcher needs the trainer image "
                               "(the pipeline sets it on the fixed-effect step)")
        return cls(
            image=image,
            namespace=env.get("GDMIX_NAMESPACE") or _pod_namespace() or "default",
            service_account=env.get("GDMIX_TFJOB_SERVICE_ACCOUNT", "gdmix-pipeline"),
            cpu=env.get("GDMIX_TFJOB_CPU", "1"),
            memory=env.get("GDMIX_TFJOB_MEMORY", "2Gi"),
            memory_limit=env.get("GDMIX_TFJOB_MEMORY_LIMIT", "4Gi") or None,
            pvc=env.get("GDMIX_WORK_PVC") or None,
            mount_path=env.get("GDMIX_WORK_MOUNT", "/gdmix"),
            clean_pod_policy=env.get("GDMIX_TFJOB_CLEAN_POD_POLICY", "All"),
        )


def _pod_namespace() -> str | None:
    try:
        with open(SA_NAMESPACE_FILE) as f:
            return f.read().strip() or None
    except OSError:
        return None


def job_name(workdir: str, step: plan.Step) -> str:
    """A DNS-1123 name, unique per work directory and step, at most ``MAX_NAME`` long."""
    digest = hashlib.sha1(f"{workdir}|{step}".encode()).hexdigest()[:8]
    stem = re.sub(r"[^a-z0-9-]+", "-", f"gdmix-i{step.iteration}-{step.coordinate}".lower()).strip("-")
    return f"{stem[:MAX_NAME - 9].rstrip('-')}-{digest}"


def _label_value(v: str) -> str:
    v = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(v))[:63]
    return v.strip("-_.") or "x"


WORKER_MODULE = "gdmix.fixed_effect.worker"


def build(workdir: str, step: plan.Step, workers: int, settings: Settings,
          timeout_s: float | None = None, module: str = WORKER_MODULE) -> dict:
    """The TFJob object of fixed-effect step ``step`` with ``workers`` replicas running the
    worker entry ``python3 -m <module>`` (the linear or the deep fixed effect's)."""
    if workers < 1:
        raise ValueError(f"workers: must be >= 1, got {workers}")
    name = job_name(workdir, step)
    labels = {
        "app.kubernetes.io/name": "gdmix",
        "app.kubernetes.io/component": "fixed-effect",
        "gdmix.io/run": _label_value(hashlib.sha1(workdir.encode()).hexdigest()[:12]),
        "gdmix.io/iteration": str(step.iteration),
        "gdmix.io/coordinate": _label_value(step.coordinate),
        **{k: _label_value(v) for k, v in settings.labels.items()},
    }
    resources = {"requests": {"cpu": settings.cpu, "memory": settings.memory}}
    if settings.memory_limit:
        resources["limits"] = {"memory": settings.memory_limit}
    container = {
        "name": CONTAINER,
        "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["python3", "-m", module, "--workdir", workdir,
                    "--iteration", str(step.iteration), "--coordinate", step.coordinate],
        "env": [{"name": "PYTHONUNBUFFERED", "value": "1"}, {"name": "TF_CPP_MIN_LOG_LEVEL", "value": "2"}],
        "resources": resources,
        "ports": [{"name": "tfjob-port", "containerPort": 2222}],
    }
    pod_spec = {
        "serviceAccountName": settings.service_account,
        "securityContext": {"runAsNonRoot": True},
        "containers": [container],
    }
    if settings.pvc:
        container["volumeMounts"] = [{"name": "work", "mountPath": settings.mount_path}]
        pod_spec["volumes"] = [{"name": "work", "persistentVolumeClaim": {"claimName": settings.pvc}}]
    run_policy = {"cleanPodPolicy": settings.clean_pod_policy, "backoffLimit": 0}
    if timeout_s:
        run_policy["activeDeadlineSeconds"] = int(timeout_s)
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {"name": name, "namespace": settings.namespace, "labels": labels},
        "spec": {
            "runPolicy": run_policy,
            "tfReplicaSpecs": {
                "Worker": {
                    # Workers step in lockstep (all-reduce): a lone restarted worker could never
                    # rejoin, so the job fails and the pipeline step's retry starts a new one.
                    "replicas": workers,
                    "restartPolicy": "Never",
                    "template": {"metadata": {"labels": dict(labels)}, "spec": pod_spec},
                },
            },
        },
    }


def state(obj: dict) -> tuple[str, str]:
    """(condition, message) of a TFJob: the latest true condition (Created, Running,
    Restarting, Succeeded, Failed), or ("Pending", "") before the operator reports."""
    conditions = [c for c in (obj.get("status") or {}).get("conditions") or [] if c.get("status") == "True"]
    for terminal in ("Failed", "Succeeded"):
        for c in conditions:
            if c.get("type") == terminal:
                return terminal, c.get("message", "")
    if conditions:
        return conditions[-1].get("type", "Unknown"), conditions[-1].get("message", "")
    return "Pending", ""


def replica_summary(obj: dict) -> str:
    rs = ((obj.get("status") or {}).get("replicaStatuses") or {}).get("Worker") or {}
    return ", ".join(f"{k} {rs[k]}" for k in ("active", "succeeded", "failed") if rs.get(k))


def workers_finished(workdir: str, step: plan.Step, workers: int) -> bool:
    """Whether every worker wrote its status file (after the final barrier)."""
    from gdmix.fixed_effect.worker import status_url

    return all(storage.exists(status_url(workdir, step.iteration, step.coordinate, w)) for w in range(workers))


def _clients():
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.CustomObjectsApi(), client.CoreV1Api()


def _delete(custom, namespace: str, name: str, wait_s: float = 60.0) -> None:
    from kubernetes.client.exceptions import ApiException

    try:
        custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name,
                                               propagation_policy="Foreground")
    except ApiException as e:
        if e.status == 404:
            return
        raise
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except ApiException as e:
            if e.status == 404:
                return
            raise
        time.sleep(1.0)
    print(f"[tfjob {name}] still being deleted after {wait_s:g} s; going on", file=sys.stderr, flush=True)


def _log_tails(core, namespace: str, name: str) -> str:
    out = []
    try:
        pods = core.list_namespaced_pod(namespace, label_selector=f"{JOB_NAME_LABEL}={name}").items
        for pod in pods:
            text = core.read_namespaced_pod_log(pod.metadata.name, namespace, container=CONTAINER,
                                                tail_lines=LOG_TAIL_LINES)
            out.append(f"--- {pod.metadata.name} ({pod.status.phase}) ---\n{text}")
    except Exception as e:  # logs are a courtesy: never hide the job's own error
        out.append(f"(could not read the workers' logs: {e})")
    return "\n".join(out)


def launch(workdir: str, step: plan.Step, workers: int, timeout_s: float, exit_grace_s: float,
           settings: Settings | None = None, clients=None, command=None) -> None:
    """Run the step's workers as a TFJob; return when done, raise when it fails or times out.

    Done = the job Succeeded, or every worker wrote its status file and ``exit_grace_s``
    passed (a worker that hangs at exit after its outputs are committed).
    """
    from gdmix.fixed_effect.worker import status_dir

    settings = settings or Settings.from_env()
    custom, core = clients or _clients()
    workdir = storage.absolute(workdir)
    storage.remove(status_dir(workdir, step.iteration, step.coordinate))  # stale status of an earlier try
    # ``command`` is the local launcher's (python, "-m", module): the pods run the same module
    module = command[command.index("-m") + 1] if command else WORKER_MODULE
    job = build(workdir, step, workers, settings, timeout_s, module=module)
    name, ns = job["metadata"]["name"], settings.namespace
    _delete(custom, ns, name)  # an earlier attempt's job of the same name
    custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, job)
    print(f"[tfjob {name}] created in {ns}: {workers} worker(s), image {settings.image}", flush=True)
    deadline = time.monotonic() + timeout_s
    last, finished_since = None, None
    try:
        while True:
            obj = custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
            cond, message = state(obj)
            summary = (cond, replica_summary(obj))
            if summary != last:
                print(f"[tfjob {name}] {cond}" + (f" ({summary[1]})" if summary[1] else "")
                      + (f": {message}" if message else ""), flush=True)
                last = summary
            if cond == "Succeeded":
                return
            if cond == "Failed":
                raise RuntimeError(f"fixed-effect {step}: TFJob {ns}/{name} failed: {message}\n"
                                   f"{_log_tails(core, ns, name)}")
            if workers_finished(workdir, step, workers):
                finished_since = finished_since or time.monotonic()
                if time.monotonic() - finished_since > exit_grace_s:
                    print(f"[tfjob {name}] every worker finished but the job did not end within "
                          f"{exit_grace_s:g} s; deleting it", file=sys.stderr, flush=True)
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"fixed-effect {step}: TFJob {ns}/{name} timed out after {timeout_s:g} s "
                                   f"(state {cond})\n{_log_tails(core, ns, name)}")
            time.sleep(POLL_S)
    finally:
        _delete(custom, ns, name)


def in_cluster(env=None) -> bool:
    env = os.environ if env is None else env
    return bool(env.get("KUBERNETES_SERVICE_HOST"))


def select(name: str | None = None, env=None):
    """The fixed-effect launcher named by ``name`` or ``GDMIX_LAUNCHER`` (default ``auto``)."""
    from gdmix.fixed_effect import launcher as launchers

    env = os.environ if env is None else env
    name = name or env.get("GDMIX_LAUNCHER") or "auto"
    if name == "auto":
        name = "tfjob" if in_cluster(env) else "local"
    if name == "tfjob":
        return launch
    return launchers.get(name)

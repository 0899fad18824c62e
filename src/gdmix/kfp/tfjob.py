"""The fixed-effect workers as a Kubeflow Training Operator ``TFJob`` (``kubeflow.org/v1``).

``build`` makes the TFJob object of one fixed-effect step: ``workers`` replicas of the
trainer image running the worker entry point

    python -m gdmix.fixed_effect.worker --workdir W --iteration K --coordinate C

(the operator sets ``TF_CONFIG``; the work directory is a shared volume or ``gs://``).
``launch`` has the signature of a fixed-effect launcher (``gdmix.fixed_effect.launcher``):
it creates the job with the ``kubernetes`` client and polls it until it succeeds, fails or
times out, and meanwhile

- streams every worker's log into this step's log as it is written (``[<pod>] line``), so a
  failed worker's last lines are in the step's log even though the operator deletes the
  pods of a job that exceeds ``backoffLimit`` before it marks the job failed
  (training-operator v1.8.1 pkg/controller.v1/common/job.go:206-225: pods deleted, then the
  Failed condition; ``cleanPodPolicy`` is not consulted on that path);
- fails fast when a worker pod cannot start: Pending with ``PodScheduled=False`` reason
  ``Unschedulable`` (or an image that cannot be pulled) for longer than
  ``Settings.unschedulable_s``, naming the scheduler's message and the requests;
- deletes the job in every case: on success, failure, timeout, and when this step is
  terminated (SIGTERM from the Argo executor when a run is cancelled or the step times out;
  Argo v3.6.7 cmd/argoexec/commands/emissary.go:146-153 forwards it to the process group).

The job also carries an owner reference to this step's pod when the pod's name and UID are
known (``KFP_POD_NAME``/``KFP_POD_UID``, which KFP 2.14.3's compiler sets from the downward
API in every executor container: backend/src/v2/compiler/argocompiler/common.go:33-47,
container.go:526; else ``GDMIX_POD_NAME``/``GDMIX_POD_UID``), so the garbage collector
removes a job whose launcher was killed without a chance to clean up (SIGKILL, node loss)
once the step's pod is deleted; and ``ttlSecondsAfterFinished`` as a last resort.

Worker CPU and memory come from the coordinate's config (``cpu``, ``memory``) in the run's
config snapshot, else ``GDMIX_TFJOB_CPU``/``GDMIX_TFJOB_MEMORY``, else 1 CPU / 2 GiB.

``select`` picks the launcher from ``GDMIX_LAUNCHER``: ``local`` (processes on this
machine), ``tfjob``, or ``auto`` (default: ``tfjob`` inside a Kubernetes pod, else local).
The TFJob's settings come from the environment the pipeline step sets (``Settings.from_env``).
"""
from __future__ import annotations

import hashlib
import os
import re
import signal
import sys
import threading
import time

from gdmix import plan, storage
from gdmix.kfp.tfjob_pods import CONTAINER, JOB_NAME_LABEL, LogStreams, get, log_tails, pod_blocker, started
from gdmix.kfp.tfjob_settings import Settings, coordinate_resources

GROUP, VERSION, PLURAL, KIND = "kubeflow.org", "v1", "tfjobs", "TFJob"
MAX_NAME = 48  # pods/services are named <job>-worker-<i>: keep them under 63 characters
POLL_S = 5.0
def job_name(workdir: str, step: plan.Step) -> str:
    """A DNS-1123 name, unique per work directory and step, at most ``MAX_NAME`` long."""
    digest = hashlib.sha1(f"{workdir}|{step}".encode()).hexdigest()[:8]
    stem = re.sub(r"[^a-z0-9-]+", "-", f"gdmix-i{step.iteration}-{step.coordinate}".lower()).strip("-")
    return f"{stem[:MAX_NAME - 9].rstrip('-')}-{digest}"


def _label_value(v: str) -> str:
    v = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(v))[:63]
    return v.strip("-_.") or "x"


WORKER_MODULE = "gdmix.fixed_effect.worker"


def _worker_pod(workdir: str, step: plan.Step, settings: Settings, module: str) -> dict:
    """The pod spec of every worker: ``python3 -m <module>`` on the trainer image, its
    requests and limit, the work volume when there is one."""
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
    return pod_spec


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
    pod_spec = _worker_pod(workdir, step, settings, module)
    template_meta = {"labels": dict(labels)}
    if settings.pod_annotations:
        template_meta["annotations"] = {k: str(v) for k, v in settings.pod_annotations.items()}
    run_policy = {"cleanPodPolicy": settings.clean_pod_policy, "backoffLimit": 0}
    if timeout_s:
        run_policy["activeDeadlineSeconds"] = int(timeout_s)
    if settings.ttl_s is not None:
        run_policy["ttlSecondsAfterFinished"] = int(settings.ttl_s)
    metadata = {"name": name, "namespace": settings.namespace, "labels": labels}
    if settings.owner:
        # Not a controller and not blocking the owner's deletion (blockOwnerDeletion would
        # need update on pods/finalizers): the pod's deletion takes the job with it.
        metadata["ownerReferences"] = [{"apiVersion": "v1", "kind": "Pod", "name": settings.owner[0],
                                        "uid": settings.owner[1], "controller": False,
                                        "blockOwnerDeletion": False}]
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": metadata,
        "spec": {
            "runPolicy": run_policy,
            "tfReplicaSpecs": {
                "Worker": {
                    # Workers step in lockstep (all-reduce): a lone restarted worker could never
                    # rejoin, so the job fails and the pipeline step's retry starts a new one.
                    "replicas": workers,
                    "restartPolicy": "Never",
                    "template": {"metadata": template_meta, "spec": pod_spec},
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


class Terminated(SystemExit):
    """This step was asked to stop (SIGTERM): the job is deleted on the way out."""


class _DeleteOnSigterm:
    """Turn SIGTERM into ``Terminated`` while the job runs (main thread only; elsewhere
    Python cannot install handlers and the owner reference is the safety net)."""

    def __enter__(self):
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handler)
        return self

    @staticmethod
    def _handler(signum, frame):
        raise Terminated(128 + signum)

    def cleaning_up(self) -> None:
        """A repeated SIGTERM must not interrupt the job's deletion: ignore it until exit."""
        if self.previous is not None:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
        return False


def launch(workdir: str, step: plan.Step, workers: int, timeout_s: float, exit_grace_s: float,
           settings: Settings | None = None, clients=None, command=None, out=None) -> None:
    """Run the step's workers as a TFJob; return when done, raise when it fails, times out
    or cannot be scheduled; delete the job in every case (SIGTERM included).

    Done = the job Succeeded, or every worker wrote its status file and ``exit_grace_s``
    passed (a worker that hangs at exit after its outputs are committed).
    """
    from gdmix.fixed_effect.worker import status_dir

    workdir = storage.absolute(workdir)
    if settings is None:
        cpu, memory = coordinate_resources(workdir, step)
        settings = Settings.from_env(cpu=cpu, memory=memory)
    custom, core = clients or _clients()
    out = out if out is not None else sys.stdout
    storage.remove(status_dir(workdir, step.iteration, step.coordinate))  # stale status of an earlier try
    # ``command`` is the local launcher's (python, "-m", module): the pods run the same module
    module = command[command.index("-m") + 1] if command else WORKER_MODULE
    job = build(workdir, step, workers, settings, timeout_s, module=module)
    name, ns = job["metadata"]["name"], settings.namespace

    def say(msg: str) -> None:
        out.write(f"[tfjob {name}] {msg}\n")
        out.flush()

    _delete(custom, ns, name)  # an earlier attempt's job of the same name
    logs = LogStreams(core, ns, out)
    delete_wait_s = 60.0
    with _DeleteOnSigterm() as sigterm:
        try:
            custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, job)
            say(f"created in {ns}: {workers} worker(s) of {settings.cpu} CPU / {settings.memory}, "
                f"image {settings.image}" + (f", owned by pod {settings.owner[0]}" if settings.owner else ""))
            _watch(custom, core, logs, job, step, workers, workdir, timeout_s, exit_grace_s, settings, say)
        except Terminated:
            say("terminated (SIGTERM): deleting the job")
            delete_wait_s = 5.0  # inside the pod's grace period; the deletion itself is already requested
            raise
        finally:
            sigterm.cleaning_up()
            _delete(custom, ns, name, wait_s=delete_wait_s)
            logs.join(2.0)


def _watch(custom, core, logs: LogStreams, job: dict, step: plan.Step, workers: int, workdir: str,
           timeout_s: float, exit_grace_s: float, settings: Settings, say) -> None:
    name, ns = job["metadata"]["name"], settings.namespace
    deadline = time.monotonic() + timeout_s
    last, finished_since = None, None
    blocked_since: dict[str, float] = {}
    reported: dict[str, str] = {}

    def failure(what: str) -> RuntimeError:
        logs.join(5.0)  # the failed worker's last lines, before the stream closes
        tails = logs.tail_text() or log_tails(core, ns, name)
        return RuntimeError(f"fixed-effect {step}: TFJob {ns}/{name} {what}\n{tails}")

    while True:
        obj = custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
        cond, message = state(obj)
        summary = (cond, replica_summary(obj))
        if summary != last:
            say(cond + (f" ({summary[1]})" if summary[1] else "") + (f": {message}" if message else ""))
            last = summary
        if cond == "Succeeded":
            return
        if cond == "Failed":
            raise failure(f"failed: {message}")
        now = time.monotonic()
        for pod in core.list_namespaced_pod(ns, label_selector=f"{JOB_NAME_LABEL}={name}").items:
            pod_name = get(pod, "metadata", "name")
            if started(pod):
                logs.follow(pod_name)
            blocker = pod_blocker(pod)
            if blocker is None:
                blocked_since.pop(pod_name, None)
                continue
            since = blocked_since.setdefault(pod_name, now)
            if reported.get(pod_name) != blocker:
                say(f"{pod_name} cannot start yet: {blocker}")
                reported[pod_name] = blocker
            if now - since > settings.unschedulable_s:
                raise failure(
                    f"cannot start worker pod {pod_name} for {now - since:.0f} s: {blocker}. "
                    f"The job asks for {workers} worker(s) of {settings.cpu} CPU / {settings.memory} "
                    f"(limit {settings.memory_limit or 'none'}) at once: give the cluster room, or lower the "
                    f"coordinate's workers/cpu/memory (limit: GDMIX_TFJOB_UNSCHEDULABLE_S="
                    f"{settings.unschedulable_s:g})")
        if workers_finished(workdir, step, workers):
            finished_since = finished_since or now
            if now - finished_since > exit_grace_s:
                say(f"every worker finished but the job did not end within {exit_grace_s:g} s; deleting it")
                return
        if now > deadline:
            raise failure(f"timed out after {timeout_s:g} s (state {cond})")
        time.sleep(POLL_S)


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
    if name == "local":
        return launchers.run_local
    raise ValueError(f"GDMIX_LAUNCHER: unknown launcher {name!r} (known: auto, local, tfjob)")

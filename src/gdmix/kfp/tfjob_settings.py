"""Where and how a step's TFJob runs: the trainer image, namespace, service account,
worker resources (the coordinate's ``cpu``/``memory`` from the run's config snapshot,
else ``GDMIX_TFJOB_CPU``/``GDMIX_TFJOB_MEMORY``), the work volume, the owner (the step's
pod) and the give-up times, read from the environment the pipeline step sets."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from gdmix import plan, storage

SA_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
UNSCHEDULABLE_S = 300.0  # a worker pod that cannot be scheduled (or pulled) for this long fails the step
TTL_S = 3600  # ttlSecondsAfterFinished: the operator removes a finished job the launcher could not


@dataclass(frozen=True)
class Settings:
    """Where and how the TFJob runs (from ``GDMIX_TFJOB_*`` / ``GDMIX_WORK_*`` / the pod's env)."""

    image: str
    namespace: str = "default"
    service_account: str = "gdmix-pipeline"
    cpu: str = "1"
    memory: str = "2Gi"
    memory_limit: str | None = "4Gi"
    pvc: str | None = None  # the work-directory volume, mounted in every worker
    mount_path: str = "/gdmix"
    clean_pod_policy: str = "All"  # delete worker pods when the job ends (their logs are streamed)
    image_pull_policy: str = "IfNotPresent"
    labels: dict = field(default_factory=dict)
    pod_annotations: dict = field(default_factory=dict)  # on every worker pod (e.g. gke-gcsfuse/volumes)
    owner: tuple[str, str] | None = None  # (name, uid) of the step's pod, in ``namespace``
    unschedulable_s: float = UNSCHEDULABLE_S
    ttl_s: int | None = TTL_S

    @classmethod
    def from_env(cls, env=None, *, cpu: str | None = None, memory: str | None = None,
                 memory_limit: str | None = None) -> "Settings":
        """Settings from the step's environment. ``cpu``/``memory``/``memory_limit``: the
        coordinate's own values (config keys ``cpu``, ``memory``), which win over
        ``GDMIX_TFJOB_CPU``/``GDMIX_TFJOB_MEMORY``; a ``memory`` given here is also the
        limit unless ``memory_limit`` or ``GDMIX_TFJOB_MEMORY_LIMIT`` says otherwise."""
        env = os.environ if env is None else env
        image = env.get("GDMIX_TFJOB_IMAGE")
        if not image:
            raise RuntimeError("GDMIX_TFJOB_IMAGE is not set: the TFJob launcher needs the trainer image "
                               "(the pipeline sets it on the fixed-effect step)")
        pod_ns = _pod_namespace()
        namespace = env.get("GDMIX_NAMESPACE") or pod_ns or "default"
        if memory_limit is None:
            memory_limit = env.get("GDMIX_TFJOB_MEMORY_LIMIT") or (memory if memory else "4Gi")
        return cls(
            image=image,
            namespace=namespace,
            service_account=env.get("GDMIX_TFJOB_SERVICE_ACCOUNT", "gdmix-pipeline"),
            cpu=cpu or env.get("GDMIX_TFJOB_CPU") or "1",
            memory=memory or env.get("GDMIX_TFJOB_MEMORY") or "2Gi",
            memory_limit=memory_limit or None,
            pvc=env.get("GDMIX_WORK_PVC") or None,
            mount_path=env.get("GDMIX_WORK_MOUNT", "/gdmix"),
            clean_pod_policy=env.get("GDMIX_TFJOB_CLEAN_POD_POLICY", "All"),
            pod_annotations=_pairs(env.get("GDMIX_WORK_POD_ANNOTATIONS", ""), "GDMIX_WORK_POD_ANNOTATIONS"),
            # An owner must live in the dependent's namespace (else the garbage collector
            # deletes the dependent at once): only our own pod, and only in our namespace.
            owner=_owner_from_env(env) if pod_ns and namespace == pod_ns else None,
            unschedulable_s=float(env.get("GDMIX_TFJOB_UNSCHEDULABLE_S") or UNSCHEDULABLE_S),
        )


def _pairs(text: str, what: str) -> dict:
    """``k=v,k2=v2`` as a dict (e.g. ``gke-gcsfuse/volumes=true``, which the Cloud Storage
    FUSE CSI driver needs on every pod that mounts a bucket volume)."""
    out = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        k, sep, v = item.partition("=")
        if not sep or not k.strip():
            raise RuntimeError(f"{what}: expected key=value[,key=value...], got {text!r}")
        out[k.strip()] = v.strip()
    return out


def _owner_from_env(env) -> tuple[str, str] | None:
    """The step pod's (name, uid): KFP's own downward-API variables, else GDMIX_POD_*."""
    for name_var, uid_var in (("KFP_POD_NAME", "KFP_POD_UID"), ("GDMIX_POD_NAME", "GDMIX_POD_UID")):
        if env.get(name_var) and env.get(uid_var):
            return env[name_var], env[uid_var]
    return None


def _pod_namespace() -> str | None:
    try:
        with open(SA_NAMESPACE_FILE) as f:
            return f.read().strip() or None
    except OSError:
        return None


def coordinate_resources(workdir: str, step: plan.Step) -> tuple[str | None, str | None]:
    """(cpu, memory) of the step's coordinate in the run's config snapshot (config keys
    ``cpu``/``memory``), or (None, None) without a snapshot or without those keys."""
    from gdmix import config

    if not storage.exists(storage.join(workdir, config.RUN_CONFIG)):
        return None, None
    coord = config.load_run(workdir).coordinate(step.coordinate)
    return getattr(coord, "cpu", None), getattr(coord, "memory", None)

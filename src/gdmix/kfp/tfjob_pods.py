"""The worker pods of a TFJob, as the launcher (``gdmix.kfp.tfjob``) watches them: their
logs followed into the step's log, and why a pod cannot start (unschedulable, an image
that cannot be pulled) so the step fails fast instead of waiting out its timeout."""
from __future__ import annotations

import re
import sys
import threading
import time
from collections import deque

CONTAINER = "tensorflow"  # the container name the Training Operator expects
JOB_NAME_LABEL = "training.kubeflow.org/job-name"
LOG_TAIL_LINES = 40
STUCK_REASONS = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError")


def log_tails(core, namespace: str, name: str) -> str:
    """The last lines of each worker pod that still exists (when nothing was streamed)."""
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


class LogStreams:
    """One thread per worker pod following its log (``follow=True``) into this process's
    stdout as ``[<pod>] <line>``, keeping the last ``LOG_TAIL_LINES`` of each pod."""

    def __init__(self, core, namespace: str, out=None):
        self.core, self.namespace = core, namespace
        self.out = out if out is not None else sys.stdout
        self.tails: dict[str, deque] = {}
        self.threads: dict[str, threading.Thread] = {}
        self.lock = threading.Lock()

    def follow(self, pod: str) -> None:
        if pod in self.threads:
            return
        self.tails[pod] = deque(maxlen=LOG_TAIL_LINES)
        t = threading.Thread(target=self._run, args=(pod,), name=f"log-{pod}", daemon=True)
        self.threads[pod] = t
        t.start()

    def _emit(self, pod: str, line: str) -> None:
        with self.lock:
            self.tails[pod].append(line)
            self.out.write(f"[{pod}] {line}\n")
            self.out.flush()

    def _run(self, pod: str) -> None:
        try:
            resp = self.core.read_namespaced_pod_log(pod, self.namespace, container=CONTAINER, follow=True,
                                                     _preload_content=False)
            pending = b""
            try:
                for chunk in resp.stream(4096):
                    pending += chunk
                    *lines, pending = pending.split(b"\n")
                    for line in lines:
                        self._emit(pod, line.decode(errors="replace"))
                if pending:
                    self._emit(pod, pending.decode(errors="replace"))
            finally:
                release = getattr(resp, "release_conn", None)
                if release:
                    release()
        except Exception as e:  # the pod went away, or the API refused: the job's state decides
            with self.lock:
                self.out.write(f"[{pod}] (log stream ended: {type(e).__name__}: {e})\n")
                self.out.flush()

    def join(self, timeout_s: float = 5.0) -> None:
        deadline = time.monotonic() + timeout_s
        for t in list(self.threads.values()):
            t.join(max(0.0, deadline - time.monotonic()))

    def tail_text(self) -> str:
        with self.lock:
            return "\n".join(f"--- {pod} (last {len(lines)} lines) ---\n" + "\n".join(lines)
                             for pod, lines in sorted(self.tails.items()) if lines)


def get(obj, *path):
    """``obj.a.b`` for kubernetes client models and ``obj["a"]["b"]`` for plain dicts."""
    for k in path:
        if obj is None:
            return None
        obj = obj.get(k) if isinstance(obj, dict) else getattr(obj, _snake(k), None)
    return obj


def _snake(k: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", k).lower()


def pod_blocker(pod) -> str | None:
    """Why a worker pod cannot start by itself, or None: the scheduler's message when it is
    ``PodScheduled=False`` with reason ``Unschedulable``, or a container stuck waiting on an
    image pull or a bad container config."""
    if get(pod, "status", "phase") != "Pending":
        return None
    for c in get(pod, "status", "conditions") or []:
        if get(c, "type") == "PodScheduled" and get(c, "status") == "False" \
                and get(c, "reason") == "Unschedulable":
            return f"unschedulable: {get(c, 'message') or 'no message from the scheduler'}"
    for cs in get(pod, "status", "containerStatuses") or []:
        waiting = get(cs, "state", "waiting")
        if waiting is not None and get(waiting, "reason") in STUCK_REASONS:
            return f"{get(waiting, 'reason')}: {get(waiting, 'message') or ''}".rstrip(": ")
    return None


def started(pod) -> bool:
    """Whether the pod's containers have started (its log can be followed)."""
    return get(pod, "status", "phase") in ("Running", "Succeeded", "Failed")

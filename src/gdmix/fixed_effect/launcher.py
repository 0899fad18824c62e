"""Launching the fixed-effect workers.

A launcher is any callable ``(workdir, step, workers, timeout_s, exit_grace_s) -> None``
that runs ``workers`` copies of the worker entry point (``python -m
gdmix.fixed_effect.worker``) with a ``TF_CONFIG`` describing the cluster, and returns when
all have finished or raises ``RuntimeError``. ``run_local`` starts them as local processes
on loopback ports (the embedded run); on a cluster the app layer passes the TFJob launcher
(``gdmix.kfp.tfjob.launch``, running the same entry point) instead.

Finished = exited 0, or wrote its status file (after the final barrier) and then failed to
exit within ``exit_grace_s``: such a worker is killed and counted as a success, since its
outputs are complete. Anything else (a non-zero exit, an exit without a status file, the
overall timeout) kills every worker's process group and raises, naming the worker and
the tail of its output.

Serving workers (``prestart``, the embedded driver's): started once per run, they import
TF and join the cluster once and train every fixed-effect step they are ordered to;
a step is finished when every worker has written its status file, and any exit is a
failure that closes the cluster (the next step then starts its own workers).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from typing import Callable

from gdmix import plan, storage
from gdmix.fixed_effect.worker import PORT_IN_USE_EXIT, status_dir, status_url

Launcher = Callable[[str, plan.Step, int, float, float], None]

POLL_S = 0.1
TAIL_LINES = 40
PORT_ATTEMPTS = 3


class PortTaken(RuntimeError):
    """A worker could not bind its port (taken between choosing and binding it)."""


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (held open together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def tf_config(ports: list[int], index: int) -> str:
    return json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                       "task": {"type": "worker", "index": index}})


class _Worker:
    """One worker process, its output captured to a log file (the chief's also echoed)."""

    def __init__(self, index: int, cmd: list[str], env: dict, log_path: str, echo: bool):
        self.index, self.log_path = index, log_path
        self.log = open(log_path, "wb")
        self.echo_tail: deque[str] = deque(maxlen=TAIL_LINES)
        self.done_since: float | None = None
        self.killed_after_done = False
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE if echo else self.log,
                                     stderr=self.log, start_new_session=True)
        self.reader = None
        if echo:
            self.reader = threading.Thread(target=self._echo, daemon=True)
            self.reader.start()

    def _echo(self):
        # Progress lines go to the parent's stdout as they come, and into the log.
        for raw in iter(self.proc.stdout.readline, b""):
            self.log.write(raw)
            self.log.flush()
            line = raw.decode(errors="replace")
            sys.stdout.write(line)
            sys.stdout.flush()

    def kill(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL does not fail
            pass

    def close(self):
        if self.reader is not None:
            self.reader.join(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.log.close()

    def tail(self) -> str:
        self.log.flush()
        with open(self.log_path, "rb") as f:
            lines = f.read().decode(errors="replace").splitlines()
        return "\n".join(lines[-TAIL_LINES:])


WORKER_COMMAND = (sys.executable, "-m", "gdmix.fixed_effect.worker")


OWNER = "owner.pid"


def remove_orphaned_logs() -> list[str]:
    """Remove the ``gdmix-fe-*`` log folders of launchers that were killed (kill -9 leaves
    them): those whose owner process no longer exists. Returns what it removed."""
    import glob
    import shutil

    gone = []
    for d in glob.glob(os.path.join(tempfile.gettempdir(), "gdmix-fe-*")):
        try:
            with open(os.path.join(d, OWNER)) as fh:
                pid = int(fh.read().strip())
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
            gone.append(d)
        except (OSError, ValueError):  # no owner file yet (being created), or not ours to judge
            continue
    return gone


class LocalCluster:
    """``workers`` local worker processes on free loopback ports, either for one step
    (``step``) or serving (``step=None``): started ahead of a run's fixed-effect steps,
    they import TF once and then train each step ``run_step`` orders, in one cluster.

    The embedded driver keeps one serving cluster for the run: its start-up (interpreter
    and TF import, seconds of one core per worker) is paid once, while Spark's first jobs
    run, instead of once per step on the critical path."""

    def __init__(self, workers: int, command: tuple[str, ...], step: plan.Step | None = None,
                 workdir: str | None = None, order_timeout_s: float = 3600.0, nice: int = 0):
        self.workers, self.command, self.step, self.workdir = workers, tuple(command), step, workdir
        self.serving = step is None
        self.orders = 0
        ports = free_ports(workers)
        remove_orphaned_logs()
        self.logs = tempfile.TemporaryDirectory(prefix="gdmix-fe-")
        with open(os.path.join(self.logs.name, OWNER), "w") as fh:  # whose: see remove_orphaned_logs
            fh.write(str(os.getpid()))
        if self.serving:
            cmd = [*command, "--serve", self.logs.name, "--order-timeout", str(order_timeout_s),
                   "--parent", str(os.getpid()), "--nice", str(nice)]
        else:
            storage.remove(status_dir(workdir, step.iteration, step.coordinate))  # stale status of an earlier try
            cmd = [*command, "--workdir", workdir, "--iteration", str(step.iteration),
                   "--coordinate", step.coordinate]
        base_env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        base_env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        self.procs: list[_Worker] = []
        try:
            for w in range(workers):
                env = {**base_env, "TF_CONFIG": tf_config(ports, w)}
                self.procs.append(_Worker(w, cmd, env, os.path.join(self.logs.name, f"worker-{w}.log"),
                                          echo=(w == 0)))
        except BaseException:
            self.close()
            raise

    def can_serve(self, workers: int, command: tuple[str, ...]) -> bool:
        """Serving this many workers of this entry point, every one still alive."""
        return bool(self.serving and self.procs and (self.workers, self.command) == (workers, tuple(command))
                    and all(p.proc.poll() is None for p in self.procs))

    def run_step(self, workdir: str, step: plan.Step, deadline: float, timeout_s: float) -> None:
        """Order the serving workers to train ``step``; wait until all have written its
        status file. Any exit, or the deadline, is a failure (the caller closes the cluster)."""
        storage.remove(status_dir(workdir, step.iteration, step.coordinate))  # stale status of an earlier try
        order = os.path.join(self.logs.name, f"order-{self.orders}.json")
        with open(order + ".tmp", "w") as fh:
            json.dump({"workdir": workdir, "iteration": step.iteration, "coordinate": step.coordinate}, fh)
        os.replace(order + ".tmp", order)  # appears whole: the workers poll for it
        self.orders += 1
        _wait(self.procs, workdir, step, deadline, timeout_s, 0.0, serving=True)

    def wait(self, deadline: float, timeout_s: float, exit_grace_s: float) -> None:
        """Wait for the one step's workers to finish (``_wait``)."""
        _wait(self.procs, self.workdir, self.step, deadline, timeout_s, exit_grace_s)

    def close(self) -> None:
        """Kill whatever still runs and drop the logs (idempotent)."""
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.close()
        self.procs = []
        self.logs.cleanup()


def run_local(workdir: str, step: plan.Step, workers: int, timeout_s: float, exit_grace_s: float,
              command: tuple[str, ...] = WORKER_COMMAND, prestarted: LocalCluster | None = None) -> None:
    """Run the workers as local processes on free loopback ports; wait; raise on failure.

    ``command`` is the worker entry point, given ``--workdir/--iteration/--coordinate``.
    ``prestarted`` (from ``prestart``), when it serves this many workers of this entry
    point, trains the step instead; it stays up for the next step, or is closed when the
    step fails (its owner closes it in the end). A free port can be taken by another
    process before TF binds it: then the whole cluster is started again on new ports
    (within the same overall timeout).
    """
    workdir = storage.absolute(workdir)
    deadline = time.monotonic() + timeout_s
    if prestarted is not None and prestarted.can_serve(workers, command):
        try:
            return prestarted.run_step(workdir, step, deadline, timeout_s)
        except PortTaken as e:
            prestarted.close()
            print(f"[fixed-effect {step}] {e}; starting again on other ports", file=sys.stderr)
        except BaseException:
            prestarted.close()
            raise
    for attempt in range(1, PORT_ATTEMPTS + 1):
        cluster = LocalCluster(workers, command, step=step, workdir=workdir)
        try:
            return cluster.wait(deadline, timeout_s, exit_grace_s)
        except PortTaken as e:
            if attempt == PORT_ATTEMPTS:
                raise RuntimeError(f"{e} (after {attempt} attempts)") from None
            print(f"[fixed-effect {step}] {e}; starting again on other ports", file=sys.stderr)
        finally:
            cluster.close()


def prestart(workers: int, order_timeout_s: float, command: tuple[str, ...] = WORKER_COMMAND,
             nice: int = 0) -> LocalCluster:
    """Start serving workers ahead of a run's fixed-effect steps (see ``LocalCluster``);
    pass it to ``run_local`` for each step and ``close()`` it at the end. ``nice``: their
    niceness increment (their TF import then yields the cores to the stages before them)."""
    return LocalCluster(workers, command, order_timeout_s=order_timeout_s, nice=nice)


def _wait(procs: list[_Worker], workdir: str, step: plan.Step, deadline: float, timeout_s: float,
          exit_grace_s: float, serving: bool = False) -> None:
    """Until every worker has finished ``step``, or raise. One-step workers finish by
    exiting 0 with a status file (or by hanging at exit past ``exit_grace_s`` after it:
    killed). Serving workers stay up for the next step: finished = its status file
    written, and any exit is a failure."""
    n = len(procs)
    while True:
        waiting = []
        for p in procs:
            rc = p.proc.poll()
            has_status = p.done_since is not None or storage.exists(
                status_url(workdir, step.iteration, step.coordinate, p.index))
            if serving:
                if rc is not None:
                    _exited(p, rc, n, step)
                if not has_status:
                    waiting.append(p.index)
                continue
            if rc is None and has_status:
                p.done_since = p.done_since or time.monotonic()
                if time.monotonic() - p.done_since > exit_grace_s:
                    # Its work is complete and committed; only the exit hangs.
                    print(f"[fixed-effect {step}] worker {p.index} finished but did not exit within "
                          f"{exit_grace_s:g} s; killed", file=sys.stderr)
                    p.killed_after_done = True
                    p.kill()
                    rc = p.proc.poll()
            if p.killed_after_done:
                continue
            if rc is None:
                waiting.append(p.index)
                continue
            if rc != 0:
                _exited(p, rc, n, step)
            if not has_status:
                raise RuntimeError(f"fixed-effect {step}: worker {p.index} of {n} exited without "
                                   f"finishing (no status file); its output ends:\n{p.tail()}")
        if not waiting:
            return
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- worker {p.index} ---\n{p.tail()}" for p in procs if p.index in waiting)
            raise RuntimeError(f"fixed-effect {step}: timed out after {timeout_s:g} s waiting for "
                               f"worker(s) {waiting} of {n}; their output ends:\n{tails}")
        time.sleep(POLL_S)


def _exited(p: _Worker, rc: int, n: int, step: plan.Step) -> None:
    """Raise for worker ``p``'s exit with code ``rc`` where it should not have exited so."""
    if rc == PORT_IN_USE_EXIT:
        raise PortTaken(f"fixed-effect {step}: worker {p.index} of {n} could not bind its port")
    raise RuntimeError(f"fixed-effect {step}: worker {p.index} of {n} exited with code {rc}; "
                       f"its output ends:\n{p.tail()}")


"""A lease on a work directory: one ``gdmix run`` at a time writes into it.

``<workdir>/_LOCK.json`` names its holder (host, pid, start time, what it runs) and a
heartbeat, the holder's clock time, which a thread refreshes every ``timeout/4`` seconds.
A second run refuses with a message naming the holder. A lock is taken over when its
heartbeat is older than the timeout (``GDMIX_LOCK_TIMEOUT``, default 120 s: the holder
crashed or was killed), or at once when the holder was a process of this host that no
longer exists. The holder removes it when it ends.

Only fsspec operations are used (any URL). On a local filesystem the lock file is created
with a hard link (fails when it exists) and refreshed with a rename, both atomic; on an
object store a single-object write is atomic and the writer reads it back to confirm it
holds the lease (two takers within the confirmation delay: the last write wins, the other
refuses).

Stage commands (what a pipeline step runs: many at once, by design) take no lease; they
refuse to start while a live ``gdmix run`` holds one (``check_free``).
"""
from __future__ import annotations

import functools
import json
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone

from gdmix import storage
from gdmix.config_keys import ConfigError

LOCK = "_LOCK.json"
DEFAULT_TIMEOUT_S = 120.0
CONFIRM_S = 0.5  # an object store: wait this long, then read the lock back


class LockHeld(RuntimeError):
    """The work directory is in use by another live run."""


def timeout_s() -> float:
    return float(os.environ.get("GDMIX_LOCK_TIMEOUT", DEFAULT_TIMEOUT_S))


def lock_url(workdir: str) -> str:
    if workdir.startswith("memory://"):  # every run takes its lease first: the place to say so
        raise ConfigError(f"workdir: {workdir}: a memory:// work directory lives in one process, but Spark "
                          "and the TF workers read it from others; use a local path or a shared URL (gs://, ...)")
    return storage.join(workdir, LOCK)


def _read(url: str) -> dict | None:
    try:
        with storage.open_file(url, "r") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (ValueError, OSError):  # being written (or damaged): treat as held for now
        return {"token": None, "heartbeat": time.time(), "host": "?", "pid": "?", "what": "?", "started": "?"}


def _alive_here(info: dict) -> bool | None:
    """Whether the holder is a live process of this host; None when it is on another host."""
    if info.get("host") != socket.gethostname() or not isinstance(info.get("pid"), int):
        return None
    try:
        os.kill(info["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_live(info: dict | None, timeout: float | None = None) -> bool:
    if info is None:
        return False
    alive = _alive_here(info)
    if alive is False:
        return False
    return time.time() - float(info.get("heartbeat", 0)) < (timeout_s() if timeout is None else timeout)


def describe(info: dict) -> str:
    age = time.time() - float(info.get("heartbeat", 0))
    return (f"{info.get('what', 'a run')} on host {info.get('host')} (pid {info.get('pid')}, started "
            f"{info.get('started')}, heartbeat {age:.0f} s ago)")


def _mine(info: dict | None) -> bool:
    return bool(info) and info.get("host") == socket.gethostname() and info.get("pid") == os.getpid()


class Lease:
    """The work directory's lease, held from ``acquire`` to ``release``."""

    def __init__(self, workdir: str, what: str = "gdmix run", timeout: float | None = None):
        self.workdir, self.url = workdir, lock_url(workdir)
        self.timeout = timeout_s() if timeout is None else timeout
        self.info = {"what": what, "host": socket.gethostname(), "pid": os.getpid(),
                     "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                     "token": uuid.uuid4().hex, "heartbeat": time.time()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- writing -------------------------------------------------------------------------
    def _payload(self) -> bytes:
        self.info["heartbeat"] = time.time()
        return json.dumps(self.info, indent=2).encode()

    def _write(self, create: bool) -> bool:
        """Write the lock; ``create``: only if absent (False when someone else has it)."""
        fs, path = storage.filesystem(self.url)
        if storage.is_local(self.url):
            tmp = f"{path}.{self.info['token']}.tmp"
            with open(tmp, "wb") as f:
                f.write(self._payload())
            try:
                if create:
                    try:
                        os.link(tmp, path)
                    except FileExistsError:
                        return False
                else:
                    os.replace(tmp, path)
                    tmp = None
            finally:
                if tmp is not None and os.path.exists(tmp):
                    os.remove(tmp)
            return True
        if create and fs.exists(path):
            return False
        fs.pipe_file(path, self._payload())
        return True

    def acquire(self) -> "Lease":
        storage.makedirs(self.workdir)
        for _ in range(3):
            held = _read(self.url)
            if held is not None and not _mine(held) and is_live(held, self.timeout):
                raise LockHeld(f"{self.workdir} is in use by {describe(held)}; wait for it to end, or "
                               f"remove {self.url} if that run is gone (a lock whose heartbeat is older "
                               f"than {self.timeout:g} s is taken over)")
            if held is None:
                ok = self._write(create=True)
            else:
                if not _mine(held):
                    print(f"gdmix: taking over the lock of {describe(held)}: it is no longer alive", flush=True)
                ok = self._write(create=False)
            if ok and not storage.is_local(self.url):
                time.sleep(CONFIRM_S)
                ok = (_read(self.url) or {}).get("token") == self.info["token"]
            if ok:
                self._thread = threading.Thread(target=self._beat, name="gdmix-lock-heartbeat", daemon=True)
                self._thread.start()
                return self
        held = _read(self.url) or {}
        raise LockHeld(f"{self.workdir} is in use by {describe(held)}")

    def _beat(self) -> None:
        period = max(self.timeout / 4.0, 0.05)
        while not self._stop.wait(period):
            try:
                if (_read(self.url) or {}).get("token") != self.info["token"]:
                    print(f"gdmix: WARNING: the lock {self.url} was taken over by another run", flush=True)
                    return
                self._write(create=False)
            except Exception as e:  # noqa: BLE001 - a missed beat is retried next period
                print(f"gdmix: WARNING: lock heartbeat failed: {e}", flush=True)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        try:
            if (_read(self.url) or {}).get("token") == self.info["token"]:
                storage.remove(self.url)
        except Exception:  # noqa: BLE001 - a lock left behind goes stale and is taken over
            pass

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def check_free(workdir: str, what: str) -> None:
    """Refuse (``LockHeld``) when another live run holds the work directory's lease."""
    held = _read(lock_url(workdir))
    if held is not None and not _mine(held) and is_live(held):
        raise LockHeld(f"{what}: {workdir} is in use by {describe(held)}; wait for it to end")


def holding(fn):
    """Decorate ``run(cfg, ...)``: hold ``cfg.workdir``'s lease while it runs."""
    @functools.wraps(fn)
    def wrapper(cfg, *args, **kwargs):
        with Lease(cfg.workdir, what=f"gdmix run {getattr(cfg, 'name', '')}".strip()):
            return fn(cfg, *args, **kwargs)
    return wrapper

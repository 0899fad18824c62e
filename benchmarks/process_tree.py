"""Resident memory and CPU time of a process and all its descendants (a run's Spark JVM,
TF workers and pool processes), sampled from /proc while it runs."""
from __future__ import annotations

import os
import threading


def children(pid: int) -> list[int]:
    out = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as fh:
                out += [int(c) for c in fh.read().split()]
    except OSError:
        pass
    return out


def rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def cpu_ticks(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime, stime
    except (OSError, IndexError, ValueError):
        return 0


def sample(pid: int, ticks: dict[int, int]) -> int:
    """Resident bytes of ``pid`` and all its descendants now; records each one's CPU
    ticks so far in ``ticks`` (pool workers are not all reaped by the process itself)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += rss(p)
        ticks[p] = max(ticks.get(p, 0), cpu_ticks(p))
        todo += children(p)
    return total


class Watch:
    """Samples the tree under ``pid`` every ``interval`` s in a thread until ``stop``:
    ``peak`` (bytes, the largest sum of resident sets seen) and ``cpu_s`` (the tree's
    user + system seconds, to the last sample)."""

    def __init__(self, pid: int, interval: float = 0.01):
        self.peak, self.ticks, self._done = 0, {}, threading.Event()
        self._thread = threading.Thread(target=self._run, args=(pid, interval), daemon=True)
        self._thread.start()

    def _run(self, pid: int, interval: float) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, sample(pid, self.ticks))
            self._done.wait(interval)

    def stop(self) -> None:
        self._done.set()
        self._thread.join(timeout=5)

    @property
    def cpu_s(self) -> float:
        return sum(self.ticks.values()) / os.sysconf("SC_CLK_TCK")

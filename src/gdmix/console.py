"""The embedded run's console: one ordered stream of lines, and a line that moves while a
stage works.

- **Ordered**: what a background thread prints (a step's metrics) is held whole
  (``captured``) and printed by the main loop between two of its own lines, in plan
  order (``driver.BackgroundMetrics.release``): one step's lines never break into
  another's, and nothing lands in the middle of a line.
- **Moving**: while a stage runs, ``Console.working`` shows what runs, for how long, and
  Spark's progress (the active stages' finished tasks of all, from the status tracker).
  In a terminal it is one line rewritten in place (``\\r``) a few times a second and erased
  before any other output; elsewhere (CI, KFP logs) it is a plain line every
  ``plain_every_s`` seconds of a long stage (``GDMIX_PROGRESS_SECONDS``, default 10), never
  ``\\r``, so a short stage prints nothing extra and logs stay readable.
"""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import sys
import threading
import time

PLAIN_EVERY_ENV = "GDMIX_PROGRESS_SECONDS"
PLAIN_EVERY_S = 10.0
TTY_EVERY_S = 0.25
ERASE = "\r\033[K"


def _is_tty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class Console(io.TextIOBase):
    """A stand-in for ``sys.stdout`` during a run (``installed``): text of a thread inside
    ``captured`` goes to that call's buffer, any other text to the real stream after the
    status line (if one shows) is erased."""

    def __init__(self, stream, tty: bool | None = None, plain_every_s: float | None = None):
        self.stream = stream
        self.tty = _is_tty(stream) if tty is None else tty
        if plain_every_s is None:
            plain_every_s = float(os.environ.get(PLAIN_EVERY_ENV) or PLAIN_EVERY_S)
        self.plain_every_s = plain_every_s
        self._lock = threading.RLock()
        self._held: dict[int, list[str]] = {}
        self._status_shown = False
        self._line_start = True  # the last text ended a line: a status line may go there

    # --- the stream -------------------------------------------------------------------------
    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        held = self._held.get(threading.get_ident())
        if held is not None:
            held.append(s)
            return len(s)
        with self._lock:
            self._erase()
            self.stream.write(s)
            if s:
                self._line_start = s.endswith("\n")
        return len(s)

    def flush(self) -> None:
        with self._lock:
            self.stream.flush()

    def isatty(self) -> bool:
        return self.tty

    @property
    def encoding(self):
        return getattr(self.stream, "encoding", "utf-8")

    # --- held output ------------------------------------------------------------------------
    def captured(self, fn, *args):
        """Run ``fn(*args)`` with this thread's output held; return (output, result). On an
        exception the output so far is attached to it as ``console_output``."""
        buf: list[str] = []
        self._held[threading.get_ident()] = buf
        try:
            result = fn(*args)
        except BaseException as e:
            e.console_output = "".join(buf)
            raise
        finally:
            self._held.pop(threading.get_ident(), None)
        return "".join(buf), result

    def emit(self, text: str) -> None:
        """Print held output whole (from the main loop)."""
        if text:
            with self._lock:
                self._erase()
                self.stream.write(text if text.endswith("\n") else text + "\n")
                self._line_start = True
                self.stream.flush()

    # --- the status line --------------------------------------------------------------------
    def _erase(self) -> None:
        if self._status_shown:
            self.stream.write(ERASE)
            self._status_shown = False

    def status(self, text: str) -> None:
        """Show ``text`` as the moving line (a terminal) or as a plain line (elsewhere)."""
        with self._lock:
            if not self._line_start:  # print() writes a line's text and its newline apart
                return
            if self.tty:
                width = shutil.get_terminal_size((100, 20)).columns - 1
                self.stream.write("\r" + text[:width] + "\033[K")
                self._status_shown = True
            else:
                self.stream.write(text + "\n")
            self.stream.flush()

    @contextlib.contextmanager
    def working(self, label: str, spark=None):
        """While the block runs: ``label``, the seconds so far and Spark's progress, moving
        (``Ticker``); erased when the block ends."""
        ticker = Ticker(self, label, spark)
        ticker.start()
        try:
            yield
        finally:
            ticker.stop()
            with self._lock:
                self._erase()
                self.stream.flush()


class Ticker(threading.Thread):
    """The moving line of one stage; stops within one tick of ``stop``."""

    def __init__(self, console: Console, label: str, spark=None):
        super().__init__(name="gdmix-progress", daemon=True)
        self.console, self.label, self.spark = console, label, spark
        self.t0 = time.monotonic()
        self._halt = threading.Event()

    def run(self) -> None:
        every = TTY_EVERY_S if self.console.tty else self.console.plain_every_s
        while not self._halt.wait(every):
            elapsed = time.monotonic() - self.t0
            tasks = spark_progress(self.spark)
            text = f"  ... {self.label} {elapsed:.1f} s" + (f"  spark {tasks}" if tasks else "")
            if not self.console.tty:
                text += " (still running)"
            if self._halt.is_set():
                break
            self.console.status(text)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)


def spark_progress(spark) -> str:
    """The active Spark stages' progress, e.g. ``stage 4: 6/8 tasks``; '' when none (or no
    session: a stage without Spark, or one that has stopped)."""
    if spark is None:
        return ""
    try:
        tracker = spark.sparkContext.statusTracker()
        parts = []
        for sid in sorted(tracker.getActiveStageIds())[:3]:
            info = tracker.getStageInfo(sid)
            if info is not None:
                parts.append(f"stage {sid}: {info.numCompletedTasks}/{info.numTasks} tasks")
        return ", ".join(parts)
    except Exception:  # noqa: BLE001 - progress is best effort; the stage reports real failures
        return ""


@contextlib.contextmanager
def installed(stream=None):
    """``sys.stdout`` is a ``Console`` over the current one for the block."""
    old = sys.stdout
    con = Console(stream or old)
    sys.stdout = con
    try:
        yield con
    finally:
        sys.stdout = old

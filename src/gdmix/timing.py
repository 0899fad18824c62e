"""Seconds per phase of a stage, for its report and done marker (where the time goes)."""
from __future__ import annotations

import time


class Phases:
    def __init__(self):
        self.t, self.seconds = time.time(), {}

    def lap(self, name: str) -> None:
        """The time since the last lap (or the start) is phase ``name``."""
        now = time.time()
        self.seconds[name] = round(now - self.t, 3)
        self.t = now

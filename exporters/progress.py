"""Step-by-step progress on stderr for long host-side work (exports take minutes on real models)."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager


class Steps:
    def __init__(self, total: int, enabled: bool = True, stream=None):
        self.total = total
        self.done = 0
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.started = time.perf_counter()

    @contextmanager
    def step(self, message: str):
        self.done += 1
        t0 = time.perf_counter()
        if self.enabled:
            print(f"[{self.done}/{self.total}] {message} ...", end="", file=self.stream, flush=True)
        try:
            yield
        except BaseException:
            if self.enabled:
                print(" failed", file=self.stream, flush=True)
            raise
        if self.enabled:
            print(f" {time.perf_counter() - t0:.1f}s", file=self.stream, flush=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

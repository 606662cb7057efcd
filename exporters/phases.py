"""What a long export step is doing, on the step's own progress line: ``[tracing 3 of 30 layers 4.1s, ...]``.

The steps of ``progress`` time whole steps; the graph export step is most of an export, so
its phases (trace, fusion, quantization, saving) are reported as they start and end, and a user
watching a minute-long step sees which part it is in.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from contextvars import ContextVar

_line: ContextVar[list | None] = ContextVar("edgelora_phase_line", default=None)  # [stream, phases shown]


@contextmanager
def shown(stream):
    """Report phases on ``stream`` (None: nowhere) inside this block, in brackets on the current line."""
    token = _line.set([stream, 0] if stream is not None else None)
    try:
        yield
    finally:
        line = _line.get()
        _line.reset(token)
        if line and line[1]:
            print("]", end="", file=line[0], flush=True)


def note(text: str) -> None:
    line = _line.get()
    if line:
        print((" [" if line[1] == 0 else ", ") + text, end="", file=line[0], flush=True)
        line[1] += 1


@contextmanager
def phase(name: str):
    note(name)
    t0 = time.perf_counter()
    ended = " stopped"
    try:
        yield
        ended = f" {time.perf_counter() - t0:.1f}s"
    finally:
        line = _line.get()
        if line:
            print(ended, end="", file=line[0], flush=True)

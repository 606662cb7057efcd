"""One request's answer as it grows: tokens picked from logits, text pieces released, the reason it ended.

The same ``Row`` serves a request run alone and a row of the batching engine, so both stop, hold back
and report in exactly the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from .sampling import SamplingParams


@dataclass
class Generation:
    """The new tokens only (never the prompt), with timings for the caller's own accounting."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "length" | "eos" | "stop" | "cancelled"
    prompt_tokens: int
    prefill_ms: float
    decode_ms: float
    prompt_tokens_dropped: int = 0  # the oldest prompt tokens left out to fit the context (``truncate``)

    @property
    def decode_ms_per_token(self) -> float:
        steps = max(len(self.token_ids) - 1, 1)
        return self.decode_ms / steps


class Row:
    """Text that might begin a stop string is held back until it cannot; an incomplete multi-byte character
    waits for its other bytes."""

    def __init__(self, prompt_ids: list[int], sampling: SamplingParams, decode: Callable[[list[int]], str],
                 eos: frozenset[int], dropped: int = 0):
        self.prompt_ids = prompt_ids
        self.dropped = dropped
        self.sampling = sampling
        self.picker = sampling.picker()
        self.decode = decode
        self.eos = frozenset() if sampling.ignore_eos else eos
        self.token_ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.finish_reason: str | None = None
        self.prefill_ms = 0.0
        self.decode_ms = 0.0

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def length(self) -> int:
        """Positions fed to the graph so far once the prompt is in: the prompt and every token but the last."""
        return len(self.prompt_ids) + len(self.token_ids) - 1

    def accept(self, logits: np.ndarray) -> str:
        """Pick the next token from its logits row; returns the text that may be shown now."""
        token = self.picker.pick(logits)
        self.token_ids.append(token)
        if token in self.eos:
            return self.finish("eos")
        self.text = self.decode(self.token_ids)
        stops = self.sampling.stop
        hit = min((i for i in (self.text.find(s) for s in stops) if i >= 0), default=-1)
        if hit >= 0:
            self.text = self.text[:hit]
            return self.finish("stop")
        if len(self.token_ids) >= self.sampling.max_new_tokens:
            return self.finish("length")
        safe = len(self.text) - held_back(self.text, stops)
        if self.text.endswith("\ufffd"):
            safe = min(safe, len(self.text) - 1)
        return self.release(safe)

    def finish(self, reason: str) -> str:
        self.finish_reason = reason
        return self.release(len(self.text))

    def release(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        piece, self.emitted = self.text[self.emitted:upto], upto
        return piece

    def result(self) -> Generation:
        return Generation(text=self.text, token_ids=list(self.token_ids), finish_reason=self.finish_reason or "length",
                          prompt_tokens=len(self.prompt_ids), prefill_ms=self.prefill_ms, decode_ms=self.decode_ms,
                          prompt_tokens_dropped=self.dropped)


class TextStream:
    """What ``EdgeModel.stream`` returns: iterate for text pieces, then read ``result``; ``close`` cancels the
    request (its batch row and KV space are freed at the next step)."""

    def __init__(self, pieces: Iterator[str], cancel: Callable[[], None] | None = None):
        self.result: Generation | None = None
        self._source = pieces
        self._cancel = cancel

    def __iter__(self) -> Iterator[str]:
        self.result = yield from self._source

    def close(self) -> None:
        """Safe from any thread: a thread reading the stream meanwhile gets its end, with reason "cancelled"."""
        if self._cancel is not None:
            self._cancel()
        try:
            self._source.close()
        except ValueError:  # another thread is inside the generator: the cancel ends its reading
            pass


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
    longest = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest

"""One generation request driven from the event loop: the runtime's stream, each step in a worker thread.

The runtime decides how concurrent streams share the model (its batching engine); here each
request only pulls its own text pieces, timing the first one and the rest for the metrics, and
closes its stream when the client goes away, which frees its place in the model at once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import anyio

from edgelora.errors import EdgeLoraError

from .api_errors import from_runtime


@dataclass
class Outcome:
    """What a finished request reports: for its response's usage, the metrics and the access log."""

    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # the runtime's: "length" | "eos" | "stop"
    ttft_s: float | None
    per_token_s: float | None


class GenerationRun:
    def __init__(self, stream, model_field: str, arrived: float):
        self.stream = stream
        self.pieces = iter(stream)  # one iteration of the stream, which sets its result when it ends
        self.model_field = model_field
        self.arrived = arrived
        self.first_at: float | None = None
        self.done = False

    @classmethod
    async def start(cls, model, prompt, adapter, model_field: str, arrived: float, **sampling) -> "GenerationRun":
        try:
            stream = await anyio.to_thread.run_sync(lambda: model.stream(prompt, adapter=adapter, **sampling))
        except EdgeLoraError as e:
            raise from_runtime(e, model_field) from None
        return cls(stream, model_field, arrived)

    def _next_sync(self) -> str | None:
        piece = next(self.pieces, None)
        if piece is not None and self.first_at is None:
            self.first_at = time.perf_counter()
        return piece

    async def next_piece(self) -> str | None:
        """The next text piece, None at the end; runtime errors become the API's."""
        if self.done:
            return None
        try:
            piece = await anyio.to_thread.run_sync(self._next_sync)
        except EdgeLoraError as e:
            self.done = True
            raise from_runtime(e, self.model_field) from None
        if piece is None:
            self.done = True
        return piece

    async def text(self) -> str:
        """The whole answer, for a request that does not stream."""
        pieces = []
        while (piece := await self.next_piece()) is not None:
            pieces.append(piece)
        return "".join(pieces)

    def close(self) -> None:
        """Stop generating (the client went away): the engine frees the request's batch row at its next step."""
        if not self.done:
            self.done = True
            self.stream.close()

    def outcome(self) -> Outcome | None:
        """Once the stream has ended; None for one closed early (no result)."""
        result = self.stream.result
        if result is None:
            return None
        end = time.perf_counter()
        n = len(result.token_ids)
        ttft = None if self.first_at is None else self.first_at - self.arrived
        per_token = (end - self.first_at) / (n - 1) if self.first_at is not None and n > 1 else None
        return Outcome(result.prompt_tokens, n, result.finish_reason, ttft, per_token)

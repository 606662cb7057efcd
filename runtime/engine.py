"""Continuous batching: many requests, each with its own adapter, share the model's decode steps.

A decode step reads every base weight once whatever the number of rows, so rows are nearly free until the
arithmetic catches up with the memory traffic. One scheduler thread per model owns the graph: between
steps it drops finished and cancelled rows, prefills newcomers (long prompts in chunks of
``prefill_chunk`` tokens, so rows already decoding wait at most one chunk), then runs one step over every
decoding row. Rows with different adapters share the step through the graph's per-row adapter mask
(``row_adapters``); packages without it (merged packages, older exports, int4 adapters of unequal ranks)
and graphs whose attention keeps no shared KV buffer run their rows one call each, still interleaved.

Limits: ``max_batch`` rows decode at once and ``kv_tokens`` positions (prompt plus ``max_new_tokens`` of every
admitted request) are reserved at most; past them a request waits in a queue of ``max_queue``, and past
the queue ``submit`` raises ``BusyError``.
"""

from __future__ import annotations

import atexit
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from edgelora.errors import BusyError, EdgeLoraError

from .binding import BindingPool, Call
from .generation import Row, TextStream
from .kvcache import KVCache, KVRows
from .row_adapters import graph_factors, row_mask, union_params

DEFAULT_CONTEXT = 4096  # positions per row for packages that do not record their model's context


@dataclass(frozen=True)
class BatchSettings:
    max_batch: int = 8
    max_queue: int = 64
    kv_tokens: int | None = None  # default: max_batch rows of the model's whole context
    prefill_chunk: int = 256

    def __post_init__(self):
        for name in ("max_batch", "max_queue", "prefill_chunk"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "max_queue" else 1):
                raise EdgeLoraError(f"{name} must be a whole number >= {0 if name == 'max_queue' else 1}, "
                                    f"got {value!r}")
        if self.kv_tokens is not None and (isinstance(self.kv_tokens, bool) or not isinstance(self.kv_tokens, int)
                                           or self.kv_tokens < 1):
            raise EdgeLoraError(f"kv_tokens must be a whole number >= 1, got {self.kv_tokens!r}")


class Request:
    """One submitted generation: its row state, its adapter, and the queue its caller reads events from."""

    def __init__(self, prompt_ids: list[int], adapter, resident, row: Row, pieces: bool = True):
        self.prompt_ids = prompt_ids
        self.pieces_wanted = pieces
        self.adapter = adapter
        self.resident = resident  # held, so an eviction cannot pull its parameters while it runs
        self.row = row
        self.events: queue.Queue = queue.Queue()
        self.cancelled = False
        self.fed = 0  # prompt tokens prefilled so far
        self.call: Call | None = None
        self.kv: KVCache | None = None
        self.started = 0.0

    @property
    def reserved(self) -> int:
        return len(self.prompt_ids) + self.row.sampling.max_new_tokens

    def pieces(self):
        while True:
            kind, value = self.events.get()
            if kind == "piece":
                yield value
            elif kind == "done":
                return value
            else:
                raise value


class BatchEngine:
    def __init__(self, model, settings: BatchSettings):
        self.model = model
        self.settings = settings
        info = model.info
        self.context = info.max_positions or DEFAULT_CONTEXT
        self.kv_budget = settings.kv_tokens or settings.max_batch * self.context
        manifest = model.manifest
        # one step for many rows needs the shared buffers and, for rows of different adapters, the mask
        self.batched = info.shared_kv and manifest.mode == "separate"
        self.mixed = self.batched and info.row_mask is not None
        self._factors = graph_factors(manifest.slots, manifest.slot_groups) if self.mixed else []
        self._codec = (manifest.slots[0].dtype if manifest.slots else "fp32", manifest.adapter_block_size)
        self._rows: KVRows | None = None
        self._waiting: deque[Request] = deque()
        self._admitted: deque[Request] = deque()  # KV space reserved, prefill not begun
        self._prefilling: Request | None = None
        self._decoding: list[Request] = []
        self._reserved = 0
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = False
        self._step: tuple | None = None  # (the decoding rows it was bound for, its call, its kv view, its mask)
        self._union: tuple | None = None  # (segment labels, pool, widths, bytes): the last joined adapters
        self.steps = 0
        self.rows_stepped = 0

    # the caller's side

    def submit(self, prompt_ids: list[int], adapter, row: Row, pieces: bool = True) -> TextStream:
        """Queue a request; returns its stream at once, which yields text pieces as they come, or with
        ``pieces=False`` only ends, with its result. Raises ``BusyError`` when rows and queue are full."""
        if len(prompt_ids) + row.sampling.max_new_tokens > min(self.kv_budget, self.context):
            raise EdgeLoraError(
                f"a prompt of {len(prompt_ids)} tokens plus max_new_tokens={row.sampling.max_new_tokens} needs "
                f"{len(prompt_ids) + row.sampling.max_new_tokens} positions, more than the "
                + (f"model's context of {self.context}" if self.context <= self.kv_budget
                   else f"engine's KV budget of {self.kv_budget}")
                + "; shorten the prompt or lower max_new_tokens")
        if self.model.manifest.mode == "merged":  # an unknown name fails here, not in the engine's thread
            self.model.call(adapter).close()
            resident = None
        else:
            resident = self.model.registry.resolve(adapter)
        request = Request(prompt_ids, adapter, resident, row, pieces)
        with self._cv:
            if self._closing:
                raise EdgeLoraError("the model's batching engine is closed")
            self._waiting.append(request)
            self._admit()
            if len(self._waiting) > self.settings.max_queue:
                self._waiting.remove(request)
                running = len(self._decoding) + len(self._admitted) + (self._prefilling is not None)
                raise BusyError(f"the model is busy: {running} requests running and {len(self._waiting)} queued "
                                f"(max_batch={self.settings.max_batch}, max_queue={self.settings.max_queue}); "
                                "retry later", retry_after_s=1.0)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="edgelora-engine", daemon=True)
                self._thread.start()
                atexit.register(self.close)
            self._cv.notify()
        return TextStream(request.pieces(), cancel=lambda: self._cancel(request))

    def stats(self) -> dict:
        with self._cv:
            return {"queue_depth": len(self._waiting), "batch_size": len(self._decoding),
                    "prefilling": len(self._admitted) + (self._prefilling is not None),
                    "kv_reserved_tokens": self._reserved, "kv_budget_tokens": self.kv_budget,
                    "kv_positions_per_row": self._rows.capacity if self._rows is not None else 0,
                    "steps": self.steps, "rows_stepped": self.rows_stepped,
                    "mixed_adapters_share_steps": self.mixed,
                    "joined_adapter_bytes": self._union[3] if self._union is not None else 0}

    def _cancel(self, request: Request) -> None:
        with self._cv:
            request.cancelled = True
            if request in self._waiting:
                self._waiting.remove(request)
                request.row.finish_reason = "cancelled"
                request.events.put(("done", request.row.result()))
            self._cv.notify()

    # the scheduler thread

    def close(self) -> None:
        """Cancel the running and queued requests and stop the scheduler thread after its current step (also run
        at interpreter exit: a thread killed inside onnxruntime's run aborts the process)."""
        with self._cv:
            self._closing = True
            for request in (*self._waiting, *self._admitted, self._prefilling, *self._decoding):
                if request is not None:
                    request.cancelled = True
            self._cv.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not (self._waiting or self._admitted or self._prefilling or self._decoding):
                    if self._closing:
                        return
                    self._cv.wait()
                self._admit()
            try:
                self._prefill()
                if self._decoding:
                    self._decode()
            except Exception as e:  # a failed step fails its requests, never the engine
                self._fail_all(EdgeLoraError(f"generation failed: {' '.join(str(e).split())[:300]}"))

    def _admit(self) -> None:
        """Under the lock: waiting requests take rows and KV space while both last, oldest first."""
        while self._waiting:
            head = self._waiting[0]
            rows = len(self._decoding) + len(self._admitted) + (self._prefilling is not None)
            if rows >= self.settings.max_batch or self._reserved + head.reserved > self.kv_budget:
                return
            self._waiting.popleft()
            self._reserved += head.reserved
            self._admitted.append(head)

    def _prefill(self) -> None:
        """Up to ``prefill_chunk`` prompt tokens, request after request, each into its own row."""
        budget = self.settings.prefill_chunk
        while budget > 0:
            request = self._prefilling
            if request is None:
                with self._cv:
                    if not self._admitted:
                        return
                    request = self._prefilling = self._admitted.popleft()
                try:
                    self._start(request)
                except Exception as e:  # its adapter became unusable since submit: fail it alone
                    self._prefilling = None
                    self._release(request)
                    request.events.put(("error", e if isinstance(e, EdgeLoraError) else EdgeLoraError(str(e))))
                    continue
            if request.cancelled:
                self._prefilling = None
                self._finish(request)
                continue
            chunk = request.prompt_ids[request.fed:request.fed + budget]
            if self.batched:
                self._fit_kv(request.fed + len(chunk))
            ids = np.asarray([chunk], np.int64)
            positions = np.arange(request.fed, request.fed + len(chunk), dtype=np.int64)[None]
            logits = self.model.runner.forward(request.call, ids, positions, request.kv, last_only=True)
            request.fed += len(chunk)
            budget -= len(chunk)
            if request.fed == len(request.prompt_ids):
                request.row.prefill_ms = (time.perf_counter() - request.started) * 1e3
                self._prefilling = None
                self._emit(request, request.row.accept(logits[0, -1]))
                if request.row.done:
                    self._finish(request)
                else:
                    if self.batched:
                        request.call.close()  # its steps run on the batch's call
                        request.call = None
                    self._decoding.append(request)

    def _start(self, request: Request) -> None:
        request.started = time.perf_counter()
        if self.batched:
            rows = self._kv_rows()
            slot = len(self._decoding)
            request.kv = rows.view(slot, slot + 1)
        else:
            request.kv = KVCache()
            if self.model.info.shared_kv:  # grown step by step in _row_steps, as KVRows is
                request.kv.reserve(self.model.info, len(request.prompt_ids))
        request.call = self.model.call(request.adapter)

    def _fit_kv(self, prefill_positions: int = 0) -> None:
        """Buffers as long as this pass needs: each decoding row one position past its length, the prefilling
        row its next chunk. Replaced buffers take the batch's binding and the prefilling row's view with them."""
        rows = self._kv_rows()
        needs = [request.row.length + 1 for request in self._decoding]
        used = len(self._decoding)
        if self._prefilling is not None:
            needs.append(max(prefill_positions, self._prefilling.fed))
            used += 1
        if not rows.fit(max(needs, default=1), used):
            return
        if self._step is not None:
            self._step[1].close()
            self._step = None
        if self._prefilling is not None:
            self._prefilling.kv = rows.view(len(self._decoding), len(self._decoding) + 1)

    def _kv_rows(self) -> KVRows:
        if self._rows is None:
            # no request needs more positions than the context or the whole budget
            self._rows = KVRows(self.model.info, self.settings.max_batch, min(self.context, self.kv_budget))
        return self._rows

    def _decode(self) -> None:
        if any(r.cancelled for r in self._decoding):
            for request in self._decoding:
                if request.cancelled:
                    request.row.finish_reason = "cancelled"
            self._drop()
            if not self._decoding:
                return
        t0 = time.perf_counter()
        if self.batched:
            self._fit_kv()
        bound = self._bound_step() if self.batched else None
        groups = self._batched_step(*bound) if bound is not None else self._row_steps()
        ms = (time.perf_counter() - t0) * 1e3
        self.steps += 1
        self.rows_stepped += len(self._decoding)
        for request, logits in groups:
            request.row.decode_ms += ms
            self._emit(request, request.row.accept(logits))
        if any(r.row.done for r in self._decoding):
            self._drop()

    def _batched_step(self, call: Call, kv: KVCache) -> list:
        rows = self._decoding
        ids = np.asarray([[r.row.token_ids[-1]] for r in rows], np.int64)
        positions = np.asarray([[r.row.length] for r in rows], np.int64)
        logits = self.model.runner.forward(call, ids, positions, kv)
        return [(r, logits[i, 0]) for i, r in enumerate(rows)]

    def _bound_step(self) -> tuple[Call, KVCache] | None:
        """The call of the current batch, bound once per change of its rows; None where its rows cannot share
        one (different adapters without a mask, or int4 blocks that do not join)."""
        rows = self._decoding
        if self._step is not None and _same(self._step[0], rows):
            return self._step[1], self._step[2]
        if self._step is not None:
            self._step[1].close()
            self._step = None
        labels = [_label(r) for r in rows]
        mask = None
        if len(set(labels)) == 1:
            call = self.model.call(rows[0].adapter)
        else:
            segments = sorted({label for label in labels if label})
            union = self._union_pool(segments, {_label(r): r.resident for r in rows if r.resident})
            if union is None:
                return None
            pool, widths = union
            call = Call(pool, None, self.model.info.inputs + [self.model.info.row_mask])
            index = {label: i for i, label in enumerate(segments)}
            mask = ort.OrtValue.ortvalue_from_numpy(row_mask([index.get(label) for label in labels], widths))
            call.binding.bind_ortvalue_input(self.model.info.row_mask, mask)
        kv = self._kv_rows().view(0, len(rows))
        self._step = (list(rows), call, kv, mask)  # the mask's memory lives as long as its binding uses it
        return call, kv

    def _union_pool(self, segments: list[str], residents: dict) -> tuple[BindingPool, list[int]] | None:
        if not self.mixed:
            return None
        if self._union is not None and self._union[0] == segments:
            return None if self._union[1] is None else (self._union[1], self._union[2])
        joined = union_params([residents[s].params for s in segments], self._factors, *self._codec)
        if joined is None:  # remembered, so rows that cannot join do not try again at every step
            self._union = (segments, None, [], 0)
            return None
        params, widths = joined
        pool = BindingPool(self.model.session, {n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in params.items()})
        self._union = (segments, pool, widths, sum(a.nbytes for a in params.values()))
        return pool, widths

    def _row_steps(self) -> list:
        """Rows one call each: their own binding, their own KV."""
        out = []
        for request in self._decoding:
            if request.call is None:
                request.call = self.model.call(request.adapter)
            ids = np.asarray([[request.row.token_ids[-1]]], np.int64)
            positions = np.asarray([[request.row.length]], np.int64)
            kv = request.kv if not self.batched else self._kv_rows().view(*_slot(self._decoding, request))
            if not self.batched and self.model.info.shared_kv:
                kv.reserve(self.model.info, request.row.length + 1)
            out.append((request, self.model.runner.forward(request.call, ids, positions, kv)[0, 0].copy()))
        return out

    def _drop(self) -> None:
        """Finished and cancelled rows leave; the last rows move into their slots so rows stay at the front."""
        kept = []
        for slot, request in enumerate(self._decoding):
            if request.row.done:
                self._finish(request)
            else:
                if self.batched and len(kept) != slot:
                    self._kv_rows().move(slot, len(kept), request.row.length)
                kept.append(request)
        if self._prefilling is not None and self.batched and self._prefilling.fed:
            old = len(self._decoding)
            self._kv_rows().move(old, len(kept), self._prefilling.fed)
        if self._prefilling is not None and self.batched:
            self._prefilling.kv = self._kv_rows().view(len(kept), len(kept) + 1)
        self._decoding = kept

    def _finish(self, request: Request) -> None:
        self._release(request)
        request.events.put(("done", request.row.result()))

    def _release(self, request: Request) -> None:
        if request.call is not None:
            request.call.close()
            request.call = None
        with self._cv:
            self._reserved -= request.reserved
        if request.cancelled and not request.row.done:
            request.row.finish_reason = "cancelled"

    def _emit(self, request: Request, piece: str) -> None:
        if piece and request.pieces_wanted:
            request.events.put(("piece", piece))

    def _fail_all(self, error: Exception) -> None:
        running = [r for r in (*self._decoding, self._prefilling) if r is not None]
        self._decoding, self._prefilling = [], None
        if self._step is not None:
            self._step[1].close()
            self._step = None
        for request in running:
            self._release(request)
            request.events.put(("error", error))


def _label(request: Request) -> str:
    return request.resident.name if request.resident is not None else ""


def _same(bound: list[Request], rows: list[Request]) -> bool:
    """The same requests in the same rows (by identity: a finished request's id may be a new one's)."""
    return len(bound) == len(rows) and all(a is b for a, b in zip(bound, rows))


def _slot(rows: list[Request], request: Request) -> tuple[int, int]:
    i = rows.index(request)
    return i, i + 1


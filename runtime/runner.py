"""One forward pass of a causal-LM graph over a batch of rows: what every generation path is built on.

A pass feeds ``input_ids`` [rows, seq] at ``position_ids`` [rows, seq] after what ``kv`` holds and extends it.
With shared KV buffers the buffers stay bound across steps, and a decode step's logits land in the call's
own buffer (``Call.step_output``): nothing is allocated or copied per step but the ids and positions.
"""

from __future__ import annotations

import time

import numpy as np
import onnxruntime as ort

from .binding import Call
from .generation import Row
from .graph_info import GraphInfo
from .kvcache import KVCache

ALL_POSITIONS = 2**62  # logits_keep's value for logits at every position (a graph's own default)


class Runner:
    def __init__(self, info: GraphInfo):
        self.info = info
        # logits_keep's two values, made once: an overridable initializer binds only as an OrtValue
        self._keep = {last: ort.OrtValue.ortvalue_from_numpy(np.array([1 if last else ALL_POSITIONS], np.int64))
                      for last in (True, False)}

    def forward(self, call: Call, input_ids: np.ndarray, position_ids: np.ndarray, kv: KVCache,
                attention_mask: np.ndarray | None = None, last_only: bool = False) -> np.ndarray:
        """Logits [rows, seq, vocab]; a decode step's are the call's buffer, overwritten by its next step.

        ``attention_mask`` defaults to ones over the past and the new tokens (GroupQueryAttention graphs take
        each row's length from its positions and never read it). ``last_only``: a prefill, which needs only the
        last position's logits; graphs with a ``logits_keep`` input then return [rows, 1, vocab] and skip the LM
        head for the other positions."""
        info = self.info
        binding = call.binding
        rows, seq = input_ids.shape
        if info.logits_keep is not None:  # bound at every pass: the binding outlives it
            binding.bind_ortvalue_input(info.logits_keep, self._keep[last_only])
        shared = info.shared_kv and kv.capacity > 0
        if attention_mask is None:
            past = int(position_ids.max()) + 1 - seq if shared else _past_length(kv)
            attention_mask = np.ones((rows, past + seq), np.int64)
        binding.bind_cpu_input("input_ids", input_ids)
        binding.bind_cpu_input("attention_mask", attention_mask)
        binding.bind_cpu_input("position_ids", position_ids)
        step = shared and seq == 1
        if step:
            logits = call.step_output("logits", (rows, seq, info.vocab_size))
        else:
            binding.bind_output("logits")  # unallocated: onnxruntime sizes it for this pass
        # bound after the logits, so the logits are output 0 for the rest of the call
        if shared and call.kv_bound is not kv.values:  # the buffers stay bound until they change
            for name, value in kv.values.items():
                binding.bind_ortvalue_input(name, value)
                binding.bind_ortvalue_output(name.replace("past_key_values", "present"), value)
            call.kv_bound = kv.values
        elif not shared:
            empty = np.zeros((rows, info.num_kv_heads, 0, info.head_dim), np.float32)
            for name in info.past_names:
                value = kv.values.get(name)
                if value is None:
                    binding.bind_cpu_input(name, empty)
                else:
                    binding.bind_ortvalue_input(name, value)
                binding.bind_output(name.replace("past_key_values", "present"))
        if step:
            call.pool.session.run_with_iobinding(binding)
        else:
            outputs = call.run()
            logits = outputs[0].numpy()
            if not shared:
                kv.values = dict(zip(info.past_names, outputs[1:]))
        kv.length += seq
        return logits


def _past_length(kv: KVCache) -> int:
    first = next(iter(kv.values.values()), None)
    return 0 if first is None else first.shape()[2]


KV_RESERVE_AHEAD = 256  # positions a generation reserves past its prompt; the buffers double beyond


def generate_alone(runner: Runner, call: Call, kv: KVCache, feed: list[int], row: Row):
    """One request on its own call: prefill ``feed`` after what ``kv`` holds, then a step per token. Yields text
    pieces and returns ``row.result()``; ``kv`` is left extended, so a chat's next turn starts where this one
    stopped."""
    info = runner.info
    start = kv.length
    total = start + len(feed)
    if info.shared_kv:  # room for the answer, up to a bound: a generous max_new_tokens is only a limit
        kv.reserve(info, total + min(row.sampling.max_new_tokens - 1, KV_RESERVE_AHEAD))
    t0 = time.perf_counter()
    logits = runner.forward(call, np.asarray([feed], np.int64), np.arange(start, total, dtype=np.int64)[None], kv,
                            last_only=True)
    row.prefill_ms = (time.perf_counter() - t0) * 1e3
    piece = row.accept(logits[0, -1])
    while True:
        if piece:
            yield piece
        if row.done:
            return row.result()
        if info.shared_kv:
            kv.reserve(info, kv.length + 1)
        t0 = time.perf_counter()
        logits = runner.forward(call, np.asarray([[row.token_ids[-1]]], np.int64),
                                np.asarray([[kv.length]], np.int64), kv)
        row.decode_ms += (time.perf_counter() - t0) * 1e3
        piece = row.accept(logits[0, 0])

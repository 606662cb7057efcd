"""What a call runs the graph through: an onnxruntime IOBinding that already holds its adapter's parameters.

IOBinding is what lets a decode step write its keys and values into the KV cache in place, but
onnxruntime (1.32) applies a ``RunOptions``' active LoRA adapters only in ``InferenceSession.run``,
never under IOBinding. So the adapter's parameters are bound as ordinary inputs, a cost paid once per
binding (hundreds of bindings for a model's slots). Bindings are pooled per resident adapter,
and a call that picks an adapter takes a free one from its pool: the switch stays a matter of
microseconds, and an evicted adapter's pool goes with it.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

import numpy as np
import onnxruntime as ort

_NOTHING = ort.OrtValue.ortvalue_from_numpy(np.zeros(0, np.float32))  # a pooled binding's per-call inputs between calls


class BindingPool:
    """Ready bindings of one session with one set of parameters (an adapter's, or none for the base)."""

    def __init__(self, session: ort.InferenceSession, params: Mapping[str, ort.OrtValue]):
        self.session = session
        self._params = params
        self._free = [self._new()]  # made with the adapter, so its first call switches as fast as any other
        self._lock = threading.Lock()

    def acquire(self) -> ort.IOBinding:
        with self._lock:
            if self._free:
                return self._free.pop()
        return self._new()  # another call holds the others

    def _new(self) -> ort.IOBinding:
        binding = self.session.io_binding()
        for name, value in self._params.items():
            binding.bind_ortvalue_input(name, value)
        return binding

    def release(self, binding: ort.IOBinding, call_inputs: list[str]) -> None:
        """Back to the pool, holding none of the call's tensors (its KV buffers can be large)."""
        binding.clear_binding_outputs()
        for name in call_inputs:
            binding.bind_ortvalue_input(name, _NOTHING)
        with self._lock:
            self._free.append(binding)


class Call:
    """One call's binding, back to its pool when the call ends. It holds the resident adapter meanwhile,
    so an eviction during the call cannot pull the parameters from under it."""

    def __init__(self, pool: BindingPool, resident, call_inputs: list[str]):
        self.pool = pool
        self.binding = pool.acquire()
        self.kv_bound = None  # the KV buffers this binding holds (shared-buffer graphs)
        self._step_output: tuple[np.ndarray, ort.OrtValue] | None = None
        self._resident = resident
        self._call_inputs = call_inputs

    def run(self) -> list[ort.OrtValue]:
        self.pool.session.run_with_iobinding(self.binding)
        return self.binding.get_outputs()

    def step_output(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """Bind ``name`` to this call's buffer of ``shape``, the same one at every decode step; the caller reads it
        before the next step overwrites it (saves allocating the output and wrapping every output per step)."""
        if self._step_output is None or self._step_output[0].shape != shape:
            array = np.empty(shape, np.float32)
            self._step_output = array, ort.OrtValue.ortvalue_from_numpy(array)
        self.binding.bind_ortvalue_output(name, self._step_output[1])
        return self._step_output[0]

    def close(self) -> None:
        if self.binding is not None:
            self.pool.release(self.binding, self._call_inputs)
            self.binding = None

    def __enter__(self) -> "Call":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

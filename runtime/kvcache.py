"""The keys and values of every token fed so far, in the form the graph's attention takes them.

With GroupQueryAttention (the manifest's ``graph.fusions.gqa``) they live in buffers of ``capacity``
positions that are bound as both a step's past input and its present output: onnxruntime then writes
the step's keys and values in place, as onnxruntime-genai runs its graphs, instead of copying the whole
cache into new tensors at every step, a cost that grows with the context (on the 135M model, with the
adapter's parameters bound once per call as well, decode got 9% faster at 64 new tokens and 12% at
400). Buffers are allocated zeroed, which the OS commits lazily, so reserved positions cost memory
only once written, and they double when a pass needs more. Other attention (MultiHeadAttention,
kept for head sizes GQA's CPU kernel refuses) takes the previous step's present outputs as its past.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort


@dataclass
class KVCache:
    length: int = 0
    capacity: int = 0  # shared buffers only
    values: dict[str, ort.OrtValue] = field(default_factory=dict)  # past input name -> its keys or values
    _arrays: dict[str, np.ndarray] = field(default_factory=dict)  # the shared buffers' memory

    def reserve(self, names: list[str], kv_heads: int, head_dim: int, positions: int) -> None:
        """Shared buffers of at least ``positions`` (twice the old capacity when growing, so a conversation's
        turns copy the cache only a logarithmic number of times)."""
        if positions <= self.capacity:
            return
        capacity = max(positions, 2 * self.capacity)
        arrays = {}
        for name in names:
            array = np.zeros((1, kv_heads, capacity, head_dim), np.float32)
            if name in self._arrays:
                array[:, :, : self.length] = self._arrays[name][:, :, : self.length]
            arrays[name] = array
        self._arrays, self.capacity = arrays, capacity
        self.values = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in arrays.items()}

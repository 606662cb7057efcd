"""The keys and values of every token fed so far, in the form the graph's attention takes them.

With GroupQueryAttention (``GraphInfo.shared_kv``) they live in buffers of ``capacity`` positions that
are bound as both a step's past input and its present output: onnxruntime then writes the step's keys
and values in place, as onnxruntime-genai runs its graphs, instead of copying the whole cache into new
tensors at every step. Buffers are allocated zeroed, which the OS commits lazily, so reserved positions
cost memory only once written. GroupQueryAttention reads each row's own length off its position ids, so
rows of different lengths share one buffer of ``[rows, kv_heads, capacity, head_dim]``: that is how the
batching engine runs them in one step (``KVRows``). Other attention (MultiHeadAttention, kept for head
sizes GQA's CPU kernel refuses) takes the previous step's present outputs as its past.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from .graph_info import GraphInfo


@dataclass
class KVCache:
    """One sequence's cache (or a view of engine rows): ``values`` maps each past input to its keys or values."""

    length: int = 0
    capacity: int = 0  # shared buffers only
    values: dict[str, ort.OrtValue] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # the shared buffers' memory

    def reserve(self, info: GraphInfo, positions: int) -> None:
        """Shared buffers of at least ``positions`` (twice the old capacity when growing, so a conversation's
        turns copy the cache only a logarithmic number of times)."""
        if positions <= self.capacity:
            return
        capacity = max(positions, 2 * self.capacity)
        arrays = {}
        for name in info.past_names:
            array = np.zeros((1, info.num_kv_heads, capacity, info.head_dim), np.float32)
            if name in self.arrays:
                array[:, :, : self.length] = self.arrays[name][:, :, : self.length]
            arrays[name] = array
        self.arrays, self.capacity = arrays, capacity
        self.values = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in arrays.items()}


class KVRows:
    """The batching engine's shared buffers: ``rows`` sequences, each of up to ``capacity`` positions.

    Rows in use are kept at the front, so a step over ``n`` rows binds the views ``[0, n)``, bound once per
    change of the batch. A view's values stay the same objects until the batch or the capacity changes, which
    is what lets a binding keep them bound across steps.

    The capacity follows what the rows need (``fit``), not the model's context: GroupQueryAttention's CPU
    kernel sizes its scores and its threading by the buffer's length, so buffers as long as the context made
    every step of a short generation slower (docs/batching.md). Each buffer is a view of one block of memory
    sized for the context, so a new capacity lays the rows out again in pages already faulted in, and
    positions past a row's length may hold an earlier layout's values, which attention never reads.
    """

    MIN_POSITIONS = 128

    def __init__(self, info: GraphInfo, rows: int, max_capacity: int):
        self.info = info
        self.rows = rows
        self.max_capacity = max_capacity
        self.capacity = 0  # nothing laid out before the first fit
        self.arrays: dict[str, np.ndarray] = {}
        self._memory = {name: np.zeros(rows * info.num_kv_heads * max_capacity * info.head_dim, np.float32)
                        for name in info.past_names}  # zeroed pages are committed only once written
        self._views: dict[tuple[int, int], KVCache] = {}

    def fit(self, positions: int, rows_used: int) -> bool:
        """Make room for ``positions`` positions per row, keeping what the first ``rows_used`` rows hold; True
        when the buffers were laid out anew (their views with them). Grows to the next power of two, and shrinks
        to twice that once the rows need a quarter of the buffer, so lengths that wander copy rarely."""
        target = min(self.max_capacity, max(self.MIN_POSITIONS, 1 << max(positions - 1, 0).bit_length()))
        if self.capacity and positions <= self.capacity and 4 * target > self.capacity:
            return False
        capacity = target if positions > self.capacity else min(self.capacity, 2 * target)
        keep = min(capacity, self.capacity)
        shape = (self.rows, self.info.num_kv_heads, capacity, self.info.head_dim)
        arrays = {}
        for name, memory in self._memory.items():
            held = self.arrays[name][:rows_used, :, :keep].copy() if name in self.arrays and rows_used else None
            arrays[name] = memory[:int(np.prod(shape))].reshape(shape)
            if held is not None:
                arrays[name][:rows_used, :, :keep] = held
        self.arrays, self.capacity, self._views = arrays, capacity, {}
        return True

    def view(self, start: int, stop: int) -> KVCache:
        key = (start, stop)
        if key not in self._views:
            values = {name: ort.OrtValue.ortvalue_from_numpy(array[start:stop]) for name, array in self.arrays.items()}
            self._views[key] = KVCache(capacity=self.capacity, values=values)
        return self._views[key]

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` positions of row ``src`` into row ``dst``."""
        for array in self.arrays.values():
            array[dst, :, :length] = array[src, :, :length]

"""The factors one batched call binds when its rows run different adapters, and the mask that picks a row's own.

Each resident adapter of the batch becomes one segment of every slot's rank axis, as wide as that adapter's
widest rank (a slot of lower rank padded with zero components), so the graph's ``[rows, rank]`` mask
(``graph.row_mask``) has one layout for every slot. Every row computes every segment, so a segment padded to a
wider neighbour's rank would cost each row that many more products for nothing. The segments are the stored
(quantized) parameters as they are, concatenated: a row computes exactly the products it computes alone, with
its own blob. A composition or a strength is its own segment, as it is its own blob when run alone.

Slot groups keep their layout: a group's ``a`` holds its modules' rank blocks side by side, so each module's
block gets the segments in turn. int4 ``b`` factors are quantized by blocks along the rank axis, so segments
can only be joined when every adapter has one rank in every slot, the same for all; otherwise ``union_params``
says no and the engine runs those rows one call each.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgelora.format import codec
from edgelora.format.manifest import Slot, SlotGroup
from edgelora.format.slot_groups import tiles


@dataclass(frozen=True)
class Factor:
    """One float factor of the graph: its name, whether its rank axis is the last (``a``) or the one before
    (``b``), how many modules' rank blocks it holds, and its shape at a given rank."""

    name: str
    is_a: bool
    modules: int
    outer: tuple[int, ...]  # a: (in,); b: (out,) or (tiles, tile)

    def shape(self, rank: int) -> tuple[int, ...]:
        if self.is_a:
            return (*self.outer, self.modules * rank)
        if len(self.outer) == 2:
            return (self.outer[0], rank, self.outer[1])
        return (rank, *self.outer)


def graph_factors(slots: list[Slot], groups: list[SlotGroup]) -> list[Factor]:
    by_module = {s.name: s for s in slots}
    grouped = {m for g in groups for m in g.modules}
    out = []
    for group in groups:
        tile, owners = tiles(group)
        out += [Factor(group.a, True, len(group.modules), (by_module[group.modules[0]].in_features,)),
                Factor(group.b, False, 1, (len(owners), tile))]
    for s in slots:
        if s.name not in grouped:
            out += [Factor(s.a, True, 1, (s.in_features,)), Factor(s.b, False, 1, (s.out_features,))]
    return out


def union_params(segments: list[dict[str, np.ndarray]], factors: list[Factor], dtype: str,
                 block: int) -> tuple[dict[str, np.ndarray], list[int]] | None:
    """(the joined parameters, each segment's width), or None where int4 blocks cannot be joined."""
    widths = [_rank(params, factors, dtype) for params in segments]
    if dtype == "int4":
        widths = [max(widths)] * len(widths)
    joined = {}
    for factor in factors:
        parts = []
        for params, width in zip(segments, widths):
            part = _padded(params, factor, dtype, block, width)
            if part is None:
                return None
            parts.append(part)
        for name in codec.param_names(factor.name, dtype):
            if factor.is_a:  # each module's block takes the segments in turn
                blocks = [p[name].reshape(*p[name].shape[:-1], factor.modules, w) for p, w in zip(parts, widths)]
                stacked = np.concatenate(blocks, axis=-1)
                joined[name] = np.ascontiguousarray(stacked.reshape(*stacked.shape[:-2], -1))
            else:
                joined[name] = np.concatenate([p[name] for p in parts], axis=-2)
    return joined, widths


def row_mask(segment_of_row: list[int | None], widths: list[int]) -> np.ndarray:
    """[rows, sum of the segments' widths]: ones over a row's own segment, zeros for a row without an adapter."""
    starts = np.cumsum([0, *widths])
    mask = np.zeros((len(segment_of_row), starts[-1]), np.float32)
    for row, segment in enumerate(segment_of_row):
        if segment is not None:
            mask[row, starts[segment]:starts[segment + 1]] = 1.0
    return mask


def _rank(params: dict[str, np.ndarray], factors: list[Factor], dtype: str) -> int:
    """The widest rank block of an adapter's blob (a group's ``a`` holds one per module)."""
    widths = [params[codec.param_names(f.name, dtype)[0]].shape[-1] // f.modules
              for f in factors if f.is_a and codec.param_names(f.name, dtype)[0] in params]
    return max(widths, default=1)


def _padded(params, factor: Factor, dtype: str, block: int, width: int) -> dict[str, np.ndarray] | None:
    """One segment of one factor at ``width``: the blob's parameters, zero components appended to each rank
    block, or all zeros where the adapter leaves the slot alone."""
    names = codec.param_names(factor.name, dtype)
    if names[0] not in params:
        return codec.encode(factor.name, np.zeros(factor.shape(width), np.float32), dtype, block)
    stored = params[names[0]]
    rank = stored.shape[-1] // factor.modules if factor.is_a else stored.shape[-2] * (2 if dtype == "int4" else 1)
    if rank == width:
        return {name: params[name] for name in names}
    if dtype == "int4" and not factor.is_a:
        return None
    pad = codec.encode(factor.name, np.zeros(factor.shape(width - rank), np.float32), dtype, block)
    out = {}
    for name in names:
        if factor.is_a:
            own = params[name].reshape(*params[name].shape[:-1], factor.modules, rank)
            extra = pad[name].reshape(*pad[name].shape[:-1], factor.modules, width - rank)
            both = np.concatenate([own, extra], axis=-1)
            out[name] = both.reshape(*both.shape[:-2], -1)
        else:
            out[name] = np.concatenate([params[name], pad[name]], axis=-2)
    return out

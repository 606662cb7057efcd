"""Adapter specs (``"legal"``, ``{"legal": 0.5}``, ``{"legal": 0.7, "medical": 0.3}``) and their exact composition.

A weighted sum of LoRA deltas is itself a LoRA delta of the summed rank: concatenating the ``a``
factors along the rank axis and the weighted ``b`` factors along it too gives
``x·[A1 A2]·[w1·B1; w2·B2] = w1·x·A1·B1 + w2·x·A2·B2`` exactly, so a composition runs through the
same graph slots as a single adapter, with no extra graph and no approximation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from edgelora.errors import EdgeLoraError
from edgelora.format.factors import AdapterFactors, ModuleFactors

Spec = tuple[tuple[str, float], ...]  # sorted (name, weight) pairs, no zero weights


def normalize(adapter) -> Spec:
    """One canonical key per distinct request, so equal requests share one cached composition."""
    if adapter is None:
        return ()
    if isinstance(adapter, str):
        return ((adapter, 1.0),)
    if not isinstance(adapter, Mapping):
        raise EdgeLoraError(f"adapter must be a name, a {{name: weight}} dict or None, got {type(adapter).__name__}")
    pairs = []
    for name, weight in adapter.items():
        if not isinstance(name, str):
            raise EdgeLoraError(f"adapter names must be strings, got {name!r}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise EdgeLoraError(f"adapter {name}: weight must be a finite number, got {weight!r}")
        if weight != 0:
            pairs.append((name, float(weight)))
    return tuple(sorted(pairs))


def label(spec: Spec) -> str:
    """The name a composition is listed under in ``stats()``: the CLI's own NAME:WEIGHT syntax."""
    if len(spec) == 1 and spec[0][1] == 1.0:
        return spec[0][0]
    return "+".join(f"{name}:{weight!r}" for name, weight in spec)


def compose(parts: list[tuple[AdapterFactors, float]]) -> AdapterFactors:
    """Concatenate along the rank axis per module; a module only one adapter targets keeps its factors alone."""
    by_module: dict[str, list[tuple[ModuleFactors, float]]] = {}
    for factors, weight in parts:
        for module, f in factors.modules.items():
            by_module.setdefault(module, []).append((f, weight))
    modules = {
        module: ModuleFactors(
            np.concatenate([f.a for f, _ in fs], axis=1).astype(np.float32),
            np.concatenate([np.float32(w) * f.b for f, w in fs], axis=0).astype(np.float32),
        )
        for module, fs in by_module.items()
    }
    rank = max(f.rank for f in modules.values())
    return AdapterFactors(modules=modules, rank=rank, alpha=float("nan"), source="composition")

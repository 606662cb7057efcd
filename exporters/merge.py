"""Merged mode: ``W' = W + delta`` in float, before any base quantization, checked like PEFT's safe_merge."""

from __future__ import annotations

import copy

from edgelora.errors import EdgeLoraError
from edgelora.factors import AdapterFactors


def merged_copy(model, factors: AdapterFactors, name: str):
    """A copy of ``model`` with the adapter folded into its weights (Linear weights are [out, in])."""
    import torch

    merged = copy.deepcopy(model)
    with torch.no_grad():
        for module, f in factors.modules.items():
            layer = merged.get_submodule(module)
            delta = torch.from_numpy(factors.delta(module).T).to(layer.weight.dtype)
            new_weight = layer.weight + delta
            if not torch.isfinite(new_weight).all():
                raise EdgeLoraError(f"adapter {name}: merging into {module} gives NaN or Inf weights; not merged")
            layer.weight.copy_(new_weight)
    return merged.eval()

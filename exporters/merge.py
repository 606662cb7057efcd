"""Merged mode: the adapter folded into the base weights in float, before any base quantization.

PEFT's own ``merge_and_unload`` does the folding, so every variant PEFT can merge (DoRA,
biases, modules_to_save, embeddings, GPT-2's transposed Conv1D) is merged exactly as PEFT
computes it, with its ``safe_merge`` check for NaN/Inf.
"""

from __future__ import annotations

import copy
import warnings

from edgelora.errors import EdgeLoraError
from edgelora.factors import AdapterFactors


def merged_copy(model, factors: AdapterFactors, name: str):
    """A copy of ``model`` with the PEFT adapter that ``factors`` were read from merged into it."""
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notes on fan_in_fan_out and tied weights
        peft_model = PeftModel.from_pretrained(copy.deepcopy(model), factors.source)
        try:
            return peft_model.merge_and_unload(safe_merge=True).eval()
        except ValueError as e:
            raise EdgeLoraError(f"adapter {name}: merging gives NaN or Inf weights; not merged ({e})") from None

"""Merged mode: the adapter folded into the base weights in float, before any base quantization.

PEFT's own ``merge_and_unload`` does the folding, so every variant PEFT can merge (DoRA,
biases, modules_to_save, embeddings, GPT-2's transposed Conv1D) is merged exactly as PEFT
computes it, with its ``safe_merge`` check for NaN/Inf.
"""

from __future__ import annotations

import copy
import warnings

from edgelora.errors import EdgeLoraError
from edgelora.format.factors import AdapterFactors


def with_adapter(model, factors: AdapterFactors):
    """PEFT's model for the adapter folder ``factors`` were read from, on a copy of ``model``: the fp32 reference."""
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notes on fan_in_fan_out and tied weights
        return PeftModel.from_pretrained(copy.deepcopy(model), factors.source).eval()


def merged_copy(model, factors: AdapterFactors, name: str):
    """A copy of ``model`` with the adapter merged into its weights."""
    check_untied_embedding(model, factors, name)
    try:
        return with_adapter(model, factors).merge_and_unload(safe_merge=True).eval()
    except ValueError as e:
        raise EdgeLoraError(f"adapter {name}: merging gives NaN or Inf weights; not merged ({e})") from None


def check_untied_embedding(model, factors: AdapterFactors, name: str) -> None:
    """Merging LoRA into an embedding that the output layer shares would change the output layer too,
    which PEFT's own forward does not: refuse rather than export a different model."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or embedding.weight is not head.weight:
        return
    module = next(n for n, m in model.named_modules() if m is embedding)
    if module in factors.modules:
        raise EdgeLoraError(
            f"adapter {name} ({factors.source}): LoRA on {module}, which the base ties to its output layer, "
            "cannot be merged without changing the output layer too; export it in separate mode"
        )

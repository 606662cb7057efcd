"""BERT-family encoder export: feature extraction (``last_hidden_state``, pooled by the runtime) and sequence
classification (``logits``), with the same LoRA slots as the causal export (``slots.py``).

No KV cache and no position inputs: the graph takes ``input_ids``, ``attention_mask`` and, for models
that have segment embeddings, ``token_type_ids``, all [batch, sequence].
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from torch import nn

from edgelora.errors import EdgeLoraError
from edgelora.format.manifest import Slot, SlotGroup

from .slots import OPSET, SlotHooks, example_factors, export_slotted
from .options import ExportOptions

_PREFIXES = {"bert": "Bert", "roberta": "Roberta", "distilbert": "DistilBert"}
_HEADS = {"Model": "feature-extraction", "ForSequenceClassification": "sequence-classification"}
# architecture -> (family, task)
ARCHITECTURES = {prefix + head: (family, task) for family, prefix in _PREFIXES.items() for head, task in _HEADS.items()}
OUTPUTS = {"feature-extraction": "last_hidden_state", "sequence-classification": "logits"}


class SlottedEncoder(SlotHooks):
    """The encoder with LoRA slots; its inputs come as one dict so models without token types fit too."""

    def __init__(self, model: nn.Module, slots: list[str], output: str):
        super().__init__(model, slots)
        self.output = output

    def forward(self, inputs: dict[str, torch.Tensor], lora):
        self.set_factors(lora)
        return getattr(self.model(**inputs), self.output)


def architecture_of(model: nn.Module) -> tuple[str, str]:
    """(family, task) of a loaded model."""
    arch = type(model).__name__
    if arch not in ARCHITECTURES:
        raise EdgeLoraError(f"model class {arch} is not supported yet; supported: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[arch]


def family_of(model: nn.Module) -> str:
    return architecture_of(model)[0]


def input_names(model: nn.Module) -> list[str]:
    takes_types = "token_type_ids" in inspect.signature(model.forward).parameters
    return ["input_ids", "attention_mask"] + (["token_type_ids"] if takes_types else [])


def max_length(config, family: str) -> int:
    """Longest sequence the position embeddings cover; RoBERTa's positions start after its padding index."""
    offset = config.pad_token_id + 1 if family == "roberta" else 0
    return config.max_position_embeddings - offset


def export_graph(model: nn.Module, slots: list[Slot], path: Path,
                 options: ExportOptions = ExportOptions()) -> tuple[dict, list[SlotGroup]]:
    """Export to ``path`` (+ ``path.data``); returns the graph section of the manifest and the slot groups
    (none: the encoder graph is not fused, so no products are packed)."""
    config = model.config
    family, task = architecture_of(model)
    output = OUTPUTS[task]
    inputs = input_names(model)
    limit = max_length(config, family)
    wrapped = SlottedEncoder(model.eval(), [s.name for s in slots], output).eval()

    batch, seq = 2, 5  # not 0 or 1, which torch.export would specialize into constants
    dims = {0: torch.export.Dim("batch", max=1024), 1: torch.export.Dim("sequence_length", max=limit)}
    gen = torch.Generator().manual_seed(0)
    example = {
        "input_ids": torch.randint(0, config.vocab_size, (batch, seq), generator=gen),
        "attention_mask": torch.ones(batch, seq, dtype=torch.int64),
        "token_type_ids": torch.zeros(batch, seq, dtype=torch.int64),
    }
    example = {name: example[name] for name in inputs}
    lora, lora_shapes, lora_names = example_factors(slots)
    _, groups = export_slotted(wrapped, (example, lora, {}), ({name: dims for name in inputs}, lora_shapes),
                               inputs, [output], lora_names, path, options)
    graph = {
        "file": path.name,
        "inputs": inputs,
        "outputs": [output],
        "num_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "max_length": limit,
        "opset": OPSET,
        "quantization": options.quantize,
        "quantization_block_size": options.block_size,
        "accuracy_level": options.accuracy_level,
    }
    if task == "sequence-classification":
        graph["id2label"] = {str(i): label for i, label in sorted(config.id2label.items())}
    return graph, groups

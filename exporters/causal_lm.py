"""Causal-LM graph export: transformers' own model code through ``torch.onnx.export(dynamo=True)``,
with one LoRA slot per target module as a pair of graph inputs and a KV cache in the
optimum / onnxruntime-genai naming convention.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from edgelora.errors import EdgeLoraError
from edgelora.format.manifest import Slot, SlotGroup

from . import repeat_layers
from .fusion import fuse_for_ort
from .last_logits import LOGITS_KEEP
from .options import ExportOptions
from .phases import note
from .row_mask import ROW_MASK
from .slots import OPSET, SlotHooks, example_factors, export_slotted

FAMILIES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Phi3ForCausalLM": "phi3",
    "GPT2LMHeadModel": "gpt2",
    "GemmaForCausalLM": "gemma",
    "Gemma2ForCausalLM": "gemma2",
}


class SlottedCausalLM(SlotHooks):
    """The causal LM with LoRA slots (``SlotHooks``), its KV cache taken and returned as flat tensors."""

    def __init__(self, model: nn.Module, slots: list[str]):
        super().__init__(model, slots)
        self.num_layers = model.config.num_hidden_layers

    def forward(self, input_ids, attention_mask, position_ids, past, lora):
        from transformers import DynamicCache

        self.set_factors(lora)
        # Full layers even for sliding-window models (Mistral, Gemma 2): a sliding layer would crop the
        # presents to the window, breaking "present = past + new"; the attention mask applies the window.
        cache = DynamicCache()
        for i in range(self.num_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        )
        presents = []
        for layer in out.past_key_values.layers:
            presents += [layer.keys, layer.values]
        return (out.logits, *presents)


def family_of(model: nn.Module) -> str:
    arch = type(model).__name__
    if arch not in FAMILIES:
        raise EdgeLoraError(
            f"model class {arch} is not supported yet; supported: {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[arch]


def cache_shape(config) -> tuple[int, int]:
    """(kv_heads, head_dim) as transformers' attention computes them."""
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return kv_heads, head_dim


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


def sliding_windows(config) -> list[int | None]:
    """Per layer, the sliding window of its attention or None: from ``layer_types`` where the config has
    them (Qwen2, Qwen3, Gemma 2), else the one ``sliding_window`` for every layer (Mistral, Phi-3)."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types is not None:
        return [window if kind == "sliding_attention" else None for kind in types]
    return [window] * config.num_hidden_layers


def export_graph(model: nn.Module, slots: list[Slot], path: Path,
                 options: ExportOptions = ExportOptions()) -> tuple[dict, list[SlotGroup]]:
    """Export to ``path`` (+ ``path.data``); returns the graph section of the manifest and the slot groups.

    A deep model is traced with a few of its layers and the rest repeated in ONNX (``repeat_layers``);
    when the traced layers do not prove the others alike, with every layer.
    """
    config = model.config
    layers = config.num_hidden_layers
    kv_heads, head_dim = cache_shape(config)
    windows = sliding_windows(config)  # the whole model's, read before any trace shrinks it
    export = dict(path=path, options=options, fuse=lambda proto: fuse_for_ort(proto, head_dim, windows))
    repeat = repeat_layers.plan(model, [s.name for s in slots])
    exported = None
    if repeat is not None:
        try:
            exported = _export(model, slots, repeat=repeat, **export)
        except repeat_layers.NotAlike as e:
            note(f"{e}: tracing every layer")
    fusions, groups = exported or _export(model, slots, **export)
    inputs, outputs = io_names(layers)
    return {
        "file": path.name,
        "inputs": inputs,
        "outputs": outputs,
        "num_layers": layers,
        "num_kv_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": config.vocab_size,
        "max_positions": config.max_position_embeddings,
        "row_mask": ROW_MASK if fusions.get("row_mask") else None,
        "logits_keep": LOGITS_KEEP if fusions.get("logits_keep") else None,
        "opset": OPSET,
        "quantization": options.quantize,
        "quantization_block_size": options.block_size,
        "accuracy_level": options.accuracy_level,
        "fusions": fusions,
    }, groups


def _export(model: nn.Module, slots: list[Slot], path: Path, options: ExportOptions, fuse,
            repeat: repeat_layers.Plan | None = None) -> tuple[dict, list[SlotGroup]]:
    """Trace the model (only ``repeat.traced`` layers, when given) and write the whole model's graph."""
    layers = model.config.num_hidden_layers
    inputs, outputs = io_names(layers)
    lora_names = [n for s in slots for n in (s.a, s.b)]
    if repeat is None:
        traced_slots, traced_layers, expand, traced_io = slots, layers, None, None
        labels = (f"tracing {layers} layers", "")
    else:
        traced_slots = [t for t in map(repeat.small_slot, slots) if t is not None]
        traced_layers = len(repeat.traced)
        weights = {**dict(model.named_parameters(remove_duplicate=False)),
                   **dict(model.named_buffers(remove_duplicate=False))}

        def expand(proto):
            return repeat_layers.expand(proto, repeat, inputs + lora_names, outputs, weights)

        small_in, small_out = io_names(traced_layers)
        traced_io = (small_in + [n for s in traced_slots for n in (s.a, s.b)], small_out)
        labels = (f"tracing {traced_layers} of {layers} layers", f"copying the other {layers - traced_layers}")
    with repeat_layers.shrunk(model, repeat) if repeat is not None else nullcontext():
        wrapped = SlottedCausalLM(model.eval(), [s.name for s in traced_slots]).eval()
        args, dynamic_shapes = _example_inputs(model.config, traced_layers, traced_slots)
        return export_slotted(wrapped, args, dynamic_shapes, inputs, outputs, lora_names, path, options, fuse=fuse,
                              expand=expand, traced_io=traced_io, labels=labels, row_mask=True, logits_keep=True)


def _example_inputs(config, layers: int, slots: list[Slot]) -> tuple[tuple, tuple]:
    """Example inputs of a model with ``layers`` layers and these slots, and their dynamic shapes."""
    kv_heads, head_dim = cache_shape(config)
    # Example sizes avoid 0 and 1, which torch.export would specialize into constants.
    batch, seq, past_len = 2, 3, 4
    dim_batch = torch.export.Dim("batch", max=1024)
    dim_seq = torch.export.Dim("sequence_length", max=65536)
    dim_past = torch.export.Dim("past_sequence_length", min=1, max=65536)
    dim_total = torch.export.Dim("total_sequence_length", max=131072)
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, config.vocab_size, (batch, seq), generator=gen)
    attention_mask = torch.ones(batch, past_len + seq, dtype=torch.int64)
    position_ids = torch.arange(past_len, past_len + seq).expand(batch, seq).contiguous()
    past = [torch.randn(batch, kv_heads, past_len, head_dim, generator=gen) for _ in range(2 * layers)]
    lora, lora_shapes, _ = example_factors(slots)
    dynamic_shapes = (
        {0: dim_batch, 1: dim_seq},
        {0: dim_batch, 1: dim_total},
        {0: dim_batch, 1: dim_seq},
        [{0: dim_batch, 2: dim_past}] * (2 * layers),
        lora_shapes,
    )
    return (input_ids, attention_mask, position_ids, past, lora, {}), dynamic_shapes

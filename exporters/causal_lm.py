"""Causal-LM graph export: transformers' own model code through ``torch.onnx.export(dynamo=True)``,
with one LoRA slot per target module as a pair of graph inputs and a KV cache in the
optimum / onnxruntime-genai naming convention.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from pathlib import Path

import onnx
import torch
from torch import nn

from edgelora import codec
from edgelora.adapter_file import slot_inputs
from edgelora.errors import EdgeLoraError
from edgelora.manifest import Slot

from .base_quant import quantize_base

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
OPSET = 21  # blocked DequantizeLinear for quantized slots needs ≥ 21


class SlottedCausalLM(nn.Module):
    """The base model with ``y += (x @ a) @ b`` after each slotted module, the factors taken as inputs
    (on an embedding, ``x @ a`` is a lookup: the rows of ``a`` for the token ids).

    Forward hooks (instead of replacing modules) keep the model's own module tree and code
    untouched, so what is exported is exactly what PEFT wraps.
    """

    def __init__(self, model: nn.Module, slots: list[str]):
        super().__init__()
        self.model = model
        self.slots = slots
        self.num_layers = model.config.num_hidden_layers
        self._factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._hooks = [model.get_submodule(name).register_forward_hook(self._delta_hook(name)) for name in slots]

    def release(self) -> None:
        """Take the hooks off, leaving the caller's model as it was."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def _delta_hook(self, name: str):
        def hook(module, args, output):
            a, b = self._factors[name]
            if isinstance(module, nn.Embedding):
                return output + torch.matmul(nn.functional.embedding(args[0], a), b) * embed_scale(module)
            return output + torch.matmul(torch.matmul(args[0], a), b)

        return hook

    def forward(self, input_ids, attention_mask, position_ids, past, lora):
        from transformers import DynamicCache

        self._factors = {name: (lora[2 * i], lora[2 * i + 1]) for i, name in enumerate(self.slots)}
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


def embed_scale(module: nn.Embedding):
    """Gemma's embeddings multiply their output by √hidden; PEFT scales the LoRA delta by it too."""
    return getattr(module, "embed_scale", 1.0)


@contextmanager
def quiet_exporter():
    """The exporter's warnings (unused axis names, torchvision ops) say nothing actionable to our users."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


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


def slot_shape(module: nn.Module, name: str) -> tuple[int, int]:
    """(in, out) of the delta a module takes: an embedding maps a token id (one of ``vocab``) to a row."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):  # GPT-2 stores its weight as [in, out]
        return tuple(module.weight.shape)
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    raise EdgeLoraError(
        f"module {name} is a {type(module).__name__}; only Linear, Conv1D and Embedding layers take LoRA slots"
    )


def slots_for(model: nn.Module, modules: list[str], dtype: str = "fp32") -> list[Slot]:
    """Slots for the given module paths of the model."""
    slots = []
    for name in sorted(set(modules)):
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise EdgeLoraError(f"the base model has no module {name} targeted by an adapter") from None
        in_features, out_features = slot_shape(module, name)
        a, b = slot_inputs(name)
        slots.append(Slot(name=name, a=a, b=b, in_features=in_features, out_features=out_features, dtype=dtype))
    return slots


def export_graph(model: nn.Module, slots: list[Slot], path: Path, adapter_dtype: str = "fp32",
                 block: int = 32, quantize: str = "none", accuracy_level: int | None = None) -> dict:
    """Export to ``path`` (+ ``path.data``); returns the graph section of the manifest.

    Slots are traced as float inputs, then rewritten to take ``adapter_dtype`` factors with the
    dequantization in the graph, so one trace serves every codec.
    """
    config = model.config
    layers = config.num_hidden_layers
    kv_heads, head_dim = cache_shape(config)
    wrapped = SlottedCausalLM(model.eval(), [s.name for s in slots]).eval()

    # Example sizes avoid 0 and 1, which torch.export would specialize into constants.
    batch, seq, past_len, rank = 2, 3, 4, 2
    dim_batch = torch.export.Dim("batch", max=1024)
    dim_seq = torch.export.Dim("sequence_length", max=65536)
    dim_past = torch.export.Dim("past_sequence_length", min=1, max=65536)
    dim_total = torch.export.Dim("total_sequence_length", max=131072)
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, config.vocab_size, (batch, seq), generator=gen)
    attention_mask = torch.ones(batch, past_len + seq, dtype=torch.int64)
    position_ids = torch.arange(past_len, past_len + seq).expand(batch, seq).contiguous()
    past = [torch.randn(batch, kv_heads, past_len, head_dim, generator=gen) for _ in range(2 * layers)]
    lora, lora_shapes, lora_names = [], [], []
    for i, s in enumerate(slots):
        dim_rank = torch.export.Dim(f"rank_{i}", max=65536)
        lora += [torch.zeros(s.in_features, rank), torch.zeros(rank, s.out_features)]
        lora_shapes += [{1: dim_rank}, {0: dim_rank}]
        lora_names += [s.a, s.b]
    dynamic_shapes = (
        {0: dim_batch, 1: dim_seq},
        {0: dim_batch, 1: dim_total},
        {0: dim_batch, 1: dim_seq},
        [{0: dim_batch, 2: dim_past}] * (2 * layers),
        lora_shapes,
    )
    inputs, outputs = io_names(layers)
    try:
        with torch.no_grad(), quiet_exporter():
            program = torch.onnx.export(
                wrapped,
                (input_ids, attention_mask, position_ids, past, lora, {}),
                dynamic_shapes=dynamic_shapes,
                input_names=inputs + lora_names,
                output_names=outputs,
                opset_version=OPSET,
                dynamo=True,
                verbose=False,
            )
    finally:
        wrapped.release()
    proto = program.model_proto
    _check_io(proto, inputs + lora_names, outputs)
    _rename_dynamic_dims(proto)
    codec.encode_slots(proto, lora_names, adapter_dtype, block)
    proto = quantize_base(proto, quantize, block, accuracy_level, set(lora_names))
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(
        proto,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=path.name + ".data",
        size_threshold=1024,
    )
    return {
        "file": path.name,
        "inputs": inputs,
        "outputs": outputs,
        "num_layers": layers,
        "num_kv_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": config.vocab_size,
        "opset": OPSET,
        "quantization": quantize,
        "quantization_block_size": block,
        "accuracy_level": accuracy_level,
    }


def _check_io(proto: onnx.ModelProto, inputs: list[str], outputs: list[str]) -> None:
    got_in = [i.name for i in proto.graph.input]
    got_out = [o.name for o in proto.graph.output]
    if got_in != inputs or got_out != outputs:
        raise EdgeLoraError(
            f"the exported graph's I/O differ from the contract: inputs {got_in[:4]}…, outputs {got_out[:3]}…"
        )


def _rename_dynamic_dims(proto: onnx.ModelProto) -> None:
    """Give the attention mask's length and each slot's rank readable names in every tool that shows them."""
    for value in proto.graph.input:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param.startswith("rank_"):
                dim.dim_param = "rank_" + value.name.rsplit(".", 1)[0]

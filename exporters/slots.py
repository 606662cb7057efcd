"""LoRA slots shared by every graph exporter: forward hooks that add ``(x @ a) @ b`` after each slotted
module, the factors traced as graph inputs with a symbolic rank, and the steps after the trace
(slot codec, base quantization, saving) that do not depend on the model's task.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from pathlib import Path

import onnx
import torch
from torch import nn

from edgelora.errors import EdgeLoraError
from edgelora.format.manifest import Slot, SlotGroup
from edgelora.format.slot_groups import factor_names

from .base_quant import quantize_base
from .packing import group_slots
from .phases import phase
from .last_logits import add_logits_keep
from .options import ExportOptions
from .row_mask import add_row_mask
from .slot_codec import encode_slots

OPSET = 21  # int4 slots unpack with BitwiseAnd, which needs ≥ 18
EXAMPLE_RANK = 2  # example sizes avoid 0 and 1, which torch.export would specialize into constants


class SlotHooks(nn.Module):
    """The base model with ``y += (x @ a) @ b`` after each slotted module, the factors taken as inputs
    (on an embedding, ``x @ a`` is a lookup: the rows of ``a`` for the token ids).

    Forward hooks (instead of replacing modules) keep the model's own module tree and code
    untouched, so what is exported is exactly what PEFT wraps. Subclasses define ``forward``
    for their task and call ``set_factors`` with the flat ``[a0, b0, a1, b1, ...]`` list first.
    """

    def __init__(self, model: nn.Module, slots: list[str]):
        super().__init__()
        self.model = model
        self.slots = slots
        self._factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._hooks = [model.get_submodule(name).register_forward_hook(self._delta_hook(name)) for name in slots]

    def set_factors(self, lora) -> None:
        self._factors = {name: (lora[2 * i], lora[2 * i + 1]) for i, name in enumerate(self.slots)}

    def release(self) -> None:
        """Take the hooks off, leaving the caller's model as it was."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def _delta_hook(self, name: str):
        def hook(module, args, output):
            a, b = self._factors[name]
            if isinstance(module, nn.Embedding):  # x @ a for a one-hot x: the rows of a for the token ids
                return output + torch.matmul(nn.functional.embedding(args[0], a), b) * embed_scale(module)
            return output + torch.matmul(torch.matmul(args[0], a), b)

        return hook


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
        a, b = factor_names(name)
        slots.append(Slot(name=name, a=a, b=b, in_features=in_features, out_features=out_features, dtype=dtype))
    return slots


def example_factors(slots: list[Slot]) -> tuple[list[torch.Tensor], list[dict], list[str]]:
    """Zero factors of an example rank, their dynamic shapes (one symbolic rank per slot) and input names."""
    lora, shapes, names = [], [], []
    for i, s in enumerate(slots):
        dim_rank = torch.export.Dim(f"rank_{i}", max=65536)
        lora += [torch.zeros(s.in_features, EXAMPLE_RANK), torch.zeros(EXAMPLE_RANK, s.out_features)]
        shapes += [{1: dim_rank}, {0: dim_rank}]
        names += [s.a, s.b]
    return lora, shapes, names


@contextmanager
def conv1d_as_matmul():
    """Trace GPT-2's Conv1D as ``x @ W + b`` on the 3-D input, as a Linear traces, instead of its
    ``view -> addmm -> view``.

    On an unslotted Conv1D after the attention, onnxscript's attention fusion swallowed the 2-D
    reshape and fed its 3-D output to the Gemm, a graph onnxruntime refuses to load; and
    MatMulNBits quantizes MatMul weights, not Gemm's.
    """
    from transformers.pytorch_utils import Conv1D

    forward = Conv1D.forward
    Conv1D.forward = lambda self, x: torch.matmul(x, self.weight) + self.bias
    try:
        yield
    finally:
        Conv1D.forward = forward


def export_slotted(wrapped: SlotHooks, args: tuple, dynamic_shapes: tuple, inputs: list[str], outputs: list[str],
                   lora_names: list[str], path: Path, options: ExportOptions, fuse=None, expand=None, traced_io=None,
                   labels: tuple[str, str] = ("tracing", ""),
                   row_mask: bool = False, logits_keep: bool = False) -> tuple[dict[str, int], list[SlotGroup]]:
    """Trace ``wrapped`` to ``path`` (+ ``path.data``) and release its hooks; returns ``fuse``'s counts and the
    slot groups.

    ``fuse`` (proto -> (proto, counts)) rewrites the traced graph into onnxruntime's fused ops; it runs
    the exporter's optimizer itself, so the trace skips it. The slots of modules whose products it packed
    become slot groups. Slots are traced as float inputs, then
    rewritten to take ``adapter_dtype`` factors with the dequantization in the graph, so one trace
    serves every codec. ``expand`` (proto -> proto) turns a graph traced from part of the model, with
    the I/O names ``traced_io`` (inputs, outputs), into the whole model's graph before the fusion.
    ``labels`` name the trace and the expansion on the progress line (``phases``). ``row_mask`` adds the
    per-row adapter mask that lets one call carry rows with different adapters (``row_mask.add_row_mask``);
    ``logits_keep`` the input that limits the LM head to a pass's last positions (``last_logits``).
    """
    traced_in, traced_out = traced_io or (inputs + lora_names, outputs)
    try:
        with torch.no_grad(), quiet_exporter(), conv1d_as_matmul(), phase(labels[0]):
            program = torch.onnx.export(
                wrapped,
                args,
                dynamic_shapes=dynamic_shapes,
                input_names=traced_in,
                output_names=traced_out,
                opset_version=OPSET,
                dynamo=True,
                optimize=fuse is None,
                verbose=False,
            )
    finally:
        wrapped.release()
    proto = program.model_proto
    _check_io(proto, traced_in, traced_out)
    if expand is not None:
        with phase(labels[1]):
            proto = expand(proto)
        _check_io(proto, inputs + lora_names, outputs)
    fusions, groups = {}, []
    if fuse is not None:
        with quiet_exporter(), phase("fusing"):  # onnx_ir logs each pass at INFO, with stack traces
            proto, fusions = fuse(proto)
            # a group's b has a tile axis, which int4's unpacking by blocks of a 2-D factor does not take: int4
            # slots stay per module (int4 adapters trade decode speed for size anyway)
            groups = group_slots(proto) if options.adapter_dtype != "int4" else []
        grouped = {name for group in groups for module in group.modules for name in factor_names(module)}
        if groups:
            fusions["slot_groups"] = len(groups)
        lora_names = [n for n in lora_names if n not in grouped] + [n for g in groups for n in (g.a, g.b)]
    _rename_dynamic_dims(proto)
    with phase(f"{options.adapter_dtype} slots"):
        encode_slots(proto, lora_names, options.adapter_dtype, options.block_size)
        if row_mask:
            fusions["row_mask"] = add_row_mask(proto, lora_names, {g.b for g in groups})
    if logits_keep:
        fusions["logits_keep"] = int(add_logits_keep(proto))
    if options.quantize != "none":
        with phase(f"quantizing the base {options.quantize}"):
            proto = quantize_base(proto, options, set(lora_names))
    path.parent.mkdir(parents=True, exist_ok=True)
    with phase("saving"):
        onnx.save_model(
            proto,
            str(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=path.name + ".data",
            size_threshold=1024,
        )
    return fusions, groups


def _check_io(proto: onnx.ModelProto, inputs: list[str], outputs: list[str]) -> None:
    got_in = [i.name for i in proto.graph.input]
    got_out = [o.name for o in proto.graph.output]
    if got_in != inputs or got_out != outputs:
        raise EdgeLoraError(
            f"the exported graph's I/O differ from the contract: inputs {got_in[:4]}…, outputs {got_out[:3]}…"
        )


def _rename_dynamic_dims(proto: onnx.ModelProto) -> None:
    """Give each slot's rank a readable name in every tool that shows it."""
    for value in proto.graph.input:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param.startswith("rank_"):
                dim.dim_param = "rank_" + value.name.rsplit(".", 1)[0]

"""Graph fusion for onnxruntime: RMSNorm, skip-RMSNorm, rotary embedding and attention become contrib ops.

Decode time on a CPU is dominated by how many nodes run per token, not by their arithmetic, so the
dynamo graph (about 70 nodes per decoder layer) is handed to onnxscript's own ORT fusions before the
LoRA slots get their codec's dequantization nodes. The slots are plain graph inputs at that point
(no default initializers yet), so no fusion can fold an adapter into a constant.

One pattern onnxscript lacks is added: transformers 5 computes the rotary angles as a broadcast
``Mul`` where onnxscript's cos/sin-cache fusion expects transformers 4's ``MatMul``. With the rotary
fused, onnxscript's own GroupQueryAttention fusion takes the whole attention with its KV cache (about
13 nodes per layer instead of 70, as in onnxruntime-genai's graphs). GroupQueryAttention is causal
over the positions, so such a graph assumes attention masks of ones, as onnxruntime-genai does; and
onnxruntime's CPU kernel needs a head size that is a multiple of 16, so other models keep
MultiHeadAttention (the rotary rewrite is skipped for them, which keeps GroupQueryAttention out).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from edgelora.errors import EdgeLoraError

from .packing import pack_qkv, pack_shared_inputs

GQA_HEAD_MULTIPLE = 16  # onnxruntime's CPU GroupQueryAttention refuses other head sizes at run time


def fuse_for_ort(proto: onnx.ModelProto, head_dim: int,
                 windows: list[int | None]) -> tuple[onnx.ModelProto, dict[str, int]]:
    """The graph with onnxscript's ORT fusions and ours applied, and how many of each fusion it found.

    ``windows`` gives each layer's sliding attention window, or None where it attends to everything.
    """
    import onnx_ir as ir
    from onnxscript.rewriter import rewrite
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    names = ([i.name for i in proto.graph.input], [o.name for o in proto.graph.output])
    logging.getLogger("onnxscript").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="edgelora-fusion-", ignore_cleanup_errors=True) as spill:
        model = _weights_on_disk(proto, Path(spill))
        if head_dim % GQA_HEAD_MULTIPLE == 0:
            rewrite(model, _rotary_angles_as_matmul())
        model, counts = optimize_for_ort(model)
        fused = ir.to_proto(model)
        del model  # its memory maps of the spilled weights
        onnx.load_external_data_for_model(fused, spill)
    counts["untied_lm_head"] = untie_lm_head(fused)
    counts["packed_qkv"] = pack_qkv(fused)
    counts["packed_matmuls"] = pack_shared_inputs(fused)
    counts["sliding_window_attention"] = set_attention_windows(fused, windows)
    got = ([i.name for i in fused.graph.input], [o.name for o in fused.graph.output])
    if got != names:
        raise EdgeLoraError("graph fusion changed the graph's inputs or outputs; export with fusion off")
    return fused, {k: v for k, v in counts.items() if v}


def _weights_on_disk(proto: onnx.ModelProto, spill: Path):
    """The graph as onnx_ir's model, its weights moved out of ``proto`` into a file under ``spill`` and mapped
    from there.

    onnxscript's passes take copies of the weights they look at, so a graph whose weights sit in memory grew
    to several times the model's size during fusion (a 1B model did not fit in 24 GiB). Mapped from a file,
    what the passes read is the page cache's, which the system can take back.
    """
    import onnx_ir as ir

    path = spill / "traced.onnx"
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="traced.onnx.data", size_threshold=1024)
    return ir.load(path)


def _rotary_angles_as_matmul():
    """``Mul(Cast(Unsqueeze(position_ids, [2])), inv_freq)`` -> transformers 4's ``MatMul`` + ``Transpose`` form.

    Both give the angles [batch, seq, dim/2]; only the second is what onnxscript's cos/sin-cache
    fusion recognises, and without it the rotary embedding stays about 14 nodes per layer.
    """
    import onnx_ir as ir
    from onnxscript.rewriter import pattern

    def angles(op, position_ids, axes, inv_freq):
        return op.Mul(op.Cast(op.Unsqueeze(position_ids, axes), to=ir.DataType.FLOAT), inv_freq)

    def check(context, position_ids, axes, inv_freq, **_):
        axes_value = axes.const_value
        rank = position_ids.shape.rank() if position_ids.shape is not None else None
        return (inv_freq.const_value is not None and len(inv_freq.const_value.shape) == 1 and rank == 2
                and axes_value is not None and axes_value.numpy().reshape(-1).tolist() in ([2], [-1]))

    def as_matmul(op, position_ids, axes, inv_freq):
        column = op.Reshape(inv_freq, op.Constant(value_ints=[1, -1, 1]))
        row = op.Cast(op.Unsqueeze(position_ids, op.Constant(value_ints=[1])), to=ir.DataType.FLOAT)
        return op.Transpose(op.MatMul(column, row), perm=[0, 2, 1])

    return pattern.RewriteRuleSet([pattern.RewriteRule(angles, as_matmul, check)], commute=True)


def set_attention_windows(proto: onnx.ModelProto, windows: list[int | None]) -> int:
    """Give each GroupQueryAttention its layer's sliding window; returns how many got one.

    The fused attention ignores the graph's mask (it takes masks of ones), so the window the mask
    carried in the unfused graph must become ``local_window_size``, or a Mistral-like model attends to
    the whole cache once the context passes the window (0.5 off in the logits on a test model).
    onnxruntime's window counts the token itself, as transformers' ``sliding_window`` does.
    """
    windowed = 0
    for node in proto.graph.node:
        if node.op_type != "GroupQueryAttention":
            continue
        layer = next(int(o.split(".")[1]) for o in node.output if o.startswith("present."))
        if windows[layer] is not None:
            node.attribute.append(onnx.helper.make_attribute("local_window_size", windows[layer]))
            windowed += 1
    return windowed


def untie_lm_head(proto: onnx.ModelProto) -> int:
    """Point a ``FusedMatMul(h, E, transB=1)`` LM head at a plain ``MatMul`` on a transposed copy of ``E``.

    With tied embeddings the fused graph multiplies by the embedding table transposed on the fly,
    which MatMulNBits quantization does not take; a [hidden, vocab] copy lets the LM head (the
    largest single matrix of a small model) be quantized like every other projection, while the
    embedding gather keeps its own table. In fp32 the copy costs the table's bytes once more and
    decodes faster, since onnxruntime prepacks a plain MatMul's weight; onnxruntime-genai's graphs do
    the same. Returns how many heads were rewritten.
    """
    inits = {t.name: t for t in proto.graph.initializer}
    rewritten = 0
    for i, node in enumerate(proto.graph.node):
        if node.op_type != "FusedMatMul" or node.domain != "com.microsoft" or node.input[1] not in inits:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("transB") != 1 or attrs.get("transA", 0) != 0 or attrs.get("alpha", 1.0) != 1.0:
            continue
        if attrs.get("transBatchA", 0) or attrs.get("transBatchB", 0):
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])
        if weight.ndim != 2:
            continue
        copy_name = node.input[1] + ".T"
        proto.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight.T), copy_name))
        plain = onnx.helper.make_node("MatMul", [node.input[0], copy_name], list(node.output), name=node.name)
        proto.graph.node.remove(node)
        proto.graph.node.insert(i, plain)
        rewritten += 1
    return rewritten

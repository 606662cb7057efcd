"""Base weight quantization with onnxruntime's own tool (MatMulNBits), never touching LoRA slots."""

from __future__ import annotations

import logging

import numpy as np
import onnx

from edgelora.errors import EdgeLoraError

from .fusion import untie_lm_head
from .options import ExportOptions

BITS = {"none": None, "int8": 8, "int4": 4}


def quantize_base(proto: onnx.ModelProto, options: ExportOptions, slot_tensors: set[str]) -> onnx.ModelProto:
    """MatMulNBits for every MatMul with a constant weight, the LM head included, as ``options.quantize``,
    ``block_size`` and ``accuracy_level`` say; at int4 with ``quantize_embedding``, the token embedding table
    too (``token_embedding``).

    Slot MatMuls are excluded by name: with fp32 slots their factors are initializers too (the
    zero defaults), and the quantizer would otherwise freeze them into 4-bit constants.
    """
    if options.quantize not in BITS:
        raise EdgeLoraError(f"--quantize {options.quantize!r}: use one of {', '.join(BITS)}")
    bits = BITS[options.quantize]
    if bits is None:
        return proto
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    untie_lm_head(proto)
    exclude = [n.name for n in proto.graph.node if n.op_type == "MatMul" and slot_tensors & set(n.input)]
    table = token_embedding(proto) if bits == 4 and options.quantize_embedding else None
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    quantizer = MatMulNBitsQuantizer(proto, bits=bits, block_size=options.block_size, is_symmetric=True,
                                     accuracy_level=options.accuracy_level, nodes_to_exclude=exclude,
                                     nodes_to_include=None if table is None else [table.name])
    with np.errstate(divide="ignore", invalid="ignore"):  # it divides all-zero blocks by 0, then drops that
        quantizer.process()
    return quantizer.model.model


def token_embedding(proto: onnx.ModelProto) -> onnx.NodeProto | None:
    """The ``Gather`` that looks the token ids up in a constant table, which int4 quantizes too (as
    ``GatherBlockQuantized``, by blocks along the hidden axis).

    With tied embeddings the LM head is already int4 and the table is its fp32 twin, the largest tensor of the
    package: left in fp32 it makes the package about twice the size of its int4 weights, and a row that is not in
    the page cache is a disk read in the middle of a decode step. Where the table is a large part of a small
    model the rounding costs quality, so ``quantize_embedding=False`` (``--fp32-embedding``) keeps it. int8 keeps it
    always: ``GatherBlockQuantized`` takes 4 bits only.
    """
    constants = {t.name for t in proto.graph.initializer} - {i.name for i in proto.graph.input}  # not slot defaults
    for node in proto.graph.node:
        if node.op_type == "Gather" and node.input[0] in constants and node.input[1] == "input_ids":
            node.name = node.name or "token_embedding"
            return node
    return None

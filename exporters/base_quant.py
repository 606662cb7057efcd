"""Base weight quantization with onnxruntime's own tool (MatMulNBits), never touching LoRA slots."""

from __future__ import annotations

import logging

import onnx

from edgelora.errors import EdgeLoraError

from .fusion import untie_lm_head

BITS = {"none": None, "int8": 8, "int4": 4}


def quantize_base(proto: onnx.ModelProto, quantize: str, block_size: int, accuracy_level: int | None,
                  slot_tensors: set[str]) -> onnx.ModelProto:
    """MatMulNBits for every MatMul with a constant weight, the LM head included.

    Slot MatMuls are excluded by name: with fp32 slots their factors are initializers too (the
    zero defaults), and the quantizer would otherwise freeze them into 4-bit constants.
    """
    if quantize not in BITS:
        raise EdgeLoraError(f"--quantize {quantize!r}: use one of {', '.join(BITS)}")
    if BITS[quantize] is None:
        return proto
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    untie_lm_head(proto)
    exclude = [n.name for n in proto.graph.node if n.op_type == "MatMul" and slot_tensors & set(n.input)]
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    quantizer = MatMulNBitsQuantizer(proto, bits=BITS[quantize], block_size=block_size, is_symmetric=True,
                                     accuracy_level=accuracy_level, nodes_to_exclude=exclude)
    quantizer.process()
    return quantizer.model.model

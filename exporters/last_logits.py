"""How many positions a pass computes logits for: a prefill needs only its last one.

The LM head is the largest single product of a small model (576 x 49152 at 135M, 896 x 151936 at 0.5B), and a
prefill of n tokens ran it n times, to keep one row of the [n, vocab] result. The graph slices the LM head's input
to its last ``logits_keep`` positions first. Its default is larger than any sequence, so a plain onnxruntime run
(and ``EdgeModel.logits``) still gets every position; the runtime feeds 1 for a prefill.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

LOGITS_KEEP = "logits_keep"  # int64 [1] graph input
HEADS = {"MatMul", "MatMulNBits", "FusedMatMul", "Gemm"}
ELEMENTWISE = {"Mul", "Div", "Add", "Tanh", "Cast"}  # between the head and the output (Gemma 2's soft-capping)
ALL_POSITIONS = 2**62


def lm_head(proto: onnx.ModelProto, output: str = "logits") -> onnx.NodeProto | None:
    """The product that makes ``output``, found through the elementwise ops after it; None if there is none."""
    producers = {out: node for node in proto.graph.node for out in node.output}
    node = producers.get(output)
    while node is not None and node.op_type in ELEMENTWISE:
        node = producers.get(node.input[0])
    return node if node is not None and node.op_type in HEADS else None


def add_logits_keep(proto: onnx.ModelProto) -> bool:
    """Slice the LM head's input [batch, seq, hidden] to its last ``logits_keep`` positions; in place, returns
    whether the graph had an LM head to slice."""
    head = lm_head(proto)
    if head is None:
        return False
    graph = proto.graph
    hidden = head.input[0]
    kept = hidden + ".last_positions"
    nodes = [helper.make_node("Neg", [LOGITS_KEEP], [LOGITS_KEEP + ".start"], name=LOGITS_KEEP + ".neg"),
             helper.make_node("Slice", [hidden, LOGITS_KEEP + ".start", LOGITS_KEEP + ".end", LOGITS_KEEP + ".axis"],
                              [kept], name=LOGITS_KEEP + ".slice")]
    head.input[0] = kept
    index = list(graph.node).index(head)
    for offset, node in enumerate(nodes):
        graph.node.insert(index + offset, node)
    graph.input.append(helper.make_tensor_value_info(LOGITS_KEEP, TensorProto.INT64, [1]))
    graph.initializer.extend([numpy_helper.from_array(np.array([ALL_POSITIONS], np.int64), LOGITS_KEEP),
                              numpy_helper.from_array(np.array([ALL_POSITIONS], np.int64), LOGITS_KEEP + ".end"),
                              numpy_helper.from_array(np.array([1], np.int64), LOGITS_KEEP + ".axis")])
    return True

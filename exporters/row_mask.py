"""The per-row adapter mask: how one decode step carries rows that each run a different adapter.

Every slot computes ``(x @ a) @ b``. When the batching engine runs rows with different adapters in one
call, it binds the concatenation of their factors along the rank axis (each adapter one equal-width
segment, ``runtime.row_adapters``) and a mask ``[rows, rank]`` that is 1 where a rank component belongs
to the row's adapter and 0 elsewhere: ``((x @ a) * mask) @ b`` then gives each row its own adapter's
delta, and a row without an adapter a zero mask. The mask multiplies the small ``x @ a`` product, so its
cost is one ``Mul`` per slot, whatever the batch.

Its default is a single 1 that broadcasts over every row and rank component: a package run as before,
in plain onnxruntime with one ``.onnx_adapter`` in ``RunOptions``, computes exactly what it did.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROW_MASK = "lora_rows"  # [batch, rank] float graph input


def add_row_mask(proto: onnx.ModelProto, factor_inputs: list[str], grouped: set[str]) -> int:
    """Insert the mask before each product with a slot's ``b`` (``factor_inputs`` names the float factors,
    ``grouped`` those of slot groups, whose product runs on [batch, seq, tiles, 1, rank] blocks); in place,
    returns how many products it masks."""
    graph = proto.graph
    b_factors = {name for name in factor_inputs if name.endswith(".lora_B")}
    views = {3: ROW_MASK + ".rows3", 5: ROW_MASK + ".rows5"}  # [batch, 1, rank] and [batch, 1, 1, 1, rank]
    nodes, masked = [], 0
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in b_factors:
            product = node.input[0]
            view = views[5 if node.input[1] in grouped else 3]
            nodes.append(helper.make_node("Mul", [product, view], [product + ".row_masked"],
                                          name=node.input[1] + ".row_mask"))
            node.input[0] = product + ".row_masked"
            masked += 1
        nodes.append(node)
    if not masked:
        return 0
    const = numpy_helper.from_array
    head = [helper.make_node("Unsqueeze", [ROW_MASK, ROW_MASK + ".axes3"], [views[3]]),
            helper.make_node("Unsqueeze", [ROW_MASK, ROW_MASK + ".axes5"], [views[5]])]
    del graph.node[:]
    graph.node.extend(head + nodes)
    graph.input.append(helper.make_tensor_value_info(ROW_MASK, TensorProto.FLOAT, ["mask_rows", "mask_rank"]))
    graph.initializer.extend([const(np.ones((1, 1), np.float32), ROW_MASK),
                              const(np.array([1], np.int64), ROW_MASK + ".axes3"),
                              const(np.array([1, 2, 3], np.int64), ROW_MASK + ".axes5")])
    return masked

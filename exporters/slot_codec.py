"""The ONNX side of the slot codecs: the nodes that turn a slot's stored factor back into float inside the graph.

The numpy side (``edgelora.format.codec``) encodes the blobs and decodes them for checks; this module
writes the graph nodes that do the same decoding at run time, so it lives with the exporter: only an
export writes graphs, and the device never needs onnx's graph helpers.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgelora.errors import EdgeLoraError
from edgelora.format.codec import encode, int4_block, param_names

from .initializers import replace_initializers


def _dims(value: onnx.ValueInfoProto) -> list:
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value.type.tensor_type.shape.dim]


def _derived(dim, label: str, value):
    """A dimension derived from another (halved, or counted in blocks): a number when ``dim`` is one."""
    return f"{dim}_{label}" if isinstance(dim, str) else value(dim)


CONSTANTS = {
    "edgelora.u8_15": np.array(15, np.uint8),
    "edgelora.u8_4": np.array(4, np.uint8),
    "edgelora.f_8": np.array(8.0, np.float32),
    "edgelora.i64_1": np.array([1], np.int64),
    "edgelora.i64_minus1": np.array([-1], np.int64),
}


def dequant_nodes(value: onnx.ValueInfoProto, dtype: str, block: int):
    """(new graph inputs, nodes, default initializers, int8 products) that compute the float factor ``value.name``.

    An int8 ``a`` (an ``Int8Factor``) adds no nodes: each product with it is rewritten to take the stored
    factor and its scales (``_int8_products``). The defaults are empty factors (rank 0), so a run
    without an adapter remains the base model at the least cost: onnxruntime skips empty products, while
    rank-1 zeros would run real kernels at every step (docs/benchmarks.md). int4 keeps all-zero rank 2, the
    smallest pair it packs, since its unpacking reshapes by a block count an empty factor does not have.
    """
    tensor = value.name
    *tiles, k_dim, n_dim = _dims(value)  # a slot group's b has a leading tile axis (fp32, fp16, int8 only)
    names = param_names(tensor, dtype)
    k_default = k_dim if isinstance(k_dim, int) else (2 if dtype == "int4" else 0)
    n_default = n_dim if isinstance(n_dim, int) else (2 if dtype == "int4" else 0)
    zero = np.zeros((*tiles, k_default, n_default), np.float32)
    defaults = [numpy_helper.from_array(v, k) for k, v in encode(tensor, zero, dtype, block).items()]
    if dtype == "fp32":
        return [value], [], defaults, None
    if len(names) == 1:  # fp16, or an int8 b of plain integers: cast up
        stored = TensorProto.FLOAT16 if dtype == "fp16" else TensorProto.INT8
        inputs = [helper.make_tensor_value_info(names[0], stored, [*tiles, k_dim, n_dim])]
        return inputs, [helper.make_node("Cast", [names[0]], [tensor], to=TensorProto.FLOAT)], defaults, None
    if dtype == "int8":
        inputs = [helper.make_tensor_value_info(names[0], TensorProto.INT8, [k_dim, n_dim]),
                  helper.make_tensor_value_info(names[1], TensorProto.FLOAT, [n_dim])]
        return inputs, [], defaults, Int8Factor(names[0], names[1])
    scale_f = tensor + ".scale_f"
    p = tensor + ".int4_"
    inputs = [
        helper.make_tensor_value_info(names[0], TensorProto.UINT8, [_derived(k_dim, "half", lambda k: k // 2), n_dim]),
        helper.make_tensor_value_info(
            names[1], TensorProto.FLOAT16, [_derived(k_dim, "blocks", lambda k: k // int4_block(k, block)), n_dim]
        ),
    ]
    node = helper.make_node
    shape3, shape2, shape_nodes, shape_inits = _int4_shapes(p, k_dim, n_dim, block, scale_f)
    nodes = [
        node("BitwiseAnd", [names[0], "edgelora.u8_15"], [p + "lo"]),
        node("BitShift", [names[0], "edgelora.u8_4"], [p + "hi"], direction="RIGHT"),
        # [K/2, 2N]: row r holds rows 2r (low nibbles) and 2r+1 (high) of [K, N], so a reshape interleaves them
        node("Concat", [p + "lo", p + "hi"], [p + "rows"], axis=1),
        node("Cast", [p + "rows"], [p + "rows_f"], to=TensorProto.FLOAT),
        node("Sub", [p + "rows_f", "edgelora.f_8"], [p + "centered"]),
        node("Cast", [names[1]], [scale_f], to=TensorProto.FLOAT),
        *shape_nodes,
        node("Reshape", [p + "centered", shape3], [p + "blocks"]),  # [K/bs, bs, N]
        node("Unsqueeze", [scale_f, "edgelora.i64_1"], [p + "scale3"]),
        node("Mul", [p + "blocks", p + "scale3"], [p + "scaled"]),
        node("Reshape", [p + "scaled", shape2], [tensor]),
    ]
    return inputs, nodes, defaults + shape_inits, None


def _int4_shapes(p: str, k_dim, n_dim, block: int, scale_f: str):
    """(blocks shape [K/bs, bs, N], factor shape [K, N], nodes, initializers): constants where K is known
    (a slot's ``in``), else read off the scales' [K/bs, N]; every node less counts at each decode step."""
    const = numpy_helper.from_array
    if isinstance(k_dim, int):
        bs = int4_block(k_dim, block)
        inits = [const(np.array([k_dim // bs, bs, -1], np.int64), p + "shape3"),
                 const(np.array([k_dim, -1], np.int64), p + "shape2")]
        return p + "shape3", p + "shape2", [], inits
    nodes = [helper.make_node("Shape", [scale_f], [p + "nblocks"], start=0, end=1)]
    if isinstance(n_dim, int):
        inits = [const(np.array([-1, n_dim], np.int64), p + "shape2")]
        nodes.append(helper.make_node("Concat", [p + "nblocks", p + "shape2"], [p + "shape3"], axis=0))
        return p + "shape3", p + "shape2", nodes, inits
    nodes += [
        helper.make_node("Shape", [scale_f], [p + "n"], start=1, end=2),
        helper.make_node("Concat", [p + "nblocks", "edgelora.i64_minus1", p + "n"], [p + "shape3"], axis=0),
        helper.make_node("Concat", ["edgelora.i64_minus1", p + "n"], [p + "shape2"], axis=0),
    ]
    return p + "shape3", p + "shape2", nodes, []


def encode_slots(proto: onnx.ModelProto, factor_inputs: list[str], dtype: str, block: int) -> None:
    """Turn float slot inputs into stored-codec inputs with in-graph dequantization, in place."""
    graph = proto.graph
    wanted = set(factor_inputs)
    kept_inputs = [v for v in graph.input if v.name not in wanted]
    replaced = [v for v in graph.input if v.name in wanted]
    new_inputs, new_nodes, new_inits, int8_factors = [], [], [], {}
    for value in replaced:
        inputs, nodes, defaults, int8 = dequant_nodes(value, dtype, block)
        new_inputs += inputs
        new_nodes += nodes
        new_inits += defaults
        if int8 is not None:
            int8_factors[value.name] = int8
    if dtype == "int4":
        new_inits += [numpy_helper.from_array(v, k) for k, v in CONSTANTS.items()]
    del graph.input[:]
    graph.input.extend(kept_inputs + new_inputs)
    replace_initializers(graph, wanted, new_inits)
    old_nodes = _int8_products(list(graph.node), int8_factors)
    del graph.node[:]
    graph.node.extend(new_nodes + old_nodes)
    if int8_factors and not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))


class Int8Factor(NamedTuple):
    stored: str  # the int8 graph input
    scale: str  # its fp32 column scales


def _int8_products(nodes: list, factors: dict[str, Int8Factor]) -> list:
    """The nodes, with each product of an int8 ``a`` computed from the stored factor and its column scales:
    a ``MatMul`` becomes a ``DynamicQuantizeMatMul``; a ``Gather`` (embedding slot) gathers int8 rows, widens
    them and scales them."""
    out = []
    for node in nodes:
        used = [(i, name) for i, name in enumerate(node.input) if name in factors]
        if not used:
            out.append(node)
            continue
        index, name = used[0] if len(used) == 1 else (None, used[0][1])  # no rewrite fits two factors
        factor, product = factors[name], node.output[0]
        if (node.op_type, index) == ("MatMul", 1):
            out.append(helper.make_node("DynamicQuantizeMatMul", [node.input[0], factor.stored, factor.scale],
                                        [product], name=node.name, domain="com.microsoft"))
        elif (node.op_type, index) == ("Gather", 0):
            node.input[0] = factor.stored
            node.output[0] = product + ".int8"
            out += [node, helper.make_node("Cast", [node.output[0]], [product + ".unscaled"], to=TensorProto.FLOAT),
                    helper.make_node("Mul", [product + ".unscaled", factor.scale], [product])]
        else:
            raise EdgeLoraError(f"slot factor {name} feeds a {node.op_type} node ({node.name}); "
                                "int8 slots need it to feed a MatMul or Gather")
    return out

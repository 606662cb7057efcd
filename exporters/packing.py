"""Pack projections of the same input into one MatMul: q/k/v of each fused attention, and the rest (gate/up).

A decode step on a CPU pays per node more than per multiply (see fusion.py), and a few narrow
products of the same input keep onnxruntime's thread pool busier than one wide one: packing a Llama
MLP's gate and up projections (a Split after the one MatMul, so no node less) made int4 decode of
the 135M model 6% faster.
onnxruntime's GroupQueryAttention takes the packed ``[q | k | v]`` as its query when key and value
are left out, as in onnxruntime-genai's graphs. The packing runs on the float graph, before base
quantization, so MatMulNBits quantizes the packed weight like any other.

LoRA slots stay per module, so adapters keep PEFT's layout: when all three projections carry a slot,
their deltas are concatenated and added to the packed product once; when only some do (PEFT's
default targets q and v only), the packed product is split and each slotted part gets its own delta.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper


@dataclass
class Projection:
    """``x @ weight (+ bias) (+ delta)`` as the graph computes one of q, k, v, and the nodes doing it."""

    x: str
    weight: np.ndarray
    bias: np.ndarray | None
    delta: str | None
    nodes: list


def pack_qkv(proto: onnx.ModelProto) -> int:
    """Rewrite, in place, every GroupQueryAttention fed by three projections of one input; returns how many."""
    graph = proto.graph
    producer = {out: node for node in graph.node for out in node.output}
    uses = Counter(name for node in graph.node for name in node.input)
    uses.update(o.name for o in graph.output)
    inits = {t.name: t for t in graph.initializer}
    rewrites = {}
    for attention in graph.node:
        if attention.op_type != "GroupQueryAttention" or len(attention.input) < 3 or not all(attention.input[:3]):
            continue
        parts = [_projection(name, producer, inits, uses) for name in attention.input[:3]]
        if any(p is None for p in parts) or len({p.x for p in parts}) != 1:
            continue
        rewrites[id(attention)] = (attention, parts)
    if not rewrites:
        return 0
    removed = {id(n) for _, parts in rewrites.values() for p in parts for n in p.nodes}
    _rebuild(graph, {key: _packed(*rewrite) for key, rewrite in rewrites.items()}, removed)
    return len(rewrites)


def _rebuild(graph: onnx.GraphProto, before: dict[int, tuple[list, list]], removed: set[int]) -> None:
    """The graph with (nodes, initializers) inserted before the nodes keyed by ``id`` in ``before``, the
    ``removed`` nodes dropped, and the initializers nothing reads any more with them."""
    new_nodes, new_inits = [], []
    for node in graph.node:
        nodes, inits = before.get(id(node), ([], []))
        new_nodes += nodes
        new_inits += inits
        if id(node) not in removed:
            new_nodes.append(node)
    del graph.node[:]
    graph.node.extend(new_nodes)
    used = {name for node in graph.node for name in node.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)


def _projection(name: str, producer: dict, inits: dict, uses: Counter) -> Projection | None:
    """How ``name`` is computed, if it is ``x @ W`` then a bias and a delta (either order, either optional),
    with every node on the way used only here."""
    nodes, bias, delta = [], None, None
    node = producer.get(name)
    while node is not None and node.op_type == "Add" and uses[node.output[0]] == 1:
        nodes.append(node)
        a, b = node.input
        if bias is None and (a in inits or b in inits):
            constant, name = (a, b) if a in inits else (b, a)
            bias = numpy_helper.to_array(inits[constant])
        elif delta is None and _reaches_weight(a, producer, inits):
            delta, name = b, a
        elif delta is None and _reaches_weight(b, producer, inits):
            delta, name = a, b
        else:
            return None
        node = producer.get(name)
    if not _is_weight_product(node, inits) or uses[node.output[0]] != 1:
        return None
    weight = numpy_helper.to_array(inits[node.input[1]])
    if bias is not None and bias.shape != (weight.shape[1],):
        return None
    return Projection(node.input[0], weight, bias, delta, nodes + [node])


def _reaches_weight(name: str, producer: dict, inits: dict) -> bool:
    """Whether ``name`` is ``x @ W``, or that plus a constant: the base side of a delta's Add."""
    node = producer.get(name)
    if _is_weight_product(node, inits):
        return True
    if node is None or node.op_type != "Add" or not any(i in inits for i in node.input):
        return False
    return any(_reaches_weight(i, producer, inits) for i in node.input if i not in inits)


def _is_weight_product(node, inits: dict) -> bool:
    return (node is not None and node.op_type == "MatMul" and node.input[1] in inits
            and len(inits[node.input[1]].dims) == 2 and inits[node.input[1]].data_type == onnx.TensorProto.FLOAT)


def _packed(attention, parts: list[Projection]) -> tuple[list, list]:
    """(nodes, initializers) computing the packed query, and the attention node pointed at it."""
    prefix = (attention.name or attention.output[0]) + ".qkv"
    widths = [p.weight.shape[1] for p in parts]
    weights = [numpy_helper.from_array(np.concatenate([p.weight for p in parts], axis=1), prefix + ".weight")]
    nodes = [helper.make_node("MatMul", [parts[0].x, prefix + ".weight"], [prefix + ".product"])]
    packed = prefix + ".product"
    if any(p.bias is not None for p in parts):
        bias = np.concatenate([np.zeros(w, np.float32) if p.bias is None else p.bias for p, w in zip(parts, widths)])
        weights.append(numpy_helper.from_array(bias.astype(np.float32), prefix + ".bias"))
        nodes.append(helper.make_node("Add", [packed, prefix + ".bias"], [prefix + ".biased"]))
        packed = prefix + ".biased"
    deltas = [p.delta for p in parts]
    if all(deltas):
        nodes += [helper.make_node("Concat", deltas, [prefix + ".delta"], axis=-1),
                  helper.make_node("Add", [packed, prefix + ".delta"], [prefix + ".adapted"])]
        packed = prefix + ".adapted"
    if all(deltas) or not any(deltas):
        attention.input[0], attention.input[1], attention.input[2] = packed, "", ""
        return nodes, weights
    split = [f"{prefix}.part{i}" for i in range(3)]
    weights.append(numpy_helper.from_array(np.asarray(widths, np.int64), prefix + ".widths"))
    nodes.append(helper.make_node("Split", [packed, prefix + ".widths"], split, axis=-1))
    for i, delta in enumerate(deltas):
        attention.input[i] = split[i]
        if delta:
            nodes.append(helper.make_node("Add", [split[i], delta], [split[i] + ".adapted"]))
            attention.input[i] = split[i] + ".adapted"
    return nodes, weights


def pack_shared_inputs(proto: onnx.ModelProto) -> int:
    """Rewrite, in place, every group of weight products of one input into one MatMul and a Split whose outputs
    keep the old names, so every consumer (slot deltas included) stays as it was; returns how many groups."""
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    uses = Counter(name for node in graph.node for name in node.input)
    groups: dict[str, list] = {}
    for node in graph.node:
        if _is_weight_product(node, inits) and uses[node.input[1]] == 1:
            groups.setdefault(node.input[0], []).append(node)
    groups = {x: g for x, g in groups.items() if len(g) > 1 and len({inits[n.input[1]].dims[0] for n in g}) == 1}
    if not groups:
        return 0
    before = {id(group[0]): _packed_group(group, inits) for group in groups.values()}
    _rebuild(graph, before, {id(n) for group in groups.values() for n in group})
    return len(groups)


def _packed_group(group: list, inits: dict) -> tuple[list, list]:
    """(nodes, initializers): one MatMul over the concatenated weights, split back into the group's outputs."""
    weights = [numpy_helper.to_array(inits[n.input[1]]) for n in group]
    prefix = group[0].output[0] + ".packed"
    new_inits = [numpy_helper.from_array(np.concatenate(weights, axis=1), prefix + ".weight"),
                 numpy_helper.from_array(np.asarray([w.shape[1] for w in weights], np.int64), prefix + ".widths")]
    nodes = [helper.make_node("MatMul", [group[0].input[0], prefix + ".weight"], [prefix]),
             helper.make_node("Split", [prefix, prefix + ".widths"], [n.output[0] for n in group], axis=-1)]
    return nodes, new_inits

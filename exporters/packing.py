"""Pack projections of the same input into one MatMul: q/k/v of each fused attention, and the rest (gate/up).

A decode step on a CPU pays per node more than per multiply (see fusion.py), and a few narrow
products of the same input keep onnxruntime's thread pool busier than one wide one: packing a
Llama MLP's gate and up projections (a Split after the one MatMul, so no node less) still decodes
faster.
onnxruntime's GroupQueryAttention takes the packed ``[q | k | v]`` as its query when key and value
are left out, as in onnxruntime-genai's graphs. The packing runs on the float graph, before base
quantization, so MatMulNBits quantizes the packed weight like any other.

The slots of packed modules become one slot group per packed product (``group_slots``): one
``(x @ a) @ b`` added to the product before its Split, instead of a delta per module joined by a
Concat or added part by part. Adapters keep PEFT's per-module layout everywhere else
(``edgelora.format.slot_groups`` converts at the blob's edge).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgelora.format.manifest import SlotGroup
from edgelora.format.slot_groups import factor_names, group_name, tiles

from .initializers import replace_initializers


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
    replace_initializers(graph, {t.name for t in graph.initializer if t.name not in used}, new_inits)


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


def group_slots(proto: onnx.ModelProto) -> list[SlotGroup]:
    """Rewrite, in place, the slots of modules whose products were packed into one pair of grouped factors per
    packed product (``edgelora.format.slot_groups``), added to the product before it is split; returns the groups.

    Runs on the float slots, before the slot codec: the group's factors are then encoded like any slot's.
    """
    graph = proto.graph
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    inputs = {value.name: value for value in graph.input}
    inits = {t.name: t for t in graph.initializer}
    found = []
    for node in graph.node:
        if node.op_type == "Split" and len(node.input) == 2 and node.input[1] in inits:
            members = _split_members(node, producer, consumers, inputs, inits)
        elif node.op_type == "Add":
            members = _concat_members(node, producer, consumers, inputs)
        else:
            continue
        if len(members) > 1:
            found.append((node, members))
    groups, before, drop, renames, new_inputs, removed_inputs = [], {}, set(), {}, [], set()
    for node, members in found:
        modules = [m.module for m in members]
        name = group_name(modules)
        a, b = factor_names(name)
        group = SlotGroup(a=a, b=b, modules=modules, offsets=[m.offset for m in members],
                          widths=[m.out for m in members], width=members[0].width)
        in_features = inputs[members[0].a].type.tensor_type.shape.dim[0].dim_value
        factors, nodes, group_inits = _group_delta(name, group, members[0].x, in_features)
        new_inputs += factors
        if node.op_type == "Split":
            nodes.append(helper.make_node("Add", [node.input[0], name + ".lora_delta"], [name + ".adapted"],
                                          name=name + ".adapted"))
            node.input[0] = name + ".adapted"
        else:
            drop.add(id(producer[node.input[1]]))  # the Concat of the deltas
            node.input[1] = name + ".lora_delta"
        before[id(node)] = (nodes, group_inits)
        for m in members:
            drop.update(id(n) for n in m.nodes)
            removed_inputs.update((m.a, m.b))
            if m.joined is not None:
                renames[m.joined.output[0]] = m.kept
        groups.append(group)
    if not groups:
        return []
    _rebuild(graph, before, drop)
    for n in graph.node:
        for i, name in enumerate(n.input):
            n.input[i] = renames.get(name, name)
    kept_inputs = [v for v in graph.input if v.name not in removed_inputs]
    del graph.input[:]
    graph.input.extend(kept_inputs + new_inputs)
    return groups


def _group_delta(name: str, group: SlotGroup, x: str, in_features: int) -> tuple[list, list, list]:
    """(factor inputs, nodes, initializers) computing ``name.lora_delta`` [batch, seq, width] from ``x``
    [batch, seq, in]: the product with ``a`` cut into the modules' rank blocks, each tile of the output given its
    module's block, one batched product with the tiles of ``b`` ([batch, seq, tiles, 1, tile]), the tiles side
    by side."""
    tile, owners = tiles(group)
    factors = [helper.make_tensor_value_info(group.a, onnx.TensorProto.FLOAT, [in_features, "ranks_" + name]),
               helper.make_tensor_value_info(group.b, onnx.TensorProto.FLOAT, [len(owners), "rank_" + name, tile])]
    node = helper.make_node  # named: base quantization tells the slot products it leaves alone by their names
    inits = [numpy_helper.from_array(np.array([0, 0, len(group.modules), 1, -1], np.int64), name + ".rank_blocks"),
             numpy_helper.from_array(np.array([0, 0, -1], np.int64), name + ".side_by_side")]
    nodes = [node("MatMul", [x, group.a], [name + ".lora_product"], name=name + ".lora_product"),
             node("Reshape", [name + ".lora_product", name + ".rank_blocks"], [name + ".lora_blocks"])]
    blocks = name + ".lora_blocks"
    if owners != list(range(len(group.modules))):
        inits.append(numpy_helper.from_array(np.array(owners, np.int64), name + ".tile_owners"))
        nodes.append(node("Gather", [blocks, name + ".tile_owners"], [name + ".lora_tile_blocks"], axis=-3))
        blocks = name + ".lora_tile_blocks"
    nodes += [node("MatMul", [blocks, group.b], [name + ".lora_tiles"], name=name + ".lora_tiles"),
              node("Reshape", [name + ".lora_tiles", name + ".side_by_side"], [name + ".lora_delta"])]
    return factors, nodes, inits


@dataclass
class SlotMember:
    """One slot's ``(x @ a) @ b`` and how it joins its module's output."""

    module: str
    x: str
    a: str
    b: str
    offset: int  # where the module's columns start in the packed product
    out: int  # how many
    width: int  # the packed product's
    nodes: list  # the slot's own nodes, and its Add when it has one
    joined: object | None  # that Add, whose output becomes ``kept``
    kept: str | None


def _slot_delta(name: str, producer: dict, consumers: dict, inputs: dict) -> tuple[str, str, str, list] | None:
    """(x, a, b, nodes) when ``name`` is a slot's ``(x @ a) @ b`` used only where it is added."""
    outer = producer.get(name)
    if outer is None or outer.op_type != "MatMul" or len(consumers.get(name, [])) != 1:
        return None
    inner = producer.get(outer.input[0])
    if inner is None or inner.op_type != "MatMul" or len(consumers.get(inner.output[0], [])) != 1:
        return None
    a, b = inner.input[1], outer.input[1]
    if a not in inputs or b not in inputs or not a.endswith(".lora_A") or (a[: -len("A")] + "B") != b:
        return None
    return inner.input[0], a, b, [inner, outer]


def _split_members(split, producer, consumers, inputs, inits) -> list[SlotMember]:
    """The slots added to the parts of a packed product's Split (directly, or after a constant bias Add)."""
    packed = producer.get(split.input[0])
    if packed is not None and packed.op_type == "Add" and any(i in inits for i in packed.input):
        packed = producer.get(next(i for i in packed.input if i not in inits))  # through a bias
    if packed is None or packed.op_type != "MatMul":
        return []
    widths = numpy_helper.to_array(inits[split.input[1]]).tolist()
    offsets = np.cumsum([0] + widths[:-1]).tolist()
    members = []
    for part, offset, out in zip(split.output, offsets, widths):
        value = part
        users = consumers.get(value, [])
        if len(users) == 1 and users[0].op_type == "Add" and any(i in inits for i in users[0].input):
            value = users[0].output[0]  # a bias: the delta joins after it
            users = consumers.get(value, [])
        if len(users) != 1 or users[0].op_type != "Add":
            continue
        add = users[0]
        delta = add.input[1] if add.input[0] == value else add.input[0]
        slot = _slot_delta(delta, producer, consumers, inputs)
        if slot is None or slot[0] != packed.input[0]:
            continue
        x, a, b, nodes = slot
        members.append(SlotMember(a[: -len(".lora_A")], x, a, b, offset, out, sum(widths), nodes + [add], add, value))
    return members


def _concat_members(add, producer, consumers, inputs) -> list[SlotMember]:
    """The slots of ``packed + Concat(deltas)``, pack_qkv's join when every projection has one."""
    concat = producer.get(add.input[1])
    if concat is None or concat.op_type != "Concat" or len(consumers.get(concat.output[0], [])) != 1:
        return []
    slots = [_slot_delta(d, producer, consumers, inputs) for d in concat.input]
    if any(s is None for s in slots) or len({s[0] for s in slots}) != 1:
        return []
    outs = [inputs[b].type.tensor_type.shape.dim[1].dim_value for _, _, b, _ in slots]
    offsets = np.cumsum([0] + outs[:-1]).tolist()
    return [SlotMember(a[: -len(".lora_A")], x, a, b, offset, out, sum(outs), nodes, None, None)
            for (x, a, b, nodes), offset, out in zip(slots, offsets, outs)]

"""Deep causal LMs are traced with a few of their decoder layers; the others are copied in the ONNX graph.

torch.export and the exporter's decompositions cost time in proportion to what they trace (seconds per
layer), yet the layers of a decoder run the same code on other weights.
So the model is traced with layer 0 plus the first and the last layer of each kind (same class,
attention type, parameter shapes and LoRA slots), and every other layer becomes a copy of its kind's
first traced layer, renamed to its own weights, KV cache inputs and outputs, and slots.

Nothing is taken on trust. The first and the last layer of a kind must trace to the same nodes (same
ops, attributes and constants, each reading its own weights, cache and slots in the same places), so
code that depends on the layer's index (GPT-2's ``scale_attn_by_inverse_layer_idx``, say) shows up as
a difference; and every node must belong to one layer, to what comes before the layers, or to what
comes after them, the layers being joined by one hidden state. Whatever breaks either rule raises
``NotAlike``, and the caller traces the whole model instead.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass

import onnx
from onnx import numpy_helper
from torch import nn

from edgelora.format.manifest import Slot

PAST, PRESENT = "past_key_values.", "present."
SCOPES = "pkg.torch.onnx.name_scopes"  # the exporter's record of the module path each node came from
WRAPPER = "model."  # the slotted wrapper holds the model as its ``model`` attribute


class NotAlike(Exception):
    """The traced layers do not prove that the untraced ones would trace the same; trace them all."""


@dataclass
class Plan:
    path: str  # the ModuleList of decoder layers, e.g. "model.layers"
    traced: list[int]  # the real layers traced, ascending; the traced model's layer j is traced[j]
    template: list[int]  # per real layer, the traced layer its nodes are copied from
    pairs: list[tuple[int, int]]  # per repeated kind, its first and last traced layer, which must be alike

    def small_slot(self, slot: Slot) -> Slot | None:
        """The slot as the traced model names it, or None when its layer is not traced."""
        split = _split(slot.name, [self.path + "."])
        if split is None:
            return slot
        _, layer, rest = split
        if layer not in self.traced:
            return None
        name = f"{self.path}.{self.traced.index(layer)}{rest}"
        return Slot(name=name, a=slot.a.replace(slot.name, name, 1), b=slot.b.replace(slot.name, name, 1),
                    in_features=slot.in_features, out_features=slot.out_features, dtype=slot.dtype)


def plan(model: nn.Module, slot_names: list[str]) -> Plan | None:
    """Which layers to trace, or None when tracing a subset would trace them all anyway."""
    n = model.config.num_hidden_layers
    lists = [name for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n and name]
    if len(lists) != 1:
        return None
    path = lists[0]
    kinds: dict[tuple, list[int]] = {}
    for i, layer in enumerate(model.get_submodule(path)):
        kinds.setdefault(_kind(model.config, layer, i, path, slot_names), []).append(i)
    traced = {0}
    for members in kinds.values():
        rest = [i for i in members if i]
        traced |= set(rest[:1] + rest[-1:])
    if len(traced) == n:
        return None
    traced = sorted(traced)
    template = [traced.index(i) if i in traced else -1 for i in range(n)]
    pairs = []
    for members in kinds.values():
        rest = [i for i in members if i]
        if any(template[i] < 0 for i in rest):
            first = traced.index(rest[0])
            pairs.append((first, traced.index(rest[-1])))
            for i in rest:
                template[i] = template[i] if template[i] >= 0 else first
    return Plan(path=path, traced=traced, template=template, pairs=pairs)


def _kind(config, layer: nn.Module, index: int, path: str, slot_names: list[str]) -> tuple:
    prefix = f"{path}.{index}."
    layer_types = getattr(config, "layer_types", None)
    return (
        type(layer).__name__,
        layer_types[index] if layer_types else None,
        tuple((name, tuple(t.shape), t.dtype) for name, t in layer.state_dict().items()),
        tuple(sorted(s[len(prefix):] for s in slot_names if s.startswith(prefix))),
    )


@contextmanager
def shrunk(model: nn.Module, p: Plan):
    """The model with only the traced layers, renumbered 0..k-1 as a model of k layers would number them."""
    parent_path, _, attr = p.path.rpartition(".")
    parent = model.get_submodule(parent_path)
    full = getattr(parent, attr)
    config = model.config
    saved_layers, layer_types = config.num_hidden_layers, getattr(config, "layer_types", None)
    renumbered = [(m, real) for small, real in enumerate(p.traced) for m in full[real].modules()
                  if getattr(m, "layer_idx", None) == real]
    try:
        for m, real in renumbered:
            m.layer_idx = p.traced.index(real)
        setattr(parent, attr, nn.ModuleList([full[i] for i in p.traced]))
        config.num_hidden_layers = len(p.traced)
        if layer_types:
            config.layer_types = [layer_types[i] for i in p.traced]
        yield
    finally:
        for m, real in renumbered:
            m.layer_idx = real
        setattr(parent, attr, full)
        config.num_hidden_layers = saved_layers
        if layer_types:
            config.layer_types = layer_types


def _split(name: str, prefixes: list[str]) -> tuple[str, int, str] | None:
    """``prefix``, layer index and the rest of a per-layer name such as ``past_key_values.3.key``."""
    for prefix in prefixes:
        if name.startswith(prefix):
            m = re.match(r"(\d+)(\..*)$", name[len(prefix):])
            if m:
                return prefix, int(m.group(1)), m.group(2)
    return None


class _Layers:
    """The traced graph's nodes sorted into before the layers ('pre'), each layer (its index), after ('post')."""

    def __init__(self, graph: onnx.GraphProto, p: Plan):
        self.graph = graph
        k = len(p.traced)
        inits = {t.name for t in graph.initializer}
        self.weight_prefix = WRAPPER + p.path + "."
        self.sources = {}  # per-layer graph inputs and weights: name -> (prefix, layer, rest)
        for v in graph.input:
            split = _split(v.name, [PAST, p.path + "."])
            if split:
                self.sources[v.name] = split
        for name in inits:
            split = _split(name, [self.weight_prefix])
            if split and name not in self.sources:
                self.sources[name] = split
        scope = re.compile("'" + re.escape(self.weight_prefix) + r"(\d+)'")
        self.owner: dict[str, int | str] = {}  # value -> layer, or "post"
        self.constants: dict[str, bytes] = {}
        self.pre, self.post, self.layer_nodes = [], [], [[] for _ in range(k)]
        for node in graph.node:
            if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
                raise NotAlike(f"{node.op_type} node {node.name} has a subgraph")
            cls = self._classify(node, scope)
            if cls == "pre":
                self.pre.append(node)
                if node.op_type == "Constant":
                    self.constants[node.output[0]] = node.attribute[0].SerializeToString()
            elif cls == "post":
                self.post.append(node)
            else:
                self.layer_nodes[cls].append(node)
            if cls != "pre":
                self.owner.update((o, cls) for o in node.output if o)
        self.hidden = self._hidden_states(k)
        for out in graph.output:
            cls, split = self.owner.get(out.name), _split(out.name, [PRESENT])
            if isinstance(cls, int) and (split is None or split[1] != cls):
                raise NotAlike(f"graph output {out.name} comes from layer {cls}")

    def _classify(self, node, scope) -> int | str:
        ins = [x for x in node.input if x]
        src = {self.sources[x][1] for x in ins if x in self.sources}
        after = any(x in self.owner for x in ins)
        found = None
        for prop in node.metadata_props:
            if prop.key == SCOPES:
                layers = {int(m) for m in scope.findall(prop.value)}
                found = layers.pop() if len(layers) == 1 else None
        if node.op_type == "Constant" and not ins:
            return "pre"
        if found is None:
            if after:
                if src:
                    raise NotAlike(f"node {node.name} reads layer inputs after the layers")
                return "post"
            if not src:
                return "pre"
            if node.op_type == "Shape" and all(self.sources[x][0] == PAST for x in ins):
                return "pre"  # a dimension every layer's cache shares (the past length)
            if len(src) > 1:
                raise NotAlike(f"node {node.name} reads inputs of layers {sorted(src)}")
            return src.pop()
        if src - {found} or any(self.owner.get(x) == "post" for x in ins):
            raise NotAlike(f"node {node.name} of layer {found} reads another layer's inputs")
        return found

    def _hidden_states(self, k: int) -> list[str]:
        """Per layer, the one value that leaves it for the next layer (or, for the last, for what follows)."""
        leaving: list[set[str]] = [set() for _ in range(k)]
        for reader, nodes in [("post", self.post), *enumerate(self.layer_nodes)]:
            for node in nodes:
                for x in node.input:
                    layer = self.owner.get(x)
                    if isinstance(layer, int) and layer != reader:
                        if reader != (layer + 1 if layer + 1 < k else "post"):
                            raise NotAlike(f"layer {reader} reads {x} of layer {layer}")
                        leaving[layer].add(x)
        if any(len(values) != 1 for values in leaving):
            raise NotAlike(f"layers pass on {[sorted(v) for v in leaving]}, not one hidden state each")
        return [values.pop() for values in leaving]

    def signature(self, j: int) -> list[tuple]:
        """Layer j's nodes with every name replaced by its role, to compare two layers node for node."""
        local: dict[str, int] = {}
        sig = []
        for node in self.layer_nodes[j]:
            ins = []
            for x in node.input:
                if x in local:
                    ins.append(("local", local[x]))
                elif j and x == self.hidden[j - 1]:
                    ins.append(("hidden",))
                elif x in self.sources:
                    ins.append(("source", self.sources[x][0], self.sources[x][2]))
                elif x in self.constants:
                    ins.append(("constant", self.constants[x]))
                else:
                    ins.append(("global", x))
            outs = []
            for o in node.output:
                split = _split(o, [PRESENT])
                outs.append(("present", split[2]) if split else ("local", len(local)))
                local[o] = len(local)
            sig.append((node.domain, node.op_type, tuple(ins), tuple(outs),
                        tuple(a.SerializeToString() for a in node.attribute)))
        return sig


def expand(proto: onnx.ModelProto, p: Plan, inputs: list[str], outputs: list[str],
           weights: dict[str, object]) -> onnx.ModelProto:
    """The traced graph of ``p.traced`` layers as the graph of every layer, with ``inputs``/``outputs`` in order.

    ``weights`` maps the real model's parameter and buffer names to its tensors, for the copied layers.
    """
    graph = proto.graph
    layers = _Layers(graph, p)
    for first, last in p.pairs:
        if layers.signature(first) != layers.signature(last):
            raise NotAlike(f"layers {p.traced[first]} and {p.traced[last]} trace to different graphs")

    def real_source(name: str, i: int) -> str:
        prefix, _, rest = layers.sources[name]
        return f"{prefix}{i}{rest}"

    def local_name(name: str, i: int) -> str:
        split = _split(name, [PRESENT])
        return f"{PRESENT}{i}{split[2]}" if split else f"{name}.layer{i}"

    nodes = []
    for node in layers.pre:  # a shared cache dimension is read from the traced layer's real counterpart
        nodes.append(_renamed(node, lambda x: real_source(x, p.traced[layers.sources[x][1]])
                              if x in layers.sources else x, node.name))
    hidden = None
    value_infos = {v.name: v for v in graph.value_info}
    new_infos = [v for v in graph.value_info if v.name not in layers.owner or layers.owner[v.name] == "post"]
    new_inits = [t for t in graph.initializer if t.name not in layers.sources]
    small_inits = {t.name: t for t in graph.initializer}
    rank_dims = {}
    for i, j in enumerate(p.template):
        def rename(x, i=i, j=j, previous=hidden):
            owner = layers.owner.get(x)
            if owner == j:
                return local_name(x, i)
            if isinstance(owner, int):
                return previous  # the hidden state of the previous layer, checked by _hidden_states
            return real_source(x, i) if x in layers.sources else x

        used = set()
        for node in layers.layer_nodes[j]:
            nodes.append(_renamed(node, rename, f"{node.name}.layer{i}"))
            used |= {x for x in node.input if x in layers.sources}
        for x in sorted(used):
            if x in small_inits:
                new_inits.append(_weight(small_inits[x], real_source(x, i), weights))
            elif layers.sources[x][0] != PAST and _rank_dim(graph, x):
                rank_dims[_rank_dim(graph, x)] = "rank_" + real_source(x, i).rsplit(".", 1)[0]
        for node in layers.layer_nodes[j]:
            for o in node.output:
                if o in value_infos:
                    info = _renamed_info(value_infos[o], local_name(o, i), rank_dims)
                    if info is not None:
                        new_infos.append(info)
        hidden = rename(layers.hidden[j])
        rank_dims.clear()
    last = layers.hidden[-1]
    nodes += [_renamed(node, lambda x: hidden if x == last else x, node.name) for node in layers.post]

    small_inputs = {v.name: v for v in graph.input}
    small_outputs = {v.name: v for v in graph.output}
    new_inputs = [_io_info(name, small_inputs, [PAST, p.path + "."], p) for name in inputs]
    new_outputs = [_io_info(name, small_outputs, [PRESENT], p) for name in outputs]
    del graph.node[:], graph.input[:], graph.output[:], graph.initializer[:], graph.value_info[:]
    graph.node.extend(nodes)
    graph.input.extend(new_inputs)
    graph.output.extend(new_outputs)
    graph.initializer.extend(new_inits)
    graph.value_info.extend(new_infos)
    return proto


def _renamed(node: onnx.NodeProto, rename, name: str) -> onnx.NodeProto:
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    copy.name = name
    for k, x in enumerate(node.input):
        if x:
            copy.input[k] = rename(x)
    for k, x in enumerate(node.output):
        if x:
            copy.output[k] = rename(x)
    return copy


def _weight(small: onnx.TensorProto, name: str, weights: dict) -> onnx.TensorProto:
    tensor = weights.get(name[len(WRAPPER):])
    if tensor is None:
        raise NotAlike(f"{name} is not a parameter or buffer of the model")
    array = tensor.detach().cpu().numpy()
    if tuple(array.shape) != tuple(small.dims) or onnx.helper.np_dtype_to_tensor_dtype(array.dtype) != small.data_type:
        raise NotAlike(f"{name} differs in shape or type from its traced layer's")
    return numpy_helper.from_array(array, name)


def _rank_dim(graph: onnx.GraphProto, slot_input: str) -> str | None:
    value = next(v for v in graph.input if v.name == slot_input)
    return next((d.dim_param for d in value.type.tensor_type.shape.dim if d.dim_param), None)


def _renamed_info(info: onnx.ValueInfoProto, name: str, rank_dims: dict[str, str]) -> onnx.ValueInfoProto | None:
    """The shape of a copied value, its slot ranks the copy's own; None (no shape) where a rank is in a formula."""
    copy = onnx.ValueInfoProto()
    copy.CopyFrom(info)
    copy.name = name
    for dim in copy.type.tensor_type.shape.dim:
        if dim.dim_param in rank_dims:
            dim.dim_param = rank_dims[dim.dim_param]
        elif any(rank in dim.dim_param for rank in rank_dims):
            return None
    return copy


def _io_info(name: str, small: dict, prefixes: list[str], p: Plan) -> onnx.ValueInfoProto:
    """A graph input or output of the full model, shaped as its traced counterpart."""
    split = _split(name, prefixes)
    if split is None:
        return small[name]
    prefix, i, rest = split
    copy = onnx.ValueInfoProto()
    copy.CopyFrom(small[f"{prefix}{p.template[i]}{rest}"])
    copy.name = name
    for dim in copy.type.tensor_type.shape.dim:
        if dim.dim_param.startswith("rank_"):
            dim.dim_param = "rank_" + name.rsplit(".", 1)[0]
    return copy

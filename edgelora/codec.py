"""Factor codecs: how a slot's factor is stored in a blob and turned back into float inside the graph.

A factor ``x`` is [K, N] with K its reduction axis (A_t: [in, r]; B_t: [r, out]; a slot group's B_t is
[tiles, r, tile], ``edgelora.slot_groups``). The same codec
serves the numpy side (encode at export, decode for checks and reports) and the ONNX side (the
nodes that dequantize inside the graph), so what the graph computes is what the tests decode (up to the
activation rounding of int8 products).
A resident adapter stays quantized in memory: dequantization happens per run, in the graph.

- fp32: the factor as is.
- fp16: half floats, cast up in the graph.
- int8: symmetric, a scale per rank component. ``b`` (the rank-axis factor) is balanced first
  (``balance_int8``): each rank component moves its row's magnitude from ``b`` into ``a``'s column, so
  that row spans ±127 and ``b`` is stored as plain integers, with no scale. ``a`` keeps an fp32 scale per
  column, which therefore carries both factors' scales. ``x @ a`` is one onnxruntime
  ``DynamicQuantizeMatMul`` on the stored factor (the activations quantized per tensor, the product in
  int8, the column scales applied in its output), and ``p @ b`` a cast of ``b`` and a plain ``MatMul``;
  an embedding slot gathers int8 rows of ``a``, widens and scales only those. Per slot that is three nodes
  where per-column scales on both factors took six (two scale casts, a scaling after ``p @ b``): 10-12%
  of int4 decode on the 135M model, for a delta error of 0.6% against 0.5% on the demo's trained adapters.
  A ``b`` scaled per output column would need its scales applied after the product, and fp32 scales for
  them would take the blob past 27% of PEFT's file at rank 16.
- int4: symmetric, blocks of ``block`` rows along K (one block when K ≤ block), packed two per byte
  along K, fp16 scales [K/block, N]; unpacked with bit ops, since .onnx_adapter has no int4 type.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import EdgeLoraError

DTYPES = ("fp32", "fp16", "int8", "int4")
BLOCK_SIZES = (32, 64)
_SUFFIXES = {"fp32": ("",), "fp16": (".fp16",), "int8": (".int8", ".scale"), "int4": (".int4", ".scale")}
_MIN_SCALE = np.float32(2.0**-24)  # keeps fp16 scales from rounding to zero on near-zero factors
_FP16_MAX = float(np.finfo(np.float16).max)
_LIMITS = {"fp16": _FP16_MAX, "int4": 7 * _FP16_MAX}  # largest value whose (fp16) scale fits
_INT8 = 127


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise EdgeLoraError(f"adapter dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return dtype


def param_names(tensor: str, dtype: str) -> list[str]:
    """Names of the blob parameters (and graph inputs) that carry one factor."""
    suffixes = _SUFFIXES[dtype][:1] if dtype == "int8" and _over_rank(tensor) else _SUFFIXES[dtype]
    return [tensor + s for s in suffixes]


def _over_rank(tensor: str) -> bool:
    """A ``b`` factor ([r, out], or a slot group's [tiles, r, tile]): its products reduce over the rank axis."""
    return tensor.endswith(".lora_B")


def balance_int8(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same product ``a @ b`` with each row of ``b`` spanning ±127 (``a``'s column divided by as much),
    which is the form the int8 codec stores; an all-zero row stays as it is."""
    peak = np.abs(b).max(axis=1).astype(np.float64)  # in float64: a subnormal peak's gain overflows float32
    gain = _INT8 / np.where(peak > 0, peak, _INT8)
    return (a / gain).astype(np.float32), (b * gain[:, None]).astype(np.float32)


def dtype_of(names) -> str:
    """The codec of a blob, read off its parameter names."""
    found = {d for d in ("fp16", "int8", "int4") if any(n.endswith("." + d) for n in names)}
    if len(found) > 1:
        raise EdgeLoraError(f"mixed factor encodings {sorted(found)} in one adapter")
    return found.pop() if found else "fp32"


def tensor_of(name: str, dtype: str) -> str:
    """The factor a parameter belongs to (inverse of ``param_names``)."""
    for suffix in _SUFFIXES[dtype]:
        if suffix and name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def int4_block(k: int, block: int) -> int:
    if k <= block:
        if k % 2:
            raise EdgeLoraError(f"int4 needs an even reduction size, got {k}; use int8")
        return k
    if k % block:
        raise EdgeLoraError(f"int4 blocks of {block} do not divide a reduction size of {k}; use int8 or another block")
    return block


def _in_range(tensor: str, x: np.ndarray, dtype: str) -> np.ndarray:
    """Values and scales are stored as fp16: past its range they would become Inf, and every answer NaN."""
    peak = float(np.abs(x).max(initial=0))
    if peak > _LIMITS[dtype]:
        raise EdgeLoraError(f"{tensor}: values up to {peak:.3g} do not fit the {dtype} codec (fp16 range); "
                            "use --adapter-dtype fp32")
    return x


def _scales(absmax: np.ndarray, qmax: int) -> np.ndarray:
    """fp16 scales rounded up, never down: below 2**-14 fp16 steps are coarse (2**-24), and a scale rounded
    down would clip a column's largest values by several steps instead of erring by half of one."""
    exact = np.maximum(absmax / qmax, _MIN_SCALE).astype(np.float32)
    scale = exact.astype(np.float16)
    return np.where(scale.astype(np.float32) < exact, np.nextafter(scale, np.float16(np.inf)), scale)


def _int4_round(blocks: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(blocks / scale.astype(np.float32)[:, None, :]), -8, 7).astype(np.int16)


def _int4_scales(blocks: np.ndarray) -> np.ndarray:
    """Per block, the scale (absmax/7 shrunk by up to 30%) with the least squared error.

    Sixteen levels are few: clipping the largest value a little usually lowers the error of
    all the others (about 10% less relative error on the test adapters than plain absmax/7).
    """
    absmax = np.abs(blocks).max(axis=1)
    best, best_err = None, None
    for ratio in np.linspace(0.7, 1.0, 16):
        scale = _scales(absmax * ratio, 7)
        err = ((_int4_round(blocks, scale) * scale.astype(np.float32)[:, None, :] - blocks) ** 2).sum(axis=1)
        if best is None:
            best, best_err = scale, err
        else:
            better = err < best_err
            best = np.where(better, scale, best)
            best_err = np.where(better, err, best_err)
    return best


def encode(tensor: str, x: np.ndarray, dtype: str, block: int = 32) -> dict[str, np.ndarray]:
    x = np.asarray(x, dtype=np.float32)
    names = param_names(tensor, dtype)
    if dtype == "fp32":
        return {names[0]: np.ascontiguousarray(x)}
    if dtype == "fp16":
        return {names[0]: _in_range(tensor, x, dtype).astype(np.float16)}
    if dtype == "int8" and _over_rank(tensor):
        peak = float(np.abs(x).max(initial=0))
        if peak > _INT8 + 0.5:
            raise EdgeLoraError(f"{tensor}: int8 stores a balanced b factor (codec.balance_int8), "
                                f"whose rows span ±{_INT8}; this one reaches {peak:.3g}")
        return {names[0]: np.clip(np.rint(x), -_INT8, _INT8).astype(np.int8)}
    if dtype == "int8":
        scale = np.maximum(np.abs(x).max(axis=0, initial=0) / _INT8, np.finfo(np.float32).tiny).astype(np.float32)
        return {names[0]: np.clip(np.rint(x / scale), -_INT8, _INT8).astype(np.int8), names[1]: scale}
    if x.ndim != 2:
        raise EdgeLoraError(f"{tensor}: int4 factors are 2-D; a slot group's tiled factor takes fp32, fp16 or int8")
    k, n = x.shape
    bs = int4_block(k, block)
    blocks = x.reshape(k // bs, bs, n)
    scale = _int4_scales(_in_range(tensor, blocks, dtype))  # [K/bs, N]
    q = _int4_round(blocks, scale) + 8
    q = q.reshape(k, n).astype(np.uint8)
    packed = q[0::2] | (q[1::2] << 4)
    return {names[0]: np.ascontiguousarray(packed), names[1]: scale}


def decode(tensor: str, params: dict[str, np.ndarray], dtype: str) -> np.ndarray:
    """The float factor a graph computes from the stored parameters (numpy twin of ``dequant_nodes``)."""
    names = param_names(tensor, dtype)
    if dtype in ("fp32", "fp16") or len(names) == 1:
        return params[names[0]].astype(np.float32)
    q, scale = params[names[0]], params[names[1]].astype(np.float32)
    if dtype == "int8":
        return q.astype(np.float32) * scale
    k2, n = q.shape
    unpacked = np.stack([q & 15, q >> 4], axis=1).reshape(2 * k2, n).astype(np.float32) - 8
    return (unpacked.reshape(scale.shape[0], -1, n) * scale[:, None, :]).reshape(2 * k2, n)


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
    without an adapter remains the base model at the least cost: onnxruntime skips the empty products, where a
    rank-1 adapter, whose kernels cost what rank-1 zeros would, took 12-20% more int4 decode on the 135M model
    (bench/RESULTS.md). int4 keeps all-zero rank 2, the smallest pair it packs, since its unpacking reshapes
    by a block count an empty factor does not have.
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
    kept_inits = [t for t in graph.initializer if t.name not in wanted]
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
    del graph.initializer[:]
    graph.initializer.extend(kept_inits + new_inits)
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

"""Factor codecs: how a slot's factor is stored in a blob, and the float factor it stands for.

A factor ``x`` is [K, N] with K its reduction axis (A_t: [in, r]; B_t: [r, out]; a slot group's B_t is
[tiles, r, tile], ``edgelora.format.slot_groups``). ``decode`` is the numpy twin of the nodes that
dequantize inside the graph (``edgelora.exporters.slot_codec``), so what the graph computes is what the
checks and tests decode (up to the activation rounding of int8 products). A resident adapter stays
quantized in memory: dequantization happens per run, in the graph.

- fp32: the factor as is.
- fp16: half floats, cast up in the graph.
- int8: symmetric, a scale per rank component. ``b`` (the rank-axis factor) is balanced first
  (``balance_int8``): each rank component moves its row's magnitude from ``b`` into ``a``'s column, so
  that row spans ±127 and ``b`` is stored as plain integers, with no scale. ``a`` keeps an fp32 scale per
  column, which therefore carries both factors' scales. The graph then needs no scaling node after
  ``p @ b`` and can feed the stored ``a`` straight to onnxruntime's ``DynamicQuantizeMatMul``; fewer nodes
  per slot is what a decode step on a CPU pays for (docs/architecture.md). ``a`` spans ±63, not ±127: that
  kernel rounds the activations to uint8, and on x86 CPUs without VNNI it adds pairs of u8 × s8 products in
  int16 with saturation, which 8-bit values overflow (onnxruntime's quantizer calls the remedy
  ``reduce_range``).
- int4: symmetric, blocks of ``block`` rows along K (one block when K ≤ block), packed two per byte
  along K, fp16 scales [K/block, N]; unpacked with bit ops, since .onnx_adapter has no int4 type.
"""

from __future__ import annotations

import numpy as np

from edgelora.errors import EdgeLoraError

DTYPES = ("fp32", "fp16", "int8", "int4")
BLOCK_SIZES = (32, 64)
_SUFFIXES = {"fp32": ("",), "fp16": (".fp16",), "int8": (".int8", ".scale"), "int4": (".int4", ".scale")}
_MIN_SCALE = np.float32(2.0**-24)  # keeps fp16 scales from rounding to zero on near-zero factors
_FP16_MAX = float(np.finfo(np.float16).max)
_LIMITS = {"fp16": _FP16_MAX, "int4": 7 * _FP16_MAX}  # largest value whose (fp16) scale fits
_INT8 = 127
_INT8_A = 63  # what a u8 × s8 pair sum in int16 leaves for an int8 a: 2 · 255 · 63 < 2**15


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
    all the others more than it raises its own.
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
        scale = np.maximum(np.abs(x).max(axis=0, initial=0) / _INT8_A, np.finfo(np.float32).tiny).astype(np.float32)
        return {names[0]: np.clip(np.rint(x / scale), -_INT8_A, _INT8_A).astype(np.int8), names[1]: scale}
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
    """The float factor a graph computes from the stored parameters (numpy twin of ``slot_codec.dequant_nodes``)."""
    names = param_names(tensor, dtype)
    if dtype in ("fp32", "fp16") or len(names) == 1:
        return params[names[0]].astype(np.float32)
    q, scale = params[names[0]], params[names[1]].astype(np.float32)
    if dtype == "int8":
        return q.astype(np.float32) * scale
    k2, n = q.shape
    unpacked = np.stack([q & 15, q >> 4], axis=1).reshape(2 * k2, n).astype(np.float32) - 8
    return (unpacked.reshape(scale.shape[0], -1, n) * scale[:, None, :]).reshape(2 * k2, n)

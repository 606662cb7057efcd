"""The adapter blob: onnxruntime's own ``.onnx_adapter`` format, keyed by the graph's slot input names.

Using ORT's format (not our own) means a package also runs in plain onnxruntime with
``onnxruntime.LoraAdapter``, with no edgelora code on the device at all.

onnxruntime writes the blobs. edgelora reads them by mapping the file and viewing its parameters in
place: onnxruntime's reader (``AdapterFormat.read_adapter``) copies a blob into fresh memory, and the
page faults of that copy cost more than a whole mapped load, whose pages come in at first use
(docs/benchmarks.md); ``onnxruntime.LoraAdapter`` maps it too but hands out no values, and the runtime
binds them itself. A mapped blob would change under a resident adapter if
its file were rewritten in place; edgelora writes every blob to a new file renamed over the old one,
which leaves a mapped blob as it was.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgelora.errors import EdgeLoraError

from . import codec
from .factors import AdapterFactors, ModuleFactors
from .fileio import atomic_path
from .manifest import SlotGroup
from .slot_groups import factor_names, graph_factors, module_factors

SUFFIX = ".onnx_adapter"
# Bumped when the meaning of the parameters changes; ORT stores it in the file header.
ADAPTER_VERSION = 2  # 2: int8 b as plain integers


def adapter_parameters(factors: AdapterFactors, dtype: str = "fp32", block: int = 32,
                       groups: list[SlotGroup] = ()) -> dict[str, np.ndarray]:
    """The blob's parameters in a codec, for a graph with these slot groups; an adapter the codec cannot hold
    is refused naming its source."""
    if dtype == "int8":
        factors = replace(factors, modules={m: ModuleFactors(*codec.balance_int8(f.a, f.b))
                                            for m, f in factors.modules.items()})
    params = {}
    try:
        for name, factor in graph_factors(factors, list(groups)).items():
            params.update(codec.encode(name, factor, dtype, block))
    except EdgeLoraError as e:
        raise EdgeLoraError(f"{factors.source}: {e}") from None
    return params


def write_adapter(path: str | os.PathLike, factors: AdapterFactors, dtype: str = "fp32", block: int = 32,
                  groups: list[SlotGroup] = ()) -> int:
    """Write atomically in the given codec, for a graph with these slot groups; returns the file's size in bytes."""
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(ADAPTER_VERSION)
    fmt.set_model_version(1)
    params = adapter_parameters(factors, dtype, block, groups)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in params.items()})
    with atomic_path(path) as tmp:
        fmt.export_adapter(str(tmp))
    return Path(path).stat().st_size


# onnxruntime/lora/adapter_format/adapter_schema.fbs: the field slots of its two tables, and the tensor types
# of edgelora's codecs (fp32, fp16, int8, and int4 packed in uint8)
_IDENTIFIER, _FORMAT_VERSION = b"TORT", 1
_ADAPTER_FORMAT_VERSION, _ADAPTER_PARAMETERS = 0, 3
_PARAM_NAME, _PARAM_DIMS, _PARAM_TYPE, _PARAM_DATA = 0, 1, 2, 3
_TYPES = {1: np.dtype(np.float32), 2: np.dtype(np.uint8), 3: np.dtype(np.int8), 10: np.dtype(np.float16)}
_U32, _I32, _U16 = struct.Struct("<I"), struct.Struct("<i"), struct.Struct("<H")


def map_parameters(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All parameters of a blob as read-only views of the file mapped into memory (the arrays keep the
    mapping alive); any unreadable file becomes one clear error, whatever its bytes."""
    path = Path(path)
    if not path.is_file():
        raise EdgeLoraError(f"{path}: adapter file not found")
    if path.stat().st_size == 0:
        raise EdgeLoraError(f"{path}: adapter file is empty")
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        return _parameters(_Tables(buf))
    except (struct.error, ValueError, IndexError, UnicodeDecodeError) as e:
        raise EdgeLoraError(f"{path}: not a readable .onnx_adapter file ({e})") from None


def _parameters(fb: _Tables) -> dict[str, np.ndarray]:
    if fb.buf[4:8] != _IDENTIFIER:
        raise ValueError(f"no {_IDENTIFIER.decode()} file identifier")
    adapter = fb.fields(_U32.unpack_from(fb.buf, 0)[0])
    version = fb.int32(adapter[_ADAPTER_FORMAT_VERSION])
    if version != _FORMAT_VERSION:
        raise ValueError(f"adapter format version {version}, onnxruntime's is {_FORMAT_VERSION}")
    start, count = fb.vector(adapter[_ADAPTER_PARAMETERS], 4)
    params = {}
    for item in range(start, start + 4 * count, 4):
        param = fb.fields(item + _U32.unpack_from(fb.buf, item)[0])
        name_at, name_len = fb.vector(param[_PARAM_NAME], 1)
        name = fb.buf[name_at:name_at + name_len].decode("utf-8")
        dims_at, ndim = fb.vector(param[_PARAM_DIMS], 8)
        shape = struct.unpack_from(f"<{ndim}q", fb.buf, dims_at)
        dtype = _TYPES.get(fb.int32(param[_PARAM_TYPE]))
        if dtype is None:
            raise ValueError(f"parameter {name} has tensor type {fb.int32(param[_PARAM_TYPE])}, not one of edgelora's")
        if min(shape, default=0) < 0:
            raise ValueError(f"parameter {name} has negative dimensions {list(shape)}")
        data_at, size = fb.vector(param[_PARAM_DATA], 1)
        if size != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"parameter {name} holds {size} bytes for {list(shape)} {dtype}")
        params[name] = np.frombuffer(fb.buf, dtype, size // dtype.itemsize, data_at).reshape(shape)
    return params


class _Tables:
    """Field access into flatbuffer tables, by hand: the ``flatbuffers`` package's Python runtime costs
    more per parameter than onnxruntime's whole copy of a blob, which would undo the point of mapping it."""

    def __init__(self, buf: mmap.mmap):
        self.buf = buf

    def fields(self, table: int) -> list[int]:
        """Where each of a table's fields is (from its vtable), 0 for one the table leaves out (the default);
        padded with zeros, since a vtable may end before the schema's last fields."""
        vtable = table - _I32.unpack_from(self.buf, table)[0]
        if vtable < 0:
            raise ValueError(f"a table at {table} has its vtable before the file's start")
        size = _U16.unpack_from(self.buf, vtable)[0]
        offsets = struct.unpack_from(f"<{max(size - 4, 0) // 2}H", self.buf, vtable + 4)
        return [table + at if at else 0 for at in offsets] + [0] * 4

    def int32(self, at: int) -> int:
        return _I32.unpack_from(self.buf, at)[0] if at else 0

    def vector(self, at: int, width: int) -> tuple[int, int]:
        """(start, length) of a vector or string field, checked to lie inside the file."""
        if not at:
            raise ValueError("a required field is missing")
        at += _U32.unpack_from(self.buf, at)[0]
        count = _U32.unpack_from(self.buf, at)[0]
        if at + 4 + count * width > len(self.buf):
            raise ValueError(f"a vector of {count} items runs past the end of the file")
        return at + 4, count


def read_ort_parameters(path: str | os.PathLike) -> dict[str, ort.OrtValue]:
    """All parameters of a blob as onnxruntime values over the mapped file (no copy)."""
    return {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in map_parameters(path).items()}


def read_parameters(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All parameters of a blob as numpy arrays, copied out of the file, so that they outlive changes to it."""
    return {k: np.array(v, copy=True) for k, v in map_parameters(path).items()}


def read_adapter(path: str | os.PathLike, groups: list[SlotGroup] = ()) -> tuple[AdapterFactors, str]:
    """Back to per-module float factors (as the graph dequantizes them) and the blob's codec; a blob for a
    graph with slot groups needs them (``Manifest.slot_groups``).

    Used for compatibility checks, quality reports, compositions and round-trip tests.
    """
    params = read_parameters(path)
    dtype = codec.dtype_of(params)
    names = sorted({codec.tensor_of(name, dtype) for name in params})
    stray = sorted(set(params) - {p for t in names for p in codec.param_names(t, dtype)})
    if stray:  # e.g. the column scales of an int8 b, which edgelora before format 3 wrote
        raise EdgeLoraError(f"{path}: unexpected parameter {stray[0]}; was the blob written by another "
                            "edgelora version? export it again")
    tensors = {}
    for name in names:
        if not name.endswith((".lora_A", ".lora_B")):
            raise EdgeLoraError(f"{path}: unexpected parameter {name}")
        pair = factor_names(name.rsplit(".", 1)[0])
        missing = [n for t in pair for n in codec.param_names(t, dtype) if n not in params]
        if missing:
            raise EdgeLoraError(f"{path}: slot {pair[0][: -len('.lora_A')]} lacks parameter {missing[0]}")
        tensors[name] = codec.decode(name, params, dtype)
    modules = module_factors(tensors, list(groups), str(path))
    rank = max((f.rank for f in modules.values()), default=0)
    factors = AdapterFactors(modules=modules, rank=rank, alpha=float("nan"), source=str(path))
    factors.validate(str(path))
    return factors, dtype

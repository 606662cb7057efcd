"""The adapter blob: onnxruntime's own ``.onnx_adapter`` format, keyed by the graph's slot input names.

Using ORT's format (not our own) means a package also runs in plain onnxruntime with
``onnxruntime.LoraAdapter``, with no edgelora code on the device at all.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort

from . import codec
from .errors import EdgeLoraError
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


def read_ort_parameters(path: str | os.PathLike) -> tuple[dict[str, ort.OrtValue], ort.AdapterFormat]:
    """All parameters of a blob as onnxruntime values, and the reader that owns their memory (keep it
    alive as long as them); any unreadable file becomes one clear error."""
    path = Path(path)
    if not path.is_file():
        raise EdgeLoraError(f"{path}: adapter file not found")
    if path.stat().st_size == 0:
        raise EdgeLoraError(f"{path}: adapter file is empty")
    try:
        fmt = ort.AdapterFormat.read_adapter(str(path))
        return fmt.get_parameters(), fmt
    except Exception as e:  # ORT raises bare RuntimeErrors with multi-line messages
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EdgeLoraError(f"{path}: not a readable .onnx_adapter file ({first})") from None


def read_parameters(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All parameters of a blob as numpy arrays (copies: the values' memory dies with their reader)."""
    params, _reader = read_ort_parameters(path)
    return {k: np.array(v.numpy(), copy=True) for k, v in params.items()}


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

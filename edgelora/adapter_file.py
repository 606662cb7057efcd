"""The adapter blob: onnxruntime's own ``.onnx_adapter`` format, keyed by the graph's slot input names.

Using ORT's format (not our own) means a package also runs in plain onnxruntime with
``onnxruntime.LoraAdapter``, with no edgelora code on the device at all.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from . import codec
from .errors import EdgeLoraError
from .factors import AdapterFactors, ModuleFactors
from .fileio import atomic_path

SUFFIX = ".onnx_adapter"
# Bumped when the meaning of the parameters changes; ORT stores it in the file header.
ADAPTER_VERSION = 1


def slot_inputs(module: str) -> tuple[str, str]:
    """The float factors of a module's slot inside the graph: ``a`` [in, r] and ``b`` [r, out].

    With fp32 slots these are the graph inputs; other codecs feed them through ``codec.param_names``.
    """
    return f"{module}.lora_A", f"{module}.lora_B"


def adapter_parameters(factors: AdapterFactors, dtype: str = "fp32", block: int = 32) -> dict[str, np.ndarray]:
    """The blob's parameters in a codec; an adapter the codec cannot hold is refused naming its source."""
    params = {}
    try:
        for module, f in factors.modules.items():
            a_name, b_name = slot_inputs(module)
            params.update(codec.encode(a_name, f.a, dtype, block))
            params.update(codec.encode(b_name, f.b, dtype, block))
    except EdgeLoraError as e:
        raise EdgeLoraError(f"{factors.source}: {e}") from None
    return params


def write_adapter(path: str | os.PathLike, factors: AdapterFactors, dtype: str = "fp32", block: int = 32) -> int:
    """Write atomically in the given codec; returns the file's size in bytes."""
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(ADAPTER_VERSION)
    fmt.set_model_version(1)
    params = adapter_parameters(factors, dtype, block)
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


def read_adapter(path: str | os.PathLike) -> tuple[AdapterFactors, str]:
    """Back to float factors (as the graph dequantizes them) and the blob's codec.

    Used for compatibility checks, quality reports and round-trip tests.
    """
    params = read_parameters(path)
    dtype = codec.dtype_of(params)
    tensors = {codec.tensor_of(name, dtype) for name in params}
    modules = {}
    for tensor in sorted(tensors):
        if not tensor.endswith((".lora_A", ".lora_B")):
            raise EdgeLoraError(f"{path}: unexpected parameter {tensor}")
        module = tensor.rsplit(".", 1)[0]
        if module in modules:
            continue
        expected = [n for t in slot_inputs(module) for n in codec.param_names(t, dtype)]
        missing = [n for n in expected if n not in params]
        if missing:
            raise EdgeLoraError(f"{path}: module {module} lacks parameter {missing[0]}")
        a, b = (codec.decode(t, params, dtype) for t in slot_inputs(module))
        modules[module] = ModuleFactors(a, b)
    rank = max((f.rank for f in modules.values()), default=0)
    factors = AdapterFactors(modules=modules, rank=rank, alpha=float("nan"), source=str(path))
    factors.validate(str(path))
    return factors, dtype

"""The adapter blob: onnxruntime's own ``.onnx_adapter`` format, keyed by the graph's slot input names.

Using ORT's format (not our own) means a package also runs in plain onnxruntime with
``onnxruntime.LoraAdapter``, with no edgelora code on the device at all.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .errors import EdgeLoraError
from .factors import AdapterFactors, ModuleFactors
from .fileio import atomic_path

SUFFIX = ".onnx_adapter"
# Bumped when the meaning of the parameters changes; ORT stores it in the file header.
ADAPTER_VERSION = 1


def slot_inputs(module: str) -> tuple[str, str]:
    """Graph input names of a module's slot: the ``a`` [in, r] and ``b`` [r, out] factors."""
    return f"{module}.lora_A", f"{module}.lora_B"


def adapter_parameters(factors: AdapterFactors) -> dict[str, np.ndarray]:
    params = {}
    for module, f in factors.modules.items():
        a_name, b_name = slot_inputs(module)
        params[a_name] = np.ascontiguousarray(f.a, dtype=np.float32)
        params[b_name] = np.ascontiguousarray(f.b, dtype=np.float32)
    return params


def write_adapter(path: str | os.PathLike, factors: AdapterFactors) -> int:
    """Write atomically; returns the file's size in bytes."""
    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(ADAPTER_VERSION)
    fmt.set_model_version(1)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in adapter_parameters(factors).items()})
    with atomic_path(path) as tmp:
        fmt.export_adapter(str(tmp))
    return Path(path).stat().st_size


def read_parameters(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All parameters of a blob as numpy arrays; any unreadable file becomes one clear error."""
    path = Path(path)
    if not path.is_file():
        raise EdgeLoraError(f"{path}: adapter file not found")
    if path.stat().st_size == 0:
        raise EdgeLoraError(f"{path}: adapter file is empty")
    try:
        fmt = ort.AdapterFormat.read_adapter(str(path))
        # numpy() views the OrtValue's buffer, which dies with ``fmt``: copy before it goes
        return {k: v.numpy().copy() for k, v in fmt.get_parameters().items()}
    except Exception as e:  # ORT raises bare RuntimeErrors with multi-line messages
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EdgeLoraError(f"{path}: not a readable .onnx_adapter file ({first})") from None


def read_adapter(path: str | os.PathLike) -> AdapterFactors:
    """Back to factors, for add-adapter checks, composition and round-trip tests."""
    params = read_parameters(path)
    modules = {}
    for name in params:
        if name.endswith(".lora_A"):
            module = name[: -len(".lora_A")]
            b_name = slot_inputs(module)[1]
            if b_name not in params:
                raise EdgeLoraError(f"{path}: parameter {name} has no matching {b_name}")
            modules[module] = ModuleFactors(params[name], params[b_name])
        elif not name.endswith(".lora_B"):
            raise EdgeLoraError(f"{path}: unexpected parameter {name}")
    if len(modules) * 2 != len(params):
        raise EdgeLoraError(f"{path}: some lora_B parameters have no matching lora_A")
    rank = max((f.rank for f in modules.values()), default=0)
    factors = AdapterFactors(modules=modules, rank=rank, alpha=float("nan"), source=str(path))
    factors.validate(str(path))
    return factors

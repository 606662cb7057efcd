"""PEFT LoRA folder → plain factors (``edgelora.format.factors``), resolving every scaling rule the way PEFT does.

PEFT is the reference, so its own pattern resolver (``get_pattern_key``) decides which
``rank_pattern``/``alpha_pattern`` entry applies to a module.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from edgelora.errors import EdgeLoraError
from edgelora.format.factors import AdapterFactors, ModuleFactors
from edgelora.format.fileio import read_object

CONFIG = "adapter_config.json"
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
# PEFT saves "base_model.model.<module>.lora_A.weight" (on an embedding: ".lora_embedding_A", a bare
# parameter); older versions kept the adapter name ("...lora_A.default.weight").
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
_EMBEDDING_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_embedding_(?P<ab>[AB])(?:\.[^.]+)?$")
# Tensors that are not a low-rank delta: merged mode folds them in with PEFT's own merge_and_unload,
# separate mode refuses them. Checked in order (after modules_to_save); the first match names the feature.
_MERGE_ONLY = (
    (re.compile(r"\.lora_magnitude_vector(\.[^.]+)?(\.weight)?$"), "DoRA"),
    (re.compile(r"\.lora_B(\.[^.]+)?\.bias$"), "lora_bias"),
    (re.compile(r"(\.base_layer\.weight|embed_tokens\.weight|\.wte\.weight)$"),
     "a full copy of an embedding (save_embedding_layers)"),
)


def read_config(folder: Path) -> dict:
    path = folder / CONFIG
    config = read_object(path, f"missing; {folder} is not a PEFT adapter folder")
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise EdgeLoraError(f"{path}: peft_type {config.get('peft_type')!r} is not supported; only LORA is")
    if config.get("trainable_token_indices"):
        raise EdgeLoraError(f"{path}: trainable_token_indices is not supported yet (it is not a pure low-rank delta)")
    check_positive(config.get("r"), "r", path, integer=True)
    check_positive(config.get("lora_alpha"), "lora_alpha", path)
    for key, integer in (("rank_pattern", True), ("alpha_pattern", False)):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict):
            raise EdgeLoraError(f"{path}: {key} must be a mapping")
        for module, value in pattern.items():
            check_positive(value, f"{key}[{module!r}]", path, integer)
            try:
                re.compile(rf"(.*\.)?({module})$")
            except re.error as e:
                raise EdgeLoraError(f"{path}: {key} key {module!r} is not a valid pattern ({e})") from None
    return config


def merge_only_feature(key: str, config: dict) -> str | None:
    """The PEFT feature a non-LoRA tensor belongs to, if merged mode can take it."""
    module = key.removeprefix("base_model.model.").rsplit(".", 1)[0]
    if any(module == m or module.endswith("." + m) for m in config.get("modules_to_save") or []):
        return "modules_to_save"
    for pattern, label in _MERGE_ONLY:
        if pattern.search(key):
            return label
    if key.endswith(".bias") and config.get("bias", "none") != "none":
        return f"bias={config['bias']!r}"
    return None


def check_positive(value, what: str, path: Path, integer: bool = False) -> None:
    """Ranks and alphas scale every weight: a string, a bool, NaN, Inf or a sign flip would poison them all."""
    number = isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or value <= 0:
        kind = "an integer" if integer else "finite"
        raise EdgeLoraError(f"{path}: {what} must be a positive number, {kind}, got {value!r}")


def read_weights(folder: Path) -> dict[str, np.ndarray]:
    """float32 arrays from safetensors (bf16/fp16 included) or a legacy ``.bin`` read without pickle."""
    import torch

    for name in WEIGHTS:
        path = folder / name
        if path.is_file():
            break
    else:
        raise EdgeLoraError(f"{folder}: no {' or '.join(WEIGHTS)} found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(path))
        else:
            tensors = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise EdgeLoraError(f"{path}: cannot read the adapter weights ({first})") from None
    if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in tensors.items()):
        raise EdgeLoraError(f"{path}: expected a flat mapping of tensor names to tensors")
    for key, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise EdgeLoraError(f"{path}: tensor {key} is {tensor.dtype}, expected a float type")
    return {k: v.detach().to(torch.float32).numpy() for k, v in tensors.items()}


def pattern_value(pattern: dict | None, module: str, default):
    """A module's entry in ``rank_pattern``/``alpha_pattern`` by PEFT's own matcher; PEFT is imported only when
    there is a pattern to match (importing it costs seconds, most of an ``add-adapter``)."""
    if not pattern:
        return default
    from peft.utils.other import get_pattern_key

    return pattern.get(get_pattern_key(pattern.keys(), module), default)


def module_scale(config: dict, module: str, rank: int, where: str) -> tuple[float, float]:
    """(scale, alpha) of one module: alpha/r, or alpha/√r with rsLoRA, patterns resolved as PEFT does."""
    expected_r = pattern_value(config.get("rank_pattern"), module, config["r"])
    if expected_r != rank:
        raise EdgeLoraError(f"{where}: module {module} has rank {rank} in the weights but {expected_r} in the config")
    alpha = float(pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"]))
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return scale, alpha


def ingest_peft(folder: str | Path, merged: bool = False) -> AdapterFactors:
    """The adapter's low-rank factors; with ``merged`` it may also carry what only a merge can take.

    Those parts (DoRA magnitudes, biases, modules_to_save copies) are listed in
    ``extra["merge_only"]``; merged mode folds the whole adapter in with PEFT from the folder.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise EdgeLoraError(f"{folder}: adapter folder not found")
    config = read_config(folder)
    weights = read_weights(folder)
    pairs: dict[str, dict[str, np.ndarray]] = {}
    # a DoRA config without magnitudes would make PEFT compute them from the base: still not low-rank
    merge_only = {"DoRA": f"use_dora in {CONFIG}"} if config.get("use_dora") else {}
    for key, tensor in weights.items():
        m = _KEY.match(key) or _EMBEDDING_KEY.match(key)
        if m is not None:
            pairs.setdefault(m["module"], {})[m["ab"]] = tensor
            continue
        feature = merge_only_feature(key, config)
        if feature is None:
            raise EdgeLoraError(f"{folder}: unexpected tensor {key} in the adapter weights")
        merge_only.setdefault(feature, key)
    if merge_only and not merged:
        feature, key = next(iter(sorted(merge_only.items())))
        raise EdgeLoraError(
            f"{folder}: {feature} is not a low-rank delta ({key}), so it cannot be a swappable slot; "
            "export this adapter with --mode merged"
        )
    modules = {}
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise EdgeLoraError(f"{folder}: module {module} has lora_{''.join(ab)} but not both lora_A and lora_B")
        a, b = ab["A"], ab["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise EdgeLoraError(
                f"{folder}: module {module} has lora_A {a.shape} and lora_B {b.shape}; expected [r, in] and [out, r]"
            )
        scale, _ = module_scale(config, module, a.shape[0], str(folder / CONFIG))
        modules[module] = ModuleFactors(np.ascontiguousarray(a.T), np.ascontiguousarray((b * scale).T))
    factors = AdapterFactors(
        modules=modules,
        rank=max((f.rank for f in modules.values()), default=0),
        alpha=float(config["lora_alpha"]),
        source=str(folder),
        extra={"base_model": config.get("base_model_name_or_path"), "use_rslora": bool(config.get("use_rslora")),
               "merge_only": sorted(merge_only)},
    )
    factors.validate(str(folder))
    return factors


def source_bytes(folder: str | Path) -> int:
    """Bytes of the PEFT weights file, the size users compare the blob against."""
    for name in WEIGHTS:
        if (Path(folder) / name).is_file():
            return (Path(folder) / name).stat().st_size
    return 0

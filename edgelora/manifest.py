"""``edgelora.json``: what a package holds, read by the runtime before it touches any graph or blob."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import __version__
from .errors import EdgeLoraError
from .fileio import check_name, read_json_object, write_text_atomic

FILENAME = "edgelora.json"
FORMAT_VERSION = 1


@dataclass
class Slot:
    """One LoRA slot of the graph: a target module whose delta enters through two graph inputs."""

    name: str  # the module path in the base model, e.g. model.layers.0.self_attn.q_proj
    a: str  # the float [in, r] factor in the graph; its graph inputs are codec.param_names(a, dtype)
    b: str  # the float [r, out] factor, scale folded in
    in_features: int
    out_features: int
    dtype: str = "fp32"


@dataclass
class AdapterEntry:
    file: str  # relative to the package
    sha256: str
    bytes: int
    rank: int
    alpha: float
    dtype: str
    source: str
    source_bytes: int
    modules: list[str]


@dataclass
class Manifest:
    family: str
    architecture: str
    task: str
    base_fingerprint: str
    graph: dict  # file, inputs, outputs, num_layers, num_kv_heads, head_dim, vocab_size
    slots: list[Slot]
    adapters: dict[str, AdapterEntry] = field(default_factory=dict)
    generation: dict = field(default_factory=dict)  # eos_token_ids, bos_token_id, pad_token_id
    tokenizer: str | None = None
    mode: str = "separate"  # or "merged": adapters[NAME].file is then merged/NAME/model.onnx
    adapter_dtype: str = "fp32"  # the codec every slot takes (edgelora.codec)
    adapter_block_size: int = 32  # int4 block along the reduction axis
    base_quantization: str = "none"
    base_bytes: int = 0
    quality: dict = field(default_factory=dict)  # per adapter ("" = the base): dtype, delta_rel_error, top1_agreement
    base_source: str = ""
    format_version: int = FORMAT_VERSION
    created_by: str = f"edgelora {__version__}"

    def slot_map(self) -> dict[str, Slot]:
        return {s.name: s for s in self.slots}

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False) + "\n"

    def save(self, package: str | os.PathLike) -> None:
        write_text_atomic(Path(package) / FILENAME, self.to_json())


def load_manifest(package: str | os.PathLike) -> Manifest:
    path = Path(package) / FILENAME
    if not Path(package).is_dir():
        raise EdgeLoraError(f"{package}: not a package directory")
    raw = read_json_object(path, f"missing; is {package} an edgelora package?")
    version = raw.get("format_version")
    if not isinstance(version, int):
        raise EdgeLoraError(f"{path}: format_version is missing or not an integer")
    if version > FORMAT_VERSION:
        raise EdgeLoraError(
            f"{path}: format version {version} is newer than this edgelora reads ({FORMAT_VERSION}); upgrade edgelora"
        )
    try:
        slots = [Slot(**s) for s in raw.pop("slots")]
        adapters = {check_name(k): AdapterEntry(**v) for k, v in raw.pop("adapters", {}).items()}
        manifest = Manifest(slots=slots, adapters=adapters, **raw)
    except EdgeLoraError as e:
        raise EdgeLoraError(f"{path}: {e}") from None
    except (KeyError, TypeError) as e:
        raise EdgeLoraError(f"{path}: malformed manifest ({e})") from None
    for name, entry in manifest.adapters.items():
        if Path(entry.file).is_absolute() or ".." in Path(entry.file).parts:
            raise EdgeLoraError(f"{path}: adapter {name} points outside the package ({entry.file})")
    return manifest

"""``edgelora.json``: what a package holds, read by the runtime before it touches any graph or blob."""

from __future__ import annotations

import json
import os
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from types import UnionType
from typing import Union, get_args, get_origin, get_type_hints

from edgelora import __version__
from edgelora.errors import EdgeLoraError

from .fileio import check_name, read_object, write_text_atomic

FILENAME = "edgelora.json"
FORMAT_VERSION = 3  # 2: slot groups; 3: int8 b as plain integers, its scales in a's (fp32)


@dataclass
class Slot:
    """One LoRA slot of the graph: a target module whose delta enters through two graph inputs."""

    name: str  # the module path in the base model, e.g. model.layers.0.self_attn.q_proj
    a: str  # the float [in, r] factor in the graph; its graph inputs are codec.param_names(a, dtype);
    # in a slot group, the group's (shared by its slots)
    b: str  # the float [r, out] factor, scale folded in
    in_features: int
    out_features: int
    dtype: str = "fp32"


@dataclass
class SlotGroup:
    """Slots of modules that read one input and whose outputs the graph packs side by side (q|k|v, gate|up),
    computed as one pair of products (``edgelora.format.slot_groups``): ``a`` holds the modules' factors side by
    side along the rank axis, one block of equal rank each, and ``b`` their output columns in equal tiles."""

    a: str  # the float [in, modules * r] factor in the graph
    b: str  # the float [tiles, r, tile] factor
    modules: list[str]  # in the order of their rank blocks
    offsets: list[int]  # the column where each module's output starts in the packed output
    widths: list[int]  # each module's output width
    width: int  # the packed output's width, which may hold modules without a slot


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
class Quality:
    """What quantization cost one adapter (or the base), measured at export against fp32 PyTorch on a probe batch."""

    dtype: str
    delta_rel_error: float | None = None  # of the stored delta; None for the base and for merged adapters
    top1_agreement: float | None = None  # causal LMs: greedy tokens that agree
    min_cosine: float | None = None  # embedding models: the least cosine between the two outputs
    probe: str | None = None  # what was run: random ids, or a probe file and how many tokens it scored


@dataclass
class Manifest:
    family: str
    architecture: str
    task: str
    base_fingerprint: str
    graph: dict  # file, inputs, outputs, num_layers, num_kv_heads, head_dim, vocab_size
    slots: list[Slot]
    slot_groups: list[SlotGroup] = field(default_factory=list)
    adapters: dict[str, AdapterEntry] = field(default_factory=dict)
    generation: dict = field(default_factory=dict)  # eos_token_ids, bos_token_id, pad_token_id
    tokenizer: str | None = None
    mode: str = "separate"  # or "merged": adapters[NAME].file is then merged/NAME/model.onnx
    adapter_dtype: str = "fp32"  # the codec every slot takes (edgelora.format.codec)
    adapter_block_size: int = 32  # int4 block along the reduction axis
    base_quantization: str = "none"
    base_bytes: int = 0
    quality: dict[str, Quality] = field(default_factory=dict)  # per adapter ("" = the base)
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
    """The manifest, every field checked against its type and every path in it kept inside the package."""
    path = Path(package) / FILENAME
    if not Path(package).is_dir():
        raise EdgeLoraError(f"{package}: not a package directory")
    raw = read_object(path, f"missing; is {package} an edgelora package?")
    version = raw.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise EdgeLoraError(f"{path}: format_version is missing or not an integer")
    if version > FORMAT_VERSION:
        raise EdgeLoraError(
            f"{path}: format version {version} is newer than this edgelora reads ({FORMAT_VERSION}); upgrade edgelora"
        )
    manifest = _typed(Manifest, raw, f"{path}: ")
    for name in manifest.adapters:
        try:
            check_name(name)
        except EdgeLoraError as e:
            raise EdgeLoraError(f"{path}: {e}") from None
    if not isinstance(manifest.graph.get("file"), str):
        raise EdgeLoraError(f"{path}: graph.file is missing or not a string")
    files = [("graph", manifest.graph["file"]), ("tokenizer", manifest.tokenizer)]
    files += [(f"adapter {name}", entry.file) for name, entry in manifest.adapters.items()]
    for what, file in files:
        if file is not None and not inside(Path(package), file):
            raise EdgeLoraError(f"{path}: {what} points outside the package ({file})")
    return manifest


def inside(package: Path, file: str) -> bool:
    """A relative path that stays in the package, symlinks resolved: no manifest can make us read elsewhere."""
    if not file or "\0" in file or Path(file).is_absolute() or ".." in Path(file).parts:
        return False
    return (package / file).resolve().is_relative_to(package.resolve())


def _typed(cls, raw, where: str):
    """A dataclass from JSON with every field checked against its annotation, so bad types fail here, by name."""
    if not isinstance(raw, dict):
        raise EdgeLoraError(f"{where.rstrip(': .')}: expected a JSON object")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise EdgeLoraError(f"{where}{unknown[0]}: unknown field")
    for f in known.values():
        if f.name not in raw and f.default is MISSING and f.default_factory is MISSING:
            raise EdgeLoraError(f"{where}{f.name}: missing field")
    hints = get_type_hints(cls)
    return cls(**{key: _value(hints[key], value, f"{where}{key}") for key, value in raw.items()})


def _value(hint, value, where: str):
    origin, args = get_origin(hint), get_args(hint)
    if is_dataclass(hint):
        return _typed(hint, value, where + ".")
    if origin in (Union, UnionType):
        if value is None and type(None) in args:
            return None
        return _value(next(a for a in args if a is not type(None)), value, where)
    if origin is list:
        if not isinstance(value, list):
            raise EdgeLoraError(f"{where}: expected a list, got {type(value).__name__}")
        return [_value(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise EdgeLoraError(f"{where}: expected an object, got {type(value).__name__}")
        return {k: _value(args[1], v, f"{where}.{k}") for k, v in value.items()} if args else value
    accepted = (int, float) if hint is float else hint
    if not isinstance(value, accepted) or isinstance(value, bool) and hint is not bool:
        raise EdgeLoraError(f"{where}: expected {hint.__name__}, got {value!r}"[:200])
    return float(value) if hint is float else value

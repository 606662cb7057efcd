"""``NAME.json`` beside ``NAME.onnx_adapter``: which base a blob was built for, once it leaves its package.

Inside a package the manifest ties adapters to the base. A blob copied to a device on its own
loses that tie; the sidecar carries it along, so the runtime can refuse an adapter for another
base by fingerprint instead of by luck (two bases of the same shape accept each other's blobs).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from edgelora.errors import EdgeLoraError

from .fileio import read_object, write_text_atomic


def sidecar_path(blob: str | os.PathLike) -> Path:
    blob = Path(blob)
    return blob.with_name(blob.name.removesuffix(".onnx_adapter") + ".json")


def write_sidecar(blob: str | os.PathLike, base_fingerprint: str, sha256: str) -> Path:
    path = sidecar_path(blob)
    write_text_atomic(path, json.dumps({"base_fingerprint": base_fingerprint, "sha256": sha256}, indent=2) + "\n")
    return path


def read_sidecar(blob: str | os.PathLike) -> dict | None:
    """The sidecar's fields, or None when the blob has none (then only shapes can be checked)."""
    path = sidecar_path(blob)
    if not path.is_file():
        return None
    raw = read_object(path, "missing")
    if not isinstance(raw.get("base_fingerprint"), str):
        raise EdgeLoraError(f"{path}: expected a JSON object with a base_fingerprint string")
    return raw

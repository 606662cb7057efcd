"""The files a package holds besides its graph: adapter blobs with their sidecars and manifest entries,
and the tokenizer files copied from the base folder. Shared by ``export`` and ``add-adapter``, so a blob
written by either is the same file with the same entry.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from edgelora.format.adapter_file import SUFFIX, write_adapter
from edgelora.format.factors import AdapterFactors
from edgelora.format.fileio import sha256_file
from edgelora.format.manifest import AdapterEntry, Slot, SlotGroup
from edgelora.format.sidecar import write_sidecar

from .peft_ingest import source_bytes

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
)


def write_adapter_entry(package: Path, name: str, factors: AdapterFactors, source: Path, dtype: str,
                        block: int, fingerprint: str, groups: list[SlotGroup]) -> AdapterEntry:
    """The blob, its ``NAME.json`` sidecar (base fingerprint, sha256: the blob stays checkable when copied
    out of the package on its own) and its manifest entry."""
    rel = f"adapters/{name}{SUFFIX}"
    size = write_adapter(package / rel, factors, dtype, block, groups)
    digest = sha256_file(package / rel)
    write_sidecar(package / rel, fingerprint, digest)
    return AdapterEntry(
        file=rel,
        sha256=digest,
        bytes=size,
        rank=factors.rank,
        alpha=factors.alpha,
        dtype=dtype,
        source=str(source),
        source_bytes=source_bytes(source),
        modules=sorted(factors.modules),
    )


def grouped_slots(slots: list[Slot], groups: list[SlotGroup]) -> list[Slot]:
    """The slots, those in a group pointing at the group's graph factors."""
    group_of = {module: group for group in groups for module in group.modules}
    return [dataclasses.replace(s, a=group_of[s.name].a, b=group_of[s.name].b) if s.name in group_of else s
            for s in slots]


def graph_bytes(graph_path: Path) -> int:
    data = graph_path.with_name(graph_path.name + ".data")
    return graph_path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def copy_tokenizer(base_dir: Path, package: Path) -> str | None:
    """Copy the base's tokenizer files; the manifest's ``tokenizer`` (the file the runtime reads), or None."""
    tokenizer = None
    for fname in TOKENIZER_FILES:
        if (base_dir / fname).is_file():
            shutil.copy2(base_dir / fname, package / fname)
            tokenizer = tokenizer or ("tokenizer.json" if fname == "tokenizer.json" else None)
    return tokenizer

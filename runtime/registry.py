"""Resident adapters: loaded on first use (memory-mapped by onnxruntime), checked once, evicted LRU.

The registry is shared by every thread of one ``EdgeModel``; a call takes a reference to the
adapter it runs with, so an eviction during that call cannot pull the weights from under it.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

from edgelora.adapter_file import read_adapter
from edgelora.errors import EdgeLoraError
from edgelora.fileio import check_name, sha256_file
from edgelora.manifest import AdapterEntry, Slot


@dataclass
class ResidentAdapter:
    name: str
    path: Path
    ort_adapter: ort.LoraAdapter
    bytes: int
    rank: int
    load_ms: float


class AdapterRegistry:
    def __init__(self, package: Path, entries: dict[str, AdapterEntry], slots: list[Slot],
                 memory_budget_bytes: int | None = None, verify: bool = True):
        self.package = package
        self.entries = dict(entries)
        self.paths: dict[str, Path] = {}
        self.slots = {s.name: s for s in slots}
        self.budget = memory_budget_bytes
        self.verify = verify
        self._resident: OrderedDict[str, ResidentAdapter] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0

    def names(self) -> list[str]:
        return sorted(set(self.entries) | set(self.paths))

    def register_path(self, path: Path, name: str) -> None:
        check_name(name)
        if not path.is_file():
            raise EdgeLoraError(f"{path}: adapter file not found")
        with self._lock:
            self.paths[name] = path
            self._resident.pop(name, None)

    def get(self, name: str) -> ResidentAdapter:
        with self._lock:
            resident = self._resident.get(name)
            if resident is not None:
                self._resident.move_to_end(name)
                self.hits += 1
                return resident
        resident = self._load(name)
        with self._lock:
            self.misses += 1
            self._resident[name] = resident
            self._resident.move_to_end(name)
            self._evict(keep=name)
        return resident

    def unload(self, name: str) -> None:
        with self._lock:
            if self._resident.pop(name, None) is None and name not in self.paths:
                raise EdgeLoraError(f"adapter {name} is not loaded")
            self.paths.pop(name, None)

    def resident_bytes(self) -> int:
        with self._lock:
            return sum(r.bytes for r in self._resident.values())

    def stats(self) -> dict:
        with self._lock:
            return {
                "resident": list(self._resident),
                "resident_bytes": sum(r.bytes for r in self._resident.values()),
                "budget_bytes": self.budget,
                "hits": self.hits,
                "misses": self.misses,
                "evictions": self.evictions,
                "load_ms": {n: round(r.load_ms, 3) for n, r in self._resident.items()},
            }

    def _evict(self, keep: str) -> None:
        if self.budget is None:
            return
        while sum(r.bytes for r in self._resident.values()) > self.budget and len(self._resident) > 1:
            victim = next(n for n in self._resident if n != keep)
            del self._resident[victim]
            self.evictions += 1

    def _load(self, name: str) -> ResidentAdapter:
        t0 = time.perf_counter()
        if name in self.paths:
            path, entry = self.paths[name], None
        elif name in self.entries:
            entry = self.entries[name]
            path = self.package / entry.file
        else:
            known = ", ".join(self.names()) or "none"
            raise EdgeLoraError(f"unknown adapter {name!r}; this package has: {known}")
        if not path.is_file():
            raise EdgeLoraError(f"{path}: adapter {name} is in the manifest but its file is missing")
        if entry is not None and self.verify:
            if path.stat().st_size != entry.bytes:
                raise EdgeLoraError(
                    f"{path}: adapter {name} is {path.stat().st_size} bytes, the manifest says {entry.bytes} (truncated?)"
                )
            if sha256_file(path) != entry.sha256:
                raise EdgeLoraError(f"{path}: adapter {name} fails its sha256 check against the manifest")
        rank = self._check_shapes(name, path)
        adapter = ort.LoraAdapter()
        adapter.Load(str(path))
        return ResidentAdapter(name, path, adapter, path.stat().st_size, rank, (time.perf_counter() - t0) * 1e3)

    def _check_shapes(self, name: str, path: Path) -> int:
        factors, dtype = read_adapter(path)
        for module, f in factors.modules.items():
            slot = self.slots.get(module)
            if slot is None:
                raise EdgeLoraError(f"{path}: adapter {name} targets {module}, which has no LoRA slot in this graph")
            if dtype != slot.dtype:
                raise EdgeLoraError(f"{path}: adapter {name} holds {dtype} factors but the graph's slots take {slot.dtype}")
            if (f.in_features, f.out_features) != (slot.in_features, slot.out_features):
                raise EdgeLoraError(
                    f"{path}: adapter {name} has {module} factors {f.a.shape} x {f.b.shape}, but the slot takes "
                    f"[{slot.in_features}, r] x [r, {slot.out_features}]; is it for another base model?"
                )
        return factors.rank

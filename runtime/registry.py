"""Resident adapters: loaded on first use (the blob mapped into memory, not copied), checked once, evicted LRU.

The registry is shared by every thread of one ``EdgeModel``; a call takes a reference to the
adapter it runs with, so an eviction during that call cannot pull the weights from under it.
Single adapters and compositions live in the same LRU under the same byte budget: a composition
is just another blob, built once from its parts' files.

A blob's sha256 costs more than its load (docs/benchmarks.md), so it is kept off
the request path: ``verify_in_background`` hashes the package's adapters from ``open`` on, and a
request that arrives first waits for (or runs) that one check. A passed check is remembered with the
file's identity (inode, size, mtime, ctime); a file that changes afterwards is checked again.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgelora.errors import EdgeLoraError, UnknownAdapterError
from edgelora.format.adapter_file import adapter_parameters, map_parameters, read_adapter
from edgelora.format.compatibility import check_fits
from edgelora.format.fileio import check_name, sha256_file
from edgelora.format.manifest import AdapterEntry, Slot, SlotGroup
from edgelora.format.sidecar import read_sidecar

from .binding import BindingPool
from .composition import Spec, compose, label, normalize


@dataclass
class ResidentAdapter:
    name: str  # a package or path adapter's name, or a composition's label
    spec: Spec
    bindings: BindingPool  # the session with this adapter's parameters bound (their values keep their memory)
    params: dict[str, np.ndarray]  # the same parameters, for the batching engine to join with other adapters'
    bytes: int
    rank: int
    load_ms: float


class AdapterRegistry:
    def __init__(self, session: ort.InferenceSession, package: Path, entries: dict[str, AdapterEntry],
                 slots: list[Slot], memory_budget_bytes: int | None = None, verify: bool = True,
                 base_fingerprint: str | None = None, block_size: int = 32, groups: list[SlotGroup] = ()):
        self.session = session
        self.package = package
        self.groups = list(groups)
        # compositions are stored as the slots take them
        self.codec = (slots[0].dtype if slots else "fp32", block_size, self.groups)
        self.entries = dict(entries)
        self.paths: dict[str, Path] = {}
        self.slots = {s.name: s for s in slots}
        self.budget = memory_budget_bytes
        self.verify = verify
        self.base_fingerprint = base_fingerprint
        self._resident: OrderedDict[str, ResidentAdapter] = OrderedDict()
        self._pinned: set[str] = set()
        self._checked: dict[str, tuple[int, tuple]] = {}  # name -> (rank, file identity) once its checks passed
        self._checking: dict[str, threading.Lock] = {}
        self._building: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0

    def names(self) -> list[str]:
        return sorted(set(self.entries) | set(self.paths))

    def verify_in_background(self) -> threading.Thread:
        """Check every package adapter now, in a daemon thread, so first loads find them checked.

        A bad blob is skipped here; its request runs the check again and gets the error.
        """
        def run():
            for name in sorted(self.entries):
                try:
                    self._checked_path(name)
                except EdgeLoraError:
                    pass

        thread = threading.Thread(target=run, name="edgelora-verify", daemon=True)
        thread.start()
        return thread

    def register_path(self, path: Path, name: str) -> None:
        check_name(name)
        if not path.is_file():
            raise EdgeLoraError(f"{path}: adapter file not found")
        with self._lock:
            self.paths[name] = path
            self._forget(name)

    def resolve(self, adapter) -> ResidentAdapter | None:
        """The resident blob for an adapter spec (None for the base), loading or composing it on a miss."""
        spec = normalize(adapter)
        if not spec:
            return None
        key = label(spec)
        with self._lock:
            resident = self._hit(key)
            if resident is not None:
                return resident
            building = self._building.setdefault(key, threading.Lock())
        with building:  # one thread builds a given spec; the others wait for it and then hit
            with self._lock:
                resident = self._hit(key)
                if resident is not None:
                    return resident
            try:
                resident = self._load(spec, key)
                with self._lock:
                    self.misses += 1
                    self._admit(resident)
            finally:
                with self._lock:
                    self._building.pop(key, None)
        return resident

    def pin(self, adapter) -> str:
        """Keep an adapter (or composition) resident whatever else is used; refused if pins alone overflow."""
        key = label(normalize(adapter))
        if not key:
            raise EdgeLoraError("pin: the base model (adapter=None) is always resident")
        with self._lock:
            was_pinned = key in self._pinned
            self._pinned.add(key)
        try:
            self.resolve(adapter)
        except BaseException:
            if not was_pinned:
                with self._lock:
                    self._pinned.discard(key)
            raise
        return key

    def unpin(self, adapter) -> None:
        key = label(normalize(adapter))
        with self._lock:
            if key not in self._pinned:
                raise EdgeLoraError(f"adapter {key} is not pinned")
            self._pinned.discard(key)

    def unload(self, name: str, unregister: bool = True) -> None:
        """Drop an adapter from memory; ``unregister`` also forgets the path an adapter was loaded from."""
        with self._lock:
            if name not in self._resident and name not in self.paths:
                raise EdgeLoraError(f"adapter {name} is not loaded")
            self._resident.pop(name, None)
            self._pinned.discard(name)
            if unregister and name in self.paths:
                del self.paths[name]
                self._forget(name)

    def resident_bytes(self) -> int:
        with self._lock:
            return sum(r.bytes for r in self._resident.values())

    def stats(self) -> dict:
        with self._lock:
            return {
                "resident": list(self._resident),
                "resident_bytes": sum(r.bytes for r in self._resident.values()),
                "budget_bytes": self.budget,
                "pinned": sorted(self._pinned),
                "hits": self.hits,
                "misses": self.misses,
                "evictions": self.evictions,
                "load_ms": {n: round(r.load_ms, 3) for n, r in self._resident.items()},
                "checked": sorted(self._checked),
            }

    # under self._lock

    def _hit(self, key: str) -> ResidentAdapter | None:
        resident = self._resident.get(key)
        if resident is not None:
            self._resident.move_to_end(key)
            self.hits += 1
        return resident

    def _admit(self, new: ResidentAdapter) -> None:
        """Make room first, so resident bytes never exceed the budget, not even for a moment."""
        if self.budget is not None:
            if new.bytes > self.budget:
                raise EdgeLoraError(
                    f"adapter {new.name} is {new.bytes} bytes, more than the adapter memory budget of {self.budget}"
                )
            used = sum(r.bytes for r in self._resident.values())
            for victim in [n for n in self._resident if n not in self._pinned]:
                if used + new.bytes <= self.budget:
                    break
                used -= self._resident.pop(victim).bytes
                self.evictions += 1
            if used + new.bytes > self.budget:
                pinned = ", ".join(sorted(self._pinned - {new.name}))
                raise EdgeLoraError(
                    f"adapter {new.name} ({new.bytes} bytes) does not fit in the adapter memory budget of "
                    f"{self.budget} bytes beside the pinned adapters {pinned}; unpin some"
                )
        self._resident[new.name] = new

    def _forget(self, name: str) -> None:
        """A re-registered or removed path adapter invalidates its checks and every composition using it."""
        self._checked.pop(name, None)
        for key in [k for k, r in self._resident.items() if any(n == name for n, _ in r.spec)]:
            del self._resident[key]

    # loading, outside the lock

    def _load(self, spec: Spec, key: str) -> ResidentAdapter:
        t0 = time.perf_counter()
        if len(spec) == 1 and spec[0][1] == 1.0:
            path, rank = self._checked_path(spec[0][0])
            arrays = map_parameters(path)
            size = path.stat().st_size
        else:
            parts = [(read_adapter(self._checked_path(name)[0], self.groups)[0], weight) for name, weight in spec]
            factors = compose(parts)
            # quantized slots take the composed factors quantized again (int8 gets its stored integers back,
            # since a weight only re-scales rank components)
            arrays = adapter_parameters(factors, *self.codec)
            size, rank = sum(array.nbytes for array in arrays.values()), factors.rank
        params = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in arrays.items()}
        return ResidentAdapter(key, spec, BindingPool(self.session, params), arrays, size, rank,
                               (time.perf_counter() - t0) * 1e3)

    def _checked_path(self, name: str) -> tuple[Path, int]:
        """The blob's path, once its integrity and compatibility checks passed for the file as it is now."""
        if name in self.paths:
            path, entry = self.paths[name], None
        elif name in self.entries:
            entry = self.entries[name]
            path = self.package / entry.file
        else:
            known = ", ".join(self.names()) or "none"
            raise UnknownAdapterError(f"unknown adapter {name!r}; this package has: {known}")
        with self._lock:
            checking = self._checking.setdefault(name, threading.Lock())
        with checking:  # a request and the background check never hash the same blob twice
            identity = _identity(path, name)
            checked = self._checked.get(name)
            if checked is not None and checked[1] == identity:
                return path, checked[0]
            rank = self._check(name, path, entry)
            with self._lock:
                self._checked[name] = (rank, identity)
        return path, rank

    def _check(self, name: str, path: Path, entry: AdapterEntry | None) -> int:
        sidecar = read_sidecar(path)
        if sidecar is not None and self.base_fingerprint and sidecar["base_fingerprint"] != self.base_fingerprint:
            raise EdgeLoraError(
                f"{path}: adapter {name} was built for base {sidecar['base_fingerprint'][:19]}…, "
                f"but this package's base is {self.base_fingerprint[:19]}…"
            )
        if self.verify:
            size, digest = (entry.bytes, entry.sha256) if entry is not None else (None, (sidecar or {}).get("sha256"))
            if size is not None and path.stat().st_size != size:
                raise EdgeLoraError(
                    f"{path}: adapter {name} is {path.stat().st_size} bytes, the manifest says {size} (truncated?)"
                )
            if digest is not None and sha256_file(path) != digest:
                where = "the manifest" if entry is not None else "its sidecar"
                raise EdgeLoraError(f"{path}: adapter {name} fails its sha256 check against {where}")
        # A package blob's shapes were checked against these slots when it was packaged; its sha256 (or,
        # with verify=False, trust in the package) stands for that check, so only path blobs are re-read.
        return entry.rank if entry is not None else self._check_shapes(name, path)

    def _check_shapes(self, name: str, path: Path) -> int:
        factors, dtype = read_adapter(path, self.groups)
        check_fits(factors, self.slots, f"{path}: adapter {name}", dtype)
        return factors.rank


def _identity(path: Path, name: str) -> tuple:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise EdgeLoraError(f"{path}: adapter {name}'s file is missing") from None
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns

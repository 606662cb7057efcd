"""One Ray Serve replica: an ``EdgeModel`` with its batching engine, whose warm adapters Ray's router knows.

Each replica keeps at most ``adapters_per_replica`` adapter specs warm through ``@serve.multiplexed``:
Ray's LRU decides which, and the runtime holds exactly those pinned (an adapter Ray drops is unpinned and
unloaded), so what the router believes is warm is what the registry holds. Ray routes a request sent with
``multiplexed_model_id=<spec>`` to a replica that has that spec warm, else to the one with the fewest.

Uploaded adapters live in one folder that every replica reads (the server's adapter folder, on a shared
filesystem past one machine): a replica registers an uploaded blob on its first request for it and again
whenever the file changed, and forgets it once the file is gone, so an upload or a delete through the
ingress reaches every replica without a broadcast. The runtime checks the blob (fingerprint, sha256,
shapes) on each replica, as a single server does.

Messages to the ingress are plain dicts (``piece``, ``result``, ``error``), each final one with this
replica's counters (and its actor's name, which ``ray.kill`` takes), so that the ingress can show where
adapters were loaded without calling every replica.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from contextlib import suppress
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import ray
from ray import serve

from edgelora.adapter_specs import parse_generate_adapters
from edgelora.errors import EdgeLoraError, UnknownAdapterError

SUFFIX = ".onnx_adapter"
BASE_KEY = ""  # the base model: no adapter, no multiplexing


def parse_key(key: str):
    """A multiplexing key back into the runtime's adapter argument (None, a name or {name: weight})."""
    return parse_generate_adapters(tuple(key.split("+")), what="model") if key else None


def error_message(error: EdgeLoraError) -> dict:
    return {"error": {"type": type(error).__name__, "message": str(error),
                      "retry_after_s": getattr(error, "retry_after_s", None)}}


class AdapterReplica:
    def __init__(self, package: str, adapter_folder: str, adapters_per_replica: int,
                 adapter_memory_mb: float | None, max_batch: int, max_queue: int):
        from edgelora.runtime import BatchSettings, EdgeModel

        self.model = EdgeModel.open(package, adapter_memory_mb=adapter_memory_mb,
                                    batching=BatchSettings(max_batch=max_batch, max_queue=max_queue))
        self.folder = Path(adapter_folder)
        # a stream waits for each piece in a thread: one for every request the engine admits or queues
        self.threads = ThreadPoolExecutor(max_workers=max_batch + max_queue + 2, thread_name_prefix="edgelora")
        self.uploads: dict[str, tuple] = {}  # uploaded name -> identity of the file it was registered from
        self.loads: Counter[str] = Counter()
        self.requests: Counter[str] = Counter()
        self.warm: set[str] = set()
        self.sequence = itertools.count(1)
        self.id = serve.get_replica_context().replica_id.unique_id
        self.actor = ray.get_runtime_context().get_actor_name()

        async def load(key: str) -> WarmAdapter:
            spec = parse_key(key)
            await self.run(self.model.pin, spec)
            self.loads[key] += 1
            self.warm.add(key)
            return WarmAdapter(self, key, spec)

        self.warm_adapter = serve.multiplexed(max_num_models_per_replica=adapters_per_replica)(load)

    async def run(self, func, *args):
        return await asyncio.get_running_loop().run_in_executor(self.threads, func, *args)

    def sync_uploads(self, spec) -> None:
        """Register each uploaded adapter the spec names as its file is now; a deleted one is unknown."""
        names = [] if spec is None else [spec] if isinstance(spec, str) else list(spec)
        for name in names:
            if name in self.model.manifest.adapters:
                continue
            path = self.folder / (name + SUFFIX)
            try:
                stat = path.stat()
                identity = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
            except FileNotFoundError:
                identity = None
            known = self.uploads.get(name)
            if identity == known:
                continue
            if known is not None and name in self.model.adapters:
                self.model.unload_adapter(name)
            self.uploads.pop(name, None)
            if identity is None:
                raise UnknownAdapterError(f"unknown adapter {name!r}")
            self.model.registry.register_path(path, name)
            self.uploads[name] = identity
            if name in self.warm:  # Ray still counts it warm here: hold the new blob as it held the old
                self.model.pin(name)

    async def prepare(self, key: str):
        """The runtime's adapter argument for a key, its uploads registered and the spec warm here."""
        self.requests[key] += 1
        spec = parse_key(key)
        await self.run(self.sync_uploads, spec)
        if spec is not None:
            await self.warm_adapter(key)
        return spec

    async def generate(self, key: str, prompt, sampling: dict):
        """Text pieces as ``{"piece": text}``, then ``{"result": Generation fields, "replica": counters}``; a
        runtime error as ``{"error": ...}``. Closing the generator (the client went away) closes the stream."""
        try:
            spec = await self.prepare(key)
            stream = await self.run(lambda: self.model.stream(prompt, adapter=spec, **sampling))
        except EdgeLoraError as e:
            yield error_message(e)
            return
        pieces = iter(stream)
        try:
            while (piece := await self.run(next, pieces, None)) is not None:
                yield {"piece": piece}
        except EdgeLoraError as e:
            yield error_message(e)
            return
        finally:
            stream.close()
        yield {"result": asdict(stream.result), "replica": self.snapshot()}

    async def embed(self, key: str, texts: list[str], normalize: bool) -> dict:
        try:
            spec = await self.prepare(key)
            vectors = await self.run(lambda: self.model.embed(texts, adapter=spec, normalize=normalize))
        except EdgeLoraError as e:
            return error_message(e)
        return {"vectors": vectors, "replica": self.snapshot()}

    def snapshot(self) -> dict:
        """This replica's counters; ``sequence`` orders snapshots, so the ingress keeps the newest."""
        engine = self.model.engine
        return {"id": self.id, "sequence": next(self.sequence), "actor": self.actor, "loads": dict(self.loads),
                "requests": dict(self.requests), "warm": sorted(self.warm), "registry": self.model.stats(),
                "engine": engine.stats() if engine is not None else {}}


class WarmAdapter:
    """What Ray's multiplexing LRU holds for a warm spec; Ray calls ``__del__`` when it drops the spec."""

    def __init__(self, replica: AdapterReplica, key: str, spec):
        self.replica, self.key, self.spec = replica, key, spec

    def __del__(self):
        replica = self.replica
        if replica is None:
            return
        self.replica = None
        replica.warm.discard(self.key)
        with suppress(EdgeLoraError):  # its upload was deleted, or replaced and not requested since
            replica.model.unpin(self.spec)
        # its memory only: a request that registered the upload may still be on its way to the runtime, and
        # unregistering it here answered that request "unknown adapter"
        with suppress(EdgeLoraError):  # already evicted by the memory budget, or its upload was deleted
            replica.model.unload_adapter(self.key, unregister=False)

"""The model behind ``edgelora serve --ray``'s HTTP layer: what the server asks of an ``EdgeModel``, answered by
Ray Serve replicas, so that the routes, keys, uploads and metrics stay the single server's own code.

Tokenizing and adapter checks run on a local ``EdgeModel`` (``front``, opened without a batching engine):
an upload passes the same checks before it is shown, and each replica checks it again when it first
serves it. Generations and embeddings go to the replicas through a ``DeploymentHandle`` with
``multiplexed_model_id`` set to the request's adapter spec, so Ray sends each spec to a replica where it is
warm; ``route_by_adapter=False`` leaves the id out (Ray's default routing), for comparison.

The replicas' counters arrive with their answers; ``replicas()`` is the newest of each, ``stats()`` their sum.
"""

from __future__ import annotations

import threading

from ray.exceptions import RayActorError

from edgelora.errors import BusyError, EdgeLoraError, UnknownAdapterError
from edgelora.runtime import composition
from edgelora.runtime.engine import BatchSettings
from edgelora.runtime.generation import Generation

from .api_errors import ApiError
from .ray_replica import BASE_KEY

ERRORS = {cls.__name__: cls for cls in (EdgeLoraError, UnknownAdapterError, BusyError)}


class ReplicaGone(ApiError):
    """A replica died under a request (its node failed, or it was killed): the client retries."""

    def __init__(self, error: Exception):
        super().__init__(503, f"the replica serving this request failed ({type(error).__name__}); retry",
                         code="replica_unavailable", retry_after_s=1)


def raise_if_error(message: dict) -> dict:
    error = message.get("error")
    if error is None:
        return message
    cls = ERRORS.get(error["type"], EdgeLoraError)
    if cls is BusyError:
        raise BusyError(error["message"], retry_after_s=error["retry_after_s"] or 1.0)
    raise cls(error["message"])


def adapter_key(adapter) -> str:
    """The multiplexing key of an adapter spec: the runtime's own label, one per distinct spec."""
    return composition.label(composition.normalize(adapter))


class RemoteStream:
    """``EdgeModel.stream``'s answer over Ray: iterate (in a worker thread) for pieces, then ``result``."""

    def __init__(self, responses, model: "RemoteModel"):
        self.responses = responses
        self.model = model
        self.result: Generation | None = None

    def __iter__(self):
        try:
            for message in self.responses:
                raise_if_error(message)
                if "piece" in message:
                    yield message["piece"]
                else:
                    self.model.record(message["replica"])
                    self.result = Generation(**message["result"])
        except RayActorError as e:  # the replica died: this request is lost, a retry goes to a live one
            raise ReplicaGone(e) from None

    def close(self) -> None:
        self.responses.cancel()


class RemoteEngines:
    """The replicas' engines as one, for the HTTP layer: their summed capacity (the ingress keeps a worker
    thread per stream) and their counters as last reported."""

    def __init__(self, model: "RemoteModel", replicas: int, settings: BatchSettings):
        self.model = model
        self.settings = BatchSettings(max_batch=settings.max_batch * replicas, max_queue=settings.max_queue * replicas)

    def stats(self) -> dict:
        totals: dict = {}
        for snapshot in self.model.replicas():
            for name, value in snapshot["engine"].items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    totals[name] = totals.get(name, 0) + value
        return totals


class RemoteModel:
    def __init__(self, front, handle, replicas: int, batching: BatchSettings, route_by_adapter: bool = True):
        self.front = front
        self.handle = handle
        self.route_by_adapter = route_by_adapter
        self.package = front.package
        self.manifest = front.manifest
        self.engine = RemoteEngines(self, replicas, batching)
        self.snapshots: dict[str, dict] = {}
        self._lock = threading.Lock()

    @property
    def task(self) -> str:
        return self.front.task

    @property
    def adapters(self) -> list[str]:
        return self.front.adapters

    def encode(self, prompt, add_special_tokens: bool = True) -> list[int]:
        return self.front.encode(prompt, add_special_tokens=add_special_tokens)

    def tokenize(self, texts):
        return self.front.tokenize(texts)

    def load_adapter(self, path, name: str | None = None) -> str:
        """Check an upload here as a single server would; replicas load it from the shared folder themselves."""
        return self.front.load_adapter(path, name)

    def unload_adapter(self, name: str) -> None:
        self.front.unload_adapter(name)

    def stream(self, prompt, adapter=None, **sampling) -> RemoteStream:
        key = adapter_key(adapter)
        return RemoteStream(self.handle_for(key).options(stream=True).generate.remote(key, prompt, sampling), self)

    def embed(self, texts, adapter=None, normalize: bool = False):
        key = adapter_key(adapter)
        try:
            message = raise_if_error(self.handle_for(key).embed.remote(key, list(texts), normalize).result())
        except RayActorError as e:  # the replica died: this request is lost, a retry goes to a live one
            raise ReplicaGone(e) from None
        self.record(message["replica"])
        return message["vectors"]

    def handle_for(self, key: str):
        if key != BASE_KEY and self.route_by_adapter:
            return self.handle.options(multiplexed_model_id=key)
        return self.handle

    def record(self, snapshot: dict) -> None:
        with self._lock:
            known = self.snapshots.get(snapshot["id"])
            if known is None or known["sequence"] < snapshot["sequence"]:
                self.snapshots[snapshot["id"]] = snapshot

    def replicas(self) -> list[dict]:
        with self._lock:
            return [self.snapshots[name] for name in sorted(self.snapshots)]

    def stats(self) -> dict:
        """The registry's counters summed over the replicas (as last reported); resident: warm anywhere."""
        totals = {"resident": set(), "resident_bytes": 0, "hits": 0, "misses": 0, "evictions": 0}
        for snapshot in self.replicas():
            registry = snapshot["registry"]
            totals["resident"] |= set(registry["resident"])
            for name in ("resident_bytes", "hits", "misses", "evictions"):
                totals[name] += registry[name]
        totals["resident"] = sorted(totals["resident"])
        return totals

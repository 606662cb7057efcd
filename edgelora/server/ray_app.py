"""``edgelora serve --ray``: the single server's HTTP app as a Ray Serve ingress over replicas of the model.

Two deployments: ``EdgeReplica`` (``AdapterReplica``, one ``EdgeModel`` and its batching engine each,
``--replicas`` of them) and ``EdgeIngress``, which runs ``create_app`` over a ``RemoteModel`` so that
every route, key check, upload check and metric is the single server's code. The ingress asks for each
generation with ``multiplexed_model_id`` set to its adapter spec, and Ray's router sends it to a replica
where that spec is warm. Paths (package, adapter folder) are made absolute here: every replica, on any
node, must see them at the same place.
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass, fields, replace
from pathlib import Path

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from edgelora.errors import EdgeLoraError
from edgelora.format.manifest import load_manifest

from .app import Server, create_app, endpoint
from .ray_replica import AdapterReplica
from .remote_model import RemoteModel
from .settings import Settings

APP_NAME = "edgelora"
log = logging.getLogger("edgelora.server")


@dataclass(frozen=True)
class RayOptions:
    replicas: int = 2
    adapters_per_replica: int = 4  # specs kept warm per replica (Ray's multiplexing LRU)
    replica_memory_mb: float | None = None  # each replica's adapter memory budget
    replica_cpus: float = 1.0  # Ray CPUs reserved per replica (and for the ingress)
    max_batch: int = 8  # per replica
    max_queue: int = 64  # per replica
    route_by_adapter: bool = True  # False: Ray's default routing, for comparison
    address: str | None = None  # a running cluster ("auto", "ray://host:10001"); None starts one on this machine

    def check(self) -> "RayOptions":
        for name in ("replicas", "adapters_per_replica", "max_batch"):
            if getattr(self, name) < 1:
                raise EdgeLoraError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.max_queue < 0:
            raise EdgeLoraError(f"max-queue must be at least 0, got {self.max_queue}")
        if not self.replica_cpus > 0:
            raise EdgeLoraError(f"replica-cpus must be a positive number, got {self.replica_cpus}")
        if self.replica_memory_mb is not None and not self.replica_memory_mb > 0:
            raise EdgeLoraError(f"replica-memory-mb must be a positive number, got {self.replica_memory_mb}")
        return self


@endpoint
async def replica_counters(server: Server, request: Request) -> Response:
    """Each replica's adapter loads and requests by spec, its warm specs, registry and engine (as last reported)."""
    server.tenant(request, admin=True)
    return JSONResponse({"object": "list", "data": server.model.replicas()})


class Ingress:
    def __init__(self, replicas, package: str, settings: Settings, options: RayOptions):
        self.replicas = replicas
        self.package = package
        self.settings = settings
        self.options = options

    def __serve_build_asgi_app__(self):
        from edgelora.runtime import BatchSettings, EdgeModel

        front = EdgeModel.open(self.package, batching=False)
        batching = BatchSettings(max_batch=self.options.max_batch, max_queue=self.options.max_queue)
        model = RemoteModel(front, self.replicas, self.options.replicas, batching, self.options.route_by_adapter)
        return create_app(model, self.settings, extra_routes=(Route("/v1/replicas", replica_counters,
                                                                    methods=["GET"]),))


def build_app(package, settings: Settings, options: RayOptions):
    """The Ray Serve application: ``serve.run(build_app(...), name=APP_NAME, route_prefix="/")``."""
    package = Path(package).resolve()
    load_manifest(package)  # a wrong path fails here in one line, not in every replica
    settings = replace(settings.check(), adapter_dir=settings.adapter_folder(package).resolve())
    options.check()
    actor = {"num_cpus": options.replica_cpus}
    per_replica = options.max_batch + options.max_queue
    replica = serve.deployment(AdapterReplica, name="EdgeReplica", num_replicas=options.replicas,
                               ray_actor_options=actor, max_ongoing_requests=per_replica)
    ingress = serve.deployment(serve.ingress()(Ingress), name="EdgeIngress", ray_actor_options=actor,
                               max_ongoing_requests=options.replicas * per_replica + 16,
                               graceful_shutdown_timeout_s=settings.grace_s)
    replicas = replica.bind(str(package), str(settings.adapter_dir), options.adapters_per_replica,
                            options.replica_memory_mb, options.max_batch, options.max_queue)
    return ingress.bind(replicas, str(package), settings, options)


def app_builder(args: dict[str, str]):
    """For ``serve run edgelora.server.ray_app:app_builder package=pkg/ keys=keys.toml replicas=4`` and for a Serve
    config file's ``import_path``/``args``, where ``deployments`` can override EdgeReplica's settings (autoscaling)."""
    return build_app(*parse_arguments(args))


def parse_arguments(args: dict[str, str]) -> tuple[Path, Settings, RayOptions]:
    """``package`` and any field of ``Settings`` or ``RayOptions`` by name, as text (host and port belong to Serve's
    own HTTP options there)."""
    args = dict(args)
    if "package" not in args:
        raise EdgeLoraError("package: missing (package=PATH to the edgelora package to serve)")
    package = Path(args.pop("package"))
    chosen = {}
    for cls in (Settings, RayOptions):
        known = {f.name: f for f in fields(cls) if f.name not in ("host", "port")}
        chosen[cls] = {name: parse_value(name, args.pop(name), known[name].type)
                       for name in list(args) if name in known}
    if args:
        raise EdgeLoraError(f"{', '.join(sorted(args))}: unknown argument; expected package or a field of Settings "
                            "or RayOptions")
    return package, Settings(**chosen[Settings]), RayOptions(**chosen[RayOptions])


def parse_value(name: str, value, annotation: str):
    """A field's value from text (or from the number or bool a YAML config file gives)."""
    kind, text = annotation.split(" | ")[0], str(value)
    if kind == "bool":
        if text.lower() not in ("true", "false"):
            raise EdgeLoraError(f"{name}: expected true or false, got {text!r}")
        return text.lower() == "true"
    try:
        return {"int": int, "float": float, "Path": Path, "str": str}[kind](text)
    except ValueError:
        raise EdgeLoraError(f"{name}: expected a{'n' if kind == 'int' else ''} {kind}, got {text!r}") from None


def serve_on_ray(package, settings: Settings, options: RayOptions) -> None:
    """Start (or join) a Ray cluster, run the application on settings.host:port until SIGINT or SIGTERM."""
    import ray

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    app = build_app(package, settings, options)
    if options.address is None:  # Ray's own services on loopback too: this instance is one machine's
        ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1")
    else:
        ray.init(address=options.address)
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(app, name=APP_NAME, route_prefix="/")
        log.info("serving %s on http://%s:%d with %d replicas", package, settings.host, settings.port,
                 options.replicas)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()

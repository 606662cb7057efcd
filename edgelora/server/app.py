"""The HTTP app: OpenAI's endpoints over one ``EdgeModel``, every tenant choosing its adapter per request.

``create_app(model, settings)`` builds it for any ASGI server (uvicorn here, a Ray Serve deployment
later); ``edgelora serve`` runs it with uvicorn.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from contextlib import asynccontextmanager
from functools import wraps

import anyio
import numpy as np
from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from edgelora.errors import EdgeLoraError

from . import schemas
from .adapter_store import AdapterStore
from .api_errors import ApiError, from_runtime
from .chat_template import ChatTemplate
from .generation import GenerationRun
from .keys import LOCAL, KeyRing, Tenant
from .metrics import Metrics
from .middleware import AccessLog, BodyLimit, access_record
from .settings import Settings

log = logging.getLogger("edgelora.server")
DONE = "[DONE]"


class Server:
    """What the routes share: the model, who may use which adapter, and what is measured."""

    def __init__(self, model, settings: Settings):
        self.model = model
        self.settings = settings
        self.base_name = settings.model_name or model.package.resolve().name
        self.keys = KeyRing.load(settings.keys) if settings.keys else None
        self.store = AdapterStore(model, settings.adapter_folder(model.package), self.base_name)
        self.metrics = Metrics(model)
        self.chat_template = ChatTemplate.from_package(model.package) if model.task == "causal-lm" else None
        self.created = int(time.time())
        self.store.restore()

    def tenant(self, request: Request, admin: bool = False) -> Tenant:
        tenant = LOCAL if self.keys is None else self.keys.tenant(request.headers.get("authorization"))
        access_record(request.scope)["tenant"] = tenant.name
        if admin and not tenant.admin:
            raise ApiError(403, f"tenant {tenant.name} is not an admin: this endpoint needs an admin key",
                           code="admin_only")
        return tenant

    def require_task(self, endpoint: str, *tasks: str) -> None:
        if self.model.task not in tasks:
            other = {"causal-lm": "/v1/completions or /v1/chat/completions",
                     "feature-extraction": "/v1/embeddings"}.get(self.model.task, "no OpenAI endpoint")
            raise ApiError(400, f"{endpoint} needs a {' or '.join(tasks)} model, but this server's model is "
                                f"{self.model.task}: use {other}", code="wrong_endpoint")

    def max_tokens(self, request: schemas.Sampling, default: int) -> int:
        value = default if request.max_tokens is None else request.max_tokens
        if value > self.settings.max_tokens:
            raise ApiError(400, f"max_tokens: at most {self.settings.max_tokens} on this server, got {value}",
                           code="invalid_value", param="max_tokens")
        return value


def endpoint(handler):
    """Every failure of a route as an OpenAI error body: one line, no traceback, the server goes on."""

    @wraps(handler)
    async def run(request: Request) -> Response:
        server: Server = request.app.state.server
        try:
            return await handler(server, request)
        except ApiError as e:
            return e.response()
        except EdgeLoraError as e:
            return from_runtime(e, access_record(request.scope).get("model")).response()
        except Exception as e:
            log.error("%s %s failed: %s: %s", request.method, request.url.path, type(e).__name__,
                      " ".join(str(e).split()))
            return ApiError(500, f"internal error ({type(e).__name__})", code="internal_error").response()

    return run


async def parse(request: Request, schema):
    return schemas.parse(schema, await request.body())


@endpoint
async def health(server: Server, request: Request) -> Response:
    return JSONResponse({"status": "ok", "model": server.base_name, "task": server.model.task})


@endpoint
async def metrics(server: Server, request: Request) -> Response:
    if server.keys is not None:
        server.tenant(request, admin=True)
    return Response(server.metrics.render(), media_type="text/plain; version=0.0.4")


@endpoint
async def list_models(server: Server, request: Request) -> Response:
    tenant = server.tenant(request)
    owner = "edgelora"
    cards = [schemas.model_card(server.base_name, server.created, None, owner)]
    cards += [schemas.model_card(name, server.created, server.base_name, owner)
              for name in server.store.names() if tenant.may_use(name)]
    return JSONResponse({"object": "list", "data": cards})


async def begin_generation(server: Server, request: Request, tenant: Tenant, body: schemas.Sampling, prompt,
                           default_max: int, arrived: float) -> GenerationRun:
    """Checks shared by both generation endpoints, then the runtime's stream, its first step not yet taken."""
    adapter = server.store.spec(body.model, tenant)
    access_record(request.scope)["model"] = body.model
    max_new_tokens = server.max_tokens(body, default_max)
    tenant.admit()
    return await GenerationRun.start(
        server.model, prompt, adapter, body.model, arrived, max_new_tokens=max_new_tokens,
        temperature=body.temperature, top_k=body.top_k, top_p=body.top_p, seed=body.seed, stop=body.stops(),
        ignore_eos=body.ignore_eos, truncate=body.truncate)


def finish(server: Server, request: Request, tenant: Tenant, run: GenerationRun):
    """Charge, measure and log a finished (or abandoned) generation."""
    outcome = run.outcome()
    record = access_record(request.scope)
    if outcome is None:
        record["finish"] = "cancelled"
        return None
    label = run.model_field
    m = server.metrics
    m.prompt_tokens.labels(label).inc(outcome.prompt_tokens)
    m.completion_tokens.labels(label).inc(outcome.completion_tokens)
    if outcome.ttft_s is not None:
        m.ttft.labels(label).observe(outcome.ttft_s)
    if outcome.per_token_s is not None:
        m.per_token.labels(label).observe(outcome.per_token_s)
    tenant.charge_tokens(outcome.prompt_tokens + outcome.completion_tokens)
    record.update(prompt_tokens=outcome.prompt_tokens, completion_tokens=outcome.completion_tokens,
                  finish=outcome.finish_reason)
    if outcome.ttft_s is not None:
        record["ttft_ms"] = f"{outcome.ttft_s * 1e3:.1f}"
    return outcome


async def generate(server: Server, request: Request, tenant: Tenant, body: schemas.Sampling, prompt, default_max: int,
                   arrived: float, kind: str, choice, chunk_choice) -> Response:
    """Both generation endpoints: ``choice(text, finish)`` and ``chunk_choice(text | None, finish | None, first)``
    shape their response's and stream chunks' choices."""
    run = await begin_generation(server, request, tenant, body, prompt, default_max, arrived)
    ident, created = schemas.new_id("chatcmpl" if kind == "chat" else "cmpl"), schemas.now()
    obj = "chat.completion" if kind == "chat" else "text_completion"
    server.metrics.in_flight.inc()
    if not body.stream:
        try:
            text = await run.text()
        finally:
            run.close()
            server.metrics.in_flight.dec()
        outcome = finish(server, request, tenant, run)
        return JSONResponse({
            "id": ident, "object": obj, "created": created, "model": body.model,
            "choices": [choice(text, schemas.finish_reason(outcome.finish_reason))],
            "usage": schemas.usage(outcome.prompt_tokens, outcome.completion_tokens),
        })
    try:
        first = await run.next_piece()  # a request the runtime refuses gets its status, not a broken stream
    except BaseException:
        run.close()
        server.metrics.in_flight.dec()
        raise
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    chunk_obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def chunk(choices, usage=None) -> str:
        payload = {"id": ident, "object": chunk_obj, "created": created, "model": body.model, "choices": choices}
        if include_usage:
            payload["usage"] = usage
        return json.dumps(payload)

    finished = False

    async def events():
        nonlocal finished
        piece, opened = first, True
        try:
            while piece is not None:
                yield chunk([chunk_choice(piece, None, opened)])
                opened = False
                piece = await run.next_piece()
            outcome, finished = finish(server, request, tenant, run), True
            yield chunk([chunk_choice(None if not opened else "", schemas.finish_reason(outcome.finish_reason),
                                      opened)])
            if include_usage:
                yield chunk([], schemas.usage(outcome.prompt_tokens, outcome.completion_tokens))
            yield DONE
        except ApiError as e:  # a failure mid-stream: the status is sent already, so the body says it
            yield json.dumps(e.body())

    def end():
        run.close()
        if not finished:
            finish(server, request, tenant, run)
        server.metrics.in_flight.dec()

    return GenerationEvents(events(), end, ping=0, shutdown_grace_period=server.settings.grace_s)


class GenerationEvents(EventSourceResponse):
    """Server-sent events that end their generation however the response ends: done, failed, or its client gone
    (even before the first event was sent, when the events' own code never ran)."""

    def __init__(self, content, on_end, **options):
        super().__init__(content, **options)
        self.on_end = on_end

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_end()


@endpoint
async def completions(server: Server, request: Request) -> Response:
    arrived = time.perf_counter()
    tenant = server.tenant(request)
    body = await parse(request, schemas.CompletionRequest)
    server.require_task("/v1/completions", "causal-lm")
    return await generate(
        server, request, tenant, body, body.prompt, 16, arrived, "text",
        lambda text, finish: {"index": 0, "text": text, "logprobs": None, "finish_reason": finish},
        lambda text, finish, first: {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish})


@endpoint
async def chat_completions(server: Server, request: Request) -> Response:
    arrived = time.perf_counter()
    tenant = server.tenant(request)
    body = await parse(request, schemas.ChatRequest)
    server.require_task("/v1/chat/completions", "causal-lm")
    if server.chat_template is None:
        raise ApiError(400, f"model {server.base_name} has no chat template (no chat_template.jinja, no chat_template "
                            "in tokenizer_config.json): send a plain prompt to /v1/completions", code="no_chat_template")
    messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})} for m in body.messages]
    text = server.chat_template.render(messages)
    prompt = await anyio.to_thread.run_sync(lambda: server.model.encode(text, add_special_tokens=False))

    def delta(text, finish, first):
        content = {} if text is None else {"content": text}
        return {"index": 0, "delta": {"role": "assistant", **content} if first else content, "logprobs": None,
                "finish_reason": finish}

    return await generate(
        server, request, tenant, body, prompt, server.settings.chat_max_tokens, arrived, "chat",
        lambda text, finish: {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                              "finish_reason": finish},
        delta)


@endpoint
async def embeddings(server: Server, request: Request) -> Response:
    tenant = server.tenant(request)
    body = await parse(request, schemas.EmbeddingRequest)
    server.require_task("/v1/embeddings", "feature-extraction")
    adapter = server.store.spec(body.model, tenant)
    access_record(request.scope)["model"] = body.model
    tenant.admit()
    texts = [body.input] if isinstance(body.input, str) else body.input
    server.metrics.in_flight.inc()
    try:
        vectors, tokens = await anyio.to_thread.run_sync(lambda: (
            server.model.embed(texts, adapter=adapter, normalize=True),
            int(server.model.tokenize(texts)["attention_mask"].sum())))
    finally:
        server.metrics.in_flight.dec()
    tenant.charge_tokens(tokens)
    server.metrics.prompt_tokens.labels(body.model).inc(tokens)
    access_record(request.scope)["prompt_tokens"] = tokens
    vectors = np.asarray(vectors, dtype=np.float32)
    data = [{"object": "embedding", "index": i,
             "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode() if body.encoding_format == "base64"
             else v.tolist()} for i, v in enumerate(vectors)]
    return JSONResponse({"object": "list", "data": data, "model": body.model,
                         "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


@endpoint
async def list_adapters(server: Server, request: Request) -> Response:
    server.tenant(request, admin=True)
    return JSONResponse({"object": "list", "data": server.store.listing()})


@endpoint
async def upload_adapter(server: Server, request: Request) -> Response:
    server.tenant(request, admin=True)
    try:
        form = await request.form(max_files=2, max_fields=2)
    except (AssertionError, HTTPException, ValueError) as e:
        raise ApiError(400, f"expected a multipart/form-data body with the fields name, adapter and sidecar "
                            f"({getattr(e, 'detail', e)})", code="invalid_upload") from None
    try:
        fields = {}
        for key, what in (("name", "the adapter's name"), ("adapter", "the .onnx_adapter file"),
                          ("sidecar", "its sidecar .json file")):
            value = form.get(key)
            if value is None:
                raise ApiError(400, f"{key}: missing form field ({what})", code="missing_field", param=key)
            if (key == "name") != isinstance(value, str):
                raise ApiError(400, f"{key}: expected {'a text field' if key == 'name' else 'a file'}",
                               code="invalid_upload", param=key)
            fields[key] = value if key == "name" else await value.read()
    finally:
        await form.close()
    access_record(request.scope)["model"] = fields["name"] if isinstance(fields["name"], str) else "-"
    card = await anyio.to_thread.run_sync(server.store.upload, fields["name"], fields["adapter"], fields["sidecar"])
    log.info("adapter %s uploaded (%d bytes)", card["id"], card["bytes"])
    return JSONResponse(card, status_code=201)


@endpoint
async def delete_adapter(server: Server, request: Request) -> Response:
    server.tenant(request, admin=True)
    name = request.path_params["name"]
    await anyio.to_thread.run_sync(server.store.delete, name)
    log.info("adapter %s deleted", name)
    return JSONResponse({"id": name, "object": "adapter", "deleted": True})


async def not_found(request: Request, exc: HTTPException) -> Response:
    if exc.status_code == 404:
        return ApiError(404, f"no such endpoint: {request.method} {request.url.path}", code="unknown_endpoint").response()
    return ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                    code="method_not_allowed" if exc.status_code == 405 else None).response()


ROUTES = [
    Route("/health", health, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/completions", completions, methods=["POST"]),
    Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    Route("/v1/embeddings", embeddings, methods=["POST"]),
    Route("/v1/adapters", list_adapters, methods=["GET"]),
    Route("/v1/adapters", upload_adapter, methods=["POST"]),
    Route("/v1/adapters/{name}", delete_adapter, methods=["DELETE"]),
]
UPLOAD_PATH = "/v1/adapters"
SPARE_THREADS = 16  # for the calls besides streams: tokenizing, embeddings, uploads


def create_app(model, settings: Settings, extra_routes: tuple[Route, ...] = ()) -> Starlette:
    """The ASGI app over an open ``EdgeModel``; uploads kept by an earlier run are registered now.
    ``extra_routes`` are endpoints of a deployment around the server (``--ray``'s replica counters)."""
    server = Server(model, settings)
    routes = ROUTES + list(extra_routes)

    @asynccontextmanager
    async def lifespan(app):
        """A stream holds a worker thread while it waits for its next piece: enough threads for every request
        the engine admits or queues, so that the one past them gets the engine's 429 rather than a wait."""
        engine = model.engine
        if engine is not None:
            limiter = anyio.to_thread.current_default_thread_limiter()
            needed = engine.settings.max_batch + engine.settings.max_queue + SPARE_THREADS
            limiter.total_tokens = max(limiter.total_tokens, needed)
        yield

    app = Starlette(routes=routes, exception_handlers={HTTPException: not_found}, lifespan=lifespan)
    app.state.server = server
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, upload_paths={UPLOAD_PATH},
                       max_upload_bytes=settings.max_upload_bytes, timeout_s=settings.body_timeout_s)
    app.add_middleware(AccessLog, metrics=server.metrics, endpoints={route.path for route in routes})
    return app

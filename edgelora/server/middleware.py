"""ASGI middleware: request bodies read within a size and time limit, and one access-log line per request.

The body is read here, whole, before any route runs: an oversized body gets 413 without the
rest being read, and a client that stalls mid-body gets 408 after ``body_timeout_s`` instead of
holding a worker forever.
"""

from __future__ import annotations

import logging
import time

import anyio

from .api_errors import ApiError

access_log = logging.getLogger("edgelora.server.access")
ACCESS_KEY = "edgelora.access"


def access_record(scope) -> dict:
    """What a route adds to its request's access-log line (tenant, model, tokens); never prompt text or keys."""
    return scope.setdefault(ACCESS_KEY, {})


class BodyLimit:
    def __init__(self, app, max_bytes: int, upload_paths: set[str], max_upload_bytes: int, timeout_s: float):
        self.app = app
        self.max_bytes = max_bytes
        self.upload_paths = upload_paths
        self.max_upload_bytes = max_upload_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "DELETE", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        limit = self.max_upload_bytes if scope["path"] in self.upload_paths else self.max_bytes
        try:
            body = await self._read(scope, receive, limit)
        except ApiError as e:
            await e.response()(scope, receive, send)
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: only http.disconnect

        await self.app(scope, replay, send)

    async def _read(self, scope, receive, limit: int) -> bytes:
        too_big = ApiError(413, f"the request body is larger than this endpoint's limit of {limit} bytes",
                           code="request_too_large")
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_big
        chunks, size = [], 0
        with anyio.move_on_after(self.timeout_s):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ApiError(400, "the client went away before sending its whole request body",
                                   code="client_disconnected")
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise too_big
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return b"".join(chunks)
        raise ApiError(408, f"the request body did not arrive within {self.timeout_s:g} s", code="request_timeout")


class AccessLog:
    """One line per request when it ends (a stream when its last byte is sent), and the request counter."""

    def __init__(self, app, metrics, endpoints: set[str]):
        self.app = app
        self.metrics = metrics
        self.endpoints = endpoints  # the counter's endpoint label: a route's path, never a client's made-up one

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        record = access_record(scope)

        async def sending(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            ms = (time.perf_counter() - started) * 1e3
            fields = " ".join(f"{key}={value}" for key, value in record.items())
            access_log.info("%s %s %d %.1fms %s", scope["method"], scope["path"], status, ms, fields)
            if scope["path"].startswith("/v1/"):
                endpoint = next((e for e in self.endpoints if _matches(e, scope["path"])), "other")
                self.metrics.requests.labels(endpoint, record.get("model", "-"), str(status)).inc()


def _matches(route: str, path: str) -> bool:
    """A route path with at most a trailing ``{param}`` against a request path."""
    prefix, brace, _ = route.partition("{")
    return path == route if not brace else path.startswith(prefix) and "/" not in path[len(prefix):]

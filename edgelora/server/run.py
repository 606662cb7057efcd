"""``edgelora serve``: open the package, build the app, run it under uvicorn until SIGINT or SIGTERM.

On SIGTERM uvicorn stops accepting connections and lets running requests (streams included) finish
for ``grace_s`` seconds before it closes them.
"""

from __future__ import annotations

import logging

import uvicorn

from .app import create_app
from .settings import Settings

# uvicorn's httptools parser (there once uvicorn[standard] is, as ray[serve] brings it) drops the body of a request
# that asks to upgrade to HTTP/2, as Java's HttpClient does on http:// by default; h11 serves it as HTTP/1.1
HTTP = "h11"


def serve(package, settings: Settings, adapter_memory_mb: float | None = None, max_batch: int = 8,
          max_queue: int = 64) -> None:
    """``max_batch`` requests decode together; ``max_queue`` more wait; past them a request gets 429."""
    from edgelora.runtime import BatchSettings, EdgeModel

    settings.check()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    model = EdgeModel.open(package, adapter_memory_mb=adapter_memory_mb,
                           batching=BatchSettings(max_batch=max_batch, max_queue=max_queue))
    app = create_app(model, settings)
    uvicorn.run(app, host=settings.host, port=settings.port, access_log=False, log_level="info",
                timeout_graceful_shutdown=settings.grace_s, http=HTTP)

"""``edgelora serve``: open the package, build the app, run it under uvicorn until SIGINT or SIGTERM.

On SIGTERM uvicorn stops accepting connections and lets running requests (streams included) finish
for ``grace_s`` seconds before it closes them.
"""

from __future__ import annotations

import logging

import uvicorn

from .app import create_app
from .settings import Settings


def serve(package, settings: Settings, adapter_memory_mb: float | None = None) -> None:
    from edgelora.runtime import EdgeModel

    settings.check()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    model = EdgeModel.open(package, adapter_memory_mb=adapter_memory_mb)
    app = create_app(model, settings)
    uvicorn.run(app, host=settings.host, port=settings.port, access_log=False, log_level="info",
                timeout_graceful_shutdown=settings.grace_s)

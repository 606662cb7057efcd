"""``edgelora serve``: an OpenAI-compatible HTTP server over one package, the adapter chosen per request.

Installed with the ``serve`` extra (Starlette, uvicorn, sse-starlette, pydantic, prometheus-client,
jinja2); like the runtime, it never imports torch.
"""

from .app import create_app
from .settings import Settings

__all__ = ["Settings", "create_app"]

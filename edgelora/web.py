"""``edgelora web``: the example web page and one package on loopback, to try a package in a browser.

The page (``examples/web`` in a clone of the repository) runs the package itself with onnxruntime-web;
this server only hands out files, so a browser does here what it would do with the same files on any
static host. Its JavaScript dependencies come from ``npm ci`` in the page's folder, run once: the
server needs no node at run time.
"""

from __future__ import annotations

from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from .errors import EdgeLoraError
from .manifest import inside, load_manifest

PAGE = Path(__file__).resolve().parents[1] / "examples" / "web"
PACKAGE_PREFIX = "/package/"
# what the page imports; the rest of node_modules (the browser test's driver) is never needed by a browser
RUNTIME_DEPENDENCY = "node_modules/onnxruntime-web/dist"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".json": "application/json",
    ".wasm": "application/wasm",  # WebAssembly.instantiateStreaming refuses any other type
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
}
# cross-origin isolation: without it a browser gives the page no SharedArrayBuffer, so no WebAssembly threads
ISOLATION_HEADERS = {"Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Embedder-Policy": "require-corp"}
CHUNK = 1 << 20


def check_page(page: Path) -> None:
    if not (page / "index.html").is_file():
        raise EdgeLoraError(f"{page}: no index.html; run edgelora web from a clone of the repository or pass --page")
    if not (page / RUNTIME_DEPENDENCY).is_dir():
        raise EdgeLoraError(f"{page / 'node_modules'}: missing; run `npm ci` in {page} once")


def check_package(package: Path) -> None:
    """The page runs causal LMs whose adapters are blobs (one graph for all), as onnxruntime-web takes them."""
    manifest = load_manifest(package)
    if manifest.task != "causal-lm" or manifest.mode != "separate":
        raise EdgeLoraError(f"{package}: the web page runs causal-lm packages in separate mode, "
                            f"this one is {manifest.task} in {manifest.mode} mode")


def file_under(root: Path, relative: str) -> Path | None:
    """The file at ``relative`` if it stays under ``root`` (symlinks resolved), else None."""
    return root / relative if inside(root, relative) and (root / relative).is_file() else None


class Handler(BaseHTTPRequestHandler):
    """GET and HEAD of files only: ``/package/...`` from the package, everything else from the page."""

    server: "WebServer"

    def do_GET(self):
        self.send_file(with_body=True)

    def do_HEAD(self):
        self.send_file(with_body=False)

    def route(self) -> Path | None:
        path = unquote(urlsplit(self.path).path)
        if path.startswith(PACKAGE_PREFIX):
            return file_under(self.server.package, path[len(PACKAGE_PREFIX):])
        return file_under(self.server.page, path.lstrip("/") or "index.html")

    def send_file(self, with_body: bool) -> None:
        file = self.route()
        if file is None:
            self.send_error(404)
            return
        with open(file, "rb") as f:
            size = f.seek(0, 2)
            f.seek(0)
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPES.get(file.suffix, "application/octet-stream"))
            self.send_header("Content-Length", str(size))
            self.send_header("Cache-Control", "no-cache")
            for name, value in ISOLATION_HEADERS.items():
                self.send_header(name, value)
            self.end_headers()
            while with_body and (chunk := f.read(CHUNK)):
                self.wfile.write(chunk)

    def log_message(self, format, *args):
        """Quiet: a page load is dozens of requests."""


class WebServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, package: Path, page: Path, port: int):
        self.package, self.page = package.resolve(), page.resolve()
        super().__init__(("127.0.0.1", port), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"


def open_server(package: str | Path, port: int = 8000, page: str | Path = PAGE) -> WebServer:
    """A server bound to loopback (port 0: any free port), after checking the package and the page."""
    package, page = Path(package), Path(page)
    check_package(package)
    check_page(page)
    try:
        return WebServer(package, page, port)
    except OSError as e:
        raise EdgeLoraError(f"--port {port}: cannot listen on 127.0.0.1 ({e.strerror})") from None

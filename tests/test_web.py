"""`edgelora web`'s server: the page and the package as files on loopback, nothing outside them, bad input one line.

The page itself runs in headless Chromium in .ci/run (examples/web/test/parity.py); these tests need no browser.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading

import pytest
from test_add_adapter import run_cli

from edgelora.web import open_server


@pytest.fixture
def page(tmp_path):
    page = tmp_path / "page"
    (page / "node_modules/onnxruntime-web/dist").mkdir(parents=True)
    (page / "index.html").write_text("<!doctype html><title>edgelora</title>")
    (page / "node_modules/onnxruntime-web/dist/ort.wasm").write_bytes(b"\0asm")
    return page


@pytest.fixture
def served(llama, page, tmp_path):
    """(server, package) for a copy of the llama package with a symlink that points out of it."""
    import shutil

    package = shutil.copytree(llama.package, tmp_path / "pkg")
    (tmp_path / "secret.txt").write_text("not for the browser")
    (package / "escape.txt").symlink_to(tmp_path / "secret.txt")
    server = open_server(package, 0, page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server, package
    server.shutdown()
    server.server_close()


def request(server, path: str, method: str = "GET"):
    connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
    connection.request(method, path)
    response = connection.getresponse()
    body = response.read()
    connection.close()
    return response, body


def test_serves_the_page_and_the_package_files(served, page):
    server, package = served
    assert server.url.startswith("http://127.0.0.1:")
    response, body = request(server, "/")
    assert response.status == 200 and body == (page / "index.html").read_bytes()
    assert response.getheader("Content-Type") == "text/html; charset=utf-8"
    assert response.getheader("Cross-Origin-Embedder-Policy") == "require-corp"  # WebAssembly threads need it
    response, body = request(server, "/package/edgelora.json")
    assert response.status == 200 and body == (package / "edgelora.json").read_bytes()
    assert response.getheader("Content-Type") == "application/json"
    response, body = request(server, "/package/model.onnx.data", "HEAD")
    assert response.status == 200 and body == b""
    assert int(response.getheader("Content-Length")) == (package / "model.onnx.data").stat().st_size
    adapter = sorted((package / "adapters").glob("*.onnx_adapter"))[0]
    response, body = request(server, f"/package/adapters/{adapter.name}")
    assert response.status == 200 and body == adapter.read_bytes()
    response, body = request(server, "/node_modules/onnxruntime-web/dist/ort.wasm")
    assert response.getheader("Content-Type") == "application/wasm" and body == b"\0asm"


@pytest.mark.parametrize("path", [
    "/package/../page/index.html", "/package/%2e%2e/secret.txt", "/package/escape.txt", "/package//etc/passwd",
    "/package/", "/package/adapters", "/../secret.txt", "/missing.js", "/package/missing.onnx",
])
def test_refuses_what_is_outside_the_package_or_missing_with_404(served, path):
    server, _ = served
    response, body = request(server, path)
    assert response.status == 404 and b"not for the browser" not in body


def test_bad_inputs_are_one_line_with_exit_2(llama, page, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "index.html").write_text("")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        cases = [
            (["web", tmp_path / "nothing"], "nothing: not a package directory"),
            (["web", tmp_path], "edgelora.json: missing"),
            (["web", llama.package, "--page", tmp_path / "nopage"], "no index.html"),
            (["web", llama.package, "--page", bare], "node_modules: missing; run `npm ci` in"),
            (["web", llama.package, "--page", page, "--port", taken.getsockname()[1]], "cannot listen on 127.0.0.1"),
        ]
        for args, message in cases:
            code, _, text = run_cli(*args)
            assert code == 2, (args, text)
            assert text.startswith("edgelora: error: ") and message in text and text.count("\n") == 1, text


def test_refuses_packages_the_page_cannot_run(fresh_package, page):
    manifest = json.loads((fresh_package / "edgelora.json").read_text())
    (fresh_package / "edgelora.json").write_text(json.dumps({**manifest, "task": "feature-extraction"}))
    code, _, text = run_cli("web", fresh_package, "--page", page)
    assert code == 2 and "runs causal-lm packages in separate mode, this one is feature-extraction in separate" in text

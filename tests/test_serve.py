"""``edgelora serve`` driven over HTTP on 127.0.0.1 by the official ``openai`` client, as a tenant would."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import uvicorn

from edgelora.format.adapter_file import write_adapter
from edgelora.format.factors import AdapterFactors, ModuleFactors
from edgelora.format.manifest import load_manifest
from edgelora.runtime import EdgeModel
from edgelora.server import Settings, create_app
from edgelora.server.run import HTTP
from edgelora.format.sidecar import write_sidecar

ROOT = Path(__file__).resolve().parent.parent
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('role ' + m['role'] + ' is not "
    "supported') }}{% endif %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
KEYS = {"alice": "sk-alice-1", "bob": "sk-bob-2", "admin": "sk-admin-3", "slow": "sk-slow-4"}
KEYS_TOML = """
[[key]]
sha256 = "{alice}"
tenant = "alice"
adapters = ["plain", "up-*"]

[[key]]
sha256 = "{bob}"
tenant = "bob"
adapters = ["rs"]

[[key]]
sha256 = "{admin}"
tenant = "ops"
adapters = ["*"]
admin = true

[[key]]
sha256 = "{slow}"
tenant = "slow"
adapters = ["plain"]
requests_per_minute = 2
"""
PROMPT = "Hello there"


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class LiveServer:
    """uvicorn in a thread on a free loopback port, stopped by the fixture that started it."""

    def __init__(self, app):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        sock.close()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    access_log=False, timeout_graceful_shutdown=2, http=HTTP))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, key: str | None = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=30)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def random_blob(package: Path, folder: Path, name: str, seed: int, fingerprint: str | None = None) -> Path:
    """A new adapter for the package's base, as add-adapter would ship it: blob and sidecar."""
    manifest = load_manifest(package)
    rng = np.random.default_rng(seed)
    modules = {s.name: ModuleFactors(rng.normal(0, 0.3, (s.in_features, 4)).astype(np.float32),
                                     rng.normal(0, 0.3, (4, s.out_features)).astype(np.float32))
               for s in manifest.slots}
    blob = folder / f"{name}.onnx_adapter"
    write_adapter(blob, AdapterFactors(modules, rank=4, alpha=4.0), manifest.adapter_dtype,
                  manifest.adapter_block_size, manifest.slot_groups)
    write_sidecar(blob, fingerprint or manifest.base_fingerprint, hashlib.sha256(blob.read_bytes()).hexdigest())
    return blob


@pytest.fixture(scope="module")
def package(llama, tmp_path_factory) -> Path:
    """The llama package with a chat template, as a package of an instruct model carries it."""
    pkg = tmp_path_factory.mktemp("serve") / "tiny"
    shutil.copytree(llama.package, pkg)
    (pkg / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return pkg


@pytest.fixture(scope="module")
def model(package) -> EdgeModel:
    """A second model over the same package, each call on its own (no batching): the reference every answer of
    the server, whose requests share batched decode steps, is compared with."""
    return EdgeModel.open(package, batching=False)


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "keys.toml"
    path.write_text(KEYS_TOML.format(**{tenant: sha(key) for tenant, key in KEYS.items()}))
    return path


def start(package: Path, **settings) -> LiveServer:
    return LiveServer(create_app(EdgeModel.open(package), Settings(**settings)))


@pytest.fixture(scope="module")
def server(package, keys_file, tmp_path_factory):
    live = start(package, keys=keys_file, adapter_dir=tmp_path_factory.mktemp("uploads"), max_tokens=512,
                 body_timeout_s=1.0, max_body_bytes=64 * 1024)
    yield live
    live.stop()


def chat_ids(package: Path, messages) -> list[int]:
    """transformers' own rendering and tokenization of the package's template: what the server must match."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(str(package))
    tok.chat_template = (package / "chat_template.jinja").read_text()
    return list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


def test_import_loads_no_torch():
    code = "import sys, edgelora.server; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


def test_models_lists_the_base_and_only_the_callers_adapters(server):
    def ids(key):
        return {m.id: getattr(m, "parent", None) for m in server.client(KEYS[key]).models.list()}

    assert ids("alice") == {"tiny": None, "plain": "tiny"}
    assert ids("bob") == {"tiny": None, "rs": "tiny"}
    assert set(ids("admin")) == {"tiny", "plain", "rs", "patterns"}


@pytest.mark.parametrize("key, name, adapter", [
    ("alice", "plain", "plain"),
    ("bob", "tiny", None),
    ("admin", "plain:0.7+rs:0.3", {"plain": 0.7, "rs": 0.3}),
    ("admin", "patterns:0.5", {"patterns": 0.5}),
])
def test_completions_match_generate_streaming_and_not(server, model, key, name, adapter):
    client = server.client(KEYS[key])
    expected = model.generate(PROMPT, adapter=adapter, max_new_tokens=12)
    reply = client.completions.create(model=name, prompt=PROMPT, max_tokens=12, temperature=0)
    assert reply.model == name and reply.object == "text_completion"
    assert reply.choices[0].text == expected.text
    assert reply.choices[0].finish_reason == {"length": "length"}.get(expected.finish_reason, "stop")
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (expected.prompt_tokens,
                                                                          len(expected.token_ids))
    chunks = list(client.completions.create(model=name, prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.text
    assert all(c.model == name for c in chunks)
    assert chunks[-1].usage.completion_tokens == len(expected.token_ids)


def test_sampling_parameters_reach_the_runtime(server, model):
    client = server.client(KEYS["alice"])
    kwargs = dict(max_new_tokens=16, temperature=0.9, top_p=0.8, seed=7)
    expected = model.generate(PROMPT, adapter="plain", **kwargs)
    reply = client.completions.create(model="plain", prompt=PROMPT, max_tokens=16, temperature=0.9, top_p=0.8, seed=7)
    assert reply.choices[0].text == expected.text
    greedy = model.generate(PROMPT, adapter="plain", max_new_tokens=16)
    stop = greedy.text[3:5]
    assert stop and client.completions.create(model="plain", prompt=PROMPT, max_tokens=16, temperature=0,
                                              stop=[stop]).choices[0].text == greedy.text[:greedy.text.find(stop)]
    ids = model.encode(PROMPT)
    assert client.completions.create(model="plain", prompt=ids, max_tokens=5, temperature=0).choices[0].text == \
        model.generate(ids, adapter="plain", max_new_tokens=5).text


def test_chat_renders_the_template_as_transformers_does(server, model, package):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    ids = chat_ids(package, messages)
    expected = model.generate(ids, adapter="rs", max_new_tokens=10)
    client = server.client(KEYS["bob"])
    reply = client.chat.completions.create(model="rs", messages=messages, max_tokens=10, temperature=0)
    assert reply.model == "rs" and reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected.text
    assert reply.usage.prompt_tokens == len(ids)
    chunks = list(client.chat.completions.create(model="rs", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.BadRequestError, match="chat template refused them.*role tool is not supported"):
        client.chat.completions.create(model="rs", messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}])


def test_chat_without_a_template_names_completions(llama, tmp_path):
    live = start(llama.package, adapter_dir=tmp_path)
    try:
        with pytest.raises(openai.BadRequestError, match="no chat template.*/v1/completions"):
            live.client().chat.completions.create(model="plain", messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(openai.BadRequestError, match="feature-extraction.*causal-lm.*/v1/completions"):
            live.client().embeddings.create(model="plain", input="hi")
    finally:
        live.stop()


def test_an_unexpected_failure_is_a_one_line_500_and_the_server_goes_on(llama, tmp_path, caplog):
    """A template that breaks while rendering is the server's fault, not the request's."""
    pkg = tmp_path / "pkg"
    shutil.copytree(llama.package, pkg)
    (pkg / "chat_template.jinja").write_text("{{ messages[0]['content'] + 1 }}")
    live = start(pkg, adapter_dir=tmp_path / "uploads")
    try:
        with caplog.at_level(logging.ERROR, logger="edgelora.server"):
            with pytest.raises(openai.InternalServerError, match="internal error") as caught:
                live.client().chat.completions.create(model="plain", messages=[{"role": "user", "content": "hi"}])
        assert caught.value.body == {"message": "internal error (TypeError)", "type": "server_error", "param": None,
                                     "code": "internal_error"}
        assert [r.getMessage().count("\n") for r in caplog.records] == [0]
        assert live.client().completions.create(model="plain", prompt=PROMPT, max_tokens=2).choices
    finally:
        live.stop()


def test_embeddings_float_and_base64(tmp_path_factory):
    from edgelora.demo.tiny_models import build_encoder, random_peft_adapter
    from edgelora.exporters.export import ExportOptions, export_package

    folder = tmp_path_factory.mktemp("encoder")
    base = build_encoder(folder / "base", task="feature-extraction")
    random_peft_adapter(base, folder / "lora", seed=3, targets=("query", "value"))
    export_package(folder / "base", {"tenant": folder / "lora"}, folder / "pkg", ExportOptions(progress=False))
    reference = EdgeModel.open(folder / "pkg")
    live = start(folder / "pkg")
    try:
        client = live.client()
        texts = ["a short text", "another one"]
        expected = reference.embed(texts, adapter="tenant", normalize=True)
        got = client.embeddings.create(model="tenant", input=texts)
        assert got.model == "tenant" and got.usage.prompt_tokens == int(reference.tokenize(texts)["attention_mask"].sum())
        np.testing.assert_allclose([d.embedding for d in got.data], expected, atol=1e-6)
        raw = httpx.post(live.url + "/v1/embeddings", json={"model": "pkg", "input": "x", "encoding_format": "base64"})
        vector = np.frombuffer(base64.b64decode(raw.json()["data"][0]["embedding"]), "<f4")
        np.testing.assert_allclose(vector, reference.embed(["x"], normalize=True)[0], atol=1e-6)
        with pytest.raises(openai.BadRequestError, match="causal-lm model.*feature-extraction.*/v1/embeddings"):
            client.completions.create(model="tenant", prompt="x")
    finally:
        live.stop()


def upload(server: LiveServer, key: str, name: str, blob: Path, sidecar: Path | None = None) -> httpx.Response:
    files = {"adapter": (blob.name, blob.read_bytes())}
    sidecar = sidecar or blob.with_suffix(".json")
    if sidecar.exists():
        files["sidecar"] = (sidecar.name, sidecar.read_bytes())
    return httpx.post(server.url + "/v1/adapters", data={"name": name}, files=files,
                      headers={"Authorization": f"Bearer {KEYS[key]}"}, timeout=30)


def admin(method: str, server: LiveServer, path: str, key: str = "admin") -> httpx.Response:
    return httpx.request(method, server.url + path, headers={"Authorization": f"Bearer {KEYS[key]}"}, timeout=30)


def test_upload_is_used_at_once_listed_deleted_and_survives_a_restart(server, package, keys_file, tmp_path):
    blob = random_blob(package, tmp_path, "made-here", seed=11)
    assert upload(server, "alice", "up-one", blob).status_code == 403
    reply = upload(server, "admin", "up-one", blob)
    assert reply.status_code == 201, reply.text
    assert reply.json()["source"] == "uploaded" and reply.json()["bytes"] == blob.stat().st_size
    reference = EdgeModel.open(package)
    reference.load_adapter(blob, "up-one")
    expected = reference.generate(PROMPT, adapter="up-one", max_new_tokens=10).text
    alice = server.client(KEYS["alice"])
    assert alice.completions.create(model="up-one", prompt=PROMPT, max_tokens=10, temperature=0).choices[0].text == \
        expected
    assert "up-one" in {m.id for m in alice.models.list()}
    with pytest.raises(openai.NotFoundError):  # bob may not use it: the same 404 as a name nobody has
        server.client(KEYS["bob"]).completions.create(model="up-one", prompt=PROMPT)
    listing = {a["id"]: a for a in admin("GET", server, "/v1/adapters").json()["data"]}
    assert listing["up-one"]["resident"] and listing["plain"]["source"] == "package"
    assert upload(server, "admin", "up-one", blob).status_code == 409

    folder = server.server.config.app.state.server.store.folder
    restarted = start(package, keys=keys_file, adapter_dir=folder)
    try:
        answer = restarted.client(KEYS["alice"]).completions.create(model="up-one", prompt=PROMPT, max_tokens=10,
                                                                    temperature=0)
        assert answer.choices[0].text == expected
    finally:
        restarted.stop()
    assert admin("DELETE", server, "/v1/adapters/plain").status_code == 400  # the package's own
    assert admin("DELETE", server, "/v1/adapters/up-one").status_code == 200
    with pytest.raises(openai.NotFoundError):
        alice.completions.create(model="up-one", prompt=PROMPT)
    assert sorted(p.name for p in folder.iterdir()) == []


@pytest.mark.parametrize("case", ["truncated", "other base", "no sidecar", "bad sidecar", "path name", "dot name",
                                  "base name", "not multipart"])
def test_a_bad_upload_is_refused_and_leaves_nothing(server, package, tmp_path, case):
    blob = random_blob(package, tmp_path, "b", seed=5, fingerprint="sha256:" + "0" * 64 if case == "other base"
                       else None)
    name = {"path name": "../escape", "dot name": ".hidden", "base name": "tiny"}.get(case, "up-bad")
    if case == "truncated":
        data = blob.read_bytes()
        blob.write_bytes(data[: len(data) // 2])
    if case == "no sidecar":
        blob.with_suffix(".json").unlink()
    if case == "bad sidecar":
        blob.with_suffix(".json").write_text("{not json")
    if case == "not multipart":
        reply = httpx.post(server.url + "/v1/adapters", content=b"\x00" * 10,
                           headers={"Authorization": f"Bearer {KEYS['admin']}"})
    else:
        reply = upload(server, "admin", name, blob)
    status = {"truncated": 422, "other base": 422, "bad sidecar": 422, "base name": 409}.get(case, 400)
    assert reply.status_code == status, reply.text
    message = reply.json()["error"]["message"]
    assert "\n" not in message and str(tmp_path) not in message
    if case == "other base":
        assert "was built for base sha256:0000" in message
    folder = server.server.config.app.state.server.store.folder
    assert [p.name for p in folder.iterdir()] == []
    assert {m.id for m in server.client(KEYS["admin"]).models.list()} == {"tiny", "plain", "rs", "patterns"}


def raw_request(port: int, data: bytes, pause_after: int | None = None, timeout: float = 10) -> bytes:
    """A hand-made HTTP exchange, for what no client library sends: stalls and broken bytes.
    ``pause_after``: send only the head and that many bytes of the body, then wait."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data if pause_after is None else data[:data.index(b"\r\n\r\n") + 4 + pause_after])
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
            if b"\r\n\r\n" in reply and b"}}" in reply:
                break
        return reply


def http(path: str, body: bytes, key: str = "admin", length: int | None = None, ctype="application/json") -> bytes:
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEYS[key]}\r\n"
            f"Content-Type: {ctype}\r\nContent-Length: {len(body) if length is None else length}\r\n\r\n")
    return head.encode() + body


def completion(**fields) -> bytes:
    return json.dumps({"model": "plain", "prompt": "hi", "max_tokens": 2, **fields}).encode()


# (what is wrong, request, status): the corpus of malformed requests, each answered and survived
BAD_REQUESTS = [
    ("truncated JSON", lambda: http("/v1/completions", b'{"model": "plain", "prompt": '), 400),
    ("non-UTF-8 body", lambda: http("/v1/completions", b'{"model": "plain", "prompt": "\xff\xfe"}'), 400),
    ("JSON array", lambda: http("/v1/completions", b"[1, 2]"), 400),
    ("empty body", lambda: http("/v1/completions", b""), 400),
    ("model missing", lambda: http("/v1/completions", b'{"prompt": "hi"}'), 400),
    ("prompt a number", lambda: http("/v1/completions", completion(prompt=5)), 400),
    ("prompt empty", lambda: http("/v1/completions", completion(prompt="")), 400),
    ("negative token id", lambda: http("/v1/completions", completion(prompt=[1, -2])), 400),
    ("token id past the vocabulary", lambda: http("/v1/completions", completion(prompt=[1, 10 ** 6])), 400),
    ("max_tokens a string", lambda: http("/v1/completions", completion(max_tokens="5")), 400),
    ("max_tokens zero", lambda: http("/v1/completions", completion(max_tokens=0)), 400),
    ("huge max_tokens", lambda: http("/v1/completions", completion(max_tokens=10 ** 9)), 400),
    ("negative temperature", lambda: http("/v1/completions", completion(temperature=-1)), 400),
    ("top_p zero", lambda: http("/v1/completions", completion(top_p=0)), 400),
    ("stop a number", lambda: http("/v1/completions", completion(stop=[1])), 400),
    ("five stop strings", lambda: http("/v1/completions", completion(stop=list("abcde"))), 400),
    ("n = 2", lambda: http("/v1/completions", completion(n=2)), 400),
    ("stream not a bool", lambda: http("/v1/completions", completion(stream="yes")), 400),
    ("bad composition weight", lambda: http("/v1/completions", completion(model="plain:much")), 400),
    ("unknown adapter", lambda: http("/v1/completions", completion(model="nobody")), 404),
    ("foreign adapter", lambda: http("/v1/completions", completion(model="rs"), key="alice"), 404),
    ("foreign adapter in a composition", lambda: http("/v1/completions", completion(model="plain:0.5+rs:0.5"),
                                                       key="alice"), 404),
    ("chat without messages", lambda: http("/v1/chat/completions", b'{"model": "plain", "messages": []}'), 400),
    ("chat message with an unknown role", lambda: http(
        "/v1/chat/completions", b'{"model": "plain", "messages": [{"role": "wizard", "content": "x"}]}'), 400),
    ("wrong key", lambda: http("/v1/completions", completion()).replace(KEYS["admin"].encode(), b"sk-nobody"),
     401),
    ("missing key", lambda: http("/v1/completions", completion()).replace(
        f"Authorization: Bearer {KEYS['admin']}\r\n".encode(), b""), 401),
    ("oversized body", lambda: http("/v1/completions", completion(prompt="x" * 100_000)), 413),
    ("oversized declared length", lambda: http("/v1/completions", b"{}", length=10 ** 9), 413),
    ("unknown endpoint", lambda: http("/v1/nothing", b"{}"), 404),
    ("wrong method", lambda: http("/v1/models", b"{}"), 405),
    ("non-admin lists adapters", lambda: b"GET /v1/adapters HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                                         + KEYS["alice"].encode() + b"\r\n\r\n", 403),
    ("non-admin deletes an adapter", lambda: b"DELETE /v1/adapters/plain HTTP/1.1\r\nHost: x\r\nAuthorization: "
                                             b"Bearer " + KEYS["bob"].encode() + b"\r\n\r\n", 403),
]


@pytest.mark.parametrize("what, request_bytes, status", BAD_REQUESTS, ids=[case[0] for case in BAD_REQUESTS])
def test_bad_request_corpus(server, model, what, request_bytes, status):
    reply = raw_request(server.port, request_bytes())
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == str(status).encode(), reply[:300]
    error = json.loads(body[body.index(b"{"):])["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert "\n" not in error["message"] and "Traceback" not in error["message"]
    ok = server.client(KEYS["alice"]).completions.create(model="plain", prompt=PROMPT, max_tokens=4, temperature=0)
    assert ok.choices[0].text == model.generate(PROMPT, adapter="plain", max_new_tokens=4).text


def test_a_client_that_stalls_mid_body_gets_408(server):
    started = time.monotonic()
    reply = raw_request(server.port, http("/v1/completions", completion()), pause_after=10)
    assert reply.split(b" ")[1] == b"408" and time.monotonic() - started < 5
    assert b'"code":"request_timeout"' in reply
    assert server.client(KEYS["alice"]).models.list().data


def metric(server: LiveServer, name: str) -> float:
    text = admin("GET", server, "/metrics").text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_a_prompt_past_the_context_is_refused_or_truncated_on_request(server, model):
    client = server.client(KEYS["alice"])
    prompt = [5 + i % 40 for i in range(600)]
    with pytest.raises(openai.BadRequestError, match="past the model's context of 512 positions"):
        client.completions.create(model="plain", prompt=prompt, max_tokens=8, temperature=0)
    reply = client.completions.create(model="plain", prompt=prompt, max_tokens=8, temperature=0,
                                      extra_body={"truncate": True})
    expected = model.generate(prompt[-504:], adapter="plain", max_new_tokens=8)
    assert reply.choices[0].text == expected.text and reply.usage.prompt_tokens == 504


def test_a_client_that_disconnects_mid_stream_frees_its_row(server, caplog):
    steps = metric(server, "edgelora_decode_steps_total")
    with caplog.at_level(logging.INFO, logger="edgelora.server.access"):
        with httpx.stream("POST", server.url + "/v1/completions", timeout=30,
                          headers={"Authorization": f"Bearer {KEYS['alice']}"},
                          json={"model": "plain", "prompt": PROMPT, "max_tokens": 480, "ignore_eos": True,
                                "stream": True}) as reply:
            lines = reply.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
            assert metric(server, "edgelora_requests_in_flight") == 1
        deadline = time.monotonic() + 5
        while metric(server, "edgelora_requests_in_flight") or metric(server, "edgelora_batch_size"):
            assert time.monotonic() < deadline, "the stream went on after its client left"
            time.sleep(0.02)
    time.sleep(0.5)
    assert metric(server, "edgelora_decode_steps_total") - steps < 400  # of the 480 it would have run
    lines = access_lines(caplog, "POST /v1/completions")
    assert len(lines) == 1 and "finish=cancelled" in lines[0], lines


def test_past_the_engines_queue_a_request_gets_429_with_retry_after(package, tmp_path):
    from edgelora.runtime import BatchSettings

    live = LiveServer(create_app(EdgeModel.open(package, batching=BatchSettings(max_batch=1, max_queue=0)),
                                 Settings(adapter_dir=tmp_path)))
    try:
        with httpx.stream("POST", live.url + "/v1/completions", timeout=30,
                          json={"model": "plain", "prompt": PROMPT, "max_tokens": 480, "ignore_eos": True,
                                "stream": True}) as reply:
            lines = reply.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
            with pytest.raises(openai.RateLimitError, match="busy") as caught:
                live.client().completions.create(model="plain", prompt=PROMPT, max_tokens=4)
            assert int(caught.value.response.headers["retry-after"]) >= 1
        assert live.client().completions.create(model="plain", prompt=PROMPT, max_tokens=4).choices[0].text is not None
    finally:
        live.stop()


def test_rate_limits_answer_429_with_retry_after(server):
    client = server.client(KEYS["slow"])
    for _ in range(2):
        client.completions.create(model="plain", prompt=PROMPT, max_tokens=1)
    with pytest.raises(openai.RateLimitError) as caught:
        client.completions.create(model="plain", prompt=PROMPT, max_tokens=1)
    assert int(caught.value.response.headers["retry-after"]) >= 1


def test_sixteen_concurrent_clients_each_get_their_own_adapters_answer(server, model):
    jobs = [(key, name, adapter, f"{PROMPT} #{i}")
            for i in range(16)
            for key, name, adapter in [[("alice", "plain", "plain"), ("bob", "rs", "rs"), ("admin", "tiny", None),
                                        ("admin", "plain:0.5+patterns:0.5", {"plain": 0.5, "patterns": 0.5})][i % 4]]]

    def ask(job):
        key, name, _, prompt = job
        client = server.client(KEYS[key])
        if len(prompt) % 2:
            return "".join(c.choices[0].text for c in client.completions.create(
                model=name, prompt=prompt, max_tokens=24, temperature=0, stream=True))
        return client.completions.create(model=name, prompt=prompt, max_tokens=24, temperature=0).choices[0].text

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, jobs))
    for (_, _, adapter, prompt), answer in zip(jobs, answers):
        assert answer == model.generate(prompt, adapter=adapter, max_new_tokens=24).text


def access_lines(caplog, request: str, within_s: float = 5) -> list[str]:
    """The access log's lines of ``request``, once there is one: a line is written when the response's last byte
    has gone, which may be after the client has read it."""
    deadline = time.monotonic() + within_s
    while True:
        lines = [r.getMessage() for r in caplog.records
                 if r.name == "edgelora.server.access" and request in r.getMessage()]
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.02)


def test_metrics_and_one_access_line_per_request_without_prompt_or_key(server, caplog):
    secret = "my secret prompt text"
    with caplog.at_level(logging.INFO, logger="edgelora.server.access"):
        server.client(KEYS["alice"]).completions.create(model="plain", prompt=secret, max_tokens=3, temperature=0)
        lines = access_lines(caplog, "POST /v1/completions")
    assert len(lines) == 1 and "POST /v1/completions 200" in lines[0] and "model=plain" in lines[0]
    assert "tenant=alice" in lines[0] and secret not in lines[0] and KEYS["alice"] not in lines[0]
    text = admin("GET", server, "/metrics").text
    for name in ("edgelora_requests_total", "edgelora_prompt_tokens_total", "edgelora_completion_tokens_total",
                 "edgelora_time_to_first_token_seconds_bucket", "edgelora_time_per_output_token_seconds_bucket"):
        assert re.search(name + r'\{[^}]*adapter="plain"', text), name
    assert "edgelora_adapter_resident_bytes" in text and "edgelora_adapter_evictions_total" in text
    assert admin("GET", server, "/metrics", key="alice").status_code == 403


@pytest.mark.parametrize("text, error", [
    ("[[key]]\nsha256 = 'abc'\ntenant = 't'", "key[0]: sha256 must be the 64 hex digits"),
    (f"[[key]]\nsha256 = '{sha('k')}'", "key[0]: tenant must be a non-empty string"),
    (f"[[key]]\nsha256 = '{sha('k')}'\ntenant = 't'\nadmin = 'yes'", "key[0]: admin must be true or false"),
    (f"[[key]]\nsha256 = '{sha('k')}'\ntenant = 't'\nrequests_per_minute = 0", "must be a positive number"),
    (f"[[key]]\nsha256 = '{sha('k')}'\ntenant = 't'\nkey = 'k'", "unknown field 'key'"),
    ("[[key]\n", "not valid TOML"),
    ("", "no [[key]] tables"),
])
def test_a_bad_keys_file_is_one_line_naming_the_entry(tmp_path, text, error):
    from edgelora.errors import EdgeLoraError
    from edgelora.server.keys import KeyRing

    (tmp_path / "keys.toml").write_text(text)
    with pytest.raises(EdgeLoraError, match=re.escape(error)) as caught:
        KeyRing.load(tmp_path / "keys.toml")
    assert str(caught.value).startswith(str(tmp_path / "keys.toml")) and "\n" not in str(caught.value)


def test_cli_refuses_other_hosts_without_keys(package):
    out = subprocess.run([sys.executable, "-m", "edgelora.cli", "serve", str(package), "--host", "0.0.0.0"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "without --keys the server binds only to loopback" in out.stderr


def refuses_connections(port: int, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
        except httpx.TransportError:
            return True
        time.sleep(0.05)
    return False


def test_sigterm_lets_a_running_stream_finish(package, tmp_path):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen([sys.executable, "-m", "edgelora.cli", "serve", str(package), "--port", str(port),
                             "--adapter-dir", str(tmp_path / "a"), "--grace", "20"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and proc.poll() is None, "the server did not start"
                time.sleep(0.1)
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", timeout=30,
                          json={"model": "plain", "prompt": PROMPT, "max_tokens": 480, "ignore_eos": True,
                                "stream": True}) as reply:
            lines = reply.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
            proc.send_signal(signal.SIGTERM)
            assert refuses_connections(port, within_s=5), "still taking requests after SIGTERM"
            rest = [line for line in lines if line.startswith("data:")]
        assert len(rest) > 100, "the stream had ended before the signal: nothing was tested"
        assert rest[-1] == "data: [DONE]" and json.loads(rest[-2][5:])["choices"][0]["finish_reason"] == "length"
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once drained
        assert "Finished server process" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.skipif(shutil.which("java") is None, reason="needs a JDK's java on PATH")
def test_java_example_two_tenants_and_an_upload(package, keys_file, tmp_path):
    live = start(package, keys=keys_file, adapter_dir=tmp_path / "uploads")
    blob = random_blob(package, tmp_path, "acme-support", seed=21)
    try:
        env = {**os.environ, "EDGELORA_URL": live.url, "TENANT_A_KEY": KEYS["alice"], "TENANT_A_MODEL": "plain",
               "TENANT_B_KEY": KEYS["bob"], "TENANT_B_MODEL": "rs", "ADMIN_KEY": KEYS["admin"],
               "UPLOAD_NAME": "up-support", "UPLOAD_BLOB": str(blob), "UPLOAD_TENANT_KEY": KEYS["alice"],
               "PROMPT": PROMPT, "MAX_TOKENS": "16"}
        out = subprocess.run(["java", str(ROOT / "examples" / "java" / "TenantChat.java")], env=env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        answers = dict(re.findall(r"^\[(\S+)\] (\".*\")$", out.stdout, re.M))
        reference = EdgeModel.open(package)
        reference.load_adapter(blob, "up-support")
        assert {name: json.loads(text) for name, text in answers.items()} == {
            name: reference.generate(PROMPT, adapter=name, max_new_tokens=16).text
            for name in ("plain", "rs", "up-support")}
    finally:
        live.stop()

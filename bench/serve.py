"""Load on ``edgelora serve``: many tenants' streaming requests over OpenAI's HTTP API, on a SmolLM-135M-shaped
int4 package with eight rank-16 tenant adapters.

    .venv/bin/python bench/serve.py [--work bench/work-serve] [--requests 400] [--clients 16]

Builds the model as ``bench/decode.py`` does (its ``build_model``: random weights, tied embeddings, the character
tokenizer) and eight rank-16 PEFT adapters on all seven projections, exports them into one package (int4 base,
int8 adapters, accuracy level 4), starts ``edgelora serve`` on 127.0.0.1 in its own process, and sends
``--requests`` streaming completions from ``--clients`` concurrent clients (the official ``openai`` async client),
each request for one of the eight adapters in turn: a 32-token prompt, 32 new tokens (EOS ignored, so every
request does the same work). The package's tokenizer is replaced by a word-level one with one word per token id,
so that every generated token reaches the client as a piece of text. One warm-up request per adapter comes first and is not counted. Reports requests/s,
tokens/s, time to first token and per-token latency (p50/p99, as the clients see them) and the errors, which must
be zero.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from decode import ADAPTERS, ALL, HERE, RANK, build_model

from edgelora.format.manifest import load_manifest

TENANTS = 8
PROMPT_TOKENS, NEW_TOKENS = 32, 32


def build_package(work: Path) -> Path:
    """The decode bench's base and adapters a and b, six more tenants like them, exported once and reused."""
    package = work / "package"
    if (package / "edgelora.json").exists():
        return package
    build_model(work)
    names = [name for name, (_, rank) in ADAPTERS.items() if rank == RANK]
    extra = [f"t{i}" for i in range(len(names), TENANTS)]
    missing = [name for name in extra if not (work / "peft" / name / "adapter_config.json").exists()]
    if missing:
        import transformers

        from edgelora.demo.tiny_models import random_peft_adapter

        model = transformers.LlamaForCausalLM.from_pretrained(work / "base").eval()
        for i, name in enumerate(missing):
            random_peft_adapter(model, work / "peft" / name, seed=100 + i, r=RANK, alpha=2 * RANK, targets=ALL)
    specs = [arg for name in names + extra for arg in ("--adapter", f"{name}={work / 'peft' / name}")]
    edgelora = str(Path(sys.executable).with_name("edgelora"))
    subprocess.run([edgelora, "export", str(work / "base"), *specs, "--out", str(package), "--quantize", "int4",
                    "--adapter-dtype", "int8", "--accuracy-level", "4", "--quiet"], check=True)
    word_tokenizer(package)
    return package


def word_tokenizer(package: Path) -> None:
    """One word per token id of the whole vocabulary, so each generated token streams as its own piece (the
    decode bench's character tokenizer covers ~100 ids, and a random model's tokens mostly decode to nothing)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab_size = load_manifest(package).graph["vocab_size"]
    vocab = {token: i for i, token in enumerate(specials + [f"w{i}" for i in range(len(specials), vocab_size)])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(specials)
    tokenizer.save(str(package / load_manifest(package).tokenizer))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(package: Path, work: Path, port: int) -> subprocess.Popen:
    edgelora = str(Path(sys.executable).with_name("edgelora"))
    log = open(work / "server.log", "w")
    proc = subprocess.Popen([edgelora, "serve", str(package), "--port", str(port), "--adapter-dir",
                             str(work / "uploads")], stdout=log, stderr=subprocess.STDOUT)
    import httpx

    deadline = time.monotonic() + 120
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).raise_for_status()
            return proc
        except httpx.TransportError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                sys.exit(f"the server did not start; see {work / 'server.log'}")
            time.sleep(0.2)


async def one_request(client, model: str, prompt: str) -> dict:
    """One streaming completion, timed as its client sees it."""
    t0 = time.perf_counter()
    first = last = None
    usage = None
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=NEW_TOKENS, temperature=0,
                                             stream=True, stream_options={"include_usage": True},
                                             extra_body={"ignore_eos": True})
    async for chunk in stream:
        now = time.perf_counter()
        if chunk.choices and chunk.choices[0].text:
            first = first or now
            last = now
        if chunk.usage is not None:
            usage = chunk.usage
    if first is None:
        raise RuntimeError("the stream carried no text")
    tokens = usage.completion_tokens
    return {"ttft": first - t0, "per_token": (last - first) / max(tokens - 1, 1), "tokens": tokens,
            "seconds": time.perf_counter() - t0}


async def load(port: int, models: list[str], requests: int, clients: int, timeout_s: float) -> tuple[list, list, float]:
    import openai

    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
    rng = random.Random(0)
    prompts = [" ".join(f"w{rng.randrange(4, 5000)}" for _ in range(PROMPT_TOKENS)) for _ in range(requests)]
    for model in models:  # warm-up: each adapter loaded once, not timed
        await one_request(client, model, prompts[0])
    queue = list(range(requests))
    results, errors = [], []

    async def worker():
        while queue:
            i = queue.pop(0)
            try:
                results.append(await one_request(client, models[i % len(models)], prompts[i]))
            except Exception as e:  # counted and reported: the run must show zero
                errors.append(f"{type(e).__name__}: {e}")

    t0 = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(clients))), timeout_s)
    return results, errors, time.perf_counter() - t0


def server_counters(port: int) -> dict[str, float]:
    """The server's own unlabelled counters from /metrics, read once the load is over."""
    import httpx

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
            if line.startswith("edgelora_") and "{" not in line}


def report(results: list, errors: list, seconds: float, args, package: Path, server: dict) -> str:
    ttft = np.array([r["ttft"] for r in results]) * 1e3
    per_token = np.array([r["per_token"] for r in results]) * 1e3
    tokens = sum(r["tokens"] for r in results)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=HERE).stdout.strip()
    size = sum(p.stat().st_size for p in package.rglob("*") if p.is_file()) / 1e6
    return f"""# `edgelora serve` under load

Command: `python bench/serve.py --requests {args.requests} --clients {args.clients}` (commit {commit},
{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC).

Model: SmolLM-135M-shaped Llama (random weights, built as `bench/decode.py` builds it), int4 base
(accuracy level 4), eight rank-16 int8 adapters on all seven projections; package {size:.0f} MB.
`edgelora serve` runs in its own process on 127.0.0.1 with the default settings; the clients (the `openai`
async client, {args.clients} concurrent, in one process) share the same 2-core machine.
{args.note}

Each request: a {PROMPT_TOKENS}-token prompt, {NEW_TOKENS} new tokens, greedy, EOS ignored, streamed (the package's
tokenizer is a word-level one with a word per token id, so every token is a piece of the stream); the
{TENANTS} adapters in turn, so the server's decode steps mix tenants. One warm-up request per adapter first,
not counted.

| | value |
|---|---|
| requests | {len(results)} ok, {len(errors)} errors |
| wall time | {seconds:.1f} s |
| requests/s | {len(results) / seconds:.2f} |
| generated tokens/s | {tokens / seconds:.1f} |
| time to first token, p50 / p99 | {np.percentile(ttft, 50):.0f} / {np.percentile(ttft, 99):.0f} ms |
| per-token latency after the first, p50 / p99 | {np.percentile(per_token, 50):.1f} / {np.percentile(per_token, 99):.1f} ms |
| server: decode steps, mean rows per step | {server["edgelora_decode_steps_total"]:.0f}, {server["edgelora_rows_stepped_total"] / max(server["edgelora_decode_steps_total"], 1):.2f} |
| server: adapter loads, evictions | {server["edgelora_adapter_loads_total"]:.0f}, {server["edgelora_adapter_evictions_total"]:.0f} |
""" + ("".join(f"\nerror: {e}" for e in errors[:10]) + "\n" if errors else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=str(HERE / "work-serve"))
    parser.add_argument("--results", default=str(HERE / "RESULTS-serve.md"))
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=1800, help="bound on the load's wall seconds")
    parser.add_argument("--note", default="", help="a line for the results, e.g. what else ran on the machine")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    package = build_package(work)
    models = sorted(load_manifest(package).adapters)
    port = free_port()
    server = start_server(package, work, port)
    try:
        results, errors, seconds = asyncio.run(load(port, models, args.requests, args.clients, args.timeout))
        counters = server_counters(port)
    finally:
        server.terminate()
        server.wait(timeout=60)
    text = report(results, errors, seconds, args, package, counters)
    Path(args.results).write_text(text)
    print(text)
    if errors:
        sys.exit(1)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()

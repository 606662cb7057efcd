"""Load on ``edgelora serve``: many tenants' streaming requests over OpenAI's HTTP API, on a SmolLM-135M-shaped
int4 package with eight rank-16 tenant adapters; the single server beside two Ray Serve replicas (``--ray``).

    .venv/bin/python bench/serve.py [--work bench/work-serve] [--requests 400] [--clients 16]
        [--setups single,ray,ray-load] [--skew 0]

Builds the model as ``bench/decode.py`` does (its ``build_model``: random weights, tied embeddings, the character
tokenizer) and eight rank-16 PEFT adapters on all seven projections, exports them into one package (int4 base,
int8 adapters, accuracy level 4), starts ``edgelora serve`` on 127.0.0.1 in its own process, and sends
``--requests`` streaming completions from ``--clients`` concurrent clients (the official ``openai`` async client),
each request for one of the eight adapters: in turn, or with ``--skew S`` drawn at random with tenant k's share
proportional to 1/k^S (a few busy tenants, a long tail): a 32-token prompt, 32 new tokens (EOS ignored, so every
request does the same work). The package's tokenizer is replaced by a word-level one with one word per token id,
so that every generated token reaches the client as a piece of text. One warm-up request per adapter comes first
and is not counted. Each setup in ``--setups`` gets the same requests: ``single`` is ``edgelora serve`` with its
defaults; ``ray`` is ``edgelora serve --ray`` with two replicas of half a CPU each and two adapters warm per
replica, routed by adapter; ``ray-load`` the same with Ray's default routing (the less busy of two replicas,
blind to adapters). Reports requests/s, tokens/s, time to first token and per-token latency (p50/p99, as the
clients see them), the adapter loads per 1000 requests during the timed load, and the errors, which must be zero.
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
RAY = ["--ray", "--replicas", "2", "--adapters-per-replica", "2", "--replica-cpus", "0.5"]
SETUPS = {
    "single": ("edgelora serve", []),
    "ray": ("2 Ray replicas, routed by adapter", RAY + ["--routing", "adapter"]),
    "ray-load": ("2 Ray replicas, Ray's default routing", RAY + ["--routing", "load"]),
}


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


def start_server(package: Path, work: Path, port: int, setup: str) -> subprocess.Popen:
    edgelora = str(Path(sys.executable).with_name("edgelora"))
    log = open(work / f"server-{setup}.log", "w")
    uploads = work / f"uploads-{setup}"
    proc = subprocess.Popen([edgelora, "serve", str(package), "--port", str(port), "--adapter-dir", str(uploads),
                             *SETUPS[setup][1]], stdout=log, stderr=subprocess.STDOUT)
    import httpx

    deadline = time.monotonic() + 300
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).raise_for_status()
            return proc
        except httpx.HTTPError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                sys.exit(f"the server did not start; see {log.name}")
            time.sleep(0.5)


def tenant_sequence(models: list[str], requests: int, skew: float) -> list[str]:
    """The adapter of each request: in turn, or drawn with tenant k's share proportional to 1/k^skew."""
    if skew == 0:
        return [models[i % len(models)] for i in range(requests)]
    rng = random.Random(1)
    return rng.choices(models, weights=[1 / (k + 1) ** skew for k in range(len(models))], k=requests)


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


async def load(port: int, models: list[str], sequence: list[str], clients: int,
               timeout_s: float) -> tuple[list, list, float, dict]:
    """The timed requests, and the server's counters when they began (after the warm-up)."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
    rng = random.Random(0)
    prompts = [" ".join(f"w{rng.randrange(4, 5000)}" for _ in range(PROMPT_TOKENS)) for _ in sequence]
    for model in models:  # warm-up: each adapter loaded once, not timed
        await one_request(client, model, prompts[0])
    before = server_counters(port)
    queue = list(range(len(sequence)))
    results, errors = [], []

    async def worker():
        while queue:
            i = queue.pop(0)
            try:
                results.append(await one_request(client, sequence[i], prompts[i]))
            except Exception as e:  # counted and reported: the run must show zero
                errors.append(f"{type(e).__name__}: {e}")

    t0 = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(clients))), timeout_s)
    return results, errors, time.perf_counter() - t0, before


def server_counters(port: int) -> dict[str, float]:
    """The server's own unlabelled counters from /metrics (with --ray: its replicas' as they last reported)."""
    import httpx

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
            if line.startswith("edgelora_") and "{" not in line}


def run_setup(setup: str, package: Path, work: Path, models: list[str], sequence: list[str], args) -> dict:
    port = free_port()
    server = start_server(package, work, port, setup)
    try:
        results, errors, seconds, before = asyncio.run(load(port, models, sequence, args.clients, args.timeout))
        after = server_counters(port)
    finally:
        server.terminate()
        server.wait(timeout=120)
    return {"results": results, "errors": errors, "seconds": seconds,
            "counters": {name: after[name] - before.get(name, 0) for name in after}}


def report(runs: dict[str, dict], args, package: Path) -> str:
    def column(run: dict) -> list[str]:
        results, seconds, counters = run["results"], run["seconds"], run["counters"]
        ttft = np.array([r["ttft"] for r in results]) * 1e3
        per_token = np.array([r["per_token"] for r in results]) * 1e3
        steps = max(counters.get("edgelora_decode_steps_total", 0), 1)
        loads = counters.get("edgelora_adapter_loads_total", 0)
        return [f"{len(results)} ok, {len(run['errors'])} errors", f"{seconds:.1f} s",
                f"{len(results) / seconds:.2f}", f"{sum(r['tokens'] for r in results) / seconds:.1f}",
                f"{np.percentile(ttft, 50):.0f} / {np.percentile(ttft, 99):.0f} ms",
                f"{np.percentile(per_token, 50):.1f} / {np.percentile(per_token, 99):.1f} ms",
                f"{counters.get('edgelora_decode_steps_total', 0):.0f}, "
                f"{counters.get('edgelora_rows_stepped_total', 0) / steps:.2f}",
                f"{loads:.0f} ({1000 * loads / max(len(results), 1):.0f} per 1000 requests)"]

    rows = ["requests", "wall time", "requests/s", "generated tokens/s", "time to first token, p50 / p99",
            "per-token latency after the first, p50 / p99", "server: decode steps, mean rows per step",
            "server: adapter loads"]
    columns = {setup: column(run) for setup, run in runs.items()}
    table = "| | " + " | ".join(SETUPS[setup][0] for setup in runs) + " |\n|---|" + "---|" * len(runs) + "\n"
    table += "".join(f"| {row} | " + " | ".join(columns[setup][i] for setup in runs) + " |\n"
                     for i, row in enumerate(rows))
    errors = [f"\nerror ({setup}): {e}" for setup, run in runs.items() for e in run["errors"][:10]]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=HERE).stdout.strip()
    size = sum(p.stat().st_size for p in package.rglob("*") if p.is_file()) / 1e6
    order = "in turn" if args.skew == 0 else f"drawn at random, tenant k's share proportional to 1/k^{args.skew:g}"
    return f"""# `edgelora serve` under load

Command: `python bench/serve.py --requests {args.requests} --clients {args.clients} --setups {args.setups} \\
--skew {args.skew:g}` (commit {commit}, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC).

Model: SmolLM-135M-shaped Llama (random weights, built as `bench/decode.py` builds it), int4 base
(accuracy level 4), eight rank-16 int8 adapters on all seven projections; package {size:.0f} MB.
Each setup runs in its own processes on 127.0.0.1; the clients (the `openai` async client, {args.clients}
concurrent, in one process) share the same 2-core machine. `edgelora serve` has its default settings; the Ray
setups are `edgelora serve --ray --replicas 2 --adapters-per-replica 2 --replica-cpus 0.5` with `--routing
adapter` or `--routing load`, so four adapters are warm at a time for eight tenants.
{args.note}

Each request: a {PROMPT_TOKENS}-token prompt, {NEW_TOKENS} new tokens, greedy, EOS ignored, streamed (the package's
tokenizer is a word-level one with a word per token id, so every token is a piece of the stream); the {TENANTS} adapters
{order}, the same sequence for every setup. One warm-up request per adapter first, not counted;
the server's counters are those of the timed requests.

{table}""" + ("".join(errors) + "\n" if errors else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=str(HERE / "work-serve"))
    parser.add_argument("--results", default=str(HERE / "RESULTS-serve.md"))
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--setups", default="single,ray,ray-load", help=f"any of {', '.join(SETUPS)}")
    parser.add_argument("--skew", type=float, default=0.0, help="tenant k's share of requests ~ 1/k^skew; 0: in turn")
    parser.add_argument("--timeout", type=float, default=1800, help="bound on each setup's load, in wall seconds")
    parser.add_argument("--note", default="", help="a line for the results, e.g. what else ran on the machine")
    args = parser.parse_args()
    setups = args.setups.split(",")
    unknown = [setup for setup in setups if setup not in SETUPS]
    if unknown or args.skew < 0:
        parser.error(f"--setups: unknown {unknown}" if unknown else "--skew must be >= 0")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    package = build_package(work)
    models = sorted(load_manifest(package).adapters)
    sequence = tenant_sequence(models, args.requests, args.skew)
    runs = {setup: run_setup(setup, package, work, models, sequence, args) for setup in setups}
    text = report(runs, args, package)
    Path(args.results).write_text(text)
    print(text)
    if any(run["errors"] for run in runs.values()):
        sys.exit(1)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()

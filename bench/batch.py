"""Batched decoding across tenants: aggregate tokens/s of 1-16 concurrent requests on the SmolLM-135M-shaped Llama.

    .venv/bin/python bench/batch.py [--work bench/work-decode] [--rounds 2] [--results bench/RESULTS-batch.md]

Reuses bench/decode.py's model (random weights, rank-16 adapters on all seven projections; eight adapters here)
and exports an int4 base with int8 adapters. Measured in one process, scenarios interleaved round after round:

- the bare forward pass over [n, 1] tokens (one adapter bound, a 32-position cache), what batching can reach;
- the engine at n concurrent requests (32-token prompts, 64 new tokens, greedy, EOS ignored): (a) all the same
  adapter, (b) each a different adapter, (c) a mix of adapters, base-only rows and a composition; aggregate decode
  tokens/s (new tokens after the first over the wall time from the last first token to the last token) and
  per-row decode ms/token;
- time to first token of a request that joins a batch of eight running rows;
- a batch of one through the engine against a call on its own (``batching=False``) in the same graph without
  the per-row mask, as edgelora ran a request before the engine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import decode  # noqa: E402  (the shared model of the decode benchmark)

ADAPTERS = {f"t{i}": (10 + i, decode.RANK) for i in range(8)}
CONCURRENCY = (1, 2, 4, 8, 16)
NEW_TOKENS = decode.NEW_TOKENS
ONE_REPS = 5  # batch-of-one generations per system per round, interleaved


def package(work: Path) -> Path:
    """The int4 base with eight int8 adapters, built once and reused."""
    out = work / "edgelora-batch"
    if out.exists():
        return out
    decode.build_model(work)
    from edgelora.demo.tiny_models import random_peft_adapter

    base = None
    for name, (seed, rank) in ADAPTERS.items():
        if not (work / "peft" / name / "adapter_config.json").exists():
            if base is None:
                import transformers

                base = transformers.LlamaForCausalLM.from_pretrained(work / "base").eval()
            random_peft_adapter(base, work / "peft" / name, seed=seed, r=rank, alpha=2 * rank, targets=decode.ALL)
    edgelora = str(Path(sys.executable).with_name("edgelora"))
    adapters = [arg for name in ADAPTERS for arg in ("--adapter", f"{name}={work / 'peft' / name}")]
    print("exporting the int4 package with eight int8 adapters ...", file=sys.stderr, flush=True)
    subprocess.run([edgelora, "export", str(work / "base"), *adapters, "--out", str(out), "--quantize", "int4",
                    "--adapter-dtype", "int8", "--accuracy-level", "4", "--quiet"], check=True)
    return out


def without_row_mask(pkg: Path) -> Path:
    """A twin of the package whose graph has no per-row adapter mask, as edgelora exported before the engine:
    what a batch of one is compared with. Files are hard links; only the graph and the manifest are rewritten."""
    import json
    import shutil

    import onnx

    twin = pkg.with_name(pkg.name + "-no-mask")
    if twin.exists():
        return twin
    shutil.copytree(pkg, twin, copy_function=os.link)
    manifest = json.loads((pkg / "edgelora.json").read_text())
    mask = manifest["graph"].pop("row_mask")
    (twin / "edgelora.json").unlink()
    (twin / "edgelora.json").write_text(json.dumps(manifest, indent=2))
    proto = onnx.load(str(pkg / "model.onnx"), load_external_data=False)
    graph = proto.graph
    renames = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Mul" and n.name.endswith(".row_mask")}
    kept = [n for n in graph.node if n.output[0] not in renames and mask not in n.input]
    for node in kept:
        node.input[:] = [renames.get(name, name) for name in node.input]
    del graph.node[:]
    graph.node.extend(kept)
    inputs = [v for v in graph.input if v.name != mask]
    del graph.input[:]
    graph.input.extend(inputs)
    inits = [t for t in graph.initializer if not t.name.startswith(mask)]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    (twin / "model.onnx").unlink()
    onnx.save_model(proto, str(twin / "model.onnx"))
    return twin


def bare_pass(model, rows: int, steps: int = 20) -> float:
    """Tokens/s of the bare forward pass over [rows, 1] tokens after a 32-position cache, one adapter bound."""
    from edgelora.runtime.kvcache import KVRows

    kv_rows = KVRows(model.info, rows, model.info.max_positions)
    kv_rows.fit(decode.PROMPT_TOKENS + 1, 0)  # as the engine sizes it for these rows
    kv = kv_rows.view(0, rows)
    ids = np.full((rows, 1), 5, np.int64)
    positions = np.full((rows, 1), decode.PROMPT_TOKENS, np.int64)
    with model.call("t0") as call:
        model.runner.forward(call, ids, positions, kv)
        t0 = time.perf_counter()
        for _ in range(steps):
            model.runner.forward(call, ids, positions, kv)
    return rows * steps / (time.perf_counter() - t0)


def scenario_specs(kind: str, n: int) -> list:
    names = list(ADAPTERS)
    if kind == "same":
        return ["t0"] * n
    if kind == "different":
        return [names[i % len(names)] for i in range(n)]
    mix = [None, "t1", {"t2": 0.7, "t3": 0.3}, "t4", None, {"t5": 0.5}, "t6", "t7"]
    return [mix[i % len(mix)] for i in range(n)]


def engine_run(model, specs: list) -> dict:
    """n requests submitted at once: aggregate decode tokens/s and per-row decode ms/token."""
    from edgelora.runtime import SamplingParams

    sampling = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    prompt = decode.prompt_ids()
    streams = [model.stream(prompt, adapter=s, sampling=sampling) for s in specs]
    for stream in streams:  # read in turn: the engine runs them all meanwhile, so the reads only wait
        for _ in stream:
            pass
    per_row = statistics.median(s.result.decode_ms_per_token for s in streams)
    wall_ms = max(s.result.decode_ms for s in streams)  # the rows decode over the same steps
    tokens = sum(len(s.result.token_ids) - 1 for s in streams)
    return {"tokens_s": tokens / (wall_ms / 1e3), "row_ms": per_row}


def ttft_joining(model) -> float:
    """ms from submit to the first token of a request joining eight running rows."""
    from edgelora.runtime import SamplingParams

    long = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    running = [model.stream(decode.prompt_ids(), adapter=f"t{i}", sampling=long) for i in range(8)]
    deadline = time.monotonic() + 60
    while model.engine.stats()["batch_size"] < 8 and time.monotonic() < deadline:
        time.sleep(0.001)
    t0 = time.perf_counter()
    for _ in model.stream(decode.prompt_ids(), adapter="t3", sampling=SamplingParams(max_new_tokens=1)):
        pass  # one token: the stream ends with it
    ms = (time.perf_counter() - t0) * 1e3
    for stream in running:
        stream.close()
    return ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=HERE / "work-decode")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--results", type=Path, default=HERE / "RESULTS-batch.md")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    pkg = package(args.work)

    from edgelora.runtime import BatchSettings, EdgeModel

    model = EdgeModel.open(pkg, batching=BatchSettings(max_batch=16))
    alone = EdgeModel.open(without_row_mask(pkg), batching=False)
    for name in ADAPTERS:
        model.load_adapter(name)
        alone.load_adapter(name)
    bare: dict[int, list] = {n: [] for n in CONCURRENCY}
    runs: dict[tuple, list] = {}
    one: dict[str, list] = {"engine": [], "alone": []}
    ttft = []
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
        for n in CONCURRENCY:
            bare[n].append(bare_pass(model, n))
            for kind in ("same", "different", "mixed"):
                runs.setdefault((kind, n), []).append(engine_run(model, scenario_specs(kind, n)))
        pair = [("engine", model), ("alone", alone)]
        for i in range(ONE_REPS):  # a difference of a few percent needs more samples than the rest
            for label, m in pair if i % 2 == 0 else pair[::-1]:  # neither always runs first
                one[label].append(m.generate(decode.prompt_ids(), adapter="t0", max_new_tokens=NEW_TOKENS,
                                             ignore_eos=True).decode_ms_per_token)
        ttft.append(ttft_joining(model))
    write(args.results, bare, runs, one, ttft, args.rounds)


def write(path: Path, bare, runs, one, ttft, rounds: int) -> None:
    med = statistics.median
    lines = [
        "# Batched decoding across tenants (bench/batch.py)",
        "",
        f"SmolLM-135M-shaped Llama, int4 base (accuracy level 4), eight int8 rank-16 adapters on all seven "
        f"projections, {decode.PROMPT_TOKENS}-token prompts, {NEW_TOKENS} new tokens, greedy, "
        f"{decode.THREADS} cores; medians of {rounds} interleaved rounds; load average at the end "
        f"{os.getloadavg()[1]:.1f} (5 min); {decode.cpu()}. Reproduce: `.venv/bin/python bench/batch.py`.",
        "",
        "## Bare forward pass over [n, 1] tokens (one adapter bound)",
        "",
        "| rows | tokens/s | x one row |",
        "|---|---|---|",
    ]
    base = med(bare[1])
    lines += [f"| {n} | {med(v):.0f} | {med(v) / base:.2f}x |" for n, v in bare.items()]
    lines += ["", "## The engine: n concurrent requests", "",
              "| n | (a) same adapter tok/s | (b) different adapters tok/s | (c) mixed tok/s | (b) / (a) | "
              "(b) / bare pass | (b) ms/token per row |", "|---|---|---|---|---|---|---|"]
    alone_tps = med(r["tokens_s"] for r in runs[("different", 1)])
    for n in CONCURRENCY:
        a, b, c = (med(r["tokens_s"] for r in runs[(k, n)]) for k in ("same", "different", "mixed"))
        row_ms = med(r["row_ms"] for r in runs[("different", n)])
        lines.append(f"| {n} | {a:.0f} | {b:.0f} ({b / alone_tps:.2f}x one) | {c:.0f} | {b / a:.2f} | "
                     f"{b / med(bare[n]):.2f} | {row_ms:.2f} |")
    lines += ["", f"Time to first token of a request joining eight running rows: {med(ttft):.0f} ms (median).",
              "",
              f"A batch of one ({len(one['engine'])} interleaved generations each, taking turns at going first): "
              f"{med(one['engine']):.2f} ms/token "
              f"through the engine, {med(one['alone']):.2f} on its own call in the same graph without the row mask, "
              f"as exported before the engine ({med(one['engine']) / med(one['alone']):.2f}x).", ""]
    decode.write_results(path, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

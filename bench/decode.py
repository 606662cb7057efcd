"""Decode speed against llama.cpp, onnxruntime-genai and PyTorch + PEFT, on a SmolLM-135M-shaped Llama with a rank-16
adapter; then the same against llama.cpp and onnxruntime-genai at the 135M, 0.5B and 1B shapes (``sizes.py``).

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python bench/decode.py [--rounds 3] [--sizes-rounds 2] [--parts decode,sizes] [--skip-export 1b:edgelora-int4]

Builds the model (random weights, tied embeddings) and a rank-16 PEFT adapter on all seven projections,
exports it with edgelora (fp32 graph + fp32 adapter; int4 base + int8 adapter, to which a rank-1 adapter is
added), builds the peers with onnxruntime-genai's model builder (fp32 and int4, adapter baked in with
``adapter_path``) and llama.cpp (``llamacpp.py``: built once from the PyPI sdist of llama-cpp-python, Q4_0 and
Q8_0 bases, the LoRA at f32 and q8_0), then measures every system in its own process, the systems interleaved
round after round so that the machine's load hits them alike: prefill ms (32-token prompt), decode ms/token (64
new tokens, greedy, EOS ignored), peak RSS. Also hot swap (edgelora between two resident adapters, PEFT
``set_adapter``), export seconds and peak RSS, and the memory-bandwidth floor of the int4 package. Ratios are of
medians over the rounds. Last, the int4 systems again beside a busy process (``--busy-rounds``), since spinning
threads trade speed on an idle CPU against speed on a shared one. The size sweep writes ``RESULTS-sizes.md`` and
``sizes.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from edgelora.checks.measure import peak_rss_bytes

HERE = Path(__file__).resolve().parent
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHAPE = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
             num_attention_heads=9, num_key_value_heads=3)
PROMPT_TOKENS, NEW_TOKENS, RANK = 32, 64, 16
THREADS = 2
# name: (seed, rank). a and b are the adapters compared; r1, added to the int4 package, reads a small part of
# their bytes, so what it costs over no adapter is mostly what the adapter's nodes cost apart from those bytes
ADAPTERS = {"a": (1, RANK), "b": (2, RANK), "r1": (3, 1)}


def build_model(work: Path, shape: dict = SHAPE, adapters: dict = ADAPTERS) -> None:
    """The base folder (config + weights + a tokenizer, which the genai builder needs) and the adapters."""
    import torch
    import transformers

    from edgelora.demo.tiny_models import random_peft_adapter, save_char_tokenizer

    missing = [name for name in adapters if not (work / "peft" / name / "adapter_config.json").exists()]
    if not missing:
        return
    if (work / "base/config.json").exists():
        model = transformers.LlamaForCausalLM.from_pretrained(work / "base").eval()
    else:
        config = transformers.LlamaConfig(**shape, tie_word_embeddings=True, max_position_embeddings=2048,
                                          rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                          architectures=["LlamaForCausalLM"])
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config).eval()
        model.save_pretrained(work / "base")
        save_char_tokenizer(work / "base")
    for name in missing:
        seed, rank = adapters[name]
        random_peft_adapter(model, work / "peft" / name, seed=seed, r=rank, alpha=2 * rank, targets=ALL)


def build(cmd: list[str], env: dict | None = None) -> dict:
    """Run a build step; returns its wall seconds and peak RSS (of the step and the processes it waited for). Its
    output is shown only if it fails (the genai builder logs every tensor)."""
    t0 = time.perf_counter()
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
        output = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd[:4])} ... failed:\n{output[-3000:]}")
    return {"seconds": time.perf_counter() - t0, "peak_rss_mb": usage.ru_maxrss / 1024}


EXPORTS = ("edgelora-fp32", "edgelora-int4", "genai-fp32", "genai-int4")


def export_jobs(work: Path, adapters: tuple[str, ...]) -> dict[str, list[str]]:
    """The command that builds each package: edgelora with ``adapters``, the genai builder with adapter ``a``
    baked in."""
    edgelora = str(Path(sys.executable).with_name("edgelora"))
    packed = [arg for name in adapters for arg in ("--adapter", f"{name}={work / 'peft' / name}")]
    builder = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(work / "base"), "-e", "cpu",
               "-c", str(work / "hf-cache"), "--extra_options", f"adapter_path={work / 'peft/a'}", "hf_token=false"]
    return {
        "edgelora-fp32": [edgelora, "export", str(work / "base"), *packed, "--out", str(work / "edgelora-fp32")],
        "edgelora-int4": [edgelora, "export", str(work / "base"), *packed, "--out", str(work / "edgelora-int4"),
                          "--quantize", "int4", "--adapter-dtype", "int8", "--accuracy-level", "4"],
        "genai-fp32": [*builder, "-o", str(work / "genai-fp32"), "-p", "fp32"],
        "genai-int4": [*builder, "-o", str(work / "genai-int4"), "-p", "int4"],
    }


def exports(work: Path, names=EXPORTS, adapters: tuple[str, ...] = ("a", "b")) -> dict[str, dict]:
    """Each package once, one at a time, reused on later runs; per package its export seconds and peak RSS, kept
    beside them (``exports.json``) with ``built_by_earlier_run`` set when this run did not build it."""
    jobs = export_jobs(work, adapters)
    record = work / "exports.json"
    done = json.loads(record.read_text()) if record.exists() else {}
    for entry in done.values():
        entry["built_by_earlier_run"] = True
    for name in names:
        if not (work / name).exists():
            print(f"building {name} in {work} ...", file=sys.stderr, flush=True)
            done[name] = build(jobs[name])
            record.write_text(json.dumps(done))
    return {name: done[name] for name in names if name in done}


def add_rank1(work: Path) -> None:
    """The rank-1 adapter joins the int4 package after its export (not part of the export's cost)."""
    if not (work / "edgelora-int4/adapters/r1.onnx_adapter").exists():
        build([str(Path(sys.executable).with_name("edgelora")), "add-adapter", str(work / "edgelora-int4"),
               f"r1={work / 'peft/r1'}"])


def export_label(entry: dict) -> str:
    return (f"{entry['seconds']:.1f} s, peak RSS {entry['peak_rss_mb']:.0f} MB"
            + (" (built by an earlier run)" if entry.get("built_by_earlier_run") else ""))


def prompt_ids(length: int = PROMPT_TOKENS) -> list[int]:
    return [int(t) for t in np.random.default_rng(0).integers(4, 90, length)]


def read_through(*paths: Path) -> None:
    """Read the files a system loads (folders whole) once before it starts. Graphs and GGUF files are memory-mapped,
    and a page that is not in the page cache is a disk read the first time a token touches it, which would time
    the disk (and whatever evicted the page) instead of the system: every system starts from a warm cache, as on a
    device that has run the model before."""
    for path in paths:
        for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if file.is_file():
                with open(file, "rb") as f:
                    while f.read(1 << 24):
                        pass


# workers: one system per process, so RSS is the system's own


def worker_edgelora(package: Path, adapters: list[str | None], reps: int, spin_us: int | None = None,
                    long_prompt: int = 0) -> list[dict]:
    """Per adapter (None: none), prefill and decode of the 32-token prompt ``reps`` times; with ``long_prompt``,
    that many tokens' prefill too (``prefill_long_ms``). Several adapters take turns generation by generation in
    the one model, so that a load swing of the machine hits them alike."""
    from edgelora.runtime import EdgeModel

    spin = {} if spin_us is None else {"spin_us": spin_us}
    read_through(package)
    model = EdgeModel.open(package, intra_op_threads=THREADS, **spin)
    ids = prompt_ids()
    for adapter in adapters:
        model.generate(ids, adapter=adapter, max_new_tokens=4, ignore_eos=True)

    def turns(prompt: list[int], new_tokens: int) -> list[list]:
        runs = [[] for _ in adapters]
        for _ in range(reps):
            for i, adapter in enumerate(adapters):
                runs[i].append(model.generate(prompt, adapter=adapter, max_new_tokens=new_tokens, ignore_eos=True))
        return runs

    results = [{"prefill_ms": [r.prefill_ms for r in runs], "decode_ms": [r.decode_ms_per_token for r in runs],
                "tokens": runs[0].token_ids} for runs in turns(ids, NEW_TOKENS)]
    if long_prompt:
        for result, runs in zip(results, turns(prompt_ids(long_prompt), 1)):
            result["prefill_long_ms"] = [r.prefill_ms for r in runs]
    return results


def worker_genai(folder: Path, reps: int, long_prompt: int = 0) -> dict:
    import onnxruntime_genai as og

    read_through(folder)
    config = og.Config(str(folder))
    config.clear_providers()
    model = og.Model(config)

    def run(ids: list[int], n: int):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + n, min_length=len(ids) + n, do_sample=False)
        generator = og.Generator(model, params)
        t0 = time.perf_counter()
        generator.append_tokens(ids)  # the prompt's forward pass; the first generate_next_token only picks
        prefill = time.perf_counter() - t0
        tokens = []
        t0 = time.perf_counter()
        while not generator.is_done():
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
        steps = max(len(tokens) - 1, 1)
        return prefill * 1e3, (time.perf_counter() - t0) * 1e3 / steps, tokens

    run(prompt_ids(), 4)
    runs = [run(prompt_ids(), NEW_TOKENS) for _ in range(reps)]
    result = {"prefill_ms": [r[0] for r in runs], "decode_ms": [r[1] for r in runs], "tokens": runs[0][2]}
    if long_prompt:
        result["prefill_long_ms"] = [run(prompt_ids(long_prompt), 1)[0] for _ in range(reps)]
    return result


def worker_torch(work: Path, reps: int) -> dict:
    import warnings

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(THREADS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = AutoModelForCausalLM.from_pretrained(work / "base", dtype=torch.float32).eval()
        model = PeftModel.from_pretrained(base, str(work / "peft/a"), adapter_name="a").eval()
    ids = torch.tensor([prompt_ids()])

    @torch.no_grad()
    def run(n: int):
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True)
        prefill = time.perf_counter() - t0
        tokens = [int(out.logits[0, -1].argmax())]
        t0 = time.perf_counter()
        for _ in range(n - 1):
            out = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
            tokens.append(int(out.logits[0, -1].argmax()))
        return prefill * 1e3, (time.perf_counter() - t0) * 1e3 / max(n - 1, 1), tokens

    run(4)
    runs = [run(NEW_TOKENS) for _ in range(reps)]
    return {"prefill_ms": [r[0] for r in runs], "decode_ms": [r[1] for r in runs], "tokens": runs[0][2]}


def worker_swap(work: Path) -> dict:
    """Picking another resident adapter for a call (edgelora) against PEFT's ``set_adapter``."""
    import torch
    from tenants import peft_set_adapter_seconds

    from edgelora.runtime import EdgeModel

    model = EdgeModel.open(work / "edgelora-int4")
    for name in ("a", "b"):
        model.load_adapter(name)
    edge = []
    for i in range(2000):
        t0 = time.perf_counter()
        call = model.call("ab"[i % 2])  # what a call pays to pick its adapter: registry hit + pooled binding
        edge.append(time.perf_counter() - t0)
        call.close()
    torch.set_num_threads(THREADS)
    peft = peft_set_adapter_seconds(work, 200)
    return {"edgelora_swap_us": float(np.median(edge) * 1e6), "peft_swap_us": float(np.median(peft) * 1e6)}


SYSTEMS = {
    # name: (worker kind, package folder, adapter, edgelora's spin_us: None for its default), a row of the results
    # table; onnxruntime-genai runs under its own defaults
    "genai-int4": ("genai", "genai-int4", None, None),
    "edgelora-int4": ("edgelora", "edgelora-int4", "a", None),
    "edgelora-int4-nospin": ("edgelora", "edgelora-int4", "a", 0),
    "edgelora-int4-noadapter": ("edgelora", "edgelora-int4", None, None),
    "edgelora-int4-rank1": ("edgelora", "edgelora-int4", "r1", None),
    "genai-fp32": ("genai", "genai-fp32", None, None),
    "edgelora-fp32": ("edgelora", "edgelora-fp32", "a", None),
    "edgelora-fp32-nospin": ("edgelora", "edgelora-fp32", "a", 0),
    "edgelora-fp32-noadapter": ("edgelora", "edgelora-fp32", None, None),
    "torch-peft": ("torch", None, "a", None),
}
BESIDE_BUSY = ("genai-int4", "edgelora-int4", "edgelora-int4-nospin")  # the spinning trade-off, measured again
LABELS = {
    "genai-int4": "onnxruntime-genai int4, adapter baked in",
    "edgelora-int4": "edgelora int4 base + int8 adapter",
    "edgelora-int4-nospin": "edgelora int4 base + int8 adapter, threads never spinning (`spin_us=0`)",
    "edgelora-int4-noadapter": "edgelora int4 base, same graph, no adapter",
    "edgelora-int4-rank1": "edgelora int4 base, same graph, int8 rank-1 adapter",
    "genai-fp32": "onnxruntime-genai fp32, adapter baked in",
    "edgelora-fp32": "edgelora fp32 + fp32 adapter",
    "edgelora-fp32-nospin": "edgelora fp32 + fp32 adapter, threads never spinning (`spin_us=0`)",
    "edgelora-fp32-noadapter": "edgelora fp32, same graph, no adapter",
    "torch-peft": "PyTorch + PEFT eager, fp32",
}


def run_worker(args) -> None:
    """Prints the results of ``--worker``: one system, or several joined by ``+`` that share one process (one
    edgelora model, or one llama.cpp server), keyed by system."""
    import llamacpp

    work = Path(args.work)
    names = args.worker.split("+")
    if args.worker == "swap":
        results = [worker_swap(work)]
    elif all(name in llamacpp.SYSTEMS for name in names):
        results = llamacpp.worker(work, [llamacpp.SYSTEMS[name] for name in names], args.reps, args.long_prompt)
    else:
        unknown = [name for name in names if name not in SYSTEMS]
        if unknown:
            sys.exit(f"unknown system(s): {', '.join(unknown)}")
        specs = [SYSTEMS[name] for name in names]
        kind, folder, _, spin_us = specs[0]
        if len(names) > 1 and (kind != "edgelora" or any((s[0], s[1], s[3]) != (kind, folder, spin_us) for s in specs)):
            sys.exit(f"{args.worker}: only edgelora rows of one package (or llama.cpp rows of one server) share a "
                     "process")
        if kind == "edgelora":
            results = worker_edgelora(work / folder, [spec[2] for spec in specs], args.reps, spin_us, args.long_prompt)
        elif kind == "genai":
            results = [worker_genai(work / folder, args.reps, args.long_prompt)]
        else:
            results = [worker_torch(work, args.reps)]
    for result in results:
        result.setdefault("rss_mb", peak_rss_bytes() / 2**20)
    print(json.dumps(dict(zip(names, results))))


def measure_together(work: Path, systems: list[str], reps: int, long_prompt: int = 0) -> dict[str, dict]:
    """Each system's results from one worker process in which their generations take turns (``run_worker``)."""
    worker = "+".join(systems)
    out = subprocess.run([sys.executable, __file__, "--work", str(work), "--worker", worker, "--reps", str(reps),
                          "--long-prompt", str(long_prompt)], capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"{worker} in {work} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(work: Path, system: str, reps: int, long_prompt: int = 0) -> dict:
    return measure_together(work, [system], reps, long_prompt)[system]


def copy_bandwidth() -> float:
    """Bytes per second of a large numpy copy, reads and writes both counted (best of 5)."""
    src = np.ones(64 * 1024 * 1024, np.float32)
    dst = np.empty_like(src)
    best = min(_timed_copy(dst, src) for _ in range(5))
    return 2 * src.nbytes / best


def _timed_copy(dst, src) -> float:
    t0 = time.perf_counter()
    np.copyto(dst, src)
    return time.perf_counter() - t0


def bytes_per_token(package: Path, adapter_file: Path) -> int:
    """Weights one decode step reads: every initializer, but only one row of the embedding table, plus the adapter."""
    import onnx

    proto = onnx.load(str(package / "model.onnx"), load_external_data=False)
    gathered = {n.input[0] for n in proto.graph.node if n.op_type == "Gather"}
    gathered |= {name for n in proto.graph.node if n.op_type == "GatherBlockQuantized"
                 for i, name in enumerate(n.input) if i != 1}  # its table, scales and zero points; 1 is the ids
    packed = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4}  # two values per byte
    total = 0
    for t in proto.graph.initializer:
        size = int(np.prod(t.dims)) * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        size = size // 2 if t.data_type in packed else size
        total += size // t.dims[0] if t.name in gathered and t.dims else size
    return total + adapter_file.stat().st_size


def node_count(package: Path) -> int:
    import onnx

    return len(onnx.load(str(package / "model.onnx"), load_external_data=False).graph.node)


def med(values) -> float:
    return float(np.median(values))


def row_label(system: str, row: dict | None = None) -> str:
    """The results table's name of a system; a llama.cpp row says which repack setting it ran with."""
    import llamacpp

    if system in llamacpp.SYSTEMS:
        repack = row is not None and row.get("repack")
        return llamacpp.LABELS[system] + ("" if system.endswith("norepack") else
                                          " (default repacking)" if repack else " (`--no-repack`)")
    return LABELS[system]


def report(work: Path, rows: dict, export_s: dict, swap: dict, floor: dict, command: str, load: str) -> str:
    d = {k: med(v["decode_ms"]) for k, v in rows.items()}
    p = {k: med(v["prefill_ms"]) for k, v in rows.items()}
    rss = {k: med(v["rss_mb"]) for k, v in rows.items()}
    n = len(next(iter(rows.values()))["decode_ms"])
    lines = [
        "# Decode against llama.cpp, onnxruntime-genai and PyTorch + PEFT",
        "",
        f"Command: `{command}` (one run; {n} rounds, systems interleaved within each round, each system in its own "
        f"process; medians). Model: SmolLM-135M-shaped Llama (vocab 49152, hidden 576, intermediate 1536, 30 layers, "
        f"9 heads, 3 KV heads, tied embeddings), random weights; rank-{RANK} adapter on all seven projections "
        f"({len(ALL) * SHAPE['num_hidden_layers']} slots); {PROMPT_TOKENS}-token prompt, {NEW_TOKENS} new tokens, "
        f"greedy, EOS ignored; edgelora and PyTorch with {THREADS} intra-op threads, onnxruntime-genai with its own "
        "defaults (under which it decoded on one thread on the 2-core development machine); llama.cpp's "
        f"`llama-server` on {THREADS} threads with the LoRA applied per request, prompt cache off. Machine load: "
        f"{load}.",
        "",
        "| system | prefill ms | decode ms/token | tokens/s | peak RSS MB |",
        "|---|---|---|---|---|",
    ]
    for k in rows:
        lines.append(f"| {row_label(k, rows[k])} | {p[k]:.1f} | {d[k]:.2f} | {1e3 / d[k]:.1f} | {rss[k]:.0f} |")

    def ratio(a, b):
        return d[b] / d[a]

    llama = min((k for k in ("llamacpp-q4_0-lora-f32", "llamacpp-q4_0-lora-f32-norepack") if k in d), key=d.get)
    targets = [
        (f"int4 base + int8 adapter vs {row_label(llama, rows[llama])} (tokens/s)", ratio("edgelora-int4", llama),
         ">= 1.0"),
        ("the same, prefill", p[llama] / p["edgelora-int4"], ">= 1.0"),
        ("int4 base + int8 adapter vs onnxruntime-genai int4 (tokens/s)", ratio("edgelora-int4", "genai-int4"), ">= 1.0"),
        ("the same, edgelora never spinning", ratio("edgelora-int4-nospin", "genai-int4"), ">= 1.0"),
        ("fp32 + adapter vs onnxruntime-genai fp32 (tokens/s)", ratio("edgelora-fp32", "genai-fp32"), ">= 1.2"),
        ("the same, edgelora never spinning", ratio("edgelora-fp32-nospin", "genai-fp32"), ">= 1.2"),
        ("fp32 + adapter vs PyTorch + PEFT (tokens/s)", ratio("edgelora-fp32", "torch-peft"), ">= 2.0"),
        ("adapter overhead, int4 graph (decode ms, active / none)", d["edgelora-int4"] / d["edgelora-int4-noadapter"],
         "<= 1.05"),
        ("adapter overhead, fp32 graph (decode ms, active / none)", d["edgelora-fp32"] / d["edgelora-fp32-noadapter"],
         "<= 1.05"),
        ("int4 decode / bandwidth floor", d["edgelora-int4"] / floor["floor_ms"], "<= 2.5"),
    ]
    lines += ["", "| ratio | value | target | met |", "|---|---|---|---|"]
    for label, value, target in targets:
        op, bound = target.split()
        met = value >= float(bound) if op == ">=" else value <= float(bound)
        lines.append(f"| {label} | {value:.2f} | {target} | {'yes' if met else 'no'} |")
    none = d["edgelora-int4-noadapter"]
    blob_mb = {name: (work / "edgelora-int4/adapters" / f"{name}.onnx_adapter").stat().st_size / 1e6
               for name in ("a", "r1")}
    lines += [
        "",
        f"Adapter time on the int4 graph: the rank-{RANK} adapter ({blob_mb['a']:.2f} MB) adds "
        f"{d['edgelora-int4'] - none:.2f} ms/token; a rank-1 adapter ({blob_mb['r1']:.2f} MB) already adds "
        f"{d['edgelora-int4-rank1'] - none:.2f} ms ({d['edgelora-int4-rank1'] / none:.2f}x no adapter), against the "
        f"{0.05 * none:.2f} ms that 5% allows. That part comes with the adapter's nodes, not its bytes: at rank 0 the "
        "slot groups' products are empty kernels, with any adapter they are real ones.",
    ]
    lines += [
        "",
        f"Bandwidth floor: the int4 package reads {floor['bytes'] / 1e6:.1f} MB per decode step (every initializer, "
        f"one row of the embedding table, the int8 adapter blob); measured copy bandwidth {floor['bw'] / 1e9:.1f} GB/s "
        f"(numpy copy of 256 MB, reads + writes); floor {floor['floor_ms']:.2f} ms/token.",
        "",
        f"Hot swap: edgelora picks another resident adapter for a call in {swap['edgelora_swap_us']:.1f} µs "
        f"(median of 2000); PEFT `set_adapter` {swap['peft_swap_us']:.0f} µs; onnxruntime-genai with a baked-in adapter "
        "has to load another model.",
        "",
        "Export seconds (wall time of `edgelora export` with both adapters and its quality probe, or of the genai "
        "builder given the adapter to bake in):",
        "",
    ]
    lines += [f"- {k}: {export_label(v)}" for k, v in export_s.items()]
    lines += ["", f"Nodes per graph: edgelora fp32 {floor['nodes_fp32']}, edgelora int4 {floor['nodes_int4']}, "
              f"onnxruntime-genai int4 {floor['nodes_genai']}."]
    return "\n".join(lines) + "\n"


def interleaved(work: Path, systems, rounds: int, reps: int) -> tuple[dict, dict]:
    """Per system, the medians of each round, and its greedy tokens; the systems in turn within each round."""
    rows = {k: {"prefill_ms": [], "decode_ms": [], "rss_mb": []} for k in systems}
    tokens = {}
    for r in range(rounds):
        for system in systems:
            print(f"round {r + 1}/{rounds}: {system}", file=sys.stderr, flush=True)
            result = measure(work, system, reps)
            rows[system]["prefill_ms"].append(med(result["prefill_ms"]))
            rows[system]["decode_ms"].append(med(result["decode_ms"]))
            rows[system]["rss_mb"].append(result["rss_mb"])
            rows[system]["repack"] = result.get("repack")
            tokens[system] = result["tokens"]
    return rows, tokens


def beside_busy_process(work: Path, rounds: int, reps: int) -> dict:
    """The int4 rows again with a pure-Python loop holding one core: what spinning threads cost a shared CPU."""
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        return interleaved(work, BESIDE_BUSY, rounds, reps)[0]
    finally:
        hog.kill()
        hog.wait()


def busy_report(rows: dict, rounds: int) -> str:
    d = {k: med(v["decode_ms"]) for k, v in rows.items()}
    lines = ["", "Beside one busy process (a pure-Python loop holding one of the cores; "
             f"{rounds} rounds, interleaved):",
             "", "| system | decode ms/token | edgelora's speed against it |", "|---|---|---|"]
    lines += [f"| {row_label(k)} | {d[k]:.2f} | {d[k] / d['edgelora-int4']:.2f}x |" if k != "edgelora-int4"
              else f"| {row_label(k)} | {d[k]:.2f} | |" for k in BESIDE_BUSY]
    return "\n".join(lines) + "\n"


HAND_NOTES = "<!-- notes below are written by hand and kept when the harness rewrites the tables above -->"


def write_results(path: Path, text: str) -> None:
    """Write a harness's tables over ``path``, keeping what was written by hand below ``HAND_NOTES``: measured
    history and analysis belong beside the numbers, not in the harness's code."""
    kept = path.read_text().partition(HAND_NOTES)[2] if path.exists() else ""
    path.write_text(text + "\n" + HAND_NOTES + kept)


def machine_load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.1f} / {five:.1f} / {fifteen:.1f} (1 / 5 / 15 min) on {os.cpu_count()} cores"


def cpu() -> str:
    """The CPU and its widest int8 dot product: every system here runs other kernels on AVX2 alone than with
    VNNI, so a run's ratios hold for its class of CPU."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    first = {}  # the first processor's fields; every core of these machines is the same
    for key, _, value in (line.partition(":") for line in info.splitlines()):
        first.setdefault(key.strip(), value.strip())
    model, flags = first.get("model name", "?"), set(first.get("flags", "").split())
    widest = next((name for flag, name in (("amx_int8", "AMX"), ("avx512_vnni", "AVX-512 VNNI"),
                                           ("avx_vnni", "AVX-VNNI"), ("avx2", "AVX2, no VNNI")) if flag in flags),
                  "no AVX2")
    return f"{model} ({widest})"


def llamacpp_rows(work: Path) -> list[str]:
    """The llama.cpp rows; the forced ``--no-repack`` one only where the default repacking runs."""
    import llamacpp

    repack = json.loads((work / "llamacpp/setup.json").read_text())["repack"]["q4_0"]
    return [k for k in llamacpp.SYSTEMS if repack or not k.endswith("norepack")]


def main() -> None:
    import llamacpp
    import sizes

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=str(HERE / "work-decode"))
    parser.add_argument("--results", default=str(HERE / "RESULTS.md"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reps", type=int, default=2, help="generations per system per round")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--long-prompt", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--fresh", action="store_true", help="rebuild every package (to time the exports)")
    parser.add_argument("--busy-rounds", type=int, default=2,
                        help="rounds of the int4 systems again beside a busy process (0: skip)")
    parser.add_argument("--llamacpp-cache", default=str(HERE / "work-llamacpp"),
                        help="where llama.cpp's sources and build are kept between runs")
    parser.add_argument("--parts", default="decode,sizes", help="decode: the 135M comparison; sizes: the sweep")
    parser.add_argument("--sizes", default=",".join(sizes.SHAPES), help="the sweep's shapes, comma-separated")
    parser.add_argument("--sizes-work", default=str(HERE / "work-sizes"))
    parser.add_argument("--sizes-rounds", type=int, default=2)
    parser.add_argument("--sizes-results", default=str(HERE / "RESULTS-sizes.md"))
    parser.add_argument("--skip-export", action="append", default=[], metavar="SIZE:PACKAGE",
                        help="a sweep package not to build, e.g. 1b:edgelora-int4 (its rows are left out)")
    args = parser.parse_args()
    if args.worker:
        run_worker(args)
        return
    parts = set(args.parts.split(","))
    work, cache, sweep_root = Path(args.work), Path(args.llamacpp_cache), Path(args.sizes_work)
    shapes = [s for s in args.sizes.split(",") if s]
    command = ("python bench/decode.py " + " ".join(a for a in sys.argv[1:])).strip()
    if args.fresh:
        for folder in [work, *(sweep_root / s for s in shapes)]:
            for name in (*EXPORTS, "llamacpp"):
                shutil.rmtree(folder / name, ignore_errors=True)
            (folder / "exports.json").unlink(missing_ok=True)
    # every build first, so that the measurements follow each other
    if "decode" in parts:
        work.mkdir(parents=True, exist_ok=True)
        build_model(work)
        export_s = exports(work)
        add_rank1(work)
        llamacpp.prepare(work, cache)
    if "sizes" in parts:
        builds = sizes.prepare(sweep_root, shapes, cache, tuple(args.skip_export))
    if "sizes" in parts:
        sizes.write(sweep_root, Path(args.sizes_results), shapes, args.sizes_rounds, args.reps, builds, command)
    if "decode" in parts:
        load = machine_load()
        rows, tokens = interleaved(work, [*SYSTEMS, *llamacpp_rows(work)], args.rounds, args.reps)
        busy = beside_busy_process(work, args.busy_rounds, args.reps) if args.busy_rounds else None
        swap = measure(work, "swap", 1)
        bw = copy_bandwidth()
        floor_bytes = bytes_per_token(work / "edgelora-int4", work / "edgelora-int4/adapters/a.onnx_adapter")
        floor = {"bytes": floor_bytes, "bw": bw, "floor_ms": floor_bytes / bw * 1e3,
                 "nodes_fp32": node_count(work / "edgelora-fp32"), "nodes_int4": node_count(work / "edgelora-int4"),
                 "nodes_genai": node_count(work / "genai-int4")}
        text = report(work, rows, export_s, swap, floor, command,
                      f"{load} at the start, {machine_load()} at the end; {cpu()}")
        if busy is not None:
            text += busy_report(busy, args.busy_rounds)
        agree = np.mean([a == b for a, b in zip(tokens["edgelora-fp32"], tokens["torch-peft"])])
        text += (f"\nGreedy tokens, edgelora fp32 vs PyTorch + PEFT: {agree:.0%} of the {NEW_TOKENS} agree "
                 "(random weights give near-flat logits, so late flips from float rounding are expected).\n")
        text += (f"\nAt 0.5B and 1B, against llama.cpp and onnxruntime-genai: [{Path(args.sizes_results).name}]"
                 f"({Path(args.sizes_results).name}).\n")
        Path(args.results).write_text(text)
        print(text)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()

"""The size sweep of ``bench/decode.py``: edgelora against onnxruntime-genai int4 and llama.cpp Q4_0 + LoRA at the
135M, Qwen2.5-0.5B and Llama-3.2-1B shapes.

Per size a Llama with that shape (random weights, tied embeddings) and one rank-16 adapter on all seven projections,
in ``WORK/SIZE``; each package exported once, one export at a time, with its wall seconds and peak RSS. Then rounds
in which every system of every size runs once in its own process (a system with and without its adapter in the same
one, their generations taking turns; the systems of a size back to back, so their ratios share the machine's load):
prefill of a 32-token and of a 512-token prompt, decode ms/token over 64 new tokens, peak RSS. Writes
``RESULTS-sizes.md`` and ``sizes.png``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import decode
import llamacpp

SHAPES = {
    "135m": decode.SHAPE,
    "0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2),
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8),
}
TITLES = {"135m": "SmolLM-135M shape", "0.5b": "Qwen2.5-0.5B shape", "1b": "Llama-3.2-1B shape"}
ADAPTERS = {"a": (1, decode.RANK)}
EXPORTS = ("edgelora-int4", "genai-int4")
LONG_PROMPT = 512
EDGELORA, NO_ADAPTER, GENAI = "edgelora-int4", "edgelora-int4-noadapter", "genai-int4"
LLAMA, LLAMA_NONE, LLAMA_NOREPACK = "llamacpp-q4_0-lora-f32", "llamacpp-q4_0-lora-f32-scale0", \
    "llamacpp-q4_0-lora-f32-norepack"


def parameters(shape: dict) -> int:
    """Weights of the tied Llama: embedding once, per layer attention (q, o full; k, v grouped), MLP, two norms."""
    h, i, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    return shape["vocab_size"] * h + layers * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h) + h


def prepare(root: Path, sizes: list[str], cache: Path, skip_exports: tuple[str, ...] = ()) -> dict[str, dict]:
    """Per size: the model, its packages and GGUF files (each built once), and the repack probe; returns per size
    every build's seconds and peak RSS. ``skip_exports`` names packages not to build (where a size's export does
    not fit in the memory left free); the sweep runs without their rows."""
    builds = {}
    for size in sizes:
        work = root / size
        work.mkdir(parents=True, exist_ok=True)
        decode.build_model(work, SHAPES[size], ADAPTERS)
        wanted = [name for name in EXPORTS if f"{size}:{name}" not in skip_exports]
        builds[size] = dict(decode.exports(work, wanted, adapters=tuple(ADAPTERS)))
        setup = llamacpp.prepare(work, cache)
        builds[size].update({f"llama.cpp {name}": entry for name, entry in setup["converts"].items()})
    return builds


def systems(root: Path, size: str) -> list[list[str]]:
    """The rows of a size, in the groups that share a worker process: each system with its adapter and without
    it, so that the adapter's overhead is measured generation by generation in one model (one server); the forced
    ``--no-repack`` row only where the default repacking runs (else the main llama.cpp rows already are without
    it)."""
    work = root / size
    repack = json.loads((work / "llamacpp/setup.json").read_text())["repack"]["q4_0"]
    edgelora = [[EDGELORA, NO_ADAPTER]] if (work / "edgelora-int4/edgelora.json").exists() else []
    genai = [[GENAI]] if (work / "genai-int4/genai_config.json").exists() else []
    return edgelora + genai + [[LLAMA, LLAMA_NONE]] + ([[LLAMA_NOREPACK]] if repack else [])


def sweep(root: Path, sizes: list[str], rounds: int, reps: int) -> dict[str, dict]:
    """Per size, per system: the per-round medians of prefill (32 and 512 tokens), decode, RSS."""
    groups = {size: systems(root, size) for size in sizes}
    rows = {size: {k: {"prefill_ms": [], "prefill_long_ms": [], "decode_ms": [], "rss_mb": []}
                   for group in groups[size] for k in group} for size in sizes}
    for r in range(rounds):
        for size in sizes:
            for group in groups[size]:
                print(f"sizes round {r + 1}/{rounds}: {size} {' + '.join(group)}", file=sys.stderr, flush=True)
                for system, result in decode.measure_together(root / size, group, reps, LONG_PROMPT).items():
                    for key in ("prefill_ms", "prefill_long_ms", "decode_ms"):
                        rows[size][system][key].append(decode.med(result[key]))
                    rows[size][system]["rss_mb"].append(result["rss_mb"])
                    rows[size][system]["repack"] = result.get("repack")
    return rows


def label(system: str) -> str:
    return {**decode.LABELS, **llamacpp.LABELS}[system]


def fastest_llama(d: dict) -> str:
    """llama.cpp's faster repack setting of the Q4_0 + LoRA row (decode)."""
    return min((k for k in (LLAMA, LLAMA_NOREPACK) if k in d), key=d.get)


def summary(rows: dict) -> dict:
    """The medians and the ratios the issue asks for, of one size."""
    d = {k: decode.med(v["decode_ms"]) for k, v in rows.items()}
    p = {k: decode.med(v["prefill_ms"]) for k, v in rows.items()}
    pl = {k: decode.med(v["prefill_long_ms"]) for k, v in rows.items()}
    rss = {k: decode.med(v["rss_mb"]) for k, v in rows.items()}
    best = fastest_llama(d)

    def ratio(a: dict, num: str, den: str) -> float | None:
        return a[num] / a[den] if num in a and den in a else None

    overhead = ratio(d, EDGELORA, NO_ADAPTER)
    return {
        "decode": d, "prefill": p, "prefill_long": pl, "rss": rss, "llama": best,
        "vs_llama_decode": ratio(d, best, EDGELORA),
        "vs_llama_prefill_long": ratio(pl, best, EDGELORA),
        "vs_genai_decode": ratio(d, GENAI, EDGELORA),
        "overhead": None if overhead is None else overhead - 1,
        "llama_overhead": d[LLAMA] / d[LLAMA_NONE] - 1,
    }


OVERHEAD_TARGET = {"135m": None, "0.5b": 0.10, "1b": 0.06}


def plot_name(results: Path) -> str:
    """``sizes.png`` beside ``RESULTS-sizes.md``; another results file (another machine's run) gets its own."""
    return results.stem.removeprefix("RESULTS-") + ".png"


def report(root: Path, results: Path, rows: dict, builds: dict, rounds: int, command: str,
           load: str) -> tuple[str, dict]:
    lines = [
        "# Sizes: edgelora against llama.cpp and onnxruntime-genai at 135M, 0.5B and 1B",
        "",
        f"Command: `{command}` (one run; {rounds} rounds; in each round every system of every size once, each in "
        "its own process (a system with and without its adapter in one), the systems of a size back to back; "
        "medians over the rounds). Random weights, tied "
        f"embeddings, one rank-{decode.RANK} adapter on all seven projections; decode: 32-token prompt, "
        f"{decode.NEW_TOKENS} new tokens, greedy, EOS ignored; prefill also of a {LONG_PROMPT}-token prompt. "
        f"edgelora and llama.cpp on {decode.THREADS} threads, onnxruntime-genai under its own defaults. "
        f"Machine load: {load}.",
        "",
        "Systems: edgelora int4 base (MatMulNBits, accuracy level 4) + int8 adapter, and the same graph without an "
        "adapter; onnxruntime-genai int4 with the adapter baked in by its model builder; llama.cpp "
        f"(`{llamacpp.SDIST}`'s vendored tree, `llama-server`) Q4_0 base + f32 LoRA at scale 1 and at scale 0, "
        "prompts as token ids, prompt cache off.",
        "",
        "How to read it: compare rows of one size only (the systems of a size ran back to back in every round, so a "
        "load swing hits them alike; absolute times differ by 2x between machines of this kind and with the load). "
        "Prefill is the first forward pass over the prompt (onnxruntime-genai: `append_tokens`; llama.cpp: the "
        "server's `prompt_ms`); decode ms/token is the mean over the new tokens after the first; peak RSS is the "
        "process's (llama.cpp: the server's) VmHWM, so a row without the adapter shows the memory of the process that "
        "also ran it. Adapter overhead compares the same graph (edgelora) or the same server (llama.cpp, scale 1 "
        "against scale 0) with and without the adapter, measured in one process whose generations alternate between "
        "the two, so that the machine's load swings (10-30% over minutes on these machines) hit both alike. The "
        "build figures are each "
        "package's one-off cost on this machine, taken when it was built (maybe by an earlier run, under another "
        "load).",
    ]
    sums = {size: summary(r) for size, r in rows.items()}
    for size, r in rows.items():
        s = sums[size]
        shape = SHAPES[size]
        lines += [
            "", f"## {TITLES[size]} ({parameters(shape) / 1e6:.0f}M parameters: vocabulary {shape['vocab_size']}, "
            f"hidden {shape['hidden_size']}, intermediate {shape['intermediate_size']}, "
            f"{shape['num_hidden_layers']} layers, {shape['num_attention_heads']} heads, "
            f"{shape['num_key_value_heads']} KV heads)", "",
            f"| system | prefill {decode.PROMPT_TOKENS} ms | prefill {LONG_PROMPT} ms | decode ms/token | tokens/s "
            "| peak RSS MB |",
            "|---|---|---|---|---|---|",
        ]
        for k in r:
            note = ""
            if k in (LLAMA, LLAMA_NONE):
                note = " (default repacking)" if r[k]["repack"] else " (`--no-repack`: the default crashed)"
            lines.append(f"| {label(k)}{note} | {s['prefill'][k]:.1f} | {s['prefill_long'][k]:.0f} | "
                         f"{s['decode'][k]:.2f} | {1e3 / s['decode'][k]:.1f} | {s['rss'][k]:.0f} |")
        target = OVERHEAD_TARGET[size]
        checks = [
            (f"decode vs {label(s['llama'])} (tokens/s)", s["vs_llama_decode"], ">= 1.0"),
            (f"prefill {LONG_PROMPT} vs the same", s["vs_llama_prefill_long"], ">= 1.0"),
            ("decode vs onnxruntime-genai int4 (tokens/s)", s["vs_genai_decode"], ">= 1.0"),
            ("adapter overhead (decode, active / none - 1)", s["overhead"],
             "-" if target is None else f"<= {target:.2f}"),
            ("llama.cpp's adapter overhead (scale 1 / scale 0 - 1)", s["llama_overhead"], "-"),
        ]
        lines += ["", "| edgelora int4 + int8 adapter | value | target | met |", "|---|---|---|---|"]
        for name, value, goal in checks:
            if value is None:
                lines.append(f"| {name} | not measured (no package) | {goal} | no |")
                continue
            met = "-" if goal == "-" else ("yes" if (value >= float(goal.split()[1]) if goal.startswith(">=")
                                                     else value <= float(goal.split()[1])) else "no")
            lines.append(f"| {name} | {value:.2f} | {goal} | {met} |")
        lines += ["", "Builds (wall seconds, peak RSS of the build process and what it waited for):", ""]
        lines += [f"- {name}: {decode.export_label(entry)}" for name, entry in builds[size].items()]
    lines += ["", f"![decode ms/token and adapter overhead against model size]({plot_name(results)})"]
    return "\n".join(lines) + "\n", sums


def plot(sums: dict, path: Path) -> None:
    """Decode ms/token and adapter overhead against parameters, one line per system."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(sums)
    x = [parameters(SHAPES[s]) / 1e6 for s in sizes]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    def line(ax, values, name):
        points = [(xi, v) for xi, v in zip(x, values) if v is not None]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)

    for system in (EDGELORA, NO_ADAPTER, GENAI, LLAMA, LLAMA_NONE):
        line(left, [sums[s]["decode"].get(system) for s in sizes], label(system))
    left.set(xlabel="parameters (millions)", ylabel="decode ms/token", title="Decode, 32-token prompt")
    left.legend(fontsize=7)
    line(right, [None if sums[s]["overhead"] is None else 100 * sums[s]["overhead"] for s in sizes],
         "edgelora int4 + int8 adapter")
    line(right, [100 * sums[s]["llama_overhead"] for s in sizes], "llama.cpp Q4_0 + f32 LoRA")
    right.set(xlabel="parameters (millions)", ylabel="adapter overhead, % of decode time",
              title="Adapter active vs none, same model")
    right.legend(fontsize=7)
    for ax in (left, right):
        ax.set_xscale("log")
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xticks(x, [f"{v:.0f}M" for v in x])
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write(root: Path, results: Path, sizes: list[str], rounds: int, reps: int, builds: dict, command: str) -> None:
    """Run the sweep and write its results file and plot; the raw rows are kept in ``WORK/sweep.json``."""
    load = decode.machine_load()
    rows = sweep(root, sizes, rounds, reps)
    (root / "sweep.json").write_text(json.dumps(rows))
    text, sums = report(root, results, rows, builds, rounds, command,
                        f"{load} at the start, {decode.machine_load()} at the end; {decode.cpu()}")
    plot(sums, results.with_name(plot_name(results)))
    decode.write_results(results, text)
    print(text)


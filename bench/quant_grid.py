"""Decode speed and bytes for base fp32/int8/int4 x adapter none/fp32/int8/int4, and merged vs separate.

    .venv/bin/python bench/quant_grid.py [--work bench/work-decode] [--rounds 3] [--merged int4|none] [--fresh]

Same model and adapter as bench/decode.py (run that first, or this builds and exports what it needs).
One traced export serves the fp32, fp16 and int8 adapters: those packages are derived from the fp32 one with
the export's own steps (``slot_codec.encode_slots`` for the slot codec, ``quantize_base`` for MatMulNBits) and
``add-adapter``'s blob writer, which is what ``edgelora export --adapter-dtype D --quantize Q`` does after
its trace. int4 slots stay per module (no slot groups), so those packages are exported whole. ``--merged Q``
also exports a merged package (``--mode merged --quantize Q``) to compare with the separate package of the
same base quantization. Variants are measured interleaved, each in its own
process, medians over the rounds; results go to bench/RESULTS-quant.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import decode  # noqa: E402  (the model, the edgelora worker and the subprocess protocol are shared)

BASES = ("none", "int8", "int4")
ADAPTERS = ("fp32", "int8", "int4")
BLOCK = 32


def accuracy_level(base: str) -> int | None:
    """int4 computes in int8 (accuracy level 4), as bench/decode.py's int4 package does, so every package of one
    base quantization (derived, exported or merged) compares like for like."""
    return 4 if base == "int4" else None


def accuracy_flags(base: str) -> list[str]:
    level = accuracy_level(base)
    return [] if level is None else ["--accuracy-level", str(level)]


def derive(src: Path, dst: Path, quantize: str, adapter_dtype: str, peft: Path) -> None:
    """A package as ``export --quantize Q --adapter-dtype D`` writes it, from the fp32 package's graph."""
    import onnx

    from edgelora.exporters.base_quant import quantize_base
    from edgelora.exporters.options import ExportOptions
    from edgelora.exporters.package_files import graph_bytes, write_adapter_entry
    from edgelora.exporters.peft_ingest import ingest_peft
    from edgelora.exporters.slot_codec import encode_slots
    from edgelora.format.manifest import load_manifest

    if (dst / "edgelora.json").exists():
        return
    manifest = load_manifest(src)
    proto = onnx.load(str(src / "model.onnx"))
    factors = list(dict.fromkeys(n for s in manifest.slots for n in (s.a, s.b)))  # a group's are shared
    encode_slots(proto, factors, adapter_dtype, BLOCK)
    proto = quantize_base(proto, ExportOptions(quantize=quantize, block_size=BLOCK,
                                                accuracy_level=accuracy_level(quantize)), set(factors))
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    onnx.save_model(proto, str(tmp / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=1024)
    for extra in ("tokenizer.json", "tokenizer_config.json"):
        if (src / extra).exists():
            shutil.copy2(src / extra, tmp / extra)
    entry = write_adapter_entry(tmp, "a", ingest_peft(peft), peft, adapter_dtype, BLOCK, manifest.base_fingerprint,
                                manifest.slot_groups)
    derived = dataclasses.replace(
        manifest, adapter_dtype=adapter_dtype, adapter_block_size=BLOCK, base_quantization=quantize,
        base_bytes=graph_bytes(tmp / "model.onnx"), adapters={"a": entry}, quality={},
        slots=[dataclasses.replace(s, dtype=adapter_dtype) for s in manifest.slots],
        graph={**manifest.graph, "quantization": quantize, "quantization_block_size": BLOCK},
    )
    derived.save(tmp)
    tmp.rename(dst)


def variants(work: Path, merged: str) -> dict[str, tuple[Path, str | None]]:
    """label -> (package, adapter to run)."""
    out = {}
    for base in BASES:
        for dtype in ADAPTERS:
            pkg = work / "grid" / f"base-{base}-adapter-{dtype}"
            if dtype == "fp32":
                out[f"base {base}, no adapter"] = (pkg, None)
            out[f"base {base}, {dtype} adapter"] = (pkg, "a")
    if merged != "none":
        out[f"merged, base {merged}"] = (work / "grid" / f"merged-{merged}", "a")
    return out


def package_bytes(pkg: Path, adapter: str | None) -> tuple[int, int]:
    """(graph bytes, adapter blob bytes); a merged graph's bytes are the adapter's whole cost."""
    manifest = json.loads((pkg / "edgelora.json").read_text())
    if manifest.get("mode") == "merged":
        return manifest["adapters"]["a"]["bytes"], 0
    blob = (pkg / "adapters/a.onnx_adapter").stat().st_size if adapter else 0
    return manifest["base_bytes"], blob


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=str(decode.HERE / "work-decode"))
    parser.add_argument("--results", default=str(decode.HERE / "RESULTS-quant.md"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--merged", default="int4", choices=("none", "int8", "int4"),
                        help="also measure a merged package with this base quantization (none: no merged package)")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--fresh", action="store_true",
                        help="derive every grid package again (after a change to edgelora's graphs or codecs)")
    args = parser.parse_args()
    if args.worker:
        package, adapter = args.worker
        result = decode.worker_edgelora(Path(package), [None if adapter == "-" else adapter], args.reps)[0]
        print(json.dumps(result))
        return
    work = Path(args.work)
    if args.fresh:
        shutil.rmtree(work / "grid", ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    decode.build_model(work)
    src = work / "edgelora-fp32"
    edgelora = str(Path(sys.executable).with_name("edgelora"))
    if not (src / "edgelora.json").exists():
        subprocess.run([edgelora, "export", str(work / "base"), "--adapter", f"a={work / 'peft/a'}",
                        "--adapter", f"b={work / 'peft/b'}", "--out", str(src)], check=True, stdout=subprocess.DEVNULL)
    for base in BASES:
        for dtype in ADAPTERS:
            dst = work / "grid" / f"base-{base}-adapter-{dtype}"
            if dtype != "int4":
                print(f"deriving base {base}, adapter {dtype}", file=sys.stderr, flush=True)
                derive(src, dst, base, dtype, work / "peft/a")
            elif not dst.exists():
                print(f"exporting base {base}, adapter {dtype}", file=sys.stderr, flush=True)
                subprocess.run([edgelora, "export", str(work / "base"), "--adapter", f"a={work / 'peft/a'}",
                                "--adapter-dtype", dtype, "--quantize", base, *accuracy_flags(base), "--out", str(dst)],
                               check=True, stdout=subprocess.DEVNULL)
    merged_dir = work / "grid" / f"merged-{args.merged}"
    if args.merged != "none" and not merged_dir.exists():
        print(f"exporting merged, base {args.merged}", file=sys.stderr, flush=True)
        subprocess.run([edgelora, "export", str(work / "base"), "--adapter", f"a={work / 'peft/a'}", "--mode",
                        "merged", "--quantize", args.merged, *accuracy_flags(args.merged), "--out", str(merged_dir)],
                       check=True, stdout=subprocess.DEVNULL)
    runs = variants(work, args.merged)
    decode_ms = {k: [] for k in runs}
    for r in range(args.rounds):
        for label, (pkg, adapter) in runs.items():
            print(f"round {r + 1}/{args.rounds}: {label}", file=sys.stderr, flush=True)
            out = subprocess.run([sys.executable, __file__, "--worker", str(pkg), adapter or "-", "--reps",
                                  str(args.reps)], check=True, capture_output=True, text=True)
            decode_ms[label].append(float(np.median(json.loads(out.stdout.strip().splitlines()[-1])["decode_ms"])))
    reference = float(np.median(decode_ms["base none, no adapter"]))
    lines = [
        "# Quantized base x quantized adapter: decode and bytes",
        "",
        f"Command: `{' '.join(['python bench/quant_grid.py', *sys.argv[1:]])}`"
        f" (one run; {args.rounds} rounds, variants interleaved, each in its own process; medians). Model: the "
        "SmolLM-135M-shaped Llama of bench/decode.py with its rank-16 adapter on all seven projections (210 slots); "
        f"{decode.PROMPT_TOKENS}-token prompt, {decode.NEW_TOKENS} new tokens, greedy; int4 in blocks of {BLOCK}, "
        "accuracy level 4 for the int4 base.",
        "",
        "| variant | decode ms/token | vs fp32 base, no adapter | graph bytes | adapter bytes |",
        "|---|---|---|---|---|",
    ]
    for label, (pkg, adapter) in runs.items():
        ms = float(np.median(decode_ms[label]))
        graph, blob = package_bytes(pkg, adapter)
        lines.append(f"| {label} | {ms:.2f} | {ms / reference:.2f} | {graph / 1e6:.1f} MB | "
                     f"{blob / 1e6:.2f} MB |" if blob else f"| {label} | {ms:.2f} | {ms / reference:.2f} | "
                     f"{graph / 1e6:.1f} MB | - |")
    lines += ["", "A merged package's graph bytes are per adapter (one graph each); separate packages share one graph "
              "between all adapters and add only the blob."]
    text = "\n".join(lines) + "\n"
    Path(args.results).write_text(text)
    print(text)


if __name__ == "__main__":
    main()

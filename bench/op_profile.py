"""Where an edgelora package spends a prefill and a decode step, by operator type (onnxruntime's profiler).

    .venv/bin/python bench/op_profile.py PACKAGE [--adapter a] [--prompt 512] [--decode 32]

Runs one prefill of a ``--prompt``-token prompt, then a 32-token prompt and ``--decode`` new tokens, through
``EdgeModel`` with onnxruntime's profiling on, and prints per operator type the kernel time of the long prefill and
of the mean decode step, with each type's share. Kernel times only: what the graph costs, not the Python around it.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnxruntime as ort

import decode


def profiled_model(package: Path, prefix: str):
    """``EdgeModel.open`` with every session it makes profiling into ``prefix``*.json."""
    import edgelora.runtime.model as runtime_model
    from edgelora.runtime import EdgeModel

    plain = ort.SessionOptions

    def options():
        made = plain()
        made.enable_profiling = True
        made.profile_file_prefix = prefix
        return made

    runtime_model.ort.SessionOptions = options
    try:
        return EdgeModel.open(package, intra_op_threads=decode.THREADS, batching=False)
    finally:
        runtime_model.ort.SessionOptions = plain


def runs(events: list[dict]) -> list[dict[str, float]]:
    """Per ``model_run``, in order: op type -> kernel µs."""
    bounds = [(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "Session" and e["name"] == "model_run"]
    out = [defaultdict(float) for _ in bounds]
    starts = np.array([b[0] for b in bounds])
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        i = int(np.searchsorted(starts, e["ts"], side="right")) - 1
        if i >= 0 and e["ts"] <= bounds[i][1]:
            out[i][e["args"]["op_name"]] += e["dur"]
    return out


def table(title: str, times: dict[str, float]) -> str:
    total = sum(times.values())
    lines = [f"{title}: {total / 1e3:.2f} ms of kernels", "| op type | ms | share |", "|---|---|---|"]
    for op, t in sorted(times.items(), key=lambda kv: -kv[1])[:12]:
        lines.append(f"| {op} | {t / 1e3:.2f} | {t / total:.0%} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package")
    parser.add_argument("--adapter", default=None)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--out", default="/tmp/edgelora-profile")
    args = parser.parse_args()
    model = profiled_model(Path(args.package), args.out)
    model.generate(decode.prompt_ids(args.prompt), adapter=args.adapter, max_new_tokens=1, ignore_eos=True)
    model.generate(decode.prompt_ids(), adapter=args.adapter, max_new_tokens=args.decode + 1, ignore_eos=True)
    events = json.loads(Path(model.session.end_profiling()).read_text())
    per_run = runs(events)
    steps = per_run[2:]  # 0: the long prefill, 1: the short one
    mean_step = {op: sum(r.get(op, 0.0) for r in steps) / len(steps) for op in set().union(*steps)}
    print(table(f"prefill of {args.prompt} tokens", per_run[0]))
    print()
    print(table(f"decode step (mean of {len(steps)})", mean_step))


if __name__ == "__main__":
    main()

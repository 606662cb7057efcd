"""Pretrain the demo's base model and write it to examples/demo/base/ (what the repo ships).

The base learns the prompt/completion template, copying, and a few tagged primitives on digits and
capitals (see ``edgelora.demo.tasks``), so a tenant's LoRA adapter only has to learn its own
mapping. It is trained once and shipped: CPU training is deterministic for a seed but not bit for bit
across machines, and the demo must not spend its time budget here.

    .venv/bin/python examples/demo/train_base.py            # then commit examples/demo/base/
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from edgelora.demo.tasks import TENANTS, generic_examples, tenant_split
from edgelora.demo.tiny_models import build_causal_lm
from edgelora.exporters.examples import Example, load_tokenizer
from edgelora.training.trainer import evaluate, fit

OUT = Path(__file__).resolve().parent / "base"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--steps", type=int, default=8000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=1, help="1 is fastest on a busy 2-core machine")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = build_causal_lm(args.out, family="llama", size="demo", seed=0)
    tokenizer = load_tokenizer(args.out)
    data = [Example(**r) for r in generic_examples(100_000, seed=0)]
    t0 = time.perf_counter()
    losses = fit(model, tokenizer, data, args.steps, args.lr, args.batch_size, seed=0, desc="pretraining the base")
    seconds = time.perf_counter() - t0
    model.save_pretrained(args.out)
    report = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "threads": args.threads,
              "seconds": round(seconds, 1), "final_loss": round(sum(losses[-100:]) / len(losses[-100:]), 4),
              "parameters": sum(p.numel() for p in model.parameters())}
    held_out = {"generic": generic_examples(500, seed=1), **{t: tenant_split(t, 0, 200)[1] for t in TENANTS}}
    for name, rows in held_out.items():
        report[f"{name}_exact_match"] = evaluate(model, tokenizer, [Example(**r) for r in rows]).exact_match
    (args.out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

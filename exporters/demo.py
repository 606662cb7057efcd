"""The embedded default behind ``make demo``: a small base, tenant adapters, one package, one table.

Each tenant is a ``Tenant`` row; the steps (make the base, make each adapter, export, serve)
are separate functions so trained tenants can replace the random ones without touching the rest.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

PROMPT = "The weather today is"


@dataclass
class Tenant:
    name: str
    r: int
    alpha: float
    targets: tuple[str, ...]
    seed: int
    lora_kwargs: dict = field(default_factory=dict)


TENANTS = [
    Tenant("poet", r=8, alpha=16, targets=("q_proj", "v_proj"), seed=1),
    Tenant("coder", r=4, alpha=8, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"), seed=2, lora_kwargs={"use_rslora": True}),
]


def make_base(work: Path):
    from .tiny_models import build_causal_lm

    return build_causal_lm(work / "base", family="llama", size="small", seed=0)


def make_adapters(base_model, work: Path) -> dict[str, object]:
    """PEFT models per tenant (kept as the parity reference); their folders are under work/adapters."""
    from .tiny_models import random_peft_adapter

    return {
        t.name: random_peft_adapter(base_model, work / "adapters" / t.name, seed=t.seed, r=t.r, alpha=t.alpha,
                                    targets=t.targets, **t.lora_kwargs)
        for t in TENANTS
    }


def peft_logits(peft_model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return peft_model(torch.tensor([ids])).logits.numpy()


def run_demo(out: str | Path) -> dict:
    """Run the whole demo, print its table, and return its rows for callers (the tests) to check."""
    import torch

    from edgelora.measure import hot_swap_us
    from edgelora.runtime import EdgeModel

    from .package_writer import export_package

    work = Path(out)
    torch.set_num_threads(2)
    t_start = time.perf_counter()
    print(f"edgelora demo: working in {work}/")
    base = make_base(work)
    print(f"built a random-weight Llama base: {sum(p.numel() for p in base.parameters()) / 1e6:.2f}M parameters")
    peft_models = make_adapters(base, work)
    print(f"made {len(peft_models)} PEFT LoRA adapters: {', '.join(peft_models)}")
    package = work / "package"
    export_package(work / "base", {n: work / "adapters" / n for n in peft_models}, package, overwrite=True)

    model = EdgeModel.open(package)
    ids = model.encode(PROMPT)
    print(f"\nprompt: {PROMPT!r}\n")
    print(f"{'adapter':<8} {'answer (greedy, 24 tokens)':<34} {'max |Δ logits| vs PEFT':>22} {'decode ms/tok':>13}")
    rows = {}
    for name in [None, *peft_models]:
        result = model.generate(PROMPT, adapter=name, max_new_tokens=24)
        reference = peft_logits(base if name is None else peft_models[name], ids)
        diff = float(np.abs(model.logits(ids, adapter=name) - reference).max())
        rows[name] = {"text": result.text, "max_abs_diff": diff, "decode_ms_per_token": result.decode_ms_per_token}
        print(f"{name or '(none)':<8} {result.text!r:<34} {diff:>22.2e} {result.decode_ms_per_token:>13.2f}")
    stats = model.stats()
    loads = ", ".join(f"{n} {ms:.2f} ms" for n, ms in stats["load_ms"].items())
    swap_us = hot_swap_us(model, list(peft_models))
    print(f"\nhot swap between adapters: {swap_us:.1f} µs (median); cold loads: {loads}")
    print(f"resident adapter bytes: {stats['resident_bytes']:,}; demo took {time.perf_counter() - t_start:.0f}s")
    print(f"try: edgelora generate {package} --adapter {TENANTS[0].name} --prompt {PROMPT!r}")
    return {"rows": rows, "hot_swap_us": swap_us, "package": package}

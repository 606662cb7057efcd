"""The embedded default behind ``make demo``: the shipped base, tenant adapters trained on it, one package.

The base (``examples/demo/base``, made by ``examples/demo/train_base.py``) copies what it is given, so it
fails every tenant task; each tenant's LoRA adapter, trained here with ``edgelora train``'s code, turns
its task into one the model does. The table then shows the skill in the adapter, held-out exact-match in
PyTorch and on the edge runtime (int8 adapters, quantized base) with tenants switched per request.
Trained adapters are cached by a hash of everything that shapes them, so a second run skips training.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgelora.checks.measure import hot_swap_us, peak_rss_bytes
from edgelora.errors import EdgeLoraError
from edgelora.exporters.base_model import load_base
from edgelora.exporters.examples import load_tokenizer, read_examples
from edgelora.exporters.export import ExportOptions, export_package
from edgelora.runtime import EdgeModel
from edgelora.training.trainer import evaluate, train_adapter
from edgelora.units import human_bytes

from .tasks import TENANTS, write_tenant_data

BASE = Path(__file__).resolve().parents[1] / "examples" / "demo" / "base"
DEFAULT_CACHE = Path("~/.cache/edgelora/demo").expanduser()


@dataclass(frozen=True)
class Recipe:
    """How much data and training each tenant gets; everything here is part of the cache key."""

    n_train: int
    n_test: int
    steps: int
    batch_size: int
    lr: float
    rank: int
    alpha: float
    targets: str = "all-linear"
    seed: int = 0
    more_steps: dict[str, int] = field(default_factory=dict)  # tasks that need longer than ``steps``

    def steps_for(self, task: str) -> int:
        return self.more_steps.get(task, self.steps)


# sort is the hardest of the four tasks for this base and needs more steps to reach the others' exact match
FULL = Recipe(n_train=2000, n_test=200, steps=300, batch_size=32, lr=3e-3, rank=8, alpha=16, more_steps={"sort": 800})
QUICK = Recipe(n_train=64, n_test=16, steps=6, batch_size=8, lr=3e-3, rank=4, alpha=8)


def cache_key(base_dir: Path, train_file: Path, recipe: Recipe) -> str:
    from importlib.metadata import version

    h = hashlib.sha256()
    for f in sorted(base_dir.iterdir()):
        if f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    h.update(train_file.read_bytes())
    h.update(json.dumps([asdict(recipe), version("edgelora"), version("peft"), version("torch")]).encode())
    return h.hexdigest()[:16]


def tenant_adapter(task: str, base_dir: Path, train_file: Path, recipe: Recipe, work: Path,
                   cache: Path | None) -> tuple[Path, float | None]:
    """(adapter folder, seconds spent training or None when a cached adapter was reused)."""

    out = work / "adapters" / task if cache is None else cache / f"{task}-{cache_key(base_dir, train_file, recipe)}"
    if cache is not None and (out / "adapter_config.json").is_file():
        return out, None
    result = train_adapter(base_dir, train_file, out, rank=recipe.rank, alpha=recipe.alpha, targets=recipe.targets,
                           max_steps=recipe.steps_for(task), lr=recipe.lr, batch_size=recipe.batch_size,
                           seed=recipe.seed, overwrite=True)
    return out, result.seconds


def peft_model(base, adapter_dir: Path):
    """PEFT's own PyTorch model for the saved adapter: the reference the runtime is judged against."""
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(copy.deepcopy(base), str(adapter_dir)).eval()


def serve(model, tests: dict[str, list]) -> dict[str, dict]:
    """Every held-out prompt through the runtime, tenants interleaved so each request switches adapter."""
    rows = {task: {"answers": [], "decode_ms": []} for task in tests}
    longest = {task: max(len(model.encode(ex.completion, add_special_tokens=False)) for ex in examples) + 1
               for task, examples in tests.items()}
    for i in range(max(map(len, tests.values()))):
        for task, examples in tests.items():
            if i < len(examples):
                r = model.generate(examples[i].prompt, adapter=task, max_new_tokens=longest[task])
                rows[task]["answers"].append(r.text)
                if len(r.token_ids) > 1:
                    rows[task]["decode_ms"].append(r.decode_ms_per_token)
    return rows


def print_table(rows: dict[str, dict], swap_us: float, rss: int, quantize: str, adapter_dtype: str) -> None:
    head = (f"{'tenant':<8} {'task':<25} {'base EM':>7} {'PEFT EM':>7} {'edge EM':>7} "
            f"{'adapter ' + adapter_dtype + ' / PEFT file':>26} {'decode ms/tok':>13}")
    print("\n" + head + "\n" + "-" * len(head))
    for task, r in rows.items():
        size = f"{human_bytes(r['bytes'])} / {human_bytes(r['peft_bytes'])} ({r['bytes'] / r['peft_bytes']:.0%})"
        print(f"{task:<8} {TENANTS[task][0]:<25} {r['base_em']:>7.1%} {r['peft_em']:>7.1%} {r['edge_em']:>7.1%} "
              f"{size:>26} {r['decode_ms_per_token']:>13.3f}")
    print("-" * len(head))
    print(f"swap between resident tenants: {swap_us:.2f} µs (median); peak RSS of this process: {human_bytes(rss)} "
          f"(PyTorch training and evaluation included); base {quantize}, adapters {adapter_dtype}")


def run_demo(out: str | Path, cache_dir: str | Path | None = None, use_cache: bool = True, quantize: str = "int8",
             quick: bool = False, adapter_dtype: str = "int8") -> dict:
    """Run the whole demo, print its table, and return its rows for callers (the tests) to check."""
    import numpy as np
    import torch

    if not (BASE / "config.json").is_file():
        raise EdgeLoraError(f"{BASE}: the demo's base model is missing; run the demo from a clone of the repository")
    torch.set_num_threads(1)  # on 2 busy cores, a second thread spins more than it computes
    t_start = time.perf_counter()
    work, recipe = Path(out), QUICK if quick else FULL
    cache = None if not use_cache else Path(cache_dir) if cache_dir else DEFAULT_CACHE
    print(f"edgelora demo: base {BASE}, working in {work}/, adapter cache {cache or 'off'}", flush=True)
    files = write_tenant_data(work / "data", recipe.n_train, recipe.n_test, recipe.seed)
    print(f"tenant tasks: {', '.join(f'{t} ({d})' for t, (d, _) in TENANTS.items())}; "
          f"{recipe.n_train} training and {recipe.n_test} held-out examples each", flush=True)

    adapters = {}
    for task, (train_file, _) in files.items():
        adapters[task], seconds = tenant_adapter(task, BASE, train_file, recipe, work, cache)
        print(f"  {task}: " + (f"trained in {seconds:.0f}s" if seconds is not None else f"reused {adapters[task]}"),
              flush=True)
    package = work / "package"
    probes = {task: test_file for task, (_, test_file) in files.items()}
    manifest = export_package(BASE, adapters, package, ExportOptions(adapter_dtype=adapter_dtype, quantize=quantize,
                                                                     probe_data=probes, overwrite=True))

    print("measuring held-out exact-match: base alone and PEFT in PyTorch, then the edge runtime", flush=True)
    tests = {task: read_examples(test_file) for task, (_, test_file) in files.items()}
    base, tokenizer = load_base(BASE), load_tokenizer(BASE)
    rows = {}
    for task, examples in tests.items():
        peft = evaluate(peft_model(base, adapters[task]), tokenizer, examples)
        rows[task] = {"base_em": evaluate(base, tokenizer, examples).exact_match, "peft_em": peft.exact_match,
                      "peft_answers": peft.answers, "bytes": manifest.adapters[task].bytes,
                      "peft_bytes": manifest.adapters[task].source_bytes}
    model = EdgeModel.open(package, intra_op_threads=1)
    for task, served in serve(model, tests).items():
        rows[task]["edge_answers"] = served["answers"]
        rows[task]["edge_em"] = float(np.mean([a == ex.completion for a, ex in zip(served["answers"], tests[task])]))
        rows[task]["decode_ms_per_token"] = float(np.median(served["decode_ms"] or [float("nan")]))
    swap_us = hot_swap_us(model, list(tests))
    rss = peak_rss_bytes()
    print_table(rows, swap_us, rss, quantize, adapter_dtype)
    seconds = time.perf_counter() - t_start
    first = next(iter(tests))
    print(f"demo took {seconds:.0f}s; try: edgelora generate {package} --adapter {first} "
          f"--prompt {tests[first][0].prompt!r}")
    return {"rows": rows, "hot_swap_us": swap_us, "peak_rss_bytes": rss, "package": package, "seconds": seconds}

"""Soak: 4 threads × many calls switching at random among 20 adapters (and the base) under a memory budget
that keeps only a few resident, so adapters are evicted and reloaded all the time.

Every answer must equal the single-threaded reference computed before, resident bytes must stay within the
budget, and the process's resident memory after warm-up may grow by at most 5%. The soak runs in its own
process with only the runtime imported (numpy + onnxruntime, as on a device), so the RSS it measures is
the runtime's, not the test runner's.

Short in ``make test`` (a few thousand calls); longer with ``EDGELORA_SOAK_CALLS``, e.g.
``EDGELORA_SOAK_CALLS=200000 .venv/bin/python -m pytest tests/test_soak.py``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np

ADAPTERS = 20
THREADS = 4
CALLS = int(os.environ.get("EDGELORA_SOAK_CALLS", "3000"))
BUDGET_MB = 0.02  # about four of the test's 4.3 KiB blobs
PROMPTS = [[1, 5, 9, 14, 3, 7], [1, 40, 41, 42], [1, 2, 60, 61, 62, 63, 64, 65]]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def answer(model, adapter, prompt: int, generate: bool):
    if generate:
        return model.generate(PROMPTS[prompt], adapter=adapter, max_new_tokens=4).token_ids
    return model.logits(PROMPTS[prompt], adapter=adapter)


def soak(package: Path, calls: int) -> dict:
    """Run in a process of its own: references first, then the threads; returns what it measured."""
    from edgelora.runtime import EdgeModel

    names = [None, *sorted(n for n in EdgeModel.open(package).adapters if n.startswith("tenant"))]
    cases = [(name, p, g) for name in names for p in range(len(PROMPTS)) for g in (False, True)]
    reference = EdgeModel.open(package)
    want = {case: answer(reference, *case) for case in cases}
    del reference
    model = EdgeModel.open(package, adapter_memory_mb=BUDGET_MB)
    budget = model.stats()["budget_bytes"]
    failures: list[str] = []
    over_budget = []
    barrier = threading.Barrier(THREADS + 1)

    done = []

    def worker(seed: int, n: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(n):
                case = rng.choice(cases)
                got = answer(model, *case)
                if not np.array_equal(np.asarray(got), np.asarray(want[case])):
                    failures.append(f"{case}: differs from the single-threaded answer")
                if model.stats()["resident_bytes"] > budget:
                    over_budget.append(model.stats()["resident_bytes"])
                done.append(1)
        except Exception as e:
            failures.append(f"thread {seed}: {type(e).__name__}: {e}")

    def run(phase: int, n: int) -> None:
        threads = [threading.Thread(target=lambda s=s: (barrier.wait(), worker(s, n)))
                   for s in range(phase * THREADS, (phase + 1) * THREADS)]
        for t in threads:
            t.start()
        barrier.wait()
        for t in threads:
            t.join()

    run(0, max(calls // (4 * THREADS), 50))  # warm-up: allocator pools, onnxruntime caches, every adapter seen
    before = rss_bytes()
    done.clear()
    run(1, calls // THREADS)
    after = rss_bytes()
    stats = model.stats()
    return {"failures": failures[:5], "over_budget": over_budget[:5], "rss_before": before, "rss_after": after,
            "evictions": stats["evictions"], "misses": stats["misses"], "hits": stats["hits"], "calls": len(done),
            "torch_loaded": "torch" in sys.modules}


def make_package(llama, folder: Path) -> Path:
    """The llama test package plus 20 adapters added with add-adapter, from random PEFT weights."""
    import torch
    from safetensors.torch import load_file, save_file

    from edgelora.exporters.add_adapter import add_adapter

    package = folder / "pkg"
    shutil.copytree(llama.package, package)
    template = llama.adapter_dirs["plain"]
    shapes = {k: v.shape for k, v in load_file(str(template / "adapter_model.safetensors")).items()}
    generator = torch.Generator().manual_seed(0)
    for i in range(ADAPTERS):
        peft = folder / f"peft{i}"
        peft.mkdir()
        shutil.copy(template / "adapter_config.json", peft)
        save_file({k: torch.randn(s, generator=generator) * 0.3 for k, s in shapes.items()},
                  str(peft / "adapter_model.safetensors"))
        add_adapter(package, f"tenant{i:02d}", peft)
    return package


def test_soak_threads_evictions_memory(llama, tmp_path):
    package = make_package(llama, tmp_path)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent))
    result = subprocess.run([sys.executable, __file__, str(package), str(CALLS)], capture_output=True, text=True,
                            env=env, timeout=3600)
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout.splitlines()[-1])
    print(measured)
    assert not measured["failures"], measured["failures"]
    assert not measured["over_budget"], measured["over_budget"]
    assert measured["calls"] == CALLS // THREADS * THREADS
    assert measured["evictions"] > ADAPTERS, measured  # the budget really forced adapters out and back in
    assert measured["rss_after"] <= 1.05 * measured["rss_before"], measured
    assert not measured["torch_loaded"]


if __name__ == "__main__":
    print(json.dumps(soak(Path(sys.argv[1]), int(sys.argv[2]))))

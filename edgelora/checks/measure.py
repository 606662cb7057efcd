"""The measurements behind ``edgelora check``, taken on the package's own graph through the device runtime.

Only numpy, onnxruntime and ``edgelora.runtime``: the check must run where the package runs, on a
device or a CI runner without torch. Times are medians over repeated runs after warm-ups, because
the first runs pay for allocation and caches, and single runs on shared CI machines are noisy.
"""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

import numpy as np

from edgelora.errors import EdgeLoraError
from edgelora.format.manifest import Manifest
from edgelora.runtime.composition import label, normalize

from .budget import LatencySettings

HOT_SWAP_ROUNDS = 2000


def package_sizes(package: Path, manifest: Manifest) -> tuple[dict[str, int], dict[str, int]]:
    """({"package", "base"} -> bytes, adapter name -> bytes), from the files on disk, not the manifest."""
    total = sum(p.stat().st_size for p in package.rglob("*") if p.is_file())
    graph = package / manifest.graph["file"]
    base = sum(p.stat().st_size for p in (graph, graph.with_name(graph.name + ".data")) if p.is_file())
    adapters = {}
    for name, entry in manifest.adapters.items():
        path = package / entry.file
        if not path.is_file():
            raise EdgeLoraError(f"{path}: adapter {name} is in the manifest but its file is missing")
        adapters[name] = path.stat().st_size
    return {"package": total, "base": base}, adapters


def latency(model, adapter: str | None, settings: LatencySettings) -> dict[str, float]:
    """Prefill and decode times of greedy generation (an encoder: its forward pass, as prefill), plus adapter
    switch and load costs when there is one."""
    prompt = _random_ids(model, settings.prompt_tokens, seed=0)
    for _ in range(settings.warmup):
        timed_run(model, prompt, adapter, settings)
    prefill, decode = zip(*(timed_run(model, prompt, adapter, settings) for _ in range(settings.runs)))
    metrics = {
        "prefill_ms": float(np.median(prefill)),
        "prefill_p95_ms": float(np.percentile(prefill, 95)),
    }
    if decode[0] is not None:
        metrics["decode_ms_per_token"] = float(np.median(decode))
        metrics["decode_p95_ms_per_token"] = float(np.percentile(decode, 95))
    if adapter is not None:
        metrics["cold_load_ms"] = cold_load_ms(model, adapter, settings.runs)
        metrics["hot_swap_us"] = hot_swap_us(model, model.adapters)
    return metrics


def timed_run(model, prompt: list[int], adapter, settings: LatencySettings) -> tuple[float, float | None]:
    """(prefill ms, decode ms per token) of one greedy generation; an encoder's whole work is one forward
    pass over the prompt, which counts as its prefill, and it has no decode (None)."""
    if model.manifest.task == "causal-lm":
        r = model.generate(prompt, adapter=adapter, max_new_tokens=settings.decode_tokens, ignore_eos=True)
        return r.prefill_ms, r.decode_ms_per_token
    t0 = time.perf_counter()
    model.encoder_output([prompt], adapter=adapter)
    return (time.perf_counter() - t0) * 1e3, None


def compare(model, targets: list, settings: LatencySettings) -> dict:
    """Prefill and decode medians per target (None = the base), runs interleaved across targets.

    Interleaving puts every target under the same machine load, so the ratios between them hold
    even when absolute times drift between minutes, as they do on shared machines.
    """
    prompt = _random_ids(model, settings.prompt_tokens, seed=0)
    labels = [label(normalize(target)) or "(base)" for target in targets]  # the names stats() lists them under
    runs: dict = {name: [] for name in labels}
    for i in range(settings.warmup + settings.runs):
        for target, name in zip(targets, labels):
            timings = timed_run(model, prompt, target, settings)
            if i >= settings.warmup:
                runs[name].append(timings)
    rows = {}
    for name, samples in runs.items():
        prefill, decode = zip(*samples)
        rows[name] = {"prefill_ms": float(np.median(prefill))}
        if decode[0] is not None:
            rows[name]["decode_ms_per_token"] = float(np.median(decode))
    return rows


def cold_load_ms(model, adapter: str, runs: int) -> float:
    """Median ms to make a non-resident adapter resident (checksum, shape checks, onnxruntime load).

    The file may sit in the OS page cache after the first load; on a device after a reboot it will not.
    """
    model.load_adapter(adapter)
    samples = []
    for _ in range(runs):
        model.unload_adapter(adapter)
        t0 = time.perf_counter()
        model.load_adapter(adapter)
        samples.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(samples))


def hot_swap_us(model, names: list[str], rounds: int = HOT_SWAP_ROUNDS) -> float:
    """Median µs to point a call at another resident adapter (what a per-request switch costs: a ready binding
    of that adapter's parameters from its pool). Handing the binding back after the call (clearing the call's
    tensors from it) is every call's cost, switching or not, so it is not counted here."""
    for n in names:
        model.load_adapter(n)
    samples = []
    for i in range(rounds):
        t0 = time.perf_counter_ns()
        call = model.call(names[i % len(names)])
        samples.append(time.perf_counter_ns() - t0)
        call.close()
    return float(np.median(samples)) / 1e3


def peak_rss_bytes() -> int:
    """This process's peak resident set so far.

    On Linux, from ``VmHWM``: ``ru_maxrss`` keeps the peak of the process that forked this one across the exec,
    so a check started by a large parent (a test runner holding torch, a build script) would report the parent's
    peak as its own. Elsewhere ``ru_maxrss`` (bytes on macOS).
    """
    status = Path("/proc/self/status")
    if status.exists():
        hwm = next(line for line in status.read_text().splitlines() if line.startswith("VmHWM:"))
        return int(hwm.split()[1]) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def greedy_agreement(model, name: str) -> float:
    """Top-1 agreement of the packaged adapter with its fp32 PyTorch reference, as measured at export.

    The fp32 factors never reach the device (only the quantized blob does), so the export, which
    has both, measures it on a probe batch and records it in the manifest; the check gates on it.
    """
    quality = model.manifest.quality.get(name)
    if quality is not None and quality.min_cosine is not None:
        raise EdgeLoraError(f"{model.package}: quality.min_greedy_agreement does not apply to a "
                            f"{model.manifest.task} package (its export measured the embeddings' cosine, "
                            f"{quality.min_cosine:.6f}, for adapter {name}); see `edgelora inspect`")
    if quality is None:
        raise EdgeLoraError(f"{model.package}: adapter {name} has no quality report in the manifest; re-export it")
    if quality.top1_agreement is None:
        raise EdgeLoraError(f"{model.package}: adapter {name} was added without its fp32 base, so its top-1 "
                            "agreement was not measured; add it again with --base BASE_DIR --overwrite")
    return quality.top1_agreement


def _random_ids(model, length: int, seed: int) -> list[int]:
    """Token ids any package accepts, tokenizer or not; seeded so every run measures the same prompt."""
    vocab = model.manifest.graph["vocab_size"]
    return np.random.default_rng(seed).integers(0, vocab, length).tolist()

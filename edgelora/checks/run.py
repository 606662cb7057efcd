"""``edgelora check``: measure what the budget file asks about, on the package as shipped, and judge each budget.

The model is opened only when a latency or quality budget needs it, so a size-only check stays
instant; everything the file cannot be judged by is refused before any measurement starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgelora.format.manifest import load_manifest
from edgelora.runtime import EdgeModel

from .baseline import load_baseline, save_baseline
from .budget import Result, evaluate, load_budgets
from .measure import greedy_agreement, latency, package_sizes, peak_rss_bytes


@dataclass
class CheckRun:
    results: list[Result]
    metrics: dict  # every measurement taken, for --json and for people comparing runs

    @property
    def passed(self) -> bool:
        return not any(r.status == "fail" for r in self.results)


def run_check(package: Path, budget_file: Path, baseline_file: Path | None = None,
              save_baseline_file: Path | None = None) -> CheckRun:
    budgets = load_budgets(budget_file)
    manifest = load_manifest(package)
    adapters = sorted(manifest.adapters)
    budgets.check_package(adapters, manifest.task)
    adapter = budgets.latency_adapter(adapters)
    baseline = None
    if baseline_file is not None:
        baseline = load_baseline(baseline_file, budgets.latency_settings, adapter, list(budgets.relative))
    sizes, adapter_bytes = package_sizes(package, manifest)
    timings: dict[str, float] = {}
    agreement: dict[str, tuple[float, str, str]] = {}  # per adapter: value, its dtype, what it was measured on
    wants_latency = budgets.needs_latency or save_baseline_file is not None
    if wants_latency or budgets.min_greedy_agreement is not None:
        model = EdgeModel.open(package)
        if wants_latency:
            timings = latency(model, adapter, budgets.latency_settings)
        if budgets.min_greedy_agreement is not None:
            agreement = {name: (greedy_agreement(model, name), manifest.adapters[name].dtype,
                                manifest.quality[name].probe or "the export's probe batch") for name in adapters}
        if wants_latency:
            timings["peak_rss"] = peak_rss_bytes()
    if save_baseline_file is not None:
        save_baseline(save_baseline_file, timings, budgets.latency_settings, adapter, package)
    results = evaluate(budgets, sizes, adapter_bytes, timings, agreement, baseline)
    metrics = {"size": sizes, "adapter_bytes": adapter_bytes, "latency": timings,
               "latency_adapter": adapter, "greedy_agreement": {n: v for n, (v, *_) in agreement.items()}}
    return CheckRun(results, metrics)

"""The budget file of ``edgelora check``: what a package may cost, parsed strictly, judged against measurements.

Parsing refuses any key it does not know: a misspelt budget that is silently ignored would let
the regression it was written to catch through CI.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path

from edgelora.errors import EdgeLoraError
from edgelora.format.fileio import read_object
from edgelora.units import format_value, parse_size

# metric -> unit; the latency metrics a budget, a relative budget and a baseline may name
LATENCY_METRICS = {
    "prefill_ms": "ms",
    "prefill_p95_ms": "ms",
    "decode_ms_per_token": "ms",
    "decode_p95_ms_per_token": "ms",
    "hot_swap_us": "µs",
    "cold_load_ms": "ms",
    "peak_rss": "bytes",
}
# metrics that need an adapter in the package to be measured at all
ADAPTER_METRICS = ("hot_swap_us", "cold_load_ms")
# metrics only a causal LM has: an encoder's one forward pass is measured as its prefill
DECODE_METRICS = ("decode_ms_per_token", "decode_p95_ms_per_token")


@dataclass(frozen=True)
class LatencySettings:
    runs: int = 5
    warmup: int = 1
    prompt_tokens: int = 32
    decode_tokens: int = 16
    adapter: str | None = None  # None: the package's first adapter by name (the base if it has none)


@dataclass
class Budgets:
    path: Path
    sizes: dict[str, int] = field(default_factory=dict)  # "package" | "base" -> max bytes
    adapter_sizes: dict[str, int] = field(default_factory=dict)  # adapter name glob -> max bytes
    latency: dict[str, float] = field(default_factory=dict)  # metric -> max, in the metric's unit
    relative: dict[str, float] = field(default_factory=dict)  # metric -> max factor over the baseline
    min_greedy_agreement: float | None = None
    latency_settings: LatencySettings = LatencySettings()

    @property
    def needs_latency(self) -> bool:
        return bool(self.latency or self.relative)

    def latency_adapter(self, adapters: list[str]) -> str | None:
        """The adapter the latency runs use; an unknown name is a bad budget, not a failed one."""
        name = self.latency_settings.adapter
        if name is None:
            return min(adapters, default=None)
        if name not in adapters:
            raise EdgeLoraError(f"{self.path}: latency.adapter {name!r} is not in the package "
                                f"(it has: {', '.join(sorted(adapters)) or 'none'})")
        return name

    def check_package(self, adapters: list[str], task: str) -> None:
        """Refuse, before measuring anything, budgets this package cannot be judged by."""
        if task != "causal-lm":
            for section, budgets in (("latency", self.latency), ("relative", self.relative)):
                for metric in DECODE_METRICS:
                    if metric in budgets:
                        raise EdgeLoraError(f"{self.path}: {section}.{metric}: a {task} package decodes nothing; "
                                            "budget prefill_ms, its forward pass over prompt_tokens")
        for pattern in self.adapter_sizes:
            if not fnmatch.filter(adapters, pattern):
                raise EdgeLoraError(f"{self.path}: size.adapters.{pattern!r} matches no adapter in the package "
                                    f"(it has: {', '.join(sorted(adapters)) or 'none'})")
        if not adapters:
            if self.min_greedy_agreement is not None:
                raise EdgeLoraError(f"{self.path}: quality.min_greedy_agreement: the package has no adapter to judge")
            for metric in ADAPTER_METRICS:
                for section, budgets in (("latency", self.latency), ("relative", self.relative)):
                    if metric in budgets:
                        raise EdgeLoraError(f"{self.path}: {section}.{metric}: the package has no adapter to measure")
        self.latency_adapter(adapters)


@dataclass
class Result:
    """One budget judged: a row of the table, a testcase of the JUnit file."""

    name: str
    value: float | None
    limit: float | None
    op: str  # "<=" | ">="
    unit: str  # "bytes", "ms", "µs" or "ratio"
    status: str  # "pass" | "fail" | "skip"
    note: str = ""


def load_budgets(path: str | Path) -> Budgets:
    path = Path(path)
    raw = read_object(path, "budget file not found", "TOML")
    parser = _Parser(path)
    parser.known("", raw, ("size", "latency", "relative", "quality"))
    budgets = Budgets(path)
    size = parser.table("size", raw.get("size", {}))
    parser.known("size", size, ("package", "base", "adapters"))
    budgets.sizes = {k: parser.size(f"size.{k}", size[k]) for k in ("package", "base") if k in size}
    adapters = parser.table("size.adapters", size.get("adapters", {}))
    budgets.adapter_sizes = {k: parser.size(f"size.adapters.{k!r}", v) for k, v in adapters.items()}

    latency = parser.table("latency", raw.get("latency", {}))
    settings = ("runs", "warmup", "prompt_tokens", "decode_tokens", "adapter")
    parser.known("latency", latency, (*settings, *LATENCY_METRICS))
    budgets.latency_settings = LatencySettings(
        runs=parser.integer("latency", latency, "runs", LatencySettings.runs, minimum=1),
        warmup=parser.integer("latency", latency, "warmup", LatencySettings.warmup, minimum=0),
        prompt_tokens=parser.integer("latency", latency, "prompt_tokens", LatencySettings.prompt_tokens, minimum=1),
        decode_tokens=parser.integer("latency", latency, "decode_tokens", LatencySettings.decode_tokens, minimum=2),
        adapter=parser.string("latency.adapter", latency["adapter"]) if "adapter" in latency else None,
    )
    for metric in LATENCY_METRICS:
        if metric in latency:
            key = f"latency.{metric}"
            value = latency[metric]
            budgets.latency[metric] = parser.size(key, value) if metric == "peak_rss" else parser.positive(key, value)

    relative = parser.table("relative", raw.get("relative", {}))
    parser.known("relative", relative, LATENCY_METRICS)
    budgets.relative = {k: parser.positive(f"relative.{k}", v) for k, v in relative.items()}

    quality = parser.table("quality", raw.get("quality", {}))
    parser.known("quality", quality, ("min_greedy_agreement",))
    if "min_greedy_agreement" in quality:
        value = parser.positive("quality.min_greedy_agreement", quality["min_greedy_agreement"])
        if value > 1:
            raise EdgeLoraError(f"{path}: quality.min_greedy_agreement: expected a fraction in (0, 1], got {value}")
        budgets.min_greedy_agreement = value
    if not (budgets.sizes or budgets.adapter_sizes or budgets.needs_latency or budgets.min_greedy_agreement):
        raise EdgeLoraError(f"{path}: defines no budgets; see docs/checks.md")
    return budgets


class _Parser:
    """Type checks whose errors name the file and the dotted key, the way the user wrote it."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, key: str, message: str):
        raise EdgeLoraError(f"{self.path}: {key}: {message}")

    def known(self, section: str, table: dict, keys) -> None:
        for key in table:
            if key not in keys:
                dotted = f"{section}.{key}" if section else key
                self.fail(dotted, f"unknown key (known here: {', '.join(keys)})")

    def table(self, key: str, value) -> dict:
        if not isinstance(value, dict):
            self.fail(key, f"expected a table, got {value!r}")
        return value

    def size(self, key: str, value) -> int:
        try:
            return parse_size(value)
        except ValueError as e:
            self.fail(key, str(e))

    def positive(self, key: str, value) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            self.fail(key, f"expected a positive number, got {value!r}")
        return float(value)

    def integer(self, section: str, table: dict, key: str, default: int, minimum: int) -> int:
        value = table.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            self.fail(f"{section}.{key}", f"expected an integer >= {minimum}, got {value!r}")
        return value

    def string(self, key: str, value) -> str:
        if not isinstance(value, str) or not value:
            self.fail(key, f"expected a non-empty string, got {value!r}")
        return value


def evaluate(budgets: Budgets, sizes: dict[str, int], adapter_bytes: dict[str, int], latency: dict[str, float],
             agreement: dict[str, tuple[float, str, str]], baseline: dict[str, float] | None) -> list[Result]:
    """Every budget of the file as one Result, in the file's order of sections."""
    results = [_at_most(f"size.{k}", sizes[k], limit, "bytes") for k, limit in budgets.sizes.items()]
    for pattern, limit in budgets.adapter_sizes.items():
        for name in sorted(fnmatch.filter(adapter_bytes, pattern)):
            note = "" if pattern == name else f"matches {pattern!r}"
            results.append(_at_most(f"size.adapters.{name}", adapter_bytes[name], limit, "bytes", note))
    settings = budgets.latency_settings
    for metric, limit in budgets.latency.items():
        results.append(_at_most(f"latency.{metric}", latency[metric], limit, LATENCY_METRICS[metric],
                                _latency_note(metric, settings)))
    for metric, factor in budgets.relative.items():
        name = f"relative.{metric}"
        unit = LATENCY_METRICS[metric]
        if baseline is None:
            results.append(Result(name, latency[metric], None, "<=", unit, "skip", "no --baseline given"))
            continue
        results.append(_at_most(name, latency[metric], factor * baseline[metric], unit,
                                f"{factor:g} x baseline {format_value(baseline[metric], unit)}"))
    if budgets.min_greedy_agreement is not None:
        for name, (value, dtype, probe) in sorted(agreement.items()):
            note = f"{dtype} adapter vs fp32 PyTorch, top-1 on {probe}"
            status = "pass" if value >= budgets.min_greedy_agreement else "fail"
            results.append(Result(f"quality.greedy_agreement.{name}", value, budgets.min_greedy_agreement, ">=",
                                  "ratio", status, note))
    return results


def _at_most(name: str, value: float, limit: float, unit: str, note: str = "") -> Result:
    return Result(name, value, limit, "<=", unit, "pass" if value <= limit else "fail", note)


def _latency_note(metric: str, s: LatencySettings) -> str:
    if metric.startswith("prefill"):
        return f"{s.prompt_tokens} prompt tokens, {s.runs} runs"
    if metric.startswith("decode"):
        return f"{s.decode_tokens} new tokens, {s.runs} runs"
    if metric == "peak_rss":
        return "the whole check process"
    return f"median of {s.runs} loads" if metric == "cold_load_ms" else "median switch between resident adapters"

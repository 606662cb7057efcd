"""Saved latency measurements, so CI can budget "no slower than last time" on machines whose absolute speed varies.

A baseline only compares with a run that did the same work: the prompt length, the number of
decoded tokens and the adapter must match, or the ratio would measure the settings, not the code.
"""

from __future__ import annotations

import json
from pathlib import Path

from edgelora import __version__
from edgelora.errors import EdgeLoraError
from edgelora.format.fileio import read_object, write_text_atomic

from .budget import LATENCY_METRICS, LatencySettings

FORMAT = "edgelora-baseline/1"


def _work(settings: LatencySettings, adapter: str | None) -> dict:
    return {"prompt_tokens": settings.prompt_tokens, "decode_tokens": settings.decode_tokens, "adapter": adapter}


def save_baseline(path: str | Path, metrics: dict[str, float], settings: LatencySettings, adapter: str | None,
                  package: Path) -> None:
    data = {"format": FORMAT, "created_by": f"edgelora {__version__}", "package": str(package),
            "work": _work(settings, adapter), "metrics": metrics}
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def load_baseline(path: str | Path, settings: LatencySettings, adapter: str | None,
                  needed: list[str]) -> dict[str, float]:
    """The baseline's metrics; refuses a file measured on other work or lacking a metric a budget needs."""
    path = Path(path)
    data = read_object(path, "baseline file not found (write one with --save-baseline)")
    if data.get("format") != FORMAT or not isinstance(data.get("metrics"), dict):
        raise EdgeLoraError(f"{path}: not an edgelora baseline (expected \"format\": \"{FORMAT}\" and \"metrics\")")
    expected = _work(settings, adapter)
    for key, value in expected.items():
        if data.get("work", {}).get(key) != value:
            raise EdgeLoraError(f"{path}: measured with {key} = {data.get('work', {}).get(key)!r}, this budget uses "
                                f"{value!r}; save a new baseline")
    metrics = data["metrics"]
    for metric in needed:
        value = metrics.get(metric)
        if metric not in LATENCY_METRICS or isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not value > 0:
            raise EdgeLoraError(f"{path}: metrics.{metric}: missing or not a positive number")
    return {k: float(metrics[k]) for k in needed}

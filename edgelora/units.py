"""Byte counts as people write them in budgets ("12 MiB", "500 KB") and as the CLI prints them.

Both decimal (KB = 1000) and binary (KiB = 1024) units are accepted, because CI limits are often
copied from app-store or firmware limits, which use either.
"""

from __future__ import annotations

import re

_UNITS = {
    "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3,
}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]+)\s*$")


def parse_size(text: str | int) -> int:
    """Bytes from "12 MiB", "1.5 GB", "300 B" or a bare integer; ValueError says what is accepted."""
    if isinstance(text, int) and not isinstance(text, bool) and text >= 0:
        return text
    match = _SIZE.match(text) if isinstance(text, str) else None
    if match is None or match.group(2).lower() not in _UNITS:
        raise ValueError(f"expected a size such as \"12 MiB\" or \"500 KB\" (units: B, KB, MB, GB, KiB, MiB, GiB), "
                         f"got {text!r}")
    return round(float(match.group(1)) * _UNITS[match.group(2).lower()])


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def format_value(value: float, unit: str) -> str:
    """A measurement as the check table shows it: bytes in binary units, times to 3 significant digits."""
    if unit == "bytes":
        return human_bytes(value)
    if unit == "ratio":
        return f"{value:.1%}"
    return f"{value:.3g} {unit}"

"""The check's results for people (a table), for scripts (JSON) and for CI dashboards (JUnit XML)."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

from edgelora.format.fileio import write_text_atomic
from edgelora.units import format_value

from .budget import Result


def _limit(r: Result) -> str:
    return "-" if r.limit is None else f"{r.op} {format_value(r.limit, r.unit)}"


def _value(r: Result) -> str:
    return "-" if r.value is None else format_value(r.value, r.unit)


def table(results: list[Result]) -> str:
    rows = [("budget", "value", "limit", "result", "note")]
    rows += [(r.name, _value(r), _limit(r), r.status.upper() if r.status == "fail" else r.status, r.note)
             for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join([row[0].ljust(widths[0]), row[1].rjust(widths[1]), row[2].ljust(widths[2]),
                        row[3].ljust(widths[3]), row[4]]).rstrip() for row in rows]
    return "\n".join(lines) + "\n" + summary(results) + "\n"


def summary(results: list[Result]) -> str:
    counts = {s: sum(r.status == s for r in results) for s in ("pass", "fail", "skip")}
    text = f"{len(results)} budgets: {counts['pass']} passed, {counts['fail']} failed"
    return text + (f", {counts['skip']} skipped" if counts["skip"] else "")


def to_json(results: list[Result], metrics: dict) -> str:
    return json.dumps({
        "passed": not any(r.status == "fail" for r in results),
        "budgets": [{"name": r.name, "value": r.value, "limit": r.limit, "op": r.op, "unit": r.unit,
                     "status": r.status, "note": r.note} for r in results],
        "metrics": metrics,
    }, indent=2, ensure_ascii=False) + "\n"


def write_junit(path: str | Path, results: list[Result], package: str) -> None:
    """One testcase per budget, so a CI dashboard lists each budget and its history on its own."""
    suite = ET.Element("testsuite", name=f"edgelora check {package}", tests=str(len(results)),
                       failures=str(sum(r.status == "fail" for r in results)),
                       skipped=str(sum(r.status == "skip" for r in results)))
    for r in results:
        section, _, rest = r.name.partition(".")
        case = ET.SubElement(suite, "testcase", classname=f"edgelora.check.{section}", name=rest)
        message = f"{_value(r)} (limit {_limit(r)})" + (f"; {r.note}" if r.note else "")
        if r.status == "fail":
            ET.SubElement(case, "failure", message=message, type="BudgetExceeded")
        elif r.status == "skip":
            ET.SubElement(case, "skipped", message=r.note)
        else:
            ET.SubElement(case, "system-out").text = message
    ET.indent(suite)
    write_text_atomic(path, '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(suite, encoding="unicode") + "\n")

"""`make demo` end to end: the package answers differently per adapter and matches PEFT for each."""

from __future__ import annotations


def test_demo_runs_end_to_end(tmp_path, capsys):
    from edgelora.exporters.demo import TENANTS, run_demo

    summary = run_demo(tmp_path / "demo")
    rows = summary["rows"]
    assert set(rows) == {None, *(t.name for t in TENANTS)}
    assert all(r["max_abs_diff"] <= 1e-4 for r in rows.values())
    assert len({r["text"] for r in rows.values()}) == len(rows)
    assert summary["hot_swap_us"] < 1000
    assert "hot swap between adapters" in capsys.readouterr().out

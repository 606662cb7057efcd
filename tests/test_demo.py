"""`make demo`'s quick path end to end: train tenants on the shipped base, export int8, serve them per request."""

from __future__ import annotations


def test_demo_quick_path_trains_exports_and_serves(tmp_path, capsys):
    from edgelora.demo.run import QUICK, run_demo
    from edgelora.demo.tasks import TENANTS

    summary = run_demo(tmp_path / "demo", cache_dir=tmp_path / "cache", quick=True)
    rows = summary["rows"]
    assert list(rows) == list(TENANTS)
    for row in rows.values():
        assert row["base_em"] == 0.0  # the base copies its input, never a tenant's answer
        assert len(row["edge_answers"]) == len(row["peft_answers"]) == QUICK.n_test
        # the int8 package decodes what PEFT decodes on nearly every held-out prompt
        assert sum(a == b for a, b in zip(row["edge_answers"], row["peft_answers"])) >= QUICK.n_test - 2
        assert 0 < row["bytes"] < row["peft_bytes"]
    assert 0 < summary["hot_swap_us"] < 1000
    out = capsys.readouterr().out
    assert "trained in" in out and "swap between resident tenants" in out
    assert all(f"\n{task} " in out for task in TENANTS)



def test_trained_adapters_are_reused_until_their_data_changes(tmp_path):
    from edgelora.demo.run import BASE, QUICK, tenant_adapter
    from edgelora.demo.tasks import tenant_split, write_jsonl

    train, _ = tenant_split("caesar", QUICK.n_train, 0)
    write_jsonl(tmp_path / "train.jsonl", train)
    args = ("caesar", BASE, tmp_path / "train.jsonl", QUICK, tmp_path, tmp_path / "cache")
    first, seconds = tenant_adapter(*args)
    assert seconds is not None and (first / "adapter_model.safetensors").is_file()
    assert tenant_adapter(*args) == (first, None)
    write_jsonl(tmp_path / "train.jsonl", train[1:])
    other, seconds = tenant_adapter(*args)
    assert other != first and seconds is not None

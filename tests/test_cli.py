"""The CLI as a user runs it: export with progress, inspect, generate; bad input is one line and exit 2."""

from __future__ import annotations

from conftest import run_cli


def test_export_inspect_generate(llama, tmp_path):
    out = tmp_path / "pkg"
    code, text, progress = run_cli("export", llama.base_dir, "--adapter", f"a={llama.adapter_dirs['plain']}",
                                   "--out", out)
    assert code == 0, progress
    assert "[3/6] exporting the llama graph with 4 LoRA slots" in progress and f"wrote {out}" in text
    code, text, _ = run_cli("inspect", out)
    assert code == 0 and "LlamaForCausalLM" in text and "slots       4 (2 slot groups): q_proj, v_proj" in text
    assert "a                   4 fp32" in text
    code, text, _ = run_cli("generate", out, "--adapter", "a", "--prompt", "Hello", "--max-new-tokens", "5")
    assert code == 0 and len(text.strip("\n")) > 0
    code, _, text = run_cli("export", llama.base_dir, "--out", out)
    assert code == 2 and "already exists (pass --overwrite" in text


def test_bad_inputs_are_one_line_with_exit_2(llama, tmp_path):
    cases = [
        (["export", tmp_path / "nothing", "--out", tmp_path / "o"], "config.json: missing"),
        (["export", llama.base_dir, "--adapter", "noequals", "--out", tmp_path / "o"], "expected NAME=PEFT_DIR"),
        (["export", llama.base_dir, "--adapter", f"x={tmp_path}", "--out", tmp_path / "o"], "adapter_config.json: missing"),
        (["inspect", tmp_path], "edgelora.json: missing"),
        (["generate", llama.package, "--adapter", "zzz", "--prompt", "x"], "unknown adapter 'zzz'"),
        (["generate", llama.package, "--prompt", "x", "--max-new-tokens", "-3"],
         "max_new_tokens must be a whole number >= 1, got -3"),
        (["generate", llama.package, "--prompt", "x", "--temperature", "-2"], "temperature must be a number >= 0"),
        (["generate", llama.package, "--prompt", "x" * 3000], "is past the model's context of 512 positions"),
    ]
    for args, message in cases:
        code, _, text = run_cli(*args)
        assert code == 2, (args, text)
        lines = text.splitlines()  # a progress line may precede it: "[1/5] reading ... failed"
        assert lines[-1].startswith("edgelora: error: ") and message in lines[-1], text
        assert text.count("edgelora: error:") == 1 and "Traceback" not in text
    assert not (tmp_path / "o").exists()


def test_generate_truncates_a_long_prompt_when_asked_and_says_so(llama):
    code, text, err = run_cli("generate", llama.package, "--prompt", "x" * 3000, "--max-new-tokens", "4", "--truncate")
    assert code == 0, err
    assert "note: the prompt's first 2493 tokens were dropped to fit the model's context" in err


def test_bench_measures_each_adapter_against_the_base(llama):
    import json

    code, text, err = run_cli("bench", llama.package, "--adapter", "plain", "--adapter", "rs:0.5", "--runs", "2",
                              "--decode-tokens", "4", "--json")
    assert code == 0, err
    got = json.loads(text)
    assert list(got["targets"]) == ["(base)", "plain", "rs:0.5"]
    assert all(t["decode_ms_per_token"] > 0 and t["prefill_ms"] > 0 for t in got["targets"].values())
    assert got["hot_swap_us"] > 0 and got["cold_load_ms"] > 0 and got["peak_rss"] > 0
    code, text, _ = run_cli("bench", llama.package, "--runs", "1", "--decode-tokens", "2")
    assert code == 0 and [line.split()[0] for line in text.splitlines()[1:5]] == ["(base)", "patterns", "plain", "rs"]
    assert "vs base" in text and "hot swap" in text
    code, _, err = run_cli("bench", llama.package, "--adapter", "nope", "--runs", "1")
    assert code == 2 and "unknown adapter 'nope'" in err


def test_merged_export_prints_progress_and_nothing_else(llama, tmp_path):
    """The merged path loads PEFT, which leaves logging configured: the graph passes must stay quiet anyway."""
    code, out, err = run_cli("export", llama.base_dir, "--adapter", f"a={llama.adapter_dirs['plain']}", "--out",
                             tmp_path / "pkg", "--mode", "merged", "--quantize", "int4")
    assert code == 0, err
    noise = [line for line in (out + err).splitlines()
             if not line.startswith(("[", "  ", "wrote "))]
    assert noise == [], noise[:5]

"""``edgelora check``: every budget kind passes with room and fails when tight; reports and errors as CI reads them."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET

import numpy as np
from conftest import run_cli

from edgelora.format.factors import AdapterFactors, ModuleFactors

# few, short runs: these tests judge the check's logic, not the machine
FAST = "runs = 2\nwarmup = 1\nprompt_tokens = 8\ndecode_tokens = 4\n"
LATENCY_METRICS = ("prefill_ms", "prefill_p95_ms", "decode_ms_per_token", "decode_p95_ms_per_token", "hot_swap_us",
                   "cold_load_ms")


def check(package, tmp_path, budget: str, *extra):
    """(exit code, parsed --json output or None, stderr) of one check against a budget text."""
    path = tmp_path / "budget.toml"
    path.write_text(budget)
    code, out, err = run_cli("check", package, "--budget", path, "--json", *extra)
    return code, (json.loads(out) if code in (0, 1) else None), err


def statuses(report) -> dict[str, str]:
    return {b["name"]: b["status"] for b in report["budgets"]}


def test_size_budgets(llama, tmp_path):
    budget = '[size]\npackage = "{0}"\nbase = "{0}"\n[size.adapters]\n"p*" = "{0}"\nrs = "{0}"\n'
    code, report, _ = check(llama.package, tmp_path, budget.format("1 GiB"))
    assert code == 0 and report["passed"]
    names = ["size.package", "size.base", "size.adapters.patterns", "size.adapters.plain", "size.adapters.rs"]
    assert statuses(report) == dict.fromkeys(names, "pass")
    sizes = report["metrics"]["size"]
    assert 0 < sizes["base"] < sizes["package"]
    assert report["metrics"]["adapter_bytes"]["plain"] == (llama.package / "adapters/plain.onnx_adapter").stat().st_size
    code, report, _ = check(llama.package, tmp_path, budget.format("100 B"))
    assert code == 1 and not report["passed"]
    assert statuses(report) == dict.fromkeys(names, "fail")


def test_adapter_budget_between_its_size_and_the_next(llama, tmp_path):
    plain = (llama.package / "adapters/plain.onnx_adapter").stat().st_size
    code, report, _ = check(llama.package, tmp_path, f'[size.adapters]\n"*" = {plain}\n')
    assert code == 1
    assert statuses(report) == {"size.adapters.plain": "pass", "size.adapters.patterns": "fail",
                                "size.adapters.rs": "fail"}


def test_latency_budgets(llama, tmp_path):
    roomy = FAST + "".join(f"{m} = 1e9\n" for m in LATENCY_METRICS) + 'peak_rss = "100 GiB"\n'
    code, report, _ = check(llama.package, tmp_path, "[latency]\n" + roomy)
    assert code == 0, report
    assert statuses(report) == {f"latency.{m}": "pass" for m in (*LATENCY_METRICS, "peak_rss")}
    measured = report["metrics"]["latency"]
    assert report["metrics"]["latency_adapter"] == "patterns"  # the first by name
    assert 0 < measured["prefill_ms"] <= measured["prefill_p95_ms"]
    assert 0 < measured["decode_ms_per_token"] <= measured["decode_p95_ms_per_token"]
    assert measured["hot_swap_us"] > 0 and measured["cold_load_ms"] > 0 and measured["peak_rss"] > 10 * 2**20

    tight = FAST + 'adapter = "rs"\n' + "".join(f"{m} = 1e-6\n" for m in LATENCY_METRICS) + 'peak_rss = "1 KB"\n'
    code, report, _ = check(llama.package, tmp_path, "[latency]\n" + tight)
    assert code == 1
    assert statuses(report) == {f"latency.{m}": "fail" for m in (*LATENCY_METRICS, "peak_rss")}
    assert report["metrics"]["latency_adapter"] == "rs"


def test_quality_budget_reads_the_exports_measured_agreement(llama, fresh_package, tmp_path):
    code, report, _ = check(llama.package, tmp_path, "[quality]\nmin_greedy_agreement = 1.0\n")
    assert code == 0
    rows = {b["name"]: b for b in report["budgets"]}
    assert set(rows) == {f"quality.greedy_agreement.{n}" for n in ("patterns", "plain", "rs")}
    assert all(r["value"] == 1.0 for r in rows.values())
    assert all(r["note"] == "fp32 adapter vs fp32 PyTorch, top-1 on random ids, 4x32 tokens" for r in rows.values())

    manifest = json.loads((fresh_package / "edgelora.json").read_text())
    manifest["quality"]["rs"]["top1_agreement"] = 0.9  # as an int4 export of a fragile adapter may report
    (fresh_package / "edgelora.json").write_text(json.dumps(manifest))
    code, report, _ = check(fresh_package, tmp_path, "[quality]\nmin_greedy_agreement = 0.99\n")
    assert code == 1
    assert statuses(report)["quality.greedy_agreement.rs"] == "fail"
    assert statuses(report)["quality.greedy_agreement.plain"] == "pass"

    del manifest["quality"]["rs"]
    (fresh_package / "edgelora.json").write_text(json.dumps(manifest))
    code, _, err = check(fresh_package, tmp_path, "[quality]\nmin_greedy_agreement = 0.99\n")
    assert code == 2 and "adapter rs has no quality report in the manifest" in err


def test_junit_has_one_testcase_per_budget_with_failures_marked(llama, tmp_path):
    junit = tmp_path / "check.xml"
    budget = (f'[size]\npackage = "1 GiB"\nbase = "1 KB"\n'
              f"[latency]\n{FAST}decode_ms_per_token = 1e9\nprefill_ms = 1e-6\n")
    code, report, _ = check(llama.package, tmp_path, budget, "--junit", junit)
    assert code == 1
    suite = ET.parse(junit).getroot()
    cases = suite.findall("testcase")
    assert len(cases) == len(report["budgets"]) == 4 == int(suite.get("tests"))
    failed = {f"{c.get('classname')}.{c.get('name')}" for c in cases if c.find("failure") is not None}
    assert failed == {"edgelora.check.size.base", "edgelora.check.latency.prefill_ms"}
    assert suite.get("failures") == "2"


def test_table_output(llama, tmp_path):
    (tmp_path / "b.toml").write_text('[size]\npackage = "1 GiB"\nbase = "1 KB"\n')
    code, out, _ = run_cli("check", llama.package, "--budget", tmp_path / "b.toml")
    assert code == 1
    lines = out.splitlines()
    assert lines[0].split() == ["budget", "value", "limit", "result", "note"]
    assert lines[1].startswith("size.package") and lines[1].split()[-1] == "pass" and "<= 1.0 GiB" in lines[1]
    assert lines[2].startswith("size.base") and lines[2].split()[-1] == "FAIL" and "<= 1000 B" in lines[2]
    assert lines[-1] == "2 budgets: 1 passed, 1 failed"


def test_relative_budget_against_a_saved_baseline(llama, tmp_path):
    baseline = tmp_path / "baseline.json"
    budget = f"[latency]\n{FAST}[relative]\ndecode_ms_per_token = 1000.0\nprefill_ms = 1000.0\n"
    code, report, err = check(llama.package, tmp_path, budget, "--save-baseline", baseline)
    assert code == 0 and f"saved baseline to {baseline}" in err
    assert set(statuses(report).values()) == {"skip"}  # no --baseline yet
    code, report, _ = check(llama.package, tmp_path, budget, "--baseline", baseline)
    assert code == 0 and set(statuses(report).values()) == {"pass"}

    data = json.loads(baseline.read_text())
    data["metrics"] = {k: v / 1e6 for k, v in data["metrics"].items()}  # a baseline a million times faster
    baseline.write_text(json.dumps(data))
    code, report, _ = check(llama.package, tmp_path, budget, "--baseline", baseline)
    assert code == 1 and set(statuses(report).values()) == {"fail"}

    code, _, err = check(llama.package, tmp_path, budget.replace("prompt_tokens = 8", "prompt_tokens = 9"),
                         "--baseline", baseline)
    assert code == 2 and "measured with prompt_tokens = 8, this budget uses 9" in err


def test_bad_budget_files_are_one_line_naming_the_key(llama, tmp_path):
    cases = [
        ("[latency]\ndecode_ms_pertoken = 5.0\n", "latency.decode_ms_pertoken: unknown key"),
        ("[sizes]\npackage = 1\n", "sizes: unknown key"),
        ('[size]\npackage = "12 MiBs"\n', "size.package: expected a size"),
        ("[latency]\nruns = 0\n", "latency.runs: expected an integer >= 1"),
        ("[latency]\ndecode_ms_per_token = \"fast\"\n", "latency.decode_ms_per_token: expected a positive number"),
        ("[relative]\nhot_swap = 1.1\n", "relative.hot_swap: unknown key"),
        ("[quality]\nmin_greedy_agreement = 1.5\n", "quality.min_greedy_agreement: expected a fraction"),
        ("[size\n", "not valid TOML"),
        ("[latency]\nruns = 3\n", "defines no budgets"),
        ('[size.adapters]\n"legal*" = "1 MiB"\n', "size.adapters.'legal*' matches no adapter"),
        ('[latency]\nadapter = "nope"\nprefill_ms = 1.0\n', "latency.adapter 'nope' is not in the package"),
    ]
    for budget, message in cases:
        code, _, err = check(llama.package, tmp_path, budget)
        assert code == 2, (budget, err)
        assert err.count("\n") == 1 and err.startswith(f"edgelora: error: {tmp_path / 'budget.toml'}: "), err
        assert message in err, (message, err)
    code, _, err = run_cli("check", llama.package, "--budget", tmp_path / "missing.toml")
    assert code == 2 and "missing.toml: budget file not found" in err


def test_the_check_loads_no_torch():
    code = "import sys, edgelora.checks.run, edgelora.checks.report; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_peak_rss_is_the_process_own_not_its_parents():
    """A check started by a large parent (a test runner holding torch) must not report the parent's peak."""
    child = "from edgelora.checks.measure import peak_rss_bytes; print(peak_rss_bytes())"
    parent = ("import subprocess, sys, numpy as np; held = np.ones(2**30, np.uint8); "
              f"print(subprocess.run([sys.executable, '-c', {child!r}], capture_output=True, text=True, "
              "check=True).stdout)")
    reported = int(subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, check=True).stdout)
    assert 0 < reported < 2**29


def test_adapter_parameters_read_back_equal(tmp_path):
    """read_parameters once returned views into freed onnxruntime memory: garbage values, right shapes."""
    from edgelora.format.adapter_file import read_adapter, write_adapter

    rng = np.random.default_rng(0)
    factors = AdapterFactors({"m.q": ModuleFactors(rng.standard_normal((16, 4), np.float32),
                                                   rng.standard_normal((4, 8), np.float32))}, rank=4, alpha=8.0)
    write_adapter(tmp_path / "x.onnx_adapter", factors)
    back = read_adapter(tmp_path / "x.onnx_adapter")[0].modules["m.q"]
    np.testing.assert_array_equal(back.a, factors.modules["m.q"].a)
    np.testing.assert_array_equal(back.b, factors.modules["m.q"].b)


def test_a_slot_group_blob_reads_back_per_module(tmp_path):
    """A group puts its modules' factors side by side (ranks padded to the largest, output columns in tiles);
    reading back gives each module its own factors, quantized exactly as alone, and a module the adapter lacks
    stays absent."""
    import pytest

    from edgelora.errors import EdgeLoraError
    from edgelora.format.adapter_file import read_adapter, read_parameters, write_adapter
    from edgelora.format.manifest import SlotGroup
    from edgelora.format.slot_groups import factor_names, group_name

    name = group_name(["m.q", "m.k", "m.v"])
    assert name == "m.q+k+v"
    groups = [SlotGroup(*factor_names(name), modules=["m.q", "m.k", "m.v"], offsets=[0, 8, 12], widths=[8, 4, 4],
                        width=16)]
    rng = np.random.default_rng(0)

    def pair(k, r, n):
        return ModuleFactors(rng.standard_normal((k, r), np.float32), rng.standard_normal((r, n), np.float32))

    factors = AdapterFactors({"m.q": pair(16, 4, 8), "m.k": pair(16, 2, 4), "m.o": pair(16, 4, 16)}, rank=4, alpha=8)
    for dtype in ("fp32", "int8"):
        grouped, alone = tmp_path / f"g-{dtype}.onnx_adapter", tmp_path / f"m-{dtype}.onnx_adapter"
        write_adapter(grouped, factors, dtype, groups=groups)
        write_adapter(alone, factors, dtype)
        shapes = {k: v.shape for k, v in read_parameters(grouped).items()}
        int8 = dtype == "int8"
        # b in tiles of 4 columns (q: two, k: one, v: one, all zero); int8 scales per column of a only
        assert shapes == {"m.q+k+v.lora_A" + ".int8" * int8: (16, 12), "m.q+k+v.lora_B" + ".int8" * int8: (4, 4, 4),
                          "m.o.lora_A" + ".int8" * int8: (16, 4), "m.o.lora_B" + ".int8" * int8: (4, 16),
                          **({"m.q+k+v.lora_A.scale": (12,), "m.o.lora_A.scale": (4,)} if int8 else {})}
        back, want = read_adapter(grouped, groups)[0], read_adapter(alone)[0]
        assert set(back.modules) == {"m.q", "m.k", "m.o"}
        for module in back.modules:
            np.testing.assert_array_equal(back.modules[module].a, want.modules[module].a)
            np.testing.assert_array_equal(back.modules[module].b, want.modules[module].b)
    with pytest.raises(EdgeLoraError, match=r"m\.q\+k\+v\.lora_A is the factor of a slot group; read the blob"):
        read_adapter(grouped)
    with pytest.raises(EdgeLoraError, match=r"holds m\.k alone, but the graph computes it in slot group m\.q\+k\+v"):
        read_adapter(alone, groups)

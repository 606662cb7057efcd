"""Adding adapters to an existing package: fast, checked against the slots, usable at once."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import IDS, TOL, make_adapter, run_cli


def test_added_adapter_matches_peft(llama, fresh_package, tmp_path):
    from edgelora.runtime import EdgeModel

    peft_model = make_adapter(llama.base, tmp_path / "extra", "patterns", seed=7)
    code, out, err = run_cli("add-adapter", fresh_package, f"extra={tmp_path / 'extra'}")
    assert code == 0, err
    assert "added extra" in out
    manifest = json.loads((fresh_package / "edgelora.json").read_text())
    assert manifest["adapters"]["extra"]["file"] == "adapters/extra.onnx_adapter"
    import torch

    with torch.no_grad():
        want = peft_model(torch.as_tensor(IDS)).logits.numpy()
    got = EdgeModel.open(fresh_package).logits(IDS, adapter="extra")
    assert np.abs(got - want).max() <= TOL


def test_adapter_without_a_slot_is_refused(llama, fresh_package, tmp_path):
    """Every projection of the test package has a slot; the LM head has none."""
    from edgelora.demo.tiny_models import random_peft_adapter

    random_peft_adapter(llama.base, tmp_path / "b", seed=2, targets=("lm_head",))
    code, _, out = run_cli("add-adapter", fresh_package, f"b={tmp_path / 'b'}")
    assert code == 2
    assert out.count("\n") == 1 and "lm_head has no LoRA slot" in out
    assert "b" not in json.loads((fresh_package / "edgelora.json").read_text())["adapters"]


def test_adapter_for_another_base_is_refused(fresh_package, tmp_path):
    from edgelora.demo.tiny_models import build_causal_lm, random_peft_adapter

    other = build_causal_lm(tmp_path / "other", family="llama", size="small", seed=3, with_tokenizer=False)
    random_peft_adapter(other, tmp_path / "o", seed=4)
    code, _, out = run_cli("add-adapter", fresh_package, f"o={tmp_path / 'o'}")
    assert code == 2
    assert out.count("\n") == 1
    assert "maps 128->128 but the package's slot maps 32->32" in out
    assert not (fresh_package / "adapters/o.onnx_adapter").exists()


def test_bad_names_and_duplicates_are_refused(llama, fresh_package):
    for bad in ("../evil", "a/b", ".hidden", "x\0y"):
        code, _, out = run_cli("add-adapter", fresh_package, f"{bad}={llama.adapter_dirs['plain']}")
        assert code == 2 and "is not allowed" in out, bad
    code, _, out = run_cli("add-adapter", fresh_package, f"plain={llama.adapter_dirs['plain']}")
    assert code == 2 and "already exists" in out


def test_simultaneous_add_adapter_runs_keep_every_adapter(llama, fresh_package, tmp_path):
    """Each run swaps in a whole new copy of the package; without a lock the last swap would drop the others."""
    from concurrent.futures import ThreadPoolExecutor

    from edgelora.exporters.add_adapter import add_adapter
    from edgelora.format.manifest import load_manifest

    names = [f"t{i}" for i in range(4)]
    for i, name in enumerate(names):
        make_adapter(llama.base, tmp_path / name, "plain", seed=20 + i)
    with ThreadPoolExecutor(len(names)) as pool:
        list(pool.map(lambda n: add_adapter(fresh_package, n, tmp_path / n), names))
    assert set(names) <= set(load_manifest(fresh_package).adapters)
    assert all((fresh_package / "adapters" / f"{n}.onnx_adapter").is_file() for n in names)


def test_added_adapter_gets_a_quality_report_that_check_reads(llama, fresh_package, tmp_path):
    """The base folder recorded at export is still there (and unchanged), so add-adapter measures against it."""
    from edgelora.format.manifest import load_manifest

    make_adapter(llama.base, tmp_path / "extra", "plain", seed=8)
    code, _, err = run_cli("add-adapter", fresh_package, f"extra={tmp_path / 'extra'}")
    assert code == 0 and "extra: delta rel. error 0.00e+00, top-1 agreement 100.0% on random ids" in err
    quality = load_manifest(fresh_package).quality
    assert quality["extra"].top1_agreement == 1.0 and quality["extra"].dtype == "fp32"
    budget = tmp_path / "quality.toml"
    budget.write_text("[quality]\nmin_greedy_agreement = 0.99\n")
    code, out, _ = run_cli("check", fresh_package, "--budget", budget)
    assert code == 0 and "quality.greedy_agreement.extra" in out

    probe = tmp_path / "probe.jsonl"
    probe.write_text('{"prompt": "ab", "completion": "cd"}\n{"prompt": "e", "completion": "fgh"}\n')
    code, _, err = run_cli("add-adapter", fresh_package, f"extra={tmp_path / 'extra'}", "--overwrite",
                           "--base", llama.base_dir, "--probe-data", probe)
    assert code == 0, err
    assert load_manifest(fresh_package).quality["extra"].probe == "probe.jsonl, 7 completion tokens of 2 examples"


@pytest.mark.parametrize("base", ["moved", "broken"])
def test_without_its_base_add_adapter_records_the_delta_error_and_check_says_why(llama, fresh_package, tmp_path,
                                                                                 base):
    import shutil

    from edgelora.demo.tiny_models import build_causal_lm
    from edgelora.format.manifest import load_manifest

    if base == "broken":
        shutil.copytree(llama.base_dir, tmp_path / base)
        (tmp_path / base / "model.safetensors").write_bytes(b"not weights")
    manifest = json.loads((fresh_package / "edgelora.json").read_text())
    manifest["base_source"] = str(tmp_path / base)
    (fresh_package / "edgelora.json").write_text(json.dumps(manifest))
    make_adapter(llama.base, tmp_path / "extra", "plain", seed=8)
    code, _, err = run_cli("add-adapter", fresh_package, f"extra={tmp_path / 'extra'}")
    assert code == 0
    assert "agreement not measured: " + {
        "moved": f"the base it was exported from ({tmp_path / base}) is not there; pass --base",
        "broken": f"{tmp_path / base}: cannot load the model weights",
    }[base] in err
    quality = load_manifest(fresh_package).quality["extra"]
    assert quality.delta_rel_error == 0.0 and quality.top1_agreement is None
    budget = tmp_path / "quality.toml"
    budget.write_text("[quality]\nmin_greedy_agreement = 0.99\n")
    code, _, err = run_cli("check", fresh_package, "--budget", budget)
    assert code == 2 and "adapter extra was added without its fp32 base" in err and "--base BASE_DIR" in err

    code, _, err = run_cli("add-adapter", fresh_package, f"again={tmp_path / 'extra'}", "--probe-data", budget)
    assert code == 2 and "--probe-data needs the fp32 base model" in err
    build_causal_lm(tmp_path / "other", family="llama", size="tiny", seed=3)
    code, _, err = run_cli("add-adapter", fresh_package, f"again={tmp_path / 'extra'}", "--base", tmp_path / "other")
    assert code == 2 and f"{tmp_path / 'other'}: not the base {fresh_package} was exported from" in err
    assert "again" not in load_manifest(fresh_package).adapters

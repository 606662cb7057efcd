"""PEFT folder → factors: scaling rules, dtypes, legacy files, and what is refused."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from edgelora.errors import EdgeLoraError
from edgelora.exporters.peft_ingest import ingest_peft, read_weights


def peft_delta(peft_model, module: str) -> np.ndarray:
    """PEFT's own delta for a module, transposed to [in, out] like our factors."""
    layer = peft_model.base_model.model.get_submodule(module)
    return layer.get_delta_weight("default").detach().numpy().T


@pytest.mark.parametrize("name", ["plain", "rs", "patterns"])
def test_factors_equal_peft_delta_weight(llama, name):
    factors = ingest_peft(llama.adapter_dirs[name])
    peft_model = llama.peft(name)
    assert factors.modules
    for module in factors.modules:
        np.testing.assert_allclose(factors.delta(module), peft_delta(peft_model, module), atol=1e-6)


def test_rank_and_alpha_patterns_resolved_per_module(llama):
    factors = ingest_peft(llama.adapter_dirs["patterns"])
    assert factors.modules["model.layers.1.self_attn.k_proj"].rank == 2
    assert factors.modules["model.layers.0.self_attn.k_proj"].rank == 4
    assert factors.modules["model.layers.1.mlp.down_proj"].rank == 6
    raw = read_weights(llama.adapter_dirs["patterns"])
    b = raw["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"]
    np.testing.assert_allclose(factors.modules["model.layers.0.self_attn.v_proj"].b, (b * 3.0 / 4).T, rtol=1e-6)


def test_rslora_scale_is_alpha_over_sqrt_r(llama):
    factors = ingest_peft(llama.adapter_dirs["rs"])
    raw = read_weights(llama.adapter_dirs["rs"])
    b = raw["base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"]
    np.testing.assert_allclose(factors.modules["model.layers.0.mlp.up_proj"].b, (b * 4 / math.sqrt(8)).T, rtol=1e-6)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_adapters_are_accepted(llama, tmp_path, dtype):
    import torch
    from safetensors.torch import load_file, save_file

    src = llama.adapter_dirs["plain"]
    shutil.copytree(src, tmp_path / "a")
    tensors = load_file(str(src / "adapter_model.safetensors"))
    save_file({k: v.to(getattr(torch, dtype)) for k, v in tensors.items()}, str(tmp_path / "a/adapter_model.safetensors"))
    half, full = ingest_peft(tmp_path / "a"), ingest_peft(src)
    for module in full.modules:
        np.testing.assert_allclose(half.delta(module), full.delta(module), rtol=0.05, atol=2e-3)


def test_legacy_bin_with_adapter_name_in_keys(llama, tmp_path):
    import torch
    from safetensors.torch import load_file

    src = llama.adapter_dirs["plain"]
    (tmp_path / "a").mkdir()
    shutil.copy(src / "adapter_config.json", tmp_path / "a")
    tensors = load_file(str(src / "adapter_model.safetensors"))
    legacy = {k.replace(".weight", ".default.weight"): v for k, v in tensors.items()}
    torch.save(legacy, tmp_path / "a/adapter_model.bin")
    got, want = ingest_peft(tmp_path / "a"), ingest_peft(src)
    assert set(got.modules) == set(want.modules)
    for module in want.modules:
        np.testing.assert_array_equal(got.modules[module].b, want.modules[module].b)


def edit_config(src, dst, **changes):
    shutil.copytree(src, dst)
    config = json.loads((dst / "adapter_config.json").read_text())
    config.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("changes, message", [
    ({"peft_type": "IA3"}, "peft_type 'IA3' is not supported"),
    ({"use_dora": True}, r"DoRA is not a low-rank delta \(use_dora in adapter_config.json\).* --mode merged"),
    ({"trainable_token_indices": [1, 2]}, "trainable_token_indices is not supported yet"),
    ({"r": 0}, "r must be a positive number"),
    ({"r": 3}, "has rank 4 in the weights but 3 in the config"),
])
def test_unsupported_configs_give_one_line_errors(llama, tmp_path, changes, message):
    folder = edit_config(llama.adapter_dirs["plain"], tmp_path / "a", **changes)
    with pytest.raises(EdgeLoraError, match=message) as e:
        ingest_peft(folder)
    assert "\n" not in str(e.value) and str(folder) in str(e.value)


def test_nan_weights_are_refused(llama, tmp_path):
    from safetensors.torch import load_file, save_file

    shutil.copytree(llama.adapter_dirs["plain"], tmp_path / "a")
    path = tmp_path / "a/adapter_model.safetensors"
    tensors = load_file(str(path))
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(path))
    with pytest.raises(EdgeLoraError, match="NaN or Inf"):
        ingest_peft(tmp_path / "a")


@pytest.mark.parametrize("damage, message", [
    ("no_config", "adapter_config.json: missing"),
    ("no_weights", "no adapter_model.safetensors or adapter_model.bin found"),
    ("truncated", "cannot read the adapter weights"),
    ("bad_json", "not valid JSON"),
])
def test_damaged_folders_are_refused(llama, tmp_path, damage, message):
    folder = tmp_path / "a"
    shutil.copytree(llama.adapter_dirs["plain"], folder)
    weights = folder / "adapter_model.safetensors"
    if damage == "no_config":
        (folder / "adapter_config.json").unlink()
    elif damage == "no_weights":
        weights.unlink()
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:100])
    else:
        (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(EdgeLoraError, match=message):
        ingest_peft(folder)

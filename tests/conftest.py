"""Tiny models from configs, PEFT adapters on them, packages exported once per test session, and the helpers
several test modules share (tests import them from here, never from each other)."""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

IDS = np.array([[1, 40, 8, 15, 15, 18, 98, 26], [1, 5, 6, 7, 8, 9, 10, 11]], dtype=np.int64)
TOL = 1e-4


def plain_session(package):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(package / "model.onnx"), options, providers=["CPUExecutionProvider"])


def plain_feeds(session, ids, past_len=0, past=None):
    """Feeds built from the graph alone: what a user without edgelora would write."""
    batch, seq = ids.shape
    feeds = {
        "input_ids": ids,
        "attention_mask": np.ones((batch, past_len + seq), np.int64),
        "position_ids": np.arange(past_len, past_len + seq, dtype=np.int64)[None].repeat(batch, 0),
    }
    for inp in session.get_inputs():
        if inp.name.startswith("past_key_values."):
            shape = [batch, inp.shape[1], 0, inp.shape[3]]
            feeds[inp.name] = past[inp.name] if past else np.zeros(shape, np.float32)
    return feeds


def run_cli(*args):
    """(exit code, stdout, stderr) of one CLI call."""
    from edgelora.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Module names per family: a pair of projections, every linear layer, a regex string over layer 1 and
# the token embedding. Phi-3's pair is its fused qkv_proj / gate_up_proj, GPT-2's its Conv1D layers.
_LLAMA_NAMES = dict(pair=("q_proj", "v_proj"), linear=ALL_LINEAR,
                    regex=r".*\.layers\.1\.(self_attn\.k_proj|mlp\.up_proj)", embedding="embed_tokens")
TARGETS = {
    **{f: _LLAMA_NAMES for f in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")},
    "phi3": dict(pair=("qkv_proj", "gate_up_proj"), linear=("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
                 regex=r".*\.layers\.1\.(self_attn\.o_proj|mlp\.gate_up_proj)", embedding="embed_tokens"),
    "gpt2": dict(pair=("c_attn", "c_fc"), linear=("c_attn", "c_proj", "c_fc"),
                 regex=r".*\.h\.1\.(attn\.c_proj|mlp\.c_fc)", embedding="wte"),
}

# name -> LoRA settings, targets named by their key in TARGETS (or given as is);
# "patterns" exercises rank_pattern/alpha_pattern, "rs" rsLoRA on every linear layer
ADAPTERS = {
    "plain": dict(r=4, alpha=8, targets="pair"),
    "rs": dict(r=8, alpha=4, targets="linear", use_rslora=True),
    "patterns": dict(
        r=4, alpha=8, targets=("q_proj", "k_proj", "v_proj", "down_proj"),
        rank_pattern={"layers.1.self_attn.k_proj": 2, "down_proj": 6},
        alpha_pattern={"v_proj": 3.0, "model.layers.0.mlp.down_proj": 24.0},
    ),
    "all-linear": dict(r=2, alpha=6, targets="all-linear"),
    "regex": dict(r=4, alpha=4, targets="regex"),
    "layers": dict(r=2, alpha=4, targets="linear", layers_to_transform=[1]),
    "embedding": dict(r=4, alpha=8, targets="embedding+pair"),
    # merge-only variants (tensors that are no low-rank delta), exported in merged mode
    "dora": dict(r=4, alpha=8, targets="embedding+linear", use_dora=True),
    "extras": dict(r=4, alpha=8, targets="pair", modules_to_save=["lm_head"], bias="lora_only",
                   lora_bias=True),
    # one merge-only feature each, for the errors of separate mode
    "saved": dict(r=4, alpha=8, targets="pair", modules_to_save=["lm_head"]),
    "bias": dict(r=4, alpha=8, targets="pair", bias="all"),
    "lora-bias": dict(r=4, alpha=8, targets="pair", lora_bias=True),
}
_EVERY_FAMILY = ["plain", "rs", "all-linear", "regex", "layers", "embedding"]
FAMILY_ADAPTERS = {
    "llama": [*_EVERY_FAMILY, "patterns", "legacy"],
    **{f: _EVERY_FAMILY for f in ("mistral", "qwen2", "qwen3", "phi3", "gpt2", "gemma", "gemma2")},
}
# Qwen2 has biases on q/k/v, so bias="lora_only" saves real tensors there.
MERGED_ADAPTERS = {"qwen2": ["dora", "extras"]}


@dataclass
class Built:
    family: str
    base_dir: Path
    base: object  # the torch model
    adapter_dirs: dict[str, Path]
    package: Path
    _logits: dict = field(default_factory=dict, repr=False)

    def peft(self, name: str):
        """PEFT's own PyTorch model for a saved adapter: the reference every parity test compares against."""
        from peft import PeftModel

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return PeftModel.from_pretrained(copy.deepcopy(self.base), str(self.adapter_dirs[name])).eval()

    def reference_logits(self, name: str | None, ids) -> np.ndarray:
        """Remembered per adapter and input: several parity tests ask for the same reference."""
        import torch

        ids = np.asarray(ids, dtype=np.int64)
        key = (name, ids.shape, ids.tobytes())
        if key not in self._logits:
            model = self.base if name is None else self.peft(name)
            with torch.no_grad():
                self._logits[key] = model(torch.as_tensor(ids)).logits.numpy()
        return self._logits[key].copy()


def targets_of(family: str, spec):
    """PEFT's target_modules for a spec: a tuple or "all-linear" as is, else keys of TARGETS joined by "+"."""
    if isinstance(spec, tuple) or spec == "all-linear":
        return spec
    names = TARGETS[family]
    parts = [names[key] for key in spec.split("+")]
    return parts[0] if len(parts) == 1 else tuple(n for p in parts for n in ((p,) if isinstance(p, str) else p))


def make_adapter(base, out_dir: Path, name: str, seed: int, family: str = "llama"):
    """A saved PEFT adapter, and PEFT's model as loaded from it. Tensors that are no LoRA factor (saved
    copies of base weights, DoRA magnitudes, biases) are perturbed: at their initial values they change nothing."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file, save_file

    from edgelora.demo.tiny_models import random_peft_adapter

    spec = dict(ADAPTERS["plain" if name == "legacy" else name])
    peft_model = random_peft_adapter(base, out_dir, seed=seed, r=spec.pop("r"), alpha=spec.pop("alpha"),
                                     targets=targets_of(family, spec.pop("targets")), **spec)
    path = out_dir / "adapter_model.safetensors"
    tensors = load_file(str(path))
    others = [k for k in tensors if ".lora_A" not in k and ".lora_B.weight" not in k and ".lora_embedding_" not in k]
    if others:
        gen = torch.Generator().manual_seed(seed)
        for key in others:
            t = tensors[key]
            t += 0.1 * t.abs().mean().clamp(min=0.1) * torch.randn(t.shape, generator=gen)
        save_file(tensors, str(path))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(out_dir)).eval()
    if name == "legacy":
        save_legacy(out_dir)
    return peft_model


def save_legacy(folder: Path) -> None:
    """Rewrite a saved adapter as older PEFT versions did: a pickled .bin, keys with the adapter name."""
    import torch
    from safetensors.torch import load_file

    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    torch.save({k.replace(".weight", ".default.weight"): v for k, v in tensors.items()}, folder / "adapter_model.bin")
    path.unlink()


def build(tmp: Path, family: str, adapter_names: list[str], mode: str = "separate", size: str = "tiny") -> Built:
    from edgelora.demo.tiny_models import build_causal_lm
    from edgelora.exporters.export import ExportOptions, export_package

    base = build_causal_lm(tmp / "base", family=family, size=size, seed=0)
    dirs = {}
    for i, name in enumerate(adapter_names):
        dirs[name] = tmp / "adapters" / name
        make_adapter(base, dirs[name], name, seed=100 + i, family=family)
    export_package(tmp / "base", dirs, tmp / "pkg", ExportOptions(progress=False, mode=mode))
    return Built(family, tmp / "base", base, dirs, tmp / "pkg")


@pytest.fixture(scope="session", params=list(FAMILY_ADAPTERS))
def built(request, tmp_path_factory) -> Built:
    family = request.param
    return build(tmp_path_factory.mktemp(family), family, FAMILY_ADAPTERS[family])


@pytest.fixture(scope="session", params=list(MERGED_ADAPTERS))
def merged_built(request, tmp_path_factory) -> Built:
    family = request.param
    return build(tmp_path_factory.mktemp(f"{family}-merged"), family, MERGED_ADAPTERS[family], mode="merged")


@pytest.fixture(scope="session")
def llama(tmp_path_factory) -> Built:
    return build(tmp_path_factory.mktemp("llama-main"), "llama", ["plain", "rs", "patterns"])


@pytest.fixture
def fresh_package(llama, tmp_path) -> Path:
    """A private copy of the llama package for tests that modify it."""
    import shutil

    shutil.copytree(llama.package, tmp_path / "pkg")
    return tmp_path / "pkg"

"""Tiny models from configs, PEFT adapters on them, and packages exported once per test session."""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# name -> LoRA settings; "patterns" exercises rank_pattern/alpha_pattern, "rs" rsLoRA on every projection
ADAPTERS = {
    "plain": dict(r=4, alpha=8, targets=("q_proj", "v_proj")),
    "rs": dict(r=8, alpha=4, targets=ALL_LINEAR, use_rslora=True),
    "patterns": dict(
        r=4, alpha=8, targets=("q_proj", "k_proj", "v_proj", "down_proj"),
        rank_pattern={"layers.1.self_attn.k_proj": 2, "down_proj": 6},
        alpha_pattern={"v_proj": 3.0, "model.layers.0.mlp.down_proj": 24.0},
    ),
}
FAMILY_ADAPTERS = {"llama": ["plain", "rs", "patterns"], "mistral": ["plain", "rs"], "qwen2": ["plain", "rs"]}


@dataclass
class Built:
    family: str
    base_dir: Path
    base: object  # the torch model
    adapter_dirs: dict[str, Path]
    package: Path

    def peft(self, name: str):
        """PEFT's own PyTorch model for a saved adapter: the reference every parity test compares against."""
        from peft import PeftModel

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return PeftModel.from_pretrained(copy.deepcopy(self.base), str(self.adapter_dirs[name])).eval()

    def reference_logits(self, name: str | None, ids) -> np.ndarray:
        import torch

        model = self.base if name is None else self.peft(name)
        with torch.no_grad():
            return model(torch.as_tensor(np.asarray(ids, dtype=np.int64))).logits.numpy()


def make_adapter(base, out_dir: Path, name: str, seed: int):
    from edgelora.exporters.tiny_models import random_peft_adapter

    spec = dict(ADAPTERS[name])
    return random_peft_adapter(base, out_dir, seed=seed, r=spec.pop("r"), alpha=spec.pop("alpha"),
                               targets=spec.pop("targets"), **spec)


def build(tmp: Path, family: str, adapter_names: list[str], size: str = "tiny") -> Built:
    from edgelora.exporters.package_writer import export_package
    from edgelora.exporters.tiny_models import build_causal_lm

    base = build_causal_lm(tmp / "base", family=family, size=size, seed=0)
    dirs = {}
    for i, name in enumerate(adapter_names):
        dirs[name] = tmp / "adapters" / name
        make_adapter(base, dirs[name], name, seed=100 + i)
    export_package(tmp / "base", dirs, tmp / "pkg", progress=False)
    return Built(family, tmp / "base", base, dirs, tmp / "pkg")


@pytest.fixture(scope="session", params=list(FAMILY_ADAPTERS))
def built(request, tmp_path_factory) -> Built:
    family = request.param
    return build(tmp_path_factory.mktemp(family), family, FAMILY_ADAPTERS[family])


@pytest.fixture(scope="session")
def llama(tmp_path_factory) -> Built:
    return build(tmp_path_factory.mktemp("llama-main"), "llama", FAMILY_ADAPTERS["llama"])


@pytest.fixture
def fresh_package(llama, tmp_path) -> Path:
    """A private copy of the llama package for tests that modify it."""
    import shutil

    shutil.copytree(llama.package, tmp_path / "pkg")
    return tmp_path / "pkg"

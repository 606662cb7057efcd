"""Deep models trace a few layers and copy the rest in ONNX (exporters/repeat_layers.py): the copies must be the
layers they stand for (their own weights, slots, ranks and attention kind), checked against PEFT's forward."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import onnxruntime as ort
import pytest
from conftest import ALL_LINEAR, IDS, TOL, Built, plain_feeds, plain_session

# family, layers, config changes, LoRA settings, what the export's progress line must say
CASES = {
    # two kinds (with and without slots), ranks differing per layer (rank_pattern) within a kind
    "llama-layers": ("llama", 8, {}, dict(targets=ALL_LINEAR, layers_to_transform=[0, 2, 3, 4, 5],
                                          rank_pattern={"layers.3.self_attn.q_proj": 2, "layers.4.mlp.up_proj": 6}),
                     "tracing 5 of 8 layers"),
    # sliding and global attention layers alternate
    "gemma2-sliding": ("gemma2", 8, {}, dict(targets=("q_proj", "v_proj", "down_proj")), "tracing 5 of 8 layers"),
    # attention scaled by 1/(layer index + 1): the traced layers differ, so every layer is traced
    "gpt2-scaled-by-layer": ("gpt2", 5, {"scale_attn_by_inverse_layer_idx": True},
                             dict(targets=("c_attn", "c_proj", "c_fc")), "trace to different graphs: tracing every layer"),
}


def deep_base(folder, family: str, layers: int, changes: dict):
    """A random base whose every layer differs from the others, norms and biases included (at their initial
    ones and zeros, a copy reading another layer's norm would go unnoticed)."""
    import torch

    from edgelora.demo.tiny_models import build_causal_lm

    base = build_causal_lm(folder, family=family, layers=layers)
    if changes:
        for key, value in changes.items():
            setattr(base.config, key, value)
        torch.manual_seed(1)
        base = type(base)(base.config).eval()
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for param in base.parameters():
            if param.ndim == 1:
                param.add_(0.2 * torch.randn(param.shape, generator=gen))
    base.save_pretrained(folder)
    return base


@pytest.fixture(scope="module", params=list(CASES))
def deep(request, tmp_path_factory):
    from edgelora.demo.tiny_models import random_peft_adapter
    from edgelora.exporters.export import export_package

    family, layers, changes, lora, expected = CASES[request.param]
    tmp = tmp_path_factory.mktemp(request.param)
    base = deep_base(tmp / "base", family, layers, changes)
    random_peft_adapter(base, tmp / "adapter", seed=7, r=4, alpha=8, **lora)
    log = io.StringIO()
    with contextlib.redirect_stderr(log):
        export_package(tmp / "base", {"a": tmp / "adapter"}, tmp / "pkg")
    assert expected in log.getvalue()
    return Built(family, tmp / "base", base, {"a": tmp / "adapter"}, tmp / "pkg")


def test_copied_layers_match_peft(deep):
    from edgelora.runtime import EdgeModel

    model = EdgeModel.open(deep.package)
    base = deep.reference_logits(None, IDS)
    assert np.abs(deep.reference_logits("a", IDS) - base).max() > 100 * TOL
    for name in (None, "a"):
        assert np.abs(model.logits(IDS, adapter=name) - deep.reference_logits(name, IDS)).max() <= TOL, name


def test_copied_layers_keep_their_own_cache(deep):
    """Prefill, then one token at a time past the sliding window: each layer reads and writes its own cache."""
    session = plain_session(deep.package)
    options = ort.RunOptions()
    lora = ort.LoraAdapter()
    lora.Load(str(deep.package / "adapters" / "a.onnx_adapter"))
    options.add_active_adapter(lora)
    outputs = [o.name for o in session.get_outputs()]
    out = session.run(outputs, plain_feeds(session, IDS[:, :3]), options)
    steps = [out[0]]
    for t in range(3, IDS.shape[1]):
        past = {o.replace("present.", "past_key_values."): v for o, v in zip(outputs[1:], out[1:])}
        out = session.run(outputs, plain_feeds(session, IDS[:, t:t + 1], past_len=t, past=past), options)
        steps.append(out[0])
    assert np.abs(np.concatenate(steps, axis=1) - deep.reference_logits("a", IDS)).max() <= TOL

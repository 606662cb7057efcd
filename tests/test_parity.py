"""Logits parity against PEFT's own PyTorch forward, through EdgeModel and through plain onnxruntime."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from conftest import FAMILY_ADAPTERS, IDS, MERGED_ADAPTERS, TOL, plain_feeds, plain_session


def test_edge_model_matches_peft(built):
    from edgelora.runtime import EdgeModel

    model = EdgeModel.open(built.package)
    for name in [None, *FAMILY_ADAPTERS[built.family]]:
        got = model.logits(IDS, adapter=name)
        want = built.reference_logits(name, IDS)
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= TOL, (built.family, name)


def test_adapters_change_the_answer(built):
    """Parity alone would pass if adapters were ignored: each must move the logits well past the tolerance."""
    base = built.reference_logits(None, IDS)
    for name in FAMILY_ADAPTERS[built.family]:
        assert np.abs(built.reference_logits(name, IDS) - base).max() > 100 * TOL


def test_plain_onnxruntime_with_lora_adapter_matches_peft(built):
    session = plain_session(built.package)
    for name in FAMILY_ADAPTERS[built.family]:
        adapter = ort.LoraAdapter()
        adapter.Load(str(built.package / "adapters" / f"{name}.onnx_adapter"))
        options = ort.RunOptions()
        options.add_active_adapter(adapter)
        logits = session.run(["logits"], plain_feeds(session, IDS), options)[0]
        assert np.abs(logits - built.reference_logits(name, IDS)).max() <= TOL, (built.family, name)
    base = session.run(["logits"], plain_feeds(session, IDS))[0]
    assert np.abs(base - built.reference_logits(None, IDS)).max() <= TOL


@pytest.mark.parametrize("adapter", [None, "rs", "embedding"])
def test_prefill_then_stepwise_decode_equals_one_full_forward(built, adapter):
    session = plain_session(built.package)
    options = ort.RunOptions()
    if adapter:
        lora = ort.LoraAdapter()
        lora.Load(str(built.package / "adapters" / f"{adapter}.onnx_adapter"))
        options.add_active_adapter(lora)
    outputs = [o.name for o in session.get_outputs()]
    full = session.run(["logits"], plain_feeds(session, IDS), options)[0]
    prefill = 3
    out = session.run(outputs, plain_feeds(session, IDS[:, :prefill]), options)
    steps = [out[0]]
    for t in range(prefill, IDS.shape[1]):
        past = {o.replace("present.", "past_key_values."): v for o, v in zip(outputs[1:], out[1:])}
        out = session.run(outputs, plain_feeds(session, IDS[:, t:t + 1], past_len=t, past=past), options)
        steps.append(out[0])
    stepwise = np.concatenate(steps, axis=1)
    assert np.abs(stepwise - full).max() <= TOL


def test_greedy_generate_equals_argmax_of_full_forwards(llama):
    from edgelora.runtime import EdgeModel

    model = EdgeModel.open(llama.package)
    prompt = [1, 40, 8, 15]
    result = model.generate(prompt, adapter="patterns", max_new_tokens=6)
    ids = list(prompt)
    for _ in range(len(result.token_ids)):
        ids.append(int(np.argmax(llama.reference_logits("patterns", [ids])[0, -1])))
    assert result.token_ids == ids[len(prompt):]


def test_merged_packages_match_peft(merged_built):
    """Merge-only variants (DoRA, biases, modules_to_save): PEFT's unmerged forward is the reference."""
    from edgelora.runtime import EdgeModel

    model = EdgeModel.open(merged_built.package)
    base = merged_built.reference_logits(None, IDS)
    for name in MERGED_ADAPTERS[merged_built.family]:
        want = merged_built.reference_logits(name, IDS)
        assert np.abs(want - base).max() > 100 * TOL, name
        assert np.abs(model.logits(IDS, adapter=name) - want).max() <= TOL, (merged_built.family, name)
        session = plain_session(merged_built.package / "merged" / name)
        assert np.abs(session.run(["logits"], plain_feeds(session, IDS))[0] - want).max() <= TOL, name

"""Speed: the export's fusion pass (contrib ops, GroupQueryAttention, a quantizable tied LM head) and session settings."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import build
from onnx import TensorProto, helper, numpy_helper

VOCAB, HIDDEN = 64, 32


def op_counts(path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


def test_exported_graph_uses_fused_contrib_ops(llama):
    """Parity (test_parity.py) holds on this very graph; here: the RMSNorms and attention are contrib ops."""
    ops = op_counts(llama.package / "model.onnx")
    assert ops["SkipSimplifiedLayerNormalization"] >= 2 * 2 - 1  # 2 layers: every norm after the first has a skip
    assert ops["MultiHeadAttention"] + ops["GroupQueryAttention"] == 2
    for unfused in ("Pow", "ReduceMean", "Sqrt", "Softmax"):
        assert ops[unfused] == 0, unfused


@pytest.fixture(scope="module")
def gqa_llama(tmp_path_factory):
    """The "small" Llama: head size 32, which onnxruntime's CPU GroupQueryAttention takes (the tiny one's 8 is not)."""
    return build(tmp_path_factory.mktemp("gqa"), "llama", ["rs"], size="small")


def test_group_query_attention_graph_matches_peft(gqa_llama):
    from edgelora.errors import EdgeLoraError
    from edgelora.format.manifest import load_manifest
    from edgelora.runtime import EdgeModel

    ops = op_counts(gqa_llama.package / "model.onnx")
    layers = 4
    assert ops["GroupQueryAttention"] == layers and ops["MultiHeadAttention"] == 0
    # per layer: 11 base ops (q, k and v packed into one MatMul), 7 LoRA slots of 3 nodes, one Concat of the
    # three q/k/v deltas, which share one Add, and the per-row adapter mask's Mul in each of the 4 slots or slot
    # groups that remain (2 nodes for the whole graph shape the mask)
    assert sum(ops.values()) <= layers * (11 + 3 * 7 - 2 + 1 + 4) + 15 + 2
    assert load_manifest(gqa_llama.package).graph["fusions"]["packed_qkv"] == layers
    model = EdgeModel.open(gqa_llama.package)
    ids = np.array([[1, 40, 8, 15, 15, 18, 98, 26], [1, 5, 6, 7, 8, 9, 10, 11]], np.int64)
    for name in (None, "rs"):
        assert np.abs(model.logits(ids, adapter=name) - gqa_llama.reference_logits(name, ids)).max() <= 1e-4
    with pytest.raises(EdgeLoraError, match="attention masks of ones"):
        model.logits(ids, attention_mask=[[0, 1, 1, 1, 1, 1, 1, 1], [1] * 8])


# (family, adapter): PEFT's default q/v targets (the packed q/k/v product is split), every linear layer on a base
# with q/k/v biases (the deltas concatenated after the packed bias), and Mistral's sliding window of 4
@pytest.mark.parametrize("family, adapter", [("llama", "plain"), ("qwen2", "rs"), ("gemma", "plain"),
                                             ("mistral", "plain")])
def test_fused_attention_families_match_peft_over_a_long_context(tmp_path, family, adapter):
    """Prefill and single steps past twice Mistral's window, on the fused graph (packed q/k/v, GroupQueryAttention)."""
    from edgelora.format.manifest import load_manifest
    from edgelora.runtime import EdgeModel

    built = build(tmp_path, family, [adapter], size="small")
    layers = 4
    fusions = load_manifest(built.package).graph["fusions"]
    assert fusions["gqa"] == fusions["packed_qkv"] == layers
    assert fusions.get("sliding_window_attention", 0) == (layers if family == "mistral" else 0)
    assert fusions["packed_matmuls"] == layers  # the MLP's gate and up projections, split after one MatMul
    assert op_counts(built.package / "model.onnx")["Split"] == layers * (2 if adapter == "plain" else 1)
    prompt = [1, 40, 8, 15, 15, 18, 30, 26, 5, 6, 7]
    model = EdgeModel.open(built.package)
    for name in (None, adapter):
        assert np.abs(model.logits([prompt], adapter=name) - built.reference_logits(name, [prompt])).max() <= 1e-4
    ids = list(prompt)
    for _ in range(4):
        ids.append(int(np.argmax(built.reference_logits(adapter, [ids])[0, -1])))
    assert model.generate(prompt, adapter=adapter, max_new_tokens=4, ignore_eos=True).token_ids == ids[len(prompt):]


def test_gpt2_with_unslotted_conv1d_layers_loads_and_matches_peft(tmp_path):
    """Slots on c_attn and c_fc only: the attention's output projection stays a bare Conv1D after fusion."""
    from edgelora.runtime import EdgeModel

    built = build(tmp_path, "gpt2", ["plain"])
    model = EdgeModel.open(built.package)
    ids = np.array([[1, 40, 8, 15, 15, 18]], np.int64)
    for name in (None, "plain"):
        assert np.abs(model.logits(ids, adapter=name) - built.reference_logits(name, ids)).max() <= 1e-4
    assert op_counts(built.package / "model.onnx")["Gemm"] == 0


def test_sliding_windows_per_layer_follow_the_config():
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    from edgelora.exporters.causal_lm import sliding_windows

    assert sliding_windows(LlamaConfig(num_hidden_layers=2)) == [None, None]
    assert sliding_windows(MistralConfig(num_hidden_layers=2, sliding_window=8)) == [8, 8]
    qwen2 = Qwen2Config(num_hidden_layers=3, use_sliding_window=True, sliding_window=8, max_window_layers=1)
    assert sliding_windows(qwen2) == [None, 8, 8]
    assert sliding_windows(Qwen2Config(num_hidden_layers=2, sliding_window=8)) == [None, None]


def test_slot_defaults_are_empty_so_runs_without_an_adapter_skip_the_products(gqa_llama):
    """A run without an adapter takes each slot's default initializer: rank 0, which onnxruntime skips."""
    graph = onnx.load(str(gqa_llama.package / "model.onnx"), load_external_data=False).graph
    slot_inputs = {i.name for i in graph.input if ".lora_" in i.name}
    defaults = [t for t in graph.initializer if t.name in slot_inputs]
    assert len(defaults) == len(slot_inputs) == 4 * 4 * 2  # per layer: q|k|v and gate|up grouped, o, down
    assert all(0 in t.dims for t in defaults)


def test_the_slots_of_packed_projections_compute_one_delta_per_group(gqa_llama):
    """q|k|v and gate|up are packed into one product each; their slots form one group each, whose two factors
    feed one product pair added to the packed product: no per-module product, no Concat of deltas."""
    from edgelora.format.manifest import load_manifest

    manifest = load_manifest(gqa_llama.package)
    layer0 = sorted(g.modules for g in manifest.slot_groups if ".layers.0." in g.a)
    assert len(manifest.slot_groups) == 4 * 2 and layer0 == [
        [f"model.layers.0.mlp.{m}_proj" for m in ("gate", "up")],
        [f"model.layers.0.self_attn.{m}_proj" for m in ("q", "k", "v")],
    ]
    qkv = next(g for g in manifest.slot_groups if g.modules[0].endswith("layers.0.self_attn.q_proj"))
    assert qkv.a == "model.layers.0.self_attn.q_proj+k_proj+v_proj.lora_A"
    assert qkv.offsets == [0, qkv.widths[0], sum(qkv.widths[:2])] and qkv.width == sum(qkv.widths)
    slots = manifest.slot_map()
    assert (slots["model.layers.0.self_attn.k_proj"].a, slots["model.layers.0.self_attn.o_proj"].a) == (
        qkv.a, "model.layers.0.self_attn.o_proj.lora_A")
    graph = onnx.load(str(gqa_llama.package / "model.onnx"), load_external_data=False).graph
    readers = Counter(name for node in graph.node for name in node.input)
    assert all(readers[g.a] == 1 and readers[g.b] == 1 for g in manifest.slot_groups)
    assert not any(".q_proj.lora_" in name for name in readers)
    assert not any(n.op_type == "Concat" and any("lora" in i for i in n.input) for n in graph.node)


def test_a_group_of_some_of_the_packed_modules_matches_peft(llama, tmp_path):
    """PEFT's default targets, q and v: their group's delta joins the packed q|k|v before its Split, with zero
    columns for k, and a path blob written with the package's groups answers as the package's own."""
    from edgelora.exporters.export import ExportOptions, export_package
    from edgelora.format.adapter_file import read_adapter, write_adapter
    from edgelora.format.manifest import load_manifest
    from edgelora.runtime import EdgeModel

    package = tmp_path / "pkg"
    export_package(llama.base_dir, {"plain": llama.adapter_dirs["plain"]}, package, ExportOptions(progress=False))
    groups = load_manifest(package).slot_groups
    first = next(g for g in groups if ".layers.0." in g.a)
    assert first.modules == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    assert first.offsets[0] == 0 and first.offsets[1] > first.widths[0]  # k's columns lie between
    ids = [[1, 40, 8, 15, 15, 18, 98, 26]]
    model = EdgeModel.open(package)
    assert np.abs(model.logits(ids, adapter="plain") - llama.reference_logits("plain", ids)).max() <= 1e-4
    factors, _ = read_adapter(package / "adapters/plain.onnx_adapter", groups)
    write_adapter(tmp_path / "copy.onnx_adapter", factors, groups=groups)
    np.testing.assert_array_equal(model.logits(ids, adapter=model.load_adapter(tmp_path / "copy.onnx_adapter")),
                                  model.logits(ids, adapter="plain"))


def test_group_query_attention_keeps_the_cache_across_steps(gqa_llama):
    """Prefill, then a 2-token chunk after a cache (a chat's next turn), then single steps: as one forward pass."""
    from edgelora.runtime import EdgeModel

    model = EdgeModel.open(gqa_llama.package)
    prompt = [1, 40, 8, 15, 15, 18]
    result = model.generate(prompt, adapter="rs", max_new_tokens=5, ignore_eos=True)
    ids = list(prompt)
    for _ in range(5):
        ids.append(int(np.argmax(gqa_llama.reference_logits("rs", [ids])[0, -1])))
    assert result.token_ids == ids[len(prompt):]
    chat = model.chat(adapter="rs")
    first = chat.send(prompt[:3], max_new_tokens=1)
    second = chat.send(prompt[3:], max_new_tokens=3)
    whole = prompt[:3] + first.token_ids + prompt[3:]
    assert second.token_ids == model.generate(whole, adapter="rs", max_new_tokens=3).token_ids


def test_group_query_attention_steps_write_the_cache_in_place(gqa_llama):
    """Steps extend buffers reserved before the turn instead of copying the cache into new tensors each step: a
    turn that fits keeps the very same buffers, and they hold the keys and values a plain forward pass computes."""
    from edgelora.runtime import EdgeModel
    from edgelora.runtime.kvcache import KVCache

    model = EdgeModel.open(gqa_llama.package)
    chat = model.chat(adapter="rs")
    chat.send([1, 40, 8], max_new_tokens=4)  # reserves 6 positions
    chat.send([15], max_new_tokens=2)  # needs 9: the buffers grow to 12, keeping what they hold
    buffers = dict(chat.cache.arrays)
    third = chat.send([18], max_new_tokens=2)  # needs 12: fits
    assert all(chat.cache.arrays[name] is array for name, array in buffers.items())
    fed = chat.token_ids[:-1]  # the last answer token is not fed until the next turn
    assert chat.cache.length == len(fed) and chat.cache.capacity == 12
    assert third.token_ids == model.generate(chat.token_ids[:-2], adapter="rs", max_new_tokens=2).token_ids
    plain = KVCache()
    with model.call("rs") as call:
        model.runner.forward(call, np.asarray([fed]), np.arange(len(fed))[None], plain)
    for name, array in buffers.items():
        np.testing.assert_allclose(array[:, :, : len(fed)], plain.values[name].numpy(), atol=1e-5)
        assert not array[:, :, len(fed):].any()


def test_a_generation_past_its_reserved_cache_grows_it(gqa_llama, monkeypatch):
    """A generation reserves a bounded number of positions past its prompt, whatever max_new_tokens allows; past
    them the buffers double mid-generation, keeping what they hold."""
    from edgelora.runtime import EdgeModel, runner

    monkeypatch.setattr(runner, "KV_RESERVE_AHEAD", 2)  # 6 positions for this prompt, then 12
    model = EdgeModel.open(gqa_llama.package, batching=False)  # the engine's rows hold the whole context
    prompt = [1, 40, 8, 15]
    result = model.generate(prompt, adapter="rs", max_new_tokens=8, ignore_eos=True)
    ids = list(prompt)
    for _ in range(8):
        ids.append(int(np.argmax(gqa_llama.reference_logits("rs", [ids])[0, -1])))
    assert result.token_ids == ids[len(prompt):]


def tied_head_graph() -> onnx.ModelProto:
    """Gather from an embedding table E, then logits = h · Eᵀ as the fused graph has it (FusedMatMul, transB=1)."""
    rng = np.random.default_rng(0)
    table = rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["E", "ids"], ["h"]),
        helper.make_node("FusedMatMul", ["h", "E"], ["logits"], domain="com.microsoft", transB=1, alpha=1.0),
    ]
    graph = helper.make_graph(
        nodes, "tied",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "seq", VOCAB])],
        [numpy_helper.from_array(table, "E")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])


def run(proto, ids):
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"ids": ids})[0]


def test_untied_lm_head_computes_the_same_and_quantizes():
    from edgelora.exporters.base_quant import quantize_base
    from edgelora.exporters.fusion import untie_lm_head
    from edgelora.exporters.options import ExportOptions

    ids = np.array([[3, 7, 11]], np.int64)
    proto = tied_head_graph()
    want = run(proto, ids)
    untied = tied_head_graph()
    assert untie_lm_head(untied) == 1
    assert [n.op_type for n in untied.graph.node] == ["Gather", "MatMul"]
    assert np.abs(run(untied, ids) - want).max() <= 1e-5

    quantized = quantize_base(tied_head_graph(), ExportOptions(quantize="int8"), set())
    ops = [n.op_type for n in quantized.graph.node]
    assert ops == ["Gather", "MatMulNBits"]  # the LM head is quantized; the gather keeps the float table
    got = run(quantized, ids)
    assert np.abs(got - want).max() / np.abs(want).max() < 0.02
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 2 / 3


def test_runtime_threads_spin_briefly_unless_told(llama):
    """Worker threads spin 20 µs for the next op by default (fast alone, yielding beside a busy process);
    spin_us=0 never spins, and a bad value is refused in one line."""
    from edgelora.errors import EdgeLoraError
    from edgelora.runtime import EdgeModel

    def entries(model):
        return [model._options.get_session_config_entry(f"session.intra_op.{key}")
                for key in ("allow_spinning", "spin_duration_us")]

    assert entries(EdgeModel.open(llama.package)) == ["1", "20"]
    assert entries(EdgeModel.open(llama.package, spin_us=500)) == ["1", "500"]
    assert EdgeModel.open(llama.package, spin_us=0)._options.get_session_config_entry(
        "session.intra_op.allow_spinning") == "0"
    with pytest.raises(EdgeLoraError, match="spin_us must be a whole number of microseconds >= 0, got True"):
        EdgeModel.open(llama.package, spin_us=True)

def _anon_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssAnon")) / 1024


def test_rewriting_initializers_does_not_copy_the_weights_that_stay():
    """A graph rewrite (packing, the slot codec) used to rebuild the initializer list, copying every weight into
    protobuf memory that is never given back: a 1B model's export outgrew 24 GiB."""
    from edgelora.exporters.initializers import replace_initializers

    weight = numpy_helper.from_array(np.ones((64, 1024, 1024), np.float32), "big")  # 256 MB
    graph = helper.make_graph([], "g", [], [], initializer=[weight, numpy_helper.from_array(np.zeros(2), "old")])
    before = _anon_mb()
    for i in range(4):
        dropped = "old" if i == 0 else f"new{i - 1}"
        replace_initializers(graph, {dropped}, [numpy_helper.from_array(np.zeros(2), f"new{i}")])
    assert [t.name for t in graph.initializer] == ["big", "new3"]
    assert _anon_mb() - before < 100  # rebuilding the list took 256 MB per rewrite

"""Quantized adapter codecs, quantized bases and merged mode, against PEFT's PyTorch forward."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from conftest import Built, plain_feeds, plain_session, run_cli


@pytest.fixture(scope="session")
def probe(tmp_path_factory) -> Built:
    """A base with trained-like logit margins (see build_causal_lm) and an adapter of trained-like size:
    rank 16 on every projection, B ~ N(0, 0.02), which moves about a quarter of the top-1 tokens."""
    import torch
    from peft import LoraConfig, get_peft_model

    from edgelora.demo.tiny_models import build_causal_lm

    tmp = tmp_path_factory.mktemp("probe")
    base = build_causal_lm(tmp / "base", size="tiny", initializer_range=0.1)
    torch.manual_seed(5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=16, lora_alpha=16, target_modules="all-linear"))
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
        peft_model.save_pretrained(tmp / "a")
    return Built("llama", tmp / "base", base, {"a": tmp / "a"}, tmp)


IDS = np.random.default_rng(0).integers(4, 100, (4, 32))


def export(probe: Built, name: str, **kwargs):
    from edgelora.exporters.export import ExportOptions, export_package

    out = probe.package / name
    if not out.exists():
        export_package(probe.base_dir, probe.adapter_dirs, out, ExportOptions(progress=False, **kwargs))
    return out


# On random ids int4 agrees on 94-100% of the top-1 tokens depending on the adapter's seed (97.7% on average
# over eight): most positions there are near-ties, which even 3% Gaussian noise on the factors flips. Where an
# adapter is confident, on the completions it was trained for, int4 agrees on all of them (the test after next).
@pytest.mark.parametrize("dtype, max_rel_error, min_top1", [("fp16", 1e-3, 0.99), ("int8", 5e-3, 0.99),
                                                            ("int4", 5e-2, 0.95)])
def test_quantized_adapters_against_peft(probe, dtype, max_rel_error, min_top1):
    from edgelora.format.manifest import load_manifest
    from edgelora.runtime import EdgeModel

    package = export(probe, dtype, adapter_dtype=dtype)
    got = EdgeModel.open(package).logits(IDS, adapter="a")
    want = probe.reference_logits("a", IDS)
    base = probe.reference_logits(None, IDS)
    assert (base.argmax(-1) != want.argmax(-1)).mean() > 0.1  # the adapter matters on this probe
    assert np.linalg.norm(got - want) / np.linalg.norm(want) <= max_rel_error
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= min_top1
    manifest = load_manifest(package)
    assert manifest.adapters["a"].dtype == dtype and {s.dtype for s in manifest.slots} == {dtype}
    assert bool(manifest.slot_groups) == (dtype != "int4")  # int4 slots stay per module (exporters/slots.py)
    assert manifest.quality["a"].top1_agreement >= min_top1
    assert 0 < manifest.quality["a"].delta_rel_error < 0.2


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(base, adapter, test data): the demo's pretrained base and a rank-16 adapter on all projections,
    trained until it solves its task, so it has the margins a user's adapter has where it is used."""
    from edgelora.demo.run import BASE
    from edgelora.demo.tasks import tenant_split, write_jsonl
    from edgelora.training.trainer import train_adapter

    tmp = tmp_path_factory.mktemp("trained")
    train, test = tenant_split("date", 400, 32)
    write_jsonl(tmp / "train.jsonl", train)
    write_jsonl(tmp / "test.jsonl", test)
    result = train_adapter(BASE, tmp / "train.jsonl", tmp / "date", rank=16, alpha=16, max_steps=100, lr=3e-3,
                           batch_size=32, eval_data=tmp / "test.jsonl", progress=False)
    assert result.exact_match == 1.0
    return BASE, tmp / "date", tmp / "test.jsonl"


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_quantized_adapter_agrees_on_the_completions_it_was_trained_for(trained, tmp_path, dtype):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgelora.exporters.examples import read_examples
    from edgelora.exporters.export import ExportOptions, export_package
    from edgelora.runtime import EdgeModel

    base_dir, adapter_dir, test_file = trained
    manifest = export_package(base_dir, {"date": adapter_dir}, tmp_path / "pkg",
                              ExportOptions(progress=False, adapter_dtype=dtype, probe_data={"date": test_file}))
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
    runtime = EdgeModel.open(tmp_path / "pkg")
    agree = []
    for ex in read_examples(test_file):
        prompt = tokenizer(ex.prompt)["input_ids"]
        ids = prompt + tokenizer(ex.completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        with torch.no_grad():
            want = peft_model(torch.tensor([ids])).logits[0].numpy()
        got = runtime.logits(ids, adapter="date")[0]
        completion = slice(len(prompt) - 1, len(ids) - 1)  # the positions that predict completion tokens
        agree.extend(want[completion].argmax(-1) == got[completion].argmax(-1))
    assert np.mean(agree) >= 0.99
    quality = manifest.quality
    assert quality["date"].top1_agreement >= 0.99 and quality["date"].delta_rel_error > 1e-3  # the codec did round
    label = f"test.jsonl, {len(agree)} completion tokens of 32 examples"
    assert quality["date"].probe == label
    assert quality[""].probe == "random ids, 4x32 tokens"  # the base has no probe file of its own here
    code, out, _ = run_cli("inspect", tmp_path / "pkg")
    assert code == 0 and f"date: {label}" in out


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_plain_onnxruntime_loads_quantized_adapters(probe, dtype):
    from edgelora.runtime import EdgeModel

    package = export(probe, dtype, adapter_dtype=dtype)
    session = plain_session(package)
    adapter = ort.LoraAdapter()
    adapter.Load(str(package / "adapters/a.onnx_adapter"))
    options = ort.RunOptions()
    options.add_active_adapter(adapter)
    plain = session.run(["logits"], plain_feeds(session, IDS), options)[0]
    np.testing.assert_array_equal(plain, EdgeModel.open(package).logits(IDS, adapter="a"))
    bare = session.run(["logits"], plain_feeds(session, IDS))[0]
    assert np.abs(bare - probe.reference_logits(None, IDS)).max() <= 1e-4


def test_int8_slots_multiply_the_stored_factors_without_widening_them(probe):
    """Per decode step, widening every int8 factor to float was most of an int8 adapter's cost, and casting
    and applying scales was most of the rest: a's products read the stored factor and its fp32 scales, and
    b (over the rank axis, empty in the rank-0 default) has no scales, only a cast."""
    import onnx

    graph = onnx.load(export(probe, "int8", adapter_dtype="int8") / "model.onnx", load_external_data=False).graph
    readers: dict[str, list[str]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node.op_type)
    a_factors = [v.name for v in graph.input if v.name.endswith(".lora_A.int8")]
    b_factors = [v.name for v in graph.input if v.name.endswith(".lora_B.int8")]
    assert a_factors and len(a_factors) == len(b_factors)
    assert all(readers[name] == ["DynamicQuantizeMatMul"] for name in a_factors)
    assert all(readers[name] == ["Cast"] for name in b_factors)
    scales = [v.name for v in graph.input if v.name.endswith(".scale")]
    assert sorted(scales) == sorted(name.replace(".int8", ".scale") for name in a_factors)
    assert all(readers[name] == ["DynamicQuantizeMatMul"] for name in scales)


def test_merged_mode_matches_peft_merge_and_unload(probe):
    import torch

    from edgelora.format.manifest import load_manifest
    from edgelora.runtime import EdgeModel

    package = export(probe, "merged", mode="merged")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = probe.peft("a").merge_and_unload()
    with torch.no_grad():
        want = merged(torch.as_tensor(IDS)).logits.numpy()
    model = EdgeModel.open(package)
    assert np.abs(model.logits(IDS, adapter="a") - want).max() <= 1e-4
    assert np.abs(model.logits(IDS) - probe.reference_logits(None, IDS)).max() <= 1e-4
    assert (package / "merged/a/model.onnx").is_file() and not (package / "adapters").exists()
    # unchanged tensors (embedding, norms, tied LM head) live once on disk: a hard link to the base's data
    assert (package / "merged/a/base.onnx.data").stat().st_ino == (package / "model.onnx.data").stat().st_ino
    config = probe.base.config
    embedding_bytes = config.vocab_size * config.hidden_size * 4
    manifest = load_manifest(package)
    assert manifest.adapters["a"].bytes <= manifest.base_bytes - embedding_bytes
    code, _, err = run_cli("add-adapter", package, f"b={probe.adapter_dirs['a']}")
    assert code == 2 and "a merged package has one graph per adapter" in err


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_quantized_base_keeps_slots_float_and_answers_close(probe, quantize):
    import onnx

    from edgelora.runtime import EdgeModel

    package = export(probe, f"base-{quantize}", quantize=quantize, adapter_dtype="int8")
    graph = onnx.load(str(package / "model.onnx"), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    # every projection and the LM head; per layer q/k/v are one packed weight, and so are gate/up
    assert ops.count("MatMulNBits") == 2 * 4 + 1
    slot_inputs = {i.name for i in graph.input if ".lora_" in i.name}
    assert all(".lora_" not in n.input[1] for n in graph.node if n.op_type == "MatMulNBits")
    assert len(slot_inputs) == 2 * 3 * 4  # int8 A and B and A's scales, 4 slots per layer (2 grouped)
    got = EdgeModel.open(package).logits(IDS, adapter="a")
    want = probe.reference_logits("a", IDS)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) <= (0.05 if quantize == "int8" else 0.5)


def test_add_adapter_encodes_in_the_package_codec(probe, tmp_path):
    import shutil

    from edgelora.format.adapter_file import read_adapter
    from edgelora.format.manifest import load_manifest

    package = tmp_path / "pkg"
    shutil.copytree(export(probe, "int8", adapter_dtype="int8"), package)
    code, out, _ = run_cli("add-adapter", package, f"b={probe.adapter_dirs['a']}")
    assert code == 0 and "int8" in out
    assert read_adapter(package / "adapters/b.onnx_adapter", load_manifest(package).slot_groups)[1] == "int8"
    code, _, err = run_cli("add-adapter", package, f"c={probe.adapter_dirs['a']}", "--adapter-dtype", "int4")
    assert code == 2 and "slots take int8 factors, not int4" in err
    code, out, _ = run_cli("inspect", package)
    assert code == 0 and "int8" in out and "top-1" in out


def test_adapter_sizes_against_peft_safetensors(tmp_path):
    """Exact file sizes at rank 16 on all seven projections of one SmolLM-135M-shaped layer."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from edgelora.exporters.peft_ingest import ingest_peft
    from edgelora.format.adapter_file import write_adapter

    config = LlamaConfig(vocab_size=256, hidden_size=576, intermediate_size=1536, num_hidden_layers=1,
                         num_attention_heads=9, num_key_value_heads=3)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(LlamaForCausalLM(config), LoraConfig(
            r=16, lora_alpha=32, init_lora_weights=False,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
        peft_model.save_pretrained(tmp_path / "peft")
    peft_bytes = (tmp_path / "peft/adapter_model.safetensors").stat().st_size
    factors = ingest_peft(tmp_path / "peft")
    sizes = {d: write_adapter(tmp_path / f"{d}.onnx_adapter", factors, d, block=64) for d in ("fp32", "int8", "int4")}
    assert sizes["int8"] <= 0.27 * peft_bytes
    assert sizes["int4"] <= 0.15 * peft_bytes  # with blocks of 32 the extra scales make it 15.2%
    assert sizes["fp32"] <= 1.01 * peft_bytes


def test_merge_then_quantize_beats_quantize_then_merge():
    """Why merged mode merges in float first: a delta added to already-quantized weights must be quantized
    again, and most of a small delta is lost to the second rounding."""
    from onnx import TensorProto, helper, numpy_helper

    from edgelora.exporters.base_quant import quantize_base
    from edgelora.exporters.options import ExportOptions

    def int4(w: np.ndarray) -> np.ndarray:
        """The weights the package's int4 base quantization makes of ``w`` (a MatMul read back with x = I)."""
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, w.shape[0]])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, w.shape[1]])],
            [numpy_helper.from_array(w, "w")])
        proto = quantize_base(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]),
                              ExportOptions(quantize="int4"), set())
        assert [n.op_type for n in proto.graph.node] == ["MatMulNBits"]
        session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(["y"], {"x": np.eye(w.shape[0], dtype=np.float32)})[0]

    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.02, (256, 128)).astype(np.float32)
    delta = (rng.normal(0, 0.02, (256, 16)) @ rng.normal(0, 0.02, (16, 128))).astype(np.float32)
    merged = w + delta
    merge_then_quantize = np.linalg.norm(int4(merged) - merged)
    quantize_then_merge = np.linalg.norm(int4(int4(w) + delta) - merged)
    assert merge_then_quantize < 0.8 * quantize_then_merge


def embedding_adapter_package(tmp_path, dtype: str, quantize: str = "none"):
    """(PEFT model, base model, package) for a LoRA on the embedding (vocabulary 100) and a pair of projections."""
    from conftest import make_adapter

    from edgelora.demo.tiny_models import build_causal_lm
    from edgelora.exporters.export import ExportOptions, export_package

    base = build_causal_lm(tmp_path / "base", size="tiny", seed=0)
    peft_model = make_adapter(base, tmp_path / "a", "embedding", seed=7)
    export_package(tmp_path / "base", {"a": tmp_path / "a"}, tmp_path / "pkg",
                   ExportOptions(progress=False, adapter_dtype=dtype, quantize=quantize))
    return peft_model, base, tmp_path / "pkg"


@pytest.mark.parametrize("dtype", ["fp16", "int8"])
def test_quantized_embedding_slots_against_peft(tmp_path, dtype):
    """An embedding slot looks its factor up (Gather) instead of multiplying by it: the int8 codec, which
    scales the product rather than the factor, must serve that path too."""
    import torch

    from edgelora.runtime import EdgeModel

    peft_model, base, package = embedding_adapter_package(tmp_path, dtype)
    with torch.no_grad():
        want = peft_model(torch.as_tensor(IDS)).logits.numpy()
        base_logits = base(torch.as_tensor(IDS)).logits.numpy()
    got = EdgeModel.open(package).logits(IDS, adapter="a")
    assert np.linalg.norm(want - base_logits) / np.linalg.norm(want) > 0.01  # the adapter matters
    assert np.linalg.norm(got - want) / np.linalg.norm(want) <= {"fp16": 1e-3, "int8": 2e-2}[dtype]


def test_an_int4_base_quantizes_the_token_table_but_not_the_embedding_slot(tmp_path):
    """int4 turns the token lookup into GatherBlockQuantized; the embedding slot's lookup takes the same ids and
    must stay the slot's own float lookup, with the adapter's effect what PEFT's is."""
    import onnx
    import torch

    from edgelora.runtime import EdgeModel

    peft_model, base, package = embedding_adapter_package(tmp_path, "fp32", quantize="int4")
    graph = onnx.load(str(package / "model.onnx"), load_external_data=False).graph
    inputs = {i.name for i in graph.input}
    table = [n for n in graph.node if n.op_type == "GatherBlockQuantized"]
    assert len(table) == 1 and table[0].input[0] not in inputs and table[0].input[1] == "input_ids"
    assert [n.input[0] for n in graph.node if n.op_type == "Gather" and n.input[1] == "input_ids"] == \
        [name for name in inputs if name.endswith("embed_tokens.lora_A")]
    table_shape = [base.config.vocab_size, base.config.hidden_size]
    assert not [t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT
                and table_shape in (list(t.dims), list(t.dims)[::-1])]  # no fp32 copy of the table is left
    with torch.no_grad():
        want = peft_model(torch.as_tensor(IDS)).logits.numpy() - base(torch.as_tensor(IDS)).logits.numpy()
    model = EdgeModel.open(package)
    got = model.logits(IDS, adapter="a") - model.logits(IDS)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) <= 0.2


def test_fp32_embedding_keeps_the_table_and_needs_an_int4_base(probe, tmp_path):
    import onnx

    code, _, err = run_cli("export", probe.base_dir, "--adapter", f"a={probe.adapter_dirs['a']}", "--out",
                           tmp_path / "pkg", "--quantize", "int4", "--fp32-embedding", "--quiet")
    assert code == 0, err
    graph = onnx.load(str(tmp_path / "pkg" / "model.onnx"), load_external_data=False).graph
    assert not [n for n in graph.node if n.op_type == "GatherBlockQuantized"]
    assert [n for n in graph.node if n.op_type == "Gather" and n.input[1] == "input_ids"]
    code, _, err = run_cli("export", probe.base_dir, "--out", tmp_path / "pkg8", "--quantize", "int8",
                           "--fp32-embedding")
    assert code == 2 and err.strip().splitlines()[-1].endswith(
        "--fp32-embedding applies to --quantize int4 only; the other bases keep the table in fp32")


def test_int4_embedding_slot_needs_blocks_that_divide_the_vocabulary(tmp_path):
    """int4 blocks run along the reduction axis, which for an embedding slot is the vocabulary."""
    from edgelora.errors import EdgeLoraError

    with pytest.raises(EdgeLoraError, match="int4 blocks of 32 do not divide a reduction size of 100; use int8"):
        embedding_adapter_package(tmp_path, "int4")

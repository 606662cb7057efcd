"""edgelora train: PEFT folders, completion-only loss, seeded determinism, exact-match, bad data lines."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgelora.errors import EdgeLoraError


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    from edgelora.demo.tiny_models import build_causal_lm

    out = tmp_path_factory.mktemp("train") / "base"
    build_causal_lm(out, size="tiny", seed=0, initializer_range=0.2)
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    from edgelora.demo.tasks import tenant_split, write_jsonl

    train, test = tenant_split("reverse", 48, 12)
    folder = tmp_path_factory.mktemp("data")
    write_jsonl(folder / "train.jsonl", train)
    write_jsonl(folder / "test.jsonl", test)
    return folder / "train.jsonl", folder / "test.jsonl"


def lora_tensors(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(folder / "adapter_model.safetensors")


def test_same_seed_same_adapter_and_peft_loads_it(base_dir, data, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from edgelora.training.trainer import train_adapter

    runs = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        result = train_adapter(base_dir, data[0], tmp_path / name, rank=4, alpha=8, targets="q_proj,v_proj",
                               max_steps=4, batch_size=8, seed=seed, progress=False)
        assert result.steps == 4 and np.isfinite(result.train_loss)
        runs[name] = lora_tensors(tmp_path / name)
    assert runs["a"].keys() == runs["c"].keys() and len(runs["a"]) == 2 * 2 * 2  # 2 layers, q and v, A and B
    assert all(np.array_equal(runs["a"][k], runs["b"][k]) for k in runs["a"])
    assert not all(np.array_equal(runs["a"][k], runs["c"][k]) for k in runs["a"])

    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    ids = torch.tensor([[1, 10, 20, 30]])
    with torch.no_grad():
        before = base(ids).logits
        after = PeftModel.from_pretrained(base, tmp_path / "a").eval()(ids).logits
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["r"] == 4
    assert not torch.allclose(before, after)  # trained B is no longer zero


def test_labels_cover_the_completion_and_eos_only(base_dir):
    from edgelora.exporters.examples import IGNORE, Example, encode, load_tokenizer
    from edgelora.training.trainer import collate

    tok = load_tokenizer(base_dir)
    ids, labels = encode(tok, Example("abc=", "cba"))
    prompt = tok("abc=")["input_ids"]
    assert ids[: len(prompt)] == prompt and labels[: len(prompt)] == [IGNORE] * len(prompt)
    assert labels[len(prompt):] == tok("cba", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    batch = collate([(ids, labels), ([1, 5], [IGNORE, 6])], pad_id=0)
    assert batch["attention_mask"].tolist()[1] == [1, 1] + [0] * (len(ids) - 2)
    assert batch["labels"][1, 2:].eq(IGNORE).all()


def test_exact_match_is_batched_greedy_decoding(base_dir):
    """Left-padded batched generation must give what one-at-a-time argmax decoding gives."""
    import torch

    from edgelora.exporters.base_model import load_base
    from edgelora.exporters.examples import Example, load_tokenizer
    from edgelora.training.trainer import evaluate

    model, tok = load_base(base_dir), load_tokenizer(base_dir)
    prompts = ["ab=", "hello=", "x=", "qwerty=", "zz="]

    def naive(prompt: str, steps: int) -> str:
        ids = tok(prompt)["input_ids"]
        new = []
        for _ in range(steps):
            with torch.no_grad():
                nxt = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            new.append(nxt)
        return tok.decode(new, skip_special_tokens=True)

    expected = [naive(p, 5) for p in prompts]  # completions of 4 tokens + EOS allow 5 steps
    examples = [Example(p, e if i % 2 == 0 else "abcd") for i, (p, e) in enumerate(zip(prompts, expected))]
    examples = [Example(ex.prompt, (ex.completion + "wxyz")[:4]) for ex in examples]
    result = evaluate(model, tok, examples, batch_size=2)
    assert result.answers == expected
    assert result.exact_match == sum(a == ex.completion for a, ex in zip(expected, examples)) / len(examples)
    assert np.isfinite(result.loss)


@pytest.mark.parametrize("content, problem", [
    ('{"prompt": "a=", "completion": "a"}\n{"prompt": "b=", \n', "train.jsonl:2: not valid JSON"),
    ('{"prompt": "a=", "completion": "a"}\n\n["a", "b"]\n', "train.jsonl:3: expected an object with string fields"),
    ('{"prompt": "a=", "completion": 7}\n', "train.jsonl:1: expected an object with string fields"),
    ('{"prompt": "a=", "completion": ""}\n', "train.jsonl:1: the completion is empty"),
    (b'{"prompt": "a=", "completion": "a"}\n{"prompt": "\xff"}\n', "train.jsonl:2: not UTF-8 text"),
    ("\n\n", "train.jsonl: no examples"),
])
def test_bad_data_is_one_line_naming_file_and_line(tmp_path, content, problem):
    from edgelora.exporters.examples import read_examples

    path = tmp_path / "train.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(EdgeLoraError, match=problem.replace(".", r"\.")) as err:
        read_examples(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_cli_trains_reports_eval_and_refuses_bad_input(base_dir, data, tmp_path):
    from click.testing import CliRunner

    from edgelora.cli import main

    runner = CliRunner()
    out = tmp_path / "adapter"
    args = ["train", str(base_dir), "--data", str(data[0]), "--out", str(out), "--max-steps", "2",
            "--batch-size", "8", "--rank", "2", "--targets", "q_proj", "--eval-data", str(data[1]), "--quiet"]
    r = runner.invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "2 steps" in r.output and "exact match" in r.output
    assert (out / "adapter_model.safetensors").is_file()

    r = runner.invoke(main, args)
    assert r.exit_code == 2 and "already exists" in r.output

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a="}\n')
    r = runner.invoke(main, ["train", str(base_dir), "--data", str(bad), "--out", str(tmp_path / "x")])
    assert r.exit_code == 2
    assert r.output.strip().splitlines() == [f"edgelora: error: {bad}:1: expected an object with string fields "
                                             '"prompt" and "completion"']
    r = runner.invoke(main, ["train", str(base_dir), "--data", str(data[0]), "--out", str(tmp_path / "y"),
                             "--targets", "no_such_proj", "--max-steps", "1"])
    assert r.exit_code == 2 and "--targets no_such_proj" in r.output and not (tmp_path / "y").exists()

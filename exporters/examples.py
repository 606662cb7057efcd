"""Prompt/completion JSONL: what ``edgelora train`` learns from and what ``--probe-data`` measures on.

One module for both, so a probe scores exactly the tokens training put its loss on: the prompt
tokenized as generation sees it (special tokens included), then the completion and its EOS.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from edgelora.errors import EdgeLoraError

IGNORE = -100  # the label transformers' causal-LM loss skips


@dataclass(frozen=True)
class Example:
    prompt: str
    completion: str


def read_examples(path: str | Path) -> list[Example]:
    """Examples from a JSONL file; any bad line ends in one error naming the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise EdgeLoraError(f"{path}: missing; expected a JSONL file with one {{\"prompt\", \"completion\"}} per line")
    examples = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            where = f"{path}:{n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise EdgeLoraError(f"{where}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise EdgeLoraError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("prompt", "completion")):
                raise EdgeLoraError(f"{where}: expected an object with string fields \"prompt\" and \"completion\"")
            if not row["completion"]:
                raise EdgeLoraError(f"{where}: the completion is empty, so there is nothing to learn")
            examples.append(Example(row["prompt"], row["completion"]))
    if not examples:
        raise EdgeLoraError(f"{path}: no examples")
    return examples


def load_tokenizer(base_dir: Path):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(base_dir, trust_remote_code=False)
    except Exception as e:
        raise EdgeLoraError(f"{base_dir}: cannot load a tokenizer ({str(e).splitlines()[0]})") from None
    if tokenizer.eos_token_id is None:
        raise EdgeLoraError(f"{base_dir}: the tokenizer has no EOS token, so completions cannot end")
    return tokenizer


def encode(tokenizer, ex: Example) -> tuple[list[int], list[int]]:
    """(input ids, labels): the prompt as generation sees it (special tokens included), labels only on the
    completion and the EOS that ends it."""
    prompt = tokenizer(ex.prompt)["input_ids"]
    completion = tokenizer(ex.completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt + completion, [IGNORE] * len(prompt) + completion

"""The export-time quality report: what quantizing cost, per adapter, against the fp32 reference."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgelora.adapter_file import read_adapter
from edgelora.errors import EdgeLoraError
from edgelora.factors import AdapterFactors
from edgelora.manifest import SlotGroup

from .train import IGNORE, encode, read_examples

RANDOM_SHAPE = (4, 32)
MAX_EXAMPLES = 32  # of a probe file; enough tokens to see a 1% disagreement, few enough to stay seconds
MAX_TOKENS = 512  # per example


@dataclass(frozen=True)
class Probe:
    """Rows of token ids, and per row the positions whose top-1 token is compared.

    Random ids score every position. Examples score only the positions that predict a completion token:
    after a prompt's token the next one is whatever the user typed, the model's distribution there is
    nearly flat, and int4 factors flip those near-ties while agreeing on every completion token (measured
    on the demo's four trained adapters: 89-99% over all positions, 100% over the completions).
    """

    rows: list[np.ndarray]
    scored: list[np.ndarray]
    label: str


def random_probe(vocab_size: int, seed: int = 0) -> Probe:
    ids = np.random.default_rng(seed).integers(0, vocab_size, RANDOM_SHAPE)
    return Probe(list(ids), [np.ones(RANDOM_SHAPE[1], bool)] * RANDOM_SHAPE[0],
                 f"random ids, {RANDOM_SHAPE[0]}x{RANDOM_SHAPE[1]} tokens")


def examples_probe(path: str | Path, tokenizer) -> Probe:
    """The first examples of a prompt/completion JSONL file (the format ``edgelora train`` reads)."""
    rows, scored = [], []
    for ex in read_examples(path)[:MAX_EXAMPLES]:
        ids, labels = encode(tokenizer, ex)
        ids, labels = np.array(ids[:MAX_TOKENS]), np.array(labels[:MAX_TOKENS])
        rows.append(ids)
        scored.append(np.append(labels[1:] != IGNORE, False))  # position t predicts token t + 1
    count = int(sum(s.sum() for s in scored))
    if not count:
        raise EdgeLoraError(f"{path}: no completion token within the first {MAX_TOKENS} tokens of an example")
    return Probe(rows, scored, f"{Path(path).name}, {count} completion tokens of {len(rows)} examples")


def delta_error(reference: AdapterFactors, blob_path, groups: list[SlotGroup]) -> float:
    """‖Δq − Δ‖ / ‖Δ‖ over all modules, Δq from the blob exactly as the graph dequantizes it."""
    stored, _ = read_adapter(blob_path, groups)
    num = den = 0.0
    for module in reference.modules:
        want = reference.delta(module)
        got = stored.delta(module) if module in stored.modules else np.zeros_like(want)  # an all-zero module
        num += float(((got - want) ** 2).sum())
        den += float((want**2).sum())
    return float(np.sqrt(num / den)) if den else 0.0


def summary(task: str, forward, probe: Probe) -> np.ndarray:
    """What the report compares, row by row (unpadded, and a logits tensor at a time): the top-1 token at
    each scored position (a sequence classifier's one label per row), or an embedding model's mean-pooled
    embedding per row."""
    rows = []
    for ids, scored in zip(probe.rows, probe.scored):
        out = forward(ids[None])[0]
        if task == "feature-extraction":
            rows.append(out.mean(axis=0))
        else:
            top1 = out.argmax(-1)
            rows.append(top1[scored] if top1.ndim else top1[None])
    return np.stack(rows) if task == "feature-extraction" else np.concatenate(rows)


def min_cosine(reference: np.ndarray, got: np.ndarray) -> float:
    cos = (reference * got).sum(-1) / (np.linalg.norm(reference, axis=-1) * np.linalg.norm(got, axis=-1))
    return float(cos.min())


def agreement(task: str, reference: np.ndarray, got: np.ndarray) -> dict:
    """Embeddings have no top-1 token to agree on; their directions are what similarity search uses."""
    if task == "feature-extraction":
        return {"min_cosine": min_cosine(reference, got)}
    return {"top1_agreement": float((reference == got).mean())}


def torch_forward(model, output: str = "logits"):
    """The model's ``output`` (logits, or an encoder's last_hidden_state) as a function of unpadded ids."""
    import torch

    def forward(ids: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return getattr(model(torch.as_tensor(ids)), output).numpy()

    return forward

"""The export-time quality report: what quantizing cost, per adapter, against the fp32 reference."""

from __future__ import annotations

import numpy as np

from edgelora.adapter_file import read_adapter
from edgelora.factors import AdapterFactors

PROBE_SHAPE = (4, 32)


def delta_error(reference: AdapterFactors, blob_path) -> float:
    """‖Δq − Δ‖ / ‖Δ‖ over all modules, Δq from the blob exactly as the graph dequantizes it."""
    stored, _ = read_adapter(blob_path)
    num = den = 0.0
    for module in reference.modules:
        want = reference.delta(module)
        num += float(((stored.delta(module) - want) ** 2).sum())
        den += float((want**2).sum())
    return float(np.sqrt(num / den)) if den else 0.0


def probe_ids(vocab_size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab_size, PROBE_SHAPE)


def top1_agreement(reference_logits: np.ndarray, logits: np.ndarray) -> float:
    return float((reference_logits.argmax(-1) == logits.argmax(-1)).mean())


def min_cosine(reference_states: np.ndarray, states: np.ndarray) -> float:
    """Lowest cosine similarity between the probe's mean-pooled embeddings and their references."""
    ref, got = reference_states.mean(axis=1), states.mean(axis=1)
    cos = (ref * got).sum(-1) / (np.linalg.norm(ref, axis=-1) * np.linalg.norm(got, axis=-1))
    return float(cos.min())


def agreement(task: str, reference: np.ndarray, got: np.ndarray) -> dict:
    """Embeddings have no top-1 token to agree on; their directions are what similarity search uses."""
    if task == "feature-extraction":
        return {"min_cosine": min_cosine(reference, got)}
    return {"top1_agreement": top1_agreement(reference, got)}


def torch_logits(model, ids: np.ndarray, output: str = "logits") -> np.ndarray:
    """The model's ``output`` (logits, or an encoder's last_hidden_state) on unpadded ``ids``."""
    import torch

    with torch.no_grad():
        return getattr(model(torch.as_tensor(ids)), output).numpy()

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


def torch_logits(model, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(ids)).logits.numpy()

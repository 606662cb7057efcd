"""The export-time quality report: what quantizing cost, per adapter, against the fp32 reference."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgelora.errors import EdgeLoraError
from edgelora.format.adapter_file import read_adapter
from edgelora.format.factors import AdapterFactors
from edgelora.format.manifest import Manifest, Quality, SlotGroup
from edgelora.runtime import EdgeModel

from .examples import IGNORE, encode, load_tokenizer, read_examples
from .merge import with_adapter

RANDOM_SHAPE = (4, 32)
MAX_EXAMPLES = 32  # of a probe file; enough tokens to see a 1% disagreement, few enough to stay seconds
MAX_TOKENS = 512  # per example


@dataclass(frozen=True)
class Probe:
    """Rows of token ids, and per row the positions whose top-1 token is compared.

    Random ids score every position. Examples score only the positions that predict a completion token:
    after a prompt's token the next one is whatever the user typed, the model's distribution there is
    nearly flat, and int4 factors flip those near-ties while agreeing on every completion token (the
    demo's trained adapters: docs/benchmarks.md).
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


def check_probe_data(probe_data: dict[str, str | Path], adapters: dict, task: str) -> dict[str, Path]:
    """``--probe-data`` as paths by adapter name ("" for the base and the rest), refused before any work."""
    if probe_data and task != "causal-lm":
        raise EdgeLoraError(f"--probe-data: prompt/completion examples probe a causal LM; a {task} package "
                            "is probed with random ids")
    for name in probe_data:
        if name and name not in adapters:
            raise EdgeLoraError(f"--probe-data {name}=...: no adapter {name} in this export "
                                f"(adapters: {', '.join(sorted(adapters)) or 'none'})")
    return {name: Path(path) for name, path in probe_data.items()}


def read_probes(probe_data: dict[str, Path], tokenizer_dir: Path) -> dict[str, Probe]:
    """Each file's probe, keyed like ``probe_data``; an empty dict when every probe is random ids."""
    if not probe_data:
        return {}
    tokenizer = load_tokenizer(tokenizer_dir)
    return {name: examples_probe(path, tokenizer) for name, path in probe_data.items()}


def quality_report(model, factors: dict[str, AdapterFactors], package: Path, manifest: Manifest,
                   probes: dict[str, Probe], with_base: bool = True) -> dict[str, Quality]:
    """Per adapter (and the bare base): what quantization cost against fp32 PyTorch on its probe."""
    runtime = EdgeModel.open(package, verify=False)  # the blobs' sha256s were computed as they were written
    task, output = manifest.task, manifest.graph["outputs"][0]
    default = probes.get("") or random_probe(manifest.graph["vocab_size"])

    def package_forward(adapter):
        if task == "causal-lm":
            return lambda ids: runtime.logits(ids, adapter=adapter)
        return lambda ids: runtime.encoder_output(ids, adapter=adapter)

    def measured(name: str, reference_model, **fields) -> Quality:
        probe = probes.get(name, default)
        reference = summary(task, torch_forward(reference_model, output), probe)
        got = summary(task, package_forward(name or None), probe)
        return Quality(**fields, **agreement(task, reference, got), probe=probe.label)

    report = {"": measured("", model, dtype=manifest.base_quantization)} if with_base else {}
    for name, f in factors.items():
        entry = manifest.adapters[name]
        report[name] = measured(
            name, with_adapter(model, f), dtype=entry.dtype,
            delta_rel_error=(None if manifest.mode == "merged"
                             else delta_error(f, package / entry.file, manifest.slot_groups)),
        )
    return report


def print_quality(quality: dict[str, Quality], why_not: str = "") -> None:
    """One line per adapter on stderr, where the export's progress goes."""
    for name, q in quality.items():
        err = "" if q.delta_rel_error is None else f"delta rel. error {q.delta_rel_error:.2e}"
        if q.top1_agreement is not None:
            agree = f"top-1 agreement {q.top1_agreement:.1%} on {q.probe}"
        elif q.min_cosine is not None:
            agree = f"min. embedding cosine {q.min_cosine:.6f} on {q.probe}"
        else:
            agree = f"agreement not measured: {why_not}"
        print(f"  {name or '(base)'}: {', '.join(filter(None, (err, agree)))}", file=sys.stderr)

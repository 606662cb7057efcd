"""Writing packages: ``export`` (base graph + adapters) and ``add_adapter`` (a blob for an existing graph).

Both build in a temporary folder and swap it in whole at the end (``fileio.atomic_dir``), so a
failure or a kill leaves the previous package, or none, never half of one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
from pathlib import Path

from edgelora.adapter_file import SUFFIX, adapter_parameters, write_adapter
from edgelora.codec import BLOCK_SIZES, check_dtype
from edgelora.errors import EdgeLoraError
from edgelora.factors import AdapterFactors
from edgelora.fileio import atomic_dir, check_name, exclusive, sha256_file
from edgelora.manifest import AdapterEntry, Manifest, Quality, Slot, SlotGroup, load_manifest
from edgelora.progress import Steps
from edgelora.sidecar import write_sidecar

from . import phases
from .peft_ingest import ingest_peft, source_bytes
from .quality import Probe, agreement, delta_error, examples_probe, random_probe, summary, torch_forward

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
)


def check_fits(factors: AdapterFactors, slots: dict[str, Slot], name: str) -> None:
    """An adapter fits a graph when every module it targets has a slot of the same in/out shape.

    Shapes are checked first: an adapter for another base usually also targets modules the
    package lacks, and "another base model" is the more useful thing to hear.
    """
    for module, f in sorted(factors.modules.items()):
        s = slots.get(module)
        if s is not None and (f.in_features, f.out_features) != (s.in_features, s.out_features):
            raise EdgeLoraError(
                f"adapter {name} ({factors.source}): module {module} maps {f.in_features}->{f.out_features} "
                f"but the package's slot maps {s.in_features}->{s.out_features}; is it for another base model?"
            )
    missing = sorted(set(factors.modules) - set(slots))
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise EdgeLoraError(
            f"adapter {name} ({factors.source}): module {missing[0]}{more} has no LoRA slot in the package; "
            "re-export the base with this adapter to add slots"
        )


def base_fingerprint(model) -> str:
    """sha256 over the base weights (names, shapes, bytes), so adapters can be tied to the base they fit."""
    import torch

    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()


def grouped_slots(slots: list[Slot], groups: list[SlotGroup]) -> list[Slot]:
    """The slots, those in a group pointing at the group's graph factors."""
    group_of = {module: group for group in groups for module in group.modules}
    return [dataclasses.replace(s, a=group_of[s.name].a, b=group_of[s.name].b) if s.name in group_of else s
            for s in slots]


def write_adapter_entry(package: Path, name: str, factors: AdapterFactors, source: Path, dtype: str,
                        block: int, fingerprint: str, groups: list[SlotGroup]) -> AdapterEntry:
    """The blob, its ``NAME.json`` sidecar (base fingerprint, sha256: the blob stays checkable when copied
    out of the package on its own) and its manifest entry."""
    rel = f"adapters/{name}{SUFFIX}"
    size = write_adapter(package / rel, factors, dtype, block, groups)
    digest = sha256_file(package / rel)
    write_sidecar(package / rel, fingerprint, digest)
    return AdapterEntry(
        file=rel,
        sha256=digest,
        bytes=size,
        rank=factors.rank,
        alpha=factors.alpha,
        dtype=dtype,
        source=str(source),
        source_bytes=source_bytes(source),
        modules=sorted(factors.modules),
    )


AUTO_CLASSES = {
    "causal-lm": "AutoModelForCausalLM",
    "feature-extraction": "AutoModel",
    "sequence-classification": "AutoModelForSequenceClassification",
}


def check_base_dir(base_dir: Path) -> str:
    """Refuse a wrong base folder before minutes of work start, from its config alone; returns its task."""
    from transformers import AutoConfig

    from .causal_lm import FAMILIES
    from .encoder import ARCHITECTURES

    if not (base_dir / "config.json").is_file():
        raise EdgeLoraError(f"{base_dir / 'config.json'}: missing; {base_dir} is not a Hugging Face model folder")
    try:
        config = AutoConfig.from_pretrained(base_dir, trust_remote_code=False)  # never run a folder's code, nor ask to
    except Exception as e:
        raise EdgeLoraError(f"{base_dir / 'config.json'}: cannot be read ({str(e).splitlines()[0]})") from None
    archs = config.architectures or []
    for arch in archs:
        if arch in FAMILIES:
            return "causal-lm"
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch][1]
    raise EdgeLoraError(
        f"{base_dir / 'config.json'}: architecture {archs or config.model_type} is not supported yet; "
        f"supported: {', '.join(sorted([*FAMILIES, *ARCHITECTURES]))}"
    )


def load_base(base_dir: Path, task: str = "causal-lm"):
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own step line already says what is loading
    try:
        return getattr(transformers, AUTO_CLASSES[task]).from_pretrained(base_dir, dtype="float32",
                                                                           trust_remote_code=False).eval()
    except Exception as e:
        raise EdgeLoraError(f"{base_dir}: cannot load the model weights ({str(e).splitlines()[0]})") from None


def graph_exporter(task: str):
    """The module that exports a task's graph: ``family_of(model)`` and ``export_graph(model, slots, path, ...)``."""
    from . import causal_lm, encoder

    return causal_lm if task == "causal-lm" else encoder


def generation_info(base_dir: Path, config) -> dict:
    eos = config.eos_token_id
    gen_path = base_dir / "generation_config.json"
    if gen_path.is_file():
        eos = json.loads(gen_path.read_text()).get("eos_token_id", eos)
    eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    return {"eos_token_ids": eos_ids, "bos_token_id": config.bos_token_id, "pad_token_id": config.pad_token_id}


def graph_bytes(graph_path: Path) -> int:
    data = graph_path.with_name(graph_path.name + ".data")
    return graph_path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def export_package(
    base_dir: str | Path,
    adapters: dict[str, str | Path],
    out: str | Path,
    overwrite: bool = False,
    progress: bool = True,
    adapter_dtype: str = "fp32",
    block_size: int = 32,
    quantize: str = "none",
    accuracy_level: int | None = None,
    mode: str = "separate",
    probe_data: dict[str, str | Path] | None = None,
) -> Manifest:
    """Export a package; in ``merged`` mode each adapter becomes its own graph with the delta folded in.

    ``probe_data`` maps an adapter name to a prompt/completion JSONL file its quality is measured on;
    the key "" is the file for the base and for every adapter without its own (default: random ids)."""
    from .merge import merged_copy
    from .shared_weights import base_tensors, share_base_tensors
    from .slots import slots_for

    base_dir, out = Path(base_dir), Path(out)
    check_dtype(adapter_dtype)
    if block_size not in BLOCK_SIZES:
        raise EdgeLoraError(f"--block-size {block_size}: use one of {', '.join(map(str, BLOCK_SIZES))}")
    if mode not in ("separate", "merged"):
        raise EdgeLoraError(f"--mode {mode!r}: use separate or merged")
    for name in adapters:
        check_name(name)
    task = check_base_dir(base_dir)
    probe_data = check_probe_data(probe_data or {}, adapters, task)
    exporter = graph_exporter(task)
    if out.exists() and not overwrite:
        raise EdgeLoraError(f"{out}: already exists (pass --overwrite to replace it)")
    merged = mode == "merged"
    steps = Steps(6 + (len(adapters) if merged else 0), enabled=progress)
    with steps.step(f"reading {len(adapters)} PEFT adapter(s)"):
        factors = {name: ingest_peft(path, merged=merged) for name, path in adapters.items()}
        for f in factors.values() if not merged else ():  # what the codec cannot hold fails now, not after the export
            adapter_parameters(f, adapter_dtype, block_size)
        probes = read_probes(probe_data, base_dir)  # so does a bad probe file
    with steps.step(f"loading base model {base_dir}"):
        model = load_base(base_dir, task)
        try:
            family = exporter.family_of(model)
        except EdgeLoraError as e:  # a config whose architectures and model_type disagree
            raise EdgeLoraError(f"{base_dir / 'config.json'}: {e}") from None
        for name, f in factors.items():
            try:
                own = slots_for(model, list(f.modules))
            except EdgeLoraError as e:
                raise EdgeLoraError(f"adapter {name} ({f.source}): {e}") from None
            check_fits(f, {s.name: s for s in own}, name)
        targets = [] if merged else [m for f in factors.values() for m in f.modules]
        slots = slots_for(model, targets, adapter_dtype)
        fingerprint = base_fingerprint(model)
    quant = f", base {quantize}" if quantize != "none" else ""
    with atomic_dir(out, overwrite=overwrite) as tmp:
        with steps.step(f"exporting the {family} graph with {len(slots)} LoRA slots{quant} (torch.onnx dynamo)"):
            with phases.shown(steps.stream if progress else None):
                graph, groups = exporter.export_graph(model, slots, tmp / "model.onnx", adapter_dtype, block_size,
                                                      quantize, accuracy_level)
        slots = grouped_slots(slots, groups)
        entries = {}
        if merged:
            base = base_tensors(tmp / "model.onnx")
            for name, f in factors.items():
                path = tmp / "merged" / name / "model.onnx"
                with steps.step(f"exporting merged graph {name}{quant}"):
                    with phases.shown(steps.stream if progress else None):
                        exporter.export_graph(merged_copy(model, f, name), [], path, adapter_dtype, block_size,
                                              quantize, accuracy_level)
                    share_base_tensors(path, base)
                entries[name] = AdapterEntry(
                    file=str(path.relative_to(tmp)), sha256=sha256_file(path), bytes=graph_bytes(path),
                    rank=f.rank, alpha=f.alpha, dtype="merged", source=str(adapters[name]),
                    source_bytes=source_bytes(adapters[name]), modules=sorted(f.modules),
                )
        with steps.step(f"writing {'merged entries' if merged else adapter_dtype + ' adapters'}"):
            if not merged:
                entries = {name: write_adapter_entry(tmp, name, f, Path(adapters[name]), adapter_dtype, block_size,
                                                   fingerprint, groups)
                           for name, f in factors.items()}
        with steps.step("writing manifest and tokenizer"):
            tokenizer = None
            for fname in TOKENIZER_FILES:
                if (base_dir / fname).is_file():
                    shutil.copy2(base_dir / fname, tmp / fname)
                    tokenizer = tokenizer or ("tokenizer.json" if fname == "tokenizer.json" else None)
            manifest = Manifest(
                family=family,
                architecture=type(model).__name__,
                task=task,
                base_fingerprint=fingerprint,
                graph=graph,
                slots=slots,
                slot_groups=groups,
                adapters=entries,
                generation=generation_info(base_dir, model.config),
                tokenizer=tokenizer,
                mode=mode,
                adapter_dtype=adapter_dtype,
                adapter_block_size=block_size,
                base_quantization=quantize,
                base_bytes=graph_bytes(tmp / "model.onnx"),
                base_source=str(base_dir),
            )
            manifest.save(tmp)
        with steps.step("measuring quality against fp32 on a probe batch"):
            manifest.quality = quality_report(model, factors, tmp, manifest, probes)
            manifest.save(tmp)
    if progress:
        print_quality(manifest.quality)
        print(f"wrote {out} in {steps.elapsed():.1f}s", flush=True)
    return manifest


def print_quality(quality: dict[str, Quality], why_not: str = "") -> None:
    for name, q in quality.items():
        err = "" if q.delta_rel_error is None else f"delta rel. error {q.delta_rel_error:.2e}"
        if q.top1_agreement is not None:
            agree = f"top-1 agreement {q.top1_agreement:.1%} on {q.probe}"
        elif q.min_cosine is not None:
            agree = f"min. embedding cosine {q.min_cosine:.6f} on {q.probe}"
        else:
            agree = f"agreement not measured: {why_not}"
        print(f"  {name or '(base)'}: {', '.join(filter(None, (err, agree)))}", file=sys.stderr)


def check_probe_data(probe_data: dict[str, str | Path], adapters: dict, task: str) -> dict[str, Path]:
    if probe_data and task != "causal-lm":
        raise EdgeLoraError(f"--probe-data: prompt/completion examples probe a causal LM; a {task} package "
                            "is probed with random ids")
    for name in probe_data:
        if name and name not in adapters:
            raise EdgeLoraError(f"--probe-data {name}=...: no adapter {name} in this export "
                                f"(adapters: {', '.join(sorted(adapters)) or 'none'})")
    return {name: Path(path) for name, path in probe_data.items()}


def read_probes(probe_data: dict[str, Path], base_dir: Path) -> dict[str, Probe]:
    """Each file's probe, keyed like ``probe_data``; an empty dict when every probe is random ids."""
    if not probe_data:
        return {}
    from .train import load_tokenizer

    tokenizer = load_tokenizer(base_dir)
    return {name: examples_probe(path, tokenizer) for name, path in probe_data.items()}


def quality_report(model, factors: dict[str, AdapterFactors], package: Path, manifest: Manifest,
                   probes: dict[str, Probe], with_base: bool = True) -> dict[str, Quality]:
    """Per adapter (and the bare base): what quantization cost against fp32 PyTorch on its probe."""
    from edgelora.runtime import EdgeModel

    from .merge import with_adapter

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


def add_adapter(package: str | Path, name: str, peft_dir: str | Path, overwrite: bool = False,
                adapter_dtype: str | None = None, base_dir: str | Path | None = None,
                probe_data: str | Path | None = None, progress: bool = False) -> AdapterEntry:
    """Add one adapter without touching the graph: seconds, not an export.

    The PEFT weights are float, so they are encoded in the package's codec; asking for another
    codec is refused, since the graph's slots take exactly one. The adapter's quality is measured as
    at export (``check`` gates on it) when the fp32 base is at hand: ``base_dir``, else the folder
    the package was exported from if it still holds the same weights.
    """
    package = Path(package)
    check_name(name)
    if not package.is_dir():
        raise EdgeLoraError(f"{package}: not a package directory")
    with exclusive(package):  # a second add-adapter waits, then starts from the manifest with this one's adapter
        manifest = load_manifest(package)
        if manifest.mode == "merged":
            raise EdgeLoraError(f"{package}: a merged package has one graph per adapter; "
                                "re-export it with the new adapter")
        if adapter_dtype is not None and check_dtype(adapter_dtype) != manifest.adapter_dtype:
            raise EdgeLoraError(
                f"{package}: the graph's LoRA slots take {manifest.adapter_dtype} factors, not {adapter_dtype}; "
                f"omit --adapter-dtype, or re-export the base with --adapter-dtype {adapter_dtype}"
            )
        if name in manifest.adapters and not overwrite:
            raise EdgeLoraError(f"{package}: adapter {name} already exists (pass --overwrite to replace it)")
        factors = ingest_peft(peft_dir)
        check_fits(factors, manifest.slot_map(), name)
        probe = check_probe_data({name: probe_data} if probe_data else {}, {name: peft_dir}, manifest.task)
        model, why_not = reference_base(package, manifest, base_dir)
        if model is None and probe:
            raise EdgeLoraError(f"--probe-data needs the fp32 base model: {why_not}")
        probes = read_probes(probe, package)  # the package carries the base's tokenizer files
        # blob, sidecar and manifest change together or not at all: a linked copy of the package, swapped in whole
        with atomic_dir(package.resolve(), update=True) as tmp:
            entry = write_adapter_entry(tmp, name, factors, Path(peft_dir), manifest.adapter_dtype,
                                        manifest.adapter_block_size, manifest.base_fingerprint, manifest.slot_groups)
            manifest.adapters[name] = entry
            manifest.save(tmp)
            if model is None:  # the stored delta's error needs no base; either branch replaces an old report
                error = delta_error(factors, tmp / entry.file, manifest.slot_groups)
                manifest.quality[name] = Quality(dtype=entry.dtype, delta_rel_error=error)
            else:  # the runtime reads the package from disk: the manifest above already has the new adapter
                manifest.quality.update(quality_report(model, {name: factors}, tmp, manifest, probes, with_base=False))
            manifest.save(tmp)
    if progress:
        print_quality({name: manifest.quality[name]}, why_not)
    return entry


def reference_base(package: Path, manifest: Manifest, base_dir: str | Path | None):
    """(the fp32 base model, "") for the quality report, or (None, why not) when it is not at hand.

    A base named by the user must be the one the package was exported from; the folder recorded at
    export is used only if it still is, since a base retrained in place would measure the wrong thing.
    """
    if base_dir is None:
        recorded = Path(manifest.base_source) if manifest.base_source else None
        if recorded is None or not (recorded / "config.json").is_file():
            return None, f"the base it was exported from ({recorded or 'not recorded'}) is not there; pass --base"
        try:
            model = load_base(recorded, manifest.task)
        except EdgeLoraError as e:  # the user did not name this folder: its failure must not stop the add
            return None, f"{e}; pass --base"
        if base_fingerprint(model) != manifest.base_fingerprint:
            return None, f"{recorded} no longer holds the weights {package} was exported from; pass --base"
        return model, ""
    base_dir = Path(base_dir)
    model = load_base(base_dir, check_base_dir(base_dir))
    if base_fingerprint(model) != manifest.base_fingerprint:
        raise EdgeLoraError(f"{base_dir}: not the base {package} was exported from (its weights differ)")
    return model, ""

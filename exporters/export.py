"""``edgelora export``: a base model and its PEFT adapters into one package.

The package is built in a temporary folder and swapped in whole at the end (``fileio.atomic_dir``), so a
failure or a kill leaves the previous package, or none, never half of one. Every input is checked before
the slow steps start: names, options, the base folder's config, each adapter against the codec and the
base's modules, the probe files.
"""

from __future__ import annotations

from pathlib import Path

from edgelora.errors import EdgeLoraError
from edgelora.format.adapter_file import adapter_parameters
from edgelora.format.compatibility import check_fits
from edgelora.format.factors import AdapterFactors
from edgelora.format.fileio import atomic_dir, check_name, sha256_file
from edgelora.format.manifest import AdapterEntry, Manifest, Slot

from . import causal_lm, encoder, phases
from .base_model import base_fingerprint, check_base_dir, generation_info, load_base
from .merge import merged_copy
from .options import ExportOptions
from .package_files import copy_tokenizer, graph_bytes, grouped_slots, write_adapter_entry
from .peft_ingest import ingest_peft, source_bytes
from .progress import Steps
from .quality import check_probe_data, print_quality, quality_report, read_probes
from .shared_weights import base_tensors, share_base_tensors
from .slots import slots_for

def graph_exporter(task: str):
    """The module that exports a task's graph: ``family_of(model)`` and ``export_graph(model, slots, path, ...)``."""
    return causal_lm if task == "causal-lm" else encoder


def export_package(base_dir: str | Path, adapters: dict[str, str | Path], out: str | Path,
                   options: ExportOptions = ExportOptions()) -> Manifest:
    """Export a package; in ``merged`` mode each adapter becomes its own graph with the delta folded in."""
    base_dir, out, o = Path(base_dir), Path(out), options
    o.check()
    for name in adapters:
        check_name(name)
    task = check_base_dir(base_dir)
    probe_data = check_probe_data(o.probe_data, adapters, task)
    exporter = graph_exporter(task)
    if out.exists() and not o.overwrite:
        raise EdgeLoraError(f"{out}: already exists (pass --overwrite to replace it)")
    merged = o.mode == "merged"
    steps = Steps(6 + (len(adapters) if merged else 0), enabled=o.progress)
    shown = steps.stream if o.progress else None
    with steps.step(f"reading {len(adapters)} PEFT adapter(s)"):
        factors = {name: ingest_peft(path, merged=merged) for name, path in adapters.items()}
        for f in factors.values() if not merged else ():  # what the codec cannot hold fails now, not after the export
            adapter_parameters(f, o.adapter_dtype, o.block_size)
        probes = read_probes(probe_data, base_dir)  # so does a bad probe file
    with steps.step(f"loading base model {base_dir}"):
        model = load_base(base_dir, task)
        try:
            family = exporter.family_of(model)
        except EdgeLoraError as e:  # a config whose architectures and model_type disagree
            raise EdgeLoraError(f"{base_dir / 'config.json'}: {e}") from None
        slots = base_slots(model, factors, o.adapter_dtype, merged)
        fingerprint = base_fingerprint(model)
    quant = f", base {o.quantize}" if o.quantize != "none" else ""
    with atomic_dir(out, overwrite=o.overwrite) as tmp:
        with steps.step(f"exporting the {family} graph with {len(slots)} LoRA slots{quant} (torch.onnx dynamo)"):
            with phases.shown(shown):
                graph, groups = exporter.export_graph(model, slots, tmp / "model.onnx", o)
        entries = {}
        if merged:
            base = base_tensors(tmp / "model.onnx")
            for name, f in factors.items():
                path = tmp / "merged" / name / "model.onnx"
                with steps.step(f"exporting merged graph {name}{quant}"):
                    with phases.shown(shown):
                        exporter.export_graph(merged_copy(model, f, name), [], path, o)
                    share_base_tensors(path, base)
                entries[name] = merged_entry(tmp, path, f, Path(adapters[name]))
        with steps.step(f"writing {'merged entries' if merged else o.adapter_dtype + ' adapters'}"):
            if not merged:
                entries = {name: write_adapter_entry(tmp, name, f, Path(adapters[name]), o.adapter_dtype,
                                                     o.block_size, fingerprint, groups)
                           for name, f in factors.items()}
        with steps.step("writing manifest and tokenizer"):
            manifest = Manifest(
                family=family,
                architecture=type(model).__name__,
                task=task,
                base_fingerprint=fingerprint,
                graph=graph,
                slots=grouped_slots(slots, groups),
                slot_groups=groups,
                adapters=entries,
                generation=generation_info(base_dir, model.config),
                tokenizer=copy_tokenizer(base_dir, tmp),
                mode=o.mode,
                adapter_dtype=o.adapter_dtype,
                adapter_block_size=o.block_size,
                base_quantization=o.quantize,
                base_bytes=graph_bytes(tmp / "model.onnx"),
                base_source=str(base_dir),
            )
            manifest.save(tmp)
        with steps.step("measuring quality against fp32 on a probe batch"):
            manifest.quality = quality_report(model, factors, tmp, manifest, probes)
            manifest.save(tmp)
    if o.progress:
        print_quality(manifest.quality)
        print(f"wrote {out} in {steps.elapsed():.1f}s", flush=True)
    return manifest


def base_slots(model, factors: dict[str, AdapterFactors], adapter_dtype: str, merged: bool) -> list[Slot]:
    """The graph's slots: one per module any adapter targets (none in merged mode), each adapter checked
    against the slots its own modules get, so a bad one is named alone."""
    for name, f in factors.items():
        try:
            own = slots_for(model, list(f.modules))
        except EdgeLoraError as e:
            raise EdgeLoraError(f"adapter {name} ({f.source}): {e}") from None
        check_fits(f, {s.name: s for s in own}, f"adapter {name} ({f.source})")
    targets = [] if merged else [m for f in factors.values() for m in f.modules]
    return slots_for(model, targets, adapter_dtype)


def merged_entry(package: Path, graph: Path, factors: AdapterFactors, source: Path) -> AdapterEntry:
    """A merged adapter's manifest entry: its graph, whose bytes count only what it adds to the base's."""
    return AdapterEntry(file=str(graph.relative_to(package)), sha256=sha256_file(graph), bytes=graph_bytes(graph),
                        rank=factors.rank, alpha=factors.alpha, dtype="merged", source=str(source),
                        source_bytes=source_bytes(source), modules=sorted(factors.modules))

"""``edgelora add-adapter``: one more blob for an existing package's graph, in seconds rather than an export.

The PEFT weights are float, so they are encoded in the package's codec; asking for another codec is
refused, since the graph's slots take exactly one. Blob, sidecar and manifest change together or not at
all: the work happens in a hard-linked copy of the package that is swapped in whole, under a lock, so
concurrent runs each start from the manifest that holds the others' adapters.
"""

from __future__ import annotations

from pathlib import Path

from edgelora.errors import EdgeLoraError
from edgelora.format.codec import check_dtype
from edgelora.format.compatibility import check_fits
from edgelora.format.fileio import atomic_dir, check_name, exclusive
from edgelora.format.manifest import AdapterEntry, Manifest, Quality, load_manifest

from .base_model import base_fingerprint, check_base_dir, load_base
from .package_files import write_adapter_entry
from .peft_ingest import ingest_peft
from .quality import check_probe_data, delta_error, print_quality, quality_report, read_probes


def add_adapter(package: str | Path, name: str, peft_dir: str | Path, overwrite: bool = False,
                adapter_dtype: str | None = None, base_dir: str | Path | None = None,
                probe_data: str | Path | None = None, progress: bool = False) -> AdapterEntry:
    """Add one adapter without touching the graph. Its quality is measured as at export (``check`` gates on
    it) when the fp32 base is at hand: ``base_dir``, else the folder the package was exported from if it
    still holds the same weights."""
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
        check_fits(factors, manifest.slot_map(), f"adapter {name} ({factors.source})")
        probe = check_probe_data({name: probe_data} if probe_data else {}, {name: peft_dir}, manifest.task)
        model, why_not = reference_base(package, manifest, base_dir)
        if model is None and probe:
            raise EdgeLoraError(f"--probe-data needs the fp32 base model: {why_not}")
        probes = read_probes(probe, package)  # the package carries the base's tokenizer files
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

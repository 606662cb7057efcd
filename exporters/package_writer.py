"""Deprecated: the old home of package writing, split by job into ``export`` (``ExportOptions``,
``export_package``), ``add_adapter``, ``base_model``, ``package_files`` and ``quality``.

Kept for a release so code written against it keeps running; ``export_package`` here still takes the
old keyword arguments and passes them on as an ``ExportOptions``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from edgelora.format.manifest import Manifest

from . import export
from .add_adapter import add_adapter, reference_base
from .base_model import base_fingerprint, check_base_dir, generation_info, load_base
from .package_files import TOKENIZER_FILES, graph_bytes, grouped_slots, write_adapter_entry
from .quality import check_probe_data, print_quality, quality_report, read_probes

__all__ = ["TOKENIZER_FILES", "add_adapter", "base_fingerprint", "check_base_dir", "check_probe_data",
           "export_package", "generation_info", "graph_bytes", "grouped_slots", "load_base", "print_quality",
           "quality_report", "read_probes", "reference_base", "write_adapter_entry"]

warnings.warn("edgelora.exporters.package_writer is split into edgelora.exporters.export, add_adapter, base_model, "
              "package_files and quality; the old module will go away", DeprecationWarning, stacklevel=2)


def export_package(base_dir: str | Path, adapters: dict[str, str | Path], out: str | Path, **options) -> Manifest:
    """``export.export_package`` with its options as keyword arguments, as this module took them."""
    return export.export_package(base_dir, adapters, out, export.ExportOptions(**options))

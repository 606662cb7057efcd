"""The package format, shared by every layer: the manifest (``manifest``), adapter blobs (``adapter_file``)
with their codecs (``codec``) and slot-group layout (``slot_groups``), sidecars (``sidecar``), the fit of
an adapter to a graph (``compatibility``), and the atomic file writes they rely on (``fileio``).

numpy, onnxruntime and the standard library only, so a device reads packages without torch; the spec is
docs/format.md.
"""

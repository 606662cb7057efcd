"""edgelora: PEFT LoRA adapters as small, swappable blobs for one ONNX base model on a device.

Sub-packages, in the order data flows through them: ``edgelora.format`` (the package format: manifest,
adapter blobs and their codecs, shared by every other layer), ``edgelora.training`` and
``edgelora.exporters`` (host side, torch), ``edgelora.runtime`` (device side, numpy + onnxruntime),
``edgelora.checks`` (``edgelora check``, on the runtime), ``edgelora.demo``; ``edgelora.cli`` on top.
"""

from . import moved

__version__ = "0.1.0"

moved.install()

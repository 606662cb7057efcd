"""edgelora: PEFT LoRA adapters as small, swappable blobs for one ONNX base model on a device."""

__version__ = "0.1.0"

"""The on-device runtime: numpy + onnxruntime (+ tokenizers for text), never torch."""

from edgelora.errors import EdgeLoraError

from .model import EdgeModel, Generation

__all__ = ["EdgeModel", "EdgeLoraError", "Generation"]

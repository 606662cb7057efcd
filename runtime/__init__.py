"""The on-device runtime: numpy + onnxruntime (+ tokenizers for text), never torch."""

from edgelora.errors import BusyError, EdgeLoraError, UnknownAdapterError

from .engine import BatchEngine, BatchSettings
from .generation import Generation, TextStream
from .model import EdgeModel
from .sampling import SamplingParams

__all__ = ["BatchEngine", "BatchSettings", "BusyError", "EdgeLoraError", "EdgeModel", "Generation", "SamplingParams",
           "TextStream", "UnknownAdapterError"]

"""What ``edgelora export`` is asked to do: its options, checked before any slow step, and passed whole to the
graph exporters and the base quantization."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edgelora.errors import EdgeLoraError
from edgelora.format.codec import BLOCK_SIZES, check_dtype

MODES = ("separate", "merged")


@dataclass(frozen=True)
class ExportOptions:
    """How to export, as ``edgelora export``'s options say it (see docs/export.md)."""

    adapter_dtype: str = "fp32"  # the codec of the slots and of every blob
    block_size: int = 32  # int4 blocks along the reduction axis, of adapters and of a quantized base
    quantize: str = "none"  # base weights: none, int8 or int4 (MatMulNBits)
    accuracy_level: int | None = None  # MatMulNBits' accuracy level, passed through
    quantize_embedding: bool = True  # int4 also stores the token embedding table in int4 (GatherBlockQuantized)
    mode: str = "separate"  # or "merged": one graph per adapter with its delta folded in
    # adapter name -> prompt/completion JSONL its quality is measured on; "" for the base and the rest
    probe_data: dict[str, str | Path] = field(default_factory=dict)
    overwrite: bool = False
    progress: bool = True

    def check(self) -> None:
        check_dtype(self.adapter_dtype)
        if self.block_size not in BLOCK_SIZES:
            raise EdgeLoraError(f"--block-size {self.block_size}: use one of {', '.join(map(str, BLOCK_SIZES))}")
        if self.mode not in MODES:
            raise EdgeLoraError(f"--mode {self.mode!r}: use separate or merged")
        if not self.quantize_embedding and self.quantize != "int4":
            raise EdgeLoraError("--fp32-embedding applies to --quantize int4 only; the other bases keep the table "
                                "in fp32")

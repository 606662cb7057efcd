"""Plain low-rank factors: what every PEFT variant is normalized into before it reaches a graph.

Per target module the delta is ``x @ a @ b`` with ``a = Aᵀ`` [in, r] and ``b = scale·Bᵀ`` [r, out]:
the scale is folded into ``b`` once, at ingest, so neither the graph nor the runtime needs to know
about alpha, rsLoRA or rank patterns.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edgelora.errors import EdgeLoraError


@dataclass(frozen=True)
class ModuleFactors:
    a: np.ndarray  # [in, r]
    b: np.ndarray  # [r, out], scale folded in

    @property
    def rank(self) -> int:
        return int(self.a.shape[1])

    @property
    def in_features(self) -> int:
        return int(self.a.shape[0])

    @property
    def out_features(self) -> int:
        return int(self.b.shape[1])


@dataclass
class AdapterFactors:
    """One adapter: factors per module path (the base model's own module names)."""

    modules: dict[str, ModuleFactors]
    rank: int
    alpha: float
    source: str = ""
    extra: dict = field(default_factory=dict)

    def validate(self, where: str) -> None:
        """Refuse what would silently poison every answer: empty adapters, broken shapes, NaN/Inf."""
        if not self.modules:
            raise EdgeLoraError(f"{where}: the adapter has no LoRA weights")
        for name, f in self.modules.items():
            if f.a.ndim != 2 or f.b.ndim != 2 or f.a.shape[1] != f.b.shape[0]:
                raise EdgeLoraError(
                    f"{where}: module {name} has factors of shapes {f.a.shape} and {f.b.shape}, "
                    "which do not form a rank-r product"
                )
            if f.rank < 1:
                raise EdgeLoraError(f"{where}: module {name} has rank 0")
            for label, t in (("A", f.a), ("B", f.b)):
                if not np.isfinite(t).all():
                    raise EdgeLoraError(f"{where}: module {name} has NaN or Inf values in lora_{label}")

    def delta(self, module: str) -> np.ndarray:
        """The dense [in, out] weight delta of one module, for merging and for error reports."""
        f = self.modules[module]
        return f.a.astype(np.float64) @ f.b.astype(np.float64)

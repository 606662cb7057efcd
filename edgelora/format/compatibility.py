"""Whether an adapter fits a package's graph: the one check used at export, at ``add-adapter`` and when
the runtime loads a blob from a path, so all three refuse the same adapter with the same words.

An adapter fits when every module it targets has a slot of the same in/out shape (its rank is free:
each slot's rank is a symbolic graph dimension) and, for a blob, when it is stored in the codec the
slots take. Shapes are checked before missing slots: an adapter for another base usually also targets
modules the package lacks, and "another base model" is the more useful thing to hear.
"""

from __future__ import annotations

from collections.abc import Mapping

from edgelora.errors import EdgeLoraError

from .factors import AdapterFactors
from .manifest import Slot


def check_fits(factors: AdapterFactors, slots: Mapping[str, Slot], where: str, dtype: str | None = None) -> None:
    """Refuse, in one line starting with ``where``, an adapter the graph with these slots cannot run;
    ``dtype`` is the codec of a stored blob (None for float factors, which are encoded for the slots)."""
    for module, f in sorted(factors.modules.items()):
        s = slots.get(module)
        if s is not None and (f.in_features, f.out_features) != (s.in_features, s.out_features):
            raise EdgeLoraError(
                f"{where}: module {module} maps {f.in_features}->{f.out_features} "
                f"but the package's slot maps {s.in_features}->{s.out_features}; is it for another base model?"
            )
    missing = sorted(set(factors.modules) - set(slots))
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise EdgeLoraError(
            f"{where}: module {missing[0]}{more} has no LoRA slot in the package; "
            "re-export the base with this adapter to add slots"
        )
    taken = {s.dtype for s in slots.values()}
    if dtype is not None and taken and dtype not in taken:
        raise EdgeLoraError(f"{where}: holds {dtype} factors but the graph's slots take {', '.join(sorted(taken))}")

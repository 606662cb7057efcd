"""Between per-module factors (what PEFT, the manifest and the checks speak) and the graph's factors, where the
slots of a group (``manifest.SlotGroup``: q, k and v, or gate and up) share one pair.

A decode step on a CPU pays per node more than per multiply: five slots reading one input cost five
products, five scalings and the joins of their outputs; as one group they cost one of each
(docs/architecture.md, measured in docs/benchmarks.md).

Every module of a group takes the same rank R, the largest the adapter gives any of them: a smaller one is
padded with zero columns of ``a`` and zero rows of ``b``, and a module the adapter does not target is all
zeros, which changes no product. ``a`` [in, modules * R] holds the modules' factors side by side along the
rank axis. ``b`` [tiles, R, tile] holds their output columns cut into equal tiles (the largest width that
divides every module's columns), each tile from the module it belongs to, so the graph multiplies each tile
by its module's rank block in one batched product and the tiles side by side are the packed output. ``b``
holds no more values than the modules' own factors, where a block-diagonal ``b`` [modules * R, width] would
hold modules - 1 zeros for each value; int8 balances each module's factors before the layout
(``codec.balance_int8``), so a rank component's scale is its module's own. Reading back drops the padding.
"""

from __future__ import annotations

import math

import numpy as np

from edgelora.errors import EdgeLoraError

from .compatibility import check_fits
from .factors import AdapterFactors, ModuleFactors
from .manifest import Slot, SlotGroup


def group_name(modules: list[str]) -> str:
    """``model.layers.0.self_attn.q_proj+k_proj+v_proj``: the modules' common path, then their own names."""
    parts = [m.split(".") for m in modules]
    common = 0
    while all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    return ".".join(parts[0][:common] + ["+".join(".".join(p[common:]) for p in parts)])


def factor_names(module: str) -> tuple[str, str]:
    """The float factors of a slot (or slot group) inside the graph: ``a`` [in, r] and ``b`` [r, out].

    With fp32 slots these are the graph inputs; other codecs feed them through ``codec.param_names``.
    """
    return f"{module}.lora_A", f"{module}.lora_B"


def tiles(group: SlotGroup) -> tuple[int, list[int]]:
    """(tile width, the module each tile of the packed output belongs to); a tile no module covers (a packed
    module without a slot) is given to the first module, and its ``b`` stays zero."""
    tile = math.gcd(*group.offsets, *group.widths, group.width)
    owners = [0] * (group.width // tile)
    for i, (offset, width) in enumerate(zip(group.offsets, group.widths)):
        owners[offset // tile:(offset + width) // tile] = [i] * (width // tile)
    return tile, owners


def graph_factors(factors: AdapterFactors, groups: list[SlotGroup]) -> dict[str, np.ndarray]:
    """The adapter's float factors by their graph names: a group's modules together, the others alone."""
    grouped = {module for group in groups for module in group.modules}
    out = {}
    for group in groups:
        members = [factors.modules.get(module) for module in group.modules]
        present = [f for f in members if f is not None]
        if not present:
            continue  # the group keeps its default: no delta
        rank = max(f.rank for f in present)
        tile, owners = tiles(group)
        a = np.zeros((present[0].in_features, rank * len(members)), np.float32)
        b = np.zeros((len(owners), rank, tile), np.float32)
        # the group's modules read one input and own their columns of the packed output
        shapes = {m: Slot(m, group.a, group.b, a.shape[0], w) for m, w in zip(group.modules, group.widths)}
        check_fits(AdapterFactors({m: f for m, f in zip(group.modules, members) if f is not None}, rank, 0.0),
                   shapes, factors.source)
        for i, (f, offset, width) in enumerate(zip(members, group.offsets, group.widths)):
            if f is None:
                continue
            a[:, i * rank:i * rank + f.rank] = f.a
            first = offset // tile
            b[first:first + width // tile, :f.rank] = f.b.reshape(f.rank, width // tile, tile).transpose(1, 0, 2)
        out[group.a], out[group.b] = a, b
    for module, f in factors.modules.items():
        if module not in grouped:
            a_name, b_name = factor_names(module)
            out[a_name], out[b_name] = f.a, f.b
    return out


def module_factors(tensors: dict[str, np.ndarray], groups: list[SlotGroup], where: str) -> dict[str, ModuleFactors]:
    """Per-module factors back from graph factors (``graph_factors``' inverse, rank padding dropped)."""
    by_a = {group.a: group for group in groups}
    grouped = {module: group for group in groups for module in group.modules}
    modules = {}
    for name in sorted(tensors):
        if not name.endswith(".lora_A"):
            continue
        a, b = tensors[name], tensors[name[: -len("A")] + "B"]
        group = by_a.get(name)
        if group is None:
            if "+" in name:
                raise EdgeLoraError(f"{where}: {name} is the factor of a slot group; read the blob with its "
                                    "package's slot groups")
            module = name[: -len(".lora_A")]
            if module in grouped:
                raise EdgeLoraError(f"{where}: holds {module} alone, but the graph computes it in slot group "
                                    f"{grouped[module].a[: -len('.lora_A')]}; write the blob with the package's "
                                    "slot groups")
            modules[module] = ModuleFactors(a, b)
            continue
        tile, owners = tiles(group)
        n = len(group.modules)
        if a.shape[1] % n or b.shape != (len(owners), a.shape[1] // n, tile):
            raise EdgeLoraError(f"{where}: slot group {name[: -len('.lora_A')]} has factors {a.shape} x {b.shape}, "
                                f"which do not split into {n} modules and {len(owners)} tiles of {tile} columns; "
                                "is it for another base model?")
        rank = b.shape[1]
        for i, (module, offset, width) in enumerate(zip(group.modules, group.offsets, group.widths)):
            first = offset // tile
            a_i = a[:, i * rank:(i + 1) * rank]
            b_i = np.concatenate(list(b[first:first + width // tile]), axis=1)
            used = a_i.any(axis=0) | b_i.any(axis=1)
            if used.any():
                modules[module] = ModuleFactors(np.ascontiguousarray(a_i[:, used]), np.ascontiguousarray(b_i[used]))
    return modules

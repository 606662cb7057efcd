"""The CLI's adapter syntax, ``NAME``, ``NAME:WEIGHT`` and several of them, as the runtime's adapter argument.

Shared by the command line (``--adapter legal:0.7 --adapter medical:0.3``) and the server (a request's
``model``, ``legal:0.7+medical:0.3``), so both read one syntax the same way.
"""

from __future__ import annotations

from .errors import EdgeLoraError


def parse_generate_adapters(specs: tuple[str, ...], what: str = "--adapter"):
    """``NAME`` -> the adapter; ``NAME:WEIGHT`` -> its strength; several -> their composition.

    ``what`` names the argument in errors: the CLI's ``--adapter``, or a server request's ``model``."""
    if not specs:
        return None
    if len(specs) == 1 and ":" not in specs[0]:
        return specs[0]
    weights: dict[str, float] = {}
    for spec in specs:
        name, sep, weight = spec.partition(":")
        try:
            value = float(weight) if sep else 1.0
        except ValueError:
            raise EdgeLoraError(f"{what} {spec!r}: expected NAME or NAME:WEIGHT with a number") from None
        if not name or name in weights:
            raise EdgeLoraError(f"{what} {spec!r}: " + ("the same name is given twice" if name else "no name"))
        weights[name] = value
    return weights

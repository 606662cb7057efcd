"""Editing a graph's initializers in place, without copying the ones that stay.

The protobuf runtime keeps a message's memory in an arena that only grows while the message lives: rebuilding
``graph.initializer`` (clear, then extend with the kept tensors) copies every weight and keeps the old copies,
so each rewrite of a graph added the model's size again, and a 1B model's export outgrew 24 GiB.
"""

from __future__ import annotations

import onnx


def replace_initializers(graph: onnx.GraphProto, drop, add=()) -> None:
    """Remove the initializers named in ``drop`` and append ``add``; the others are neither moved nor copied."""
    drop = set(drop)
    for index in reversed([i for i, t in enumerate(graph.initializer) if t.name in drop]):
        del graph.initializer[index]
    graph.initializer.extend(add)

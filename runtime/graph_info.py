"""What the runtime reads from a package's ``graph`` and ``generation`` sections, checked once at open.

Every other runtime module takes a ``GraphInfo`` instead of reaching into the manifest's dicts, so a
malformed package fails at ``EdgeModel.open`` with one line naming the field, not at some later call.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgelora.errors import EdgeLoraError


@dataclass(frozen=True)
class GraphInfo:
    task: str
    inputs: list[str]
    outputs: list[str]
    num_layers: int
    vocab_size: int
    num_kv_heads: int | None  # causal-lm only, as are the fields below
    head_dim: int | None
    max_positions: int | None  # the model's context; None in packages exported before it was recorded
    shared_kv: bool  # GroupQueryAttention: the KV cache is one buffer bound as both past and present
    row_mask: str | None  # the per-row adapter mask input, in packages exported with it
    logits_keep: str | None  # the input limiting the logits to a pass's last positions, in packages exported with it
    eos_token_ids: frozenset[int]
    max_length: int | None  # encoders' longest input

    @property
    def past_names(self) -> list[str]:
        layers = self.num_layers if self.task == "causal-lm" else 0  # encoders have no KV cache
        return [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]

    @classmethod
    def read(cls, package: Path, manifest) -> "GraphInfo":
        where = package / "edgelora.json"
        graph = manifest.graph
        causal = manifest.task == "causal-lm"
        keys = ("num_layers", "num_kv_heads", "head_dim") if causal else ("num_layers", "max_length")
        for key in (*keys, "vocab_size"):
            _positive(where, f"graph.{key}", graph.get(key))
        if graph.get("max_positions") is not None:
            _positive(where, "graph.max_positions", graph["max_positions"])
        outputs = graph.get("outputs")
        if not isinstance(outputs, list) or not outputs or not all(isinstance(o, str) for o in outputs):
            raise EdgeLoraError(f"{where}: graph.outputs must be a non-empty list of names")
        row_mask = graph.get("row_mask")
        if row_mask is not None and not isinstance(row_mask, str):
            raise EdgeLoraError(f"{where}: graph.row_mask must be an input name, got {row_mask!r}")
        logits_keep = graph.get("logits_keep")
        if logits_keep is not None and not isinstance(logits_keep, str):
            raise EdgeLoraError(f"{where}: graph.logits_keep must be an input name, got {logits_keep!r}")
        eos = manifest.generation.get("eos_token_ids") or []
        if not isinstance(eos, list) or not all(isinstance(t, int) for t in eos):
            raise EdgeLoraError(f"{where}: generation.eos_token_ids must be a list of token ids")
        return cls(task=manifest.task, inputs=list(graph.get("inputs") or []), outputs=outputs,
                   num_layers=graph["num_layers"], vocab_size=graph["vocab_size"],
                   num_kv_heads=graph.get("num_kv_heads"), head_dim=graph.get("head_dim"),
                   max_positions=graph.get("max_positions"), shared_kv=bool(graph.get("fusions", {}).get("gqa")),
                   row_mask=row_mask, logits_keep=logits_keep, eos_token_ids=frozenset(eos),
                   max_length=graph.get("max_length"))


def _positive(where: Path, field: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise EdgeLoraError(f"{where}: {field} must be a positive integer, got {value!r}")

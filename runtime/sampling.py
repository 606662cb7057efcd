"""How a request picks its tokens: ``SamplingParams``, checked where they are made, and the pick itself."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from edgelora.errors import EdgeLoraError


@dataclass(frozen=True)
class SamplingParams:
    """Greedy unless ``temperature`` > 0; ``stop`` strings end the answer before them; ``ignore_eos`` runs all
    ``max_new_tokens`` steps, so timings measure a fixed amount of work. ``truncate``: where the prompt plus
    ``max_new_tokens`` would pass the model's context, drop the prompt's oldest tokens (the result says how many)
    instead of refusing the request."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    truncate: bool = False

    def __post_init__(self):
        _whole("max_new_tokens", self.max_new_tokens, 1)
        _whole("top_k", self.top_k, 0)
        if self.seed is not None:
            _whole("seed", self.seed, 0)
        if not _number(self.temperature) or self.temperature < 0:
            raise EdgeLoraError(f"temperature must be a number >= 0 (0 is greedy), got {self.temperature!r}")
        if not _number(self.top_p) or not 0 < self.top_p <= 1:
            raise EdgeLoraError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if not all(isinstance(s, str) and s for s in stop):
            raise EdgeLoraError(f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "ignore_eos", bool(self.ignore_eos))
        object.__setattr__(self, "truncate", bool(self.truncate))

    def picker(self) -> "TokenPicker":
        return TokenPicker(self)


class TokenPicker:
    """One request's token choice, with its own random stream: a seeded request samples the same tokens
    whichever other requests share its steps."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def pick(self, logits: np.ndarray) -> int:
        p = self.params
        return pick_token(logits, p.temperature, p.top_k, p.top_p, self.rng)


def pick_token(logits: np.ndarray, temperature: float, top_k: int, top_p: float, rng: np.random.Generator) -> int:
    if temperature <= 0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / temperature
    if 0 < top_k < scaled.size:
        kth = np.partition(scaled, -top_k)[-top_k]
        scaled = np.where(scaled < kth, -np.inf, scaled)
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if top_p < 1.0:
        order = np.argsort(-probs)
        cumulative = np.cumsum(probs[order])
        keep = order[: int(np.searchsorted(cumulative, top_p)) + 1]
        filtered = np.zeros_like(probs)
        filtered[keep] = probs[keep]
        probs = filtered / filtered.sum()
    return int(rng.choice(probs.size, p=probs))


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _whole(name: str, value, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
        raise EdgeLoraError(f"{name} must be a whole number >= {least}, got {value!r}")

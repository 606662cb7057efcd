"""Conversations that keep their KV cache between turns, so a follow-up costs only its new tokens.

A session is bound to one adapter spec for its whole life: keys and values computed under one
adapter (or strength) are wrong for any other, so there is no way to switch it mid-conversation;
start another session instead.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .kvcache import KVCache

if TYPE_CHECKING:
    from .model import EdgeModel, Generation


@dataclass
class ChatSession:
    model: "EdgeModel"
    adapter: object  # whatever EdgeModel.chat was given: None, a name or {name: weight}
    token_ids: list[int] = field(default_factory=list)  # the whole conversation, prompts and answers
    _cache: KVCache = field(default_factory=KVCache)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def send(self, message, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             seed: int | None = None, stop: list[str] | str | None = None) -> "Generation":
        """Add a turn (text or token ids) and generate the answer, the same tokens a fresh
        ``generate`` over the whole conversation would give.

        Text of the first turn gets the tokenizer's special tokens (e.g. BOS), later turns do not.
        """
        from .model import TextStream

        with self._lock:  # turns of one conversation are sequential by nature
            new_ids = self.model.encode(message, add_special_tokens=not self.token_ids)
            self.token_ids.extend(new_ids)
            feed = self.token_ids[self._cache.length:]  # the new turn, plus the last answer token never fed
            sink = TextStream()
            for _ in self.model._stream_text(sink, feed, self.adapter, max_new_tokens, temperature, top_k, top_p,
                                             seed, stop, cache=self._cache):
                pass
            self.token_ids.extend(sink.result.token_ids)
            return sink.result

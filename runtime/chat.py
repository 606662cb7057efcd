"""Conversations that keep their KV cache between turns, so a follow-up costs only its new tokens.

A session is bound to one adapter spec for its whole life: keys and values computed under one
adapter (or strength) are wrong for any other, so there is no way to switch it mid-conversation;
start another session instead. Turns run on their own call, outside the batching engine, since the
cache they keep is the conversation's own.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from .generation import Generation, Row
from .kvcache import KVCache
from .runner import generate_alone
from .sampling import SamplingParams


@dataclass
class ChatSession:
    model: object  # the EdgeModel it talks to
    adapter: object  # whatever EdgeModel.chat was given: None, a name or {name: weight}
    token_ids: list[int] = field(default_factory=list)  # the whole conversation, prompts and answers
    cache: KVCache = field(default_factory=KVCache)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def send(self, message, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             seed: int | None = None, stop: list[str] | str | None = None) -> Generation:
        """Add a turn (text or token ids) and generate the answer, the same tokens a fresh
        ``generate`` over the whole conversation would give.

        Text of the first turn gets the tokenizer's special tokens (e.g. BOS), later turns do not.
        """
        sampling = SamplingParams(max_new_tokens, temperature, top_k, top_p, seed, stop or ())
        model = self.model
        with self.lock:  # turns of one conversation are sequential by nature
            new_ids = model.encode(message, add_special_tokens=not self.token_ids)
            model.check_context(len(self.token_ids) + len(new_ids), sampling)
            self.token_ids.extend(new_ids)
            feed = self.token_ids[self.cache.length:]  # the new turn, plus the last answer token never fed
            row = Row(feed, sampling, model.decode, model.info.eos_token_ids)
            with model.call(self.adapter) as call:
                for _ in generate_alone(model.runner, call, self.cache, feed, row):
                    pass
            self.token_ids.extend(row.token_ids)
            return row.result()

"""``EdgeModel``: one onnxruntime session for the base, adapters chosen per call.

The adapter is an argument of every call, never state on the model: concurrent requests
for different tenants share the session and each gets its own adapter's answer.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgelora.errors import EdgeLoraError, UnknownAdapterError
from edgelora.format.manifest import load_manifest

from .binding import BindingPool, Call
from .chat import ChatSession
from .encoder import EncoderTasks, pad_batches
from .kvcache import KVCache
from .registry import AdapterRegistry
from .sampling import pick_token


@dataclass
class Generation:
    """The new tokens only (never the prompt), with timings for the caller's own accounting."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "length" | "eos" | "stop"
    prompt_tokens: int
    prefill_ms: float
    decode_ms: float

    @property
    def decode_ms_per_token(self) -> float:
        steps = max(len(self.token_ids) - 1, 1)
        return self.decode_ms / steps


class TextStream:
    """What ``EdgeModel.stream`` returns: iterate for text pieces, then read ``result``."""

    def __init__(self):
        self.result: Generation | None = None
        self._pieces: Iterator[str] = iter(())

    def __iter__(self) -> Iterator[str]:
        return self._pieces


KV_RESERVE_AHEAD = 256  # positions a generation reserves past its prompt; the buffers double beyond
# How long an idle onnxruntime worker thread spins for the next op before it sleeps. A decode step is hundreds
# of ops of a few µs each, so a thread that sleeps at once pays a wake-up per op (about 30% of int4 decode on
# 2 cores), while one that spins without bound takes the core a busy neighbour needs. 20 µs bridges the gaps
# between ops and yields soon after: on the 135M int4 package it decoded as fast as unbounded spinning on an idle
# machine (6.5-7.3 against 6.6-7.0 ms/token) and as fast as never spinning beside a busy process (8.2-9.3
# against 8.9-9.0; unbounded 12.5-13.9).
SPIN_US = 20

# task -> the methods that serve it, for the error a call on the wrong kind of package gets
TASK_METHODS = {
    "causal-lm": "generate, stream, chat, logits",
    "feature-extraction": "embed, encoder_output",
    "sequence-classification": "classify, encoder_output",
}


class EdgeModel(EncoderTasks):
    def __init__(self, package: Path, manifest, session: ort.InferenceSession, registry: AdapterRegistry, tokenizer,
                 options: ort.SessionOptions):
        self.package = package
        self.manifest = manifest
        self.session = session
        self.registry = registry
        self.tokenizer = tokenizer
        graph = manifest.graph
        self._layers = graph["num_layers"]
        self._kv_heads = graph.get("num_kv_heads")
        self._head_dim = graph.get("head_dim")
        layers = self._layers if manifest.task == "causal-lm" else 0  # encoders have no KV cache
        self._past_names = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
        self._shared_kv = bool(graph.get("fusions", {}).get("gqa"))
        self._eos = set(manifest.generation.get("eos_token_ids") or [])
        self._options = options
        self._base = BindingPool(session, {})
        self._merged: dict[str, BindingPool] = {}
        self._merged_lock = threading.Lock()

    @classmethod
    def open(
        cls,
        package: str | Path,
        adapter_memory_mb: float | None = None,
        intra_op_threads: int | None = None,
        inter_op_threads: int | None = None,
        verify: bool = True,
        spin_us: int = SPIN_US,
    ) -> "EdgeModel":
        """Load the base graph once; adapters load lazily on first use.

        ``adapter_memory_mb`` caps resident adapter bytes, compositions included (least recently
        used evicted first, pinned ones never); ``verify`` checks each adapter's sha256 against the
        manifest (or a path adapter's sidecar) before its first use: package adapters are hashed in a
        background thread from here on, so a first load usually costs only the memory map. ``spin_us`` is
        how long onnxruntime's worker threads busy-wait for the next op before they sleep; 0 never spins.
        """
        package = Path(package)
        manifest = load_manifest(package)
        if manifest.task not in TASK_METHODS:
            raise EdgeLoraError(f"{package}: task {manifest.task!r} is not supported by this runtime")
        _check_graph_info(package, manifest)
        if adapter_memory_mb is not None and not adapter_memory_mb > 0:
            raise EdgeLoraError(f"adapter_memory_mb must be a positive number, got {adapter_memory_mb!r}")
        graph_path = package / manifest.graph["file"]
        options = ort.SessionOptions()
        options.log_severity_level = 3  # slot defaults are overridable initializers; ORT warns about each
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        if inter_op_threads:
            options.inter_op_num_threads = inter_op_threads
        if isinstance(spin_us, bool) or not isinstance(spin_us, int) or spin_us < 0:
            raise EdgeLoraError(f"spin_us must be a whole number of microseconds >= 0, got {spin_us!r}")
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin_us else "0")
        if spin_us:
            options.add_session_config_entry("session.intra_op.spin_duration_us", str(spin_us))
        session = _session(graph_path, options)
        budget = None if adapter_memory_mb is None else int(adapter_memory_mb * 1024 * 1024)
        registry = AdapterRegistry(session, package, manifest.adapters, manifest.slots, budget, verify,
                                   manifest.base_fingerprint, manifest.adapter_block_size, manifest.slot_groups)
        if verify:
            registry.verify_in_background()
        tokenizer = None
        if manifest.tokenizer:
            from tokenizers import Tokenizer

            try:
                tokenizer = Tokenizer.from_file(str(package / manifest.tokenizer))
            except Exception as e:  # tokenizers raises bare Exceptions
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise EdgeLoraError(f"{package / manifest.tokenizer}: cannot read the tokenizer ({first})") from None
            if manifest.task != "causal-lm":
                pad_batches(tokenizer, manifest)
        return cls(package, manifest, session, registry, tokenizer, options)

    # adapters

    @property
    def adapters(self) -> list[str]:
        """Every adapter this model can run: the package's and those loaded from paths."""
        return self.registry.names()

    def load_adapter(self, name_or_path: str | Path, name: str | None = None) -> str:
        """Make an adapter resident now (instead of on first use); a path registers a new one.

        A path's ``NAME.json`` sidecar, when present, must name this package's base fingerprint.
        """
        path = Path(name_or_path)
        if str(name_or_path) not in self.registry.entries and (path.suffix == ".onnx_adapter" or path.exists()):
            name = name or path.name.removesuffix(".onnx_adapter")
            self.registry.register_path(path, name)
        else:
            name = str(name_or_path)
        self.registry.resolve(name)
        return name

    def unload_adapter(self, name: str) -> None:
        self.registry.unload(name)

    def pin(self, adapter) -> str:
        """Keep a tenant's adapter (or composition) resident past any eviction; returns its stats label."""
        return self.registry.pin(adapter)

    def unpin(self, adapter) -> None:
        self.registry.unpin(adapter)

    def stats(self) -> dict:
        return self.registry.stats()

    @property
    def task(self) -> str:
        """causal-lm, feature-extraction or sequence-classification: which methods this package serves."""
        return self.manifest.task

    def _require_task(self, method: str, *tasks: str) -> None:
        if self.manifest.task not in tasks:
            raise EdgeLoraError(f"{self.package}: {method} needs a {' or '.join(tasks)} package, but this one is "
                                f"{self.manifest.task} (use {TASK_METHODS[self.manifest.task]})")

    # forward passes

    def _call(self, adapter) -> Call:
        """A binding for one call: the session with the adapter's slot factors bound, or its merged graph."""
        if adapter is not None and self.manifest.mode == "merged":
            if not isinstance(adapter, str):
                raise EdgeLoraError("a merged package runs one adapter per graph: strengths and compositions need "
                                    "a separate-mode package")
            return Call(self._merged_pool(adapter), None, self.manifest.graph["inputs"])
        resident = self.registry.resolve(adapter)
        pool = self._base if resident is None else resident.bindings
        return Call(pool, resident, self.manifest.graph["inputs"])

    def _merged_pool(self, adapter: str) -> BindingPool:
        """Merged packages switch adapters by switching graphs, each loaded once on first use."""
        with self._merged_lock:
            pool = self._merged.get(adapter)
            if pool is None:
                entry = self.manifest.adapters.get(adapter)
                if entry is None:
                    known = ", ".join(sorted(self.manifest.adapters)) or "none"
                    raise UnknownAdapterError(f"unknown adapter {adapter!r}; this package has: {known}")
                pool = BindingPool(_session(self.package / entry.file, self._options), {})
                self._merged[adapter] = pool
            return pool

    def _forward(self, call: Call, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                 kv: KVCache) -> np.ndarray:
        """Logits of one pass over ``input_ids`` after the ``kv.length`` positions of ``kv``, which it extends.

        A decode step's logits are the call's own buffer, overwritten by its next step."""
        binding = call.binding
        binding.bind_cpu_input("input_ids", input_ids)
        binding.bind_cpu_input("attention_mask", attention_mask)
        binding.bind_cpu_input("position_ids", position_ids)
        shared = self._shared_kv and kv.capacity > 0
        step = shared and input_ids.shape[1] == 1
        if step:
            logits = call.step_output("logits", (*input_ids.shape, self.manifest.graph["vocab_size"]))
        else:
            binding.bind_output("logits")  # unallocated: onnxruntime sizes it for this pass
        if shared:
            kv.reserve(self._past_names, self._kv_heads, self._head_dim, kv.length + input_ids.shape[1])
        # bound after the logits, so the logits are output 0 for the rest of the call
        if shared and call.kv_bound is not kv.values:  # the buffers stay bound until they grow
            for name, value in kv.values.items():
                binding.bind_ortvalue_input(name, value)
                binding.bind_ortvalue_output(name.replace("past_key_values", "present"), value)
            call.kv_bound = kv.values
        elif not shared:
            empty = np.zeros((input_ids.shape[0], self._kv_heads, 0, self._head_dim), np.float32)
            for name in self._past_names:
                value = kv.values.get(name)
                if value is None:
                    binding.bind_cpu_input(name, empty)
                else:
                    binding.bind_ortvalue_input(name, value)
                binding.bind_output(name.replace("past_key_values", "present"))
        if step:
            call.pool.session.run_with_iobinding(binding)
        else:
            outputs = call.run()
            logits = outputs[0].numpy()
            if not shared:
                kv.values = dict(zip(self._past_names, outputs[1:]))
        kv.length += input_ids.shape[1]
        return logits

    def logits(self, input_ids, adapter=None, attention_mask=None) -> np.ndarray:
        """Logits [batch, seq, vocab] of a full forward pass over ``input_ids`` ([seq] or [batch, seq]).

        ``adapter`` is a name, ``{name: weight}`` (strength, or a composition of several), or None."""
        self._require_task("logits", "causal-lm")
        try:
            ids = np.asarray(input_ids, dtype=np.int64)
        except (TypeError, ValueError, OverflowError):
            raise EdgeLoraError(f"input_ids must be integer token ids, got {str(input_ids)[:60]!r}") from None
        if ids.ndim == 1:
            ids = ids[None, :]
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise EdgeLoraError(f"input_ids must be [seq] or [batch, seq] with seq > 0, got shape {ids.shape}")
        vocab = self.manifest.graph["vocab_size"]
        if ids.min() < 0 or ids.max() >= vocab:
            raise EdgeLoraError(f"input_ids must be token ids in [0, {vocab}), got {ids.min()}..{ids.max()}")
        mask = (np.ones_like(ids) if attention_mask is None
                else np.asarray(attention_mask, dtype=np.int64).reshape(ids.shape))
        if self.manifest.graph.get("fusions", {}).get("gqa") and not mask.all():
            raise EdgeLoraError(f"{self.package}: this graph's GroupQueryAttention takes attention masks of ones only "
                                "(as onnxruntime-genai's graphs); run padded rows one by one, unpadded")
        positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
        with self._call(adapter) as call:
            return self._forward(call, ids, mask, positions, KVCache())

    # generation

    def encode(self, prompt, add_special_tokens: bool = True) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise EdgeLoraError(f"{self.package}: the package has no tokenizer.json; "
                                    "pass token ids instead of text")
            return self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens).ids
        ids = [int(t) for t in prompt]
        vocab = self.manifest.graph["vocab_size"]
        if not ids or min(ids) < 0 or max(ids) >= vocab:
            raise EdgeLoraError(f"prompt token ids must be a non-empty list of ids in [0, {vocab})")
        return ids

    def decode(self, token_ids: list[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def chat(self, adapter=None) -> ChatSession:
        """A conversation bound to one adapter spec, keeping its KV cache so a turn costs only its new tokens."""
        self._require_task("chat", "causal-lm")
        self.registry.resolve(adapter)  # a bad spec fails here, not on the first turn
        return ChatSession(self, adapter)

    def _tokens(self, prompt_ids: list[int], adapter, max_new_tokens: int, temperature: float, top_k: int,
                top_p: float, seed: int | None, timings: dict, ignore_eos: bool = False,
                cache: KVCache | None = None) -> Iterator[int]:
        """Prefill once, then one step per token extending the KV cache; stops at EOS or the length limit.

        With a ``cache`` the prefill continues after the tokens already in it, and the cache is
        extended at every step, so a chat's next turn starts where this one stopped.
        """
        if max_new_tokens < 1:
            return
        kv = cache if cache is not None else KVCache()
        with self._call(adapter) as call:
            rng = np.random.default_rng(seed)
            ids = np.asarray([prompt_ids], dtype=np.int64)
            start = kv.length
            total = start + ids.shape[1]
            if self._shared_kv:  # room for the answer, up to a bound: a generous max_new_tokens is only a limit
                ahead = min(max_new_tokens - 1, KV_RESERVE_AHEAD)
                kv.reserve(self._past_names, self._kv_heads, self._head_dim, total + ahead)
            t0 = time.perf_counter()
            logits = self._forward(call, ids, np.ones((1, total), np.int64),
                                   np.arange(start, total, dtype=np.int64)[None], kv)
            timings["prefill_ms"] = (time.perf_counter() - t0) * 1e3
            timings["decode_ms"] = 0.0
            for step in range(max_new_tokens):
                token = pick_token(logits[0, -1], temperature, top_k, top_p, rng)
                yield token
                if (token in self._eos and not ignore_eos) or step == max_new_tokens - 1:
                    return
                total += 1
                t0 = time.perf_counter()
                logits = self._forward(call, np.asarray([[token]], np.int64), np.ones((1, total), np.int64),
                                       np.asarray([[total - 1]], np.int64), kv)
                timings["decode_ms"] += (time.perf_counter() - t0) * 1e3

    def stream(self, prompt, adapter=None, max_new_tokens: int = 32, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
               stop: list[str] | str | None = None, ignore_eos: bool = False) -> "TextStream":
        """Iterate for the new text piece by piece; ``.result`` holds the whole Generation at the end.

        ``ignore_eos`` runs all ``max_new_tokens`` steps, so timings measure a fixed amount of work.
        """
        self._require_task("stream", "causal-lm")
        prompt_ids = self.encode(prompt)
        text_stream = TextStream()
        text_stream._pieces = self._stream_text(text_stream, prompt_ids, adapter, max_new_tokens, temperature, top_k,
                                           top_p, seed, stop, ignore_eos)
        return text_stream

    def _stream_text(self, sink: "TextStream", prompt_ids, adapter, max_new_tokens, temperature, top_k, top_p, seed,
                stop, ignore_eos: bool = False, cache: KVCache | None = None) -> Iterator[str]:
        """Text that might begin a stop string is held back until it cannot."""
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        timings: dict = {}
        new_ids: list[int] = []
        emitted = 0
        text = ""
        finish = "length"
        for token in self._tokens(prompt_ids, adapter, max_new_tokens, temperature, top_k, top_p, seed, timings,
                                  ignore_eos, cache):
            new_ids.append(token)
            if token in self._eos and not ignore_eos:
                finish = "eos"
                break
            text = self.decode(new_ids)
            hit = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
            if hit >= 0:
                text, finish = text[:hit], "stop"
                break
            safe = len(text) - _held_back(text, stops)
            if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for its other bytes
                safe = min(safe, len(text) - 1)
            if safe > emitted:
                yield text[emitted:safe]
                emitted = safe
        if len(text) > emitted:
            yield text[emitted:]
        sink.result = Generation(text=text, token_ids=new_ids, finish_reason=finish, prompt_tokens=len(prompt_ids),
                                 prefill_ms=timings.get("prefill_ms", 0.0), decode_ms=timings.get("decode_ms", 0.0))

    def generate(self, prompt, adapter=None, max_new_tokens: int = 32, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 stop: list[str] | str | None = None, ignore_eos: bool = False) -> Generation:
        """Greedy by default; ``prompt`` is text or a list of token ids."""
        self._require_task("generate", "causal-lm")
        text_stream = self.stream(prompt, adapter, max_new_tokens, temperature, top_k, top_p, seed, stop, ignore_eos)
        for _ in text_stream:
            pass
        return text_stream.result


def _check_graph_info(package: Path, manifest) -> None:
    """What the runtime reads from the manifest's graph and generation info, checked before it is used."""
    where = package / "edgelora.json"
    keys = ("num_layers", "num_kv_heads", "head_dim") if manifest.task == "causal-lm" else ("num_layers", "max_length")
    for key in (*keys, "vocab_size"):
        value = manifest.graph.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise EdgeLoraError(f"{where}: graph.{key} must be a positive integer, got {value!r}")
    outputs = manifest.graph.get("outputs")
    if not isinstance(outputs, list) or not outputs or not all(isinstance(o, str) for o in outputs):
        raise EdgeLoraError(f"{where}: graph.outputs must be a non-empty list of names")
    eos = manifest.generation.get("eos_token_ids") or []
    if not isinstance(eos, list) or not all(isinstance(t, int) for t in eos):
        raise EdgeLoraError(f"{where}: generation.eos_token_ids must be a list of token ids")


def _session(graph_path: Path, options: ort.SessionOptions) -> ort.InferenceSession:
    if not graph_path.is_file():
        raise EdgeLoraError(f"{graph_path}: missing graph file")
    try:
        return ort.InferenceSession(str(graph_path), options, providers=["CPUExecutionProvider"])
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise EdgeLoraError(f"{graph_path}: onnxruntime cannot load the graph ({first})") from None


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of a stop string."""
    longest = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest

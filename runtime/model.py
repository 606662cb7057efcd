"""``EdgeModel``: one onnxruntime session for the base, adapters chosen per call.

The adapter is an argument of every call, never state on the model: concurrent requests
for different tenants share the session and each gets its own adapter's answer. Generation runs
through the model's batching engine by default, so threads that call ``generate`` or ``stream`` at the
same time share decode steps (``engine``); ``batching=False`` runs each call on its own.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgelora.errors import EdgeLoraError, UnknownAdapterError
from edgelora.format.manifest import load_manifest

from .binding import BindingPool, Call
from .chat import ChatSession
from .encoder import EncoderTasks, pad_batches
from .engine import BatchEngine, BatchSettings
from .generation import Generation, Row, TextStream
from .graph_info import GraphInfo
from .kvcache import KVCache
from .registry import AdapterRegistry
from .runner import Runner, generate_alone
from .sampling import SamplingParams

# How long an idle onnxruntime worker thread spins for the next op before it sleeps. A decode step is hundreds
# of ops of a few µs each, so a thread that sleeps at once pays a wake-up per op, while one that spins without
# bound takes the core a busy neighbour needs; 20 µs bridges the gaps between ops and yields soon after
# (docs/benchmarks.md).
SPIN_US = 20

# task -> the methods that serve it, for the error a call on the wrong kind of package gets
TASK_METHODS = {
    "causal-lm": "generate, stream, chat, logits",
    "feature-extraction": "embed, encoder_output",
    "sequence-classification": "classify, encoder_output",
}


class EdgeModel(EncoderTasks):
    def __init__(self, package: Path, manifest, session: ort.InferenceSession, registry: AdapterRegistry, tokenizer,
                 options: ort.SessionOptions, info: GraphInfo, batching: BatchSettings | None):
        self.package = package
        self.manifest = manifest
        self.session = session
        self.registry = registry
        self.tokenizer = tokenizer
        self.info = info
        self.runner = Runner(info)
        self._options = options
        self._base = BindingPool(session, {})
        self._merged: dict[str, BindingPool] = {}
        self._merged_lock = threading.Lock()
        self._batching = batching
        self._engine: BatchEngine | None = None
        self._engine_lock = threading.Lock()

    @classmethod
    def open(
        cls,
        package: str | Path,
        adapter_memory_mb: float | None = None,
        intra_op_threads: int | None = None,
        inter_op_threads: int | None = None,
        verify: bool = True,
        spin_us: int = SPIN_US,
        batching: bool | BatchSettings = True,
    ) -> "EdgeModel":
        """Load the base graph once; adapters load lazily on first use.

        ``adapter_memory_mb`` caps resident adapter bytes, compositions included (least recently
        used evicted first, pinned ones never); ``verify`` checks each adapter's sha256 against the
        manifest (or a path adapter's sidecar) before its first use: package adapters are hashed in a
        background thread from here on, so a first load usually costs only the memory map. ``spin_us`` is
        how long onnxruntime's worker threads busy-wait for the next op before they sleep; 0 never spins.
        ``batching`` (True, False or a ``BatchSettings``) is how concurrent generations share decode steps.
        """
        package = Path(package)
        manifest = load_manifest(package)
        if manifest.task not in TASK_METHODS:
            raise EdgeLoraError(f"{package}: task {manifest.task!r} is not supported by this runtime")
        info = GraphInfo.read(package, manifest)
        if batching is True:
            batching = BatchSettings()
        elif batching is not False and not isinstance(batching, BatchSettings):
            raise EdgeLoraError(f"batching must be True, False or a BatchSettings, got {batching!r}")
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
        return cls(package, manifest, session, registry, tokenizer, options, info, batching or None)

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

    def unload_adapter(self, name: str, unregister: bool = True) -> None:
        """Free an adapter's memory; an adapter loaded from a path is also forgotten unless ``unregister`` is
        False, in which case its next use loads it again."""
        self.registry.unload(name, unregister)

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

    def call(self, adapter) -> Call:
        """A binding for one call: the session with the adapter's slot factors bound, or its merged graph.
        Use it as a context manager: it goes back to its pool at the end."""
        if adapter is not None and self.manifest.mode == "merged":
            if not isinstance(adapter, str):
                raise EdgeLoraError("a merged package runs one adapter per graph: strengths and compositions need "
                                    "a separate-mode package")
            return Call(self._merged_pool(adapter), None, self.info.inputs)
        resident = self.registry.resolve(adapter)
        pool = self._base if resident is None else resident.bindings
        return Call(pool, resident, self.info.inputs)

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
        if self.info.shared_kv and not mask.all():
            raise EdgeLoraError(f"{self.package}: this graph's GroupQueryAttention takes attention masks of ones only "
                                "(as onnxruntime-genai's graphs); run padded rows one by one, unpadded")
        positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
        with self.call(adapter) as call:
            return self.runner.forward(call, ids, positions, KVCache(), attention_mask=mask)

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

    @property
    def engine(self) -> BatchEngine | None:
        """The batching engine every generation of this model goes through (None with ``batching=False``),
        started on first use."""
        if self._batching is None or self.manifest.task != "causal-lm":
            return None
        with self._engine_lock:
            if self._engine is None:
                self._engine = BatchEngine(self, self._batching)
            return self._engine

    def close(self) -> None:
        """Cancel the generations still running and stop the batching engine's thread."""
        if self._engine is not None:
            self._engine.close()

    def check_context(self, prompt_tokens: int, sampling: SamplingParams) -> None:
        """A prompt plus its answer must fit the model's positions: past them a model answers garbage."""
        limit = self.info.max_positions
        if limit is not None and prompt_tokens + sampling.max_new_tokens > limit:
            raise EdgeLoraError(f"a prompt of {prompt_tokens} tokens plus max_new_tokens={sampling.max_new_tokens} "
                                f"is past the model's context of {limit} positions; shorten the prompt, lower "
                                "max_new_tokens, or ask for truncate=True (`--truncate`)")

    def fit_context(self, prompt_ids: list[int], sampling: SamplingParams) -> tuple[list[int], int]:
        """(the prompt to feed, how many of its oldest tokens were dropped): only ``sampling.truncate`` drops any,
        and never the whole prompt."""
        limit = self.info.max_positions
        over = 0 if limit is None else len(prompt_ids) + sampling.max_new_tokens - limit
        if over <= 0:
            return prompt_ids, 0
        if not sampling.truncate:
            self.check_context(len(prompt_ids), sampling)
        if over >= len(prompt_ids):
            raise EdgeLoraError(f"max_new_tokens={sampling.max_new_tokens} leaves no room for a prompt in the "
                                f"model's context of {limit} positions; lower max_new_tokens")
        return prompt_ids[over:], over

    def stream(self, prompt, adapter=None, max_new_tokens: int = 32, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
               stop: list[str] | str | None = None, ignore_eos: bool = False, truncate: bool = False,
               sampling: SamplingParams | None = None) -> TextStream:
        """Iterate for the new text piece by piece; ``.result`` holds the whole Generation at the end, and
        ``.close()`` cancels. ``sampling``, when given, replaces the keyword settings."""
        self._require_task("stream", "causal-lm")
        if sampling is None:
            sampling = SamplingParams(max_new_tokens, temperature, top_k, top_p, seed, stop or (), ignore_eos, truncate)
        return self._text_stream(prompt, adapter, sampling, pieces=True)

    def _text_stream(self, prompt, adapter, sampling: SamplingParams, pieces: bool) -> TextStream:
        """A generation's stream; without ``pieces`` (a caller that only wants the result) the engine hands over
        nothing until the end, so the caller's thread does not wake at every token to take a piece from the
        cores the step runs on."""
        prompt_ids, dropped = self.fit_context(self.encode(prompt), sampling)
        row = Row(prompt_ids, sampling, self.decode, self.info.eos_token_ids, dropped)
        engine = self.engine
        if engine is not None:
            return engine.submit(prompt_ids, adapter, row, pieces)
        call = self.call(adapter)
        return TextStream(_closing(generate_alone(self.runner, call, KVCache(), prompt_ids, row), call))

    def generate(self, prompt, adapter=None, max_new_tokens: int = 32, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 stop: list[str] | str | None = None, ignore_eos: bool = False, truncate: bool = False,
                 sampling: SamplingParams | None = None) -> Generation:
        """Greedy by default; ``prompt`` is text or a list of token ids."""
        self._require_task("generate", "causal-lm")
        if sampling is None:
            sampling = SamplingParams(max_new_tokens, temperature, top_k, top_p, seed, stop or (), ignore_eos, truncate)
        return _result(self._text_stream(prompt, adapter, sampling, pieces=False))

    def generate_many(self, prompts: list, adapters: list | None = None,
                      sampling: SamplingParams | list[SamplingParams] | None = None) -> list[Generation]:
        """Many requests at once, each with its own adapter spec (default: the base) and sampling; batched
        together by the engine, answered in order."""
        self._require_task("generate_many", "causal-lm")
        prompts = list(prompts)
        adapters = [None] * len(prompts) if adapters is None else list(adapters)
        if len(adapters) != len(prompts):
            raise EdgeLoraError(f"generate_many: {len(prompts)} prompts but {len(adapters)} adapters")
        each = list(sampling) if isinstance(sampling, (list, tuple)) else [sampling] * len(prompts)
        if len(each) != len(prompts):
            raise EdgeLoraError(f"generate_many: {len(prompts)} prompts but {len(each)} sampling settings")
        streams = [self._text_stream(p, a, s or SamplingParams(), pieces=False)
                   for p, a, s in zip(prompts, adapters, each)]
        return [_result(stream) for stream in streams]


def _result(stream: TextStream) -> Generation:
    for _ in stream:
        pass
    return stream.result


def _closing(pieces, call: Call):
    """A stream run on its own call, which goes back to its pool when the stream ends or is closed."""
    try:
        return (yield from pieces)
    finally:
        call.close()


def _session(graph_path: Path, options: ort.SessionOptions) -> ort.InferenceSession:
    if not graph_path.is_file():
        raise EdgeLoraError(f"{graph_path}: missing graph file")
    try:
        return ort.InferenceSession(str(graph_path), options, providers=["CPUExecutionProvider"])
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise EdgeLoraError(f"{graph_path}: onnxruntime cannot load the graph ({first})") from None

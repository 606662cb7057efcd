"""The batching engine: rows of different adapters in one decode step answer what each request gets alone."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from edgelora.demo.tiny_models import build_causal_lm, random_peft_adapter
from edgelora.errors import BusyError, EdgeLoraError
from edgelora.exporters.export import ExportOptions, export_package
from edgelora.runtime import BatchSettings, EdgeModel, SamplingParams

# "demo"-sized layers have a head size of 16, which GroupQueryAttention takes: the graphs whose rows share steps.
# A wider initializer range gives logits margins like a trained model's, so greedy tokens do not flip on the
# rounding differences between a batch of one and of eight.
SPECS = ["a", "b", None, {"a": 0.5}, {"a": 0.7, "b": 0.3}, "c", "a", None]


def batch_package(tmp, family: str, adapter_dtype: str = "fp32", ranks=(4, 6, 8), quantize: str = "int4"):
    base = build_causal_lm(tmp / "base", family=family, size="demo", layers=2, initializer_range=0.1)
    dirs = {}
    for i, (name, rank) in enumerate(zip("abc", ranks)):
        dirs[name] = tmp / "adapters" / name
        random_peft_adapter(base, dirs[name], seed=10 + i, r=rank, alpha=2 * rank, targets="all-linear")
    export_package(tmp / "base", dirs, tmp / "pkg",
                   ExportOptions(progress=False, adapter_dtype=adapter_dtype, quantize=quantize))
    return tmp / "pkg"


def prompts_for(model, n: int, seed: int = 1) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(4, model.info.vocab_size, int(k)).tolist() for k in rng.integers(3, 20, n)]


def alone(package, prompts, specs, sampling) -> list[list[int]]:
    model = EdgeModel.open(package, batching=False)
    return [model.generate(p, adapter=s, sampling=sampling).token_ids for p, s in zip(prompts, specs)]


@pytest.fixture(scope="module")
def llama_fp32(tmp_path_factory):
    return batch_package(tmp_path_factory.mktemp("batch-llama"), "llama")


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "phi3", "gemma2", "gpt2"])
def test_rows_of_mixed_adapters_answer_as_each_request_alone(tmp_path, family):
    package = batch_package(tmp_path, family)
    model = EdgeModel.open(package)
    sampling = SamplingParams(max_new_tokens=10, ignore_eos=True)
    prompts = prompts_for(model, len(SPECS))
    got = model.generate_many(prompts, SPECS, sampling)
    assert [g.token_ids for g in got] == alone(package, prompts, SPECS, sampling)
    stats = model.engine.stats()
    if model.info.shared_kv:  # GroupQueryAttention graphs step their rows together
        assert model.info.row_mask and stats["rows_stepped"] >= 2 * stats["steps"]


@pytest.mark.parametrize("adapter_dtype, ranks", [("int4", (8, 8, 8)), ("int4", (4, 6, 8)), ("fp16", (4, 6, 8))])
def test_quantized_adapter_rows_answer_as_alone(tmp_path, adapter_dtype, ranks):
    """int4 factors join when their ranks match; otherwise their rows run one call each, with the same answers."""
    package = batch_package(tmp_path, "llama", adapter_dtype, ranks)
    model = EdgeModel.open(package)
    sampling = SamplingParams(max_new_tokens=8, ignore_eos=True)
    prompts = prompts_for(model, len(SPECS), seed=2)
    got = model.generate_many(prompts, SPECS, sampling)
    assert [g.token_ids for g in got] == alone(package, prompts, SPECS, sampling)


def test_int8_rows_share_steps_within_the_codec_tolerance(tmp_path):
    """int8 slots quantize the activations of a whole call at once (DynamicQuantizeMatMul), so a row's delta
    carries the rounding of the batch it runs in: each token a row picks is its greedy token alone, or one whose
    logit alone is within that rounding of the best."""
    package = batch_package(tmp_path, "llama", "int8")
    model, single = EdgeModel.open(package), EdgeModel.open(package, batching=False)
    prompts = prompts_for(model, len(SPECS), seed=3)
    got = model.generate_many(prompts, SPECS, SamplingParams(max_new_tokens=10, ignore_eos=True))
    for prompt, spec, result in zip(prompts, SPECS, got):
        ids = prompt + result.token_ids
        logits = single.logits(ids[:-1], adapter=spec)[0, len(prompt) - 1:]
        picked = logits[np.arange(len(result.token_ids)), result.token_ids]
        assert (logits.max(axis=-1) - picked).max() <= 0.25, (spec, result.token_ids)
    assert model.engine.stats()["rows_stepped"] >= 2 * model.engine.stats()["steps"]


def test_rows_join_and_leave_mid_batch(llama_fp32):
    """Three rows at a time, prompts prefilled four tokens per step and answers of different lengths: rows wait,
    join while others decode and leave one by one, each answering as alone."""
    model = EdgeModel.open(llama_fp32, batching=BatchSettings(max_batch=3, prefill_chunk=4))
    specs = SPECS * 2
    prompts = prompts_for(model, len(specs), seed=4)
    sampling = [SamplingParams(max_new_tokens=3 + i % 7, ignore_eos=True) for i in range(len(specs))]
    got = model.generate_many(prompts, specs, sampling)
    single = EdgeModel.open(llama_fp32, batching=False)
    want = [single.generate(p, adapter=s, sampling=k).token_ids for p, s, k in zip(prompts, specs, sampling)]
    assert [g.token_ids for g in got] == want
    stats = model.engine.stats()
    assert stats["kv_reserved_tokens"] == 0 and stats["batch_size"] == 0 and stats["queue_depth"] == 0


def test_threads_calling_generate_share_decode_steps(llama_fp32):
    model = EdgeModel.open(llama_fp32)
    prompts = prompts_for(model, 6, seed=5)
    results = [None] * 6

    def run(i):
        results[i] = model.generate(prompts[i], adapter=SPECS[i], max_new_tokens=12, ignore_eos=True).token_ids

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == alone(llama_fp32, prompts, SPECS[:6], SamplingParams(max_new_tokens=12, ignore_eos=True))
    stats = model.engine.stats()
    assert stats["rows_stepped"] > stats["steps"]


def test_generate_takes_only_the_result_from_the_engine(llama_fp32):
    """A caller that only wants the result is not handed a piece per token: each would wake its thread in the
    middle of the step that makes the next one."""
    from edgelora.runtime.generation import Row

    model = EdgeModel.open(llama_fp32)
    prompt = prompts_for(model, 1, seed=7)[0]
    streamed = model.stream(prompt, adapter="a", max_new_tokens=12, ignore_eos=True)
    pieces = list(streamed)
    assert len(pieces) > 1 and "".join(pieces) == streamed.result.text
    sampling = SamplingParams(max_new_tokens=12, ignore_eos=True)
    silent = model.engine.submit(prompt, "a", Row(prompt, sampling, model.decode, model.info.eos_token_ids, 0),
                                 pieces=False)
    assert list(silent) == [] and silent.result.token_ids == streamed.result.token_ids
    asked = []
    submit = model.engine.submit
    model.engine.submit = lambda *args, **kwargs: asked.append(args[3:] or kwargs) or submit(*args, **kwargs)
    assert model.generate(prompt, adapter="a", sampling=sampling).text == streamed.result.text
    assert model.generate_many([prompt], ["a"], sampling)[0].text == streamed.result.text
    list(model.stream(prompt, adapter="a", sampling=sampling))
    assert asked == [(False,), (False,), (True,)]


def test_seeded_sampling_in_a_batch_samples_as_alone(llama_fp32):
    model = EdgeModel.open(llama_fp32)
    prompts = prompts_for(model, 4, seed=6)
    sampling = [SamplingParams(max_new_tokens=8, temperature=1.3, top_k=20, top_p=0.9, seed=i, ignore_eos=True)
                for i in range(4)]
    got = model.generate_many(prompts, SPECS[:4], sampling)
    single = EdgeModel.open(llama_fp32, batching=False)
    assert [g.token_ids for g in got] == [single.generate(p, adapter=s, sampling=k).token_ids
                                         for p, s, k in zip(prompts, SPECS[:4], sampling)]


def test_past_the_rows_and_the_queue_a_request_is_refused(llama_fp32):
    model = EdgeModel.open(llama_fp32, batching=BatchSettings(max_batch=1, max_queue=1))
    long = SamplingParams(max_new_tokens=200, ignore_eos=True)
    running = model.stream([5, 6, 7], adapter="a", sampling=long)
    queued = model.stream([5, 6, 7], adapter="b", sampling=long)
    with pytest.raises(BusyError, match="busy: 1 requests running and 1 queued") as refused:
        model.stream([5, 6, 7], sampling=long)
    assert refused.value.retry_after_s > 0
    queued.close()
    running.close()
    deadline = time.monotonic() + 30
    while model.engine.stats()["kv_reserved_tokens"] and time.monotonic() < deadline:
        time.sleep(0.01)
    stats = model.engine.stats()
    assert stats["kv_reserved_tokens"] == 0 and stats["queue_depth"] == 0  # closed streams free their rows
    assert model.generate([5, 6, 7], adapter="a", max_new_tokens=3).token_ids


def test_a_cancelled_stream_frees_its_row_at_once(llama_fp32):
    model = EdgeModel.open(llama_fp32, batching=BatchSettings(max_batch=2))
    stream = model.stream([5, 6, 7], adapter="a", max_new_tokens=400, ignore_eos=True)
    next(iter(stream))
    stream.close()
    other = model.generate([8, 9], adapter="b", max_new_tokens=4, ignore_eos=True)
    assert len(other.token_ids) == 4
    assert model.engine.stats()["steps"] < 100  # the cancelled row did not run on to its 400 tokens


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=-3), "max_new_tokens must be a whole number >= 1, got -3"),
    (dict(max_new_tokens=2.5), "max_new_tokens must be a whole number >= 1"),
    (dict(temperature=-2), "temperature must be a number >= 0"),
    (dict(temperature=float("nan")), "temperature must be a number >= 0"),
    (dict(top_p=0), r"top_p must be a number in \(0, 1\]"),
    (dict(top_k=-1), "top_k must be a whole number >= 0"),
    (dict(seed=-1), "seed must be a whole number >= 0"),
    (dict(stop=[""]), "stop must be a non-empty string"),
])
def test_bad_sampling_settings_are_one_line_errors(llama_fp32, kwargs, message):
    with pytest.raises(EdgeLoraError, match=message):
        SamplingParams(**kwargs)
    with pytest.raises(EdgeLoraError, match=message):
        EdgeModel.open(llama_fp32).generate([5, 6], **kwargs)


def test_a_prompt_past_the_context_is_refused(llama_fp32):
    model = EdgeModel.open(llama_fp32)
    assert model.info.max_positions == 512
    with pytest.raises(EdgeLoraError, match="a prompt of 3001 tokens plus max_new_tokens=32 is past the model's "
                                            "context of 512 positions"):
        model.generate("x" * 3000)
    with pytest.raises(EdgeLoraError, match="past the model's context"):
        model.chat().send("y" * 500, max_new_tokens=20)


@pytest.mark.parametrize("batching", [True, False])
def test_truncate_keeps_the_newest_prompt_tokens_that_fit(llama_fp32, batching):
    """Asked for, a long prompt loses its oldest tokens: the answer is the answer to the tokens that are kept."""
    model = EdgeModel.open(llama_fp32, batching=batching)
    prompt = [5 + i % 40 for i in range(600)]
    got = model.generate(prompt, max_new_tokens=12, truncate=True, ignore_eos=True)
    assert (got.prompt_tokens, got.prompt_tokens_dropped) == (500, 100)
    kept = model.generate(prompt[100:], max_new_tokens=12, ignore_eos=True)
    assert got.token_ids == kept.token_ids and kept.prompt_tokens_dropped == 0
    short = model.generate(prompt[:20], max_new_tokens=12, truncate=True)
    assert short.prompt_tokens_dropped == 0
    with pytest.raises(EdgeLoraError, match="max_new_tokens=512 leaves no room for a prompt"):
        model.generate(prompt, max_new_tokens=512, truncate=True)


def test_bad_batch_settings_are_one_line_errors(llama_fp32):
    with pytest.raises(EdgeLoraError, match="max_batch must be a whole number >= 1, got 0"):
        BatchSettings(max_batch=0)
    with pytest.raises(EdgeLoraError, match="batching must be True, False or a BatchSettings"):
        EdgeModel.open(llama_fp32, batching="yes")
    model = EdgeModel.open(llama_fp32, batching=BatchSettings(kv_tokens=64))
    with pytest.raises(EdgeLoraError, match="more than the engine's KV budget of 64"):
        model.generate([5] * 40, max_new_tokens=30)


def test_closing_the_model_ends_every_stream(llama_fp32):
    model = EdgeModel.open(llama_fp32, batching=BatchSettings(max_batch=1))
    running = model.stream([5, 6, 7], adapter="a", max_new_tokens=400, ignore_eos=True)
    queued = model.stream([5, 6], adapter="b", max_new_tokens=400, ignore_eos=True)
    model.close()
    for stream in (running, queued):
        for _ in stream:
            pass
        assert stream.result.finish_reason == "cancelled" and len(stream.result.token_ids) < 400
    with pytest.raises(EdgeLoraError, match="the model's batching engine is closed"):
        model.generate([5])


def test_a_queued_stream_closed_from_another_thread_ends_its_reader(llama_fp32):
    """A server's worker thread blocks reading a queued request while the event loop closes it (the client left)."""
    model = EdgeModel.open(llama_fp32, batching=BatchSettings(max_batch=1))
    running = model.stream([5, 6, 7], adapter="a", max_new_tokens=400, ignore_eos=True)
    queued = model.stream([5, 6], adapter="b", max_new_tokens=400, ignore_eos=True)
    reader = threading.Thread(target=lambda: [None for _ in queued])
    reader.start()
    time.sleep(0.05)
    queued.close()
    reader.join(timeout=30)
    assert not reader.is_alive() and queued.result.finish_reason == "cancelled"
    running.close()


def test_joined_adapters_keep_their_own_ranks(llama_fp32):
    """Every row of a mixed step computes every adapter's segment, so a rank-4 adapter beside a rank-8 one joins
    at rank 4: padded to its neighbour's rank it would double its share of each step's products."""
    model = EdgeModel.open(llama_fp32)
    own = {name: sum(p.nbytes for p in model.registry.resolve(name).params.values()) for name in ("a", "c")}
    # long enough answers that the second row joins while the first decodes, however late its thread submits it
    model.generate_many(prompts_for(model, 2, seed=5), ["a", "c"], SamplingParams(max_new_tokens=16, ignore_eos=True))
    assert model.engine.stats()["joined_adapter_bytes"] == own["a"] + own["c"]


def test_rows_keep_their_cache_when_the_buffers_grow_and_shrink(llama_fp32):
    """The engine's KV buffers are as long as the rows need, not the model's context (a buffer of the whole
    context slowed every step): rows that cross the buffer's length mid-batch answer as alone, and short
    requests after a long one run on a shorter buffer again."""
    model = EdgeModel.open(llama_fp32, batching=BatchSettings(max_batch=3, prefill_chunk=64))
    prompts = prompts_for(model, 3, seed=6)
    model.generate(prompts[2], adapter="b", max_new_tokens=4)
    assert model.engine.stats()["kv_positions_per_row"] == 128 < model.info.max_positions
    specs = ["a", {"a": 0.7, "b": 0.3}, None]
    prompts[0] = (prompts[0] * 20)[:140]  # past the first buffer's 128 positions while prefilling
    sampling = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (5, 400, 40)]  # row 1 to 512
    got = model.generate_many(prompts, specs, sampling)
    single = EdgeModel.open(llama_fp32, batching=False)
    want = [single.generate(p, adapter=s, sampling=k).token_ids for p, s, k in zip(prompts, specs, sampling)]
    assert [g.token_ids for g in got] == want
    assert model.engine.stats()["kv_positions_per_row"] == 512
    model.generate(prompts[2], adapter="b", max_new_tokens=4)
    assert model.engine.stats()["kv_positions_per_row"] == 256


def test_kv_rows_fit_grows_by_powers_of_two_and_keeps_the_rows_in_use():
    from types import SimpleNamespace

    from edgelora.runtime.kvcache import KVRows

    info = SimpleNamespace(past_names=["past_key_values.0.key"], num_kv_heads=1, head_dim=2)  # what KVRows reads
    rows = KVRows(info, rows=2, max_capacity=1024)
    assert rows.fit(33, 0) and rows.capacity == 128
    array = rows.arrays["past_key_values.0.key"]
    array[:, :, :33] = 7.0
    assert not rows.fit(128, 2) and rows.capacity == 128
    assert rows.fit(129, 1) and rows.capacity == 256
    grown = rows.arrays["past_key_values.0.key"]
    assert (grown[0, :, :33] == 7.0).all() and rows.arrays.keys() == {"past_key_values.0.key"}
    assert rows.fit(1000, 1) and rows.capacity == 1024
    assert not rows.fit(300, 1) and rows.capacity == 1024  # needs more than a quarter: kept
    assert rows.fit(100, 1) and rows.capacity == 256  # twice the 128 it needs
    assert (rows.arrays["past_key_values.0.key"][0, :, :33] == 7.0).all()

"""The device runtime: no torch, per-call adapters under threads, generation, integrity and the budget."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from edgelora.errors import EdgeLoraError
from edgelora.runtime import EdgeModel


def test_importing_the_runtime_loads_no_torch():
    code = "import sys, edgelora.runtime; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_two_threads_with_two_adapters_get_their_own_answers(llama):
    model = EdgeModel.open(llama.package)
    prompts = {"plain": "Hello", "rs": "Hello"}
    want = {name: model.generate(p, adapter=name, max_new_tokens=12).token_ids for name, p in prompts.items()}
    assert want["plain"] != want["rs"]
    got: dict[str, list] = {name: [] for name in prompts}
    barrier = threading.Barrier(2)

    def worker(name):
        barrier.wait()
        for _ in range(15):
            got[name].append(model.generate(prompts[name], adapter=name, max_new_tokens=12).token_ids)

    threads = [threading.Thread(target=worker, args=(n,)) for n in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name in prompts:
        assert got[name] == [want[name]] * 15


def test_stream_pieces_join_to_the_generated_text(llama):
    model = EdgeModel.open(llama.package)
    stream = model.stream("Hello", adapter="rs", max_new_tokens=16)
    pieces = list(stream)
    assert len(pieces) > 1
    assert "".join(pieces) == stream.result.text == model.generate("Hello", adapter="rs", max_new_tokens=16).text
    assert stream.result.prompt_tokens == 6  # BOS + 5 characters


def test_stop_string_cuts_text_and_stream_never_shows_it(llama):
    model = EdgeModel.open(llama.package)
    full = model.generate("Hello", adapter="plain", max_new_tokens=16)
    stop = full.text[5:7]
    cut = model.generate("Hello", adapter="plain", max_new_tokens=16, stop=stop)
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.find(stop)]
    assert "".join(model.stream("Hello", adapter="plain", max_new_tokens=16, stop=stop)) == cut.text


def test_sampling_is_reproducible_under_a_seed(llama):
    model = EdgeModel.open(llama.package)
    kwargs = dict(adapter="rs", max_new_tokens=12, temperature=1.5, top_k=20, top_p=0.9)
    a = model.generate("Hi", seed=3, **kwargs).token_ids
    assert a == model.generate("Hi", seed=3, **kwargs).token_ids
    assert any(model.generate("Hi", seed=s, **kwargs).token_ids != a for s in range(4, 10))


def test_unknown_adapter_names_what_exists(llama):
    model = EdgeModel.open(llama.package)
    with pytest.raises(EdgeLoraError, match="unknown adapter 'nope'; this package has: patterns, plain, rs"):
        model.logits([1, 2, 3], adapter="nope")


def test_tampered_adapter_fails_its_checksum(fresh_package):
    from edgelora.format.adapter_file import read_parameters

    path = fresh_package / "adapters/plain.onnx_adapter"
    data = bytearray(path.read_bytes())
    factor = next(iter(read_parameters(path).values())).tobytes()
    data[data.find(factor) + 1] ^= 0x01  # one weight changes; the file stays well-formed
    path.write_bytes(bytes(data))
    with pytest.raises(EdgeLoraError, match="plain fails its sha256 check"):
        EdgeModel.open(fresh_package).logits([1, 2, 3], adapter="plain")
    EdgeModel.open(fresh_package, verify=False).logits([1, 2, 3], adapter="plain")


def test_package_adapters_are_checked_in_the_background_from_open(llama):
    model = EdgeModel.open(llama.package)
    deadline = time.monotonic() + 30
    while model.stats()["checked"] != ["patterns", "plain", "rs"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert model.stats()["checked"] == ["patterns", "plain", "rs"]
    assert model.stats()["resident"] == []  # checked, not loaded: loading stays lazy


def test_a_blob_changed_after_its_check_is_checked_again(fresh_package):
    model = EdgeModel.open(fresh_package)
    model.load_adapter("plain")
    model.unload_adapter("plain")
    path = fresh_package / "adapters/plain.onnx_adapter"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(EdgeLoraError, match="plain fails its sha256 check"):
        model.load_adapter("plain")


def test_newer_manifest_format_is_refused(fresh_package):
    path = fresh_package / "edgelora.json"
    manifest = json.loads(path.read_text())
    manifest["format_version"] = 99
    path.write_text(json.dumps(manifest))
    with pytest.raises(EdgeLoraError, match="format version 99 is newer"):
        EdgeModel.open(fresh_package)


def test_adapter_loaded_from_a_path_is_shape_checked(llama, tmp_path):
    from edgelora.format.adapter_file import write_adapter
    from edgelora.format.factors import AdapterFactors, ModuleFactors

    model = EdgeModel.open(llama.package)
    name = model.load_adapter(llama.package / "adapters/rs.onnx_adapter", name="copy")
    np.testing.assert_array_equal(model.logits([1, 2, 3], adapter=name), model.logits([1, 2, 3], adapter="rs"))
    bad = AdapterFactors({"model.layers.0.self_attn.o_proj": ModuleFactors(np.ones((16, 2), np.float32),
                                                                            np.ones((2, 32), np.float32))}, 2, 2.0)
    write_adapter(tmp_path / "bad.onnx_adapter", bad)
    with pytest.raises(EdgeLoraError, match=r"o_proj maps 16->32 but the package's slot maps 32->32"):
        model.load_adapter(tmp_path / "bad.onnx_adapter")


def test_unloading_a_path_adapter_can_keep_it_registered(llama):
    """Ray's replicas free an evicted upload's memory while a request for it may be on its way: it must stay
    known, and load again on its next use."""
    from edgelora.errors import UnknownAdapterError

    model = EdgeModel.open(llama.package, batching=False)
    model.load_adapter(llama.package / "adapters/rs.onnx_adapter", name="copy")
    want = model.logits([1, 2, 3], adapter="copy")
    model.unload_adapter("copy", unregister=False)
    assert "copy" not in model.stats()["resident"] and "copy" in model.adapters
    np.testing.assert_array_equal(model.logits([1, 2, 3], adapter="copy"), want)
    model.unload_adapter("copy")
    with pytest.raises(UnknownAdapterError, match="unknown adapter 'copy'"):
        model.logits([1, 2, 3], adapter="copy")


def test_memory_budget_evicts_least_recently_used(llama):
    sizes = {n: (llama.package / f"adapters/{n}.onnx_adapter").stat().st_size for n in ("plain", "rs", "patterns")}
    budget = sizes["rs"] + sizes["patterns"]
    model = EdgeModel.open(llama.package, adapter_memory_mb=budget / 2**20)
    for name in ("plain", "rs", "patterns", "rs"):
        model.logits([1, 2], adapter=name)
        assert model.stats()["resident_bytes"] <= budget
    stats = model.stats()
    assert stats["resident"] == ["patterns", "rs"]
    assert (stats["hits"], stats["misses"], stats["evictions"]) == (1, 3, 1)
    model.unload_adapter("rs")
    assert model.stats()["resident"] == ["patterns"]

"""Many tenants on one model: pins and the budget, checks on first load, strength and composition, chats, threads."""

from __future__ import annotations

import copy
import json
import shutil
import threading

import numpy as np
import pytest

from edgelora.errors import EdgeLoraError
from edgelora.format.adapter_file import read_adapter, read_ort_parameters, write_adapter
from edgelora.format.factors import AdapterFactors, ModuleFactors
from edgelora.format.manifest import load_manifest
from edgelora.runtime import EdgeModel

IDS = [[1, 8, 5, 12, 12, 15, 3, 40]]


def blob(llama, name):
    return llama.package / f"adapters/{name}.onnx_adapter"


def groups(llama):
    return load_manifest(llama.package).slot_groups


def one_line(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text
    return text


def scaled_copy(llama, src, dst, factor: float):
    """A new tenant for the llama package made from an existing one: same modules, B scaled."""
    slot_groups = groups(llama)
    f, _ = read_adapter(src, slot_groups)
    write_adapter(dst, AdapterFactors({m: ModuleFactors(x.a, np.float32(factor) * x.b) for m, x in f.modules.items()},
                                      f.rank, f.alpha), groups=slot_groups)


# loading

def test_a_blob_is_bound_from_its_mapped_file_not_copied(llama, tmp_path):
    """onnxruntime's reader copies a blob into fresh memory, whose page faults made a 20 MB blob's first
    load 10 ms; the runtime binds views of the mapped file. A blob replaced (renamed over) while its
    adapter is resident leaves that adapter's values as they were."""
    path = tmp_path / "x.onnx_adapter"
    shutil.copy(blob(llama, "plain"), path)
    values = read_ort_parameters(path)
    regions = []
    for line in open("/proc/self/maps"):
        fields = line.split()
        if fields[-1] == str(path.resolve()):
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            regions.append((lo, hi))
    assert regions
    assert all(any(lo <= v.data_ptr() < hi for lo, hi in regions) for v in values.values())

    model = EdgeModel.open(llama.package)
    model.load_adapter(path, name="x")
    before = model.logits(IDS, adapter="x")
    scaled_copy(llama, blob(llama, "plain"), path, 2.0)
    np.testing.assert_array_equal(model.logits(IDS, adapter="x"), before)
    np.testing.assert_array_equal(model.logits(IDS, adapter="x"), model.logits(IDS, adapter="plain"))


# the budget, LRU and pins

def test_eviction_order_and_budget_with_pins(llama):
    size = {n: blob(llama, n).stat().st_size for n in ("plain", "rs", "patterns")}
    budget = size["rs"] + size["patterns"] + 16
    model = EdgeModel.open(llama.package, adapter_memory_mb=budget / 2**20)
    model.pin("plain")
    assert model.stats()["pinned"] == ["plain"]
    for name in ("rs", "patterns", "rs", "plain", "patterns"):
        model.logits(IDS, adapter=name)
        stats = model.stats()
        assert stats["resident_bytes"] <= budget
        assert "plain" in stats["resident"]
    # plain is pinned, so each of rs/patterns pushes the other out, in least-recently-used order
    assert model.stats()["resident"] == ["plain", "patterns"]
    assert model.stats()["evictions"] == 3
    model.unpin("plain")
    model.logits(IDS, adapter="rs")
    assert model.stats()["resident"] == ["patterns", "rs"]  # plain, least recently used and unpinned, went first
    assert set(model.stats()["load_ms"]) == {"patterns", "rs"}
    with pytest.raises(EdgeLoraError, match="plain is not pinned"):
        model.unpin("plain")


def test_pins_alone_over_the_budget_are_refused(llama):
    size = {n: blob(llama, n).stat().st_size for n in ("plain", "rs")}
    model = EdgeModel.open(llama.package, adapter_memory_mb=(size["rs"] + size["plain"] - 1) / 2**20)
    model.pin("rs")
    with pytest.raises(EdgeLoraError) as e:
        model.pin("plain")
    assert "does not fit in the adapter memory budget" in one_line(e) and "pinned adapters rs; unpin some" in str(e.value)
    assert model.stats()["pinned"] == ["rs"] and model.stats()["resident"] == ["rs"]
    with pytest.raises(EdgeLoraError, match="adapter plain"):  # an unpinned call cannot push a pin out either
        model.logits(IDS, adapter="plain")
    model.unpin("rs")
    model.logits(IDS, adapter="plain")
    assert model.stats()["resident"] == ["plain"]


# checks on first load

def test_path_adapter_with_a_sidecar_is_checked_for_sha256_and_base(llama, tmp_path):
    for suffix in (".onnx_adapter", ".json"):
        shutil.copy(llama.package / f"adapters/plain{suffix}", tmp_path / f"legal{suffix}")
    model = EdgeModel.open(llama.package)
    assert model.load_adapter(tmp_path / "legal.onnx_adapter") == "legal"
    np.testing.assert_array_equal(model.logits(IDS, adapter="legal"), model.logits(IDS, adapter="plain"))

    sidecar = json.loads((tmp_path / "legal.json").read_text())
    (tmp_path / "legal.json").write_text(json.dumps({**sidecar, "base_fingerprint": "sha256:" + "ab" * 32}))
    with pytest.raises(EdgeLoraError) as e:
        EdgeModel.open(llama.package).load_adapter(tmp_path / "legal.onnx_adapter")
    assert "adapter legal was built for base sha256:abababababab" in one_line(e) and "but this package's base is" in str(e.value)

    (tmp_path / "legal.json").write_text(json.dumps(sidecar))
    scaled_copy(llama, tmp_path / "legal.onnx_adapter", tmp_path / "legal.onnx_adapter", 1.5)  # same shapes, other bytes
    with pytest.raises(EdgeLoraError) as e:
        EdgeModel.open(llama.package).load_adapter(tmp_path / "legal.onnx_adapter")
    assert one_line(e).endswith("adapter legal fails its sha256 check against its sidecar")
    EdgeModel.open(llama.package, verify=False).load_adapter(tmp_path / "legal.onnx_adapter")


def test_wrong_shapes_are_refused_in_one_line(llama, tmp_path):
    module = "model.layers.0.self_attn.o_proj"  # in no slot group
    bad = AdapterFactors({module: ModuleFactors(np.ones((48, 2), np.float32), np.ones((2, 32), np.float32))}, 2, 2.0)
    write_adapter(tmp_path / "other.onnx_adapter", bad)
    with pytest.raises(EdgeLoraError) as e:
        EdgeModel.open(llama.package).load_adapter(tmp_path / "other.onnx_adapter")
    assert "adapter other: module" in one_line(e) and "o_proj maps 48->32 but the package's slot maps 32->32" in str(e.value)


def test_package_adapters_carry_a_sidecar_naming_the_base(llama):
    manifest = json.loads((llama.package / "edgelora.json").read_text())
    for name, entry in manifest["adapters"].items():
        sidecar = json.loads((llama.package / f"adapters/{name}.json").read_text())
        assert sidecar == {"base_fingerprint": manifest["base_fingerprint"], "sha256": entry["sha256"]}


# strength and composition against PEFT

def _merged_reference(llama, weights: dict[str, float]):
    """The base with w·ΔW of every adapter added to its weights, ΔW from PEFT's own get_delta_weight."""
    import torch

    merged = copy.deepcopy(llama.base)
    modules = dict(merged.named_modules())
    with torch.no_grad():
        for name, weight in weights.items():
            peft_model = llama.peft(name)
            for path, module in peft_model.named_modules():
                if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
                    target = path.removeprefix("base_model.model.")
                    modules[target].weight += weight * module.get_delta_weight("default")
        return merged(torch.as_tensor(np.asarray(IDS))).logits.numpy()


@pytest.mark.parametrize("weights", [{"plain": 0.7, "rs": 0.3}, {"plain": 1.0, "patterns": -0.5, "rs": 2.0}])
def test_composition_equals_the_sum_of_peft_deltas(llama, weights):
    model = EdgeModel.open(llama.package)
    got = model.logits(IDS, adapter=weights)
    np.testing.assert_allclose(got, _merged_reference(llama, weights), atol=1e-4, rtol=0)
    assert np.abs(got - model.logits(IDS, adapter="plain")).max() > 1e-3
    # equal requests in another order share one build
    model.logits(IDS, adapter=dict(reversed(list(weights.items()))))
    assert model.stats()["misses"] == 2 and model.stats()["hits"] == 1


def test_composition_matches_peft_add_weighted_adapter_cat(llama):
    """PEFT's own 'cat' combination, for two adapters without rsLoRA (peft 0.21 mis-scales rsLoRA there)."""
    import torch

    peft_model = llama.peft("plain")
    mixed, _ = read_adapter(blob(llama, "plain"), groups(llama))
    peft_model.load_adapter(str(llama.adapter_dirs["plain"]), adapter_name="second")
    # a second tenant: the same PEFT adapter with B negated and halved, written both ways
    with torch.no_grad():
        for module in peft_model.modules():
            if hasattr(module, "lora_B") and "second" in module.lora_B:
                module.lora_B["second"].weight.mul_(-0.5)
    scaled = AdapterFactors({m: ModuleFactors(f.a, np.float32(-0.5) * f.b) for m, f in mixed.modules.items()}, 4, 8.0)
    model = EdgeModel.open(llama.package)
    path = llama.package.parent / "second.onnx_adapter"
    write_adapter(path, scaled, groups=groups(llama))
    model.load_adapter(path)
    peft_model.add_weighted_adapter(["default", "second"], [0.6, 0.3], "mix", combination_type="cat")
    peft_model.set_adapter("mix")
    with torch.no_grad():
        want = peft_model(torch.as_tensor(np.asarray(IDS))).logits.numpy()
    np.testing.assert_allclose(model.logits(IDS, adapter={"plain": 0.6, "second": 0.3}), want, atol=1e-4, rtol=0)


def test_strength_zero_is_the_base_and_half_is_peft_with_half_b(llama):
    import torch

    model = EdgeModel.open(llama.package)
    np.testing.assert_array_equal(model.logits(IDS, adapter={"rs": 0}), model.logits(IDS, adapter=None))
    np.testing.assert_array_equal(model.logits(IDS, adapter={"rs": 0.0, "plain": 0}), model.logits(IDS))
    assert model.stats()["resident"] == []
    peft_model = llama.peft("rs")
    with torch.no_grad():
        for module in peft_model.modules():
            if hasattr(module, "lora_B") and "default" in module.lora_B:
                module.lora_B["default"].weight.mul_(0.5)
        want = peft_model(torch.as_tensor(np.asarray(IDS))).logits.numpy()
    np.testing.assert_allclose(model.logits(IDS, adapter={"rs": 0.5}), want, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(model.logits(IDS, adapter={"rs": 1}), model.logits(IDS, adapter="rs"))


def test_bad_specs_are_one_line(llama):
    model = EdgeModel.open(llama.package)
    for spec, message in [({"rs": float("nan")}, "weight must be a finite number"), (["rs"], "adapter must be a name"),
                          ({"rs": 0.5, "nope": 0.5}, "unknown adapter 'nope'")]:
        with pytest.raises(EdgeLoraError, match=message) as e:
            model.logits(IDS, adapter=spec)
        one_line(e)


# conversations

@pytest.mark.parametrize("adapter", ["plain", {"plain": 0.7, "rs": 0.3}, None])
def test_second_chat_turn_equals_a_fresh_generation_over_the_history(llama, adapter):
    model = EdgeModel.open(llama.package)
    chat = model.chat(adapter=adapter)
    first = chat.send([1, 40, 5, 12, 12, 15], max_new_tokens=6)
    second = chat.send([70, 23, 15, 18, 12, 4], max_new_tokens=8)
    assert second.prompt_tokens == 7  # the new turn plus the last answer token: never the whole history again
    history = [1, 40, 5, 12, 12, 15] + first.token_ids + [70, 23, 15, 18, 12, 4]
    assert second.token_ids == model.generate(history, adapter=adapter, max_new_tokens=8).token_ids
    assert chat.token_ids == history + second.token_ids


def test_text_chat_adds_special_tokens_on_the_first_turn_only(llama):
    model = EdgeModel.open(llama.package)
    chat = model.chat(adapter={"rs": 0.5})
    first = chat.send("Hello", max_new_tokens=5)
    second = chat.send(" there", max_new_tokens=5)
    history = model.encode("Hello") + first.token_ids + model.encode(" there", add_special_tokens=False)
    assert second.token_ids == model.generate(history, adapter={"rs": 0.5}, max_new_tokens=5).token_ids
    other = model.chat(adapter="rs")  # another strength is another session with its own cache
    other.send("Hello", max_new_tokens=5)
    assert other.send(" there", max_new_tokens=5).token_ids == model.generate(
        other.token_ids[:-5], adapter="rs", max_new_tokens=5).token_ids


# threads

def test_threads_with_six_tenants_get_their_single_threaded_answers(llama, tmp_path):
    scaled_copy(llama, blob(llama, "plain"), tmp_path / "plain2.onnx_adapter", 2.0)
    specs = ["plain", "rs", "patterns", "plain2", {"plain": 0.7, "rs": 0.3}, {"patterns": 0.5}]
    prompts = [[1, 8, 5, 12, 12, 15]] * len(specs)  # one prompt: different answers come from the adapters alone
    reference = EdgeModel.open(llama.package)
    reference.load_adapter(tmp_path / "plain2.onnx_adapter")
    want = [reference.generate(p, adapter=s, max_new_tokens=6).token_ids for p, s in zip(prompts, specs)]
    want_logits = [reference.logits(p, adapter=s) for p, s in zip(prompts, specs)]
    for i in range(len(specs)):  # a mix-up between any two tenants would show in their logits
        for j in range(i):
            assert np.abs(want_logits[i] - want_logits[j]).max() > 1e-3

    # room for the largest blob and a half: evictions and rebuilds of compositions happen under the threads
    budget = int(1.5 * max(reference.registry.resolve(s).bytes for s in specs))
    model = EdgeModel.open(llama.package, adapter_memory_mb=budget / 2**20, intra_op_threads=1)
    model.load_adapter(tmp_path / "plain2.onnx_adapter")
    errors: list = []
    barrier = threading.Barrier(8)

    def worker(t):
        barrier.wait()
        for j in range(50):
            k = (t + j) % len(specs)
            if j % 2:
                got = model.generate(prompts[k], adapter=specs[k], max_new_tokens=6).token_ids
                if got != want[k]:
                    errors.append((t, j, specs[k], got))
            elif not np.allclose(model.logits(prompts[k], adapter=specs[k]), want_logits[k], atol=1e-6, rtol=0):
                errors.append((t, j, specs[k], "logits"))
            if model.stats()["resident_bytes"] > budget:
                errors.append("over budget")

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert model.stats()["evictions"] > 0


def test_a_composition_is_built_once_however_many_threads_ask(llama):
    model = EdgeModel.open(llama.package)
    barrier = threading.Barrier(8)
    results = []

    def worker():
        barrier.wait()
        results.append(model.logits(IDS, adapter={"rs": 0.25, "patterns": 0.75}))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats = model.stats()
    assert (stats["misses"], stats["hits"]) == (1, 7)
    assert stats["resident"] == ["patterns:0.75+rs:0.25"]
    assert all(np.array_equal(r, results[0]) for r in results)


# CLI

def test_cli_generate_takes_weights_and_compositions(llama):
    from conftest import run_cli

    model = EdgeModel.open(llama.package)
    want = model.generate("Hello", adapter={"plain": 0.7, "rs": 0.3}, max_new_tokens=6).text
    code, text, err = run_cli("generate", llama.package, "--adapter", "plain:0.7", "--adapter", "rs:0.3",
                              "--prompt", "Hello", "--max-new-tokens", "6")
    assert code == 0, err
    assert text == want + "\n"
    code, _, err = run_cli("generate", llama.package, "--adapter", "rs:x", "--prompt", "Hi")
    assert code == 2 and "expected NAME or NAME:WEIGHT" in err

"""Property tests (hypothesis) over the codecs and every loader of untrusted input.

Codecs: round trips are exact where they must be (fp32; fp16 of fp16 values; int8 and int4 of values on
their grid), bounded otherwise, and values past fp16's range are refused rather than stored as Inf.
Loaders (manifest, ``.onnx_adapter`` blobs, sidecars, PEFT folders, names) and ``EdgeModel.open`` on a real
package with a mutated manifest (where the graph and generation info are checked): whatever the bytes or
the JSON, they return or raise ``EdgeLoraError``, never anything else.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edgelora.errors import EdgeLoraError
from edgelora.format import codec
from edgelora.format.adapter_file import map_parameters, read_adapter, write_adapter
from edgelora.format.factors import AdapterFactors, ModuleFactors
from edgelora.format.fileio import check_name
from edgelora.format.manifest import FILENAME, load_manifest
from edgelora.format.sidecar import read_sidecar
from edgelora.runtime import EdgeModel

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])

dims = st.integers(1, 6)
finite32 = st.floats(-1e4, 1e4, width=32, allow_subnormal=False)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def roundtrip(x: np.ndarray, dtype: str, block: int = 32) -> np.ndarray:
    return codec.decode("t", codec.encode("t", x, dtype, block), dtype)


# --- codecs ------------------------------------------------------------------------------------------------

@FAST
@given(hnp.arrays(np.float32, st.tuples(dims, dims), elements=st.floats(width=32, allow_nan=False,
                                                                         allow_infinity=False)))
def test_fp32_is_exact(x):
    np.testing.assert_array_equal(roundtrip(x, "fp32"), x)


@FAST
@given(hnp.arrays(np.float16, st.tuples(dims, dims), elements=st.floats(width=16, allow_nan=False,
                                                                         allow_infinity=False)))
def test_fp16_of_fp16_values_is_exact(x):
    np.testing.assert_array_equal(roundtrip(x.astype(np.float32), "fp16"), x.astype(np.float32))


@st.composite
def on_grid(draw, levels: int, block: int | None = None):
    """Values q·s with integer q in [-levels, levels], each scale group reaching ±levels, s an fp16 number."""
    k = draw(st.sampled_from([2, 4, 6])) if block is None else draw(st.sampled_from([block, 2 * block]))
    n = draw(dims)
    groups = 1 if block is None else k // block
    scales = draw(hnp.arrays(np.float16, (groups, n), elements=st.floats(2.0**-14, 1000.0, width=16)))
    q = draw(hnp.arrays(np.int32, (k, n), elements=st.integers(-levels, levels)))
    rows = q.reshape(groups, k // groups, n)
    rows[:, 0, :] = np.where(draw(st.booleans()), levels, -levels)  # the group's absmax sits on the grid
    x = rows * scales.astype(np.float32)[:, None, :]
    return x.reshape(k, n).astype(np.float32)


@FAST
@given(on_grid(63))
def test_int8_of_grid_values_is_exact(x):
    np.testing.assert_array_equal(roundtrip(x, "int8"), x)


@FAST
@given(hnp.arrays(np.float32, st.tuples(dims, dims), elements=finite32))
def test_an_int8_a_cannot_saturate_a_u8_s8_kernel(x):
    """onnxruntime multiplies a stored int8 ``a`` with activations rounded to uint8; x86 CPUs without VNNI add
    pairs of those products in int16 with saturation, which 8-bit values overflow (docs/format.md)."""
    stored = codec.encode("t.lora_A", x, "int8")["t.lora_A.int8"].astype(np.int64)
    assert 2 * 255 * np.abs(stored).max(initial=0) <= np.iinfo(np.int16).max


@FAST
@given(on_grid(7, block=32))
def test_int4_of_grid_values_is_exact(x):
    np.testing.assert_array_equal(roundtrip(x, "int4", 32), x)


@FAST
@given(hnp.arrays(np.float32, st.tuples(dims, dims), elements=finite32))
def test_fp16_error_is_bounded(x):
    err = np.abs(roundtrip(x, "fp16") - x)
    assert (err <= np.maximum(np.abs(x) * 2.0**-11, 2.0**-25)).all()


@FAST
@given(hnp.arrays(np.float32, st.tuples(dims, dims), elements=finite32))
def test_int8_error_is_at_most_half_a_step(x):
    params = codec.encode("t", x, "int8")
    step = params["t.scale"].astype(np.float32)
    assert (np.abs(codec.decode("t", params, "int8") - x) <= step / 2 * (1 + 2.0**-10)).all()


@FAST
@given(st.tuples(dims, dims, dims).flatmap(lambda s: st.tuples(
    hnp.arrays(np.float32, s[:2], elements=finite32), hnp.arrays(np.float32, s[1:], elements=finite32))))
def test_int8_pairs_keep_their_product_within_half_a_step_of_each_factor(pair):
    """b is stored as integers once balanced (each nonzero row spans ±127, the product unchanged); a errs by
    at most half its column step and b by half a unit, and the product by no more than those two allow."""
    a, b = pair
    a_bal, b_bal = codec.balance_int8(a, b)
    slack = 1e-5 * (np.abs(a).astype(np.float64) @ np.abs(b)) + 1e-30
    assert (np.abs(a_bal.astype(np.float64) @ b_bal - a.astype(np.float64) @ b) <= slack).all()
    peak = np.abs(b_bal).max(axis=1)
    assert np.allclose(peak[peak > 0], 127, rtol=1e-6)
    params = {**codec.encode("t.lora_A", a_bal, "int8"), **codec.encode("t.lora_B", b_bal, "int8")}
    assert set(params) == {"t.lora_A.int8", "t.lora_A.scale", "t.lora_B.int8"}
    a_got, b_got = codec.decode("t.lora_A", params, "int8"), codec.decode("t.lora_B", params, "int8")
    half_step = params["t.lora_A.scale"].astype(np.float64) / 2 * (1 + 2.0**-10)
    bound = half_step[None, :] * np.ones_like(a_got) @ np.abs(b_bal) + np.abs(a_got) @ np.full(b.shape, 0.5)
    err = np.abs(a_got.astype(np.float64) @ b_got - a_bal.astype(np.float64) @ b_bal)
    assert (err <= bound * (1 + 1e-5) + slack).all()


@FAST
@given(st.sampled_from([32, 64]).flatmap(
    lambda block: st.tuples(st.just(block), hnp.arrays(np.float32, st.tuples(st.sampled_from([block, 2 * block]),
                                                                            dims), elements=finite32))))
def test_int4_error_is_no_worse_than_plain_absmax_scaling(case):
    """Per block and column, the squared error is at most that of scale = absmax/7 (one fp16 step up at most),
    which errs by at most half a step on each value."""
    block, x = case
    k, n = x.shape
    blocks = x.reshape(k // block, block, n)
    absmax = np.abs(blocks).max(axis=1)
    step = np.maximum(absmax / 7, 2.0**-24) * (1 + 2.0**-10) + 2.0**-24
    err = ((roundtrip(x, "int4", block).reshape(blocks.shape) - blocks) ** 2).sum(axis=1)
    assert (err <= block * (step / 2) ** 2 * (1 + 1e-4)).all()


@FAST
@given(st.sampled_from(["fp16", "int4"]),  # int8's one scale per rank component is fp32
       hnp.arrays(np.float32, (2, 2), elements=st.floats(width=32, allow_nan=False, allow_infinity=False)))
def test_values_past_fp16_range_are_refused_not_stored_as_inf(dtype, x):
    try:
        y = roundtrip(x, dtype, 32)
    except EdgeLoraError as e:
        assert "fp16 range" in str(e)
        return
    assert np.isfinite(y).all()


# --- adapter blobs -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("properties")


def write_bytes(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


@st.composite
def factors(draw):
    modules = {}
    for i in range(draw(st.integers(1, 3))):
        # even ranks: int4 packs pairs along the reduction axis, which is the rank for B
        r, k, n = draw(st.sampled_from([2, 4])), draw(st.sampled_from([2, 4, 32])), draw(st.sampled_from([2, 4, 32]))
        a = draw(hnp.arrays(np.float32, (k, r), elements=st.floats(-4, 4, width=32)))
        b = draw(hnp.arrays(np.float32, (r, n), elements=st.floats(-4, 4, width=32)))
        modules[f"model.layers.{i}.mlp.up_proj"] = ModuleFactors(a, b)
    return AdapterFactors(modules, rank=max(f.rank for f in modules.values()), alpha=1.0)


@SLOW
@given(factors(), st.sampled_from(codec.DTYPES))
def test_adapter_file_roundtrip_is_what_the_codec_decodes(scratch, adapter, dtype):
    path = scratch / f"rt-{dtype}.onnx_adapter"
    write_adapter(path, adapter, dtype, 32)
    got, got_dtype = read_adapter(path)
    assert got_dtype == dtype and set(got.modules) == set(adapter.modules)
    assert_read_as_onnxruntime_reads(map_parameters(path), path)
    for module, f in adapter.modules.items():
        pair = codec.balance_int8(f.a, f.b) if dtype == "int8" else (f.a, f.b)
        for tensor, want in zip((f"{module}.lora_A", f"{module}.lora_B"), pair):
            expected = codec.decode(tensor, codec.encode(tensor, want, dtype, 32), dtype)
            np.testing.assert_array_equal(getattr(got.modules[module], tensor[-1].lower()), expected)


def assert_read_as_onnxruntime_reads(mapped: dict[str, np.ndarray], path: Path) -> None:
    """The mapped reader's parameters are those of onnxruntime's reader (which verifies the flatbuffer)."""
    written = ort.AdapterFormat.read_adapter(str(path)).get_parameters()
    assert set(mapped) == set(written)
    for name, value in written.items():
        np.testing.assert_array_equal(mapped[name], value.numpy(), strict=True)


def loads_or_refuses(load, *args):
    try:
        load(*args)
    except EdgeLoraError as e:
        assert "\n" not in str(e)


@FAST
@given(st.binary(max_size=2048))
def test_blob_loader_on_arbitrary_bytes(scratch, data):
    loads_or_refuses(read_adapter, write_bytes(scratch, "any.onnx_adapter", data))


@FAST
@given(st.data())
def test_blob_loader_on_damaged_blobs(llama, scratch, data):
    blob = (llama.package / "adapters/plain.onnx_adapter").read_bytes()
    damaged = bytearray(blob[: data.draw(st.integers(0, len(blob)))])
    for _ in range(data.draw(st.integers(0, 6)) if damaged else 0):
        damaged[data.draw(st.integers(0, len(damaged) - 1))] = data.draw(st.integers(0, 255))
    path = write_bytes(scratch, "damaged.onnx_adapter", bytes(damaged))
    loads_or_refuses(read_adapter, path)
    try:  # where onnxruntime's reader reads it too, both read the same
        mapped = map_parameters(path)
        ort.AdapterFormat.read_adapter(str(path))
    except (EdgeLoraError, RuntimeError):
        return
    assert_read_as_onnxruntime_reads(mapped, path)


@FAST
@given(st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
def test_sidecar_loader(scratch, data):
    write_bytes(scratch, "side.json", data)
    loads_or_refuses(read_sidecar, scratch / "side.onnx_adapter")


# --- manifests ---------------------------------------------------------------------------------------------

def package_with_manifest(llama, text: str, with_files: bool = False) -> Path:
    """A folder holding ``text`` as its manifest and, ``with_files``, hard links to the package's other files
    (links, not symlinks: the loader refuses paths that resolve outside the package)."""
    folder = Path(tempfile.mkdtemp(dir=llama.package.parent))
    for file in llama.package.rglob("*") if with_files else ():
        if file.is_file() and file.name != FILENAME:
            (folder / file.relative_to(llama.package)).parent.mkdir(parents=True, exist_ok=True)
            os.link(file, folder / file.relative_to(llama.package))
    (folder / FILENAME).write_text(text)
    return folder


@FAST
@given(json_values)
def test_manifest_loader_on_arbitrary_json(llama, value):
    folder = package_with_manifest(llama, json.dumps(value))
    try:
        loads_or_refuses(load_manifest, folder)
    finally:
        shutil.rmtree(folder)


def paths_of(value, prefix=()):
    """Every (path, leaf) of a JSON value, so a mutation can reach any field at any depth."""
    if isinstance(value, dict) and value:
        return [p for k, v in value.items() for p in paths_of(v, (*prefix, k))] + [(prefix, value)]
    if isinstance(value, list) and value:
        return [p for i, v in enumerate(value) for p in paths_of(v, (*prefix, i))] + [(prefix, value)]
    return [(prefix, value)]


def mutated_manifest(llama, data) -> str:
    """A real manifest with one field anywhere replaced by arbitrary JSON, or removed."""
    raw = json.loads((llama.package / FILENAME).read_text())
    path, _ = data.draw(st.sampled_from(paths_of(raw)))
    assume(path)
    parent = raw
    for key in path[:-1]:
        parent = parent[key]
    if isinstance(parent, dict) and data.draw(st.booleans()):
        del parent[path[-1]]
    else:
        parent[path[-1]] = data.draw(json_values)
    return json.dumps(raw)


@FAST
@given(st.data())
def test_manifest_loader_on_mutated_manifests(llama, data):
    folder = package_with_manifest(llama, mutated_manifest(llama, data))
    try:
        loads_or_refuses(load_manifest, folder)
    finally:
        shutil.rmtree(folder)


@SLOW
@given(st.data())
def test_model_open_on_mutated_manifests(llama, data):
    """Past the manifest's types, ``open`` reads the graph info (layers, heads, outputs, EOS ids), the graph
    and the tokenizer; a bad value in any of them is one ``EdgeLoraError`` too."""
    folder = package_with_manifest(llama, mutated_manifest(llama, data), with_files=True)
    try:
        loads_or_refuses(lambda package: EdgeModel.open(package, verify=False), folder)
    finally:
        shutil.rmtree(folder)


def test_manifest_roundtrip(llama):
    manifest = load_manifest(llama.package)
    folder = package_with_manifest(llama, manifest.to_json())
    try:
        assert load_manifest(folder) == manifest
    finally:
        shutil.rmtree(folder)


# --- PEFT folders and names --------------------------------------------------------------------------------

@contextmanager
def peft_copy(llama, adapter: str):
    """A private copy of one of the test PEFT folders, removed afterwards (hypothesis reuses the fixture)."""
    folder = Path(tempfile.mkdtemp(dir=llama.package.parent)) / "peft"
    shutil.copytree(llama.adapter_dirs[adapter], folder)
    try:
        yield folder
    finally:
        shutil.rmtree(folder.parent)


@SLOW
@given(st.dictionaries(st.sampled_from(["peft_type", "r", "lora_alpha", "rank_pattern", "alpha_pattern",
                                        "use_rslora", "use_dora", "bias", "modules_to_save", "lora_bias"]),
                       json_values, min_size=1, max_size=4))
def test_peft_loader_on_hostile_configs(llama, changes):
    from edgelora.exporters.peft_ingest import ingest_peft

    with peft_copy(llama, "patterns") as folder:
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, **changes}))
        loads_or_refuses(ingest_peft, folder)


@SLOW
@given(st.binary(max_size=1024))
def test_peft_loader_on_arbitrary_weight_bytes(llama, data):
    from edgelora.exporters.peft_ingest import ingest_peft

    with peft_copy(llama, "plain") as folder:
        (folder / "adapter_model.safetensors").write_bytes(data)
        loads_or_refuses(ingest_peft, folder)


@FAST
@given(st.text(max_size=70))
def test_an_accepted_name_is_one_plain_path_component(name):
    try:
        check_name(name)
    except EdgeLoraError:
        return
    assert Path(name).name == name and name not in (".", "..") and not name.startswith(".")
    assert not any(c in name for c in "/\\\0\n") and len(name) <= 64

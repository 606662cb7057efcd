"""The bad-input corpus: every case ends in one line naming the file and the problem, exit code 2, no traceback,
and nothing written or changed.

One row per case: what to break in a private copy of a package, a PEFT folder or a base folder, then the
command that meets it (a CLI call through click's runner, or a call of the runtime's Python API), the
message it must give and the file that message must name.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgelora.cli import main
from edgelora.errors import EXIT_BAD_INPUT, EdgeLoraError

Q = "model.layers.0.self_attn.q_proj"
QA, QB = f"base_model.model.{Q}.lora_A.weight", f"base_model.model.{Q}.lora_B.weight"
O = "model.layers.0.self_attn.o_proj"  # a slot in no slot group: a blob may hold it alone


@dataclass
class Ctx:
    tmp: Path
    pkg: Path  # a private copy of the llama test package (adapters plain, rs, patterns; fp32 slots)
    peft: Path  # a private copy of the "plain" PEFT adapter (r=4 on q_proj, v_proj)
    base: Path  # a private copy of the base model folder
    marker: Path  # must never exist: a pickle payload would create it


# --- what to break -----------------------------------------------------------------------------------------

def edit_json(file: str, change):
    def apply(ctx: Ctx):
        path = Path(str(file).format(**vars(ctx)))
        raw = json.loads(path.read_text())
        change(raw)
        path.write_text(json.dumps(raw))
    return apply


def config(**values):
    return edit_json("{peft}/adapter_config.json", lambda c: c.update(values))


def manifest(change):
    return edit_json("{pkg}/edgelora.json", change)


def write(file: str, data: bytes | str):
    def apply(ctx: Ctx):
        path = Path(file.format(**vars(ctx)))
        path.write_bytes(data.encode() if isinstance(data, str) else data)
    return apply


def truncate(file: str, keep: float = 0.5):
    def apply(ctx: Ctx):
        path = Path(file.format(**vars(ctx)))
        path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])
    return apply


def remove(file: str):
    return lambda ctx: Path(file.format(**vars(ctx))).unlink()


def tensors(change):
    """Edit the PEFT weights (a dict of torch tensors) in place."""
    def apply(ctx: Ctx):
        from safetensors.torch import load_file, save_file

        path = ctx.peft / "adapter_model.safetensors"
        weights = load_file(str(path))
        change(weights)
        save_file(weights, str(path))
    return apply


def set_value(key: str, value: float):
    def change(weights):
        weights[key][0, 0] = value
    return tensors(change)


def flip_byte(file: str):
    def apply(ctx: Ctx):
        path = Path(file.format(**vars(ctx)))
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    return apply


def pickle_bomb(ctx: Ctx):
    """A legacy .bin whose unpickling would create ``ctx.marker``: weights_only must refuse to run it."""
    import torch

    class Payload:
        def __reduce__(self):
            return open, (str(ctx.marker), "w")

    (ctx.peft / "adapter_model.safetensors").unlink()
    torch.save({QA: Payload()}, ctx.peft / "adapter_model.bin")


def base_pickle_bomb(ctx: Ctx):
    """A base folder whose weights are a legacy pytorch_model.bin that would run code when unpickled."""
    import torch

    class Payload:
        def __reduce__(self):
            return open, (str(ctx.marker), "w")

    (ctx.base / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": Payload()}, ctx.base / "pytorch_model.bin")


def base_remote_code(ctx: Ctx):
    """A base folder that asks for its own Python code to be run (``auto_map``); it must never run, nor prompt."""
    (ctx.base / "configuration_evil.py").write_text(f"open({str(ctx.marker)!r}, 'w')\n")
    edit_json("{base}/config.json", lambda c: c.update(model_type="evil",
                                                       auto_map={"AutoConfig": "configuration_evil.Evil"}))(ctx)


def symlink_out(ctx: Ctx):
    blob = ctx.pkg / "adapters/plain.onnx_adapter"
    blob.unlink()
    blob.symlink_to(ctx.peft / "adapter_config.json")


def blob(factors_of, dtype: str = "fp32", sidecar=None):
    """A path adapter ``{tmp}/x.onnx_adapter`` with the given factors, and optionally a sidecar."""
    def apply(ctx: Ctx):
        from edgelora.format.adapter_file import write_adapter
        from edgelora.format.factors import AdapterFactors, ModuleFactors

        modules = {module: ModuleFactors(a.astype(np.float32), b.astype(np.float32))
                   for module, (a, b) in factors_of().items()}
        path = ctx.tmp / "x.onnx_adapter"
        write_adapter(path, AdapterFactors(modules, rank=4, alpha=8.0), dtype)
        if sidecar is not None:
            (ctx.tmp / "x.json").write_text(sidecar(ctx, path))
    return apply


def int8_blob_with_b_scales(ctx: Ctx):
    """An int8 blob as edgelora wrote them before format 3: b with column scales of its own."""
    import onnxruntime as ort

    params = {f"{O}.lora_A.int8": np.ones((32, 4), np.int8), f"{O}.lora_A.scale": np.ones(4, np.float16),
              f"{O}.lora_B.int8": np.ones((4, 32), np.int8), f"{O}.lora_B.scale": np.ones(32, np.float16)}
    fmt = ort.AdapterFormat()
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in params.items()})
    fmt.export_adapter(str(ctx.tmp / "x.onnx_adapter"))


def int64_blob(ctx: Ctx):
    """A valid .onnx_adapter file whose tensor type no edgelora codec writes."""
    import onnxruntime as ort

    fmt = ort.AdapterFormat()
    fmt.set_parameters({f"{O}.lora_A": ort.OrtValue.ortvalue_from_numpy(np.ones((32, 4), np.int64))})
    fmt.export_adapter(str(ctx.tmp / "x.onnx_adapter"))


def q_factors(n_in=32, n_out=32, module=O, fill=0.1):
    return lambda: {module: (np.full((n_in, 4), fill), np.full((4, n_out), fill))}


def copy_package_blob(sidecar_change):
    """The package's own blob copied out to ``{tmp}/x.onnx_adapter`` with a changed sidecar."""
    def apply(ctx: Ctx):
        shutil.copy(ctx.pkg / "adapters/plain.onnx_adapter", ctx.tmp / "x.onnx_adapter")
        side = json.loads((ctx.pkg / "adapters/plain.json").read_text())
        (ctx.tmp / "x.json").write_text(sidecar_change(side))
    return apply


# --- how to meet it ----------------------------------------------------------------------------------------

ADD = ["add-adapter", "{pkg}", "new={peft}"]
GEN = ["generate", "{pkg}", "--adapter", "plain", "--prompt", "hi", "--max-new-tokens", "1"]
INSPECT = ["inspect", "{pkg}"]
EXPORT = ["export", "{base}", "--adapter", "new={peft}", "--out", "{tmp}/out"]
TRAIN = ["train", "{base}", "--data", "{tmp}/data.jsonl", "--out", "{tmp}/trained", "--max-steps", "1", "--quiet"]
DATA = "{tmp}/data.jsonl"
PROBE = "{tmp}/probe.jsonl"
GOOD_ROW = '{"prompt": "a", "completion": "b"}\n'


def load_path_adapter(name: str | None = None):
    """The runtime's API: register and load ``{tmp}/x.onnx_adapter`` into the package's model."""
    def call(ctx: Ctx):
        from edgelora.runtime import EdgeModel

        EdgeModel.open(ctx.pkg).load_adapter(ctx.tmp / "x.onnx_adapter", name=name)
    return call


BAD_NAME = "is not allowed"
GARBAGE = np.random.default_rng(0).bytes(4096)
MANIFEST = "{pkg}/edgelora.json"
CONFIG = "{peft}/adapter_config.json"
WEIGHTS = "{peft}/adapter_model.safetensors"
BLOB = "{pkg}/adapters/plain.onnx_adapter"
XBLOB = "{tmp}/x.onnx_adapter"

# id, what to break, command, message, file the message names
CASES = [
    # PEFT adapter folders
    ("peft-folder-missing", None, ["add-adapter", "{pkg}", "new={tmp}/nope"],
     "adapter folder not found", "{tmp}/nope"),
    ("peft-config-missing", remove(CONFIG), ADD, "adapter_config.json: missing", CONFIG),
    ("peft-config-empty", write(CONFIG, ""), ADD, "not valid JSON", CONFIG),
    ("peft-config-truncated", truncate(CONFIG), ADD, "not valid JSON", CONFIG),
    ("peft-config-not-object", write(CONFIG, "[1, 2]"), ADD, "expected a JSON object", CONFIG),
    ("peft-config-not-utf8", write(CONFIG, b"\xff\xfe{"), ADD, "not valid JSON", CONFIG),
    ("peft-type-unknown", config(peft_type="IA3"), ADD, "peft_type 'IA3' is not supported", CONFIG),
    ("peft-type-missing", config(peft_type=None), ADD, "peft_type None is not supported", CONFIG),
    ("peft-r-string", config(r="4"), ADD, "r must be a positive number", CONFIG),
    ("peft-r-bool", config(r=True), ADD, "r must be a positive number", CONFIG),
    ("peft-r-huge", config(r=10**12), ADD, "rank 4 in the weights but 1000000000000 in the config", CONFIG),
    ("peft-alpha-negative", config(lora_alpha=-8), ADD, "lora_alpha must be a positive number", CONFIG),
    ("peft-alpha-nan", config(lora_alpha=float("nan")), ADD, "lora_alpha must be a positive number", CONFIG),
    ("peft-alpha-inf", config(lora_alpha=float("inf")), ADD, "lora_alpha must be a positive number", CONFIG),
    ("peft-dora", config(use_dora=True), ADD, "DoRA is not a low-rank delta", "{peft}"),
    ("peft-dora-magnitude", tensors(lambda w: w.update({f"base_model.model.{Q}.lora_magnitude_vector": w[QB][:, 0].clone()})),
     ADD, "DoRA is not a low-rank delta", "{peft}"),
    ("peft-lora-bias", tensors(lambda w: w.update({f"base_model.model.{Q}.lora_B.bias": w[QB][:, 0].clone()})), ADD,
     "lora_bias is not a low-rank delta", "{peft}"),
    ("peft-embedding-copy", tensors(lambda w: w.update({"base_model.model.model.embed_tokens.weight": w[QA].clone()})), ADD,
     "a full copy of an embedding (save_embedding_layers) is not a low-rank delta", "{peft}"),
    ("peft-rank-pattern-list", config(rank_pattern=[2]), ADD, "rank_pattern must be a mapping", CONFIG),
    ("peft-rank-pattern-regex", config(rank_pattern={"q_proj(": 2}), ADD, "is not a valid pattern", CONFIG),
    ("peft-alpha-pattern-string", config(alpha_pattern={"q_proj": "x"}), ADD,
     "alpha_pattern['q_proj'] must be a positive number", CONFIG),
    ("peft-weights-missing", remove(WEIGHTS), ADD, "no adapter_model.safetensors or adapter_model.bin", "{peft}"),
    ("peft-weights-empty", write(WEIGHTS, b""), ADD, "cannot read the adapter weights", WEIGHTS),
    ("peft-weights-truncated", truncate(WEIGHTS), ADD, "cannot read the adapter weights", WEIGHTS),
    ("peft-weights-garbage", write(WEIGHTS, GARBAGE), ADD, "cannot read the adapter weights", WEIGHTS),
    ("peft-weights-nan", set_value(QA, float("nan")), ADD, "NaN or Inf values in lora_A", "{peft}"),
    ("peft-weights-inf", set_value(QB, float("inf")), ADD, "NaN or Inf values in lora_B", "{peft}"),
    ("peft-weights-int", tensors(lambda w: w.update({QA: w[QA].to(__import__("torch").int32)})), ADD,
     "is torch.int32, expected a float type", WEIGHTS),
    ("peft-weights-3d", tensors(lambda w: w.update({QA: w[QA].reshape(2, 2, 32)})), ADD,
     "expected [r, in] and [out, r]", "{peft}"),
    ("peft-weights-rank-mismatch", tensors(lambda w: w.update({QB: w[QB][:, :3].contiguous()})), ADD,
     "expected [r, in] and [out, r]", "{peft}"),
    ("peft-weights-only-a", tensors(lambda w: w.pop(QB)), ADD, "has lora_A but not both", "{peft}"),
    ("peft-weights-unexpected", tensors(lambda w: w.update({"foo.weight": w[QA].clone()})), ADD,
     "unexpected tensor foo.weight", "{peft}"),
    ("peft-weights-embedding", tensors(lambda w: w.update({"base_model.model.model.embed_tokens.lora_embedding_A":
                                                          w[QA].clone()})), ADD, "has lora_A but not both lora_A and lora_B", "{peft}"),
    ("peft-other-base", tensors(lambda w: w.update({QA: w[QA].repeat(1, 2), QB: w[QB].repeat(2, 1)})), ADD,
     "maps 64->64 but the package's slot maps 32->32; is it for another base model?", "{peft}"),
    ("peft-no-slot", tensors(lambda w: w.update({k.replace(Q, "lm_head"): w.pop(k) for k in (QA, QB)})), ADD,
     "lm_head has no LoRA slot", "{peft}"),
    ("peft-module-not-in-base", tensors(lambda w: w.update({k.replace("layers.0", "layers.9"): w.pop(k)
                                                            for k in (QA, QB)})), EXPORT,
     "the base model has no module model.layers.9.self_attn.q_proj", "{peft}"),
    ("peft-bin-pickle", pickle_bomb, ADD, "cannot read the adapter weights (Weights only load failed",
     "{peft}/adapter_model.bin"),
    ("peft-fp16-overflow", set_value(QB, 1e6), [*EXPORT, "--adapter-dtype", "fp16"],
     "do not fit the fp16 codec", "{peft}"),
    # adapter blobs in a package (checked on first load against the manifest)
    ("blob-empty", write(BLOB, b""), GEN, "is 0 bytes, the manifest says", BLOB),
    ("blob-truncated", truncate(BLOB), GEN, "the manifest says", BLOB),
    ("blob-tampered", flip_byte(BLOB), GEN, "fails its sha256 check against the manifest", BLOB),
    ("blob-missing", remove(BLOB), GEN, "file is missing", BLOB),
    # .onnx_adapter files loaded from a path (the runtime's API)
    ("path-blob-empty", write(XBLOB, b""), load_path_adapter(), "adapter file is empty", XBLOB),
    ("path-blob-garbage", write(XBLOB, GARBAGE), load_path_adapter(),
     "not a readable .onnx_adapter file", XBLOB),
    ("path-blob-int64", int64_blob, load_path_adapter(), f"parameter {O}.lora_A has tensor type 7, not one of "
     "edgelora's", XBLOB),
    ("path-blob-other-base", blob(q_factors(64, 64)), load_path_adapter(), "is it for another base model?", XBLOB),
    ("path-blob-no-slot", blob(q_factors(module="lm_head")), load_path_adapter(), "lm_head has no LoRA slot", XBLOB),
    ("path-blob-ungrouped", blob(q_factors(module=Q)), load_path_adapter(),
     "holds model.layers.0.self_attn.q_proj alone, but the graph computes it in slot group", XBLOB),
    ("path-blob-fp16", blob(q_factors(), "fp16"), load_path_adapter(), "holds fp16 factors but the graph's slots "
     "take fp32", XBLOB),
    ("path-blob-nan", blob(q_factors(fill=float("nan"))), load_path_adapter(), "NaN or Inf values", XBLOB),
    ("path-blob-old-int8", int8_blob_with_b_scales, load_path_adapter(), f"unexpected parameter {O}.lora_B.scale; "
     "was the blob written by another edgelora version? export it again", XBLOB),
    ("path-sidecar-other-base", copy_package_blob(lambda s: json.dumps({**s, "base_fingerprint": "sha256:0"})),
     load_path_adapter(), "was built for base sha256:0", XBLOB),
    ("path-sidecar-sha256", copy_package_blob(lambda s: json.dumps({**s, "sha256": "0" * 64})),
     load_path_adapter(), "fails its sha256 check against its sidecar", XBLOB),
    ("path-sidecar-garbage", copy_package_blob(lambda s: "{not json"), load_path_adapter(), "not valid JSON",
     "{tmp}/x.json"),
    ("path-name-dotdot", blob(q_factors()), load_path_adapter(".."), BAD_NAME, "'..'"),
    ("path-name-slash", blob(q_factors()), load_path_adapter("a/b"), BAD_NAME, "'a/b'"),
    # manifests
    ("manifest-missing", remove(MANIFEST), INSPECT, "edgelora.json: missing", MANIFEST),
    ("manifest-empty", write(MANIFEST, ""), INSPECT, "not valid JSON", MANIFEST),
    ("manifest-truncated", truncate(MANIFEST), GEN, "not valid JSON", MANIFEST),
    ("manifest-not-object", write(MANIFEST, "[]"), INSPECT, "expected a JSON object", MANIFEST),
    ("manifest-newer-format", manifest(lambda m: m.update(format_version=4)), GEN,
     "format version 4 is newer than this edgelora reads (3); upgrade edgelora", MANIFEST),
    ("manifest-version-string", manifest(lambda m: m.update(format_version="1")), INSPECT,
     "format_version is missing or not an integer", MANIFEST),
    ("manifest-slots-missing", manifest(lambda m: m.pop("slots")), INSPECT, "slots: missing field", MANIFEST),
    ("manifest-wrong-type", manifest(lambda m: m["slots"][0].update(in_features="32")), GEN,
     "slots[0].in_features: expected int, got '32'", MANIFEST),
    ("manifest-unknown-field", manifest(lambda m: m.update(extra=1)), INSPECT, "extra: unknown field", MANIFEST),
    ("manifest-quality-type", manifest(lambda m: m["quality"]["plain"].update(top1_agreement="high")), INSPECT,
     "quality.plain.top1_agreement: expected float, got 'high'", MANIFEST),
    ("manifest-quality-not-object", manifest(lambda m: m["quality"].update(plain=[0.9])), INSPECT,
     "quality.plain: expected a JSON object", MANIFEST),
    ("manifest-adapter-outside", manifest(lambda m: m["adapters"]["plain"].update(file="../../etc/passwd")), GEN,
     "adapter plain points outside the package", MANIFEST),
    ("manifest-adapter-absolute", manifest(lambda m: m["adapters"]["plain"].update(file="/etc/passwd")), GEN,
     "adapter plain points outside the package", MANIFEST),
    ("manifest-adapter-symlink", symlink_out, GEN, "adapter plain points outside the package", MANIFEST),
    ("manifest-tokenizer-outside", manifest(lambda m: m.update(tokenizer="../tokenizer.json")), GEN,
     "tokenizer points outside the package", MANIFEST),
    ("manifest-graph-outside", manifest(lambda m: m["graph"].update(file="/dev/zero")), GEN,
     "graph points outside the package", MANIFEST),
    ("manifest-name-slash", manifest(lambda m: m["adapters"].update({"a/b": m["adapters"].pop("plain")})), INSPECT,
     BAD_NAME, MANIFEST),
    ("manifest-name-dotdot", manifest(lambda m: m["adapters"].update({"..": m["adapters"].pop("plain")})), INSPECT,
     BAD_NAME, MANIFEST),
    ("manifest-name-nul", manifest(lambda m: m["adapters"].update({"a\0b": m["adapters"].pop("plain")})), INSPECT,
     BAD_NAME, MANIFEST),
    ("manifest-graph-info", manifest(lambda m: m["graph"].pop("num_layers")), GEN,
     "graph.num_layers must be a positive integer", MANIFEST),
    ("graph-truncated", truncate("{pkg}/model.onnx"), GEN, "onnxruntime cannot load the graph", "{pkg}/model.onnx"),
    ("tokenizer-corrupt", write("{pkg}/tokenizer.json", "{"), GEN, "cannot read the tokenizer",
     "{pkg}/tokenizer.json"),
    # training data (JSONL, one {"prompt", "completion"} per line) and training options
    ("train-data-missing", None, TRAIN, "missing; expected a JSONL file", DATA),
    ("train-data-empty", write(DATA, ""), TRAIN, "no examples", DATA),
    ("train-data-truncated", write(DATA, GOOD_ROW + '{"prompt": "a", "compl'), TRAIN, "not valid JSON", DATA + ":2"),
    ("train-data-not-utf8", write(DATA, GOOD_ROW.encode() + b"\xff\xfe\n"), TRAIN, "not UTF-8 text", DATA + ":2"),
    ("train-data-not-object", write(DATA, "[1, 2]\n"), TRAIN, "expected an object with string fields", DATA + ":1"),
    ("train-data-wrong-type", write(DATA, '{"prompt": 1, "completion": "b"}\n'), TRAIN,
     "expected an object with string fields", DATA + ":1"),
    ("train-data-no-completion", write(DATA, '{"prompt": "a", "completion": ""}\n'), TRAIN,
     "the completion is empty", DATA + ":1"),
    ("train-alpha-nan", write(DATA, GOOD_ROW), [*TRAIN, "--alpha", "nan"], "must be a positive number", "--alpha"),
    ("train-lr-negative", write(DATA, GOOD_ROW), [*TRAIN, "--lr", "-1"], "must be a positive number", "--lr"),
    ("train-rank-zero", write(DATA, GOOD_ROW), [*TRAIN, "--rank", "0"], "must be at least 1", "--rank"),
    # CLI arguments
    ("cli-adapter-no-equals", None, ["export", "{base}", "--adapter", "new", "--out", "{tmp}/out"],
     "expected NAME=PEFT_DIR", "'new'"),
    ("cli-adapter-no-name", None, ["add-adapter", "{pkg}", "={peft}"], "expected NAME=PEFT_DIR", "'={peft}'"),
    ("cli-adapter-twice", None, [*EXPORT, "--adapter", "new={peft}"], "the same name is given twice", "--adapter"),
    ("cli-name-dotdot", None, ["add-adapter", "{pkg}", "..={peft}"], BAD_NAME, "'..'"),
    ("cli-name-slash", None, ["add-adapter", "{pkg}", "../evil={peft}"], BAD_NAME, "'../evil'"),
    ("cli-name-nul", None, ["add-adapter", "{pkg}", "x\0y={peft}"], BAD_NAME, "'x\\x00y'"),
    ("cli-name-newline", None, ["add-adapter", "{pkg}", "x\n={peft}"], BAD_NAME, "'x\\n'"),
    ("cli-name-exists", None, ["add-adapter", "{pkg}", "plain={peft}"], "adapter plain already exists", "{pkg}"),
    ("cli-codec-mismatch", None, [*ADD, "--adapter-dtype", "int8"], "slots take fp32 factors, not int8", "{pkg}"),
    ("cli-probe-unknown-adapter", write(PROBE, GOOD_ROW), [*EXPORT, "--probe-data", "typo=" + PROBE],
     "no adapter typo in this export (adapters: new)", "--probe-data typo="),
    ("cli-probe-missing", None, [*EXPORT, "--probe-data", PROBE], "missing; expected a JSONL file", PROBE),
    ("cli-probe-bad-line", write(PROBE, GOOD_ROW + "{"), [*EXPORT, "--probe-data", "new=" + PROBE],
     "not valid JSON", PROBE + ":2"),
    ("cli-probe-twice", None, [*EXPORT, "--probe-data", "new=a", "--probe-data", "new=b"],
     "a second file for adapter new", "--probe-data 'new=b'"),
    ("cli-block-size", None, [*EXPORT, "--block-size", "16"], "Invalid value for '--block-size'", "--block-size"),
    ("cli-unknown-option", None, [*GEN, "--temprature", "1"], "No such option '--temprature'", "--temprature"),
    ("cli-weight-not-number", None, ["generate", "{pkg}", "--adapter", "plain:abc", "--prompt", "hi"],
     "expected NAME or NAME:WEIGHT with a number", "'plain:abc'"),
    ("cli-weight-nan", None, ["generate", "{pkg}", "--adapter", "plain:nan", "--prompt", "hi"],
     "weight must be a finite number", "adapter plain"),
    ("cli-adapter-unknown", None, [*GEN[:3], "zzz", *GEN[4:]], "unknown adapter 'zzz'", "'zzz'"),
    ("cli-not-a-package", None, ["generate", "{peft}/adapter_config.json", "--prompt", "hi"],
     "not a package directory", "{peft}/adapter_config.json"),
    ("cli-out-exists", None, ["export", "{base}", "--adapter", "new={peft}", "--out", "{pkg}"],
     "already exists (pass --overwrite", "{pkg}"),
    ("cli-base-missing", remove("{base}/config.json"), EXPORT, "config.json: missing", "{base}/config.json"),
    ("cli-base-config-corrupt", write("{base}/config.json", "{"), EXPORT, "cannot be read", "{base}/config.json"),
    ("base-bin-pickle", base_pickle_bomb, EXPORT, "cannot load the model weights", "{base}"),
    ("base-remote-code", base_remote_code, EXPORT, "contains custom code", "{base}/config.json"),
    ("cli-base-unsupported", edit_json("{base}/config.json", lambda c: c.update(architectures=["MambaForCausalLM"])),
     EXPORT, "architecture ['MambaForCausalLM'] is not supported yet", "{base}/config.json"),
    ("cli-base-mismatched", edit_json("{base}/config.json", lambda c: c.update(architectures=["BertModel"])),
     EXPORT, "model class LlamaModel is not supported yet", "{base}/config.json"),
]


@pytest.fixture
def ctx(llama, tmp_path) -> Ctx:
    shutil.copytree(llama.package, tmp_path / "pkg")
    shutil.copytree(llama.adapter_dirs["plain"], tmp_path / "peft")
    shutil.copytree(llama.base_dir, tmp_path / "base")
    return Ctx(tmp_path, tmp_path / "pkg", tmp_path / "peft", tmp_path / "base", tmp_path / "payload-ran")


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() and not p.is_symlink() else b""
            for p in sorted(root.rglob("*"))}


def run(command, ctx: Ctx) -> tuple[int, str]:
    """(exit code, what the user sees) of a CLI call, or of an API call that must raise EdgeLoraError."""
    if callable(command):
        with pytest.raises(EdgeLoraError) as e:
            command(ctx)
        return e.value.exit_code, f"edgelora: error: {e.value}\n"
    result = CliRunner().invoke(main, [a.format(**vars(ctx)) for a in command])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result.exit_code, result.stderr


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, ctx):
    _, breaker, command, message, names = case
    if breaker is not None:
        breaker(ctx)
    before = tree(ctx.tmp)
    code, err = run(command, ctx)
    assert code == EXIT_BAD_INPUT, err
    lines = [line for line in err.splitlines() if not line.startswith("[")]  # export's progress lines
    assert len(lines) == 1 and lines[0].startswith("edgelora: error: "), err
    assert message in lines[0], err
    assert names.format(**vars(ctx)) in lines[0], err
    assert "Traceback" not in err
    assert tree(ctx.tmp) == before, "something was written or changed"
    assert not ctx.marker.exists(), "a pickle payload ran"

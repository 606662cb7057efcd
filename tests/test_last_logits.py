"""A prefill computes the LM head for its last position only; every other caller still gets every position."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgelora.exporters.base_quant import quantize_base
from edgelora.exporters.last_logits import LOGITS_KEEP, add_logits_keep, lm_head
from edgelora.exporters.options import ExportOptions
from edgelora.runtime import EdgeModel
from edgelora.runtime.kvcache import KVCache


def head_graph(capped: bool) -> onnx.ModelProto:
    """h [batch, seq, 16] -> LM head 16 x 40 -> (Gemma-2-style soft-capping) -> logits."""
    w = np.random.default_rng(0).standard_normal((16, 40)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["h", "w"], ["raw" if capped else "logits"], name="head")]
    if capped:
        nodes += [helper.make_node("Div", ["raw", "cap"], ["scaled"]), helper.make_node("Tanh", ["scaled"], ["t"]),
                  helper.make_node("Mul", ["t", "cap"], ["logits"])]
    graph = helper.make_graph(
        nodes, "head", [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["batch", "seq", 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", 40])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array(3.0, np.float32), "cap")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run(proto: onnx.ModelProto, h: np.ndarray, keep: int | None = None) -> np.ndarray:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {"h": h} if keep is None else {"h": h, LOGITS_KEEP: np.array([keep], np.int64)}
    return session.run(["logits"], feed)[0]


@pytest.mark.parametrize("capped", [False, True])
def test_the_slice_keeps_the_last_positions_and_defaults_to_all(capped):
    h = np.random.default_rng(1).standard_normal((2, 5, 16)).astype(np.float32)
    before = run(head_graph(capped), h)
    proto = head_graph(capped)
    assert add_logits_keep(proto)
    np.testing.assert_allclose(run(proto, h), before, rtol=1e-6)  # the default: every position
    np.testing.assert_allclose(run(proto, h, keep=1), before[:, -1:], rtol=1e-6)
    np.testing.assert_allclose(run(proto, h, keep=5), before, rtol=1e-6)


def test_the_slice_survives_int4_quantization_of_the_head():
    proto = head_graph(False)
    add_logits_keep(proto)
    quantized = quantize_base(proto, ExportOptions(quantize="int4", block_size=16, accuracy_level=4), set())
    head = lm_head(quantized)
    assert head.op_type == "MatMulNBits" and head.input[0].endswith(".last_positions")
    h = np.random.default_rng(2).standard_normal((1, 4, 16)).astype(np.float32)
    assert run(quantized, h, keep=1).shape == (1, 1, 40)


def test_a_graph_without_a_product_before_its_logits_is_left_alone():
    proto = helper.make_model(helper.make_graph(
        [helper.make_node("Add", ["h", "h"], ["logits"])], "no-head",
        [helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, 2])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 2])]))
    assert not add_logits_keep(proto)
    assert [i.name for i in proto.graph.input] == ["h"]


def test_an_exported_package_prefills_only_the_last_position(llama):
    model = EdgeModel.open(llama.package)
    assert model.info.logits_keep == LOGITS_KEEP
    ids = np.random.default_rng(3).integers(3, 60, 9)
    full = model.logits(ids, adapter="plain")
    assert full.shape[:2] == (1, 9)  # logits() still gives every position
    np.testing.assert_allclose(full, llama.reference_logits("plain", ids[None]), atol=1e-4)
    with model.call("plain") as call:
        last = model.runner.forward(call, ids[None], np.arange(9)[None], KVCache(), last_only=True)
    assert last.shape == (1, 1, full.shape[2])
    np.testing.assert_allclose(last[0, 0], full[0, -1], atol=1e-5)
    # and a generation, whose prefill asks for the last position only, picks from it
    out = model.generate(ids.tolist(), adapter="plain", max_new_tokens=1, ignore_eos=True)
    assert out.token_ids[0] == int(full[0, -1].argmax())

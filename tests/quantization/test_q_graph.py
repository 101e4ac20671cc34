"""graph: fused layers and quantization points on tf2onnx-style variants."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from nilmc.quantization.graph import analyze
from nilmc.quantization.params import derive_params
from nilmc.quantization.qdq import build_qdq_model
from nilmc.quantization.statistics import collect_statistics
from nilmc.quantization.traits import DPU_POT, GENERIC_INT8, TENSORRT_INT8


def _variant(seed: int = 0) -> onnx.ModelProto:
    """Conv without bias + Add((1,C,1,1)) + Relu, MaxPool, Flatten, Gemm(transB=1) + Relu, Gemm with a
    Constant-node weight; nodes left unnamed."""
    rng = np.random.default_rng(seed)
    c = 6
    w1 = rng.normal(0, 0.4, (c, 1, 3, 3)).astype(np.float32)
    b1 = rng.normal(0, 0.1, (1, c, 1, 1)).astype(np.float32)
    flat = c * 5 * 4
    w2 = rng.normal(0, np.sqrt(2 / flat), (16, flat)).astype(np.float32)  # [out, in], transB=1
    b2 = rng.normal(0, 0.1, 16).astype(np.float32)
    w3 = rng.normal(0, 0.3, (16, 1)).astype(np.float32)
    nodes = [
        helper.make_node("Transpose", ["input"], ["t0"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["t0", "w1"], ["c1"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("Add", ["c1", "b1"], ["a1"]),
        helper.make_node("Relu", ["a1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p1"], ["f1"], axis=1),
        helper.make_node("Gemm", ["f1", "w2", "b2"], ["g2"], transB=1),
        helper.make_node("Relu", ["g2"], ["r2"]),
        helper.make_node("Constant", [], ["w3"], value=numpy_helper.from_array(w3)),
        helper.make_node("Gemm", ["r2", "w3"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes, "variant",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 10, 9, 1])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 1])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(b1, "b1"), numpy_helper.from_array(w2, "w2"),
         numpy_helper.from_array(b2, "b2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model


def test_analyze_seq2point(s2p_model) -> None:
    m = onnx.ModelProto()
    m.CopyFrom(s2p_model)
    g = analyze(m)
    assert [(l.name, l.kind, l.weight_axis, l.bias, l.output, l.activation) for l in g.layers] == [
        ("conv1", "conv", 0, "conv1/b", "r1", "Relu"),
        ("conv2", "conv", 0, "conv2/b", "r2", "Relu"),
        ("dense1", "dense", 1, "dense1/b", "r3", "Relu"),
        ("dense2", "dense", 1, "dense2/b", "output", None),
    ]
    assert g.layers[2].bias_node == "dense1_bias" and g.layers[2].internal == ("m1", "a1")
    assert g.quant_points == ["input", "r1", "r2", "r3", "output"]
    assert g.root("flat") == "r2" and g.root("t0") == "input"


def test_analyze_variant() -> None:
    m = _variant()
    g = analyze(m)
    conv, gemm1, gemm2 = g.layers
    assert conv.bias == "b1" and conv.bias_node is not None and conv.output == "r1" and conv.internal == ("c1", "a1")
    assert gemm1.op_type == "Gemm" and gemm1.weight_axis == 0 and gemm1.bias == "b2" and gemm1.output == "r2"
    assert gemm2.weight == "w3" and gemm2.weight_axis == 1 and gemm2.bias is None
    assert g.shared == {"t0": "input", "p1": "r1", "f1": "r1"}
    assert all(n.name for n in m.graph.node)  # unnamed nodes got stable names


@pytest.mark.parametrize("traits", [GENERIC_INT8, TENSORRT_INT8, DPU_POT])
def test_variant_quantizes_and_runs(traits, make_windows, run_model) -> None:
    model = _variant()
    x = make_windows(256, seed=1)
    params = derive_params(model, collect_statistics(model, x), traits)
    assert params.tensors["b1"].axis == (1 if traits.bias_uses_product_scale and traits.per_channel_weights else None)
    qdq = build_qdq_model(model, params)
    assert not any(n.op_type == "Constant" for n in qdq.graph.node)  # constant weight became an integer initializer
    xe = make_windows(128, seed=2)
    ref, got = run_model(model, xe), run_model(qdq, xe)
    sqnr = 10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / np.sum((got - ref).astype(np.float64) ** 2))
    assert sqnr > 22  # measured 30.0 / 29.7 / 26.3 dB (eval windows reach past the calibrated output range)


def test_width_broadcast_add_is_not_a_bias() -> None:
    """A (C,) constant added to an NCHW Conv output broadcasts over the width: not a per-channel bias."""
    w = np.ones((9, 1, 1, 1), np.float32)  # 9 output channels; input width is also 9
    nodes = [
        helper.make_node("Transpose", ["input"], ["t0"], name="t", perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["t0", "w"], ["c"], name="conv"),
        helper.make_node("Add", ["c", "v"], ["output"], name="add"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 10, 9, 1])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.arange(9, dtype=np.float32), "v")],
    )
    g = analyze(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    (conv,) = g.layers
    assert conv.bias is None and conv.output == "c"
    assert g.quant_points == ["input", "c", "output"]


def _lstm_first(head_reads_input: bool = False) -> onnx.ModelProto:
    """A PyTorch LSTM export: input (N, 6, 1) -> Transpose -> LSTM -> Y_h -> Squeeze -> MatMul head [+ input's mean]."""
    rng = np.random.default_rng(0)
    t, hidden = 6, 4
    inits = [numpy_helper.from_array(rng.normal(0, 0.4, (1, 4 * hidden, 1)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.normal(0, 0.4, (1, 4 * hidden, hidden)).astype(np.float32), "R"),
             numpy_helper.from_array(rng.normal(0, 0.4, (hidden, 1)).astype(np.float32), "head.W"),
             numpy_helper.from_array(np.array([0], np.int64), "ax0")]
    nodes = [helper.make_node("Transpose", ["input"], ["seq"], perm=[1, 0, 2], name="to_seq"),
             helper.make_node("LSTM", ["seq", "W", "R"], ["Y", "Y_h"], hidden_size=hidden, name="lstm"),
             helper.make_node("Squeeze", ["Y_h", "ax0"], ["feat"], name="sq"),
             helper.make_node("MatMul", ["feat", "head.W"], ["head_out" if head_reads_input else "output"], name="head")]
    if head_reads_input:  # an element-wise op QDQ graphs run quantized reads the input too: it must be quantized
        nodes += [helper.make_node("ReduceMean", ["input"], ["m"], axes=[1, 2], keepdims=0, name="mean"),
                  helper.make_node("Add", ["head_out", "m"], ["output"], name="mix")]
    g = helper.make_graph(nodes, "lstm", [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["N", t, 1])],
                          [helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, ["N", 1])], inits)
    return onnx.shape_inference.infer_shapes(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))


def test_second_output_of_a_recurrent_op_is_a_quant_point() -> None:
    """A PyTorch LSTM export's head reads ``Y_h`` (the LSTM's second output): it must get parameters of its own, or
    the head's input had none ("produced by an op nilmc cannot quantize")."""
    m = _lstm_first()
    q = analyze(m)
    assert "Y_h" in q.quant_points and q.shared.get("feat") == "Y_h"


def test_an_input_other_ops_read_is_not_quantized() -> None:
    """input -> Transpose -> LSTM (float): the 8-bit input grid would only add rounding noise in front of a float op
    (fuzzed on PyTorch GRU/LSTM-first exports: QuantizeLinear on the input and the Transpose, against precise input).
    The same when a quantized op reads it too (a ReduceMean here, a residual Add from the input below), on the targets
    that run any op in float; a full-integer graph (TFLite) cannot, and keeps its all-or-nothing rule."""
    from nilmc.quantization.api import _precise_input, ptq_params
    from nilmc.quantization.graph import input_readers
    from nilmc.quantization.traits import TFLITE_INT8_FLOAT_INPUT

    m = _lstm_first()
    layers, others, family = input_readers(m, analyze(m))
    assert layers == [] and [n.op_type for n in others] == ["LSTM"] and family == ["input", "seq"]
    assert _precise_input(m, GENERIC_INT8) == ((), ("input", "seq"))
    mixed = _lstm_first(head_reads_input=True)
    assert _precise_input(mixed, GENERIC_INT8) == ((), ("input", "seq"))
    assert _precise_input(mixed, TFLITE_INT8_FLOAT_INPUT) == ((), ())
    x = np.random.default_rng(1).normal(size=(64, 6, 1)).astype(np.float32)
    for model in (m, mixed):
        out = ptq_params(model, collect_statistics(model, x), GENERIC_INT8, x)
        assert {"input", "seq"} <= set(out.params.keep_float) and out.precise_input["float_input"] == ["input", "seq"]
        quantized = {n.input[0] for n in build_qdq_model(model, out.params).graph.node if n.op_type == "QuantizeLinear"}
        assert not quantized & {"input", "seq"} and "Y_h" in quantized, quantized


def test_an_input_a_residual_add_reads_too_stays_float() -> None:
    """Fuzzed: input -> Conv(x) + x -> ...: the Add reading the input made precise input give up (all or nothing), so the
    input got QuantizeLinear and its conv was listed INT8 (tensorrt:int8 +1.40 points, 27.8 dB)."""
    from nilmc.quantization.api import ptq_params

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (1, 1, 3)).astype(np.float32), "res.w"),
             numpy_helper.from_array(rng.normal(0, 0.3, (4, 1, 3)).astype(np.float32), "c.w"),
             numpy_helper.from_array(rng.normal(0, 0.3, (1, 32)).astype(np.float32), "fc.w")]
    nodes = [helper.make_node("Conv", ["input", "res.w"], ["r"], name="/res/Conv", pads=[1, 1], kernel_shape=[3]),
             helper.make_node("Add", ["r", "input"], ["s"], name="/Add"),
             helper.make_node("Conv", ["s", "c.w"], ["c"], name="/c/Conv", pads=[1, 1], kernel_shape=[3]),
             helper.make_node("Relu", ["c"], ["a"], name="/Relu"),
             helper.make_node("Flatten", ["a"], ["f"], name="/Flatten"),
             helper.make_node("Gemm", ["f", "fc.w"], ["output"], name="/fc/Gemm", transB=1)]
    g = helper.make_graph(nodes, "res", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8])],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 1])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    x = np.random.default_rng(1).normal(size=(64, 1, 8)).astype(np.float32)
    out = ptq_params(m, collect_statistics(m, x), TENSORRT_INT8, x)
    assert "/res/Conv" in out.params.keep_float and "input" in out.params.keep_float
    quantized = {n.input[0] for n in build_qdq_model(m, out.params).graph.node if n.op_type == "QuantizeLinear"}
    assert "input" not in quantized and "s" in quantized, quantized  # the Add's output is quantized for the next conv

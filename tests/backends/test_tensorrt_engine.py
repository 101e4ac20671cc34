"""TensorRT for real: engine layer precisions, FP16 rules for recurrent models, and (on a GPU) engines built and run."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from nilmc.backends.base import Verification
from nilmc.backends.tensorrt_backend import (
    ENGINE_FILE,
    TensorRTBackend,
    check_layer_precisions,
    compute_nodes,
    engine_build_possible,
    tensor_precision,
    to_float16,
)
from nilmc.compiler.model import ONNX_IR_VERSION, Model

POSSIBLE, WHY = engine_build_possible()


# --------------------------------------------------------------------------- engine inspector (no GPU needed)
def test_tensor_precision_reads_the_inspectors_formats():
    assert tensor_precision("Thirty-two wide channel vectorized row major Int8 format.") == "int8"
    assert tensor_precision("Row major linear FP16 format") == "fp16"
    assert tensor_precision("Two wide channel vectorized row major FP16 format") == "fp16"
    assert tensor_precision("Half") == "fp16"
    assert tensor_precision("Row major linear FP32") == "fp32" and tensor_precision("Float") == "fp32"
    assert tensor_precision("N/A due to dynamic shapes") == "unknown"


def _layer(name, *formats, kind="CaskConvolution"):
    return {"Name": name, "LayerType": kind, "Inputs": [{"Name": "t", "Format/Datatype": f} for f in formats],
            "Outputs": [{"Name": "o", "Format/Datatype": formats[0]}]}


INT8 = "Thirty-two wide channel vectorized row major Int8 format"
FP32 = "Row major linear FP32"


def test_int8_layers_must_take_int8():
    nodes = [("conv1",), ("node_of_mm", "mm")]
    layers = [_layer("input_quantize + conv1 + relu1", INT8), _layer("node_of_mm + node_of_add", INT8, kind="CaskGemmMatrixMultiply"),
              _layer("Reformatting CopyNode for Output Tensor 0", FP32, kind="Reformat")]
    ok = check_layer_precisions(layers, nodes, "int8")
    assert ok["checked"] and ok["wrong"] == [] and ok["located"] == ["conv1", "node_of_mm"]
    layers[1] = _layer("node_of_mm + node_of_add", FP32, kind="CaskGemmMatrixMultiply")
    bad = check_layer_precisions(layers, nodes, "int8")
    assert [w["node"] for w in bad["wrong"]] == ["node_of_mm"] and bad["wrong"][0]["inputs"] == ["fp32"]


def test_a_node_is_matched_by_whole_names_only_and_missing_ones_make_the_check_partial():
    layers = [_layer("conv10 + relu10", FP32), _layer("{ForeignNode[conv2...dense]}", INT8, kind="Myelin")]
    out = check_layer_precisions(layers, [("conv1",), ("conv2",)], "int8")
    assert out["not_located"] == ["conv1"] and out["located"] == ["conv2"]  # conv10 is not conv1
    assert out["checked"] is False and out["wrong"] == []


def _int8_model(tiny, tiny_ds):
    from nilmc.backends.tensorrt_backend import tensorrt_qdq_model
    from nilmc.quantization.context import QuantContext
    from nilmc.quantization.traits import TENSORRT_INT8

    return tensorrt_qdq_model(tiny, QuantContext(tiny, tiny_ds).params(TENSORRT_INT8))


def test_compute_nodes_are_the_ones_nilmc_quantized(tiny, tiny_ds):
    proto = _int8_model(tiny, tiny_ds)
    dq_out = {o for n in proto.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    quantized = [n for n in proto.graph.node if n.op_type in ("MatMul", "Gemm", "Conv") and n.input[1] in dq_out]
    assert quantized and len(compute_nodes(proto, "int8")) == len(quantized)
    assert len(compute_nodes(tiny.graph, "fp16")) == sum(n.op_type in ("MatMul", "Gemm", "Conv") for n in tiny.graph.graph.node)


# --------------------------------------------------------------------------- FP16 rules for recurrent models
def _recurrent_model(steps: int = 8, features: int = 3, hidden: int = 5) -> onnx.ModelProto:
    """LSTM -> GRU -> Expand: the ops of the recurrent NILM models (seeds 000, 002)."""
    rng = np.random.default_rng(0)
    h = hidden
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, s).astype(np.float32), n) for n, s in
             (("W", (1, 4 * h, features)), ("R", (1, 4 * h, h)), ("B", (1, 8 * h)), ("GW", (1, 3 * h, h)), ("GR", (1, 3 * h, h)))]
    inits += [numpy_helper.from_array(np.array([steps, 1, h], np.int64), "seq"), numpy_helper.from_array(np.array([2, 1, h], np.int64), "wide")]
    nodes = [helper.make_node("LSTM", ["x", "W", "R", "B"], ["y", "yh"], hidden_size=h),
             helper.make_node("Reshape", ["y", "seq"], ["y2"]),
             helper.make_node("GRU", ["y2", "GW", "GR"], ["g", "gh"], hidden_size=h),
             helper.make_node("Expand", ["gh", "wide"], ["out"])]
    g = helper.make_graph(nodes, "rnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [steps, 1, features])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 1, h])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = ONNX_IR_VERSION
    onnx.checker.check_model(m)
    return m


def test_expand_lstm_gru_have_fp16_rules(tiny):
    m = _recurrent_model()
    assert TensorRTBackend().precheck(Model(m, tiny.contract), "fp16") is None
    half = to_float16(m)  # strict type inference inside: every op takes float16
    assert all(t.data_type == TensorProto.FLOAT16 for t in half.graph.initializer if t.name in ("W", "R", "B", "GW", "GR"))
    x = np.random.default_rng(1).normal(size=(8, 1, 3)).astype(np.float32)
    run = lambda p: ort.InferenceSession(p.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]  # noqa: E731
    np.testing.assert_allclose(run(half), run(m), rtol=0, atol=5e-3)


def test_without_the_extra_or_a_gpu_the_reason_is_given():
    if POSSIBLE:
        pytest.skip("TensorRT and a GPU are present here")
    assert WHY and ("is not installed" in WHY or "GPU" in WHY or "does not import" in WHY)


# --------------------------------------------------------------------------- on a GPU
gpu = pytest.mark.skipif(not POSSIBLE, reason=f"needs TensorRT and an NVIDIA GPU: {WHY}")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_engine_is_built_checked_and_measured(tiny, tiny_ds, tiny_eval, tmp_path, precision):
    from nilmc.quantization.context import QuantContext

    backend = TensorRTBackend()
    art = backend.lower(tiny, tmp_path, precision=precision, options={"quant": QuantContext(tiny, tiny_ds)})
    assert art.primary == ENGINE_FILE and art.info["engine_built"] is True
    check = art.info["layer_precisions"]
    assert check["located"] and check["wrong"] == []  # the compute layers really run at the target precision
    x = tiny.contract.prepare(tiny_eval.raw_x())
    with backend.runner(art) as r:
        assert r.verification is Verification.MEASURED
        got = r.infer({tiny.input_name: x})[tiny.output_name]
    emulated = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {tiny.input_name: x})[0]
    assert got.shape == emulated.shape and np.all(np.isfinite(got))
    # TensorRT's kernels and onnxruntime's emulation agree closely (model units, std-scaled), not bit for bit
    np.testing.assert_allclose(got, emulated, rtol=0, atol=0.05 * max(1.0, float(np.abs(emulated).max())))

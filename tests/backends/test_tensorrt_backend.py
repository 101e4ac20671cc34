"""TensorRT backend: strongly typed ONNX + hand-off on TF-free tiny models (fast)."""
from __future__ import annotations

import ast
import filecmp

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from nilmc.backends.base import Artifact, Backend, Verification
from nilmc.backends.registry import Registry
from nilmc.backends.tensorrt_backend import (
    ENGINE_NOT_BUILT,
    FP16_MAX,
    ONNX_FILE,
    SCRIPT_FILE,
    TRTEXEC_FILE,
    TensorRTBackend,
    engine_build_possible,
    fold_bias_dequantize,
    qdq_problems,
    to_float16,
)
from nilmc.compiler.errors import DataError, MissingDependencyError, QuantizationError
from nilmc.compiler.model import ONNX_IR_VERSION, ONNX_OPSET, Model
from nilmc.quantization.api import Techniques
from nilmc.quantization.context import QuantContext
from nilmc.quantization.qdq import build_qdq_model
from nilmc.quantization.traits import TENSORRT_INT8

NO_ENGINE = not engine_build_possible()[0]


def tiny_conv_model(base: Model, *, filters: int = 4, seed: int = 0) -> Model:
    """NHWC input -> Transpose -> Conv 3x3 + bias -> Relu -> Reshape -> MatMul + bias: the tf2onnx shape of seq2point."""
    rng = np.random.default_rng(seed)
    frames, features, _ = base.contract.input_shape
    w = rng.normal(0, 0.3, (filters, 1, 3, 3)).astype(np.float32)
    b = rng.normal(0, 0.1, filters).astype(np.float32)
    w2 = rng.normal(0, 0.05, (filters * frames * features, 1)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "conv_w"), numpy_helper.from_array(b, "conv_b"),
             numpy_helper.from_array(w2, "dense_w"), numpy_helper.from_array(np.array([0.2], np.float32), "dense_b"),
             numpy_helper.from_array(np.array([-1, filters * frames * features], np.int64), "flat_shape")]
    nodes = [
        helper.make_node("Transpose", ["input"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["nchw", "conv_w", "conv_b"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("Reshape", ["relu", "flat_shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "dense_w"], ["mm"]),
        helper.make_node("Add", ["mm", "dense_b"], ["output"]),
    ]
    g = helper.make_graph(nodes, "tiny_conv", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", frames, features, 1])],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 1])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", ONNX_OPSET)])
    m.ir_version = ONNX_IR_VERSION
    onnx.checker.check_model(m)
    return Model(m, base.contract, source="tiny_conv")


@pytest.fixture(scope="module")
def conv(tiny):
    return tiny_conv_model(tiny)


@pytest.fixture(scope="module")
def quant(conv, tiny_ds):
    # every layer INT8 (the Q/DQ rules below are about quantized layers); precise input is tested on its own
    return QuantContext(conv, tiny_ds, techniques=Techniques(precise_input=False))


def test_precise_input_keeps_the_input_conv_float_within_the_qdq_rules(conv, tiny_ds, tmp_path):
    ctx = QuantContext(conv, tiny_ds)
    art = TensorRTBackend().lower(conv, tmp_path, precision="int8", options={"quant": ctx})
    m = onnx.load(art.path)
    assert qdq_problems(m) == []
    names = {n.output[0] for n in m.graph.node}
    assert "conv_w_dequantized" not in names and "dense_w_dequantized" in names  # conv float, dense INT8


@pytest.fixture(scope="module")
def x_eval(tiny, tiny_eval):
    return tiny.contract.prepare(tiny_eval.raw_x())


@pytest.fixture(scope="module")
def lowered(conv, quant, tmp_path_factory):
    backend = TensorRTBackend()
    return {p: backend.lower(conv, tmp_path_factory.mktemp(f"trt_{p}"), precision=p, options={"quant": quant})
            for p in backend.capabilities.precisions}


def _ort(proto, x):
    from nilmc.quantization.qdq import portable_weights

    return ort.InferenceSession(portable_weights(proto)[0].SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def _inits(path):
    return {t.name: t for t in onnx.load(path).graph.initializer}


def test_is_a_backend_without_requirements_for_lowering():
    backend = TensorRTBackend()
    assert isinstance(backend, Backend)
    assert backend.capabilities.requires == () and backend.capabilities.extra == "tensorrt"
    reg = Registry()
    reg.register(backend)
    assert str(reg.parse_target("tensorrt:int8")) == "tensorrt:int8"


@pytest.mark.skipif(not NO_ENGINE, reason="TensorRT and a GPU are present: the engine is built")
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_no_engine_file_and_plain_labels_here(lowered, precision):
    art = lowered[precision]
    assert not list(art.directory.glob("*.engine")) and not list(art.directory.glob("*.plan"))
    assert sorted(p.name for p in art.directory.iterdir()) == sorted([ONNX_FILE, SCRIPT_FILE, TRTEXEC_FILE])
    assert art.primary == ONNX_FILE and art.info["engine"] == ENGINE_NOT_BUILT and art.info["engine_built"] is False
    with TensorRTBackend().runner(art) as r:
        assert r.verification is Verification.EMULATED


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_handoff_script_and_trtexec_line(lowered, conv, precision):
    d = lowered[precision].directory
    script = (d / SCRIPT_FILE).read_text()
    ast.parse(script)
    for needle in ("STRONGLY_TYPED", "parse_from_file", "build_serialized_network", "set_shape", "model.engine", "model.onnx"):
        assert needle in script
    line = [ln for ln in (d / TRTEXEC_FILE).read_text().splitlines() if ln.startswith("trtexec")]
    assert line == [lowered[precision].info["trtexec"]]
    shape = "x".join(str(v) for v in conv.contract.input_shape)
    for needle in ("--onnx=model.onnx", "--stronglyTyped", "--saveEngine=model.engine", f"--maxShapes=input:1024x{shape}"):
        assert needle in line[0]
    assert "--fp16" not in line[0] and "--int8" not in line[0]


def test_fp16_graph_is_float16_inside_float32_outside(lowered):
    path = lowered["fp16"].path
    m = onnx.load(path)
    floats = [t for t in m.graph.initializer if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16)]
    assert floats and all(t.data_type == TensorProto.FLOAT16 for t in floats)
    assert m.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert m.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert m.graph.node[0].op_type == "Cast" and m.graph.node[-1].op_type == "Cast"
    onnx.checker.check_model(m, full_check=True)


def test_fp16_runs_close_to_fp32(lowered, conv, x_eval):
    ref = _ort(conv.graph, x_eval)
    with TensorRTBackend().runner(lowered["fp16"]) as r:
        got = r.infer({"input": x_eval})["output"]
    assert got.dtype == np.float32 and got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-2)
    check = lowered["fp16"].info["fp16_range_check"]
    assert check["checked"] and check["max_abs_activation"] < FP16_MAX


def test_int8_follows_tensorrt_qdq_rules(lowered, conv):
    m = onnx.load(lowered["int8"].path)
    assert qdq_problems(m) == []
    inits = {t.name: t for t in m.graph.initializer}
    qdq = [n for n in m.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq
    for node in qdq:
        zp = numpy_helper.to_array(inits[node.input[2]])
        assert inits[node.input[2]].data_type == TensorProto.INT8 and not zp.any()
    dq_w = next(n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == "conv_w_dequantized")
    axis = next(a.i for a in dq_w.attribute if a.name == "axis")
    assert axis == 0 and numpy_helper.to_array(inits[dq_w.input[1]]).shape == (4,)
    dq_dense = next(n for n in m.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == "dense_w_dequantized")
    assert next(a.i for a in dq_dense.attribute if a.name == "axis") == 1
    assert not any(t.data_type == TensorProto.INT32 for t in m.graph.initializer)  # bias folded to float
    assert inits["conv_b_dequantized"].data_type == TensorProto.FLOAT


def test_int8_emulation_equals_the_qdq_graph(lowered, conv, quant, x_eval):
    reference = _ort(build_qdq_model(conv.graph, quant.params(TENSORRT_INT8)), x_eval)
    with TensorRTBackend().runner(lowered["int8"]) as r:
        got = r.infer({"input": x_eval})["output"]
    np.testing.assert_allclose(got, reference, rtol=0, atol=1e-3)
    assert lowered["int8"].info["quantization"]["traits"]["name"] == "tensorrt_int8"


def test_folded_bias_is_the_dequantized_value(conv, quant):
    params = quant.params(TENSORRT_INT8)
    folded = {t.name: numpy_helper.to_array(t) for t in fold_bias_dequantize(build_qdq_model(conv.graph, params)).graph.initializer}
    tq = params.tensors["conv_b"]
    qdq_inits = {t.name: numpy_helper.to_array(t) for t in build_qdq_model(conv.graph, params).graph.initializer}
    expected = (qdq_inits["conv_b_quantized"].astype(np.float32) * tq.scales()).astype(np.float32)
    np.testing.assert_array_equal(folded["conv_b_dequantized"], expected)


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_onnx_is_byte_identical_between_lowerings(lowered, conv, quant, tmp_path, precision):
    again = TensorRTBackend().lower(conv, tmp_path, precision=precision, options={"quant": quant})
    first = lowered[precision]
    assert all(filecmp.cmp(first.directory / f, again.directory / f, shallow=False) for f in (ONNX_FILE, SCRIPT_FILE, TRTEXEC_FILE))


def test_fp16_works_without_calibration(conv, tmp_path):
    art = TensorRTBackend().lower(conv, tmp_path, precision="fp16")
    assert art.info["fp16_range_check"] == {"checked": False, "why": "no calibration set given"}


def test_int8_needs_calibration(conv, tmp_path):
    with pytest.raises(DataError, match="calibration"):
        TensorRTBackend().lower(conv, tmp_path, precision="int8")


def test_fp16_refuses_weights_beyond_range(conv):
    proto = onnx.ModelProto()
    proto.CopyFrom(conv.graph)
    big = next(t for t in proto.graph.initializer if t.name == "dense_b")
    big.CopyFrom(numpy_helper.from_array(np.array([1e6], np.float32), "dense_b"))
    with pytest.raises(QuantizationError, match="beyond the FP16 range"):
        to_float16(proto)


def test_fp16_refuses_unknown_ops(conv):
    proto = onnx.ModelProto()
    proto.CopyFrom(conv.graph)
    proto.graph.node[2].op_type = "Celu"
    with pytest.raises(QuantizationError, match="no FP16 rule"):
        to_float16(proto)


@pytest.mark.skipif(not NO_ENGINE, reason="TensorRT and a GPU are present")
def test_engine_artifact_needs_tensorrt(tmp_path):
    art = Artifact("tensorrt", "fp16", tmp_path, "model.engine", ["model.engine"])
    with pytest.raises(MissingDependencyError, match="tensorrt"):
        TensorRTBackend().runner(art)


def test_fp16_takes_the_activations_and_normalizations_pytorch_exports_use():
    """Fuzzed: tensorrt:fp16 refused Resize, Softplus and LayerNormalization ("no FP16 rule") on models tensorrt:int8
    took. Each converts, the result agrees with FP32 to float16 precision, and Resize's scales stay float32 (the op
    takes tensor(float) there in every opset)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (4, 1, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.ones(4, np.float32), "ln.g"), numpy_helper.from_array(np.zeros(4, np.float32), "ln.b"),
             numpy_helper.from_array(np.array([1.0, 1.0, 2.0], np.float32), "scales")]
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], pads=[1, 1], kernel_shape=[3]),
             helper.make_node("Softplus", ["c"], ["s"]),
             helper.make_node("Resize", ["s", "", "scales"], ["r"], mode="nearest"),
             helper.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 1]),
             helper.make_node("LayerNormalization", ["t", "ln.g", "ln.b"], ["output"], axis=-1)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8])],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 16, 4])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=ONNX_IR_VERSION)
    half = to_float16(m)
    assert next(t for t in half.graph.initializer if t.name == "scales").data_type == TensorProto.FLOAT
    assert next(t for t in half.graph.initializer if t.name == "w").data_type == TensorProto.FLOAT16
    x = rng.normal(size=(5, 1, 8)).astype(np.float32)
    ref = ort.InferenceSession(m.SerializeToString()).run(None, {"input": x})[0]
    got = ort.InferenceSession(half.SerializeToString()).run(None, {"input": x})[0]
    np.testing.assert_allclose(got, ref, rtol=2e-2, atol=2e-2)

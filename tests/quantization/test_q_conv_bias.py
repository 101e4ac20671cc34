"""A tf2onnx Conv1D (Conv -> Squeeze -> bias Add -> Relu) gets its bias and ReLU back on the Conv: exact in FP32,
one fused INT8 layer instead of a separately rounded pre-bias tensor."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from nilmc.compiler.model import ONNX_IR_VERSION, ONNX_OPSET
from nilmc.quantization import _ort
from nilmc.quantization.conv_bias import fold_squeezed_conv_bias
from nilmc.quantization.graph import analyze
from nilmc.quantization.params import derive_params
from nilmc.quantization.qdq import build_qdq_model
from nilmc.quantization.statistics import collect_statistics
from nilmc.quantization.traits import GENERIC_INT8

C, T = 4, 32


def _conv1d(bias_shape: tuple[int, ...] = (1, C, 1), act: str | None = "Relu", squeeze_axes: tuple[int, ...] = (2,)) -> onnx.ModelProto:
    """(N, 1, 1, T) -> Conv(1x3, no bias) -> Squeeze(axes) -> Add(bias) [-> act] -> (N, C, T): the way tf2onnx writes Conv1D.

    Channel 0 has a large gain whose output the bias and ReLU mostly cut away (pre-bias about +-150, post-ReLU a few
    units); the other channels are small. One per-tensor grid for the pre-bias tensor is then far too coarse for them."""
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.5, (C, 1, 1, 3)).astype(np.float32)
    w[0, 0, 0, 1] = 50.0
    offset = np.array([-140.0] + [0.0] * (C - 1), np.float32)
    b = (offset.reshape(1, C, 1) if bias_shape == (1, C, 1) else np.full(bias_shape, -140.0)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], name="conv", pads=[0, 1, 0, 1]),
             helper.make_node("Squeeze", ["c", "axes"], ["s"], name="squeeze"),
             helper.make_node("Add", ["s", "b"], ["a"], name="bias_add")]
    out = "a"
    if act:
        nodes.append(helper.make_node(act, ["a"], ["r"], name="act"))
        out = "r"
    nodes.append(helper.make_node("Identity", [out], ["output"], name="out"))
    g = helper.make_graph(nodes, "conv1d", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 1, T])],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", C, T])],
                          [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b"),
                           numpy_helper.from_array(np.array(squeeze_axes, np.int64), "axes")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", ONNX_OPSET)])
    m.ir_version = ONNX_IR_VERSION
    return m


def _x(n: int = 64) -> np.ndarray:
    return np.random.default_rng(1).normal(0, 1.0, (n, 1, 1, T)).astype(np.float32)


def _copy(m: onnx.ModelProto) -> onnx.ModelProto:
    c = onnx.ModelProto()
    c.CopyFrom(m)
    return c


def test_fold_is_exact_and_fuses_the_layer():
    m = _conv1d()
    folded = _copy(m)
    assert fold_squeezed_conv_bias(folded) == ["conv"]
    onnx.checker.check_model(folded)
    x = _x()
    np.testing.assert_allclose(_ort.output(folded, x), _ort.output(m, x), rtol=0, atol=1e-4)
    layer = analyze(_copy(folded)).layers[0]
    assert layer.bias is not None and layer.activation == "Relu"
    assert analyze(_copy(m)).layers[0].bias is None  # the export as it was: the bias sat outside the layer
    assert fold_squeezed_conv_bias(folded) == []  # idempotent


def test_int8_error_of_the_pre_bias_tensor_is_gone():
    """The unfused export rounds the ~+100 pre-bias tensor to 8 bits before the bias cancels it: a coarse grid right
    where the ReLU decides. Fused, the bias is added in the accumulator and only the post-ReLU tensor is rounded."""
    x = _x(256)

    def sqnr(m: onnx.ModelProto) -> float:
        params = derive_params(m, collect_statistics(m, x), GENERIC_INT8, estimator="minmax")
        return _ort.sqnr_db(_ort.output(m, x), _ort.output(build_qdq_model(m, params), x))

    unfused = _conv1d()
    folded = _copy(unfused)
    fold_squeezed_conv_bias(folded)
    before, after = sqnr(unfused), sqnr(folded)
    assert before < 15.0 and after > 20.0, (before, after)  # measured: 9.9 dB unfused, 25.5 dB fused


def test_patterns_that_are_not_a_per_channel_bias_are_left_alone():
    for m in (_conv1d(bias_shape=(1, 1, T)),  # broadcasts over time, not channels
              _conv1d(squeeze_axes=(0,)),  # would drop the batch axis: not the Conv1D pattern
              ):
        before = m.SerializeToString()
        assert fold_squeezed_conv_bias(m) == [] and m.SerializeToString() == before
    no_act = _conv1d(act=None)
    folded = _copy(no_act)
    assert fold_squeezed_conv_bias(folded) == ["conv"]
    np.testing.assert_allclose(_ort.output(folded, _x()), _ort.output(no_act, _x()), rtol=0, atol=1e-4)


def _tconv(pad_amount: int) -> onnx.ModelProto:
    """(N, C, 1, 8) -> ConvTranspose(stride 2, no bias) -> Slice (crop 17 -> 16) -> Pad -> Squeeze -> Add(b) -> Relu:
    tf2onnx's Conv1DTranspose with padding "same" (its Pad pads nothing; ``pad_amount`` > 0 makes one that does)."""
    rng = np.random.default_rng(2)
    w = rng.normal(0, 0.5, (C, 3, 1, 3)).astype(np.float32)  # (C_in, C_out, 1, k)
    b = rng.normal(0, 1.0, (1, 3, 1)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b"),
             numpy_helper.from_array(np.array([0], np.int64), "st"), numpy_helper.from_array(np.array([16], np.int64), "en"),
             numpy_helper.from_array(np.array([3], np.int64), "ax"),
             numpy_helper.from_array(np.array([0, 0, 0, pad_amount, 0, 0, 0, 0], np.int64), "pads"),
             numpy_helper.from_array(np.array([2], np.int64), "sq")]
    nodes = [helper.make_node("ConvTranspose", ["input", "w"], ["ct"], name="tconv", strides=[1, 2], kernel_shape=[1, 3]),
             helper.make_node("Shape", ["ct"], ["shape"], name="shape_of_ct"),
             helper.make_node("Slice", ["ct", "st", "en", "ax"], ["sl"], name="crop"),
             helper.make_node("Pad", ["sl", "pads"], ["pd"], name="pad"),
             helper.make_node("Squeeze", ["pd", "sq"], ["s"], name="squeeze"),
             helper.make_node("Add", ["s", "b"], ["a"], name="bias_add"),
             helper.make_node("Relu", ["a"], ["output"], name="act")]
    g = helper.make_graph(nodes, "tconv", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", C, 1, 8])],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)], inits)
    g.output.append(helper.make_tensor_value_info("shape", TensorProto.INT64, [4]))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", ONNX_OPSET)])
    m.ir_version = ONNX_IR_VERSION
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 0  # symbolic batch
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    return m


def test_transposed_conv_bias_moves_onto_the_conv_only_when_exact():
    from nilmc.quantization.conv_bias import fold_transposed_conv_bias

    x = np.random.default_rng(3).normal(0, 1, (5, C, 1, 8)).astype(np.float32)
    m = _tconv(0)
    folded = _copy(m)
    assert fold_transposed_conv_bias(folded) == ["tconv"]
    conv = next(n for n in folded.graph.node if n.op_type == "ConvTranspose")
    assert len(conv.input) == 3 and not any(n.op_type == "Add" for n in folded.graph.node)
    np.testing.assert_allclose(_ort.output(folded, x), _ort.output(m, x), rtol=0, atol=1e-5)
    assert "tconv/activated" in analyze(_copy(folded)).quant_points and "ct" not in analyze(_copy(folded)).quant_points
    padded = _tconv(1)  # pads one step before the bias: moving the bias would change those positions
    before = padded.SerializeToString()
    assert fold_transposed_conv_bias(padded) == [] and padded.SerializeToString() == before


def _conv_bn_model(*, bias: bool = True, shared_mean: bool = False) -> onnx.ModelProto:
    """What torch.onnx.export writes for Conv1d -> BatchNorm1d -> ReLU -> Flatten -> Linear -> BatchNorm1d (eval mode)."""
    rng = np.random.default_rng(3)
    c, t, h = 4, 8, 5
    arrays = {"conv.w": rng.normal(0, 0.5, (c, 1, 3)), "conv.b": rng.normal(0, 0.1, c),
              "bn.g": rng.uniform(0.5, 2, c), "bn.b": rng.normal(0, 0.3, c), "bn.m": rng.normal(0, 0.5, c), "bn.v": rng.uniform(0.2, 3, c),
              "fc.w": rng.normal(0, 0.3, (h, c * t)),
              "bn2.g": rng.uniform(0.5, 2, h), "bn2.b": rng.normal(0, 0.3, h), "bn2.m": rng.normal(0, 0.5, h), "bn2.v": rng.uniform(0.2, 3, h)}
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in arrays.items() if bias or k != "conv.b"]
    bn2_mean = "bn.m" if shared_mean else "bn2.m"
    if shared_mean:
        inits = [i for i in inits if i.name != "bn2.m"]
    nodes = [helper.make_node("Conv", ["input", "conv.w", *(["conv.b"] if bias else [])], ["c1"], name="/conv/Conv", pads=[1, 1]),
             helper.make_node("BatchNormalization", ["c1", "bn.g", "bn.b", "bn.m", "bn.v"], ["b1"], name="/bn/BatchNormalization", epsilon=1e-3),
             helper.make_node("Relu", ["b1"], ["r1"], name="/relu/Relu"),
             helper.make_node("Flatten", ["r1"], ["f1"], name="/Flatten"),
             helper.make_node("Gemm", ["f1", "fc.w"], ["g1"], name="/fc/Gemm", transB=1),
             helper.make_node("BatchNormalization", ["g1", "bn2.g", "bn2.b", bn2_mean, "bn2.v"], ["output"], name="/bn2/BatchNormalization")]
    g = helper.make_graph(nodes, "torch", [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [None, 1, t])],
                          [helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, [None, h])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_batchnorm_after_conv_and_gemm_is_folded_exactly():
    from nilmc.quantization import _ort
    from nilmc.quantization.conv_bias import fold_conv_batchnorm

    for bias in (True, False):
        m = _conv_bn_model(bias=bias)
        x = np.random.default_rng(1).normal(0, 1, (16, 1, 8)).astype(np.float32)
        ref = _ort.output(m, x)
        folded = fold_conv_batchnorm(m)
        assert folded == ["/bn/BatchNormalization", "/bn2/BatchNormalization"]
        assert "BatchNormalization" not in {n.op_type for n in m.graph.node}
        assert not {"bn.g", "bn.v", "bn2.g"} & {t.name for t in m.graph.initializer}
        got = _ort.output(m, x)
        assert np.max(np.abs(got - ref)) <= 1e-5 * np.max(np.abs(ref))


def test_batchnorm_with_a_shared_parameter_is_left_alone():
    from nilmc.quantization.conv_bias import fold_conv_batchnorm

    m = _conv_bn_model(shared_mean=True)  # bn2 reads bn's running mean too: folding one would change the other
    assert fold_conv_batchnorm(m) == []
    assert [n.op_type for n in m.graph.node].count("BatchNormalization") == 2

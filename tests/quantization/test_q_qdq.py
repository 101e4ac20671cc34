"""qdq: the ideal INT8 reference graph holds nilmc's parameters exactly and tracks FP32."""
from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from nilmc.compiler.errors import QuantizationError
from nilmc.quantization import intops as io
from nilmc.quantization.graph import constants
from nilmc.quantization.params import QuantParams, derive_params, quantize_constant
from nilmc.quantization.qdq import build_qdq_model, portable_weights
from nilmc.quantization.traits import DPU_POT, EIQ_PER_TENSOR, GENERIC_INT8, PRESETS, TENSORRT_INT8, TFLITE_INT8, QuantTraits


def _sqnr_db(ref: np.ndarray, got: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / np.sum((got - ref).astype(np.float64) ** 2)))


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


# measured on this model: generic 30.8 dB, tflite 30.8, tensorrt 27.9, eiq 29.6, dpu 25.2 (minmax)
@pytest.mark.parametrize("name, min_sqnr", [("generic_int8", 27), ("tflite_int8", 27), ("tensorrt_int8", 25),
                                            ("eiq_per_tensor", 26), ("dpu_pot", 22)])
def test_qdq_tracks_fp32(s2p_model, s2p_stats, make_windows, run_model, name: str, min_sqnr: float) -> None:
    x = make_windows(256, seed=2)
    params = derive_params(s2p_model, s2p_stats, PRESETS[name])
    qdq = build_qdq_model(s2p_model, params)
    ref, got = run_model(s2p_model, x), run_model(qdq, x)
    assert _sqnr_db(ref, got) > min_sqnr
    assert np.abs(got - ref).max() < 0.15 * np.abs(ref).max()


def test_qdq_graph_format(s2p_model, s2p_stats) -> None:
    qdq = build_qdq_model(s2p_model, derive_params(s2p_model, s2p_stats, GENERIC_INT8))
    onnx.checker.check_model(qdq)
    assert qdq.ir_version == 10
    assert [o.version for o in qdq.opset_import if o.domain in ("", "ai.onnx")] == [17]
    assert [o.name for o in qdq.graph.output] == ["output"] and [i.name for i in qdq.graph.input] == ["input"]
    ops = [n.op_type for n in qdq.graph.node]
    assert ops.count("QuantizeLinear") == 8  # input, t0, r1, r2, t1, flat, r3, output
    assert ops.count("DequantizeLinear") == 8 + 8  # activations + 4 weights + 4 biases
    inits = _inits(qdq)
    assert not {"conv1/W", "dense1/W", "conv1/b"} & set(inits)  # float weights replaced by integers
    assert inits["conv1/W_quantized"].dtype == np.int8 and inits["dense2/b_quantized"].dtype == np.int32
    assert inits["input_act_zero_point"].dtype == np.uint8  # generic: asymmetric uint8 activations


def test_graph_holds_params_exactly(s2p_model, s2p_stats) -> None:
    for traits in (GENERIC_INT8, TENSORRT_INT8, DPU_POT, EIQ_PER_TENSOR):
        params = derive_params(s2p_model, s2p_stats, traits, estimator="mse")
        inits = _inits(build_qdq_model(s2p_model, params))
        for name in [t.name for t in params.by_role("activation")] + list(params.shared):
            tq = params[name]
            assert inits[name + "_act_scale"].tobytes() == np.float32(tq.scale[0]).tobytes(), name
            assert int(inits[name + "_act_zero_point"]) == tq.zero_point[0]
        for tq in params.by_role("weight") + params.by_role("bias"):
            assert np.array_equal(inits[tq.name + "_scale"].ravel(), tq.scales()), tq.name
            assert np.array_equal(inits[tq.name + "_zero_point"].ravel().astype(np.int64), tq.zero_points())
            codes = quantize_constant(tq, constants(s2p_model)[tq.name], traits)
            assert np.array_equal(inits[tq.name + "_quantized"], codes)


def test_per_channel_axes_in_graph(s2p_model, s2p_stats) -> None:
    qdq = build_qdq_model(s2p_model, derive_params(s2p_model, s2p_stats, TFLITE_INT8))
    dq = {n.input[0]: n for n in qdq.graph.node if n.op_type == "DequantizeLinear"}
    axis = lambda n: next(a.i for a in n.attribute if a.name == "axis")  # noqa: E731
    assert axis(dq["conv1/W_quantized"]) == 0 and _inits(qdq)["conv1/W_scale"].shape == (8,)
    assert axis(dq["dense1/W_quantized"]) == 1 and _inits(qdq)["dense1/W_scale"].shape == (32,)
    assert axis(dq["conv2/b_quantized"]) == 0
    assert not any(a.name == "axis" for a in dq["input_quantized"].attribute)


def test_power_of_two_in_graph(s2p_model, s2p_stats) -> None:
    qdq = build_qdq_model(s2p_model, derive_params(s2p_model, s2p_stats, DPU_POT))
    scales = [v for k, v in _inits(qdq).items() if k.endswith("_scale")]
    assert len(scales) == 8 + 8
    for s in scales:
        for v in np.atleast_1d(s):
            assert math.frexp(float(v))[0] == 0.5
    zps = [v for k, v in _inits(qdq).items() if k.endswith("_zero_point")]
    assert all(np.all(z == 0) and z.dtype == np.int8 for z in zps)


def _layer1_emulated(params: QuantParams, model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """conv1 + bias + ReLU in integers (intops), TFLite-style fixed-point requantization, NHWC codes."""
    c, traits = constants(model), params.traits
    xi, w, b, out = params["input"], params.tensors["conv1/W"], params.tensors["conv1/b"], params["r1"]
    q = io.quantize(x, xi.scale[0], xi.zero_point[0], xi.rng)
    wq = quantize_constant(w, c["conv1/W"], traits).transpose(0, 2, 3, 1)  # OIHW -> OHWI
    acc = io.conv2d_nhwc(q, wq, quantize_constant(b, c["conv1/b"], traits), x_zero_point=xi.zero_point[0], pads=(1, 1, 1, 1))
    real = np.float32(xi.scale[0]) * w.scales() / np.float32(out.scale[0])
    m, shift = zip(*(io.quantize_multiplier(float(r)) for r in real))
    codes = io.requantize(acc, np.array(m), np.array(shift), out.zero_point[0], out.rng)
    return io.relu(codes, out.zero_point[0])


@pytest.mark.parametrize("traits", [GENERIC_INT8, TENSORRT_INT8])
def test_integer_reference_agrees_with_qdq(s2p_model, s2p_stats, make_windows, traits: QuantTraits) -> None:
    x = make_windows(128, seed=2)
    params = derive_params(s2p_model, s2p_stats, traits)
    qdq = build_qdq_model(s2p_model, params)
    elem = helper.np_dtype_to_tensor_dtype(params["r1"].rng.np_dtype)
    qdq.graph.output.append(helper.make_tensor_value_info("r1_quantized", elem, None))
    sess = ort.InferenceSession(portable_weights(qdq)[0].SerializeToString(), providers=["CPUExecutionProvider"])
    ort_codes = sess.run(["r1_quantized"], {"input": x})[0].transpose(0, 2, 3, 1).astype(np.int64)
    emu = _layer1_emulated(params, s2p_model, x).astype(np.int64)
    diff = np.abs(ort_codes - emu)
    assert diff.max() <= 1  # float vs fixed-point requantization: at most one code (measured 99.7 % identical)
    assert (diff == 0).mean() > 0.99


def test_int16_tensor_raises_opset(s2p_model, s2p_stats, make_windows, run_model) -> None:
    traits = TFLITE_INT8.with_(allow_int16_activations=True)
    params = derive_params(s2p_model, s2p_stats, traits, activation_dtypes={"output": "int16"})
    qdq = build_qdq_model(s2p_model, params)
    assert [o.version for o in qdq.opset_import if o.domain in ("", "ai.onnx")] == [21]
    x = make_windows(64, seed=2)
    assert _sqnr_db(run_model(s2p_model, x), run_model(qdq, x)) > 25


def test_params_of_another_model_are_refused(s2p_model, s2p_stats, seq2point) -> None:
    params = derive_params(s2p_model, s2p_stats, GENERIC_INT8)
    with pytest.raises(QuantizationError, match="different model"):
        build_qdq_model(seq2point(seed=5), params)

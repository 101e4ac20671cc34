"""params: statistics + traits + estimator -> exact, deterministic parameters."""
from __future__ import annotations

import math

import numpy as np
import pytest

from nilmc.compiler.errors import QuantizationError
from nilmc.quantization.intops import INT_RANGES, dequantize, quantize
from nilmc.quantization.params import QuantParams, derive_params, weight_quant
from nilmc.quantization.traits import DPU_POT, GENERIC_INT8, TENSORRT_INT8, TFLITE_INT8, QuantTraits

POINTS = ["input", "r1", "r2", "r3", "output"]


@pytest.fixture
def model(s2p_model):
    return s2p_model


@pytest.fixture
def stats(s2p_stats):
    return s2p_stats


def _is_pot(x: float) -> bool:
    return math.frexp(x)[0] == 0.5


def test_quantization_points_and_sharing(model, stats) -> None:
    p = derive_params(model, stats, GENERIC_INT8)
    assert sorted(t.name for t in p.by_role("activation")) == sorted(POINTS)
    assert p.shared == {"t0": "input", "t1": "r2", "flat": "r2"}
    assert p["flat"] is p.tensors["r2"]
    assert {t.name for t in p.by_role("weight")} == {"conv1/W", "conv2/W", "dense1/W", "dense2/W"}
    assert {"c1", "m1", "a1"}.isdisjoint(p.tensors)  # accumulator-only tensors get no parameters


def test_generic_minmax_values(model, stats) -> None:
    p = derive_params(model, stats, GENERIC_INT8)
    r1 = p["r1"]
    assert r1.range_name == "uint8" and r1.zero_point == (0,)
    assert r1.scale[0] == float(np.float32(stats["r1"].maximum / 255))
    inp = p["input"]
    lo, hi = stats["input"].minimum, stats["input"].maximum
    assert inp.scale[0] == float(np.float32((hi - lo) / 255))
    assert inp.zero_point[0] == int(np.rint(-lo / inp.scale[0]))


def test_per_channel_axes(model, stats) -> None:
    p = derive_params(model, stats, GENERIC_INT8)
    conv, dense = p.tensors["conv1/W"], p.tensors["dense1/W"]
    assert conv.axis == 0 and len(conv.scale) == 8 and all(z == 0 for z in conv.zero_point)
    assert dense.axis == 1 and len(dense.scale) == 32
    w = stats["dense1/W"]  # weight statistics exist, but per-channel scales come from the values
    assert max(dense.scale) * 127 == pytest.approx(max(abs(w.minimum), abs(w.maximum)), rel=1e-6)


def test_bias_is_int32_at_product_scale(model, stats) -> None:
    p = derive_params(model, stats, TFLITE_INT8)
    b, w, x = p.tensors["dense1/b"], p.tensors["dense1/W"], p["r2"]
    assert b.range_name == "int32" and b.axis == 0 and set(b.zero_point) == {0}
    assert np.array_equal(np.asarray(b.scale, np.float32), np.float32(x.scale[0]) * w.scales())


def test_symmetric_traits_give_zero_points_zero(model, stats) -> None:
    p = derive_params(model, stats, TENSORRT_INT8, estimator="percentile")
    assert all(set(t.zero_point) == {0} for t in p.tensors.values())
    assert all(t.range_name == "int8" for t in p.by_role("activation"))
    assert p.tensors["conv2/W"].range_name == "int8_narrow"


def test_power_of_two_scales_are_exact(model, stats) -> None:
    p = derive_params(model, stats, DPU_POT)
    for t in p.tensors.values():
        assert t.axis is None and t.fix_position is not None
        assert all(_is_pot(s) for s in t.scale), t.name
        assert t.scale[0] == 2.0 ** -t.fix_position[0]
    assert p.tensors["conv1/b"].range_name == "int8"  # the DPU's 8-bit bias with its own fix position


def test_power_of_two_choice_is_by_error() -> None:
    rng = np.random.default_rng(3)
    w = rng.normal(0, 0.2, (64, 16)).astype(np.float32)
    w[0, 0] = 1.0  # max 1.0: ideal scale 1/127 lies between 2^-7 (clips 1.0 a little) and 2^-6 (coarse)
    tq = weight_quant("w", w, None, DPU_POT)
    errors = {}
    for fp in (6, 7):
        s = 2.0**-fp
        errors[fp] = float(np.mean((dequantize(quantize(w.astype(np.float64), s, 0, INT_RANGES["int8"], rounding=DPU_POT.rounding), s, 0) - w) ** 2))
    assert tq.fix_position == (min(errors, key=errors.get),) == (7,)
    # a lone huge outlier flips the choice to the scale that does not clip it
    w[0, 0] = 1.9
    assert weight_quant("w", w, None, DPU_POT).fix_position == (6,)


def test_estimators_and_overrides(model, stats) -> None:
    base = derive_params(model, stats, GENERIC_INT8)
    pct = derive_params(model, stats, GENERIC_INT8, estimator="percentile")
    assert pct["r1"].scale[0] < base["r1"].scale[0]
    mixed = derive_params(model, stats, GENERIC_INT8, per_tensor_estimators={"r1": "percentile"})
    assert mixed["r1"] == pct["r1"] and mixed["r2"] == base["r2"]
    opt = derive_params(model, stats, GENERIC_INT8, estimator="percentile", estimator_options={"percentile": {"percentile": 99.0}})
    assert opt["r1"].scale[0] < pct["r1"].scale[0]
    with pytest.raises(QuantizationError, match="not quantization points"):
        derive_params(model, stats, GENERIC_INT8, per_tensor_estimators={"c1": "mse"})
    with pytest.raises(QuantizationError, match="available"):
        derive_params(model, stats, GENERIC_INT8, estimator="kl")


def test_int16_needs_the_trait(model, stats) -> None:
    with pytest.raises(QuantizationError, match="int16"):
        derive_params(model, stats, TFLITE_INT8, activation_dtypes={"r3": "int16"})
    p = derive_params(model, stats, TFLITE_INT8.with_(allow_int16_activations=True), activation_dtypes={"r3": "int16"})
    assert p["r3"].range_name == "int16" and p["r3"].zero_point == (0,)
    assert p["r3"].scale[0] == float(np.float32(stats["r3"].maximum / 32767))


def test_deterministic_and_json_roundtrip(model, stats, tmp_path) -> None:
    a = derive_params(model, stats, DPU_POT, estimator="mse")
    b = derive_params(model, stats, DPU_POT, estimator="mse")
    assert a.dumps() == b.dumps()
    back = QuantParams.load(a.save(tmp_path / "params.json"))
    assert back.dumps() == a.dumps() and back.tensors == a.tensors and back.traits == DPU_POT


def test_missing_statistics(model, stats) -> None:
    partial = type(stats)({k: v for k, v in stats.tensors.items() if k != "r2"}, stats.model_digest, stats.input_name,
                          stats.output_names, stats.n_samples, stats.bins)
    with pytest.raises(QuantizationError, match="'r2'"):
        derive_params(model, partial, GENERIC_INT8)


def test_per_tensor_weights_asymmetric() -> None:
    rng = np.random.default_rng(0)
    w = rng.uniform(-0.1, 0.5, (3, 3, 1, 4)).astype(np.float32)
    t = weight_quant("w", w, 0, QuantTraits(per_channel_weights=False, symmetric_weights=False))
    assert t.axis is None and len(t.scale) == 1 and t.zero_point[0] != 0
    assert t.scale[0] == float(np.float32((float(w.max()) - float(w.min())) / 255))


def test_tflite_traits_put_an_average_pool_on_its_inputs_grid() -> None:
    """TFLite's int8 AVERAGE_POOL_2D requires its input's scale and zero point on its output (the kernel averages codes
    without requantizing; on a grid of its own the example CtRNN's integer stage gave 6.6 dB): under ``pool_shares_grid``
    the pool's output shares its input's parameters; the QDQ targets keep a grid of its own."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from nilmc.quantization.statistics import collect_statistics

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["input", "W", "B"], ["c"], name="conv", kernel_shape=[1, 3], pads=[0, 1, 0, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("AveragePool", ["r"], ["p"], name="pool", kernel_shape=[1, 2], strides=[1, 2]),
             helper.make_node("Conv", ["p", "W2", "B2"], ["output"], name="conv2", kernel_shape=[1, 1])]
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (4, 1, 1, 3)).astype(np.float32), "W"),
             numpy_helper.from_array(np.full(4, 0.1, np.float32), "B"),
             numpy_helper.from_array(rng.normal(0, 0.5, (2, 4, 1, 1)).astype(np.float32), "W2"),
             numpy_helper.from_array(np.zeros(2, np.float32), "B2")]
    g = helper.make_graph(nodes, "pool", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 1, 16])],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 2, 1, 8])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    stats = collect_statistics(m, rng.normal(0, 1, (64, 1, 1, 16)).astype(np.float32))
    tfl, ort = derive_params(m, stats, TFLITE_INT8), derive_params(m, stats, GENERIC_INT8)
    assert TFLITE_INT8.pool_shares_grid and not GENERIC_INT8.pool_shares_grid
    assert "p" not in tfl.tensors and tfl.shared["p"] == "r" and tfl["p"] == tfl["r"]
    assert "p" in ort.tensors and ort["p"].scale != ort["r"].scale  # the average's own, narrower range
    # the layer reading the pool output takes its bias scale from the grid it really reads
    assert tfl.tensors["B2"].scale[0] == pytest.approx(tfl["r"].scale[0] * tfl.tensors["W2"].scale[0])

"""fold: normalization into the first layer, de-normalization into the last; FP32 within 1e-4 relative;
zero padding handled (weight folding of the offset is refused where it would be wrong at the borders)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from nilmc.calibration_data.normalization import FeatureStats, Normalization, NormalizationSpec, TargetScaling
from nilmc.compiler.contract import ModelContract
from nilmc.compiler.errors import QuantizationError
from nilmc.compiler.model import Model
from nilmc.quantization import _ort
from nilmc.quantization.fold import fold_normalization, verify_fold

RTOL = 1e-4


def _close(original: Model, folded: Model, raw: np.ndarray) -> None:
    ref = original.contract.to_watts(_ort.output(original.graph, original.contract.prepare(raw)))
    got = folded.contract.to_watts(_ort.output(folded.graph, folded.contract.prepare(raw)))
    assert np.allclose(got, ref, rtol=RTOL, atol=RTOL * np.abs(ref).max())


def _raw_windows(n: int, features: int = 9, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scales = 10.0 ** rng.uniform(-1, 4, features)  # raw features over five decades
    return (rng.normal(size=(n, 10, features, 1)) * scales[None, None, :, None] + 3 * scales[None, None, :, None]).astype(np.float32)


_TARGET = TargetScaling(700.0, 1000.0)


def _contract(raw: np.ndarray, kind: str = "C", target: TargetScaling = _TARGET) -> ModelContract:
    spec = NormalizationSpec(Normalization(kind), FeatureStats.fit(raw))
    return ModelContract(input_shape=raw.shape[1:], normalization=spec, appliance="kettle", target=target, peak_power_w=3000.0,
                         feature_names=tuple(f"f{i}" for i in range(raw.shape[2])))


@pytest.mark.parametrize("kind", ["B", "C", "D", "E"])
def test_dense_first_layer_folds_into_weights(tiny, tiny_ds, kind: str) -> None:
    model = Model(tiny.graph, tiny.contract.with_(normalization=tiny_ds.normalization_spec(kind)))
    raw = tiny_ds.raw_x()
    res = fold_normalization(model, verify_x=raw)
    assert res.input_mode == "weights" and res.output_mode == "weights" and res.float_tensors == ()
    assert res.max_rel_error is not None and res.max_rel_error < RTOL
    assert res.model.contract.folded and res.model.keras_path is None
    assert np.array_equal(res.model.contract.prepare(raw), raw)  # raw features in
    assert len(res.model.graph.graph.node) == len(tiny.graph.graph.node)  # nothing inserted: the constants changed
    _close(model, res.model, raw)


def test_seq2point_conv_uses_explicit_ops(s2p_model) -> None:
    raw = _raw_windows(200)
    model = Model(s2p_model, _contract(raw))
    res = fold_normalization(model, verify_x=raw)
    assert res.input_mode == "ops" and "width axis" in res.notes[0]
    assert res.float_tensors == ("input", "nilmc_fold/input_scaled")
    assert res.output_mode == "weights"
    _close(model, res.model, raw)
    with pytest.raises(QuantizationError, match="spatial axes"):
        fold_normalization(model, input_mode="weights")


def _channel_conv(features: int, pads: list[int]) -> onnx.ModelProto:
    """input (N, 10, F, 1) -> Transpose to (N, F, 10, 1): the features are the Conv's *channels*."""
    rng = np.random.default_rng(3)
    flat = 4 * (10 - 2 + pads[0] + pads[2])
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (4, features, 3, 1)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(0, 0.1, 4).astype(np.float32), "b"),
             numpy_helper.from_array(rng.normal(0, 0.1, (flat, 1)).astype(np.float32), "w2"),
             numpy_helper.from_array(np.array([0.2], np.float32), "b2"),
             numpy_helper.from_array(np.array([-1, flat], np.int64), "shape")]
    nodes = [helper.make_node("Transpose", ["input"], ["t"], perm=[0, 2, 1, 3]),
             helper.make_node("Conv", ["t", "w", "b"], ["c"], kernel_shape=[3, 1], pads=pads),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Reshape", ["r", "shape"], ["f"]),
             helper.make_node("MatMul", ["f", "w2"], ["m"]), helper.make_node("Add", ["m", "b2"], ["output"])]
    g = helper.make_graph(nodes, "chconv", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 10, features, 1])],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 1])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 10
    return m


def test_conv_padding_is_handled(tmp_path) -> None:
    raw = _raw_windows(100, features=5)
    padded = Model(_channel_conv(5, [1, 0, 1, 0]), _contract(raw))
    res = fold_normalization(padded, verify_x=raw)
    assert res.input_mode == "ops" and "zero-pads" in res.notes[0]
    _close(padded, res.model, raw)
    with pytest.raises(QuantizationError, match="borders"):
        fold_normalization(padded, input_mode="weights")
    # without padding the weight fold is exact ...
    unpadded = Model(_channel_conv(5, [0, 0, 0, 0]), _contract(raw))
    exact = fold_normalization(unpadded, input_mode="weights", verify_x=raw)
    assert exact.input_mode == "weights" and exact.max_rel_error < RTOL
    # ... while the same formula on the padded Conv is measurably wrong at the borders: why it is refused
    scale, offset = padded.contract.normalization.affine()
    naive = onnx.ModelProto()
    naive.CopyFrom(padded.graph)
    inits = {t.name: t for t in naive.graph.initializer}
    w, b = numpy_helper.to_array(inits["w"]).astype(np.float64), numpy_helper.to_array(inits["b"]).astype(np.float64)
    inits["w"].CopyFrom(numpy_helper.from_array((w * scale[None, :, None, None]).astype(np.float32), "w"))
    inits["b"].CopyFrom(numpy_helper.from_array((b + np.einsum("oikl,i->o", w, offset)).astype(np.float32), "b"))
    naive_model = Model(naive, padded.contract.with_(folded=True))
    assert verify_fold(padded, naive_model, raw) > 1e-3


def test_relu_head_and_skips(tiny, tiny_ds) -> None:
    m = onnx.ModelProto()
    m.CopyFrom(tiny.graph)
    add = next(n for n in m.graph.node if "output" in n.output)
    add.output[0] = "pre"
    m.graph.node.append(helper.make_node("Relu", ["pre"], ["output"]))
    model = Model(m, tiny.contract)
    raw = tiny_ds.raw_x()
    res = fold_normalization(model, verify_x=raw)
    assert res.output_mode == "ops" and "Relu" in res.notes[-1]
    _close(model, res.model, raw)
    only_in = fold_normalization(model, output_mode="skip", verify_x=raw)
    assert not only_in.model.contract.folded and only_in.model.contract.normalization.kind is Normalization.A
    only_out = fold_normalization(model, input_mode="skip", verify_x=raw)
    assert only_out.model.contract.target == TargetScaling() and only_out.model.contract.normalization.kind is Normalization.C
    a_model = Model(tiny.graph, tiny.contract.with_(normalization=NormalizationSpec(Normalization.A)))
    assert fold_normalization(a_model).input_mode == "none"


def test_errors(tiny) -> None:
    folded = fold_normalization(tiny).model
    with pytest.raises(QuantizationError, match="already folded"):
        fold_normalization(folded)
    with pytest.raises(QuantizationError, match="input_mode"):
        fold_normalization(tiny, input_mode="magic")


def test_quantize_folded_int8(tiny, tiny_ds, tiny_eval) -> None:
    """The folded INT8 artifact takes raw features and returns watts; its raw input stays float."""
    from nilmc.quantization.api import Techniques, quantize

    fast = Techniques(select_estimators=False, headroom=False, bias_correction=False)
    plain = quantize(tiny, tiny_ds, advanced=fast)
    folded = quantize(tiny, tiny_ds, advanced=fast, fold_normalization=True)
    assert folded.model.contract.folded and folded.fold.max_rel_error < RTOL
    assert set(folded.params.keep_float) == {"input", "nilmc_fold/input_scaled"}
    # the raw input is not quantized, so neither check complains about its feature scales
    assert folded.feature_scales.ok and "FP32" in folded.feature_scales.summary()
    assert not folded.overflow.by_check("input_features")
    ops = {n.input[0] for n in folded.qdq.graph.node if n.op_type == "QuantizeLinear"}
    assert "input" not in ops and "nilmc_fold/input_normalized" in ops
    raw = tiny_eval.raw_x()
    watts = _ort.output(folded.qdq, raw).ravel()
    ref = tiny.contract.to_watts(_ort.output(plain.qdq, tiny.contract.prepare(raw)))
    fp = tiny.contract.to_watts(_ort.output(tiny.graph, tiny.contract.prepare(raw)))
    err_folded, err_plain = np.abs(watts - fp).mean(), np.abs(ref - fp).mean()
    assert err_folded < 0.01 * np.abs(fp).max() and err_folded < 1.5 * err_plain + 1.0  # as good as quantizing unfolded
    assert folded.params["output"].representable()[1] >= 2000.0  # the output range is in watts and covers the peak

"""mixed_precision: the NILM metric under a budget decides which units stay at higher precision."""
from __future__ import annotations

import numpy as np
import pytest
from helpers import tiny_dataset

from nilmc.compiler.errors import QuantizationError
from nilmc.compiler.metrics import compare_metrics
from nilmc.quantization.api import Techniques, make_eval_fn, quantize
from nilmc.quantization.context import QuantContext
from nilmc.quantization.mixed_precision import mixed_precision
from nilmc.quantization.qdq import build_qdq_model
from nilmc.quantization.traits import EIQ_PER_TENSOR, GENERIC_INT8, TFLITE_INT8

PLAIN = Techniques.plain()


@pytest.fixture(scope="module")
def setup(tiny, tiny_ds):
    val = tiny_dataset(300, seed=3)  # a validation split: decisions are not made on the evaluation set
    fn = make_eval_fn(tiny, val)
    return tiny, tiny_ds, fn, fn(tiny.graph)


def test_budget_drives_the_fallback(setup) -> None:
    model, ds, fn, ref = setup
    base = quantize(model, ds, traits=EIQ_PER_TENSOR, advanced=PLAIN)
    loss = compare_metrics(ref, fn(base.qdq))["eacc"]
    assert loss > 0.03  # per-tensor INT8 loses something on this model
    res = mixed_precision(model.graph, base.params, fn, {"eacc": loss / 3}, stats=base.stats)
    assert res and res.met and res.mode == "float" and 1 <= len(res.kept) < 3
    assert compare_metrics(ref, res.final)["eacc"] <= loss / 3
    assert res.params.keep_float == tuple(res.kept) and set(res.sensitivity) == {"MatMul_1", "MatMul_4", "output"}
    assert compare_metrics(ref, fn(build_qdq_model(model.graph, res.params)))["eacc"] == pytest.approx(compare_metrics(ref, res.final)["eacc"])
    # a float layer keeps float weights in the QDQ graph
    inits = {t.name for t in build_qdq_model(model.graph, res.params).graph.initializer}
    kept_layer = next(k for k in res.kept if k != "output")
    weight = {"MatMul_1": "w1", "MatMul_4": "w2"}[kept_layer]
    assert weight in inits and weight + "_quantized" not in inits


def test_lower_is_better_budget_and_already_met(setup) -> None:
    model, ds, fn, ref = setup
    base = quantize(model, ds, advanced=PLAIN)
    mae_loss = compare_metrics(ref, fn(base.qdq))["mae"]
    assert mae_loss > 0.1
    res = mixed_precision(model.graph, base.params, fn, {"mae": mae_loss / 4}, stats=base.stats)
    assert res.met and res.kept and compare_metrics(ref, res.final)["mae"] <= mae_loss / 4
    easy = mixed_precision(model.graph, base.params, fn, {"eacc": 50.0, "mae": 100.0})
    assert easy.met and easy.kept == [] and easy.evaluations == 1 and easy.params is base.params


def test_budget_not_met_is_reported(setup) -> None:
    model, ds, fn, ref = setup
    base = quantize(model, ds, traits=EIQ_PER_TENSOR, advanced=PLAIN)
    res = mixed_precision(model.graph, base.params, fn, {"eacc": 0.0, "mae": 0.0}, stats=base.stats, max_units=1)
    assert not res and len(res.kept) == 1 and res.to_json()["met"] is False
    full = mixed_precision(model.graph, base.params, fn, {"eacc": 0.0, "mae": 0.0}, stats=base.stats)
    assert full.met and len(full.kept) == 3  # everything at FP32 is FP32


def test_int16_fallback_where_traits_allow(setup) -> None:
    model, ds, fn, ref = setup
    traits = TFLITE_INT8.with_(allow_int16_activations=True)
    base = quantize(model, ds, traits=traits, advanced=PLAIN)
    loss = compare_metrics(ref, fn(base.qdq))["eacc"]
    res = mixed_precision(model.graph, base.params, fn, {"eacc": loss / 3}, stats=base.stats)
    assert res.mode == "int16" and res.params.keep_float == ()
    kept_tensors = {"MatMul_1": "input", "MatMul_4": "r1", "output": "output"}
    assert all(res.params[kept_tensors[k]].range_name == "int16" for k in res.kept)
    assert not GENERIC_INT8.allow_int16_activations
    with pytest.raises(QuantizationError, match="int16"):
        mixed_precision(model.graph, quantize(model, ds, advanced=PLAIN).params, fn, {"eacc": 0.0}, fallback="int16")


def test_bad_budgets(setup) -> None:
    model, ds, fn, _ = setup
    base = quantize(model, ds, advanced=PLAIN)
    with pytest.raises(QuantizationError, match="budget"):
        mixed_precision(model.graph, base.params, fn, {})
    with pytest.raises(QuantizationError, match="accuracy"):
        mixed_precision(model.graph, base.params, fn, {"accuracy": 1.0})
    with pytest.raises(QuantizationError, match="fallback"):
        mixed_precision(model.graph, base.params, fn, {"eacc": 0.1}, fallback="fp64")
    with pytest.raises(QuantizationError, match="eval_fn"):
        quantize(model, model.contract.prepare(ds.raw_x()), budget={"eacc": 0.1}, advanced=PLAIN)


def test_quantize_and_context_with_budget(setup) -> None:
    model, ds, fn, ref = setup
    res = quantize(model, ds, traits=EIQ_PER_TENSOR, budget={"eacc": 0.0}, eval_fn=fn, advanced=PLAIN)
    assert res.params.provenance["mixed_precision"]["met"] and res.params.keep_float
    # the shared context runs the same fallback for every backend, scored on the calibration set by default
    ctx = QuantContext(model, ds, techniques=Techniques(select_estimators=False, headroom=False, bias_correction=False, budget={"eacc": 0.0}))
    params = ctx.params(EIQ_PER_TENSOR)
    assert params.keep_float and params.provenance["mixed_precision"]["met"]
    cal_fn = make_eval_fn(model, ds)
    assert compare_metrics(cal_fn(model.graph), cal_fn(build_qdq_model(model.graph, params)))["eacc"] <= 0.0
    assert ctx.params(EIQ_PER_TENSOR) is params and ctx.calibration_s > 0
    assert np.isfinite(list(ctx.techniques_s.values())[0])


# --------------------------------------------------------------------------- an ON/OFF classifier: an f1w budget
CT, CAPPS = 8, ("a", "b", "c")


def _ml_classifier():
    """Flatten -> MatMul(24x16) -> Add -> Relu -> MatMul(16x3) -> Add -> Sigmoid, weights seeded; one large weight makes
    per-tensor INT8 coarse for all the others, so the decisions near 0.5 flip."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from nilmc.calibration_data.normalization import Normalization, NormalizationSpec
    from nilmc.compiler.contract import ModelContract
    from nilmc.compiler.model import ONNX_IR_VERSION, ONNX_OPSET, Model

    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 0.4, (CT * 3, 16)).astype(np.float32)
    w1[0, 0] = 12.0
    w2 = rng.normal(0, 0.6, (16, 3)).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["f"]), helper.make_node("MatMul", ["f", "w1"], ["h"]),
         helper.make_node("Add", ["h", "b1"], ["hb"]), helper.make_node("Relu", ["hb"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["z"]), helper.make_node("Add", ["z", "b2"], ["zb"]),
         helper.make_node("Sigmoid", ["zb"], ["output"])],
        "ml", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", CT, 3, 1])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(np.full(16, 0.1, np.float32), "b1"),
         numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(np.full(3, -0.8, np.float32), "b2")])
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", ONNX_OPSET)])
    proto.ir_version = ONNX_IR_VERSION
    onnx.checker.check_model(proto)
    contract = ModelContract(input_shape=(CT, 3, 1), normalization=NormalizationSpec(Normalization.A, None), appliance="a",
                             peak_power_w=1.0, output_units="probability", task="multilabel", appliances=CAPPS, on_thresholds_w=(50.0,) * 3)
    return Model(proto, contract, source="tiny multilabel")


def _ml_data(model, n: int, seed: int):
    """Windows at random; the truth is the FP32 model's own decision (50 W when ON), so FP32 scores f1w = 1."""
    from nilmc.calibration_data.dataset import NilmDataset
    from nilmc.calibration_data.normalization import FeatureStats
    from nilmc.quantization import _ort

    x = np.random.default_rng(seed).normal(0, 1, (n, CT, 3, 1)).astype(np.float32)
    on = _ort.output(model.graph, x) >= 0.5
    y = np.where(on, 100.0, 0.0).astype(np.float32)
    return NilmDataset(x=x, y=y, appliances=list(CAPPS), feature_names=["p", "q", "r"], train_stats=FeatureStats.fit(x),
                       on_thresholds=[50.0] * 3, info={"setup": "tiny-ml"})


def test_classification_budget_keeps_float_where_it_must() -> None:
    """An f1w budget (points of weighted F1) steers the fallback of a classifier, and the placement says per unit why."""
    from nilmc.compiler.metrics import ClassificationMetrics
    from nilmc.quantization.placement import op_placement

    model = _ml_classifier()
    calib, val = _ml_data(model, 300, 1), _ml_data(model, 400, 2)
    fn = make_eval_fn(model, val)
    ref = fn(model.graph)
    assert isinstance(ref, ClassificationMetrics) and ref.f1w == 1.0
    base = quantize(model, calib, traits=EIQ_PER_TENSOR, advanced=PLAIN)
    loss = compare_metrics(ref, fn(base.qdq))["f1w"]
    assert loss > 1.0  # per-tensor INT8 flips decisions near 0.5
    res = mixed_precision(model.graph, base.params, fn, {"f1w": loss / 4}, stats=base.stats)
    assert res.met and res.kept and compare_metrics(ref, res.final)["f1w"] <= loss / 4
    assert res.to_json()["final_deltas"]["f1w"] <= loss / 4 and [w["unit"] for w in res.why] == res.kept
    placement = op_placement(model.graph, res.params)
    reasons = {f["name"]: f["why"] for f in placement["float"]}
    assert all(k in reasons and "mixed precision" in reasons[k] and "f1w<=" in reasons[k] for k in res.kept)
    with pytest.raises(QuantizationError, match="eacc"):  # a classifier is not scored in EACC
        mixed_precision(model.graph, base.params, fn, {"eacc": 0.5})
    # quantize() with a budget scores a classifier on its calibration set by default
    q = quantize(model, calib, traits=EIQ_PER_TENSOR, budget={"f1w": 0.0}, advanced=PLAIN)
    assert q.params.provenance["mixed_precision"]["met"] and q.params.provenance["mixed_precision"]["why"]


def test_units_include_inputs_of_float_ops() -> None:
    """An activation no layer reads (the input of a GRU, pooling, attention arithmetic) is a unit of its own."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from nilmc.quantization.graph import analyze
    from nilmc.quantization.mixed_precision import units

    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["input", "w"], ["h"]), helper.make_node("Tanh", ["h"], ["t"]),
                           helper.make_node("Sigmoid", ["t"], ["output"])], "u",
                          [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 4])], [w])
    m = helper.make_model(g)
    kinds = {u.name: u.kind for u in units(analyze(m))}
    assert kinds == {"MatMul_0": "layer", "output": "output", "h": "tensor", "t": "tensor"}
    assert isinstance(m, onnx.ModelProto)


def test_float_layers_drop_their_bias_correction(setup) -> None:
    """A layer kept float has no weight error to correct: its bias-corrected bias must not stay (it used to, and with every
    unit float the 'FP32' graph was off: the cloud Transformer scored 2.2 dB against FP32 instead of being exact)."""
    from dataclasses import replace

    from nilmc.quantization import _ort
    from nilmc.quantization.graph import analyze
    from nilmc.quantization.mixed_precision import raise_precision, units

    model, ds, fn, ref = setup
    base = quantize(model, ds, advanced=replace(PLAIN, bias_correction=True, only_if_better=False))
    assert base.params.adjusted  # bias correction applied unconditionally
    import onnx

    copy = onnx.ModelProto()
    copy.CopyFrom(model.graph)  # analyze names nodes in place: the fixture's graph stays as it is
    g = analyze(copy)
    p = base.params
    for u in units(g):
        p = raise_precision(p, u, "float", g, None)
    assert not p.adjusted
    x = model.contract.prepare(ds.raw_x())
    np.testing.assert_allclose(_ort.output(build_qdq_model(model.graph, p), x), _ort.output(model.graph, x), rtol=1e-5, atol=1e-5)
    full = mixed_precision(model.graph, base.params, fn, {"eacc": 0.0, "mae": 0.0}, stats=base.stats)
    assert full.met and compare_metrics(ref, full.final)["mae"] <= 0.0

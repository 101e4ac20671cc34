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

"""Coverage: one FP32 pass over the evaluation windows, then per target the share of each activation's
evaluation values outside its calibrated range; exact where it must be, deterministic, and a cause for a failed gate."""
from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import tiny_dataset, tiny_model

from nilmc.quantization.coverage import NO_CAUSE, clip_bounds, coverage, likely_causes, observe_evaluation
from nilmc.quantization.overflow import check_overflow
from nilmc.quantization.params import derive_params
from nilmc.quantization.statistics import collect_statistics, run_with_intermediates
from nilmc.quantization.traits import GENERIC_INT8


@pytest.fixture(scope="module")
def setup():
    ds = tiny_dataset()
    model = tiny_model(ds)
    x = model.contract.prepare(ds.raw_x())
    stats = collect_statistics(model.graph, x)
    params = derive_params(model.graph, stats, GENERIC_INT8)  # min-max: covers the calibration data by construction
    return model, x, stats, params


def test_calibration_data_are_covered_exactly(setup):
    model, x, stats, params = setup
    rep = coverage(observe_evaluation(model.graph, x, stats), params)
    assert rep and rep.warning() is None
    assert all(t.outside == 0.0 for t in rep.tensors)
    assert set(rep.feature_outside) == {0.0}
    assert {t.tensor for t in rep.tensors} == {t.name for t in params.by_role("activation")}


def test_shifted_evaluation_data_are_measured_and_named(setup):
    model, x, stats, params = setup
    ev = x.copy()
    ev[:, :, 3, :] += 4.0  # feature 3 moves four standard deviations up
    obs = observe_evaluation(model.graph, ev, stats, feature_names=[f"f{i}" for i in range(9)])
    rep = coverage(obs, params)
    assert not rep
    by = {t.tensor: t for t in rep.tensors}
    lo, hi = clip_bounds(params["input"])
    exact = float(np.mean((ev < lo) | (ev > hi)))
    assert by["input"].outside == pytest.approx(exact, abs=2e-3)
    # every hidden activation agrees with an exact count from the intermediates, within one histogram bin's share
    outs = {}
    for batch in run_with_intermediates(model.graph, ev):
        for n, v in batch.items():
            outs.setdefault(n, []).append(v)
    for name, t in by.items():
        v = np.concatenate(outs[name]).ravel()
        lo, hi = clip_bounds(params[name])
        assert t.outside == pytest.approx(float(np.mean((v < lo) | (v > hi))), abs=2e-3), name
    assert dict(rep.features_exceeded())["f3"] > 0.5
    text = rep.warning()
    assert "exceed the calibration coverage" in text and "input" in text and "f3" in text
    causes = rep.causes()
    assert causes[0].startswith("evaluation activations outside calibrated range on ")


def test_report_is_deterministic_json(setup):
    model, x, stats, params = setup
    ev = x * 1.5
    a = coverage(observe_evaluation(model.graph, ev, stats), params).to_json()
    b = coverage(observe_evaluation(model.graph, ev, stats), params).to_json()
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    assert a["worst"]["tensor"] in a["exceeded"] and a["warning"]


def test_threshold_and_kept_float(setup):
    model, x, stats, params = setup
    ev = x * 1.5
    obs = observe_evaluation(model.graph, ev, stats)
    assert coverage(obs, params, threshold=1.0)  # nothing can exceed 100 %
    from dataclasses import replace

    kept = coverage(obs, replace(params, keep_float=("input",)))
    assert kept.kept_float == ("input",) and "input" not in {t.tensor for t in kept.tensors}


def test_likely_causes_order(setup):
    model, x, stats, params = setup
    ev = x * 3.0
    cover = coverage(observe_evaluation(model.graph, ev, stats), params)
    overflow = check_overflow(model.graph, stats, params, GENERIC_INT8, peak_output=model.contract)
    text = likely_causes(overflow, cover)
    assert text.startswith("likely cause: ")
    structural = [f for f in overflow.findings if f.check.value in ("input_features", "output_clipping", "accumulator")]
    if not structural:
        assert "outside calibrated range" in text.split(";")[0]
    assert likely_causes(None, coverage(observe_evaluation(model.graph, x, stats), params)) == f"likely cause: {NO_CAUSE}"


def test_likely_causes_skip_tensors_the_artifact_computes_in_float(setup):
    """A DPU's CPU stage runs its ops in FP32: findings about the shared grids of their tensors are not causes."""
    model, x, stats, params = setup
    cover = coverage(observe_evaluation(model.graph, x * 3.0, stats), params)
    overflow = check_overflow(model.graph, stats, params, GENERIC_INT8, peak_output=model.contract)
    named = {f.tensor for f in overflow.findings} | {t.tensor for t in cover.exceeded()}
    assert named and likely_causes(overflow, cover) != f"likely cause: {NO_CAUSE}"
    text = likely_causes(overflow, cover, float_tensors=named)
    assert text.startswith("likely cause: ")
    assert not any(f"on {t!r}" in text or f"on {t} (" in text for t in named), text


def test_the_contract_says_which_input_axis_holds_features():
    """An (N, T) input is one feature over T steps: read from the shape alone its T positions were taken for features
    (fuzzed: a failed gate's cause named "47 feature(s)" of a one-feature model). The contract's layout decides."""
    from onnx import TensorProto, helper

    from nilmc.calibration_data.normalization import Normalization, NormalizationSpec
    from nilmc.compiler.contract import ModelContract

    def contract(layout: str, t: int, f: int) -> ModelContract:
        return ModelContract(input_shape=(t, f, 1), normalization=NormalizationSpec(Normalization.A, None), appliance="fridge", layout=layout)

    assert [contract(lay, 16, 3).input_feature_axis() for lay in ("NTF1", "N1TF", "NWC", "NCW")] == [2, 3, 2, 1]
    assert [contract(lay, 16, 1).input_feature_axis() for lay in ("NW", "NWC", "NCW", "NTF1")] == [None] * 4
    node = helper.make_node("ReduceMean", ["input"], ["output"], axes=[1], keepdims=0)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 16])],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N"])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    x = np.random.default_rng(0).normal(size=(50, 16)).astype(np.float32)
    assert collect_statistics(m, x)["input"].feature_axis == 1  # from the shape alone: 16 "features"
    assert collect_statistics(m, x, feature_axis=None)["input"].feature_axis is None

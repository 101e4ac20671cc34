"""overflow: saturation, code use, input features, accumulators, output clipping; policies."""
from __future__ import annotations

import numpy as np
import pytest

from nilmc.calibration_data.normalization import Normalization, NormalizationSpec, TargetScaling
from nilmc.compiler.contract import ModelContract
from nilmc.compiler.errors import QuantizationError
from nilmc.quantization.overflow import Check, OverflowLimits, Policy, QuantizationOverflowError, check_overflow
from nilmc.quantization.params import derive_params
from nilmc.quantization.qdq import build_qdq_model
from nilmc.quantization.statistics import collect_statistics
from nilmc.quantization.traits import DPU_POT, GENERIC_INT8, TFLITE_INT8


def test_normalized_model_is_clean(s2p_model, s2p_stats, make_windows) -> None:
    for traits in (GENERIC_INT8, TFLITE_INT8, DPU_POT):
        params = derive_params(s2p_model, s2p_stats, traits)
        report = check_overflow(s2p_model, s2p_stats, params, traits, data=make_windows(128, seed=2))
        assert report.findings == [] and report.ok and bool(report)
        assert report.checked["accumulator"] == 4 and report.checked["saturation"] == 5
        assert "output_clipping" in report.skipped


def test_accumulator_overflow_detected_at_16_bits(s2p_model, s2p_stats) -> None:
    traits = GENERIC_INT8.with_(accumulator_bits=16)
    params = derive_params(s2p_model, s2p_stats, traits)
    report = check_overflow(s2p_model, s2p_stats, params, traits)
    found = report.by_check(Check.ACCUMULATOR)
    assert {f.layer for f in found} == {"conv1", "conv2", "dense1", "dense2"}
    dense1 = next(f for f in found if f.layer == "dense1")
    assert dense1.limit == 32767 and dense1.value > 32767 and dense1.tensor == "r3"
    # the bound is sum|w_q| * max|x_q - z| + |b_q| for the worst channel; recompute it by hand
    w = params.tensors["dense1/W"]
    from nilmc.quantization.graph import constants
    from nilmc.quantization.params import quantize_constant

    codes = quantize_constant(w, constants(s2p_model)["dense1/W"], traits).astype(np.int64)
    b = constants(s2p_model)["dense1/b"] / (np.float32(params["r2"].scale[0]) * w.scales().astype(np.float64))
    bound = np.abs(codes).sum(axis=0) * 255 + np.abs(np.rint(b))
    assert dense1.value == bound.max() and dense1.channel == int(np.argmax(bound))
    assert not report.ok
    with pytest.raises(QuantizationOverflowError) as err:
        check_overflow(s2p_model, s2p_stats, params, traits, policy="error")
    assert len(err.value.report.by_check("accumulator")) == 4 and isinstance(err.value, QuantizationError)
    # 32-bit accumulators hold the same layers
    assert not check_overflow(s2p_model, s2p_stats, derive_params(s2p_model, s2p_stats, GENERIC_INT8), GENERIC_INT8).findings


def test_raw_watt_inputs_saturate_named_tensors(s2p_model, s2p_stats, make_windows) -> None:
    raw = make_windows(128, seed=3, scale=800.0, offset=1500.0)  # unnormalized: values in the thousands
    params = derive_params(s2p_model, s2p_stats, GENERIC_INT8)
    report = check_overflow(s2p_model, s2p_stats, params, GENERIC_INT8, data=raw)
    sat = {f.tensor: f for f in report.by_check(Check.SATURATION)}
    assert {"input", "r1", "r2", "r3", "output"} <= set(sat)
    assert sat["input"].value > 0.99 and sat["input"].limit == 1e-3 and sat["input"].policy is Policy.WARN
    assert "observed" in sat["input"].reason and not any(f.fixed for f in report.findings)
    # policy fix widens the ranges; the fixed parameters then pass on the same data
    fixed = check_overflow(s2p_model, s2p_stats, params, GENERIC_INT8, data=raw, policy="fix")
    assert all(f.fixed for f in fixed.by_check(Check.SATURATION)) and fixed.ok
    assert fixed.params["input"].representable()[1] >= raw.max() - fixed.params["input"].scale[0]
    assert not check_overflow(s2p_model, s2p_stats, fixed.params, GENERIC_INT8, data=raw).by_check(Check.SATURATION)
    # biases were re-derived for the widened input scales
    s_in, s_w = fixed.params["input"].scale[0], fixed.params.tensors["conv1/W"].scales()
    assert np.array_equal(fixed.params.tensors["conv1/b"].scales(), np.float32(s_in) * s_w)


def test_unnormalized_features_flag_the_input(s2p_model, make_windows) -> None:
    x = make_windows(256, seed=4)
    x[:, :, 0] = x[:, :, 0] * 3000.0 + 5000.0  # e.g. a variance in W^2 next to a kurtosis ~3
    x[:, :, 1] = x[:, :, 1] * 200.0 + 500.0
    stats = collect_statistics(s2p_model, x)
    params = derive_params(s2p_model, stats, TFLITE_INT8)
    report = check_overflow(s2p_model, stats, params, TFLITE_INT8)
    found = report.by_check(Check.INPUT_FEATURES)
    assert len(found) == 1 and found[0].tensor == "input" and found[0].channel not in (0, 1)
    assert found[0].value < 16 and "7 of 9" in found[0].reason
    with pytest.raises(QuantizationOverflowError, match="input_features"):
        check_overflow(s2p_model, stats, params, TFLITE_INT8, policy={"input_features": "error"})


def test_output_clipping_against_contract_peak(s2p_model, s2p_stats, make_windows, run_model) -> None:
    contract = ModelContract(input_shape=(10, 9, 1), normalization=NormalizationSpec(Normalization.A), appliance="kettle",
                             target=TargetScaling(mean=700.0, std=1000.0), peak_power_w=3000.0)
    params = derive_params(s2p_model, s2p_stats, TFLITE_INT8)
    report = check_overflow(s2p_model, s2p_stats, params, TFLITE_INT8, peak_output=contract)
    (f,) = report.by_check(Check.OUTPUT_CLIPPING)
    assert f.tensor == "output" and f.limit == pytest.approx(2.3) and f.value < 2.3 and "3000 W" in f.reason
    fixed = check_overflow(s2p_model, s2p_stats, params, TFLITE_INT8, peak_output=contract, policy={"output_clipping": "fix"})
    lo, hi = fixed.params["output"].representable()
    assert hi >= 2.3 and lo <= -0.7 and fixed.ok  # 0 W .. 3000 W after de-normalization
    # a head that can now represent the peak still tracks FP32
    x = make_windows(64, seed=2)
    got = run_model(build_qdq_model(s2p_model, fixed.params), x)
    assert np.abs(got - run_model(s2p_model, x)).max() < 0.15
    assert not check_overflow(s2p_model, s2p_stats, params, TFLITE_INT8, peak_output=1.0).findings


def test_range_use_and_int16_fix(s2p_model, s2p_stats, make_windows) -> None:
    tiny = make_windows(128, seed=2) * 1e-3  # data far inside the calibrated ranges
    params = derive_params(s2p_model, s2p_stats, TFLITE_INT8)
    report = check_overflow(s2p_model, s2p_stats, params, TFLITE_INT8, data=tiny, policy="fix")
    use = {f.tensor: f for f in report.by_check(Check.RANGE_USE)}
    assert "input" in use and use["input"].value < 1 / 16 and not use["input"].fixed  # int16 not allowed: no fix
    traits16 = TFLITE_INT8.with_(allow_int16_activations=True)
    params16 = derive_params(s2p_model, s2p_stats, traits16)
    fixed = check_overflow(s2p_model, s2p_stats, params16, traits16, data=tiny, policy="fix")
    assert fixed.params["input"].range_name == "int16" and fixed.by_check(Check.RANGE_USE)[0].fixed


def test_dpu_shift_range(s2p_model, s2p_stats) -> None:
    params = derive_params(s2p_model, s2p_stats, DPU_POT)
    narrow = DPU_POT.with_(requant_shift_range=(0, 3))
    report = check_overflow(s2p_model, s2p_stats, params, narrow)
    found = report.by_check(Check.REQUANT_SHIFT)
    assert found and all(f.value > 3 and f.limit == 3 for f in found)
    fw = params.tensors["conv1/W"].fix_position[0]
    shift = fw + params["input"].fix_position[0] - params["r1"].fix_position[0]
    assert 0 <= shift <= 16


def test_policy_validation_and_report_json(s2p_model, s2p_stats) -> None:
    params = derive_params(s2p_model, s2p_stats, GENERIC_INT8)
    with pytest.raises(QuantizationError, match="unknown overflow checks"):
        check_overflow(s2p_model, s2p_stats, params, GENERIC_INT8, policy={"overflowz": "warn"})
    with pytest.raises(QuantizationError, match="policy"):
        check_overflow(s2p_model, s2p_stats, params, GENERIC_INT8, policy="ignore")
    traits = GENERIC_INT8.with_(accumulator_bits=16)
    report = check_overflow(s2p_model, s2p_stats, derive_params(s2p_model, s2p_stats, traits), traits,
                            limits=OverflowLimits(max_saturation=0.5))
    d = report.to_json()
    assert d["ok"] is False and d["findings"][0]["check"] == "accumulator" and d["findings"][0]["policy"] == "warn"
    assert "accumulator" in report.summary()


def test_tensors_kept_float_are_no_finding_and_no_error(s2p_model, s2p_stats, make_windows) -> None:
    # a tensor the SQNR floor keeps at FP32 is on no grid in the artifact: its "saturation" was the stale cause of a
    # failed CtRNN gate, and under --overflow error it must not stop the build
    import dataclasses

    raw = make_windows(128, seed=3, scale=800.0, offset=1500.0)
    params = derive_params(s2p_model, s2p_stats, GENERIC_INT8)
    saturating = {f.tensor for f in check_overflow(s2p_model, s2p_stats, params, GENERIC_INT8, data=raw).by_check(Check.SATURATION)}
    assert {"input", "r2", "output"} <= saturating
    report = check_overflow(s2p_model, s2p_stats, dataclasses.replace(params, keep_float=("r2",)), GENERIC_INT8, data=raw)
    assert "r2" not in {f.tensor for f in report.findings} and "input" in {f.tensor for f in report.findings}
    assert "r2" in report.skipped["kept_float"]
    all_float = dataclasses.replace(params, keep_float=tuple(sorted(saturating)))
    strict = check_overflow(s2p_model, s2p_stats, all_float, GENERIC_INT8, data=raw, policy={"default": "warn", "saturation": "error"})
    assert not strict.by_check(Check.SATURATION)
    with pytest.raises(QuantizationOverflowError):
        check_overflow(s2p_model, s2p_stats, params, GENERIC_INT8, data=raw, policy={"default": "warn", "saturation": "error"})


def test_a_constant_tensor_is_no_range_use_finding(s2p_model, s2p_stats, make_windows) -> None:
    # a recurrent layer's zero initial state is a quantization point that holds one value: "1 of 256 codes" about it
    # was a finding (and the CtRNN's failure cause) that says nothing
    params = derive_params(s2p_model, s2p_stats, GENERIC_INT8)
    x = make_windows(16, seed=1)
    flat = np.zeros_like(x)
    assert "input" not in {f.tensor for f in check_overflow(s2p_model, s2p_stats, params, GENERIC_INT8, data=flat).by_check(Check.RANGE_USE)}
    squeezed = x * 1e-4  # not constant, spans a sliver of the input grid: still a finding
    assert "input" in {f.tensor for f in check_overflow(s2p_model, s2p_stats, params, GENERIC_INT8, data=squeezed).by_check(Check.RANGE_USE)}

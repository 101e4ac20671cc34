"""normalization_check: raw watts fed to a z-score model are caught; an unnormalized (A) model is flagged
with its tensors named while the same function on normalized input (C) passes."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from helpers import tiny_dataset, tiny_model

from nilmc.calibration_data.normalization import Normalization, NormalizationSpec
from nilmc.compiler.errors import NormalizationError
from nilmc.compiler.model import Model
from nilmc.quantization.api import Techniques, quantize
from nilmc.quantization.fold import fold_normalization
from nilmc.quantization.normalization_check import NormalizationLimits, check_normalization
from nilmc.quantization.overflow import QuantizationOverflowError

FAST = Techniques(select_estimators=False, headroom=False, bias_correction=False, precise_input=False,
                  min_calib_sqnr=None)  # the INT8-input findings, unrepaired


@pytest.fixture(scope="module")
def tp():
    """Real T-P features (raw watts, variance in W^2 next to a skewness ~1) and the same MLP for C and A."""
    from nilmc.calibration_data.windows import build_splits

    sp = build_splits("T-P", appliances=("kettle",), n_train=1500, n_calib=400, n_eval=300, splits=("train", "calib", "eval"))
    c_model = tiny_model(sp["train"], hidden=32)
    # the same function taking raw features: the normalization folded into the first layer's weights,
    # i.e. what a network trained on raw features (normalization A) has to compute
    folded = fold_normalization(c_model, input_mode="weights", output_mode="skip", verify_x=sp["calib"].raw_x())
    assert folded.model.contract.normalization.kind is Normalization.A and not folded.model.contract.folded
    a_model = Model(folded.model.graph, folded.model.contract, source="tiny-A")
    return sp, c_model, a_model


def test_matching_data_pass(tiny, tiny_ds) -> None:
    report = check_normalization(tiny.contract, tiny.contract.prepare(tiny_ds.raw_x()))
    assert report.ok and report.diagnosis == "ok" and len(report.features) == 9
    # an evaluation draw of the same distribution passes too
    assert check_normalization(tiny.contract, tiny.contract.prepare(tiny_dataset(300, seed=7).raw_x()))


def test_raw_watts_to_zscore_model_raise(tp) -> None:
    sp, c_model, _ = tp
    raw = sp["calib"].raw_x()
    with pytest.raises(NormalizationError) as err:
        check_normalization(c_model.contract, raw)
    msg = str(err.value)
    assert "P.T.var" in msg and "expected" in msg and "normalization C" in msg
    assert "raw (unnormalized)" in err.value.remedy
    report = check_normalization(c_model.contract, raw, policy="warn")
    assert not report and report.diagnosis == "raw"
    var = next(f for f in report.features if f.name == "P.T.var")
    assert var.mean > 1e4 and abs(var.expected_mean) < 1e-6 and var.problems
    # the same windows, normalized by the contract, pass
    assert check_normalization(c_model.contract, c_model.contract.prepare(raw))


def test_normalized_twice_and_mismatch(tp) -> None:
    sp, c_model, _ = tp
    spec = c_model.contract.normalization
    twice = spec.apply(spec.apply(sp["calib"].raw_x()))
    assert check_normalization(c_model.contract, twice, policy="warn").diagnosis == "normalized_twice"
    raw_kw = sp["calib"].raw_x().copy()
    raw_kw[:, :, :7] *= 1e-3  # power features in kW, normalized with statistics in W
    kilowatts = c_model.contract.prepare(raw_kw)
    report = check_normalization(c_model.contract, kilowatts, policy="warn")
    assert report.diagnosis == "mismatch" and {"P.T.var", "P.T.max"} <= {f.name for f in report.bad}
    assert "P.T.skewness" not in {f.name for f in report.bad}  # unit-free features are unaffected
    # a z-scored feature permutation is invisible to moments (all mean 0, std 1): a documented limit, not a pass claim
    permuted = np.ascontiguousarray(c_model.contract.prepare(sp["calib"].raw_x())[:, :, ::-1])
    assert check_normalization(c_model.contract, permuted, policy="warn").diagnosis in ("ok", "mismatch")


def test_limits_and_unchecked(tiny, tiny_ds) -> None:
    x = tiny.contract.prepare(tiny_ds.raw_x()) + 1.5  # shifted by 1.5 training std
    assert check_normalization(tiny.contract, x)
    with pytest.raises(NormalizationError, match="mean"):
        check_normalization(tiny.contract, x, limits=NormalizationLimits(max_mean_sigmas=1.0, max_outside=1.0))
    a = tiny.contract.with_(normalization=NormalizationSpec(Normalization.A))
    report = check_normalization(a, tiny_ds.raw_x())
    assert report.diagnosis == "unchecked" and report.ok and "not checked" in report.summary()


def test_folded_contract_expects_raw(tp) -> None:
    sp, c_model, _ = tp
    folded = fold_normalization(c_model).model
    assert check_normalization(folded.contract, sp["calib"].raw_x())
    with pytest.raises(NormalizationError):
        check_normalization(folded.contract, c_model.contract.prepare(sp["calib"].raw_x()))
    # quantizing the folded model: the raw T-P input (seven decades) stays FP32, the normalized tensor is quantized,
    # so the starved-input finding of the raw tensor does not apply and is dropped (and says so)
    res = quantize(c_model, sp["calib"], advanced=FAST, fold_normalization=True, overflow_policy="error")
    assert res.feature_scales.ok and not res.overflow.by_check("input_features")
    assert "input" in res.overflow.skipped["kept_float"] and res.report()["output_sqnr_db"] > 15


def test_unnormalized_model_is_flagged_normalized_passes(tp) -> None:
    sp, c_model, a_model = tp
    a = quantize(a_model, sp["calib"], advanced=FAST)
    c = quantize(c_model, sp["calib"], advanced=FAST)
    assert c.feature_scales.ok and c.feature_scales.tensors == []
    fs = a.feature_scales
    assert not fs and fs.decades > 5
    assert fs.tensors[0] == "input" and any("MatMul" in t for t in fs.tensors[1:])  # the first layer reading it
    lost = " ".join(fs.lost)
    assert "P.T.skewness" in lost and "P.T.kurtosis" in lost and "P.T.var" not in lost
    assert a.overflow.by_check("input_features") and not c.overflow.by_check("input_features")
    # the consequence, measured on the calibration windows: the same function loses its output in INT8 when A
    assert a.report()["output_sqnr_db"] < 10 and c.report()["output_sqnr_db"] > a.report()["output_sqnr_db"] + 10
    with pytest.raises(QuantizationOverflowError, match="input_features"):
        quantize(a_model, sp["calib"], advanced=FAST, overflow_policy={"input_features": "error"})


def test_policy_fix_rescales_the_input_exactly(tp) -> None:
    """--overflow fix on a raw-scale model: a per-feature input rescaling stage (float pre-processing) with its inverse
    folded into the first layer, instead of keeping that layer at float (the fallback when no exact fold exists)."""
    sp, _, a_model = tp
    fixed = quantize(a_model, sp["calib"], advanced=FAST, overflow_policy="fix")
    assert fixed.params.keep_float == () and "input rescaling applied" in fixed.notes[0]
    starved = quantize(a_model, sp["calib"], advanced=FAST).report()["output_sqnr_db"]
    assert fixed.report()["output_sqnr_db"] > starved + 10


def test_unnormalized_model_is_repaired_by_the_calibration_sqnr_floor(tp) -> None:
    """The same raw-feature model with the SQNR floor on (the default where any layer may run float): units are kept
    float, greedily, until the calibration output SQNR reaches the floor; the record says which and what each gained."""
    sp, _, a_model = tp
    plain = quantize(a_model, sp["calib"], advanced=FAST)
    fixed = quantize(a_model, sp["calib"], advanced=replace(FAST, min_calib_sqnr=35.0))
    rec = fixed.params.provenance["sqnr_fallback"]
    assert rec["kept"] and all(g > 0 for g in rec["gains_db"].values()) and rec["initial_db"] < 35.0
    assert set(rec["kept"]) <= set(fixed.params.keep_float)
    assert fixed.report()["output_sqnr_db"] > plain.report()["output_sqnr_db"] + 10
    from nilmc.quantization.placement import op_placement

    whys = {f["name"]: f["why"] for f in op_placement(a_model.graph, fixed.params)["float"]}
    assert all(whys[name].startswith("calibration SQNR floor") for name in rec["kept"])  # the manifest says why

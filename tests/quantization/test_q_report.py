"""report: per-layer table (scale, zero point, saturation, code use, accumulator headroom, SQNR) as JSON and text;
the quantize() pipeline and QuantContext defaults."""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from nilmc.quantization import _ort
from nilmc.quantization.api import Techniques, quantize
from nilmc.quantization.context import QuantContext
from nilmc.quantization.overflow import Check, check_overflow
from nilmc.quantization.params import QuantParams, derive_params
from nilmc.quantization.report import format_report, layer_table, quantize_report
from nilmc.quantization.traits import GENERIC_INT8, TENSORRT_INT8, TFLITE_INT8


@pytest.fixture(scope="module")
def result(tiny, tiny_ds):
    return quantize(tiny, tiny_ds, advanced=Techniques(precise_input=False))  # every tensor INT8, the input included


def test_precise_input_keeps_the_first_layer_float_and_widens_the_rest(tiny, tiny_ds) -> None:
    plain = dict(select_estimators=False, bias_correction=False)
    off = quantize(tiny, tiny_ds, advanced=Techniques(precise_input=False, **plain)).params
    on = quantize(tiny, tiny_ds, advanced=Techniques(**plain)).params
    first = "MatMul_1"
    assert first in on.keep_float and first not in off.keep_float
    assert on.provenance["precise_input"] == {"float_layers": [first], "deployment_headroom": 1.5, "task": "regression"}
    assert on["r1"].hi[0] == pytest.approx(1.5 * off["r1"].hi[0])  # the headroom, on every range but the output's
    assert on["output"].lo[0] == pytest.approx(off["output"].lo[0]) and on["output"].hi[0] == pytest.approx(off["output"].hi[0])
    # symmetric grids (TensorRT) under symmetric_ranges="global" take their own headroom (default 1.0: none); the default
    # per-tensor rule is tests/quantization/test_q_symmetric_ranges.py's
    trt_off = quantize(tiny, tiny_ds, traits=TENSORRT_INT8, advanced=Techniques(precise_input=False, **plain)).params
    trt = quantize(tiny, tiny_ds, traits=TENSORRT_INT8, advanced=Techniques(symmetric_ranges="global", **plain)).params
    assert trt.provenance["precise_input"]["deployment_headroom"] == 1.0 and trt["r1"].hi[0] == pytest.approx(trt_off["r1"].hi[0])
    trt = quantize(tiny, tiny_ds, traits=TENSORRT_INT8, advanced=Techniques(symmetric_ranges="global", symmetric_headroom=1.25, **plain)).params
    assert trt["r1"].hi[0] == pytest.approx(1.25 * trt_off["r1"].hi[0])
    # 16-bit grids (tflite:int16x8): resolution to spare, so the wider headroom (default 2.0) against clipping
    from nilmc.quantization.traits import TFLITE_INT16X8_FLOAT_INPUT as T16

    w_off = quantize(tiny, tiny_ds, traits=T16, advanced=Techniques(precise_input=False, **plain)).params
    w = quantize(tiny, tiny_ds, traits=T16, advanced=Techniques(**plain)).params
    assert w.provenance["precise_input"]["deployment_headroom"] == 2.0 and w["r1"].hi[0] == pytest.approx(2.0 * w_off["r1"].hi[0])
    # an ON/OFF classifier: no headroom on 8-bit grids (clipping a saturating high-power window does not change its class)
    from dataclasses import replace as dc_replace

    from nilmc.compiler.model import Model

    clf = Model(tiny.graph, dc_replace(tiny.contract, task="binary"), source="tiny as a binary classifier")
    c_off = quantize(clf, tiny_ds, advanced=Techniques(precise_input=False, **plain)).params
    c = quantize(clf, tiny_ds, advanced=Techniques(**plain)).params
    assert c.provenance["precise_input"] == {"float_layers": [first], "deployment_headroom": 1.0, "task": "binary"}
    assert c["r1"].hi[0] == pytest.approx(c_off["r1"].hi[0])
    # traits without float layers (full-integer targets) are left as they were
    tfl = quantize(tiny, tiny_ds, traits=TFLITE_INT8, advanced=Techniques(**plain)).params
    assert not tfl.keep_float and "precise_input" not in tfl.provenance


def test_report_json_and_values(result) -> None:
    d = quantize_report(result)
    json.dumps(d, allow_nan=False)  # strictly JSON
    rows = {r["tensor"]: r for r in d["layers"]}
    assert list(rows) == ["input", "r1", "output"]
    assert rows["r1"]["producer"] == "MatMul_1" and rows["input"]["producer"] == "input"
    p = result.params
    for name, r in rows.items():
        assert r["scale"] == pytest.approx(p[name].scale[0]) and r["zero_point"] == p[name].zero_point[0]
        assert r["saturation"] < 1e-3 and 0.0 < r["code_use"] <= 1.0 and r["sqnr_db"] > 20  # clipping estimators may clip a little
    assert rows["r1"]["weight_scale"][0] <= rows["r1"]["weight_scale"][1] and rows["input"]["weight_scale"] is None
    assert 0 < rows["r1"]["acc_headroom_bits"] < 31
    # the output SQNR equals a direct measurement on the calibration windows
    x = _ort.subsample(result.calib_x, 512)
    assert d["output_sqnr_db"] == pytest.approx(_ort.sqnr_db(_ort.output(result.model.graph, x), _ort.output(result.qdq, x)))
    assert rows["output"]["sqnr_db"] == pytest.approx(d["output_sqnr_db"])
    assert d["calibration"]["windows"] == 400 and d["calibration"]["seconds"] > 0
    assert d["selection"] and d["headroom"] is None and d["normalization"]["ok"]  # headroom search is off by default


def test_text_table(result) -> None:
    text = format_report(result)
    assert "SQNR dB" in text and "acc bits" in text and "generic_int8" in text
    lines = text.splitlines()
    assert any(l.startswith("r1 ") for l in lines) and any(l.startswith("output ") for l in lines)
    assert "overflow checks" in text and "normalization check: ok" in text


def test_accumulator_headroom_matches_overflow_bound(s2p_model, s2p_stats, calib) -> None:
    traits = GENERIC_INT8.with_(accumulator_bits=16)
    params = derive_params(s2p_model, s2p_stats, traits)
    rows = {r.tensor: r for r in layer_table(s2p_model, params, calib)}
    finding = next(f for f in check_overflow(s2p_model, s2p_stats, params, traits).by_check(Check.ACCUMULATOR) if f.layer == "dense1")
    assert rows["r3"].acc_bound == finding.value
    assert rows["r3"].acc_headroom_bits == pytest.approx(math.log2(32767 / finding.value)) and rows["r3"].acc_headroom_bits < 0
    wide = {r.tensor: r for r in layer_table(s2p_model, derive_params(s2p_model, s2p_stats, GENERIC_INT8), calib)}
    assert wide["r3"].acc_headroom_bits == pytest.approx(rows["r3"].acc_headroom_bits + 16, abs=1e-3)  # (2^31-1)/(2^15-1)


def test_saturation_and_float_rows(s2p_model, s2p_stats, make_windows) -> None:
    params = derive_params(s2p_model, s2p_stats, GENERIC_INT8)
    loud = make_windows(128, seed=3, scale=3.0)  # three times the calibrated spread
    rows = {r.tensor: r for r in layer_table(s2p_model, params, loud)}
    usual = {r.tensor: r for r in layer_table(s2p_model, params, make_windows(128, seed=2))}
    assert rows["input"].saturation > 0.01 and usual["input"].saturation < 1e-3
    assert rows["input"].sqnr_db < usual["input"].sqnr_db - 10
    kept = dataclasses.replace(params, keep_float=("dense1",))
    rows = {r.tensor: r for r in layer_table(s2p_model, kept, loud)}
    assert rows["r2"].dtype == "float" and rows["r2"].scale is None and rows["r3"].weight_scale is None


def test_pipeline_beats_plain_minmax(tiny, tiny_ds, tiny_eval) -> None:
    plain = quantize(tiny, tiny_ds, estimator="minmax", advanced=Techniques.plain())
    auto = quantize(tiny, tiny_ds)
    x = tiny.contract.prepare(tiny_eval.raw_x())
    ref = _ort.output(tiny.graph, x)
    assert _ort.sqnr_db(ref, _ort.output(auto.qdq, x)) >= _ort.sqnr_db(ref, _ort.output(plain.qdq, x)) - 0.5
    assert auto.params["output"].representable()[1] >= tiny.contract.target.from_watts(np.array([tiny.contract.peak_power_w]))[0]
    assert set(auto.timings) >= {"statistics", "selection", "bias_correction", "total"} and "headroom" not in auto.timings


def test_context_uses_techniques_by_default(tiny, tiny_ds, tmp_path) -> None:
    ctx = QuantContext(tiny, tiny_ds)
    params = ctx.params(GENERIC_INT8)
    assert {"selection", "techniques"} <= set(params.provenance) and params.provenance["techniques"]["headroom"] is False
    assert ctx.normalization_report.ok and ctx.calibration_s >= ctx.statistics_s > 0
    plain = ctx.params(GENERIC_INT8, estimator="minmax")
    assert plain.provenance == {} and plain is ctx.params(GENERIC_INT8, estimator="minmax")
    off = QuantContext(tiny, tiny_ds, techniques=Techniques.plain()).params(GENERIC_INT8)
    assert "selection" not in off.provenance and off.adjusted == {}
    back = QuantParams.from_json(json.loads(params.dumps()))
    assert back.provenance == json.loads(json.dumps(params.provenance)) and back.keep_float == params.keep_float


def test_result_save(result, tmp_path) -> None:
    files = result.save(tmp_path / "q")
    assert {p.name for p in files.values()} == {"model_qdq.onnx", "params.json", "report.json"}
    assert json.loads(files["report"].read_text())["layers"]
    from nilmc.compiler.frontend import load_model

    assert load_model(files["qdq"]).contract.to_json() == result.model.contract.to_json()

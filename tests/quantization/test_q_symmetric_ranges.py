"""symmetric_ranges: per-tensor deployment coverage on symmetric grids (TensorRT), the calibration SQNR floor that
gives resolution back, 0 W on an output code; and ptq_params applying them under precise input."""
from __future__ import annotations

import math

import numpy as np
import pytest

from nilmc.compiler.errors import QuantizationError
from nilmc.quantization import _ort
from nilmc.quantization.api import Techniques, quantize
from nilmc.quantization.params import derive_params
from nilmc.quantization.qdq import build_qdq_model
from nilmc.quantization.symmetric_ranges import deployment_ranges, zero_watts_on_code
from nilmc.quantization.traits import GENERIC_INT8, TENSORRT_INT8


def test_ranges_cover_the_calibration_extremes_then_the_headroom(s2p_model, s2p_stats, calib) -> None:
    clipped = derive_params(s2p_model, s2p_stats, TENSORRT_INT8, estimator="percentile")
    assert clipped["r1"].hi[0] < s2p_stats["r1"].maximum  # the estimator cut the calibration tail
    out, rec = deployment_ranges(clipped, s2p_model, s2p_stats, calib, headroom=1.5, exclude=["input"])
    assert out["r1"].hi[0] == pytest.approx(1.5 * s2p_stats["r1"].maximum)
    assert out["r1"].scale[0] == pytest.approx(1.5 * s2p_stats["r1"].maximum / 127, rel=1e-6) and out["r1"].zero_point == (0,)
    assert out["input"] == clipped["input"] and out["output"] == clipped["output"]  # excluded; outputs keep the physical range
    # the int32 bias scale follows the new input scale of the layer reading r1
    assert np.array_equal(out.tensors["conv2/b"].scales(), np.float32(out["r1"].scale[0]) * out.tensors["conv2/W"].scales())
    by = {d.tensor: d for d in rec.decisions}
    assert set(by) == {"r1", "r2", "r3"}  # every activation but the excluded input and the output
    assert "clipped the calibration extremes" in by["r1"].why and by["r1"].headroom == 1.5
    assert rec.to_json()["tensors"][0]["estimator"] == "percentile" and not rec.returned
    with pytest.raises(QuantizationError, match="headroom must be >= 1"):
        deployment_ranges(clipped, s2p_model, s2p_stats, calib, headroom=0.5)


def test_covering_beats_the_estimator_range_when_deployment_reaches_further(s2p_model, s2p_stats, calib, make_windows) -> None:
    deploy = make_windows(256, seed=5, scale=1.6)  # deployment beyond the calibration windows' extremes
    old = derive_params(s2p_model, s2p_stats, TENSORRT_INT8, estimator="percentile")
    new, _ = deployment_ranges(old, s2p_model, s2p_stats, calib, headroom=1.5, exclude=["input"])
    ref = _ort.output(s2p_model, deploy)

    def sqnr(p):
        return _ort.sqnr_db(ref, _ort.output(build_qdq_model(s2p_model, p), deploy))

    assert sqnr(new) > sqnr(old) + 1.0


def test_a_resolution_bound_model_keeps_every_estimator_range(s2p_model, s2p_stats, calib) -> None:
    base = derive_params(s2p_model, s2p_stats, TENSORRT_INT8)
    free, rec0 = deployment_ranges(base, s2p_model, s2p_stats, calib, headroom=4.0, exclude=["input"], min_sqnr_db=0.0)
    assert not rec0.returned and rec0.calib_sqnr_db["final"] == rec0.calib_sqnr_db["coverage"]
    assert free["r1"].hi[0] == pytest.approx(4.0 * base["r1"].hi[0])
    out, rec = deployment_ranges(base, s2p_model, s2p_stats, calib, headroom=4.0, exclude=["input"], min_sqnr_db=200.0)
    # an unreachable floor: the covering ranges miss it, so all of them go back (never a per-tensor mix)
    assert rec.returned == [d.tensor for d in rec.decisions] and rec.returned
    assert rec.calib_sqnr_db["final"] == rec.calib_sqnr_db["estimator"]
    assert out.dumps() == base.dumps()
    assert all(d.headroom == 1.0 and "resolution-bound" in d.why for d in rec.decisions)
    again, rec2 = deployment_ranges(base, s2p_model, s2p_stats, calib, headroom=4.0, exclude=["input"], min_sqnr_db=200.0)
    assert rec2.returned == rec.returned and again.dumps() == out.dumps()  # deterministic


def test_zero_watts_on_an_output_code(s2p_model, s2p_stats) -> None:
    base = derive_params(s2p_model, s2p_stats, TENSORRT_INT8)
    zero = -0.3861616551876068  # 0 W of a z-scored target: not a multiple of the output scale
    assert abs(zero / base["output"].scale[0] - round(zero / base["output"].scale[0])) > 1e-3
    out, rec = zero_watts_on_code(base, s2p_model, zero)
    s = out["output"].scale[0]
    k = rec["output"]["codes_to_zero_watts"]
    assert s >= base["output"].scale[0] and abs(zero) / s == pytest.approx(k, abs=1e-5) and out["output"].zero_point == (0,)
    assert out["output"].representable()[1] >= base["output"].representable()[1]
    assert zero_watts_on_code(base, s2p_model, 0.0)[0] is base  # 0.0 is a code already
    generic = derive_params(s2p_model, s2p_stats, GENERIC_INT8)
    assert zero_watts_on_code(generic, s2p_model, zero)[0] is generic  # asymmetric grids: api.fit_output_range does it
    assert math.isclose(out["r1"].scale[0], base["r1"].scale[0])


def test_ptq_params_applies_the_rule_on_tensorrt(tiny, tiny_ds) -> None:
    plain = dict(select_estimators=False, bias_correction=False)
    off = quantize(tiny, tiny_ds, traits=TENSORRT_INT8, advanced=Techniques(precise_input=False, **plain))
    on = quantize(tiny, tiny_ds, traits=TENSORRT_INT8, advanced=Techniques(**plain))
    prov = on.params.provenance["precise_input"]
    # the coverage asymmetric grids get (the rule before gave symmetric grids none: deployment_headroom 1.0)
    assert prov["deployment_headroom"] == 1.5
    rule = prov["symmetric_ranges"]
    assert rule["headroom"] == 1.5 and rule["min_calib_sqnr_db"] == 30.0 and rule["tensors"]
    assert {d["tensor"] for d in rule["tensors"]} >= {"r1"}
    assert on.params["r1"].hi[0] == pytest.approx(1.5 * max(off.params["r1"].hi[0], on.stats["r1"].maximum))
    assert rule["calib_sqnr_db"]["final"] >= 30.0 or rule["returned"]
    # the rule before, still reachable
    before = quantize(tiny, tiny_ds, traits=TENSORRT_INT8, advanced=Techniques(symmetric_ranges="global", **plain)).params
    assert before.provenance["precise_input"]["deployment_headroom"] == 1.0 and "symmetric_ranges" not in before.provenance["precise_input"]
    assert before["r1"].hi[0] == pytest.approx(off.params["r1"].hi[0])
    # asymmetric grids are untouched by it
    g = quantize(tiny, tiny_ds, advanced=Techniques(**plain)).params
    assert "symmetric_ranges" not in g.provenance["precise_input"]
    with pytest.raises(QuantizationError, match="unknown symmetric_ranges rule"):
        Techniques(symmetric_ranges="tail")

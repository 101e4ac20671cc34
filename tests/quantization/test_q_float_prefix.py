"""The float prefix a precise-input TFLite/eIQ graph can give the calibration SQNR floor (mixed_precision.grow_float_prefix):
the next weighted layers in graph order float, each step measured, until the floor holds or too few MACs stay INT8."""
from __future__ import annotations

import pytest

from nilmc.quantization.api import with_precise_input
from nilmc.quantization.mixed_precision import BACK_SEARCH_MIN_INT8_SHARE, calibration_sqnr_db, grow_float_prefix
from nilmc.quantization.params import derive_params
from nilmc.quantization.traits import TFLITE_INT8_FLOAT_INPUT


@pytest.fixture
def precise(s2p_model, s2p_stats):
    """The test CNN's tflite:int8 parameters: conv1 (reading the input) float, the rest INT8."""
    params = with_precise_input(derive_params(s2p_model, s2p_stats, TFLITE_INT8_FLOAT_INPUT, estimator="minmax"), s2p_model)
    assert params.keep_float == ("conv1",)
    return params


def test_the_prefix_grows_until_the_floor_holds_and_is_recorded(s2p_model, precise, calib) -> None:
    start = calibration_sqnr_db(s2p_model, precise, calib)
    res = grow_float_prefix(s2p_model, precise, calib, start + 1.0)
    # measured: conv1 float 32.6 dB; conv1-2 float 33.8 dB, with 29.5 % of the MACs (the dense layers) still INT8
    assert res.met and list(res.layers) == ["conv2"] and "calibration SQNR floor" in res.layers["conv2"]
    assert res.params.keep_float == ("conv1", "conv2")
    assert [s["through"] for s in res.steps] == ["conv1", "conv2"]
    assert res.steps[0]["sqnr_db"] == pytest.approx(start, abs=1e-3) and res.steps[1]["sqnr_db"] >= start + 1.0
    assert calibration_sqnr_db(s2p_model, res.params, calib) == pytest.approx(res.steps[1]["sqnr_db"], abs=1e-3)
    assert res.params.provenance["float_prefix"] == res.to_json() and res.to_json()["met"]
    again = grow_float_prefix(s2p_model, precise, calib, start + 1.0)  # deterministic
    assert again.to_json() == res.to_json() and again.params.keep_float == res.params.keep_float


def test_it_stops_before_the_int8_macs_fall_under_the_share_and_keeps_the_best(s2p_model, precise, calib) -> None:
    res = grow_float_prefix(s2p_model, precise, calib, 200.0)  # unreachable
    assert not res.met and "dense1" in res.stop and f"under {100 * BACK_SEARCH_MIN_INT8_SHARE:.0f} %" in res.stop
    assert list(res.layers) == ["conv2"]  # it raised the SQNR: the best measured placement is taken
    assert all(s["int8_macs_share"] >= BACK_SEARCH_MIN_INT8_SHARE for s in res.steps)
    none_left = grow_float_prefix(s2p_model, precise, calib, 200.0, min_int8_share=0.99)
    assert not none_left.layers and none_left.params is precise and "conv2" in none_left.stop


def test_a_floor_already_held_changes_nothing(s2p_model, precise, calib) -> None:
    res = grow_float_prefix(s2p_model, precise, calib, 10.0)
    assert res.met and not res.layers and res.params is precise and len(res.steps) == 1 and res.stop is None

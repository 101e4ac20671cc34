"""The calibration SQNR floor's search from all-float (mixed_precision.raise_until_sqnr), taken when the greedy stalls."""
from __future__ import annotations

import pytest

from nilmc.quantization import mixed_precision
from nilmc.quantization.mixed_precision import calibration_sqnr_db, raise_until_sqnr, sqnr_floor_hint
from nilmc.quantization.params import derive_params
from nilmc.quantization.traits import TENSORRT_INT8


def _floor_above_int8(model, params, x, margin_db: float = 6.0) -> float:
    return calibration_sqnr_db(model, params, x) + margin_db


def test_search_from_float_meets_the_floor_the_greedy_could_not(s2p_model, s2p_stats, calib) -> None:
    params = derive_params(s2p_model, s2p_stats, TENSORRT_INT8, estimator="minmax")
    floor = _floor_above_int8(s2p_model, params, calib, margin_db=2.0)
    stalled, r0 = raise_until_sqnr(s2p_model, params, calib, floor, fallback="float", max_units=0)
    # max_units=0: the greedy keeps nothing, so the search from every unit float decides (measured: conv2 first, 66 % of MACs)
    assert r0.search is not None and r0.search["accepted"], r0.to_json()
    assert r0.search["int8_order"][0]["unit"] == "conv2"  # the most MACs that keep the floor go back first
    assert r0.met and r0.final_db >= floor and r0.initial_db < floor
    assert calibration_sqnr_db(s2p_model, stalled, calib) == pytest.approx(r0.final_db, abs=1e-6)
    back = {s["unit"] for s in r0.search["int8_order"]}
    assert not back & set(stalled.keep_float) and set(r0.kept) <= set(stalled.keep_float) and r0.kept
    assert r0.search["int8_macs_share"] >= mixed_precision.BACK_SEARCH_MIN_INT8_SHARE
    assert sqnr_floor_hint(stalled) is None
    # deterministic
    again, r1 = raise_until_sqnr(s2p_model, params, calib, floor, fallback="float", max_units=0)
    assert again.keep_float == stalled.keep_float and r1.to_json() == r0.to_json()


def test_a_placement_with_too_few_int8_macs_is_not_taken_and_the_hint_says_so(s2p_model, s2p_stats, calib, monkeypatch) -> None:
    params = derive_params(s2p_model, s2p_stats, TENSORRT_INT8, estimator="minmax")
    floor = _floor_above_int8(s2p_model, params, calib)
    monkeypatch.setattr(mixed_precision, "BACK_SEARCH_MIN_INT8_SHARE", 1.01)  # nothing can pass it
    kept, res = raise_until_sqnr(s2p_model, params, calib, floor, fallback="float", max_units=0)
    assert res.search is not None and not res.search["accepted"] and not res.met
    assert kept.keep_float == params.keep_float  # the greedy's (empty) placement stays
    hint = sqnr_floor_hint(kept)
    assert hint is not None and "could go back to INT8" in hint and "fp16/fp32" in hint
    assert f"floor ({floor:g} dB) was not met" in hint
    # the greedy's units keep the greedy's reason in the manifest, and say the floor was missed; the search's story
    # ("went back to INT8 while the floor held") is not told of a placement that was not taken
    kept1, res1 = raise_until_sqnr(s2p_model, params, calib, floor + 30.0, fallback="float", max_units=1)
    assert res1.kept and res1.search is not None and not res1.search["accepted"]
    from nilmc.quantization.placement import op_placement

    why = {f["name"]: f["why"] for f in op_placement(s2p_model, kept1)["float"]}[res1.kept[0]]
    assert "keeping it float added" in why and "floor was not met" in why and "while the floor held" not in why, why


def test_the_floor_scores_the_output_step_a_sequence_model_is_judged_on() -> None:
    """A seq2seq model is judged on the step its contract selects (--output midpoint): scored over the whole sequence,
    a fuzzed ConvTranspose seq2seq model met the 30 dB floor at 33.8 dB while its midpoint was at 23.3 dB and its
    onnxruntime:int8 / tensorrt:int8 gates failed (+2.8 points); with the step it kept layers float and passed (35.1 dB)."""
    from outside_models import lf_windows, ncw_conv1d_seq2seq

    from nilmc.quantization import _ort
    from nilmc.quantization.statistics import collect_statistics
    from nilmc.quantization.traits import GENERIC_INT8

    ds = lf_windows(300, 64, seed=0)
    m = ncw_conv1d_seq2seq(ds)
    x = ((ds.x[:, :, 0, 0] - ds.x.mean()) / ds.x.std())[:, None, :].astype("float32")
    params = derive_params(m, collect_statistics(m, x), GENERIC_INT8, estimator="minmax")

    def mid(length: int) -> int:
        return length // 2

    ref, got = _ort.output(m, x), _ort.output(mixed_precision.build_qdq_model(m, params), x)
    whole, at_mid = _ort.sqnr_db(ref, got), _ort.sqnr_db(ref[:, 0, 32], got[:, 0, 32])
    assert abs(whole - at_mid) > 0.1  # the two measures differ on this model
    assert _ort.output(m, x, step=mid).shape == (300,) and calibration_sqnr_db(m, params, x, step=mid) == pytest.approx(at_mid)
    _, res = raise_until_sqnr(m, params, x, 0.0, step=mid)  # floor 0 dB: scored once, nothing kept
    assert res.initial_db == pytest.approx(at_mid) and not res.kept
    assert raise_until_sqnr(m, params, x, 0.0)[1].initial_db == pytest.approx(whole)

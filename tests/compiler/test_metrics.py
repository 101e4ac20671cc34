"""NILM metrics against hand-computed values, edge cases and the delta sign convention."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from nilmc.compiler.errors import BadInputError, DataError
from nilmc.compiler.metrics import (
    HIGHER_IS_BETTER,
    LOWER_IS_BETTER,
    Metrics,
    compare_metrics,
    energy_accuracy,
    metric_deltas,
    nilm_metrics,
    rmse,
    sqnr_db,
)

# y = [0, 100, 200, 0] W; raw prediction [10, 90, -5, 0] -> clipped [10, 90, 0, 0].
# errors 10, -10, -200, 0: Σ|e| = 220, Σe² = 40200; Σy = 300, Σy² = 50000; Σŷ = 100.
Y = np.array([0.0, 100.0, 200.0, 0.0])
P = np.array([10.0, 90.0, -5.0, 0.0])


@pytest.fixture()
def m() -> Metrics:
    return nilm_metrics(Y, P, on_threshold_w=50.0)


def test_hand_computed_values(m: Metrics) -> None:
    assert m.eacc == pytest.approx(1 - 220 / 600)
    assert m.mae == pytest.approx(55.0)
    assert m.rmse == pytest.approx(math.sqrt(40200 / 4))
    assert m.sae == pytest.approx(200 / 300)
    assert m.nde == pytest.approx(40200 / 50000)
    assert m.nde_sqrt == pytest.approx(math.sqrt(40200 / 50000))
    assert m.n == 4 and m.clipped == 1 and m.on_threshold_w == 50.0


def test_on_state_scores(m: Metrics) -> None:
    # truth ON: samples 1, 2; predicted ON (>= 50 W): sample 1 only.
    assert (m.tp, m.fp, m.fn, m.tn) == (1, 0, 1, 2)
    assert m.precision == pytest.approx(1.0)
    assert m.recall == pytest.approx(0.5)
    assert m.f1 == pytest.approx(2 / 3)


def test_threshold_is_inclusive() -> None:
    m = nilm_metrics([50.0, 0.0], [50.0, 0.0], on_threshold_w=50.0)
    assert (m.tp, m.fp, m.fn, m.tn) == (1, 0, 0, 1)
    assert m.f1 == 1.0


def test_perfect_prediction() -> None:
    m = nilm_metrics(Y, Y, on_threshold_w=50.0)
    assert (m.eacc, m.mae, m.sae, m.nde, m.f1) == (1.0, 0.0, 0.0, 0.0, 1.0)


def test_negative_predictions_are_clipped_at_zero() -> None:
    clipped = nilm_metrics(Y, P, on_threshold_w=50.0)
    explicit = nilm_metrics(Y, np.maximum(P, 0), on_threshold_w=50.0)
    assert clipped.eacc == explicit.eacc and clipped.mae == explicit.mae
    assert clipped.clipped == 1 and explicit.clipped == 0
    # Without clipping |−5 − 200| = 205 would enter the MAE.
    assert clipped.mae == pytest.approx((10 + 10 + 200) / 4)


def test_column_vectors_accepted() -> None:
    a = nilm_metrics(Y[:, None], P[:, None], on_threshold_w=50.0)
    b = nilm_metrics(Y, P, on_threshold_w=50.0)
    assert a == b


def test_multi_appliance_eacc_sums_over_appliances() -> None:
    y = np.array([[100.0, 0.0], [0.0, 50.0]])
    p = np.array([[80.0, 10.0], [0.0, 50.0]])
    # Σ|e| = 20 + 10 = 30, Σy = 150 -> 1 − 30/300
    assert energy_accuracy(y, p) == pytest.approx(0.9)
    assert energy_accuracy(Y, P) == pytest.approx(nilm_metrics(Y, P, on_threshold_w=1).eacc)


def test_eacc_can_go_below_zero() -> None:
    assert energy_accuracy([10.0], [50.0]) == pytest.approx(1 - 40 / 20)


def test_all_zero_ground_truth_gives_nan_relative_metrics() -> None:
    m = nilm_metrics([0.0, 0.0], [1.0, 3.0], on_threshold_w=10.0)
    assert math.isnan(m.eacc) and math.isnan(m.sae) and math.isnan(m.nde) and math.isnan(m.nde_sqrt)
    assert m.mae == pytest.approx(2.0)
    assert not m.finite
    assert m.to_json()["eacc"] is None  # valid JSON, no NaN
    json.loads(json.dumps(m.to_json(), allow_nan=False))


def test_no_positives_gives_zero_f1() -> None:
    m = nilm_metrics([0.0, 1.0], [0.0, 2.0], on_threshold_w=10.0)
    assert (m.precision, m.recall, m.f1) == (0.0, 0.0, 0.0)
    only_pred = nilm_metrics([0.0, 1.0], [20.0, 0.0], on_threshold_w=10.0)
    assert (only_pred.precision, only_pred.recall, only_pred.f1) == (0.0, 0.0, 0.0)
    only_true = nilm_metrics([20.0, 1.0], [0.0, 0.0], on_threshold_w=10.0)
    assert (only_true.precision, only_true.recall, only_true.f1) == (0.0, 0.0, 0.0)


@pytest.mark.parametrize(
    "y, p",
    [([], []), ([1.0, 2.0], [1.0]), (np.zeros((3, 2)), np.zeros((3, 2))), ([1.0, np.nan], [1.0, 1.0]), ([1.0, -5.0], [1.0, 1.0]), (["a"], [1.0])],
    ids=["empty", "length-mismatch", "multi-appliance", "nan-truth", "negative-truth", "not-numeric"],
)
def test_bad_data_raises(y: object, p: object) -> None:
    with pytest.raises(DataError) as err:
        nilm_metrics(y, p, on_threshold_w=10.0)  # type: ignore[arg-type]
    assert err.value.remedy


def test_tiny_negative_truth_is_float_noise() -> None:
    m = nilm_metrics([-1e-4, 100.0], [0.0, 100.0], on_threshold_w=10.0)
    assert m.eacc == 1.0


@pytest.mark.parametrize("threshold", [-1.0, float("nan"), "x"])
def test_bad_threshold(threshold: object) -> None:
    with pytest.raises(BadInputError):
        nilm_metrics(Y, P, on_threshold_w=threshold)  # type: ignore[arg-type]


def test_nan_predictions_do_not_raise_but_are_not_finite() -> None:
    m = nilm_metrics(Y, [np.nan, 0.0, 0.0, 0.0], on_threshold_w=10.0)
    assert math.isnan(m.eacc) and math.isnan(m.mae)
    assert not m.finite


def test_json_round_trip(m: Metrics) -> None:
    assert Metrics.from_json(json.loads(json.dumps(m.to_json()))) == m
    with pytest.raises(DataError):
        Metrics.from_json({"eacc": 1.0})


def test_rmse_and_sqnr() -> None:
    ref, cand = np.array([3.0, 4.0]), np.array([3.0, 5.0])
    assert rmse(ref, cand) == pytest.approx(math.sqrt(0.5))
    assert sqnr_db(ref, cand) == pytest.approx(10 * math.log10(25 / 1))
    assert sqnr_db(ref, ref) == math.inf
    assert sqnr_db([0.0, 0.0], [0.0, 1.0]) == -math.inf
    # rmse/sqnr compare raw vectors: no clipping of negatives.
    assert rmse([-1.0], [1.0]) == pytest.approx(2.0)
    with pytest.raises(DataError):
        sqnr_db([1.0, 2.0], [1.0])
    with pytest.raises(DataError):
        rmse([], [])


def test_delta_sign_convention_positive_is_a_loss() -> None:
    ref = nilm_metrics(Y, Y * 0.99, on_threshold_w=50.0)
    worse = nilm_metrics(Y, P, on_threshold_w=50.0)
    deltas = compare_metrics(ref, worse)
    assert set(deltas) == set(HIGHER_IS_BETTER) | set(LOWER_IS_BETTER)
    # EACC/F1 deltas in percentage points, MAE in W, SAE/NDE as fractions
    assert deltas["eacc"] == pytest.approx(100 * (ref.eacc - worse.eacc)) and deltas["eacc"] > 0
    assert deltas["f1"] == pytest.approx(100 * (ref.f1 - worse.f1)) and deltas["f1"] > 0
    assert deltas["mae"] == pytest.approx(worse.mae - ref.mae) and deltas["mae"] > 0
    assert deltas["sae"] == pytest.approx(worse.sae - ref.sae) and deltas["sae"] > 0
    assert deltas["nde"] == pytest.approx(worse.nde - ref.nde) and deltas["nde"] > 0
    # The other way round every delta flips: a gain is negative.
    back = compare_metrics(worse, ref)
    assert all(back[k] == pytest.approx(-deltas[k]) for k in deltas)
    assert back["eacc"] < 0 and back["mae"] < 0


def test_metric_deltas_records() -> None:
    ref = nilm_metrics(Y, Y, on_threshold_w=50.0)
    cand = nilm_metrics(Y, P, on_threshold_w=50.0)
    rec = metric_deltas(ref, cand)
    assert rec["eacc"].higher_is_better and not rec["mae"].higher_is_better
    assert rec["mae"].reference == 0.0 and rec["mae"].candidate == pytest.approx(55.0) and rec["mae"].delta == pytest.approx(55.0)
    assert rec["eacc"].to_json()["delta"] == pytest.approx(100 * 220 / 600)
    assert (rec["eacc"].unit, rec["mae"].unit, rec["nde"].unit) == ("pts", "W", "fraction")
    assert rec["eacc"].reference == 1.0  # values stay in the metric's own units


def test_paper_table7_delta_in_points() -> None:
    # seed 003 Table 7, TF-Lite QAT INT8: 85.54 -> 84.12 is a 1.42-point loss
    ref = nilm_metrics([100.0], [100.0], on_threshold_w=10.0)
    import dataclasses

    ref = dataclasses.replace(ref, eacc=0.8554)
    cand = dataclasses.replace(ref, eacc=0.8412)
    assert compare_metrics(ref, cand)["eacc"] == pytest.approx(1.42)


def test_nan_metric_gives_nan_delta() -> None:
    ref = nilm_metrics([0.0, 0.0], [0.0, 0.0], on_threshold_w=10.0)
    cand = nilm_metrics([0.0, 0.0], [5.0, 0.0], on_threshold_w=10.0)
    d = compare_metrics(ref, cand)
    assert math.isnan(d["eacc"])
    assert d["mae"] == pytest.approx(2.5)

"""compare.py, the gate: budgets parsed strictly, deltas as losses, NaN fails, worst offender first."""
from __future__ import annotations

import math

import numpy as np
import pytest

from nilmc.compiler.compare import DEFAULT_BUDGET, compare, parse_budget, validate_budget
from nilmc.compiler.errors import BadInputError
from nilmc.compiler.metrics import nilm_metrics


def _metrics(pred_offset: float = 0.0, nan: bool = False):
    y = np.array([0.0, 2000.0, 2100.0, 0.0, 1500.0], np.float32)
    p = y + pred_offset
    if nan:
        p = p.copy()
        p[1] = np.nan
    return nilm_metrics(y, p, on_threshold_w=1000.0)


def test_parse_budget_default_and_values():
    assert parse_budget(None) == DEFAULT_BUDGET and parse_budget("  ") == DEFAULT_BUDGET
    assert parse_budget("EACC=0.5, mae=3") == {"eacc": 0.5, "mae": 3.0}


@pytest.mark.parametrize("text", ["eacc=inf", "eacc=-1", "eacc=nan", "eacc=1e999", "eacc=x", "bogus=1", "eacc", "eacc=1,eacc=2"])
def test_parse_budget_refuses(text):
    with pytest.raises(BadInputError):
        parse_budget(text)


def test_validate_budget_mapping():
    assert validate_budget({"eacc": 0.25}) == {"eacc": 0.25}
    assert validate_budget({}) == {}
    with pytest.raises(BadInputError):
        validate_budget({"eacc": math.inf})


def test_identical_candidate_passes_with_zero_deltas():
    ref = _metrics()
    r = compare(ref, ref, {"eacc": 0.0, "mae": 0.0}, target="t")
    assert r and r.passed and r.deltas["eacc"] == 0.0 and "PASS" in str(r)


def test_loss_over_budget_fails_and_is_a_positive_delta():
    ref, cand = _metrics(), _metrics(pred_offset=50.0)
    r = compare(ref, cand, {"eacc": 0.5, "mae": 100.0})
    assert r.deltas["eacc"] > 0 and r.deltas["mae"] == pytest.approx(50.0, abs=1e-3)
    assert not r and [v.metric for v in r.worst_first()] == ["eacc"]
    r2 = compare(ref, cand, {"eacc": 0.5, "mae": 1.0})
    assert [v.metric for v in r2.worst_first()][0] == "mae"  # 49 W over beats a few points over


def test_nan_candidate_fails_the_gate():
    r = compare(_metrics(), _metrics(nan=True), {"eacc": 100.0})
    assert not r


def test_unknown_budget_metric_in_compare_is_bad_input():
    with pytest.raises(BadInputError):
        compare(_metrics(), _metrics(), {"watts": 1.0})

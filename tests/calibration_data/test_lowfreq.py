"""The classic 599 x 8 s setting."""
from __future__ import annotations

import numpy as np
import pytest

from nilmc.calibration_data import lowfreq as LF
from nilmc.compiler.errors import DataError


def test_resample_mean_down_up_and_gaps():
    ts = np.arange(0, 64, 1.0)
    grid, v = LF.resample_mean(ts, ts.copy(), period_s=8.0)
    np.testing.assert_allclose(grid, np.arange(0, 64, 8.0))
    np.testing.assert_allclose(v, np.arange(0, 64, 8.0) + 3.5)  # mean of each 8-s bin
    # 120-s data up-sampled: held while the last sample is recent enough
    ts2 = np.array([0.0, 120.0, 240.0])
    grid2, v2 = LF.resample_mean(ts2, np.array([1.0, 2.0, 3.0]), period_s=8.0, max_gap_s=180.0)
    assert grid2.shape == (31,) and np.all(np.isfinite(v2))
    assert v2[1] == 1.0 and v2[15] == 2.0
    # a gap longer than max_gap_s becomes NaN
    _, v3 = LF.resample_mean(np.array([0.0, 1000.0]), np.array([5.0, 6.0]), period_s=8.0, max_gap_s=60.0)
    assert np.isnan(v3[50]) and v3[0] == 5.0


def test_resample_rejects_empty_and_mismatched():
    with pytest.raises(DataError):
        LF.resample_mean(np.zeros(0), np.zeros(0))
    with pytest.raises(DataError):
        LF.resample_mean(np.zeros(3), np.zeros(2))


def test_classic_windows_midpoint_and_nan_drop():
    mains = np.arange(700, dtype=np.float64)
    tgt = mains[:, None] * 2
    x, y = LF.classic_windows(mains, tgt)
    assert x.shape == (102, 599, 1, 1) and y.shape == (102, 1)
    assert x[3, 0, 0, 0] == 3 and y[3, 0] == 2 * (3 + 299)
    mains[650] = np.nan
    x2, _ = LF.classic_windows(mains, tgt)
    assert x2.shape[0] == 52  # windows covering sample 650 are dropped


def test_synthetic_lowfreq_splits_carry_classic_constants():
    sp = LF.build_lowfreq_splits(("kettle", "fridge", "toaster"), seed=2, n_train=300, n_val=50, n_calib=50, n_eval=100)
    tr = sp["train"]
    assert tr.x.shape == (300, 599, 1, 1) and tr.y.shape == (300, 3)
    assert tr.feature_names == ["mains.P"]
    assert tr.target_mean[:2] == [700.0, 200.0] and tr.target_std[:2] == [1000.0, 400.0]
    assert tr.target_mean[2] == pytest.approx(float(tr.y[:, 2].mean()))  # toaster: fitted on train
    z = tr.normalization_spec("C").apply(tr.x)
    np.testing.assert_allclose(z, (tr.x.astype(np.float64) - 522.0) / 814.0, rtol=1e-5, atol=1e-5)
    assert tr.info["period_s"] == 8.0 and tr.info["window"] == 599 and tr.info["mains_normalization"]["mean"] == 522.0
    assert sp["eval"].train_stats.minimum == pytest.approx(tr.train_stats.minimum)
    # the aggregate covers the appliances
    assert np.all(tr.x[:, 299, 0, 0] + 10 >= tr.y.sum(1))


def test_synthetic_day_is_deterministic():
    a = LF.synth_lowfreq_day(1, 3)
    b = LF.synth_lowfreq_day(1, 3)
    np.testing.assert_array_equal(a[0], b[0])
    assert a[0].shape == (10800,)

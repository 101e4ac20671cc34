"""The low-frequency splits the reference models beyond the CNN train and calibrate on."""
from __future__ import annotations

import numpy as np

from nilmc.training.lowfreq_data import CALIB_MIN_DAYS, DEFAULT_APPLIANCES, lowfreq_splits, lowfreq_windows


def test_calibration_split_spans_enough_days_for_rare_appliances():
    """300 calibration windows at 200 a day came from 2 simulated days, with no microwave-on window: the split now
    spreads over CALIB_MIN_DAYS days, and every appliance is ON in some of its windows."""
    sizes = {"calib": 300}
    ds = lowfreq_splits(DEFAULT_APPLIANCES, window=32, seed=0, sizes=sizes, on_fraction=0.5)["calib"]
    on = ds.y >= np.asarray(ds.on_thresholds)
    assert ds.x.shape[0] == 300 and on.any(axis=0).all(), dict(zip(ds.appliances, on.mean(axis=0)))
    # the old draw (200 windows a day) for comparison: the same seed's first two days lack a microwave-on window
    _, y_old = lowfreq_windows(DEFAULT_APPLIANCES, 300, window=32, seed=0, split="calib", on_fraction=0.5)
    assert CALIB_MIN_DAYS >= 10 and not (y_old[:, 1] >= ds.on_thresholds[1]).any()
    again = lowfreq_splits(DEFAULT_APPLIANCES, window=32, seed=0, sizes=sizes, on_fraction=0.5)["calib"]
    assert np.array_equal(again.x, ds.x)  # deterministic

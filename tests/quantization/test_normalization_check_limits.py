"""The std limits of check_normalization: a wrong normalization that narrows the input 100-1000x is caught, a calibration
set whose heavy-tailed feature alone is narrow (no appliance event) is not."""
from __future__ import annotations

import pytest
from helpers import tiny_dataset, tiny_model
from outside_models import lf_windows

from nilmc.calibration_data.normalization import Normalization, NormalizationSpec
from nilmc.compiler.contract import ModelContract
from nilmc.compiler.errors import NormalizationError
from nilmc.quantization.normalization_check import NormalizationLimits, check_normalization


def _one_feature():
    ds = lf_windows(300, 64, seed=0)
    contract = ModelContract(input_shape=(64, 1, 1), normalization=NormalizationSpec(Normalization.C, ds.train_stats),
                             appliance="fridge", on_threshold_w=50.0)
    return contract, ds.raw_x()


def test_an_input_1000x_too_small_is_caught():
    """kW fed to a watts model, or a std given ~1000x too large: (x/k - mean)/std stays within 6 std of the mean and inside
    the widened training range, so only the std shows it -- ~1e-3 of training, at the per-feature limit (1e-3); the
    widest-feature limit (0.02) catches it."""
    contract, raw = _one_feature()
    with pytest.raises(NormalizationError):
        check_normalization(contract, contract.normalize(raw / 1000))
    small = contract.normalize(raw / 900)  # x0.0011 of training
    report = check_normalization(contract, small, policy="warn")
    assert not report.ok and "no feature wider than" in report.bad[0].problems[0]
    old = check_normalization(contract, small, policy="warn", limits=NormalizationLimits(min_std_ratio=1e-3, min_widest_std_ratio=0.0))
    assert old.ok  # the finding: this passed before
    assert check_normalization(contract, contract.normalize(raw))


def test_a_z_scored_input_normalized_again_is_caught():
    contract, raw = _one_feature()
    twice = contract.normalize(contract.normalize(raw))  # std 1 / (training std of the watts)
    report = check_normalization(contract, twice, policy="warn")
    assert not report and "no feature wider than" in report.bad[0].problems[0]


def test_every_feature_100x_narrow_is_caught_one_narrow_feature_is_not():
    ds = tiny_dataset()
    model = tiny_model(ds)
    x = model.contract.normalize(ds.raw_x())
    mean = x.mean(axis=(0, 1, 3), keepdims=True)
    every = mean + (x - mean) / 100  # what a std given 100x too large does to every feature
    report = check_normalization(model.contract, every, policy="warn")
    assert len(report.bad) == 9
    one = x.copy()
    one[:, :, 3] = mean[:, :, 3] + (x[:, :, 3] - mean[:, :, 3]) / 16  # one feature at 1/16: a set without events (measured 0.058)
    assert check_normalization(model.contract, one)

"""Feature definitions on known signals, setups and feature counts."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from nilmc.calibration_data import features as F
from nilmc.compiler.errors import BadInputError, DataError

TH_LOW = 2 * np.pi * np.arange(55) / 55
TH_FULL = 2 * np.pi * np.arange(275) / 275


def test_time_features_match_numpy_and_scipy():
    x = np.random.default_rng(0).gamma(2.0, size=(6, 55))
    t = F.time_features(x)
    np.testing.assert_allclose(t[:, 0], x.min(1))
    np.testing.assert_allclose(t[:, 1], x.max(1))
    np.testing.assert_allclose(t[:, 2], x.var(1))
    np.testing.assert_allclose(t[:, 3], x.std(1))
    for col, q in ((4, 25), (5, 50), (6, 75)):
        np.testing.assert_allclose(t[:, col], np.percentile(x, q, axis=1))
    np.testing.assert_allclose(t[:, 7], stats.kurtosis(x, axis=1))
    np.testing.assert_allclose(t[:, 8], stats.skew(x, axis=1))


def test_kurtosis_of_known_distributions():
    rng = np.random.default_rng(1)
    gauss = F.time_features(rng.standard_normal((1, 200_000)))
    uniform = F.time_features(rng.uniform(size=(1, 200_000)))
    assert gauss[0, 7] == pytest.approx(0.0, abs=0.05)  # excess kurtosis of a normal
    assert uniform[0, 7] == pytest.approx(-1.2, abs=0.02)
    sine = F.time_features(np.sin(TH_LOW)[None])
    assert sine[0, 7] == pytest.approx(-1.5, abs=1e-9)
    assert sine[0, 8] == pytest.approx(0.0, abs=1e-9)


def test_constant_frame_has_zero_shape_features():
    t = F.time_features(np.full((1, 55), 3.0))
    assert t[0, 2] == 0 and t[0, 7] == 0 and t[0, 8] == 0


def test_spectrum_of_a_pure_60hz_sine():
    x = 3.0 * np.sin(TH_LOW)[None]
    a, f = F.amplitude_spectrum(x, F.LOW_RATE_HZ)
    assert f[1] == pytest.approx(60.0)
    assert a[0, 1] == pytest.approx(3.0)
    s = F.spectral_features(x, F.LOW_RATE_HZ)
    amp, cen, spread, skew, kurt, ent, flat, crest, slope = s[0]
    assert amp == pytest.approx(3.0)
    assert cen == pytest.approx(60.0, abs=1e-6)
    assert spread < 1e-3
    assert ent == pytest.approx(0.0, abs=1e-9)
    assert flat < 1e-6
    assert crest == pytest.approx(a.shape[1], rel=1e-6)  # max / mean of a one-bin spectrum = K


def test_spectral_moments_of_two_tones():
    # equal amplitudes at 60 and 180 Hz: centroid 120, spread 60, symmetric, kurtosis 1
    x = np.sin(TH_LOW) + np.sin(3 * TH_LOW)
    s = F.spectral_features(x[None], F.LOW_RATE_HZ)[0]
    assert s[1] == pytest.approx(120.0, abs=1e-6)
    assert s[2] == pytest.approx(60.0, abs=1e-6)
    assert s[3] == pytest.approx(0.0, abs=1e-6)
    assert s[4] == pytest.approx(1.0, abs=1e-6)
    assert s[5] == pytest.approx(np.log(2) / np.log(28), abs=1e-6)


def test_flat_spectrum_entropy_and_flatness_and_slope_sign():
    rng = np.random.default_rng(2)
    white = rng.standard_normal((400, 275))
    s = F.spectral_features(white, F.SAMPLE_RATE_HZ)
    assert np.mean(s[:, 5]) > 0.9  # near-flat spectrum: entropy near 1
    assert np.mean(s[:, 6]) > 0.4
    falling = np.sin(TH_FULL) + 0.5 * np.sin(5 * TH_FULL) + 0.1 * np.sin(40 * TH_FULL)
    assert F.spectral_features(falling[None], F.SAMPLE_RATE_HZ)[0, 8] < 0


def test_silent_frame_is_finite():
    s = F.spectral_features(np.zeros((2, 55)), F.LOW_RATE_HZ)
    assert np.all(np.isfinite(s))


@pytest.mark.parametrize("setup", F.ALL_SETUPS)
def test_every_setup_feature_count_and_names(setup):
    su = F.parse_setup(setup)
    dom, meas = setup.split("-")
    assert su.n_features == 9 * len(F.DOMAIN_SETS[dom]) * len(F.MEASUREMENT_SETS[meas])
    names = su.feature_names
    assert len(names) == su.n_features == len(set(names))
    v = 325 * np.sin(TH_FULL)[None].repeat(3, 0)
    i = 5 * np.sin(TH_FULL - 0.3)[None].repeat(3, 0)
    out = F.extract_features(v, i, setup)
    assert out.shape == (3, su.n_features) and out.dtype == np.float32
    assert np.all(np.isfinite(out))


def test_setup_counts_and_order():
    assert F.parse_setup("T-P").n_features == 9
    assert F.parse_setup("TF-VIP").n_features == 54
    assert F.parse_setup("TFHF-VIP").n_features == 81
    assert len(F.ALL_SETUPS) == 20
    assert F.feature_names("T-P")[0] == "P.T.min"
    assert F.feature_names("TF-VIP")[9] == "V.F.amplitude" and F.feature_names("TF-VIP")[18] == "I.T.min"
    assert F.parse_setup("tfhf_vip").name == "TFHF-VIP"
    with pytest.raises(BadInputError, match="available"):
        F.parse_setup("X-P")


def test_power_features_use_v_times_i_on_the_low_view():
    v = 325 * np.sin(TH_FULL)[None]
    i = 10 * np.sin(TH_FULL)[None]
    t = F.extract_features(v, i, "T-P")[0]
    p = (v * i)[0, ::5]
    assert t[0] == pytest.approx(p.min(), rel=1e-5)
    assert t[1] == pytest.approx(p.max(), rel=1e-5)
    f = F.extract_features(v, i, "F-P")[0]
    assert f[0] == pytest.approx(325 * 10 / 2, rel=1e-4)  # peak of |spectrum| = mean power = DC
    hf = F.extract_features(v, i, "HF-I")[0]
    assert hf[1] == pytest.approx(60.0, abs=1e-3)


@pytest.mark.parametrize(
    "v,i",
    [
        (np.zeros((2, 274)), np.zeros((2, 274))),
        (np.zeros((2, 275)), np.zeros((3, 275))),
        (np.zeros((0, 275)), np.zeros((0, 275))),
        (np.full((2, 275), np.nan), np.zeros((2, 275))),
    ],
)
def test_bad_frames_raise_data_error(v, i):
    with pytest.raises(DataError):
        F.extract_features(v, i, "T-P")

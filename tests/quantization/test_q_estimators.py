"""estimators: known distributions give known ranges."""
from __future__ import annotations

import numpy as np
import pytest

from nilmc.compiler.errors import QuantizationError
from nilmc.quantization.estimators import estimate_range, hist_quantile, histogram_mse
from nilmc.quantization.intops import INT_RANGES, affine_params, dequantize, quantize
from nilmc.quantization.statistics import TensorStats

INT8, UINT8 = INT_RANGES["int8"], INT_RANGES["uint8"]
N = 400_000


def _stats(values: np.ndarray) -> TensorStats:
    return TensorStats.from_array("t", values)


@pytest.fixture(scope="module")
def rng() -> np.random.Generator:
    return np.random.default_rng(7)


def test_minmax_of_uniform(rng) -> None:
    v = rng.uniform(-2.0, 3.0, N)
    assert estimate_range("minmax", _stats(v), INT8, symmetric=False) == (v.min(), v.max())
    assert estimate_range("minmax", _stats(v), INT8, symmetric=True) == (v.min(), v.max())


def test_percentile_cuts_heavy_tail(rng) -> None:
    v = rng.standard_t(2, N)  # heavy tails: max is far out
    s = _stats(v)
    lo, hi = estimate_range("percentile", s, INT8, symmetric=False)
    assert hi < 0.2 * v.max() and lo > 0.2 * v.min()
    assert hi == pytest.approx(np.percentile(v, 99.99), rel=0.05)
    lo_s, hi_s = estimate_range("percentile", s, INT8, symmetric=True, percentile=99.9)
    assert hi_s == pytest.approx(np.percentile(np.abs(v), 99.9), rel=0.05) and lo_s == -hi_s


def test_percentile_keeps_relu_zero(rng) -> None:
    v = np.maximum(rng.normal(0, 1, N), 0.0)
    lo, hi = estimate_range("percentile", _stats(v), UINT8, symmetric=False)
    assert lo == 0.0 and hi < v.max()


def test_mse_optimum_below_max_for_laplacian(rng) -> None:
    v = rng.laplace(0.0, 1.0, N)
    lo, hi = estimate_range("mse", _stats(v), INT8, symmetric=True)
    assert hi < 0.85 * np.abs(v).max()
    # Banner et al. (ACIQ): the MSE-optimal 8-bit clip of Laplace(b) is about 9.89 b
    assert hi == pytest.approx(9.89, rel=0.06)


def test_mse_gaussian_matches_theory(rng) -> None:
    v = rng.normal(0.0, 1.0, N)
    _, hi = estimate_range("mse", _stats(v), INT8, symmetric=True)
    assert hi == pytest.approx(3.92, rel=0.05)  # ACIQ Gaussian 8-bit optimum


def test_mse_uniform_keeps_full_range(rng) -> None:
    v = rng.uniform(-1.0, 1.0, N)
    lo, hi = estimate_range("mse", _stats(v), INT8, symmetric=False)
    assert lo == pytest.approx(-1.0, abs=0.03) and hi == pytest.approx(1.0, abs=0.03)


def test_entropy_clips_gaussian_tail(rng) -> None:
    v = rng.normal(0.0, 1.0, N)
    lo, hi = estimate_range("entropy", _stats(v), INT8, symmetric=True)
    assert 3.0 < hi < np.abs(v).max() and lo == -hi
    relu = np.maximum(v, 0.0)
    _, hi_relu = estimate_range("entropy", _stats(relu), UINT8, symmetric=False)
    assert 3.0 < hi_relu <= relu.max()  # the spike of zeros does not drag the threshold down


def test_histogram_mse_matches_sampled_error(rng) -> None:
    v = rng.normal(0.0, 1.0, N)
    s = _stats(v)
    for clip in (1.5, 3.0, 5.0):
        scale, zp = affine_params(-clip, clip, INT8, symmetric=True)
        sampled = float(np.mean((dequantize(quantize(v, scale, zp, INT8), scale, zp) - v) ** 2))
        assert histogram_mse(s.histogram, scale, zp, INT8)[0] == pytest.approx(sampled, rel=0.05)


def test_histogram_mse_uniform_noise(rng) -> None:
    v = rng.uniform(-1.0, 1.0, N)
    scale, zp = affine_params(-1.0, 1.0, INT8, symmetric=True)
    assert histogram_mse(_stats(v).histogram, scale, zp, INT8)[0] == pytest.approx(scale**2 / 12, rel=0.03)


def test_hist_quantile(rng) -> None:
    v = rng.uniform(0.0, 10.0, N)
    assert hist_quantile(_stats(v).histogram, 0.5) == pytest.approx(5.0, abs=0.05)


def test_unknown_estimator_and_bad_options(rng) -> None:
    s = _stats(rng.normal(size=1000))
    with pytest.raises(QuantizationError, match="available"):
        estimate_range("magic", s, INT8, symmetric=True)
    with pytest.raises(QuantizationError):
        estimate_range("percentile", s, INT8, symmetric=True, percentile=20.0)
    with pytest.raises(QuantizationError, match="rejected options"):
        estimate_range("minmax", s, INT8, symmetric=True, bogus=1)

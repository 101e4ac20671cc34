"""Range estimators: :class:`TensorStats` -> the real range ``(lo, hi)`` to quantize.

Pure functions of the statistics and the target grid (code range + symmetric?):

* ``minmax``      observed min and max.
* ``percentile``  clip to the ``percentile`` (default 99.99) of the histogram;
                  symmetric grids take the percentile of ``|x|``.
* ``mse``         the clipping range minimising the expected quantization MSE on the
                  histogram (:func:`histogram_mse`), searched on a grid of candidates.
* ``entropy``     TensorRT-style KL calibration on the ``|x|`` histogram.

:func:`histogram_mse` treats the density as uniform inside each bin and integrates
the squared error of the real quantizer (rounding sawtooth inside the grid, distance
to the nearest end outside) exactly, so bin centres that happen to sit on the grid do
not fake zero error (which matters for power-of-two bins against power-of-two scales).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from nilmc.compiler.errors import QuantizationError
from nilmc.quantization.intops import IntRange
from nilmc.quantization.statistics import Histogram, TensorStats

Range = tuple[float, float]


# --------------------------------------------------------------------------- expected quantization error
def _sawtooth_integral(t: np.ndarray, s: np.ndarray) -> np.ndarray:
    """``F(t) = integral from -s/2 to t of (u - s*round(u/s))**2 du``."""
    k = np.floor(t / s + 0.5)
    r = t - k * s
    integral: np.ndarray = k * s**3 / 12.0 + (r**3 + s**3 / 8.0) / 3.0
    return integral


def histogram_mse(hist: Histogram, scale: np.ndarray | float, zero_point: np.ndarray | int, rng: IntRange) -> np.ndarray:
    """Expected squared error of quantize->dequantize on ``hist``, for one or many (scale, zero point) candidates."""
    s = np.atleast_1d(np.asarray(scale, np.float64))[:, None]
    z = np.atleast_1d(np.asarray(zero_point, np.float64))[:, None]
    n = hist.counts.astype(np.float64)
    keep = n > 0
    edges = hist.edges
    a, b, n = edges[:-1][keep][None, :], edges[1:][keep][None, :], n[keep][None, :]
    cl, ch = (rng.lo - z) * s, (rng.hi - z) * s
    lo_in, hi_in = np.clip(a, cl, ch), np.clip(b, cl, ch)
    err = _sawtooth_integral(hi_in, s) - _sawtooth_integral(lo_in, s)
    err += np.where(b > ch, ((b - ch) ** 3 - (np.maximum(a, ch) - ch) ** 3) / 3.0, 0.0)
    err += np.where(a < cl, ((cl - a) ** 3 - (cl - np.minimum(b, cl)) ** 3) / 3.0, 0.0)
    per_bin = err / hist.width
    mse: np.ndarray = (per_bin * n).sum(axis=1) / max(float(n.sum()), 1.0)
    return mse


def _affine_many(lo: np.ndarray, hi: np.ndarray, rng: IntRange, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised :func:`intops.affine_params` (without the float32 rounding)."""
    lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
    if symmetric:
        s = np.maximum(-lo, hi) / rng.hi
        return np.where(s > 0, s, 1.0), np.zeros_like(s)
    s = (hi - lo) / (rng.hi - rng.lo)
    s = np.where(s > 0, s, 1.0)
    return s, np.clip(np.rint(rng.lo - lo / s), rng.lo, rng.hi)


# --------------------------------------------------------------------------- estimators
def minmax(stats: TensorStats, rng: IntRange, *, symmetric: bool) -> Range:
    """Observed ``(min, max)``."""
    return stats.minimum, stats.maximum


def hist_quantile(hist: Histogram, q: float) -> float:
    """Value below which a fraction ``q`` of the histogram lies (linear inside a bin)."""
    counts = hist.counts.astype(np.float64)
    total = counts.sum()
    if total == 0:
        return 0.0
    cdf = np.cumsum(counts) / total
    i = int(np.searchsorted(cdf, q, side="left"))
    i = min(i, len(counts) - 1)
    prev = cdf[i - 1] if i > 0 else 0.0
    frac = 0.0 if counts[i] == 0 else (q - prev) / (counts[i] / total)
    return float(hist.edges[i] + np.clip(frac, 0.0, 1.0) * hist.width)


def _clip_symmetric(stats: TensorStats, t: float) -> Range:
    return max(stats.minimum, -t), min(stats.maximum, t)


def percentile(stats: TensorStats, rng: IntRange, *, symmetric: bool, percentile: float = 99.99) -> Range:
    """Clip to the ``percentile`` (default 99.99) of the data; of ``|x|`` on a symmetric grid."""
    if not 50.0 < percentile <= 100.0:
        raise QuantizationError(f"percentile must be in (50, 100], got {percentile}", "use e.g. 99.99")
    p = percentile / 100.0
    if symmetric:
        return _clip_symmetric(stats, hist_quantile(stats.histogram.folded(), p))
    lo = hist_quantile(stats.histogram, 1.0 - p)
    hi = hist_quantile(stats.histogram, p)
    # a cut inside the bin holding the extreme keeps the extreme (e.g. the exact zeros of a ReLU)
    w = stats.histogram.width
    lo = stats.minimum if lo < stats.minimum + w else lo
    hi = stats.maximum if hi > stats.maximum - w else hi
    return lo, hi


def mse(stats: TensorStats, rng: IntRange, *, symmetric: bool, candidates: int = 128, max_bins: int = 512) -> Range:
    """Range minimising :func:`histogram_mse` over a grid of clipping candidates (default 128 per side).

    Symmetric: thresholds ``T = max|x| * k / candidates``. Asymmetric: a 2-D grid over
    ``min * f`` and ``max * f`` with ``candidates // 5`` values per side; a side that is 0
    stays 0. Ties go to the wider range. The histogram is first merged down to at most
    ``max_bins`` (default 512) bins to bound the search cost.
    """
    hist = stats.histogram.coarsened(max_bins)
    frac = np.arange(1, candidates + 1) / candidates
    if symmetric:
        t = max(abs(stats.minimum), abs(stats.maximum)) * frac
        if t[-1] == 0:
            return 0.0, 0.0
        s, z = _affine_many(-t, t, rng, True)
        err = histogram_mse(hist, s, z, rng)
        best = len(err) - 1 - int(np.argmin(err[::-1]))
        return _clip_symmetric(stats, float(t[best]))
    per_side = max(8, candidates // 5)
    side = np.arange(1, per_side + 1) / per_side
    los = stats.minimum * side if stats.minimum < 0 else np.array([stats.minimum])
    his = stats.maximum * side if stats.maximum > 0 else np.array([stats.maximum])
    lo, hi = (g.ravel() for g in np.meshgrid(los, his, indexing="ij"))
    s, z = _affine_many(lo, hi, rng, False)
    err = histogram_mse(hist, s, z, rng)
    best = len(err) - 1 - int(np.argmin(err[::-1]))
    return float(lo[best]), float(hi[best])


def _smooth(p: np.ndarray, eps: float = 1e-4) -> np.ndarray | None:
    zeros = p == 0
    n_zero, n_nonzero = int(zeros.sum()), int((~zeros).sum())
    if n_nonzero == 0:
        return None
    smoothed: np.ndarray = p + eps * zeros - (eps * n_zero / n_nonzero) * (~zeros)
    return smoothed


def _kl(p: np.ndarray, q: np.ndarray) -> float:
    ps, qs = _smooth(p / p.sum()), _smooth(q / max(q.sum(), 1e-300))
    if ps is None or qs is None or np.any(qs <= 0) or np.any(ps < 0):
        return float("inf")
    return float(np.sum(np.where(ps > 0, ps * np.log(ps / qs), 0.0)))


def _kl_for_cut(counts: np.ndarray, i: int, levels: int) -> float:
    """KL between the histogram cut at bin ``i`` (outliers into the last bin) and its ``levels``-bin quantization."""
    ref = counts[:i].astype(np.float64).copy()
    ref[-1] += counts[i:].sum()
    sliced = counts[:i].astype(np.float64)
    group = (np.arange(i) * levels) // i
    nonzero = sliced != 0
    total = np.bincount(group, weights=sliced, minlength=levels)
    n_nonzero = np.bincount(group, weights=nonzero, minlength=levels)
    q = np.where(nonzero, total[group] / np.maximum(n_nonzero[group], 1), 0.0)
    return _kl(ref, q)


def entropy(stats: TensorStats, rng: IntRange, *, symmetric: bool, max_candidates: int = 256) -> Range:
    """TensorRT-style entropy calibration: the ``|x|`` threshold minimising KL(P || Q).

    ``Q`` has ``rng.hi + 1`` levels (128 for int8), or all ``rng.levels`` for data >= 0
    on an asymmetric grid. The first ``|x|`` bin takes its neighbour's count so the
    exact zeros of a ReLU do not dominate the divergence. Up to ``max_candidates``
    (default 256) cuts are tried. Falls back to min-max when the histogram has too few bins.
    """
    hist = stats.histogram.folded()
    counts = np.trim_zeros(hist.counts, "b").copy()
    if len(counts) > 1:
        counts[0] = counts[1]  # ignore the spike of exact zeros (ReLU), as NVIDIA's pytorch-quantization does
    levels = rng.levels if (not symmetric and stats.minimum >= 0) else rng.hi + 1
    if len(counts) <= levels:
        return minmax(stats, rng, symmetric=symmetric)
    cuts = np.unique(np.linspace(levels, len(counts), max_candidates).astype(int))
    kls = np.array([_kl_for_cut(counts, int(i), levels) for i in cuts])
    t = float(cuts[int(np.argmin(kls))] * hist.width)
    if stats.minimum >= 0:
        return stats.minimum, min(stats.maximum, t)
    return _clip_symmetric(stats, t)


Estimator = Callable[..., Range]
ESTIMATORS: dict[str, Estimator] = {"minmax": minmax, "percentile": percentile, "mse": mse, "entropy": entropy}


def estimate_range(name: str, stats: TensorStats, rng: IntRange, *, symmetric: bool, **options: Any) -> Range:
    """Run estimator ``name`` (one of :data:`ESTIMATORS`) with its keyword ``options``."""
    try:
        fn = ESTIMATORS[name]
    except KeyError:
        raise QuantizationError(f"unknown range estimator {name!r}", f"available: {', '.join(ESTIMATORS)}") from None
    try:
        return fn(stats, rng, symmetric=symmetric, **options)
    except TypeError as exc:
        raise QuantizationError(f"estimator {name!r} rejected options {sorted(options)} ({exc})", "see its docstring for its options") from None

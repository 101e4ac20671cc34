"""Per-frame features of seed 003, Table 2, vectorised over frames.

Views of a frame (one mains cycle, 275 samples at 16.5 kHz):
    * low-frequency view, for the ``T`` and ``F`` domains: the frame decimated by 5
      (every 5th sample, no anti-alias filter, as a 3.3 kHz meter would sample) -> 55 samples;
    * full view, for the ``HF`` domain: all 275 samples.

Measurements: ``V`` voltage, ``I`` current, ``P`` instantaneous power ``v * i``.

Time-domain features (``T``), on the samples ``x`` of the low view:
    min, max; var and std (population, ddof=0); p25, p50, p75 (linear interpolation
    between order statistics, numpy's default); kurtosis = m4 / m2**2 - 3 (Fisher,
    excess, biased: ``scipy.stats.kurtosis`` defaults); skewness = m3 / m2**1.5
    (``scipy.stats.skew`` defaults). A constant frame has skewness = kurtosis = 0.

Frequency-domain features (``F`` on the low view, ``HF`` on the full view), on the
one-sided amplitude spectrum a_k (k = 0..floor(N/2)) of the frame: ``a_0 = |X_0|/N``
(the mean; kept, so that for ``P`` the active power is in the spectrum), ``a_k = 2|X_k|/N``
(the amplitude of the k-th harmonic; a Nyquist bin, for even N, is ``|X|/N``); bin
frequencies ``f_k = k * fs / N`` in Hz (bin spacing 60 Hz in both views). With
``S = sum_k a_k``:

    amplitude  max_k a_k                                  (peak spectral amplitude)
    centroid   mu = sum f a / S                           (Hz)
    spread     sigma = sqrt(sum (f - mu)^2 a / S)         (Hz)
    skewness   sum (f - mu)^3 a / (S sigma^3)
    kurtosis   sum (f - mu)^4 a / (S sigma^4)             (not excess)
    entropy    -sum p log p / log K,  p = a^2 / sum a^2    (normalised to [0, 1], K bins)
    flatness   geometric mean / arithmetic mean of a^2    ([0, 1])
    crest      max a / mean a
    slope      least-squares slope of a against f         (amplitude units per Hz)

A silent frame (S = 0) gives 0 for every spectral feature except entropy and
flatness, which are then 1 (flat); a single-bin spectrum (sigma ~ 0) has skewness = kurtosis = 0.

Setups: ``<domains>-<measurements>`` with domains T, F, HF, TF (=T+F), TFHF (=T+F+HF)
and measurements V, I, P, VIP (=V, I, P). Feature order: measurement-major
(V, then I, then P), then domain (T, F, HF), then the 9 features in the order above.
Names: ``"P.T.min"``, ``"I.F.centroid"``, ``"V.HF.slope"``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nilmc.calibration_data.synth import SAMPLE_RATE_HZ, SAMPLES_PER_FRAME
from nilmc.compiler.errors import BadInputError, DataError

LOW_DECIMATION = 5
LOW_SAMPLES = SAMPLES_PER_FRAME // LOW_DECIMATION  # 55
LOW_RATE_HZ = SAMPLE_RATE_HZ / LOW_DECIMATION  # 3300 Hz

T_FEATURES: tuple[str, ...] = ("min", "max", "var", "std", "p25", "p50", "p75", "kurtosis", "skewness")
F_FEATURES: tuple[str, ...] = ("amplitude", "centroid", "spread", "skewness", "kurtosis", "entropy", "flatness", "crest", "slope")
DOMAIN_SETS: dict[str, tuple[str, ...]] = {"T": ("T",), "F": ("F",), "HF": ("HF",), "TF": ("T", "F"), "TFHF": ("T", "F", "HF")}
MEASUREMENT_SETS: dict[str, tuple[str, ...]] = {"V": ("V",), "I": ("I",), "P": ("P",), "VIP": ("V", "I", "P")}
ALL_SETUPS: tuple[str, ...] = tuple(f"{d}-{m}" for d in DOMAIN_SETS for m in MEASUREMENT_SETS)


@dataclass(frozen=True)
class FeatureSetup:
    """A feature setup such as ``T-P``: which domains of which measurements."""

    name: str
    domains: tuple[str, ...]
    measurements: tuple[str, ...]

    @property
    def feature_names(self) -> list[str]:
        names = []
        for m in self.measurements:
            for d in self.domains:
                names.extend(f"{m}.{d}.{f}" for f in (T_FEATURES if d == "T" else F_FEATURES))
        return names

    @property
    def n_features(self) -> int:
        return 9 * len(self.domains) * len(self.measurements)


def parse_setup(setup: str | FeatureSetup) -> FeatureSetup:
    """``"tf-vip"`` -> ``FeatureSetup("TF-VIP", ("T", "F"), ("V", "I", "P"))``."""
    if isinstance(setup, FeatureSetup):
        return setup
    text = str(setup).strip().upper().replace("_", "-")
    dom, _, meas = text.partition("-")
    if dom not in DOMAIN_SETS or meas not in MEASUREMENT_SETS:
        raise BadInputError(f"unknown feature setup {setup!r}", f"use <domains>-<measurements>, e.g. T-P; available: {', '.join(ALL_SETUPS)}")
    return FeatureSetup(f"{dom}-{meas}", DOMAIN_SETS[dom], MEASUREMENT_SETS[meas])


def feature_names(setup: str | FeatureSetup) -> list[str]:
    return parse_setup(setup).feature_names


# --------------------------------------------------------------------------- time domain
def _percentile_sorted(s: np.ndarray, q: float) -> np.ndarray:
    pos = q * (s.shape[1] - 1)
    lo = int(np.floor(pos))
    hi = min(lo + 1, s.shape[1] - 1)
    w = pos - lo
    return s[:, lo] * (1.0 - w) + s[:, hi] * w


def time_features(x: np.ndarray) -> np.ndarray:
    """The 9 ``T`` features of each row of ``x`` ``(n, samples)`` -> ``(n, 9)`` float64."""
    x = np.asarray(x, np.float64)
    s = np.sort(x, axis=1)
    mean = x.mean(axis=1, keepdims=True)
    d = x - mean
    d2 = d * d
    m2 = d2.mean(axis=1)
    m3 = (d2 * d).mean(axis=1)
    m4 = (d2 * d2).mean(axis=1)
    flat = m2 <= 1e-20 * (1.0 + mean[:, 0] ** 2)
    safe = np.where(flat, 1.0, m2)
    skew = np.where(flat, 0.0, m3 / safe**1.5)
    kurt = np.where(flat, 0.0, m4 / safe**2 - 3.0)
    return np.stack(
        [s[:, 0], s[:, -1], m2, np.sqrt(m2), _percentile_sorted(s, 0.25), _percentile_sorted(s, 0.5), _percentile_sorted(s, 0.75), kurt, skew],
        axis=1,
    )


# --------------------------------------------------------------------------- frequency domain
def amplitude_spectrum(x: np.ndarray, sample_rate: float) -> tuple[np.ndarray, np.ndarray]:
    """One-sided amplitude spectrum ``(n, K)`` and bin frequencies ``(K,)`` in Hz (see module doc)."""
    x = np.asarray(x, np.float64)
    n = x.shape[1]
    a = np.abs(np.fft.rfft(x, axis=1)) * (2.0 / n)
    a[:, 0] *= 0.5
    if n % 2 == 0:
        a[:, -1] *= 0.5
    f = np.arange(a.shape[1]) * (sample_rate / n)
    return a, f


def spectral_features(x: np.ndarray, sample_rate: float) -> np.ndarray:
    """The 9 ``F``/``HF`` features of each row of ``x`` ``(n, samples)`` -> ``(n, 9)`` float64."""
    a, f = amplitude_spectrum(x, sample_rate)
    k = a.shape[1]
    total = a.sum(axis=1)
    silent = total <= 0.0
    tot = np.where(silent, 1.0, total)
    # raw moments of the normalised spectrum in one product, central moments from them (float64)
    raw = (a @ np.vander(f, 5, increasing=True)) / tot[:, None]  # (n, 5): sum a f^j / S
    mu = raw[:, 1]
    var = np.maximum(raw[:, 2] - mu**2, 0.0)
    m3 = raw[:, 3] - 3 * mu * raw[:, 2] + 2 * mu**3
    m4 = raw[:, 4] - 4 * mu * raw[:, 3] + 6 * mu**2 * raw[:, 2] - 3 * mu**4
    sigma = np.sqrt(var)
    narrow = sigma <= 1e-6 * (f[1] if k > 1 else 1.0)
    sg = np.where(narrow, 1.0, sigma)
    skew = np.where(narrow, 0.0, m3 / sg**3)
    kurt = np.where(narrow, 0.0, m4 / sg**4)
    pw = a * a
    ptot = pw.sum(axis=1)
    eps = 1e-12 * pw.max(axis=1, keepdims=True) + 1e-30
    lp = np.log(pw + eps)  # one log serves entropy and flatness
    pn = pw / np.where(ptot > 0, ptot, 1.0)[:, None]
    logk = np.log(k) if k > 1 else 1.0
    ent = -(pn * (lp - np.log(np.where(ptot > 0, ptot, 1.0))[:, None])).sum(axis=1) / logk
    entropy = np.where(silent, 1.0, np.clip(ent, 0.0, 1.0))
    flatness = np.exp(lp.mean(axis=1)) / (pw.mean(axis=1) + eps[:, 0])
    amax = a.max(axis=1)
    crest = np.where(silent, 0.0, amax / np.where(silent, 1.0, total / k))
    fc = f - f.mean()
    slope = a @ fc / max(float(fc @ fc), 1e-30)  # sum(fc) = 0, so centring a is not needed
    return np.stack([amax, np.where(silent, 0.0, mu), np.where(silent, 0.0, sigma), skew, kurt, entropy, flatness, crest, slope], axis=1)


# --------------------------------------------------------------------------- frames -> features
def _check_frames(v: np.ndarray, i: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    v = np.asarray(v)
    i = np.asarray(i)
    if v.ndim != 2 or v.shape != i.shape:
        raise DataError(f"voltage frames {v.shape} and current frames {i.shape} must both be (frames, {SAMPLES_PER_FRAME})", "pass one cycle per row")
    if v.shape[1] != SAMPLES_PER_FRAME:
        raise DataError(f"frames have {v.shape[1]} samples, expected {SAMPLES_PER_FRAME} (one 60 Hz cycle at 16.5 kHz)", "resample to 275 samples per cycle")
    if v.shape[0] == 0:
        raise DataError("no frames given (0 rows)", "pass at least one frame")
    bad = int(v.size - np.count_nonzero(np.isfinite(v))) + int(i.size - np.count_nonzero(np.isfinite(i)))
    if bad:
        raise DataError(f"{bad} non-finite samples (NaN/Inf) in the voltage/current frames", "clean or drop those frames")
    return v, i


def extract_features(v: np.ndarray, i: np.ndarray, setup: str | FeatureSetup = "T-P") -> np.ndarray:
    """Features ``(frames, F)`` float32 of V/I frames ``(frames, 275)`` for ``setup`` (default T-P)."""
    su = parse_setup(setup)
    v, i = _check_frames(v, i)
    cols: list[np.ndarray] = []
    low_v = v[:, ::LOW_DECIMATION].astype(np.float64)
    low_i = i[:, ::LOW_DECIMATION].astype(np.float64)
    for m in su.measurements:
        low = {"V": low_v, "I": low_i, "P": low_v * low_i}[m]
        full = None
        for d in su.domains:
            if d == "T":
                cols.append(time_features(low))
            elif d == "F":
                cols.append(spectral_features(low, LOW_RATE_HZ))
            else:
                if full is None:
                    vf, i_f = v.astype(np.float64), i.astype(np.float64)
                    full = {"V": vf, "I": i_f, "P": vf * i_f}[m]
                cols.append(spectral_features(full, SAMPLE_RATE_HZ))
    return np.concatenate(cols, axis=1).astype(np.float32)

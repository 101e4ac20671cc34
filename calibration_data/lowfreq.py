"""The classic low-frequency seq2point setting (Zhang et al., AAAI 2018).

Input: ``CLASSIC_WINDOW`` = 599 samples of whole-house active power at one sample
per ``CLASSIC_PERIOD_S`` = 8 s, stored as ``(B, 599, 1, 1)`` float32 *watts*
(normalization ``A``). Target: each appliance's power (W) at the window's middle
sample, index ``CLASSIC_MIDPOINT`` = 299.

Normalization travels as data, not as baked-in numbers: every set carries
``train_stats`` whose mean/std are the classic mains constants (522 W, 814 W), so
normalization ``C`` applied to the stored watts is exactly ``(P - 522) / 814``
(min/max are fitted on the training split, for B/D/E). ``target_mean``/``target_std``
are the classic per-appliance constants (REFERENCE table: kettle 700/1000,
microwave 500/800, fridge 200/400, dishwasher 700/1000, washing machine 400/700),
fitted on the training targets for appliances outside that table. ``info`` repeats
all constants.

Sources: the synthetic household (the same day timelines as the high-frequency
frames, averaged from 1 s to 8 s) or any loaded low-frequency recording resampled
to 8 s (:func:`resample_mean`; see :mod:`nilmc.calibration_data.loaders`).

The classic numbers are defaults, not limits: :func:`classic_windows` and
:func:`make_lowfreq_dataset` take any window length and target offset, and
:func:`resample_mean` any period (``nilmc data convert --window --step --target-offset
--period``); :func:`resample_bins` resamples one block of a long recording at a time, on
the same grid, for the streaming CSV converter (:mod:`nilmc.calibration_data.csv_stream`).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from nilmc.calibration_data.dataset import NilmDataset
from nilmc.calibration_data.normalization import FeatureStats, Normalization
from nilmc.calibration_data.synth import (
    ALL_DEVICES,
    GENERATOR_VERSION,
    SECONDS_PER_DAY,
    TARGET_APPLIANCES,
    Difficulty,
    check_seed,
    default_day_offset,
    make_day,
    parse_appliances,
    rng_for,
)
from nilmc.calibration_data.windows import on_threshold
from nilmc.compiler.errors import BadInputError, DataError

CLASSIC_WINDOW = 599
CLASSIC_MIDPOINT = CLASSIC_WINDOW // 2  # 299
CLASSIC_PERIOD_S = 8.0
MAINS_MEAN_W = 522.0
MAINS_STD_W = 814.0
CLASSIC_TARGET_STATS: dict[str, tuple[float, float]] = {
    "kettle": (700.0, 1000.0),
    "microwave": (500.0, 800.0),
    "fridge": (200.0, 400.0),
    "dishwasher": (700.0, 1000.0),
    "washing_machine": (400.0, 700.0),
}
DEFAULT_LOWFREQ_SIZES: dict[str, int] = {"train": 20_000, "val": 4_000, "calib": 1_000, "eval": 5_000}
FEATURE_NAME = "mains.P"


# --------------------------------------------------------------------------- resampling
def resample_mean(
    ts: np.ndarray,
    values: np.ndarray,
    *,
    period_s: float = CLASSIC_PERIOD_S,
    start: float | None = None,
    end: float | None = None,
    max_gap_s: float = 60.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Resample a (sorted, unique) series onto a regular grid of ``period_s`` (default 8 s).

    Bin ``k`` covers ``[start + k*period, start + (k+1)*period)``. A bin with samples gets
    their mean (down-sampling); an empty bin holds the last earlier sample if it is at
    most ``max_gap_s`` (default 60 s) older than the bin's end (up-sampling, e.g. 120 s
    data), else NaN (a gap; windows touching it are dropped). Default grid: from the first
    timestamp, floored to the period, to the last. Returns ``(grid_ts, values)`` float64.
    """
    ts = np.asarray(ts, np.float64)
    values = np.asarray(values, np.float64)
    if ts.ndim != 1 or ts.shape != values.shape:
        raise DataError(f"timestamps {ts.shape} and values {values.shape} must be equal-length 1-D arrays", "pass one value per timestamp")
    if ts.size == 0:
        raise DataError("cannot resample an empty series", "check the input file has data rows")
    if period_s <= 0:
        raise BadInputError(f"period_s={period_s} must be > 0", "pass e.g. 8")
    t0 = np.floor(ts[0] / period_s) * period_s if start is None else float(start)
    t1 = ts[-1] if end is None else float(end)
    n = int(np.floor((t1 - t0) / period_s)) + 1
    if n <= 0:
        raise DataError(f"the series spans no full {period_s:g}-s bin ({ts[0]}..{ts[-1]})", "pass a longer recording")
    return resample_bins(ts, values, t0=t0, period_s=period_s, k_lo=0, k_hi=n, max_gap_s=max_gap_s)


def resample_bins(ts: np.ndarray, values: np.ndarray, *, t0: float, period_s: float, k_lo: int, k_hi: int,
                  max_gap_s: float = 60.0) -> tuple[np.ndarray, np.ndarray]:
    """Bins ``k_lo <= k < k_hi`` of the grid ``t0 + k * period_s`` (the rule of :func:`resample_mean`).

    ``ts`` (sorted) must hold every sample of those bins and, for the hold rule, the last
    finite sample before them; samples of other bins are ignored. Block by block over a
    long recording this gives exactly what one call over the whole of it gives.
    """
    n = int(k_hi) - int(k_lo)
    grid = t0 + np.arange(k_lo, k_hi) * period_s
    k = np.floor((ts - t0) / period_s).astype(np.int64) - int(k_lo)
    inside = (k >= 0) & (k < n) & np.isfinite(values)
    sums = np.bincount(k[inside], weights=values[inside], minlength=n)
    counts = np.bincount(k[inside], minlength=n)
    out = np.full(n, np.nan)
    has = counts > 0
    out[has] = sums[has] / counts[has]
    # hold the last sample before an empty bin's end, if recent enough
    good = np.isfinite(values)
    tg, vg = ts[good], values[good]
    if tg.size and not has.all():
        empty = np.flatnonzero(~has)
        bin_end = grid[empty] + period_s
        j = np.searchsorted(tg, bin_end, side="left") - 1
        ok = (j >= 0) & (bin_end - tg[np.maximum(j, 0)] <= max_gap_s)
        out[empty[ok]] = vg[j[ok]]
    return grid, out


# --------------------------------------------------------------------------- windows
def classic_windows(
    mains: np.ndarray,
    targets: np.ndarray,
    *,
    window: int = CLASSIC_WINDOW,
    positions: np.ndarray | None = None,
    offset: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Windows ``(B, window, 1, 1)`` of ``mains`` (W) and targets ``(B, A)`` (W) at sample ``offset``
    of each window (default ``window // 2``, the midpoint).

    ``positions`` are window starts (default: every start, step 1). Windows with a NaN in
    the mains or at the target are dropped.
    """
    mains = np.asarray(mains, np.float64)
    targets = np.asarray(targets, np.float64)
    if targets.ndim == 1:
        targets = targets[:, None]
    if targets.shape[0] != mains.shape[0]:
        raise DataError(f"mains has {mains.shape[0]} samples but the targets {targets.shape[0]}", "align them on one time base")
    n_pos = mains.shape[0] - window + 1
    if n_pos <= 0:
        return np.zeros((0, window, 1, 1), np.float32), np.zeros((0, targets.shape[1]), np.float32)
    pos = np.arange(n_pos) if positions is None else np.asarray(positions, np.int64)
    mid = check_offset(window, offset)
    # a window is valid when no NaN lies in its mains span and its midpoint targets are finite
    bad = np.concatenate([[0], np.cumsum(~np.isfinite(mains))])
    ok = (bad[pos + window] - bad[pos] == 0) & np.all(np.isfinite(targets[pos + mid]), axis=1)
    pos = pos[ok]
    idx = pos[:, None] + np.arange(window)[None, :]
    x = mains[idx].astype(np.float32)[:, :, None, None]
    y = targets[pos + mid].astype(np.float32)
    return x, y


def check_offset(window: int, offset: int | None) -> int:
    """The target's index in a window of ``window`` samples: ``offset`` (default the midpoint ``window // 2``)."""
    if isinstance(window, bool) or int(window) < 1:
        raise BadInputError(f"window {window!r} must be a positive number of samples", "pass e.g. --window 599")
    k = int(window) // 2 if offset is None else int(offset)
    if not 0 <= k < int(window):
        raise BadInputError(f"target offset {offset} is outside a window of {window} samples",
                            f"use 0 <= --target-offset < {window} (default {int(window) // 2}, the midpoint)")
    return k


def _classic_target_stats(apps: Sequence[str], y_train: np.ndarray) -> tuple[list[float], list[float]]:
    mean, std = [], []
    for k, a in enumerate(apps):
        if a in CLASSIC_TARGET_STATS:
            m, s = CLASSIC_TARGET_STATS[a]
        else:
            m, s = float(y_train[:, k].mean()), float(max(y_train[:, k].std(), 1e-3))
        mean.append(m)
        std.append(s)
    return mean, std


def classic_stats(x_train: np.ndarray) -> FeatureStats:
    """Training statistics whose mean/std are the classic mains constants (min/max fitted)."""
    return FeatureStats(
        minimum=np.array([float(np.min(x_train))]),
        maximum=np.array([float(np.max(x_train))]),
        mean=np.array([MAINS_MEAN_W]),
        std=np.array([MAINS_STD_W]),
    )


def classic_info(**extra: object) -> dict:
    info = {
        "setting": "classic-lowfreq",
        "setup": "LF-P",
        "period_s": CLASSIC_PERIOD_S,
        "window": CLASSIC_WINDOW,
        "midpoint_index": CLASSIC_MIDPOINT,
        "mains_normalization": {"mean": MAINS_MEAN_W, "std": MAINS_STD_W, "formula": "(P - 522) / 814"},
        "target_normalization": {a: {"mean": m, "std": s} for a, (m, s) in CLASSIC_TARGET_STATS.items()},
        "units": "W",
    }
    info.update(extra)
    return info


def make_lowfreq_dataset(
    x: np.ndarray,
    y: np.ndarray,
    appliances: Sequence[str],
    *,
    train_x: np.ndarray | None = None,
    train_y: np.ndarray | None = None,
    info: Mapping[str, object] | None = None,
    period_s: float = CLASSIC_PERIOD_S,
    offset: int | None = None,
) -> NilmDataset:
    """Wrap low-frequency windows into a :class:`NilmDataset` (raw watts, classic constants as stats).

    ``train_x``/``train_y`` default to ``x``/``y`` (the set is its own training split). The
    window length comes from ``x``; ``period_s`` (default 8 s) and ``offset`` (the target's
    index, default the midpoint) are recorded in ``info``.
    """
    window = int(x.shape[1])
    if x.shape[0] == 0:
        minutes = window * period_s / 60.0
        raise DataError(f"no complete {window}-sample window could be cut (recording too short or full of gaps)",
                        f"pass a longer recording (> {minutes:.0f} min at {period_s:g} s), a shorter --window, or raise max_gap_s")
    tx = x if train_x is None else train_x
    ty = y if train_y is None else train_y
    t_mean, t_std = _classic_target_stats(appliances, ty)
    shape_info: dict[str, object] = {}
    if window != CLASSIC_WINDOW or period_s != CLASSIC_PERIOD_S or offset is not None:
        k = check_offset(window, offset)
        shape_info = {"window": window, "period_s": float(period_s), "midpoint_index": k, "target_offset": k}
    return NilmDataset(
        x=x, y=y, appliances=list(appliances), feature_names=[FEATURE_NAME], applied_normalization=Normalization.A,
        train_stats=classic_stats(tx), target_mean=t_mean, target_std=t_std,
        on_thresholds=[on_threshold(a) for a in appliances], info=classic_info(**{**shape_info, **dict(info or {})}),
    )


# --------------------------------------------------------------------------- synthetic
def synth_lowfreq_day(seed: int, day: int, *, house: int = 0, difficulty: Difficulty | None = None,
                      period_s: float = CLASSIC_PERIOD_S, noise_w: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """One simulated day at ``period_s`` (default 8 s): mains ``(T,)`` and per-device power ``(T, len(ALL_DEVICES))``.

    The 1-s power timeline of :meth:`DayTimeline.power_series` is averaged over each
    period; the mains is the sum of every device plus white meter noise (``noise_w`` W).
    """
    tl = make_day(seed, house, day, difficulty)
    step = int(round(period_s))
    if step < 1 or abs(step - period_s) > 1e-9 or SECONDS_PER_DAY % step:
        raise BadInputError(f"period_s={period_s} must be a whole number of seconds dividing a day", "use e.g. 6 or 8")
    per_s = tl.power_series(1.0)
    dev = per_s.reshape(-1, step, per_s.shape[1]).mean(axis=1)
    rng = rng_for(seed, 4, house, day)
    mains = dev.sum(axis=1) + noise_w * rng.standard_normal(dev.shape[0])
    return mains, dev


def synth_lowfreq_windows(
    appliances: Sequence[str] | str,
    n_windows: int,
    *,
    seed: int,
    split: str = "train",
    house: int = 0,
    windows_per_day: int = 2000,
    difficulty: Difficulty | None = None,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """``n_windows`` classic windows of one split, ``windows_per_day`` (default 2000) random starts per day."""
    apps = parse_appliances(appliances)
    cols = [ALL_DEVICES.index(a) for a in apps]
    if isinstance(n_windows, bool) or int(n_windows) < 1:
        raise BadInputError(f"n_windows must be a positive integer, got {n_windows!r}", "ask for at least one window")
    xs, ys = [], []
    have, day = 0, default_day_offset(split)
    while have < n_windows:
        mains, dev = synth_lowfreq_day(seed, day, house=house, difficulty=difficulty)
        rng = rng_for(seed, 5, house, day)
        n_pos = mains.shape[0] - CLASSIC_WINDOW + 1
        pos = np.sort(rng.choice(n_pos, size=min(windows_per_day, n_pos), replace=False))
        x, y = classic_windows(mains, dev[:, cols], positions=pos)
        xs.append(x)
        ys.append(y)
        have += x.shape[0]
        day += 1
    info = {"generator": GENERATOR_VERSION, "seed": int(seed), "split": split, "house": int(house),
            "days": day - default_day_offset(split), "difficulty": (difficulty or Difficulty()).to_json()}
    return np.concatenate(xs)[:n_windows], np.concatenate(ys)[:n_windows], info


def build_lowfreq_splits(
    appliances: Sequence[str] | str = ("kettle", "microwave", "fridge", "washing_machine"),
    *,
    seed: int = 0,
    n_train: int = DEFAULT_LOWFREQ_SIZES["train"],
    n_val: int = DEFAULT_LOWFREQ_SIZES["val"],
    n_calib: int = DEFAULT_LOWFREQ_SIZES["calib"],
    n_eval: int = DEFAULT_LOWFREQ_SIZES["eval"],
    difficulty: Difficulty | None = None,
    splits: Sequence[str] = ("train", "val", "calib", "eval"),
) -> dict[str, NilmDataset]:
    """Classic 599 x 8 s splits from the synthetic household (defaults: the four REFERENCE
    appliances we simulate, seed 0, 20000/4000/1000/5000 windows, disjoint days per split)."""
    seed = check_seed(seed)
    apps = parse_appliances(appliances)
    sizes = {"train": n_train, "val": n_val, "calib": n_calib, "eval": n_eval}
    unknown = set(splits) - set(sizes)
    if unknown:
        raise BadInputError(f"unknown split(s) {sorted(unknown)}", "available: train, val, calib, eval")
    wanted = [s for s in ("train", "val", "calib", "eval") if s in set(splits) | {"train"}]
    raw = {s: synth_lowfreq_windows(apps, sizes[s], seed=seed, split=s, difficulty=difficulty) for s in wanted}
    x_tr, y_tr, _ = raw["train"]
    return {s: make_lowfreq_dataset(x, y, apps, train_x=x_tr, train_y=y_tr, info=info) for s, (x, y, info) in raw.items()}


__all__ = [
    "CLASSIC_WINDOW", "CLASSIC_MIDPOINT", "CLASSIC_PERIOD_S", "MAINS_MEAN_W", "MAINS_STD_W", "CLASSIC_TARGET_STATS",
    "resample_mean", "resample_bins", "check_offset", "classic_windows", "make_lowfreq_dataset", "synth_lowfreq_day", "synth_lowfreq_windows",
    "build_lowfreq_splits", "TARGET_APPLIANCES",
]

"""seq2point windows and complete train/val/calib/eval splits from the synthetic houses.

A window is ``WINDOW_FRAMES`` = 10 consecutive frames (cycles) of features, sliding with
step 1 *inside one burst* (a window never straddles two bursts), stored as
``(B, 10, F, 1)`` float32. Its target is the per-appliance active power (watts, the
mean of ``v * i_appliance`` over the cycle) of frame ``MIDPOINT_INDEX`` = 5 (0-based)
of the window, i.e. the sixth frame: with an even window the "midpoint" is the later
of the two middle frames (``window // 2``), as ``numpy``-style ``w // 2`` indexing gives.

Splits come from disjoint simulated days of the same house (the paper trains and
tests on REDD house 3): split ``k`` draws its bursts from days ``k * 100000 ...``,
each burst from its own random stream, so eval is never a copy of train and
the calibration and evaluation sets do not depend on the training-set size.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from nilmc.calibration_data.dataset import NilmDataset
from nilmc.calibration_data.features import extract_features, parse_setup
from nilmc.calibration_data.normalization import FeatureStats, Normalization
from nilmc.calibration_data.synth import (
    GENERATOR_VERSION,
    MAINS_HZ,
    SAMPLES_PER_FRAME,
    TARGET_APPLIANCES,
    V_RMS_NOMINAL,
    BurstOptions,
    Difficulty,
    check_seed,
    default_day_offset,
    iter_bursts,
    parse_appliances,
)
from nilmc.compiler.errors import BadInputError, DataError

WINDOW_FRAMES = 10
MIDPOINT_INDEX = WINDOW_FRAMES // 2  # 5

# ON thresholds (W): the REFERENCE table where the appliance is listed, else ours.
ON_THRESHOLDS: dict[str, float] = {
    "kettle": 2000.0,
    "microwave": 200.0,
    "fridge": 50.0,
    "dishwasher": 10.0,
    "washing_machine": 20.0,
    "toaster": 400.0,  # ours: a toaster draws 0.8-1.2 kW
    "tv": 15.0,  # ours: above a TV's standby, below its 60-150 W
}

# Default split sizes (windows). The shipped sets and the shipped model use these.
DEFAULT_SIZES: dict[str, int] = {"train": 20_000, "val": 4_000, "calib": 1_000, "eval": 5_000}
SPLITS: tuple[str, ...] = ("train", "val", "calib", "eval")


def on_threshold(appliance: str) -> float:
    """ON threshold in watts for ``appliance`` (default 10 W when unknown)."""
    return float(ON_THRESHOLDS.get(appliance, 10.0))


# --------------------------------------------------------------------------- windows
def sliding_windows(features: np.ndarray, *, window: int = WINDOW_FRAMES) -> np.ndarray:
    """All windows of ``window`` consecutive rows (step 1): ``(n - window + 1, window, F)`` (a view)."""
    features = np.asarray(features)
    if features.ndim != 2:
        raise DataError(f"features have shape {features.shape}, expected (frames, features)", "pass one row per frame")
    if features.shape[0] < window:
        return np.zeros((0, window, features.shape[1]), features.dtype)
    return np.lib.stride_tricks.sliding_window_view(features, window, axis=0).transpose(0, 2, 1)


def midpoint_targets(power: np.ndarray, *, window: int = WINDOW_FRAMES, midpoint: int = MIDPOINT_INDEX) -> np.ndarray:
    """Targets of :func:`sliding_windows`: row ``midpoint`` of every window, ``(n - window + 1, A)``."""
    power = np.asarray(power)
    if not 0 <= midpoint < window:
        raise BadInputError(f"midpoint index {midpoint} is outside a window of {window}", f"use 0 <= midpoint < {window}")
    n = power.shape[0] - window + 1
    return power[midpoint : midpoint + max(n, 0)]


def windows_from_frames(
    features: np.ndarray, power: np.ndarray, *, window: int = WINDOW_FRAMES, midpoint: int = MIDPOINT_INDEX
) -> tuple[np.ndarray, np.ndarray]:
    """One burst's frames -> ``x (B, window, F, 1)`` float32 and ``y (B, A)`` float32."""
    if np.asarray(features).shape[0] != np.asarray(power).shape[0]:
        raise DataError(f"{np.asarray(features).shape[0]} feature rows but {np.asarray(power).shape[0]} target rows", "pass one target row per frame")
    x = sliding_windows(features, window=window)[..., None].astype(np.float32)
    y = midpoint_targets(power, window=window, midpoint=midpoint).astype(np.float32)
    return x, y


# --------------------------------------------------------------------------- synthetic windows
def synth_windows(
    setup: str,
    appliances: Sequence[str],
    n_windows: int,
    *,
    seed: int,
    split: str = "train",
    house: int = 0,
    difficulty: Difficulty | None = None,
    options: BurstOptions | None = None,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """``n_windows`` windows of one split: ``(x (N,10,F,1), y (N,A) watts, info)``.

    Defaults: house 0, default :class:`Difficulty` and :class:`BurstOptions`. Bursts are
    consumed in order until enough windows exist; the last burst is cut.
    """
    su = parse_setup(setup)
    apps = parse_appliances(appliances)
    n_windows = _check_count(n_windows, "n_windows")
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    have = 0
    n_bursts = 0
    group: list = []
    group_frames = 0
    stream = iter_bursts(seed, split=split, house=house, difficulty=difficulty, options=options)

    def flush() -> int:
        v = np.concatenate([b.v for b in group])
        i = np.concatenate([b.i for b in group])
        feats = extract_features(v, i, su)
        got = 0
        a = 0
        for b in group:
            x, y = windows_from_frames(feats[a : a + b.n_frames], b.targets(apps))
            a += b.n_frames
            xs.append(x)
            ys.append(y)
            got += x.shape[0]
        group.clear()
        return got

    for burst in stream:
        group.append(burst)
        n_bursts += 1
        group_frames += burst.n_frames
        if have + group_frames - len(group) * (WINDOW_FRAMES - 1) >= n_windows or group_frames >= 8192:
            have += flush()
            group_frames = 0
            if have >= n_windows:
                break
    x = np.concatenate(xs)[:n_windows]
    y = np.concatenate(ys)[:n_windows]
    info = {
        "setup": su.name,
        "generator": GENERATOR_VERSION,
        "seed": int(seed),
        "split": split,
        "house": int(house),
        "day_offset": default_day_offset(split),
        "n_bursts": n_bursts,
        "window_frames": WINDOW_FRAMES,
        "midpoint_index": MIDPOINT_INDEX,
        "frame": f"one {MAINS_HZ:g} Hz cycle, {SAMPLES_PER_FRAME} samples",
        "mains": f"{MAINS_HZ:g} Hz, {V_RMS_NOMINAL:g} V RMS nominal",
        "target": "active power (W) of each appliance at the window's midpoint frame",
        "difficulty": (difficulty or Difficulty()).to_json(),
        "burst_options": asdict(options or BurstOptions()),
    }
    return x, y, info


def _check_count(n: int, name: str) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or int(n) < 1:
        raise BadInputError(f"{name} must be a positive integer, got {n!r}", "ask for at least one window")
    return int(n)


def _target_stats(y: np.ndarray) -> tuple[list[float], list[float]]:
    mean = [float(v) for v in y.mean(axis=0)]
    std = [float(max(v, 1e-3)) for v in y.std(axis=0)]
    return mean, std


def build_splits(
    setup: str = "T-P",
    *,
    appliances: Sequence[str] | str = TARGET_APPLIANCES,
    seed: int = 0,
    n_train: int = DEFAULT_SIZES["train"],
    n_val: int = DEFAULT_SIZES["val"],
    n_calib: int = DEFAULT_SIZES["calib"],
    n_eval: int = DEFAULT_SIZES["eval"],
    difficulty: Difficulty | None = None,
    options: BurstOptions | None = None,
    eval_house: int = 0,
    splits: Sequence[str] = SPLITS,
) -> dict[str, NilmDataset]:
    """Train/val/calib/eval :class:`NilmDataset` s of raw features (normalization ``A``).

    Defaults: setup ``T-P``, every target appliance as a column, seed 0, sizes
    ``DEFAULT_SIZES`` (20000/4000/1000/5000 windows), default difficulty and bursts,
    every split from house 0 on its own days (``eval_house`` moves eval to another
    house). Every split carries the training statistics (``FeatureStats.fit(train.x)``),
    the training targets' mean/std and the ON thresholds. The data of a split do not
    depend on which appliances are asked for (only the columns do) nor on the other
    splits' sizes; the statistics depend on ``n_train``. ``splits`` may omit splits
    other than ``train`` (which is always built: the statistics come from it).
    """
    seed = check_seed(seed)
    apps = parse_appliances(appliances)
    sizes = {"train": n_train, "val": n_val, "calib": n_calib, "eval": n_eval}
    wanted = [s for s in SPLITS if s in set(splits) | {"train"}]
    unknown = set(splits) - set(SPLITS)
    if unknown:
        raise BadInputError(f"unknown split(s) {sorted(unknown)}", f"available: {', '.join(SPLITS)}")
    raw: dict[str, tuple[np.ndarray, np.ndarray, dict]] = {}
    for split in wanted:
        house = eval_house if split == "eval" else 0
        raw[split] = synth_windows(setup, apps, _check_count(sizes[split], f"n_{split}"), seed=seed, split=split,
                                   house=house, difficulty=difficulty, options=options)
    x_tr, y_tr, _ = raw["train"]
    stats = FeatureStats.fit(x_tr)
    t_mean, t_std = _target_stats(y_tr)
    names = parse_setup(setup).feature_names
    out: dict[str, NilmDataset] = {}
    for split in wanted:
        x, y, info = raw[split]
        info["sizes"] = {s: int(sizes[s]) for s in SPLITS}
        out[split] = NilmDataset(
            x=x, y=y, appliances=list(apps), feature_names=names, applied_normalization=Normalization.A,
            train_stats=stats, target_mean=t_mean, target_std=t_std,
            on_thresholds=[on_threshold(a) for a in apps], info=info,
        )
    return out


def generate_dataset(
    *,
    setup: str = "T-P",
    appliances: Sequence[str] | str = TARGET_APPLIANCES,
    n_windows: int = DEFAULT_SIZES["train"],
    seed: int = 0,
    split: str = "train",
    out: str | Path | None = None,
    difficulty: Difficulty | None = None,
    options: BurstOptions | None = None,
) -> NilmDataset:
    """One synthetic split as a :class:`NilmDataset` (``nilmc data generate``); saved when ``out`` is given.

    Defaults: setup ``T-P``, all target appliances, ``n_windows`` 20000, seed 0, split
    ``train``. For ``split="train"`` the training statistics are the set's own; for any
    other split they come from the default-size training split of the same seed, exactly
    as :func:`build_splits` computes them. ``setup="LF-P"`` gives the classic 599 x 8 s
    low-frequency setting instead (:mod:`nilmc.calibration_data.lowfreq`).
    """
    if str(setup).strip().upper() == "LF-P":
        from nilmc.calibration_data.lowfreq import DEFAULT_LOWFREQ_SIZES, build_lowfreq_splits

        sizes = dict(DEFAULT_LOWFREQ_SIZES)
        sizes[split] = n_windows
        ds = build_lowfreq_splits(appliances, seed=seed, n_train=sizes["train"], n_val=sizes["val"], n_calib=sizes["calib"],
                                  n_eval=sizes["eval"], difficulty=difficulty, splits=(split,))[split]
    elif split == "train":
        ds = build_splits(setup, appliances=appliances, seed=seed, n_train=n_windows, difficulty=difficulty,
                          options=options, splits=("train",))["train"]
    else:
        sizes = dict(DEFAULT_SIZES)
        sizes[split] = n_windows
        ds = build_splits(setup, appliances=appliances, seed=seed, n_train=sizes["train"], n_val=sizes["val"],
                          n_calib=sizes["calib"], n_eval=sizes["eval"], difficulty=difficulty, options=options,
                          splits=(split,))[split]
    if out is not None:
        ds.save(out)
    return ds

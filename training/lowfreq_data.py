"""Low-frequency multi-appliance splits for the models beyond the CNN (the CtRNN, the cloud model, the XGBoost edge model).

The synthetic household of :mod:`nilmc.calibration_data.lowfreq` at 8 s, cut into windows of any length
(the classic 599 samples, or shorter for the tests), with every appliance's power at the window's midpoint.
Splits come from disjoint simulated days, so the same seed gives the same windows.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from nilmc.calibration_data.dataset import NilmDataset
from nilmc.calibration_data.lowfreq import classic_windows, make_lowfreq_dataset, synth_lowfreq_day
from nilmc.calibration_data.synth import ALL_DEVICES, default_day_offset, parse_appliances, rng_for
from nilmc.calibration_data.windows import on_threshold
from nilmc.compiler.errors import BadInputError

DEFAULT_APPLIANCES = ("kettle", "microwave", "fridge", "washing_machine")
# The calibration split is spread over at least this many simulated days (fewer windows per day): a rare appliance
# (a microwave runs on some days only) must appear in it, or its ON range is never calibrated. Measured on the CtRNN:
# 300 windows from 2 days held no microwave-on window, and the INT8 microwave F1 fell by 21 points.
CALIB_MIN_DAYS = 15


def lowfreq_windows(appliances: Sequence[str], n: int, *, window: int, seed: int, split: str,
                    windows_per_day: int = 200, on_fraction: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` windows ``(n, window, 1, 1)`` (W) of one split and the midpoint power ``(n, A)`` (W).

    ``windows_per_day`` (default 200) random starts per simulated day. ``on_fraction`` (default 0): this share of
    each day's windows is drawn, in equal parts per appliance, among positions where that appliance is ON at the
    midpoint (its usual ON threshold), so rare appliances (a kettle runs minutes a day) appear in short sets too.
    """
    if window < 3 or n < 1:
        raise BadInputError(f"window {window} / windows {n} too small", "use a window of at least 3 samples and at least 1 window")
    cols = [ALL_DEVICES.index(a) for a in appliances]
    thr = np.array([on_threshold(a) for a in appliances])
    xs, ys, have, day = [], [], 0, default_day_offset(split)
    while have < n:
        mains, dev = synth_lowfreq_day(seed, day)
        rng = rng_for(seed, 7, 0, day)
        n_pos = mains.shape[0] - window + 1
        k = min(windows_per_day, n_pos)
        mid_on = dev[window // 2: window // 2 + n_pos, cols] >= thr  # ON at the midpoint of the window starting there
        picks = []
        for a in range(len(cols)):
            active = np.flatnonzero(mid_on[:, a])
            m = min(int(round(on_fraction * k / len(cols))), len(active))
            if m:
                picks.append(rng.choice(active, size=m, replace=False))
        rest = k - sum(len(p) for p in picks)
        picks.append(rng.choice(n_pos, size=rest, replace=False))
        x, y = classic_windows(mains, dev[:, cols], window=window, positions=np.sort(np.concatenate(picks)))
        xs.append(x)
        ys.append(y)
        have += len(x)
        day += 1
    return np.concatenate(xs)[:n], np.concatenate(ys)[:n]


def lowfreq_splits(appliances: Sequence[str] | str = DEFAULT_APPLIANCES, *, window: int = 599, seed: int = 0,
                   sizes: dict[str, int] | None = None, on_fraction: float = 0.0) -> dict[str, NilmDataset]:
    """``train``/``val``/``calib``/``eval`` sets of ``window`` x 8 s (defaults: 599 samples; 4000/800/300/1000 windows).

    The calibration split spreads over at least :data:`CALIB_MIN_DAYS` days (the others take 200 windows a day)."""
    apps = parse_appliances(appliances)
    sizes = sizes or {"train": 4000, "val": 800, "calib": 300, "eval": 1000}
    raw = {s: lowfreq_windows(apps, n, window=window, seed=seed, split=s, on_fraction=on_fraction,
                              **({"windows_per_day": max(1, min(200, -(-n // CALIB_MIN_DAYS)))} if s == "calib" else {}))
           for s, n in sizes.items()}
    tx, ty = raw.get("train", next(iter(raw.values())))
    info = {"generator": "nilmc.training.lowfreq_data", "seed": int(seed), "window": int(window)}
    return {s: make_lowfreq_dataset(x, y, apps, train_x=tx, train_y=ty, info={**info, "split": s}) for s, (x, y) in raw.items()}

"""Choosing calibration windows from the data given: stratified, deterministic by seed.

Taking the first N windows of a set calibrates on one stretch of time: it can miss the
appliance's ON state or the extreme input levels that deployment will see, and the activation
ranges then do not cover the evaluation data (measured: two of five 1000-window draws of the
shipped pool collapse onnxruntime:int8 to ~13.7 dB output SQNR). :func:`select_calibration`
draws from the whole set instead, stratified over

* **appliance state**: ON / OFF at the appliance's ON threshold (the data set's, else
  :func:`windows.on_threshold`), from the target power at each window's midpoint, and
* **input level**: quantile bands of each window's largest standardized feature value
  ``max |x - mean| / std`` over its frames and features (standardized with the set's own per-feature
  mean and std), so the windows that set the activation ranges are represented. The bands are
  finer towards the top (``LEVEL_EDGES``): the windows at the edge of the input range are few.

Allocation: half of ``n`` proportional to the strata's sizes (the estimators' histograms keep
the data's shape), half spread evenly over the strata (rare states and extreme levels get
windows), capped at each stratum's size; what a cap leaves over goes to the other strata in
proportion. Within a stratum windows are drawn without replacement by ``numpy.random.default_rng(seed)``;
the selected indices are returned sorted. Same data, ``n`` and seed -> the same windows.

Measured (benchmarks/bench_calibration_draws.py: shipped model and evaluation set, onnxruntime:int8, five
draws of 1000 from a 20000-window calib pool, seed 3): drawing from the whole pool is what matters — the
first-N draws give 21.8 dB mean / 13.1 dB worst output SQNR, random draws 27.8 / 26.8, stratified draws
25.6 / 23.7 (balance 0.5) and 26.3 / 20.6 (balance 0). Stratifying did not beat a random draw on this
model, so the compile driver's default is ``random``; ``stratified`` is kept for sets whose ON state is
too rare for a random draw to be sure to reach it.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from nilmc.calibration_data.dataset import NilmDataset
from nilmc.compiler.errors import BadInputError

METHODS = ("stratified", "random", "first")
# Quantile edges of the input-level bands within each appliance state (finer at the top).
LEVEL_EDGES = (0.0, 0.5, 0.8, 0.95, 0.99, 1.0)
DEFAULT_BALANCE = 0.5  # share of the windows spread evenly over the strata (the rest proportional)


def select_calibration(ds: NilmDataset, n: int, *, seed: int, appliance: str, method: str = "stratified",
                       balance: float = DEFAULT_BALANCE) -> NilmDataset:
    """``n`` calibration windows of ``ds``: stratified over ``appliance`` states and input levels (module docstring).

    ``method`` (default ``"stratified"``): also ``"random"`` (uniform without replacement, by
    ``seed``) and ``"first"`` (windows ``0 .. n-1``, the old behaviour). When ``n`` is at least
    the size of ``ds`` every window is kept. ``balance`` (default ``DEFAULT_BALANCE``) is the share
    of ``n`` spread evenly over the strata, the rest going in proportion to their sizes. The
    result's ``info["calibration_selection"]`` records the method, seed, pool size and the strata counts.
    """
    idx, record = selection_indices(ds, n, seed=seed, appliance=appliance, method=method, balance=balance)
    out = ds.subset(idx)
    return replace(out, info={**ds.info, "calibration_selection": record})


def selection_indices(ds: NilmDataset, n: int, *, seed: int, appliance: str, method: str = "stratified",
                      balance: float = DEFAULT_BALANCE) -> tuple[np.ndarray, dict[str, Any]]:
    """The sorted window indices :func:`select_calibration` keeps, and a JSON-able record of the choice."""
    if method not in METHODS:
        raise BadInputError(f"unknown calibration selection {method!r}", f"use one of {', '.join(METHODS)}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise BadInputError(f"the number of calibration windows must be a positive integer, got {n!r}", "use e.g. 1000")
    if not 0.0 <= balance <= 1.0:
        raise BadInputError(f"balance {balance!r} is not a share in [0, 1]", f"use e.g. {DEFAULT_BALANCE}")
    total = ds.n_windows
    record: dict[str, Any] = {"method": method, "seed": int(seed), "pool_windows": total, "windows": min(int(n), total)}
    if n >= total:
        return np.arange(total), record | {"note": "every window of the set (it has no more than asked for)"}
    rng = np.random.default_rng(seed)
    if method == "first":
        return np.arange(n), record
    if method == "random":
        return np.sort(rng.choice(total, size=n, replace=False)), record
    strata = strata_labels(ds, appliance)
    sizes = np.bincount(strata, minlength=2 * (len(LEVEL_EDGES) - 1))
    take = allocate(sizes, int(n), balance=balance)
    picked = [rng.choice(np.flatnonzero(strata == s), size=int(k), replace=False) for s, k in enumerate(take) if k > 0]
    idx = np.sort(np.concatenate(picked))
    return idx, record | {"balance": balance, "strata": {"pool": sizes.tolist(), "taken": take.tolist(),
                                     "labels": [f"{state} level q{lo:g}-{hi:g}" for state in ("off", "on")
                                                for lo, hi in zip(LEVEL_EDGES[:-1], LEVEL_EDGES[1:])]}}


def strata_labels(ds: NilmDataset, appliance: str) -> np.ndarray:
    """Stratum of every window: ``state * bands + band`` (state 0 OFF, 1 ON; band by the input-level quantile within the state)."""
    k = ds.appliance_index(appliance)
    threshold = _on_threshold(ds, k, appliance)
    on = ds.y[:, k] >= threshold
    level = input_level(ds.x)
    bands = len(LEVEL_EDGES) - 1
    labels = np.zeros(ds.n_windows, np.int64)
    for state in (0, 1):
        members = np.flatnonzero(on == bool(state))
        if members.size == 0:
            continue
        edges = np.quantile(level[members], LEVEL_EDGES[1:-1])
        labels[members] = state * bands + np.searchsorted(edges, level[members], side="right")
    return labels


def input_level(x: np.ndarray) -> np.ndarray:
    """Per window: the largest standardized feature value ``max |x - mean| / std`` (the set's own per-feature statistics)."""
    x = np.asarray(x, np.float64)
    other = tuple(i for i in range(x.ndim) if i != 2)  # (N, frames, features, 1): features on axis 2
    mean = x.mean(axis=other, keepdims=True)
    std = x.std(axis=other, keepdims=True)
    z = np.abs(x - mean) / np.where(std > 0, std, 1.0)
    return np.asarray(z.reshape(len(x), -1).max(axis=1))


def allocate(sizes: np.ndarray, n: int, *, balance: float = 0.5) -> np.ndarray:
    """Windows per stratum: ``balance`` of ``n`` even over the non-empty strata, the rest proportional; capped at each size, summing to ``n``."""
    sizes = np.asarray(sizes, np.int64)
    live = sizes > 0
    want = (1.0 - balance) * n * sizes / sizes.sum() + np.where(live, balance * n / max(int(live.sum()), 1), 0.0)
    take = np.minimum(np.floor(want).astype(np.int64), sizes)
    while take.sum() < n:  # give what caps and rounding left to the strata with room, largest shortfall first
        room = sizes - take
        short = np.where(room > 0, want - take, -np.inf)
        take[int(np.argmax(short))] += 1
    return take


def _on_threshold(ds: NilmDataset, k: int, appliance: str) -> float:
    if k < len(ds.on_thresholds):
        return float(ds.on_thresholds[k])
    from nilmc.calibration_data.windows import on_threshold

    return on_threshold(appliance)


def select_for_compile(calib: NilmDataset, n: int | None, *, method: str, seed: int, appliance: str) -> tuple[NilmDataset, dict[str, Any]]:
    """What the compile driver calibrates on and the manifest's ``calibration`` record.

    ``n`` None keeps every window given (record: their count); otherwise :func:`select_calibration`.
    """
    if n is None:
        return calib, {"method": "all", "windows": calib.n_windows}
    out = select_calibration(calib, n, seed=seed, appliance=appliance, method=method)
    return out, dict(out.info["calibration_selection"])

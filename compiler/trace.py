"""A small predicted-vs-true power trace for a bundle's manifest (what ``nilmc report`` plots).

The trace is a run of consecutive evaluation windows, the same for every target of a compile: the
``TRACE_WINDOWS`` windows holding the most true energy of the appliance (so the plot shows it working, not
idle), first such run on ties. Values are watts rounded to 0.1 W: deterministic, and small (a few kB) in the
manifest, whose bytes stay identical between two identical builds.
"""
from __future__ import annotations

from typing import Any

import numpy as np

TRACE_WINDOWS = 240


def trace_window(truth_w: np.ndarray, n: int = TRACE_WINDOWS) -> tuple[int, int]:
    """``(start, stop)`` of the ``n`` consecutive windows with the largest true energy (the whole set when shorter)."""
    y = np.clip(np.asarray(truth_w, np.float64).reshape(-1), 0.0, None)
    if len(y) <= n:
        return 0, len(y)
    sums = np.convolve(y, np.ones(n), mode="valid")  # sums[i] = y[i:i+n].sum()
    start = int(np.argmax(sums))
    return start, start + n


def _watts(a: np.ndarray) -> list[float | None]:
    # a non-finite prediction (a broken artifact) is kept visible as a gap, never as a made-up number
    return [round(float(v), 1) if np.isfinite(v) else None for v in np.asarray(a, np.float64).reshape(-1)]


def power_trace(truth_w: np.ndarray, fp32_w: np.ndarray, artifact_w: np.ndarray, n: int = TRACE_WINDOWS) -> dict[str, Any]:
    """The manifest's ``trace`` section: true, FP32 and artifact power over the same evaluation windows (W).

    Predictions are shown clipped at 0 W, as the metrics see them.
    """
    start, stop = trace_window(truth_w, n)
    return {
        "first_window": start,
        "windows": stop - start,
        "truth_w": _watts(np.asarray(truth_w).reshape(-1)[start:stop]),
        "fp32_w": _watts(np.clip(np.asarray(fp32_w, np.float64).reshape(-1)[start:stop], 0.0, None)),
        "artifact_w": _watts(np.clip(np.asarray(artifact_w, np.float64).reshape(-1)[start:stop], 0.0, None)),
    }

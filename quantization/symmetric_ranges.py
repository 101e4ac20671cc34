"""Activation ranges on symmetric grids (TensorRT) that cover deployment, chosen per tensor.

The layers reading the graph input run in float where the traits allow it (``api.Techniques.precise_input``), and the
other activation ranges then get a deployment headroom: the calibration windows are a sample, and deployment data reach
beyond their extremes (the manifest's ``coverage`` section measures by how much). Asymmetric grids took 1.5x; symmetric
grids took none (measured on one draw, where the symmetric grid's wasted negative half made 1.5x look expensive). Over
other draws of the same pool that left TensorRT clipping the deployment's tails: per tensor, the evaluation reached
1.5-2.7x the calibrated range, and the worst tensors were the ones whose *estimator* (percentile, entropy, MSE, chosen by
calibration-window error) had cut the range below the calibration extremes to begin with.

:func:`deployment_ranges` therefore decides per activation tensor, from the calibration data alone:

1. **Coverage** — the range is at least the calibration min/max (an estimator's clip of the calibration tails is
   undone: the error it saves is measured on the very windows whose extremes deployment exceeds) and then gets the
   deployment headroom. How far deployment reaches beyond calibration is a property of the data, not of the grid, so
   the headroom is the one asymmetric grids get (``api.Techniques.deployment_headroom``).
2. **Resolution** — what that costs is measurable on the calibration windows (output SQNR vs FP32). When the covering
   ranges leave it under the calibration SQNR floor (``api.Techniques.min_calib_sqnr``) the model is resolution-bound
   and every tensor keeps its estimator's range (all or nothing: a per-tensor greedy mix was measured to look better on
   the calibration windows and be far worse on evaluation, see :func:`deployment_ranges`).

3. **0 W on a code** (:func:`zero_watts_on_code`) — the output grid's scale grows by at most ~1/k (k codes between
   0 W and 0.0) so that 0 W is exactly a code, as ``api.fit_output_range`` does on asymmetric grids: every metric clips
   predictions at 0 W, and the wider grids' noise around the many near-zero (appliance off) predictions is otherwise
   rectified into extra energy.

Every tensor's decision (estimator range, calibration extremes, headroom, final range, why) is returned as a record for
the manifest's quantization provenance.

Measured (shipped z-score T-P model, tensorrt:int8 emulated, benchmarks/bench_vendors.py, 5 draws of 1000 windows, shipped
evaluation set): output SQNR 33.2/20.7/24.8/33.3/25.1 -> 35.2/34.4/34.2/31.2/36.5 dB, dEACC -0.07/-1.05/-0.52/-0.12/-0.67
-> -0.12/+0.24/+0.23/+0.13/-0.01 points (draw 0 is the shipped calibration set); onnxruntime:int8 unchanged. No tensor
was returned on any draw (calibration SQNR 31-41 dB with the headroom). Without step 3 draws 1 and 2 sat at +0.29/+0.31.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from nilmc.compiler.errors import QuantizationError
from nilmc.quantization import _ort
from nilmc.quantization.graph import QuantGraph, analyze
from nilmc.quantization.params import QuantParams, TensorQuant, activation_from_range, replace_activation
from nilmc.quantization.qdq import build_qdq_model
from nilmc.quantization.statistics import Statistics


@dataclass
class TensorDecision:
    """What :func:`deployment_ranges` chose for one activation tensor."""

    tensor: str
    estimator: str
    estimator_range: tuple[float, float]
    calibration_range: tuple[float, float]
    headroom: float
    range: tuple[float, float]
    why: str

    def to_json(self) -> dict[str, Any]:
        return {"tensor": self.tensor, "estimator": self.estimator, "estimator_range": [round(v, 6) for v in self.estimator_range],
                "calibration_range": [round(v, 6) for v in self.calibration_range], "headroom": self.headroom,
                "range": [round(v, 6) for v in self.range], "why": self.why}


@dataclass
class SymmetricRanges:
    """Outcome of :func:`deployment_ranges` (``to_json`` goes into ``provenance["precise_input"]["symmetric"]``)."""

    headroom: float
    min_sqnr_db: float | None
    decisions: list[TensorDecision] = field(default_factory=list)
    calib_sqnr_db: dict[str, float | None] = field(default_factory=dict)  # "estimator", "coverage", "final"
    returned: list[str] = field(default_factory=list)  # tensors sent back to their estimator's range, in order
    evaluations: int = 0
    zero_on_code: dict[str, Any] = field(default_factory=dict)  # graph output -> {scale before/after, codes to 0 W}

    def to_json(self) -> dict[str, Any]:
        return {"rule": "range >= calibration min/max, times the deployment headroom; every tensor keeps its estimator's "
                        "range when those ranges leave the calibration SQNR under the floor",
                "headroom": self.headroom, "min_calib_sqnr_db": self.min_sqnr_db,
                "calib_sqnr_db": dict(self.calib_sqnr_db), "returned": list(self.returned), "evaluations": self.evaluations,
                "tensors": [d.to_json() for d in self.decisions], "zero_watts_on_code": dict(self.zero_on_code)}


def _graph(onnx_model: onnx.ModelProto) -> QuantGraph:
    m = onnx.ModelProto()
    m.CopyFrom(onnx_model)
    return analyze(m)


def _db(v: float) -> float | None:
    return round(v, 3) if math.isfinite(v) else None


def covering_range(tq: TensorQuant, lo: float, hi: float, headroom: float) -> tuple[float, float]:
    """``tq``'s estimator range widened to the calibration extremes ``[lo, hi]``, times ``headroom``."""
    return min(tq.lo[0], lo) * headroom, max(tq.hi[0], hi) * headroom


def deployment_ranges(
    params: QuantParams,
    onnx_model: onnx.ModelProto,
    stats: Statistics,
    x: np.ndarray,
    *,
    headroom: float,
    exclude: Sequence[str] = (),
    min_sqnr_db: float | None = None,
    max_windows: int = 512,
    step: Any = None,
    outputs: bool = False,
) -> tuple[QuantParams, SymmetricRanges]:
    """Per-tensor coverage, then resolution (module docstring) for every activation of ``params`` except graph
    outputs (their range is the physical one; ``outputs``: included, for a contract without a peak power), ``exclude``
    and tensors kept float.

    ``headroom`` (>= 1) multiplies the covering range; ``min_sqnr_db`` (default None: no resolution step) is the
    calibration output SQNR floor vs FP32, measured on at most ``max_windows`` (default 512) windows of ``x`` (windows
    as the graph takes them; ``step``: a sequence model's selected output step, :data:`~nilmc.quantization._ort.OutputStep`).
    Biases depending on a changed scale are re-derived. Deterministic.
    """
    if headroom < 1.0:
        raise QuantizationError(f"deployment headroom must be >= 1, got {headroom}", "use 1 (none) or 1.5")
    g = _graph(onnx_model)
    skip = (set() if outputs else set(g.outputs)) | set(exclude) | set(params.keep_float)
    out = params
    result = SymmetricRanges(headroom, min_sqnr_db)
    for t in g.quant_points:
        if t in skip or t not in params or t not in stats:
            continue
        tq, s = params[t], stats[t]
        lo, hi = covering_range(tq, s.minimum, s.maximum, headroom)
        clipped = tq.lo[0] > s.minimum or tq.hi[0] < s.maximum
        why = ("estimator clipped the calibration extremes: widened to them, " if clipped else "") + f"deployment headroom x{headroom:g}"
        new = activation_from_range(t, lo, hi, out.traits, rng=tq.rng, hist=s.histogram, method=f"{tq.method}>=minmax*{headroom:g}")
        out = replace_activation(out, new, g)
        result.decisions.append(TensorDecision(t, tq.method, (tq.lo[0], tq.hi[0]), (s.minimum, s.maximum), headroom, (lo, hi), why))
    if min_sqnr_db is None or not result.decisions:
        return out, result
    xs = _ort.subsample(x, max_windows)
    ref = _ort.output(onnx_model, xs, step=step)

    def sqnr(p: QuantParams) -> float:
        result.evaluations += 1
        return float(_ort.sqnr_db(ref, _ort.output(build_qdq_model(onnx_model, p), xs, step=step)))

    current, estimator = sqnr(out), sqnr(params)
    result.calib_sqnr_db = {"estimator": _db(estimator), "coverage": _db(current)}
    if current < min_sqnr_db:
        # Resolution-bound: the covering ranges do not hold the floor even on the windows they were fitted to, so every
        # tensor keeps its estimator's range. Not per tensor: on the raw-feature (A) T-P model a greedy mix (3 tensors
        # back, conv2 left 3.3x wider) reached 27.9 dB on calibration and 8.7 dB on evaluation (draw 1), the estimator
        # ranges 23.7 / 19.9 dB; the calibration windows cannot rank mixes whose difference is the tails they lack.
        out = params
        for d in result.decisions:
            result.returned.append(d.tensor)
            d.headroom, d.range = 1.0, d.estimator_range
            d.why = (f"estimator's range kept: the covering ranges give {current:.2f} dB on the calibration windows, under the "
                     f"{min_sqnr_db:g} dB floor (the model is resolution-bound)")
        current = estimator
    result.calib_sqnr_db["final"] = _db(current)
    return out, result


def zero_watts_on_code(params: QuantParams, onnx_model: onnx.ModelProto, zero: float) -> tuple[QuantParams, dict[str, Any]]:
    """Every graph output on a symmetric grid re-cut so that ``zero`` (0 W in model units) is exactly a code.

    The scale becomes ``|zero| / k`` with ``k = floor(|zero| / scale)`` (float32): never smaller, so the grid still covers
    its range. No-op for ``zero`` 0 (already a code), asymmetric or per-channel grids, and a scale coarser than ``|zero|``.
    Returns the parameters and, per changed output, the scales before and after and ``k``."""
    g = _graph(onnx_model)
    out, record = params, {}
    for name in g.outputs:
        if name not in out or name in out.keep_float or zero == 0.0:
            continue
        tq = out[name]
        if tq.per_channel or any(z != 0 for z in tq.zero_point) or not out.traits.symmetric_activations:
            continue
        k = int(math.floor(abs(zero) / tq.scale[0] + 1e-9))
        if k < 1:
            continue
        scale = float(np.float32(abs(zero) / k))
        new = TensorQuant(tq.name, "activation", tq.range_name, (scale,), (0,), None, tq.lo, tq.hi, f"{tq.method}+0 W on a code")
        out = replace_activation(out, new, g)
        record[name] = {"scale": [tq.scale[0], scale], "codes_to_zero_watts": k}
    return out, record

"""Calibration coverage: does the calibrated range hold on the evaluation (deployment) data?

Two phases, like the statistics (collect once, then apply per target):

* :func:`observe_evaluation` runs the FP32 model **once** over the evaluation windows with every
  quantization point exposed (count, min, max and a growing histogram per tensor, as
  :mod:`statistics` keeps them) and measures, per feature of the graph input, the share of
  evaluation values outside the calibration set's per-feature min/max. Nothing here depends on
  a target.
* :func:`coverage` compares that observation with one target's :class:`QuantParams`: per
  activation tensor, the share of evaluation values that fall outside its representable range
  (the values that clip: below ``(q_min - z - 0.5) * s`` or above ``(q_max - z + 0.5) * s``,
  the bounds of :mod:`overflow`'s saturation check). The share is exact (0) when the observed
  evaluation min/max lie inside the range; otherwise it is read off the histogram, linear
  inside the one bin a bound cuts (error at most that bin's count, 1/2048 of the span's bins).
  The model output's values below 0 W are not counted when its range clips them to 0 W or less
  (every metric clips predictions at 0 W; ``floors``, :func:`output_floor`).

A :class:`CoverageReport` is truthy when no tensor exceeds the threshold (default ``0.001``:
0.1 % of a tensor's evaluation values, the graph input included); :meth:`CoverageReport.warning`
names the worst tensors otherwise, and the input features whose evaluation values leave the
calibration set's per-feature min/max beyond the same threshold (recorded in every report; alone
they do not warn, since a per-tensor input scale does not clip them).
"""
from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from nilmc.compiler.errors import DataError
from nilmc.quantization.graph import analyze
from nilmc.quantization.params import QuantParams, TensorQuant
from nilmc.quantization.statistics import GrowingHistogram, Histogram, Statistics, TensorStats

DEFAULT_THRESHOLD = 1e-3  # share of a tensor's evaluation values outside its calibrated range
DEFAULT_BINS = 2048
WORST_NAMED = 3  # tensors named in a warning


@dataclass(frozen=True)
class ObservedTensor:
    """What the evaluation run saw of one quantization point: count, min, max and a histogram."""

    name: str
    count: int
    minimum: float
    maximum: float
    histogram: Histogram


@dataclass(frozen=True)
class EvaluationObservation:
    """The one FP32 pass over the evaluation windows (target-independent)."""

    tensors: dict[str, ObservedTensor]  # every quantization point of the graph
    input_name: str
    n_windows: int
    # Per input feature: share of evaluation values outside the calibration set's min/max of that feature.
    feature_outside: tuple[float, ...] = ()
    feature_names: tuple[str, ...] = ()


def observe_evaluation(onnx_model: onnx.ModelProto, eval_x: np.ndarray, calib_stats: Statistics, *,
                       feature_names: tuple[str, ...] | list[str] = (), batch_size: int = 512, bins: int = DEFAULT_BINS) -> EvaluationObservation:
    """One FP32 run of ``onnx_model`` over ``eval_x`` (windows as the graph takes them) against the calibration statistics.

    Only the quantization points (:func:`graph.analyze`) are exposed, so onnxruntime still fuses
    the rest. ``feature_names`` (default none: features are named by index) label the input
    features in warnings; ``batch_size`` (default 512) windows per onnxruntime call; ``bins``
    (default 2048) histogram bins per tensor.
    """
    from nilmc.quantization import _ort

    x = np.asarray(eval_x, np.float32)
    if x.size == 0 or not np.all(np.isfinite(x)):
        raise DataError("the evaluation windows are empty or hold non-finite values", "pass finite, normalized evaluation windows")
    copy = onnx.ModelProto()
    copy.CopyFrom(onnx_model)  # analyze() annotates the graph it reads; the caller's model stays as it was
    names = list(analyze(copy).quant_points)
    feed = _ort.input_name(onnx_model)
    fetch = [n for n in names if n != feed]
    sess = _ort.session(_ort.with_outputs(onnx_model, fetch))
    acc = {n: _Accumulator(bins) for n in names}
    for start in range(0, len(x), batch_size):
        batch = x[start:start + batch_size]
        outs = dict(zip(fetch, sess.run(fetch, {feed: batch})))
        outs[feed] = batch
        for n in names:
            acc[n].add(outs[n])
    tensors = {n: a.result(n) for n, a in acc.items()}
    calib = calib_stats[feed] if feed in calib_stats else None
    return EvaluationObservation(tensors, feed, int(len(x)), feature_outside_share(x, calib), tuple(str(f) for f in feature_names))


class _Accumulator:
    def __init__(self, bins: int) -> None:
        self.hist = GrowingHistogram(bins)
        self.count, self.lo, self.hi = 0, math.inf, -math.inf

    def add(self, values: np.ndarray) -> None:
        v = np.asarray(values).ravel()
        if v.size == 0:
            return
        self.count += v.size
        self.lo, self.hi = min(self.lo, float(v.min())), max(self.hi, float(v.max()))
        self.hist.add(v)

    def result(self, name: str) -> ObservedTensor:
        return ObservedTensor(name, self.count, self.lo if self.count else 0.0, self.hi if self.count else 0.0, self.hist.result())


def feature_outside_share(x: np.ndarray, calib: TensorStats | None) -> tuple[float, ...]:
    """Per feature of the graph input ``x``: the share of values outside ``calib``'s per-feature min/max (empty without them)."""
    if calib is None or calib.feature_axis is None or calib.feature_min is None or calib.feature_max is None:
        return ()
    axis = calib.feature_axis
    shape = [1] * x.ndim
    shape[axis] = -1
    lo, hi = np.reshape(calib.feature_min, shape), np.reshape(calib.feature_max, shape)
    outside = (x < lo) | (x > hi)
    other = tuple(i for i in range(x.ndim) if i != axis)
    n = x.size // x.shape[axis]
    return tuple(float(v) / n for v in np.count_nonzero(outside, axis=other))


# --------------------------------------------------------------------------- per target
@dataclass(frozen=True)
class TensorCoverage:
    """One activation tensor: the share of evaluation values outside its calibrated (representable) range."""

    tensor: str
    outside: float  # share of evaluation values that clip, 0..1
    calibrated: tuple[float, float]  # the values that do not clip
    observed: tuple[float, float]  # evaluation min, max

    def to_json(self) -> dict[str, Any]:
        return {"tensor": self.tensor, "outside": round(self.outside, 8), "calibrated": [_r(v) for v in self.calibrated],
                "observed": [_r(v) for v in self.observed]}

    def __str__(self) -> str:
        return (f"{self.tensor} ({_pct(self.outside)} outside [{self.calibrated[0]:.4g}, {self.calibrated[1]:.4g}], "
                f"evaluation [{self.observed[0]:.4g}, {self.observed[1]:.4g}])")


@dataclass(frozen=True)
class CoverageReport:
    """Coverage of one target's parameters on the evaluation data; truthy when nothing exceeds the threshold."""

    tensors: tuple[TensorCoverage, ...]  # graph order
    threshold: float
    n_windows: int
    input_name: str
    feature_outside: tuple[float, ...] = ()
    feature_names: tuple[str, ...] = ()
    kept_float: tuple[str, ...] = ()  # activation tensors the target keeps in float (not checked)

    def __bool__(self) -> bool:
        # Per-feature excursions alone do not fail coverage: under a per-tensor input scale they are not clipped,
        # the artifact sees them as FP32 does. They are recorded, and named in the warning beside a tensor that clips.
        return not self.exceeded()

    def exceeded(self) -> list[TensorCoverage]:
        """Tensors above the threshold, worst first."""
        return sorted((t for t in self.tensors if t.outside > self.threshold), key=lambda t: (-t.outside, t.tensor))

    def features_exceeded(self) -> list[tuple[str, float]]:
        """Input features whose evaluation values leave the calibration min/max beyond the threshold, worst first."""
        named = [(self._feature_name(i), v) for i, v in enumerate(self.feature_outside) if v > self.threshold]
        return sorted(named, key=lambda f: (-f[1], f[0]))

    def _feature_name(self, i: int) -> str:
        return self.feature_names[i] if i < len(self.feature_names) else f"feature {i}"

    @property
    def worst(self) -> TensorCoverage | None:
        return max(self.tensors, key=lambda t: t.outside, default=None)

    def warning(self) -> str | None:
        """One line naming the worst tensors and input features, or None when the calibration covers the evaluation data."""
        if self:
            return None
        parts = []
        bad = self.exceeded()
        if bad:
            named = "; ".join(str(t) for t in bad[:WORST_NAMED])
            more = f" and {len(bad) - WORST_NAMED} more" if len(bad) > WORST_NAMED else ""
            parts.append(f"{len(bad)} of {len(self.tensors)} activation tensors have more than {_pct(self.threshold)} of their "
                         f"evaluation values outside the calibrated range: {named}{more}")
        feats = self.features_exceeded()
        if feats:
            named = ", ".join(f"{n} {_pct(v)}" for n, v in feats[:WORST_NAMED])
            more = f" and {len(feats) - WORST_NAMED} more" if len(feats) > WORST_NAMED else ""
            parts.append(f"{len(feats)} input feature(s) of {self.input_name!r} leave the calibration set's min/max: {named}{more}")
        return ("the evaluation data exceed the calibration coverage: " + "; ".join(parts)
                + "; calibrate on windows covering deployment (e.g. draw them from a larger pool: --calib POOL --calib-windows N)")

    def causes(self, skip: Collection[str] = ()) -> list[str]:
        """Short cause texts for a failing gate, worst first (``skip``: tensors the artifact computes in float)."""
        out = [f"evaluation activations outside calibrated range on {t.tensor} ({_pct(t.outside)})" for t in self.exceeded()
               if t.tensor not in skip]
        feats = self.features_exceeded()
        if feats:
            n, v = feats[0]
            out.append(f"evaluation input outside the calibration min/max on {len(feats)} feature(s) (worst {n}: {_pct(v)})")
        return out

    def to_json(self) -> dict[str, Any]:
        worst = self.worst
        return {
            "ok": bool(self),
            "threshold": self.threshold,
            "evaluation_windows": self.n_windows,
            "worst": None if worst is None else worst.to_json(),
            "exceeded": [t.tensor for t in self.exceeded()],
            "tensors": [t.to_json() for t in self.tensors],
            "input": {"tensor": self.input_name,
                      "features_outside_calibration_minmax": {self._feature_name(i): round(v, 8) for i, v in enumerate(self.feature_outside)},
                      "exceeded": [n for n, _ in self.features_exceeded()]},
            "kept_float": list(self.kept_float),
            **({"warning": self.warning()} if not self else {}),
        }


def coverage(observation: EvaluationObservation, params: QuantParams, *, threshold: float = DEFAULT_THRESHOLD,
             floors: Mapping[str, float] | None = None) -> CoverageReport:
    """Per activation tensor of ``params``: the share of the observed evaluation values outside its representable range.

    ``threshold`` (default 0.001) is the share above which a tensor (or an input feature against
    the calibration min/max) counts as not covered. ``floors`` (default none) maps a tensor to a
    value below which clipping does no harm downstream (the model output below 0 W, which every
    metric clips to 0 W anyway; :func:`output_floor`): when its range's lower clip bound lies at or
    below the floor, only values above the range count.
    """
    floats = _unquantized(params)
    rows, kept = [], []
    for tq in params.by_role("activation"):
        if tq.name in floats:
            kept.append(tq.name)
            continue
        if tq.name not in observation.tensors:
            continue
        rows.append(_tensor_coverage(observation.tensors[tq.name], tq, (floors or {}).get(tq.name)))
    return CoverageReport(tuple(rows), float(threshold), observation.n_windows, observation.input_name,
                          observation.feature_outside, observation.feature_names, tuple(kept))


def _unquantized(params: QuantParams) -> set[str]:
    """Activation tensors the deployed graph leaves float: those named in ``keep_float`` and the input of a layer
    named there (the precise-input first layer reads the float graph input)."""
    shared = params.shared
    kept = set(params.keep_float)
    kept |= {shared.get(layer.input, layer.input) for layer in params.layers if layer.name in kept}
    return kept | {t for t, r in shared.items() if r in kept}


def clip_bounds(tq: TensorQuant) -> tuple[float, float]:
    """Values beyond these round outside the code range (per-tensor parameters; the union for per-channel)."""
    s = np.asarray(tq.scale, np.float64)
    z = np.asarray(tq.zero_point, np.float64)
    rng = tq.rng
    return float(np.min((rng.lo - z - 0.5) * s)), float(np.max((rng.hi - z + 0.5) * s))


def output_floor(contract: Any) -> dict[str, float]:
    """``{output name: the graph output value of 0 W}`` for :func:`coverage`'s ``floors`` (a :class:`ModelContract`)."""
    if contract.folded:
        zero = 0.0
    else:
        zero = float(np.asarray(contract.target.from_watts(np.zeros(1, np.float32))).ravel()[0])
    return {contract.output_name: zero}


def _tensor_coverage(t: ObservedTensor, tq: TensorQuant, floor: float | None = None) -> TensorCoverage:
    lo, hi = clip_bounds(tq)
    counted_lo = -math.inf if floor is not None and lo <= floor else lo  # clipping below 0 W is harmless
    if t.count == 0 or (t.minimum >= counted_lo and t.maximum <= hi):
        share = 0.0
    else:
        share = min(1.0, _mass_outside(t.histogram, counted_lo, hi, t.minimum, t.maximum) / t.count)
    return TensorCoverage(t.name, share, (lo, hi), (t.minimum, t.maximum))


def _mass_outside(hist: Histogram, lo: float, hi: float, vmin: float, vmax: float) -> float:
    """Histogram mass below ``lo`` or above ``hi``, linear inside a cut bin; bins are first narrowed to the observed [vmin, vmax]."""
    a = np.maximum(hist.edges[:-1], vmin)
    b = np.minimum(hist.edges[1:], vmax)
    width = np.maximum(b - a, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        below = np.where(width > 0, np.clip((np.minimum(b, lo) - a) / width, 0.0, 1.0), (a < lo).astype(np.float64))
        above = np.where(width > 0, np.clip((b - np.maximum(a, hi)) / width, 0.0, 1.0), (b > hi).astype(np.float64))
    return float(((below + above) * hist.counts).sum())


def _pct(v: float) -> str:
    return f"{100 * v:.3g} %"


def _r(v: float) -> float:
    return float(np.float32(v))


# --------------------------------------------------------------------------- the cause of a failed gate
# Structural overflow findings first (they break every window), then what the evaluation data showed,
# then what the calibration data showed; at most MAX_CAUSES are named.
_STRUCTURAL = ("input_features", "output_clipping", "accumulator", "bias_range", "requant_shift")
_ON_CALIBRATION = ("saturation", "range_use")
MAX_CAUSES = 2
NO_CAUSE = "no cause found by the overflow and coverage analysis"


def likely_causes(overflow: Any, cover: CoverageReport | None, float_tensors: Collection[str] = ()) -> str:
    """``"likely cause: ..."`` for a target that failed its gate, from its overflow report and its coverage report.

    ``overflow`` is an :class:`overflow.OverflowReport` (or None); fixed findings are not causes.
    ``float_tensors``: tensors the backend computes in float whatever the shared parameters say (the DPU's CPU stages):
    no finding about their grid is a cause. Returns ``"likely cause: no cause found ..."`` when nothing was found.
    """
    skip = set(float_tensors)
    open_findings = [f for f in (overflow.worst_first() if overflow is not None else []) if not f.fixed and f.tensor not in skip]

    def finding_texts(checks: tuple[str, ...]) -> list[str]:
        return [f"{f.reason.split(';')[0]} ({f.check.value} on {f.tensor!r})"
                for c in checks for f in open_findings if f.check.value == c]

    causes = finding_texts(_STRUCTURAL) + (cover.causes(skip) if cover is not None else []) + finding_texts(_ON_CALIBRATION)
    return "likely cause: " + ("; ".join(causes[:MAX_CAUSES]) if causes else NO_CAUSE)

"""NILM accuracy metrics, in watts, with one pinned definition each.

All functions take appliance power in **watts** (after the target de-normalization,
``ModelContract.to_watts``), ground truth first. With ``y`` the ground truth and
``ŷ`` the prediction, sums running over every time step (and every appliance, for
the multi-appliance EACC):

* ``eacc``  energy accuracy (seed 003): ``1 − Σ|ŷ − y| / (2 Σy)``; 1 is perfect, a
  fraction (multiply by 100 for the paper's percent); can go below 0.
* ``mae``   mean absolute error ``mean|ŷ − y|``, W.
* ``rmse``  root mean squared error ``sqrt(mean (ŷ − y)²)``, W.
* ``sae``   signal aggregate error ``|Σŷ − Σy| / Σy``.
* ``nde``   normalised disaggregation error, the **squared** form ``Σ(y − ŷ)² / Σy²``;
  ``nde_sqrt`` is its square root (the other form found in the literature).
* ``precision``, ``recall``, ``f1`` of the ON state, ``on = power ≥ on_threshold_w``.

Policies:

* **Negative predictions are clipped at 0 W** before every metric: a seq2point
  regression head can output negative power, physical appliance power cannot be.
  ``Metrics.clipped`` counts how many predictions were clipped.
* Ground truth below 0 W by at most ``TRUTH_NEGATIVE_TOLERANCE_W`` (float round trips
  through the target scaling) is clipped to 0 W too; more negative ground truth is
  a :class:`DataError`.
* Empty inputs, shape mismatches and non-finite ground truth raise :class:`DataError`.
* All-zero ground truth (``Σy = 0``): ``eacc``, ``sae`` and ``nde`` divide by zero and
  are NaN — the energy they are relative to does not exist — while ``mae``/``rmse``
  stay defined. The same holds for ``nde`` when ``Σy² = 0``.
* Non-finite predictions are not an input error (a broken quantized artifact can
  produce them): the metrics become NaN / inf and ``Metrics.finite`` is False, so an
  accuracy gate fails rather than crashes.
* Precision is 0 when nothing is predicted ON, recall is 0 when nothing is ON in the
  ground truth, and F1 is 0 when precision + recall is 0 (scikit-learn's
  ``zero_division=0`` convention): with no ON samples at all, F1 is 0, not 1.

ON/OFF classification (:func:`classification_metrics`, contracts of task ``binary`` / ``multilabel``):
per-appliance ``precision``, ``recall``, ``f1``, ``accuracy`` (label accuracy ``(tp + tn) / N``) of
``prob ≥ decision_threshold`` against ``power ≥ on_threshold_w``, and their averages weighted by each
appliance's support (its number of truly-ON samples; scikit-learn's ``average="weighted"``):
``f1w``, ``precision_w``, ``recall_w``; ``accuracy`` is the mean label accuracy over every appliance and
``f1_macro`` the unweighted mean F1. With no ON sample anywhere the weights are all 0 and the weighted
averages are 0 (the same ``zero_division=0`` convention).

Comparing a candidate with a reference (:func:`compare_metrics`): **a positive delta
is a loss** — ``ref − cand`` for higher-is-better EACC/F1/precision/recall, reported
in percentage points (seed 003 Table 7), and ``cand − ref`` for lower-is-better
MAE/RMSE (W) and SAE/NDE (fractions).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from nilmc.compiler.errors import BadInputError, DataError

# Ground truth down to this many watts below zero is float noise, clipped to 0 W.
TRUTH_NEGATIVE_TOLERANCE_W = 1.0

# Sign convention of compare_metrics: a positive delta is always a loss.
HIGHER_IS_BETTER: tuple[str, ...] = ("eacc", "f1", "precision", "recall")
LOWER_IS_BETTER: tuple[str, ...] = ("mae", "rmse", "sae", "nde", "nde_sqrt")
# Units of the deltas (seed 003 Table 7 reports EACC deltas in percentage points).
DELTA_UNITS: dict[str, str] = {
    "eacc": "pts", "f1": "pts", "precision": "pts", "recall": "pts",
    "mae": "W", "rmse": "W", "sae": "fraction", "nde": "fraction", "nde_sqrt": "fraction",
}
_POINTS = 100.0
# Classification (ClassificationMetrics): every metric is higher-is-better, its delta in percentage points.
CLASSIFICATION_METRICS: tuple[str, ...] = ("f1w", "precision_w", "recall_w", "accuracy", "f1_macro")


@dataclass(frozen=True)
class Metrics:
    """NILM metrics of one appliance's predictions (see the module docstring).

    ``mae`` and ``rmse`` are in W; ``eacc``, ``sae``, ``nde``, ``nde_sqrt``,
    ``precision``, ``recall``, ``f1`` are fractions. ``nde`` is the squared form
    ``Σ(y−ŷ)²/Σy²``. ``n`` samples; ``clipped`` predictions were below 0 W;
    ``tp``/``fp``/``fn``/``tn`` count ON-state outcomes at ``on_threshold_w``.
    """

    eacc: float
    mae: float
    rmse: float
    sae: float
    nde: float
    nde_sqrt: float
    precision: float
    recall: float
    f1: float
    n: int
    on_threshold_w: float
    clipped: int
    tp: int
    fp: int
    fn: int
    tn: int

    @property
    def finite(self) -> bool:
        """True when every float metric is finite (False e.g. for NaN predictions or Σy = 0)."""
        return all(math.isfinite(getattr(self, k)) for k in (*HIGHER_IS_BETTER, *LOWER_IS_BETTER))

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe dict; non-finite floats become None (JSON has no NaN)."""
        return {k: _json_number(v) for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Metrics:
        """Inverse of :meth:`to_json` (None -> NaN)."""
        ints = {"n", "clipped", "tp", "fp", "fn", "tn"}
        try:
            fields: dict[str, Any] = {k: (int(d[k]) if k in ints else _float_or_nan(d[k])) for k in cls.__dataclass_fields__}
            return cls(**fields)
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"metrics record is malformed ({type(exc).__name__}: {exc})", "write it with Metrics.to_json") from None


@dataclass(frozen=True)
class MetricDelta:
    """How much worse ``candidate`` is than ``reference`` on one metric.

    ``delta`` is ``reference − candidate`` for higher-is-better metrics (EACC, F1,
    precision, recall) and ``candidate − reference`` for lower-is-better ones (MAE,
    RMSE, SAE, NDE): **a positive delta is a loss** either way. ``reference`` and
    ``candidate`` are in the metric's own units (EACC a fraction); ``delta`` is in
    ``unit``: percentage points for EACC/F1/precision/recall (as seed 003 reports
    them), W for MAE/RMSE, a plain fraction for SAE/NDE.
    """

    name: str
    reference: float
    candidate: float
    delta: float
    higher_is_better: bool
    unit: str

    def to_json(self) -> dict[str, Any]:
        return {k: _json_number(v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class ApplianceScores:
    """ON/OFF scores of one appliance (fractions) and its confusion counts."""

    name: str
    precision: float
    recall: float
    f1: float
    accuracy: float
    support: int  # truly-ON samples
    tp: int
    fp: int
    fn: int
    tn: int


@dataclass(frozen=True)
class ClassificationMetrics:
    """Metrics of an ON/OFF classifier over ``appliances`` (module docstring); fractions.

    ``eacc`` / ``mae`` are NaN: a classifier predicts no power (a consumer reading EACC finds it undefined).
    """

    f1w: float
    precision_w: float
    recall_w: float
    accuracy: float
    f1_macro: float
    subset_accuracy: float  # windows where every appliance's state is right
    per_appliance: tuple[ApplianceScores, ...]
    n: int
    decision_threshold: float
    task: str = "multilabel"

    @property
    def appliances(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.per_appliance)

    @property
    def eacc(self) -> float:
        return float("nan")

    @property
    def mae(self) -> float:
        return float("nan")

    @property
    def finite(self) -> bool:
        return all(math.isfinite(getattr(self, k)) for k in CLASSIFICATION_METRICS)

    def to_json(self) -> dict[str, Any]:
        d = {k: _json_number(getattr(self, k)) for k in (*CLASSIFICATION_METRICS, "subset_accuracy", "n", "decision_threshold", "task")}
        d["per_appliance"] = [{k: _json_number(v) for k, v in asdict(a).items()} for a in self.per_appliance]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ClassificationMetrics:
        """Inverse of :meth:`to_json` (None -> NaN)."""
        try:
            per = tuple(ApplianceScores(str(a["name"]), _float_or_nan(a["precision"]), _float_or_nan(a["recall"]), _float_or_nan(a["f1"]),
                                        _float_or_nan(a["accuracy"]), int(a["support"]), int(a["tp"]), int(a["fp"]), int(a["fn"]), int(a["tn"]))
                        for a in d["per_appliance"])
            return cls(_float_or_nan(d["f1w"]), _float_or_nan(d["precision_w"]), _float_or_nan(d["recall_w"]), _float_or_nan(d["accuracy"]),
                       _float_or_nan(d["f1_macro"]), _float_or_nan(d["subset_accuracy"]), per, int(d["n"]), float(d["decision_threshold"]),
                       str(d.get("task", "multilabel")))
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"classification metrics record is malformed ({type(exc).__name__}: {exc})",
                            "write it with ClassificationMetrics.to_json") from None


AnyMetrics = Metrics | ClassificationMetrics


def metrics_from_json(d: dict[str, Any]) -> AnyMetrics:
    """:meth:`Metrics.from_json` or :meth:`ClassificationMetrics.from_json`, by the record's shape."""
    return ClassificationMetrics.from_json(d) if "per_appliance" in d else Metrics.from_json(d)


# --------------------------------------------------------------------------- metrics


def classification_metrics(truth_w: np.ndarray, prob: np.ndarray, *, appliances: tuple[str, ...] | list[str],
                           on_thresholds_w: tuple[float, ...] | list[float], decision_threshold: float = 0.5,
                           task: str = "multilabel") -> ClassificationMetrics:
    """ON/OFF scores of probabilities ``prob`` ``(N, M)`` against ground-truth power ``truth_w`` ``(N, M)`` (W).

    An appliance is truly ON at ``power ≥ on_thresholds_w[m]`` and predicted ON at ``prob ≥ decision_threshold``
    (default 0.5). Non-finite probabilities count as predicted OFF and make ``finite`` False (NaN ``f1w``), so a
    broken artifact fails a gate rather than crashing it. Raises :class:`DataError` for empty, mismatched or
    non-finite ground truth, :class:`BadInputError` for a bad threshold.
    """
    y = _as_float_array(truth_w, "ground truth")
    p = _as_float_array(prob, "prediction")
    if y.ndim == 1:
        y = y[:, None]
    if p.ndim == 1:
        p = p[:, None]
    y, p = _pair(y, p, ("ground truth", "prediction"))
    names = [str(a) for a in appliances]
    thr = [_check_threshold(t) for t in on_thresholds_w]
    if y.ndim != 2 or not len(names) == len(thr) == y.shape[1]:
        raise DataError(f"classification scores need (N, M) arrays with M = {len(names)} appliances and thresholds, got {y.shape}",
                        "pass one column per appliance of the contract")
    if not np.all(np.isfinite(y)):
        raise DataError(f"ground truth has {int(np.sum(~np.isfinite(y)))} non-finite values", "drop or repair those samples")
    dt = float(decision_threshold)
    if not 0.0 < dt < 1.0:
        raise BadInputError(f"decision_threshold must lie in (0, 1), got {decision_threshold!r}", "use a probability such as 0.5")
    on_true = y >= np.asarray(thr)[None, :]
    on_pred = p >= dt  # NaN compares False: predicted OFF
    per = []
    for m, name in enumerate(names):
        precision, recall, f1, c = _confusion_scores(on_true[:, m], on_pred[:, m])
        per.append(ApplianceScores(name, precision, recall, f1, (c["tp"] + c["tn"]) / len(y), c["tp"] + c["fn"], **c))
    support = np.array([a.support for a in per], np.float64)

    def weighted(key: str) -> float:
        return float(np.dot(support, [getattr(a, key) for a in per]) / support.sum()) if support.sum() else 0.0

    nan = not np.all(np.isfinite(p))
    scores = {"f1w": weighted("f1"), "precision_w": weighted("precision"), "recall_w": weighted("recall"),
              "accuracy": float(np.mean([a.accuracy for a in per])), "f1_macro": float(np.mean([a.f1 for a in per]))}
    if nan:
        scores = {k: float("nan") for k in scores}
    return ClassificationMetrics(**scores, subset_accuracy=float(np.mean(np.all(on_true == on_pred, axis=1))), per_appliance=tuple(per),
                                 n=int(len(y)), decision_threshold=dt, task=task)


def nilm_metrics(y_true_w: np.ndarray, y_pred_w: np.ndarray, *, on_threshold_w: float) -> Metrics:
    """All metrics of one appliance: ``y_true_w`` and ``y_pred_w`` in W, shape ``(N,)`` or ``(N, 1)``.

    ``on_threshold_w`` (required, ≥ 0) defines ON as ``power ≥ on_threshold_w``.
    Predictions are clipped at 0 W first. Raises :class:`DataError` for empty,
    mismatched, multi-appliance or non-finite ground-truth input.
    """
    threshold = _check_threshold(on_threshold_w)
    y, p, clipped = _prepare(y_true_w, y_pred_w, single=True)
    err = p - y
    nde = _ratio(float(np.sum(err**2)), float(np.sum(y**2)))
    precision, recall, f1, counts = _on_state_scores(y, p, threshold)
    return Metrics(
        eacc=_eacc(y, p),
        mae=float(np.mean(np.abs(err))),
        rmse=float(np.sqrt(np.mean(err**2))),
        sae=_ratio(abs(float(np.sum(p)) - float(np.sum(y))), float(np.sum(y))),
        nde=nde,
        nde_sqrt=math.sqrt(nde) if nde >= 0 else float("nan"),
        precision=precision,
        recall=recall,
        f1=f1,
        n=int(y.size),
        on_threshold_w=threshold,
        clipped=clipped,
        **counts,
    )


def energy_accuracy(y_true_w: np.ndarray, y_pred_w: np.ndarray) -> float:
    """EACC ``1 − Σ_t Σ_m |p̂_m(t) − p_m(t)| / (2 Σ_t Σ_m p_m(t))`` over any shape.

    For several appliances pass ``(N, M)`` arrays (time × appliance): the sums run
    over both axes, as in seed 003. Predictions are clipped at 0 W; NaN when the
    total ground-truth energy is 0. Raises :class:`DataError` as :func:`nilm_metrics`.
    """
    y, p, _ = _prepare(y_true_w, y_pred_w, single=False)
    return _eacc(y, p)


def rmse(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Root mean squared difference of two prediction vectors (no clipping), in their units."""
    ref, cand = _pair(reference, candidate)
    return float(np.sqrt(np.mean((cand - ref) ** 2)))


def sqnr_db(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio ``10·log10(Σref² / Σ(ref − cand)²)`` in dB.

    Compares two prediction vectors (e.g. FP32 and INT8 outputs), no clipping.
    ``+inf`` when they are identical; ``−inf`` when the reference is all zero and
    the candidate is not. Raises :class:`DataError` for empty or mismatched input.
    """
    ref, cand = _pair(reference, candidate)
    signal = float(np.sum(ref**2))
    noise = float(np.sum((ref - cand) ** 2))
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    return 10.0 * math.log10(signal / noise)


def compare_metrics(reference: AnyMetrics, candidate: AnyMetrics) -> dict[str, float]:
    """Per-metric loss of ``candidate`` against ``reference``; **a positive delta is a loss**.

    ``reference − candidate`` for :data:`HIGHER_IS_BETTER` metrics (eacc, f1,
    precision, recall), in **percentage points** (EACC 0.8554 -> 0.8412 gives 1.42,
    as in seed 003 Table 7); ``candidate − reference`` for :data:`LOWER_IS_BETTER`
    ones: mae and rmse in W, sae, nde, nde_sqrt as fractions (:data:`DELTA_UNITS`).
    A NaN metric on either side gives NaN. :func:`metric_deltas` returns the same
    with both values and the unit attached.
    """
    return {name: d.delta for name, d in metric_deltas(reference, candidate).items()}


def metric_deltas(reference: AnyMetrics, candidate: AnyMetrics) -> dict[str, MetricDelta]:
    """Like :func:`compare_metrics`, as :class:`MetricDelta` records (values, delta, unit).

    For :class:`ClassificationMetrics`: :data:`CLASSIFICATION_METRICS` and ``f1.<appliance>`` per appliance,
    every one higher-is-better in percentage points.
    """
    out: dict[str, MetricDelta] = {}
    if isinstance(reference, ClassificationMetrics) or isinstance(candidate, ClassificationMetrics):
        if not (isinstance(reference, ClassificationMetrics) and isinstance(candidate, ClassificationMetrics)):
            raise DataError("cannot compare classification metrics with regression metrics", "score both with the same contract")
        pairs = [(k, float(getattr(reference, k)), float(getattr(candidate, k))) for k in CLASSIFICATION_METRICS]
        by_name = {a.name: a for a in candidate.per_appliance}
        pairs += [(f"f1.{a.name}", a.f1, by_name[a.name].f1 if a.name in by_name else float("nan")) for a in reference.per_appliance]
        return {k: MetricDelta(k, r, c, (r - c) * _POINTS, True, "pts") for k, r, c in pairs}
    for name in (*HIGHER_IS_BETTER, *LOWER_IS_BETTER):
        ref, cand = float(getattr(reference, name)), float(getattr(candidate, name))
        higher = name in HIGHER_IS_BETTER
        delta = (ref - cand) * _POINTS if higher else cand - ref
        out[name] = MetricDelta(name, ref, cand, delta, higher, DELTA_UNITS[name])
    return out


# --------------------------------------------------------------------------- internals


def _eacc(y: np.ndarray, p: np.ndarray) -> float:
    return 1.0 - _ratio(float(np.sum(np.abs(p - y))), 2.0 * float(np.sum(y)))


def _ratio(num: float, den: float) -> float:
    """``num / den``; NaN when ``den`` is 0 (the documented all-zero-ground-truth case)."""
    return num / den if den != 0.0 else float("nan")


def _on_state_scores(y: np.ndarray, p: np.ndarray, threshold: float) -> tuple[float, float, float, dict[str, int]]:
    return _confusion_scores(y >= threshold, p >= threshold)


def _confusion_scores(on_true: np.ndarray, on_pred: np.ndarray) -> tuple[float, float, float, dict[str, int]]:
    """Precision, recall, F1 (``zero_division=0``) and the confusion counts of two boolean vectors."""
    tp = int(np.sum(on_true & on_pred))
    fp = int(np.sum(~on_true & on_pred))
    fn = int(np.sum(on_true & ~on_pred))
    tn = int(np.sum(~on_true & ~on_pred))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1, {"tp": tp, "fp": fp, "fn": fn, "tn": tn}


def _check_threshold(on_threshold_w: float) -> float:
    try:
        threshold = float(on_threshold_w)
    except (TypeError, ValueError):
        threshold = float("nan")
    if not math.isfinite(threshold) or threshold < 0:
        raise BadInputError(f"on_threshold_w must be a finite number ≥ 0 W, got {on_threshold_w!r}",
                            "use the appliance's ON threshold, e.g. the contract's on_threshold_w")
    return threshold


def _as_float_array(a: Any, what: str) -> np.ndarray:
    try:
        arr = np.asarray(a, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{what} is not numeric ({exc})", "pass arrays of power in watts") from None
    if arr.size == 0:
        raise DataError(f"{what} is empty", "pass at least one sample")
    return arr


def _squeeze_single(arr: np.ndarray, what: str) -> np.ndarray:
    if arr.ndim == 2 and arr.shape[1] == 1:
        return arr[:, 0]
    if arr.ndim != 1:
        raise DataError(
            f"{what} has shape {arr.shape}; nilm_metrics takes one appliance, shape (N,) or (N, 1)",
            "call it per appliance, or use energy_accuracy for the multi-appliance EACC",
        )
    return arr


def _pair(a: Any, b: Any, names: tuple[str, str] = ("reference", "candidate")) -> tuple[np.ndarray, np.ndarray]:
    x, y = _as_float_array(a, names[0]), _as_float_array(b, names[1])
    if x.shape != y.shape:
        raise DataError(f"{names[0]} has shape {x.shape} but {names[1]} has {y.shape}", "pass predictions and targets for the same samples")
    return x, y


def _prepare(y_true_w: Any, y_pred_w: Any, *, single: bool) -> tuple[np.ndarray, np.ndarray, int]:
    """Validated, clipped (ground truth, prediction) in W and the number of clipped predictions."""
    y = _as_float_array(y_true_w, "ground truth")
    p = _as_float_array(y_pred_w, "prediction")
    if single:
        y, p = _squeeze_single(y, "ground truth"), _squeeze_single(p, "prediction")
    y, p = _pair(y, p, ("ground truth", "prediction"))
    if not np.all(np.isfinite(y)):
        raise DataError(f"ground truth has {int(np.sum(~np.isfinite(y)))} non-finite values", "drop or repair those samples")
    lowest = float(np.min(y))
    if lowest < -TRUTH_NEGATIVE_TOLERANCE_W:
        raise DataError(f"ground truth has negative power down to {lowest:.3g} W",
                        "physical power is ≥ 0 W: check the target de-normalization or clip the data")
    clipped = int(np.sum(p < 0))
    return np.maximum(y, 0.0), np.maximum(p, 0.0), clipped  # maximum keeps NaN predictions NaN


def _json_number(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _float_or_nan(v: Any) -> float:
    return float("nan") if v is None else float(v)


__all__ = [
    "AnyMetrics",
    "ApplianceScores",
    "CLASSIFICATION_METRICS",
    "ClassificationMetrics",
    "classification_metrics",
    "metrics_from_json",
    "DELTA_UNITS",
    "HIGHER_IS_BETTER",
    "LOWER_IS_BETTER",
    "MetricDelta",
    "Metrics",
    "TRUTH_NEGATIVE_TOLERANCE_W",
    "compare_metrics",
    "energy_accuracy",
    "metric_deltas",
    "nilm_metrics",
    "rmse",
    "sqnr_db",
]

"""Activation ranges chosen by the error they cause at the model output.

Two measured choices, both scored by the mean squared error of the model output
(model units) of the QDQ graph against FP32:

* :func:`select_estimators` — the range estimator **per activation tensor**, greedy in
  topological order: for each tensor every candidate (min-max, percentile, MSE,
  entropy) is tried with the other tensors kept at their current choice; the one with
  the lowest output error wins, but only when it beats the current choice by
  ``min_gain`` (default 2 %, so noise does not move a choice). Candidates that give the
  same scale and zero point as one already scored are not run again. The starting point
  (default all min-max) is scored first, so the result is never worse than it on the
  data it was measured on.
* :func:`select_headroom` — a range *headroom* factor ``h`` (ranges ``[lo*h, hi*h]``),
  cross-validated: the calibration windows are split into ``folds`` contiguous blocks,
  parameters are derived from the statistics of all blocks but one and scored on the
  left-out block, for every ``h`` in the grid; the ``h`` with the lowest summed held-out
  error wins (ties: the smaller). Why: a calibration set holds few independent appliance
  events, the evaluation data reach beyond its extremes, and a NILM metric is energy
  weighted, so clipping the rare high-power windows costs more than one bit of
  resolution. Held-out blocks measure that instead of guessing it. Graph outputs are
  never widened here (their range is the physical one, :func:`overflow.check_overflow`).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from nilmc.compiler.errors import QuantizationError
from nilmc.quantization import _ort
from nilmc.quantization.estimators import ESTIMATORS
from nilmc.quantization.graph import QuantGraph, analyze
from nilmc.quantization.params import QuantParams, activation_from_range, activation_quant, derive_params, replace_activation
from nilmc.quantization.qdq import build_qdq_model
from nilmc.quantization.statistics import Statistics, collect_statistics
from nilmc.quantization.traits import QuantTraits

CANDIDATES: tuple[str, ...] = ("minmax", "percentile", "mse", "entropy")
HEADROOM_GRID: tuple[float, ...] = (1.0, 1.25, 1.5, 2.0, 3.0)


def _graph(onnx_model: onnx.ModelProto) -> QuantGraph:
    m = onnx.ModelProto()
    m.CopyFrom(onnx_model)
    return analyze(m)


def output_error(onnx_model: onnx.ModelProto, params: QuantParams, x: np.ndarray, reference: np.ndarray) -> float:
    """Mean squared output error of the QDQ graph of ``params`` on ``x`` against ``reference`` (FP32 outputs)."""
    return _ort.mse(reference, _ort.output(build_qdq_model(onnx_model, params), x))


# --------------------------------------------------------------------------- per-tensor estimators
@dataclass
class SelectionResult:
    """Outcome of :func:`select_estimators`."""

    params: QuantParams
    choices: dict[str, str]  # tensor -> estimator
    errors: dict[str, dict[str, float]]  # tensor -> estimator -> output MSE when chosen for it
    start_error: float
    final_error: float
    evaluations: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {"choices": dict(self.choices), "start_mse": self.start_error, "final_mse": self.final_error,
                "evaluations": self.evaluations, "seconds": round(self.seconds, 3),
                "errors": {t: dict(e) for t, e in self.errors.items()}}


def select_estimators(
    onnx_model: onnx.ModelProto,
    stats: Statistics,
    traits: QuantTraits,
    x: np.ndarray,
    *,
    candidates: Sequence[str] = CANDIDATES,
    start: str = "minmax",
    exclude: Sequence[str] = (),
    min_gain: float = 0.02,
    estimator_options: Mapping[str, Mapping[str, Any]] | None = None,
    activation_dtypes: Mapping[str, str] | None = None,
    finalize: Callable[[QuantParams], QuantParams] | None = None,
    max_windows: int | None = 512,
) -> SelectionResult:
    """Greedy per-tensor estimator choice by model-output MSE on ``x`` (see the module docstring).

    ``x``: windows as the graph takes them (default: at most ``max_windows`` = 512 of them,
    evenly spaced, are used). ``candidates`` (default all four estimators); ``start``
    (default ``"minmax"``) the initial choice everywhere; ``exclude`` (default none) tensors
    kept at ``start``; ``min_gain`` (default 0.02) relative improvement needed to switch;
    ``finalize`` (default None) applied to every candidate's parameters before scoring
    (e.g. the output-range fix). Returns a :class:`SelectionResult` whose ``params`` equal
    ``derive_params(..., per_tensor_estimators=choices)`` (then ``finalize``).
    """
    unknown = [c for c in [*candidates, start] if c not in ESTIMATORS]
    if unknown:
        raise QuantizationError(f"unknown range estimators {unknown}", f"available: {', '.join(ESTIMATORS)}")
    t0 = time.perf_counter()
    g = _graph(onnx_model)
    x = _ort.subsample(x, max_windows)
    ref = _ort.output(onnx_model, x)
    options, dtypes = dict(estimator_options or {}), dict(activation_dtypes or {})
    done = finalize or (lambda p: p)
    choices = {t: start for t in g.quant_points}
    params = derive_params(onnx_model, stats, traits, estimator=start, estimator_options=options, activation_dtypes=dtypes)
    current = output_error(onnx_model, done(params), x, ref)
    start_error, evaluations = current, 1
    errors: dict[str, dict[str, float]] = {}
    for tensor in g.quant_points:
        if tensor in exclude:
            continue
        seen = {_key(params[tensor]): start}
        errors[tensor] = {choices[tensor]: current}
        for cand in candidates:
            tq = activation_quant(stats[tensor], traits, estimator=cand, options=options.get(cand), range_name=dtypes.get(tensor))
            if _key(tq) in seen:
                errors[tensor][cand] = errors[tensor][seen[_key(tq)]]
                continue
            seen[_key(tq)] = cand
            trial = replace_activation(params, tq, g)
            errors[tensor][cand] = err = output_error(onnx_model, done(trial), x, ref)
            evaluations += 1
            if err < current * (1.0 - min_gain):
                params, current, choices[tensor] = trial, err, cand
    final = derive_params(onnx_model, stats, traits, estimator=start, per_tensor_estimators=choices,
                          estimator_options=options, activation_dtypes=dtypes)
    final.estimator = "selected"
    return SelectionResult(done(final), choices, errors, start_error, current, evaluations, time.perf_counter() - t0)


def _key(tq: Any) -> tuple[Any, ...]:
    return (tq.scale, tq.zero_point, tq.range_name)


# --------------------------------------------------------------------------- headroom
def apply_headroom(params: QuantParams, onnx_model: onnx.ModelProto, stats: Statistics | None, headroom: float,
                   *, exclude: Sequence[str] = (), outputs: bool = False) -> QuantParams:
    """``params`` with every activation range except graph outputs (unless ``outputs``) and ``exclude`` widened to
    ``[lo*h, hi*h]``. Graph outputs are left to their physical range (0 W .. the contract's peak power,
    :func:`~nilmc.quantization.api.fit_output_range`); without one, the caller widens them too (``outputs=True``).

    Biases depending on a widened scale are re-derived; power-of-two targets choose the
    fix position on the tensor's histogram when ``stats`` are given. ``headroom`` 1 is a no-op.
    """
    if headroom < 1.0:
        raise QuantizationError(f"headroom must be >= 1, got {headroom}", "use 1 (none), 1.5 or 2")
    if headroom == 1.0:
        return params
    g = _graph(onnx_model)
    skip = (set() if outputs else set(g.outputs)) | set(exclude)
    out = params
    for t in g.quant_points:
        if t in skip:
            continue
        tq = out[t]
        hist = stats[t].histogram if stats is not None and t in stats else None
        new = activation_from_range(t, tq.lo[0] * headroom, tq.hi[0] * headroom, out.traits, rng=tq.rng, hist=hist,
                                    method=f"{tq.method}*{headroom:g}")
        out = replace_activation(out, new, g)
    return out


@dataclass
class HeadroomResult:
    """Outcome of :func:`select_headroom`."""

    headroom: float
    errors: dict[float, float]  # h -> held-out output MSE summed over folds
    folds: int
    seconds: float = 0.0
    fold_stats: list[Statistics] = field(default_factory=list, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {"headroom": self.headroom, "folds": self.folds, "seconds": round(self.seconds, 3),
                "heldout_mse": {f"{h:g}": e for h, e in self.errors.items()}}


def fold_blocks(n: int, folds: int) -> list[np.ndarray]:
    """Contiguous index blocks (windows of one event stay together)."""
    return np.array_split(np.arange(n), folds)


def select_headroom(
    onnx_model: onnx.ModelProto,
    x: np.ndarray,
    make_params: Callable[[Statistics], QuantParams],
    *,
    grid: Sequence[float] = HEADROOM_GRID,
    folds: int = 2,
    exclude: Sequence[str] = (),
    bins: int = 2048,
    max_windows: int | None = 1024,
) -> HeadroomResult:
    """Cross-validated headroom (see the module docstring).

    ``make_params(stats)`` derives the parameters from a fold's statistics (same estimators,
    output fix, ... as the final ones). ``grid`` (default 1, 1.25, 1.5, 2, 3); ``folds``
    (default 2, contiguous blocks of ``x``); at most ``max_windows`` (default 1024) windows
    of ``x`` are used. Needs at least 2 windows per fold.
    """
    if folds < 2 or len(x) < 2 * folds:
        raise QuantizationError(f"headroom cross-validation needs >= 2 folds of >= 2 windows, got {len(x)} windows and {folds} folds",
                                "pass more calibration windows or disable the headroom search")
    t0 = time.perf_counter()
    x = _ort.subsample(x, max_windows)
    errors = {float(h): 0.0 for h in grid}
    fold_stats = []
    for held in fold_blocks(len(x), folds):
        train = np.setdiff1d(np.arange(len(x)), held)
        stats = collect_statistics(onnx_model, x[train], bins=bins)
        fold_stats.append(stats)
        base = make_params(stats)
        ref = _ort.output(onnx_model, x[held])
        for h in errors:
            errors[h] += output_error(onnx_model, apply_headroom(base, onnx_model, stats, h, exclude=exclude), x[held], ref)
    best = min(errors, key=lambda h: (errors[h], h))
    return HeadroomResult(best, errors, folds, time.perf_counter() - t0, fold_stats)

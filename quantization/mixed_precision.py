"""Mixed-precision fallback driven by the task's metric, under a budget.

When the fully quantized model loses more than the budget allows (e.g. ``{"eacc": 0.5}``
points, or ``{"mae": 3.0}`` W for a lower-is-better metric; for an ON/OFF classifier
``{"f1w": 1.0}`` points of weighted F1; several at once are fine; the sign convention is
:func:`compiler.metrics.compare_metrics`: a positive delta is a loss), :func:`mixed_precision`
keeps the most harmful *units* at higher precision until the budget holds:

* a unit is a layer (its weights and its input activation), the graph output tensor, or an
  activation that feeds no layer (the input of an op nilmc leaves float, such as a GRU, or of
  pooling / attention arithmetic: keeping it float leaves that op's input unrounded);
* higher precision is int16 activations where the traits allow them
  (``traits.allow_int16_activations``; the layer's input or the output goes to int16,
  weights stay int8), otherwise FP32 (``QuantParams.keep_float``; ``build_qdq_model``
  leaves the unit float). ``fallback`` forces one or the other.

Algorithm (NNCF's accuracy control, simplified): score every unit alone at higher
precision with ``eval_fn`` (the sensitivity), rank units by the loss that remains, then
add them in that order, re-evaluating, until the budget holds or ``max_units`` is reached.
``eval_fn(onnx_model) -> Metrics`` computes the task's metrics (NILM metrics in watts, or a
classifier's :class:`~nilmc.compiler.metrics.ClassificationMetrics`) on data the caller chooses
(a validation split, not the evaluation set the result will be reported on);
:func:`nilmc.quantization.api.make_eval_fn` builds one from a contract. The result records, per
unit kept, the loss it alone removed (``sensitivity``) so a manifest can say why each stayed float.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import onnx

from nilmc.compiler.errors import QuantizationError
from nilmc.compiler.metrics import AnyMetrics, compare_metrics
from nilmc.quantization.graph import QuantGraph, analyze
from nilmc.quantization.intops import int_range
from nilmc.quantization.params import QuantParams, activation_from_range, replace_activation
from nilmc.quantization.qdq import build_qdq_model
from nilmc.quantization.statistics import Statistics

EvalFn = Callable[[onnx.ModelProto], AnyMetrics]
FALLBACKS = ("auto", "int16", "float")


def _graph(onnx_model: onnx.ModelProto) -> QuantGraph:
    m = onnx.ModelProto()
    m.CopyFrom(onnx_model)
    return analyze(m)


def violations(reference: AnyMetrics, candidate: AnyMetrics, budget: Mapping[str, float]) -> dict[str, float]:
    """Metric -> loss beyond its budget (only the violated ones; NaN counts as violated)."""
    deltas = compare_metrics(reference, candidate)
    out = {}
    for metric, limit in budget.items():
        if metric not in deltas:
            raise QuantizationError(f"budget names metric {metric!r}, which this model's metrics do not produce",
                                    f"use one of {', '.join(sorted(deltas))}")
        d = deltas[metric]
        if not d <= limit:
            out[metric] = d - limit if math.isfinite(d) else math.inf
    return out


def budget_loss(reference: AnyMetrics, candidate: AnyMetrics, budget: Mapping[str, float]) -> float:
    """One number to rank by: sum over budget metrics of ``delta / max(limit, tiny)`` (lower is better)."""
    deltas = compare_metrics(reference, candidate)
    total = 0.0
    for metric, limit in budget.items():
        d = deltas[metric]
        total += d / max(abs(limit), 1e-9) if math.isfinite(d) else math.inf
    return total


@dataclass(frozen=True)
class Unit:
    """A thing that can be kept at higher precision: a layer, or the graph output tensor."""

    name: str
    kind: str  # "layer" | "output" | "tensor"
    tensor: str  # the activation whose precision changes (layer input root, the output, or the tensor itself)


def units(g: QuantGraph) -> list[Unit]:
    """Every layer, every graph output that is a quantization point, and every other quantization point that no
    layer reads (graph inputs excluded), in that order."""
    out = [Unit(l.name, "layer", g.root(l.input)) for l in g.layers]
    out += [Unit(o, "output", o) for o in g.outputs if o in g.quant_points]
    read_by_layers = {g.root(l.input) for l in g.layers}
    out += [Unit(t, "tensor", t) for t in g.quant_points if t not in read_by_layers and t not in g.outputs and t not in g.inputs]
    return out


def raise_precision(params: QuantParams, unit: Unit, mode: str, g: QuantGraph, stats: Statistics | None) -> QuantParams:
    """``params`` with ``unit`` at int16 activations (``mode="int16"``) or FP32 (``"float"``)."""
    if mode == "float":
        adjusted = params.adjusted
        if unit.kind == "layer":  # a float layer has no weight error to correct: its bias-corrected bias would add one
            bias = g.layer_by_name(unit.name).bias
            adjusted = {k: v for k, v in params.adjusted.items() if k != bias}
        return replace(params, keep_float=tuple(dict.fromkeys([*params.keep_float, unit.name])), adjusted=adjusted)
    if stats is None:
        raise QuantizationError("int16 fallback needs the calibration statistics", "pass stats, or use fallback='float'")
    old = params[unit.tensor]  # keep its (possibly widened) range: only the resolution changes
    tq = activation_from_range(unit.tensor, old.lo[0], old.hi[0], params.traits, rng=int_range("int16"),
                               hist=stats[unit.tensor].histogram if unit.tensor in stats else None, method=f"{old.method}->int16")
    return replace_activation(params, tq, g)


def _mode(fallback: str, params: QuantParams) -> str:
    if fallback not in FALLBACKS:
        raise QuantizationError(f"unknown fallback {fallback!r}", f"use one of {', '.join(FALLBACKS)}")
    if fallback == "auto":
        return "int16" if params.traits.allow_int16_activations else "float"
    if fallback == "int16" and not params.traits.allow_int16_activations:
        raise QuantizationError(f"traits {params.traits.name!r} do not allow int16 activations", "use fallback='float' or 'auto'")
    return fallback


def _round(v: float) -> float | None:
    return round(v, 4) if math.isfinite(v) else None  # strict JSON: no inf/NaN in the manifest


@dataclass
class MixedPrecisionResult:
    """Outcome of :func:`mixed_precision`; truthy when the budget holds."""

    params: QuantParams
    reference: AnyMetrics
    initial: AnyMetrics
    final: AnyMetrics
    budget: dict[str, float]
    mode: str
    kept: list[str] = field(default_factory=list)  # units kept at higher precision, in the order added
    sensitivity: dict[str, float] = field(default_factory=dict)  # unit -> budget loss with it alone at higher precision
    why: list[dict[str, Any]] = field(default_factory=list)  # per unit kept: its kind and the budget losses around it
    evaluations: int = 0
    seconds: float = 0.0

    @property
    def met(self) -> bool:
        return not violations(self.reference, self.final, self.budget)

    def __bool__(self) -> bool:
        return self.met

    def to_json(self) -> dict[str, Any]:
        init, fin = compare_metrics(self.reference, self.initial), compare_metrics(self.reference, self.final)
        return {"met": self.met, "budget": dict(self.budget), "mode": self.mode, "kept": list(self.kept),
                "initial_deltas": {m: init[m] for m in self.budget}, "final_deltas": {m: fin[m] for m in self.budget},
                "sensitivity": {k: _round(v) for k, v in self.sensitivity.items()}, "why": list(self.why),
                "evaluations": self.evaluations, "seconds": round(self.seconds, 3)}


def mixed_precision(
    onnx_model: onnx.ModelProto,
    params: QuantParams,
    eval_fn: EvalFn,
    budget: Mapping[str, float],
    *,
    stats: Statistics | None = None,
    fallback: str = "auto",
    max_units: int | None = None,
    reference: AnyMetrics | None = None,
    candidates: Sequence[str] | None = None,
) -> MixedPrecisionResult:
    """Keep the fewest, most harmful units at higher precision until ``budget`` holds (module docstring).

    ``eval_fn`` scores an ONNX model in NILM metrics; ``reference`` (default
    ``eval_fn(onnx_model)``) is the FP32 score. ``fallback`` (default ``"auto"``: int16
    where the traits allow it, else float); ``max_units`` (default: all) bounds how many
    units may fall back; ``candidates`` (default all units) restricts them by name;
    ``stats`` are needed for int16. Never raises on a missed budget: check ``result.met``.
    """
    t0 = time.perf_counter()
    if not budget:
        raise QuantizationError("mixed precision needs a budget", "pass e.g. {'eacc': 0.5}")
    mode = _mode(fallback, params)
    g = _graph(onnx_model)
    ref = reference if reference is not None else eval_fn(onnx_model)
    initial = eval_fn(build_qdq_model(onnx_model, params))
    result = MixedPrecisionResult(params, ref, initial, initial, dict(budget), mode, evaluations=1)
    if not violations(ref, initial, budget):
        result.seconds = time.perf_counter() - t0
        return result
    pool = [u for u in units(g) if candidates is None or u.name in candidates]
    scored = {}
    for u in pool:
        m = eval_fn(build_qdq_model(onnx_model, raise_precision(params, u, mode, g, stats)))
        scored[u.name] = (budget_loss(ref, m, budget), u, m)
        result.evaluations += 1
    result.sensitivity = {n: s[0] for n, s in scored.items()}
    order = sorted(scored.values(), key=lambda s: s[0])
    current, metrics = params, initial
    loss0 = budget_loss(ref, initial, budget)
    for i, (alone_loss, unit, alone) in enumerate(order[: max_units if max_units is not None else len(order)]):
        current = raise_precision(current, unit, mode, g, stats)
        result.kept.append(unit.name)
        metrics = alone if i == 0 else eval_fn(build_qdq_model(onnx_model, current))
        result.evaluations += i > 0
        result.why.append({"unit": unit.name, "kind": unit.kind, "tensor": unit.tensor, "budget_loss_all_int8": _round(loss0),
                    "budget_loss_with_it_alone_kept": _round(alone_loss), "budget_loss_after": _round(budget_loss(ref, metrics, budget))})
        if not violations(ref, metrics, budget):
            break
    current = replace(current, provenance={**current.provenance, "mixed_precision": {
        "mode": mode, "kept": list(result.kept), "budget": dict(budget), "met": not violations(ref, metrics, budget), "why": list(result.why)}})
    result.params, result.final = current, metrics
    result.seconds = time.perf_counter() - t0
    return result


# --------------------------------------------------------------------------- output SQNR floor on the calibration set
@dataclass
class SqnrFallback:
    """What :func:`raise_until_sqnr` did: the output SQNR vs FP32 on the calibration windows before and after, and
    each unit kept at higher precision with the dB it gained when it was added (in that order)."""

    target_db: float
    initial_db: float
    final_db: float
    mode: str
    kept: list[str] = field(default_factory=list)
    gains_db: dict[str, float] = field(default_factory=dict)
    evaluations: int = 0

    @property
    def met(self) -> bool:
        return self.final_db >= self.target_db

    def to_json(self) -> dict[str, Any]:
        return {"target_db": self.target_db, "initial_db": _finite_db(self.initial_db), "final_db": _finite_db(self.final_db),
                "met": self.met, "mode": self.mode, "kept": list(self.kept),
                "gains_db": {k: round(v, 3) for k, v in self.gains_db.items()}, "evaluations": self.evaluations}


def _finite_db(v: float) -> float | None:
    return round(v, 3) if math.isfinite(v) else None


def raise_until_sqnr(
    onnx_model: onnx.ModelProto,
    params: QuantParams,
    x: Any,
    min_sqnr_db: float,
    *,
    stats: Statistics | None = None,
    fallback: str = "auto",
    max_units: int = 6,
    max_windows: int = 512,
) -> tuple[QuantParams, SqnrFallback]:
    """Keep units (see :func:`units`) at higher precision, greedily the one that raises the output SQNR vs FP32 on
    the calibration windows ``x`` most, until it reaches ``min_sqnr_db`` or ``max_units`` (default 6) are kept or no
    unit helps. Scored on at most ``max_windows`` (default 512) windows. Unlike the metric budget of
    :func:`mixed_precision`, the SQNR of 500 calibration windows is a stable signal: it steers models whose INT8 is
    broken outright (raw-scale inputs, whose per-tensor grids give most positions one code) and leaves a model whose
    INT8 already agrees with FP32 untouched (one evaluation)."""
    from nilmc.quantization import _ort

    mode = _mode(fallback, params)
    g = _graph(onnx_model)
    xs = x[:max_windows]
    ref = _ort.output(onnx_model, xs)

    def score(p: QuantParams) -> float:
        return float(_ort.sqnr_db(ref, _ort.output(build_qdq_model(onnx_model, p), xs)))

    now = score(params)
    res = SqnrFallback(min_sqnr_db, now, now, mode, evaluations=1)
    current = params
    pool = [u for u in units(g) if u.name not in params.keep_float]
    while now < min_sqnr_db and pool and len(res.kept) < max_units:
        scored = [(score(raise_precision(current, u, mode, g, stats)), i) for i, u in enumerate(pool)]
        res.evaluations += len(scored)
        best_db, i = max(scored)
        if best_db <= now:
            break
        unit = pool.pop(i)
        current = raise_precision(current, unit, mode, g, stats)
        res.kept.append(unit.name)
        res.gains_db[unit.name] = best_db - now
        now = best_db
    res.final_db = now
    if res.kept:
        current = replace(current, provenance={**current.provenance, "sqnr_fallback": res.to_json()})
    return current, res

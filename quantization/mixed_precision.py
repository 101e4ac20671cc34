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

Structural regions (:func:`structural_regions`, used by :func:`raise_until_sqnr`): the activations no weighted layer
reads, joined through the ops between them into connected regions of non-weighted arithmetic (a transformer's residual
adds and decomposed LayerNorm, softmax, the bias adds tf2onnx leaves after a reshape). One such region loses little
alone but cannot be quantized piecewise: LayerNorm's ``x - mean(x)`` cancels only when both sides share one grid, so
keeping one of its tensors float at a time gains nothing. The SQNR floor therefore first tries them float *as a group*
(ModelOpt's default for transformers: INT8 only at the inputs of weighted layers, and of activation x activation
MatMuls where that costs nothing), then goes on one unit at a time.
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
from nilmc.quantization.params import QuantParams, activation_from_range, bias_quant, replace_activation
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


# --------------------------------------------------------------------------- structural regions
MATMUL_OPS = frozenset({"MatMul", "Gemm", "Conv"})


@dataclass(frozen=True)
class Region:
    """A connected region of non-weighted ops: its quantization points (none of them read by a weighted layer), the
    op types that produce them, those of them that a MatMul/Gemm of two activations reads (``matmul_inputs``), and
    the outputs of MatMul/Gemm/Conv ops inside it (``matmul_outputs``: float only with their op, :func:`_float_closure`)."""

    tensors: tuple[str, ...]
    ops: tuple[str, ...]
    matmul_inputs: tuple[str, ...] = ()
    matmul_outputs: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"tensors": list(self.tensors), "ops": list(self.ops), "matmul_inputs": list(self.matmul_inputs),
                "matmul_outputs": list(self.matmul_outputs)}


def _matmul_outputs(g: QuantGraph, onnx_model: onnx.ModelProto) -> dict[str, tuple[str | None, list[str]]]:
    """Quantization points no layer reads that a weighted layer or an activation x activation MatMul/Gemm/Conv writes
    -> (the layer's name or None, the activations it reads)."""
    read_by_layers = {g.root(l.input) for l in g.layers}
    out: dict[str, tuple[str | None, list[str]]] = {l.output: (l.name, [l.input]) for l in g.layers}
    weighted = {l.name for l in g.layers}
    for node in onnx_model.graph.node:
        if node.op_type in MATMUL_OPS and node.name not in weighted and node.output:
            out[node.output[0]] = (None, [i for i in node.input[:2] if i not in g.constants])
    return {t: v for t, v in out.items() if t in g.quant_points and t not in read_by_layers and t not in g.outputs}


def structural_regions(onnx_model: onnx.ModelProto) -> list[Region]:
    """The quantization points that no weighted layer reads (graph inputs and outputs excluded), grouped into
    connected regions: two such tensors are joined when one op reads the one and writes the other. Found from the
    graph alone (:func:`graph.analyze`), in topological order; empty for a plain CNN, where every quantization point
    feeds a layer.

    The output of a MatMul/Gemm/Conv that runs in INT8 keeps its Q/DQ (integer kernels requantize it anyway), so it is
    listed apart (``matmul_outputs``): measured on the cloud Transformer, OpenVINO ran INT8 Gemms whose output was left
    float at 3-8 dB output SQNR where onnxruntime ran the same QDQ graph at 10 dB."""
    m = onnx.ModelProto()
    m.CopyFrom(onnx_model)
    g = analyze(m)
    weighted = {l.name for l in g.layers}
    read_by_layers = {g.root(l.input) for l in g.layers}
    members = [t for t in g.quant_points if t not in read_by_layers and t not in g.outputs and t not in g.inputs]
    if not members:
        return []
    mm_out = _matmul_outputs(g, m)
    parent = {t: t for t in members}

    def find(t: str) -> str:
        while parent[t] != t:
            parent[t] = parent[parent[t]]
            t = parent[t]
        return t

    producer: dict[str, str] = {}
    bmm_inputs: set[str] = set()
    for node in m.graph.node:
        roots = [g.root(t) for t in [*node.input, *node.output] if g.root(t) in parent]
        for r in roots[1:]:
            parent[find(r)] = find(roots[0])
        for o in node.output:
            if o in parent:
                producer[o] = node.op_type
        if node.op_type in MATMUL_OPS and node.name not in weighted:  # activation x activation (attention)
            bmm_inputs.update(g.root(t) for t in node.input[:2] if g.root(t) in parent)
    groups: dict[str, list[str]] = {}
    for t in members:
        groups.setdefault(find(t), []).append(t)
    return [Region(tuple(t for t in ts if t not in mm_out), tuple(sorted({producer.get(t, "?") for t in ts})),
                   tuple(t for t in ts if t in bmm_inputs and t not in mm_out), tuple(t for t in ts if t in mm_out))
            for ts in groups.values()]


def _float_closure(params: QuantParams, g: QuantGraph, onnx_model: onnx.ModelProto) -> QuantParams:
    """``params`` with the output of every MatMul/Gemm/Conv that already runs wholly in float (activation inputs float,
    and, for a weighted layer, the layer kept float) left float too; an INT8 one keeps its output's Q/DQ
    (:func:`structural_regions`)."""
    from nilmc.quantization.qdq import float_sets

    float_acts, _ = float_sets(g, params.keep_float)
    keep = set(params.keep_float)
    extra = [t for t, (layer, acts) in _matmul_outputs(g, onnx_model).items()
             if t not in float_acts and (layer is None or layer in keep) and acts and all(g.root(i) in float_acts for i in acts)]
    return _with_float(params, extra) if extra else params


def _without_bias_correction(params: QuantParams, g: QuantGraph) -> QuantParams:
    """``params`` with the graph's own biases again (``adjusted`` emptied, bias parameters re-derived from them)."""
    if not params.adjusted:
        return params
    out = replace(params, adjusted={})
    for layer in g.layers:
        if layer.bias in params.adjusted and layer.bias in out.tensors and layer.weight in out.tensors:
            out = out.with_tensor(bias_quant(layer.bias, g.constants[layer.bias], out[g.root(layer.input)],
                                             out.tensors[layer.weight], out.traits))
    return out


def _rebias(onnx_model: onnx.ModelProto, params: QuantParams, g: QuantGraph, x: Any, corrected: bool) -> tuple[QuantParams, str]:
    """Bias correction fitted for another placement is stale once the placement changes (measured on a Transformer:
    the all-INT8 correction of the head bias, 0.5, cost 10 dB once the residual stream was float). Drop it; where it
    was on, fit it again for this placement and keep it only when it lowers the held-out output error, as
    :func:`api.ptq_params` decides it."""
    from nilmc.quantization.bias_correction import bias_correction_pays, correct_bias

    plain = _without_bias_correction(params, g)
    if not corrected:
        return plain, "none"
    if len(x) < 8 or not bias_correction_pays(onnx_model, plain, x).pays:
        return plain, "dropped (refitted for the new placement, it did not lower the held-out error)"
    return correct_bias(onnx_model, plain, x).params, "refitted for the new placement (lowers the held-out error)"


def _with_float(params: QuantParams, names: Sequence[str]) -> QuantParams:
    return replace(params, keep_float=tuple(dict.fromkeys([*params.keep_float, *names])))


# The structural group keeps the inputs of activation x activation MatMuls in INT8 (ModelOpt's default) unless that costs
# more than this against keeping them float too.
BMM_TOLERANCE_DB = 0.5
# The group is taken only when it gains at least this much: on the CtRNN it gained 0.09 dB (10.23 -> 10.32), and whether
# such a gain was above or below zero flipped with the tf2onnx node names of the same weights, sending the greedy that
# follows down different paths (46 dB in one export, 17.6 dB in the other). The cloud model's group gains 6-14 dB.
STRUCTURAL_MIN_GAIN_DB = 0.5


def _structural_step(onnx_model: onnx.ModelProto, params: QuantParams, g: QuantGraph, x: Any, now: float,
                     score: Callable[[QuantParams], float]) -> tuple[QuantParams, dict[str, Any] | None, float, int]:
    """Every structural region float at once (the inputs of attention MatMuls INT8 where that costs at most
    :data:`BMM_TOLERANCE_DB`), bias correction refitted for that placement; taken when it raises the SQNR.
    Returns the parameters, the record (None when nothing was taken), the SQNR and the evaluations spent."""
    regions = [r for r in structural_regions(onnx_model) if not set(r.tensors) <= set(params.keep_float)]
    if not regions:
        return params, None, now, 0
    every = [t for r in regions for t in r.tensors]
    bmm = {t for r in regions for t in r.matmul_inputs}
    corrected = bool(params.adjusted)
    variants = [("all float", every)] + ([("attention MatMul inputs INT8", [t for t in every if t not in bmm])] if bmm else [])
    scored = []
    for label, names in variants:
        cand, bias = _rebias(onnx_model, _float_closure(_with_float(params, names), g, onnx_model), g, x, corrected)
        names = [t for t in cand.keep_float if t not in params.keep_float]
        scored.append((score(cand), label, names, cand, bias))
    best = max(s[0] for s in scored)
    pick = scored[-1] if scored[-1][0] >= best - BMM_TOLERANCE_DB else scored[0]  # prefer more INT8 when it is as good
    db, label, names, cand, bias = pick
    if db < now + STRUCTURAL_MIN_GAIN_DB:
        return params, None, now, len(scored)
    record = {"variant": label, "db_before": _finite_db(now), "db_after": _finite_db(db), "gain_db": round(db - now, 3),
              "variants_db": {s[1]: _finite_db(s[0]) for s in scored}, "bias_correction": bias,
              "float_tensors": list(names), "regions": [r.to_json() for r in regions]}
    return cand, record, db, len(scored)


# --------------------------------------------------------------------------- output SQNR floor on the calibration set
@dataclass
class SqnrFallback:
    """What :func:`raise_until_sqnr` did: the output SQNR vs FP32 on the calibration windows before and after, the
    structural regions kept float as a group (``structural``, or None), and each unit kept at higher precision with
    the dB it gained when it was added (in that order)."""

    target_db: float
    initial_db: float
    final_db: float
    mode: str
    kept: list[str] = field(default_factory=list)
    gains_db: dict[str, float] = field(default_factory=dict)
    evaluations: int = 0
    structural: dict[str, Any] | None = None
    with_their_op: dict[str, str] = field(default_factory=dict)  # MatMul output left float -> the kept unit it runs with
    search: dict[str, Any] | None = None  # the search from every unit float, when the greedy stalled under the floor

    @property
    def met(self) -> bool:
        return self.final_db >= self.target_db

    def to_json(self) -> dict[str, Any]:
        return {"target_db": self.target_db, "initial_db": _finite_db(self.initial_db), "final_db": _finite_db(self.final_db),
                "met": self.met, "mode": self.mode, "kept": list(self.kept),
                "gains_db": {k: round(v, 3) for k, v in self.gains_db.items()}, "evaluations": self.evaluations,
                "structural": self.structural, "with_their_op": dict(self.with_their_op),
                **({"search": self.search} if self.search is not None else {})}


def calibration_sqnr_db(onnx_model: onnx.ModelProto, params: QuantParams, x: Any, *, max_windows: int = 512,
                        step: Any = None) -> float:
    """Output SQNR vs FP32 of ``params``' QDQ model on at most ``max_windows`` windows of ``x``: what the calibration
    SQNR floor (:func:`raise_until_sqnr`) measures, for a backend that checks its deployed parameters against it
    (``step``: the selected step of a sequence output, :data:`~nilmc.quantization._ort.OutputStep`)."""
    from nilmc.quantization import _ort

    xs = x[:max_windows]
    return float(_ort.sqnr_db(_ort.output(onnx_model, xs, step=step), _ort.output(build_qdq_model(onnx_model, params), xs, step=step)))


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
    structural: bool = True,
    max_evaluations: int = 400,
    step: Any = None,
) -> tuple[QuantParams, SqnrFallback]:
    """Keep units (see :func:`units`) at higher precision, greedily the one that raises the output SQNR vs FP32 on
    the calibration windows ``x`` most, until it reaches ``min_sqnr_db`` or ``max_units`` (default 6) are kept or no
    unit helps. Scored on at most ``max_windows`` (default 512) windows. Unlike the metric budget of
    :func:`mixed_precision`, the SQNR of 500 calibration windows is a stable signal: it steers models whose INT8 is
    broken outright (raw-scale inputs, whose per-tensor grids give most positions one code) and leaves a model whose
    INT8 already agrees with FP32 untouched (one evaluation).

    ``structural`` (default True): below the floor, first keep the :func:`structural_regions` float as one group
    (module docstring; bias correction refitted for that placement) when that raises the SQNR; the greedy goes on
    from there. A model without such regions (a plain CNN) is scored exactly as before.

    When the greedy ends under the floor (no region kept, FP32 fallback), the search goes from the other end: every
    unit float, then back to INT8 the unit with the most MACs that keeps the floor, until none does (at most
    ``max_evaluations`` scorings, default 400). Its placement is taken when it leaves at least
    :data:`BACK_SEARCH_MIN_INT8_SHARE` of the weighted layers' MACs in INT8; otherwise the greedy's stays, and
    :func:`sqnr_floor_hint` gives the failed gate its reason. Either way ``res.search`` records it.

    ``step`` (default None: the whole output): a sequence model's selected output step
    (:data:`~nilmc.quantization._ort.OutputStep`), the only one its artifacts are judged on. Scored over the whole
    sequence, a ConvTranspose seq2seq model met the floor at 33.8 dB while its midpoint was at 23.3 dB (gate failed)."""
    from nilmc.quantization import _ort

    mode = _mode(fallback, params)
    g = _graph(onnx_model)
    xs = x[:max_windows]
    ref = _ort.output(onnx_model, xs, step=step)

    def score(p: QuantParams) -> float:
        return float(_ort.sqnr_db(ref, _ort.output(build_qdq_model(onnx_model, p), xs, step=step)))

    now = score(params)
    res = SqnrFallback(min_sqnr_db, now, now, mode, evaluations=1)
    current = params
    if structural and now < min_sqnr_db:
        current, res.structural, now, spent = _structural_step(onnx_model, current, g, xs, now, score)
        res.evaluations += spent
    # a MatMul output is float only with its MatMul (_float_closure): never a unit of its own once regions exist
    skip = set(_matmul_outputs(g, onnx_model)) if res.structural is not None else set()
    pool = [u for u in units(g) if u.name not in current.keep_float and u.name not in skip]

    def raised(p: QuantParams, u: Unit) -> QuantParams:
        q = raise_precision(p, u, mode, g, stats)
        return _float_closure(q, g, onnx_model) if res.structural is not None and mode == "float" else q

    while now < min_sqnr_db and pool and len(res.kept) < max_units:
        scored = [(score(raised(current, u)), i) for i, u in enumerate(pool)]
        res.evaluations += len(scored)
        best_db, i = max(scored)
        if best_db <= now:
            break
        unit = pool.pop(i)
        before = set(current.keep_float)
        current = raised(current, unit)
        res.with_their_op.update({t: unit.name for t in current.keep_float if t not in before and t != unit.name})
        res.kept.append(unit.name)
        res.gains_db[unit.name] = best_db - now
        now = best_db
    if now < min_sqnr_db and mode == "float" and res.structural is None:
        # The greedy stalls where the loss is spread over many layers (a resolution-bound model on a symmetric grid:
        # the CtRNN on tensorrt:int8 stopped at 13.4 dB, no single unit raising it). Search from the other end: every
        # unit float, then back to INT8 the one worth the most MACs that keeps the floor, until none can.
        back = _int8_back_under_floor(onnx_model, params, [u for u in units(g) if u.name not in params.keep_float],
                                      min_sqnr_db, score, max_evaluations=max_evaluations, layers=g.layers)
        res.evaluations += back.evaluations
        res.search = back.to_json()
        # An "INT8" artifact with a few percent of its MACs in INT8 is a float model under another name: then the
        # target keeps the greedy's parameters, fails its gate and says why (sqnr_floor_hint), e.g. the example
        # CtRNN on tensorrt:int8: no single convolution stays over 30 dB at INT8 (0.3 % of MACs could go back).
        if back.params is not None and back.int8_share >= BACK_SEARCH_MIN_INT8_SHARE:
            current, now = back.params, back.final_db
            res.kept = list(back.float_units)
            res.gains_db = {}
            res.search["accepted"] = True
    res.final_db = now
    if res.kept or res.structural is not None or res.search is not None:
        current = replace(current, provenance={**current.provenance, "sqnr_fallback": res.to_json()})
    return current, res


# The least share of a model's weighted-layer MACs the search from all-float must bring back to INT8 for its placement
# to be taken (a judgement, not a measurement: below it the artifact is a float model; see raise_until_sqnr).
BACK_SEARCH_MIN_INT8_SHARE = 0.25


@dataclass
class _BackSearch:
    params: QuantParams | None  # None: even every unit float misses the floor (what stays is on no unit's grid)
    final_db: float
    float_units: list[str]
    order: list[tuple[str, float]]  # units returned to INT8, with the calibration SQNR after each
    evaluations: int
    capped: bool
    int8_share: float = 0.0  # of the weighted layers' MACs, at the end of the search

    def to_json(self) -> dict[str, Any]:
        return {"direction": "from float", "int8_order": [{"unit": n, "db": _finite_db(db)} for n, db in self.order],
                "final_db": _finite_db(self.final_db), "int8_macs_share": round(self.int8_share, 4),
                "min_int8_macs_share": BACK_SEARCH_MIN_INT8_SHARE, "accepted": False, "evaluations": self.evaluations,
                "capped": self.capped}


def _int8_back_under_floor(onnx_model: onnx.ModelProto, params: QuantParams, pool: Sequence[Unit], min_sqnr_db: float,
                           score: Callable[[QuantParams], float], *, max_evaluations: int, layers: Sequence[Any]) -> _BackSearch:
    """Start with every unit of ``pool`` float; repeatedly return to INT8 the unit with the most MACs (then the best
    SQNR) among those that keep the calibration SQNR at ``min_sqnr_db``; stop when none does or after
    ``max_evaluations`` scorings. Units that compute nothing (activations between float ops) go back last."""
    from nilmc.compiler.cost import node_macs, tensor_shapes

    shapes = tensor_shapes(onnx_model)
    nodes = {n.name: n for n in onnx_model.graph.node}
    layer_macs = {l.name: node_macs(nodes[l.name], shapes) if l.name in nodes else 0 for l in layers}
    macs = {u.name: layer_macs.get(u.name, 0) if u.kind == "layer" else 0 for u in pool}
    total = sum(layer_macs.values()) or 1
    floating = [u.name for u in pool]

    start = _with_float(params, floating)
    now, spent = score(start), 1
    if now < min_sqnr_db:
        return _BackSearch(None, now, floating, [], spent, False, 0.0)
    order: list[tuple[str, float]] = []
    capped = False
    while floating:
        if spent + len(floating) > max_evaluations:
            capped = True
            break
        scored = [(score(_with_float(params, [n for n in floating if n != name])), name) for name in floating]
        spent += len(scored)
        ok = [(macs[name], db, name) for db, name in scored if db >= min_sqnr_db]
        if not ok:
            break
        _, now, name = max(ok)
        floating.remove(name)
        order.append((name, now))
    in_float = set(floating) | set(params.keep_float)
    share = sum(m for name, m in layer_macs.items() if name not in in_float) / total
    return _BackSearch(_with_float(params, floating), now, floating, order, spent, capped, share)


def sqnr_floor_hint(params: QuantParams) -> str | None:
    """One line for a failed gate when the calibration SQNR floor was not met (``provenance["sqnr_fallback"]``):
    where the INT8 output stood and, when the search from all-float ran, how little it could bring back to INT8."""
    sf = params.provenance.get("sqnr_fallback") or {}
    if not sf or sf.get("met", True):
        return None
    line = (f"the calibration SQNR floor ({sf.get('target_db'):g} dB) was not met: INT8 output {sf.get('initial_db')} -> "
            f"{sf.get('final_db')} dB vs FP32 with {len(sf.get('kept', ()))} unit(s) kept float")
    back = sf.get("search") or {}
    if back and back.get("final_db") is not None and back["final_db"] < sf.get("target_db", 0.0):
        line += f"; with every unit float it is still {back['final_db']} dB (the rounding left is on the graph input)"
    elif back and not back.get("accepted"):
        line += (f"; from every unit float, only {100 * back.get('int8_macs_share', 0.0):.1f} % of the weighted layers' MACs could "
                 f"go back to INT8 while the floor held (placement not taken: under "
                 f"{100 * back.get('min_int8_macs_share', BACK_SEARCH_MIN_INT8_SHARE):.0f} %): this model's INT8 does not hold on "
                 f"this target's grids; use its fp16/fp32 precision, or a target with asymmetric or 16-bit activations")
    return line


# --------------------------------------------------------------------------- a float prefix under the floor
@dataclass
class FloatPrefix:
    """What :func:`grow_float_prefix` did: ``layers`` added to ``keep_float`` (graph order, each -> why), the calibration
    SQNR after each step, whether the floor was met, and why the growth stopped."""

    params: QuantParams
    layers: dict[str, str]
    steps: list[dict[str, Any]]
    floor_db: float
    met: bool
    stop: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"floor_db": self.floor_db, "met": self.met, "layers": list(self.layers), "steps": list(self.steps),
                "min_int8_macs_share": BACK_SEARCH_MIN_INT8_SHARE, **({"stop": self.stop} if self.stop else {}),
                "measured_on": "nilmc's QDQ reference of each placement (onnxruntime), calibration windows"}


def _weighted_order(onnx_model: onnx.ModelProto, g: QuantGraph) -> tuple[list[str], dict[str, set[str]], dict[str, int]]:
    """The weighted layers in graph order, the weighted layers each one needs (its ancestors), and their MACs."""
    from nilmc.compiler.cost import node_macs, tensor_shapes

    shapes = tensor_shapes(onnx_model)
    layer_names = {l.name for l in g.layers}
    producer = {o: n for n in onnx_model.graph.node for o in n.output}
    needs: dict[str, set[str]] = {}
    for node in onnx_model.graph.node:
        if node.name not in layer_names:
            continue
        seen, todo, found = set(), [i for i in node.input if i in producer], set()
        while todo:
            t = todo.pop()
            if t in seen:
                continue
            seen.add(t)
            p = producer[t]
            if p.name in layer_names:
                found.add(p.name)
            todo += [i for i in p.input if i in producer]
        needs[node.name] = found
    order = [n.name for n in onnx_model.graph.node if n.name in layer_names]
    macs = {n.name: node_macs(n, shapes) for n in onnx_model.graph.node if n.name in layer_names}
    return order, needs, macs


def grow_float_prefix(onnx_model: onnx.ModelProto, params: QuantParams, x: Any, min_sqnr_db: float, *, max_windows: int = 512,
                      min_int8_share: float = BACK_SEARCH_MIN_INT8_SHARE, step: Any = None) -> FloatPrefix:
    """For a target that can run only a prefix of the model in float before its integer graph (TFLite's and eIQ's
    precise input: the float layers first, then one QUANTIZE into the int8 graph), the calibration SQNR floor as that
    target can hold it: while ``params``' QDQ output is under ``min_sqnr_db`` vs FP32 on the calibration windows ``x``,
    keep float the next weighted layer in graph order whose weighted ancestors are all float already, measuring each
    step; stop when the floor holds, no such layer is left, or fewer than ``min_int8_share`` of the weighted layers' MACs
    would stay INT8. The shortest prefix that holds the floor is taken, else the best measured (the original when no
    step raised the SQNR). Measured on the A model (raw watts in, shipped evaluation set, calibration draw 0): 28.8 dB
    with conv1 float, 40.8 dB with conv1-3, the placement the greedy of the QDQ targets reached there too."""
    from nilmc.quantization import _ort

    xs = x[:max_windows]
    ref = _ort.output(onnx_model, xs, step=step)

    def score(p: QuantParams) -> float:
        return float(_ort.sqnr_db(ref, _ort.output(build_qdq_model(onnx_model, p), xs, step=step)))

    g = _graph(onnx_model)
    order, needs, macs = _weighted_order(onnx_model, g)
    total = sum(macs.values()) or 1
    floats = set(params.keep_float)
    now = score(params)
    before: list[str | None] = [None, *(n for n in order if n in floats)]
    steps = [{"through": before[-1], "sqnr_db": _finite_db(now),
              "int8_macs_share": round(sum(m for n, m in macs.items() if n not in floats) / total, 4)}]
    res = FloatPrefix(params, {}, steps, float(min_sqnr_db), now >= min_sqnr_db)
    best, best_db, current, added = params, now, params, {}
    while now < min_sqnr_db:
        layer = next((n for n in order if n not in floats and needs[n] <= floats), None)
        if layer is None:
            res.stop = "no further layer has all its weighted ancestors in float"
            break
        share = sum(m for n, m in macs.items() if n not in floats and n != layer) / total
        if share < min_int8_share:
            res.stop = (f"with {layer} float too, {100 * share:.1f} % of the weighted layers' MACs would stay INT8, under "
                        f"{100 * min_int8_share:.0f} %")
            break
        why = (f"calibration SQNR floor: {now:.1f} dB vs FP32 on the calibration windows with the layers before it float, under "
               f"the {min_sqnr_db:g} dB floor: runs in FP32 before the integer graph (a float prefix)")
        floats.add(layer)
        added[layer] = why
        current = _with_float(current, [layer])
        now = score(current)
        steps.append({"through": layer, "sqnr_db": _finite_db(now), "int8_macs_share": round(share, 4)})
        if now > best_db:
            best, best_db, res.layers = current, now, dict(added)
    res.met = best_db >= min_sqnr_db
    if res.layers:
        res.params = replace(best, provenance={**best.provenance, "float_prefix": res.to_json()})
    return res

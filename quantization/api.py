"""``quantize(model, calib)``: normalization-aware post-training quantization in one call.

The pipeline (each step measured, recorded in the result and in ``params.provenance``):

1. **Normalization check** — the calibration windows against the contract's declared
   normalization (:func:`normalization_check.check_normalization`; raw watts fed to a
   z-score model raise :class:`NormalizationError`).
2. **Folding** (``fold_normalization=True``) — the input normalization and the target
   de-normalization go into the graph (:mod:`fold`); the artifact takes raw features and
   returns watts. For the INT8 graph the input side is an explicit float Mul/Add, so the
   normalized tensor is what gets quantized (raw features would lose their small ones).
3. **Statistics** — one FP32 pass (:func:`statistics.collect_statistics`).
4. **Ranges** — ``estimator="auto"``: per-tensor estimator chosen by model-output error
   (:func:`selection.select_estimators`); then a cross-validated range headroom
   (:func:`selection.select_headroom`); the output range always covers 0 W .. the
   contract's peak power, so the regression head never clips.
5. **Bias correction** — per-channel, kept only when it lowers the held-out output error
   (:mod:`bias_correction`).
6. **Overflow checks** — :func:`overflow.check_overflow` under ``overflow_policy`` plus the
   per-feature input check for unnormalized models (:func:`normalization_check.check_feature_scales`);
   ``"fix"`` repairs a starved input with a per-feature rescaling stage folded into the first layer
   (:func:`io_affine.repair_input_scales`, then quantizes the repaired model; needs a data set, not bare
   windows), and keeps the layers reading it at FP32 only where that repair cannot be done.
7. **Mixed precision** (``budget`` given) — :func:`mixed_precision.mixed_precision` with
   ``eval_fn`` (default: NILM metrics on the calibration set itself when it carries targets).
8. **The ideal INT8 reference** — :func:`qdq.build_qdq_model` of the final parameters.

:class:`Techniques` groups the rare knobs; :func:`ptq_params` is the parameter part of the
pipeline (steps 4–5, 7) that :class:`context.QuantContext` runs for every backend.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from nilmc.compiler.errors import DataError, QuantizationError
from nilmc.quantization import _ort
from nilmc.quantization.bias_correction import BiasCorrectionCheck, BiasCorrectionResult, bias_correction_pays, correct_bias
from nilmc.quantization.estimators import ESTIMATORS
from nilmc.quantization.graph import analyze, input_layers, input_readers
from nilmc.quantization.mixed_precision import MixedPrecisionResult, SqnrFallback, Unit, mixed_precision, raise_precision, raise_until_sqnr
from nilmc.quantization.params import QuantParams, TensorQuant, activation_from_range, derive_params, replace_activation
from nilmc.quantization.selection import (
    CANDIDATES,
    HEADROOM_GRID,
    HeadroomResult,
    SelectionResult,
    apply_headroom,
    select_estimators,
    select_headroom,
)
from nilmc.quantization.statistics import Statistics, collect_statistics
from nilmc.quantization.traits import GENERIC_INT8, QuantTraits

if TYPE_CHECKING:
    from nilmc.calibration_data.dataset import NilmDataset
    from nilmc.compiler.contract import ModelContract
    from nilmc.compiler.metrics import AnyMetrics
    from nilmc.compiler.model import Model
    from nilmc.quantization.fold import FoldResult
    from nilmc.quantization.normalization_check import FeatureScaleReport, NormalizationReport
    from nilmc.quantization.overflow import OverflowReport

EvalFn = Callable[[onnx.ModelProto], "AnyMetrics"]
SYMMETRIC_RANGE_RULES = ("coverage", "global")  # Techniques.symmetric_ranges


@dataclass(frozen=True)
class Techniques:
    """Accuracy techniques and their knobs (the advanced options of :func:`quantize` and ``QuantContext``).

    Defaults: ``select_estimators`` True (per-tensor choice among ``candidates`` = min-max,
    percentile, MSE, entropy, switching only for a ``min_gain`` of 2 %); ``headroom`` False
    (when on: cross-validated over ``headroom_grid`` = 1, 1.25, 1.5, 2, 3 with ``folds`` = 2);
    ``bias_correction`` True, kept only when ``only_if_better`` (True) holds on held-out
    windows; ``fit_output_range`` True (output covers 0 W .. peak power); ``max_windows``
    512 windows per scoring run; ``check_normalization`` True with
    ``normalization_policy`` ``"error"``; ``budget`` None (no mixed precision; e.g.
    ``{"eacc": 0.5}``) with ``fallback`` ``"auto"`` (int16 where the traits allow it,
    else float) and ``max_fallback_units`` None (no limit); ``precise_input`` True with
    ``deployment_headroom`` 1.5 (``symmetric_headroom`` 1.0 on symmetric activation grids, ``classifier_headroom``
    1.0 for ON/OFF classifiers; only where ``traits.float_layers``).
    """

    select_estimators: bool = True
    candidates: tuple[str, ...] = CANDIDATES
    min_gain: float = 0.02
    # Off by default: on the shipped T-P model the cross-validated headroom picked x3 ranges and cut
    # output SQNR vs FP32 from 33.7 to 17.9 dB (generic INT8; TensorRT INT8 delta 0.22 -> 1.53 EACC pts).
    headroom: bool = False
    headroom_grid: tuple[float, ...] = HEADROOM_GRID
    folds: int = 2
    bias_correction: bool = True
    only_if_better: bool = True
    fit_output_range: bool = True
    max_windows: int = 512
    check_normalization: bool = True
    normalization_policy: str = "error"
    budget: Mapping[str, float] | None = None
    fallback: str = "auto"
    max_fallback_units: int | None = None
    # Where the traits allow float layers (``traits.float_layers``): the layers reading the graph input stay
    # float, so the input is never quantized, and every other activation range gets ``deployment_headroom``.
    # Measured on the shipped model over the shipped draw and 5 consecutive 1000-window draws of a 20,000-window
    # pool (benchmarks/bench_calibration_draws.py): output SQNR worst draw 13.1 -> 34.5 dB, shipped draw 33.1 ->
    # 34.5 dB; the input's 8-bit grid was the cap (it clips the evaluation's 5-sigma tails or, widened, loses
    # resolution), and without it 1.5x headroom costs far less than the clipping it prevents (asymmetric
    # activation grids only: see ptq_params).
    precise_input: bool = True
    deployment_headroom: float = 1.5
    # The same on symmetric activation grids (TensorRT), where a ReLU output already wastes its negative half. Off by
    # default: tensorrt_int8 over the shipped draw + 4 consecutive draws, 1.0 -> 1.25 gave SQNR mean 27.5 -> 31.7 dB,
    # worst 20.0 -> 22.3 dB, |dEACC| max 1.05 -> 0.57 points, but the shipped draw fell 35.7 -> 32.9 dB and the
    # FP32-identical raw-input variant then landed 1.06 dB away from the z-score model (33.6 vs 32.5 dB: the choice
    # of estimators flips on float rounding), over the 1 dB the raw-input check allows; 1.5 cost 6.9 dB.
    symmetric_headroom: float = 1.0
    # How symmetric 8-bit grids (TensorRT) get their ranges under precise input (regression models): "coverage"
    # (default) decides per tensor (symmetric_ranges.deployment_ranges): the calibration min/max times
    # ``deployment_headroom``, a tensor returned to its estimator's range only while the calibration SQNR is under
    # ``min_calib_sqnr``; "global": every range times ``symmetric_headroom`` (the rule before). Shipped z-score T-P model,
    # tensorrt:int8, 5 draws of 1000 windows (benchmarks/bench_vendors.py): see symmetric_ranges.py's docstring.
    symmetric_ranges: str = "coverage"
    # ON/OFF classifiers (contract task binary/multilabel) on 8-bit grids: no deployment headroom (see ptq_params).
    classifier_headroom: float = 1.0
    # On 16-bit activation grids (tflite:int16x8) resolution is plentiful and clipping is what costs: there the headroom
    # is this. Measured on the shipped draw (tflite:int16x8, evaluation SQNR vs FP32): z-score T-P model 34.6 dB at 1.0
    # (dense2's evaluation tail runs to 6.99 over a calibrated 1.24), 44.8 dB at 2.0, 49.6 at 4.0; the raw-feature (A)
    # model 43.9 dB at 1.0, 42.2 at 2.0, 35.2 at 4.0.
    wide_grid_headroom: float = 2.0
    # Where any layer may run in float (``traits.inner_float_layers``: onnxruntime, OpenVINO, TensorRT): when the output
    # SQNR vs FP32 on the calibration windows is under ``min_calib_sqnr`` dB, the unit that raises it most is kept float,
    # greedily, up to ``sqnr_max_units`` (mixed_precision.raise_until_sqnr). The shipped model's INT8 sits at 40-44 dB
    # there and is untouched. Measured on the raw-feature (A) T-P model, 5 consecutive 1000-window draws, shipped
    # evaluation set (no equalization): generic INT8 dEACC +11.4/+2.9/+20.7/+41.6/+6.2 -> +0.20/-0.01/+2.00/+0.54/-0.03
    # points at 30 dB (1-4 conv outputs kept float), TensorRT +27.2/+10.7/+0.5/+6.2/+1.5 -> -0.61/-0.72/+0.54/+0.38/-0.24.
    # 35 dB did a little better on A (+0.20/-0.04/+2.00/-0.02/-0.03) but kept layers float on small Conv1D exports
    # whose INT8 is sound (tests/compiler/test_outside_models.py); 25 dB missed A's draw 0 (28.8 dB on calibration,
    # 5.9 dB on evaluation).
    min_calib_sqnr: float | None = 30.0
    sqnr_max_units: int = 8

    def __post_init__(self) -> None:
        if self.symmetric_ranges not in SYMMETRIC_RANGE_RULES:
            raise QuantizationError(f"unknown symmetric_ranges rule {self.symmetric_ranges!r}",
                                    f"use one of {', '.join(SYMMETRIC_RANGE_RULES)}")

    @classmethod
    def plain(cls) -> Techniques:
        """Nothing but the chosen estimator (the baseline the techniques are measured against)."""
        return cls(select_estimators=False, headroom=False, bias_correction=False, fit_output_range=False, precise_input=False,
                   min_calib_sqnr=None)

    def key(self) -> tuple[Any, ...]:
        """Hashable identity (for caches)."""
        return (self.select_estimators, self.candidates, self.min_gain, self.headroom, self.headroom_grid, self.folds,
                self.bias_correction, self.only_if_better, self.fit_output_range, self.max_windows,
                tuple(sorted((self.budget or {}).items())), self.fallback, self.max_fallback_units, self.precise_input,
                self.deployment_headroom, self.symmetric_headroom, self.symmetric_ranges, self.classifier_headroom, self.min_calib_sqnr,
                self.sqnr_max_units, self.wide_grid_headroom)

    def to_json(self) -> dict[str, Any]:
        return {"select_estimators": self.select_estimators, "candidates": list(self.candidates), "min_gain": self.min_gain,
                "headroom": self.headroom, "headroom_grid": list(self.headroom_grid), "folds": self.folds,
                "bias_correction": self.bias_correction, "only_if_better": self.only_if_better,
                "fit_output_range": self.fit_output_range, "max_windows": self.max_windows,
                "budget": None if self.budget is None else dict(self.budget), "fallback": self.fallback,
                "precise_input": self.precise_input, "deployment_headroom": self.deployment_headroom,
                "symmetric_headroom": self.symmetric_headroom, "symmetric_ranges": self.symmetric_ranges,
                "classifier_headroom": self.classifier_headroom, "min_calib_sqnr": self.min_calib_sqnr,
                "sqnr_max_units": self.sqnr_max_units, "wide_grid_headroom": self.wide_grid_headroom}


# --------------------------------------------------------------------------- output range
def required_output_range(contract: ModelContract | None) -> tuple[float, float] | None:
    """Output values (model units) the head must represent: 0 W .. peak power; None without a peak."""
    if contract is None or contract.peak_power_w is None:
        return None
    if contract.folded:
        return 0.0, float(contract.peak_power_w)
    lo, hi = contract.target.from_watts(np.array([0.0, contract.peak_power_w]))
    return float(min(lo, hi)), float(max(lo, hi))


def fit_output_range(params: QuantParams, onnx_model: onnx.ModelProto, contract: ModelContract | None) -> QuantParams:
    """Widen every graph output's range to cover :func:`required_output_range` (no-op when it does), then put
    0 W exactly on a code of asymmetric grids (:func:`_zero_watts_on_grid`)."""
    need = required_output_range(contract)
    if need is None:
        return params
    m = onnx.ModelProto()
    m.CopyFrom(onnx_model)
    g = analyze(m)
    out = params
    for name in g.outputs:
        if name not in out or name in out.keep_float:
            continue
        tq = out[name]
        lo, hi = tq.representable()
        if lo <= need[0] and hi >= need[1]:
            continue
        want_lo, want_hi = min(tq.lo[0], need[0]), max(tq.hi[0], need[1])
        for _ in range(8):  # zero-point rounding can leave the grid a fraction of a code short: widen until covered
            # no histogram: a power-of-two grid then takes the larger scale (no clipping) rather than the finer one
            new = activation_from_range(name, want_lo, want_hi, out.traits, rng=tq.rng, hist=None, method=f"{tq.method}+physical range")
            lo, hi = new.representable()
            if lo <= need[0] and hi >= need[1]:
                break
            want_lo, want_hi = want_lo - (new.scale[0] if lo > need[0] else 0.0), want_hi + (new.scale[0] if hi < need[1] else 0.0)
        out = replace_activation(out, new, g)
    for name in g.outputs:
        if name in out and name not in out.keep_float:
            on_grid = _zero_watts_on_grid(out[name], need[0], out.traits)
            out = out if on_grid is None else replace_activation(out, on_grid, g)
    return out


def _zero_watts_on_grid(tq: TensorQuant, zero_w: float, traits: QuantTraits) -> TensorQuant | None:
    """The output grid re-cut so that 0 W (``zero_w`` in model units) is exactly one of its codes, or None.

    Every metric clips predictions at 0 W. On a grid where 0 W falls between two codes, the many near-zero
    predictions (appliance off) round to the code above or below, and the clip keeps only the ones above: measured
    on the shipped model over 5 random 1000-window draws, the INT8 output sat +1.4..+2.5 W above FP32 and EACC
    lost +0.27..+0.37 points; with 0 W on a code, +0.15..+0.23 (consecutive draws and the shipped draw gain too;
    output SQNR unchanged within 0.1 dB). The scale grows by at most ~1/k (k codes between 0 W and 0.0) and the
    grid still covers the range it had. Asymmetric, non-power-of-two, per-tensor grids only (on a symmetric grid
    the scale alone would have to move, which the weights' requantization already fixes)."""
    if traits.symmetric_activations or traits.power_of_two or tq.per_channel or not zero_w < 0.0:
        return None
    rng = tq.rng
    lo, hi = tq.representable()
    if zero_w > hi:
        return None
    lo = min(lo, zero_w)  # fit_output_range covers 0 W; a zero point's rounding may leave it a fraction of a code out
    step = (hi - lo) / (rng.hi - rng.lo - 1)  # one code spare: the zero point moves to a whole code
    k = int(math.floor(-zero_w / step + 1e-9))
    if k < 1:
        return None
    scale = float(np.float32(-zero_w / k))
    zp = int(rng.lo + math.ceil(-lo / scale - 1e-9))
    new = TensorQuant(tq.name, "activation", tq.range_name, (scale,), (zp,), None, ((rng.lo - zp) * scale,), ((rng.hi - zp) * scale,),
                      f"{tq.method}+0 W on a code")
    nlo, nhi = new.representable()
    return new if rng.lo <= zp <= rng.hi and nlo <= lo + 1e-9 * abs(lo) and nhi >= hi - 1e-9 * abs(hi) else None


# --------------------------------------------------------------------------- the parameter pipeline
def _copy(onnx_model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(onnx_model)
    return m


def _precise_input_layers(onnx_model: onnx.ModelProto, traits: QuantTraits) -> tuple[str, ...]:
    """Layers kept float so the graph input is never quantized (``Techniques.precise_input``): those reading
    the input, when the traits allow float layers and nothing else reads it; else none."""
    if not traits.float_layers:
        return ()
    m = _copy(onnx_model)
    layers = input_layers(m, analyze(m))
    return tuple(layer.name for layer in layers) if layers else ()


def _precise_input(onnx_model: onnx.ModelProto, traits: QuantTraits) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(layers, tensors)`` kept float so the graph input is never quantized (``Techniques.precise_input``): the
    weighted layers reading it, and, where other ops read it too (a residual Add from the input, a GRU first, a
    ReduceMean), the input itself and the tensors sharing its parameters. Those other readers need a target that runs
    any op in float (``traits.inner_float_layers``, the QDQ targets); a full-integer graph (TFLite) keeps the layers
    float only when nothing else reads the input (:func:`_precise_input_layers`). Fuzzed: input -> Conv(x) + x ... got
    QuantizeLinear(input) on onnxruntime / tensorrt int8, its /res/Conv listed INT8, tensorrt:int8 +1.40 points."""
    if not traits.float_layers:
        return (), ()
    if not traits.inner_float_layers:
        return _precise_input_layers(onnx_model, traits), ()
    m = _copy(onnx_model)
    found = input_readers(m, analyze(m))
    if found is None:
        return (), ()
    layers, others, family = found
    return tuple(layer.name for layer in layers), tuple(family) if others else ()


def with_precise_input(params: QuantParams, onnx_model: onnx.ModelProto, techniques: Techniques | None = None) -> QuantParams:
    """``params`` from a plain derivation (a target's own estimator, e.g. the DPU's min-max start) with
    ``Techniques.precise_input`` applied as :func:`ptq_params` applies it: where ``params.traits.float_layers``, the
    layers reading the graph input are kept float (``provenance["precise_input"]``), no headroom added; else unchanged."""
    techniques = techniques or Techniques()
    precise = _precise_input_layers(onnx_model, params.traits) if techniques.precise_input else ()
    if not precise:
        return params
    return replace(params, keep_float=tuple(dict.fromkeys([*params.keep_float, *precise])),
                   provenance={**params.provenance, "precise_input": {"float_layers": list(precise), "deployment_headroom": 1.0}})


@dataclass
class PtqOutcome:
    """What :func:`ptq_params` did."""

    params: QuantParams
    selection: SelectionResult | None = None
    headroom: HeadroomResult | None = None
    bias: BiasCorrectionResult | None = None
    bias_check: BiasCorrectionCheck | None = None
    mixed: MixedPrecisionResult | None = None
    sqnr_fallback: SqnrFallback | None = None
    precise_input: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def provenance(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        if self.precise_input is not None:
            d["precise_input"] = self.precise_input
        if self.selection is not None:
            d["selection"] = self.selection.to_json()
        if self.headroom is not None:
            d["headroom"] = self.headroom.to_json()
        if self.bias_check is not None:
            d["bias_correction_check"] = self.bias_check.to_json()
        d["bias_correction"] = None if self.bias is None else self.bias.to_json()
        if self.mixed is not None:
            d["mixed_precision"] = self.mixed.to_json()
        if self.sqnr_fallback is not None:
            d["sqnr_fallback"] = self.sqnr_fallback.to_json()
        d["timings_s"] = {k: round(v, 3) for k, v in self.timings.items()}
        return d


def ptq_params(
    onnx_model: onnx.ModelProto,
    stats: Statistics,
    traits: QuantTraits,
    x: np.ndarray,
    *,
    contract: ModelContract | None = None,
    estimator: str = "auto",
    techniques: Techniques = Techniques(),
    keep_float: Sequence[str] = (),
    eval_fn: EvalFn | None = None,
) -> PtqOutcome:
    """Parameters for ``traits`` from ``stats`` with the accuracy techniques (module docstring, steps 4, 5, 7).

    ``x``: calibration windows as the graph takes them. ``estimator`` (default ``"auto"``:
    per-tensor selection when ``techniques.select_estimators``, else min-max; or a fixed
    estimator name). ``keep_float`` (default none): tensors/layers left float from the
    start (e.g. the raw input of a folded model). ``eval_fn`` is needed when
    ``techniques.budget`` is set.
    """
    if estimator != "auto" and estimator not in ESTIMATORS:
        raise QuantizationError(f"unknown range estimator {estimator!r}", f"use auto or one of {', '.join(ESTIMATORS)}")
    timings: dict[str, float] = {}
    kf = tuple(keep_float)
    precise, float_input = _precise_input(onnx_model, traits) if techniques.precise_input else ((), ())
    kf += tuple(name for name in (*precise, *float_input) if name not in kf)

    def finalize(p: QuantParams) -> QuantParams:
        p = replace(p, keep_float=tuple(dict.fromkeys([*p.keep_float, *kf])))
        return fit_output_range(p, onnx_model, contract) if techniques.fit_output_range else p

    outcome = PtqOutcome(finalize(derive_params(onnx_model, stats, traits, estimator="minmax" if estimator == "auto" else estimator)))
    choices: dict[str, str] | None = None
    if estimator == "auto" and techniques.select_estimators:
        t0 = time.perf_counter()
        exclude = [*kf, *(o.name for o in onnx_model.graph.output)] if techniques.fit_output_range else list(kf)
        outcome.selection = select_estimators(onnx_model, stats, traits, x, candidates=techniques.candidates, exclude=exclude,
                                              min_gain=techniques.min_gain, finalize=finalize, max_windows=techniques.max_windows)
        outcome.params, choices = outcome.selection.params, outcome.selection.choices
        timings["selection"] = time.perf_counter() - t0
    if techniques.headroom and len(x) >= 4 * techniques.folds:
        t0 = time.perf_counter()

        def make(s: Statistics) -> QuantParams:
            if choices is not None:
                return finalize(derive_params(onnx_model, s, traits, per_tensor_estimators=choices))
            return finalize(derive_params(onnx_model, s, traits, estimator="minmax" if estimator == "auto" else estimator))

        outcome.headroom = select_headroom(onnx_model, x, make, grid=techniques.headroom_grid, folds=techniques.folds,
                                           exclude=kf, bins=stats.bins, max_windows=2 * techniques.max_windows)
        outcome.params = apply_headroom(outcome.params, onnx_model, stats, outcome.headroom.headroom, exclude=kf)
        timings["headroom"] = time.perf_counter() - t0
    if precise:
        task = contract.task if contract is not None else "regression"
        classifier = contract is not None and contract.is_classification
        wide = traits.activation_bits >= 16
        g = analyze(_copy(onnx_model))
        symmetric = None
        # Without a peak power the outputs have no physical range to cover (fit_output_range): they get the deployment
        # headroom as every other activation, or INT8 clips the high-power windows at the calibration maximum (fuzzed:
        # Gemm -> output, 16 of 300 windows clipped, 17.9 dB; the same model with a Squeeze after the Gemm got it: 26.9 dB)
        no_peak = required_output_range(contract) is None
        if wide:
            h = techniques.wide_grid_headroom
        elif classifier:
            # The headroom buys coverage of the rare high-power windows an energy-weighted regression metric is scored on.
            # An ON/OFF classifier's F1 is not: a high-power window is ON clipped or not (its sigmoid saturates), while the
            # resolution the headroom costs is what decides the windows near the threshold. Example CtRNN (onnxruntime:int8,
            # evaluation set): 1.5x -> 1.0x, f1w loss +2.93 -> -0.69 points, output SQNR 17.0 -> 28.7 dB.
            h = techniques.classifier_headroom
        elif traits.symmetric_activations and techniques.symmetric_ranges == "coverage":
            # Symmetric 8-bit grids (TensorRT), per tensor (symmetric_ranges.py): the calibration extremes times the
            # deployment headroom asymmetric grids get, all back to the estimators' ranges if that misses the SQNR floor
            from nilmc.quantization.symmetric_ranges import deployment_ranges, zero_watts_on_code

            h = techniques.deployment_headroom
            outcome.params, symmetric = deployment_ranges(outcome.params, onnx_model, stats, x, headroom=h, exclude=[*kf, *g.inputs],
                                                          min_sqnr_db=techniques.min_calib_sqnr, max_windows=techniques.max_windows,
                                                          step=_ort.output_step(contract), outputs=no_peak)
            need = required_output_range(contract) if techniques.fit_output_range else None
            if need is not None:
                outcome.params, symmetric.zero_on_code = zero_watts_on_code(outcome.params, onnx_model, need[0])
        else:  # "global": one headroom; symmetric grids get their own, smaller one (a ReLU output wastes the negative half)
            h = techniques.symmetric_headroom if traits.symmetric_activations else techniques.deployment_headroom
        if symmetric is None and h != 1.0:
            outcome.params = apply_headroom(outcome.params, onnx_model, stats, h, exclude=[*kf, *g.inputs], outputs=no_peak)
        outcome.precise_input = {"float_layers": list(precise), "deployment_headroom": h, "task": task}
        if symmetric is not None:
            outcome.precise_input["symmetric_ranges"] = symmetric.to_json()
    if float_input:
        outcome.precise_input = {**(outcome.precise_input or {"float_layers": []}), "float_input": list(float_input),
                                 "why": "ops other than its float layers read the graph input: it stays float32 for them too"}
    if techniques.bias_correction:
        t0 = time.perf_counter()
        pays = not techniques.only_if_better  # too few windows to measure it: not applied unless asked unconditionally
        if techniques.only_if_better and len(x) >= 4 * techniques.folds:
            outcome.bias_check = bias_correction_pays(onnx_model, outcome.params, x, folds=techniques.folds,
                                                      max_windows=2 * techniques.max_windows)
            pays = outcome.bias_check.pays
        if pays:
            outcome.bias = correct_bias(onnx_model, outcome.params, x, max_windows=techniques.max_windows)
            outcome.params = outcome.bias.params
        timings["bias_correction"] = time.perf_counter() - t0
    if techniques.min_calib_sqnr is not None and traits.inner_float_layers:
        t0 = time.perf_counter()
        outcome.params, outcome.sqnr_fallback = raise_until_sqnr(onnx_model, outcome.params, x, techniques.min_calib_sqnr, stats=stats,
                                                                 step=_ort.output_step(contract),
                                                                 fallback="float", max_units=techniques.sqnr_max_units)
        timings["sqnr_fallback"] = time.perf_counter() - t0
    if techniques.budget:
        if eval_fn is None:
            raise QuantizationError("a mixed-precision budget needs eval_fn (NILM metrics of a candidate model)",
                                    "pass eval_fn=make_eval_fn(model, validation_set) or calibrate with a data set that has targets")
        t0 = time.perf_counter()
        outcome.mixed = mixed_precision(onnx_model, outcome.params, eval_fn, techniques.budget, stats=stats,
                                        fallback=techniques.fallback, max_units=techniques.max_fallback_units)
        outcome.params = outcome.mixed.params
        timings["mixed_precision"] = time.perf_counter() - t0
    outcome.timings = timings
    outcome.params = replace(outcome.params, provenance={**outcome.params.provenance, **outcome.provenance(),
                                                         "techniques": techniques.to_json(), "estimator": estimator})
    return outcome


# --------------------------------------------------------------------------- evaluation
def make_eval_fn(model: Model, dataset: NilmDataset, *, batch_size: int = 512) -> EvalFn:
    """``fn(onnx_model) -> Metrics``: the task's metrics of a graph of ``model`` on ``dataset``.

    The graph takes what ``model.contract`` prepares and returns model units (a folded
    contract: raw features and watts). Regression: NILM metrics in watts; an ON/OFF
    classifier (contract task ``binary`` / ``multilabel``): its classification metrics (f1w,
    per-appliance F1, ...) against the contract's appliances and thresholds. Used for the
    mixed-precision budget, which must then name the task's metrics (e.g. ``{"f1w": 1.0}``).
    """
    from nilmc.quantization import _ort

    contract = model.contract
    x = contract.prepare(dataset.raw_x())
    truth = contract.select_truth(dataset.y, dataset.appliances)  # (N,) W, or (N, M) W of a classifier's appliances

    def fn(graph: onnx.ModelProto) -> AnyMetrics:
        out = _ort.output(graph, x, batch_size=batch_size)
        return contract.score(truth, contract.to_watts(out))

    return fn


# --------------------------------------------------------------------------- the result
@dataclass
class QuantizationResult:
    """Everything :func:`quantize` produced and measured."""

    model: Model  # the FP32 model that was quantized (the folded one when folding)
    params: QuantParams
    qdq: onnx.ModelProto  # the ideal INT8 reference graph
    traits: QuantTraits
    stats: Statistics = field(repr=False)
    calib_x: np.ndarray = field(repr=False)  # calibration windows as the graph takes them
    normalization: NormalizationReport | None = None
    feature_scales: FeatureScaleReport | None = None
    overflow: OverflowReport | None = None
    fold: FoldResult | None = None
    ptq: PtqOutcome | None = None
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def calibration_s(self) -> float:
        """Wall time of the whole calibration (statistics + techniques), seconds."""
        return float(self.timings.get("total", 0.0))

    def qdq_model(self) -> Model:
        """The QDQ graph as a :class:`Model` (same contract as ``model``)."""
        from nilmc.compiler.model import Model

        return Model(self.qdq, self.model.contract, source=f"{self.model.source} (int8 qdq)")

    def report(self) -> dict[str, Any]:
        from nilmc.quantization.report import quantize_report

        return quantize_report(self)

    def save(self, directory: str | Path) -> dict[str, Path]:
        """Write ``model_qdq.onnx``, ``params.json`` and ``report.json`` into ``directory``."""
        from nilmc.compiler.io import atomic_write_json

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        out = {"qdq": self.qdq_model().save_onnx(d / "model_qdq.onnx"), "params": self.params.save(d / "params.json")}
        out["report"] = atomic_write_json(d / "report.json", self.report())  # strict JSON: non-finite -> null + *_nonfinite
        return out


def _json_default(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    raise TypeError(f"not JSON-able: {type(v).__name__}")


# --------------------------------------------------------------------------- quantize
def _windows(model: Model, calib: NilmDataset | np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(windows as the graph takes them, raw windows or None)."""
    from nilmc.calibration_data.dataset import NilmDataset

    if isinstance(calib, NilmDataset):
        raw = calib.raw_x()
        return model.contract.prepare(raw), raw
    x = np.asarray(calib)
    if x.ndim != 4 or not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"calibration windows must be a float array (N, frames, features, 1), got {x.dtype} {x.shape}",
                        "pass a NilmDataset or windows normalized per the model's contract")
    model.contract.check_input(x, source="the calibration windows")
    return x.astype(np.float32, copy=False), None


def starved_input_fix(params: QuantParams, onnx_model: onnx.ModelProto) -> tuple[QuantParams, list[str]]:
    """Keep every layer reading a starved graph input at FP32 (its input *and* weights); returns them.

    int16 activations are no fix: the first layer's weights of an unnormalized model carry
    the inverse feature scales, so its per-channel weight scales span the same decades.
    """
    m = onnx.ModelProto()
    m.CopyFrom(onnx_model)
    g = analyze(m)
    readers = [l.name for l in g.layers if g.root(l.input) in g.inputs]
    out = params
    for name in readers:
        out = raise_precision(out, Unit(name, "layer", g.inputs[0]), "float", g, None)
    return out, readers


def quantize(
    model: Model | str | Path,
    calib: NilmDataset | np.ndarray,
    *,
    traits: QuantTraits = GENERIC_INT8,
    estimator: str = "auto",
    bias_correction: bool = True,
    fold_normalization: bool = False,
    overflow_policy: str | Mapping[str, str] = "warn",
    budget: Mapping[str, float] | None = None,
    eval_fn: EvalFn | None = None,
    advanced: Techniques | None = None,
) -> QuantizationResult:
    """Normalization-aware PTQ of ``model`` on ``calib`` (see the module docstring for the steps).

    ``model``: a :class:`Model` or a model file. ``calib``: a :class:`NilmDataset` (raw
    features; the contract normalizes them) or windows already as the graph takes them.
    ``traits`` (default :data:`GENERIC_INT8`); ``estimator`` (default ``"auto"``: chosen
    per tensor by output error; or ``"minmax"``, ``"percentile"``, ``"mse"``,
    ``"entropy"`` for all); ``bias_correction`` (default True, kept only where it pays);
    ``fold_normalization`` (default False); ``overflow_policy`` (default ``"warn"``; also
    ``"error"``, ``"fix"`` or a per-check mapping; output clipping is always fixed);
    ``budget`` (default None; e.g. ``{"eacc": 0.5}`` or ``{"mae": 3.0}``) turns on the
    mixed-precision fallback scored by ``eval_fn`` (default: NILM metrics on ``calib``
    when it is a data set with targets; prefer a validation split); ``advanced`` (default
    :class:`Techniques`()) for the rare knobs. Raises :class:`NormalizationError` when
    the calibration data do not match the declared normalization, and
    :class:`QuantizationOverflowError` for findings under policy ``"error"``.
    """
    from nilmc.quantization.normalization_check import check_feature_scales, check_normalization
    from nilmc.quantization.overflow import check_overflow
    from nilmc.quantization.qdq import build_qdq_model

    t_start = time.perf_counter()
    if isinstance(model, (str, Path)):
        from nilmc.compiler.frontend import load_model

        model = load_model(model)
    tech = replace(advanced or Techniques(), bias_correction=bias_correction and (advanced or Techniques()).bias_correction,
                   budget=budget if budget is not None else (advanced.budget if advanced else None))
    x, raw = _windows(model, calib)
    result_notes: list[str] = []
    canonical = x if raw is None else model.contract.normalize(raw)  # the check reads features before the model's layout
    norm = check_normalization(model.contract, canonical, policy=tech.normalization_policy) if tech.check_normalization else None
    fold = None
    keep: tuple[str, ...] = ()
    if fold_normalization:
        from nilmc.quantization.fold import fold_normalization as _fold

        raw = raw if raw is not None else model.contract.normalization.invert(x)
        fold = _fold(model, input_mode="ops", verify_x=raw[:256])
        model, x, keep = fold.model, np.asarray(raw, np.float32), fold.float_tensors
    t0 = time.perf_counter()
    stats = collect_statistics(model.graph, x, feature_axis=model.contract.input_feature_axis())
    timings = {"statistics": time.perf_counter() - t0}
    if tech.budget and eval_fn is None:
        eval_fn = _default_eval_fn(model, calib)
    outcome = ptq_params(model.graph, stats, traits, x, contract=model.contract, estimator=estimator, techniques=tech,
                         keep_float=keep, eval_fn=eval_fn)
    timings.update(outcome.timings)
    float_acts = float_activations(model.graph, outcome.params)
    policy = _with_output_fix(overflow_policy, input_is_float=bool(set(_graph_inputs(model.graph)) & float_acts))
    overflow = check_overflow(model.graph, stats, outcome.params, traits, data=x, peak_output=model.contract, policy=policy)
    if float_acts & set(_graph_inputs(model.graph)):  # a float graph input is on no grid: its feature spans are no finding
        overflow.findings = [f for f in overflow.findings if not (f.check.value == "input_features" and f.tensor in float_acts)]
    params = overflow.params
    scales = check_feature_scales(model.graph, stats, params, feature_names=model.contract.feature_names)
    if not scales.ok and raw is not None and not fold_normalization and _policy_of(overflow_policy, "input_features") == "fix":
        # the fix for a raw-scale input: rescale the features in a float stage, their inverse folded into the first
        # layer (exact), and quantize that; the first layer at float (below) only where the rescaling cannot be done
        repaired = _repair_input_scales(model, raw)
        if repaired is not None:
            again = quantize(repaired[0], calib, traits=traits, estimator=estimator, bias_correction=bias_correction,
                             overflow_policy=overflow_policy, budget=budget, eval_fn=eval_fn, advanced=advanced)
            again.notes.insert(0, repaired[1])
            again.timings["total"] = time.perf_counter() - t_start
            return again
    if not scales.ok and _policy_of(overflow_policy, "input_features") == "fix":
        params, readers = starved_input_fix(params, model.graph)
        result_notes.append(f"layers {readers} kept at float: per-tensor INT8 input would starve {len(scales.lost)} features "
                            f"(feature spans differ {scales.decades:.1f} decades) and their weights carry the same spread; "
                            "normalizing the input (C) is the real fix")
    qdq = build_qdq_model(model.graph, params)
    timings["total"] = time.perf_counter() - t_start
    return QuantizationResult(model, params, qdq, traits, stats, x, norm, scales, overflow, fold, outcome, timings, result_notes)


def _repair_input_scales(model: Model, raw: np.ndarray) -> tuple[Model, str] | None:
    """:func:`io_affine.repair_input_scales` on the raw calibration features: (model, what was done) or None."""
    from nilmc.calibration_data.normalization import FeatureStats
    from nilmc.quantization.io_affine import ORIGIN_REPAIR, repair_input_scales

    if ORIGIN_REPAIR in model.contract.normalization.origin:
        return None
    repaired, report = repair_input_scales(model, FeatureStats.fit(raw))
    return (repaired, report.summary()) if report.applied else None


def _default_eval_fn(model: Model, calib: Any) -> EvalFn:
    from nilmc.calibration_data.dataset import NilmDataset

    if not isinstance(calib, NilmDataset):
        raise QuantizationError("a mixed-precision budget needs eval_fn, and plain calibration windows carry no targets",
                                "pass eval_fn=make_eval_fn(model, validation_set) or a calibration NilmDataset")
    return make_eval_fn(model, calib)


def _policy_of(policy: str | Mapping[str, str], check: str) -> str:
    if isinstance(policy, Mapping):
        return str(policy.get(check, policy.get("default", "warn")))
    return str(policy)


def _with_output_fix(policy: str | Mapping[str, str], *, input_is_float: bool = False) -> dict[str, str]:
    """The user's overflow policy with output clipping always fixed (the head must cover the physical range)."""
    out = dict(policy) if isinstance(policy, Mapping) else {"default": str(policy)}
    out["output_clipping"] = "fix"
    # the starved-input finding is fixed here (first layer at float), not by overflow.py; a float input cannot starve
    if input_is_float or out.get("input_features", out.get("default")) == "fix":
        out["input_features"] = "warn"
    return out


def _graph_inputs(onnx_model: onnx.ModelProto) -> list[str]:
    inits = {t.name for t in onnx_model.graph.initializer}
    return [i.name for i in onnx_model.graph.input if i.name not in inits]


def float_activations(onnx_model: onnx.ModelProto, params: QuantParams) -> set[str]:
    """The activation tensors ``params`` leaves at FP32 in ``onnx_model`` (its ``keep_float`` names resolved)."""
    from nilmc.quantization.qdq import float_sets

    m = onnx.ModelProto()
    m.CopyFrom(onnx_model)
    return float_sets(analyze(m), params.keep_float)[0]

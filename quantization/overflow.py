"""INT8 overflow checks, per tensor and per layer, as a structured report (no printing).

Checks (each a :class:`Check`; each finding carries the policy that applies to it):

* ``saturation``      share of an activation's values that fall outside its representable
                      range (measured on ``data`` when given, else estimated on the statistics'
                      histograms). Fix: widen the range to the observed min/max.
* ``range_use``       share of the code range the observed values span. Fix (only when the
                      traits allow int16 activations): promote the tensor to int16.
* ``input_features``  per-feature code count of the graph input: per-tensor input quantization
                      cannot serve features whose ranges differ by orders of magnitude (raw,
                      unnormalized features). Not fixable here: normalize.
* ``output_clipping`` the output's representable range must cover the physical range 0 W ..
                      ``peak_power_w`` (after de-normalization). Fix: widen the output range.
* ``accumulator``     worst case ``sum|w_q - z_w| * max|x_q - z_x| + |b_acc|`` per output
                      channel against ``2**(accumulator_bits-1) - 1``. Not fixable here.
* ``bias_range``      int32 bias codes (``b / (s_in * s_w)``) that do not fit int32.
* ``requant_shift``   power-of-two targets: ``fw + fi - fo`` outside ``traits.requant_shift_range``
                      (the DPU's shift_cut in [0, 16]).

Policies: ``"error"`` raises :class:`QuantizationOverflowError` (carrying the full report)
after every check ran, ``"warn"`` records, ``"fix"`` applies the fix where one exists and
records the finding as fixed; the fixed parameters are ``report.params``.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import onnx

from nilmc.compiler.errors import QuantizationError
from nilmc.quantization.graph import Layer, QuantGraph, analyze
from nilmc.quantization.intops import accumulator_limit, int_range
from nilmc.quantization.params import QuantParams, TensorQuant, activation_from_range, quantize_constant, replace_activation
from nilmc.quantization.statistics import Histogram, Statistics, model_digest, run_with_intermediates
from nilmc.quantization.traits import QuantTraits

if TYPE_CHECKING:
    from nilmc.compiler.contract import ModelContract


class Check(str, Enum):
    SATURATION = "saturation"
    RANGE_USE = "range_use"
    INPUT_FEATURES = "input_features"
    OUTPUT_CLIPPING = "output_clipping"
    ACCUMULATOR = "accumulator"
    BIAS_RANGE = "bias_range"
    REQUANT_SHIFT = "requant_shift"


class Policy(str, Enum):
    ERROR = "error"
    WARN = "warn"
    FIX = "fix"


@dataclass(frozen=True)
class OverflowLimits:
    """Thresholds of the checks (the rare knobs).

    ``max_saturation`` (1e-3): largest tolerated share of saturated values;
    ``min_code_share`` (1/16): smallest tolerated share of the code range spanned;
    ``min_feature_codes`` (16): fewest codes an input feature may span;
    ``batch_size`` (256): windows per onnxruntime call when measuring on ``data``.
    """

    max_saturation: float = 1e-3
    min_code_share: float = 1.0 / 16.0
    min_feature_codes: int = 16
    batch_size: int = 256


@dataclass(frozen=True)
class Finding:
    check: Check
    tensor: str
    layer: str | None
    value: float  # what was measured
    limit: float  # what it must not exceed (or fall below; see reason)
    reason: str
    suggested_fix: str
    policy: Policy
    fixed: bool = False
    channel: int | None = None

    @property
    def severity(self) -> float:
        """How far past the limit, for ordering worst first."""
        lo, hi = sorted((abs(self.value), abs(self.limit)))
        return hi / lo if lo > 0 else float("inf")

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"check": self.check.value, "policy": self.policy.value}


@dataclass
class OverflowReport:
    """Findings of :func:`check_overflow`; truthy when nothing is left unfixed."""

    findings: list[Finding]
    params: QuantParams  # the parameters after any fixes
    checked: dict[str, int] = field(default_factory=dict)  # items examined per check
    skipped: dict[str, str] = field(default_factory=dict)  # check -> why it did not run

    @property
    def ok(self) -> bool:
        return all(f.fixed for f in self.findings)

    def __bool__(self) -> bool:
        return self.ok

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.policy is Policy.ERROR and not f.fixed]

    def by_check(self, check: Check | str) -> list[Finding]:
        return [f for f in self.findings if f.check is Check(check)]

    def tensors(self, check: Check | str | None = None) -> list[str]:
        """Names of the tensors with findings (of one check, or of all)."""
        found = self.findings if check is None else self.by_check(check)
        return sorted({f.tensor for f in found})

    def worst_first(self) -> list[Finding]:
        return sorted(self.findings, key=lambda f: (f.fixed, -f.severity))

    def summary(self) -> str:
        if not self.findings:
            return "no overflow findings"
        return "\n".join(f"[{f.policy.value}{', fixed' if f.fixed else ''}] {f.check.value} {f.tensor}: {f.reason}; fix: {f.suggested_fix}"
                         for f in self.worst_first())

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "findings": [f.to_json() for f in self.worst_first()], "checked": dict(self.checked),
                "skipped": dict(self.skipped)}


class QuantizationOverflowError(QuantizationError):
    """A check under policy ``error`` failed; ``report`` holds every finding."""

    def __init__(self, report: OverflowReport) -> None:
        self.report = report
        worst = report.errors[0] if report.errors else report.worst_first()[0]
        super().__init__(
            f"{len(report.errors)} INT8 overflow finding(s), worst: {worst.check.value} on {worst.tensor!r}: {worst.reason}",
            worst.suggested_fix,
        )


# --------------------------------------------------------------------------- observations
@dataclass
class _Observed:
    """Per activation tensor: count, saturated count, min, max."""

    count: int = 0
    saturated: float = 0.0
    minimum: float = float("inf")
    maximum: float = float("-inf")

    @property
    def fraction(self) -> float:
        return self.saturated / self.count if self.count else 0.0


def _saturation_bounds(tq: TensorQuant) -> tuple[float, float]:
    """Values beyond these round outside the code range."""
    s, z, rng = tq.scale[0], tq.zero_point[0], tq.rng
    return (rng.lo - z - 0.5) * s, (rng.hi - z + 0.5) * s


def _observe_data(model: onnx.ModelProto, data: np.ndarray, params: QuantParams, names: list[str], batch: int) -> dict[str, _Observed]:
    obs = {n: _Observed() for n in names}
    for outs in run_with_intermediates(model, data, batch_size=batch):
        for name in names:
            v = np.asarray(outs[name], np.float64)
            lo, hi = _saturation_bounds(params[name])
            o = obs[name]
            o.count += v.size
            o.saturated += float(np.count_nonzero((v < lo) | (v > hi)))
            o.minimum, o.maximum = min(o.minimum, float(v.min())), max(o.maximum, float(v.max()))
    return obs


def _mass_outside(hist: Histogram, lo: float, hi: float) -> float:
    a, b = hist.edges[:-1], hist.edges[1:]
    below = np.clip((np.minimum(b, lo) - a) / hist.width, 0.0, 1.0)
    above = np.clip((b - np.maximum(a, hi)) / hist.width, 0.0, 1.0)
    return float(((below + above) * hist.counts).sum())


def _observe_stats(stats: Statistics, params: QuantParams, names: list[str]) -> dict[str, _Observed]:
    obs = {}
    for name in names:
        t = stats[name]
        lo, hi = _saturation_bounds(params[name])
        obs[name] = _Observed(t.count, _mass_outside(t.histogram, lo, hi), t.minimum, t.maximum)
    return obs


# --------------------------------------------------------------------------- the checker
@dataclass
class _Run:
    g: QuantGraph
    stats: Statistics
    params: QuantParams
    traits: QuantTraits
    policies: dict[Check, Policy]
    limits: OverflowLimits
    findings: list[Finding] = field(default_factory=list)
    checked: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    float_acts: set[str] = field(default_factory=set)  # activations kept at FP32: on no grid in the artifact

    def add(self, check: Check, tensor: str, value: float, limit: float, reason: str, fix: str, *,
            layer: str | None = None, channel: int | None = None, fixed: bool = False) -> None:
        self.findings.append(Finding(check, tensor, layer, float(value), float(limit), reason, fix, self.policies[check], fixed, channel))

    def fixing(self, check: Check) -> bool:
        return self.policies[check] is Policy.FIX

    def widen(self, name: str, lo: float, hi: float, method: str) -> None:
        tq = self.params[name]
        hist = self.stats[name].histogram if name in self.stats else None
        new = activation_from_range(tq.name, min(lo, tq.lo[0]), max(hi, tq.hi[0]), self.traits, rng=tq.rng, hist=hist, method=method)
        self.params = replace_activation(self.params, new, self.g)


def _check_saturation(run: _Run, obs: dict[str, _Observed]) -> None:
    for name, o in obs.items():
        run.checked[Check.SATURATION.value] = run.checked.get(Check.SATURATION.value, 0) + 1
        if o.fraction <= run.limits.max_saturation:
            continue
        lo, hi = run.params[name].representable()
        fixed = run.fixing(Check.SATURATION)
        if fixed:
            run.widen(name, o.minimum, o.maximum, "widened to observed min/max")
        run.add(Check.SATURATION, name, o.fraction, run.limits.max_saturation,
                f"{o.fraction:.2%} of values saturate: representable [{lo:.4g}, {hi:.4g}], observed [{o.minimum:.4g}, {o.maximum:.4g}]",
                "widen the range to the observed min/max (policy fix), calibrate on data covering this range, or normalize the input",
                fixed=fixed)


def _check_range_use(run: _Run, obs: dict[str, _Observed]) -> None:
    for name, o in obs.items():
        tq = run.params[name]
        run.checked[Check.RANGE_USE.value] = run.checked.get(Check.RANGE_USE.value, 0) + 1
        if o.minimum == o.maximum:  # a constant (a recurrent layer's zero initial state): one code is all it needs
            continue
        s, z, rng = tq.scale[0], tq.zero_point[0], tq.rng
        codes = np.clip(np.rint(np.array([o.minimum, o.maximum]) / s) + z, rng.lo, rng.hi)
        share = (codes[1] - codes[0] + 1) / rng.levels
        if share >= run.limits.min_code_share:
            continue
        fixed = run.fixing(Check.RANGE_USE) and run.traits.allow_int16_activations and rng.name != "int16"
        if fixed:
            new = activation_from_range(name, tq.lo[0], tq.hi[0], run.traits, rng=int_range("int16"),
                                        hist=run.stats[name].histogram if name in run.stats else None, method="promoted to int16")
            run.params = replace_activation(run.params, new, run.g)
        run.add(Check.RANGE_USE, name, share, run.limits.min_code_share,
                f"observed values span {int(codes[1] - codes[0] + 1)} of {rng.levels} codes ({share:.1%}); resolution is lost",
                "use a clipping estimator (percentile/mse) against outliers, or int16 for this tensor", fixed=fixed)


def _feature_ranges(name: str, data: np.ndarray | None, stats: Statistics) -> tuple[int | None, np.ndarray | None, np.ndarray | None]:
    t = stats[name] if name in stats else None
    axis = t.feature_axis if t is not None else None
    if data is not None and axis is not None:
        other = tuple(i for i in range(np.ndim(data)) if i != axis)
        return axis, np.min(data, axis=other), np.max(data, axis=other)
    if t is None or axis is None:
        return None, None, None
    return axis, t.feature_min, t.feature_max


def _check_input_features(run: _Run, data: np.ndarray | None) -> None:
    for name in run.g.inputs:
        axis, fmin, fmax = _feature_ranges(name, data, run.stats)
        if axis is None or name not in run.params:  # a float input still reported: the driver names it as a failure's cause
            continue
        run.checked[Check.INPUT_FEATURES.value] = run.checked.get(Check.INPUT_FEATURES.value, 0) + len(cast(np.ndarray, fmin))
        codes = (np.asarray(fmax) - np.asarray(fmin)) / run.params[name].scale[0]
        bad = np.flatnonzero(codes < run.limits.min_feature_codes)
        if not bad.size:
            continue
        worst = int(bad[np.argmin(codes[bad])])
        spans = np.maximum(np.asarray(fmax) - np.asarray(fmin), 1e-30)
        decades = float(np.ptp(np.log10(spans)))
        run.add(Check.INPUT_FEATURES, name, codes[worst], run.limits.min_feature_codes,
                f"{bad.size} of {len(codes)} input features (axis {axis}) span fewer than {run.limits.min_feature_codes} codes "
                f"under one per-tensor scale; feature {worst} spans {codes[worst]:.3g} (feature ranges differ {decades:.1f} decades)",
                "normalize the input (z-score, normalization C) or fold the normalization into the first layer", channel=worst)


def _required_output(peak_output: float | ModelContract | None) -> tuple[float | None, float | None, str]:
    """(lowest, highest) output value the head must represent, in model units, and a label."""
    if peak_output is None:
        return None, None, ""
    if isinstance(peak_output, (int, float)):
        return None, float(peak_output), f"{float(peak_output):.4g}"
    peak = peak_output.peak_power_w
    if peak is None:
        return None, None, ""
    if peak_output.folded:
        return 0.0, float(peak), f"{peak:.4g} W"
    lo, hi = (float(v) for v in peak_output.target.from_watts(np.array([0.0, peak])))
    return lo, hi, f"{peak:.4g} W"


def _check_output_clipping(run: _Run, peak_output: float | ModelContract | None) -> None:
    need_lo, need_hi, label = _required_output(peak_output)
    if need_hi is None:
        run.skipped[Check.OUTPUT_CLIPPING.value] = "no peak output given (peak_output or contract.peak_power_w)"
        return
    for name in run.g.outputs:
        if name not in run.params or name in run.float_acts:
            continue
        run.checked[Check.OUTPUT_CLIPPING.value] = run.checked.get(Check.OUTPUT_CLIPPING.value, 0) + 1
        lo, hi = run.params[name].representable()
        short_hi = hi < need_hi
        short_lo = need_lo is not None and lo > need_lo
        if not (short_hi or short_lo):
            continue
        fixed = run.fixing(Check.OUTPUT_CLIPPING)
        if fixed:
            run.widen(name, need_lo if need_lo is not None else lo, need_hi, "widened to the physical output range")
        value, limit = (hi, need_hi) if short_hi else (lo, need_lo)
        run.add(Check.OUTPUT_CLIPPING, name, value, cast(float, limit),
                f"output representable range [{lo:.4g}, {hi:.4g}] does not cover the physical range "
                f"[{need_lo if need_lo is not None else lo:.4g}, {need_hi:.4g}] (peak {label})",
                "widen the output range (policy fix) or calibrate with windows that reach the peak power", fixed=fixed)


def _centred_weights(layer: Layer, run: _Run) -> np.ndarray:
    tq = run.params.tensors[layer.weight]
    codes = quantize_constant(tq, run.g.constants[layer.weight], run.traits).astype(np.int64)
    zp = tq.zero_points()
    if tq.per_channel:
        shape = [1] * codes.ndim
        shape[cast(int, tq.axis)] = -1
        zp = zp.reshape(shape)
    centred: np.ndarray = np.moveaxis(codes - zp, layer.weight_axis, 0).reshape(codes.shape[layer.weight_axis], -1)
    return centred


def _bias_codes(layer: Layer, run: _Run, channels: int) -> np.ndarray:
    """Bias in accumulator units, ``round(b / (s_in * s_w))``, per output channel."""
    if layer.bias is None:
        return np.zeros(channels)
    s_in = run.params[layer.input].scale[0]
    s_w = np.broadcast_to(run.params.tensors[layer.weight].scales().astype(np.float64), (channels,))
    b = np.broadcast_to(np.asarray(run.g.constants[layer.bias], np.float64).ravel(), (channels,))
    return np.rint(b / (s_in * s_w))


def _check_accumulators(run: _Run) -> None:
    limit = accumulator_limit(run.traits.accumulator_bits)
    for layer in run.g.layers:
        run.checked[Check.ACCUMULATOR.value] = run.checked.get(Check.ACCUMULATOR.value, 0) + 1
        w = _centred_weights(layer, run)
        x = run.params[layer.input]
        x_max = max(x.zero_point[0] - x.rng.lo, x.rng.hi - x.zero_point[0])
        bias = _bias_codes(layer, run, w.shape[0])
        bound = np.abs(w).sum(axis=1) * x_max + np.abs(bias)
        _check_bias_range(run, layer, bias)
        worst = int(np.argmax(bound))
        if bound[worst] <= limit:
            continue
        run.add(Check.ACCUMULATOR, layer.output, bound[worst], limit,
                f"worst-case accumulator of layer {layer.name!r} (channel {worst}, {w.shape[1]} inputs) is "
                f"sum|w_q|*{x_max} + |b_q| = {bound[worst]:.4g} > {limit} ({run.traits.accumulator_bits}-bit); "
                f"{int((bound > limit).sum())} of {len(bound)} channels can overflow",
                "use a target with wider accumulators, split the layer (fewer inputs per output), or retrain with smaller weights",
                layer=layer.name, channel=worst)


def _check_bias_range(run: _Run, layer: Layer, bias: np.ndarray) -> None:
    if layer.bias is None or not run.traits.bias_uses_product_scale:
        return
    run.checked[Check.BIAS_RANGE.value] = run.checked.get(Check.BIAS_RANGE.value, 0) + 1
    limit = accumulator_limit(32)
    worst = int(np.argmax(np.abs(bias)))
    if abs(bias[worst]) > limit:
        run.add(Check.BIAS_RANGE, layer.bias, abs(bias[worst]), limit,
                f"bias of layer {layer.name!r} needs {abs(bias[worst]):.4g} int32 codes at scale s_in*s_w",
                "the input or weight scale is far too small for this bias; check the input range and normalization",
                layer=layer.name, channel=worst)


def _check_requant_shift(run: _Run) -> None:
    span = run.traits.requant_shift_range
    if span is None or not run.traits.power_of_two:
        run.skipped[Check.REQUANT_SHIFT.value] = "traits have no power-of-two shift range"
        return
    for layer in run.g.layers:
        fps = (run.params.tensors[layer.weight].fix_position, run.params[layer.input].fix_position,
               run.params[layer.output].fix_position)
        if any(fp is None for fp in fps):
            run.skipped[Check.REQUANT_SHIFT.value] = "parameters are not power-of-two"
            continue
        run.checked[Check.REQUANT_SHIFT.value] = run.checked.get(Check.REQUANT_SHIFT.value, 0) + 1
        in_fp, out_fp = cast(tuple[int, ...], fps[1]), cast(tuple[int, ...], fps[2])  # checked above: none is None
        shift = np.asarray(fps[0]) + in_fp[0] - out_fp[0]
        bad = (shift < span[0]) | (shift > span[1])
        if bad.any():
            worst = int(shift[bad][np.argmax(np.abs(shift[bad] - np.clip(shift[bad], *span)))])
            run.add(Check.REQUANT_SHIFT, layer.output, worst, span[1] if worst > span[1] else span[0],
                    f"layer {layer.name!r}: shift fw+fi-fo = {worst} is outside [{span[0]}, {span[1]}]",
                    "the output range is far narrower or wider than input x weight allows; check ranges or insert a rescaling layer",
                    layer=layer.name)


def _policies(policy: str | Policy | Mapping[str, str]) -> dict[Check, Policy]:
    try:
        if isinstance(policy, Mapping):
            unknown = set(policy) - {c.value for c in Check} - {"default"}
            if unknown:
                raise QuantizationError(f"unknown overflow checks {sorted(unknown)}", f"available: {', '.join(c.value for c in Check)}")
            default = Policy(policy.get("default", "warn"))
            return {c: Policy(policy.get(c.value, default)) for c in Check}
        return {c: Policy(policy) for c in Check}
    except ValueError:
        raise QuantizationError(f"unknown overflow policy in {policy!r}", "use error, warn or fix") from None


def check_overflow(
    onnx_model: onnx.ModelProto,
    stats: Statistics,
    params: QuantParams,
    traits: QuantTraits,
    *,
    data: np.ndarray | None = None,
    peak_output: float | ModelContract | None = None,
    policy: str | Mapping[str, str] = "warn",
    limits: OverflowLimits | None = None,
) -> OverflowReport:
    """Run every overflow check; return an :class:`OverflowReport`.

    ``traits`` are the target's limits (normally ``params.traits``; a variant, e.g. with
    narrower accumulators, checks the same parameters against other limits).

    ``data`` (default None): windows to measure saturation and range use on (one FP32
    run); without it the statistics' histograms are used. ``peak_output`` (default
    None): the output peak in model units, or a ``ModelContract`` whose
    ``peak_power_w`` is de-normalized through its target scaling. ``policy``
    (default ``"warn"``): ``"error"``, ``"warn"`` or ``"fix"``, or a mapping from check
    name (and ``"default"``) to policy. ``limits`` (default :class:`OverflowLimits`()).
    Raises :class:`QuantizationOverflowError` when a check under ``"error"`` fails.
    """
    if params.model_digest and params.model_digest != model_digest(onnx_model):
        raise QuantizationError("the quantization parameters were derived for a different model", "derive them again for this graph")
    model = onnx.ModelProto()
    model.CopyFrom(onnx_model)
    g = analyze(model)
    run = _Run(g, stats, replace(params), traits, _policies(policy), limits or OverflowLimits())
    # a tensor kept at FP32 (params.keep_float: the SQNR floor, precise input) is on no grid in the artifact: no
    # finding about its grid applies, and under --overflow error none may stop the build
    from nilmc.quantization.qdq import float_sets

    run.float_acts = float_sets(g, params.keep_float)[0]
    names = [t.name for t in params.by_role("activation") if t.name not in run.float_acts]
    if kept := sorted(run.float_acts & {t.name for t in params.by_role("activation")}):
        run.skipped["kept_float"] = "saturation, range use and output clipping not checked on tensors kept at FP32: " + ", ".join(kept)
    if data is not None:
        obs = _observe_data(model, data, params, names, run.limits.batch_size)
    else:
        obs = _observe_stats(stats, params, names)
    _check_saturation(run, obs)
    _check_range_use(run, obs)
    _check_input_features(run, data)
    _check_output_clipping(run, peak_output)
    _check_accumulators(run)
    _check_requant_shift(run)
    report = OverflowReport(run.findings, run.params, run.checked, run.skipped)
    if report.errors:
        raise QuantizationOverflowError(report)
    return report

"""Power-of-two refinement: fix positions a DPU-like target deploys, chosen over the shared statistics.

The shared core derives power-of-two parameters per tensor in isolation (:func:`params.derive_params`
under traits with ``power_of_two``: floor/ceil of ``-log2(scale)`` by histogram MSE). A target whose
integer arithmetic is known exactly (the Vitis AI DPU) can do better by choosing the fix positions
*sequentially* on the calibration windows, running its integer ops as it goes, so that each choice
sees the rounding and clipping of every layer before it. :func:`refine_pot` is that refinement; it
does not calibrate: it takes the FP32 tensors and ranges the shared pass already produced, and the
target's integer op (``PotOps.run``, a composition of :mod:`intops` functions).

Rules (measured on the shipped T-P model and five calibration draws; see the DPU backend):

1. **input**: lowest quantization MSE from one coarser to one finer than the no-clipping position of
   the shared range (a few outliers may clip), but never so fine that the grid stops holding
   ``input_floor`` (a 1000-window calibration set misses tails the training data had);
2. **weights** ``fw``: the shared parameters' fix position when given (lowest weight MSE of the
   no-clipping position and one finer), else the same rule here;
3. **bias correction** (default: where it lowers the layer's calibration error): the float bias
   absorbs ``E[y_fp32 - y_q]`` per output channel, measured with quantized inputs and weights;
4. **output** ``fo``: the candidate whose emulated output (after the activation, rounding and
   saturation) is closest in MSE to the FP32 tensor; on the graph output the caller's error
   (watts) decides and the head must cover the physical peak; with ``output_fix_window`` that error also
   decides the tensors reaching the output through passthrough ops alone (a conv before the last pooling),
   over a window that may clip;
5. **bias** ``fb`` (8-bit): lowest bias MSE, kept inside the shift bounds.

Candidates for every other fix position are the no-clipping position of the shared range and one
coarser (never a finer, clipping one): allowing finer positions cost 2 EACC points on a T-P model
whose calibration windows span a third of the evaluation range, these rules 0.2. Measured again with the DPU's
input and head in FP32 on the CPU (``bench_vendors.py`` draws, 2026-12-01): MinMSE over one finer too
(``fix_window=(-1, 1)``) took the finer grid where one outlier event set a draw's range (draw 3: 31.8 -> 36.3 dB) but
also where the draw missed the evaluation tail (draw 1: conv5 clipped at 0.50 against 0.85 on evaluation, 32.9 ->
30.2 dB; draw 4 36.0 -> 33.0): mean 33.8 -> 33.6, worst 31.8 -> 30.2 dB, so the window stays. Every activation's
range, candidates, choice and grid maximum are recorded in ``params.method["choices"]`` (the DPU's
``dpu_params.json`` and manifest ``calibration``), to read against the manifest's ``coverage``.

Shift bounds (AMD Quark refine step): ``shift_cut = fi + fw - fo`` in ``[0, 16]`` (if no candidate
keeps it, ``fw`` moves to the nearest bound), ``shift_bias = fi + fw - fb`` in
``[min(0, shift_cut - 16), 15]`` (``>= 0`` before a LeakyReLU; ``fb`` moves), eltwise ``shift_write``
in ``[-7, 25]``. Every move, and every fix position that differs from the shared start, is noted.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

import numpy as np

from nilmc.compiler.errors import QuantizationError
from nilmc.quantization import intops
from nilmc.quantization.intops import DPU_ROUND, INT_RANGES

INT8 = INT_RANGES["int8"]
OutputErrorFn = Callable[[np.ndarray, np.ndarray], float]  # (fp32 output, dequantized output) -> error


class PotRule(str, Enum):
    """How :func:`refine_pot` chooses an op's output fix position."""

    INPUT = "input"  # quantization MSE on the graph input
    WEIGHTED = "weighted"  # weights, bias (corrected), output, shift repair
    PASSTHROUGH = "passthrough"  # keeps its input's fix position (pooling, flatten: Quark's align_pool)
    ELEMENTWISE = "elementwise"  # output by emulated MSE (add, standalone activations)


# --------------------------------------------------------------------------- records
@dataclass
class WeightFix:
    """Integer weights and bias of one weighted op at fix positions ``fw`` / ``fb``."""

    fw: int
    fb: int | None
    weight_q: np.ndarray = field(repr=False)
    bias_q: np.ndarray | None = field(default=None, repr=False)

    def weight_float(self) -> np.ndarray:
        """The quantized weights as exact float32 values (``q * 2**-fw``)."""
        return intops.pot_dequantize(self.weight_q, self.fw)

    def bias_float(self) -> np.ndarray | None:
        return None if self.bias_q is None or self.fb is None else intops.pot_dequantize(self.bias_q, self.fb)


@dataclass
class PotParams:
    """Fix positions of every tensor, integer weights of every weighted op, and the log of choices."""

    fix: dict[str, int]
    weights: dict[str, WeightFix]
    notes: dict[str, list[str]] = field(default_factory=dict)
    method: dict[str, Any] = field(default_factory=dict)

    def note(self, op: str, text: str) -> None:
        self.notes.setdefault(op, []).append(text)


@dataclass(frozen=True)
class PotOptions:
    """Refinement knobs. Defaults: bias correction where it lowers the layer's calibration error
    (``"auto"``; ``True`` always, ``False`` never, ``"holdout"`` where the correction measured on the first
    windows lowers the error on the last ``holdout`` share, default 0.2), candidates from one coarser than the no-clipping
    position to it (``fix_window=(-1, 0)``), input ``(-1, 1)``, MSE everywhere except the graph output
    (``output_error``), no physical peak, no input floor, no pinned fix positions."""

    bias_correction: bool | str = "auto"
    holdout: float = 0.2  # share of the windows (the last ones) bias_correction="holdout" decides on
    fix_window: tuple[int, int] = (-1, 0)
    input_fix_window: tuple[int, int] = (-1, 1)
    input_floor: float | None = None  # |value| the input grid must hold whatever the calibration windows show
    peak_output: float | None = None  # largest head value that must stay representable (model units)
    output_error: OutputErrorFn | None = None
    # Fix positions decided elsewhere (QAT): tensor -> fix position, weighted op -> weight fix position. They
    # replace the search; shift bounds still apply (a violated shift_cut still moves ``fw``). Default none.
    fixed: Mapping[str, int] | None = None
    fixed_weights: Mapping[str, int] | None = None
    # Deployment headroom: every activation range but an input's with ``input_floor`` is scaled by this before the
    # candidates are placed (evaluation data run past a 1000-window calibration's maxima). Default 1.0 (none).
    headroom: float = 1.0
    # Candidates (relative to the no-clipping position) for the tensors ``output_error`` judges: the graph outputs and
    # the tensors that reach one through passthrough ops only (a conv before the last pooling). None: ``fix_window``.
    # A caller whose error runs the float model after the graph (a CPU post stage) may allow clipping there: that error,
    # not the local MSE, then decides whether the rare large values or the common small ones keep the grid.
    output_fix_window: tuple[int, int] | None = None
    # What a clipping grid of those tensors (finer than the no-clipping position) must gain: its output error is
    # compared multiplied by ``10 ** (clip_gain_db / 10)``, so it is taken only when it lowers the error by that many
    # dB on the calibration windows (clipped tails the evaluation data reach cost more there). Default 0 (plain MSE rule).
    clip_gain_db: float = 0.0


class PotOp(Protocol):
    """What the refinement reads of an op (the DPU IR's ``DpuOp`` is one)."""

    name: str
    kind: Any
    inputs: tuple[str, ...]
    output: str
    weight: np.ndarray | None
    bias: np.ndarray | None
    activation: str | None
    weight_name: str | None


class PotOps(Protocol):
    """The target's integer semantics, as the refinement needs them."""

    def rule(self, op: Any) -> PotRule: ...
    def run(self, op: Any, args: list[np.ndarray], params: PotParams) -> np.ndarray: ...
    def accumulate(self, op: Any, x: np.ndarray, w: np.ndarray) -> np.ndarray: ...  # exact ints, or floats for floats


# --------------------------------------------------------------------------- fix-position helpers
def no_clip_fix(amax: float) -> int:
    """Largest fix position whose int8 grid still holds ``amax`` (``127 * 2**-fp >= amax``)."""
    if not amax > 0 or not math.isfinite(amax):
        return 7
    return int(math.floor(math.log2(INT8.hi / amax)))


def quantize_values(v: np.ndarray, fp: int) -> np.ndarray:
    return intops.pot_quantize(v, fp, INT8, DPU_ROUND)


def _mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))


def best_fix(values: np.ndarray, candidates: Sequence[int]) -> int:
    """The candidate with the lowest quantization MSE on ``values`` (ties: the coarser one)."""
    errs = [(_mse(intops.pot_dequantize(quantize_values(values, fp), fp), values), fp) for fp in candidates]
    return min(errs)[1]


def window(amax: float, win: tuple[int, int]) -> range:
    fp0 = no_clip_fix(amax)
    return range(fp0 + win[0], fp0 + win[1] + 1)


def shift_bias_bounds(shift_cut: int, limits: Mapping[str, Any], *, leaky: bool) -> tuple[int, int]:
    """``[min(0, shift_cut - 16), 15]`` (lower bound 0 before a LeakyReLU); headroom from ``limits``."""
    headroom = int(limits.get("shift_bias_headroom_bits", 24))
    lo = 0 if leaky else min(0, -(headroom - (8 + shift_cut)))
    return lo, int(limits.get("shift_bias_max", 15))


def shared_fix_positions(params: Any) -> dict[str, int]:
    """``tensor -> fix position`` of shared :class:`~nilmc.quantization.params.QuantParams` (power-of-two traits)."""
    out = {}
    for name, tq in getattr(params, "tensors", {}).items():
        if tq.fix_position:
            out[name] = int(tq.fix_position[0])
    for name, src in getattr(params, "shared", {}).items():
        if src in out:
            out.setdefault(name, out[src])
    return out


def output_chains(ops: Sequence[Any], outputs: Sequence[str], rule: Callable[[Any], PotRule]) -> dict[str, list[Any]]:
    """``tensor -> passthrough ops`` from ``tensor`` to a graph output, for every tensor that reaches one through
    passthrough ops alone, each read by that chain only (an output itself maps to ``[]``)."""
    readers: dict[str, int] = {}
    for op in ops:
        for t in op.inputs:
            readers[t] = readers.get(t, 0) + 1
    producer = {op.output: op for op in ops}
    out: dict[str, list[Any]] = {}
    for o in outputs:
        chain: list[Any] = []
        out[o] = []
        t = o
        while t in producer and rule(producer[t]) == PotRule.PASSTHROUGH and readers.get(producer[t].inputs[0], 0) == 1:
            chain.insert(0, producer[t])
            t = producer[t].inputs[0]
            out[t] = list(chain)
    return out


# --------------------------------------------------------------------------- the refinement
@dataclass
class _Choice:
    err: float
    fo: int
    fb: int | None
    bias_q: np.ndarray | None
    out: np.ndarray
    notes: list[str]


class _Refiner:
    def __init__(self, ops: Sequence[Any], outputs: Sequence[str], reference: Mapping[str, np.ndarray], limits: Mapping[str, Any],
                 target: PotOps, params: PotParams, options: PotOptions, ranges: Mapping[str, float],
                 start: Mapping[str, int]) -> None:
        self.ops, self.outputs, self.ref, self.limits = ops, set(outputs), reference, limits
        self.t, self.params, self.opt, self.ranges, self.start = target, params, options, ranges, start
        self.fixed, self.fixed_w = dict(options.fixed or {}), dict(options.fixed_weights or {})
        self.codes: dict[str, np.ndarray] = {}
        self.chains = (output_chains(ops, outputs, target.rule)
                       if options.output_error is not None and options.output_fix_window is not None else {})

    def judged(self, tensor: str) -> bool:
        """Whether the caller's output error, not the local MSE, decides ``tensor``'s fix position."""
        return tensor in self.outputs or tensor in self.chains

    def amax(self, tensor: str) -> float:
        return float(self.ranges[tensor]) if tensor in self.ranges else float(np.max(np.abs(self.ref[tensor])))

    def deployed_amax(self, tensor: str) -> float:
        """The range the grid must hold when deployed: the calibration range with the options' headroom."""
        return self.amax(tensor) * float(self.opt.headroom)

    def output_range(self, tensor: str) -> float:
        """The range an op output's candidates are placed on: a graph output's calibration range, else the deployed one."""
        return self.amax(tensor) if tensor in self.outputs else self.deployed_amax(tensor)

    def record(self, tensor: str, amax: float, cands: Sequence[int], fp: int) -> None:
        """What decided ``tensor``'s fix position (``params.method["choices"]``): the range the candidates were placed
        on, the candidates and the choice, with the chosen grid's largest value (coverage reads against it)."""
        self.params.method.setdefault("choices", {})[tensor] = {
            "range": round(float(amax), 6), "candidates": [int(c) for c in cands], "fix": int(fp),
            "grid_max": math.ldexp(float(INT8.hi), -int(fp))}

    def run(self) -> PotParams:
        steps = {PotRule.INPUT: self.input, PotRule.WEIGHTED: self.weighted, PotRule.PASSTHROUGH: self.passthrough,
                 PotRule.ELEMENTWISE: self.elementwise}
        for op in self.ops:
            steps[self.t.rule(op)](op)
        return self.params

    # -- ops
    def input(self, op: Any) -> None:
        x = self.ref[op.output]
        amax = self.amax(op.output) if self.opt.input_floor is not None else self.deployed_amax(op.output)
        cands = list(window(amax, self.opt.input_fix_window))
        if self.opt.input_floor is not None:
            cap = no_clip_fix(self.opt.input_floor)
            cands = [fp for fp in cands if fp <= cap] or [cap]
        if op.output in self.fixed:
            cands = [int(self.fixed[op.output])]
        fp = best_fix(x, cands)
        self.params.fix[op.output] = fp
        self.record(op.output, amax, cands, fp)
        self.codes[op.output] = quantize_values(x, fp)

    def passthrough(self, op: Any) -> None:
        self.params.fix[op.output] = self.params.fix[op.inputs[0]]
        self.codes[op.output] = self.t.run(op, [self.codes[op.inputs[0]]], self.params)

    def elementwise(self, op: Any) -> None:
        ref = self.ref[op.output]
        fis = [self.params.fix[t] for t in op.inputs]
        cands = list(window(self.deployed_amax(op.output), self._window(op.output)))
        if op.output in self.fixed:
            cands = [int(self.fixed[op.output])]
        if len(op.inputs) > 1:
            cands = self._shift_write(op, fis, cands)
        args = [self.codes[t] for t in op.inputs]
        best = None
        for fo in cands:
            self.params.fix[op.output] = fo
            out = self.t.run(op, args, self.params)
            err = self._error(op, ref, out, fo)
            if best is None or err < best[0]:
                best = (err, fo, out)
        assert best is not None
        self.params.fix[op.output], self.codes[op.output] = best[1], best[2]
        self.record(op.output, self.deployed_amax(op.output), cands, best[1])

    def _shift_write(self, op: Any, fis: list[int], cands: list[int]) -> list[int]:
        lo, hi = self.limits.get("shift_write", (-7, 25))
        keep = [fo for fo in cands if lo <= min(fis) - fo <= hi]
        if not keep:
            keep = [min(fis) - int(np.clip(min(fis) - cands[0], lo, hi))]
            self.params.note(op.name, f"output fix point moved to {keep[0]} to keep shift_write in [{lo}, {hi}]")
        if max(fis) - min(fis) > self.limits.get("shift_read", (0, 7))[1]:
            self.params.note(op.name, f"shift_read {max(fis) - min(fis)} exceeds 7: the smaller-fix input loses low bits (floor)")
        return keep

    def _weight_fix(self, op: Any, w: np.ndarray) -> int:
        if op.name in self.fixed_w:
            return int(self.fixed_w[op.name])
        if op.weight_name in self.start:
            return int(self.start[op.weight_name])  # the shared core's choice (same rule: MSE of no-clip and one finer)
        fw0 = no_clip_fix(float(np.max(np.abs(w))))
        return best_fix(w, [fw0, fw0 + 1])

    def weighted(self, op: Any) -> None:
        fi = self.params.fix[op.inputs[0]]
        xq = self.codes[op.inputs[0]]
        w = np.asarray(op.weight, np.float64)
        fw = self._weight_fix(op, w)
        ref = self.ref[op.output]
        cands = self._output_candidates(op)
        acc = self.t.accumulate(op, xq, quantize_values(w, fw))
        best = self._search_biases(op, acc, fi, fw, cands, ref)
        notes: list[str] = []
        if best is None:  # every candidate breaks shift_cut: move fw, as Quark's adjust_shift_cut does
            fo = cands[-1]  # the no-clipping position
            lo, hi = self.limits.get("shift_cut", (0, 16))
            new_fw = int(np.clip(fi + fw - fo, lo, hi)) + fo - fi
            notes.append(f"shift_cut {fi + fw - fo} outside [{lo}, {hi}]: weight fix point moved {fw} -> {new_fw}")
            fw = new_fw
            acc = self.t.accumulate(op, xq, quantize_values(w, fw))
            best = self._search_biases(op, acc, fi, fw, [fo], ref)
            assert best is not None
        self.params.fix[op.output] = best.fo
        amax = self.output_range(op.output)
        self.record(op.output, amax, cands, best.fo)
        self.params.weights[op.name] = WeightFix(fw, best.fb, quantize_values(w, fw), best.bias_q)
        self.codes[op.output] = best.out
        if notes or best.notes:
            self.params.notes[op.name] = notes + best.notes

    # -- weighted-op pieces
    def _search_biases(self, op: Any, acc: np.ndarray, fi: int, fw: int, cands: list[int], ref: np.ndarray) -> _Choice | None:
        """Best output fix position with the model's bias and/or the corrected one (per ``bias_correction``)."""
        mode = self.opt.bias_correction if op.bias is not None else False  # no bias to absorb the correction
        plain = None if op.bias is None else np.asarray(op.bias, np.float64)
        if mode == "holdout":
            mode = self._correction_holds(op, acc, plain, fi, fw, cands, ref)
        best = None if mode is True else self._search_fo(op, acc, plain, fi, fw, cands, ref)
        if mode is False:
            return best
        corrected = self._search_fo(op, acc, self._corrected_bias(op, acc, fi, fw), fi, fw, cands, ref)
        if corrected is not None and (best is None or corrected.err < best.err):
            if best is not None:
                corrected.notes.insert(0, f"bias corrected (calibration error {best.err:.4g} -> {corrected.err:.4g})")
            return corrected
        return best

    def _correction_holds(self, op: Any, acc: np.ndarray, plain: np.ndarray | None, fi: int, fw: int, cands: list[int],
                          ref: np.ndarray) -> bool:
        """Whether the bias correction, measured on the first windows, lowers the error on the last ``holdout`` share
        (a contiguous block: the windows are a time series, neighbours share frames)."""
        m = int(round(len(acc) * (1.0 - self.opt.holdout)))
        if m < 1 or m >= len(acc):
            return True
        fitted = self._corrected_bias(op, acc[:m], fi, fw, rows=slice(0, m))
        held = slice(m, len(acc))
        a = self._search_fo(op, acc[held], plain, fi, fw, cands, ref[held])
        b = self._search_fo(op, acc[held], fitted, fi, fw, cands, ref[held])
        keep = b is not None and (a is None or b.err < a.err)
        if a is not None and b is not None:
            self.params.note(op.name, f"bias correction {'kept' if keep else 'dropped'}: held-out error {a.err:.4g} -> {b.err:.4g}")
        return keep

    def _corrected_bias(self, op: Any, acc: np.ndarray, fi: int, fw: int, rows: slice = slice(None)) -> np.ndarray:
        """The bias plus the mean pre-activation error ``E[y_fp32 - y_q]`` per output channel (over ``rows``)."""
        bias = np.zeros(acc.shape[-1]) if op.bias is None else np.asarray(op.bias, np.float64)
        x_ref = np.asarray(self.ref[op.inputs[0]][rows], np.float64)
        pre_fp = self.t.accumulate(op, x_ref, np.asarray(op.weight, np.float64)) + bias
        pre_q = acc * math.ldexp(1.0, -(fi + fw)) + bias
        return bias + np.mean(pre_fp - pre_q, axis=tuple(range(pre_fp.ndim - 1)))

    def _window(self, tensor: str) -> tuple[int, int]:
        if self.opt.output_fix_window is not None and self.judged(tensor):
            return self.opt.output_fix_window
        return self.opt.fix_window

    def _output_candidates(self, op: Any) -> list[int]:
        amax = self.output_range(op.output)
        cands = list(window(amax, self._window(op.output)))
        if op.output in self.outputs and self.opt.peak_output is not None:
            cap = no_clip_fix(max(float(self.opt.peak_output), amax))
            cands = [fo for fo in cands if fo <= cap] or [cap]
        if op.output in self.fixed:
            cands = [int(self.fixed[op.output])]
        return cands

    def _bias_codes(self, bias: np.ndarray, fi: int, fw: int, shift_cut: int, leaky: bool) -> tuple[int, np.ndarray, list[str]]:
        """8-bit bias fix position by MSE, moved into the shift_bias bounds (Quark's adjust_shift_bias)."""
        fb0 = no_clip_fix(float(np.max(np.abs(bias))))
        fb = best_fix(bias, [fb0, fb0 + 1])
        lo, hi = shift_bias_bounds(shift_cut, self.limits, leaky=leaky)
        notes = []
        if not lo <= fi + fw - fb <= hi:
            new_fb = fi + fw - int(np.clip(fi + fw - fb, lo, hi))
            notes.append(f"shift_bias {fi + fw - fb} outside [{lo}, {hi}]: bias fix point moved {fb} -> {new_fb}")
            fb = new_fb
        return fb, quantize_values(bias, fb), notes

    def _search_fo(self, op: Any, acc: np.ndarray, bias: np.ndarray | None, fi: int, fw: int, cands: list[int],
                   ref: np.ndarray) -> _Choice | None:
        """The output fix position (among ``cands`` that keep shift_cut in bounds) with the lowest error."""
        lo, hi = self.limits.get("shift_cut", (0, 16))
        best = None
        for fo in cands:
            sc = fi + fw - fo
            if not lo <= sc <= hi:
                continue
            fb, bq, notes = (None, None, []) if bias is None else self._bias_codes(bias, fi, fw, sc, op.activation == "leaky_relu")
            out = intops.pot_requantize(acc, bq, shift_cut=sc, shift_bias=fi + fw - (fb or 0), activation=op.activation)
            err = self._error(op, ref, out, fo)
            if best is None or err < best.err:
                best = _Choice(err, fo, fb, bq, out, notes)
        return best

    def _error(self, op: Any, ref: np.ndarray, out: np.ndarray, fo: int) -> float:
        err = self._raw_error(op, ref, out, fo)
        if self.opt.clip_gain_db and self.judged(op.output):
            if fo > no_clip_fix(self.output_range(op.output)):
                err *= 10.0 ** (self.opt.clip_gain_db / 10.0)
        return err

    def _raw_error(self, op: Any, ref: np.ndarray, out: np.ndarray, fo: int) -> float:
        chain = self.chains.get(op.output)
        if chain:  # run the passthrough ops to the output (they keep the fix position) and judge there
            self.params.fix[op.output] = fo
            for c in chain:
                self.params.fix[c.output] = fo
                out = self.t.run(c, [out], self.params)
            return float(self.opt.output_error(self.ref[chain[-1].output], intops.pot_dequantize(out, fo)))  # type: ignore[misc]
        deq = intops.pot_dequantize(out, fo)
        if op.output in self.outputs and self.opt.output_error is not None:
            return float(self.opt.output_error(ref, deq))
        return _mse(deq, ref)


def refine_pot(ops: Sequence[Any], outputs: Sequence[str], reference: Mapping[str, np.ndarray], limits: Mapping[str, Any], *,
               target: PotOps, params: PotParams, options: PotOptions = PotOptions(), ranges: Mapping[str, float] | None = None,
               start: Mapping[str, int] | None = None) -> PotParams:
    """Fill ``params`` with the refined fix positions of ``ops`` (topological order) and return it.

    ``reference``: FP32 value of every op output on the calibration windows, in the layout ``target``
    computes (the shared FP32 pass, not a second calibration); ``ranges`` (default: ``max|reference|``):
    ``tensor -> max |value|`` from the shared statistics; ``start`` (default none): the shared core's
    fix positions, taken for the weights and compared with every activation choice (differences are
    noted in ``params.method["moved_from_shared"]``); ``limits``: the target's shift bounds.
    """
    if not len(reference) or any(len(np.asarray(v)) == 0 for v in reference.values()):
        raise QuantizationError("the power-of-two refinement got no calibration windows", "pass a calibration set with at least one window")
    start = dict(start or {})
    out = _Refiner(ops, outputs, reference, limits, target, params, options, dict(ranges or {}), start).run()
    moved = {t: [start[t], fp] for t, fp in out.fix.items() if t in start and start[t] != fp}
    out.method["moved_from_shared"] = moved
    return out

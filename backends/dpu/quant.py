"""Power-of-two quantization the way the DPU computes: fix positions, shifts, repair.

Every tensor is per-tensor symmetric int8 with ``real = q * 2**-fix_point``. This
module chooses the fix points of one :class:`~nilmc.backends.dpu.ir.DpuGraph`
sequentially on the calibration windows, running the bit-accurate emulator as it
goes, so each choice sees the rounding and clipping of every layer before it:

1. **input**: the fix point with the lowest quantization MSE on the calibration
   inputs, from one coarser to one finer than the no-clipping position (a few
   outliers may clip), but never so fine that the grid stops holding
   ``input_floor`` (the backend passes 4 training standard deviations of the
   normalized features, from the contract: a 1000-window calibration set misses
   tails the training data had);
2. **weights** ``fw``: lowest weight MSE of the no-clipping position and one finer
   (DPU_ROUND; weights are known exactly, so clipping is judged on all of them);
3. **bias correction** (default: where it lowers the layer's calibration error): the
   float bias absorbs the mean error of the pre-activation, ``E[y_fp32 - y_q]`` per
   output channel, measured with quantized inputs and weights (empirical bias
   correction, Nagel et al. 2019);
4. **output** ``fo``: the candidate whose emulated output (after the activation, DPU
   rounding and saturation) is closest in MSE to the FP32 tensor; on the graph
   output the error is measured in the caller's units (watts, negatives floored at
   0 W, when the contract is given) and the head must cover the physical peak;
5. **bias** ``fb`` (8-bit): lowest bias MSE, kept inside the shift bounds.

Candidates for every other fix point are the no-clipping position for the
calibration maximum and one coarser (never a finer, clipping one). Measured on a
T-P model whose calibration windows span a third of the evaluation range,
allowing finer positions cost 2 EACC points, these rules 0.2; on five
calibration draws of the shipped recipe the deltas stay within [-0.4, 0.2].

Shift bounds (AMD Quark / Vitis AI quantizer refine step, ``target.json``):
``shift_cut = fi + fw - fo`` in ``[0, 16]`` (candidates that violate it are skipped; if
none is left, ``fw`` is moved to the nearest bound, as Quark's ``adjust_shift_cut``
does), ``shift_bias = fi + fw - fb`` in ``[min(0, shift_cut - 16), 15]`` (``>= 0`` before a
LeakyReLU; ``fb`` is moved, as ``adjust_shift_bias`` does), eltwise ``shift_write`` in
``[-7, 25]``. Every move is recorded in :attr:`DpuParams.notes`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from nilmc.backends.dpu import emulator as emu
from nilmc.backends.dpu.ir import DpuGraph, DpuOp
from nilmc.compiler.errors import QuantizationError
from nilmc.quantization.intops import DPU_ROUND, INT_RANGES
from nilmc.quantization.traits import DPU_POT

INT8 = INT_RANGES["int8"]
OutputErrorFn = Callable[[np.ndarray, np.ndarray], float]  # (fp32 output, emulated output) -> error


# --------------------------------------------------------------------------- records
@dataclass
class WeightQuant:
    """Integer weights and bias of one conv/dense op (weights OHWI or ``[in, out]``)."""

    fw: int
    fb: int | None
    weight_q: np.ndarray = field(repr=False)
    bias_q: np.ndarray | None = field(default=None, repr=False)

    def weight_float(self) -> np.ndarray:
        """The quantized weights as exact float32 values (``q * 2**-fw``)."""
        return emu.dequantize(self.weight_q, self.fw)

    def bias_float(self) -> np.ndarray | None:
        return None if self.bias_q is None or self.fb is None else emu.dequantize(self.bias_q, self.fb)


@dataclass
class DpuParams:
    """Fix points of every tensor, integer weights of every weighted op, and the log of choices."""

    fix: dict[str, int]
    weights: dict[str, WeightQuant]
    notes: dict[str, list[str]] = field(default_factory=dict)
    method: dict[str, Any] = field(default_factory=dict)

    def note(self, op: str, text: str) -> None:
        self.notes.setdefault(op, []).append(text)

    def shifts(self, graph: DpuGraph) -> dict[str, dict[str, int]]:
        """The DPU shift parameters of every op that has them."""
        out: dict[str, dict[str, int]] = {}
        for op in graph.ops:
            if op.weighted:
                wq = self.weights[op.name]
                fi, fo = self.fix[op.inputs[0]], self.fix[op.output]
                d = {"shift_cut": fi + wq.fw - fo}
                if wq.fb is not None:
                    d["shift_bias"] = fi + wq.fw - wq.fb
                out[op.name] = d
            elif op.kind == "add":
                fis = [self.fix[t] for t in op.inputs]
                out[op.name] = {"shift_read": max(fis) - min(fis), "shift_write": min(fis) - self.fix[op.output]}
        return out

    def to_json(self, graph: DpuGraph) -> dict[str, Any]:
        shifts = self.shifts(graph)
        layers = []
        for op in graph.ops:
            row: dict[str, Any] = {"op": op.name, "kind": op.kind, "inputs": list(op.inputs), "output": op.output,
                                   "fix_in": [self.fix[t] for t in op.inputs], "fix_out": self.fix.get(op.output)}
            if op.weighted:
                wq = self.weights[op.name]
                row.update({"fix_weights": wq.fw, "fix_bias": wq.fb, **shifts[op.name]})
            elif op.name in shifts:
                row.update(shifts[op.name])
            if op.name in self.notes:
                row["notes"] = list(self.notes[op.name])
            layers.append(row)
        return {"arithmetic": "int8 symmetric, real = q * 2**-fix_point, DPU_ROUND (round half up)",
                "fix_points": dict(self.fix), "layers": layers, "method": dict(self.method)}


@dataclass(frozen=True)
class DpuQuantOptions:
    """Calibration knobs. Defaults: bias correction where it lowers the layer's calibration error
    (``"auto"``; ``True`` always, ``False`` never), fix-point candidates from one coarser than the
    no-clipping position to the no-clipping position (``fix_window=(-1, 0)``: the calibration
    maximum is never clipped), at most 1000 calibration windows, MSE everywhere except the
    graph output (``output_error``, default MSE), no physical peak, no extra input range."""

    bias_correction: bool | str = "auto"
    fix_window: tuple[int, int] = (-1, 0)
    input_fix_window: tuple[int, int] = (-1, 1)
    input_floor: float | None = None  # |value| the input grid must hold whatever the calibration windows show
    max_windows: int = 1000
    peak_output: float | None = None  # largest head value that must stay representable (model units)
    output_error: OutputErrorFn | None = None
    # Fix points decided elsewhere (QAT): IR tensor -> fix point, and weighted op -> weight fix point. They
    # replace the search above; shift bounds still apply (a violated shift_cut still moves ``fw``). Default none.
    fixed: Mapping[str, int] | None = None
    fixed_weights: Mapping[str, int] | None = None


# --------------------------------------------------------------------------- fix-point helpers
def no_clip_fix(amax: float) -> int:
    """Largest fix point whose int8 grid still holds ``amax`` (``127 * 2**-fp >= amax``)."""
    if not amax > 0 or not math.isfinite(amax):
        return 7
    return int(math.floor(math.log2(INT8.hi / amax)))


def quantize_values(v: np.ndarray, fp: int) -> np.ndarray:
    return emu.quantize_input(v, fp, DPU_ROUND)


def _mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))


def best_fix(values: np.ndarray, candidates: range | list[int]) -> int:
    """The candidate with the lowest quantization MSE on ``values`` (ties: the coarser one)."""
    errs = [(_mse(emu.dequantize(quantize_values(values, fp), fp), values), fp) for fp in candidates]
    return min(errs)[1]


def _window(amax: float, window: tuple[int, int]) -> range:
    fp0 = no_clip_fix(amax)
    return range(fp0 + window[0], fp0 + window[1] + 1)


def shift_bias_bounds(shift_cut: int, limits: Mapping[str, Any], *, leaky: bool) -> tuple[int, int]:
    """``[min(0, shift_cut - 16), 15]`` (lower bound 0 before a LeakyReLU); headroom from ``limits``."""
    headroom = int(limits.get("shift_bias_headroom_bits", 24))
    lo = 0 if leaky else min(0, -(headroom - (8 + shift_cut)))
    return lo, int(limits.get("shift_bias_max", 15))


# --------------------------------------------------------------------------- float reference
def _act_float(y: np.ndarray, act: str | None, alpha: float) -> np.ndarray:
    if act == "relu":
        return np.maximum(y, 0.0)
    if act == "leaky_relu":
        return np.where(y < 0, y * alpha, y)
    return y


def float_op(op: DpuOp, args: list[np.ndarray]) -> np.ndarray:
    """FP32 semantics of one IR op (float64), as the original model computes it."""
    alpha = float(op.attrs.get("alpha", 0.0))
    if op.kind == "conv2d":
        return _act_float(emu.conv_float(args[0], op.weight, op.bias, op.attrs), op.activation, alpha)  # type: ignore[arg-type]
    if op.kind == "dense":
        y = np.asarray(args[0], np.float64) @ np.asarray(op.weight, np.float64)
        return _act_float(y if op.bias is None else y + op.bias, op.activation, alpha)
    if op.kind == "flatten":
        return args[0].reshape(len(args[0]), -1)
    if op.kind == "maxpool":
        (kh, kw), (sh, sw) = op.attrs["kernel"], op.attrs["stride"]
        pt, pl, pb, pr = op.attrs["pads"]
        xp = np.pad(args[0], ((0, 0), (pt, pb), (pl, pr), (0, 0)), constant_values=-np.inf)
        return emu.sliding_window_view(xp, (kh, kw), axis=(1, 2))[:, ::sh, ::sw].max(axis=(-1, -2))
    if op.kind == "avgpool":
        kh, kw = op.attrs["kernel"]
        return emu.avgpool_sum(args[0].astype(np.float64), op.attrs) / (kh * kw)  # type: ignore[arg-type]
    if op.kind == "add":
        return _act_float(args[0] + args[1], op.activation, 0.0)
    if op.kind in ("relu", "leaky_relu"):
        return _act_float(args[0], op.kind, alpha)
    raise emu.EmulationError(f"op {op.name!r} ({op.attrs.get('op_type', op.kind)}) has no float reference: {op.reason}",
                             "the DPU lowering covers conv, dense, pooling, add, ReLU and LeakyReLU")


def float_forward(graph: DpuGraph, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every IR tensor in FP32 semantics (float64), NHWC."""
    vals: dict[str, np.ndarray] = {}
    for op in graph.ops:
        if op.kind == "input":
            x = np.asarray(feeds[op.name], np.float64)
            vals[op.output] = x.reshape(len(x), *op.shape)
        else:
            vals[op.output] = float_op(op, [vals[t] for t in op.inputs])
    return vals


# --------------------------------------------------------------------------- calibration
@dataclass
class _Choice:
    """One evaluated (output fix point, bias) candidate of a weighted op."""

    err: float
    fo: int
    fb: int | None
    bias_q: np.ndarray | None
    out: np.ndarray
    notes: list[str]


class _Calibrator:
    def __init__(self, graph: DpuGraph, feeds: Mapping[str, np.ndarray], limits: Mapping[str, Any], options: DpuQuantOptions,
                 reference: DpuGraph | None = None) -> None:
        self.graph, self.limits, self.opt = graph, limits, options
        self.feeds = {k: _subset(np.asarray(v, np.float32), options.max_windows) for k, v in feeds.items()}
        self.ref = float_forward(reference or graph, self.feeds)
        self.fixed, self.fixed_w = dict(options.fixed or {}), dict(options.fixed_weights or {})
        self.params = DpuParams({}, {}, method={
            "calibration_windows": int(len(next(iter(self.feeds.values())))), "bias_correction": str(options.bias_correction),
            "fix_window": list(options.fix_window), "rounding": "DPU_ROUND", "traits": DPU_POT.name,
            "output_error": "caller's (contract units)" if options.output_error else "mse",
        })
        self.codes: dict[str, np.ndarray] = {}
        self.outputs = set(graph.outputs)

    def run(self) -> DpuParams:
        for op in self.graph.ops:
            if op.kind == "input":
                self.input(op)
            elif op.weighted:
                self.weighted(op)
            elif op.kind in ("flatten", "maxpool", "avgpool"):
                self.passthrough(op)
            elif op.kind in ("add", "relu", "leaky_relu"):
                self.elementwise(op)
            else:
                raise emu.EmulationError(f"op {op.name!r} ({op.attrs.get('op_type')}) cannot be quantized for the DPU: {op.reason}",
                                         "the DPU lowering covers conv, dense, pooling, add, ReLU and LeakyReLU")
        return self.params

    # -- ops
    def input(self, op: DpuOp) -> None:
        x = self.ref[op.output]
        cands = list(_window(float(np.max(np.abs(x))), self.opt.input_fix_window))
        if self.opt.input_floor is not None:
            cap = no_clip_fix(self.opt.input_floor)
            cands = [fp for fp in cands if fp <= cap] or [cap]
        if op.output in self.fixed:
            cands = [int(self.fixed[op.output])]
        fp = best_fix(x, cands)
        self.params.fix[op.output] = fp
        self.codes[op.output] = quantize_values(x, fp)

    def passthrough(self, op: DpuOp) -> None:
        # Pooling and flatten keep their input's fix point (Quark's align_pool); the avg-pool
        # multiplier then only rescales by N / 2**M.
        self.params.fix[op.output] = self.params.fix[op.inputs[0]]
        self.codes[op.output] = emu.run_op(op, [self.codes[op.inputs[0]]], self.params)

    def elementwise(self, op: DpuOp) -> None:
        ref = self.ref[op.output]
        fis = [self.params.fix[t] for t in op.inputs]
        cands = list(_window(float(np.max(np.abs(ref))), self.opt.fix_window))
        if op.output in self.fixed:
            cands = [int(self.fixed[op.output])]
        if op.kind == "add":
            lo, hi = self.limits.get("shift_write", (-7, 25))
            keep = [fo for fo in cands if lo <= min(fis) - fo <= hi]
            if not keep:
                keep = [min(fis) - int(np.clip(min(fis) - cands[0], lo, hi))]
                self.params.note(op.name, f"output fix point moved to {keep[0]} to keep shift_write in [{lo}, {hi}]")
            cands = keep
            if max(fis) - min(fis) > self.limits.get("shift_read", (0, 7))[1]:
                self.params.note(op.name, f"shift_read {max(fis) - min(fis)} exceeds 7: the smaller-fix input loses low bits (floor)")
        args = [self.codes[t] for t in op.inputs]
        best = None
        for fo in cands:
            self.params.fix[op.output] = fo
            out = emu.run_op(op, args, self.params)
            err = self._error(op, ref, out, fo)
            if best is None or err < best[0]:
                best = (err, fo, out)
        assert best is not None
        self.params.fix[op.output] = best[1]
        self.codes[op.output] = best[2]

    def weighted(self, op: DpuOp) -> None:
        fi = self.params.fix[op.inputs[0]]
        xq = self.codes[op.inputs[0]]
        w = np.asarray(op.weight, np.float64)
        fw0 = no_clip_fix(float(np.max(np.abs(w))))
        fw = int(self.fixed_w[op.name]) if op.name in self.fixed_w else best_fix(w, [fw0, fw0 + 1])
        ref = self.ref[op.output]
        cands = self._output_candidates(op, ref)
        acc = self._accumulate(op, xq, quantize_values(w, fw))
        best = self._search_biases(op, acc, fi, fw, cands, ref)
        notes: list[str] = []
        if best is None:  # every candidate breaks shift_cut: move fw, as Quark's adjust_shift_cut does
            fo = cands[-1]  # the no-clipping position
            lo, hi = self.limits.get("shift_cut", (0, 16))
            new_fw = int(np.clip(fi + fw - fo, lo, hi)) + fo - fi
            notes.append(f"shift_cut {fi + fw - fo} outside [{lo}, {hi}]: weight fix point moved {fw} -> {new_fw}")
            fw = new_fw
            acc = self._accumulate(op, xq, quantize_values(w, fw))
            best = self._search_biases(op, acc, fi, fw, [fo], ref)
            assert best is not None
        self.params.fix[op.output] = best.fo
        self.params.weights[op.name] = WeightQuant(fw, best.fb, quantize_values(w, fw), best.bias_q)
        self.codes[op.output] = best.out
        if notes or best.notes:
            self.params.notes[op.name] = notes + best.notes

    # -- weighted-op pieces
    def _search_biases(self, op: DpuOp, acc: np.ndarray, fi: int, fw: int, cands: list[int], ref: np.ndarray) -> _Choice | None:
        """Best output fix point with the model's bias and/or the corrected one (per ``bias_correction``)."""
        mode = self.opt.bias_correction if op.bias is not None else False  # no bias to absorb the correction
        plain = None if op.bias is None else np.asarray(op.bias, np.float64)
        best = None if mode is True else self._search_fo(op, acc, plain, fi, fw, cands, ref)
        if mode is False:
            return best
        corrected = self._search_fo(op, acc, self._corrected_bias(op, acc, fi, fw), fi, fw, cands, ref)
        if corrected is not None and (best is None or corrected.err < best.err):
            if best is not None:
                corrected.notes.insert(0, f"bias corrected (calibration error {best.err:.4g} -> {corrected.err:.4g})")
            return corrected
        return best

    @staticmethod
    def _accumulate(op: DpuOp, xq: np.ndarray, wq: np.ndarray) -> np.ndarray:
        return emu.conv_accumulate(xq, wq, op.attrs) if op.kind == "conv2d" else emu.dense_accumulate(xq, wq)

    def _corrected_bias(self, op: DpuOp, acc: np.ndarray, fi: int, fw: int) -> np.ndarray:
        """The bias plus the mean pre-activation error ``E[y_fp32 - y_q]`` per output channel."""
        bias = np.zeros(acc.shape[-1]) if op.bias is None else np.asarray(op.bias, np.float64)
        x_ref = self.ref[op.inputs[0]]
        if op.kind == "conv2d":
            pre_fp = emu.conv_float(x_ref, op.weight, bias, op.attrs)  # type: ignore[arg-type]
        else:
            pre_fp = x_ref @ np.asarray(op.weight, np.float64) + bias
        pre_q = acc * math.ldexp(1.0, -(fi + fw)) + bias
        return bias + np.mean(pre_fp - pre_q, axis=tuple(range(pre_fp.ndim - 1)))

    def _output_candidates(self, op: DpuOp, ref: np.ndarray) -> list[int]:
        cands = list(_window(float(np.max(np.abs(ref))), self.opt.fix_window))
        if op.output in self.outputs and self.opt.peak_output is not None:
            cap = no_clip_fix(max(float(self.opt.peak_output), float(np.max(np.abs(ref)))))
            cands = [fo for fo in cands if fo <= cap] or [cap]
        if op.output in self.fixed:
            cands = [int(self.fixed[op.output])]
        return cands

    def _bias_codes(self, bias: np.ndarray, fi: int, fw: int, shift_cut: int, leaky: bool) -> tuple[int, np.ndarray, list[str]]:
        """8-bit bias fix point by MSE, moved into the shift_bias bounds (Quark's adjust_shift_bias)."""
        fb0 = no_clip_fix(float(np.max(np.abs(bias))))
        fb = best_fix(bias, [fb0, fb0 + 1])
        lo, hi = shift_bias_bounds(shift_cut, self.limits, leaky=leaky)
        notes = []
        if not lo <= fi + fw - fb <= hi:
            new_fb = fi + fw - int(np.clip(fi + fw - fb, lo, hi))
            notes.append(f"shift_bias {fi + fw - fb} outside [{lo}, {hi}]: bias fix point moved {fb} -> {new_fb}")
            fb = new_fb
        return fb, quantize_values(bias, fb), notes

    def _search_fo(self, op: DpuOp, acc: np.ndarray, bias: np.ndarray | None, fi: int, fw: int, cands: list[int],
                   ref: np.ndarray) -> _Choice | None:
        """The output fix point (among ``cands`` that keep shift_cut in bounds) with the lowest error."""
        lo, hi = self.limits.get("shift_cut", (0, 16))
        best = None
        for fo in cands:
            sc = fi + fw - fo
            if not lo <= sc <= hi:
                continue
            fb, bq, notes = (None, None, []) if bias is None else self._bias_codes(bias, fi, fw, sc, op.activation == "leaky_relu")
            out = emu.requantize(acc, bq, shift_cut=sc, shift_bias=fi + fw - (fb or 0), activation=op.activation)
            err = self._error(op, ref, out, fo)
            if best is None or err < best.err:
                best = _Choice(err, fo, fb, bq, out, notes)
        return best

    def _error(self, op: DpuOp, ref: np.ndarray, out: np.ndarray, fo: int) -> float:
        deq = emu.dequantize(out, fo)
        if op.output in self.outputs and self.opt.output_error is not None:
            return float(self.opt.output_error(ref, deq))
        return _mse(deq, ref)


def _subset(x: np.ndarray, n: int) -> np.ndarray:
    """At most ``n`` windows, evenly spaced (deterministic)."""
    if len(x) <= n:
        return x
    return x[np.linspace(0, len(x) - 1, n).round().astype(int)]


def calibrate(graph: DpuGraph, feeds: Mapping[str, np.ndarray], limits: Mapping[str, Any], *,
              options: DpuQuantOptions = DpuQuantOptions(), reference: DpuGraph | None = None) -> DpuParams:
    """DPU parameters for ``graph`` from calibration ``feeds`` (graph input name -> float windows).

    ``reference`` (default ``graph``): the graph whose FP32 tensors the choices and the bias
    correction aim at; QAT passes the original model while ``graph`` carries fine-tuned weights
    (same ops and tensor names).

    ``limits`` are the target's (``DPUTarget.limits``: shift bounds). Raises
    :class:`~nilmc.backends.dpu.emulator.EmulationError` for ops the DPU lowering does not cover.
    """
    if not feeds or any(len(np.asarray(v)) == 0 for v in feeds.values()):
        raise QuantizationError("DPU calibration got no windows", "pass a calibration set with at least one window")
    return _Calibrator(graph, feeds, limits, options, reference).run()


# --------------------------------------------------------------------------- checks
@dataclass(frozen=True)
class ShiftViolation:
    op: str
    shift: str
    value: int
    bounds: tuple[int, int]

    def __str__(self) -> str:
        return f"{self.op}: {self.shift} = {self.value} outside [{self.bounds[0]}, {self.bounds[1]}]"


def check_shifts(graph: DpuGraph, params: DpuParams, limits: Mapping[str, Any]) -> list[ShiftViolation]:
    """Every shift of ``params`` outside the target's bounds (empty when the DPU compiler would accept them)."""
    out = []
    cut = tuple(limits.get("shift_cut", (0, 16)))
    for name, s in params.shifts(graph).items():
        op = graph.op(name)
        if "shift_cut" in s and not cut[0] <= s["shift_cut"] <= cut[1]:
            out.append(ShiftViolation(name, "shift_cut", s["shift_cut"], cut))  # type: ignore[arg-type]
        if "shift_bias" in s:
            b = shift_bias_bounds(s["shift_cut"], limits, leaky=op.activation == "leaky_relu")
            if not b[0] <= s["shift_bias"] <= b[1]:
                out.append(ShiftViolation(name, "shift_bias", s["shift_bias"], b))
        if "shift_write" in s:
            w = tuple(limits.get("shift_write", (-7, 25)))
            if not w[0] <= s["shift_write"] <= w[1]:
                out.append(ShiftViolation(name, "shift_write", s["shift_write"], w))  # type: ignore[arg-type]
    return out


def accumulator_peaks(graph: DpuGraph, params: DpuParams, feeds: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Largest |accumulator| (bias included, in accumulator LSBs) each weighted op reaches on ``feeds``."""
    em = emu.DpuEmulator(graph, params)
    codes = em.codes(feeds)
    out = {}
    for op in graph.ops:
        if op.weighted:
            wq = params.weights[op.name]
            acc = _Calibrator._accumulate(op, codes[op.inputs[0]], wq.weight_q)
            if wq.bias_q is not None and wq.fb is not None:
                acc = acc + np.asarray(wq.bias_q, np.float64) * math.ldexp(1.0, params.fix[op.inputs[0]] + wq.fw - wq.fb)
            out[op.name] = int(np.max(np.abs(acc)))
    return out


# --------------------------------------------------------------------------- the QDQ view
def _replace_constant(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    for i, t in enumerate(model.graph.initializer):
        if t.name == name:
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(value.astype(np.float32).reshape(numpy_helper.to_array(t).shape), name))
            return
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            for a in node.attribute:
                if a.name == "value":
                    a.t.CopyFrom(numpy_helper.from_array(value.astype(np.float32).reshape(numpy_helper.to_array(a.t).shape), name))
                    return
    raise QuantizationError(f"constant {name!r} not found in the model", "the DPU graph and the ONNX model disagree; re-run the lowering")


def _onnx_weight(op: DpuOp, layer_axis: int, values: np.ndarray) -> np.ndarray:
    if op.kind == "conv2d":
        return values.transpose(0, 3, 1, 2)  # OHWI -> OIHW
    return values.T if layer_axis == 0 else values  # Gemm transB stores [out, in]


def to_quant_params(onnx_model: onnx.ModelProto, graph: DpuGraph, params: DpuParams) -> tuple[onnx.ModelProto, Any]:
    """``(model, QuantParams)``: the model with its weights and biases replaced by the exact quantized
    values the DPU uses, and shared-format parameters (traits DPU_POT) describing every fix point,
    from which :func:`nilmc.quantization.qdq.build_qdq_model` writes the power-of-two QDQ graph."""
    from nilmc.quantization.graph import analyze
    from nilmc.quantization.params import QuantParams, TensorQuant
    from nilmc.quantization.statistics import model_digest

    model = onnx.ModelProto()
    model.CopyFrom(onnx_model)
    g = analyze(model)
    axis = {l.name: l.weight_axis for l in g.layers}
    tensors: dict[str, TensorQuant] = {}
    for op in graph.ops:
        if not op.weighted:
            continue
        wq = params.weights[op.name]
        _replace_constant(model, op.weight_name, _onnx_weight(op, axis[op.name], wq.weight_float()))  # type: ignore[arg-type]
        tensors[op.weight_name] = _tq(TensorQuant, op.weight_name, "weight", wq.fw)  # type: ignore[index]
        if op.bias_name is not None and wq.fb is not None:
            _replace_constant(model, op.bias_name, wq.bias_float())  # type: ignore[arg-type]
            tensors[op.bias_name] = _tq(TensorQuant, op.bias_name, "bias", wq.fb)
    for name in g.quant_points:
        if name not in params.fix:
            raise QuantizationError(f"quantization point {name!r} has no DPU fix point", "the DPU graph and the ONNX model disagree")
        tensors[name] = _tq(TensorQuant, name, "activation", params.fix[name])
    out = QuantParams(DPU_POT, tensors, dict(g.shared), list(g.layers), "dpu", model_digest(model))
    return model, out


def _tq(cls: Any, name: str, role: str, fp: int) -> Any:
    s = math.ldexp(1.0, -fp)
    return cls(name, role, "int8", (s,), (0,), None, (-128 * s,), (127 * s,), "dpu", (fp,))

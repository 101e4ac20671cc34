"""Bit-accurate numpy emulation of the DPU's fixed-point ops.

The arithmetic follows the Vitis AI runtime's CPU reference ops (``conv2d-fix``,
``eltwise-fix``, ``pool-fix`` of the VART cpu-runner), which describe the DPU
result for every power-of-two quantized op; here it is done in exact integers:

* **conv2d-fix / inner product**: ``acc = sum(x_q * w_q)`` (exact int64, computed
  as a float64 BLAS matmul, exact below 2**53), bias added as
  ``b_q * 2**shift_bias`` with ``shift_bias = fi + fw - fb`` (a negative shift keeps
  the bias's extra fraction bits), then ReLU / LeakyReLU (slope ``26/256``) on the
  exact value, then **one** rounding ``round(value / 2**shift_cut)``
  (``shift_cut = fi + fw - fo``) and saturation to int8;
* **eltwise add**: inputs aligned to the smallest fix point with 7 fraction bits
  (``floor(x_i * 2**(7 - shift_read_i))``), summed, ReLU, ``round(sum / 2**(7 + shift_write))``;
* **max pool** on codes, rescaled ``round(x * 2**(fo - fi))``; **average pool** as
  ``round(sum * N / 2**(M + fi - fo))`` with the DPU's ``N / 2**M`` approximation of
  ``1 / (kh * kw)`` (7/64 for 3x3, 10/256 for 5x5, ...; padding counts);
* the input is quantized with DPU rounding at its fix point; the output is
  dequantized ``q * 2**-fo``.

DPU_ROUND is round half up (``floor(x + 0.5)``: -2.5 -> -2). ``rounding`` can be set
to ``HALF_EVEN`` to reproduce onnxruntime's QuantizeLinear, which is how the
emulator is cross-checked against the power-of-two QDQ graph (ties are the only
place the two differ).
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import TYPE_CHECKING, Mapping

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from nilmc.compiler.errors import BadInputError
from nilmc.quantization.intops import DPU_ROUND, INT_RANGES, Rounding, clamp, rounding_shift_right

if TYPE_CHECKING:
    from nilmc.backends.dpu.ir import DpuGraph, DpuOp
    from nilmc.backends.dpu.quant import DpuParams

INT8 = INT_RANGES["int8"]
LEAKY_NUM, LEAKY_SHIFT = 26, 8  # the DPU's LeakyReLU slope 26/256
ELTWISE_FRACTION_BITS = 7


class EmulationError(BadInputError):
    """The graph holds an op the DPU emulation cannot run."""


# --------------------------------------------------------------------------- building blocks
def _shifted_views(x: np.ndarray, kernel: tuple[int, int], stride: tuple[int, int], pads: tuple[int, int, int, int],
                   dilation: tuple[int, int]) -> tuple[np.ndarray, list[tuple[int, int, np.ndarray]]]:
    """Zero-padded ``x`` (real zero) and, per kernel tap ``(i, j)``, the strided NHWC view it multiplies."""
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    pt, pl, pb, pr = pads
    xp = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    oh = (xp.shape[1] - (kh - 1) * dh - 1) // sh + 1
    ow = (xp.shape[2] - (kw - 1) * dw - 1) // sw + 1
    taps = [(i, j, xp[:, i * dh: i * dh + (oh - 1) * sh + 1: sh, j * dw: j * dw + (ow - 1) * sw + 1: sw, :])
            for i in range(kh) for j in range(kw)]
    return xp, taps


def _conv(x: np.ndarray, w: np.ndarray, attrs: Mapping[str, object], dtype: type, *, chunk: int = 256) -> np.ndarray:
    """im2col (taps in (kh, kw, c) order, matching OHWI) times the weight matrix, ``chunk`` windows at a time."""
    wm = np.asarray(w, dtype).reshape(w.shape[0], -1).T
    outs = []
    for i in range(0, max(len(x), 1), chunk):
        _, taps = _shifted_views(np.asarray(x[i:i + chunk], dtype), attrs["kernel"], attrs["stride"], attrs["pads"],  # type: ignore[arg-type]
                                 attrs.get("dilation", (1, 1)))  # type: ignore[arg-type]
        outs.append(np.concatenate([v for _, _, v in taps], axis=-1) @ wm)
    return np.concatenate(outs) if outs else np.zeros((0,), dtype)


def _exact_dtype(w_q: np.ndarray, axis: int) -> type:
    """float32 when every partial sum of |x_q * w_q| stays below 2**24 (exact), else float64 (exact below 2**53)."""
    bound = 128.0 * float(np.max(np.sum(np.abs(np.asarray(w_q, np.float64)), axis=axis)))
    return np.float32 if bound < 2.0**24 else np.float64


def conv_accumulate(x: np.ndarray, w: np.ndarray, attrs: Mapping[str, object]) -> np.ndarray:
    """Exact integer conv accumulator (int64): NHWC codes x OHWI codes (no bias), as exact float BLAS products."""
    dtype = _exact_dtype(w.reshape(w.shape[0], -1), axis=1)
    return np.rint(_conv(x, w, attrs, dtype)).astype(np.int64)


def dense_accumulate(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Exact integer dense accumulator (int64): ``(N, in) x [in, out]``."""
    dtype = _exact_dtype(w, axis=0)
    return np.rint(np.asarray(x, dtype) @ np.asarray(w, dtype)).astype(np.int64)


def conv_float(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, attrs: Mapping[str, object]) -> np.ndarray:
    """Float conv (float64) with the same layout conventions, for calibration references."""
    out = _conv(x, w, attrs, np.float64)
    return out if b is None else out + np.asarray(b, np.float64)


def shift_round(x: np.ndarray, shift: int, rounding: Rounding = DPU_ROUND) -> np.ndarray:
    """``round(x / 2**shift)`` on int64; DPU_ROUND by bit arithmetic, other modes through :mod:`intops`."""
    x = np.asarray(x, np.int64)
    if shift <= 0:
        return x << -shift
    if rounding is Rounding.HALF_UP:
        return (x + (1 << (shift - 1))) >> shift  # >> floors: floor(x / 2**s + 1/2)
    return rounding_shift_right(x, shift, rounding)


def requantize(acc: np.ndarray, bias_q: np.ndarray | None, *, shift_cut: int, shift_bias: int, activation: str | None,
               rounding: Rounding = DPU_ROUND) -> np.ndarray:
    """``round(act(acc + b_q * 2**shift_bias) / 2**shift_cut)`` saturated to int8 (one rounding, exact)."""
    extra = max(0, -shift_bias)  # fraction bits the bias carries below the accumulator's LSB
    total = np.asarray(acc, np.int64) << extra
    if bias_q is not None:
        total = total + (np.asarray(bias_q, np.int64) << (shift_bias + extra))
    shift = shift_cut + extra
    if activation == "relu":
        total = np.maximum(total, 0)
    elif activation == "leaky_relu":
        total = np.where(total < 0, total * LEAKY_NUM, total << LEAKY_SHIFT)
        shift += LEAKY_SHIFT
    return clamp(shift_round(total, shift, rounding), INT8)


def quantize_input(x: np.ndarray, fix_point: int, rounding: Rounding = DPU_ROUND) -> np.ndarray:
    """Float input -> int8 codes at ``fix_point`` (``round(x * 2**fp)``, exact in float64)."""
    scaled = np.asarray(x, np.float64) * math.ldexp(1.0, fix_point)
    if rounding is Rounding.HALF_UP:
        r = np.floor(scaled + 0.5)
    elif rounding is Rounding.HALF_EVEN:
        r = np.rint(scaled)
    else:
        r = np.sign(scaled) * np.floor(np.abs(scaled) + 0.5)
    return np.clip(r, INT8.lo, INT8.hi).astype(np.int8)


def dequantize(q: np.ndarray, fix_point: int) -> np.ndarray:
    return (np.asarray(q, np.float64) * math.ldexp(1.0, -fix_point)).astype(np.float32)


def rescale(q: np.ndarray, fi: int, fo: int, rounding: Rounding = DPU_ROUND) -> np.ndarray:
    """``round(q * 2**(fo - fi))`` saturated: a move between fix points (exact when fo >= fi)."""
    return clamp(shift_round(q, fi - fo, rounding), INT8)


@lru_cache(maxsize=None)
def avgpool_factors(kh: int, kw: int) -> tuple[int, int]:
    """The DPU's ``(N, M)`` with ``N / 2**M ~ 1 / (kh * kw)`` (VART pool-fix table, then a search)."""
    table = {(3, 3): (7, 6), (5, 5): (10, 8), (6, 6): (7, 8), (7, 7): (21, 10), (14, 14): (21, 12)}
    if (kh, kw) in table:
        return table[(kh, kw)]
    rec = kh * kw
    best, diff = (0, 0), 1.0
    for shift in range(math.ceil(math.log2(rec * 128))):
        factor = math.floor(2.0**shift / rec + 0.5)  # std::round (positive argument)
        d = abs(factor / 2.0**shift - 1.0 / rec)
        if d < diff:
            best, diff = (factor, shift), d
    return best


def maxpool(q: np.ndarray, attrs: Mapping[str, object]) -> np.ndarray:
    (kh, kw), (sh, sw) = attrs["kernel"], attrs["stride"]  # type: ignore[misc]
    pt, pl, pb, pr = attrs["pads"]  # type: ignore[misc]
    xp = np.pad(np.asarray(q, np.int64), ((0, 0), (pt, pb), (pl, pr), (0, 0)), constant_values=INT8.lo - 1)
    win = sliding_window_view(xp, (kh, kw), axis=(1, 2))[:, ::sh, ::sw]
    return win.max(axis=(-1, -2))


def avgpool_sum(q: np.ndarray, attrs: Mapping[str, object]) -> np.ndarray:
    (kh, kw), (sh, sw) = attrs["kernel"], attrs["stride"]  # type: ignore[misc]
    pt, pl, pb, pr = attrs["pads"]  # type: ignore[misc]
    xp = np.pad(np.asarray(q, np.int64), ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    win = sliding_window_view(xp, (kh, kw), axis=(1, 2))[:, ::sh, ::sw]
    return win.sum(axis=(-1, -2))


def avgpool(q: np.ndarray, attrs: Mapping[str, object], fi: int, fo: int, rounding: Rounding = DPU_ROUND) -> np.ndarray:
    kh, kw = attrs["kernel"]  # type: ignore[misc]
    n, m = avgpool_factors(int(kh), int(kw))
    return clamp(shift_round(avgpool_sum(q, attrs) * n, m + fi - fo, rounding), INT8)


def eltwise_add(inputs: list[np.ndarray], fis: list[int], fo: int, activation: str | None,
                rounding: Rounding = DPU_ROUND) -> np.ndarray:
    """eltwise-fix ADD: align to the smallest fix point with 7 fraction bits (floor), sum, ReLU, round."""
    fmin = min(fis)
    total = np.zeros(np.shape(inputs[0]), np.int64)
    for q, fi in zip(inputs, fis):
        up = ELTWISE_FRACTION_BITS - (fi - fmin)
        q = np.asarray(q, np.int64)
        total = total + (q << up if up >= 0 else q >> -up)  # >> is floor division, as the reference's floor()
    if activation == "relu":
        total = np.maximum(total, 0)
    return clamp(shift_round(total, ELTWISE_FRACTION_BITS + fmin - fo, rounding), INT8)


def activation_fix(q: np.ndarray, kind: str, fi: int, fo: int, rounding: Rounding = DPU_ROUND) -> np.ndarray:
    """A standalone ReLU / LeakyReLU (26/256) on codes, moved from fix point ``fi`` to ``fo``."""
    q = np.asarray(q, np.int64)
    if kind == "relu":
        return rescale(np.maximum(q, 0), fi, fo, rounding)
    num = np.where(q < 0, q * LEAKY_NUM, q << LEAKY_SHIFT)
    return clamp(shift_round(num, fi - fo + LEAKY_SHIFT, rounding), INT8)


# --------------------------------------------------------------------------- one op
def run_op(op: "DpuOp", args: list[np.ndarray], params: "DpuParams", rounding: Rounding = DPU_ROUND) -> np.ndarray:
    """int8 codes of ``op``'s output from its inputs' codes."""
    fis = [params.fix[t] for t in op.inputs]
    fo = params.fix[op.output]
    if op.kind in ("conv2d", "dense"):
        wq = params.weights[op.name]
        acc = conv_accumulate(args[0], wq.weight_q, op.attrs) if op.kind == "conv2d" else dense_accumulate(args[0], wq.weight_q)
        return requantize(acc, wq.bias_q, shift_cut=fis[0] + wq.fw - fo, shift_bias=fis[0] + wq.fw - (wq.fb or 0),
                          activation=op.activation, rounding=rounding)
    if op.kind == "flatten":
        return rescale(args[0].reshape(len(args[0]), -1), fis[0], fo, rounding)
    if op.kind == "maxpool":
        return rescale(maxpool(args[0], op.attrs), fis[0], fo, rounding)
    if op.kind == "avgpool":
        return avgpool(args[0], op.attrs, fis[0], fo, rounding)
    if op.kind == "add":
        return eltwise_add(args, fis, fo, op.activation, rounding)
    if op.kind in ("relu", "leaky_relu"):
        return activation_fix(args[0], op.kind, fis[0], fo, rounding)
    raise EmulationError(f"op {op.name!r} ({op.attrs.get('op_type', op.kind)}) has no DPU emulation: {op.reason or op.kind}",
                         "remove or replace the op (the DPU runs conv, dense, pooling, add, ReLU, LeakyReLU)")


# --------------------------------------------------------------------------- the whole graph
class DpuEmulator:
    """Runs a :class:`DpuGraph` with :class:`DpuParams` in exact integers.

    ``rounding`` (default DPU_ROUND) applies to input quantization and every requantization.
    """

    def __init__(self, graph: "DpuGraph", params: "DpuParams", *, rounding: Rounding = DPU_ROUND) -> None:
        unsupported = graph.unsupported
        if unsupported:
            op = unsupported[0]
            raise EmulationError(f"{len(unsupported)} op(s) cannot be emulated, first {op.name!r} ({op.attrs.get('op_type')}): {op.reason}",
                                 "the DPU emulation covers conv, dense, pooling, add, ReLU and LeakyReLU")
        self.graph = graph
        self.params = params
        self.rounding = Rounding.parse(rounding)

    def codes(self, feeds: Mapping[str, np.ndarray], *, batch: int = 1024) -> dict[str, np.ndarray]:
        """int8 codes of every tensor (inputs quantized at their fix point), ``batch`` windows at a time."""
        n = len(next(iter(feeds.values()))) if feeds else 0
        if n > batch:
            parts = [self.codes({k: v[i:i + batch] for k, v in feeds.items()}, batch=batch) for i in range(0, n, batch)]
            return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        vals: dict[str, np.ndarray] = {}
        for op in self.graph.ops:
            if op.kind == "input":
                if op.name not in feeds:
                    raise BadInputError(f"no feed for input {op.name!r}", f"feed {', '.join(self.graph.inputs)}")
                x = np.asarray(feeds[op.name], np.float32)
                vals[op.output] = quantize_input(x.reshape(len(x), *op.shape), self.params.fix[op.output], self.rounding)
                continue
            vals[op.output] = run_op(op, [vals[t] for t in op.inputs], self.params, self.rounding)
        return vals

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Graph outputs dequantized to float32 (``q * 2**-fo``), keyed by ONNX output name."""
        vals = self.codes(feeds)
        return {name: dequantize(vals[t], self.params.fix[t]) for name, t in self.graph.output_names.items()}

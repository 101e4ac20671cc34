"""Integer semantics in one place: ranges, rounding, (de)quantization, requantization, reference ops.

This module is the executable specification every emulator and test agrees with
(STYLE.md 6). Conventions:

* Integer ranges come from one table, :data:`INT_RANGES` (``int8``, ``uint8``,
  ``int8_narrow`` = [-127, 127] stored as int8, ``int16``, ``int32``).
* Rounding is always explicit, a :class:`Rounding`:
  ``HALF_EVEN`` (ONNX QuantizeLinear, numpy ``rint``; TensorRT), ``HALF_AWAY``
  (C ``round``; TFLite's ``TfLiteRound``), ``HALF_UP`` = DPU_ROUND, ``floor(x + 0.5)``,
  so -2.5 -> -2 (Vitis AI DPU).
* Reference ops compute the exact accumulator in int64 and then *wrap* it to the
  accumulator width (two's complement, what hardware does on overflow); whether
  the exact value fits is the business of ``overflow.py`` (``fits_accumulator``).
* Activations are NHWC, convolution weights OHWI (TFLite and the DPU's [OC, KH, KW, IC]),
  dense weights ``[in, out]``.
* Fixed-point requantization follows TFLite's reference kernels (gemmlowp
  ``SaturatingRoundingDoublingHighMul`` then ``RoundingDivideByPOT``, i.e. the
  double-rounding variant); ``bits=16`` gives the same scheme with a 16-bit
  normalized multiplier, our emulation hypothesis for the NXP (VeriSilicon) NPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import numpy as np
import numpy.typing as npt
from numpy.lib.stride_tricks import as_strided, sliding_window_view

from nilmc.compiler.errors import QuantizationError


# --------------------------------------------------------------------------- ranges
@dataclass(frozen=True)
class IntRange:
    """A code range ``[lo, hi]`` and the integer type that stores it."""

    name: str
    lo: int
    hi: int
    storage: str  # numpy / ONNX storage type name: int8, uint8, int16, int32

    @property
    def signed(self) -> bool:
        return self.lo < 0

    @property
    def bits(self) -> int:
        return int(np.iinfo(self.storage).bits)

    @property
    def levels(self) -> int:
        return self.hi - self.lo + 1

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.storage)


INT_RANGES: dict[str, IntRange] = {
    "int8": IntRange("int8", -128, 127, "int8"),
    "uint8": IntRange("uint8", 0, 255, "uint8"),
    "int8_narrow": IntRange("int8_narrow", -127, 127, "int8"),
    # 7-bit weights stored as int8: x86 u8 x s8 kernels without VNNI sum pairs of products at int16 (vpmaddubsw),
    # and 255 * 63 * 2 fits where 255 * 127 * 2 does not (OpenVINO's "saturation issue" workaround, NNCF's overflow_fix)
    "int7_narrow": IntRange("int7_narrow", -63, 63, "int8"),
    "int16": IntRange("int16", -32768, 32767, "int16"),
    "int32": IntRange("int32", -(2**31), 2**31 - 1, "int32"),
}


def int_range(name: str) -> IntRange:
    """Look up a code range by name (see :data:`INT_RANGES`)."""
    try:
        return INT_RANGES[name]
    except KeyError:
        raise QuantizationError(f"unknown integer range {name!r}", f"available: {', '.join(INT_RANGES)}") from None


def int_range_for(bits: int, *, signed: bool, narrow: bool = False) -> IntRange:
    """The table entry for ``bits``/``signed``/``narrow`` (8-bit narrow -> ``int8_narrow``)."""
    name = ("int" if signed else "uint") + str(bits) + ("_narrow" if narrow else "")
    if narrow and not signed:
        raise QuantizationError(f"narrow range needs a signed type, got {bits}-bit unsigned", "use signed weights")
    return int_range(name)


def accumulator_limit(bits: int) -> int:
    """Largest magnitude a signed ``bits``-wide accumulator holds: ``2**(bits-1) - 1``."""
    return 2 ** (bits - 1) - 1


# --------------------------------------------------------------------------- rounding
class Rounding(str, Enum):
    HALF_EVEN = "half_even"  # ONNX QuantizeLinear, TensorRT
    HALF_AWAY = "half_away"  # C round(), TFLite
    HALF_UP = "half_up"  # DPU_ROUND: floor(x + 0.5), -2.5 -> -2

    @classmethod
    def parse(cls, value: str | Rounding) -> Rounding:
        if isinstance(value, Rounding):
            return value
        aliases = {"dpu_round": "half_up", "round_half_to_even": "half_even", "round": "half_away"}
        key = aliases.get(str(value).lower(), str(value).lower())
        try:
            return cls(key)
        except ValueError:
            raise QuantizationError(f"unknown rounding mode {value!r}", f"available: {', '.join(r.value for r in cls)}") from None


DPU_ROUND = Rounding.HALF_UP


def round_values(x: np.ndarray, mode: Rounding) -> np.ndarray:
    """Round floats to integers (still float dtype) with an explicit tie rule."""
    x = np.asarray(x)
    if mode is Rounding.HALF_EVEN:
        return np.rint(x)
    if mode is Rounding.HALF_AWAY:
        return np.sign(x) * np.floor(np.abs(x) + 0.5)
    return np.floor(x + 0.5)


def rounding_divide(x: np.ndarray, d: int | np.ndarray, mode: Rounding) -> np.ndarray:
    """Exact integer ``round(x / d)`` for int arrays and positive integer ``d``."""
    x = np.asarray(x, np.int64)
    d = np.asarray(d, np.int64)
    q = np.floor_divide(x, d)
    twice_r = 2 * (x - q * d)
    up = twice_r > d
    tie = twice_r == d
    if mode is Rounding.HALF_UP:
        up |= tie
    elif mode is Rounding.HALF_AWAY:
        up |= tie & (x > 0)
    else:
        up |= tie & (q % 2 == 1)
    return q + up


def rounding_shift_right(x: np.ndarray, shift: int | np.ndarray, mode: Rounding) -> np.ndarray:
    """``round(x / 2**shift)`` on integers; a negative shift is an exact left shift."""
    x = np.asarray(x, np.int64)
    shift = np.asarray(shift, np.int64)
    right = rounding_divide(x, np.left_shift(np.int64(1), np.maximum(shift, 0)), mode)
    return np.where(shift >= 0, right, x * np.left_shift(np.int64(1), np.maximum(-shift, 0)))


def clamp(x: np.ndarray, rng: IntRange) -> np.ndarray:
    """Saturate to ``rng`` and cast to its storage type."""
    return np.clip(x, rng.lo, rng.hi).astype(rng.np_dtype)


def wrap(acc: np.ndarray, bits: int) -> np.ndarray:
    """Two's-complement wrap of exact integers to a ``bits``-wide accumulator."""
    acc = np.asarray(acc, np.int64)
    half = np.int64(1) << (bits - 1)
    out = ((acc + half) % (half * 2)) - half
    return out.astype(np.int32) if bits <= 32 else out


def fits_accumulator(acc: np.ndarray, bits: int) -> bool:
    return bool(np.all(np.abs(np.asarray(acc, np.int64)) <= accumulator_limit(bits)))


# --------------------------------------------------------------------------- affine grids
def _along(v: np.ndarray | float, axis: int | None, ndim: int) -> np.ndarray:
    v = np.asarray(v)
    if axis is None or v.ndim == 0:
        return v
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)


def quantize(
    x: np.ndarray,
    scale: float | np.ndarray,
    zero_point: int | np.ndarray,
    rng: IntRange,
    *,
    axis: int | None = None,
    rounding: Rounding = Rounding.HALF_EVEN,
) -> np.ndarray:
    """``clamp(round(x / scale) + zero_point)``.

    Division happens in float32 for float32 input (as onnxruntime's QuantizeLinear),
    else in float64. ``axis`` names the channel axis of per-channel ``scale``.
    """
    x = np.asarray(x)
    ftype = np.float32 if x.dtype == np.float32 else np.float64
    s = _along(np.asarray(scale, ftype), axis, x.ndim)
    z = _along(np.asarray(zero_point, np.int64), axis, x.ndim)
    q = round_values(x.astype(ftype) / s, rounding).astype(np.int64) + z
    return clamp(q, rng)


def dequantize(q: np.ndarray, scale: float | np.ndarray, zero_point: int | np.ndarray, *, axis: int | None = None) -> np.ndarray:
    """``(q - zero_point) * scale`` as float32."""
    q = np.asarray(q)
    s = _along(np.asarray(scale, np.float32), axis, q.ndim)
    z = _along(np.asarray(zero_point, np.int64), axis, q.ndim)
    return ((q.astype(np.int64) - z).astype(np.float32) * s).astype(np.float32)


def affine_params(lo: float, hi: float, rng: IntRange, *, symmetric: bool) -> tuple[float, int]:
    """Scale and zero point mapping the real range ``[lo, hi]`` onto ``rng``.

    The range is first widened to contain 0 (zero must be exact). Symmetric:
    ``scale = max(|lo|, |hi|) / rng.hi``, zero point 0 (TensorRT, TFLite weights,
    the DPU). Asymmetric: ``scale = (hi - lo) / (rng.hi - rng.lo)``, zero point
    ``round_half_even(rng.lo - lo / scale)`` clamped. The scale is rounded to
    float32 (what ONNX stores). A zero-width range gets scale 1.0 (any scale
    represents an all-zero tensor exactly).
    """
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if symmetric:
        if not rng.signed:
            raise QuantizationError(f"symmetric quantization needs a signed range, got {rng.name}", "use int8 activations")
        scale = float(np.float32(max(-lo, hi) / rng.hi))
        return (scale, 0) if scale > 0 and math.isfinite(scale) else (1.0, 0)
    scale = float(np.float32((hi - lo) / (rng.hi - rng.lo)))
    if not (scale > 0 and math.isfinite(scale)):
        return 1.0, int(np.clip(0, rng.lo, rng.hi))
    zp = int(np.clip(np.rint(rng.lo - lo / scale), rng.lo, rng.hi))
    return scale, zp


def representable_range(scale: float, zero_point: int, rng: IntRange) -> tuple[float, float]:
    """Smallest and largest real value the grid represents (codes ``rng.lo``/``rng.hi``)."""
    return (rng.lo - zero_point) * scale, (rng.hi - zero_point) * scale


def pot_scale(fix_position: int) -> float:
    """Power-of-two scale ``2**-fix_position`` (the DPU's ``real = q * 2**-fix_point``)."""
    return float(np.ldexp(1.0, -int(fix_position)))


def fix_position_candidates(scale: float) -> tuple[int, ...]:
    """The fix positions whose power-of-two scales bracket ``scale`` (floor and ceil of -log2)."""
    f = -math.log2(scale)
    return tuple(sorted({math.floor(f), math.ceil(f)}))


# --------------------------------------------------------------------------- fixed-point requantization
def quantize_multiplier(real: float, *, bits: int = 32) -> tuple[int, int]:
    """Normalized fixed-point multiplier: ``real ~= m * 2**(shift - (bits-1))``, ``m`` in ``[2**(bits-2), 2**(bits-1))``.

    ``shift`` > 0 means a left shift (TFLite convention). ``bits=32`` is TFLite,
    ``bits=16`` the 16-bit variant for the NXP NPU emulation.
    """
    if not (real > 0 and math.isfinite(real)):
        if real == 0:
            return 0, 0
        raise QuantizationError(f"requantization multiplier must be positive and finite, got {real}", "check the scales")
    frac, shift = math.frexp(real)
    m = int(round_values(np.float64(frac * 2 ** (bits - 1)), Rounding.HALF_AWAY))
    if m == 2 ** (bits - 1):
        m //= 2
        shift += 1
    return m, shift


def _div_trunc(a: np.ndarray, d: int) -> np.ndarray:
    return np.sign(a) * (np.abs(a) // d)


def doubling_high_mul(a: np.ndarray, m: np.ndarray | int, *, bits: int = 32) -> np.ndarray:
    """gemmlowp ``SaturatingRoundingDoublingHighMul`` generalised to ``bits``."""
    a = np.asarray(a, np.int64)
    m = np.asarray(m, np.int64)
    ab = a * m
    nudge = np.where(ab >= 0, 1 << (bits - 2), 1 - (1 << (bits - 2)))
    out = _div_trunc(ab + nudge, 1 << (bits - 1))
    lowest = -(1 << (bits - 1))
    return np.where((a == lowest) & (m == lowest), (1 << (bits - 1)) - 1, out)


def multiply_by_quantized_multiplier(x: np.ndarray, m: np.ndarray | int, shift: np.ndarray | int, *, bits: int = 32) -> np.ndarray:
    """TFLite ``MultiplyByQuantizedMultiplier``: high-mul, then round-half-away right shift."""
    shift = np.asarray(shift, np.int64)
    left = np.left_shift(np.int64(1), np.maximum(shift, 0))
    hm = doubling_high_mul(np.asarray(x, np.int64) * left, m, bits=bits)
    return rounding_shift_right(hm, np.maximum(-shift, 0), Rounding.HALF_AWAY)


def requantize(
    acc: np.ndarray, multiplier: np.ndarray | int, shift: np.ndarray | int, zero_point: int, rng: IntRange, *, bits: int = 32
) -> np.ndarray:
    """Accumulator -> output codes: ``clamp(mbqm(acc) + zero_point)`` (channels last for per-channel m/shift)."""
    return clamp(multiply_by_quantized_multiplier(acc, multiplier, shift, bits=bits) + zero_point, rng)


def shift_requantize(acc: np.ndarray, shift: int | np.ndarray, rng: IntRange, *, rounding: Rounding = DPU_ROUND) -> np.ndarray:
    """Power-of-two requantization (DPU ``shift_cut``): ``clamp(round(acc / 2**shift))``."""
    return clamp(rounding_shift_right(acc, shift, rounding), rng)


def requantize_fast(acc: np.ndarray, multiplier: np.ndarray | int, shift: np.ndarray | int, zero_point: int, rng: IntRange, *,
                    bits: int = 32, limits: tuple[int, int] | None = None) -> np.ndarray:
    """:func:`requantize`, then clipped to ``limits`` (default None: ``rng``'s), in a few in-place int64 passes.

    The same integers as the reference: for ``m >= 0`` gemmlowp's high-mul ``trunc((a*m + nudge) / 2**(bits-1))``
    is ``(a*m + 2**(bits-2)) >> (bits-1)`` for either sign of ``a*m`` (no saturation case), and the half-away
    rounding shift is ``(h + 2**(e-1) - (h < 0)) >> e``; the zero point rides in the same add as ``zp << e``.
    Left shifts (``shift > 0``), negative multipliers or accumulators wider than int32 (``|a*m|`` could pass
    2**62) take :func:`requantize` itself.
    """
    acc = np.asarray(acc)
    m = np.asarray(multiplier, np.int64)
    right = -np.asarray(shift, np.int64)
    lo, hi = (rng.lo, rng.hi) if limits is None else (max(rng.lo, limits[0]), min(rng.hi, limits[1]))
    if not np.can_cast(acc.dtype, np.int32) or np.any(right < 0) or np.any(m < 0) or np.any(m >= 2**31):
        return np.clip(requantize(acc, multiplier, shift, zero_point, rng, bits=bits), lo, hi).astype(rng.np_dtype)
    h = np.multiply(acc, m, dtype=np.int64)  # |acc * m| < 2**62
    h += np.int64(1 << (bits - 2))
    h >>= bits - 1
    rounds = right > 0
    offset = np.where(rounds, np.left_shift(np.int64(1), np.maximum(right - 1, 0)), 0) + (np.int64(zero_point) << right)
    if np.all(rounds):
        h += h >> 63  # -1 where negative: ties go away from zero
    elif np.any(rounds):
        h += (h >> 63) * rounds
    h += offset
    h >>= right
    np.clip(h, lo, hi, out=h)
    return h.astype(rng.np_dtype)


# --------------------------------------------------------------------------- reference integer ops
def _centred(q: np.ndarray, zero_point: np.ndarray | int, axis: int | None = None) -> np.ndarray:
    q = np.asarray(q, np.int64)
    return q - _along(np.asarray(zero_point, np.int64), axis, q.ndim)


def conv2d_nhwc(
    x: np.ndarray,
    w: np.ndarray,
    bias: np.ndarray | None = None,
    *,
    x_zero_point: int = 0,
    w_zero_point: int | np.ndarray = 0,
    strides: tuple[int, int] = (1, 1),
    pads: tuple[int, int, int, int] = (0, 0, 0, 0),
    dilations: tuple[int, int] = (1, 1),
    acc_bits: int = 32,
    groups: int = 1,
) -> np.ndarray:
    """Integer Conv2D: x ``(N,H,W,C)``, w ``(O,KH,KW,C/groups)``, pads ``(top, left, bottom, right)`` -> accumulator
    ``(N,OH,OW,O)``. ``groups`` (default 1): output channel ``o`` reads input channels of group ``o // (O/groups)``
    (TFLite's grouped CONV_2D, ONNX's ``group``; depthwise when ``groups == C``).

    Padding holds real zeros (the zero point); bias is already in accumulator units.
    """
    xc = _centred(x, x_zero_point)
    wc = _centred(w, w_zero_point, axis=0)
    pt, pl, pb, pr = pads
    xp = np.pad(xc, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    (dh, dw), (kh, kw) = dilations, w.shape[1:3]
    win = sliding_window_view(xp, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(1, 2))
    win = win[:, :: strides[0], :: strides[1], :, ::dh, ::dw]  # (N, OH, OW, C, KH, KW)
    if groups == 1:
        acc = np.einsum("nhwcij,oijc->nhwo", win, wc)
    else:
        _check_groups(x.shape[3], w.shape, groups)
        ci, og = w.shape[3], w.shape[0] // groups
        win = win.reshape(*win.shape[:3], groups, ci, kh, kw)
        acc = np.einsum("nhwgcij,goijc->nhwgo", win, wc.reshape(groups, og, kh, kw, ci)).reshape(*win.shape[:3], w.shape[0])
    if bias is not None:
        acc = acc + np.asarray(bias, np.int64)
    return wrap(acc, acc_bits)


def dense(
    x: np.ndarray,
    w: np.ndarray,
    bias: np.ndarray | None = None,
    *,
    x_zero_point: int = 0,
    w_zero_point: int | np.ndarray = 0,
    acc_bits: int = 32,
) -> np.ndarray:
    """Integer Dense: x ``(N, in)``, w ``(in, out)`` -> accumulator ``(N, out)``."""
    acc = _centred(x, x_zero_point) @ _centred(w, w_zero_point, axis=1)
    if bias is not None:
        acc = acc + np.asarray(bias, np.int64)
    return wrap(acc, acc_bits)


def relu(q: np.ndarray, zero_point: int = 0) -> np.ndarray:
    """ReLU on codes: real zero is the zero point."""
    return np.maximum(q, np.asarray(zero_point).astype(np.asarray(q).dtype))


def leaky_relu(acc: np.ndarray, *, alpha_num: int = 26, alpha_shift: int = 8, rounding: Rounding = DPU_ROUND) -> np.ndarray:
    """Leaky ReLU on zero-centred integers with a fixed-point slope ``alpha_num / 2**alpha_shift``.

    Defaults are the DPU's forced slope 26/256 with DPU_ROUND.
    """
    acc = np.asarray(acc, np.int64)
    return np.where(acc >= 0, acc, rounding_shift_right(acc * alpha_num, alpha_shift, rounding))


def add(
    a: np.ndarray,
    b: np.ndarray,
    *,
    a_scale: float,
    a_zero_point: int,
    b_scale: float,
    b_zero_point: int,
    out_scale: float,
    out_zero_point: int,
    rng: IntRange,
    left_shift: int = 20,
    bits: int = 32,
) -> np.ndarray:
    """Quantized elementwise add (TFLite reference: rescale both to a common scale, sum, requantize)."""
    twice_max = 2.0 * max(a_scale, b_scale)
    ma, sa = quantize_multiplier(a_scale / twice_max, bits=bits)
    mb, sb = quantize_multiplier(b_scale / twice_max, bits=bits)
    mo, so = quantize_multiplier(twice_max / ((1 << left_shift) * out_scale), bits=bits)
    ra = multiply_by_quantized_multiplier(_centred(a, a_zero_point) << left_shift, ma, sa, bits=bits)
    rb = multiply_by_quantized_multiplier(_centred(b, b_zero_point) << left_shift, mb, sb, bits=bits)
    return requantize(ra + rb, mo, so, out_zero_point, rng, bits=bits)


def _pool_windows(q: np.ndarray, kernel: tuple[int, int], strides: tuple[int, int]) -> np.ndarray:
    win = sliding_window_view(np.asarray(q), kernel, axis=(1, 2))  # (N, OH', OW', C, KH, KW)
    return win[:, :: strides[0], :: strides[1]]


def avg_pool(
    q: np.ndarray, kernel: tuple[int, int], strides: tuple[int, int] | None = None, *, rounding: Rounding = Rounding.HALF_AWAY
) -> np.ndarray:
    """Average pool on codes (NHWC, VALID padding): int32 sum, rounded division, same scale/zero point."""
    win = _pool_windows(q, kernel, strides or kernel).astype(np.int64)
    total = win.sum(axis=(-1, -2))
    out = rounding_divide(total, kernel[0] * kernel[1], rounding)
    return out.astype(np.asarray(q).dtype)


def max_pool(q: np.ndarray, kernel: tuple[int, int], strides: tuple[int, int] | None = None) -> np.ndarray:
    """Max pool on codes (NHWC, VALID padding); scale and zero point pass through."""
    return _pool_windows(q, kernel, strides or kernel).max(axis=(-1, -2))


# --------------------------------------------------------------------------- power-of-two (fix-point) reference ops
# The Vitis AI DPU's arithmetic (VART cpu-runner ``conv2d-fix`` / ``eltwise-fix`` / ``pool-fix``): every tensor is
# ``real = q * 2**-fix_point``, every requantization is one rounding of an exact integer by a power of two. The DPU
# emulator is a composition of these functions; each works on a whole batch at once (the emulator's speed is theirs).
LEAKY_NUM, LEAKY_SHIFT = 26, 8  # the DPU's forced LeakyReLU slope 26/256
ELTWISE_FRACTION_BITS = 7  # eltwise-fix aligns its inputs with 7 fraction bits below the smallest fix point
_AVGPOOL_TABLE = {(3, 3): (7, 6), (5, 5): (10, 8), (6, 6): (7, 8), (7, 7): (21, 10), (14, 14): (21, 12)}
_INT32_SAFE = 2**31 - 1


def shift_round(x: np.ndarray, shift: int, rounding: Rounding = DPU_ROUND) -> np.ndarray:
    """Exact ``round(x / 2**shift)`` of integers for one scalar ``shift`` (negative: exact left shift).

    Same results as :func:`rounding_shift_right`; HALF_UP (DPU_ROUND) is ``(x + 2**(shift-1)) >> shift``
    in the input's integer dtype (the caller keeps it wide enough), the other modes go through int64.
    """
    x = np.asarray(x)
    if x.dtype.kind not in "iu":
        x = x.astype(np.int64)
    if shift <= 0:
        return x << -shift
    if rounding is Rounding.HALF_UP:
        return (x + x.dtype.type(1 << (shift - 1))) >> shift  # >> floors: floor(x / 2**s + 1/2)
    return rounding_shift_right(x, shift, rounding)


def pot_quantize(x: np.ndarray, fix_point: int, rng: IntRange = INT_RANGES["int8"], rounding: Rounding = DPU_ROUND) -> np.ndarray:
    """Float -> codes at ``fix_point``: ``clamp(round(x * 2**fix_point))`` (exact in float64)."""
    scaled = np.asarray(x, np.float64) * math.ldexp(1.0, int(fix_point))
    return np.clip(round_values(scaled, rounding), rng.lo, rng.hi).astype(rng.np_dtype)


def pot_dequantize(q: np.ndarray, fix_point: int) -> np.ndarray:
    """Codes -> float32 ``q * 2**-fix_point`` (exact)."""
    return (np.asarray(q, np.float64) * math.ldexp(1.0, -int(fix_point))).astype(np.float32)


def pot_rescale(q: np.ndarray, fi: int, fo: int, rng: IntRange = INT_RANGES["int8"], rounding: Rounding = DPU_ROUND) -> np.ndarray:
    """Move codes from fix point ``fi`` to ``fo``: ``clamp(round(q * 2**(fo - fi)))`` (exact when ``fo >= fi``)."""
    q = np.asarray(q)
    if fi == fo and q.dtype == rng.np_dtype:
        return q.copy()
    wide = q.astype(np.int64) if fo > fi else q.astype(np.int32)  # a right shift of int8 codes fits int32
    return clamp(shift_round(wide, fi - fo, rounding), rng)


def leaky_relu_exact(x: np.ndarray, *, alpha_num: int = LEAKY_NUM, alpha_shift: int = LEAKY_SHIFT) -> np.ndarray:
    """LeakyReLU with slope ``alpha_num / 2**alpha_shift`` *without* rounding: the result is scaled by
    ``2**alpha_shift`` (``x * alpha_num`` below zero, ``x << alpha_shift`` above); the caller adds
    ``alpha_shift`` to its one rounding shift, as the DPU does (one rounding per op)."""
    x = np.asarray(x)
    return np.where(x < 0, x * alpha_num, x << alpha_shift)


def _requant_dtype(bound: float | None, extra_bits: int) -> type:
    """int32 when ``bound * 2**extra_bits`` provably fits, else int64."""
    return np.int32 if bound is not None and bound * 2.0**extra_bits < _INT32_SAFE else np.int64


def pot_requantize(acc: np.ndarray, bias_q: np.ndarray | None, *, shift_cut: int, shift_bias: int, activation: str | None,
                   rounding: Rounding = DPU_ROUND, rng: IntRange = INT_RANGES["int8"], acc_bound: float | None = None,
                   overwrite: bool = False) -> np.ndarray:
    """DPU conv / inner-product output: ``clamp(round(act(acc + b_q * 2**shift_bias) / 2**shift_cut))``, one rounding.

    A negative ``shift_bias`` keeps the bias's fraction bits (the accumulator is shifted up instead);
    ``activation`` is None, ``"relu"`` or ``"leaky_relu"`` (slope 26/256 on the exact value).
    ``acc_bound`` (default None: unknown) bounds ``|acc + bias|``; when it is small enough the
    arithmetic runs in int32 (measured 2x faster than int64 on the T-P model), else int64.
    ``overwrite`` (default False) lets it work in ``acc``'s own memory when ``acc`` has that dtype.
    """
    extra = max(0, -shift_bias)  # fraction bits the bias carries below the accumulator's LSB
    leaky = activation == "leaky_relu"
    shift = shift_cut + extra + (LEAKY_SHIFT if leaky else 0)
    dtype = _requant_dtype(acc_bound, extra + (LEAKY_SHIFT if leaky else 0) + 1)
    acc = np.asarray(acc)
    total = acc if overwrite and acc.dtype == dtype and acc.flags.writeable else acc.astype(dtype, copy=True)
    if extra:
        total <<= extra
    if rounding is Rounding.HALF_UP and activation in (None, "relu") and shift < 31:  # |total| < 2**30 and offset <= 2**29
        return _half_up_requantize(total, bias_q, shift_bias + extra, shift, activation == "relu", rng)
    if bias_q is not None:
        total += np.asarray(bias_q).astype(dtype) << (shift_bias + extra)
    if activation == "relu":
        np.maximum(total, 0, out=total)
    elif leaky:
        total = leaky_relu_exact(total)
    return clamp(shift_round(total, shift, rounding), rng)


def _half_up_requantize(total: np.ndarray, bias_q: np.ndarray | None, bias_shift: int, shift: int, relu: bool,
                        rng: IntRange) -> np.ndarray:
    """DPU_ROUND requantization in place: ``clamp((total + bias + 2**(shift-1)) >> shift)`` (left shift when ``shift <= 0``).

    Bias and rounding offset are one per-channel add; ReLU is the clamp's lower end, since for ``t < 0``
    ``(t + 2**(shift-1)) >> shift <= 0`` (the same result as rounding ``max(t, 0)``).
    """
    offset = np.zeros((), total.dtype) if bias_q is None else np.asarray(bias_q).astype(total.dtype) << bias_shift
    if shift > 0:
        offset = offset + total.dtype.type(1 << (shift - 1))
    total += offset
    if shift > 0:
        total >>= shift
    elif shift < 0:
        total <<= -shift
    np.clip(total, 0 if relu else rng.lo, rng.hi, out=total)
    return total.astype(rng.np_dtype)


def pot_activation(q: np.ndarray, kind: str, fi: int, fo: int, rounding: Rounding = DPU_ROUND,
                   rng: IntRange = INT_RANGES["int8"]) -> np.ndarray:
    """A standalone ReLU / LeakyReLU (26/256) on codes, moved from fix point ``fi`` to ``fo`` (one rounding)."""
    q = np.asarray(q, np.int64)
    if kind == "relu":
        return pot_rescale(np.maximum(q, 0), fi, fo, rng, rounding)
    return clamp(shift_round(leaky_relu_exact(q), fi - fo + LEAKY_SHIFT, rounding), rng)


def pot_eltwise_add(inputs: list[np.ndarray], fis: list[int], fo: int, activation: str | None = None,
                    rounding: Rounding = DPU_ROUND, rng: IntRange = INT_RANGES["int8"]) -> np.ndarray:
    """eltwise-fix ADD: align each input to the smallest fix point with 7 fraction bits (floor), sum, ReLU, round."""
    fmin = min(fis)
    total = np.zeros(np.shape(inputs[0]), np.int64)
    for q, fi in zip(inputs, fis):
        up = ELTWISE_FRACTION_BITS - (fi - fmin)
        q = np.asarray(q, np.int64)
        total += q << up if up >= 0 else q >> -up  # >> is floor division, as the reference's floor()
    if activation == "relu":
        np.maximum(total, 0, out=total)
    return clamp(shift_round(total, ELTWISE_FRACTION_BITS + fmin - fo, rounding), rng)


def avgpool_factors(kh: int, kw: int) -> tuple[int, int]:
    """The DPU's ``(N, M)`` with ``N / 2**M ~ 1 / (kh * kw)`` (VART pool-fix table, then its search)."""
    if (kh, kw) in _AVGPOOL_TABLE:
        return _AVGPOOL_TABLE[(kh, kw)]
    rec = kh * kw
    best, diff = (0, 0), 1.0
    for shift in range(math.ceil(math.log2(rec * 128))):
        factor = math.floor(2.0**shift / rec + 0.5)  # std::round (positive argument)
        d = abs(factor / 2.0**shift - 1.0 / rec)
        if d < diff:
            best, diff = (factor, shift), d
    return best


def _padded_windows(q: np.ndarray, kernel: tuple[int, int], stride: tuple[int, int], pads: tuple[int, int, int, int],
                    fill: int) -> np.ndarray:
    """``(N, OH, OW, C, KH, KW)`` pooling windows of NHWC ``q`` padded ``(top, left, bottom, right)`` with ``fill``."""
    pt, pl, pb, pr = pads
    xp = np.pad(q, ((0, 0), (pt, pb), (pl, pr), (0, 0)), constant_values=fill)
    return sliding_window_view(xp, kernel, axis=(1, 2))[:, :: stride[0], :: stride[1]]


def pot_max_pool(q: np.ndarray, kernel: tuple[int, int], stride: tuple[int, int], pads: tuple[int, int, int, int],
                 fi: int, fo: int, rounding: Rounding = DPU_ROUND, rng: IntRange = INT_RANGES["int8"]) -> np.ndarray:
    """Max pool on codes (padding never wins), then moved from ``fi`` to ``fo``."""
    q = np.asarray(q, np.int16)  # room for the padding value below the code range
    pooled = _padded_windows(q, kernel, stride, pads, rng.lo - 1).max(axis=(-1, -2))
    return pot_rescale(pooled, fi, fo, rng, rounding)


def pot_avg_pool(q: np.ndarray, kernel: tuple[int, int], stride: tuple[int, int], pads: tuple[int, int, int, int],
                 fi: int, fo: int, rounding: Rounding = DPU_ROUND, rng: IntRange = INT_RANGES["int8"]) -> np.ndarray:
    """DPU average pool: ``round(sum * N / 2**(M + fi - fo))`` with :func:`avgpool_factors` (padding counts)."""
    n, m = avgpool_factors(int(kernel[0]), int(kernel[1]))
    total = _padded_windows(np.asarray(q, np.int64), kernel, stride, pads, 0).sum(axis=(-1, -2))
    return clamp(shift_round(total * n, m + fi - fo, rounding), rng)


# --------------------------------------------------------------------------- exact integer matrix products
# Codes 0..127 times int8 weights keep every pair of products within 2 * 127 * 128 < 2**15, so even MLAS's AVX2
# u8 x s8 kernel (vpmaddubsw, which saturates pairs at int16) is exact; VNNI / AMX kernels are exact for any u8.
_U8_SAFE_MAX = 127


def _gemm_dtype(w: np.ndarray, axis: int, x_max: int = 128) -> type:
    """float32 when every partial sum of ``|x * w|`` stays below 2**24 (exact), else float64 (exact below 2**53)."""
    bound = x_max * float(np.max(np.sum(np.abs(np.asarray(w, np.float64)), axis=axis), initial=0.0))
    return np.float32 if bound < 2.0**24 else np.float64


def split_unsigned(x: np.ndarray, groups: int = 1) -> np.ndarray:
    """int8 codes ``(M, K)`` -> uint8 ``(M, 3K)`` holding ``a | b | c`` with ``x + 128 = a + b + c``, each part in 0..127.

    ``x @ w == [a | b | c] @ [w; w; w] - 128 * w.sum(0)``: one u8 x s8 product that stays exact on every
    MLAS kernel (see ``_U8_SAFE_MAX``), for codes of any sign, -128 included. With ``groups`` (default 1) the
    split is made within each of ``groups`` equal blocks of K (a conv's taps: the order of split patches).
    """
    x = np.asarray(x)
    u = x.reshape(len(x), groups, -1).astype(np.int16) + np.int16(128)
    a = np.minimum(u, _U8_SAFE_MAX)
    u -= a
    b = np.minimum(u, _U8_SAFE_MAX)
    u -= b
    return np.stack([a, b, u], axis=2).astype(np.uint8).reshape(len(x), -1)


_SPLIT_ZERO = split_unsigned(np.zeros((1, 1), np.int8))[0]  # real zero (code 0) as split parts: 127, 1, 0


class IntegerMatmul:
    """Exact ``x @ w`` for int8 codes ``x (M, K)`` and a fixed int8 matrix ``w (K, N)``, accumulator as an int array.

    The reference is int64 arithmetic (:func:`dense`); this object gives the same integers faster, through
    onnxruntime's ``MatMulInteger`` (uint8 x int8 -> int32; MLAS, AMX / VNNI where the CPU has them):

    * codes in 0..127 (after a ReLU) go in as they are; measured on the T-P model's conv2 shape (2 cores,
      AMX): 280 GMAC/s, against 40 GMAC/s for numpy's float32 BLAS;
    * codes of any sign go in as :func:`split_unsigned` parts (K three times longer), then the weight
      column sums times 128 are subtracted;
    * when int32 could overflow (``255 * max column sum of |w| >= 2**31``) or ``x`` is not integer: a float32
      BLAS product (exact while every partial sum stays below 2**24), else float64.

    ``scratch=True`` (default False) returns the accumulator in a buffer the next ``scratch`` call with the same
    row count overwrites (no allocation per batch; for callers that consume it at once, as the DPU emulator).
    One object serves one thread at a time.
    """

    def __init__(self, w: np.ndarray) -> None:
        self.w = np.asarray(w, np.int64)
        col_abs = float(np.max(np.sum(np.abs(self.w), axis=0), initial=0.0))
        self.bound = 128.0 * col_abs
        self.exact_in_int32 = 255.0 * col_abs < _INT32_SAFE  # any int8 codes, split or not, on the int32 path
        self._col_sums128 = (128 * self.w.sum(axis=0)).astype(np.int32)
        self._float_dtype = _gemm_dtype(self.w, axis=0)
        self._wf: np.ndarray | None = None
        self._sessions: dict[str, object] = {}
        self._buffers: dict[str, np.ndarray] = {}
        self._fresh: set[int] = set()

    def workspace(self, name: str, shape: tuple[int, ...], dtype: npt.DTypeLike) -> np.ndarray:
        """A buffer kept across calls (uninitialized when first made, see :meth:`fresh`; later calls keep its contents).

        One buffer per name: a call with another shape or dtype replaces it (memory stays that of the last batch).
        """
        buf = self._buffers.get(name)
        if buf is None or buf.shape != tuple(shape) or buf.dtype != np.dtype(dtype):
            self._fresh.discard(id(buf))
            buf = self._buffers[name] = np.empty(shape, dtype)
            self._fresh.add(id(buf))
        return buf

    def fresh(self, buf: np.ndarray) -> bool:
        """True the first time it is asked about a buffer :meth:`workspace` just made."""
        if id(buf) in self._fresh:
            self._fresh.discard(id(buf))
            return True
        return False

    def __call__(self, x: np.ndarray, *, nonnegative: bool | None = None, scratch: bool = False, split_groups: int = 0) -> np.ndarray:
        """``x @ w`` exactly; ``nonnegative`` (default None: checked here) says the codes are in 0..127.

        ``split_groups`` (default 0: no) says ``x`` is already ``split_unsigned(codes, split_groups)``.
        """
        x = np.asarray(x)
        if split_groups:
            return self._split(x, split_groups, scratch)
        if x.size and self.exact_in_int32 and x.dtype.kind in "iu":
            lo, hi = (0, _U8_SAFE_MAX) if nonnegative else (int(x.min()), int(x.max()))
            if 0 <= lo and hi <= _U8_SAFE_MAX:
                return self._ort("u8", _as_uint8(x), scratch)
            if -128 <= lo and hi <= 127:
                return self._split(split_unsigned(x), 1, scratch)
        if self._wf is None:
            self._wf = self.w.astype(self._float_dtype)
        return np.rint(x.astype(self._float_dtype) @ self._wf).astype(np.int64)

    def _split(self, parts: np.ndarray, groups: int, scratch: bool) -> np.ndarray:
        if not self.exact_in_int32:
            raise QuantizationError(f"split codes need 255 * sum|w| < 2**31 per column, got {self.bound / 128 * 255:.0f}",
                                    "pass the codes unsplit (the float path takes them)")
        acc = self._ort(f"split{groups}", parts, scratch)
        acc -= self._col_sums128
        return acc

    def _ort(self, kind: str, x: np.ndarray, scratch: bool) -> np.ndarray:
        sess = self._sessions.get(kind)
        if sess is None:
            w = self.w.astype(np.int8)
            if kind != "u8":  # split parts a | b | c within each group of K all meet the same weights
                groups = int(kind.removeprefix("split"))
                w = np.repeat(w.reshape(groups, 1, -1, w.shape[1]), 3, axis=1).reshape(-1, w.shape[1])
            sess = self._sessions[kind] = _matmul_integer_session(w)
        x = np.ascontiguousarray(x)
        shape = (x.shape[0], self.w.shape[1])
        out = self.workspace("acc", shape, np.int32) if scratch else np.empty(shape, np.int32)
        binding = sess.io_binding()  # type: ignore[attr-defined]
        binding.bind_input("x", "cpu", 0, np.uint8, list(x.shape), x.ctypes.data)
        binding.bind_output("y", "cpu", 0, np.int32, list(shape), out.ctypes.data)  # written in place: no copy, no allocation
        sess.run_with_iobinding(binding)  # type: ignore[attr-defined]
        return out


def _as_uint8(x: np.ndarray) -> np.ndarray:
    """Codes known to be in 0..127 as uint8 (a view when they are int8)."""
    if x.dtype == np.uint8:
        return x
    return np.ascontiguousarray(x).view(np.uint8) if x.dtype == np.int8 else x.astype(np.uint8)


def _matmul_integer_session(w: np.ndarray) -> object:
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    k, n = w.shape
    node = helper.make_node("MatMulInteger", ["x", "w"], ["y"])
    graph = helper.make_graph([node], "matmul_integer", [helper.make_tensor_value_info("x", TensorProto.UINT8, [None, k])],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, [None, n])], [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # one session per weight matrix, each with its own thread pool: idle pools must not spin on the shared cores
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _conv_out_hw(h: int, w: int, kernel: tuple[int, int], stride: tuple[int, int], pads: tuple[int, int, int, int],
                 dilation: tuple[int, int]) -> tuple[int, int]:
    pt, pl, pb, pr = pads
    return ((h + pt + pb - (kernel[0] - 1) * dilation[0] - 1) // stride[0] + 1,
            (w + pl + pr - (kernel[1] - 1) * dilation[1] - 1) // stride[1] + 1)


def im2col_nhwc(x: np.ndarray, kernel: tuple[int, int], stride: tuple[int, int], pads: tuple[int, int, int, int],
                dilation: tuple[int, int] = (1, 1), *, workspace: IntegerMatmul | None = None,
                fill: np.ndarray | int = 0) -> np.ndarray:
    """``(N * OH * OW, KH * KW * C)`` patches of NHWC ``x`` zero-padded ``(top, left, bottom, right)``; taps in
    ``(kh, kw, c)`` order, matching OHWI weights reshaped to ``(O, KH * KW * C)``.

    One strided copy of a ``(N, OH, OW, KH, KW, C)`` view of the padded input. ``workspace`` (default None:
    fresh arrays) keeps the padded input and the patches in that object's buffers (overwritten by its next call).
    ``fill`` (default 0) is the padding value, a scalar or one value per channel.
    """
    x = np.asarray(x)
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    pt, pl, pb, pr = pads
    n, h, w, c = x.shape
    oh, ow = _conv_out_hw(h, w, kernel, stride, pads, dilation)
    padded_shape = (n, h + pt + pb, w + pl + pr, c)
    if workspace is None:
        xp, cols = np.empty(padded_shape, x.dtype), np.empty((n, oh, ow, kh, kw, c), x.dtype)
        xp[...] = fill
    else:  # the border keeps its fill: only the interior is ever written
        xp = workspace.workspace(f"padded{np.ravel(fill).tolist()}", padded_shape, x.dtype)
        cols = workspace.workspace("cols", (n, oh, ow, kh, kw, c), x.dtype)
        if workspace.fresh(xp):
            xp[...] = fill
    xp[:, pt:pt + h, pl:pl + w] = x
    s0, s1, s2, s3 = xp.strides
    view = as_strided(xp, (n, oh, ow, kh, kw, c), (s0, s1 * sh, s2 * sw, s1 * dh, s2 * dw, s3), writeable=False)
    np.copyto(cols, view)
    return cols.reshape(n * oh * ow, kh * kw * c)


def conv2d_accumulate(x: np.ndarray, w_ohwi: np.ndarray, stride: tuple[int, int], pads: tuple[int, int, int, int],
                      dilation: tuple[int, int] = (1, 1), *, matmul: IntegerMatmul | None = None, scratch: bool = False) -> np.ndarray:
    """Exact conv accumulator (no bias, no wrap) of NHWC codes and OHWI codes -> ``(N, OH, OW, O)``.

    Padding is real zero (code 0, symmetric grids). ``matmul`` (default: built here) lets a caller reuse
    one :class:`IntegerMatmul` per weight across batches; ``scratch`` (default False) lets it keep patches and
    accumulator in that object's buffers (the result is overwritten by its next scratch call).
    Equal to :func:`conv2d_nhwc` without wrapping.
    """
    w = np.asarray(w_ohwi)
    mm = matmul or IntegerMatmul(w.reshape(w.shape[0], -1).T)
    x = np.asarray(x)
    oh, ow = _conv_out_hw(x.shape[1], x.shape[2], w.shape[1:3], stride, pads, dilation)
    space = mm if scratch else None
    if x.size and x.dtype.kind in "iu" and mm.exact_in_int32:  # range checked on the input, KH * KW times smaller than its patches
        lo, hi = int(x.min()), int(x.max())
        if 0 <= lo and hi <= _U8_SAFE_MAX:
            cols = im2col_nhwc(_as_uint8(x), w.shape[1:3], stride, pads, dilation, workspace=space)
            return mm(cols, nonnegative=True, scratch=scratch).reshape(len(x), oh, ow, w.shape[0])
        if -128 <= lo and hi <= 127:  # split each pixel's channels, pad with the parts of code 0, patches come out split per tap
            c = x.shape[3]
            parts = split_unsigned(x.reshape(-1, c)).reshape(*x.shape[:3], 3 * c)
            cols = im2col_nhwc(parts, w.shape[1:3], stride, pads, dilation, workspace=space, fill=np.repeat(_SPLIT_ZERO, c))
            return mm(cols, split_groups=w.shape[1] * w.shape[2], scratch=scratch).reshape(len(x), oh, ow, w.shape[0])
    cols = im2col_nhwc(x, w.shape[1:3], stride, pads, dilation, workspace=space)
    return mm(cols, scratch=scratch).reshape(len(x), oh, ow, w.shape[0])


def _check_groups(channels: int, w_shape: tuple[int, ...], groups: int) -> None:
    if groups < 1 or channels != groups * w_shape[3] or w_shape[0] % groups:
        raise ValueError(f"grouped conv: {channels} input channels, weights {tuple(w_shape)} and {groups} groups do not agree")


def grouped_conv2d_accumulate(x: np.ndarray, w_ohwi: np.ndarray, groups: int, stride: tuple[int, int],
                              pads: tuple[int, int, int, int], dilation: tuple[int, int] = (1, 1)) -> np.ndarray:
    """Exact accumulator (no bias, no wrap) of a grouped conv: NHWC codes, OHWI codes with ``C / groups`` input
    channels -> ``(N, OH, OW, O)`` int64; equal to :func:`conv2d_nhwc` with ``groups`` without wrapping.

    One int64 contraction over the patches of :func:`im2col_nhwc` split per group (patches in ``(kh, kw, c)`` order);
    a depthwise conv is the case ``C / groups == 1``."""
    w = np.asarray(w_ohwi)
    x = np.asarray(x)
    _check_groups(x.shape[3], w.shape, groups)
    kh, kw, ci = w.shape[1:]
    oh, ow = _conv_out_hw(x.shape[1], x.shape[2], (kh, kw), stride, pads, dilation)
    cols = im2col_nhwc(x, (kh, kw), stride, pads, dilation).reshape(-1, kh * kw, groups, ci).astype(np.int64)
    wg = w.reshape(groups, w.shape[0] // groups, kh * kw, ci).astype(np.int64)
    return np.einsum("pkgc,gokc->pgo", cols, wg).reshape(len(x), oh, ow, w.shape[0])


def conv2d_zero_point_offset(w_ohwi: np.ndarray, in_hw: tuple[int, int], x_zero_point: int, stride: tuple[int, int],
                             pads: tuple[int, int, int, int], dilation: tuple[int, int] = (1, 1)) -> np.ndarray:
    """``-x_zero_point * (w summed over the taps inside the image)`` per output position and channel, ``(OH, OW, O)`` int64.

    Added to :func:`conv2d_accumulate` of raw codes (padding = code 0) it gives :func:`conv2d_nhwc`'s accumulator
    with ``x_zero_point`` (padding = real zero, i.e. the zero point): ``sum (x - zp) * w`` over the taps inside.
    """
    w = np.asarray(w_ohwi)
    ones = np.ones((1, *in_hw, w.shape[3]), np.int64)
    taps = conv2d_nhwc(ones, w, strides=stride, pads=pads, dilations=dilation, acc_bits=48)[0].astype(np.int64)
    return -int(x_zero_point) * taps


def dense_accumulate(x: np.ndarray, w: np.ndarray, *, matmul: IntegerMatmul | None = None, scratch: bool = False) -> np.ndarray:
    """Exact dense accumulator (no bias, no wrap): codes ``(N, in)`` times codes ``[in, out]``."""
    return (matmul or IntegerMatmul(w))(np.asarray(x), scratch=scratch)

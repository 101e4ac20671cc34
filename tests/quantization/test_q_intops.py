"""intops: ranges, rounding, (de)quantization, fixed-point requantization, reference integer ops."""
from __future__ import annotations

import numpy as np
import pytest

from nilmc.compiler.errors import QuantizationError
from nilmc.quantization import intops as io
from nilmc.quantization.intops import Rounding


def test_range_table() -> None:
    assert (io.INT_RANGES["int8"].lo, io.INT_RANGES["int8"].hi) == (-128, 127)
    assert (io.INT_RANGES["uint8"].lo, io.INT_RANGES["uint8"].hi) == (0, 255)
    narrow = io.INT_RANGES["int8_narrow"]
    assert (narrow.lo, narrow.hi, narrow.storage, narrow.levels) == (-127, 127, "int8", 255)
    assert io.INT_RANGES["int16"].hi == 32767 and io.INT_RANGES["int32"].lo == -(2**31)
    assert io.int_range_for(8, signed=True, narrow=True) is narrow
    assert io.accumulator_limit(16) == 32767
    with pytest.raises(QuantizationError, match="available"):
        io.int_range("int4")


@pytest.mark.parametrize(
    "mode, expected",
    [
        (Rounding.HALF_EVEN, [-2, -2, -0, 0, 2, 2, 4]),
        (Rounding.HALF_AWAY, [-3, -2, -1, 1, 2, 3, 4]),
        (Rounding.HALF_UP, [-2, -1, 0, 1, 2, 3, 4]),  # DPU_ROUND: floor(x + 0.5)
    ],
)
def test_rounding_ties(mode: Rounding, expected: list[int]) -> None:
    x = np.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.5])
    assert io.round_values(x, mode).tolist() == expected
    # the integer version agrees: round(2x / 2)
    assert io.rounding_divide((2 * x).astype(np.int64), 2, mode).tolist() == expected


def test_dpu_round_is_half_up() -> None:
    assert io.DPU_ROUND is Rounding.HALF_UP
    assert io.round_values(np.array([-2.5]), io.DPU_ROUND)[0] == -2.0
    assert Rounding.parse("DPU_ROUND") is Rounding.HALF_UP


@pytest.mark.parametrize("mode", list(Rounding))
def test_rounding_divide_matches_float(mode: Rounding) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(-(2**20), 2**20, 5000)
    d = rng.integers(1, 300, 5000)
    assert np.array_equal(io.rounding_divide(x, d, mode), io.round_values(x / d, mode).astype(np.int64))
    assert np.array_equal(io.rounding_shift_right(x, 3, mode), io.round_values(x / 8, mode).astype(np.int64))
    assert np.array_equal(io.rounding_shift_right(x, -2, mode), x * 4)


def test_quantize_dequantize_roundtrip_and_saturation() -> None:
    rng8 = io.INT_RANGES["int8"]
    x = np.linspace(-1.0, 1.0, 1001, dtype=np.float32)
    scale, zp = io.affine_params(-1.0, 1.0, rng8, symmetric=False)
    q = io.quantize(x, scale, zp, rng8)
    assert q.dtype == np.int8
    err = np.abs(io.dequantize(q, scale, zp) - x)
    assert err.max() <= scale / 2 + 1e-7
    big = io.quantize(np.array([100.0, -100.0], np.float32), scale, zp, rng8)
    assert big.tolist() == [127, -128]


def test_affine_params() -> None:
    s, z = io.affine_params(-1.0, 3.0, io.INT_RANGES["uint8"], symmetric=False)
    assert s == pytest.approx(4.0 / 255) and z == 64  # rint(0 + 1 / (4/255)) = rint(63.75)
    s, z = io.affine_params(-0.5, 2.54, io.INT_RANGES["int8"], symmetric=True)
    assert z == 0 and s == np.float32(2.54 / 127)
    s, z = io.affine_params(0.5, 2.0, io.INT_RANGES["uint8"], symmetric=False)  # widened to include 0
    assert z == 0 and s == np.float32(2.0 / 255)
    assert io.affine_params(0.0, 0.0, io.INT_RANGES["int8"], symmetric=True) == (1.0, 0)


def test_per_channel_quantize_axis() -> None:
    w = np.array([[1.0, 10.0], [-1.0, -10.0]])  # channels on axis 1
    q = io.quantize(w, np.array([1 / 127, 10 / 127]), np.array([0, 0]), io.INT_RANGES["int8_narrow"], axis=1)
    assert q.tolist() == [[127, 127], [-127, -127]]


def test_quantize_multiplier_known_values() -> None:
    assert io.quantize_multiplier(0.5) == (2**30, 0)
    assert io.quantize_multiplier(0.25) == (2**30, -1)
    assert io.quantize_multiplier(1.5) == (3 * 2**29, 1)
    assert io.quantize_multiplier(0.5, bits=16) == (2**14, 0)
    m, shift = io.quantize_multiplier(0.0123456789)
    assert 2**30 <= m < 2**31 and m * 2.0 ** (shift - 31) == pytest.approx(0.0123456789, rel=1e-9)
    assert int(io.multiply_by_quantized_multiplier(np.array([100]), 2**30, 0)[0]) == 50


@pytest.mark.parametrize("bits, tolerance", [(32, 1), (16, 2)])
def test_requantization_matches_real_multiplication(bits: int, tolerance: int) -> None:
    rng = np.random.default_rng(1)
    acc = rng.integers(-(2**24), 2**24, 20000)
    for real in (0.0003, 0.0123, 0.37, 0.9):
        m, shift = io.quantize_multiplier(real, bits=bits)
        got = io.multiply_by_quantized_multiplier(acc, m, shift, bits=bits)
        want = io.round_values(acc * (m * 2.0 ** (shift - bits + 1)), Rounding.HALF_AWAY)
        assert np.abs(got - want).max() <= 1  # double rounding: at most one code
        assert np.abs(got - np.rint(acc * real)).max() <= tolerance + abs(acc).max() * real * 2.0 ** (2 - bits)


def test_requantize_saturates() -> None:
    m, s = io.quantize_multiplier(0.01)
    out = io.requantize(np.array([10**6, -(10**6), 1000]), m, s, 5, io.INT_RANGES["int8"])
    assert out.tolist() == [127, -128, 15]


def test_shift_requantize_dpu_round() -> None:
    out = io.shift_requantize(np.array([-5, 5, -3, 3, 1000]), 1, io.INT_RANGES["int8"])
    assert out.tolist() == [-2, 3, -1, 2, 127]  # -2.5 -> -2, 2.5 -> 3, -1.5 -> -1


def test_wrap_and_fits() -> None:
    assert io.wrap(np.array([2**31, -(2**31) - 1, 5]), 32).tolist() == [-(2**31), 2**31 - 1, 5]
    assert io.wrap(np.array([40000]), 16).tolist() == [40000 - 65536]
    assert io.fits_accumulator(np.array([32767]), 16) and not io.fits_accumulator(np.array([32768]), 16)


def _conv_loop(x, w, bias, xz, wz, pads):
    n, h, wd, c = x.shape
    o, kh, kw, _ = w.shape
    xp = np.pad(x.astype(np.int64) - xz, ((0, 0), (pads[0], pads[2]), (pads[1], pads[3]), (0, 0)))
    oh, ow = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
    out = np.zeros((n, oh, ow, o), np.int64)
    for i in range(oh):
        for j in range(ow):
            patch = xp[:, i : i + kh, j : j + kw, :]
            out[:, i, j, :] = np.einsum("nhwc,ohwc->no", patch, w.astype(np.int64) - wz) + bias
    return out


def test_conv2d_nhwc_matches_loop() -> None:
    rng = np.random.default_rng(2)
    x = rng.integers(-128, 128, (2, 6, 5, 3)).astype(np.int8)
    w = rng.integers(-127, 128, (4, 3, 3, 3)).astype(np.int8)
    b = rng.integers(-1000, 1000, 4)
    got = io.conv2d_nhwc(x, w, b, x_zero_point=-3, pads=(1, 1, 1, 1))
    assert got.dtype == np.int32
    assert np.array_equal(got, _conv_loop(x, w, b, -3, 0, (1, 1, 1, 1)))
    strided = io.conv2d_nhwc(x, w, None, strides=(2, 2))
    assert np.array_equal(strided, _conv_loop(x, w, 0, 0, 0, (0, 0, 0, 0))[:, ::2, ::2])


def test_dense_matches_float_and_wraps() -> None:
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (5, 40)).astype(np.uint8)
    w = rng.integers(-127, 128, (40, 7)).astype(np.int8)
    b = rng.integers(-500, 500, 7)
    got = io.dense(x, w, b, x_zero_point=128)
    want = (x.astype(np.float64) - 128) @ w.astype(np.float64) + b
    assert np.array_equal(got, want.astype(np.int64))
    small = io.dense(x, w, b, x_zero_point=128, acc_bits=12)  # wraps like a 12-bit register
    assert np.array_equal(small, io.wrap(want.astype(np.int64), 12))


def test_relu_leaky_add_pools() -> None:
    assert io.relu(np.array([-5, 3, 10], np.int8), 3).tolist() == [3, 3, 10]
    assert io.leaky_relu(np.array([-100, 100, -5])).tolist() == [-10, 100, -1]  # -10.16 -> -10, -0.51 -> -1
    a = np.array([10, -20, 100], np.int8)
    b = np.array([5, 7, 100], np.int8)
    out = io.add(a, b, a_scale=0.1, a_zero_point=0, b_scale=0.05, b_zero_point=2, out_scale=0.2, out_zero_point=-1,
                 rng=io.INT_RANGES["int8"])
    want = np.rint((a * 0.1 + (b - 2) * 0.05) / 0.2) - 1
    assert np.abs(out - np.clip(want, -128, 127)).max() <= 1
    q = np.arange(16, dtype=np.int8).reshape(1, 4, 4, 1)
    assert io.max_pool(q, (2, 2))[..., 0].tolist() == [[[5, 7], [13, 15]]]
    assert io.avg_pool(q, (2, 2))[..., 0].tolist() == [[[3, 5], [11, 13]]]  # 2.5 -> 3, 4.5 -> 5 (half away)
    assert io.avg_pool(q, (2, 2), rounding=Rounding.HALF_EVEN)[..., 0].tolist() == [[[2, 4], [10, 12]]]


def test_pot_helpers() -> None:
    assert io.pot_scale(7) == 2.0**-7
    assert io.fix_position_candidates(1 / 127) == (6, 7)
    assert io.fix_position_candidates(0.25) == (2,)


# --------------------------------------------------------------------------- power-of-two reference ops (the DPU's)
def test_shift_round_matches_rounding_shift_right() -> None:
    x = np.arange(-300, 301, dtype=np.int64)
    for mode in Rounding:
        for s in (-2, 0, 1, 3):
            np.testing.assert_array_equal(io.shift_round(x, s, mode), io.rounding_shift_right(x, s, mode))
    assert io.shift_round(np.array([-5, -3, 5], np.int32), 1).tolist() == [-2, -1, 3]  # half up, int32 kept


def test_pot_quantize_requantize_and_leaky() -> None:
    assert io.pot_quantize(np.array([-2.5, 2.5, 0.49, 1e6]), 0).tolist() == [-2, 3, 0, 127]
    assert io.pot_dequantize(np.array([3]), 2).tolist() == [0.75]
    out = io.pot_requantize(np.array([-5, -3, -1, 1, 3, 5, 10_000, -10_000]), None, shift_cut=1, shift_bias=0, activation=None)
    assert out.tolist() == [-2, -1, 0, 1, 2, 3, 127, -128]
    # 26/256 on the exact value, one rounding: -100 * 26/256 = -10.16 -> -10
    assert io.pot_requantize(np.array([-256, -100, 64]), None, shift_cut=0, shift_bias=0, activation="leaky_relu").tolist() == [-26, -10, 64]
    # a negative shift_bias keeps the bias's fraction bits: (acc + 0.75) / 2
    got = io.pot_requantize(np.array([0, 1, 2]), np.array([3]), shift_cut=1, shift_bias=-2, activation=None)
    assert got.tolist() == np.floor((np.array([0, 1, 2]) + 0.75) / 2 + 0.5).tolist()
    # int32 fast path (bound given) equals int64
    acc = np.random.default_rng(0).integers(-2**20, 2**20, 1000)
    a = io.pot_requantize(acc, np.array([5]), shift_cut=9, shift_bias=3, activation="relu", acc_bound=2.0**21)
    b = io.pot_requantize(acc, np.array([5]), shift_cut=9, shift_bias=3, activation="relu")
    np.testing.assert_array_equal(a, b)


def test_pot_pools_eltwise_and_activation() -> None:
    assert io.avgpool_factors(3, 3) == (7, 6) and io.avgpool_factors(2, 2) == (1, 2)
    q = np.full((1, 3, 3, 1), 10, np.int8)
    q[0, 0, 0, 0] = 20  # sum 100 * 7 / 64 = 10.94 -> 11
    assert int(io.pot_avg_pool(q, (3, 3), (1, 1), (0, 0, 0, 0), 0, 0)[0, 0, 0, 0]) == 11
    m = np.arange(16, dtype=np.int8).reshape(1, 4, 4, 1) - 8
    assert io.pot_max_pool(m, (2, 2), (2, 2), (0, 0, 0, 0), 0, 0)[..., 0].tolist() == [[[-3, -1], [5, 7]]]
    # padding never wins a max even below every code
    assert io.pot_max_pool(np.full((1, 2, 2, 1), -128, np.int8), (2, 2), (1, 1), (1, 1, 0, 0), 0, 0).min() == -128
    # eltwise: align to the smaller fix point with 7 fraction bits: 10 * 2**-2 + 8 * 2**-3 = 3.5 -> at fo 1: 7
    assert io.pot_eltwise_add([np.array([10]), np.array([8])], [2, 3], 1).tolist() == [7]
    assert io.pot_activation(np.array([-100, 50]), "leaky_relu", 0, 0).tolist() == [-10, 50]
    assert io.pot_activation(np.array([-100, 50]), "relu", 1, 0).tolist() == [0, 25]


@pytest.mark.parametrize("signed", [True, False])
def test_integer_matmul_and_conv_accumulate_are_exact(signed: bool) -> None:
    rng = np.random.default_rng(1)
    x = rng.integers(-128 if signed else 0, 128, (3, 6, 5, 4)).astype(np.int8)
    w = rng.integers(-128, 128, (7, 3, 3, 4)).astype(np.int8)  # OHWI
    got = io.conv2d_accumulate(x, w, (1, 1), (1, 1, 1, 1))
    want = io.conv2d_nhwc(x, w, pads=(1, 1, 1, 1), acc_bits=48)  # no wrap at these sizes
    np.testing.assert_array_equal(got, want)
    mm = io.IntegerMatmul(w.reshape(7, -1).T)
    xs = x.reshape(-1, 4)[:, :1].repeat(36, axis=1)
    np.testing.assert_array_equal(mm(xs), xs.astype(np.int64) @ w.reshape(7, -1).T.astype(np.int64))

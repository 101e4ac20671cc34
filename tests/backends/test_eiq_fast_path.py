"""The eIQ emulation's fast path (exact integer GEMMs of :class:`intops.IntegerMatmul`, zero point and bias folded
into one offset, :func:`intops.requantize_fast`, 32- and 16-bit runs side by side) equals the plain numpy
reference it replaced: int64 accumulation (:func:`intops.conv2d_nhwc`, :func:`intops.dense`), wrap to int32,
:func:`intops.requantize`, op by op.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from nilmc.quantization import intops
from nilmc.quantization.intops import INT_RANGES

INT8 = INT_RANGES["int8"]


# --------------------------------------------------------------------------- the reference (the emulator before the fast path)
def _reference_requant(acc: np.ndarray, real: np.ndarray, zp: int, rng: Any, act: tuple[int, int], bits: int) -> np.ndarray:
    ms = [intops.quantize_multiplier(float(r), bits=bits) for r in np.atleast_1d(real)]
    m = np.array([v[0] for v in ms], np.int64)
    s = np.array([v[1] for v in ms], np.int64)
    q = intops.requantize(acc, m if len(m) > 1 else int(m[0]), s if len(s) > 1 else int(s[0]), zp, rng, bits=bits)
    return np.clip(q, act[0], act[1]).astype(rng.np_dtype)


def _reference_weighted(op: Any, t: list, x: np.ndarray, name: str, bits: int) -> np.ndarray:
    from nilmc.backends.eiq_backend import _act_range, _same_pads

    o = op.builtinOptions
    xi, wi = op.inputs[0], op.inputs[1]
    bias = t[op.inputs[2]].data if len(op.inputs) > 2 and op.inputs[2] >= 0 else None
    w, x_zp = t[wi].data, int(t[xi].zero_point[0])
    if name == "CONV_2D":
        sh, sw, dh, dw = int(o.strideH), int(o.strideW), int(o.dilationHFactor or 1), int(o.dilationWFactor or 1)
        pads = (0, 0, 0, 0)
        if int(o.padding) == 0:
            (pt, pb), (pl, pr) = _same_pads(x.shape[1], w.shape[1], sh, dh), _same_pads(x.shape[2], w.shape[2], sw, dw)
            pads = (pt, pl, pb, pr)
        acc = intops.conv2d_nhwc(x, w, bias, x_zero_point=x_zp, strides=(sh, sw), pads=pads, dilations=(dh, dw))
    else:
        acc = intops.dense(x.reshape(-1, w.shape[1]), w.T, bias, x_zero_point=x_zp)
    out = t[op.outputs[0]]
    rng = INT_RANGES[out.dtype]
    real = np.float64(t[xi].scale[0]) * t[wi].scale.astype(np.float64) / np.float64(out.scale[0])
    zp = int(out.zero_point[0])
    return _reference_requant(acc, real, zp, rng, _act_range(int(o.fusedActivationFunction), float(out.scale[0]), zp, rng), bits)


def reference_codes(fb: bytes, x_codes: np.ndarray, bits: int) -> np.ndarray:
    """Output codes of the integer graph, int64 all the way (conv / dense / reshape / QUANTIZE graphs)."""
    from nilmc.backends.eiq_backend import _read_tensors, load_flatbuffer, op_code, op_name

    m = load_flatbuffer(fb)
    sg = m.subgraphs[0]
    t = _read_tensors(m)
    vals = {int(sg.inputs[0]): np.asarray(x_codes)}
    for op in sg.operators:
        name, x = op_name(op_code(m, op)), vals[op.inputs[0]]
        if name in ("CONV_2D", "FULLY_CONNECTED"):
            y = _reference_weighted(op, t, x, name, bits)
        elif name in ("RESHAPE", "SQUEEZE", "EXPAND_DIMS"):
            y = x.reshape((len(x), *t[op.outputs[0]].shape[1:]))
        elif name == "QUANTIZE":
            i, o = t[op.inputs[0]], t[op.outputs[0]]
            rng = INT_RANGES[o.dtype]
            real = np.array([np.float64(i.scale[0]) / np.float64(o.scale[0])])
            y = _reference_requant(x.astype(np.int64) - int(i.zero_point[0]), real, int(o.zero_point[0]), rng, (rng.lo, rng.hi), bits)
        else:
            raise AssertionError(f"no reference here for {name}")
        vals[int(op.outputs[0])] = y
    return vals[int(sg.outputs[0])]


# --------------------------------------------------------------------------- ops on random codes
@pytest.mark.parametrize("bits", [32, 16])
@pytest.mark.parametrize("per_channel", [False, True])
def test_requantize_fast_equals_requantize(bits: int, per_channel: bool) -> None:
    rng = np.random.default_rng(bits + per_channel)
    acc = rng.integers(-(2**31), 2**31, size=(4000, 8), dtype=np.int64)
    acc[:, :4] //= rng.integers(1, 2**20, size=(4000, 4))  # small accumulators too: ties and near-zero values
    acc[0] = [-(2**31), 2**31 - 1, 0, -1, 1, -(2**15), 2**15, 7]
    acc = acc.astype(np.int32)
    reals = np.exp(rng.uniform(np.log(1e-6), np.log(0.9), size=8)) if per_channel else np.array([3.1e-4])
    reals[-1:] = 2.0**-9  # a power of two: exact multiplier, exact ties after the shift
    for zp, out, limits in ((-128, INT8, None), (-3, INT8, (-3, 100)), (17, INT_RANGES["uint8"], None)):
        fixed = [intops.quantize_multiplier(float(r), bits=bits) for r in reals]
        m = np.array([f[0] for f in fixed]) if per_channel else fixed[0][0]
        s = np.array([f[1] for f in fixed]) if per_channel else fixed[0][1]
        want = intops.requantize(acc, m, s, zp, out, bits=bits)
        if limits is not None:
            want = np.clip(want, *limits).astype(out.np_dtype)
        got = intops.requantize_fast(acc, m, s, zp, out, bits=bits, limits=limits)
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


def test_requantize_fast_falls_back_to_the_reference_for_left_shifts_and_wide_accumulators() -> None:
    acc = np.arange(-5000, 5000, 7, dtype=np.int64).reshape(-1, 1) * 3001
    for real in (3.7, 0.013):  # shift > 0 takes the reference; int64 input takes it too
        m, s = intops.quantize_multiplier(real)
        np.testing.assert_array_equal(intops.requantize_fast(acc, m, s, 5, INT8), intops.requantize(acc, m, s, 5, INT8))


@pytest.mark.parametrize("geometry", [((1, 1), (2, 2, 2, 2), (1, 1)), ((2, 1), (0, 1, 2, 1), (1, 2)), ((1, 1), (0, 0, 0, 0), (1, 1))])
@pytest.mark.parametrize("x_zero_point", [-128, -83, 0, 127])
def test_conv_with_zero_point_offset_equals_conv2d_nhwc(geometry: tuple, x_zero_point: int) -> None:
    stride, pads, dilation = geometry
    rng = np.random.default_rng(abs(x_zero_point))
    x = rng.integers(-128, 128, size=(5, 9, 8, 6), dtype=np.int8)
    x[0, 0, 0, :] = -128  # the full int8 range, -128 included
    x[1, 2, 3, :] = 127
    w = rng.integers(-127, 128, size=(7, 3, 3, 6), dtype=np.int8)
    bias = rng.integers(-(2**20), 2**20, size=7)
    want = intops.conv2d_nhwc(x, w, bias, x_zero_point=x_zero_point, strides=stride, pads=pads, dilations=dilation)
    mm = intops.IntegerMatmul(w.reshape(7, -1).T)
    for scratch in (False, True):
        acc = intops.conv2d_accumulate(x, w, stride, pads, dilation, matmul=mm, scratch=scratch)
        got = acc + intops.conv2d_zero_point_offset(w, x.shape[1:3], x_zero_point, stride, pads, dilation) + bias
        np.testing.assert_array_equal(intops.wrap(got, 32), want)


# --------------------------------------------------------------------------- the shipped model
def _shipped_paths() -> dict[str, str]:
    try:
        from nilmc.calibration_data.shipped import shipped_paths  # type: ignore[attr-defined]
    except ImportError:
        pytest.skip("no shipped model in this checkout")
    p = shipped_paths()
    if not Path(p["keras"]).is_file():
        pytest.skip("no shipped model in this checkout")
    return p


@pytest.fixture(scope="module")
def shipped_eiq(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The shipped T-P model lowered for eiq:int8 (per-channel; full integer: eiq.cpu_layers=none) and eiq:uint8_io
    (per-tensor, QUANTIZE ops), and its calibration windows as input codes of each."""
    pytest.importorskip("ai_edge_litert")
    from nilmc.backends.eiq_backend import EIQBackend, _input_codes, io_quantization
    from nilmc.calibration_data.dataset import NilmDataset
    from nilmc.compiler.frontend import load_model
    from nilmc.quantization.context import QuantContext

    p = _shipped_paths()
    model = load_model(p["keras"])
    ctx = QuantContext(model, NilmDataset.load(p["calib"]))
    out: dict[str, Any] = {}
    for precision in ("int8", "uint8_io"):
        d = tmp_path_factory.mktemp(precision)
        art = EIQBackend().lower(model, d, precision=precision, options={"quant": ctx, "npu_emulation": False, "cpu_layers": "none"})
        fb = art.path.read_bytes()
        out[precision] = (fb, _input_codes(ctx.calib_x, io_quantization(fb)["input"]))
    return out


@pytest.mark.slow  # two TFLite conversions of the shipped model and the int64 reference on its windows: ~1 min on 2 cores
@pytest.mark.tf
@pytest.mark.parametrize("precision", ["int8", "uint8_io"])
def test_emulation_equals_reference_on_the_shipped_model(shipped_eiq: dict[str, Any], precision: str) -> None:
    from nilmc.backends.eiq_backend import emulate_int8, emulate_int8_widths

    fb, xq = shipped_eiq[precision]
    assert len(xq) >= 256  # several passes, the last one short
    rand = np.random.default_rng(0).integers(INT_RANGES[xq.dtype.name].lo, INT_RANGES[xq.dtype.name].hi + 1,
                                             size=(300, *xq.shape[1:])).astype(xq.dtype)
    rand[0] = INT_RANGES[xq.dtype.name].lo  # the full range of input codes, -128 included for int8
    for x in (xq, rand):
        got = emulate_int8_widths(fb, x, multiplier_bits=(32, 16))
        for bits in (32, 16):
            np.testing.assert_array_equal(got[bits], reference_codes(fb, x, bits), err_msg=f"{bits}-bit")
    np.testing.assert_array_equal(emulate_int8(fb, xq[:200], multiplier_bits=16), reference_codes(fb, xq[:200], 16))  # one width alone

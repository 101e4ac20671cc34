"""The DPU emulator's fast path (onnxruntime u8 x s8 GEMMs, split signed codes, strided im2col into reused
buffers, in-place int32 requantization, 128-window passes) equals the plain numpy reference: int64
accumulation (:func:`intops.conv2d_nhwc`, :func:`intops.dense`), then bias, activation and one
:func:`intops.rounding_shift_right`, op by op.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nilmc.backends.dpu import emulator as emu
from nilmc.backends.dpu import quant, testing
from nilmc.backends.dpu.ir import from_onnx
from nilmc.bitstreams import load_target
from nilmc.quantization import intops
from nilmc.quantization.intops import DPU_ROUND, INT_RANGES

INT8 = INT_RANGES["int8"]


def _reference_weighted(op, a: np.ndarray, params, fi: int, fo: int) -> np.ndarray:  # type: ignore[no-untyped-def]
    wq = params.weights[op.name]
    if op.kind == "conv2d":
        acc = intops.conv2d_nhwc(a, wq.weight_q, strides=op.attrs["stride"], pads=op.attrs["pads"],
                                 dilations=op.attrs.get("dilation", (1, 1)), acc_bits=48)
    else:
        acc = intops.dense(a, wq.weight_q, acc_bits=48)
    shift_bias = fi + wq.fw - (wq.fb or 0)
    extra = max(0, -shift_bias)
    total = acc.astype(np.int64) << extra
    if wq.bias_q is not None:
        total = total + (wq.bias_q.astype(np.int64) << (shift_bias + extra))
    shift = fi + wq.fw - fo + extra
    if op.activation == "relu":
        total = np.maximum(total, 0)
    elif op.activation == "leaky_relu":
        total, shift = np.where(total < 0, total * intops.LEAKY_NUM, total << intops.LEAKY_SHIFT), shift + intops.LEAKY_SHIFT
    return intops.clamp(intops.rounding_shift_right(total, shift, DPU_ROUND), INT8)


def reference_codes(graph, params, x: np.ndarray) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    """Every tensor's codes, int64 all the way (conv / dense / flatten graphs)."""
    vals: dict[str, np.ndarray] = {}
    for op in graph.ops:
        fo = params.fix[op.output]
        if op.kind == "input":
            vals[op.output] = intops.pot_quantize(x.reshape(len(x), *op.shape), fo)
            continue
        a, fi = vals[op.inputs[0]], params.fix[op.inputs[0]]
        if op.kind in ("conv2d", "dense"):
            vals[op.output] = _reference_weighted(op, a, params, fi, fo)
        elif op.kind == "flatten":
            vals[op.output] = intops.clamp(intops.rounding_shift_right(a.reshape(len(a), -1).astype(np.int64), fi - fo, DPU_ROUND), INT8)
        else:
            raise AssertionError(f"no reference here for {op.kind}")
    return vals


def _full_range(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    q = rng.integers(-128, 128, shape).astype(np.int8)
    q.flat[:4] = [-128, 127, -128, 0]  # both ends always present
    return q


@pytest.mark.parametrize("kernel,stride,pads,dilation", [((5, 5), (1, 1), (2, 2, 2, 2), (1, 1)), ((3, 2), (2, 1), (1, 0, 0, 1), (1, 1)),
                                                          ((3, 3), (1, 2), (2, 2, 2, 2), (2, 2)), ((1, 1), (1, 1), (0, 0, 0, 0), (1, 1))])
@pytest.mark.parametrize("signed", [True, False])
def test_conv_accumulate_equals_int64_reference_on_the_full_int8_range(kernel: tuple[int, int], stride: tuple[int, int],
                                                                       pads: tuple[int, int, int, int], dilation: tuple[int, int],
                                                                       signed: bool) -> None:
    rng = np.random.default_rng(7)
    x = _full_range(rng, (9, 8, 7, 5)) if signed else rng.integers(0, 128, (9, 8, 7, 5)).astype(np.int8)
    w = _full_range(rng, (6, *kernel, 5))
    want = intops.conv2d_nhwc(x, w, strides=stride, pads=pads, dilations=dilation, acc_bits=48)
    mm = intops.IntegerMatmul(w.reshape(6, -1).T)
    for scratch in (False, True, True):  # reused buffers give the same result on every call
        got = intops.conv2d_accumulate(x, w, stride, pads, dilation, matmul=mm, scratch=scratch)
        np.testing.assert_array_equal(got, want)
    assert set(mm._sessions) == ({f"split{kernel[0] * kernel[1]}"} if signed else {"u8"})  # the int32 GEMM ran, not the float path


def test_matmul_equals_int64_reference_on_the_full_int8_range() -> None:
    rng = np.random.default_rng(3)
    x, w = _full_range(rng, (300, 700)), _full_range(rng, (700, 9))
    x[0], w[:, 0] = -128, -128  # the largest products: 700 * 128 * 128
    mm = intops.IntegerMatmul(w)
    want = x.astype(np.int64) @ w.astype(np.int64)
    np.testing.assert_array_equal(mm(x), want)
    np.testing.assert_array_equal(mm(np.clip(x, 0, 127)), np.clip(x, 0, 127).astype(np.int64) @ w.astype(np.int64))
    np.testing.assert_array_equal(intops.split_unsigned(x).reshape(300, 3, 700).astype(np.int64).sum(1), x.astype(np.int64) + 128)
    assert intops.split_unsigned(x).max() <= 127
    assert set(mm._sessions) == {"u8", "split1"}


@pytest.mark.parametrize("activation", [None, "relu", "leaky_relu"])
@pytest.mark.parametrize("shift_bias", [-3, 0, 5])
def test_in_place_requantization_equals_the_int64_formula(activation: str | None, shift_bias: int) -> None:
    rng = np.random.default_rng(5)
    acc = rng.integers(-2**21, 2**21, (64, 10)).astype(np.int32)
    acc[0, :4] = [2**8, -(2**8), 3 * 2**7, -(3 * 2**7)]  # exact ties at shift 8
    bias = rng.integers(-128, 128, 10)
    extra = max(0, -shift_bias)
    total = (acc.astype(np.int64) << extra) + (bias << (shift_bias + extra))
    shift = 8 + extra
    if activation == "relu":
        total = np.maximum(total, 0)
    elif activation == "leaky_relu":
        total, shift = np.where(total < 0, total * 26, total << 8), shift + 8
    want = intops.clamp(intops.rounding_shift_right(total, shift, DPU_ROUND), INT8)
    for bound in (None, 2.0**22 + 128 * 2.0**5):
        got = intops.pot_requantize(acc.copy(), bias, shift_cut=8, shift_bias=shift_bias, activation=activation, acc_bound=bound,
                                    overwrite=True)
        np.testing.assert_array_equal(got, want)


def test_emulator_equals_reference_on_a_signed_model_with_odd_batch() -> None:
    model = testing.seq2point(convs=((5, 8), (3, 16)), dense=(32,))
    graph = from_onnx(model)
    rng = np.random.default_rng(11)
    x = rng.normal(0, 3, (300, 10, 9, 1)).astype(np.float32)  # saturates the input grid both ways: codes -128 and 127
    params = quant.calibrate(model, graph, {"input": x[:128] / 3}, load_target("b2304").limits)
    want = reference_codes(graph, params, x)
    assert want["input"].min() == -128 and want["input"].max() == 127
    em = emu.DpuEmulator(graph, params)
    for got in (em.codes({"input": x}), em.codes({"input": x}, batch=1000), em.codes({"input": x[:77]})):
        for t, v in got.items():
            np.testing.assert_array_equal(v, want[t][:len(v)], err_msg=t)
    out = graph.outputs[0]
    inferred = next(iter(em.infer({"input": x}).values()))
    np.testing.assert_array_equal(inferred, intops.pot_dequantize(want[out], params.fix[out]))


def _shipped_paths() -> dict[str, str]:
    try:
        from nilmc.calibration_data.shipped import shipped_paths  # type: ignore[attr-defined]
    except ImportError:
        pytest.skip("no shipped model in this checkout")
    p = shipped_paths()
    if not Path(p["model"]).is_file():
        pytest.skip("no shipped model in this checkout")
    return p


@pytest.mark.slow  # DPU calibration of the shipped model: ~9 s on 2 cores
def test_emulator_equals_reference_on_the_shipped_model_evaluation_windows() -> None:
    from nilmc.calibration_data.dataset import NilmDataset
    from nilmc.compiler.frontend import load_model

    p = _shipped_paths()
    model = load_model(p["model"])
    x = model.contract.prepare(NilmDataset.load(p["eval"]).raw_x())[:1500]
    calib = model.contract.prepare(NilmDataset.load(p["calib"]).raw_x())[:256]
    graph = from_onnx(model.graph)
    params = quant.calibrate(model.graph, graph, {model.input_name: calib}, load_target("b2304").limits)
    want = reference_codes(graph, params, x)
    got = emu.DpuEmulator(graph, params).codes({model.input_name: x})
    for t, v in want.items():
        np.testing.assert_array_equal(got[t], v, err_msg=t)

"""The regression output's grid puts 0 W exactly on a code (every metric clips at 0 W; see api._zero_watts_on_grid)."""
from __future__ import annotations

import numpy as np
import pytest

from nilmc.quantization.api import Techniques, _zero_watts_on_grid, quantize
from nilmc.quantization.params import activation_from_range
from nilmc.quantization.traits import DPU_POT, GENERIC_INT8, TENSORRT_INT8, TFLITE_INT8


def _codes_of(value: float, scale: float, zp: int) -> float:
    return value / scale + zp


@pytest.mark.parametrize("traits", [GENERIC_INT8, TFLITE_INT8])
@pytest.mark.parametrize("lo,hi,zero_w", [(-0.6, 3.1, -0.386), (-0.39, 5.0, -0.386), (-2.0, 0.5, -1.3)])
def test_zero_watts_lands_on_a_code_and_the_range_is_kept(traits, lo, hi, zero_w):
    tq = activation_from_range("output", lo, hi, traits)
    new = _zero_watts_on_grid(tq, zero_w, traits)
    assert new is not None
    code = _codes_of(zero_w, new.scale[0], new.zero_point[0])
    assert abs(code - round(code)) < 1e-4  # 0 W is a code (float32 scale)
    assert new.representable()[0] <= min(tq.representable()[0], zero_w) + 1e-9 and new.representable()[1] >= tq.representable()[1] - 1e-9
    assert new.scale[0] <= tq.scale[0] * 1.05  # a few percent at most on these ranges
    old = _codes_of(zero_w, tq.scale[0], tq.zero_point[0])
    assert abs(old - round(old)) > 1e-3 or abs(code - round(code)) < 1e-4  # the test ranges were off-grid before


@pytest.mark.parametrize("traits", [TENSORRT_INT8, DPU_POT])
def test_symmetric_and_power_of_two_grids_are_left_alone(traits):
    tq = activation_from_range("output", -0.6, 3.1, traits)
    assert _zero_watts_on_grid(tq, -0.386, traits) is None


def test_nothing_to_do_when_zero_watts_is_the_real_zero_or_above_the_grid():
    tq = activation_from_range("output", -0.6, 3.1, GENERIC_INT8)
    assert _zero_watts_on_grid(tq, 0.0, GENERIC_INT8) is None  # 0.0 is always on an asymmetric grid
    assert _zero_watts_on_grid(tq, 3.5, GENERIC_INT8) is None  # above the grid: nothing to align


def test_quantize_puts_zero_watts_on_the_output_grid(tiny, tiny_ds):
    p = quantize(tiny, tiny_ds, advanced=Techniques(select_estimators=False, bias_correction=False)).params
    out = p[tiny.graph.graph.output[0].name]
    zero = float(tiny.contract.target.from_watts(np.array([0.0]))[0])
    code = _codes_of(zero, out.scale[0], out.zero_point[0])
    assert abs(code - round(code)) < 1e-4 and out.method.endswith("0 W on a code")


@pytest.mark.parametrize("traits", [GENERIC_INT8, TENSORRT_INT8])
def test_without_a_peak_power_the_output_gets_the_deployment_headroom(tiny, tiny_ds, traits):
    """The output's physical range is 0 W .. the contract's peak power; a contract from flags usually has none, and the
    graph output then kept the calibration range exactly: INT8 clipped every window above the calibration maximum
    (fuzzed: 16 of 300 evaluation windows, 17.9 dB; the same weights with a Squeeze after the Gemm got 26.9 dB)."""
    from nilmc.quantization.api import ptq_params
    from nilmc.quantization.statistics import collect_statistics

    x = tiny.contract.prepare(tiny_ds.raw_x()).astype(np.float32)
    stats = collect_statistics(tiny.graph, x)
    hi_calib = stats["output"].maximum
    no_peak = tiny.contract.with_(peak_power_w=None)
    got = ptq_params(tiny.graph, stats, traits, x, contract=no_peak).params["output"].representable()[1]
    assert got >= 1.4 * hi_calib, (got, hi_calib)  # the 1.5x deployment headroom every activation gets (after rounding)
    peak = float(tiny.contract.target.to_watts(np.array([hi_calib]))[0]) * 1.2  # a peak 20 % over the calibration max
    with_peak = ptq_params(tiny.graph, stats, traits, x, contract=no_peak.with_(peak_power_w=peak)).params["output"]
    assert with_peak.representable()[1] < got  # the physical range decides, no headroom on top of it

"""The power-of-two refinement (quantization/pot.py) as the DPU uses it: deployed = reported, start = shared core."""
from __future__ import annotations

import numpy as np
import pytest

from nilmc.backends.dpu import DPUBackend, testing
from nilmc.backends.dpu.ir import from_onnx
from nilmc.backends.dpu.quant import to_quant_params
from nilmc.backends.dpu.xmodel import fix_points, parse, read_xmodel
from nilmc.bitstreams import load_target
from nilmc.quantization import pot
from nilmc.quantization.context import QuantContext
from nilmc.quantization.params import QuantParams
from nilmc.quantization.report import layer_table
from nilmc.quantization.traits import DPU_POT


@pytest.fixture(scope="module")
def lowered(tmp_path_factory, tiny, tiny_ds):
    ctx = QuantContext(tiny, tiny_ds)
    # every layer on the DPU (no CPU pre stage), so every tensor of the model has a refined fix position
    art = DPUBackend().lower(tiny, tmp_path_factory.mktemp("pot"), precision="b2304", options={"quant": ctx, "cpu_layers": "none"})
    return art, ctx


def test_deployed_fix_positions_equal_the_reported_ones(lowered, tiny) -> None:
    art, ctx = lowered
    data = (art.directory / art.primary).read_bytes()
    graph, params = read_xmodel(data)
    reported = QuantParams.from_json(art.info["quantization"])  # the manifest's "quantization" section
    corrected, _ = to_quant_params(tiny.graph, from_onnx(tiny.graph), params)  # the model with the DPU's exact weights
    rows = {r.tensor: r for r in layer_table(corrected, reported, ctx.calib_x, max_windows=64)}
    xir = fix_points(parse(data))
    assert rows and len(xir) > len(params.fix)  # activations and constants both carry fix ops
    for tensor, fp in params.fix.items():
        assert reported[tensor].fix_position == (fp,), tensor
        assert xir[tensor + "_fix"] == fp
        if tensor in rows:
            assert rows[tensor].scale == pytest.approx(2.0**-fp), tensor  # the per-layer report's scale
    for op in graph.ops:
        if op.weighted:
            src = from_onnx(tiny.graph).op(op.name)
            assert reported[src.weight_name].fix_position == (params.weights[op.name].fw,)


def test_refinement_starts_from_the_shared_core_and_records_every_move(lowered, tiny) -> None:
    art, ctx = lowered
    shared = pot.shared_fix_positions(ctx.params(DPU_POT, estimator="minmax"))
    reported = QuantParams.from_json(art.info["quantization"])
    moved = art.info["calibration"]["moved_from_shared"]
    graph = from_onnx(tiny.graph)
    for op in graph.ops:
        want = shared[op.output]
        got = reported[op.output].fix_position[0]
        assert (got != want) == (op.output in moved), op.output
        if op.weighted and not art.info["calibration"].get("notes"):  # weights: the shared core's fix position
            assert reported[op.weight_name].fix_position[0] == shared[op.weight_name], op.name


def test_the_dpu_does_not_calibrate_again(tiny, tiny_ds, tmp_path) -> None:
    ctx = QuantContext(tiny, tiny_ds)
    stats = ctx.statistics
    DPUBackend().lower(tiny, tmp_path, precision="b2304", options={"quant": ctx})
    assert ctx.statistics is stats  # the one shared pass, not a new one


def test_refine_pot_rejects_an_empty_calibration() -> None:
    model = testing.dense_layer(features=8, units=2)
    graph = from_onnx(model)
    with pytest.raises(Exception, match="no calibration windows|no windows"):
        pot.refine_pot(graph.ops, graph.outputs, {}, load_target("b2304").limits, target=None, params=pot.PotParams({}, {}))  # type: ignore[arg-type]


def test_no_clip_and_best_fix() -> None:
    assert pot.no_clip_fix(1.0) == 6 and pot.no_clip_fix(127.0) == 0 and pot.no_clip_fix(0.0) == 7
    v = np.array([0.9, -0.5, 0.26])
    assert pot.best_fix(v, [6, 7]) in (6, 7)
    assert pot.shift_bias_bounds(10, {}, leaky=False) == (-6, 15)

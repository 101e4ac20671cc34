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


def _conv_pool_model() -> object:
    """NHWC input -> Conv(1x3) + ReLU -> AveragePool(1x2) -> output: a DPU subgraph ending in a pooling (seed 002's
    CtRNN blocks), whose conv grid the error after the pooling, not the conv's local MSE, should decide."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.5, (4, 1, 1, 3)).astype(np.float32)
    nodes = [helper.make_node("Transpose", ["input"], ["t0"], perm=[0, 3, 1, 2]),
             helper.make_node("Conv", ["t0", "W", "B"], ["c"], name="conv", kernel_shape=[1, 3], pads=[0, 1, 0, 1]),
             helper.make_node("Relu", ["c"], ["a"], name="act"),
             helper.make_node("AveragePool", ["a"], ["p"], name="pool", kernel_shape=[1, 2], strides=[1, 2]),
             helper.make_node("Transpose", ["p"], ["output"], perm=[0, 2, 3, 1])]
    g = helper.make_graph(nodes, "conv_pool", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 16, 1])],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 1, 8, 4])],
                          [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.full(4, 0.05, np.float32), "B")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def _small_value_error(ref: np.ndarray, out: np.ndarray) -> float:
    """An output error that, like a classifier's tail on the example CtRNN, reads the common small values: MSE where
    the FP32 value is under 1 (the rare spikes above it saturate a sigmoid anyway)."""
    small = np.abs(ref) < 1.0
    return float(np.mean((ref[small] - out[small]) ** 2))


def test_the_output_error_decides_the_grid_of_a_conv_before_the_last_pooling() -> None:
    from nilmc.backends.dpu.ops import record
    from nilmc.backends.dpu.quant import DpuQuantOptions, calibrate

    model = _conv_pool_model()
    graph = from_onnx(model)
    conv = next(op for op in graph.ops if op.weighted)
    out = graph.outputs[0]
    chains = pot.output_chains(graph.ops, graph.outputs, lambda op: record(op.kind).rule)
    assert [c.output for c in chains[conv.output]] == [out] and chains[out] == []
    rng = np.random.default_rng(1)
    x = rng.normal(0, 0.3, (400, 1, 16, 1)).astype(np.float32)
    x[::50, 0, 8, 0] = 40.0  # rare spikes set every range: the no-clipping grid's step is near the common values
    limits = load_target("b2304").limits
    judged = calibrate(model, graph, {"input": x}, limits,
                       options=DpuQuantOptions(output_error=_small_value_error, output_fix_window=(-1, 3)))
    local = calibrate(model, graph, {"input": x}, limits, options=DpuQuantOptions(output_error=_small_value_error))
    choice = judged.method["choices"][conv.output]
    no_clip = pot.no_clip_fix(choice["range"])
    assert choice["candidates"] == list(range(no_clip - 1, no_clip + 4))
    assert judged.fix[conv.output] > no_clip  # the finer grid the output error asks for (spikes clip)
    assert judged.fix[out] == judged.fix[conv.output]  # the pooling keeps it
    assert local.fix[conv.output] <= no_clip  # without the window: one coarser than the no-clipping position, or it
    demanding = calibrate(model, graph, {"input": x}, limits, options=DpuQuantOptions(
        output_error=_small_value_error, output_fix_window=(-1, 3), clip_gain_db=60.0))
    assert demanding.fix[conv.output] <= no_clip  # a clipping grid must gain clip_gain_db in the output error

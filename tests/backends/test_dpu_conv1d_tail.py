"""tf2onnx's Keras Conv1D / AveragePooling1D on the DPU, and a recurrent tail on the board's CPU (seed 002's CtRNN shape).

tf2onnx writes a Keras ``Conv1D`` as ``Unsqueeze -> Conv (2-D, a 1-sized axis) -> Squeeze`` between Transposes; the
DPU IR reads it as a conv2d over NHWC with H = 1, and everything from the first op the DPU has no operator for
(the GRU) to the output is the CPU post stage.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from nilmc.backends.dpu import DPUBackend, DPUUnsupportedError, partition, quant, testing
from nilmc.backends.dpu.ir import from_onnx
from nilmc.backends.dpu.ops import OpKind
from nilmc.backends.dpu.testing import float_forward
from nilmc.backends.dpu.xmodel import graph_attributes
from nilmc.compiler.model import Model
from nilmc.quantization.context import QuantContext

FRAMES, FEATURES = 10, 9


@pytest.fixture(scope="module")
def conv1d_gru(tiny_ds):
    """Keras (N, 10, 9) -> Conv1D 8 -> Conv1D 8 -> AveragePooling1D 2 -> GRU 6 -> Dense 1, through nilmc's exporter."""
    from nilmc.compiler.frontend import keras_to_onnx
    from nilmc.compiler.tfcompat import import_tf
    from nilmc.training.seq2point import contract_for

    tf = import_tf("test")
    tf.keras.utils.set_random_seed(0)
    layers = tf.keras.layers
    inp = layers.Input(shape=(FRAMES, FEATURES), name="input")
    h = layers.Conv1D(8, 3, padding="same", activation="relu", name="conv1")(inp)
    h = layers.Conv1D(8, 3, padding="same", activation="relu", name="conv2")(h)
    h = layers.AveragePooling1D(2, name="pool")(h)
    h = layers.GRU(6, name="gru")(h)
    km = tf.keras.Model(inp, layers.Dense(1, name="out")(h))
    contract = contract_for(tiny_ds, "kettle", "C").with_(layout="NWC")
    return keras_to_onnx(km, contract, source="conv1d_gru")


def _x(model: Model, ds, n: int = 32) -> np.ndarray:
    return model.contract.prepare(ds.raw_x()[:n]).astype(np.float32)


@pytest.mark.tf
def test_keras_conv1d_is_an_h1_conv2d_equal_to_onnxruntime_in_fp32(conv1d_gru, tiny_ds) -> None:
    g = from_onnx(conv1d_gru.graph)
    part = partition.plan_partition(g, (), mode="none")
    dpu = partition.dpu_graph(g, part)
    assert not dpu.unsupported and not part.problems
    convs = [op for op in dpu.ops if op.kind == OpKind.CONV2D]
    assert [op.attrs["kernel"] for op in convs] == [(1, 3), (1, 3)] and convs[0].shape == (1, FRAMES, 8)
    pool = next(op for op in dpu.ops if op.kind == OpKind.AVGPOOL)
    assert pool.attrs["kernel"] == (1, 2) and pool.shape == (1, FRAMES // 2, 8)
    # the IR alone (NHWC, its own kernels, pads, weights) computes what onnxruntime computes, tensor by tensor
    x = _x(conv1d_gru, tiny_ds)
    ref = quant.fp32_tensors(conv1d_gru.graph, dpu, x)
    got = float_forward(dpu, {conv1d_gru.input_name: x})
    for op in dpu.ops:
        np.testing.assert_allclose(got[op.output], ref[op.output], rtol=1e-5, atol=1e-5 * np.abs(ref[op.output]).max(), err_msg=op.name)
    # and the CPU post stage fed those FP32 DPU outputs gives the model's output
    _, post = partition.stages(conv1d_gru.graph, g, part)
    out = post.run({t + partition.NHWC_SUFFIX: got[t].astype(np.float32) for t in part.outputs})
    np.testing.assert_allclose(out["output"], quant.fp32_outputs(conv1d_gru.graph, x), rtol=1e-5, atol=1e-5)


@pytest.mark.tf
def test_the_gru_and_everything_after_it_form_the_cpu_post_stage(conv1d_gru) -> None:
    g = from_onnx(conv1d_gru.graph)
    part = partition.plan_partition(g, ())
    gru = next(op for op in g.ops if op.attrs.get("op_type") == "GRU")
    assert part.post[gru.name] == "GRU is not a DPUCZDX8G operator: runs in FP32 on the board's CPU (CPU post stage)"
    dense = next(op for op in g.ops if op.kind == OpKind.DENSE)
    assert dense.name in part.post and "one DPU subgraph" in part.post[dense.name]
    assert not any(op.weighted for op in g.ops if op.name in part.post and op.kind == OpKind.CONV2D)
    assert len(part.outputs) == 1 and not part.problems


@pytest.mark.tf
def test_lower_runs_conv_blocks_on_the_dpu_and_the_gru_on_the_cpu(conv1d_gru, tiny_ds, tmp_path) -> None:
    art = DPUBackend().lower(conv1d_gru, tmp_path, precision="b2304", options={"quant": QuantContext(conv1d_gru, tiny_ds)})
    d = art.directory
    assert graph_attributes((d / "quantized.xmodel").read_bytes())["nilmc_cpu_stages"] == {"pre": "cpu_pre.onnx", "post": "cpu_post.onnx"}
    post = onnx.load(d / "cpu_post.onnx")
    assert "GRU" in {n.op_type for n in post.graph.node} and [o.name for o in post.graph.output] == ["output"]
    place = art.info["placement"]
    assert len(place["int8"]) == 1 and "conv2" in place["int8"][0]  # conv1 reads the input: FP32 on the CPU (precise input)
    assert any(f["op"] == "GRU" and "board's CPU" in f["why"] for f in place["float"])
    assert place["macs"]["dpu"] > 0 and place["macs"]["cpu_post"] > 0
    inspector = json.loads((d / "inspector.json").read_text())
    assert inspector["fallbacks"] == [] and inspector["dpu_subgraphs"] == 1
    assert 'STAGES = json.loads(\'{"post": "cpu_post.onnx", "pre": "cpu_pre.onnx"}\')' in (d / "run_on_board.py").read_text()
    x = _x(conv1d_gru, tiny_ds, 64)
    with DPUBackend().runner(art) as r:
        y = r.infer({conv1d_gru.input_name: x})["output"]
    ref = quant.fp32_outputs(conv1d_gru.graph, x)
    sqnr = 10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / np.sum((y - ref).astype(np.float64) ** 2))
    assert sqnr > 15, sqnr  # INT8 conv blocks, FP32 GRU and head


def _dense_then(after: list[onnx.NodeProto], extra: list[onnx.TensorProto], out: str) -> onnx.ModelProto:
    """input (N, 90) -> dense 16 ReLU -> dense 8 ReLU -> ``after`` nodes -> ``out``."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.1, (90, 16)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.1, (16, 8)).astype(np.float32), "w2"), *extra]
    nodes = [helper.make_node("MatMul", ["input", "w1"], ["m1"], name="d1"), helper.make_node("Relu", ["m1"], ["h1"], name="r1"),
             helper.make_node("MatMul", ["h1", "w2"], ["m2"], name="d2"), helper.make_node("Relu", ["m2"], ["h2"], name="r2"), *after]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 90])],
                          [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def test_a_tail_reading_the_graph_input_is_not_one_split() -> None:
    idx = numpy_helper.from_array(np.array([0], np.int64), "i0")
    m = _dense_then([helper.make_node("Sigmoid", ["h2"], ["s"], name="sig"),
                     helper.make_node("Gather", ["input", "i0"], ["x0"], name="pick", axis=1),
                     helper.make_node("Add", ["s", "x0"], ["output"], name="mix")], [idx], "output")
    part = partition.plan_partition(from_onnx(m), ["d1"], mode="input")
    assert any("reads 'input' from the graph input" in p for p in part.problems)


def test_an_empty_dpu_region_is_refused_before_calibration(tiny, tiny_ds, tmp_path) -> None:
    model = Model(testing.lstm_model(), tiny.contract, source="lstm")  # the LSTM reads the input: nothing left for the DPU
    assert "no weighted layer is left for the DPU" in DPUBackend().precheck(model, "b2304")
    with pytest.raises(DPUUnsupportedError, match="no weighted layer is left for the DPU; the CPU would run .*LSTM"):
        DPUBackend().lower(model, tmp_path, precision="b2304", options={"quant": QuantContext(model, tiny_ds)})

"""Seed 002's CtRNN (tiny sizes): trains in seconds, converts to ONNX with its GRU and transposed convolution,
compiles as a multi-label classifier, and its manifest says which ops stayed float."""
from __future__ import annotations

import json

import numpy as np
import pytest

from nilmc.training.cost import SEED002_J_PER_FLOP, graph_cost

APPS = ("kettle", "fridge", "washing_machine")


def test_cost_counts_a_known_graph():
    from onnx import TensorProto, helper, numpy_helper

    from nilmc.compiler.model import ONNX_IR_VERSION, ONNX_OPSET

    w = numpy_helper.from_array(np.zeros((4, 2, 3), np.float32), "w")  # Conv: 4 out, 2 in, kernel 3
    d = numpy_helper.from_array(np.zeros((4 * 10, 5), np.float32), "d")
    shape = numpy_helper.from_array(np.array([-1, 40], np.int64), "s")
    g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1]), helper.make_node("Reshape", ["c", "s"], ["f"]),
                           helper.make_node("MatMul", ["f", "d"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 10])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])], [w, d, shape])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", ONNX_OPSET)])
    m.ir_version = ONNX_IR_VERSION
    cost = graph_cost(m)
    assert cost["macs_by_op"] == {"Conv": 4 * 10 * 2 * 3, "MatMul": 5 * 40}
    assert cost["flops"] == 2 * cost["macs"]
    assert cost["energy_j_per_prediction_seed002"] == pytest.approx(cost["flops"] * SEED002_J_PER_FLOP)
    assert SEED002_J_PER_FLOP == pytest.approx(4.918e-9, rel=1e-3)


@pytest.mark.tf
@pytest.mark.slow
def test_ctrnn_trains_converts_and_compiles(tmp_path):
    pytest.importorskip("tensorflow")
    from nilmc.backends.registry import Target
    from nilmc.compiler.driver import CompileOptions, compile_model
    from nilmc.compiler.frontend import load_model
    from nilmc.training.ctrnn import CtrnnConfig
    from nilmc.training.lowfreq_data import lowfreq_splits
    from nilmc.training.zoo import Trained, save_model, train_model

    sp = lowfreq_splits(APPS, window=32, sizes={"train": 600, "val": 150, "calib": 200, "eval": 300}, on_fraction=0.6)
    trained: Trained = train_model("ctrnn", sp["train"], sp["val"], appliances=APPS, epochs=3, base_filters=4, gru_units=8, dense_units=16)
    ops = {n.op_type for n in trained.graph.graph.node}
    assert {"GRU", "ConvTranspose", "AveragePool", "Sigmoid"} <= ops
    assert trained.contract.task == "multilabel" and trained.contract.appliances == APPS
    assert trained.info["macs_by_op"]["GRU"] > 0 and trained.info["macs_by_op"]["ConvTranspose"] > 0
    assert trained.info["config"]["base_filters"] == 4 and isinstance(CtrnnConfig(), CtrnnConfig)
    paths = save_model(trained, tmp_path / "ctrnn")
    model = load_model(paths["onnx"])
    # the Keras model too (the TFLite targets lower from it), with the same contract
    assert load_model(paths["keras"]).contract.to_json() == model.contract.to_json()
    # tf2onnx's Conv1D / Conv1DTranspose put the bias after a Squeeze / crop; the front end puts it back on the conv,
    # so no pre-bias tensor is rounded to INT8 on its own (quantization/conv_bias.py)
    from nilmc.quantization.graph import analyze

    g = analyze(model.graph)
    assert all(layer.bias is not None and layer.activation == "Relu" for layer in g.layers if layer.kind == "conv")
    assert all(len(n.input) == 3 for n in model.graph.graph.node if n.op_type == "ConvTranspose")
    s = compile_model(model, sp["eval"], [Target("onnxruntime", "fp32"), Target("onnxruntime", "int8")], tmp_path / "out",
                      calib=sp["calib"], options=CompileOptions(latency_windows=5))
    fp32, int8 = s.results
    assert fp32.passed and fp32.report.deltas["f1w"] == 0.0
    assert int8.error is None and "f1w" in int8.report.deltas  # gated in weighted F1 (pass or fail is the model's)
    manifest = json.loads((tmp_path / "out" / int8.bundle.name / "manifest.json").read_text())
    floats = {f["op"] for f in manifest["placement"]["float"]}
    assert {"GRU", "ConvTranspose"} <= floats  # the manifest says what stayed float

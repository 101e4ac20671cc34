"""The manifest's ``cost`` section (MACs/FLOPs and seed 002's energy per prediction), against a count by hand."""
from __future__ import annotations

import json

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from nilmc.compiler.cost import SEED002_J_PER_FLOP, graph_cost, manifest_cost
from tests.helpers import tiny_dataset, tiny_model


def test_cost_section_in_the_manifest_equals_a_count_by_hand(tmp_path):
    from nilmc.backends.registry import Target
    from nilmc.compiler.driver import CompileOptions, compile_model

    ds = tiny_dataset(200, frames=10, features=9)
    model = tiny_model(ds, hidden=16)  # Reshape -> MatMul (90 x 16) -> Relu -> MatMul (16 x 1)
    s = compile_model(model, ds, [Target("onnxruntime", "fp32")], tmp_path / "out", options=CompileOptions(latency_windows=2))
    manifest = json.loads((tmp_path / "out" / s.results[0].bundle.name / "manifest.json").read_text())
    cost = manifest["cost"]
    by_hand = 10 * 9 * 16 + 16 * 1  # one window: the two matrix products
    assert cost["counted"] is True
    assert cost["macs"] == by_hand and cost["macs_by_op"] == {"MatMul": by_hand}
    assert cost["flops"] == 2 * by_hand
    assert cost["energy_j_per_prediction_seed002"] == pytest.approx(2 * by_hand * SEED002_J_PER_FLOP, rel=1e-5)


def test_attention_shapes_are_counted():
    # Q.K^T of (1, 2, 6, 4) x (1, 2, 4, 6) -> (1, 2, 6, 6): 2*6*6*4 MACs; softmax not counted
    q = numpy_helper.from_array(np.ones((1, 2, 4, 6), np.float32), "k")
    g = helper.make_graph([helper.make_node("MatMul", ["q", "k"], ["s"]), helper.make_node("Softmax", ["s"], ["y"], axis=-1)], "att",
                          [helper.make_tensor_value_info("q", TensorProto.FLOAT, [1, 2, 6, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 6, 6])], [q])
    from nilmc.compiler.model import ONNX_IR_VERSION, ONNX_OPSET

    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", ONNX_OPSET)])
    m.ir_version = ONNX_IR_VERSION
    assert graph_cost(m)["macs_by_op"] == {"MatMul": 2 * 6 * 6 * 4}


def test_an_uncountable_graph_says_why_instead_of_failing():
    g = helper.make_graph([helper.make_node("NoSuchOp", ["x"], ["y"])], "bad", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    cost = manifest_cost(helper.make_model(g))
    assert cost["counted"] is False and cost["macs"] is None and cost["reason"]


def test_int8_macs_share_shows_how_much_of_an_int8_target_runs_in_int8(tmp_path):
    """The tiny MLP's first layer (90 x 16 of its 1456 MACs) reads the graph input and stays float (precise input):
    an 'int8' artifact that is 99 % float says so in its cost section and in a warning."""
    from nilmc.backends.registry import Target
    from nilmc.compiler.driver import CompileOptions, compile_model

    ds = tiny_dataset(200, frames=10, features=9)
    model = tiny_model(ds, hidden=16)
    s = compile_model(model, ds, [Target("onnxruntime", "fp32"), Target("onnxruntime", "int8")], tmp_path / "out", calib=ds,
                      options=CompileOptions(latency_windows=2))
    costs = [json.loads((tmp_path / "out" / r.bundle.name / "manifest.json").read_text())["cost"] for r in s.results]
    assert "int8_macs_share" not in costs[0]  # a float target: no INT8 share
    assert costs[1]["int8_macs"] == 16 and costs[1]["int8_macs_share"] == round(16 / (10 * 9 * 16 + 16), 4)
    assert any(w.startswith("onnxruntime:int8: only 1% of the MACs run in INT8") for w in s.warnings), s.warnings
    # and in its own row of the results table, not only in a warning under it
    assert [r.row()["int8_macs_share"] for r in s.results] == [None, costs[1]["int8_macs_share"]]
    from nilmc.compiler.report import summary_table

    table = summary_table(s).splitlines()
    head = next(i for i, line in enumerate(table) if line.startswith("target"))
    col = table[head].index("INT8 MACs")
    assert [table[head + k][col:col + 3].strip() for k in (2, 3)] == ["-", "1%"], table

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


def _linear_model(ds):
    """One dense layer on the flattened window: the only weighted layer reads the graph input, so precise input keeps
    it float and an INT8 target's artifact runs none of its MACs in INT8."""
    import onnx

    from nilmc.compiler.model import Model

    tiny = tiny_model(ds, hidden=1)
    m = onnx.ModelProto()
    m.CopyFrom(tiny.graph)
    xn = tiny.contract.normalize(ds.raw_x()).reshape(len(ds.x), -1).astype(np.float64)
    yn = tiny.contract.target.from_watts(ds.y[:, 0]).astype(np.float64)
    sol, *_ = np.linalg.lstsq(np.c_[xn, np.ones(len(xn))], yn, rcond=None)
    del m.graph.node[:]
    m.graph.node.extend([helper.make_node("Reshape", ["input", "flat_shape"], ["flat"]),
                         helper.make_node("MatMul", ["flat", "w"], ["mm"]), helper.make_node("Add", ["mm", "b"], ["output"])])
    del m.graph.initializer[:]
    m.graph.initializer.extend([numpy_helper.from_array(np.array([-1, xn.shape[1]], np.int64), "flat_shape"),
                                numpy_helper.from_array(sol[:-1, None].astype(np.float32), "w"),
                                numpy_helper.from_array(sol[-1:].astype(np.float32), "b")])
    onnx.checker.check_model(m)
    return Model(m, tiny.contract, source="linear")


def test_an_int8_artifact_that_runs_no_mac_in_int8_fails_the_gate(tmp_path):
    """An 'int8' artifact that is a float model behind an INT8 name passed the gate before (a warning only): the INT8
    floor (min_int8_macs_share, default 1 %) fails it, names the float target it really is, and is the user's to lower."""
    from nilmc.backends.registry import Target
    from nilmc.compiler.driver import CompileOptions, compile_model

    ds = tiny_dataset(200, frames=10, features=9)
    model = _linear_model(ds)
    targets = [Target("onnxruntime", "fp32"), Target("onnxruntime", "int8")]
    s = compile_model(model, ds, targets, tmp_path / "out", calib=ds, options=CompileOptions(latency_windows=2))
    fp32, int8 = s.results
    assert fp32.passed and fp32.int8_macs_share is None  # a float target is not held to the INT8 floor
    assert int8.int8_macs_share == 0.0 and not int8.passed and int8.exit_code == 1
    assert abs(int8.report.deltas["eacc"]) < 0.5  # the accuracy alone would have passed: it is a float model
    assert "INT8 MACs 0 % < min 1 %" in int8.report.failure_line()
    assert "onnxruntime:fp32" in int8.report.cause and "--min-int8-share" in int8.report.cause
    manifest = json.loads((tmp_path / "out" / int8.bundle.name / "manifest.json").read_text())
    assert manifest["verification"]["budget"]["min_int8_macs_share"] == 0.01
    # nilmc verify reads the share from the bundle's manifest: the same verdict without recompiling
    from nilmc.compiler.bundle import verify_bundle

    assert not verify_bundle(tmp_path / "out" / int8.bundle.name, ds).report.passed
    # the floor is the user's to lower
    s = compile_model(model, ds, targets, tmp_path / "off", calib=ds, options=CompileOptions(latency_windows=2, min_int8_share=None))
    assert all(r.passed for r in s.results)

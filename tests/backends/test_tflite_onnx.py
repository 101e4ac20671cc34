"""The ONNX route of tflite / eiq (onnx2tf): the graph pass, the pre-check, and a refusal through the CLI in milliseconds."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper
from outside_models import compile_ncw_from_flags, lf_windows, ncw_conv1d_seq2seq

from nilmc.backends.onnx_to_tf import data_path_ops, int8_precheck, tf_ready_graph


def _ncw() -> tuple[onnx.ModelProto, object]:
    ds = lf_windows(64, 32, seed=0)
    return ncw_conv1d_seq2seq(ds, channels=4, kernel=3), ds


def test_dynamic_reshape_becomes_constant_and_outputs_stay():
    m, _ = _ncw()
    folded = tf_ready_graph(m)
    ops = [n.op_type for n in folded.graph.node]
    assert "Shape" not in ops and "Concat" not in ops and ops.count("Reshape") == 1
    shape = next(t for t in folded.graph.initializer if t.name.endswith("nilmc_const_shape"))
    assert onnx.numpy_helper.to_array(shape).tolist() == [-1, 1, 32]
    x = np.random.default_rng(0).normal(size=(5, 1, 32)).astype(np.float32)
    run = lambda p: ort.InferenceSession(p.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]  # noqa: E731
    np.testing.assert_array_equal(run(m), run(folded))
    assert {n.name for n in m.graph.node} >= {n.name for n in folded.graph.node}  # names kept: nilmc's parameters still apply


def test_precheck_passes_the_ncw_export_and_names_an_unplaceable_op():
    m, _ = _ncw()
    assert int8_precheck(m, "tflite:int8") is None
    assert "Shape" not in {n.op_type for n in data_path_ops(m)}  # shape math is not on the data path
    m.graph.node[-1].op_type, m.graph.node[-1].input[:] = "Softplus", m.graph.node[-1].input[:1]
    why = int8_precheck(m, "eiq:int8")
    assert why is not None and "Softplus" in why and "onnxruntime:int8" in why and "\n" not in why


def test_unplaceable_onnx_model_is_refused_before_calibration(tmp_path):
    """Through the CLI alone: a Softplus head is refused for tflite:int8 / eiq:int8 in one line, before any work."""
    ds, ev = lf_windows(200, 32, seed=0), lf_windows(100, 32, seed=1)
    m = ncw_conv1d_seq2seq(ds, channels=4, kernel=3)
    clip = m.graph.node[-1]
    m.graph.node.remove(clip)
    m.graph.node.append(helper.make_node("Softplus", [clip.input[0]], ["output"], name="/Softplus"))
    r, by = compile_ncw_from_flags(tmp_path, m, ds, ev, "tflite:int8,eiq:int8_pt")
    assert r.exit_code == 2
    for t in ("tflite:int8", "eiq:int8_pt"):
        assert by[t]["status"] == "BAD INPUT" and "Softplus" in by[t]["error"] and "\n" not in by[t]["error"].strip(), by[t]
        assert by[t]["compile_s"] < 0.5, by[t]

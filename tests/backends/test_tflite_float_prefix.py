"""tflite:int8 / eiq:int8 under the calibration SQNR floor: when precise input (the layers reading the input in float)
leaves the output under the floor, the next layers follow it in float32 before the one QUANTIZE into the integer graph
(a float prefix: TFLite cannot keep an inner layer float as the QDQ targets do). The flatbuffer carries exactly that
placement, computes what nilmc's QDQ reference of it computes, and the manifest says which layers and why."""
from __future__ import annotations

import numpy as np
import pytest
from helpers import tp_context

from nilmc.compiler.metrics import sqnr_db


def _clipped_conv2_input(graph, params):
    """``params`` with conv2's input grid cut to 5 % of its calibrated range (clipping most of what conv1 writes)."""
    from nilmc.quantization.graph import analyze
    from nilmc.quantization.params import activation_from_range, replace_activation

    g = analyze(graph)
    act = params[g.root(params.layers[1].input)]
    lo, hi = (float(v) for v in act.representable())
    return replace_activation(params, activation_from_range(act.name, 0.05 * lo, 0.05 * hi, params.traits, method="test"), g)


@pytest.fixture(scope="module")
def tp(tmp_path_factory, small_tp):
    """The small T-P model with conv2's input grid clipped: precise input alone leaves the output far under the 30 dB
    floor, conv2 in float repairs it."""
    from nilmc.backends.eiq_backend import eiq_spec
    from nilmc.backends.tflite_backend import TFLiteOptions, tflite_spec
    from nilmc.quantization.mixed_precision import calibration_sqnr_db

    t = tp_context(tmp_path_factory, small_tp, "float_prefix")
    graph = t["model"].graph
    t["params"] = {b: _clipped_conv2_input(graph, t["ctx"].params(spec.traits))
                   for b, spec in (("tflite", tflite_spec("int8", TFLiteOptions.parse({}))), ("eiq", eiq_spec("int8")))}
    t["start_db"] = calibration_sqnr_db(graph, t["params"]["tflite"], t["ctx"].calib_x)
    assert t["start_db"] < 30.0 - 3.0
    return t


def _lower(tp, backend: str, name: str):
    from nilmc.backends.eiq_backend import EIQBackend
    from nilmc.backends.tflite_backend import TFLiteBackend

    out = tp["dir"] / name
    out.mkdir()
    b = TFLiteBackend() if backend == "tflite" else EIQBackend()
    return b.lower(tp["model"], out, precision="int8", options={"quant": tp["ctx"], "params": tp["params"][backend], "calibration": tp["calib"]})


@pytest.mark.slow
@pytest.mark.tf
def test_tflite_int8_runs_a_float_prefix_that_holds_the_floor(tp):
    from ai_edge_litert.interpreter import Interpreter

    from nilmc.backends.tflite_backend import TFLiteRunner
    from nilmc.quantization import _ort
    from nilmc.quantization.mixed_precision import calibration_sqnr_db
    from nilmc.quantization.params import QuantParams
    from nilmc.quantization.qdq import build_qdq_model

    art = _lower(tp, "tflite", "tflite")
    params = QuantParams.from_json(art.info["quantization"])
    record = params.provenance["float_prefix"]
    precise = params.provenance["precise_input"]["float_layers"]
    grown = record["layers"]
    assert grown and params.keep_float == (*precise, *grown), record
    assert record["steps"][0]["sqnr_db"] == pytest.approx(tp["start_db"], abs=0.05)
    floor = 30.0
    assert art.info["calibration_sqnr"]["met"] == record["met"]
    assert art.info["calibration_sqnr"]["output_sqnr_db"] == pytest.approx(max(s["sqnr_db"] for s in record["steps"]), abs=0.01)

    it = Interpreter(model_content=art.path.read_bytes(), num_threads=1)
    ops, tensors = it._get_ops_details(), {d["index"]: d for d in it.get_tensor_details()}
    weighted = [op for op in ops if op["op_name"] in ("CONV_2D", "FULLY_CONNECTED")]
    n_float = len(precise) + len(grown)
    for op in weighted[:n_float]:  # the prefix: float32 ops on float32 tensors
        assert {np.dtype(tensors[i]["dtype"]) for i in [*op["inputs"][:2], *op["outputs"]]} == {np.dtype(np.float32)}, op
    for op in weighted[n_float:]:  # the integer graph after it
        assert {np.dtype(tensors[i]["dtype"]) for i in [*op["inputs"][:2], *op["outputs"]]} == {np.dtype(np.int8)}, op
    quants = [i for i, op in enumerate(ops) if op["op_name"] == "QUANTIZE"]
    assert len(quants) == 1 and ops[quants[0]]["inputs"][0] == weighted[n_float - 1]["outputs"][0]  # one way into INT8

    # it computes what nilmc's QDQ reference of the same placement computes, and holds the floor on the calibration windows
    x = tp["ctx"].calib_x[:256]
    with TFLiteRunner(art.path) as r:
        y = r.infer({"input": x})["output"]
    qdq = _ort.output(build_qdq_model(tp["model"].graph, params), x)
    fp32 = _ort.output(tp["model"].graph, x)
    assert sqnr_db(qdq, y) > 40.0
    assert sqnr_db(fp32, y) >= min(floor, calibration_sqnr_db(tp["model"].graph, params, x)) - 1.0

    placement = art.info["placement"]
    floats = {f["name"]: f["why"] for f in placement["float"]}
    assert list(floats) == [*precise, *grown]
    assert all("calibration SQNR floor" in floats[n] for n in grown) and floats[precise[0]].startswith("precise input")
    assert "more to hold the calibration SQNR floor" in art.kind
    assert "keep_float_ignored" not in art.info


@pytest.mark.slow
@pytest.mark.tf
def test_eiq_int8_runs_the_float_prefix_on_the_cpu_before_the_npu(tp):
    from nilmc.quantization.params import QuantParams

    art = _lower(tp, "eiq", "eiq")
    params = QuantParams.from_json(art.info["quantization"])
    n_float = len(params.keep_float)
    assert n_float > 1 and params.provenance["float_prefix"]["met"]
    cpu = art.info["partition"]["cpu"]
    assert [c["op"] for c in cpu].count("CONV_2D") == n_float and cpu[-1]["op"] == "QUANTIZE", cpu
    assert art.info["partition"]["npu_partitions"] == 1
    assert art.info["npu_emulation"]["label"] == "emulated"
    assert "more to hold the calibration SQNR floor" in art.kind

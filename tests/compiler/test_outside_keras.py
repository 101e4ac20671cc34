"""Keras models nilmc was not designed for, lowered to full-integer TFLite / eIQ through the CLI alone (issue 11).

* Conv1D + BatchNormalization + BiLSTM over 495 samples: tflite:int8 and eiq:int8 from a batch-1 signature, nilmc's
  parameters in every int8 tensor, the LSTM cells kept float32 and said so; measured on the LiteRT interpreter.
* BiGRU with a TensorFlowOpLayer over 600 samples: the converter's full-integer quantizer crashes on the WHILE loop a
  GRU becomes; tflite:int8 / eiq:int8 would run it in a float32 tail stage, but the only layer before it reads the float
  input (precise input: float), so nothing would be INT8: refused in one line before calibration; tflite:fp32 takes it.
"""
from __future__ import annotations

import json
from types import SimpleNamespace

import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper
from outside_models import keras_bigru_tfop, keras_conv1d_bilstm, lf_windows

from nilmc.compiler.cli import cli


def _compile(tmp_path, builder, window, targets, *, n=300, n_eval=150, out="out", options=()):
    ds, ev = lf_windows(n, window, seed=0), lf_windows(n_eval, window, seed=1)
    if not (tmp_path / "m.keras").exists():
        builder(ds, str(tmp_path / "m.keras"))
    ds.save(tmp_path / "calib.npz")
    ev.save(tmp_path / "eval.npz")
    flags = ["--input-norm", "zscore", "--input-mean", float(ds.x.mean()), "--input-std", float(ds.x.std()),
             "--target-mean", float(ds.y.mean()), "--target-std", float(ds.y.std()), "--appliance", "fridge", "--on-threshold", 50]
    args = ["compile", tmp_path / "m.keras", "--calib", tmp_path / "calib.npz", "--eval", tmp_path / "eval.npz", "--out", tmp_path / out,
            "--targets", targets, *flags, "--json", *options]
    r = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    return r, {t["target"]: t for t in json.loads(r.stdout)["targets"]}


@pytest.mark.slow
@pytest.mark.tf
@pytest.mark.tflite
def test_conv1d_bilstm_lowers_to_tflite_and_eiq_int8(tmp_path):
    full_integer = ("--option", "tflite.cpu_layers=none", "--option", "eiq.cpu_layers=none")  # precise input off: the graphs below
    r, by = _compile(tmp_path, keras_conv1d_bilstm, 495, "tflite:int8,eiq:int8", options=full_integer)
    assert r.exit_code == 0, {t: v["error"] for t, v in by.items()}
    for t in ("tflite:int8", "eiq:int8"):
        assert by[t]["passed"] and by[t]["verification"] == "measured" and abs(by[t]["delta_eacc_pts"]) <= 0.5, by[t]
    for b in ("tflite-int8", "eiq-int8"):
        m = json.loads((tmp_path / "out" / b / "manifest.json").read_text())
        info = m["artifact_info"]
        assert info["param_check"]["ok"] and "batch-1" in info["route"], info.get("route")
        assert info["io"]["input"]["shape"] == [1, 495, 1] and info["io"]["input"]["dtype"] == "int8"
        # the flatbuffer carries nilmc's shared input grid
        assert info["io"]["input"]["scale"] == pytest.approx(m["quantization"]["tensors"]["input"]["scale"][0], rel=1e-6)
        # what stayed float is said twice: nilmc's placement (the ONNX LSTM) and the flatbuffer's own ops
        assert [f["op"] for f in m["placement"]["float"]] == ["LSTM"], m["placement"]
        tfl = info["tflite_placement"]
        assert {f["op"] for f in tfl["float"]} == {"UNIDIRECTIONAL_SEQUENCE_LSTM"} and {"CONV_2D", "FULLY_CONNECTED", "MUL", "ADD"} <= set(tfl["int8"])
    eiq = json.loads((tmp_path / "out" / "eiq-int8" / "manifest.json").read_text())["artifact_info"]
    cpu = {c["op"] for c in eiq["partition"]["cpu"]}
    assert "UNIDIRECTIONAL_SEQUENCE_LSTM" in cpu and {"CONV_2D", "FULLY_CONNECTED"} <= set(eiq["partition"]["npu"]), eiq["partition"]
    assert eiq["npu_emulation"]["label"] == "not verified"  # the emulator has no LSTM: not claimed
    # determinism: converted again from scratch (cache emptied), the same bytes
    from nilmc.backends import tflite_int8

    tflite_int8.clear_conversion_cache()
    _compile(tmp_path, keras_conv1d_bilstm, 495, "tflite:int8", out="again", options=full_integer[:2])
    assert (tmp_path / "out" / "tflite-int8" / "model_int8.tflite").read_bytes() == (tmp_path / "again" / "tflite-int8" / "model_int8.tflite").read_bytes()


@pytest.mark.slow
@pytest.mark.tf
@pytest.mark.tflite
def test_bigru_refused_for_int8_in_one_line_and_lowered_to_fp32(tmp_path):
    r, by = _compile(tmp_path, keras_bigru_tfop, 600, "tflite:int8,eiq:int8,tflite:fp32", n=200, n_eval=100)
    for t in ("tflite:int8", "eiq:int8"):  # found by the pre-check, before any calibration or conversion
        v = by[t]
        assert v["status"] == "BAD INPUT" and "nothing would run in INT8" in v["error"] and "onnxruntime:int8" in v["error"], v
        assert "\n" not in v["error"].strip() and v["compile_s"] < 0.5, v
    assert by["tflite:fp32"]["passed"] and by["tflite:fp32"]["verification"] == "measured", by["tflite:fp32"]
    assert abs(by["tflite:fp32"]["delta_eacc_pts"]) < 1e-3
    assert r.exit_code == 2


@pytest.mark.openvino
def test_openvino_precheck_names_what_it_cannot_convert(tmp_path):
    from nilmc.backends.openvino_backend import OpenVINOBackend

    def model(op: str, domain: str = "") -> SimpleNamespace:
        node = helper.make_node(op, ["x"], ["y"], domain=domain or None)
        g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
        imports = [helper.make_opsetid("", 17)] + ([helper.make_opsetid(domain, 1)] if domain else [])
        proto = helper.make_model(g, opset_imports=imports)
        proto.ir_version = 10

        def save_onnx(path):
            onnx.save(proto, path)
            return path

        return SimpleNamespace(source=f"{op}.onnx", save_onnx=save_onnx)

    backend = OpenVINOBackend()
    assert backend.precheck(model("Relu"), "int8") is None
    reason = backend.precheck(model("NilmcNoSuchOp", "com.example"), "int8")
    assert reason is not None and "\n" not in reason and reason.endswith("lower it with onnxruntime:int8"), reason

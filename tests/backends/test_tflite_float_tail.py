"""tflite:int8 and eiq:int8 on a Keras model whose last layers the full-integer route cannot take: a float32 tail stage.

Seed 002's CtRNN ends in a transposed convolution, a GRU (which the TFLite converter lowers to a WHILE loop its
full-integer quantizer crashes on) and a dense head; tflite:int8 refused it. The layers from the first refused op to
the output now run as a second, float32 TFLite file after the integer stage, entered through one tensor (the integer
stage's int8 output, dequantized). Measured on the example CtRNN (eval 1000 windows, measured: both stages run on
the TFLite interpreter): weighted-F1 loss +0.24 points, output SQNR 27.0 dB, on tflite:int8 and eiq:int8 alike (the
AveragePools on their input's grid, as TFLite's int8 AVERAGE_POOL_2D requires: on grids of their own the integer stage
gave 6.6 dB).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from nilmc.compiler.cli import cli

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from outside_models import lf_windows  # noqa: E402

T = 64


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def _keras_conv_gru(ds, path: Path, *, gru_first: bool = False, tconv: bool = True) -> None:
    """(N, T, 1) -> Conv1D x2 -> AveragePooling1D -> Conv1D -> Conv1DTranspose -> GRU -> Dense (the CtRNN's shape, small);
    ``gru_first``: the GRU reads the input (no integer stage is left before it); ``tconv=False``: the convs then the GRU."""
    from nilmc.compiler.tfcompat import import_tf

    tf = import_tf("building a test model")
    tf.keras.utils.set_random_seed(0)
    k = tf.keras.layers
    inp = tf.keras.Input((T, 1), name="aggregate")
    if gru_first:
        x = k.GRU(8)(inp)
    else:
        x = k.Conv1D(8, 5, padding="same", activation="relu")(inp)
        x = k.Conv1D(8, 5, padding="same", activation="relu")(x)
        x = k.AveragePooling1D(2)(x)
        x = k.Conv1D(16, 3, padding="same", activation="relu")(x)
        if tconv:
            x = k.Conv1DTranspose(8, 3, strides=2, padding="same", activation="relu")(x)
        x = k.GRU(8)(x)
    model = tf.keras.Model(inp, k.Dense(1)(x))
    mean, std = float(ds.x.mean()), float(ds.x.std())
    x = ((ds.x[:, :, 0, 0] - mean) / std)[:, :, None].astype(np.float32)
    model.compile("adam", "mse")
    model.fit(x, (ds.y[:, 0] - ds.y.mean()) / ds.y.std(), epochs=3, batch_size=64, verbose=0)
    model.save(path)


def _flags(ds) -> list[object]:
    return ["--input-norm", "zscore", "--input-mean", float(ds.x.mean()), "--input-std", float(ds.x.std()),
            "--target-mean", float(ds.y.mean()), "--target-std", float(ds.y.std()), "--appliance", "fridge", "--on-threshold", 50]


@pytest.mark.slow
@pytest.mark.tf
def test_a_gru_tail_runs_as_a_float_stage_after_the_integer_convs(tmp_path):
    pytest.importorskip("ai_edge_litert")
    ds, ev = lf_windows(400, T, seed=0), lf_windows(200, T, seed=1)
    _keras_conv_gru(ds, tmp_path / "m.keras")
    ds.save(tmp_path / "calib.npz")
    ev.save(tmp_path / "eval.npz")
    r = run("compile", tmp_path / "m.keras", "--calib", tmp_path / "calib.npz", "--eval", tmp_path / "eval.npz",
            "--out", tmp_path / "out", "--targets", "tflite:int8,eiq:int8", *_flags(ds), "--json")
    row, eiq = json.loads(r.stdout)["targets"]
    assert row["status"] == "PASS", row  # refused before: "tflite:int8 cannot take GRU"
    assert abs(row["delta_eacc_pts"]) <= 0.5 and row["output_sqnr_db"] > 20, row
    assert row["int8_macs_share"] > 0.2, row  # the convs run in INT8
    bundle = tmp_path / "out" / "tflite-int8"
    m = json.loads((bundle / "manifest.json").read_text())
    tail = m["artifact_info"]["float_tail"]
    assert tail["file"] == "model_int8_tail_fp32.tflite" and (bundle / tail["file"]).is_file()
    assert {f["name"] for f in m["files"]} >= {"model_int8.tflite", tail["file"]}
    assert [n.split("_")[0] for n in tail["keras_layers"]] == ["conv1d", "gru", "dense"]
    floats = {f["op"]: f["why"] for f in m["placement"]["float"]}
    assert floats["ConvTranspose"].startswith("float tail") and floats["GRU"].startswith("float tail")
    assert m["placement"]["int8"], m["placement"]  # the convs after the precise-input one
    assert "keep_float_ignored" not in m["artifact_info"]  # the tail is float, not "quantized like the rest"
    # the bundle verifies on its own: the runner chains the two interpreters from the manifest
    v = run("verify", bundle, "--eval", tmp_path / "eval.npz", "--json")
    assert v.exit_code == 0, v.stdout
    # eIQ: the integer stage on the NPU, the tail on the Cortex-A53; the NPU drift of one integer graph is not claimed
    assert eiq["status"] == "PASS" and eiq["delta_eacc_pts"] == row["delta_eacc_pts"], eiq
    e = json.loads((tmp_path / "out" / "eiq-int8" / "manifest.json").read_text())["artifact_info"]
    assert e["float_tail"]["file"] == "model_eiq_tail_fp32.tflite" and e["npu_emulation"]["label"] == "not verified"


@pytest.mark.slow
@pytest.mark.tf
def test_a_gru_after_the_convs_starts_the_tail_though_tf2onnx_names_its_node_without_a_scope(tmp_path):
    """tf2onnx fuses a Keras GRU into an ONNX node named ``GRU__<n>``: the tail's Keras layer is read off its producers."""
    pytest.importorskip("ai_edge_litert")
    ds, ev = lf_windows(400, T, seed=0), lf_windows(200, T, seed=1)
    _keras_conv_gru(ds, tmp_path / "m.keras", tconv=False)
    ds.save(tmp_path / "calib.npz")
    ev.save(tmp_path / "eval.npz")
    r = run("compile", tmp_path / "m.keras", "--calib", tmp_path / "calib.npz", "--eval", tmp_path / "eval.npz",
            "--out", tmp_path / "out", "--targets", "tflite:int8", *_flags(ds), "--json")
    (row,) = json.loads(r.stdout)["targets"]
    assert row["status"] == "PASS" and row["int8_macs_share"] > 0.2, row
    tail = json.loads((tmp_path / "out" / "tflite-int8" / "manifest.json").read_text())["artifact_info"]["float_tail"]
    assert [n.split("_")[0] for n in tail["keras_layers"]] == ["gru", "dense"]


@pytest.mark.slow
@pytest.mark.tf
def test_a_gru_reading_the_input_leaves_no_integer_stage_and_is_refused(tmp_path):
    pytest.importorskip("ai_edge_litert")
    ds = lf_windows(200, T, seed=0)
    _keras_conv_gru(ds, tmp_path / "g.keras", gru_first=True)
    ds.save(tmp_path / "d.npz")
    r = run("compile", tmp_path / "g.keras", "--calib", tmp_path / "d.npz", "--eval", tmp_path / "d.npz", "--out", tmp_path / "out",
            "--targets", "tflite:int8", *_flags(ds), "--json")
    (row,) = json.loads(r.stdout)["targets"]
    assert r.exit_code == 2 and "cannot take GRU" in row["error"] and "onnxruntime:int8" in row["error"], row

"""Defects found by taking unseen models through ``nilmc compile`` (TFLite / TFLite Micro), one regression test each:
a native TFLM crash must not kill the compile (and tflm refuses recurrent models up front), dynamic_int8 must not label
an all-float model INT8, a float conversion that is not the model must not pass as tflite:fp32, onnx2tf takes a rank-2
input, and no remedy names a precision that does not exist."""
from __future__ import annotations

import ctypes
import dataclasses
import operator
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from nilmc.compiler.errors import BadInputError
from nilmc.compiler.model import ONNX_IR_VERSION, ONNX_OPSET, Model

slow_tf = [pytest.mark.slow, pytest.mark.tf, pytest.mark.tflite]


def _graph(nodes: list, inits: list, shape: list, out_shape: list) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, out_shape)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", ONNX_OPSET)])
    m.ir_version = ONNX_IR_VERSION
    return m


def _lstm_graph() -> onnx.ModelProto:
    """(N, T, 1) -> LSTM(4) -> last state -> Gemm: tf2onnx's form of a Keras LSTM model, enough for a pre-check."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=s).astype(np.float32), n)
             for n, s in (("W", (1, 16, 1)), ("R", (1, 16, 4)), ("wd", (4, 1)), ("bd", (1,)))]
    nodes = [helper.make_node("Transpose", ["input"], ["tnc"], perm=[1, 0, 2]),
             helper.make_node("LSTM", ["tnc", "W", "R"], ["", "h"], hidden_size=4),
             helper.make_node("Squeeze", ["h"], ["h2"], axes=None),
             helper.make_node("Gemm", ["h2", "wd", "bd"], ["output"])]
    return _graph(nodes, inits, ["N", 16, 1], ["N", 1])


# --------------------------------------------------------------------------- 1. tflm: refusal up front, crashes isolated
def test_tflm_precheck_refuses_recurrent_layers_in_one_line():
    from nilmc.backends.tflm_backend import TFLMBackend

    why = TFLMBackend().precheck(SimpleNamespace(graph=_lstm_graph(), keras_path="m.keras", source="m.keras"), "cortex-m4")
    assert why is not None and "LSTM" in why and "tflite:int8" in why and "\n" not in why, why
    # a Dense chain is not refused
    w = numpy_helper.from_array(np.ones((16, 1), np.float32), "w")
    dense = _graph([helper.make_node("MatMul", ["input", "w"], ["output"])], [w], ["N", 16], ["N", 1])
    assert TFLMBackend().precheck(SimpleNamespace(graph=dense, keras_path="m.keras", source="m.keras"), "cortex-m4") is None


def test_a_native_crash_in_a_tflm_probe_is_a_result_not_a_dead_process():
    from nilmc.backends.tflm_backend import _IsolatedProbe

    # ctypes.string_at(8, n) reads address 8: SIGSEGV in the child; string_at(8, 0) reads nothing and answers b"" (False)
    with _IsolatedProbe(8, probe=ctypes.string_at) as probe:  # type: ignore[arg-type]
        assert probe.runs_in(0) is False
        assert probe.runs_in(64) is None
        assert probe.crashes == [(64, "killed by SIGSEGV")]
        assert probe.runs_in(0) is False  # a fresh child after the crash
    with _IsolatedProbe(100, probe=operator.le) as probe:  # type: ignore[arg-type]
        assert probe.runs_in(200) is True and probe.runs_in(50) is False and probe.crashes == []


@pytest.mark.slow
@pytest.mark.tf
def test_measure_arena_survives_the_tflm_lstm_kernel_crash(tmp_path):
    """The full-integer graph of a Keras LSTM crashes TFLM's LSTM kernel in a small arena (it dereferences the tensor it
    failed to allocate): in-process that killed ``nilmc compile`` (rc 139); the bisection now probes in a child."""
    pytest.importorskip("tflite_micro")
    from nilmc.backends.tflite_int8 import structural_tflite
    from nilmc.compiler.tfcompat import import_tf

    tf = import_tf("building a test model")
    tf.keras.utils.set_random_seed(0)
    inp = tf.keras.Input((32, 1))
    x = tf.keras.layers.Conv1D(4, 5, padding="same", activation="relu")(inp)
    out = tf.keras.layers.Dense(1)(tf.keras.layers.LSTM(8)(x))
    rep = np.random.default_rng(0).normal(size=(8, 32, 1)).astype(np.float32)
    path = tmp_path / "lstm.tflite"
    path.write_bytes(structural_tflite(tf.keras.Model(inp, out), rep))
    head = "import sys; from nilmc.backends.tflm_backend import _runs_in, measure_arena; fb = open(sys.argv[1], 'rb').read()\n"
    # the subject crashes TFLM in-process: the former bisection, every probe in this process, dies of SIGSEGV ...
    inline = head + ("lo, hi = 0, 8 << 20\nwhile hi - lo > 16:\n    mid = (lo + hi) // 2\n"
                     "    lo, hi = (lo, mid) if _runs_in(fb, mid) else (mid, hi)\nprint(hi)")
    crashed = subprocess.run([sys.executable, "-c", inline, str(path)], capture_output=True)
    assert crashed.returncode == -11, (crashed.returncode, crashed.stdout)
    # ... and measure_arena measures it: a crashed probe reads as "does not run in that arena"
    done = subprocess.run([sys.executable, "-c", head + "print(measure_arena(fb))", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert 1024 < int(done.stdout.strip().splitlines()[-1]) < 1 << 20


# --------------------------------------------------------------------------- 2./3. dynamic_int8 and the float check
def _tiny_keras_pair(tmp_path, ds, *, hidden: int, scale_head: float = 1.0) -> Model:
    """The tiny ONNX MLP and a tf_keras model with its weights (the head scaled by ``scale_head``) as its Keras source."""
    from helpers import tiny_model

    from nilmc.compiler.tfcompat import import_tf_keras

    k = import_tf_keras("building a test model")
    m = tiny_model(ds, hidden=hidden)
    w = {t.name: numpy_helper.to_array(t) for t in m.graph.graph.initializer}
    inp = k.Input(ds.input_shape)
    h = k.layers.Dense(hidden, activation="relu")(k.layers.Flatten()(inp))
    head = k.layers.Dense(1)
    km = k.Model(inp, head(h))
    km.layers[2].set_weights([w["w1"], w["b1"]])
    head.set_weights([w["w2"] * scale_head, w["b2"]])
    path = tmp_path / f"m{hidden}_{scale_head}.h5"
    km.save(path)
    return Model(m.graph, m.contract, source=str(path), keras_path=str(path))


@pytest.mark.tf
@pytest.mark.tflite
@pytest.mark.parametrize("hidden", [8, 16])
def test_dynamic_int8_never_labels_float_weights_int8(tmp_path, tiny_ds, hidden):
    pytest.importorskip("tensorflow")
    pytest.importorskip("ai_edge_litert")
    from nilmc.backends.tflite_backend import TFLiteBackend

    model = _tiny_keras_pair(tmp_path, tiny_ds, hidden=hidden)
    if hidden == 8:  # 90x8 and 8x1 weights: both under the converter's 1024 elements, nothing is quantized
        with pytest.raises(BadInputError) as e:
            TFLiteBackend().lower(model, tmp_path / "o", precision="dynamic_int8", options={"calibration": tiny_ds})
        assert "1,024" in e.value.message and "tflite:fp32" in e.value.remedy
        assert not (tmp_path / "o" / "model_dynamic_int8.tflite").exists()
        return
    art = TFLiteBackend().lower(model, tmp_path / "o", precision="dynamic_int8", options={"calibration": tiny_ds})
    w = art.info["weights"]
    assert [t["shape"] for t in w["int8"]] == [[16, 90]] and [t["shape"] for t in w["float32"]] == [[1, 16]]
    assert "int8 weights in 1 of 2 weight tensors" in art.kind


@pytest.mark.tf
@pytest.mark.tflite
def test_fp32_conversion_that_is_not_the_model_is_refused(tmp_path, tiny_ds):
    pytest.importorskip("tensorflow")
    pytest.importorskip("ai_edge_litert")
    from nilmc.backends.tflite_backend import TFLiteBackend

    good = TFLiteBackend().lower(_tiny_keras_pair(tmp_path, tiny_ds, hidden=16), tmp_path / "g", precision="fp32",
                                 options={"calibration": tiny_ds})
    check = good.info["float_check"]
    assert check["output_sqnr_db"] > 100 and check["on"] == "calibration windows"
    # the Keras source computes something else than the FP32 reference (head 5 % off: ~26 dB)
    bad = _tiny_keras_pair(tmp_path, tiny_ds, hidden=16, scale_head=1.05)
    for precision in ("fp32", "fp16"):
        with pytest.raises(BadInputError) as e:
            TFLiteBackend().lower(bad, tmp_path / precision, precision=precision, options={})
        assert "dB output SQNR" in e.value.message and "onnxruntime:fp32" in e.value.remedy, e.value.message
        assert "random normal windows" in e.value.message  # no calibration windows given


# --------------------------------------------------------------------------- 4. onnx2tf and a rank-2 input
def _rank2_gemm() -> Model:
    from helpers import tiny_dataset, tiny_model

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=s).astype(np.float32), n) for n, s in (("w1", (24, 8)), ("b1", (8,)),
                                                                                             ("w2", (8, 1)), ("b2", (1,)))]
    nodes = [helper.make_node("Gemm", ["input", "w1", "b1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["output"])]
    contract = dataclasses.replace(tiny_model(tiny_dataset(20, frames=24, features=1)).contract, layout="NW")  # (N, 24)
    return Model(_graph(nodes, inits, ["N", 24], ["N", 1]), contract, source="rank2.onnx")


@pytest.mark.tf
def test_onnx2tf_gets_no_layout_flag_for_a_rank2_input_and_its_errors_lose_ansi_codes(monkeypatch):
    from nilmc.backends import onnx_to_tf

    seen: list = []

    def convert(**kw):
        seen.append(kw)
        raise AssertionError("\x1b[31mERROR:\x1b[0m something onnx2tf did not like")

    monkeypatch.setattr(onnx_to_tf, "require_onnx2tf", lambda *a: SimpleNamespace(convert=convert))
    model = _rank2_gemm()
    with pytest.raises(BadInputError) as e:
        onnx_to_tf._run_onnx2tf(model.graph, model)
    assert "keep_ncw_or_nchw_or_ncdhw_input_names" not in seen[0]
    assert "\x1b" not in e.value.message and "ERROR: something onnx2tf did not like" in e.value.message
    with pytest.raises(BadInputError):
        onnx_to_tf._run_onnx2tf(_lstm_graph(), model)  # rank 3: the channel-first layout is kept
    assert seen[1]["keep_ncw_or_nchw_or_ncdhw_input_names"] == ["input"]


@pytest.mark.slow
@pytest.mark.tf
@pytest.mark.tflite
def test_onnx2tf_converts_a_rank2_model_to_the_same_numbers(tmp_path):
    pytest.importorskip("onnx2tf")
    from nilmc.backends.tflite_backend import TFLiteBackend

    art = TFLiteBackend().lower(_rank2_gemm(), tmp_path, precision="fp32", options={})
    assert art.info["float_check"]["output_sqnr_db"] > 100  # measured against onnxruntime (and onnx2tf's own check)


def test_rank2_input_ahead_of_a_conv_is_refused_before_onnx2tf_runs():
    """o_nw_conv_affine's shape: (N, T) -> Unsqueeze -> Conv; onnx2tf fails on it after seconds: refused from the graph."""
    pytest.importorskip("onnx2tf")
    from nilmc.backends.tflite_backend import TFLiteBackend

    w = numpy_helper.from_array(np.ones((2, 1, 3), np.float32), "w")
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    conv = _graph([helper.make_node("Unsqueeze", ["input", "axes"], ["u"]), helper.make_node("Conv", ["u", "w"], ["output"])],
                  [w, axes], ["N", 24], ["N", 2, 22])
    model = SimpleNamespace(graph=conv, keras_path=None, source="conv.onnx")
    for precision in ("fp32", "int8"):
        why = TFLiteBackend().precheck(model, precision)
        assert why is not None and "rank-2" in why and "Conv" in why and "onnxruntime:fp32" in why and "\n" not in why, why
    assert TFLiteBackend().precheck(SimpleNamespace(graph=_rank2_gemm().graph, keras_path=None, source="g.onnx"), "fp32") is None


# --------------------------------------------------------------------------- 5. remedies name precisions that exist
def test_int8_precheck_remedies_name_existing_precisions():
    from nilmc.backends.eiq_backend import PRECISIONS
    from nilmc.backends.onnx_to_tf import int8_precheck, keras_int8_precheck

    assert "fp32" not in PRECISIONS
    lstm = _lstm_graph()
    why = int8_precheck(lstm, "eiq:int8")
    assert why is not None and "eiq:fp32" not in why and "tflite:fp32" in why, why
    lstm.graph.node[1].op_type = "GRU"
    why = keras_int8_precheck(lstm, "eiq:int8")
    assert why is not None and "eiq:fp32" not in why and "tflite:fp32" in why, why


@pytest.mark.tf
@pytest.mark.tflite
def test_each_window_starts_a_new_sequence_in_a_stateful_lstm_conversion():
    """The converter fuses a Keras LSTM(return_sequences=True) into UNIDIRECTIONAL_SEQUENCE_LSTM, whose state lives in
    variable tensors that persist across invokes: run window by window (a batch-1 signature), every window after the
    first started from the last one's state (17 dB vs the ONNX graph, tflite:fp32 refused as "not equivalent")."""
    pytest.importorskip("ai_edge_litert")
    from ai_edge_litert.interpreter import Interpreter

    from nilmc.backends.tflite_int8 import convert_keras, invoke_windows
    from nilmc.compiler.metrics import sqnr_db
    from nilmc.compiler.tfcompat import import_tf

    tf = import_tf("building a test model")
    tf.keras.utils.set_random_seed(0)
    inp = tf.keras.Input((32, 1))
    x = tf.keras.layers.Conv1D(4, 5, padding="same", activation="relu")(inp)
    x = tf.keras.layers.LSTM(8, return_sequences=True)(x)
    km = tf.keras.Model(inp, tf.keras.layers.Flatten()(tf.keras.layers.Dense(1)(x)))
    windows = np.random.default_rng(0).normal(size=(6, 32, 1)).astype(np.float32)
    ref = km.predict(windows, verbose=0)
    it = Interpreter(model_content=convert_keras(km, "fp32"), num_threads=1)
    it.allocate_tensors()
    assert int(it.get_input_details()[0]["shape_signature"][0]) == 1  # the per-window path
    got = invoke_windows(it, windows)
    assert sqnr_db(ref.ravel(), got.ravel()) > 100, np.abs(got - ref).max(axis=1)
    again = invoke_windows(it, windows[::-1])  # order does not matter: no window sees another
    np.testing.assert_array_equal(again[::-1], got)


def test_the_output_grid_of_a_sequence_model_is_in_watts_whatever_step_is_selected(tiny):
    """tflite:int8 / eiq:int8 of a Keras sequence model with --output index:32 failed ("index:32 is outside the model's
    output of 1 values"): the grid's two ends went through to_watts, which selects a step; they are values, element-wise."""
    from nilmc.backends.onnx_to_tf import cover_watts

    for sel in ("index:32", "last", "midpoint", ""):
        c = tiny.contract.with_(output_select=sel, peak_power_w=3000.0)
        got = cover_watts(-1.0, 2.0, c)
        want = c.target.to_watts(np.array([-1.0, 2.0]))
        assert got["representable_w"] == [float(want[0]), float(want[1])], (sel, got)
        assert got["covers_peak"] == (float(want[1]) >= 3000.0)


def test_dynamic_int8_of_small_weights_is_refused_before_any_work(tiny_ds):
    """The converter quantizes no weight under 1,024 elements: found from the graph in the pre-check (so --targets all
    skips it), not only after a conversion (the file check, test_dynamic_int8_never_labels_float_weights_int8)."""
    from helpers import tiny_model

    from nilmc.backends.tflite_backend import _dynamic_precheck

    why = _dynamic_precheck(tiny_model(tiny_ds, hidden=8).graph)  # 90x8 and 8x1
    assert why is not None and "1,024" in why and "largest has 720" in why and "tflite:fp32" in why, why
    assert _dynamic_precheck(tiny_model(tiny_ds, hidden=16).graph) is None  # 90x16 = 1,440 elements


@pytest.mark.slow
@pytest.mark.tf
@pytest.mark.tflite
def test_parallel_dense_heads_pair_with_their_own_weights(tmp_path):
    """A Keras model whose Flatten feeds two Dense heads, concatenated: the converter orders the two FULLY_CONNECTED ops
    otherwise than the ONNX graph, and pairing the k-th op with the k-th layer put head_b's weights on head_a
    ("TFLite weight 'model/head_a/MatMul' (1, 512) does not match ONNX layer 'model/head_b/MatMul'", refused)."""
    import json

    from click.testing import CliRunner
    from outside_models import lf_windows

    from nilmc.compiler.cli import cli
    from nilmc.compiler.tfcompat import import_tf

    tf = import_tf("building a test model")
    tf.keras.utils.set_random_seed(0)
    layers = tf.keras.layers
    ds, ev = lf_windows(300, 32, seed=0), lf_windows(150, 32, seed=1)
    inp = tf.keras.Input((32, 1))
    h = layers.Flatten()(layers.Conv1D(4, 5, padding="same", activation="relu")(inp))
    a, b = layers.Dense(1, name="head_a")(h), layers.Dense(1, name="head_b")(h)
    km = tf.keras.Model(inp, layers.Dense(1)(layers.Concatenate()([a, b])))
    mean, std = float(ds.x.mean()), float(ds.x.std())
    km.compile("adam", "mse")
    km.fit(((ds.x[:, :, 0] - mean) / std).astype(np.float32), (ds.y[:, 0] - ds.y.mean()) / ds.y.std(), epochs=3, verbose=0)
    km.save(tmp_path / "m.keras")
    ds.save(tmp_path / "calib.npz")
    ev.save(tmp_path / "eval.npz")
    r = CliRunner().invoke(cli, [str(v) for v in (
        "compile", tmp_path / "m.keras", "--calib", tmp_path / "calib.npz", "--eval", tmp_path / "eval.npz", "--out", tmp_path / "out",
        "--targets", "tflite:int8", "--input-norm", "zscore", "--input-mean", mean, "--input-std", std, "--target-mean",
        float(ds.y.mean()), "--target-std", float(ds.y.std()), "--appliance", "fridge", "--json")])
    row = json.loads(r.stdout)["targets"][0]
    assert row["passed"] and row["output_sqnr_db"] > 25, row

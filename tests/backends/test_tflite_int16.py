"""tflite:int16x8: TFLite's 16x8 mode (int16 activations, int8 weights, int64 bias) with every parameter nilmc's.

The fast tests check the target as data (traits, spec, options). The TensorFlow tests lower a tiny raw-scale Keras
model whose imbalance is the one of a T-P CNN trained without input normalization: one feature position 1000x the
others, which its per-tensor grids share. Its FP32 output ignores that position, so an 8-bit activation grid leaves
what the output reads on about one code, a 16-bit grid on a few hundred."""
from __future__ import annotations

import json

import numpy as np
import pytest

from nilmc.compiler.errors import BadInputError, InternalError

BIG = 1000.0  # feature 0's scale against the others' ~1


# --------------------------------------------------------------------------- fast: the target as data
def test_int16x8_traits_and_spec():
    from nilmc.backends.tflite_backend import TFLiteBackend, TFLiteOptions, tflite_spec
    from nilmc.backends.tflite_int8 import FullIntegerSpec
    from nilmc.quantization.traits import PRESETS, TFLITE_INT8, TFLITE_INT16X8, TFLITE_INT16X8_FLOAT_INPUT, QuantTraits

    t = TFLITE_INT16X8
    assert t.activation_range.name == "int16" and t.symmetric_activations and t.allow_int16_activations
    assert t.weight_range.name == "int8_narrow" and t.symmetric_weights and t.per_channel_weights and t.accumulator_bits == 64
    assert PRESETS["tflite_int16x8"] == t and QuantTraits.from_json(t.to_json()) == t
    assert TFLITE_INT16X8_FLOAT_INPUT.float_layers and not t.float_layers
    caps = TFLiteBackend.capabilities
    assert "int16x8" in caps.precisions and caps.traits["int16x8"] == TFLITE_INT16X8_FLOAT_INPUT
    assert caps.needs_keras("int16x8") and not caps.needs_keras("int8")
    auto, none = TFLiteOptions.parse({}), TFLiteOptions.parse({"cpu_layers": "none"})
    spec = tflite_spec("int16x8", auto)
    assert spec.activations == "int16" and spec.float_input and spec.io_dtype == "int16" and spec.traits.float_layers
    assert auto.quant_traits("int16x8", None) == spec.traits  # what the driver derives the shared parameters under
    full = tflite_spec("int16x8", none)
    assert not full.float_input and full.traits == TFLITE_INT16X8
    assert tflite_spec("int16x8", TFLiteOptions.parse({"io_dtype": "float"})).io_dtype == "float"
    with pytest.raises(BadInputError, match="int16 or float I/O") as err:
        tflite_spec("int16x8", TFLiteOptions.parse({"io_dtype": "uint8"}))
    assert "tflite.io_dtype" in (err.value.remedy or "")
    assert tflite_spec("int8", auto).activations == "int8"
    with pytest.raises(InternalError, match="16x8"):  # an int8 traits record cannot build a 16x8 graph, nor the reverse
        FullIntegerSpec(label="x", traits=TFLITE_INT8, activations="int16", io_dtype="int16")
    with pytest.raises(InternalError, match="16x8"):
        FullIntegerSpec(label="x", traits=TFLITE_INT16X8)


def test_int16x8_parameters_are_symmetric_int16(tiny, tiny_ds):
    """Derived from the shared statistics under the preset: every activation int16 with zero point 0, weights int8."""
    from nilmc.quantization.context import QuantContext
    from nilmc.quantization.traits import TFLITE_INT16X8

    params = QuantContext(tiny, tiny_ds).params(TFLITE_INT16X8, estimator="minmax")
    acts = params.by_role("activation")
    assert acts and all(a.range_name == "int16" and set(a.zero_point) == {0} for a in acts)
    assert all(w.range_name == "int8_narrow" and set(w.zero_point) == {0} for w in params.by_role("weight"))


def test_int16x8_refuses_an_onnx_source(tiny, tmp_path):
    from nilmc.backends.tflite_backend import TFLiteBackend

    with pytest.raises(BadInputError, match="Keras"):
        TFLiteBackend().lower(tiny, tmp_path, precision="int16x8", options={})


# --------------------------------------------------------------------------- TensorFlow: the flatbuffer
def _raw_dataset(n: int, seed: int):
    from nilmc.calibration_data.dataset import NilmDataset
    from nilmc.calibration_data.normalization import FeatureStats

    rng = np.random.default_rng(seed)
    x = np.abs(rng.normal(1.0, 0.5, size=(n, 10, 9, 1))).astype(np.float32)
    x[:, :, 0, 0] = np.abs(rng.normal(0.5, 0.3, size=(n, 10))) * BIG  # the raw-scale feature (a variance among percentiles)
    y = (x[:, 4:6, 3:6, 0].mean(axis=(1, 2)) * 500.0).astype(np.float32)[:, None]
    return NilmDataset(x=x, y=y, appliances=["kettle"], feature_names=[f"f{i}" for i in range(9)], train_stats=FeatureStats.fit(x),
                       target_mean=[float(y.mean())], target_std=[float(y.std())], on_thresholds=[1000.0], info={"setup": "raw"})


def _raw_keras(ds):
    """Conv2D(1x1) -> Conv2D(1x1) -> Flatten -> Dense -> Dense; the first dense layer ignores feature 0's positions."""
    from nilmc.compiler.tfcompat import import_tf_keras

    keras = import_tf_keras("building a test model")
    rng = np.random.default_rng(0)
    inp = keras.Input((10, 9, 1), name="input")
    c1 = keras.layers.Conv2D(4, (1, 1), activation="relu", name="conv1")
    c2 = keras.layers.Conv2D(4, (1, 1), activation="relu", name="conv2")
    d1 = keras.layers.Dense(8, activation="relu", name="dense1")
    d2 = keras.layers.Dense(1, name="out")
    out = d2(d1(keras.layers.Flatten()(c2(c1(inp)))))
    m = keras.Model(inp, out)
    c1.set_weights([np.abs(rng.normal(1, 0.3, (1, 1, 1, 4))).astype(np.float32), rng.normal(0, 0.1, 4).astype(np.float32)])
    c2.set_weights([np.abs(rng.normal(0.5, 0.2, (1, 1, 4, 4))).astype(np.float32), rng.normal(0, 0.1, 4).astype(np.float32)])
    w = rng.normal(0, 0.2, (10, 9, 4, 8)).astype(np.float32)
    w[:, 0] = 0.0  # the output never reads feature 0's positions; their range still sets the per-tensor grid
    d1.set_weights([w.reshape(360, 8), np.full(8, 1.0, np.float32)])
    d2.set_weights([rng.normal(0, 0.5, (8, 1)).astype(np.float32), np.array([0.3], np.float32)])
    return m


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    pytest.importorskip("ai_edge_litert")
    from nilmc.calibration_data.normalization import Normalization, NormalizationSpec, TargetScaling
    from nilmc.compiler.contract import ModelContract
    from nilmc.compiler.frontend import load_model, save_contract_sidecar
    from nilmc.quantization.context import QuantContext

    calib, ev = _raw_dataset(256, 1), _raw_dataset(128, 2)
    d = tmp_path_factory.mktemp("int16x8")
    km = _raw_keras(calib)
    km.save(d / "raw.keras")
    contract = ModelContract(input_shape=(10, 9, 1), normalization=NormalizationSpec(Normalization.A, None), appliance="kettle",
                             target=TargetScaling(), on_threshold_w=1000.0, peak_power_w=None, feature_names=tuple(calib.feature_names),
                             setup="raw")
    save_contract_sidecar(d / "raw.keras", contract)
    model = load_model(d / "raw.keras")
    return {"model": model, "calib": calib, "eval": ev, "ctx": QuantContext(model, calib), "dir": d, "arts": {}}


def _lower(raw, precision: str, **options):
    from nilmc.backends.tflite_backend import TFLiteBackend

    key = (precision, tuple(sorted(options.items())))
    if key not in raw["arts"]:
        out = raw["dir"] / f"{precision}-{len(raw['arts'])}"
        out.mkdir()
        raw["arts"][key] = TFLiteBackend().lower(raw["model"], out, precision=precision,
                                                 options={"quant": raw["ctx"], "calibration": raw["calib"], **options})
    return raw["arts"][key]


def _predict(raw, art, x):
    from nilmc.backends.tflite_backend import TFLiteBackend

    with TFLiteBackend().runner(art) as r:
        return r.infer({"input": x})["output"].reshape(len(x))


def _fp32(raw, x):
    import onnxruntime as ort

    sess = ort.InferenceSession(raw["model"].serialize(), providers=["CPUExecutionProvider"])
    return sess.run(None, {raw["model"].input_name: x})[0].reshape(len(x))


@pytest.mark.slow
@pytest.mark.tf
@pytest.mark.tflite
def test_16x8_graph_carries_nilmcs_int16_parameters(raw):
    """Read back with the LiteRT interpreter: conv1 float32 (precise input) then a QUANTIZE onto nilmc's int16 grid; every
    other weighted op int16 in / out with zero point 0 and nilmc's scale, int8 weights, int64 bias; the manifest's per-tensor
    record says the same."""
    from ai_edge_litert.interpreter import Interpreter

    from nilmc.quantization.params import QuantParams

    art = _lower(raw, "int16x8")
    params = QuantParams.from_json(art.info["quantization"])
    assert params.traits.activation_bits == 16 and art.info["param_check"]["ok"]
    it = Interpreter(model_content=art.path.read_bytes(), num_threads=1)
    ops, tensors = it._get_ops_details(), {d["index"]: d for d in it.get_tensor_details()}
    assert [o["op_name"] for o in ops[:2]] == ["CONV_2D", "QUANTIZE"] and tensors[ops[0]["inputs"][0]]["dtype"] == np.float32
    first_out = tensors[ops[1]["outputs"][0]]
    conv1 = next(la for la in params.layers if la.name in params.keep_float)
    assert first_out["dtype"] == np.int16
    np.testing.assert_allclose(first_out["quantization_parameters"]["scales"], params[conv1.output].scale, rtol=1e-6)
    weighted = [o for o in ops[2:] if o["op_name"] in ("CONV_2D", "FULLY_CONNECTED")]
    assert len(weighted) == 3
    for o in weighted:
        x, w, b, y = (tensors[i] for i in (*o["inputs"][:3], o["outputs"][0]))
        assert (x["dtype"], w["dtype"], b["dtype"], y["dtype"]) == (np.int16, np.int8, np.int64, np.int16), o
        assert not np.any(x["quantization_parameters"]["zero_points"]) and not np.any(y["quantization_parameters"]["zero_points"])
    out = it.get_output_details()[0]
    assert out["dtype"] == np.int16 and out["quantization"][1] == 0
    np.testing.assert_allclose(out["quantization"][0], params[raw["model"].graph.graph.output[0].name].scale[0], rtol=1e-6)
    counts = art.info["tensor_precision"]["counts"]
    assert counts["weight"] == {"float32": 1, "int8": 3} and counts["bias"] == {"float32": 1, "int64": 3}
    assert set(counts["activation"]) == {"float32", "int16"}
    placement = art.info["placement"]
    assert placement["activations"] == "int16" and "16x8" in placement["summary"] and "int16 grid" in placement["float"][0]["why"]
    assert "skipped" in art.info["tflm"] and art.kind.startswith("TFLite 16x8")
    json.dumps(art.info)


@pytest.mark.slow
@pytest.mark.tf
@pytest.mark.tflite
def test_16x8_holds_a_raw_scale_model_that_int8_loses(raw):
    """Measured on the evaluation windows: the 16x8 graph follows FP32 (and nilmc's own QDQ reference of the same
    parameters) where the int8 graph, whose grids give the positions the output reads about one code, does not."""
    from nilmc.compiler.metrics import sqnr_db
    from nilmc.quantization import _ort
    from nilmc.quantization.params import QuantParams
    from nilmc.quantization.qdq import build_qdq_model

    x = raw["eval"].x
    ref = _fp32(raw, x)
    a16, a8 = _lower(raw, "int16x8"), _lower(raw, "int8")
    y16, y8 = _predict(raw, a16, x), _predict(raw, a8, x)
    db16, db8 = sqnr_db(ref, y16), sqnr_db(ref, y8)
    assert db16 >= 30.0 and db16 >= db8 + 15.0, (db16, db8)
    qdq = _ort.output(build_qdq_model(raw["model"].graph, QuantParams.from_json(a16.info["quantization"])), x).reshape(len(x))
    assert sqnr_db(qdq, y16) >= 50.0  # TFLite's integer kernels agree with the parameters' ideal reference
    # the calibration SQNR floor, checked on what each target deploys; int8's miss names the target that holds it
    f8, f16 = a8.info["calibration_sqnr"], a16.info["calibration_sqnr"]
    assert not f8["met"] and f8["output_sqnr_db"] < f8["floor_db"] <= f8["int16x8_output_sqnr_db"], f8
    assert "holds it" in f8["hint"] and "--targets tflite:int16x8" in f8["hint"]
    assert f16["met"] and f16["output_sqnr_db"] == f8["int16x8_output_sqnr_db"] and "hint" not in f16


@pytest.mark.slow
@pytest.mark.tf
@pytest.mark.tflite
def test_16x8_full_integer_and_float_io(raw):
    """cpu_layers=none: an integer-only 16x8 graph with an int16 input; io_dtype=float: float32 I/O around it."""
    from nilmc.backends.tflite_int8 import graph_ops

    full = _lower(raw, "int16x8", cpu_layers="none")
    assert all(set(o["dtypes"]) <= {"int16", "int8", "int64", "int32"} for o in graph_ops(full.path.read_bytes()))
    assert full.info["io"]["input"]["dtype"] == "int16" and full.info["io"]["input"]["zero_point"] == 0
    assert full.info["placement"]["float"] == [] and "full integer" in full.info["placement"]["summary"]
    flt = _lower(raw, "int16x8", io_dtype="float")
    assert flt.info["io"]["input"]["dtype"] == "float32" and flt.info["io"]["output"]["dtype"] == "float32"
    x = raw["eval"].x[:16]
    np.testing.assert_allclose(_predict(raw, flt, x), _predict(raw, _lower(raw, "int16x8"), x), rtol=0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.tf
@pytest.mark.tflite
def test_compile_warns_which_target_holds_a_raw_scale_model(raw, tmp_path):
    """The driver passes tflite:int8's miss of the calibration SQNR floor on as a warning naming tflite:int16x8 (and as
    the cause of a failed gate), instead of leaving it inside the manifest."""
    from nilmc.backends.registry import Target
    from nilmc.compiler.driver import CompileOptions, compile_model

    s = compile_model(raw["model"], raw["eval"], [Target("tflite", "int8")], tmp_path / "out", calib=raw["calib"],
                      options=CompileOptions(latency_windows=3))
    (r,) = s.results
    assert any(w.startswith("tflite:int8: ") and "--targets tflite:int16x8" in w for w in s.warnings), s.warnings
    if not r.passed:
        assert "tflite:int16x8" in r.report.cause

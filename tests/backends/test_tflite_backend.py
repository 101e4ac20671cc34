"""The tflite backend: every precision lowers and runs on the real TFLite runtime (ai_edge_litert),
the full-integer model carries nilmc's parameters, the output range covers peak power, the TFLite
Micro export round-trips. The model is a seq2point CNN trained for two epochs on a few hundred
T-P windows (module fixture)."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from helpers import tp_context

from nilmc.backends.base import Verification
from nilmc.compiler.errors import BadInputError, DataError

slow_tf = [pytest.mark.slow, pytest.mark.tf]


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tp(tmp_path_factory, small_tp):
    """A small trained T-P model (Keras + ONNX), its calibration / evaluation sets and the shared QuantContext."""
    return tp_context(tmp_path_factory, small_tp, "bundles")


@pytest.fixture(scope="module")
def backend():
    from nilmc.backends.tflite_backend import TFLiteBackend

    return TFLiteBackend()


_LOWERED: dict = {}


def lowered(tp, backend, precision: str, **options):
    """Lower once per (precision, options) and cache the artifact for the module."""
    key = (precision, tuple(sorted(options.items())))
    if key not in _LOWERED:
        out = tp["dir"] / f"{precision}-{len(_LOWERED)}"
        out.mkdir()
        opts = {"quant": tp["ctx"], "calibration": tp["calib"], **options}
        _LOWERED[key] = backend.lower(tp["model"], out, precision=precision, options=opts)
    return _LOWERED[key]


def run(backend, art, x):
    with backend.runner(art) as r:
        assert r.verification is Verification.MEASURED
        return np.asarray(r.infer({"input": x})["output"])[:, 0]


def reference(model, x):
    sess = ort.InferenceSession(model.graph.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0][:, 0]


def eval_x(tp, n=300):
    return tp["model"].contract.prepare(tp["eval"].raw_x())[:n]


def eacc(model, ds, pred_units):
    from nilmc.compiler.metrics import nilm_metrics

    y = ds.y[: len(pred_units), ds.appliance_index(model.contract.appliance)]
    return nilm_metrics(y, model.contract.to_watts(pred_units[:, None]), on_threshold_w=model.contract.on_threshold_w).eacc


# --------------------------------------------------------------------------- no Keras source (fast)
def test_model_without_keras_source_gives_the_clear_error(tiny, tmp_path):
    from nilmc.backends.tflite_backend import TFLiteBackend

    with pytest.raises(BadInputError, match="TFLite lowering needs the Keras model; pass the .keras/.h5 file"):
        TFLiteBackend().lower(tiny, tmp_path, precision="qat_int8")  # fp32/fp16/int8 now also lower ONNX (onnx2tf)


def test_options_are_checked():
    from nilmc.backends.tflite_backend import TFLiteOptions

    assert TFLiteOptions.parse(None).io_dtype == "int8"
    with pytest.raises(BadInputError, match="I/O dtype"):
        TFLiteOptions.parse({"io_dtype": "int16"})


# --------------------------------------------------------------------------- float precisions
@pytest.mark.slow
@pytest.mark.tf
@pytest.mark.parametrize("precision, tol", [("fp32", 1e-4), ("fp16", 2e-2), ("dynamic_int8", 1e-1)])
def test_float_precisions_lower_and_run(tp, backend, precision, tol):
    art = lowered(tp, backend, precision)
    assert art.path.is_file() and art.path.read_bytes()[4:8] == b"TFL3"
    x = eval_x(tp, 64)
    ref = reference(tp["model"], x)
    got = run(backend, art, x)
    assert got.shape == ref.shape
    assert np.max(np.abs(got - ref)) <= tol * max(1.0, float(np.max(np.abs(ref))))


# --------------------------------------------------------------------------- full integer
def _ops_and_tensors(fb):
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=fb, num_threads=1)
    return it._get_ops_details(), {d["index"]: d for d in it.get_tensor_details()}


def _onnx_layer(params, keras_name):
    hits = [l for l in params.layers if keras_name in l.name.split("/")]
    assert len(hits) == 1, keras_name
    return hits[0]


@pytest.mark.slow
@pytest.mark.tf
def test_int8_tensor_params_equal_nilmcs(tp, backend):
    """Read the .tflite back with the runtime and compare every Conv/Dense tensor with nilmc's parameters."""
    from nilmc.quantization.params import QuantParams

    art = lowered(tp, backend, "int8", cpu_layers="none")  # full integer (precise input: test_tflite_precise_input.py)
    params = QuantParams.from_json(art.info["quantization"])
    assert art.info["param_check"]["ok"] and art.info["param_check"]["tensors_checked"] >= 3 * len(params.layers)
    ops, tensors = _ops_and_tensors(art.path.read_bytes())
    weighted = [op for op in ops if op["op_name"] in ("CONV_2D", "FULLY_CONNECTED")]
    assert len(weighted) == len(params.layers)
    for op in weighted:
        w = tensors[op["inputs"][1]]
        keras_name = w["name"].split("/")[1]
        layer = _onnx_layer(params, keras_name)
        for idx, tensor in ((op["inputs"][0], layer.input), (op["outputs"][0], layer.output), (op["inputs"][1], layer.weight)):
            got = tensors[idx]["quantization_parameters"]
            want = params[tensor]
            np.testing.assert_allclose(got["scales"], np.asarray(want.scale, np.float32), rtol=1e-6)
            np.testing.assert_array_equal(got["zero_points"], np.asarray(want.zero_point))
        assert len(tensors[op["inputs"][1]]["quantization_parameters"]["scales"]) == tensors[op["inputs"][1]]["shape"][0]


@pytest.mark.slow
@pytest.mark.tf
def test_int8_matches_nilmcs_qdq_emulation_and_is_deterministic(tp, backend, tmp_path):
    """The TFLite integer kernels and nilmc's QDQ graph of the same parameters agree (<= 1 output step)."""
    from nilmc.quantization.params import QuantParams
    from nilmc.quantization.qdq import build_qdq_model, portable_weights

    art = lowered(tp, backend, "int8")
    params = QuantParams.from_json(art.info["quantization"])
    qdq = portable_weights(build_qdq_model(tp["model"].graph, params))[0]  # as nilmc runs it: no int16 saturation on AVX2
    x = eval_x(tp)
    want = ort.InferenceSession(qdq.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0][:, 0]
    got = run(backend, art, x)
    assert np.max(np.abs(got - want)) <= art.info["io"]["output"]["scale"] * 1.01
    again = backend.lower(tp["model"], tmp_path, precision="int8", options={"quant": tp["ctx"], "calibration": tp["calib"]})
    assert again.path.read_bytes() == art.path.read_bytes()


@pytest.mark.slow
@pytest.mark.tf
def test_int8_output_range_covers_peak_power(tp, backend):
    art = lowered(tp, backend, "int8")
    out = art.info["io"]["output"]
    assert out["dtype"] == "int8"
    top_units = (127 - out["zero_point"]) * out["scale"]
    peak = tp["model"].contract.peak_power_w
    assert float(tp["model"].contract.to_watts(np.array([[top_units]], np.float32))[0]) >= peak * (1 - 1e-6)
    assert art.info["output_covers_w"]["covers_peak"]


@pytest.mark.slow
@pytest.mark.tf
@pytest.mark.parametrize("io_dtype", ["float", "uint8"])
def test_int8_io_dtypes_give_the_same_numbers(tp, backend, io_dtype):
    base = run(backend, lowered(tp, backend, "int8"), eval_x(tp, 64))
    art = lowered(tp, backend, "int8", io_dtype=io_dtype)
    assert art.info["io"]["input"]["dtype"] == "float32"  # precise input: the first layer reads the float input itself
    assert art.info["io"]["output"]["dtype"] == ("float32" if io_dtype == "float" else io_dtype)
    full = lowered(tp, backend, "int8", io_dtype=io_dtype, cpu_layers="none")
    assert full.info["io"]["input"]["dtype"] == ("float32" if io_dtype == "float" else io_dtype)
    got = run(backend, art, eval_x(tp, 64))
    step = lowered(tp, backend, "int8").info["io"]["output"]["scale"]
    assert np.max(np.abs(got - base)) <= step * 1.01


@pytest.mark.slow
@pytest.mark.tf
def test_int8_per_tensor_weights(tp, backend):
    art = lowered(tp, backend, "int8", per_tensor=True)
    ops, tensors = _ops_and_tensors(art.path.read_bytes())
    weighted = [o for o in ops if o["op_name"] in ("CONV_2D", "FULLY_CONNECTED")]
    assert [tensors[o["inputs"][1]]["dtype"] for o in weighted].count(np.float32) == 1  # precise input's first layer
    for op in (o for o in weighted if tensors[o["inputs"][1]]["dtype"] == np.int8):
        assert len(tensors[op["inputs"][1]]["quantization_parameters"]["scales"]) == 1
    assert art.info["param_check"]["ok"]
    ref = reference(tp["model"], eval_x(tp))
    assert eacc(tp["model"], tp["eval"], run(backend, art, eval_x(tp))) > eacc(tp["model"], tp["eval"], ref) - 0.05


# --------------------------------------------------------------------------- TFLite Micro
@pytest.mark.slow
@pytest.mark.tf
def test_tflm_export_round_trips_and_estimates_are_sane(tp, backend):
    from nilmc.backends.tflite_micro import _graph, parse_c_array

    art = lowered(tp, backend, "int8", cpu_layers="none")  # the MCU export is written for integer graphs
    assert {"model_data.cc", "model_data.h", "tflm_report.json"} <= set(art.info["extra_files"])
    fb = art.path.read_bytes()
    assert parse_c_array((art.directory / "model_data.cc").read_text()) == fb
    assert "g_model_data_len" in (art.directory / "model_data.h").read_text()
    t = art.info["tflm"]
    _, facts, _ = _graph(fb)
    assert 0 < t["arena"]["planned_bytes"] <= sum(f.nbytes for f in facts if not f.constant) + 16 * len(facts)
    assert t["arena"]["planned_bytes"] >= t["arena"]["largest_tensor_bytes"]
    assert t["flash"]["total_bytes"] > len(fb) and t["compute"]["macs"] > 0
    assert set(t["fits"]) == {"flash", "sram", "cycles", "all"} and t["estimate"] is True


def test_arena_plan_reuses_memory_of_dead_tensors():
    from nilmc.backends.tflite_micro import TensorFacts, plan_arena

    chain = [TensorFacts(i, f"t{i}", 1000, False, i - 1, i) for i in range(5)]  # each lives across one op
    peak, offsets = plan_arena(chain)
    assert peak == 2 * 1008  # two 16-byte-aligned tensors alive at a time
    assert len(set(offsets.values())) == 2


def test_c_array_round_trip_on_arbitrary_bytes():
    from nilmc.backends.tflite_micro import c_array_sources, parse_c_array

    data = bytes(range(256)) * 3 + b"\x00\xff"
    cc, h = c_array_sources(data, name="g_x", ops=["CONV_2D"], arena_bytes=2048)
    assert parse_c_array(cc) == data and "g_x_len = 770" in cc and "kTensorArenaSize = 2048" in h
    with pytest.raises(BadInputError):
        c_array_sources(data, name="1bad")


# --------------------------------------------------------------------------- QAT
@pytest.mark.slow
@pytest.mark.tf
def test_qat_int8_lowers_runs_and_does_not_collapse(tp, backend):
    art = lowered(tp, backend, "qat_int8", qat_epochs=1, qat_holdout=0.0)  # no guard: the fine-tuned epoch is deployed
    q = art.info["qat"]
    assert q["train_set"] == "calibration" and q["targets"] == "teacher" and art.info["param_check"]["ok"]
    assert art.info["quantization"]["origin"] == "qat" and (art.directory / "qat_finetuned_float.h5").is_file()
    assert art.info["output_covers_w"]["covers_peak"]
    x = eval_x(tp)
    e_ref = eacc(tp["model"], tp["eval"], reference(tp["model"], x))
    assert eacc(tp["model"], tp["eval"], run(backend, art, x)) > e_ref - 0.05


@pytest.mark.slow
@pytest.mark.tf
def test_qat_guard_keeps_the_best_held_out_epoch(tp, backend):
    art = lowered(tp, backend, "qat_int8", qat_epochs=1)
    q = art.info["qat"]
    assert len(q["held_out_mse_per_epoch"]) == 2 and q["kept_epoch"] == int(np.argmin(q["held_out_mse_per_epoch"]))
    assert (art.directory / "qat_finetuned_float.h5").is_file() == (q["kept_epoch"] != 0)
    if q["kept_epoch"] == 0:  # the PTQ model is deployed, byte for byte (QAT is full integer: the int8 graph without precise input)
        assert art.path.read_bytes() == lowered(tp, backend, "int8", cpu_layers="none").path.read_bytes()


def test_qat_without_labelled_windows_is_a_clear_error(tiny, tmp_path):
    from nilmc.backends.tflite_backend import TFLiteOptions, _qat_data

    with pytest.raises(DataError, match="labelled windows"):
        _qat_data(tiny, None, {}, TFLiteOptions.parse({}))
    with pytest.raises(BadInputError, match="qat_targets"):
        TFLiteOptions.parse({"qat_targets": "nope"})

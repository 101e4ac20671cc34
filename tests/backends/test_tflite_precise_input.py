"""Precise input on tflite:int8 / eiq:int8: the layers reading the graph input run as float32 TFLite ops with a QUANTIZE
onto nilmc's grid after them (``cpu_layers=auto``, the default), the full-integer graph stays one option away
(``cpu_layers=none``; the MCU target always), bad values are typed errors; a channel-last ONNX export (tf2onnx's form of
a Keras model) is made channel-first for onnx2tf exactly, so the raw-input ONNX variant (z-score as float Mul/Add in
front) lowers too."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import tp_context
from onnx import TensorProto, helper, numpy_helper

from nilmc.compiler.errors import BadInputError, InternalError


# --------------------------------------------------------------------------- fast: options and specs as data
@pytest.mark.parametrize("backend", ["tflite", "eiq"])
def test_bad_cpu_layers_value_is_a_typed_error_naming_the_flag(backend):
    from nilmc.backends.base import parse_backend_options
    from nilmc.backends.registry import default_registry

    caps = default_registry().get(backend).capabilities
    assert parse_backend_options(backend, caps, {"cpu_layers": "none"}).cpu_layers == "none"
    with pytest.raises(BadInputError, match=f"{backend}.cpu_layers='gpu' is not one of auto, none") as err:
        parse_backend_options(backend, caps, {"cpu_layers": "gpu"})
    assert f"--option {backend}.cpu_layers=auto|none" in (err.value.remedy or "")


def test_lower_time_option_checks():
    from nilmc.backends.eiq_backend import eiq_spec
    from nilmc.backends.tflite_backend import TFLiteOptions

    assert TFLiteOptions.parse(None).cpu_layers == "auto"
    with pytest.raises(BadInputError, match="cpu_layers"):
        TFLiteOptions.parse({"cpu_layers": "all"})
    with pytest.raises(BadInputError, match="eiq.cpu_layers"):
        eiq_spec("int8", "all")


def test_which_targets_keep_the_input_float():
    from nilmc.backends.eiq_backend import EIQBackend, eiq_spec
    from nilmc.backends.tflite_backend import TFLiteBackend, TFLiteOptions, tflite_spec
    from nilmc.backends.tflite_int8 import FullIntegerSpec
    from nilmc.backends.tflm_backend import TFLMBackend
    from nilmc.quantization.traits import TFLITE_INT8

    auto, none = TFLiteOptions.parse({}), TFLiteOptions.parse({"cpu_layers": "none"})
    assert tflite_spec("int8", auto).float_input and tflite_spec("int8", auto).traits.float_layers
    assert TFLiteBackend.capabilities.traits["int8"].float_layers  # what the driver derives the shared parameters under
    for spec in (tflite_spec("int8", none), tflite_spec("qat_int8", auto)):  # full integer: QAT fake-quantizes the input
        assert not spec.float_input and spec.traits == TFLITE_INT8
    assert all(t == TFLITE_INT8 for t in TFLMBackend.capabilities.traits.values())  # the MCU runs integer kernels only
    for precision in ("int8", "int8_pt"):
        spec = eiq_spec(precision)
        assert spec.float_input and not spec.integer_only and spec.traits.float_layers
        assert EIQBackend.capabilities.traits[precision] == spec.traits.with_(io_dtype=spec.io_dtype)
        full = eiq_spec(precision, "none")
        assert not full.float_input and full.integer_only and not full.traits.float_layers
    assert not eiq_spec("uint8_io").float_input and eiq_spec("uint8_io").integer_only  # integer I/O by definition
    with pytest.raises(InternalError, match="float_layers"):
        FullIntegerSpec(label="x", traits=TFLITE_INT8, float_input=True)


# --------------------------------------------------------------------------- fast: the ONNX graph onnx2tf gets
def _channel_last_export(seed: int = 0) -> onnx.ModelProto:
    """What tf2onnx writes for a Keras Conv2D -> Flatten -> Dense on an (N, 10, 9, 1) input: a Reshape to channel-first
    in front, a Transpose back to channel-last before the flatten."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(np.array([-1, 1, 10, 9], np.int64), "to_nchw"),
             numpy_helper.from_array(rng.normal(size=(4, 1, 3, 3)).astype(np.float32), "conv.w"),
             numpy_helper.from_array(rng.normal(size=4).astype(np.float32), "conv.b"),
             numpy_helper.from_array(np.array([-1, 360], np.int64), "flat"),
             numpy_helper.from_array(rng.normal(size=(360, 1)).astype(np.float32), "dense.w")]
    nodes = [helper.make_node("Reshape", ["input", "to_nchw"], ["x_nchw"], name="to_nchw_reshape"),
             helper.make_node("Conv", ["x_nchw", "conv.w", "conv.b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Transpose", ["r"], ["r_nhwc"], name="to_nhwc", perm=[0, 2, 3, 1]),
             helper.make_node("Reshape", ["r_nhwc", "flat"], ["f"], name="flatten"),
             helper.make_node("MatMul", ["f", "dense.w"], ["output"], name="dense")]
    g = helper.make_graph(nodes, "channel_last", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 10, 9, 1])],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 1])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def _run(m: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def test_channel_last_export_is_made_channel_first_exactly():
    from nilmc.backends.onnx_to_tf import NHWC_INPUT, tf_ready_graph

    m = _channel_last_export()
    ready = tf_ready_graph(m)
    ops = [n.op_type for n in ready.graph.node]
    assert ops == ["Conv", "Relu", "Reshape", "MatMul"], ops  # the layout Reshape and the Transpose are gone
    assert [d.dim_value for d in ready.graph.input[0].type.tensor_type.shape.dim[1:]] == [1, 10, 9]
    assert {p.key: p.value for p in ready.metadata_props} == {NHWC_INPUT: "channel-last"}
    x = np.random.default_rng(1).normal(size=(5, 10, 9, 1)).astype(np.float32)
    np.testing.assert_allclose(_run(ready, x.transpose(0, 3, 1, 2)), _run(m, x), rtol=1e-5, atol=1e-5)
    assert {"conv", "relu", "flatten", "dense"} <= {n.name for n in ready.graph.node}  # nilmc's parameters still apply


def test_channel_first_exports_are_left_alone():
    from outside_models import lf_windows, ncw_conv1d_seq2seq

    from nilmc.backends.onnx_to_tf import NHWC_INPUT, tf_ready_graph

    m = ncw_conv1d_seq2seq(lf_windows(64, 32, seed=0), channels=4, kernel=3)  # PyTorch's (N, 1, T): no layout change in front
    ready = tf_ready_graph(m)
    assert not any(p.key == NHWC_INPUT for p in ready.metadata_props)
    assert [d.dim_value for d in ready.graph.input[0].type.tensor_type.shape.dim[1:]] == [1, 32]


# --------------------------------------------------------------------------- slow (TensorFlow): the flatbuffer
@pytest.fixture(scope="module")
def tp(tmp_path_factory, small_tp):
    return tp_context(tmp_path_factory, small_tp, "precise")


_LOWERED: dict = {}


def lowered(tp, backend: str, precision: str = "int8", model=None, ctx=None, **options):
    from nilmc.backends.eiq_backend import EIQBackend
    from nilmc.backends.tflite_backend import TFLiteBackend

    key = (backend, precision, id(model), tuple(sorted(options.items())))
    if key not in _LOWERED:
        out = tp["dir"] / f"{backend}-{precision}-{len(_LOWERED)}"
        out.mkdir()
        b = TFLiteBackend() if backend == "tflite" else EIQBackend()
        opts = {"quant": ctx or tp["ctx"], "calibration": tp["calib"], **options}
        _LOWERED[key] = b.lower(model or tp["model"], out, precision=precision, options=opts)
    return _LOWERED[key]


def _details(fb: bytes):
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=fb, num_threads=1)
    return it._get_ops_details(), {d["index"]: d for d in it.get_tensor_details()}, it


def _buffer(fb: bytes, index: int) -> np.ndarray:
    from nilmc.backends.tflite_int8 import load_flatbuffer

    m = load_flatbuffer(fb)
    t = m.subgraphs[0].tensors[index]
    return np.frombuffer(np.asarray(m.buffers[t.buffer].data, np.uint8).tobytes(), "<f4").reshape([int(d) for d in t.shape])


@pytest.mark.slow
@pytest.mark.tf
def test_first_layer_runs_in_float_with_nilmcs_grid_after_it(tp):
    """The default tflite:int8: float32 input, conv1 a float32 CONV_2D on the float Keras weights, then a QUANTIZE onto
    nilmc's grid of conv1's output; every other weighted op int8 with nilmc's parameters."""
    from nilmc.compiler.tfcompat import load_keras
    from nilmc.quantization.params import QuantParams

    art = lowered(tp, "tflite")
    params = QuantParams.from_json(art.info["quantization"])
    precise = params.provenance["precise_input"]["float_layers"]
    assert len(precise) == 1 and precise[0] in params.keep_float
    fb = art.path.read_bytes()
    ops, tensors, it = _details(fb)
    assert it.get_input_details()[0]["dtype"] == np.float32 and it.get_output_details()[0]["dtype"] == np.int8
    first, quant = ops[0], ops[1]
    assert first["op_name"] == "CONV_2D" and quant["op_name"] == "QUANTIZE" and quant["inputs"][0] == first["outputs"][0]
    assert all(tensors[i]["dtype"] == np.float32 for i in [*first["inputs"], *first["outputs"]])
    kernel, bias = load_keras(tp["model"]).get_layer("conv1").get_weights()
    np.testing.assert_array_equal(_buffer(fb, first["inputs"][1]), kernel.transpose(3, 0, 1, 2))  # the float weights, as trained
    np.testing.assert_array_equal(_buffer(fb, first["inputs"][2]), bias)
    layer = next(la for la in params.layers if la.name == precise[0])
    q = tensors[quant["outputs"][0]]["quantization_parameters"]
    assert tensors[quant["outputs"][0]]["dtype"] == np.int8
    np.testing.assert_allclose(q["scales"], np.asarray(params[layer.output].scale, np.float32), rtol=1e-6)
    np.testing.assert_array_equal(q["zero_points"], np.asarray(params[layer.output].zero_point))
    rest = [op for op in ops[2:] if op["op_name"] in ("CONV_2D", "FULLY_CONNECTED")]
    assert len(rest) == len(params.layers) - 1
    for op in rest:
        assert {np.dtype(tensors[i]["dtype"]) for i in [*op["inputs"][:2], *op["outputs"]]} == {np.dtype(np.int8)}, op
    assert art.info["param_check"]["ok"] and art.info["cpu_layers"] == "auto"
    placement = art.info["placement"]  # the manifest's, in the driver's (ONNX) vocabulary
    assert [(f["name"], f["op"]) for f in placement["float"]] == [(precise[0], "Conv")] and len(placement["int8"]) == len(params.layers) - 1
    assert placement["float"][0]["why"].startswith("precise input") and "QUANTIZE" in placement["float"][0]["why"]
    assert "skipped" in art.info["tflm"]  # the MCU export is for integer graphs


@pytest.mark.slow
@pytest.mark.tf
def test_cpu_layers_none_gives_the_full_integer_graph(tp):
    from nilmc.backends.tflite_int8 import graph_ops
    from nilmc.quantization.params import QuantParams

    art = lowered(tp, "tflite", cpu_layers="none")
    fb = art.path.read_bytes()
    assert all(set(o["dtypes"]) <= {"int8", "int32"} for o in graph_ops(fb))
    assert art.info["io"]["input"]["dtype"] == "int8" and art.info["cpu_layers"] == "none"
    params = QuantParams.from_json(art.info["quantization"])
    assert not params.keep_float and not params.traits.float_layers
    assert art.info["placement"]["float"] == [] and "full integer" in art.info["placement"]["summary"]
    assert len(art.info["placement"]["int8"]) == len(params.layers)
    assert {"model_data.cc", "tflm_report.json"} <= set(art.info["extra_files"])
    assert art.kind.startswith("TFLite full-integer INT8")


@pytest.mark.slow
@pytest.mark.tf
def test_eiq_runs_the_float_layer_on_the_cpu_and_emulates_the_npu_partition(tp):
    from nilmc.backends.eiq_backend import npu_start, stage_codes

    art = lowered(tp, "eiq")
    part = art.info["partition"]
    assert [(c["op"], c["index"]) for c in part["cpu"]] == [("CONV_2D", 0), ("QUANTIZE", 1)], part["cpu"]
    assert "precise input" in part["cpu"][0]["why"] and "Cortex-A53" in part["cpu"][0]["why"]
    assert "NPU partition's input" in part["cpu"][1]["why"] and part["npu_partitions"] == 1
    devices = art.info["placement"]["devices"]
    assert [d["device"] for d in devices[:3]] == ["CPU", "CPU", "NPU"] and {d["device"] for d in devices[2:]} == {"NPU"}
    check = json.loads((art.directory / "eiq_check.json").read_text())
    assert not check["integer_only"] and check["partition"] == part
    emu = art.info["npu_emulation"]
    assert emu["label"] == "emulated" and "CPU stage" in emu["npu_input"]
    assert emu["check_32bit_vs_cpu_builtin_kernels"]["max_lsb"] <= 1
    fb = art.path.read_bytes()
    start = npu_start(fb, part)
    assert start is not None and stage_codes(fb, tp["model"].contract.prepare(tp["eval"].raw_x()[:8]), start[0]).dtype == np.int8
    assert np.load(art.directory / "imx8mp_windows.npy").dtype == np.float32  # the board gets the float windows


@pytest.mark.slow
@pytest.mark.tf
def test_raw_input_onnx_variant_lowers_and_lands_on_the_zscore_model(tp, tmp_path):
    """The z-score as float Mul/Add in front and y*std+mean behind (nilmc's own fold, explicit ops), given as ONNX:
    tflite:int8 and eiq:int8 lower it (onnx2tf, the normalization taken out into the contract's float stage on load)
    and land within 1 dB output SQNR of the z-score model's Keras lowering."""
    from nilmc.backends.tflite_backend import TFLiteBackend
    from nilmc.calibration_data.normalization import Normalization, NormalizationSpec, TargetScaling
    from nilmc.compiler.frontend import load_model
    from nilmc.compiler.metrics import sqnr_db
    from nilmc.quantization.context import QuantContext
    from nilmc.quantization.fold import fold_normalization

    z = tp["model"]
    c = z.contract
    graph = fold_normalization(z, input_mode="ops", output_mode="ops").model.graph
    del graph.metadata_props[:]
    path = tmp_path / "raw.onnx"
    onnx.save(graph, path)
    raw_c = c.with_(normalization=NormalizationSpec(Normalization.A, c.normalization.stats)).with_(target=TargetScaling())
    (tmp_path / "raw.onnx.contract.json").write_text(json.dumps(raw_c.to_json()))
    raw = load_model(path)
    assert [n.op_type for n in raw.graph.graph.node][:2] != ["Mul", "Add"]  # the stage left the graph on load
    ctx = QuantContext(raw, tp["calib"])
    xr = tp["eval"].raw_x()[:300]
    ref_w = np.maximum(c.to_watts(_run(z.graph, c.prepare(xr))), 0)
    results = {}
    for backend in ("tflite", "eiq"):
        art = lowered(tp, backend, model=raw, ctx=ctx)
        assert art.info["placement"]["float"] and "onnx2tf" in art.info["tools"]
        with TFLiteBackend().runner(art) as r:
            results[backend] = sqnr_db(ref_w, np.maximum(raw.contract.to_watts(r.infer({"input": raw.contract.prepare(xr)})["output"]), 0))
    with TFLiteBackend().runner(lowered(tp, "tflite")) as r:
        zscore = sqnr_db(ref_w, np.maximum(c.to_watts(r.infer({"input": c.prepare(xr)})["output"]), 0))
    for backend, db in results.items():
        assert abs(db - zscore) <= 1.0, (backend, db, zscore)


@pytest.mark.slow
@pytest.mark.tf
def test_pytorch_ncw_export_keeps_its_input_layers_float_on_the_onnx2tf_route(tmp_path):
    """A PyTorch-style (N, 1, T) Conv1d export through onnx2tf: the layout ops onnx2tf puts before conv1 and conv1 itself
    run in float32 (eIQ: on the CPU, each with its reason), the three other convs in INT8; within 0.5 EACC points."""
    from outside_models import compile_ncw_from_flags, lf_windows, ncw_conv1d_seq2seq

    ds, ev = lf_windows(400, 64, seed=0), lf_windows(200, 64, seed=1)
    m = ncw_conv1d_seq2seq(ds, channels=4, kernel=5)
    r, by = compile_ncw_from_flags(tmp_path, m, ds, ev, "tflite:int8,eiq:int8", "--on-threshold", 50)
    assert r.exit_code == 0, by
    for t in ("tflite:int8", "eiq:int8"):
        assert by[t]["passed"] and abs(by[t]["delta_eacc_pts"]) <= 0.5, by[t]
    for b in ("tflite-int8", "eiq-int8"):
        man = json.loads((tmp_path / "out" / b / "manifest.json").read_text())
        info = man["artifact_info"]
        assert info["io"]["input"]["dtype"] == "float32" and info["io"]["input"]["shape"] == [-1, 1, 64]  # the export's own layout
        assert [f["op"] for f in man["placement"]["float"]] == ["Conv"] and len(man["placement"]["int8"]) == 3, man["placement"]
    cpu = json.loads((tmp_path / "out" / "eiq-int8" / "eiq_check.json").read_text())["partition"]["cpu"]
    ops = [c["op"] for c in cpu]
    assert ops[-2:] == ["CONV_2D", "QUANTIZE"] and len(ops) > 2, cpu  # onnx2tf's layout ops first, on the CPU with conv1
    assert all("before a precise-input layer" in c["why"] for c in cpu[:-2]), cpu

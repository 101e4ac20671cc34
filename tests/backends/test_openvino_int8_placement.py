"""openvino:int8 against nilmc's own placement, and manifests that do not depend on what the process compiled before.

Fuzz findings: (1) openvino:int8 refused outside models that onnxruntime:int8 passed, because the shared parameters keep
every weighted layer float (precise input, calibration SQNR floor) and the runtime check asked for at least one u8/i8
layer regardless; (2) the plugin's own transformations name a layer it rebuilds (a Convolution fused with the
BatchNormalization scale after it) from a process-wide counter (``Multiply_7515``, then ``Multiply_17330`` in the same
process), and that name went into the manifest's ``artifact_info``.
"""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

pytest.importorskip("openvino")

from outside_models import lf_windows  # noqa: E402

from nilmc.backends.openvino_backend import Int8NotExecutedError, _check_int8, runtime_layers  # noqa: E402
from nilmc.backends.registry import Target  # noqa: E402
from nilmc.calibration_data.normalization import Normalization, NormalizationSpec  # noqa: E402
from nilmc.compiler.contract import ModelContract  # noqa: E402
from nilmc.compiler.driver import compile_model  # noqa: E402
from nilmc.compiler.model import Model  # noqa: E402

pytestmark = pytest.mark.openvino


def _conv_bn_model(t: int = 128, c1: int = 8, c2: int = 16, k: int = 7) -> tuple[Model, object]:
    """(N, 1, T) -> Conv -> BatchNormalization -> Relu -> MaxPool -> Conv -> BatchNormalization -> Relu -> Flatten -> Gemm,
    BatchNormalization left unfolded (a Model built here does not go through the frontend's folding), as in the fuzz
    model o_ncw_bn_gemm: this seed makes the CPU plugin rename the second Convolution from its counter (OpenVINO 2025)."""
    ds = lf_windows(200, t, seed=0)
    rng = np.random.default_rng(0)
    inits: list[onnx.TensorProto] = []

    def f(a: object, name: str) -> str:
        inits.append(numpy_helper.from_array(np.asarray(a, np.float32), name))
        return name

    def bn(i: int, x: str, c: int) -> onnx.NodeProto:
        ins = [x, f(1 + 0.2 * rng.normal(size=c), f"g{i}"), f(0.1 * rng.normal(size=c), f"be{i}"),
               f(0.3 * rng.normal(size=c), f"mu{i}"), f(0.5 + rng.random(c), f"v{i}")]
        return helper.make_node("BatchNormalization", ins, [f"n{i}"], name=f"/bn{i}/BatchNormalization", epsilon=1e-5)

    cv = {"kernel_shape": [k], "pads": [k // 2, k // 2]}
    w1, b1 = f(rng.normal(0, 1 / np.sqrt(k), (c1, 1, k)), "w1"), f(np.zeros(c1), "b1")
    w2, b2 = f(rng.normal(0, 1 / np.sqrt(c1 * k), (c2, c1, k)), "w2"), f(np.full(c2, 0.05), "b2")
    nodes = [helper.make_node("Conv", ["input", w1, b1], ["c1"], name="/conv1/Conv", **cv), bn(1, "c1", c1),
             helper.make_node("Relu", ["n1"], ["r1"], name="/relu1/Relu"),
             helper.make_node("MaxPool", ["r1"], ["p1"], name="/pool1/MaxPool", kernel_shape=[2], strides=[2]),
             helper.make_node("Conv", ["p1", w2, b2], ["c2"], name="/conv2/Conv", **cv), bn(2, "c2", c2),
             helper.make_node("Relu", ["n2"], ["r2"], name="/relu2/Relu"),
             helper.make_node("Flatten", ["r2"], ["fl"], name="/Flatten", axis=1)]
    nf = c2 * (t // 2)
    wh, bh = f(rng.normal(0, 0.1, (1, nf)), "wh"), f([0.0], "bh")
    nodes.append(helper.make_node("Gemm", ["fl", wh, bh], ["output"], name="/head/Gemm", transB=1))
    g = helper.make_graph(nodes, "conv_bn", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, t])],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 1])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    contract = ModelContract(input_shape=(t, 1, 1), normalization=NormalizationSpec(Normalization.C, ds.train_stats),
                             appliance="fridge", on_threshold_w=50.0, layout="NCW")
    return Model(m, contract, source="conv_bn"), ds


def _artifact_info(out) -> dict:
    return json.loads((out / "openvino-int8" / "manifest.json").read_text())["artifact_info"]


@pytest.mark.slow
def test_two_compiles_in_one_process_write_the_same_openvino_manifest(tmp_path):
    model, ds = _conv_bn_model()
    infos = []
    for run in ("a", "b"):
        s = compile_model(model, ds, [Target("openvino", "int8")], tmp_path / run, calib=ds, budget={"eacc": 100})
        assert s.written, [r.error for r in s.results]
        infos.append(_artifact_info(tmp_path / run))
    first, second = infos
    assert first["runtime_layers"] == second["runtime_layers"]
    assert first["int8_layers"] == second["int8_layers"] and first["runtime_precisions"] == second["runtime_precisions"]
    assert first == second
    assert any(r["precision"] == "u8" for r in first["runtime_layers"])


class _FakeOp:
    def __init__(self, name: str, layer_type: str, precision: str) -> None:
        self._name = name
        self._info = {k: SimpleNamespace(astype=lambda _t, v=v: v) for k, v in
                      (("layerType", layer_type), ("runtimePrecision", precision), ("primitiveType", f"jit_{precision}"))}

    def get_friendly_name(self) -> str:
        return self._name

    def get_rt_info(self) -> dict:
        return self._info


def _compiled(*ops: _FakeOp) -> SimpleNamespace:
    return SimpleNamespace(get_runtime_model=lambda: SimpleNamespace(get_ordered_ops=lambda: list(ops)))


def test_counter_names_become_positions_and_ir_names_stay():
    ops = (_FakeOp("Convolution_nilmc2", "Convolution", "f32"), _FakeOp("Parameter_9", "Input", "f32"),
           _FakeOp("Multiply_7515", "Convolution", "u8"), _FakeOp("MatMul_1", "FullyConnected", "u8"))
    names = [r["name"] for r in runtime_layers(_compiled(*ops), keep={"Convolution_nilmc2", "MatMul_1"})]
    assert names == ["Convolution_nilmc2", "Convolution_rt1", "MatMul_1"]  # MatMul_1 is an ONNX node name: kept


def test_no_int8_layer_placed_by_nilmc_is_recorded_not_refused():
    rows = [{"name": "/head/Gemm/WithoutBiases", "type": "FullyConnected", "precision": "f32", "kernel": "jit_gemm_f32"}]
    record = _check_int8(rows, [])
    assert record["placed_by_nilmc"] == [] and record["run_by_plugin"] == [] and "keep every weighted layer float" in record["note"]


def test_placed_int8_layers_the_plugin_runs_in_float_are_refused_with_their_names():
    rows = [{"name": "/conv2/Conv/WithoutBiases", "type": "Convolution", "precision": "f32", "kernel": "brgconv_f32"}]
    with pytest.raises(Int8NotExecutedError, match=r"though nilmc put /conv2/Conv on int8 grids"):
        _check_int8(rows, ["/conv2/Conv"])
    ok = _check_int8([{**rows[0], "precision": "u8"}], ["/conv2/Conv"])
    assert ok == {"placed_by_nilmc": ["/conv2/Conv"], "run_by_plugin": ["/conv2/Conv/WithoutBiases"]}


def test_a_model_whose_parameters_keep_every_layer_float_lowers_like_onnxruntime(tiny_ds, tiny_eval, tmp_path):
    """One Gemm reading the graph input: precise input keeps it float, so nilmc places no layer in INT8 (as on the fuzz
    models o_ncw_gap / o_nw_lstm, where the SQNR floor kept the rest). It used to be refused; it now lowers, runs the
    QDQ graph's numbers and says that nothing was placed in INT8."""
    import onnxruntime as ort

    from nilmc.backends.openvino_backend import OpenVINOBackend
    from nilmc.quantization.context import QuantContext
    from nilmc.quantization.qdq import build_qdq_model, portable_weights

    shape = list(tiny_ds.input_shape)
    n_in = int(np.prod(shape))
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.array([-1, n_in], np.int64), "flat_shape"),
             numpy_helper.from_array(rng.normal(0, 1 / np.sqrt(n_in), (1, n_in)).astype(np.float32), "w"),
             numpy_helper.from_array(np.zeros(1, np.float32), "b")]
    nodes = [helper.make_node("Reshape", ["input", "flat_shape"], ["flat"], name="/Reshape"),
             helper.make_node("Gemm", ["flat", "w", "b"], ["output"], name="/head/Gemm", transB=1)]
    g = helper.make_graph(nodes, "one_gemm", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *shape])],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 1])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    contract = ModelContract(input_shape=tuple(shape), normalization=NormalizationSpec(Normalization.C, tiny_ds.train_stats),
                             appliance="kettle", on_threshold_w=1000.0)
    model = Model(m, contract, source="one_gemm")
    quant = QuantContext(model, tiny_ds)
    art = OpenVINOBackend().lower(model, tmp_path, precision="int8", options={"quant": quant})
    assert art.info["int8_layers"]["placed_by_nilmc"] == [] and art.info["runtime_precisions"] == {"FullyConnected": {"f32": 1}}
    x = contract.prepare(tiny_eval.raw_x())
    qdq = build_qdq_model(m, quant.params(OpenVINOBackend.capabilities.traits["int8"]))
    ref = ort.InferenceSession(portable_weights(qdq)[0].SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    with OpenVINOBackend().runner(art) as r:
        np.testing.assert_allclose(r.infer({"input": x})["output"], ref, rtol=0, atol=1e-4)

"""OpenVINO and TensorRT lowerings of a real seq2point T-P CNN, verified by the compile driver (slow).

Uses the shipped T-P model and sets when they exist, else trains a small T-P kettle model
(TensorFlow) once for this module.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

pytestmark = pytest.mark.slow
pytest.importorskip("openvino")

from nilmc.backends.onnxruntime_backend import OnnxRuntimeBackend  # noqa: E402
from nilmc.backends.openvino_backend import BIN, OpenVINOBackend  # noqa: E402
from nilmc.backends.registry import Registry, Target  # noqa: E402
from nilmc.backends.tensorrt_backend import TensorRTBackend, engine_build_possible, qdq_problems  # noqa: E402
from nilmc.calibration_data.dataset import NilmDataset  # noqa: E402
from nilmc.compiler.driver import compile_model  # noqa: E402
from nilmc.compiler.errors import NilmcError  # noqa: E402
from nilmc.compiler.frontend import load_model  # noqa: E402

TARGETS = ["onnxruntime:int8", "openvino:fp32", "openvino:fp16", "openvino:int8", "tensorrt:fp16", "tensorrt:int8"]


def _shipped() -> tuple | None:
    try:
        from nilmc.calibration_data.shipped import shipped_paths

        paths = {k: Path(v) for k, v in shipped_paths().items()}
        if all(paths.get(k) is not None and paths[k].is_file() for k in ("model", "calib", "eval")):
            return load_model(paths["model"]), NilmDataset.load(paths["calib"]), NilmDataset.load(paths["eval"])
    except (ImportError, KeyError, NilmcError):
        pass
    return None


def _train_small(out: Path) -> tuple:
    pytest.importorskip("tensorflow")
    from nilmc.calibration_data.windows import build_splits
    from nilmc.training import TrainConfig, save_trained, train_seq2point

    sp = build_splits("T-P", appliances=("kettle",), n_train=4000, n_val=800, n_calib=500, n_eval=1500)
    keras_model, contract = train_seq2point(sp["train"], sp["val"], appliance="kettle", config=TrainConfig(epochs=5))
    paths = save_trained(keras_model, contract, out / "tp_kettle")
    return load_model(paths["onnx"]), sp["calib"], sp["eval"]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    model, calib, ev = _shipped() or _train_small(tmp_path_factory.mktemp("tp_model"))
    reg = Registry()
    for backend in (OnnxRuntimeBackend(), OpenVINOBackend(), TensorRTBackend()):
        reg.register(backend)
    out = tmp_path_factory.mktemp("tp_bundles") / "out"
    summary = compile_model(model, ev, [reg.parse_target(t) for t in TARGETS], out, calib=calib, registry=reg, budget={"eacc": 100.0})
    rows = {row["target"]: row for row in summary.to_json()["targets"]}
    assert all(row["error"] is None for row in rows.values()), rows
    return {"rows": rows, "out": out, "model": model}


def _bundle(compiled, target: str) -> Path:
    t = Target(*target.split(":"))
    return compiled["out"] / f"{t.backend}-{t.precision}"


def test_fp32_and_fp16_are_lossless(compiled):
    rows = compiled["rows"]
    assert abs(rows["openvino:fp32"]["delta_eacc_pts"]) <= 0.01
    for target in ("openvino:fp16", "tensorrt:fp16"):
        assert abs(rows[target]["delta_eacc_pts"]) <= 0.05, rows[target]


def test_openvino_int8_runs_every_conv_and_dense_layer_in_int8(compiled):
    """Every conv and dense layer runs INT8 but conv1, which reads the float input (precise input) and says so."""
    import json

    manifest = json.loads((_bundle(compiled, "openvino:int8") / "manifest.json").read_text())
    counts = manifest["artifact_info"]["runtime_precisions"]
    assert set(counts) == {"Convolution", "FullyConnected"}
    assert sum(counts["Convolution"].values()) == 5 and counts["Convolution"].get("f32") == 1
    assert set(counts["Convolution"]) <= {"u8", "i8", "f32"} and set(counts["FullyConnected"]) <= {"u8", "i8"}
    floats = manifest["placement"]["float"]
    assert [f["op"] for f in floats] == ["Conv"] and floats[0]["why"].startswith("precise input"), floats


def test_openvino_int8_matches_the_ideal_int8_reference(compiled):
    rows = compiled["rows"]
    assert rows["openvino:int8"]["verification"] == "measured"
    assert abs(rows["openvino:int8"]["delta_eacc_pts"] - rows["onnxruntime:int8"]["delta_eacc_pts"]) <= 0.1


def test_int8_deltas_are_bounded(compiled):
    for target in ("openvino:int8", "tensorrt:int8"):
        assert compiled["rows"][target]["delta_eacc_pts"] <= 8.0, compiled["rows"][target]


def test_fp16_ir_bin_is_half_of_fp32(compiled):
    fp32 = (_bundle(compiled, "openvino:fp32") / BIN).stat().st_size
    fp16 = (_bundle(compiled, "openvino:fp16") / BIN).stat().st_size
    assert 0.48 <= fp16 / fp32 <= 0.52


def test_tensorrt_onnx_files(compiled):
    fp16 = onnx.load(_bundle(compiled, "tensorrt:fp16") / "model.onnx")
    assert all(t.data_type == TensorProto.FLOAT16 for t in fp16.graph.initializer if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16))
    int8 = onnx.load(_bundle(compiled, "tensorrt:int8") / "model.onnx")
    assert qdq_problems(int8) == []
    inits = {t.name: t for t in int8.graph.initializer}
    conv_weights = [n for n in int8.graph.node if n.op_type == "Conv"]
    assert len(conv_weights) == 5
    producers = {o: n for n in int8.graph.node for o in n.output}
    assert conv_weights[0].input[1] in inits  # conv1 reads the float input (precise input): float weights, no Q/DQ
    for conv in conv_weights[1:]:
        dq = producers[conv.input[1]]
        assert dq.op_type == "DequantizeLinear" and next(a.i for a in dq.attribute if a.name == "axis") == 0
        out_channels = inits[dq.input[0]].dims[0]
        assert numpy_helper.to_array(inits[dq.input[1]]).shape == (out_channels,)
    for node in int8.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            assert not np.any(numpy_helper.to_array(inits[node.input[2]]))


@pytest.mark.skipif(engine_build_possible()[0], reason="TensorRT and a GPU are present: the engine is built")
def test_tensorrt_is_emulated_without_engine(compiled):
    for target in ("tensorrt:fp16", "tensorrt:int8"):
        assert compiled["rows"][target]["verification"] == "emulated"
        bundle = _bundle(compiled, target)
        assert not list(bundle.glob("*.engine")) and not list(bundle.glob("*.plan"))

"""A global average pool head (PyTorch's ``AdaptiveAvgPool1d(1)`` / ``x.mean(-1)``) on the ONNX route of tflite / eiq int8.

onnx2tf writes ``GlobalAveragePool`` / ``ReduceMean`` over time as a TFLite ``MEAN``; TFLite's int8 MEAN requantizes to
its own output grid, which gets nilmc's parameters of the pool's output. The eIQ NPU path takes MEAN (the VX delegate
lists it), but its NPU drift is not emulated (label ``not verified``). A dilated Conv is refused in the pre-check.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from outside_models import compile_ncw_from_flags, lf_windows

from nilmc.backends.onnx_to_tf import int8_precheck

T, CH = 64, 8


def _init(name: str, value: object, dtype: type = np.float32) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype), name)


def gap_model(ds, *, pool: str = "GlobalAveragePool", dilation: int = 1, seed: int = 0) -> onnx.ModelProto:
    """z-scored ``(N, 1, T)`` -> Conv1d 8 k5 + ReLU -> Conv1d 8 k3 stride 2 + ReLU -> ``pool`` over time -> Gemm 1, the
    head ridge-fitted (moderate weights) to the z-scored appliance; the export's statistics in its metadata."""
    rng = np.random.default_rng(seed)
    x = ds.x[:, :, 0, 0].astype(np.float64)
    mean, std = float(x.mean()), float(x.std())
    y = ds.y[:, 0].astype(np.float64)
    ym, ys = float(y.mean()), float(y.std())
    inits = [_init("conv1.weight", rng.normal(0, 1 / np.sqrt(5), (CH, 1, 5))), _init("conv1.bias", np.full(CH, 0.1)),
             _init("conv2.weight", rng.normal(0, 1 / np.sqrt(3 * CH), (CH, CH, 3))), _init("conv2.bias", np.full(CH, 0.05))]
    nodes = [helper.make_node("Conv", ["input", "conv1.weight", "conv1.bias"], ["c1"], name="/conv1/Conv", kernel_shape=[5], pads=[2, 2],
                              strides=[1], dilations=[1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="/relu1/Relu"),
             helper.make_node("Conv", ["r1", "conv2.weight", "conv2.bias"], ["c2"], name="/conv2/Conv", kernel_shape=[3],
                              pads=[dilation, dilation], strides=[2 if dilation == 1 else 1], dilations=[dilation]),
             helper.make_node("Relu", ["c2"], ["r2"], name="/relu2/Relu")]
    if pool == "GlobalAveragePool":
        nodes += [helper.make_node("GlobalAveragePool", ["r2"], ["gp"], name="/pool/GlobalAveragePool"),
                  helper.make_node("Flatten", ["gp"], ["feat"], name="/Flatten", axis=1)]
    else:  # x.mean(-1): ReduceMean over time, keepdims 0 (opset 18: axes as an input)
        inits.append(_init("axes", [2], np.int64))
        nodes.append(helper.make_node("ReduceMean", ["r2", "axes"], ["feat"], name="/ReduceMean", keepdims=0))

    def graph(body: list[onnx.NodeProto], out: str, size: int, extra: list[onnx.TensorProto]) -> onnx.ModelProto:
        g = helper.make_graph(body, "gap", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch_size", 1, T])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["batch_size", size])], inits + extra)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], producer_name="pytorch")
        m.ir_version = 10
        return m

    import onnxruntime as ort

    xz = ((x - mean) / std).astype(np.float32)[:, None, :]
    sess = ort.InferenceSession(graph(nodes, "feat", CH, []).SerializeToString(), providers=["CPUExecutionProvider"])
    feat = sess.run(None, {"input": xz})[0].astype(np.float64)
    f = np.c_[feat, np.ones(len(feat))]
    sol = np.linalg.solve(f.T @ f + 10.0 * np.eye(CH + 1), f.T @ ((y - ym) / ys))  # ridge: the head's weights stay moderate
    nodes.append(helper.make_node("Gemm", ["feat", "head.weight", "head.bias"], ["output"], name="/head/Gemm", transB=1))
    m = graph(nodes, "output", 1, [_init("head.weight", sol[:-1][None, :]), _init("head.bias", sol[-1:])])
    onnx.checker.check_model(m)
    for key, value in (("input_mean", mean), ("input_std", std), ("target_mean", ym), ("target_std", ys)):
        m.metadata_props.add(key=f"training.{key}", value=repr(value))
    return m


@pytest.fixture(scope="module")
def windows():
    return lf_windows(300, T), lf_windows(200, T, seed=1)


def test_precheck_takes_a_global_average_pool_and_refuses_a_dilated_conv(windows) -> None:
    ds, _ = windows
    assert int8_precheck(gap_model(ds), "tflite:int8") is None
    assert int8_precheck(gap_model(ds, pool="ReduceMean"), "eiq:int8") is None
    why = int8_precheck(gap_model(ds, dilation=2), "tflite:int8")
    assert why is not None and "dilated Conv '/conv2/Conv'" in why and "onnxruntime:int8" in why and "\n" not in why


@pytest.mark.tf
@pytest.mark.tflite
@pytest.mark.slow
@pytest.mark.parametrize("pool", ["GlobalAveragePool", "ReduceMean"])
def test_a_mean_head_lowers_to_int8_tflite_and_eiq_with_nilmcs_grid(windows, tmp_path, pool) -> None:
    from nilmc.backends.tflite_int8 import graph_ops, load_flatbuffer, op_code, op_name

    ds, ev = windows
    r, by = compile_ncw_from_flags(tmp_path, gap_model(ds, pool=pool), ds, ev, "tflite:int8,eiq:int8")
    for t in ("tflite:int8", "eiq:int8"):
        row = by[t]
        assert row["status"] == "PASS" and row["verification"] == "measured", (t, row.get("error"))
        assert row["output_sqnr_db"] > 25, (t, row["output_sqnr_db"])  # measured on the interpreter against FP32
    d = tmp_path / "out" / "tflite-int8"
    fb = (d / "model_int8.tflite").read_bytes()
    assert "MEAN" in [o["op"] for o in graph_ops(fb)]
    m = load_flatbuffer(fb)
    sg = m.subgraphs[0]
    mean = next(op for op in sg.operators if op_name(op_code(m, op)) == "MEAN")
    out = sg.tensors[mean.outputs[0]]
    pooled = "gp" if pool == "GlobalAveragePool" else "feat"
    want = json.loads((d / "quantization.json").read_text())["tensors"][pooled]
    assert out.type == 9 and np.isclose(out.quantization.scale[0], want["scale"][0]) and out.quantization.zeroPoint[0] == want["zero_point"][0]
    # TFLite's int8 MEAN requantizes: its output grid is not its input's (the pool averages ReLU outputs: a narrower range)
    assert not np.isclose(sg.tensors[mean.inputs[0]].quantization.scale[0], out.quantization.scale[0])
    npu = json.loads((tmp_path / "out" / "eiq-int8" / "manifest.json").read_text())
    info = npu.get("artifact_info", npu)
    assert info["npu_emulation"]["label"] == "not verified" and "MEAN" in info["npu_emulation"]["why"]
    assert all(c["op"] != "MEAN" for c in info.get("partition", {}).get("cpu", []))  # MEAN runs on the NPU (VX delegate list)

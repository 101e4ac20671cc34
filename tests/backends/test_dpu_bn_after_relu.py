"""A BatchNormalization after the first conv's activation (Keras Conv1D(relu) -> BatchNormalization) on the DPU.

The BN is a per-channel ``x * c + c'`` (Mul, Add with constants), which has no DPU operator. Right after the
precise-input conv (FP32 on the CPU) it was the start of the CPU tail, so nothing was left for the DPU and the model
was refused ("0 of 15 ops run on the DPU"; fuzzed on a Keras Sequential .h5). Such an op keeps its input's layout, so
the ops after it are DPU ops again, and right after the CPU pre stage it joins that stage.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from nilmc.backends.dpu import DPUBackend, partition, quant
from nilmc.backends.dpu.ir import from_onnx
from nilmc.compiler.model import Model
from nilmc.quantization.context import QuantContext

T, C = 32, 8


def _model(ds) -> Model:
    """(N, 1, T) -> Conv1d 8 + ReLU -> * scale + shift (per channel) -> Conv1d 8 + ReLU -> Flatten -> Gemm 16 + ReLU -> Gemm 1."""
    from nilmc.training.seq2point import contract_for

    rng = np.random.default_rng(0)
    init = [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in {
        "w1": rng.normal(0, 0.5, (C, 1, 5)), "b1": np.full(C, 0.05), "bn.s": rng.uniform(0.5, 2.0, (C, 1)),
        "bn.t": rng.normal(0, 0.3, (C, 1)), "w2": rng.normal(0, 1 / np.sqrt(3 * C), (C, C, 3)), "b2": np.full(C, 0.05),
        "w3": rng.normal(0, 1 / np.sqrt(C * T), (16, C * T)), "b3": np.zeros(16), "w4": rng.normal(0, 0.25, (1, 16)), "b4": [0.1]}.items()]
    nodes = [helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="/conv1/Conv", kernel_shape=[5], pads=[2, 2]),
             helper.make_node("Relu", ["c1"], ["r1"], name="/relu1/Relu"),
             helper.make_node("Mul", ["r1", "bn.s"], ["m"], name="/bn/Mul"),
             helper.make_node("Add", ["m", "bn.t"], ["a"], name="/bn/Add"),
             helper.make_node("Conv", ["a", "w2", "b2"], ["c2"], name="/conv2/Conv", kernel_shape=[3], pads=[1, 1]),
             helper.make_node("Relu", ["c2"], ["r2"], name="/relu2/Relu"),
             helper.make_node("Flatten", ["r2"], ["f"], name="/Flatten"),
             helper.make_node("Gemm", ["f", "w3", "b3"], ["g3"], name="/fc1/Gemm", transB=1),
             helper.make_node("Relu", ["g3"], ["r3"], name="/relu3/Relu"),
             helper.make_node("Gemm", ["r3", "w4", "b4"], ["output"], name="/head/Gemm", transB=1)]
    g = helper.make_graph(nodes, "bn", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, T])],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 1])], init)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(m)
    return Model(m, contract_for(ds, "fridge", "C").with_(layout="NCW"), source="bn_after_relu")


def test_a_bn_after_the_input_conv_joins_the_cpu_pre_stage_and_the_rest_runs_on_the_dpu(tmp_path) -> None:
    from outside_models import lf_windows

    ds = lf_windows(200, T, seed=0)
    model = _model(ds)
    g = from_onnx(model.graph)
    assert g.op("/bn/Add").onnx_layout == g.op("/conv1/Conv").onnx_layout  # x * c + c' keeps the conv's layout
    part = partition.plan_partition(g, ["/conv1/Conv"])
    assert list(part.pre) == ["input", "/conv1/Conv", "/bn/Mul", "/bn/Add"] and not part.problems, part
    assert "with constants right after the CPU pre stage" in part.pre["/bn/Mul"]
    art = DPUBackend().lower(model, tmp_path, precision="b2304", options={"quant": QuantContext(model, ds)})
    devices = {d["op"]: d["device"] for d in art.info["placement"]["devices"]}
    # the DPU runs from the first op after the CPU stage (on these random weights the SQNR floor also moves conv2 there:
    # 29.6 -> 31.6 dB), here the channel-major flatten and fc1, fed the pre stage's conv2 output in NHWC order
    assert devices["/bn/Mul"] == devices["/bn/Add"] == "CPU" and devices["/Flatten"] == devices["/fc1/Gemm"] == "DPU", devices
    assert "/fc1/Gemm" in art.info["placement"]["int8"]
    x = model.contract.prepare(ds.raw_x()).astype(np.float32)
    with DPUBackend().runner(art) as r:
        y = r.infer({model.input_name: x})["output"].astype(np.float64)
    ref = quant.fp32_outputs(model.graph, x).astype(np.float64)
    assert 10 * np.log10(np.sum(ref ** 2) / np.sum((y - ref) ** 2)) > 25

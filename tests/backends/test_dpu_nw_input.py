"""An ``(N, T)`` graph input given a channel axis before a Conv1d stack (PyTorch's ``x.unsqueeze(1)``) on the DPU.

The ``(N, T)`` input is the NHWC tensor ``(1, T, 1)`` (an ``nw`` view), so the ``Unsqueeze`` only changes the view:
the first conv reads the float input and runs in FP32 on the CPU (precise input, with the ``Unsqueeze`` in
``cpu_pre.onnx``), the DPU runs the rest of the conv stack (and the PyTorch ``Flatten`` of an NCW tensor with the dense
after it, its weight rows reordered) up to the first op it cannot run (an LSTM), and the CPU tail runs from there.
With one conv before the LSTM nothing is left for the DPU:
refused in one line, and ``dpu.cpu_layers=none`` (the input layer on the DPU) lowers it.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from nilmc.backends.dpu import DPUBackend, DPUUnsupportedError, partition
from nilmc.backends.dpu.ir import from_onnx
from nilmc.backends.dpu.ops import OpKind
from nilmc.compiler.model import Model
from nilmc.quantization.context import QuantContext
from nilmc.quantization.statistics import run_with_intermediates

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from outside_models import lf_windows  # noqa: E402

T, CH, HIDDEN = 64, 8, 8


def _init(name: str, value: object, dtype: type = np.float32) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype), name)


def _conv(i: int, src: str, cin: int, k: int, stride: int, rng: np.random.Generator) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], str]:
    w = rng.normal(0, 1 / np.sqrt(cin * k), (CH, cin, k))
    nodes = [helper.make_node("Conv", [src, f"conv{i}.weight", f"conv{i}.bias"], [f"c{i}"], name=f"/conv{i}/Conv", kernel_shape=[k],
                              pads=[k // 2, k // 2], strides=[stride], dilations=[1]),
             helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"/relu{i}/Relu")]
    return nodes, [_init(f"conv{i}.weight", w), _init(f"conv{i}.bias", np.full(CH, 0.05))], f"r{i}"


def nw_conv_model(ds, *, convs: int = 3, tail: str = "gemm", affine: bool = False, seed: int = 0) -> onnx.ModelProto:
    """``(N, T)`` aggregate -> [``Sub``/``Div`` z-score] -> ``Unsqueeze(1)`` -> ``convs`` Conv1d + ReLU (the second with stride
    2) -> ``tail`` (``gemm``: Flatten, Gemm 16 ReLU; ``lstm``: Transpose to (T, N, C), LSTM, Squeeze of Y_h) -> Gemm 1
    least-squares fitted to the appliance -> [``Mul``/``Add`` to watts]; z-scored output without ``affine``."""
    rng = np.random.default_rng(seed)
    x = ds.x[:, :, 0, 0].astype(np.float32)
    mean, std = float(x.mean()), float(x.std())
    y = ds.y[:, 0].astype(np.float64)
    ym, ys = float(y.mean()), float(y.std())
    inits = [_init("ax1", [1], np.int64), _init("ax0", [0], np.int64)]
    nodes: list[onnx.NodeProto] = []
    src = "input"
    if affine:
        inits += [_init("in_mean", mean), _init("in_std", std)]
        nodes += [helper.make_node("Sub", ["input", "in_mean"], ["s"], name="/Sub"), helper.make_node("Div", ["s", "in_std"], ["z"], name="/Div")]
        src = "z"
    nodes.append(helper.make_node("Unsqueeze", [src, "ax1"], ["u"], name="/Unsqueeze"))
    src, cin, t = "u", 1, T
    for i in range(1, convs + 1):
        stride = 2 if i == 2 else 1
        n, w, src = _conv(i, src, cin, 5 if i == 1 else 3, stride, rng)
        nodes, inits, cin, t = nodes + n, inits + w, CH, t // stride
    if tail == "gemm":
        inits += [_init("fc1.weight", rng.normal(0, 1 / np.sqrt(CH * t), (16, CH * t))), _init("fc1.bias", np.zeros(16))]
        nodes += [helper.make_node("Flatten", [src], ["fl"], name="/Flatten", axis=1),
                  helper.make_node("Gemm", ["fl", "fc1.weight", "fc1.bias"], ["g1"], name="/fc1/Gemm", transB=1),
                  helper.make_node("Relu", ["g1"], ["feat"], name="/relu_fc/Relu")]
        width = 16
    else:
        inits += [_init("lstm.W", rng.normal(0, 0.3, (1, 4 * HIDDEN, CH))), _init("lstm.R", rng.normal(0, 0.3, (1, 4 * HIDDEN, HIDDEN))),
                  _init("lstm.B", np.zeros((1, 8 * HIDDEN)))]
        nodes += [helper.make_node("Transpose", [src], ["tnc"], name="/Transpose", perm=[2, 0, 1]),
                  helper.make_node("LSTM", ["tnc", "lstm.W", "lstm.R", "lstm.B"], ["", "yh"], name="/lstm/LSTM", hidden_size=HIDDEN),
                  helper.make_node("Squeeze", ["yh", "ax0"], ["feat"], name="/Squeeze")]
        width = HIDDEN

    def graph(body: list[onnx.NodeProto], out: str, size: int, extra: list[onnx.TensorProto]) -> onnx.ModelProto:
        g = helper.make_graph(body, "nw_conv", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch_size", T])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["batch_size", size])], inits + extra)
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)

    # the head fitted on the FP32 features (onnxruntime), so the model predicts the appliance
    xin = x if affine else (x - mean) / std
    feat = np.concatenate([b["feat"] for b in run_with_intermediates(graph(nodes, "feat", width, []), xin)]).astype(np.float64)
    sol, *_ = np.linalg.lstsq(np.c_[feat, np.ones(len(feat))], (y - ym) / ys, rcond=None)
    head = [_init("head.weight", sol[:-1][None, :]), _init("head.bias", sol[-1:])]
    nodes.append(helper.make_node("Gemm", ["feat", "head.weight", "head.bias"], ["h"], name="/head/Gemm", transB=1))
    out = "h"
    if affine:
        head += [_init("out_std", ys), _init("out_mean", ym)]
        nodes += [helper.make_node("Mul", ["h", "out_std"], ["hs"], name="/Mul"), helper.make_node("Add", ["hs", "out_mean"], ["output"], name="/Add")]
        out = "output"
    m = graph(nodes, out, 1, head)
    onnx.checker.check_model(m)
    return m


@pytest.fixture(scope="module")
def windows():
    return lf_windows(300, T), lf_windows(200, T, seed=1)


def _model(m: onnx.ModelProto, ds) -> Model:
    from nilmc.training.seq2point import contract_for

    return Model(m, contract_for(ds, "fridge", "C").with_(layout="NW"), source="nw_conv")


def test_an_nt_input_before_a_conv_is_an_nw_view_and_the_conv_stack_goes_to_the_dpu(windows) -> None:
    ds, _ = windows
    m = nw_conv_model(ds)
    g = from_onnx(m)
    assert g.ops[0].onnx_layout == "nw" and g.ops[0].shape == (1, T, 1)
    assert "/Unsqueeze" not in {op.name for op in g.ops}  # a view change, no op
    assert not g.unsupported  # PyTorch's flatten of NCW (channel-major): folded into fc1's weight rows
    assert g.op("/Flatten").attrs["onnx_order"][:2].tolist() == [0, T // 2]  # NHWC element (w0, c1) is ONNX (c1, w0)
    part = partition.plan_partition(g, ["/conv1/Conv"])
    assert list(part.pre) == ["input", "/conv1/Conv"] and not part.problems
    dpu = partition.dpu_graph(g, part)
    assert [op.name for op in dpu.ops if op.weighted] == ["/conv2/Conv", "/conv3/Conv", "/fc1/Gemm"] and not dpu.unsupported
    assert g.op("/conv2/Conv").attrs["stride"] == (1, 2) and g.op("/conv2/Conv").shape == (1, T // 2, CH)
    # the pre stage (Unsqueeze + conv1 in FP32) and the post stage reproduce the model's own tensors
    x = np.random.default_rng(0).normal(size=(5, T)).astype(np.float32)
    ref = {k: v for b in run_with_intermediates(m, x) for k, v in b.items()}
    pre, post = partition.stages(m, g, part)
    pre_nodes = {n.op_type for n in partition.cpu_pre_model(m, part).graph.node}
    assert {"Unsqueeze", "Conv", "Relu"} <= pre_nodes
    cut = pre.run({"input": x})["r1:nhwc"]
    np.testing.assert_allclose(cut.reshape(5, T, CH), ref["r1"].transpose(0, 2, 1), rtol=1e-6, atol=1e-6)
    (t_out,) = part.outputs  # fc1's output (flat, the usual order): the head runs in FP32 on the CPU (precise head)
    assert t_out == "feat" and list(part.post) == ["/head/Gemm"]
    back = post.run({t_out + partition.NHWC_SUFFIX: ref[t_out]})
    np.testing.assert_allclose(back["h"], ref["h"], rtol=1e-5, atol=1e-5)


def test_a_rank2_input_read_by_a_dense_layer_stays_flat(windows) -> None:
    ds, _ = windows
    g = from_onnx(nw_conv_model(ds))
    mlp = helper.make_graph([helper.make_node("Gemm", ["input", "w", "b"], ["output"], name="fc", transB=1)], "mlp",
                            [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", T])],
                            [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 1])],
                            [_init("w", np.ones((1, T))), _init("b", [0.0])])
    flat = from_onnx(helper.make_model(mlp, opset_imports=[helper.make_opsetid("", 18)], ir_version=10))
    assert flat.ops[0].onnx_layout == "flat" and flat.ops[1].kind == OpKind.DENSE
    assert g.ops[0].onnx_layout == "nw"


def test_an_lstm_after_the_conv_stack_is_the_cpu_tail(windows, tmp_path) -> None:
    ds, ev = windows
    model = _model(nw_conv_model(ds, tail="lstm"), ds)
    g = from_onnx(model.graph)
    part = partition.plan_partition(g, ["/conv1/Conv"])
    assert not part.problems and list(part.pre) == ["input", "/conv1/Conv"]
    assert [op.name for op in g.ops if part.device(op.name) == "DPU" and op.weighted] == ["/conv2/Conv", "/conv3/Conv"]
    assert "LSTM is not a DPUCZDX8G operator" in part.post["/lstm/LSTM"] and "/head/Gemm" in part.post
    assert DPUBackend().precheck(model, "b2304") is None
    art = DPUBackend().lower(model, tmp_path, precision="b2304", options={"quant": QuantContext(model, ds)})
    assert art.info["placement"]["int8"] == ["/conv2/Conv", "/conv3/Conv"]
    assert "LSTM" in {n.op_type for n in onnx.load(art.directory / "cpu_post.onnx").graph.node}
    assert json.loads((art.directory / "inspector.json").read_text())["dpu_subgraphs"] == 1
    x = model.contract.prepare(ev.raw_x()).astype(np.float32)
    ref = np.concatenate([b["h"] for b in run_with_intermediates(model.graph, x)]).astype(np.float64)
    with DPUBackend().runner(art) as r:
        got = r.infer({model.input_name: x})["h"].astype(np.float64)
    sqnr = 10 * np.log10(np.sum(ref ** 2) / np.sum((got - ref) ** 2))
    assert sqnr > 20, sqnr  # two INT8 convs between an FP32 conv and an FP32 LSTM + head


def test_one_conv_then_an_lstm_leaves_nothing_for_the_dpu(windows, tmp_path) -> None:
    ds, _ = windows
    model = _model(nw_conv_model(ds, convs=1, tail="lstm"), ds)
    auto = partition.plan_partition(from_onnx(model.graph), ["/conv1/Conv"])
    assert len(auto.problems) == 1 and auto.problems[0].startswith("nothing is left for the DPU: /conv1/Conv reads the float graph input")
    assert "LSTM" in auto.problems[0]
    # dpu.cpu_layers=none would lower it, so the graph-only pre-check leaves the decision to lower(), which knows the option
    assert DPUBackend().precheck(model, "b2304") is None
    with pytest.raises(DPUUnsupportedError, match="nothing is left for the DPU") as exc:
        DPUBackend().lower(model, tmp_path / "auto", precision="b2304", options={"quant": QuantContext(model, ds)})
    assert "dpu.cpu_layers=none" in exc.value.remedy and "\n" not in str(exc.value)
    art = DPUBackend().lower(model, tmp_path / "none", precision="b2304", options={"quant": QuantContext(model, ds), "cpu_layers": "none"})
    assert art.info["placement"]["int8"] == ["/conv1/Conv"]


def test_compile_nt_input_with_in_graph_normalization_passes_emulated(windows, tmp_path) -> None:
    """The fuzz case end to end through the CLI: in-graph z-score and output affine, (N, T) input, DPU verified (emulated)."""
    from click.testing import CliRunner

    from nilmc.compiler.cli import cli

    ds, ev = windows
    for name, tail in (("gemm", "gemm"), ("lstm", "lstm")):
        onnx.save(nw_conv_model(ds, tail=tail, affine=True), tmp_path / f"{name}.onnx")
    ds.save(tmp_path / "calib.npz")
    ev.save(tmp_path / "eval.npz")
    for name in ("gemm", "lstm"):
        r = CliRunner().invoke(cli, [str(a) for a in (
            "compile", tmp_path / f"{name}.onnx", "--calib", tmp_path / "calib.npz", "--eval", tmp_path / "eval.npz",
            "--out", tmp_path / f"out_{name}", "--targets", "dpu:b2304", "--input-norm", "none", "--appliance", "fridge",
            "--on-threshold", "50", "--json")], catch_exceptions=False)
        (row,) = json.loads(r.stdout)["targets"]
        assert row["status"] == "PASS" and row["verification"] == "emulated", (name, row.get("error"))
        assert row["output_sqnr_db"] > 20, (name, row["output_sqnr_db"])

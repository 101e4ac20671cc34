"""Precise output (``dpu.cpu_layers=auto``): a dense head without activation runs in FP32 on the CPU on the DPU's int8
features; ``input`` keeps it on the DPU; the DPU input's fix position may be one finer than the no-clipping one."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from nilmc.backends.dpu import DPUBackend, partition
from nilmc.backends.dpu import testing as dpu_testing
from nilmc.backends.dpu.ir import from_onnx
from nilmc.backends.dpu.xmodel import graph_attributes, read_xmodel
from nilmc.compiler.model import Model
from nilmc.quantization.context import QuantContext
from nilmc.quantization.statistics import run_with_intermediates


@pytest.fixture(scope="module")
def cnn(tiny):
    """A small seq2point CNN (two convs, one hidden dense, linear head) under the tiny model's contract."""
    m = dpu_testing.seq2point(convs=((3, 4), (3, 4)), dense=(8,), seed=1)
    return Model(m, tiny.contract, source="cnn")


@pytest.fixture(scope="module")
def lowered(tmp_path_factory, cnn, tiny_ds):
    ctx = QuantContext(cnn, tiny_ds)
    return {mode: DPUBackend().lower(cnn, tmp_path_factory.mktemp(f"head_{mode}"), precision="b2304",
                                     options={"quant": ctx, "cpu_layers": mode}) for mode in ("auto", "input")}


def test_plan_moves_the_linear_dense_head_only_in_auto() -> None:
    g = from_onnx(dpu_testing.seq2point(convs=((3, 4),), dense=(8,)))
    auto = partition.plan_partition(g, ["conv1"])
    assert list(auto.pre) == ["input", "conv1"] and list(auto.post) == ["dense2"] and not auto.problems
    assert auto.post["dense2"] == partition.PRECISE_HEAD and auto.outputs == ("dense1_relu",)
    assert not partition.plan_partition(g, ["conv1"], mode="input").post
    assert not partition.plan_partition(g, ["conv1"], mode="none").post


def test_head_stays_when_nothing_else_would_run_on_the_dpu(tiny) -> None:
    g = from_onnx(tiny.graph)  # MatMul_1 reads the input, MatMul_4 is the head: moving both leaves the DPU empty
    part = partition.plan_partition(g, ["MatMul_1"])
    assert not part.post and not part.problems


def test_auto_runs_the_head_in_fp32_on_the_dpu_features(lowered, cnn, tiny_eval) -> None:
    art = lowered["auto"]
    d = art.directory
    data = (d / "quantized.xmodel").read_bytes()
    graph, params = read_xmodel(data)
    assert graph.outputs == ["dense1_relu"] and "dense2" not in params.weights and "output" not in params.fix
    assert graph_attributes(data)["nilmc_cpu_stages"] == {"pre": "cpu_pre.onnx", "post": "cpu_post.onnx"}
    post = onnx.load(d / "cpu_post.onnx")
    assert [n.op_type for n in post.graph.node] == ["Reshape", "MatMul", "Add"]
    assert "dense2" in art.info["quantization"]["keep_float"]
    assert {f["name"] for f in art.info["placement"]["float"]} >= {"conv1", "dense2"}
    # independent reference: the DPU's dequantized features through the model's own float head (numpy)
    x = cnn.contract.prepare(tiny_eval.raw_x())
    from nilmc.backends.dpu.emulator import DpuEmulator

    relu1 = np.concatenate([b["relu1"] for b in run_with_intermediates(cnn.graph, x)]).transpose(0, 2, 3, 1)
    feats = DpuEmulator(graph, params).infer({"relu1": relu1})["dense1_relu"]
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in cnn.graph.graph.initializer}
    want = feats.astype(np.float64) @ inits["dense2/W"] + inits["dense2/b"]
    with DPUBackend().runner(art) as r:
        got = r.infer({"input": x})["output"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_input_mode_keeps_the_head_int8_on_the_dpu(lowered) -> None:
    art = lowered["input"]
    graph, params = read_xmodel((art.directory / "quantized.xmodel").read_bytes())
    assert graph.outputs == ["output"] and "dense2" in params.weights and not (art.directory / "cpu_post.onnx").exists()


def test_the_dpu_input_may_take_the_finer_clipping_fix_position() -> None:
    """Values just past the finer grid's end: quantization MSE takes the finer position (the no-clipping rule did not)."""
    from nilmc.backends.dpu import CPU_OUTPUT_FIX_WINDOW
    from nilmc.quantization.pot import best_fix, no_clip_fix, window

    v = np.random.default_rng(0).uniform(0, 1.9, 4000)
    v[:3] = 2.05  # a few calibration values past 127 * 2**-6 = 1.98
    fp0 = no_clip_fix(float(v.max()))
    assert fp0 == 5
    assert best_fix(v, list(window(float(v.max()), (-1, 0)))) == 5
    assert best_fix(v, list(window(float(v.max()), CPU_OUTPUT_FIX_WINDOW))) == 6

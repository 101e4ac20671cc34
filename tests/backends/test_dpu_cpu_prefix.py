"""The calibration SQNR floor on the DPU (``dpu.cpu_layers=auto``): under it, the CPU pre stage grows by whole layers
in topological order until the emulated deployment holds the floor on the calibration windows, unless the DPU would
keep under 25 % of the weighted layers' MACs (then the split stays and the target carries a one-line hint)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from nilmc.backends.dpu import MIN_DPU_MACS_SHARE, DPUBackend, partition
from nilmc.backends.dpu import testing as dpu_testing
from nilmc.backends.dpu.ir import from_onnx
from nilmc.backends.dpu.quant import fp32_outputs
from nilmc.compiler.metrics import sqnr_db
from nilmc.compiler.model import Model
from nilmc.quantization.context import QuantContext


def _set(m: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    for i, t in enumerate(m.graph.initializer):
        if t.name == name:
            m.graph.initializer[i].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))
            return
    raise KeyError(name)


def raw_tail_cnn(convs: tuple[tuple[int, int], ...], dense: tuple[int, ...], seed: int = 0) -> onnx.ModelProto:
    """A seq2point CNN whose conv1 output carries one raw-scale channel (x1000) beside three unit-scale ones, and whose
    conv2 all but ignores the large one: one 8-bit per-tensor grid on conv1's output (the DPU's input with conv1 on the
    CPU) starves the unit-scale channels the output depends on, while conv2's output sits well on 8 bits."""
    m = dpu_testing.seq2point(convs=convs, dense=dense, seed=seed)
    _set(m, "conv1/W", np.array([1000.0, 1.0, -1.0, 0.5]).reshape(4, 1, 1, 1))
    _set(m, "conv1/b", np.zeros(4))
    w2 = numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == "conv2/W")).copy()
    w2[:, 0] *= 1e-5
    _set(m, "conv2/W", w2)
    return m


@pytest.fixture(scope="module")
def fixable(tiny):
    """conv1 (raw tail) -> conv2 -> dense -> head: with conv1-conv2 on the CPU the DPU keeps ~64 % of the MACs."""
    return Model(raw_tail_cnn(((1, 4), (1, 8)), (8,)), tiny.contract, source="raw_tail")


@pytest.fixture(scope="module")
def starved(tiny):
    """conv1 (raw tail) -> a wide conv2 -> a one-filter conv3 -> a one-unit dense -> head: past conv1 the DPU would keep
    20 % of the MACs."""
    return Model(raw_tail_cnn(((1, 4), (1, 64), (1, 1)), (1,)), tiny.contract, source="raw_tail_starved")


def _lower(model, ds, d, mode="auto"):
    return DPUBackend().lower(model, d, precision="b2304", options={"quant": QuantContext(model, ds), "cpu_layers": mode})


def _eval_sqnr(art, model, ev) -> float:
    x = model.contract.prepare(ev.raw_x())
    with DPUBackend().runner(art) as r:
        got = r.infer({"input": x})["output"]
    return float(sqnr_db(fp32_outputs(model.graph, x), got))


def test_next_prefix_takes_one_whole_layer_in_topological_order() -> None:
    g = from_onnx(dpu_testing.seq2point(convs=((3, 4), (3, 4)), dense=(8,)))
    part = partition.plan_partition(g, ["conv1"])
    assert partition.next_prefix(g, part) == ["conv2"]
    grown = partition.plan_partition(g, ["conv1"], prefix={"conv2": "why"})
    assert list(grown.pre)[-2:] == ["conv1", "conv2"] and grown.pre["conv2"] == "why" and not grown.problems
    assert partition.next_prefix(g, grown) == ["flatten", "dense1"]  # the flatten comes with the layer after it
    # with every other layer on the CPU the head stays on the DPU (precise output needs a DPU layer); past it, nothing
    most = partition.plan_partition(g, ["conv1"], prefix={"conv2": "", "flatten": "", "dense1": ""})
    assert not most.post and partition.next_prefix(g, most) == ["dense2"]
    every = partition.plan_partition(g, ["conv1"], prefix={"conv2": "", "flatten": "", "dense1": "", "dense2": ""})
    assert partition.next_prefix(g, every) == [] and any("no weighted layer is left" in p for p in every.problems)


def test_the_prefix_grows_until_the_floor_holds(fixable, tiny_ds, tiny_eval, tmp_path) -> None:
    art = _lower(fixable, tiny_ds, tmp_path / "auto")
    rec = art.info["placement"]["calibration_sqnr"]
    steps = rec["steps"]
    assert steps[0]["cpu_pre_layers"] == ["conv1"] and steps[0]["sqnr_db"] < rec["floor_db"]  # the raw tail fails the floor
    assert rec["met"] and steps[-1]["sqnr_db"] >= rec["floor_db"] and steps[-1]["cpu_pre_layers"] == ["conv1", "conv2"]
    assert "hint" not in rec and "calibration_sqnr" not in art.info
    assert steps[-1]["dpu_macs_share"] >= MIN_DPU_MACS_SHARE
    # cpu_pre.onnx holds exactly conv1 and conv2 in FP32; the xmodel starts at conv3
    pre = onnx.load(art.directory / "cpu_pre.onnx")
    assert [n.name for n in pre.graph.node if n.op_type == "Conv"] == ["conv1", "conv2"]
    assert [o.name for o in pre.graph.output] == ["relu2:nhwc"]
    floats = {f["name"]: f["why"] for f in art.info["placement"]["float"]}
    assert floats["conv2"].startswith("calibration SQNR floor:") and "conv1" in floats["conv2"]
    assert "conv2" not in art.info["placement"]["int8"] and "dense1" in art.info["placement"]["int8"]
    assert "conv2" in art.info["quantization"]["keep_float"]
    # verified as before: the emulated deployment, on windows the floor never saw
    fixed = _eval_sqnr(art, fixable, tiny_eval)
    plain = _eval_sqnr(_lower(fixable, tiny_ds, tmp_path / "input", mode="input"), fixable, tiny_eval)
    assert fixed >= 25.0 and fixed > plain + 10.0, (fixed, plain)


def test_input_mode_keeps_its_split(fixable, tiny_ds, tmp_path) -> None:
    art = _lower(fixable, tiny_ds, tmp_path, mode="input")
    pre = onnx.load(art.directory / "cpu_pre.onnx")
    assert [n.name for n in pre.graph.node if n.op_type == "Conv"] == ["conv1"]
    assert "calibration_sqnr" not in art.info["placement"]


def test_a_prefix_that_would_starve_the_dpu_is_refused(starved, tiny_ds, tmp_path) -> None:
    art = _lower(starved, tiny_ds, tmp_path)
    rec = art.info["placement"]["calibration_sqnr"]
    assert not rec["met"] and len(rec["steps"]) == 1 and rec["steps"][0]["cpu_pre_layers"] == ["conv1"]
    assert "conv2" in rec["stopped"] and "under 25 %" in rec["stopped"]
    hint = art.info["calibration_sqnr"]["hint"]  # the driver's warning and a failed gate's cause
    assert "\n" not in hint and "30 dB floor" in hint and "--targets onnxruntime:int8" in hint
    pre = onnx.load(art.directory / "cpu_pre.onnx")
    assert [n.name for n in pre.graph.node if n.op_type == "Conv"] == ["conv1"]  # the split stays as it was


def test_a_model_over_the_floor_is_untouched(tiny, tiny_ds, tmp_path) -> None:
    """The tiny MLP's DPU deployment holds the floor (38.5 dB on its calibration windows): split and manifest as before."""
    art = _lower(tiny, tiny_ds, tmp_path)
    assert "calibration_sqnr" not in art.info["placement"] and "calibration_sqnr" not in art.info
    assert [f["name"] for f in art.info["placement"]["float"] if f["op"] == "dense"] == ["MatMul_1"]

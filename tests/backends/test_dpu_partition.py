"""The CPU/DPU partition: the layers reading the graph input run in FP32 on the CPU, the DPU starts at their output."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from nilmc.backends.dpu import DPUBackend, partition
from nilmc.backends.dpu.ir import NCW, from_onnx
from nilmc.backends.dpu.xmodel import graph_attributes, read_xmodel
from nilmc.compiler.errors import BadInputError
from nilmc.quantization.context import QuantContext
from nilmc.quantization.statistics import run_with_intermediates

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from outside_models import lf_windows, ncw_conv1d_seq2seq  # noqa: E402


@pytest.fixture(scope="module")
def split(tmp_path_factory, tiny, tiny_ds):
    out = {}
    for mode in ("auto", "none"):
        d = tmp_path_factory.mktemp(f"dpu_{mode}")
        out[mode] = DPUBackend().lower(tiny, d, precision="b2304", options={"quant": QuantContext(tiny, tiny_ds), "cpu_layers": mode})
    return out


def test_the_layer_reading_the_input_runs_on_the_cpu(split) -> None:
    art = split["auto"]
    d = art.directory
    graph, params = read_xmodel((d / "quantized.xmodel").read_bytes())
    assert graph.inputs == ["r1"] and "input" not in params.fix  # the graph input is never quantized
    assert [op.name for op in graph.ops if op.weighted] == ["MatMul_4"]
    assert graph_attributes((d / "quantized.xmodel").read_bytes())["nilmc_cpu_stages"] == {"pre": "cpu_pre.onnx"}
    pre = onnx.load(d / "cpu_pre.onnx")
    assert [o.name for o in pre.graph.output] == ["r1:nhwc"] and [n.op_type for n in pre.graph.node] == ["Reshape", "MatMul", "Add", "Relu",
                                                                                                         "Reshape"]
    place = art.info["placement"]
    assert place["int8"] == ["MatMul_4"] and [f["name"] for f in place["float"]] == ["Reshape_0", "MatMul_1"]
    assert "precise input" in place["float"][1]["why"]
    devices = {p["op"]: p["device"] for p in place["devices"]}
    assert devices == {"input": "CPU", "Reshape_0": "CPU", "MatMul_1": "CPU", "MatMul_4": "DPU"}
    q = art.info["quantization"]
    assert q["keep_float"] == ["MatMul_1"] and "input" not in q["tensors"] and "w1" not in q["tensors"]
    assert json.loads((d / "dpu_params.json").read_text())["partition"]["dpu_inputs"] == ["r1"]


def test_emulated_deployment_equals_an_independent_reference(split, tiny, tiny_eval) -> None:
    """CPU part: the FP32 model's own tensor on onnxruntime; DPU part: the dense layer in int64 numpy."""
    art = split["auto"]
    graph, params = read_xmodel((art.directory / "quantized.xmodel").read_bytes())
    x = tiny.contract.prepare(tiny_eval.raw_x())
    r1 = np.concatenate([b["r1"] for b in run_with_intermediates(tiny.graph, x)])  # what the CPU stage computes
    fi, fo, wq = params.fix["r1"], params.fix["output"], params.weights["MatMul_4"]
    q = np.clip(np.floor(r1.astype(np.float64) * 2.0 ** fi + 0.5), -128, 127).astype(np.int64)
    acc = q @ wq.weight_q.astype(np.int64) + wq.bias_q.astype(np.int64) * 2 ** (fi + wq.fw - wq.fb)  # shift_bias >= 0 here
    cut = fi + wq.fw - fo
    y = np.clip(np.floor((acc + 2 ** (cut - 1)) / 2 ** cut), -128, 127) * 2.0 ** -fo
    with DPUBackend().runner(art) as r:
        got = r.infer({"input": x})["output"]
    np.testing.assert_array_equal(got, y.astype(np.float32))


def test_partition_beats_the_quantized_input_on_held_out_windows(split, tiny, tiny_eval) -> None:
    x = tiny.contract.prepare(tiny_eval.raw_x())
    ref = np.concatenate([b["output"] for b in run_with_intermediates(tiny.graph, x)])
    err = {}
    for mode, art in split.items():
        with DPUBackend().runner(art) as r:
            err[mode] = float(np.mean((r.infer({"input": x})["output"] - ref) ** 2))
    assert err["auto"] < err["none"], err


def test_cpu_layers_none_keeps_every_layer_on_the_dpu(split) -> None:
    art = split["none"]
    graph, params = read_xmodel((art.directory / "quantized.xmodel").read_bytes())
    assert graph.inputs == ["input"] and "input" in params.fix and not (art.directory / "cpu_pre.onnx").exists()
    assert "nilmc_cpu_stages" not in graph_attributes((art.directory / "quantized.xmodel").read_bytes())
    assert {p["device"] for p in art.info["placement"]["devices"]} == {"DPU"}


def test_every_layer_reading_the_input_moves_and_the_dpu_reads_their_outputs() -> None:
    from nilmc.backends.dpu import testing

    g = from_onnx(testing.add_layer())  # two convs read the input, an Add joins them
    part = partition.plan_partition(g, ["conv_a", "conv_b"])
    assert list(part.pre) == ["input", "conv_a", "conv_b"] and part.inputs == ("ra", "cb")
    dpu = partition.dpu_graph(g, part)
    assert [op.kind for op in dpu.ops] == ["input", "input", "add"]
    none = partition.plan_partition(g, ["conv_a", "conv_b"], mode="none")
    assert not none.has_pre and partition.dpu_graph(g, none) is g


def test_bad_cpu_layers_value_is_a_typed_error(tiny, tiny_ds, tmp_path) -> None:
    with pytest.raises(BadInputError, match="cpu_layers"):
        DPUBackend().lower(tiny, tmp_path, precision="b2304", options={"quant": QuantContext(tiny, tiny_ds), "cpu_layers": "all"})


def test_ncw_conv1d_export_splits_into_cpu_dpu_cpu() -> None:
    m = ncw_conv1d_seq2seq(lf_windows(64, 128))
    g = from_onnx(m)
    assert g.ops[0].onnx_layout == NCW and g.ops[0].shape == (1, 128, 1) and g.op("/conv2/Conv").attrs["kernel"] == (1, 9)
    part = partition.plan_partition(g, ["/conv1/Conv"])
    assert list(part.pre) == ["input", "/conv1/Conv"] and list(part.post)[-1] == "/Clip" and not part.problems
    dpu = partition.dpu_graph(g, part)
    assert not dpu.unsupported and dpu.inputs == ["/act1/Relu_output_0"] and dpu.outputs == ["/conv4/Conv_output_0"]
    x = np.random.default_rng(0).normal(size=(5, 1, 128)).astype(np.float32)
    pre, post = partition.stages(m, g, part)
    assert pre is not None and post is not None
    ref = {k: v for b in run_with_intermediates(m, x) for k, v in b.items()}
    cut = pre.run({"input": x})["/act1/Relu_output_0:nhwc"]
    np.testing.assert_allclose(cut.reshape(5, 128, 8), ref["/act1/Relu_output_0"].transpose(0, 2, 1), rtol=1e-6, atol=1e-6)
    back = post.run({"/conv4/Conv_output_0:nhwc": ref["/conv4/Conv_output_0"].transpose(0, 2, 1).reshape(5, 1, 128, 1)})
    np.testing.assert_allclose(back["output"], ref["output"], rtol=1e-6, atol=1e-6)

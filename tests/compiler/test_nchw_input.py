"""A PyTorch Conv2d over T-P features: the input is NCHW with one channel, ``(N, 1, T, F)`` (layout ``N1TF``).

It was refused ("a rank-4 model input must end in a channel of 1") with no layout to name. Now the rank-4 input
``(1, T, F)`` reads as ``N1TF`` (the canonical windows' values in the same order, the channel axis in front), the DPU
reads it as the NCHW view of the NHWC tensor ``(T, F, 1)`` (PyTorch's channel-major Flatten folded into the dense
layer's weight rows after it), and it compiles from the command line alone.
"""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from helpers import tiny_dataset
from outside_models import nchw_conv2d_tp

from nilmc.backends.dpu import partition, quant
from nilmc.backends.dpu.ir import NCHW, from_onnx
from nilmc.backends.dpu.testing import float_forward
from nilmc.compiler.cli import cli
from nilmc.compiler.contract import canonical_input_shape, load_contract_file, resolve_layout, to_layout


@pytest.fixture(scope="module")
def nchw(tmp_path_factory):
    d = tmp_path_factory.mktemp("nchw")
    ds, ev = tiny_dataset(600, seed=0), tiny_dataset(300, seed=1)
    m = nchw_conv2d_tp(ds)
    onnx.save(m, d / "conv2d.onnx")
    ds.save(d / "calib.npz")
    ev.save(d / "eval.npz")
    meta = {p.key.split(".", 1)[1]: float(p.value) for p in m.metadata_props}
    return d, m, ds, meta


def test_a_one_channel_nchw_input_is_n1tf(nchw) -> None:
    _, m, ds, _ = nchw
    assert resolve_layout((1, 10, 9)) == "N1TF" and resolve_layout((10, 9, 1)) == "NTF1" and resolve_layout((1, 10, 1)) == "NTF1"
    assert canonical_input_shape((1, 10, 9)) == (10, 9, 1)
    x = ds.x[:4]
    np.testing.assert_array_equal(to_layout(x, "N1TF"), x.transpose(0, 3, 1, 2))


def test_the_dpu_reads_it_as_the_nchw_view_of_an_nhwc_tensor(nchw) -> None:
    _, m, ds, meta = nchw
    g = from_onnx(m)
    assert g.ops[0].onnx_layout == NCHW and g.ops[0].shape == (10, 9, 1)
    assert not g.unsupported  # PyTorch's flatten is channel-major: the dense after it takes its weight rows in NHWC order
    flat, fc = g.op("/Flatten"), g.op("/fc/Gemm")
    order = np.asarray(flat.attrs["onnx_order"])
    assert sorted(order.tolist()) == list(range(720)) and order[:3].tolist() == [0, 90, 180]  # NHWC (10, 9, 8) <- NCHW
    np.testing.assert_array_equal(fc.weight, np.asarray(onnx.numpy_helper.to_array(
        next(t for t in m.graph.initializer if t.name == "fc.weight"))).T[order])
    part = partition.plan_partition(g, (), mode="none")
    dpu = partition.dpu_graph(g, part)
    assert [op.name for op in dpu.ops if op.weighted] == ["/conv1/Conv", "/conv2/Conv", "/fc/Gemm"] and not part.problems
    mean = np.array([meta[f"input_mean_{i}"] for i in range(9)])
    std = np.array([meta[f"input_std_{i}"] for i in range(9)])
    x = ((ds.x[:32, :, :, 0] - mean) / std)[:, None].astype(np.float32)
    ref = quant.fp32_tensors(m, dpu, x)
    got = float_forward(dpu, {"input": x})
    for op in dpu.ops:  # the IR alone (NHWC, its own kernels and weights) computes what onnxruntime computes
        np.testing.assert_allclose(got[op.output], ref[op.output], rtol=1e-5, atol=1e-5 * np.abs(ref[op.output]).max(), err_msg=op.name)


def test_a_dense_after_the_channel_major_flatten_runs_on_the_dpu(nchw, tmp_path) -> None:
    """Flatten -> Linear 16 + ReLU -> Linear 1: the hidden dense runs on the DPU with its rows in NHWC order (exact: the
    emulated deployment agrees with FP32 as an INT8 model does), the head in FP32 on the CPU (precise head); a cut
    never carries the reordered vector."""
    from nilmc.backends.dpu import DPUBackend
    from nilmc.compiler.model import Model
    from nilmc.quantization.context import QuantContext

    d, m, ds, meta = nchw
    model = Model(nchw_conv2d_tp(ds, hidden=16), load_contract_file(_contract_file(d, meta)), source="hidden")
    art = DPUBackend().lower(model, tmp_path, precision="b2304", options={"quant": QuantContext(model, ds)})
    place = art.info["placement"]
    assert "/hidden/Gemm" in place["int8"] and "/Flatten" not in {d["op"] for d in place["devices"] if d["device"] == "CPU"}, place
    x = model.contract.prepare(ds.raw_x()[:200]).astype(np.float32)
    with DPUBackend().runner(art) as r:
        y = r.infer({model.input_name: x})["output"].astype(np.float64)
    ref = quant.fp32_outputs(model.graph, x).astype(np.float64)
    assert 10 * np.log10(np.sum(ref ** 2) / np.sum((y - ref) ** 2)) > 25
    g = from_onnx(model.graph)
    head_only = partition.plan_partition(g, (), rejected={"/hidden/Gemm": "a test"})  # the dense on the CPU: the flatten too
    assert "/Flatten" in head_only.post and all(not t.startswith("/Flatten") for t in head_only.outputs), head_only


def _contract_file(d, meta) -> object:
    from nilmc.compiler.contract_flags import ContractFlags, build_contract

    c = build_contract(d / "conv2d.onnx", ContractFlags(
        appliance="kettle", input_norm="zscore", input_mean=",".join(str(meta[f"input_mean_{i}"]) for i in range(9)),
        input_std=",".join(str(meta[f"input_std_{i}"]) for i in range(9)), target_mean=meta["target_mean"], target_std=meta["target_std"]))
    path = d / "contract.json"
    path.write_text(c.dumps())
    return path


@pytest.mark.slow
@pytest.mark.tf
def test_it_compiles_from_flags_alone(nchw) -> None:
    d, _, _, meta = nchw
    flags = ["--input-norm", "zscore", "--input-mean", ",".join(str(meta[f"input_mean_{i}"]) for i in range(9)),
             "--input-std", ",".join(str(meta[f"input_std_{i}"]) for i in range(9)), "--target-mean", meta["target_mean"],
             "--target-std", meta["target_std"], "--appliance", "kettle"]
    r = CliRunner().invoke(cli, [str(a) for a in ("compile", d / "conv2d.onnx", "--calib", d / "calib.npz", "--eval", d / "eval.npz",
                                                  "--out", d / "out", "--targets", "onnxruntime:int8,tflite:fp32,dpu:b2304", *flags, "--json")])
    doc = json.loads(r.stdout)
    by = {t["target"]: t for t in doc["targets"]}
    print({t: (v["status"], v["delta_eacc_pts"], v["output_sqnr_db"], v["error"]) for t, v in by.items()})
    assert by["tflite:fp32"]["passed"] and by["tflite:fp32"]["output_sqnr_db"] > 100, by["tflite:fp32"]
    for t in ("onnxruntime:int8", "dpu:b2304"):
        assert by[t]["passed"] and abs(by[t]["delta_eacc_pts"]) <= 0.5 and by[t]["output_sqnr_db"] > 25, by[t]
    assert json.loads((d / "out" / "dpu-b2304" / "manifest.json").read_text())["contract"]["layout"] == "N1TF"
    # the board script feeds the model what nilmc verified: (N, 1, T, F), normalized per feature
    spec = importlib.util.spec_from_file_location("run_on_board", d / "out" / "dpu-b2304" / "run_on_board.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    raw = tiny_dataset(8, seed=2).raw_x()
    contract = load_contract_file(d / "out" / "dpu-b2304" / "contract.json")
    got = mod.to_layout(mod.normalize(raw))
    assert got.shape == (8, 1, 10, 9)
    np.testing.assert_allclose(got, contract.prepare(raw), rtol=1e-5, atol=1e-5)

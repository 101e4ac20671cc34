"""ONNX ops the tflite:int8 / eiq:int8 route took on from PyTorch exports: grouped and depthwise convolutions and
average pooling.

Grouped and depthwise convolutions (a PyTorch ``Conv1d/Conv2d(groups=...)``).

They were refused before calibration ("does not place grouped/depthwise Conv"). onnx2tf writes a 1-D grouped conv as
a grouped CONV_2D (the filter holds ``C / groups`` input channels) and a 2-D depthwise conv as a DEPTHWISE_CONV_2D
(weights ``(1, KH, KW, C * multiplier)``, per-channel scales along axis 3). nilmc now writes its own parameters into
both, and the eIQ integer emulation runs both (one contraction per group, :func:`intops.grouped_conv2d_accumulate`).

A Sigmoid head (a binary ON/OFF classifier) was refused too: TFLite's int8 LOGISTIC now carries it, on the output grid
its builtin kernel requires (1/256 from 0.0), and the eIQ emulation runs its lookup table.
Average pooling (``AvgPool1d``) was refused as well; TFLite's int8 AVERAGE_POOL_2D averages codes on its input's grid,
which the TFLite traits' parameters give its output (``pool_shares_grid``).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import tiny_dataset
from outside_models import export_stats, keras_separable_conv1d, lf_windows, nchw_conv2d_tp, ncw_conv_avgpool, ncw_separable_conv1d

from nilmc.compiler.cli import cli
from nilmc.quantization import intops


@pytest.mark.parametrize("groups, ci, og", [(8, 1, 1), (8, 1, 2), (2, 4, 4), (4, 2, 3)])
def test_grouped_accumulate_is_the_per_group_conv(groups, ci, og) -> None:
    rng = np.random.default_rng(groups * 10 + og)
    x = rng.integers(-128, 128, (3, 5, 7, groups * ci)).astype(np.int8)
    w = rng.integers(-127, 128, (groups * og, 3, 2, ci)).astype(np.int8)
    geometry = ((1, 2), (1, 0, 1, 1), (1, 1))
    got = intops.grouped_conv2d_accumulate(x, w, groups, *geometry)
    per_group = np.concatenate([intops.conv2d_nhwc(x[..., g * ci:(g + 1) * ci], w[g * og:(g + 1) * og], strides=geometry[0],
                                                   pads=geometry[1], acc_bits=48) for g in range(groups)], axis=-1)
    np.testing.assert_array_equal(got, per_group)
    ref = intops.conv2d_nhwc(x, w, strides=geometry[0], pads=geometry[1], acc_bits=48, groups=groups)
    np.testing.assert_array_equal(got, ref)
    with pytest.raises(ValueError, match="groups"):
        intops.grouped_conv2d_accumulate(x, w, groups + 1, *geometry)


def _compile(tmp_path, m, ds, ev, stats: dict[str, str], targets: str, *, binary: bool = False) -> dict:
    import onnx

    onnx.save(m, tmp_path / "m.onnx")
    ds.save(tmp_path / "calib.npz")
    ev.save(tmp_path / "eval.npz")
    task = ["--task", "binary"] if binary else ["--target-mean", stats["target_mean"], "--target-std", stats["target_std"]]
    r = CliRunner().invoke(cli, [str(a) for a in (
        "compile", tmp_path / "m.onnx", "--calib", tmp_path / "calib.npz", "--eval", tmp_path / "eval.npz", "--out", tmp_path / "out",
        "--targets", targets, "--input-norm", "zscore", "--input-mean", stats["input_mean"], "--input-std", stats["input_std"],
        *task, "--appliance", ds.appliances[0], "--json")])
    by = {t["target"]: t for t in json.loads(r.stdout)["targets"]}
    print({t: (v["status"], v["delta_eacc_pts"], v["output_sqnr_db"], v["error"]) for t, v in by.items()})
    return by


def _weight_ops(path) -> list[dict]:
    from nilmc.backends.tflite_int8 import graph_ops, tensor_details

    fb = path.read_bytes()
    details = tensor_details(fb)
    return [{"op": o["op"], "weight": details[o["inputs"][1]]} for o in graph_ops(fb)
            if o["op"] in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")]


@pytest.mark.slow
@pytest.mark.tf
def test_a_separable_conv1d_compiles_for_tflite_and_eiq(tmp_path) -> None:
    """Depthwise with a channel multiplier of 2 (8 groups, 16 outputs): a grouped CONV_2D, int8, nilmc's scales."""
    ds, ev = lf_windows(400, 64, seed=0), lf_windows(200, 64, seed=1)
    m = ncw_separable_conv1d(ds, channels=8, groups=8, out_channels=16)
    by = _compile(tmp_path, m, ds, ev, {k: str(v) for k, v in export_stats(m).items()}, "tflite:int8,eiq:int8")
    for t in ("tflite:int8", "eiq:int8"):
        assert by[t]["passed"] and by[t]["output_sqnr_db"] > 30 and abs(by[t]["delta_eacc_pts"]) <= 0.5, by[t]
    ops = _weight_ops(tmp_path / "out" / "tflite-int8" / "model_int8.tflite")
    grouped = [o for o in ops if o["op"] == "CONV_2D" and o["weight"]["shape"][3] == 1 and o["weight"]["dtype"] == "int8"]
    assert len(grouped) == 1 and grouped[0]["weight"]["shape"] == [16, 1, 9, 1], ops  # (O, 1, K, C / groups)
    assert len(grouped[0]["weight"]["scales"]) == 16
    emu = json.loads((tmp_path / "out" / "eiq-int8" / "manifest.json").read_text())["artifact_info"]["npu_emulation"]
    assert emu["check_32bit_vs_cpu_builtin_kernels"]["max_lsb"] <= 1, emu
    r = CliRunner().invoke(cli, ["verify", str(tmp_path / "out" / "eiq-int8"), "--eval", str(tmp_path / "eval.npz")])
    assert r.exit_code == 0, r.output


@pytest.mark.slow
@pytest.mark.tf
def test_a_depthwise_conv2d_compiles_for_tflite_and_eiq(tmp_path) -> None:
    """A T-P Conv2d model whose second conv is depthwise: a DEPTHWISE_CONV_2D with nilmc's per-channel scales on axis 3."""
    ds, ev = tiny_dataset(600, seed=0), tiny_dataset(300, seed=1)
    m = nchw_conv2d_tp(ds, groups=8)
    meta = {p.key.split(".", 1)[1]: float(p.value) for p in m.metadata_props}
    stats = {"input_mean": ",".join(str(meta[f"input_mean_{i}"]) for i in range(9)),
             "input_std": ",".join(str(meta[f"input_std_{i}"]) for i in range(9)),
             "target_mean": str(meta["target_mean"]), "target_std": str(meta["target_std"])}
    by = _compile(tmp_path, m, ds, ev, stats, "tflite:int8,eiq:int8")
    for t in ("tflite:int8", "eiq:int8"):
        assert by[t]["passed"] and by[t]["output_sqnr_db"] > 30 and abs(by[t]["delta_eacc_pts"]) <= 0.5, by[t]
    ops = _weight_ops(tmp_path / "out" / "eiq-int8" / "model_eiq.tflite")
    dw = [o for o in ops if o["op"] == "DEPTHWISE_CONV_2D"]
    assert len(dw) == 1 and dw[0]["weight"]["dtype"] == "int8" and dw[0]["weight"]["quantized_dimension"] == 3, ops
    assert dw[0]["weight"]["shape"] == [1, 3, 3, 8] and len(dw[0]["weight"]["scales"]) == 8
    manifest = json.loads((tmp_path / "out" / "eiq-int8" / "manifest.json").read_text())
    assert manifest["artifact_info"]["npu_emulation"]["check_32bit_vs_cpu_builtin_kernels"]["max_lsb"] <= 1
    assert "DEPTHWISE_CONV_2D" in manifest["artifact_info"]["partition"]["npu"], manifest["artifact_info"]["partition"]


def test_the_onnx_precheck_takes_average_pooling_and_a_sigmoid_head() -> None:
    from onnx import helper

    from nilmc.backends.onnx_to_tf import int8_precheck

    assert int8_precheck(ncw_conv_avgpool(lf_windows(32, 16, seed=0)), "tflite:int8") is None
    assert int8_precheck(ncw_conv_avgpool(lf_windows(32, 16, seed=0), sigmoid=True), "eiq:int8") is None
    # a padded pool that leaves the padding out of its average: onnx2tf adds a correction MUL nilmc has no grid for
    # (fuzzed: "1 quantized TFLite tensors have no nilmc parameters" after calibration); counted padding is placed
    m = ncw_conv_avgpool(lf_windows(32, 16, seed=0))
    pool = next(n for n in m.graph.node if n.op_type == "AveragePool")
    pool.attribute.extend([helper.make_attribute("pads", [1, 1])])
    why = int8_precheck(m, "eiq:int8")
    assert why is not None and "count_include_pad" in why and "onnxruntime:int8" in why and "\n" not in why
    pool.attribute.extend([helper.make_attribute("count_include_pad", 1)])
    assert int8_precheck(m, "eiq:int8") is None


@pytest.mark.slow
@pytest.mark.tf
def test_a_sigmoid_classifier_compiles_for_tflite_and_eiq(tmp_path) -> None:
    from nilmc.backends.tflite_int8 import graph_ops, tensor_details

    ds, ev = lf_windows(400, 64, seed=0), lf_windows(200, 64, seed=1)
    m = ncw_conv_avgpool(ds, sigmoid=True)
    by = _compile(tmp_path, m, ds, ev, {k: str(v) for k, v in export_stats(m).items()}, "tflite:int8,eiq:int8", binary=True)
    for t in ("tflite:int8", "eiq:int8"):
        assert by[t]["passed"] and by[t]["output_sqnr_db"] > 30, by[t]
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    fb = (tmp_path / "out" / "eiq-int8" / "model_eiq.tflite").read_bytes()
    (head,) = [o for o in graph_ops(fb) if o["op"] == "LOGISTIC"]
    out = tensor_details(fb)[head["outputs"][0]]
    # the grid TFLite's builtin LOGISTIC requires (traits.fixed_lut_grids): on nilmc's own [0, 1] grid (scale 1/255) the
    # builtin kernels refused the model at allocation ("output->params.scale == 1. / 256"), only XNNPACK ran it
    assert out["dtype"] == "int8" and out["zero_points"].tolist() == [-128] and np.allclose(out["scales"], [1 / 256])
    Interpreter(model_content=fb, experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES).allocate_tensors()
    emu = json.loads((tmp_path / "out" / "eiq-int8" / "manifest.json").read_text())["artifact_info"]["npu_emulation"]
    assert "LOGISTIC" in emu["emulated_ops"] and emu["check_32bit_vs_cpu_builtin_kernels"]["max_lsb"] <= 1, emu


@pytest.mark.slow
@pytest.mark.tf
def test_average_pooling_compiles_for_tflite_and_eiq_on_its_input_grid(tmp_path) -> None:
    from nilmc.backends.tflite_int8 import graph_ops, tensor_details

    ds, ev = lf_windows(400, 64, seed=0), lf_windows(200, 64, seed=1)
    m = ncw_conv_avgpool(ds)
    by = _compile(tmp_path, m, ds, ev, {k: str(v) for k, v in export_stats(m).items()}, "tflite:int8,eiq:int8")
    for t in ("tflite:int8", "eiq:int8"):
        assert by[t]["passed"] and by[t]["output_sqnr_db"] > 30 and abs(by[t]["delta_eacc_pts"]) <= 0.5, by[t]
    fb = (tmp_path / "out" / "tflite-int8" / "model_int8.tflite").read_bytes()
    details = tensor_details(fb)
    (pool,) = [o for o in graph_ops(fb) if o["op"] == "AVERAGE_POOL_2D"]
    src, dst = details[pool["inputs"][0]], details[pool["outputs"][0]]
    assert src["dtype"] == dst["dtype"] == "int8" and np.array_equal(src["scales"], dst["scales"])
    assert np.array_equal(src["zero_points"], dst["zero_points"])


def test_the_dpu_refusal_of_a_depthwise_conv_names_the_targets_that_take_it() -> None:
    from nilmc.backends.dpu.ir import from_onnx

    g = from_onnx(ncw_separable_conv1d(lf_windows(32, 16, seed=0)))
    (op,) = [o for o in g.unsupported if o.name == "/dw/Conv"]
    assert "group=8" in op.reason and "tflite:int8 and eiq:int8" in op.reason


@pytest.mark.slow
@pytest.mark.tf
def test_a_keras_separable_conv1d_compiles_for_tflite_and_eiq(tmp_path) -> None:
    """The Keras route maps what its Conv2D/Dense pairing cannot through the model's ONNX graph: the converter's
    DEPTHWISE_CONV_2D of a SeparableConv1D gets nilmc's parameters as the onnx2tf one does."""
    ds, ev = lf_windows(300, 64, seed=0), lf_windows(150, 64, seed=1)
    keras_separable_conv1d(ds, str(tmp_path / "m.keras"))
    ds.save(tmp_path / "calib.npz")
    ev.save(tmp_path / "eval.npz")
    r = CliRunner().invoke(cli, [str(a) for a in (
        "compile", tmp_path / "m.keras", "--calib", tmp_path / "calib.npz", "--eval", tmp_path / "eval.npz", "--out", tmp_path / "out",
        "--targets", "tflite:int8,eiq:int8", "--input-norm", "zscore", "--input-mean", float(ds.x.mean()), "--input-std", float(ds.x.std()),
        "--target-mean", float(ds.y.mean()), "--target-std", float(ds.y.std()), "--appliance", "fridge", "--json")])
    by = {t["target"]: t for t in json.loads(r.stdout)["targets"]}
    for t in ("tflite:int8", "eiq:int8"):
        assert by[t]["passed"] and by[t]["output_sqnr_db"] > 30 and abs(by[t]["delta_eacc_pts"]) <= 0.5, by[t]
    ops = _weight_ops(tmp_path / "out" / "tflite-int8" / "model_int8.tflite")
    assert [o["op"] for o in ops] == ["CONV_2D", "DEPTHWISE_CONV_2D", "CONV_2D", "FULLY_CONNECTED"], ops
    assert ops[1]["weight"]["dtype"] == "int8" and ops[1]["weight"]["quantized_dimension"] == 3

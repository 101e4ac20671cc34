"""Seed 000's cloud model (tiny sizes): conv encoder + Transformer encoder layers train in seconds, convert to ONNX
with attention as MatMul/Softmax, are counted in MACs, and compile for onnxruntime:int8 through the CLI."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

APPS = ("kettle", "fridge")


def test_window_not_divisible_is_a_typed_error():
    from nilmc.compiler.errors import BadInputError
    from nilmc.training.cloud import build_cloud

    with pytest.raises(BadInputError, match="multiple of 4"):
        build_cloud(30)


@pytest.mark.tf
@pytest.mark.slow
def test_cloud_trains_converts_and_compiles_through_the_cli(tmp_path):
    pytest.importorskip("tensorflow")
    from nilmc.compiler.cli import cli
    from nilmc.training.lowfreq_data import lowfreq_splits
    from nilmc.training.zoo import save_model, train_model

    sp = lowfreq_splits(APPS, window=32, sizes={"train": 600, "val": 150, "calib": 200, "eval": 300}, on_fraction=0.6)
    trained = train_model("cloud", sp["train"], sp["val"], appliances=("fridge",), epochs=3, d_model=16, heads=2, layers=1, ffn=32)
    ops = {n.op_type for n in trained.graph.graph.node}
    assert {"Conv", "MatMul", "Softmax"} <= ops  # the convolutional encoder and the attention
    assert trained.contract.task == "regression" and trained.contract.appliance == "fridge"
    # Q.K^T and A.V of one head over 8 tokens of 8 channels: 8*8*8 MACs each, two heads -> part of the MatMul count
    assert trained.info["macs_by_op"]["MatMul"] >= 2 * 2 * 8 * 8 * 8 and trained.info["macs_by_op"]["Conv"] > 0
    assert trained.info["parameters"] > 0 and trained.info["flops"] == 2 * trained.info["macs"]
    paths = save_model(trained, tmp_path / "cloud")
    for name in ("calib", "eval"):
        sp[name].save(tmp_path / f"{name}.npz")
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["compile", str(paths["onnx"]), "--calib", str(tmp_path / "calib.npz"), "--eval", str(tmp_path / "eval.npz"),
                                   "--targets", "onnxruntime:int8", "--out", str(out), "--json"], catch_exceptions=False)
    summary = json.loads(res.output)
    (row,) = summary["targets"]
    assert row["error"] is None and row["delta_eacc_pts"] is not None and row["output_sqnr_db"] is not None, row
    from nilmc.backends.registry import Target
    from nilmc.compiler.bundle import bundle_name

    manifest = json.loads((out / bundle_name(Target("onnxruntime", "int8")) / "manifest.json").read_text())
    assert manifest["cost"]["macs"] == trained.info["macs"]  # the compiler counts what training counted
    assert manifest["cost"]["energy_j_per_prediction_seed002"] > 0


@pytest.mark.tf
@pytest.mark.slow
def test_train_model_cloud_from_the_cli(tmp_path):
    pytest.importorskip("tensorflow")
    from nilmc.compiler.cli import cli
    from nilmc.training.lowfreq_data import lowfreq_splits

    sp = lowfreq_splits(APPS, window=16, sizes={"train": 300, "val": 100}, on_fraction=0.6)
    sp["train"].save(tmp_path / "train.npz")
    sp["val"].save(tmp_path / "val.npz")
    res = CliRunner().invoke(cli, ["train", "--model", "cloud", "--data", str(tmp_path / "train.npz"), "--val", str(tmp_path / "val.npz"),
                                   "--appliance", "fridge", "--epochs", "1", "--out", str(tmp_path / "m"), "--json"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["model"] == "cloud" and info["macs"] > 0 and "eacc" in info["val_metrics"]
    assert (tmp_path / "m.onnx").is_file()

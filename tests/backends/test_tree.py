"""Seed 000's XGBoost edge model: trained on window features, converted to ONNX-ML trees, compiled to
onnxruntime:fp32 and verified (identical predictions); every other target refuses it in its pre-check."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("xgboost")
pytest.importorskip("onnxmltools")

from nilmc.backends.base import onnx_ml_ops  # noqa: E402
from nilmc.backends.registry import Target  # noqa: E402
from nilmc.compiler.cli import cli  # noqa: E402
from nilmc.compiler.driver import CompileOptions, compile_model  # noqa: E402
from nilmc.compiler.frontend import load_model  # noqa: E402
from nilmc.compiler.model import Model  # noqa: E402
from nilmc.training.lowfreq_data import lowfreq_splits  # noqa: E402
from nilmc.training.tree import FEATURES, TreeConfig, train_xgboost, window_features  # noqa: E402


@pytest.fixture(scope="module")
def splits():
    return lowfreq_splits(("kettle", "fridge"), window=49, sizes={"train": 1200, "val": 300, "eval": 400}, on_fraction=0.5)


@pytest.fixture(scope="module")
def trained(splits):
    return train_xgboost(splits["train"], splits["val"], appliance="kettle", config=TreeConfig(n_estimators=40, max_depth=4))


def test_feature_stage_matches_numpy(splits):
    x = splits["eval"].raw_x()[:50]
    f = window_features(x)
    w = x[:, :, 0, 0].astype(np.float64)
    assert f.shape == (50, len(FEATURES))
    np.testing.assert_allclose(f[:, 0], w.mean(1), rtol=1e-5)
    np.testing.assert_allclose(f[:, 3] - f[:, 2], np.ptp(w, axis=1), rtol=1e-5)
    np.testing.assert_allclose(f[:, 4], w[:, 24], rtol=1e-6)
    np.testing.assert_allclose(f[:, 7], np.abs(np.diff(w, axis=1)).max(1), rtol=1e-5)


def test_onnx_trees_reproduce_xgboost(trained):
    proto, contract, info = trained
    assert onnx_ml_ops(Model(proto, contract)) == ["TreeEnsembleRegressor"]
    assert info["onnx_vs_xgboost_max_abs_diff_w"] < 1e-3  # float32 sums of the same leaves
    assert info["tree_nodes"] > 40 and contract.input_shape == (49, 1, 1)


def test_training_is_deterministic(splits, trained):
    again, _, _ = train_xgboost(splits["train"], splits["val"], appliance="kettle", config=TreeConfig(n_estimators=40, max_depth=4))
    assert again.SerializeToString() == trained[0].SerializeToString()


def test_compile_fp32_identical_and_other_targets_refuse(tmp_path, splits, trained):
    proto, contract, _ = trained
    Model(proto, contract).save_onnx(tmp_path / "xgb.onnx")
    model = load_model(tmp_path / "xgb.onnx")
    targets = [Target("onnxruntime", "fp32"), Target("onnxruntime", "int8"), Target("openvino", "int8"), Target("tflite", "int8"),
               Target("dpu", "b4096")]
    s = compile_model(model, splits["eval"], targets, tmp_path / "out", calib=splits["val"], options=CompileOptions(latency_windows=5))
    fp32, *others = s.results
    assert fp32.passed and fp32.report.extra["output_sqnr_db"] == float("inf") and fp32.report.extra["max_abs_diff_w"] == 0.0
    assert s.reference.eacc > 0.5
    for r in others:
        assert r.error_code == 2 and "TreeEnsembleRegressor is an ONNX-ML op" in r.error and "\n" not in r.error
        assert r.compile_s < 1.0  # refused before any calibration or lowering


def test_cli_train_xgboost(tmp_path, splits):
    splits["train"].save(tmp_path / "train.npz")
    splits["val"].save(tmp_path / "val.npz")
    res = CliRunner().invoke(cli, ["train", "--model", "xgboost", "--appliance", "fridge", "--data", str(tmp_path / "train.npz"),
                                   "--val", str(tmp_path / "val.npz"), "--out", str(tmp_path / "edge"), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["model"] == "xgboost" and out["val_metrics"]["eacc"] > 0.3
    assert (tmp_path / "edge.onnx").is_file() and (tmp_path / "edge.info.json").is_file()


def test_example_accounts_for_every_target_the_tree_model_leaves_out(tmp_path, trained):
    """``example --all-models``'s one-line reasons come from the same pre-checks the compile runs (no lowering)."""
    from nilmc.backends.registry import default_registry
    from nilmc.compiler.cli import _example_refusals
    from nilmc.compiler.driver import target_refusals

    proto, contract, _ = trained
    path = Model(proto, contract).save_onnx(tmp_path / "xgb.onnx")
    registry = default_registry()
    targets = registry.parse_targets("onnxruntime:fp32,onnxruntime:int8,openvino:int8,tflite:qat_int8")
    refused = target_refusals(load_model(path), targets, registry)
    assert set(refused) == {"onnxruntime:int8", "openvino:int8", "tflite:qat_int8"}
    assert "TreeEnsembleRegressor is an ONNX-ML op" in refused["openvino:int8"] and "Keras source" in refused["tflite:qat_int8"]
    lines = _example_refusals(str(path), ["onnxruntime:int8", "openvino:int8", "tflite:qat_int8"])
    assert lines[0].startswith("  not in the table: onnxruntime:int8, openvino:int8: TreeEnsembleRegressor is an ONNX-ML op")
    assert "this target cannot run it" in lines[0] and len(lines) == 2 and "\n" not in "".join(lines)

"""Shipped sets: manifest hashes, determinism, inspection."""
from __future__ import annotations

import json

import numpy as np
import pytest

from nilmc.calibration_data import shipped as SH
from nilmc.compiler.errors import DataError

SMALL = dict(n_train=300, n_calib=60, n_eval=120)


def test_shipped_files_match_their_manifest():
    if not (SH.SHIPPED_DIR / SH.MANIFEST_NAME).exists():
        pytest.fail("calibration_data/shipped/manifest.json is missing: run build_shipped()")
    m = SH.verify_shipped()
    assert m["seed"] == SH.SHIPPED_SEED and m["setup"] == "T-P"
    assert set(m["files"]) == {"calib_T-P.npz", "eval_T-P.npz"}
    ev = SH.load_shipped("eval")
    assert list(ev.x.shape) == m["files"]["eval_T-P.npz"]["x_shape"]
    assert SH.SHIPPED_APPLIANCE in ev.appliances
    assert sum(e["bytes"] for e in m["files"].values()) < 5 * 2**20


def test_build_is_byte_identical_and_tamper_is_detected(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    ma = SH.build_shipped(a, seed=9, **SMALL)
    mb = SH.build_shipped(b, seed=9, **SMALL)
    assert ma == mb
    for name in ("calib_T-P.npz", "eval_T-P.npz", "manifest.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert SH.verify_shipped(a)["files"]["calib_T-P.npz"]["x_shape"] == [60, 10, 9, 1]
    data = bytearray((a / "eval_T-P.npz").read_bytes())
    data[-10] ^= 0xFF
    (a / "eval_T-P.npz").write_bytes(bytes(data))
    with pytest.raises(DataError, match="sha256"):
        SH.verify_shipped(a)
    (a / "calib_T-P.npz").unlink()
    with pytest.raises(DataError, match="missing"):
        SH.verify_shipped(a)
    with pytest.raises(DataError, match="manifest"):
        SH.verify_shipped(tmp_path / "empty")


def test_shipped_sets_share_the_training_statistics(tmp_path):
    from nilmc.calibration_data.windows import build_splits

    m = SH.build_shipped(tmp_path, seed=4, **SMALL)
    tr = build_splits("T-P", seed=4, n_train=SMALL["n_train"], splits=("train",))["train"]
    np.testing.assert_allclose(m["normalization"]["train_stats"]["mean"], tr.train_stats.mean)
    ev = SH.load_shipped("eval", directory=tmp_path)
    np.testing.assert_array_equal(ev.train_stats.std, tr.train_stats.std)


def test_inspect_is_json_able(tmp_path):
    SH.build_shipped(tmp_path, seed=2, **SMALL)
    summary = SH.inspect_dataset(tmp_path / "calib_T-P.npz")
    text = json.dumps(summary)
    assert summary["n_windows"] == 60 and summary["input_shape"] == [10, 9, 1]
    assert summary["appliances"]["kettle"]["on_threshold_w"] == 2000.0
    assert "P.T.max" in summary["features"] and "sha256" in text
    with pytest.raises(DataError):
        SH.inspect_dataset(tmp_path / "nope.npz")

"""seq2point windows, complete splits and the five normalizations."""
from __future__ import annotations

import numpy as np
import pytest

from nilmc.calibration_data import windows as W
from nilmc.calibration_data.dataset import NilmDataset
from nilmc.calibration_data.normalization import FeatureStats, Normalization
from nilmc.compiler.errors import BadInputError, DataError

SIZES = dict(n_train=600, n_val=200, n_calib=150, n_eval=300)


@pytest.fixture(scope="module")
def splits():
    return W.build_splits("T-P", appliances=("kettle", "fridge"), seed=11, **SIZES)


def test_sliding_windows_and_midpoint_target():
    feats = np.arange(30, dtype=np.float32).reshape(15, 2)
    power = np.arange(15, dtype=np.float32)[:, None] * 10
    x, y = W.windows_from_frames(feats, power)
    assert x.shape == (6, 10, 2, 1) and y.shape == (6, 1)
    assert W.MIDPOINT_INDEX == 5
    for b in range(6):
        np.testing.assert_array_equal(x[b, :, :, 0], feats[b : b + 10])
        assert y[b, 0] == power[b + 5, 0]  # frame index 5 of the window


def test_short_burst_gives_no_window_and_mismatch_raises():
    x, y = W.windows_from_frames(np.zeros((9, 3)), np.zeros((9, 1)))
    assert x.shape == (0, 10, 3, 1) and y.shape == (0, 1)
    with pytest.raises(DataError):
        W.windows_from_frames(np.zeros((12, 3)), np.zeros((11, 1)))


def test_splits_shapes_and_metadata(splits):
    assert set(splits) == {"train", "val", "calib", "eval"}
    for name, ds in splits.items():
        n = SIZES[f"n_{name}"]
        assert ds.x.shape == (n, 10, 9, 1) and ds.x.dtype == np.float32
        assert ds.y.shape == (n, 2)
        assert ds.applied_normalization is Normalization.A
        assert ds.appliances == ["kettle", "fridge"]
        assert ds.on_thresholds == [2000.0, 50.0]
        assert ds.info["split"] == name and ds.info["setup"] == "T-P" and ds.info["seed"] == 11
        assert ds.info["generator"].startswith("nilmc-synth/")


def test_statistics_are_fitted_on_train_only(splits):
    ref = FeatureStats.fit(splits["train"].x)
    for ds in splits.values():
        np.testing.assert_array_equal(ds.train_stats.mean, ref.mean)
        np.testing.assert_array_equal(ds.train_stats.std, ref.std)
        assert ds.target_mean == pytest.approx(list(splits["train"].y.mean(0)))
    assert not np.allclose(FeatureStats.fit(splits["eval"].x).mean, ref.mean)


def test_eval_is_not_a_copy_of_train(splits):
    tr = splits["train"].x.reshape(len(splits["train"].x), -1)
    ev = splits["eval"].x.reshape(len(splits["eval"].x), -1)
    tr_rows = {r.tobytes() for r in tr}
    assert not any(r.tobytes() in tr_rows for r in ev)
    assert splits["train"].info["day_offset"] != splits["eval"].info["day_offset"]


@pytest.mark.parametrize("kind,lo,hi", [("B", 0.0, 1.0), ("D", -128.0, 127.0), ("E", 0.0, 255.0)])
def test_minmax_normalizations_cover_their_range_on_train(splits, kind, lo, hi):
    spec = splits["train"].normalization_spec(kind)
    z = spec.apply(splits["train"].x)
    assert z.min() == pytest.approx(lo, abs=1e-3) and z.max() == pytest.approx(hi, abs=1e-3)
    lo_exp, hi_exp = spec.expected_range()
    assert np.all(lo_exp >= lo - 1e-3) and np.all(hi_exp <= hi + 1e-3)


def test_zscore_and_identity(splits):
    x = splits["train"].x
    z = splits["train"].normalization_spec("C").apply(x)
    np.testing.assert_allclose(z.mean(axis=(0, 1, 3)), 0.0, atol=1e-3)
    np.testing.assert_allclose(z.std(axis=(0, 1, 3)), 1.0, atol=1e-3)
    np.testing.assert_array_equal(splits["train"].normalization_spec("A").apply(x), x)
    # eval data normalized with the *train* statistics are not exactly standardized
    ze = splits["eval"].normalization_spec("C").apply(splits["eval"].x)
    assert not np.allclose(ze.mean(axis=(0, 1, 3)), 0.0, atol=1e-3)


def test_targets_are_watts_and_kettle_is_represented(splits):
    y = np.concatenate([splits["train"].y, splits["eval"].y])
    assert y.min() >= 0
    assert np.mean(y[:, 0] >= 2000) > 0.03  # kettle ON windows are well represented
    assert np.mean(y[:, 1] >= 50) > 0.1


def test_columns_do_not_change_the_data():
    a = W.build_splits("T-P", appliances=("kettle", "fridge"), seed=5, n_train=300, splits=("train",))["train"]
    b = W.build_splits("T-P", appliances=("fridge",), seed=5, n_train=300, splits=("train",))["train"]
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.y[:, 1], b.y[:, 0])


def test_calib_does_not_depend_on_train_size():
    a = W.build_splits("T-P", seed=5, n_train=300, n_calib=100, splits=("calib",))
    b = W.build_splits("T-P", seed=5, n_train=500, n_calib=100, splits=("calib",))
    np.testing.assert_array_equal(a["calib"].x, b["calib"].x)


def test_generate_dataset_is_deterministic_bytes(tmp_path):
    p1 = W.generate_dataset(setup="TF-VIP", appliances="kettle", n_windows=120, seed=3, out=tmp_path / "a.npz")
    W.generate_dataset(setup="TF-VIP", appliances="kettle", n_windows=120, seed=3, out=tmp_path / "b.npz")
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    assert p1.x.shape == (120, 10, 54, 1)
    back = NilmDataset.load(tmp_path / "a.npz")
    np.testing.assert_array_equal(back.x, p1.x)
    assert back.info["setup"] == "TF-VIP"


def test_generate_non_train_split_uses_train_statistics():
    ev = W.generate_dataset(appliances="kettle", n_windows=100, seed=4, split="eval")
    tr = W.build_splits("T-P", appliances="kettle", seed=4, splits=("train",))["train"]
    np.testing.assert_array_equal(ev.train_stats.mean, tr.train_stats.mean)


@pytest.mark.parametrize("kw", [{"n_train": 0}, {"n_eval": -5}, {"setup": "Q-P"}, {"appliances": "boiler"}, {"seed": -1}, {"splits": ("test2",)}])
def test_bad_arguments_raise(kw):
    args = dict(seed=0, n_train=50, n_val=20, n_calib=20, n_eval=20)
    args.update(kw)
    setup = args.pop("setup", "T-P")
    with pytest.raises(BadInputError):
        W.build_splits(setup, **args)

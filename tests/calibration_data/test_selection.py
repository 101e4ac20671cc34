"""Calibration windows chosen from the data given: stratified over appliance states and input levels, deterministic by seed."""
from __future__ import annotations

import numpy as np
import pytest
from helpers import tiny_dataset

from nilmc.calibration_data.selection import allocate, input_level, select_calibration, selection_indices, strata_labels
from nilmc.compiler.errors import BadInputError


@pytest.fixture(scope="module")
def pool():
    return tiny_dataset(3000, seed=5)


def test_same_seed_same_windows_other_seed_other_windows(pool):
    a, _ = selection_indices(pool, 200, seed=1, appliance="kettle")
    b, _ = selection_indices(pool, 200, seed=1, appliance="kettle")
    c, _ = selection_indices(pool, 200, seed=2, appliance="kettle")
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert len(a) == 200 and len(np.unique(a)) == 200 and np.all(np.diff(a) > 0)


def test_every_state_and_level_is_represented(pool):
    labels = strata_labels(pool, "kettle")
    idx, record = selection_indices(pool, 200, seed=0, appliance="kettle")
    taken = np.bincount(labels[idx], minlength=10)
    assert np.array_equal(taken, record["strata"]["taken"])
    assert np.all(taken[np.bincount(labels, minlength=10) > 0] > 0)
    # the extreme input levels are over-represented against a random draw
    level = input_level(pool.x)
    top = level >= np.quantile(level, 0.99)
    assert top[idx].mean() > 2 * top.mean()
    assert level[idx].max() >= np.quantile(level, 0.995)


def test_dataset_and_record(pool):
    out = select_calibration(pool, 150, seed=3, appliance="kettle")
    rec = out.info["calibration_selection"]
    assert out.n_windows == 150 and rec["method"] == "stratified" and rec["seed"] == 3 and rec["pool_windows"] == 3000
    idx, _ = selection_indices(pool, 150, seed=3, appliance="kettle")
    assert np.array_equal(out.x, pool.x[idx]) and np.array_equal(out.y, pool.y[idx])


def test_other_methods_and_small_pools(pool):
    first, _ = selection_indices(pool, 100, seed=9, appliance="kettle", method="first")
    assert np.array_equal(first, np.arange(100))
    rnd, _ = selection_indices(pool, 100, seed=9, appliance="kettle", method="random")
    assert len(np.unique(rnd)) == 100
    every, rec = selection_indices(pool, 5000, seed=0, appliance="kettle")
    assert np.array_equal(every, np.arange(3000)) and "note" in rec


@pytest.mark.parametrize("kw", [{"n": 0}, {"n": 10, "method": "best"}, {"n": 1.5}])
def test_bad_requests_are_bad_input(pool, kw):
    with pytest.raises(BadInputError):
        selection_indices(pool, seed=0, appliance="kettle", **kw)
    with pytest.raises(Exception, match="toaster"):
        selection_indices(pool, 10, seed=0, appliance="toaster")


def test_allocate_sums_and_caps():
    sizes = np.array([900, 50, 30, 15, 5, 0, 0, 0, 0, 0])
    take = allocate(sizes, 100)
    assert take.sum() == 100 and np.all(take <= sizes) and take[5:].sum() == 0 and np.all(take[:5] > 0)
    assert allocate(np.array([3, 3]), 5).sum() == 5


def test_compile_selects_and_records_the_calibration_windows(tiny, tiny_ds, tiny_eval, tmp_path):
    import json

    from nilmc.backends.registry import Target
    from nilmc.compiler.driver import CompileOptions, compile_model

    opts = CompileOptions(calib_windows=100, calib_seed=7)
    s = compile_model(tiny, tiny_eval, [Target("onnxruntime", "int8")], tmp_path / "o", calib=tiny_ds, budget={"eacc": 100},
                      options=opts)
    assert s.results[0].error is None
    m = json.loads((tmp_path / "o" / "onnxruntime-int8" / "manifest.json").read_text())
    rec = m["calibration"]
    assert rec["method"] == "random" and rec["windows"] == 100 and rec["pool_windows"] == tiny_ds.n_windows and rec["seed"] == 7
    assert "coverage" in m and m["coverage"]["evaluation_windows"] == tiny_eval.n_windows


def test_cli_calibration_selection(tiny_files, tmp_path):
    import json

    from click.testing import CliRunner

    from nilmc.compiler.cli import cli

    args = ["compile", tiny_files["model"], "--calib", tiny_files["calib"], "--eval", tiny_files["eval"], "--targets", "onnxruntime:int8",
            "--max-delta", "eacc=100", "--calib-windows", "50", "--calib-select", "random", "--calib-seed", "2", "--out", tmp_path / "o"]
    res = CliRunner().invoke(cli, [str(a) for a in args])
    assert res.exit_code in (0, 1), res.output
    rec = json.loads((tmp_path / "o" / "onnxruntime-int8" / "manifest.json").read_text())["calibration"]
    assert rec == {"method": "random", "seed": 2, "pool_windows": 400, "windows": 50}

"""``nilmc data convert`` for any window, step, target offset and period; plain CSV (streamed) and window npz inputs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from nilmc.calibration_data.dataset import NilmDataset
from nilmc.calibration_data.loaders import (
    CsvOptions,
    PowerRecording,
    Series,
    convert_dataset,
    recording_to_lowfreq,
    synth_recording,
    write_refit,
)
from nilmc.calibration_data.lowfreq import resample_mean
from nilmc.calibration_data.normalization import Normalization
from nilmc.compiler.cli import cli


def run(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def _one_line_error(res) -> str:
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nilmc: error: ") and "; " in lines[0], res.stderr
    return lines[0]


@pytest.fixture(scope="module")
def recording():
    """Six hours at 1 s with 1 % of rows missing, a 10-minute hole and a few empty fridge cells."""
    rec = synth_recording(3, days=1, period_s=1.0, appliances=("kettle", "fridge"))
    n = 6 * 3600
    keep = np.random.default_rng(0).random(n) > 0.01
    keep[9000:9600] = False
    ts = rec.aggregate.ts[:n][keep]
    cols = {"aggregate": rec.aggregate.values[:n][keep], "kettle": rec.appliances["kettle"].values[:n][keep],
            "fridge": rec.appliances["fridge"].values[:n][keep].copy()}
    cols["fridge"][5000:5003] = np.nan
    return ts, cols


def _write_csv(path: Path, ts: np.ndarray | None, cols: dict[str, np.ndarray], *, ts_fmt=lambda t: f"{t:.0f}", fmt="{:.2f}") -> Path:
    names = list(cols)
    with open(path, "w") as fh:
        fh.write(",".join((["timestamp"] if ts is not None else []) + names) + "\n")
        for k in range(len(next(iter(cols.values())))):
            cells = [("" if np.isnan(cols[c][k]) else fmt.format(cols[c][k])) for c in names]
            fh.write(",".join(([ts_fmt(ts[k])] if ts is not None else []) + cells) + "\n")
    return path


def test_streaming_equals_in_memory(tmp_path, recording):
    ts, cols = recording
    path = _write_csv(tmp_path / "house.csv", ts, cols)
    n_rows = len(ts)
    chunk = 777
    assert n_rows > 20 * chunk  # the file is many chunks long
    res = run("data", "convert", "csv", path, "--window", "99", "--step", "3", "--period", "8", "--chunk-rows", chunk,
              "--out", tmp_path / "streamed.npz", "--json")
    assert res.exit_code == 0, res.output
    streamed = NilmDataset.load(tmp_path / "streamed.npz")
    whole = convert_dataset("csv", path, window=99, step=3, period_s=8, csv_options=CsvOptions(chunk_rows=10 * n_rows))
    assert streamed.x.shape == whole.x.shape and streamed.x.shape[1:] == (99, 1, 1)
    np.testing.assert_array_equal(streamed.x, whole.x)
    np.testing.assert_array_equal(streamed.y, whole.y)
    assert streamed.meta() == whole.meta()  # statistics and info too: nothing depends on the chunk size
    # and both equal the in-memory low-frequency path over the same numbers (resample_mean + classic_windows)
    back = np.genfromtxt(path, delimiter=",", skip_header=1)
    series = {c: Series(back[:, 0], back[:, k]) for k, c in enumerate(cols, start=1)}
    rec = PowerRecording(series.pop("aggregate"), series, "csv", str(path), 1.0)
    ref = recording_to_lowfreq(rec, window=99, step=3, period_s=8)
    np.testing.assert_array_equal(streamed.x, ref.x)
    np.testing.assert_array_equal(streamed.y, ref.y)
    assert streamed.appliances == ["kettle", "fridge"] and streamed.info["target_offset"] == 49
    assert streamed.info["period_s"] == 8.0 and streamed.train_stats.has("mean", "std", "minimum", "maximum")


def test_iso_timestamps_and_chosen_columns(tmp_path, recording):
    import datetime as dt

    ts, cols = recording
    n = 4000
    sub = {k: v[:n] for k, v in cols.items()}
    iso = _write_csv(tmp_path / "iso.csv", ts[:n], sub, ts_fmt=lambda t: dt.datetime.fromtimestamp(t, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%S"))
    num = _write_csv(tmp_path / "num.csv", ts[:n], sub)
    a = convert_dataset("csv", iso, appliances="kettle", window=60, period_s=6, csv_options=CsvOptions(aggregate="aggregate", chunk_rows=500))
    b = convert_dataset("csv", num, appliances="kettle", window=60, period_s=6)
    assert a.appliances == ["kettle"]
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.y, b.y)


def test_rows_without_timestamps_pre_normalized(tmp_path, recording):
    _, cols = recording
    n = 3000
    mean, std = 522.0, 814.0
    z = {"mains": (cols["aggregate"][:n] - mean) / std, "kettle": cols["kettle"][:n]}
    path = _write_csv(tmp_path / "z.csv", None, z, fmt="{:.9g}")
    res = run("data", "convert", "csv", path, "--window", "101", "--target-offset", "100", "--normalized", "zscore", "--mean", mean,
              "--std", std, "--out", tmp_path / "z.npz")
    assert res.exit_code == 0, res.output
    ds = NilmDataset.load(tmp_path / "z.npz")
    assert ds.applied_normalization is Normalization.C and ds.train_stats.given == ("mean", "std")
    assert ds.x.shape == (n - 100, 101, 1, 1)
    raw = ds.raw_x()[:, :, 0, 0]
    np.testing.assert_allclose(raw[0], cols["aggregate"][:101], atol=0.02)
    np.testing.assert_allclose(ds.y[:, 0], cols["kettle"][100:n], rtol=1e-6, atol=1e-3)  # target at offset 100 (the last sample)


def test_lowfreq_layout_takes_window_step_offset_period(tmp_path):
    rec = synth_recording(5, days=1, period_s=1.0, appliances=("kettle",))
    n = 3 * 3600
    rec = PowerRecording(Series(rec.aggregate.ts[:n], rec.aggregate.values[:n]),
                         {"kettle": Series(rec.appliances["kettle"].ts[:n], rec.appliances["kettle"].values[:n])}, "synthetic", "", 1.0)
    csv = write_refit(tmp_path / "CLEAN_House1.csv", rec)
    res = run("data", "convert", "refit", csv, "--window", "120", "--step", "7", "--target-offset", "10", "--period", "6",
              "--out", tmp_path / "r.npz")
    assert res.exit_code == 0, res.output
    ds = NilmDataset.load(tmp_path / "r.npz")
    assert ds.x.shape[1:] == (120, 1, 1) and ds.info["target_offset"] == 10 and ds.info["period_s"] == 6.0 and ds.info["step"] == 7
    grid, mains = resample_mean(rec.aggregate.ts, np.round(rec.aggregate.values), period_s=6)
    _, kettle = resample_mean(rec.appliances["kettle"].ts, np.round(rec.appliances["kettle"].values), period_s=6, start=grid[0], end=grid[-1])
    np.testing.assert_allclose(ds.x[1, :, 0, 0], mains[7:127], rtol=1e-6)  # the second window starts at sample 7
    np.testing.assert_allclose(ds.y[1, 0], kettle[7 + 10], rtol=1e-6)
    classic = convert_dataset("refit", csv)  # defaults unchanged: the classic 599 x 8 s
    assert classic.x.shape[1] == 599 and classic.info["window"] == 599 and classic.info["period_s"] == 8.0


def test_windows_npz(tmp_path):
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "w1.npz", x=rng.normal(500, 100, (50, 40)), y=rng.uniform(0, 2000, 50))
    res = run("data", "convert", "windows", tmp_path / "w1.npz", "--appliances", "kettle", "--out", tmp_path / "d1.npz", "--json")
    assert res.exit_code == 0, res.output
    ds = NilmDataset.load(tmp_path / "d1.npz")
    assert ds.x.shape == (50, 40, 1, 1) and ds.y.shape == (50, 1) and ds.appliances == ["kettle"] and ds.train_stats is not None
    assert json.loads(res.stdout)["input_shape"] == [40, 1, 1]
    np.savez(tmp_path / "w2.npz", x=rng.normal(0, 1, (30, 20, 3)).astype(np.float32), y=rng.uniform(0, 100, (30, 2)).astype(np.float32),
             appliances=np.array(["Fridge", "Washing Machine"]))
    ds2 = convert_dataset("windows", tmp_path / "w2.npz", step=2)
    assert ds2.x.shape == (15, 20, 3, 1) and ds2.appliances == ["fridge", "washing_machine"]
    np.savez(tmp_path / "bad.npz", x=rng.normal(size=(5, 4)), y=rng.normal(size=(6,)))
    assert "y has shape" in _one_line_error(run("data", "convert", "windows", tmp_path / "bad.npz", "--out", tmp_path / "b.npz"))


@pytest.mark.parametrize(("layout", "args", "needle"), [
    ("csv", ["--window", "10", "--target-offset", "10"], "--target-offset"),
    ("csv", ["--aggregate", "nope"], "available"),
    ("csv", ["--normalized", "zscore", "--mean", "3"], "--std"),
    ("csv", ["--window", "100000"], "no complete 100000-sample window"),
    ("windows", ["--window", "10"], "--window"),
    ("redd_low", ["--aggregate", "mains"], "csv and windows"),
])
def test_bad_options_exit_2_one_line(tmp_path, recording, layout, args, needle):
    ts, cols = recording
    path = _write_csv(tmp_path / "small.csv", ts[:500], {k: v[:500] for k, v in cols.items()})
    assert needle in _one_line_error(run("data", "convert", layout, path, *args, "--out", tmp_path / "x.npz"))
    assert not (tmp_path / "x.npz").exists()


def test_unsorted_rows_are_refused_naming_time_order(tmp_path, recording):
    ts, cols = recording
    ts = ts[:2000].copy()
    ts[1500] = ts[10]
    path = _write_csv(tmp_path / "unsorted.csv", ts, {k: v[:2000] for k, v in cols.items()})
    assert "time order" in _one_line_error(run("data", "convert", "csv", path, "--window", "9", "--chunk-rows", "300", "--out", tmp_path / "u.npz"))

"""Loaders on files written in each public layout; malformed input; the real UK-DALE excerpt."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nilmc.calibration_data import loaders as L
from nilmc.calibration_data.dataset import NilmDataset
from nilmc.compiler.errors import DataError

APPS = ("kettle", "fridge", "microwave")


@pytest.fixture(scope="module")
def rec():
    full = L.synth_recording(0, days=1, period_s=1.0, appliances=APPS)
    n = 3 * 3600  # three hours keep the files small
    trim = lambda s: L.Series(s.ts[:n], s.values[:n])  # noqa: E731
    return L.PowerRecording(trim(full.aggregate), {k: trim(v) for k, v in full.appliances.items()}, "synthetic", "", 1.0)


@pytest.fixture(scope="module")
def hf():
    return L.synth_highfreq_recording(0, n_bursts=3, appliances=("kettle", "fridge"))


def test_redd_low_unsorted_duplicates(tmp_path, rec):
    d = L.write_redd_low(tmp_path / "house_1", rec, shuffle_seed=3)
    back = L.load_redd_low(d)
    assert back.names == list(APPS)
    np.testing.assert_allclose(back.aggregate.ts, rec.aggregate.ts)
    np.testing.assert_allclose(back.aggregate.values, rec.aggregate.values, atol=0.011)
    np.testing.assert_allclose(back.appliances["kettle"].values, rec.appliances["kettle"].values, atol=0.006)
    assert np.all(np.diff(back.appliances["fridge"].ts) > 0)
    ds = L.convert_dataset("redd_low", d, out=tmp_path / "r.npz")
    assert ds.x.shape[1:] == (599, 1, 1) and ds.appliances == list(APPS)
    assert ds.on_thresholds == [2000.0, 50.0, 200.0]
    assert NilmDataset.load(tmp_path / "r.npz").n_windows == ds.n_windows


def test_redd_high_roundtrip_and_cycle_counts(tmp_path, hf):
    d = L.write_redd_high(tmp_path / "h1", hf)
    back = L.load_redd_high(d)
    assert back.n_frames == hf.n_frames
    np.testing.assert_allclose(back.v, hf.v, atol=0.01)
    np.testing.assert_allclose(back.i, hf.i, atol=1e-3)
    assert np.unique(back.burst).size == 3
    counts = np.ones(hf.n_frames, np.int64)
    counts[4], counts[30] = 3, 100
    d2 = L.write_redd_high(tmp_path / "h2", hf, counts=counts)
    back2 = L.load_redd_high(d2)
    assert back2.n_frames == hf.n_frames + 2 + 59  # 3 -> 3 frames; 100 -> capped at 60
    np.testing.assert_array_equal(back2.v[4], back2.v[6])
    assert np.unique(back2.burst).size == 4  # the capped line ends a burst
    ds = L.highfreq_to_dataset(back, setup="TF-P")
    assert ds.x.shape[1:] == (10, 18, 1) and ds.y.shape[1] == 0
    ds2 = L.highfreq_to_dataset(hf)
    assert ds2.appliances == ["kettle", "fridge"] and ds2.n_windows == hf.n_frames - 3 * 9


def test_redd_high_with_low_freq_targets(tmp_path, hf):
    d = L.write_redd_high(tmp_path / "high", hf)
    t = hf.ts
    low = L.PowerRecording(L.Series(t, np.full(t.size, 500.0)), {"refrigerator": L.Series(t, hf.power["fridge"])}, "x", "", 1 / 60)
    L.write_redd_low(tmp_path / "low", low)
    ds = L.convert_dataset("redd_high", d, targets_path=tmp_path / "low")
    assert ds.appliances == ["refrigerator"] and ds.on_thresholds == [50.0]


def test_ukdale_mains_and_channel_aggregate(tmp_path, rec):
    d = L.write_ukdale(tmp_path / "house_1", rec)
    u = L.load_ukdale(d)
    assert u.names == list(APPS) and u.period_s == 1.0
    assert L.load_ukdale(d, prefer_mains=False).period_s == 6.0
    (d / "mains.dat").unlink()
    assert L.load_ukdale(d).period_s == 6.0
    ds = L.convert_dataset("ukdale", d)
    assert ds.info["source_layout"] == "ukdale"


def test_refit_names_and_issues(tmp_path, rec):
    p = L.write_refit(tmp_path / "CLEAN_House1.csv", rec)
    r = L.load_refit(p)
    assert r.names == ["appliance1", "appliance2", "appliance3"]
    r2 = L.load_refit(p, appliance_names=list(APPS))
    np.testing.assert_allclose(r2.appliances["kettle"].values, np.round(rec.appliances["kettle"].values))
    lines = p.read_text().splitlines()
    lines[5] = lines[5][: lines[5].rfind(",")] + ",1"  # flag one row
    p.write_text("\n".join(lines) + "\n")
    assert len(L.load_refit(p).aggregate) == len(r.aggregate) - 1


def test_excerpt_layout_roundtrip(tmp_path, rec):
    p = L.write_ukdale_excerpt(tmp_path / "ex.csv", rec)
    e = L.load_ukdale_excerpt(p)
    assert e.names == list(APPS)
    np.testing.assert_allclose(e.aggregate.values, rec.aggregate.values, atol=1e-4)


@pytest.mark.skipif(not L.EXCERPT_PATH.exists(), reason="the UK-DALE excerpt is not present")
def test_real_ukdale_excerpt():
    e = L.load_ukdale_excerpt(L.EXCERPT_PATH)
    assert len(e.aggregate) == 720 and e.period_s == 120.0
    assert "kettle" in e.names and "laptop_computer_2" in e.names and len(e.names) == 18
    ds = L.convert_dataset("ukdale_excerpt", L.EXCERPT_PATH, appliances="kettle,fridge", step=10)
    assert ds.x.shape[1:] == (599, 1, 1) and ds.appliances == ["kettle", "fridge"]
    assert np.all(np.isfinite(ds.x)) and ds.y[:, 0].max() > 500
    synthetic = L.load_ukdale_excerpt(L.EXCERPT_PATH, aggregate="synthetic_mains")
    assert not np.allclose(synthetic.aggregate.values, e.aggregate.values)


# ------------------------------------------------------------------ malformed input
def _house(tmp_path: Path, chan1: str, labels: str | None = "1 mains\n2 kettle\n") -> Path:
    d = tmp_path / "house"
    d.mkdir()
    if labels is not None:
        (d / "labels.dat").write_text(labels)
    (d / "channel_1.dat").write_text(chan1)
    (d / "channel_2.dat").write_text("1 5\n2 6\n3 7\n")
    return d


@pytest.mark.parametrize(
    "chan1,needle",
    [
        ("1 100\n2 abc\n3 100\n", r"channel_1.dat: line 2: non-numeric field 'abc'"),
        ("1 100\n2 100 7\n3 100\n", r"channel_1.dat: line 2 has 3 fields, expected 2"),
        ("1 100\n2 nan\n", r"channel_1.dat: line 2: NaN"),
        ("", r"channel_1.dat' is empty"),
        ("\n  \n", r"is empty"),
    ],
)
def test_malformed_channel_files(tmp_path, chan1, needle):
    d = _house(tmp_path, chan1)
    with pytest.raises(DataError, match=needle):
        L.load_redd_low(d)


def test_missing_labels_and_bad_labels(tmp_path):
    d = _house(tmp_path, "1 100\n", labels=None)
    with pytest.raises(DataError, match="labels.dat.*missing"):
        L.load_redd_low(d)
    (d / "labels.dat").write_text("1 mains\nkettle\n")
    with pytest.raises(DataError, match="line 2 is not 'channel label'"):
        L.load_redd_low(d)
    (d / "labels.dat").write_text("1 oven\n")
    with pytest.raises(DataError, match="no channel is labelled 'mains'"):
        L.load_redd_low(d)
    with pytest.raises(DataError, match="does not exist"):
        L.load_redd_low(tmp_path / "nowhere")


def test_malformed_high_freq(tmp_path, hf):
    d = L.write_redd_high(tmp_path / "h", hf)
    lines = (d / "voltage.dat").read_text().splitlines()
    lines[2] = " ".join(lines[2].split()[:-1])  # one sample short
    (d / "voltage.dat").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"voltage.dat: line 3 has 276 fields, expected 277"):
        L.load_redd_high(d)
    parts = lines[0].split()
    parts[1] = "0"
    lines[2] = " ".join(parts)
    (d / "voltage.dat").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="cycle count"):
        L.load_redd_high(d)


def test_malformed_csv_layouts(tmp_path, rec):
    p = L.write_refit(tmp_path / "CLEAN_House2.csv", rec)
    lines = p.read_text().splitlines()
    good = list(lines)
    lines[3] = lines[3] + ",5"
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"CLEAN_House2.csv: line 4 has"):
        L.load_refit(p)
    lines = list(good)
    fields = lines[7].split(",")
    fields[2] = "x12"
    lines[7] = ",".join(fields)
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"line 8: non-numeric field 'x12'"):
        L.load_refit(p)
    p.write_text("Time,Unix,Aggregate\n")
    with pytest.raises(DataError, match="no data lines"):
        L.load_refit(p)
    p.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(DataError, match="not a REFIT header"):
        L.load_refit(p)
    q = tmp_path / "ex.csv"
    q.write_text("time,mains\n1,2\n")
    with pytest.raises(DataError, match="unix_ns"):
        L.load_ukdale_excerpt(q)


def test_unknown_layout_and_appliance(tmp_path, rec):
    from nilmc.compiler.errors import BadInputError

    with pytest.raises(BadInputError, match="available"):
        L.convert_dataset("pecan", tmp_path)
    d = L.write_ukdale(tmp_path / "house_9", rec)
    with pytest.raises(DataError, match="available: kettle, fridge, microwave"):
        L.convert_dataset("ukdale", d, appliances="boiler")


def test_too_short_recording_raises(tmp_path):
    ts = np.arange(100) * 8.0
    r = L.PowerRecording(L.Series(ts, np.ones(100)), {"kettle": L.Series(ts, np.zeros(100))}, "x", "x", 8.0)
    with pytest.raises(DataError, match="599"):
        L.recording_to_lowfreq(r)


def test_pickled_npz_is_refused(tmp_path):
    p = tmp_path / "evil.npz"
    np.savez(p, x=np.array([{"a": 1}], dtype=object), y=np.zeros((1, 1), np.float32), meta=np.array("{}"))
    with pytest.raises(DataError, match="pickle"):
        NilmDataset.load(p)
    z = tmp_path / "notzip.npz"
    z.write_bytes(b"garbage")
    with pytest.raises(DataError):
        NilmDataset.load(z)


def test_nan_dataset_is_refused():
    x = np.zeros((2, 10, 9, 1), np.float32)
    x[0, 0, 0, 0] = np.nan
    with pytest.raises(DataError, match="non-finite"):
        NilmDataset(x=x, y=np.zeros((2, 1), np.float32), appliances=["kettle"], feature_names=[f"f{k}" for k in range(9)])

"""Loaders (and writers) for the public NILM data layouts, and converters to :class:`NilmDataset`.

Layouts
    ``redd_low``        REDD ``low_freq/house_N/``: ``labels.dat`` ("channel label" lines) and
                        ``channel_K.dat`` ("unix_ts power"). Lines need not be sorted: each
                        channel is sorted by time and duplicate timestamps keep their first line.
                        The aggregate is the sum of the ``mains`` channels on their common timestamps.
    ``redd_high``       REDD ``high_freq/house_N/``: ``voltage.dat``, ``current_1.dat``,
                        ``current_2.dat``; each line "timestamp cycle_count s_1 .. s_275". REDD
                        writes a line only when the waveform changes: a line stands for
                        ``cycle_count`` consecutive cycles with that waveform. We expand it into
                        ``min(cycle_count, max_repeat)`` identical frames (default ``max_repeat`` 60,
                        one second) at ``ts + k/60``; when a line's count exceeds ``max_repeat``,
                        or the next line does not start where this one ends (within half a cycle),
                        a new *burst* starts, and windows never straddle bursts. The three files
                        are matched on timestamps (rows missing from any file are dropped); the
                        current is ``i_1 + i_2`` (``leg="sum"``, default) or one leg. Units are
                        REDD's (uncalibrated).
    ``ukdale``          UK-DALE ``house_N/``: ``labels.dat``, ``channel_K.dat`` ("ts power", 6 s),
                        optional ``mains.dat`` ("ts active apparent Vrms", 1 s). The aggregate is
                        the active power of ``mains.dat`` when present (``prefer_mains``), else
                        the channel labelled ``aggregate`` (or ``mains``).
    ``refit``           REFIT ``CLEAN_House{N}.csv``: ``Time,Unix,Aggregate,Appliance1..Appliance9``
                        (+ optional ``Issues``: rows with Issues=1 are dropped by default).
    ``ukdale_excerpt``  the CSV excerpt shipped here: ``unix_ns`` then columns named like
                        ``('kettle', 1)``, then ``mains`` and ``synthetic mains``.
    ``csv``             any plain CSV with a header: an optional timestamp column, an aggregate
                        column and appliance columns (raw watts, or a pre-normalized aggregate);
                        streamed in chunks, so it may be larger than memory
                        (:mod:`nilmc.calibration_data.csv_stream`).
    ``windows``         an ``.npz`` of ready windows: ``x`` ``(N, T)``, ``(N, T, F)`` or ``(N, T, F, 1)``
                        and ``y`` ``(N,)`` or ``(N, A)`` (:func:`windows_npz_to_dataset`).

Appliance names are canonicalised: lower case, spaces -> ``_``; a repeated label gets
``_2``, ``_3`` ... Malformed input raises :class:`DataError` naming the file, the line and
the offending text. Low-frequency recordings convert to windows of mains power (default the
classic 599 x 8 s setting of :mod:`nilmc.calibration_data.lowfreq`; any ``window``, ``step``,
target ``offset`` and ``period_s``), high-frequency ones to features + seq2point windows.
"""
from __future__ import annotations

import csv
import io
import re
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nilmc.calibration_data.dataset import NilmDataset
from nilmc.calibration_data.features import extract_features, parse_setup
from nilmc.calibration_data.lowfreq import CLASSIC_PERIOD_S, CLASSIC_WINDOW, check_offset, classic_windows, make_lowfreq_dataset, resample_mean
from nilmc.calibration_data.normalization import FeatureStats, Normalization
from nilmc.calibration_data.synth import (
    ALL_DEVICES,
    FRAMES_PER_SECOND,
    SAMPLES_PER_FRAME,
    TARGET_APPLIANCES,
    Difficulty,
    iter_bursts,
)
from nilmc.calibration_data.windows import ON_THRESHOLDS, windows_from_frames
from nilmc.compiler.errors import BadInputError, DataError
from nilmc.compiler.io import atomic_write_text

RECORDING_LAYOUTS: tuple[str, ...] = ("redd_low", "redd_high", "ukdale", "refit", "ukdale_excerpt")
LAYOUTS: tuple[str, ...] = (*RECORDING_LAYOUTS, "csv", "windows")
EXCERPT_PATH = Path("/work/shared/data/ukdale_house_excerpt_120s.csv")
_EPOCH = 1_303_132_929.0  # a REDD-era unix time (April 2011) for written synthetic files


# --------------------------------------------------------------------------- structures
@dataclass
class Series:
    """A power series: ``ts`` unix seconds (float64, sorted, unique), ``values`` watts (float64)."""

    ts: np.ndarray
    values: np.ndarray

    def __len__(self) -> int:
        return int(self.ts.shape[0])


@dataclass
class PowerRecording:
    """A low-frequency recording: whole-house power plus per-appliance power series."""

    aggregate: Series
    appliances: dict[str, Series]
    layout: str
    path: str
    period_s: float  # nominal sample period of the source

    @property
    def names(self) -> list[str]:
        return list(self.appliances)


@dataclass
class HighFreqRecording:
    """REDD-style cycles: ``v``/``i`` ``(n, 275)`` float32, frame start times, burst ids."""

    ts: np.ndarray  # (n,) float64 unix seconds of each frame
    v: np.ndarray
    i: np.ndarray
    burst: np.ndarray  # (n,) int64, consecutive frames of one burst share an id
    layout: str = "redd_high"
    path: str = ""
    power: dict[str, np.ndarray] = field(default_factory=dict)  # optional per-frame ground truth (synthetic)

    @property
    def n_frames(self) -> int:
        return int(self.v.shape[0])


# --------------------------------------------------------------------------- parsing
def _read_text(path: Path) -> str:
    if not path.exists():
        raise DataError(f"file {str(path)!r} does not exist", "check the data directory and layout")
    if path.is_dir():
        raise DataError(f"{str(path)!r} is a directory, expected a data file", "point at the file")
    try:
        text = path.read_text(encoding="utf-8", errors="strict")
    except UnicodeDecodeError as exc:
        raise DataError(f"{str(path)!r} is not a text file ({exc.reason} at byte {exc.start})", "pass the plain-text data file") from None
    except OSError as exc:
        raise DataError(f"cannot read {str(path)!r} ({exc.strerror})", "check the file's permissions") from None
    if not text.strip():
        raise DataError(f"{str(path)!r} is empty", "the file must hold data lines; re-download or re-export it")
    return text


def _diagnose(path: Path, lines: Iterable[str], ncols: int | None, sep: str | None, first_line: int,
              usecols: Sequence[int] | None = None) -> None:
    """Find the first malformed line and raise a DataError naming it (slow path)."""
    expected = ncols
    for lineno, line in enumerate(lines, start=first_line):
        if not line.strip():
            continue
        parts = line.strip().split(sep)
        if expected is None:
            expected = len(parts)
        if len(parts) != expected:
            raise DataError(
                f"{path}: line {lineno} has {len(parts)} fields, expected {expected}: {line.strip()[:120]!r}",
                "fix or remove that line",
            )
        for p in (parts if usecols is None else [parts[k] for k in usecols]):
            try:
                float(p)
            except ValueError:
                raise DataError(f"{path}: line {lineno}: non-numeric field {p.strip()[:40]!r} in {line.strip()[:120]!r}", "fix or remove that line") from None


def read_numeric(path: str | Path, *, ncols: int | None = None, sep: str | None = None, skip_lines: int = 0,
                 usecols: Sequence[int] | None = None) -> np.ndarray:
    """Parse a whitespace (default) or ``sep``-separated numeric table into ``(rows, cols)`` float64.

    Fast path ``numpy.loadtxt``; on any failure a line-by-line scan names the offending line.
    Raises :class:`DataError` for an empty file, a wrong column count (``ncols``), a
    non-numeric field or a NaN/Inf value.
    """
    path = Path(path)
    text = _read_text(path)
    all_lines = text.splitlines()
    body = all_lines[skip_lines:]
    if not any(line.strip() for line in body):
        raise DataError(f"{str(path)!r} has a header but no data lines", "the file must hold data lines")
    try:
        arr = np.loadtxt(io.StringIO("\n".join(body)), delimiter=sep, ndmin=2, dtype=np.float64, usecols=usecols, comments=None)
    except ValueError:
        _diagnose(path, body, ncols, sep, skip_lines + 1, usecols)
        raise DataError(f"{str(path)!r} could not be parsed as a numeric table", "check the separator and the column count") from None
    if ncols is not None and usecols is None and arr.shape[1] != ncols:
        _diagnose(path, body, ncols, sep, skip_lines + 1)
    if not np.all(np.isfinite(arr)):
        row = int(np.flatnonzero(~np.all(np.isfinite(arr), axis=1))[0])
        data_lines = [(k, ln) for k, ln in enumerate(body, start=skip_lines + 1) if ln.strip()]
        lineno, line = data_lines[row]
        raise DataError(f"{path}: line {lineno}: NaN or infinite value in {line.strip()[:120]!r}", "drop or fill the missing readings first")
    return arr


def _sorted_unique(ts: np.ndarray, values: np.ndarray) -> Series:
    """Sort by time (stable) and keep the first line of each duplicate timestamp."""
    order = np.argsort(ts, kind="stable")
    ts, values = ts[order], values[order]
    keep = np.concatenate([[True], np.diff(ts) > 0])
    return Series(ts[keep].astype(np.float64), values[keep].astype(np.float64))


def canonical_name(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", str(label).strip().lower()).strip("_") or "unnamed"


def _unique_names(labels: Sequence[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for lab in labels:
        c = canonical_name(lab)
        seen[c] = seen.get(c, 0) + 1
        out.append(c if seen[c] == 1 else f"{c}_{seen[c]}")
    return out


def read_labels(path: str | Path) -> dict[int, str]:
    """``labels.dat``: "channel label" lines -> ``{channel: label}``."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{str(path)!r} is missing: the layout needs a labels.dat naming each channel",
                        "copy labels.dat from the data set into the house directory")
    out: dict[int, str] = {}
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split(None, 1)
        if len(parts) != 2 or not parts[0].isdigit():
            raise DataError(f"{path}: line {lineno} is not 'channel label': {line.strip()[:120]!r}", "fix that line")
        ch = int(parts[0])
        if ch in out:
            raise DataError(f"{path}: line {lineno}: channel {ch} is labelled twice ({out[ch]!r} and {parts[1].strip()!r})", "keep one label per channel")
        out[ch] = parts[1].strip()
    return out


def _channel_series(path: Path, ncols: int = 2) -> Series:
    arr = read_numeric(path, ncols=ncols)
    return _sorted_unique(arr[:, 0], arr[:, 1])


def _check_dir(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{what} {str(path)!r} does not exist", "check the path")
    if not path.is_dir():
        raise DataError(f"{str(path)!r} is a file, expected the {what}", "point at the house directory")
    return path


# --------------------------------------------------------------------------- REDD
def load_redd_low(house_dir: str | Path) -> PowerRecording:
    """REDD ``low_freq/house_N``: aggregate = sum of the ``mains`` channels on common timestamps."""
    d = _check_dir(house_dir, "REDD low_freq house directory")
    labels = read_labels(d / "labels.dat")
    chans = sorted(labels)
    names = _unique_names([labels[c] for c in chans])
    mains: list[Series] = []
    apps: dict[str, Series] = {}
    for ch, name in zip(chans, names):
        s = _channel_series(d / f"channel_{ch}.dat")
        if canonical_name(labels[ch]) == "mains":
            mains.append(s)
        else:
            apps[name] = s
    if not mains:
        raise DataError(f"{d / 'labels.dat'}: no channel is labelled 'mains' (labels: {sorted(set(labels.values()))})",
                        "REDD houses label channels 1 and 2 'mains'")
    ts = mains[0].ts
    for s in mains[1:]:
        ts = np.intersect1d(ts, s.ts)
    if ts.size == 0:
        raise DataError(f"{d}: the mains channels share no timestamp", "check the mains channel files belong to one house")
    agg = sum(s.values[np.searchsorted(s.ts, ts)] for s in mains)
    return PowerRecording(Series(ts, np.asarray(agg, np.float64)), apps, "redd_low", str(d), _median_period(ts))


def _median_period(ts: np.ndarray) -> float:
    return float(np.median(np.diff(ts))) if ts.size > 1 else 0.0


def load_redd_high(house_dir: str | Path, *, leg: str = "sum", max_repeat: int = FRAMES_PER_SECOND) -> HighFreqRecording:
    """REDD ``high_freq/house_N`` -> frames (see the module doc for the cycle-count rule).

    Defaults: ``leg="sum"`` (i_1 + i_2; or ``"1"``/``"2"``), ``max_repeat=60`` frames per line.
    """
    d = _check_dir(house_dir, "REDD high_freq house directory")
    if leg not in ("sum", "1", "2"):
        raise BadInputError(f"leg={leg!r} is not one of 'sum', '1', '2'", "pick the current leg(s) to use")
    if int(max_repeat) < 1:
        raise BadInputError(f"max_repeat={max_repeat} must be >= 1", "pass e.g. 60")
    ncols = SAMPLES_PER_FRAME + 2
    files = {"v": d / "voltage.dat", "i1": d / "current_1.dat", "i2": d / "current_2.dat"}
    need = ["v", "i1", "i2"] if leg == "sum" else ["v", "i" + leg]
    tabs = {}
    for k in need:
        arr = read_numeric(files[k], ncols=ncols)
        bad = np.flatnonzero((arr[:, 1] < 1) | (arr[:, 1] != np.round(arr[:, 1])))
        if bad.size:
            raise DataError(f"{files[k]}: line {int(bad[0]) + 1}: cycle count {arr[bad[0], 1]!r} is not a positive integer",
                            "the second field counts the cycles a waveform stands for")
        order = np.argsort(arr[:, 0], kind="stable")
        arr = arr[order]
        keep = np.concatenate([[True], np.diff(arr[:, 0]) > 0])
        tabs[k] = arr[keep]
    ts = tabs["v"][:, 0]
    for k in need[1:]:
        ts = np.intersect1d(ts, tabs[k][:, 0])
    if ts.size == 0:
        raise DataError(f"{d}: voltage and current files share no timestamp", "use the files of one house and one recording")
    rows = {k: tabs[k][np.searchsorted(tabs[k][:, 0], ts)] for k in need}
    counts = np.minimum.reduce([rows[k][:, 1] for k in need]).astype(np.int64)
    v_lines = rows["v"][:, 2:]
    i_lines = rows["i1"][:, 2:] + rows["i2"][:, 2:] if leg == "sum" else rows["i" + leg][:, 2:]
    return _expand_lines(ts, counts, v_lines, i_lines, int(max_repeat), str(d))


def _expand_lines(ts: np.ndarray, counts: np.ndarray, v_lines: np.ndarray, i_lines: np.ndarray, max_repeat: int, path: str) -> HighFreqRecording:
    reps = np.minimum(counts, max_repeat)
    line_of = np.repeat(np.arange(ts.size), reps)
    k_in_line = np.arange(line_of.size) - np.repeat(np.cumsum(reps) - reps, reps)
    frame_ts = ts[line_of] + k_in_line / FRAMES_PER_SECOND
    # a new burst where a line is cut (count > max_repeat) or the next line is not contiguous
    ends = ts + counts / FRAMES_PER_SECOND
    contiguous = np.abs(ts[1:] - ends[:-1]) <= 0.5 / FRAMES_PER_SECOND
    new_burst = np.concatenate([[True], ~contiguous | (counts[:-1] > max_repeat)])
    burst_of_line = np.cumsum(new_burst) - 1
    return HighFreqRecording(
        ts=frame_ts, v=v_lines[line_of].astype(np.float32), i=i_lines[line_of].astype(np.float32),
        burst=burst_of_line[line_of].astype(np.int64), path=path,
    )


# --------------------------------------------------------------------------- UK-DALE
def load_ukdale(house_dir: str | Path, *, prefer_mains: bool = True) -> PowerRecording:
    """UK-DALE ``house_N`` (defaults: aggregate from ``mains.dat`` active power when present)."""
    d = _check_dir(house_dir, "UK-DALE house directory")
    labels = read_labels(d / "labels.dat")
    chans = sorted(labels)
    names = _unique_names([labels[c] for c in chans])
    apps: dict[str, Series] = {}
    agg: Series | None = None
    for ch, name in zip(chans, names):
        s = _channel_series(d / f"channel_{ch}.dat")
        if name in ("aggregate", "mains") and agg is None:
            agg = s
        else:
            apps[name] = s
    mains_path = d / "mains.dat"
    if mains_path.exists() and (prefer_mains or agg is None):
        arr = read_numeric(mains_path, ncols=4)
        agg = _sorted_unique(arr[:, 0], arr[:, 1])
    if agg is None:
        raise DataError(f"{d}: no mains.dat and no channel labelled 'aggregate' (labels: {sorted(set(labels.values()))})",
                        "UK-DALE labels channel 1 'aggregate'")
    return PowerRecording(agg, apps, "ukdale", str(d), _median_period(agg.ts))


# --------------------------------------------------------------------------- CSV layouts
def _csv_header(path: Path) -> list[str]:
    text = _read_text(path)
    first = text.splitlines()[0]
    return [h.strip() for h in next(csv.reader([first]))]


def load_refit(csv_path: str | Path, *, appliance_names: Sequence[str] | Mapping[str, str] | None = None,
               drop_issues: bool = True) -> PowerRecording:
    """REFIT ``CLEAN_House{N}.csv``. ``appliance_names`` renames Appliance1..9 (a list in
    column order or a mapping ``{"Appliance1": "fridge", ...}``); default names ``appliance1``..
    Rows flagged ``Issues=1`` are dropped by default."""
    path = Path(csv_path)
    header = _csv_header(path)
    low = [h.lower() for h in header]
    if "unix" not in low or "aggregate" not in low:
        raise DataError(f"{path}: line 1 is not a REFIT header (need Unix and Aggregate columns): {','.join(header)[:160]!r}", "pass a CLEAN_House{N}.csv file")
    app_cols = [k for k, h in enumerate(low) if re.fullmatch(r"appliance\d+", h)]
    numeric_cols = [k for k, h in enumerate(low) if h != "time"]
    arr = read_numeric(path, sep=",", skip_lines=1, ncols=len(header), usecols=numeric_cols)
    _check_width(path, header, sep=",")
    col = {header[k]: j for j, k in enumerate(numeric_cols)}
    lcol = {h.lower(): j for h, j in col.items()}
    if drop_issues and "issues" in lcol:
        arr = arr[arr[:, lcol["issues"]] == 0]
        if arr.shape[0] == 0:
            raise DataError(f"{path}: every row is flagged Issues=1", "pass drop_issues=False to keep them")
    ts = arr[:, lcol["unix"]]
    raw_names = [header[k] for k in app_cols]
    if appliance_names is None:
        names = _unique_names(raw_names)
    elif isinstance(appliance_names, Mapping):
        names = _unique_names([appliance_names.get(h, h) for h in raw_names])
    else:
        if len(appliance_names) != len(raw_names):
            raise BadInputError(f"{len(appliance_names)} appliance names for {len(raw_names)} appliance columns {raw_names}",
                                "name every ApplianceK column, in order")
        names = _unique_names(list(appliance_names))
    agg = _sorted_unique(ts, arr[:, lcol["aggregate"]])
    apps = {n: _sorted_unique(ts, arr[:, col[h]]) for n, h in zip(names, raw_names)}
    return PowerRecording(agg, apps, "refit", str(path), _median_period(agg.ts))


def _check_width(path: Path, header: list[str], sep: str) -> None:
    """``usecols`` hides surplus columns from loadtxt: check every line's field count."""
    lines = _read_text(path).splitlines()
    for lineno, line in enumerate(lines[1:], start=2):
        if line.strip() and line.count(sep) != len(header) - 1:
            raise DataError(f"{path}: line {lineno} has {line.count(sep) + 1} fields, expected {len(header)}: {line.strip()[:120]!r}",
                            "fix or remove that line")


_TUPLE_COL = re.compile(r"^\(\s*'([^']+)'\s*,\s*(\d+)\s*\)$")


def load_ukdale_excerpt(csv_path: str | Path = EXCERPT_PATH, *, aggregate: str = "mains") -> PowerRecording:
    """The UK-DALE excerpt CSV (``unix_ns``, ``('name', instance)`` columns, ``mains``,
    ``synthetic mains``). Default aggregate: the measured ``mains`` column."""
    path = Path(csv_path)
    header = _csv_header(path)
    if not header or header[0].lower() != "unix_ns":
        raise DataError(f"{path}: line 1 does not start with unix_ns: {','.join(header)[:160]!r}", "pass the UK-DALE excerpt CSV")
    agg_key = aggregate.replace("_", " ").lower()
    lheader = [h.lower() for h in header]
    if agg_key not in lheader:
        raise BadInputError(f"aggregate column {aggregate!r} is not in {path}", f"available: {', '.join(h for h in header[1:] if not _TUPLE_COL.match(h))}")
    arr = read_numeric(path, sep=",", skip_lines=1, ncols=len(header))
    ts = arr[:, 0] / 1e9
    labels, cols = [], []
    for k, h in enumerate(header[1:], start=1):
        m = _TUPLE_COL.match(h)
        if m:
            inst = int(m.group(2))
            labels.append(m.group(1) if inst == 1 else f"{m.group(1)} {inst}")
            cols.append(k)
    names = _unique_names(labels)
    agg = _sorted_unique(ts, arr[:, lheader.index(agg_key)])
    apps = {n: _sorted_unique(ts, arr[:, k]) for n, k in zip(names, cols)}
    return PowerRecording(agg, apps, "ukdale_excerpt", str(path), _median_period(agg.ts))


# --------------------------------------------------------------------------- converters
def threshold_for(name: str) -> float:
    """ON threshold for a data-set label (REFERENCE table by keyword, else 10 W)."""
    n = canonical_name(name)
    for key, thr in (("kettle", "kettle"), ("microwave", "microwave"), ("fridge", "fridge"), ("refrigerator", "fridge"),
                     ("dish", "dishwasher"), ("washing", "washing_machine"), ("washer", "washing_machine"),
                     ("toaster", "toaster"), ("tv", "tv"), ("television", "tv")):
        if key in n.split("_") or n.startswith(key):
            return ON_THRESHOLDS[thr]
    return 10.0


def _select(names: Sequence[str], wanted: Sequence[str] | str | None, source: str) -> list[str]:
    if wanted is None:
        return list(names)
    items = wanted.split(",") if isinstance(wanted, str) else list(wanted)
    out = []
    for w in items:
        c = canonical_name(w)
        if c not in names:
            raise DataError(f"appliance {w!r} is not in {source}", f"available: {', '.join(names)}")
        out.append(c)
    return out


def recording_to_lowfreq(
    rec: PowerRecording,
    *,
    appliances: Sequence[str] | str | None = None,
    period_s: float = CLASSIC_PERIOD_S,
    max_gap_s: float | None = None,
    step: int = 1,
    window: int = CLASSIC_WINDOW,
    offset: int | None = None,
) -> NilmDataset:
    """A low-frequency recording -> windows of mains power (its own training statistics).

    Defaults: the classic 599 x 8 s setting: every appliance, 8 s grid over the aggregate's span,
    ``max_gap_s`` = max(60 s, 1.5 source periods) (so 120-s data are held, not dropped), every
    window start (``step`` 1), ``window`` 599 samples, target at ``offset`` = the midpoint.
    """
    check_offset(window, offset)
    if int(step) < 1:
        raise BadInputError(f"step {step} must be >= 1", "pass e.g. --step 1 (every window start)")
    names = _select(rec.names, appliances, rec.path)
    gap = max(60.0, 1.5 * rec.period_s) if max_gap_s is None else float(max_gap_s)
    grid, mains = resample_mean(rec.aggregate.ts, rec.aggregate.values, period_s=period_s, max_gap_s=gap)
    cols = []
    for n in names:
        s = rec.appliances[n]
        _, v = resample_mean(s.ts, s.values, period_s=period_s, start=grid[0], end=grid[-1], max_gap_s=gap)
        cols.append(v)
    y_all = np.stack(cols, axis=1) if cols else np.zeros((mains.shape[0], 0))
    n_pos = mains.shape[0] - int(window) + 1
    pos = np.arange(0, max(n_pos, 0), int(step))
    x, y = classic_windows(mains, y_all, positions=pos, window=int(window), offset=offset)
    if x.shape[0] == 0:
        x = np.zeros((0, int(window), 1, 1), np.float32)
    ds = make_lowfreq_dataset(x, y, names, period_s=period_s, offset=offset,
                              info={"source_layout": rec.layout, "source": rec.path, "source_period_s": rec.period_s, "step": int(step)})
    ds.on_thresholds = [threshold_for(n) for n in names]
    return ds


def highfreq_to_dataset(
    rec: HighFreqRecording,
    *,
    setup: str = "T-P",
    targets: PowerRecording | None = None,
    appliances: Sequence[str] | str | None = None,
    max_gap_s: float = 10.0,
    window: int = 10,
    offset: int | None = None,
    step: int = 1,
) -> NilmDataset:
    """Frames -> features -> seq2point windows (inside bursts), raw features, own statistics.

    Windows of ``window`` frames (default 10) with the target at frame ``offset`` (default
    ``window // 2``), a window starting every ``step`` frames of a burst (default 1).

    Targets: per-frame ground truth carried by ``rec.power`` (synthetic recordings), else the
    series of ``targets`` (e.g. the house's REDD low_freq channels) held at each frame's time
    (the last sample at most ``max_gap_s`` = 10 s old; windows without one are dropped), else
    none (``y`` has zero columns).
    """
    su = parse_setup(setup)
    feats = extract_features(rec.v, rec.i, su)
    names, tgt = _frame_targets(rec, targets, appliances, max_gap_s)
    xs, ys = [], []
    cuts = np.flatnonzero(np.diff(rec.burst)) + 1  # bursts are contiguous runs of frames
    mid = check_offset(window, offset)
    if int(step) < 1:
        raise BadInputError(f"step {step} must be >= 1", "pass e.g. --step 1 (every window start)")
    for m in np.split(np.arange(rec.n_frames), cuts):
        x, y = windows_from_frames(feats[m], tgt[m], window=int(window), midpoint=mid)
        x, y = x[:: int(step)], y[:: int(step)]
        keep = np.all(np.isfinite(y), axis=1)
        xs.append(x[keep])
        ys.append(y[keep])
    x = np.concatenate(xs) if xs else np.zeros((0, int(window), su.n_features, 1), np.float32)
    y = np.concatenate(ys) if ys else np.zeros((0, len(names)), np.float32)
    if x.shape[0] == 0:
        raise DataError(f"{rec.path or 'the recording'}: no complete {window}-frame window with targets "
                        f"(frames {rec.n_frames}, bursts {np.unique(rec.burst).size})",
                        "pass a longer recording, targets that cover it, or a shorter --window")
    mean = [float(v) for v in y.mean(axis=0)] if y.shape[1] else []
    std = [float(max(v, 1e-3)) for v in y.std(axis=0)] if y.shape[1] else []
    return NilmDataset(
        x=x, y=y, appliances=names, feature_names=su.feature_names, applied_normalization=Normalization.A,
        train_stats=FeatureStats.fit(x), target_mean=mean, target_std=std,
        on_thresholds=[threshold_for(n) for n in names],
        info={"setup": su.name, "source_layout": rec.layout, "source": rec.path, "frames": rec.n_frames,
              "bursts": int(np.unique(rec.burst).size), "window_frames": int(window), "midpoint_index": mid,
              **({"step": int(step)} if int(step) != 1 else {}),
              "note": "statistics fitted on this set itself"},
    )


def _frame_targets(rec: HighFreqRecording, targets: PowerRecording | None, appliances: Sequence[str] | str | None,
                   max_gap_s: float) -> tuple[list[str], np.ndarray]:
    if rec.power:
        names = _select(list(rec.power), appliances, "the recording's ground truth")
        return names, np.stack([rec.power[n] for n in names], axis=1).astype(np.float64)
    if targets is None:
        return [], np.zeros((rec.n_frames, 0))
    names = _select(targets.names, appliances, targets.path)
    cols = []
    for n in names:
        s = targets.appliances[n]
        j = np.searchsorted(s.ts, rec.ts, side="right") - 1
        ok = (j >= 0) & (rec.ts - s.ts[np.maximum(j, 0)] <= max_gap_s)
        cols.append(np.where(ok, s.values[np.maximum(j, 0)], np.nan))
    return names, np.stack(cols, axis=1)


def load_layout(layout: str, path: str | Path, **options: object) -> PowerRecording | HighFreqRecording:
    """Dispatch on ``layout`` (one of ``LAYOUTS``) to its loader."""
    loaders = {"redd_low": load_redd_low, "redd_high": load_redd_high, "ukdale": load_ukdale,
               "refit": load_refit, "ukdale_excerpt": load_ukdale_excerpt}
    if layout in ("csv", "windows"):
        raise BadInputError(f"layout {layout!r} is converted straight to windows, not loaded as a recording",
                            f"use convert_dataset({layout!r}, ...) (nilmc data convert {layout} FILE --out data.npz)")
    try:
        fn = loaders[layout]
    except KeyError:
        raise BadInputError(f"unknown data layout {layout!r}", f"available: {', '.join(LAYOUTS)}") from None
    return fn(path, **options)  # type: ignore[operator]


def convert_dataset(
    layout: str,
    path: str | Path,
    *,
    out: str | Path | None = None,
    setup: str = "T-P",
    appliances: Sequence[str] | str | None = None,
    targets_path: str | Path | None = None,
    step: int = 1,
    window: int | None = None,
    offset: int | None = None,
    period_s: float | None = None,
    csv_options: CsvOptions | None = None,
) -> NilmDataset:
    """``nilmc data convert``: load ``path`` in ``layout`` and convert it; saved when ``out`` is given.

    High-frequency layouts (``redd_high``) become ``setup`` features (default T-P) in
    windows of ``window`` frames (default 10); ``targets_path`` may name the same house's
    REDD ``low_freq`` directory for per-appliance targets. Low-frequency layouts become
    windows of ``window`` samples (default 599) on a ``period_s`` grid (default 8 s), and
    ``csv`` files (options ``csv_options``, default :class:`CsvOptions`) the same, streamed. A window
    starts every ``step`` samples (default 1); its target is sample ``offset`` (default the
    midpoint). ``windows`` reads an npz of ready windows. Default ``appliances``: all.
    """
    if layout == "windows":
        for name, value in (("--window", window), ("--target-offset", offset), ("--period", period_s)):
            if value is not None:
                raise BadInputError(f"{name} does not apply to layout 'windows' (its windows are ready)", f"leave {name} out")
        ds = windows_npz_to_dataset(path, appliances=appliances, step=step, csv_options=csv_options)
    elif layout == "csv":
        from nilmc.calibration_data.csv_stream import csv_to_dataset

        ds = csv_to_dataset(path, options=csv_options or CsvOptions(), appliances=appliances, window=window or CLASSIC_WINDOW, step=step,
                            offset=offset, period_s=period_s)
    else:
        rec = load_layout(layout, path)
        if isinstance(rec, HighFreqRecording):
            if period_s is not None:
                raise BadInputError("--period does not apply to high-frequency layouts (a frame is one mains cycle)", "leave --period out")
            tg = load_redd_low(targets_path) if targets_path is not None else None
            ds = highfreq_to_dataset(rec, setup=setup, targets=tg, appliances=appliances, window=window or 10, offset=offset, step=step)
        else:
            ds = recording_to_lowfreq(rec, appliances=appliances, step=step, window=window or CLASSIC_WINDOW, offset=offset,
                                      period_s=CLASSIC_PERIOD_S if period_s is None else period_s)
    if out is not None:
        ds.save(out)
    return ds


@dataclass(frozen=True)
class CsvOptions:
    """How to read a plain CSV (layout ``csv``) and what its numbers are.

    ``aggregate``: the whole-house power column (default: one named aggregate, mains, main or
    total); ``timestamp``: the time column (default: one named timestamp, time, unix, ts, datetime
    or date, if any; unix s/ms/ns or ISO 8601 date-times; without one, rows are consecutive
    samples); ``normalized``: ``None`` (raw watts, default), ``"zscore"`` or ``"minmax"`` when the
    aggregate is pre-normalized with ``stats`` (``mean``/``std`` or ``minimum``/``maximum``,
    the training statistics it was normalized with); ``chunk_rows``: rows read at a time (default
    200000; the result does not depend on it); ``max_gap_s``: hold a reading across an empty bin at most
    this long (default max(60 s, 1.5 periods)). Also used by ``windows`` for ``normalized``/``stats``.
    """

    aggregate: str | None = None
    timestamp: str | None = None
    normalized: str | None = None
    stats: Mapping[str, float] = field(default_factory=dict)
    chunk_rows: int = 200_000
    max_gap_s: float | None = None


def windows_npz_to_dataset(path: str | Path, *, appliances: Sequence[str] | str | None = None, step: int = 1,
                           csv_options: CsvOptions | None = None) -> NilmDataset:
    """An npz of ready windows -> :class:`NilmDataset`: ``x`` ``(N, T)``, ``(N, T, F)`` or ``(N, T, F, 1)``,
    ``y`` ``(N,)`` or ``(N, A)`` in watts; optional string arrays ``appliances`` and ``feature_names``.

    ``appliances`` (default: the file's names, else ``appliance``, ``appliance_2``...) name the ``y``
    columns; every ``step``-th window is kept (default 1: all). Raw windows get statistics fitted on
    themselves; with ``csv_options.normalized`` the windows are stored as normalized with its ``stats``.
    """
    from nilmc.calibration_data.csv_stream import normalized_stats

    path = Path(path)
    if not path.is_file():
        raise DataError(f"window file {str(path)!r} does not exist", "check the path")
    try:
        with np.load(path, allow_pickle=False) as z:
            files = set(z.files)
            if not {"x", "y"} <= files:
                raise DataError(f"{str(path)!r} holds {sorted(files)}, a window file needs arrays x and y",
                                "save it with np.savez(path, x=windows, y=targets)")
            x, y = np.asarray(z["x"]), np.asarray(z["y"])
            file_apps = [str(a) for a in z["appliances"].ravel()] if "appliances" in files else None
            file_feats = [str(a) for a in z["feature_names"].ravel()] if "feature_names" in files else None
    except DataError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{str(path)!r} is not a readable npz of windows ({type(exc).__name__}: {exc})",
                        "save it with np.savez(path, x=windows, y=targets) (no pickled objects)") from None
    if x.ndim == 2:
        x = x[:, :, None, None]
    elif x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] != 1:
        raise DataError(f"{str(path)!r}: x has shape {x.shape}, expected (N, T), (N, T, F) or (N, T, F, 1)", "store one window per row")
    if y.ndim == 1:
        y = y[:, None]
    if y.ndim != 2 or y.shape[0] != x.shape[0]:
        raise DataError(f"{str(path)!r}: y has shape {y.shape} for {x.shape[0]} windows, expected (N,) or (N, A)",
                        "store one target per window and appliance (take the sequence's midpoint first)")
    if int(step) < 1:
        raise BadInputError(f"step {step} must be >= 1", "pass e.g. --step 1 (every window)")
    x, y = x[:: int(step)], y[:: int(step)]
    names = _window_names(appliances, file_apps, y.shape[1], path)
    feats = file_feats if file_feats and len(file_feats) == x.shape[2] else (
        ["mains.P"] if x.shape[2] == 1 else [f"feature_{k}" for k in range(x.shape[2])])
    opts = csv_options or CsvOptions()
    kind, stats = normalized_stats(opts.normalized, opts.stats, n_features=x.shape[2])
    x = x.astype(np.float32) if x.dtype == np.float64 else x
    y = y.astype(np.float32) if y.dtype == np.float64 else y
    return NilmDataset(
        x=x, y=y, appliances=names, feature_names=feats, applied_normalization=kind,
        train_stats=stats if stats is not None else FeatureStats.fit(np.asarray(x, np.float64)),
        target_mean=[float(v) for v in np.mean(y, axis=0, dtype=np.float64)],
        target_std=[float(max(v, 1e-3)) for v in np.std(y, axis=0, dtype=np.float64)],
        on_thresholds=[threshold_for(n) for n in names],
        info={"setting": "windows", "source_layout": "windows", "source": str(path), "window": int(x.shape[1]),
              "midpoint_index": int(x.shape[1]) // 2, "step": int(step), "note": "statistics fitted on this set itself"
              if stats is None else "pre-normalized with the given statistics"},
    )


def _window_names(appliances: Sequence[str] | str | None, file_apps: list[str] | None, n: int, path: Path) -> list[str]:
    if appliances is not None:
        names = _unique_names(appliances.split(",") if isinstance(appliances, str) else list(appliances))
    elif file_apps is not None:
        names = _unique_names(file_apps)
    else:
        names = _unique_names(["appliance"] * n)
    if len(names) != n:
        raise DataError(f"{len(names)} appliance name(s) for {n} target column(s) of {str(path)!r}",
                        f"pass --appliances with {n} comma-separated names")
    return names


# --------------------------------------------------------------------------- synthetic recordings
def synth_recording(seed: int, *, days: int = 1, period_s: float = 1.0, house: int = 0, first_day: int = 900_000,
                    appliances: Sequence[str] = TARGET_APPLIANCES, difficulty: Difficulty | None = None) -> PowerRecording:
    """A synthetic low-frequency recording (defaults: one day at 1 s, every target appliance)."""
    from nilmc.calibration_data.lowfreq import synth_lowfreq_day

    mains_all, dev_all = [], []
    for k in range(int(days)):
        m, dv = synth_lowfreq_day(seed, first_day + k, house=house, difficulty=difficulty, period_s=period_s)
        mains_all.append(m)
        dev_all.append(dv)
    mains = np.concatenate(mains_all)
    dev = np.concatenate(dev_all)
    ts = _EPOCH + np.arange(mains.shape[0]) * period_s
    apps = {a: Series(ts.copy(), dev[:, ALL_DEVICES.index(a)].astype(np.float64)) for a in appliances}
    return PowerRecording(Series(ts, mains), apps, "synthetic", f"synthetic(seed={seed})", period_s)


def synth_highfreq_recording(seed: int, *, n_bursts: int = 4, appliances: Sequence[str] = TARGET_APPLIANCES,
                             difficulty: Difficulty | None = None) -> HighFreqRecording:
    """A synthetic REDD-like high-frequency recording of ``n_bursts`` bursts (split ``test``).

    Burst ``k`` is stamped ``_EPOCH + 600 k`` s (bursts in time order, 10 min apart), so a
    written file reads back frame for frame."""
    vs, is_, ts, bid, pw = [], [], [], [], []
    for k, b in zip(range(int(n_bursts)), iter_bursts(seed, split="test", difficulty=difficulty)):
        vs.append(b.v)
        is_.append(b.i)
        ts.append(_EPOCH + k * 600.0 + np.arange(b.n_frames) / FRAMES_PER_SECOND)  # re-based: bursts 10 min apart, in order
        bid.append(np.full(b.n_frames, k))
        pw.append(b.targets(appliances))
    p = np.concatenate(pw)
    return HighFreqRecording(np.concatenate(ts), np.concatenate(vs), np.concatenate(is_), np.concatenate(bid),
                             layout="synthetic", path=f"synthetic(seed={seed})",
                             power={a: p[:, k].astype(np.float64) for k, a in enumerate(appliances)})


# --------------------------------------------------------------------------- writers
def _fmt_rows(ts: np.ndarray, cols: Sequence[np.ndarray], ts_fmt: str = "{:.0f}", val_fmt: str = "{:.2f}", sep: str = " ") -> str:
    lines = []
    for k in range(ts.shape[0]):
        lines.append(sep.join([ts_fmt.format(ts[k])] + [val_fmt.format(c[k]) for c in cols]))
    return "\n".join(lines) + "\n"


def write_redd_low(house_dir: str | Path, rec: PowerRecording, *, shuffle_seed: int | None = None) -> Path:
    """Write REDD low_freq files: channels 1-2 'mains' (half the aggregate each), then one per appliance.
    ``shuffle_seed`` scrambles line order and duplicates a few lines (as real REDD files are)."""
    d = Path(house_dir)
    names = ["mains", "mains"] + [n for n in rec.names]
    atomic_write_text(d / "labels.dat", "".join(f"{k} {n}\n" for k, n in enumerate(names, start=1)))
    series = [Series(rec.aggregate.ts, rec.aggregate.values / 2)] * 2 + [rec.appliances[n] for n in rec.names]
    for k, s in enumerate(series, start=1):
        ts, v = s.ts, s.values
        if shuffle_seed is not None:
            rng = np.random.default_rng([shuffle_seed, k])
            dup = rng.choice(ts.size, size=max(1, ts.size // 50), replace=False)
            order = rng.permutation(np.concatenate([np.arange(ts.size), dup]))
            ts, v = ts[order], v[order]
        atomic_write_text(d / f"channel_{k}.dat", _fmt_rows(ts, [v]))
    return d


def write_redd_high(house_dir: str | Path, rec: HighFreqRecording, *, counts: np.ndarray | None = None) -> Path:
    """Write REDD high_freq files. Each frame becomes one line with cycle count 1, unless
    ``counts`` (per frame) is given; then a frame stands for that many cycles (and the
    following timestamps are spaced accordingly). Current leg 1 = i, leg 2 = 0."""
    d = Path(house_dir)
    n = rec.n_frames
    c = np.ones(n, np.int64) if counts is None else np.asarray(counts, np.int64)
    ts = rec.ts.copy()
    if counts is not None:  # re-space: the line after a count-k line starts k cycles later
        for b in np.unique(rec.burst):
            m = np.flatnonzero(rec.burst == b)
            ts[m] = ts[m[0]] + np.concatenate([[0], np.cumsum(c[m])[:-1]]) / FRAMES_PER_SECOND
    for name, wave in (("voltage.dat", rec.v), ("current_1.dat", rec.i), ("current_2.dat", np.zeros_like(rec.i))):
        body = io.StringIO()
        np.savetxt(body, np.column_stack([ts, c, wave.astype(np.float64)]), fmt=["%.6f", "%d"] + ["%.5g"] * SAMPLES_PER_FRAME)
        atomic_write_text(d / name, body.getvalue())
    return d


def write_ukdale(house_dir: str | Path, rec: PowerRecording, *, mains_1s: bool = True) -> Path:
    """Write UK-DALE files: channel 1 'aggregate' and one channel per appliance (every 6th sample
    of a 1-s recording = 6 s), plus ``mains.dat`` at 1 s (active, apparent, Vrms) when ``mains_1s``."""
    d = Path(house_dir)
    names = ["aggregate"] + rec.names
    atomic_write_text(d / "labels.dat", "".join(f"{k} {n}\n" for k, n in enumerate(names, start=1)))
    series = [rec.aggregate] + [rec.appliances[n] for n in rec.names]
    for k, s in enumerate(series, start=1):
        atomic_write_text(d / f"channel_{k}.dat", _fmt_rows(s.ts[::6], [s.values[::6]], val_fmt="{:.0f}"))
    if mains_1s:
        p = rec.aggregate.values
        atomic_write_text(d / "mains.dat", _fmt_rows(rec.aggregate.ts, [p, p * 1.05 + 20.0, np.full_like(p, 240.0)]))
    return d


def write_refit(csv_path: str | Path, rec: PowerRecording, *, issues: bool = True) -> Path:
    """Write a REFIT ``CLEAN_House{N}.csv`` (up to 9 appliances; ``Issues`` column of zeros)."""
    import datetime as _dt

    names = rec.names[:9]
    header = ["Time", "Unix", "Aggregate"] + [f"Appliance{k}" for k in range(1, len(names) + 1)] + (["Issues"] if issues else [])
    ts = rec.aggregate.ts
    lines = [",".join(header)]
    cols = [rec.aggregate.values] + [rec.appliances[n].values for n in names]
    for k in range(ts.shape[0]):
        stamp = _dt.datetime.fromtimestamp(float(ts[k]), tz=_dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
        row = [stamp, f"{ts[k]:.0f}"] + [f"{c[k]:.0f}" for c in cols] + (["0"] if issues else [])
        lines.append(",".join(row))
    return atomic_write_text(csv_path, "\n".join(lines) + "\n")


def write_ukdale_excerpt(csv_path: str | Path, rec: PowerRecording) -> Path:
    """Write the excerpt layout: ``unix_ns``, ``('name', 1)`` columns, ``mains``, ``synthetic mains``."""
    names = rec.names
    header = ["unix_ns"] + [f"\"('{n.replace('_', ' ')}', 1)\"" for n in names] + ["mains", "synthetic mains"]
    ts = rec.aggregate.ts
    synth_mains = np.sum([rec.appliances[n].values for n in names], axis=0) if names else np.zeros_like(ts)
    cols = [rec.appliances[n].values for n in names] + [rec.aggregate.values, synth_mains]
    lines = [",".join(header)]
    for k in range(ts.shape[0]):
        lines.append(",".join([f"{int(round(ts[k] * 1e9))}"] + [f"{c[k]:.4f}" for c in cols]))
    return atomic_write_text(csv_path, "\n".join(lines) + "\n")

"""Plain CSV recordings -> seq2point windows, streamed (``nilmc data convert csv``).

A CSV with a header line: an optional timestamp column, an aggregate (whole-house power)
column and appliance columns, one reading per row. The file is read ``chunk_rows`` rows at
a time and windows are cut as the rows arrive, so the file may be larger than memory (the
windows themselves must fit). The result does not depend on the chunk size: the resampler
(:func:`nilmc.calibration_data.lowfreq.resample_bins`) emits a bin only once a later row
shows it is complete, and the windower keeps the last ``window - 1`` samples across chunks.

With a timestamp column the readings are resampled onto a regular grid of ``period_s``
(default: the median spacing of the first 1000 rows): a bin's readings are averaged, an
empty bin holds the last reading at most ``max_gap_s`` old, else it is a gap and windows
touching it are dropped. Rows must be in time order. Without one, each row is one sample.
Empty cells and ``nan`` are missing readings; ``inf`` or text is an error naming the line.
"""
from __future__ import annotations

import csv
import math
from collections.abc import Iterator, Mapping, Sequence
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from nilmc.calibration_data.dataset import NilmDataset
from nilmc.calibration_data.lowfreq import check_offset, classic_windows, resample_bins
from nilmc.calibration_data.normalization import FeatureStats, Normalization
from nilmc.compiler.errors import BadInputError, DataError

if TYPE_CHECKING:
    from nilmc.calibration_data.loaders import CsvOptions

TIMESTAMP_NAMES = ("timestamp", "time", "unix", "ts", "datetime", "date")
AGGREGATE_NAMES = ("aggregate", "mains", "main", "total")
ESTIMATE_ROWS = 1000  # rows whose median spacing is the default period
_NEED = {Normalization.C: ("mean", "std"), Normalization.B: ("minimum", "maximum"), Normalization.D: ("minimum", "maximum"),
         Normalization.E: ("minimum", "maximum")}
_STAT_FLAG = {"mean": "--mean", "std": "--std", "minimum": "--min", "maximum": "--max"}


# --------------------------------------------------------------------------- statistics of pre-normalized data
def normalized_stats(kind: str | None, stats: Mapping[str, float], *, n_features: int) -> tuple[Normalization, FeatureStats | None]:
    """``--normalized KIND`` with its statistics -> (applied normalization, statistics); ``(A, None)`` for raw data."""
    if kind is None:
        if stats:
            raise BadInputError(f"statistics {sorted(stats)} given for raw data", "add --normalized zscore|minmax, or leave the statistics out")
        return Normalization.A, None
    norm = Normalization.parse(kind)
    need = _NEED.get(norm)
    if need is None:
        raise BadInputError(f"--normalized {kind!r} is not a kind a CSV can be pre-normalized with", "use --normalized zscore or minmax")
    missing = [_STAT_FLAG[k] for k in need if stats.get(k) is None]
    if missing:
        raise BadInputError(f"--normalized {kind} needs {' and '.join(missing)} (the statistics the data were normalized with)",
                            f"pass {' '.join(f'{m} VALUE' for m in missing)}")
    if norm is Normalization.C and not float(stats["std"]) > 0:
        raise BadInputError(f"--std {stats['std']} must be > 0", "pass the training std the data were normalized with")
    return norm, FeatureStats.partial(**{k: [float(stats[k])] * n_features for k in need})


# --------------------------------------------------------------------------- reading
class _Table:
    """The header and the columns a conversion reads."""

    def __init__(self, path: Path, options: CsvOptions, appliances: Sequence[str] | str | None) -> None:
        from nilmc.calibration_data.loaders import _unique_names

        self.path = path
        header_line = _first_line(path)
        counts = {d: header_line.count(d) for d in (",", ";", "\t")}
        self.delimiter = max(counts, key=lambda d: counts[d])
        self.header = [h.strip() for h in next(csv.reader([header_line], delimiter=self.delimiter))]
        if len(self.header) < 2:
            raise DataError(f"{path}: line 1 has {len(self.header)} column(s): {header_line.strip()[:120]!r}",
                            "a CSV needs a header line naming at least an aggregate and one more column")
        low = [h.lower() for h in self.header]
        self.ts_col = self._find(options.timestamp, TIMESTAMP_NAMES, low, "--timestamp", required=False)
        self.agg_col = self._find(options.aggregate, AGGREGATE_NAMES, low, "--aggregate", required=True)
        if appliances is None:
            cols = [k for k in range(len(self.header)) if k not in (self.ts_col, self.agg_col)]
        else:
            wanted = appliances.split(",") if isinstance(appliances, str) else list(appliances)
            cols = [self._column(w.strip(), low, "--appliances") for w in wanted]
        self.app_cols = cols
        self.names = _unique_names([self.header[k] for k in cols])

    def _find(self, given: str | None, defaults: Sequence[str], low: list[str], flag: str, *, required: bool) -> int | None:
        if given is not None:
            return self._column(given, low, flag)
        for name in defaults:
            if name in low:
                return low.index(name)
        if required:
            raise DataError(f"{self.path}: no column named {'/'.join(defaults)} (columns: {', '.join(self.header)[:160]})",
                            f"name the aggregate column with {flag} COL")
        return None

    def _column(self, name: str, low: list[str], flag: str) -> int:
        if name.lower() in low:
            return low.index(name.lower())
        raise DataError(f"{flag} {name!r} is not a column of {str(self.path)!r}", f"available: {', '.join(self.header)[:200]}")

    @property
    def value_cols(self) -> list[int]:
        return [int(self.agg_col), *self.app_cols]  # type: ignore[arg-type]


def _first_line(path: Path) -> str:
    if not path.exists():
        raise DataError(f"CSV file {str(path)!r} does not exist", "check the path")
    if path.is_dir():
        raise DataError(f"{str(path)!r} is a directory, expected a CSV file", "point at the file")
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            first = fh.readline()
    except UnicodeDecodeError as exc:
        raise DataError(f"{str(path)!r} is not a text file ({exc.reason} at byte {exc.start})", "pass a plain-text CSV") from None
    except OSError as exc:
        raise DataError(f"cannot read {str(path)!r} ({exc.strerror})", "check the file's permissions") from None
    if not first.strip():
        raise DataError(f"{str(path)!r} is empty or starts with a blank line", "the first line must name the columns")
    return first


def iter_blocks(table: _Table, chunk_rows: int) -> Iterator[tuple[np.ndarray | None, np.ndarray]]:
    """Blocks of at most ``chunk_rows`` rows: ``(timestamps in unix seconds or None, values (n, 1 + A))``."""
    ts_kind: dict[str, object] = {}
    try:
        with open(table.path, encoding="utf-8", newline="") as fh:
            fh.readline()
            lineno = 2
            while True:
                lines = list(islice(fh, chunk_rows))
                if not lines:
                    return
                block = _parse_block(table, lines, lineno, ts_kind)
                lineno += len(lines)
                if block is not None:
                    yield block
    except UnicodeDecodeError as exc:
        raise DataError(f"{str(table.path)!r} is not a text file ({exc.reason})", "pass a plain-text CSV") from None


def _parse_block(table: _Table, lines: list[str], first_lineno: int, ts_kind: dict[str, object]) -> tuple[np.ndarray | None, np.ndarray] | None:
    rows, linenos = [], []
    width = len(table.header)
    for k, row in enumerate(csv.reader(lines, delimiter=table.delimiter)):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != width:
            raise DataError(f"{table.path}: line {first_lineno + k} has {len(row)} fields, expected {width}: {lines[k].strip()[:120]!r}",
                            "fix or remove that line")
        rows.append(row)
        linenos.append(first_lineno + k)
    if not rows:
        return None
    values = np.stack([_numbers(table, [r[c] for r in rows], linenos, table.header[c]) for c in table.value_cols], axis=1)
    ts = None if table.ts_col is None else _timestamps(table, [r[table.ts_col] for r in rows], linenos, ts_kind)
    return ts, values


def _numbers(table: _Table, cells: list[str], linenos: list[int], column: str) -> np.ndarray:
    arr = np.char.strip(np.asarray(cells, dtype=str))
    arr = np.where(arr == "", "nan", arr)
    try:
        out = arr.astype(np.float64)
    except ValueError:
        for cell, lineno in zip(arr, linenos):
            try:
                float(cell)
            except ValueError:
                raise DataError(f"{table.path}: line {lineno}: column {column!r} holds {str(cell)[:40]!r}, not a number",
                                "fix or remove that line (an empty cell is a missing reading)") from None
        raise
    if np.isinf(out).any():
        lineno = linenos[int(np.flatnonzero(np.isinf(out))[0])]
        raise DataError(f"{table.path}: line {lineno}: column {column!r} is infinite", "fix or remove that line")
    return out


def _timestamps(table: _Table, cells: list[str], linenos: list[int], kind: dict[str, object]) -> np.ndarray:
    arr = np.char.strip(np.asarray(cells, dtype=str))
    if "numeric" not in kind:
        try:
            float(arr[0])
            kind["numeric"] = True
        except ValueError:
            kind["numeric"] = False
    if kind["numeric"]:
        try:
            ts = arr.astype(np.float64)
        except ValueError:
            bad = next((c, n) for c, n in zip(arr, linenos) if not _is_float(c))
            raise DataError(f"{table.path}: line {bad[1]}: timestamp {bad[0][:40]!r} is not a number like the first rows'",
                            "use one timestamp format for the whole file") from None
        if "scale" not in kind:  # unix s, ms, us or ns, told apart by the first row's magnitude
            first = abs(float(ts[0]))
            kind["scale"] = 1e-9 if first > 1e17 else 1e-6 if first > 1e14 else 1e-3 if first > 1e11 else 1.0
        ts = ts * float(kind["scale"])  # type: ignore[arg-type]
    else:
        try:
            ts = np.asarray(arr, dtype="datetime64[ns]").astype(np.int64).astype(np.float64) / 1e9
        except ValueError:
            bad = next(((c, n) for c, n in zip(arr, linenos) if not _is_datetime(c)), (arr[0], linenos[0]))
            raise DataError(f"{table.path}: line {bad[1]}: timestamp {str(bad[0])[:40]!r} is neither a number nor an ISO 8601 date-time",
                            "use unix seconds (or ms/ns) or YYYY-MM-DD HH:MM:SS, or name another --timestamp column") from None
    if not np.all(np.isfinite(ts)):
        lineno = linenos[int(np.flatnonzero(~np.isfinite(ts))[0])]
        raise DataError(f"{table.path}: line {lineno}: the timestamp is missing", "give every row a timestamp")
    return ts


def _is_float(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _is_datetime(text: str) -> bool:
    try:
        np.datetime64(text, "ns")
        return True
    except ValueError:
        return False


# --------------------------------------------------------------------------- streaming stages
class StreamResampler:
    """Resample timestamped rows onto ``t0 + k * period_s`` block by block (the rule of
    :func:`nilmc.calibration_data.lowfreq.resample_mean`, whose grid starts at the first
    timestamp floored to the period and ends at the last timestamp's bin)."""

    def __init__(self, period_s: float, max_gap_s: float, n_cols: int, source: str) -> None:
        self.period, self.max_gap, self.source = float(period_s), float(max_gap_s), source
        self.t0: float | None = None
        self.next_k = 0
        self.last_ts = -math.inf
        self.pend_ts = np.zeros(0)
        self.pend = np.zeros((0, n_cols))
        self.ctx_ts = np.full(n_cols, np.nan)  # the last finite reading already let go, per column (for holds)
        self.ctx = np.full(n_cols, np.nan)

    def feed(self, ts: np.ndarray, values: np.ndarray) -> np.ndarray:
        """Rows of a block -> the bins it completed, ``(n_bins, n_cols)`` (NaN = gap)."""
        if ts[0] < self.last_ts or np.any(np.diff(ts) < 0):
            i = 0 if ts[0] < self.last_ts else int(np.flatnonzero(np.diff(ts) < 0)[0]) + 1
            raise DataError(f"{self.source}: the rows are not in time order (timestamp {ts[i]:.6g} after {max(self.last_ts, ts[max(i - 1, 0)]):.6g})",
                            "sort the file by its timestamp column first (e.g. sort -t, -k1,1 -g after the header)")
        self.last_ts = float(ts[-1])
        if self.t0 is None:
            self.t0 = float(np.floor(ts[0] / self.period) * self.period)
        all_ts = np.concatenate([self.pend_ts, ts])
        all_v = np.concatenate([self.pend, values])
        k = np.floor((all_ts - self.t0) / self.period).astype(np.int64)
        k_last = int(k[-1])
        out = self._emit(all_ts, all_v, k_last)
        done = k < k_last
        self._remember(all_ts[done], all_v[done])
        self.pend_ts, self.pend = all_ts[~done], all_v[~done]
        return out

    def finish(self) -> np.ndarray:
        """The bins still open (through the last timestamp's bin)."""
        if self.t0 is None or self.pend_ts.size == 0:
            return np.zeros((0, self.pend.shape[1]))
        k_last = int(np.floor((self.pend_ts[-1] - self.t0) / self.period))
        out = self._emit(self.pend_ts, self.pend, k_last + 1)
        self.pend_ts, self.pend = np.zeros(0), np.zeros((0, self.pend.shape[1]))
        return out

    def _emit(self, ts: np.ndarray, values: np.ndarray, k_hi: int) -> np.ndarray:
        n = k_hi - self.next_k
        if n <= 0:
            return np.zeros((0, values.shape[1]))
        cols = []
        for c in range(values.shape[1]):
            has_ctx = np.isfinite(self.ctx_ts[c])
            tc = np.concatenate([[self.ctx_ts[c]], ts]) if has_ctx else ts
            vc = np.concatenate([[self.ctx[c]], values[:, c]]) if has_ctx else values[:, c]
            _, v = resample_bins(tc, vc, t0=float(self.t0), period_s=self.period, k_lo=self.next_k, k_hi=k_hi,  # type: ignore[arg-type]
                                 max_gap_s=self.max_gap)
            cols.append(v)
        self.next_k = k_hi
        return np.stack(cols, axis=1)

    def _remember(self, ts: np.ndarray, values: np.ndarray) -> None:
        for c in range(values.shape[1]):
            good = np.flatnonzero(np.isfinite(values[:, c]))
            if good.size:
                self.ctx_ts[c], self.ctx[c] = ts[good[-1]], values[good[-1], c]


class StreamWindower:
    """Cut windows from regular rows (column 0 the aggregate, the rest targets) as they arrive:
    a window starts at every global sample index divisible by ``step``."""

    def __init__(self, window: int, step: int, offset: int | None) -> None:
        self.window, self.step, self.offset = int(window), int(step), offset
        self.start = 0  # global index of buf[0]
        self.buf: np.ndarray | None = None
        self.xs: list[np.ndarray] = []
        self.ys: list[np.ndarray] = []
        self.samples = 0

    def feed(self, rows: np.ndarray) -> None:
        if rows.shape[0] == 0:
            return
        self.samples += rows.shape[0]
        buf = rows if self.buf is None else np.concatenate([self.buf, rows])
        end = self.start + buf.shape[0]
        first = -(-self.start // self.step) * self.step
        pos = np.arange(first, end - self.window + 1, self.step) - self.start
        if pos.size:
            x, y = classic_windows(buf[:, 0], buf[:, 1:], window=self.window, positions=pos, offset=self.offset)
            self.xs.append(x)
            self.ys.append(y)
        drop = max(buf.shape[0] - (self.window - 1), 0)
        self.buf, self.start = buf[drop:], self.start + drop

    def result(self, n_targets: int) -> tuple[np.ndarray, np.ndarray]:
        if not self.xs:
            return np.zeros((0, self.window, 1, 1), np.float32), np.zeros((0, n_targets), np.float32)
        return np.concatenate(self.xs), np.concatenate(self.ys)


# --------------------------------------------------------------------------- the conversion
def csv_to_dataset(
    path: str | Path,
    *,
    options: CsvOptions,
    appliances: Sequence[str] | str | None = None,
    window: int = 599,
    step: int = 1,
    offset: int | None = None,
    period_s: float | None = None,
) -> NilmDataset:
    """A plain CSV (module doc) -> windows ``(N, window, 1, 1)`` of the aggregate and targets ``(N, A)``.

    Defaults: every column but the timestamp and the aggregate is an appliance; windows of 599
    samples starting every ``step`` = 1 samples, target at ``offset`` = the midpoint; ``period_s``
    the median spacing of the first 1000 rows (timestamped files) or none (one row = one sample).
    Raw data get statistics fitted on the windows; pre-normalized ones (``options.normalized``) keep
    the given statistics and are marked as normalized.
    """
    path = Path(path)
    mid = check_offset(window, offset)
    if int(step) < 1:
        raise BadInputError(f"step {step} must be >= 1", "pass e.g. --step 1 (every window start)")
    if int(options.chunk_rows) < 1:
        raise BadInputError(f"chunk_rows {options.chunk_rows} must be >= 1", "pass e.g. 200000")
    if period_s is not None and not float(period_s) > 0:
        raise BadInputError(f"--period {period_s} must be > 0 seconds", "pass e.g. --period 8")
    table = _Table(path, options, appliances)
    kind, stats = normalized_stats(options.normalized, options.stats, n_features=1)
    blocks = iter_blocks(table, int(options.chunk_rows))
    windower = StreamWindower(window, step, offset)
    rows = 0
    if table.ts_col is None:
        for _, values in blocks:
            rows += values.shape[0]
            windower.feed(values)
        period = period_s
    else:
        head, head_rows = [], 0
        for block in blocks:  # enough rows to estimate the period, whatever the chunk size
            head.append(block)
            head_rows += block[1].shape[0]
            if head_rows >= ESTIMATE_ROWS:
                break
        if not head:
            raise DataError(f"{str(path)!r} has a header but no data rows", "the file must hold data rows")
        period = float(period_s) if period_s is not None else _median_period(np.concatenate([b[0] for b in head])[:ESTIMATE_ROWS], path)
        gap = max(60.0, 1.5 * period) if options.max_gap_s is None else float(options.max_gap_s)
        resampler = StreamResampler(period, gap, 1 + len(table.app_cols), str(path))
        for ts, values in [*head, *blocks]:  # type: ignore[list-item]
            rows += values.shape[0]
            windower.feed(resampler.feed(ts, values))
        windower.feed(resampler.finish())
    if rows == 0:
        raise DataError(f"{str(path)!r} has a header but no data rows", "the file must hold data rows")
    x, y = windower.result(len(table.app_cols))
    if x.shape[0] == 0:
        raise DataError(f"{str(path)!r}: no complete {window}-sample window could be cut ({windower.samples} samples, gaps dropped)",
                        "pass a longer recording, a shorter --window, or a larger --period")
    return _dataset(x, y, table, kind, stats, path=path, window=window, step=step, mid=mid, period=period, rows=rows)


def _median_period(ts: np.ndarray, path: Path) -> float:
    d = np.diff(ts)
    d = d[d > 0]
    if d.size == 0:
        raise DataError(f"{str(path)!r}: the first rows' timestamps do not advance", "pass --period SECONDS")
    return float(np.median(d))


def _dataset(x: np.ndarray, y: np.ndarray, table: _Table, kind: Normalization, stats: FeatureStats | None, *, path: Path,
             window: int, step: int, mid: int, period: float | None, rows: int) -> NilmDataset:
    from nilmc.calibration_data.loaders import threshold_for

    return NilmDataset(
        x=x, y=y, appliances=list(table.names), feature_names=["mains.P"], applied_normalization=kind,
        train_stats=stats if stats is not None else FeatureStats.fit(x),
        target_mean=[float(v) for v in y.mean(axis=0, dtype=np.float64)] if y.shape[1] else [],
        target_std=[float(max(v, 1e-3)) for v in y.std(axis=0, dtype=np.float64)] if y.shape[1] else [],
        on_thresholds=[threshold_for(n) for n in table.names],
        info={"setting": "lowfreq-windows", "setup": "LF-P", "source_layout": "csv", "source": str(path), "rows": int(rows),
              "aggregate_column": table.header[int(table.agg_col)],  # type: ignore[arg-type]
              "appliance_columns": [table.header[k] for k in table.app_cols],
              "timestamp_column": None if table.ts_col is None else table.header[table.ts_col],
              "window": int(window), "step": int(step), "target_offset": int(mid), "midpoint_index": int(mid),
              "period_s": period, "units": "W" if kind is Normalization.A else f"aggregate normalized ({kind.value}); targets W",
              "note": "statistics fitted on this set itself" if stats is None else "pre-normalized with the given statistics"},
    )


__all__ = ["StreamResampler", "StreamWindower", "csv_to_dataset", "iter_blocks", "normalized_stats"]

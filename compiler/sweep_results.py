"""The results of ``nilmc sweep``: one SQLite file (stdlib ``sqlite3``, never pickle) and its Table 6/7 layouts.

Tables:

* ``cells`` — one row per grid cell (setup, normalization, appliance, seed, epochs, budget), keyed by the cell's
  content hash: its status (``done`` or ``failed`` with the error), the FP32 reference metrics, the evaluation
  set's true energy, the timings;
* ``results`` — one row per cell and target: the gate's verdict, how it was verified, EACC, ΔEACC, MAE, output
  SQNR, size, the error of a target that could not be built;
* ``details`` — per cell and target, JSON for the report: per-layer ranges and saturation, overflow findings
  and the power trace recorded in the target's manifest.

Table 6 of seed 003 is EACC per feature setup × normalization; Table 7 is EACC and its loss vs FP32 per
framework/precision, for the T-P model and averaged over every setup that is not voltage-only, under z-score (C).
Seed 003's EACC runs over all appliances at once (``1 − Σ_t Σ_m |p̂−p| / (2 Σ_t Σ_m p)``); a nilmc model
disaggregates one appliance, so a cell of these tables combines the grid's appliances exactly that way from each
model's ``Σ|p̂−p|`` (MAE × windows) and ``Σp`` (the evaluation set's true energy), then averages over seeds.
"""
from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from nilmc.compiler.errors import BadInputError, DataError

__all__ = ["ResultsDB", "table6", "table7", "format_table6", "format_table7", "SCHEMA_VERSION", "NORMALIZATION_ORDER"]

SCHEMA_VERSION = 1
NORMALIZATION_ORDER = ("A", "B", "C", "D", "E")
FP32_ROW = "FP32 reference (onnxruntime)"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS cells (
    cell_key TEXT PRIMARY KEY, label TEXT NOT NULL, setup TEXT, normalization TEXT, appliance TEXT, seed INTEGER,
    epochs INTEGER, budget TEXT, model TEXT, status TEXT NOT NULL, error TEXT, error_type TEXT, exit_code INTEGER,
    parameters INTEGER, eval_windows INTEGER, sum_truth_w REAL, fp32_eacc REAL, fp32_mae_w REAL, fp32_f1 REAL,
    fp32_sae REAL, fp32_nde REAL, data_s REAL, train_s REAL, compile_s REAL, total_s REAL, nilmc_version TEXT
);
CREATE TABLE IF NOT EXISTS results (
    cell_key TEXT NOT NULL, position INTEGER NOT NULL, target TEXT NOT NULL, backend TEXT, precision TEXT,
    status TEXT NOT NULL, passed INTEGER NOT NULL, verification TEXT, eacc REAL, delta_eacc_pts REAL, mae_w REAL,
    delta_mae_w REAL, output_sqnr_db REAL, sum_abs_err_w REAL, size_bytes INTEGER, error TEXT, cause TEXT,
    PRIMARY KEY (cell_key, target)
);
CREATE TABLE IF NOT EXISTS details (cell_key TEXT NOT NULL, target TEXT NOT NULL, json TEXT NOT NULL, PRIMARY KEY (cell_key, target));
"""

CELL_COLUMNS = ("cell_key", "label", "setup", "normalization", "appliance", "seed", "epochs", "budget", "model", "status", "error",
                "error_type", "exit_code", "parameters", "eval_windows", "sum_truth_w", "fp32_eacc", "fp32_mae_w", "fp32_f1", "fp32_sae",
                "fp32_nde", "data_s", "train_s", "compile_s", "total_s", "nilmc_version")
RESULT_COLUMNS = ("cell_key", "position", "target", "backend", "precision", "status", "passed", "verification", "eacc", "delta_eacc_pts",
                  "mae_w", "delta_mae_w", "output_sqnr_db", "sum_abs_err_w", "size_bytes", "error", "cause")
# Columns that differ from run to run (wall time): left out when two runs are compared cell by cell.
TIMING_COLUMNS = ("data_s", "train_s", "compile_s", "total_s")


def _finite(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


class ResultsDB:
    """The sweep's SQLite file. Each finished cell is committed at once (an interrupted sweep keeps what it did)."""

    def __init__(self, path: str | Path, *, create: bool = True) -> None:
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise DataError(f"no sweep results at {str(self.path)!r}", "pass the results.sqlite a `nilmc sweep GRID --out DIR` wrote")
        try:
            self.conn = sqlite3.connect(self.path)
            self.conn.executescript(_SCHEMA)
            version = self.conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        except sqlite3.DatabaseError as exc:
            raise DataError(f"{str(self.path)!r} is not a nilmc sweep database ({exc})", "pass the results.sqlite `nilmc sweep` wrote, "
                            "or a new --out directory") from None
        if version is None:
            with self.conn:
                self.conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        elif int(version[0]) != SCHEMA_VERSION:
            raise DataError(f"{str(self.path)!r} has sweep schema {version[0]}, this nilmc writes {SCHEMA_VERSION}",
                            "pass a new --out directory")

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> ResultsDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ writing
    def set_meta(self, key: str, value: Any) -> None:
        with self.conn:
            self.conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value, sort_keys=True)))

    def meta(self, key: str) -> Any:
        row = self.conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def status(self, key: str) -> str | None:
        row = self.conn.execute("SELECT status FROM cells WHERE cell_key=?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def record(self, cell: Mapping[str, Any]) -> None:
        """Write one finished cell (a dict from :func:`nilmc.training.sweep.run_cell`) and its targets, in one transaction."""
        fp32 = cell.get("fp32") or {}
        timings = cell.get("timings") or {}
        values = dict(cell)
        values.update({"cell_key": cell["key"], "fp32_eacc": fp32.get("eacc"), "fp32_mae_w": fp32.get("mae"), "fp32_f1": fp32.get("f1"),
                       "fp32_sae": fp32.get("sae"), "fp32_nde": fp32.get("nde"), **{k: timings.get(k) for k in TIMING_COLUMNS}})
        row = tuple(_finite(values.get(c)) for c in CELL_COLUMNS)
        with self.conn:
            self.conn.execute("DELETE FROM results WHERE cell_key=?", (cell["key"],))
            self.conn.execute("DELETE FROM details WHERE cell_key=?", (cell["key"],))
            self.conn.execute(f"INSERT OR REPLACE INTO cells ({', '.join(CELL_COLUMNS)}) VALUES ({', '.join('?' * len(CELL_COLUMNS))})", row)
            for i, t in enumerate(cell.get("targets") or ()):
                r = {**t, "cell_key": cell["key"], "position": i, "passed": int(bool(t.get("passed")))}
                self.conn.execute(f"INSERT INTO results ({', '.join(RESULT_COLUMNS)}) VALUES ({', '.join('?' * len(RESULT_COLUMNS))})",
                                  tuple(_finite(r.get(c)) for c in RESULT_COLUMNS))
            for target, detail in (cell.get("details") or {}).items():
                self.conn.execute("INSERT INTO details VALUES (?, ?, ?)", (cell["key"], target, json.dumps(detail, sort_keys=True)))

    # ------------------------------------------------------------------ reading
    def _rows(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        cur = self.conn.execute(sql, tuple(args))
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r)) for r in cur.fetchall()]

    def cells(self, keys: Iterable[str] | None = None) -> list[dict[str, Any]]:
        rows = self._rows("SELECT * FROM cells ORDER BY label")
        if keys is not None:
            wanted = set(keys)
            rows = [r for r in rows if r["cell_key"] in wanted]
        return rows

    def results(self, keys: Iterable[str] | None = None) -> list[dict[str, Any]]:
        rows = self._rows("SELECT * FROM results ORDER BY cell_key, position")
        if keys is not None:
            wanted = set(keys)
            rows = [r for r in rows if r["cell_key"] in wanted]
        return rows

    def details(self, key: str) -> dict[str, Any]:
        return {r["target"]: json.loads(r["json"]) for r in self._rows("SELECT target, json FROM details WHERE cell_key=?", (key,))}


# ------------------------------------------------------------------ Table 6 / Table 7
def _setup_order(setup: str) -> tuple[int, str]:
    from nilmc.calibration_data.features import ALL_SETUPS

    return (ALL_SETUPS.index(setup), setup) if setup in ALL_SETUPS else (len(ALL_SETUPS), setup)


def setup_number(setup: str) -> int | None:
    """Seed 003's setup number (Table 6: 1 = T-V ... 20 = TFHF-VIP), None for a setup outside it."""
    from nilmc.calibration_data.features import ALL_SETUPS

    return ALL_SETUPS.index(setup) + 1 if setup in ALL_SETUPS else None


def _combined(parts: Sequence[tuple[float | None, float | None]]) -> float | None:
    """EACC over appliances from (Σ|p̂−p|, Σp) per appliance: ``1 − ΣA / (2 ΣP)``; None when one is missing."""
    errs = [a for a, _ in parts if a is not None]
    truths = [p for _, p in parts if p is not None]
    if not parts or len(errs) != len(parts) or len(truths) != len(parts):
        return None
    total = sum(truths)
    return None if total <= 0 else 1.0 - sum(errs) / (2.0 * total)


def _mean(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    if not values or len(known) != len(values):
        return None
    return sum(known) / len(known)


def _groups(cells: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], dict[tuple[Any, ...], list[Mapping[str, Any]]]]:
    """(setup, normalization) -> (seed, epochs, budget) -> the cells of each appliance."""
    out: dict[tuple[str, str], dict[tuple[Any, ...], list[Mapping[str, Any]]]] = {}
    for c in cells:
        out.setdefault((c["setup"], c["normalization"]), {}).setdefault((c["seed"], c["epochs"], c["budget"]), []).append(c)
    return out


def _appliances(cells: Sequence[Mapping[str, Any]]) -> list[str]:
    return sorted({str(c["appliance"]) for c in cells})


def _eacc_of(cell_group: Sequence[Mapping[str, Any]], appliances: Sequence[str], target: str | None,
             results: Mapping[tuple[str, str], Mapping[str, Any]]) -> float | None:
    """Combined EACC of one (setup, normalization, seed, ...) over the appliances: FP32 (target None) or a target's."""
    by_app = {c["appliance"]: c for c in cell_group}
    parts: list[tuple[float | None, float | None]] = []
    for a in appliances:
        c = by_app.get(a)
        if c is None or c["status"] != "done":
            return None
        if target is None:
            err = None if c["fp32_mae_w"] is None or c["eval_windows"] is None else c["fp32_mae_w"] * c["eval_windows"]
        else:
            r = results.get((c["cell_key"], target))
            err = None if r is None else r["sum_abs_err_w"]
        parts.append((err, c["sum_truth_w"]))
    return _combined(parts)


def table6(db: ResultsDB) -> dict[str, Any]:
    """Seed 003's Table 6 from the sweep: FP32 EACC (%) per setup (rows) × normalization (columns), over the appliances."""
    cells = db.cells()
    appliances = _appliances(cells)
    norms = sorted({str(c["normalization"]) for c in cells}, key=lambda n: (NORMALIZATION_ORDER.index(n) if n in NORMALIZATION_ORDER else 9, n))
    setups = sorted({str(c["setup"]) for c in cells}, key=_setup_order)
    groups = _groups(cells)
    rows = []
    for s in setups:
        values = {}
        for n in norms:
            per_seed = groups.get((s, n), {})
            values[n] = _mean([_eacc_of(g, appliances, None, {}) for g in per_seed.values()]) if per_seed else None
        rows.append({"number": setup_number(s), "setup": s, "eacc": {n: None if v is None else 100.0 * v for n, v in values.items()}})
    return {"appliances": appliances, "normalizations": norms, "rows": rows,
            "seeds": sorted({c["seed"] for c in cells if c["seed"] is not None})}


def table7(db: ResultsDB, *, featured: str | None = None, normalization: str | None = None) -> dict[str, Any]:
    """Seed 003's Table 7 from the sweep: per target, EACC (%) and delta (FP32 − target, points) for the featured setup
    (default T-P, else the first) and averaged over every setup that is not voltage-only, under ``normalization``
    (default C, z-score, else the first); with the gate's verdict over every cell of the grid."""
    cells = db.cells()
    if not cells:
        raise DataError(f"{str(db.path)!r} holds no cells", "run `nilmc sweep GRID --out DIR` first")
    results = {(r["cell_key"], r["target"]): r for r in db.results()}
    appliances = _appliances(cells)
    setups = sorted({str(c["setup"]) for c in cells}, key=_setup_order)
    norms = sorted({str(c["normalization"]) for c in cells})
    featured = featured or ("T-P" if "T-P" in setups else setups[0])
    normalization = normalization or ("C" if "C" in norms else norms[0])
    if featured not in setups:
        raise BadInputError(f"setup {featured!r} is not in the sweep", f"the sweep has {', '.join(setups)}")
    averaged = [s for s in setups if not s.endswith("-V")] or setups
    groups = _groups(cells)
    targets: list[str] = []
    for r in db.results():
        if r["target"] not in targets:
            targets.append(r["target"])

    def eacc(setup: str, target: str | None) -> float | None:
        per_seed = groups.get((setup, normalization), {})
        return _mean([_eacc_of(g, appliances, target, results) for g in per_seed.values()]) if per_seed else None

    def pct(v: float | None) -> float | None:
        return None if v is None else 100.0 * v

    fp32_featured = eacc(featured, None)
    fp32_avg = _mean([eacc(s, None) for s in averaged])
    rows = [{"target": FP32_ROW, "featured_eacc": pct(fp32_featured), "featured_delta": None, "average_eacc": pct(fp32_avg),
             "average_delta": None, "passed": None, "cells": None, "verification": "measured"}]
    for t in targets:
        f = eacc(featured, t)
        a = _mean([eacc(s, t) for s in averaged])
        mine = [r for (k, tt), r in results.items() if tt == t]
        rows.append({
            "target": t,
            "featured_eacc": pct(f),
            "featured_delta": None if f is None or fp32_featured is None else 100.0 * (fp32_featured - f),
            "average_eacc": pct(a),
            "average_delta": None if a is None or fp32_avg is None else 100.0 * (fp32_avg - a),
            "passed": sum(1 for r in mine if r["passed"]),
            "cells": len(mine),
            "verification": "/".join(sorted({str(r["verification"]) for r in mine})),
        })
    return {"featured": featured, "normalization": normalization, "averaged_setups": averaged, "appliances": appliances, "rows": rows}


def _pct(v: float | None, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def _grid(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for i, cells in enumerate(rows):
        out.append("  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip())
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return out


def format_table6(t6: Mapping[str, Any]) -> str:
    head = ["#", "setup", *t6["normalizations"]]
    rows = [head] + [[str(r["number"] or ""), r["setup"], *(_pct(r["eacc"][n]) for n in t6["normalizations"])] for r in t6["rows"]]
    seeds = ", ".join(map(str, t6["seeds"])) or "-"
    return "\n".join([f"Table 6 layout: FP32 EACC % per feature setup x normalization (appliances: {', '.join(t6['appliances'])}; "
                      f"mean over seeds {seeds})", *_grid(rows)])


def format_table7(t7: Mapping[str, Any]) -> str:
    f = t7["featured"]
    head = ["framework:precision", f"{f} EACC %", f"{f} delta", "avg EACC %", "avg delta", "gate", "verified"]
    rows = [head]
    for r in t7["rows"]:
        gate = "-" if r["cells"] is None else f"{r['passed']}/{r['cells']} PASS"
        rows.append([r["target"], _pct(r["featured_eacc"]), _pct(r["featured_delta"], "+.2f"), _pct(r["average_eacc"]),
                     _pct(r["average_delta"], "+.2f"), gate, r["verification"]])
    n_avg = len(t7["averaged_setups"])
    return "\n".join([f"Table 7 layout: normalization {t7['normalization']}; delta = FP32 - target in points (positive = loss); "
                      f"avg over {n_avg} setup(s) that are not voltage-only; appliances: {', '.join(t7['appliances'])}", *_grid(rows)])

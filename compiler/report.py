"""Readable tables of compile results."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nilmc.compiler.driver import CompileSummary


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _size(n: int) -> str:
    return f"{n / 1024:.1f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.2f} MiB"


def _floor_note(summary: CompileSummary) -> str:
    floor = next((r.report.budget.get("min_sqnr_db") for r in summary.results if r.report is not None), None)
    return "" if floor is None else f"; gate: SQNR >= {floor:g} dB"


def summary_table(summary: CompileSummary) -> str:
    ref = summary.reference
    if hasattr(ref, "per_appliance"):  # an ON/OFF classifier: scored in F1, not in watts
        return classification_table(summary)
    lines = [
        f"FP32 reference (onnxruntime, measured): EACC {ref.eacc * 100:.2f} %  MAE {ref.mae:.2f} W  SAE {ref.sae:.4f}  "
        f"NDE {ref.nde:.4f}  F1 {ref.f1:.3f}",
        "dEACC/dMAE: loss vs FP32 (positive = worse); SQNR: agreement of the artifact's output with FP32's (higher = closer); "
        "INT8 MACs: share of the weighted layers' MACs the artifact runs in INT8"
        + _floor_note(summary),
        "",
    ]
    head = ("target", "verified", "EACC %", "MAE W", "dEACC pts", "dMAE W", "SQNR dB", "INT8 MACs", "size", "lat b1 ms", "gate")
    rows: list[tuple[str, ...]] = [head]
    for r in summary.results:
        row = r.row()
        gate = "PASS" if r.passed else ("ERROR" if r.error else "FAIL")
        rows.append((
            row["target"], row["verification"],
            _fmt(None if row["eacc"] is None else row["eacc"] * 100, ".2f"), _fmt(row["mae_w"], ".2f"),
            _fmt(row["delta_eacc_pts"], "+.3f"), _fmt(row["delta_mae_w"], "+.2f"),
            "inf" if row["output_sqnr_db"] == float("inf") else _fmt(row["output_sqnr_db"], ".1f"), _share(row["int8_macs_share"]),
            _size(row["size_bytes"]) if row["size_bytes"] else "-", _fmt(row["latency_ms_b1"], ".3f"), gate,
        ))
    lines += _grid(rows) + _failures(summary)
    from nilmc.compiler.hardware import hardware_table, summary_rows

    boards = [row for row in summary_rows(summary) if row.get("target")]
    if boards:  # seed 003 Table 12 for the boards this compile's targets run on
        lines += ["", hardware_table(boards)]
    return "\n".join(lines)


def _share(share: float | None) -> str:
    """The INT8 share of the MACs of a quantizing target ("-" for a float one): an int8 target mostly in float says so
    in its own row, not only in a warning under the table."""
    return "-" if share is None else f"{share:.0%}"


def _grid(rows: list[tuple[str, ...]]) -> list[str]:
    """Rows as left-aligned columns, the first one (the head) underlined."""
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    out = []
    for i, cells in enumerate(rows):
        out.append("  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip())
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return out


def _failures(summary: CompileSummary) -> list[str]:
    """One line per target that errored or failed its gate."""
    out = []
    for r in summary.results:
        if r.error:
            out.append(f"  {r.target}: {r.error}")
        elif not r.passed and r.report is not None:
            out.append(f"  {r.target}: " + r.report.failure_line())
    return out


def classification_table(summary: CompileSummary) -> str:
    """The table of an ON/OFF classifier's compile: support-weighted F1/precision/recall, accuracy, deltas in points."""
    ref: Any = summary.reference
    per = "  ".join(f"{a.name} {a.f1:.3f}" for a in ref.per_appliance)
    lines = [f"FP32 reference (onnxruntime, measured): weighted F1 {ref.f1w:.4f}  precision {ref.precision_w:.4f}  recall {ref.recall_w:.4f}  "
             f"accuracy {ref.accuracy:.4f}  (F1 per appliance: {per})",
             "dF1w: loss of weighted F1 vs FP32 in points (positive = worse); SQNR of the output probabilities vs FP32" + _floor_note(summary), ""]
    head = ("target", "verified", "F1w", "prec w", "recall w", "accuracy", "dF1w pts", "SQNR dB", "INT8 MACs", "size", "lat b1 ms", "gate")
    rows: list[tuple[str, ...]] = [head]
    for r in summary.results:
        row, c = r.row(), (r.report.candidate if r.report is not None else None)
        gate = "PASS" if r.passed else ("ERROR" if r.error else "FAIL")
        rows.append((row["target"], row["verification"], *(_fmt(getattr(c, k, None), ".4f") for k in ("f1w", "precision_w", "recall_w", "accuracy")),
                     _fmt(None if r.report is None else r.report.deltas.get("f1w"), "+.3f"),
                     "inf" if row["output_sqnr_db"] == float("inf") else _fmt(row["output_sqnr_db"], ".1f"), _share(row["int8_macs_share"]),
                     _size(row["size_bytes"]) if row["size_bytes"] else "-", _fmt(row["latency_ms_b1"], ".3f"), gate))
    lines += _grid(rows) + _failures(summary)
    return "\n".join(lines)

"""Hardware figures per board (seed 003 Table 12): EACC per watt, per dollar and per FPS.

For every board of seed 003 Table 8 (and the other DPU boards of ``nilmc.bitstreams``), from the board table
(``bitstreams/boards.json``) and this compile's results:

* **EACC** is the gate's: the target's EACC on the *evaluation* set, labelled as the target was verified here
  (``measured`` or ``emulated``), never the calibration windows'. A board takes the first of its ``targets`` that
  this compile has a verified result for.
* **Watts** are Table 8's TDP (``from the paper``). The paper's Table 12 divides by *measured* board power, which is
  lower than TDP, so a per-TDP-watt figure is a lower bound of the published kind.
* **Dollars** are Table 8's board cost (``from the paper``). The NCS2 needs a host: its watts include the RP4's
  TDP (the paper's EACC/W implies ~6 W, over the stick's 2.5 W TDP), its dollars are the stick's alone, as the
  paper's EACC/$ implies (0.78 x $99 = 77 % EACC; with the host's $75 it would exceed 100 %).
* **FPS** = 1000 / (feature extraction + model latency in ms), both ``from the paper`` (Table 9, time-domain
  features; Table 10, the T-P model of 671 k parameters): nothing here runs on these boards, so no latency is
  ``measured`` on them. The paper's own EACC/FPS implies 55-101 FPS (its end-to-end data pipeline, not stated as a
  formula), against ~800 from the two latencies: the EACC/FPS columns are not on one scale, and the table says so.

:func:`board_rows` gives the rows (JSON-able), :func:`hardware_table` the text table in Table 12's layout with the
paper's numbers beside this compile's, :func:`manifest_section` the ``hardware`` section of one target's manifest.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nilmc.compiler.compare import Report
    from nilmc.compiler.driver import CompileSummary

FROM_PAPER = "from the paper"
POWER_HOW = "from the paper (Table 8 TDP; Table 12 used measured power, so per-TDP-watt figures are lower bounds)"
COST_HOW = "from the paper (Table 8)"
LATENCY_HOW = "from the paper (Table 10 T-P model latency + Table 9 time-domain feature extraction)"


def _boards() -> dict[str, Any]:
    from nilmc import bitstreams

    data: dict[str, Any] = json.loads(resources.files(bitstreams.__name__).joinpath(bitstreams.BOARDS_FILE).read_text(encoding="utf-8"))
    return data


def board_configs() -> list[dict[str, Any]]:
    """One entry per Table 12 row (RP4 twice: 1 and 4 threads) plus the DPU boards outside Table 8, in table order.

    Each: ``name``, ``board``, ``targets``, ``power_w``, ``cost_usd``, ``model_ms``, ``feature_ms``, ``published``."""
    boards = _boards()["boards"]
    out = []
    for name, b in boards.items():
        host = boards.get(b["host"]) if b.get("host") else None
        power = _sum(b.get("tdp_w"), host.get("tdp_w") if host else 0)
        cost = b.get("cost_usd")  # the stick's own, as the paper counted it (module docstring)
        configs = b.get("configs") or {name: {"t_p_latency_ms": b.get("t_p_latency_ms"), "table12": b.get("table12", {})}}
        for label, c in configs.items():
            out.append({"name": label, "board": name, "targets": list(b.get("targets", [])), "power_w": power, "cost_usd": cost,
                        "with_host": b.get("host"), "model_ms": c.get("t_p_latency_ms"), "feature_ms": b.get("feature_extraction_ms"),
                        "published": dict(c.get("table12") or {})})
    return out


def _sum(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else float(a) + float(b)


def _ratio(num: float, den: float | None, digits: int) -> float | None:
    return None if not den else round(num / den, digits)


def figures(config: Mapping[str, Any], target: str, eacc_pct: float, eacc_how: str) -> dict[str, Any]:
    """One board row: ``eacc_pct`` (the gate's evaluation EACC, labelled ``eacc_how``) per watt, per dollar and per FPS."""
    model_ms, feature_ms = config.get("model_ms"), config.get("feature_ms")
    fps = None if model_ms is None or feature_ms is None else 1000.0 / (float(model_ms) + float(feature_ms))
    pub = config.get("published") or {}
    implied = None  # the FPS behind the paper's EACC/FPS: its EACC (EACC/$ x cost) over EACC/FPS
    if pub.get("eacc_per_fps") and pub.get("eacc_per_usd") and config.get("cost_usd"):
        implied = round(pub["eacc_per_usd"] * float(config["cost_usd"]) / pub["eacc_per_fps"], 1)
    return {
        "board": config["name"], "target": target,
        "eacc_pct": round(eacc_pct, 3), "eacc_how": f"{eacc_how} (nilmc's evaluation set, this compile's gate)",
        "power_w": config.get("power_w"), "power_how": POWER_HOW,
        "cost_usd": config.get("cost_usd"), "cost_how": COST_HOW,
        "power_with_host": config.get("with_host"),
        "model_ms": model_ms, "feature_ms": feature_ms, "fps": None if fps is None else round(fps, 1),
        "latency_how": LATENCY_HOW if fps is not None else "not documented for this board",
        "eacc_per_watt": _ratio(eacc_pct, config.get("power_w"), 3),
        "eacc_per_usd": _ratio(eacc_pct, config.get("cost_usd"), 4),
        "eacc_per_fps": _ratio(eacc_pct, fps, 4),
        "published_table12": dict(pub), "paper_implied_fps": implied,
    }


def _verified(report: Report | None) -> bool:
    return report is not None and report.verification in ("measured", "emulated") and report.candidate.eacc == report.candidate.eacc


def board_rows(results: Iterable[tuple[str, Report | None]]) -> list[dict[str, Any]]:
    """Rows for every board config: the first of its targets with a verified result among ``results``
    (``(target, report)`` pairs); a board none of whose targets was compiled gets a row with no figures."""
    by_target = {t: r for t, r in results if r is not None and _verified(r)}
    rows = []
    for config in board_configs():
        target = next((t for t in config["targets"] if t in by_target), None)
        if target is None:
            rows.append({"board": config["name"], "target": None, "targets": config["targets"],
                         "published_table12": dict(config.get("published") or {}), "note": "no target of this board in the compile"})
            continue
        report = by_target[target]
        rows.append(figures(config, target, 100.0 * report.candidate.eacc, report.verification))
    return rows


def summary_rows(summary: CompileSummary) -> list[dict[str, Any]]:
    return board_rows((str(r.target), r.report) for r in summary.results if r.error is None)


def manifest_section(target: str, report: Report) -> dict[str, Any]:
    """``{"hardware": {...}}`` for a target that runs on boards of the table, else ``{}``."""
    if not _verified(report):
        return {}
    rows = [figures(c, target, 100.0 * report.candidate.eacc, report.verification) for c in board_configs() if target in c["targets"]]
    if not rows:
        return {}
    return {"hardware": {"source": "seed 003 Tables 8, 9, 10 and 12 (nilmc.bitstreams boards.json)", "rows": rows,
                         "formulas": "EACC % / W (TDP), EACC % / $ (board cost), EACC % / FPS with FPS = 1000 / (feature "
                                     "extraction ms + model ms)"}}


def _cell(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def hardware_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Seed 003 Table 12's layout (board: EACC/W, EACC/$, EACC/FPS) with this compile's numbers beside the paper's."""
    head = ("board", "target", "EACC %", "EACC/W", "paper", "EACC/$", "paper", "EACC/FPS", "paper", "FPS")
    lines_ = [head]
    for r in rows:
        pub = r.get("published_table12") or {}
        eacc = "-" if r.get("eacc_pct") is None else f"{r['eacc_pct']:.2f} {str(r.get('eacc_how', '')).split(' ')[0]}"
        lines_.append((r["board"], r.get("target") or "-", eacc,
                       _cell(r.get("eacc_per_watt"), ".2f"), _cell(pub.get("eacc_per_watt"), ".1f"),
                       _cell(r.get("eacc_per_usd"), ".3f"), _cell(pub.get("eacc_per_usd"), ".2f"),
                       _cell(r.get("eacc_per_fps"), ".4f"), _cell(pub.get("eacc_per_fps"), ".2f"), _cell(r.get("fps"), ".0f")))
    widths = [max(len(str(x[i])) for x in lines_) for i in range(len(head))]
    text = ["Hardware figures per board (seed 003 Table 12 layout; this compile's evaluation EACC, 'paper' = Table 12 as published):"]
    for i, cells in enumerate(lines_):
        text.append("  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip())
        if i == 0:
            text.append("  ".join("-" * w for w in widths))
    implied = [r["paper_implied_fps"] for r in rows if r.get("paper_implied_fps")]
    text.append("  EACC: measured/emulated as the target was verified here. W: Table 8 TDP (the paper used measured power: ours are "
                "lower bounds; NCS2 with its RP4 host); $: Table 8 cost; FPS: 1000 / (Table 9 feature extraction + Table 10 "
                "T-P model latency), from the paper, for its 671 k-parameter T-P model.")
    if implied:
        span = f"{min(implied):.0f}" if round(min(implied)) == round(max(implied)) else f"{min(implied):.0f}-{max(implied):.0f}"
        text.append(f"  The paper's EACC/FPS implies {span} FPS (its end-to-end pipeline): the two "
                    "EACC/FPS columns are not on one scale.")
    return "\n".join(text)

"""``nilmc report RESULTS``: one self-contained HTML page to look at (plotly, its JavaScript inlined; no network).

RESULTS is a compile output directory (``summary.json`` + one bundle per target) or a sweep's directory or
``results.sqlite``. The page shows only what the results record:

* per target: the gate's verdict, how it was verified (measured / emulated / not verified), EACC, ΔEACC, MAE,
  output SQNR vs FP32 and the likely cause of a failure; bar charts of ΔEACC (against the budget) and output SQNR;
* per quantized target, per layer (activation tensor, in graph order): the calibrated range beside the range the
  evaluation windows reached, and the share of evaluation values outside the calibrated range (what saturates) —
  the manifest's ``coverage`` section (the quantization parameters' ranges when it has none). Manifests record
  the SQNR of the model's output, not of each layer: the SQNR chart is per target;
* predicted-vs-true power over the manifest's ``trace`` windows, for FP32 and every artifact;
* for a sweep: Table 6 (setup × normalization) and Table 7 (target) of seed 003 with this sweep's numbers, and
  their heatmaps (FP32 EACC per setup × normalization; ΔEACC per setup/normalization × target; mean ΔEACC per
  backend × precision); the per-layer and trace charts of the best FP32 cell of the featured setup.

plotly comes with the ``[report]`` extra and is imported only here, only when a page is rendered.
"""
from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from nilmc.compiler.errors import BadInputError, DataError

__all__ = ["manifest_view", "render_compile_report", "render_sweep_report", "write_report", "resolve_results"]

FIG_HEIGHT = 380


# ------------------------------------------------------------------ what a manifest records, for the page
def manifest_view(m: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of a bundle manifest the report draws (small; the sweep stores it per cell and target)."""
    v = m.get("verification") or {}
    extra = v.get("extra") or {}
    cand = v.get("candidate") or {}
    layers = []
    cover = (m.get("coverage") or {}).get("tensors") or []
    if cover:
        for t in cover:
            layers.append({"tensor": t.get("tensor"), "calibrated": t.get("calibrated"), "observed": t.get("observed"),
                           "outside": t.get("outside")})
    else:
        for name, t in ((m.get("quantization") or {}).get("tensors") or {}).items():
            if t.get("role") == "activation" and t.get("lo") and t.get("hi"):
                layers.append({"tensor": name, "calibrated": [min(t["lo"]), max(t["hi"])], "observed": None, "outside": None})
    overflow = m.get("overflow") or {}
    return {
        "target": m.get("target"),
        "verification": v.get("verification"),
        "passed": v.get("passed"),
        "eacc": cand.get("eacc"),
        "delta_eacc_pts": (v.get("deltas") or {}).get("eacc"),
        "output_sqnr_db": extra.get("output_sqnr_db"),
        "violations": v.get("violations") or [],
        "cause": v.get("cause"),
        "layers": layers,
        "overflow_findings": [f.get("message", json.dumps(f, sort_keys=True)) if isinstance(f, dict) else str(f)
                              for f in overflow.get("findings") or []],
        "placement": (m.get("placement") or {}).get("summary"),
        "trace": m.get("trace"),
    }


# ------------------------------------------------------------------ page pieces
def _fmt(v: Any, spec: str = ".2f") -> str:
    if v is None:
        return "–"
    if isinstance(v, float) and not math.isfinite(v):
        return "inf" if v > 0 else "-inf"
    return format(v, spec) if isinstance(v, (int, float)) and not isinstance(v, bool) else html.escape(str(v))


def _table(head: Sequence[str], rows: Sequence[Sequence[Any]], classes: Sequence[str] | None = None) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = []
    for i, r in enumerate(rows):
        cls = f' class="{classes[i]}"' if classes and classes[i] else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>")
    return f"<table><thead><tr>{th}</tr></thead><tbody>{''.join(body)}</tbody></table>"


class _Page:
    """Sections of HTML and plotly figures; every figure gets a fixed id (the page is deterministic)."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.parts: list[str] = []
        self.n_figs = 0

    def h2(self, text: str) -> None:
        self.parts.append(f"<h2>{html.escape(text)}</h2>")

    def p(self, text: str) -> None:
        self.parts.append(f"<p>{html.escape(text)}</p>")

    def raw(self, fragment: str) -> None:
        self.parts.append(fragment)

    def fig(self, fig: Any, height: int = FIG_HEIGHT) -> None:
        self.n_figs += 1
        fig.update_layout(height=height, margin={"l": 60, "r": 20, "t": 50, "b": 60}, template="plotly_white")
        self.parts.append(fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"nilmc-chart-{self.n_figs}",
                                      config={"displaylogo": False, "responsive": True}))

    def html(self) -> str:
        from plotly.offline import get_plotlyjs

        style = ("body{font-family:system-ui,sans-serif;margin:24px;color:#222}table{border-collapse:collapse;margin:8px 0 16px}"
                 "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right;font-size:13px}th{background:#f3f3f3}"
                 "td:first-child{text-align:left}tr.fail td{background:#fde8e8}tr.error td{background:#fff3cd}"
                 "tr.pass td:last-child{color:#137333}.plotly-graph-div{margin-bottom:18px}p.note{color:#555;font-size:13px}")
        return ("<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>" + html.escape(self.title) + "</title>"
                f"<style>{style}</style><script>{get_plotlyjs()}</script></head><body>"
                f"<h1>{html.escape(self.title)}</h1>" + "\n".join(self.parts) + "</body></html>")


def _short(tensor: str) -> str:
    """``seq2point_cnn/conv1/Relu:0`` -> ``conv1/Relu``."""
    parts = str(tensor).split(":")[0].split("/")
    return "/".join(parts[-2:]) if len(parts) > 1 else parts[0]


def _verdict(passed: Any, error: Any) -> tuple[str, str]:
    if error:
        return "ERROR", "error"
    return ("PASS", "pass") if passed else ("FAIL", "fail")


def _target_charts(page: _Page, rows: Sequence[Mapping[str, Any]], budget_eacc: float | None) -> None:
    import plotly.graph_objects as go

    names = [r["target"] for r in rows]
    colours = ["#137333" if r.get("passed") else ("#b06000" if r.get("error") else "#c5221f") for r in rows]
    fig = go.Figure(go.Bar(x=names, y=[r.get("delta_eacc_pts") for r in rows], marker_color=colours, name="ΔEACC"))
    if budget_eacc is not None:
        fig.add_hline(y=budget_eacc, line_dash="dash", annotation_text=f"budget {budget_eacc:g} pts")
    fig.update_layout(title="EACC loss vs FP32 per target (points; positive = worse)", yaxis_title="ΔEACC (points)")
    page.fig(fig)
    sq = [r.get("output_sqnr_db") for r in rows]
    fig = go.Figure(go.Bar(x=names, y=[None if v is None or not math.isfinite(v) else v for v in sq], marker_color="#1a73e8",
                           name="output SQNR"))
    fig.update_layout(title="Output SQNR vs FP32 per target (dB; FP32-identical targets are infinite and not drawn)", yaxis_title="dB")
    page.fig(fig)


def _layer_charts(page: _Page, target: str, view: Mapping[str, Any]) -> None:
    import plotly.graph_objects as go

    layers = view.get("layers") or []
    if not layers:
        return
    names = [_short(t["tensor"]) for t in layers]
    cal = [t["calibrated"] or [None, None] for t in layers]
    obs = [t["observed"] or [None, None] for t in layers]
    fig = go.Figure()
    fig.add_bar(x=names, base=[c[0] for c in cal], y=[None if c[0] is None else c[1] - c[0] for c in cal], name="calibrated range")
    if any(o[0] is not None for o in obs):
        fig.add_bar(x=names, base=[o[0] for o in obs], y=[None if o[0] is None else o[1] - o[0] for o in obs], name="evaluation range")
    fig.update_layout(title=f"{target}: per-layer activation range (calibrated vs reached on the evaluation windows)",
                      barmode="group", yaxis_title="value (model units)")
    page.fig(fig)
    if any(t.get("outside") is not None for t in layers):
        fig = go.Figure(go.Bar(x=names, y=[None if t.get("outside") is None else 100.0 * t["outside"] for t in layers],
                               marker_color="#c5221f", name="outside"))
        fig.update_layout(title=f"{target}: per-layer saturation (% of evaluation values outside the calibrated range)", yaxis_title="%")
        page.fig(fig)


def _trace_chart(page: _Page, views: Mapping[str, Mapping[str, Any]]) -> None:
    import plotly.graph_objects as go

    traces = {t: v["trace"] for t, v in views.items() if v.get("trace")}
    if not traces:
        page.p("No power trace recorded (bundles written before nilmc recorded one).")
        return
    first = next(iter(traces.values()))
    x = list(range(first["first_window"], first["first_window"] + first["windows"]))
    fig = go.Figure()
    fig.add_scatter(x=x, y=first["truth_w"], name="true power", mode="lines", line={"color": "black", "width": 2})
    fig.add_scatter(x=x, y=first["fp32_w"], name="FP32", mode="lines", line={"dash": "dot"})
    for t, tr in traces.items():
        if tr["first_window"] == first["first_window"] and tr["windows"] == first["windows"]:
            fig.add_scatter(x=x, y=tr["artifact_w"], name=t, mode="lines")
    fig.update_layout(title="Predicted vs true power (W) over the evaluation windows with the most appliance energy",
                      xaxis_title="evaluation window", yaxis_title="W")
    page.fig(fig, height=440)


# ------------------------------------------------------------------ a compile output
def render_compile_report(out_dir: str | Path) -> str:
    """The page of one compile output directory (``summary.json`` and its bundles' manifests)."""
    from nilmc.compiler.bundle import MANIFEST, SUMMARY

    root = Path(out_dir)
    summary = json.loads((root / SUMMARY).read_text())
    views: dict[str, dict[str, Any]] = {}
    for name in sorted(summary.get("bundles") or {}):
        p = root / name / MANIFEST
        if p.is_file():
            v = manifest_view(json.loads(p.read_text()))
            views[str(v["target"])] = v
    page = _Page(f"nilmc compile report: {root.name}")
    ref = summary.get("reference") or {}
    ref_eacc = None if ref.get("eacc") is None else 100 * ref["eacc"]
    page.p(f"nilmc {summary.get('nilmc_version', '?')}. FP32 reference (onnxruntime, measured): EACC {_fmt(ref_eacc)} %, "
           f"MAE {_fmt(ref.get('mae'))} W, F1 {_fmt(ref.get('f1'), '.3f')}; {ref.get('n', '?')} evaluation windows.")
    page.h2("Targets and the gate's verdict")
    rows, classes = [], []
    budget = None
    for t in summary.get("targets") or []:
        verdict, cls = _verdict(t.get("passed"), t.get("error"))
        v = views.get(t["target"], {})
        note = t.get("error") or v.get("cause") or "; ".join(v.get("violations") or [])
        rows.append([html.escape(t["target"]), html.escape(str(t.get("verification"))), _fmt(None if t.get("eacc") is None else 100 * t["eacc"]),
                     _fmt(t.get("delta_eacc_pts"), "+.3f"), _fmt(t.get("mae_w")), _fmt(t.get("output_sqnr_db"), ".1f")
                     if t.get("output_sqnr_db") is not None else ("inf" if t.get("output_sqnr_db_nonfinite") == "inf" else "–"),
                     html.escape(note or ""), verdict])
        classes.append(cls)
    page.raw(_table(["target", "verified", "EACC %", "ΔEACC pts", "MAE W", "SQNR dB", "note", "gate"], rows, classes))
    for name in sorted(summary.get("bundles") or {}):
        p = root / name / MANIFEST
        if p.is_file():
            budget = (json.loads(p.read_text()).get("verification") or {}).get("budget", {}).get("eacc")
            break
    chart_rows = [{**t, "output_sqnr_db": t.get("output_sqnr_db")} for t in summary.get("targets") or []]
    _target_charts(page, chart_rows, budget)
    page.h2("Per-layer ranges and saturation (quantized targets)")
    page.raw('<p class="note">Manifests record the SQNR of the output (above), not per layer.</p>')
    for t, v in views.items():
        _layer_charts(page, t, v)
    page.h2("Predicted vs true power")
    _trace_chart(page, views)
    return page.html()


# ------------------------------------------------------------------ a sweep
def render_sweep_report(db_path: str | Path) -> str:
    """The page of a sweep's ``results.sqlite``: Tables 6 and 7, heatmaps, failures, the featured cell's charts."""
    import plotly.graph_objects as go

    from nilmc.compiler.sweep_results import ResultsDB, format_table6, table6, table7

    with ResultsDB(db_path, create=False) as db:
        cells = db.cells()
        if not cells:
            raise DataError(f"{str(db_path)!r} holds no cells", "run `nilmc sweep GRID --out DIR` first")
        results = db.results()
        t6 = table6(db)
        t7 = table7(db)
        featured = _featured_cell(cells, t7["featured"], t7["normalization"])
        featured_views = db.details(featured["cell_key"]) if featured else {}
    page = _Page(f"nilmc sweep report: {Path(db_path).parent.name}")
    done = [c for c in cells if c["status"] == "done"]
    failed = [c for c in cells if c["status"] != "done"]
    times = sorted(c["total_s"] for c in done if c["total_s"] is not None)
    page.p(f"{len(cells)} cells: {len(done)} done, {len(failed)} failed. "
           + (f"Cell wall time: median {_fmt(times[len(times) // 2], '.1f')} s, total {_fmt(sum(times), '.0f')} s (as run, cached cells included)."
              if times else ""))
    page.h2("Table 6 layout: FP32 EACC % per feature setup × normalization")
    page.raw(_table(["#", "setup", *t6["normalizations"]],
                    [[str(r["number"] or ""), html.escape(r["setup"]), *(_fmt(r["eacc"][n]) for n in t6["normalizations"])] for r in t6["rows"]]))
    page.raw(f'<p class="note">{html.escape(format_table6(t6).splitlines()[0])}</p>')
    fig = go.Figure(go.Heatmap(z=[[r["eacc"][n] for n in t6["normalizations"]] for r in t6["rows"]], x=t6["normalizations"],
                               y=[r["setup"] for r in t6["rows"]], colorscale="Viridis", colorbar={"title": "EACC %"},
                               text=[[_fmt(r["eacc"][n]) for n in t6["normalizations"]] for r in t6["rows"]], texttemplate="%{text}"))
    fig.update_layout(title="FP32 EACC % (setup × normalization)", yaxis={"autorange": "reversed"})
    page.fig(fig, height=max(FIG_HEIGHT, 28 * len(t6["rows"]) + 120))
    page.h2(f"Table 7 layout: targets on {t7['featured']} and averaged, normalization {t7['normalization']}")
    rows, classes = [], []
    for r in t7["rows"]:
        gate = "–" if r["cells"] is None else f"{r['passed']}/{r['cells']} PASS"
        rows.append([html.escape(r["target"]), _fmt(r["featured_eacc"]), _fmt(r["featured_delta"], "+.2f"), _fmt(r["average_eacc"]),
                     _fmt(r["average_delta"], "+.2f"), html.escape(r["verification"]), gate])
        classes.append("" if r["cells"] is None else ("pass" if r["passed"] == r["cells"] else "fail"))
    page.raw(_table(["framework:precision", f"{t7['featured']} EACC %", "delta pts", "avg EACC %", "avg delta pts", "verified", "gate"], rows, classes))
    _sweep_heatmaps(page, cells, results, t7)
    if failed or any(r["error"] for r in results):
        page.h2("Failures")
        frows = [[html.escape(c["label"]), "cell", html.escape(c["error"] or "")] for c in failed]
        by_key = {c["cell_key"]: c["label"] for c in cells}
        frows += [[html.escape(by_key.get(r["cell_key"], r["cell_key"])), html.escape(r["target"]), html.escape(r["error"])]
                  for r in results if r["error"]]
        page.raw(_table(["cell", "target", "error"], frows, ["error"] * len(frows)))
    if featured:
        page.h2(f"Featured cell {featured['label']}: per-layer ranges, saturation and power traces")
        page.raw('<p class="note">The best FP32 cell of the featured setup and normalization. Manifests record the SQNR of the '
                 "output (heatmaps above), not per layer.</p>")
        for t, v in featured_views.items():
            _layer_charts(page, t, v)
        _trace_chart(page, featured_views)
    return page.html()


def _featured_cell(cells: Sequence[Mapping[str, Any]], setup: str, norm: str) -> Mapping[str, Any] | None:
    done = [c for c in cells if c["status"] == "done" and c["fp32_eacc"] is not None]
    mine = [c for c in done if c["setup"] == setup and c["normalization"] == norm] or done
    return max(mine, key=lambda c: (c["fp32_eacc"], c["label"])) if mine else None


def _sweep_heatmaps(page: _Page, cells: Sequence[Mapping[str, Any]], results: Sequence[Mapping[str, Any]], t7: Mapping[str, Any]) -> None:
    import plotly.graph_objects as go

    labels = {c["cell_key"]: f"{c['setup']}/{c['normalization']}" + (f"/{c['appliance']}" if c["appliance"] else "") for c in cells}
    targets = [r["target"] for r in t7["rows"][1:]]
    rows = sorted({labels[r["cell_key"]] for r in results})
    acc: dict[tuple[str, str], list[float]] = {}
    for r in results:
        if r["delta_eacc_pts"] is not None:
            acc.setdefault((labels[r["cell_key"]], r["target"]), []).append(r["delta_eacc_pts"])
    if rows and targets:
        z = [[(sum(acc[(y, t)]) / len(acc[(y, t)])) if (y, t) in acc else None for t in targets] for y in rows]
        fig = go.Figure(go.Heatmap(z=z, x=targets, y=rows, colorscale="RdYlGn_r", zmid=0, colorbar={"title": "ΔEACC pts"},
                                   text=[[_fmt(v, "+.2f") for v in zr] for zr in z], texttemplate="%{text}"))
        fig.update_layout(title="ΔEACC vs FP32 (points, mean over seeds) per setup/normalization/appliance × target",
                          yaxis={"autorange": "reversed"})
        page.fig(fig, height=max(FIG_HEIGHT, 24 * len(rows) + 140))
    by_bp: dict[tuple[str, str], list[float]] = {}
    for r in results:
        if r["delta_eacc_pts"] is not None:
            by_bp.setdefault((r["backend"], r["precision"]), []).append(r["delta_eacc_pts"])
    if by_bp:
        backends = sorted({b for b, _ in by_bp})
        precisions = sorted({p for _, p in by_bp})
        z = [[(sum(by_bp[(b, p)]) / len(by_bp[(b, p)])) if (b, p) in by_bp else None for p in precisions] for b in backends]
        fig = go.Figure(go.Heatmap(z=z, x=precisions, y=backends, colorscale="RdYlGn_r", zmid=0, colorbar={"title": "ΔEACC pts"},
                                   text=[[_fmt(v, "+.2f") for v in zr] for zr in z], texttemplate="%{text}"))
        fig.update_layout(title="Mean ΔEACC vs FP32 (points) per backend × precision, over every cell")
        page.fig(fig)
    sq: dict[str, list[float]] = {}
    for r in results:
        if r["output_sqnr_db"] is not None:
            sq.setdefault(r["target"], []).append(r["output_sqnr_db"])
    if sq:
        fig = go.Figure(go.Box(x=[t for t in targets if t in sq for _ in sq[t]], y=[v for t in targets if t in sq for v in sq[t]],
                               boxpoints="all", name="output SQNR"))
        fig.update_layout(title="Output SQNR vs FP32 per target over every cell (dB; FP32-identical targets are infinite and not drawn)",
                          yaxis_title="dB")
        page.fig(fig)


# ------------------------------------------------------------------ entry point
def resolve_results(path: str | Path) -> tuple[str, Path]:
    """``("compile", dir)`` or ``("sweep", results.sqlite)`` for what ``nilmc report`` was given."""
    from nilmc.compiler.bundle import SUMMARY

    p = Path(path)
    if p.is_dir() and (p / SUMMARY).is_file():
        return "compile", p
    if p.is_dir() and (p / "results.sqlite").is_file():
        return "sweep", p / "results.sqlite"
    if p.is_file() and p.suffix in (".sqlite", ".db"):
        return "sweep", p
    raise BadInputError(f"{str(path)!r} is neither a compile output (no {SUMMARY}) nor a sweep (no results.sqlite)",
                        "pass the --out directory of `nilmc compile` or of `nilmc sweep`")


def write_report(results: str | Path, out: str | Path) -> Path:
    """Render the page for ``results`` and write it to ``out`` atomically; returns ``out``."""
    from nilmc.compiler.io import atomic_write_text

    try:
        import plotly  # noqa: F401
    except ImportError:
        raise BadInputError("the HTML report needs plotly, which is not installed", "install the [report] extra: pip install 'nilmc[report]'") from None
    kind, path = resolve_results(results)
    page = render_compile_report(path) if kind == "compile" else render_sweep_report(path)
    atomic_write_text(out, page)
    return Path(out)


def default_report_path(results: str | Path) -> Path:
    """report.html inside a sweep directory; ``<dir>-report.html`` beside a compile output (nilmc owns what is inside it)."""
    kind, path = resolve_results(results)
    if kind == "sweep":
        return path.parent / "report.html"
    return path.parent / f"{path.name}-report.html"


def check_report_path(report: str | Path, out_dir: str | Path, *, inputs: Sequence[str | Path] = ()) -> Path:
    """``compile --report FILE``: a writable file, not an input, not inside a bundle of ``out_dir`` (verify would refuse it)."""
    from nilmc.compiler.errors import OutputError
    from nilmc.compiler.outdir import check_output_file

    p = check_output_file(report, inputs=inputs, what="--report")
    r, o = Path(report).absolute().resolve(), Path(out_dir).absolute().resolve()
    if o in r.parents and r.parent != o:
        raise OutputError(f"--report {str(report)!r} lies inside an entry nilmc writes in the output directory",
                          f"write it beside, e.g. --report {o.name}-report.html")
    return p

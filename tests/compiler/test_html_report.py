"""nilmc report: the self-contained HTML page, rendered in a real headless browser (chromium) with every chart drawn."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from click.testing import CliRunner

from nilmc.compiler.cli import cli
from nilmc.compiler.errors import BadInputError

pytest.importorskip("plotly", reason="the HTML report needs the [report] extra (plotly)")

BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--virtual-time-budget=20000", "--enable-logging=stderr", "--v=0"]


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        exe = shutil.which(name)
        if exe:
            return exe
    pytest.skip("no chromium found to render the report in (Debian: apt-get install -y chromium; .ci/run installs it as root)")


def _render(page: Path, tmp: Path) -> tuple[str, str]:
    """The DOM after the page's scripts ran, and the browser's log (console errors land there)."""
    done = subprocess.run([_chromium(), *BROWSER_FLAGS, f"--user-data-dir={tmp / 'profile'}", "--dump-dom", page.resolve().as_uri()],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout, done.stderr


class _Charts(HTMLParser):
    """Per plotly chart div (id nilmc-chart-N): its svg layers and what its traces drew."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[tuple[str, str | None]] = []  # (tag, chart id opened by it)
        self.charts: dict[str, dict[str, int]] = {}
        self.current: list[str] = []
        self.in_trace = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        opened = None
        if tag == "div" and (a.get("id") or "").startswith("nilmc-chart-"):
            opened = a["id"]
            self.charts[opened] = {"main_svg": 0, "traces": 0, "marks": 0}
            self.current.append(opened)
        cls = (a.get("class") or "").split()
        if self.current:
            c = self.charts[self.current[-1]]
            if tag == "svg" and "main-svg" in cls:
                c["main_svg"] += 1
            if tag == "g" and ("trace" in cls or "hm" in cls):
                c["traces"] += 1
            if tag == "image" and a.get("href", a.get("xlink:href", "")).startswith("data:image"):
                c["marks"] += 1  # a heatmap's raster
            if tag == "path" and re.match(r"M\s*-?\d", a.get("d") or "") and any(s[0] == "g" for s in self.stack[-3:]):
                c["marks"] += 1
        if tag not in ("area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"):  # HTML's void elements
            self.stack.append((tag, opened))

    def handle_endtag(self, tag):
        while self.stack:
            t, opened = self.stack.pop()
            if opened:
                self.current.remove(opened)
            if t == tag:
                break


def _check_every_chart_drew(html_text: str, dom: str, log: str) -> dict[str, dict[str, int]]:
    expected = set(re.findall(r'id="(nilmc-chart-\d+)"', html_text))
    parser = _Charts()
    parser.feed(dom)
    assert set(parser.charts) == expected and expected
    blank = {k: v for k, v in parser.charts.items() if not (v["main_svg"] and v["traces"] and v["marks"])}
    assert not blank, f"charts that did not draw: {blank}"
    assert "Uncaught" not in log, [line for line in log.splitlines() if "Uncaught" in line]
    return parser.charts


@pytest.fixture()
def compile_out(tmp_path, tiny_files):
    out = tmp_path / "build"
    r = CliRunner().invoke(cli, ["compile", str(tiny_files["model"]), "--calib", str(tiny_files["calib"]), "--eval", str(tiny_files["eval"]),
                                 "--targets", "onnxruntime:fp32,onnxruntime:int8", "--out", str(out), "--report", str(tmp_path / "build-report.html")])
    assert r.exit_code in (0, 1), r.output
    return out


@pytest.fixture()
def sweep_out(tmp_path, tiny_files):
    grid = tmp_path / "grid.toml"
    grid.write_text(f'[grid]\ntargets = ["onnxruntime:fp32", "onnxruntime:int8"]\nbudgets = ["eacc=0.5", "eacc=3"]\n\n[[models]]\n'
                    f'path = "{tiny_files["model"]}"\ncalib = "{tiny_files["calib"]}"\neval = "{tiny_files["eval"]}"\n')
    out = tmp_path / "sweep"
    r = CliRunner().invoke(cli, ["sweep", str(grid), "--out", str(out), "--workers", "1"])
    assert r.exit_code == 0, r.output
    return out


def test_compile_report_is_self_contained_with_the_gate_and_charts(tmp_path, compile_out):
    page = tmp_path / "build-report.html"  # written by `compile --report`
    text = page.read_text()
    assert "<script src=" not in text and "Plotly.newPlot" in text  # plotly.js inlined: opens offline
    assert "onnxruntime:int8" in text and ("PASS" in text or "FAIL" in text) and "measured" in text
    ids = re.findall(r'id="(nilmc-chart-\d+)"', text)
    assert len(ids) == 5  # ΔEACC, SQNR, int8 ranges, int8 saturation, power trace
    manifest = json.loads((compile_out / "onnxruntime-int8" / "manifest.json").read_text())
    assert len(manifest["trace"]["truth_w"]) == manifest["trace"]["windows"] > 0
    # the page is a pure function of the results: the same bytes again
    r = CliRunner().invoke(cli, ["report", str(compile_out), "--out", str(tmp_path / "again.html")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "again.html").read_bytes() == page.read_bytes()


def test_report_refuses_what_is_not_results(tmp_path):
    r = CliRunner().invoke(cli, ["report", str(tmp_path)])
    assert r.exit_code == 2 and "summary.json" in r.output
    from nilmc.compiler.html_report import check_report_path

    (tmp_path / "o").mkdir()
    with pytest.raises(BadInputError.__mro__[1]):  # OutputError (a NilmcError): inside a bundle verify would refuse
        check_report_path(tmp_path / "o" / "onnxruntime-int8" / "r.html", tmp_path / "o")


@pytest.mark.slow
def test_reports_render_in_a_headless_browser_with_every_chart_drawn(tmp_path, compile_out, sweep_out):
    compile_page = tmp_path / "build-report.html"
    dom, log = _render(compile_page, tmp_path / "c")
    charts = _check_every_chart_drew(compile_page.read_text(), dom, log)
    assert len(charts) == 5
    sweep_page = sweep_out / "report.html"
    dom, log = _render(sweep_page, tmp_path / "s")
    charts = _check_every_chart_drew(sweep_page.read_text(), dom, log)
    assert len(charts) >= 6  # Table 6 heatmap, ΔEACC heatmap, backend x precision, SQNR, ranges, saturation, trace
    assert "Table 6 layout" in dom and "Table 7 layout" in dom


def test_chart_checker_catches_a_blank_chart():
    html_text = '<div id="nilmc-chart-1" class="plotly-graph-div"></div>'
    with pytest.raises(AssertionError, match="did not draw"):
        _check_every_chart_drew(html_text, html_text, "")

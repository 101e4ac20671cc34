"""compiler/progress.py: bars on a terminal only; the driver's stage hook; quiet under --json and in CI."""
from __future__ import annotations

import io

import pytest

from nilmc.backends.registry import default_registry
from nilmc.compiler.driver import compile_model
from nilmc.compiler.progress import CellProgress, StageHook, StageProgress, bars_wanted


class _TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bars_only_on_a_terminal_outside_ci_and_json(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    assert bars_wanted(stream=_TTY())
    assert not bars_wanted(stream=io.StringIO())  # a pipe or a file
    assert not bars_wanted(as_json=True, stream=_TTY())
    monkeypatch.setenv("CI", "true")
    assert not bars_wanted(stream=_TTY())
    monkeypatch.setenv("CI", "false")
    assert bars_wanted(stream=_TTY())


def test_driver_reports_every_stage_to_the_hook(tmp_path, tiny, tiny_ds, tiny_eval):
    reg = default_registry()
    stream = io.StringIO()
    hook = StageProgress(bar=False, stream=stream)
    assert isinstance(hook, StageHook) and not isinstance(print, StageHook)
    planned: list[int] = []
    real_plan = hook.plan
    hook.plan = lambda total: (planned.append(total), real_plan(total))  # type: ignore[method-assign]
    compile_model(tiny, tiny_eval, reg.parse_targets("onnxruntime:fp32,onnxruntime:int8"), tmp_path / "b", calib=tiny_ds,
                  registry=reg, progress=hook)
    assert planned == [3]
    assert hook.finished == ["FP32 reference on onnxruntime", "onnxruntime:fp32", "onnxruntime:int8"]
    assert "  .. lowering onnxruntime:int8" in stream.getvalue()  # no terminal: the stage lines, as before


def test_a_plain_callable_still_works_as_progress(tmp_path, tiny, tiny_eval):
    reg = default_registry()
    said: list[str] = []
    compile_model(tiny, tiny_eval, reg.parse_targets("onnxruntime:fp32"), tmp_path / "b", registry=reg, progress=said.append)
    assert said == ["FP32 reference on onnxruntime", "lowering onnxruntime:fp32"]


def test_bar_draws_with_eta_on_a_terminal_and_quiet_prints_nothing():
    tty = _TTY()
    with StageProgress(bar=True, stream=tty) as p:
        p.plan(2)
        p("FP32 reference")
        p.done("FP32 reference")
        p("lowering x")
        p.done("x")
    drawn = tty.getvalue()
    assert "0/2 [00:00<?" in drawn and "lowering x" in drawn and "  .. " not in drawn  # elapsed<ETA, the stage's label
    quiet = io.StringIO()
    with StageProgress(quiet=True, stream=quiet) as p:
        p.plan(1)
        p("stage")
        p.done("stage")
    assert quiet.getvalue() == ""
    cells = _TTY()
    with CellProgress(2, bar=True, stream=cells) as c:
        c.cell_done("a", "done")
        c.cell_done("b", "done")
    assert "0/2" in cells.getvalue() and "cell" in cells.getvalue()
    lines = io.StringIO()
    with CellProgress(2, bar=False, stream=lines) as c:
        c.cell_done("a", "done")
    assert lines.getvalue() == "  .. [1/2] a: done\n"


@pytest.mark.parametrize("flag", [["--json"], []])
def test_cli_compile_progress_on_stderr_only_without_json(tmp_path, tiny_files, flag):
    from click.testing import CliRunner

    from nilmc.compiler.cli import cli

    r = CliRunner().invoke(cli, ["compile", str(tiny_files["model"]), "--eval", str(tiny_files["eval"]), "--targets", "onnxruntime:fp32",
                                 "--out", str(tmp_path / "o"), *flag])
    assert r.exit_code == 0, r.output
    assert ("  .. FP32 reference" in r.stderr) == (not flag)
    assert "\r" not in r.stderr  # CliRunner's stderr is no terminal: never a bar

"""The reliability corpus (tests/compiler/reliability.py) as tests: every bad input handled, every tamper detected."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from reliability import bad_input_cases, check_bad_input, check_tamper, make_workdir, run, snapshot, tamper_cases

BAD = bad_input_cases()
TAMPER = tamper_cases()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("user")
    files = make_workdir(root / "home")
    inputs = {k: snapshot(files["root"])[str(files[k].relative_to(files["root"]))] for k in ("model", "calib", "eval")}
    yield files, root
    after = snapshot(files["root"])
    for k, h in inputs.items():  # the inputs are never touched, whatever the cases did
        assert after[str(files[k].relative_to(files["root"]))] == h, k


def test_corpus_is_large_enough():
    assert len(BAD) >= 120 and len(TAMPER) >= 25
    assert len({c.id for c in BAD}) == len(BAD) and len({c.id for c in TAMPER}) == len(TAMPER)


@pytest.mark.parametrize("case", BAD, ids=[c.id for c in BAD])
def test_bad_input_is_handled(case, work):
    files, _ = work
    outcome = check_bad_input(case, files)
    assert outcome.handled, outcome.reasons


@pytest.mark.parametrize("case", TAMPER, ids=[c.id for c in TAMPER])
def test_tamper_is_detected(case, work):
    files, root = work
    outcome = check_tamper(case, files, root)
    assert outcome.handled, outcome.reasons


def test_good_and_signed_bundles_verify(work):
    files, _ = work
    assert run("verify", files["good"], "--eval", files["eval"]).exit_code == 0
    r = run("verify", files["signed"], "--eval", files["eval"], "--trust", files["pub"])
    assert r.exit_code == 0, r.output


def test_verify_json_always_has_the_report(work):
    files, root = work
    r = run("verify", files["good"], "--eval", files["eval"], "--json", "--max-delta", "eacc=0")
    doc = json.loads(r.stdout)
    assert all(b["report"] is not None for b in doc["bundles"])
    assert r.exit_code in (0, 1) and doc["exit"] == r.exit_code


def test_every_written_json_is_strict(work):
    files, _ = work

    def refuse(c):
        raise ValueError(c)

    for p in list(files["good"].rglob("*.json")) + list(files["signed"].rglob("*.json")):
        json.loads(p.read_text(), parse_constant=refuse)


def test_errors_are_json_under_json(work):
    files, _ = work
    r = run("compile", files["model"], "--eval", files["eval"], "--out", files["root"] / "x", "--max-delta", "eacc=inf", "--json")
    doc = json.loads(r.stdout)
    assert r.exit_code == 2 and doc["exit"] == 2 and "inf" in doc["error"]["message"]


def test_eval_set_normalization_metadata_is_compared(work, tmp_path):
    """Same arrays, other normalization label: the stored reference is not reused; the check fires."""
    import numpy as np

    files, _ = work
    with np.load(files["eval"]) as z:
        x, y, meta = z["x"], z["y"], json.loads(str(z["meta"]))
    meta["applied_normalization"] = "C"
    p = tmp_path / "relabelled.npz"
    np.savez(p, x=x, y=y, meta=np.array(json.dumps(meta)))
    r = run("verify", files["good"], "--eval", p)
    assert r.exit_code == 2 and "evaluation set" in r.stderr, r.output


# ---------------------------------------------------------------- output directories
def test_rewrite_replaces_only_nilmc_entries(work, tmp_path):
    files, _ = work
    out = tmp_path / "o"
    args = ["compile", files["model"], "--eval", files["eval"], "--out", out, "--max-delta", "eacc=100"]
    assert run(*args, "--targets", "onnxruntime:fp32").exit_code == 0
    (out / "my_notes.txt").write_text("mine")
    (out / "onnxruntime-fp32" / "thesis.tex").write_text("mine too")
    r = run(*args, "--targets", "onnxruntime:fp32")
    assert r.exit_code == 2 and "thesis.tex" in r.stderr  # a user's file inside a bundle is never deleted
    (out / "onnxruntime-fp32" / "thesis.tex").unlink()
    r = run(*args, "--targets", "onnxruntime:int8", "--calib", files["calib"])
    assert r.exit_code == 0, r.output
    assert (out / "my_notes.txt").read_text() == "mine"
    assert not (out / "onnxruntime-fp32").exists() and (out / "onnxruntime-int8" / "manifest.json").is_file()


def test_force_writes_beside_foreign_files(work, tmp_path):
    files, _ = work
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "chapter1.tex").write_text("c1")
    base = ["compile", files["model"], "--eval", files["eval"], "--out", out]
    assert run(*base).exit_code == 2 and sorted(p.name for p in out.iterdir()) == ["chapter1.tex"]
    assert run(*base, "--force").exit_code == 0
    assert (out / "chapter1.tex").read_text() == "c1" and (out / "summary.json").is_file()


def test_umask_is_respected(work, tmp_path):
    files, _ = work
    old = os.umask(0o027)
    try:
        assert run("compile", files["model"], "--eval", files["eval"], "--out", tmp_path / "u").exit_code == 0
    finally:
        os.umask(old)
    assert (tmp_path / "u").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "u" / "summary.json").stat().st_mode & 0o777 == 0o640


def test_identical_builds_have_identical_manifests(work, tmp_path):
    files, _ = work
    for d in ("a", "b"):
        r = run("compile", files["model"], "--calib", files["calib"], "--eval", files["eval"], "--targets", "onnxruntime:fp32,onnxruntime:int8",
                "--out", tmp_path / d, "--max-delta", "eacc=100")
        assert r.exit_code == 0, r.output
    for b in ("onnxruntime-fp32", "onnxruntime-int8"):
        assert (tmp_path / "a" / b / "manifest.json").read_bytes() == (tmp_path / "b" / b / "manifest.json").read_bytes()


def test_exit_code_is_most_severe_over_targets(work, tmp_path):
    import numpy as np

    from nilmc.backends.registry import Target
    from nilmc.compiler.driver import CompileSummary, TargetResult
    from nilmc.compiler.metrics import nilm_metrics

    m = nilm_metrics(np.ones(3), np.ones(3), on_threshold_w=0.5)
    s = CompileSummary(m, [TargetResult(Target("a", "int8"), None, None, error="x", error_code=2),
                           TargetResult(Target("b", "int8"), None, None, error="y", error_code=3)])
    assert s.exit_code == 3
    s.results.pop()
    assert s.exit_code == 2


# ---------------------------------------------------------------- signals and concurrency (subprocesses)
def _compile_cmd(files, out, *extra):
    return [sys.executable, "-m", "nilmc.compiler.cli", "compile", str(files["model"]), "--calib", str(files["calib"]), "--eval", str(files["eval"]),
            "--targets", "onnxruntime:fp32,onnxruntime:int8", "--out", str(out), "--max-delta", "eacc=100", *extra]


def _wait_for(pred, timeout=60.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return True
        time.sleep(0.02)
    return False


def _staging(out: Path) -> list[Path]:
    return [p for p in out.glob(".nilmc-part-*")] if out.exists() else []


@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_cleans_up(work, tmp_path, sig, code):
    files, _ = work
    out = tmp_path / "sig"
    # as from a terminal: the default dispositions (a test runner's workers may ignore SIGINT, which nilmc respects)
    p = subprocess.Popen(_compile_cmd(files, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: [signal.signal(s, signal.SIG_DFL) for s in (signal.SIGINT, signal.SIGTERM)])
    assert _wait_for(lambda: bool(_staging(out)))
    p.send_signal(sig)
    _, err = p.communicate(timeout=120)
    if p.returncode == 0:
        pytest.skip("the compile finished before the signal arrived")
    assert p.returncode == code, (p.returncode, err)
    assert "Traceback" not in err and not _staging(out), (err, _staging(out))
    if out.exists():  # the signal came during the commit (signals are blocked there): the output is whole
        assert run("verify", out, "--eval", files["eval"]).exit_code == 0


def test_a_forked_library_child_dies_of_sigterm_quietly():
    """A process a library forks inside a nilmc command (OpenVINO's telemetry sender) inherits nilmc's signal handler;
    terminated at exit it must die of the signal, not print Interrupted's traceback (seen on `compile --targets all`)."""
    import multiprocessing

    from nilmc.compiler import cli

    previous = signal.getsignal(signal.SIGTERM)
    cli._HANDLER_PID[:] = [os.getpid()]
    signal.signal(signal.SIGTERM, cli._raise_interrupted)
    try:
        child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(30,))
        child.start()
        time.sleep(0.2)
        child.terminate()  # SIGTERM, as multiprocessing's exit handling sends it
        child.join(10)
        assert child.exitcode == -signal.SIGTERM  # died of the signal; Interrupted would have exited with 1 after a traceback
        with pytest.raises(cli.Interrupted):  # the process that installed it still gets Interrupted
            cli._raise_interrupted(signal.SIGTERM, None)
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.slow
def test_sigkill_leaves_staging_that_verify_refuses_and_next_run_cleans(work, tmp_path):
    files, _ = work
    out = tmp_path / "killed"
    p = subprocess.Popen(_compile_cmd(files, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert _wait_for(lambda: bool(_staging(out)))
    p.kill()
    p.wait()
    stale = _staging(out)
    assert stale
    r = run("verify", stale[0], "--eval", files["eval"])
    assert r.exit_code == 2 and "staging" in r.stderr
    r = run("compile", files["model"], "--eval", files["eval"], "--out", out, "--force")
    assert r.exit_code == 0, r.output
    assert not _staging(out)


@pytest.mark.slow
def test_second_writer_is_refused_naming_the_holder(work, tmp_path):
    files, _ = work
    out = tmp_path / "busy"
    p = subprocess.Popen(_compile_cmd(files, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert _wait_for(lambda: (out / ".nilmc.lock").is_file() and (out / ".nilmc.lock").read_text().strip() == str(p.pid))
        q = subprocess.run(_compile_cmd(files, out), capture_output=True, text=True, timeout=120)
        if p.poll() is None:
            assert q.returncode == 2 and f"pid {p.pid}" in q.stderr, q.stderr
    finally:
        p.communicate(timeout=120)
    assert p.returncode == 0
    assert run("verify", out, "--eval", files["eval"]).exit_code == 0

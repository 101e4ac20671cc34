from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from nilmc.backends.base import Artifact, Capabilities, Verification
from nilmc.backends.onnxruntime_backend import OnnxRuntimeBackend, OrtRunner
from nilmc.compiler.cli import cli


def run(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


class _NoisyRunner(OrtRunner):
    verification = Verification.EMULATED

    def infer(self, feeds):
        out = super().infer(feeds)
        return {k: v + np.float32(0.5) for k, v in out.items()}  # +0.5 std: a lossy "quantized" target


class LossyBackend(OnnxRuntimeBackend):
    name = "lossy"
    capabilities = Capabilities(precisions=("int8",), description="test double: FP32 + offset")

    def lower(self, model, out_dir, *, precision="int8", options=None):
        art = super().lower(model, out_dir, precision="fp32")
        art.precision, art.backend = precision, self.name
        return art

    def runner(self, artifact: Artifact):
        return _NoisyRunner(artifact.path)


@pytest.fixture()
def with_lossy(monkeypatch):
    import nilmc.backends.registry as reg

    orig = reg.default_registry

    def patched(*, plugins: bool = True):
        r = orig(plugins=False)
        r.register(LossyBackend())
        return r

    monkeypatch.setattr(reg, "default_registry", patched)


def test_backends_lists_onnxruntime_json():
    res = run("backends", "--json")
    assert res.exit_code == 0
    rows = {r["name"]: r for r in json.loads(res.output)}
    assert rows["onnxruntime"]["available"] is True and rows["onnxruntime"]["precisions"] == ["fp32", "int8"]
    assert {"openvino", "tensorrt", "dpu"} <= set(rows)


def test_compile_fp32_writes_bundle_and_passes(tiny_files):
    out = tiny_files["dir"] / "out"
    res = run("compile", tiny_files["model"], "--calib", tiny_files["calib"], "--eval", tiny_files["eval"],
              "--targets", "onnxruntime:fp32", "--out", out, "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output)
    assert summary["passed"] and summary["targets"][0]["delta_eacc_pts"] == pytest.approx(0.0, abs=1e-9)
    manifest = json.loads((out / "onnxruntime-fp32" / "manifest.json").read_text())
    assert manifest["verification"]["verification"] == "measured"
    assert manifest["contract"]["appliance"] == "kettle"
    assert (out / "summary.json").is_file() and (out / "reference" / "model.onnx").is_file()


def test_gate_failure_exits_1_naming_target(tiny_files, with_lossy):
    out = tiny_files["dir"] / "out"
    junit = tiny_files["dir"] / "junit.xml"
    res = run("compile", tiny_files["model"], "--eval", tiny_files["eval"], "--targets", "onnxruntime:fp32,lossy:int8",
              "--out", out, "--max-delta", "eacc=0.5", "--junit", junit)
    assert res.exit_code == 1, res.output
    assert "lossy:int8" in res.output and "FAIL" in res.output
    xml = junit.read_text()
    assert xml.count("<testcase") == 2 and xml.count("<failure") == 1 and "lossy:int8" in xml
    assert "eacc loss" in xml  # the failure message: the violations worst first (and the likely cause when one is found)


def test_verify_detects_tampering(tiny_files):
    out = tiny_files["dir"] / "out"
    assert run("compile", tiny_files["model"], "--eval", tiny_files["eval"], "--out", out).exit_code == 0
    ok = run("verify", out / "onnxruntime-fp32", "--eval", tiny_files["eval"])
    assert ok.exit_code == 0 and "PASS" in ok.output
    artifact = out / "onnxruntime-fp32" / "model.onnx"
    data = bytearray(artifact.read_bytes())
    data[-10] ^= 0xFF
    artifact.write_bytes(bytes(data))
    bad = run("verify", out, "--eval", tiny_files["eval"])
    assert bad.exit_code == 2 and "TAMPERED" in bad.output and "model.onnx" in bad.output


# ---------------------------------------------------------------- bad input: exit 2, one line, nothing written
def _assert_clean_error(res, *needles: str, out: Path | None = None):
    assert res.exit_code == 2, res.output
    lines = [l for l in res.output.strip().splitlines() if l.startswith("nilmc: error:")]
    assert len(lines) == 1, res.output
    assert "Traceback" not in res.output
    for n in needles:
        assert n in lines[0], (n, lines[0])
    if out is not None:
        assert not out.exists(), "a partial output was left behind"
        assert not list(out.parent.glob(f".{out.name}*")), "a temp dir was left behind"


def test_truncated_model(tiny_files):
    bad = tiny_files["dir"] / "trunc.onnx"
    bad.write_bytes(tiny_files["model"].read_bytes()[:100])
    out = tiny_files["dir"] / "out"
    res = run("compile", bad, "--eval", tiny_files["eval"], "--out", out)
    _assert_clean_error(res, "trunc.onnx", out=out)


def test_model_input_shape_mismatch(tiny_files):
    from helpers import tiny_dataset

    other = tiny_dataset(50, features=27).save(tiny_files["dir"] / "vip.npz")
    out = tiny_files["dir"] / "out"
    res = run("compile", tiny_files["model"], "--eval", other, "--out", out)
    _assert_clean_error(res, "(10, 9, 1)", "(10, 27, 1)", out=out)


@pytest.mark.parametrize("case", ["nan", "inf", "empty", "int_dtype", "pickle"])
def test_bad_calibration_data(tiny_files, case):
    p = tiny_files["dir"] / f"bad_{case}.npz"
    with np.load(tiny_files["calib"], allow_pickle=False) as z:
        x, y, meta = z["x"].copy(), z["y"], z["meta"]
    if case == "nan":
        x[3, 2, 1, 0] = np.nan
    elif case == "inf":
        x[0, 0, 0, 0] = np.inf
    elif case == "empty":
        x, y = x[:0], y[:0]
    elif case == "int_dtype":
        x = x.astype(np.int32)
    if case == "pickle":
        np.savez(p, x=x, y=y, meta=np.array([{"evil": 1}], dtype=object))
    else:
        np.savez(p, x=x, y=y, meta=meta)
    out = tiny_files["dir"] / "out"
    res = run("compile", tiny_files["model"], "--calib", p, "--eval", tiny_files["eval"], "--out", out)
    needle = {"nan": "non-finite", "inf": "non-finite", "empty": "empty", "int_dtype": "int32", "pickle": "pickle"}[case]
    _assert_clean_error(res, p.name, needle, out=out)


def test_unknown_backend(tiny_files):
    out = tiny_files["dir"] / "out"
    res = run("compile", tiny_files["model"], "--eval", tiny_files["eval"], "--targets", "warpdrive:int8", "--out", out)
    _assert_clean_error(res, "warpdrive", "available:", out=out)


def test_unwritable_output_dir(tiny_files):
    blocker = tiny_files["dir"] / "afile"
    blocker.write_text("x")
    res = run("compile", tiny_files["model"], "--eval", tiny_files["eval"], "--out", blocker / "sub")
    _assert_clean_error(res, "afile")


def test_bad_budget(tiny_files):
    res = run("compile", tiny_files["model"], "--eval", tiny_files["eval"], "--out", tiny_files["dir"] / "o", "--max-delta", "eacc=lots")
    _assert_clean_error(res, "lots")


def test_quantize_report_and_outputs(tiny_files):
    out = tiny_files["dir"] / "q"
    res = run("quantize", tiny_files["model"], "--calib", tiny_files["calib"], "--report", "--out", out)
    assert res.exit_code == 0, res.output
    assert "SQNR" in res.output and "overflow checks" in res.output
    assert {p.name for p in out.iterdir()} >= {"model_qdq.onnx", "params.json", "report.json"}


def test_quantize_catches_data_in_the_wrong_normalization(tiny_files):
    """Calibration data already z-scored, fed to a model whose contract z-scores again: caught, exit 2."""
    from nilmc.calibration_data.dataset import NilmDataset

    ds = NilmDataset.load(tiny_files["calib"])
    ds.x = (ds.x * 1000.0).astype(np.float32)  # raw features 1000x off their training scale
    p = ds.save(tiny_files["dir"] / "scaled.npz")
    res = run("quantize", tiny_files["model"], "--calib", p, "--out", tiny_files["dir"] / "q2")
    _assert_clean_error(res, "normaliz", out=tiny_files["dir"] / "q2")


def test_data_generate_inspect_and_bad_file(tmp_path):
    out = tmp_path / "g.npz"
    res = run("data", "generate", "--windows", "50", "--split", "calib", "--seed", "2", "--out", out, "--json")
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["n_windows"] == 50 and info["input_shape"] == [10, 9, 1]
    again = run("data", "inspect", out, "--json")
    assert again.exit_code == 0 and json.loads(again.output)["sha256"] == info["sha256"]
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip at all")
    _assert_clean_error(run("data", "inspect", bad), "bad.npz")


def test_data_convert_ukdale_excerpt(tmp_path):
    src = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "ukdale_house_excerpt_120s.csv"
    if not src.is_file():
        pytest.skip("the UK-DALE excerpt is not beside the checkout")
    res = run("data", "convert", "ukdale_excerpt", src, "--out", tmp_path / "lf.npz", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["input_shape"] == [599, 1, 1]


@pytest.mark.slow
@pytest.mark.tf
def test_train_writes_model_and_contract(tiny_files):
    stem = tiny_files["dir"] / "m"
    res = run("train", "--data", tiny_files["calib"], "--val", tiny_files["eval"], "--appliance", "kettle",
              "--epochs", "1", "--out", stem, "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["parameters"] == 672129 and 0 < out["val_metrics"]["n"]
    assert stem.with_suffix(".onnx").is_file() and Path(str(stem) + ".keras.contract.json").is_file()
    bad = run("train", "--data", tiny_files["calib"], "--appliance", "dishwasher", "--epochs", "1", "--out", tiny_files["dir"] / "n")
    _assert_clean_error(bad, "dishwasher", "kettle")


def test_a_wildcard_skips_the_targets_that_refuse_the_model_but_a_named_one_is_bad_input(tiny_files):
    """--targets all on any ONNX model exited 2: the Keras-only targets it brings in refused the model. A target a wildcard
    brought in whose pre-check refuses the model is skipped with its reason; named on its own it is still bad input."""
    f = tiny_files
    common = ["compile", str(f["model"]), "--calib", str(f["calib"]), "--eval", str(f["eval"]), "--json"]
    r = run(*common, "--targets", "dpu:all", "--out", str(f["dir"] / "all"))
    doc = json.loads(r.output)
    assert set(doc["skipped"]) == {"dpu:b2304_qat", "dpu:b4096_qat"} and "Keras source" in doc["skipped"]["dpu:b2304_qat"]
    assert [t["target"] for t in doc["targets"]] == ["dpu:b2304", "dpu:b4096"] and r.exit_code == doc["exit_code"] != 2, doc
    assert sorted(p.name for p in (f["dir"] / "all").iterdir() if not p.name.startswith(".")) == ["dpu-b2304", "dpu-b4096", "reference", "summary.json"]
    named = run(*common, "--targets", "dpu:b2304,dpu:b2304_qat", "--out", str(f["dir"] / "named"))
    assert named.exit_code == 2 and json.loads(named.output)["skipped"] == {}

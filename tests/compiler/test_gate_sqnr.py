"""The gate reads more than EACC: an output-SQNR floor (default 10 dB) that fails an all-zero artifact,
recorded in the budget, and a failing target's line naming the cause the overflow and coverage analysis found."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from nilmc.backends.base import Artifact, Capabilities, Verification
from nilmc.backends.registry import Target, default_registry
from nilmc.compiler.cli import cli
from nilmc.compiler.compare import DEFAULT_MIN_INT8_SHARE, DEFAULT_MIN_SQNR_DB, compare, parse_budget
from nilmc.compiler.driver import CompileOptions, compile_model
from nilmc.compiler.errors import BadInputError
from nilmc.compiler.metrics import nilm_metrics
from nilmc.compiler.report import summary_table
from nilmc.quantization.traits import GENERIC_INT8


class _ZeroRunner:
    """Predicts 0 W for every window (the graph output that de-normalizes to 0 W)."""

    verification = Verification.EMULATED

    def __init__(self, value: float) -> None:
        self.value = np.float32(value)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def infer(self, feeds):
        n = len(next(iter(feeds.values())))
        return {"output": np.full((n, 1), self.value, np.float32)}


class ZeroInt8:
    """A quantizing test backend whose artifact outputs 0 W: it takes the driver's parameters and ignores them."""

    name = "zero"
    capabilities = Capabilities(precisions=("int8",), description="test double: all-zero output", traits={"int8": GENERIC_INT8})

    def lower(self, model, out_dir, *, precision, options=None):
        zero = float(np.asarray(model.contract.target.from_watts(np.zeros(1, np.float32))).ravel()[0])
        (Path(out_dir) / "zero.json").write_text(json.dumps({"output": zero}))
        return Artifact(self.name, precision, Path(out_dir), "zero.json", ["zero.json"], kind="all-zero test artifact",
                        info={"quantization": options["params"].to_json()})

    def runner(self, artifact):
        return _ZeroRunner(json.loads(Path(artifact.path).read_text())["output"])


@pytest.fixture()
def registry():
    reg = default_registry(plugins=False)
    reg.register(ZeroInt8())
    return reg


def test_an_all_zero_artifact_fails_the_default_gate(registry, tiny, tiny_ds, tiny_eval, tmp_path):
    targets = [Target("zero", "int8"), Target("onnxruntime", "fp32")]
    s = compile_model(tiny, tiny_eval, targets, tmp_path / "o", calib=tiny_ds, registry=registry)
    zero, fp32 = s.results
    assert s.exit_code == 1 and zero.status == "FAIL" and fp32.passed
    assert zero.report.extra["output_sqnr_db"] <= 0.01  # all zeros: noise == signal
    assert any(v.metric == "sqnr_db" for v in zero.report.violations)
    assert fp32.report.extra["output_sqnr_db"] == math.inf
    m = json.loads((tmp_path / "o" / "zero-int8" / "manifest.json").read_text())
    assert m["verification"]["budget"] == {"eacc": 0.5, "min_sqnr_db": DEFAULT_MIN_SQNR_DB, "min_int8_macs_share": DEFAULT_MIN_INT8_SHARE}
    assert any(v["metric"] == "sqnr_db" and v["min"] == DEFAULT_MIN_SQNR_DB for v in m["verification"]["violations"])
    assert m["verification"]["cause"].startswith("likely cause: ")
    table = summary_table(s)
    line = next(ln for ln in table.splitlines() if ln.startswith("  zero:int8:"))
    assert "output SQNR" in line and "< min 10 dB" in line and "likely cause:" in line


def test_the_floor_alone_fails_it_even_with_a_loose_eacc_budget(registry, tiny, tiny_ds, tiny_eval, tmp_path):
    s = compile_model(tiny, tiny_eval, [Target("zero", "int8")], tmp_path / "o", calib=tiny_ds, budget={"eacc": 100, "mae": 1e6, "f1": 100},
                      registry=registry)
    (r,) = s.results
    assert not r.passed and [v.metric for v in r.report.violations] == ["sqnr_db"]
    off = compile_model(tiny, tiny_eval, [Target("zero", "int8")], tmp_path / "off", calib=tiny_ds, budget={"eacc": 100, "mae": 1e6, "f1": 100},
                        registry=registry, options=CompileOptions(min_sqnr_db=None))
    assert off.passed and "min_sqnr_db" not in off.results[0].report.budget


def test_cause_names_the_overflow_finding(registry, tmp_path):
    from helpers import tiny_dataset
    from test_driver import _unnormalized  # raw features whose scales differ by ~10^4

    model, ds = _unnormalized(tiny_dataset())
    s = compile_model(model, ds, [Target("onnxruntime", "int8")], tmp_path / "o", calib=ds, budget={"eacc": 100},
                      registry=registry, options=CompileOptions(min_sqnr_db=500.0))
    (r,) = s.results
    assert not r.passed
    assert "likely cause:" in r.report.cause and "input_features on 'input'" in r.report.cause, r.report.cause
    assert "input features" in r.report.failure_line()


def test_budget_floor_parsing_and_verify_without_predictions():
    assert parse_budget("eacc=0.5,min_sqnr_db=20") == {"eacc": 0.5, "min_sqnr_db": 20.0}
    assert parse_budget("min_sqnr_db=-3")["min_sqnr_db"] == -3.0  # a floor may be negative
    for bad in ("min_sqnr_db=inf", "min_sqnr_db=nan", "min_sqnr_db=x"):
        with pytest.raises(BadInputError):
            parse_budget(bad)
    truth = np.array([0.0, 2500.0, 10.0, 2400.0])
    m = nilm_metrics(truth, truth + 5.0, on_threshold_w=2000.0)
    rep = compare(m, m, {"eacc": 0.5, "min_sqnr_db": 10.0})  # nilmc verify: no FP32 predictions
    assert rep and rep.unchecked == ("min_sqnr_db",)
    assert not compare(m, m, {"min_sqnr_db": 10.0}, sqnr_db=float("nan"))
    assert compare(m, m, {"min_sqnr_db": 10.0}, sqnr_db=math.inf)


def test_cli_min_sqnr(tiny_files, tmp_path):
    args = ["compile", tiny_files["model"], "--calib", tiny_files["calib"], "--eval", tiny_files["eval"], "--targets", "onnxruntime:fp32"]
    bad = CliRunner().invoke(cli, [*map(str, args), "--out", str(tmp_path / "a"), "--min-sqnr", "loud"])
    assert bad.exit_code == 2 and "--min-sqnr" in bad.output
    ok = CliRunner().invoke(cli, [*map(str, args), "--out", str(tmp_path / "b"), "--min-sqnr", "25"])
    assert ok.exit_code == 0, ok.output
    m = json.loads((tmp_path / "b" / "onnxruntime-fp32" / "manifest.json").read_text())
    assert m["verification"]["budget"]["min_sqnr_db"] == 25.0

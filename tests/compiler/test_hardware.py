"""Hardware figures per board (seed 003 Table 12): from the gate's evaluation EACC and the paper's board facts."""
from __future__ import annotations

import json

import numpy as np
import pytest

from nilmc.compiler.compare import compare
from nilmc.compiler.hardware import board_configs, board_rows, hardware_table, manifest_section
from nilmc.compiler.metrics import nilm_metrics


def _report(eacc_target: float, verification: str = "emulated"):
    """A Report whose candidate EACC is ``eacc_target`` (a fraction): predictions off by a fixed share of the truth."""
    truth = np.full(100, 1000.0)
    pred = truth * (1 + 2 * (1 - eacc_target))
    ref = nilm_metrics(truth, truth, on_threshold_w=500)
    return compare(ref, nilm_metrics(truth, pred, on_threshold_w=500), {"eacc": 100}, verification=verification)


def test_every_table_12_row_and_the_dpu_boards_are_configured():
    names = [c["name"] for c in board_configs()]
    assert names == ["RP4:1", "RP4:4", "NCS2", "IMX8P", "NANO", "XAVIERNX", "ULTRA96V1", "ZCU102", "ZCU104", "KV260"]
    by = {c["name"]: c for c in board_configs()}
    # seed 003 Table 12 as published, Table 10 T-P latency, Table 9 time-domain features, Table 8 TDP and cost
    assert by["RP4:4"]["published"] == {"eacc_per_watt": 17.1, "eacc_per_usd": 1.07, "eacc_per_fps": 1.44}
    assert (by["RP4:1"]["model_ms"], by["RP4:4"]["model_ms"], by["NCS2"]["model_ms"], by["XAVIERNX"]["model_ms"]) == (1.19, 0.75, 2.47, 0.63)
    assert (by["ULTRA96V1"]["power_w"], by["ULTRA96V1"]["cost_usd"], by["ULTRA96V1"]["feature_ms"]) == (24, 249, 0.186)
    assert (by["NCS2"]["power_w"], by["NCS2"]["cost_usd"]) == (11.5, 99)  # watts with its RP4 host, dollars as the paper counted
    assert by["NANO"]["targets"] == ["tensorrt:fp16"] and by["XAVIERNX"]["targets"][0] == "tensorrt:int8"


def test_figures_divide_the_evaluation_eacc_by_the_board_facts():
    rows = board_rows([("dpu:b2304", _report(0.8076)), ("tensorrt:fp16", _report(0.85, "emulated")),
                       ("tensorrt:int8", _report(0.84)), ("openvino:fp16", _report(0.855, "measured"))])
    by = {r["board"]: r for r in rows}
    u96 = by["ULTRA96V1"]
    assert u96["target"] == "dpu:b2304" and u96["eacc_pct"] == pytest.approx(80.76)
    assert u96["eacc_per_watt"] == pytest.approx(80.76 / 24, abs=1e-3) and u96["eacc_per_usd"] == pytest.approx(80.76 / 249, abs=1e-4)
    assert u96["fps"] == pytest.approx(1000 / (1.05 + 0.186), abs=0.1)
    assert u96["eacc_per_fps"] == pytest.approx(80.76 * (1.05 + 0.186) / 1000, abs=1e-4)
    assert u96["eacc_how"].startswith("emulated") and "from the paper" in u96["latency_how"] and "TDP" in u96["power_how"]
    assert u96["published_table12"]["eacc_per_watt"] == 12.6
    assert by["XAVIERNX"]["target"] == "tensorrt:int8" and by["NANO"]["target"] == "tensorrt:fp16"
    assert by["NCS2"]["eacc_how"].startswith("measured") and by["NCS2"]["eacc_per_watt"] == pytest.approx(85.5 / 11.5, abs=1e-3)
    assert by["RP4:1"]["target"] is None and "eacc_per_watt" not in by["RP4:1"]  # no TFLite target in this compile
    assert by["ZCU102"]["target"] is None


def test_unverified_or_failed_targets_give_no_figures():
    assert board_rows([("dpu:b2304", None)])[6]["target"] is None
    assert manifest_section("dpu:b2304", _report(0.8, "not verified")) == {}
    assert manifest_section("onnxruntime:int8", _report(0.8)) == {}  # runs on no board of the table
    sec = manifest_section("dpu:b4096", _report(0.8))["hardware"]
    assert [r["board"] for r in sec["rows"]] == ["ZCU102", "ZCU104", "KV260"]
    assert all(r["eacc_per_watt"] is None and r["fps"] is None for r in sec["rows"])  # not in Table 8: nothing invented


def test_the_table_has_table_12s_columns_with_the_papers_numbers_beside():
    rows = [r for r in board_rows([("dpu:b2304", _report(0.8076))]) if r["target"]]
    text = hardware_table(rows)
    head = next(line for line in text.splitlines() if line.startswith("board"))
    assert head.split()[:10] == ["board", "target", "EACC", "%", "EACC/W", "paper", "EACC/$", "paper", "EACC/FPS", "paper"]
    line = next(line for line in text.splitlines() if line.startswith("ULTRA96V1"))
    assert "80.76 emulated" in line and "3.37" in line and "12.6" in line and "0.32" in line and "0.79" in line
    assert "not on one scale" in text
    implied = next(line for line in text.splitlines() if "EACC/FPS implies" in line)  # one board: one number, not "55-55"
    assert "-" not in implied.split("implies ")[1].split(" FPS")[0], implied


def test_a_compile_writes_the_gate_eacc_into_the_manifest(tiny, tiny_ds, tiny_eval, tmp_path):
    from nilmc.backends.registry import Target, default_registry
    from nilmc.compiler.driver import compile_model
    from nilmc.compiler.report import summary_table

    s = compile_model(tiny, tiny_eval, [Target("dpu", "b2304"), Target("onnxruntime", "int8")], tmp_path / "o", calib=tiny_ds,
                      budget={"eacc": 100}, registry=default_registry(plugins=False))
    m = json.loads((tmp_path / "o" / "dpu-b2304" / "manifest.json").read_text())
    (row,) = m["hardware"]["rows"]
    assert row["board"] == "ULTRA96V1"
    # the gate's evaluation EACC, not the calibration windows' EACC the DPU backend reports beside its artifact
    assert row["eacc_pct"] == pytest.approx(100 * m["verification"]["candidate"]["eacc"], abs=1e-3)
    assert "hardware" not in json.loads((tmp_path / "o" / "onnxruntime-int8" / "manifest.json").read_text())
    text = summary_table(s)
    assert "Hardware figures per board" in text and "ULTRA96V1" in text

"""compiler/sweep_results.py: the sweep's SQLite file and its Table 6 / Table 7 layouts (numbers checked by hand)."""
from __future__ import annotations

import pytest

from nilmc.compiler.errors import BadInputError, DataError
from nilmc.compiler.sweep_results import FP32_ROW, ResultsDB, format_table6, format_table7, table6, table7


def _cell(key, setup, norm, app, *, fp32_mae, truth, n=100, targets=(), status="done"):
    return {"key": key, "label": f"{setup}/{norm}/{app}", "setup": setup, "normalization": norm, "appliance": app, "seed": 0, "epochs": 1,
            "budget": "eacc=0.5", "model": "trained", "status": status, "eval_windows": n, "sum_truth_w": truth,
            "fp32": {"eacc": 1 - fp32_mae * n / (2 * truth), "mae": fp32_mae}, "timings": {"total_s": 1.0},
            "targets": [{"target": t, "backend": t.split(":")[0], "precision": t.split(":")[1], "status": "PASS" if ok else "FAIL",
                         "passed": ok, "verification": "measured", "sum_abs_err_w": err, "delta_eacc_pts": 0.0} for t, err, ok in targets],
            "details": {t: {"layers": [], "trace": None} for t, _, _ in targets}}


@pytest.fixture()
def db(tmp_path):
    d = ResultsDB(tmp_path / "r.sqlite")
    # T-P/C: kettle Σ|e| 1000 of Σp 10000, fridge 500 of 5000 -> combined EACC 1 - 1500/30000 = 95 %
    d.record(_cell("a", "T-P", "C", "kettle", fp32_mae=10.0, truth=10000.0, targets=[("onnxruntime:int8", 2000.0, False)]))
    d.record(_cell("b", "T-P", "C", "fridge", fp32_mae=5.0, truth=5000.0, targets=[("onnxruntime:int8", 500.0, True)]))
    # T-I/C: 1 - (3000 + 1000) / 30000 = 86.67 %; T-V/C is voltage-only and stays out of the average
    d.record(_cell("c", "T-I", "C", "kettle", fp32_mae=30.0, truth=10000.0, targets=[("onnxruntime:int8", 3000.0, True)]))
    d.record(_cell("d", "T-I", "C", "fridge", fp32_mae=10.0, truth=5000.0, targets=[("onnxruntime:int8", 1000.0, True)]))
    d.record(_cell("e", "T-V", "C", "kettle", fp32_mae=90.0, truth=10000.0, targets=[("onnxruntime:int8", 9000.0, True)]))
    d.record(_cell("f", "T-V", "C", "fridge", fp32_mae=1.0, truth=5000.0, status="failed", targets=[]))
    d.record(_cell("g", "T-P", "A", "kettle", fp32_mae=40.0, truth=10000.0))
    d.record(_cell("h", "T-P", "A", "fridge", fp32_mae=20.0, truth=5000.0))
    yield d
    d.close()


def test_table6_combines_appliances_as_seed_003_eacc(db):
    t6 = table6(db)
    assert t6["normalizations"] == ["A", "C"] and [r["setup"] for r in t6["rows"]] == ["T-V", "T-I", "T-P"]
    rows = {r["setup"]: r for r in t6["rows"]}
    assert rows["T-P"]["number"] == 3 and rows["T-P"]["eacc"]["C"] == pytest.approx(95.0)
    assert rows["T-P"]["eacc"]["A"] == pytest.approx(100 * (1 - 6000 / 30000))
    assert rows["T-I"]["eacc"]["C"] == pytest.approx(100 * (1 - 4000 / 30000))
    assert rows["T-V"]["eacc"]["C"] is None  # one appliance failed: no made-up number
    assert rows["T-I"]["eacc"]["A"] is None
    text = format_table6(t6)
    assert "95.00" in text and "T-P" in text


def test_table7_featured_and_average_without_voltage_only(db):
    t7 = table7(db)
    assert t7["featured"] == "T-P" and t7["normalization"] == "C" and t7["averaged_setups"] == ["T-I", "T-P"]
    fp32, int8 = t7["rows"]
    assert fp32["target"] == FP32_ROW and fp32["featured_eacc"] == pytest.approx(95.0)
    assert fp32["average_eacc"] == pytest.approx((95.0 + 100 * (1 - 4000 / 30000)) / 2)
    assert int8["featured_eacc"] == pytest.approx(100 * (1 - 2500 / 30000))
    assert int8["featured_delta"] == pytest.approx(95.0 - 100 * (1 - 2500 / 30000))
    assert int8["average_delta"] == pytest.approx(fp32["average_eacc"] - (100 * (1 - 2500 / 30000) + 100 * (1 - 4000 / 30000)) / 2)
    assert (int8["passed"], int8["cells"]) == (4, 5)
    assert "4/5 PASS" in format_table7(t7)
    with pytest.raises(BadInputError):
        table7(db, featured="HF-P")


def test_record_replaces_a_cell_and_reads_back(db):
    db.record(_cell("a", "T-P", "C", "kettle", fp32_mae=10.0, truth=10000.0, targets=[("onnxruntime:int8", 1000.0, True)]))
    assert [r["sum_abs_err_w"] for r in db.results(["a"])] == [1000.0]
    assert db.status("a") == "done" and db.status("zzz") is None
    assert set(db.details("a")) == {"onnxruntime:int8"}


def test_not_a_database_is_a_typed_error(tmp_path):
    bad = tmp_path / "x.sqlite"
    bad.write_text("not sqlite " * 100)
    with pytest.raises(DataError):
        ResultsDB(bad)
    with pytest.raises(DataError):
        ResultsDB(tmp_path / "missing.sqlite", create=False)

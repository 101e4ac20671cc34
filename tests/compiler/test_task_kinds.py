"""Task kinds in the contract: regression (unchanged), binary and multi-label ON/OFF classification, their
metrics (per-appliance and support-weighted F1/precision/recall/accuracy), the f1w budget and a compile."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from nilmc.backends.registry import Target
from nilmc.calibration_data.dataset import NilmDataset
from nilmc.calibration_data.normalization import FeatureStats, Normalization, NormalizationSpec
from nilmc.compiler.cli import cli
from nilmc.compiler.compare import check_budget_for_task, compare, default_budget, parse_budget
from nilmc.compiler.contract import ModelContract
from nilmc.compiler.contract_flags import ContractFlags, build_contract
from nilmc.compiler.driver import CompileOptions, compile_model
from nilmc.compiler.errors import BadInputError, DataError, ShapeMismatchError
from nilmc.compiler.metrics import ClassificationMetrics, classification_metrics, metrics_from_json
from nilmc.compiler.model import ONNX_IR_VERSION, ONNX_OPSET, Model
from nilmc.compiler.report import summary_table

APPS = ("kettle", "microwave", "fridge")
THR = (1000.0, 200.0, 50.0)
T = 8


def _contract(**kw: object) -> ModelContract:
    base = dict(input_shape=(T, 3, 1), normalization=NormalizationSpec(Normalization.A, None), appliance="kettle")
    return ModelContract(**{**base, **kw})  # type: ignore[arg-type]


# --------------------------------------------------------------------------- contract
def test_regression_contract_json_is_unchanged():
    c = _contract()
    assert c.task == "regression" and not c.is_classification
    keys = set(json.loads(c.dumps()))
    assert not keys & {"task", "appliances", "on_thresholds_w", "decision_threshold"}
    assert ModelContract.loads(c.dumps()).dumps() == c.dumps()


def test_multilabel_contract_round_trip_and_checks():
    c = _contract(task="multilabel", appliances=APPS, on_thresholds_w=THR)
    d = json.loads(c.dumps())
    assert d["task"] == "multilabel" and d["appliances"] == list(APPS) and d["on_thresholds_w"] == list(THR)
    assert ModelContract.loads(c.dumps()) == c
    assert c.output_appliances == APPS
    with pytest.raises(BadInputError, match="binary contract classifies one appliance"):
        _contract(task="binary", appliances=APPS, on_thresholds_w=THR)
    with pytest.raises(BadInputError, match="2 ON thresholds for 3 appliances"):
        _contract(task="multilabel", appliances=APPS, on_thresholds_w=(1.0, 2.0))
    with pytest.raises(BadInputError, match="unknown task"):
        _contract(task="ranking")
    with pytest.raises(ShapeMismatchError, match="2 values per window"):
        c.to_watts(np.zeros((4, 2), np.float32))
    with pytest.raises(DataError, match="fridge"):
        c.select_truth(np.zeros((2, 2), np.float32), ["kettle", "microwave"])


def test_binary_defaults_to_the_appliance_and_its_threshold():
    c = _contract(task="binary", on_threshold_w=1500.0)
    assert c.appliances == ("kettle",) and c.on_thresholds_w == (1500.0,)


# --------------------------------------------------------------------------- metrics
def test_classification_metrics_by_hand():
    truth = np.array([[2000, 0], [2000, 300], [0, 300], [0, 0]], np.float32)  # kettle ON 2x, microwave ON 2x
    prob = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.6], [0.1, 0.4]], np.float32)
    m = classification_metrics(truth, prob, appliances=("kettle", "microwave"), on_thresholds_w=(1000, 200))
    k, mw = m.per_appliance
    assert (k.tp, k.fp, k.fn, k.tn) == (1, 1, 1, 1) and k.f1 == pytest.approx(0.5) and k.accuracy == 0.5
    assert (mw.tp, mw.fp, mw.fn, mw.tn) == (2, 0, 0, 2) and mw.f1 == 1.0
    assert m.f1w == pytest.approx((2 * 0.5 + 2 * 1.0) / 4)
    assert m.accuracy == pytest.approx(0.75) and m.subset_accuracy == pytest.approx(0.5)
    assert metrics_from_json(m.to_json()) == m


def test_classification_metrics_agree_with_scikit_learn():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    truth = rng.uniform(0, 400, size=(300, 3)).astype(np.float32)
    prob = rng.uniform(size=(300, 3)).astype(np.float32)
    thr = (100.0, 200.0, 300.0)
    m = classification_metrics(truth, prob, appliances=APPS, on_thresholds_w=thr)
    yt, yp = truth >= np.array(thr), prob >= 0.5
    assert m.f1w == pytest.approx(sk.f1_score(yt, yp, average="weighted", zero_division=0))
    assert m.precision_w == pytest.approx(sk.precision_score(yt, yp, average="weighted", zero_division=0))
    assert m.recall_w == pytest.approx(sk.recall_score(yt, yp, average="weighted", zero_division=0))
    assert m.subset_accuracy == pytest.approx(sk.accuracy_score(yt, yp))


def test_nan_probabilities_fail_the_gate():
    truth = np.array([[2000.0], [0.0]], np.float32)
    ref = classification_metrics(truth, np.array([[0.9], [0.1]]), appliances=("kettle",), on_thresholds_w=(1000,))
    bad = classification_metrics(truth, np.array([[np.nan], [0.1]]), appliances=("kettle",), on_thresholds_w=(1000,))
    assert not bad.finite
    assert not compare(ref, bad, {"f1w": 1.0})


def test_f1w_budget():
    assert parse_budget("f1w=1,accuracy=0.5") == {"f1w": 1.0, "accuracy": 0.5}
    assert default_budget("multilabel") == {"f1w": 1.0} and default_budget("regression") == {"eacc": 0.5}
    with pytest.raises(BadInputError, match="eacc"):
        check_budget_for_task({"eacc": 0.5}, "multilabel")
    with pytest.raises(BadInputError, match="f1w"):
        check_budget_for_task({"f1w": 1.0}, "regression")
    truth = np.array([[2000, 0], [2000, 300], [0, 300], [0, 0]], np.float32)
    ref = classification_metrics(truth, np.array([[0.9, 0.1], [0.8, 0.8], [0.1, 0.6], [0.1, 0.4]]),
                                 appliances=("kettle", "microwave"), on_thresholds_w=(1000, 200))
    worse = classification_metrics(truth, np.array([[0.9, 0.1], [0.2, 0.8], [0.1, 0.6], [0.1, 0.4]]),
                                   appliances=("kettle", "microwave"), on_thresholds_w=(1000, 200))
    rep = compare(ref, worse, {"f1w": 1.0})
    assert not rep and rep.deltas["f1w"] > 1.0 and rep.deltas["f1.kettle"] > 0 and rep.deltas["f1.microwave"] == 0
    assert "f1w loss" in rep.failure_line()
    assert compare(ref, ref, {"f1w": 0.0}) and "f1w delta" in str(compare(ref, ref, {"f1w": 0.0}))


# --------------------------------------------------------------------------- a tiny classifier, end to end
def _data(n: int, seed: int) -> NilmDataset:
    rng = np.random.default_rng(seed)
    on = rng.random((n, 3)) < 0.35
    power = np.where(on, np.array([2000.0, 800.0, 120.0]), 0.0) * rng.uniform(0.8, 1.2, (n, 3))
    x = (power[:, None, :] + rng.normal(0, 15, (n, T, 3))).astype(np.float32)[..., None]
    return NilmDataset(x=x, y=power.astype(np.float32), appliances=list(APPS), feature_names=["a", "b", "c"],
                       train_stats=FeatureStats.fit(x), on_thresholds=list(THR), info={"setup": "tiny-ml"})


def _classifier(path: str) -> str:
    """Flatten -> MatMul -> Add -> Sigmoid: appliance m is ON when its channel's mean passes its threshold."""
    w = np.zeros((T * 3, 3), np.float32)
    for t in range(T):
        for m in range(3):
            w[t * 3 + m, m] = 8.0 / (T * THR[m])
    b = np.full(3, -8.0, np.float32)
    g = helper.make_graph(
        [helper.make_node("Flatten", ["input"], ["f"]), helper.make_node("MatMul", ["f", "w"], ["z"]),
         helper.make_node("Add", ["z", "b"], ["zb"]), helper.make_node("Sigmoid", ["zb"], ["output"])],
        "tiny_ml", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", T, 3, 1])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", ONNX_OPSET)])
    proto.ir_version = ONNX_IR_VERSION
    onnx.save(proto, path)
    return path


def test_flags_build_a_multilabel_contract(tmp_path):
    path = _classifier(str(tmp_path / "m.onnx"))
    c = build_contract(path, ContractFlags(input_norm="none", task="multilabel", appliances="kettle,microwave,fridge", thresholds="1000,200,50"))
    assert c.task == "multilabel" and c.appliances == APPS and c.on_thresholds_w == THR and c.peak_power_w == 1.0
    with pytest.raises(BadInputError, match="--task binary or --task multilabel"):
        build_contract(path, ContractFlags(input_norm="none", appliance="kettle", thresholds="5"))
    res = CliRunner().invoke(cli, ["contract", "init", path, "--out", str(tmp_path / "c.json"), "--input-norm", "none",
                                   "--task", "multilabel", "--appliances", "kettle,microwave,fridge", "--thresholds", "1000,200,50"])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "c.json").read_text())
    assert doc["task"] == "multilabel" and doc["on_thresholds_w"] == list(THR) and "task" in doc["_help"]


def test_compile_a_multilabel_classifier(tmp_path):
    from nilmc.compiler.frontend import load_model

    path = _classifier(str(tmp_path / "m.onnx"))
    contract = build_contract(path, ContractFlags(input_norm="none", task="multilabel", appliances=",".join(APPS), thresholds="1000,200,50"))
    model: Model = load_model(path, contract=contract)
    s = compile_model(model, _data(300, 1), [Target("onnxruntime", "fp32"), Target("onnxruntime", "int8")], tmp_path / "out",
                      calib=_data(200, 2), options=CompileOptions(latency_windows=5))
    assert isinstance(s.reference, ClassificationMetrics) and s.reference.f1w > 0.9
    fp32, int8 = s.results
    assert fp32.passed and fp32.report.deltas["f1w"] == 0.0
    assert int8.error is None and int8.report.budget["f1w"] == 1.0 and abs(int8.report.deltas["f1w"]) < 5
    # the outputs are probabilities: the fidelity figure says so (not "_w")
    assert "max_abs_diff_w" not in int8.report.extra and 0.0 <= int8.report.extra["max_abs_diff_probability"] <= 1.0
    manifest = json.loads((tmp_path / "out" / int8.bundle.name / "manifest.json").read_text())
    assert "trace" not in manifest and manifest["contract"]["task"] == "multilabel"
    table = summary_table(s)
    assert "weighted F1" in table and "onnxruntime:int8" in table
    with pytest.raises(BadInputError, match="eacc"):
        compile_model(model, _data(50, 1), [Target("onnxruntime", "fp32")], tmp_path / "out2", budget={"eacc": 0.5})


def test_verify_a_classifier_bundle(tmp_path):
    """`nilmc verify` scores a classifier bundle in its own metrics (it used to score regression only and fail)."""
    from nilmc.compiler.bundle import verify_bundle
    from nilmc.compiler.frontend import load_model

    path = _classifier(str(tmp_path / "m.onnx"))
    contract = build_contract(path, ContractFlags(input_norm="none", task="multilabel", appliances=",".join(APPS), thresholds="1000,200,50"))
    ev = _data(300, 1)
    s = compile_model(load_model(path, contract=contract), ev, [Target("onnxruntime", "fp32")], tmp_path / "out",
                      options=CompileOptions(latency_windows=5))
    bundle = tmp_path / "out" / s.results[0].bundle.name
    r = verify_bundle(bundle, ev)
    assert r.passed and r.report.deltas["f1w"] == 0.0 and r.report.budget["f1w"] == 1.0
    other = _data(300, 7)  # another evaluation set: the FP32 reference is rerun from reference/model.onnx
    r2 = verify_bundle(bundle, other)
    assert r2.passed and any("rerun" in n for n in r2.notes)
    with pytest.raises(BadInputError, match="eacc"):
        verify_bundle(bundle, ev, budget={"eacc": 0.5})
    ev.save(tmp_path / "ev.npz")
    res = CliRunner().invoke(cli, ["verify", str(tmp_path / "out"), "--eval", str(tmp_path / "ev.npz"), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["passed"] and doc["bundles"][0]["report"]["deltas"]["f1w"] == 0.0


def test_cli_compile_of_a_classifier_without_max_delta_uses_the_f1w_default(tmp_path):
    """`nilmc compile` with no --max-delta gates a classifier on f1w=1 (it used to force eacc=0.5 and refuse it)."""
    path = _classifier(str(tmp_path / "m.onnx"))
    _data(300, 1).save(tmp_path / "ev.npz")
    args = ["compile", path, "--eval", str(tmp_path / "ev.npz"), "--targets", "onnxruntime:fp32", "--out", str(tmp_path / "out"),
            "--input-norm", "none", "--task", "multilabel", "--appliances", ",".join(APPS), "--thresholds", "1000,200,50", "--json"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["targets"][0]["delta_f1w_pts"] == 0.0
    budget = json.loads((tmp_path / "out" / "onnxruntime-fp32" / "manifest.json").read_text())["verification"]["budget"]
    assert budget["f1w"] == 1.0 and "eacc" not in budget
    res = CliRunner().invoke(cli, [*args[:-1], "--out", str(tmp_path / "out2"), "--max-delta", "eacc=0.5"])
    assert res.exit_code != 0 and "not scored in" in res.output and "Traceback" not in res.output


def test_a_regression_head_under_a_classification_task_is_refused(tiny, tiny_ds, tiny_eval, tmp_path):
    """Fuzzed: --task binary on a regression model took outputs -1.17..3.13 as probabilities (F1 1.000, no word said)."""
    model = Model(tiny.graph, tiny.contract.with_(task="binary", peak_power_w=1.0), source="tiny")
    with pytest.raises(BadInputError, match=r"probabilities in \[0, 1\], but the model's FP32 outputs span") as err:
        compile_model(model, tiny_eval, [Target("onnxruntime", "fp32")], tmp_path / "out")
    assert "--task regression" in err.value.remedy and not (tmp_path / "out").exists()

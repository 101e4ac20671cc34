"""The contract from the command line: a model without one compiles with flags alone, or with
``nilmc contract init`` + ``--contract``, to the same EACC as the shipped model with its embedded contract."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import click
import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from nilmc.calibration_data.dataset import NilmDataset
from nilmc.calibration_data.normalization import FeatureStats
from nilmc.calibration_data.shipped import shipped_paths
from nilmc.compiler.cli import cli
from nilmc.compiler.contract import CONTRACT_KEY, ModelContract, canonical_input_shape, resolve_layout
from nilmc.compiler.errors import BadInputError, ShapeMismatchError
from nilmc.compiler.frontend import embed_keras_contract, find_contract, read_keras_contract

REPO = Path(__file__).resolve().parents[2]
TARGETS = "onnxruntime:fp32,onnxruntime:int8"


def run(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def _floats(values) -> str:
    return ",".join(repr(float(v)) for v in values)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The shipped model, the same model stripped of its contract, small calibration/evaluation sets."""
    root = tmp_path_factory.mktemp("contract_cli")
    p = shipped_paths()
    proto = onnx.load(str(p["model"]))
    text = next(m.value for m in proto.metadata_props if m.key == CONTRACT_KEY)
    del proto.metadata_props[:]
    onnx.save(proto, str(root / "bare.onnx"))
    shutil.copy(p["model"], root / "shipped.onnx")
    NilmDataset.load(p["calib"]).subset(slice(0, 300)).save(root / "calib.npz")
    NilmDataset.load(p["eval"]).subset(slice(0, 800)).save(root / "eval.npz")
    return {"root": root, "bare": root / "bare.onnx", "shipped": root / "shipped.onnx", "calib": root / "calib.npz",
            "eval": root / "eval.npz", "contract": json.loads(text), "full_calib": p["calib"]}


def _eacc(work, model, out, *extra) -> dict[str, float]:
    res = run("compile", model, "--calib", work["calib"], "--eval", work["eval"], "--targets", TARGETS,
              "--out", work["root"] / out, "--max-delta", "eacc=100", "--json", *extra)
    assert res.exit_code == 0, res.output
    return {t["target"]: t["eacc"] for t in json.loads(res.stdout)["targets"]}


@pytest.fixture(scope="module")
def shipped_eacc(work):
    return _eacc(work, work["shipped"], "shipped")


def _flags_from(c: dict) -> list[str]:
    st = c["normalization"]["stats"]
    return ["--input-norm", "zscore", "--input-mean", _floats(st["mean"]), "--input-std", _floats(st["std"]),
            "--appliance", c["appliance"], "--target-mean", repr(c["target"]["mean"]), "--target-std", repr(c["target"]["std"]),
            "--on-threshold", repr(c["on_threshold_w"]), "--peak-power", repr(c["peak_power_w"])]


def test_bare_model_is_refused_naming_flags_that_exist(work):
    res = run("compile", work["bare"], "--eval", work["eval"], "--out", work["root"] / "refused")
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nilmc: error: no model contract found"), res.stderr
    assert "nilmc contract init" in lines[0] and "--contract FILE" in lines[0]
    for flag in re.findall(r"--[a-z][a-z0-9-]+", lines[0]):
        assert flag in _all_options(), flag


def test_flags_alone_give_the_shipped_eacc(work, shipped_eacc):
    got = _eacc(work, work["bare"], "flags", *_flags_from(work["contract"]))
    assert got == pytest.approx(shipped_eacc, abs=1e-12)
    manifest = json.loads((work["root"] / "flags" / "onnxruntime-fp32" / "manifest.json").read_text())
    assert manifest["contract"]["normalization"]["stats"].keys() == {"mean", "std"}  # z-score needs no min/max


def test_stats_from_data_set_give_the_shipped_eacc(work, shipped_eacc):
    c = work["contract"]
    got = _eacc(work, work["bare"], "stats_from", "--input-norm", "C", "--input-stats-from", work["full_calib"], "--appliance", "kettle",
                "--target-mean", repr(c["target"]["mean"]), "--target-std", repr(c["target"]["std"]), "--on-threshold", "2000",
                "--peak-power", repr(c["peak_power_w"]))
    assert got == pytest.approx(shipped_eacc, abs=1e-12)


def test_contract_init_edit_and_pass_contract(work, shipped_eacc):
    path = work["root"] / "bare.contract.json"
    res = run("contract", "init", work["bare"], "--out", path)
    assert res.exit_code == 0, res.output
    assert "appliance" in res.stderr and "--contract" in res.stderr  # what to edit
    doc = json.loads(path.read_text())
    assert doc["input_shape"] == [10, 9, 1] and doc["layout"] == "NTF1" and doc["normalization"]["kind"] == "A"
    assert "_help" in doc and "--input-norm" in doc["_help"]["normalization"]
    c = work["contract"]  # the hand edit: what the model's author documented
    doc.update(appliance="kettle", target=c["target"], on_threshold_w=2000.0, peak_power_w=c["peak_power_w"],
               normalization={"kind": "zscore", "stats": {"mean": c["normalization"]["stats"]["mean"], "std": c["normalization"]["stats"]["std"]}})
    path.write_text(json.dumps(doc, indent=2))
    assert _eacc(work, work["bare"], "init", "--contract", path) == pytest.approx(shipped_eacc, abs=1e-12)
    assert run("contract", "init", work["bare"], "--out", path).exit_code == 2  # never overwritten without --force


def test_flags_override_a_contract_file(work):
    path = work["root"] / "override.contract.json"
    assert run("contract", "init", work["shipped"], "--out", path, "--appliance", "kettle").exit_code == 0
    res = run("contract", "show", work["bare"], "--contract", path, "--on-threshold", "1500", "--output", "last", "--json")
    assert res.exit_code == 0, res.output
    shown = json.loads(res.stdout)
    assert shown["on_threshold_w"] == 1500.0 and shown["output_select"] == "last" and shown["appliance"] == "kettle"
    assert shown["normalization"] == work["contract"]["normalization"]  # the shipped model's own contract was the base


def test_quantize_takes_contract_flags(work):
    res = run("quantize", work["bare"], "--calib", work["calib"], "--json", *_flags_from(work["contract"]))
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["output_sqnr_db"] > 10


@pytest.mark.parametrize(("args", "needle"), [
    (["--input-norm", "zscore", "--input-mean", "a,b", "--input-std", "1", "--appliance", "kettle"], "--input-mean"),
    (["--input-norm", "zscore", "--input-mean", "1", "--input-std", "0", "--appliance", "kettle"], "--input-std"),
    (["--input-norm", "zscore", "--input-mean", "1,2", "--input-std", "1", "--appliance", "kettle"], "9"),
    (["--input-norm", "zscore", "--appliance", "kettle"], "--input-stats-from"),
    (["--input-norm", "minmax", "--input-mean", "1", "--input-std", "2", "--appliance", "kettle"], "--input-min"),
    (["--input-norm", "bogus", "--appliance", "kettle"], "--input-norm"),
    (["--input-norm", "none"], "--appliance"),
    (["--input-norm", "none", "--appliance", "kettle", "--output", "middle"], "--output"),
    (["--input-norm", "none", "--appliance", "kettle", "--layout", "XYZ"], "--layout"),
    (["--input-norm", "none", "--appliance", "kettle", "--window", "7"], "--window"),
    (["--input-norm", "none", "--appliance", "kettle", "--target-std", "-1"], "--target-std"),
    (["--contract", "missing.json"], "nilmc contract init"),
])
def test_bad_flag_values_exit_2_with_one_line(work, args, needle):
    res = run("compile", work["bare"], "--eval", work["eval"], "--out", work["root"] / "bad", *args)
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("nilmc: error: ") and "; " in lines[0], res.stderr
    assert needle in lines[0] and "Traceback" not in res.output
    assert not (work["root"] / "bad").exists()


def _seq_model(path: Path) -> Path:
    """(N, 10, 9, 1) -> mean over features -> (N, 10): a sequence output."""
    node = helper.make_node("ReduceMean", ["input", "axes"], ["output"], keepdims=0)
    axes = helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3])
    graph = helper.make_graph([node], "seq", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 10, 9, 1])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 10])], [axes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.save(model, str(path))
    return path


def test_sequence_output_needs_a_selector(work):
    model = _seq_model(work["root"] / "seq.onnx")
    res = run("compile", model, "--eval", work["eval"], "--out", work["root"] / "seq_out", "--input-norm", "none", "--appliance", "kettle")
    assert res.exit_code == 2 and "10 values per window" in res.stderr and "--output midpoint" in res.stderr, res.output
    res = run("compile", model, "--eval", work["eval"], "--out", work["root"] / "seq_out", "--input-norm", "none", "--appliance", "kettle",
              "--output", "midpoint", "--max-delta", "eacc=100", "--json")
    assert res.exit_code == 0, res.output
    c = ModelContract.from_json({**work["contract"], "output_select": "index:3"})
    assert c.to_watts(np.arange(20, dtype=np.float32).reshape(2, 10)).tolist() == pytest.approx(
        (np.array([3.0, 13.0]) * c.target.std + c.target.mean).tolist())


def test_contract_fields_keep_old_json_valid(work):
    c = ModelContract.from_json(work["contract"])
    assert (c.layout, c.output_select) == ("", "")
    shipped_text = next(m.value for m in onnx.load(str(work["shipped"])).metadata_props if m.key == CONTRACT_KEY)
    assert c.dumps() == shipped_text  # defaults are not written: existing contracts stay byte-identical
    d = {**work["contract"], "layout": "ncw", "output_select": "index:-1"}
    assert ModelContract.from_json(d).to_json()["layout"] == "NCW"
    zs = {**work["contract"], "normalization": {"kind": "C", "stats": {"mean": [1.0] * 9, "std": [2.0] * 9}}}
    loaded = ModelContract.from_json(zs)
    assert loaded.normalization.stats.given == ("mean", "std") and loaded.to_json()["normalization"] == zs["normalization"]
    with pytest.raises(BadInputError, match="--input-min"):
        ModelContract.from_json({**zs, "normalization": {"kind": "B", "stats": zs["normalization"]["stats"]}})
    with pytest.raises(BadInputError):
        FeatureStats.from_json({"mean": [1.0]})


@pytest.mark.parametrize(("shape", "layout", "canonical"), [
    ((600,), "NW", (600, 1, 1)), ((600, 1), "NWC", (600, 1, 1)), ((1, 600), "NCW", (600, 1, 1)),
    ((495, 3), "NWC", (495, 3, 1)), ((10, 9, 1), "NTF1", (10, 9, 1)),
])
def test_layouts_from_the_model_shape(shape, layout, canonical):
    assert resolve_layout(shape) == layout and canonical_input_shape(shape) == canonical
    assert canonical_input_shape((3, 495), "NCW") == (495, 3, 1)
    with pytest.raises(ShapeMismatchError, match="--window"):
        canonical_input_shape((None, 1))


def test_keras_file_carries_its_contract(work, tmp_path):
    src = shipped_paths()["keras"]
    model = tmp_path / "m.keras"
    shutil.copy(src, model)  # no sidecar beside the copy
    assert read_keras_contract(model) is None
    contract = ModelContract.from_json(work["contract"]).with_(appliance="kettle", on_threshold_w=1234.0)
    embed_keras_contract(model, contract)
    assert read_keras_contract(model).dumps() == contract.dumps()
    assert find_contract(model).on_threshold_w == 1234.0


@pytest.mark.tf
def test_keras_with_embedded_contract_loads(work, tmp_path):
    from nilmc.compiler.frontend import load_model

    model = tmp_path / "m.keras"
    shutil.copy(shipped_paths()["keras"], model)
    embed_keras_contract(model, ModelContract.from_json(work["contract"]).with_(on_threshold_w=1234.0))
    assert load_model(model).contract.on_threshold_w == 1234.0  # Keras ignores the extra metadata key


# Flags of other tools' command lines that nilmc writes into board scripts and hints (not nilmc options).
FOREIGN_FLAGS = {"--cpu", "--delegate", "--graph", "--external", "--engine", "--fp16", "--int8", "--onnx", "--save", "--strongly",
                 "--workspace-mib", "--xmodel", "--opset", "--help",
                 "--head", "--trt", "--onnxrt", "--strongly-typed", "--trt-outputs", "--onnx-outputs", "--input-shapes", "--atol",
                 "--rtol", "--extra-index-url"}  # ray start; polygraphy run; pip


def _all_options() -> set[str]:
    found: set[str] = set()

    def walk(cmd: click.Command) -> None:
        for p in cmd.params:
            found.update(o for o in [*p.opts, *p.secondary_opts] if o.startswith("--"))
        if isinstance(cmd, click.Group):
            for sub in cmd.commands.values():
                walk(sub)

    walk(cli)
    return found | {"--help"}


def test_every_flag_named_in_the_code_exists():
    """A remedy that says "pass --x" must name an option some nilmc command has."""
    options = _all_options()
    missing = {}
    for f in REPO.glob("**/*.py"):
        parts = f.relative_to(REPO).parts
        if {"tests", "benchmarks"} & set(parts) or any(p.startswith(".") for p in parts):  # venvs, caches
            continue
        for flag in re.findall(r"--[a-z][a-z0-9-]+", f.read_text(encoding="utf-8")):
            if flag not in options and flag not in FOREIGN_FLAGS:
                missing.setdefault(flag, set()).add(str(f.relative_to(REPO)))
    assert not missing, missing

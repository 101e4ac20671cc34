"""DPUBackend end to end: lower writes the xmodel and the hand-off, the runner emulates it, the driver gates it."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from nilmc.backends.base import Verification, availability
from nilmc.backends.dpu import DPUBackend, DPUUnsupportedError, handoff, testing
from nilmc.backends.dpu.xmodel import read_xmodel
from nilmc.backends.registry import Registry, register_builtins
from nilmc.compiler.errors import BadInputError, DataError
from nilmc.compiler.model import Model
from nilmc.quantization.context import QuantContext


@pytest.fixture(scope="module")
def lowered(tmp_path_factory, tiny, tiny_ds):
    out = tmp_path_factory.mktemp("dpu")
    art = DPUBackend().lower(tiny, out, precision="b2304", options={"quant": QuantContext(tiny, tiny_ds)})
    return art


def test_capabilities_and_availability() -> None:
    b = DPUBackend()
    assert b.name == "dpu" and b.capabilities.precisions == ("b2304", "b4096", "b2304_qat", "b4096_qat")
    assert b.capabilities.requires == () and b.capabilities.extra == "dpu"
    assert b.capabilities.traits["b4096"].power_of_two and availability(b) == (True, "ok")


def test_lower_writes_xmodel_and_handoff(lowered) -> None:
    d = lowered.directory
    assert lowered.primary == "quantized.xmodel"
    assert set(lowered.files) == {"quantized.xmodel", "cpu_pre.onnx", "arch.json", "compile.sh", "run_on_board.py", "inspector.json",
                                  "dpu_params.json"}
    assert all((d / f).is_file() for f in lowered.files)
    assert lowered.info["label"] == "quantized xmodel — compile with vai_c_xir"
    assert "vai_c_xir -x quantized.xmodel -a arch.json -o out -n net" in (d / "compile.sh").read_text()
    assert lowered.info["handoff"]["compile"] == "vai_c_xir -x quantized.xmodel -a arch.json -o out -n net"
    assert json.loads((d / "arch.json").read_text()) == {"fingerprint": "0x0101000056010405"}
    inspector = json.loads((d / "inspector.json").read_text())
    assert inspector["fallbacks"] == [] and inspector["cpu_ops"] == ["input", "Reshape_0", "MatMul_1"]  # precise input: the first layer on the CPU
    params = json.loads((d / "dpu_params.json").read_text())
    assert all(0 <= l["shift_cut"] <= 16 for l in params["layers"] if "shift_cut" in l)
    q = lowered.info["quantization"]
    assert q["traits"]["power_of_two"] and all(t["fix_position"] for t in q["tensors"].values())
    assert lowered.info["tools"] == ["protobuf"]


def test_board_figures_come_from_the_board_table(lowered) -> None:
    boards = lowered.info["boards"]
    row = boards["rows"][0]
    assert row["board"] == "ULTRA96V1" and row["tdp_w"] == 24 and row["cost_usd"] == 249
    assert row["eacc_per_tdp_watt"] == pytest.approx(row["eacc_pct"] / 24, abs=1e-3)
    assert row["eacc_per_usd"] == pytest.approx(row["eacc_pct"] / 249, abs=1e-4)
    assert "Table 8" in boards["source"]


def test_runner_is_emulated_and_reads_the_bundle(lowered, tiny, tiny_eval) -> None:
    runner = DPUBackend().runner(lowered)
    assert runner.verification is Verification.EMULATED
    x = tiny.contract.prepare(tiny_eval.raw_x())
    with runner as r:
        out = r.infer({"input": x})["output"]
    ref = tiny.contract.to_watts(_ort(tiny, x))
    got = tiny.contract.to_watts(out)
    assert np.mean(np.abs(got - ref)) < 0.05 * np.mean(np.abs(ref))  # INT8 close to FP32
    graph, params = read_xmodel((lowered.directory / "quantized.xmodel").read_bytes())
    assert graph.output_names == {"output": "output"} and params.fix["output"] == lowered.info["quantization"]["tensors"]["output"]["fix_position"][0]


def _ort(model: Model, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(model.graph.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def test_lowering_is_deterministic(lowered, tiny, tiny_ds, tmp_path) -> None:
    DPUBackend().lower(tiny, tmp_path, precision="b2304", options={"quant": QuantContext(tiny, tiny_ds)})
    for name in ("quantized.xmodel", "dpu_params.json", "run_on_board.py"):
        assert (tmp_path / name).read_bytes() == (lowered.directory / name).read_bytes(), name


def test_board_script_quantizes_with_dpu_rounding_and_the_contract(lowered, tiny, tiny_eval) -> None:
    spec = importlib.util.spec_from_file_location("run_on_board", lowered.directory / "run_on_board.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    np.testing.assert_array_equal(mod.quantize(np.array([-2.5, -0.5, 0.5, 2.5, 300.0]), 0), [-2, 0, 1, 3, 127])
    np.testing.assert_allclose(mod.normalize(tiny_eval.raw_x()), tiny.contract.prepare(tiny_eval.raw_x()), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mod.to_watts(mod.dequantize(np.array([[64]]), 6)), tiny.contract.to_watts(np.array([[1.0]])), rtol=1e-6)
    assert mod.STAGES == {"pre": "cpu_pre.onnx"}
    windows = lowered.directory / "w.npy"
    np.save(windows, tiny_eval.raw_x()[:4])
    if importlib.util.find_spec("vart") is None:  # not a board: the script says what it needs
        with pytest.raises(SystemExit, match="xir, vart"):
            mod.main(["--windows", str(windows), "--xmodel", "missing.xmodel"])


def test_user_overlay_arch_json(tiny, tiny_ds, tmp_path) -> None:
    overlay = tmp_path / "overlay_arch.json"
    overlay.write_text(json.dumps({"fingerprint": "0x101000056010407"}))
    opts = {"quant": QuantContext(tiny, tiny_ds), "arch_json": overlay}
    art = DPUBackend().lower(tiny, tmp_path / "b", precision="b4096", options=opts)
    assert json.loads((tmp_path / "b" / "arch.json").read_text()) == {"fingerprint": "0x101000056010407"}
    assert art.info["target"]["arch_source"] == str(overlay)
    with pytest.raises(BadInputError, match="describes DPUCZDX8G_ISA1_B4096"):
        DPUBackend().lower(tiny, tmp_path / "c", precision="b2304", options=opts)


def test_lower_needs_a_calibration_set(tiny, tmp_path) -> None:
    with pytest.raises(DataError, match="calibration"):
        DPUBackend().lower(tiny, tmp_path, precision="b2304", options={})


def test_unsupported_model_is_refused_with_the_inspector_report(tiny, tiny_ds, tmp_path) -> None:
    model = Model(testing.lstm_model(), tiny.contract, source="lstm")
    with pytest.raises(DPUUnsupportedError, match="LSTM|fall back to the CPU"):
        DPUBackend().lower(model, tmp_path, precision="b4096", options={"quant": QuantContext(model, tiny_ds)})
    report = json.loads((tmp_path / "inspector.json").read_text())
    assert "lstm" in report["cpu_ops"]


def test_compile_through_the_driver_gates_and_verifies(tiny_files, tiny_ds, tiny_eval, tiny, tmp_path) -> None:
    from nilmc.compiler.driver import compile_model, verify_bundle

    reg = Registry()
    register_builtins(reg)
    if "dpu" not in reg:
        reg.register(DPUBackend())
    summary = compile_model(tiny, tiny_eval, reg.parse_targets("dpu:b2304,dpu:b4096"), tmp_path / "out", calib=tiny_ds, registry=reg)
    rows = {r["target"]: r for r in summary.to_json()["targets"]}
    assert rows["dpu:b2304"]["verification"] == "emulated" and rows["dpu:b2304"]["error"] is None
    assert rows["dpu:b4096"]["eacc"] == rows["dpu:b2304"]["eacc"]  # same arithmetic on both DPU sizes
    manifest = json.loads((tmp_path / "out" / "dpu-b2304" / "manifest.json").read_text())
    assert manifest["artifact"]["file"] == "quantized.xmodel" and manifest["verification"]["verification"] == "emulated"
    assert manifest["quantization"]["traits"]["name"] == "dpu_pot"
    result = verify_bundle(tmp_path / "out" / "dpu-b2304", tiny_eval, registry=reg)
    assert not result.hash_problems and result.report is not None
    assert result.report.candidate.eacc == pytest.approx(rows["dpu:b2304"]["eacc"])


def test_compile_command_is_the_documented_one() -> None:
    assert handoff.compile_command() == ["vai_c_xir", "-x", "quantized.xmodel", "-a", "arch.json", "-o", "out", "-n", "net"]

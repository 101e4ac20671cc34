"""DPU fidelity (issue 10, item 4): every fix position is recorded with what decided it, inner activations never take a
grid finer than their calibration range holds, and the shipped calibration draw meets the per-draw line
(output SQNR >= 30 dB, |ΔEACC| <= 0.25 points)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from nilmc.backends.dpu import DPUBackend
from nilmc.backends.dpu.ir import from_onnx
from nilmc.backends.dpu.ops import record
from nilmc.quantization.context import QuantContext
from nilmc.quantization.pot import PotRule, no_clip_fix

SQNR_FLOOR_DB, EACC_LINE_PTS = 30.0, 0.25  # issue 10's per-draw DPU line


@pytest.fixture(scope="module")
def lowered(tmp_path_factory, tiny, tiny_ds):
    ctx = QuantContext(tiny, tiny_ds)
    art = DPUBackend().lower(tiny, tmp_path_factory.mktemp("fid"), precision="b2304", options={"quant": ctx, "cpu_layers": "none"})
    return art, json.loads((art.directory / "dpu_params.json").read_text())


def test_every_chosen_fix_position_is_recorded_with_its_range_and_candidates(lowered, tiny) -> None:
    art, params = lowered
    choices = params["method"]["choices"]
    assert art.info["calibration"]["choices"] == choices  # the manifest's calibration section carries the same record
    graph = from_onnx(tiny.graph)
    decided = [op for op in graph.ops if record(op.kind).rule != PotRule.PASSTHROUGH]
    assert decided and {op.output for op in decided} == set(choices)
    for op in decided:
        c = choices[op.output]
        assert c["fix"] == params["fix_points"][op.output] and c["fix"] in c["candidates"], op.output
        assert c["grid_max"] == pytest.approx(127 * 2.0 ** -c["fix"])
        assert c["range"] > 0 and math.isfinite(c["range"])


def test_inner_activations_never_take_a_grid_finer_than_their_range(lowered, tiny) -> None:
    """Coverage first: evaluation data run past a 1000-window calibration's maxima, so a weighted op's output grid holds
    at least the calibration range (candidates: the no-clipping position and one coarser)."""
    _, params = lowered
    choices = params["method"]["choices"]
    graph = from_onnx(tiny.graph)
    inner = [op for op in graph.ops if op.weighted and op.output not in graph.outputs]
    assert inner
    for op in inner:
        c = choices[op.output]
        assert max(c["candidates"]) == no_clip_fix(c["range"]), op.output
        assert c["grid_max"] >= c["range"], op.output


@pytest.mark.slow
def test_the_shipped_draw_meets_the_per_draw_line(tmp_path: Path) -> None:
    from nilmc.backends.registry import Registry, register_builtins
    from nilmc.calibration_data.dataset import NilmDataset
    from nilmc.compiler.driver import compile_model
    from nilmc.compiler.frontend import load_model

    try:
        from nilmc.calibration_data.shipped import shipped_paths

        paths = shipped_paths()
    except Exception as exc:  # not shipped in this checkout
        pytest.skip(f"no shipped T-P model ({type(exc).__name__}: {exc})")
    if not Path(paths["model"]).is_file():
        pytest.skip("the shipped T-P model file is missing")
    reg = Registry()
    register_builtins(reg)
    if "dpu" not in reg:
        reg.register(DPUBackend())
    summary = compile_model(load_model(paths["model"]), NilmDataset.load(paths["eval"]), reg.parse_targets("dpu:b2304"),
                            tmp_path / "out", calib=NilmDataset.load(paths["calib"]), registry=reg, budget={"eacc": 100.0})
    report = summary.results[0].report
    assert report is not None, summary.results[0].error
    assert report.extra["output_sqnr_db"] >= SQNR_FLOOR_DB, report.extra
    assert abs(report.deltas["eacc"]) <= EACC_LINE_PTS, report.deltas

"""The compile driver directly: the per-target pipeline, a backend added with one registration line,
overflow policies, pre-checks before any work, and exit codes by class."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import tiny_dataset, tiny_model

from nilmc.backends.base import Artifact, Capabilities, Verification
from nilmc.backends.onnxruntime_backend import OrtRunner
from nilmc.backends.registry import Target, default_registry
from nilmc.calibration_data.normalization import Normalization, NormalizationSpec
from nilmc.compiler.bundle import verify_bundle
from nilmc.compiler.driver import CompileOptions, compile_model
from nilmc.compiler.errors import BadInputError, NormalizationError
from nilmc.quantization.traits import GENERIC_INT8


@dataclass(frozen=True)
class MiniOptions:
    offset: float = 0.0


class MiniInt8:
    """A minimal INT8 backend: QDQ ONNX from the parameters the driver hands it, run on onnxruntime."""

    name = "mini"
    capabilities = Capabilities(precisions=("int8",), description="test backend", traits={"int8": GENERIC_INT8}, options=MiniOptions)
    seen: list = []

    def lower(self, model, out_dir, *, precision, options=None):
        from nilmc.compiler.model import Model
        from nilmc.quantization.qdq import build_qdq_model

        params = options["params"]  # the driver's, after its overflow checks: the backend derives nothing itself
        MiniInt8.seen.append((params, options.get("overflow"), options.get("backend_options")))
        Model(build_qdq_model(model.graph, params), model.contract).save_onnx(Path(out_dir) / "m.onnx")
        return Artifact(self.name, precision, Path(out_dir), "m.onnx", ["m.onnx"], kind="mini", info={"quantization": params.to_json()})

    def runner(self, artifact):
        r = OrtRunner(artifact.path)
        r.verification = Verification.EMULATED
        return r


@pytest.fixture()
def registry():
    reg = default_registry(plugins=False)
    reg.register(MiniInt8())  # the same one line the built-ins use
    return reg


def test_a_registered_backend_goes_through_compile_overflow_and_verify(registry, tiny, tiny_ds, tiny_eval, tmp_path):
    MiniInt8.seen.clear()
    opts = CompileOptions(backend_options={"mini": {"offset": "0.5"}})
    s = compile_model(tiny, tiny_eval, [Target("mini", "int8"), Target("onnxruntime", "int8")], tmp_path / "o", calib=tiny_ds,
                      budget={"eacc": 100}, registry=registry, options=opts)
    assert s.exit_code == 0 and s.written, [r.error for r in s.results]
    params, _, typed = MiniInt8.seen[0]
    assert params.traits == GENERIC_INT8 and typed == MiniOptions(offset=0.5)
    for b in ("mini-int8", "onnxruntime-int8"):
        m = json.loads((tmp_path / "o" / b / "manifest.json").read_text())
        assert m["overflow"]["policy"] == "warn" and "findings" in m["overflow"]
        assert verify_bundle(tmp_path / "o" / b, tiny_eval, registry=registry).passed
    m = json.loads((tmp_path / "o" / "mini-int8" / "manifest.json").read_text())
    assert m["backend_options"] == {"offset": 0.5}


def test_unknown_backend_option_is_refused_before_work(registry, tiny, tiny_ds, tiny_eval, tmp_path):
    with pytest.raises(BadInputError, match="mini.offst"):
        compile_model(tiny, tiny_eval, [Target("mini", "int8")], tmp_path / "o", calib=tiny_ds, registry=registry,
                      options=CompileOptions(backend_options={"mini": {"offst": "1"}}))
    assert not (tmp_path / "o").exists()


def _unnormalized(ds):
    """Raw features whose scales differ by ~10^4 (feature 0 in kW-sized steps, the rest tiny), contract A."""
    x = ds.x.copy()
    x[:, :, 1:, :] *= 1e-3
    ds2 = type(ds)(x=x, y=ds.y, appliances=ds.appliances, feature_names=ds.feature_names, target_mean=ds.target_mean,
                   target_std=ds.target_std, on_thresholds=ds.on_thresholds, info=ds.info)
    from nilmc.calibration_data.normalization import FeatureStats

    ds2.train_stats = FeatureStats.fit(x)
    m = tiny_model(ds2)
    m.contract = m.contract.with_(normalization=NormalizationSpec(Normalization.A, None))
    return m, ds2


def test_overflow_error_fails_every_int8_target_naming_the_tensors(registry, tmp_path):
    model, ds = _unnormalized(tiny_dataset())
    targets = [Target("mini", "int8"), Target("onnxruntime", "int8"), Target("dpu", "b2304"), Target("onnxruntime", "fp32")]
    s = compile_model(model, ds, targets, tmp_path / "o", calib=ds, budget={"eacc": 100}, registry=registry,
                      options=CompileOptions(overflow="error"))
    by = {str(r.target): r for r in s.results}
    for t in ("mini:int8", "onnxruntime:int8", "dpu:b2304"):
        assert by[t].exit_code == 2 and "--overflow error" in by[t].error and "input" in by[t].error, by[t].error
    assert by["onnxruntime:fp32"].passed and s.exit_code == 2
    warn = compile_model(model, ds, targets[:1], tmp_path / "w", calib=ds, budget={"eacc": 100}, registry=registry)
    m = json.loads((tmp_path / "w" / "mini-int8" / "manifest.json").read_text())
    assert warn.results[0].error is None and any(f["check"] == "input_features" for f in m["overflow"]["findings"])


def test_scaled_calibration_is_refused_for_every_target_before_work(registry, tiny, tiny_ds, tiny_eval, tmp_path):
    bad = tiny_ds.subset(slice(None))
    bad.x = bad.x * 1000
    for t in ("onnxruntime:int8", "dpu:b2304", "mini:int8", "tensorrt:int8"):
        with pytest.raises(NormalizationError, match="calibration set"):
            compile_model(tiny, tiny_eval, [registry.parse_target(t)], tmp_path / "o", calib=bad, registry=registry)
    assert not (tmp_path / "o").exists()


def test_scaled_evaluation_set_is_refused(tiny, tiny_eval, tmp_path):
    bad = tiny_eval.subset(slice(None))
    bad.x = bad.x * 1000
    with pytest.raises(NormalizationError, match="evaluation set"):
        compile_model(tiny, bad, [Target("onnxruntime", "fp32")], tmp_path / "o")


def test_missing_calibration_is_refused_before_work(tiny, tiny_eval, tmp_path):
    with pytest.raises(BadInputError, match="onnxruntime:int8"):
        compile_model(tiny, tiny_eval, [Target("onnxruntime", "fp32"), Target("onnxruntime", "int8")], tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_keras_only_target_on_an_onnx_model_fails_alone_without_work(tiny, tiny_ds, tiny_eval, tmp_path):
    s = compile_model(tiny, tiny_eval, [Target("onnxruntime", "fp32"), Target("dpu", "b2304_qat")], tmp_path / "o", calib=tiny_ds)
    by = {str(r.target): r for r in s.results}
    assert by["dpu:b2304_qat"].exit_code == 2 and "Keras" in by["dpu:b2304_qat"].error and by["dpu:b2304_qat"].compile_s < 0.1
    assert by["onnxruntime:fp32"].passed and s.exit_code == 2 and s.bundles() == ["onnxruntime-fp32"]


class _Broken(MiniInt8):
    name = "broken"
    capabilities = Capabilities(precisions=("fp32",), description="raises a bug")

    def lower(self, model, out_dir, *, precision, options=None):
        raise ZeroDivisionError("a bug")


def test_internal_error_in_one_target_is_recorded_and_the_rest_go_on(tiny, tiny_eval, tmp_path):
    reg = default_registry(plugins=False)
    reg.register(_Broken())
    s = compile_model(tiny, tiny_eval, [Target("broken", "fp32"), Target("onnxruntime", "fp32")], tmp_path / "o", registry=reg)
    assert s.exit_code == 3 and "ZeroDivisionError" in s.results[0].error and s.results[1].passed
    assert not (tmp_path / "o" / "broken-fp32").exists() and (tmp_path / "o" / "onnxruntime-fp32").is_dir()
    with pytest.raises(ZeroDivisionError):
        compile_model(tiny, tiny_eval, [Target("broken", "fp32")], tmp_path / "d", registry=reg, options=CompileOptions(debug=True))
    assert not (tmp_path / "d").exists()


def test_gate_failure_is_exit_1(tiny, tiny_ds, tiny_eval, tmp_path):
    s = compile_model(tiny, tiny_eval, [Target("onnxruntime", "int8")], tmp_path / "o", calib=tiny_ds, budget={"eacc": 0.0, "mae": 0.0})
    assert s.results[0].report is not None
    assert s.exit_code == (0 if s.results[0].passed else 1)
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["exit_code"] == s.exit_code


@pytest.mark.slow
def test_a_worker_process_gives_the_same_bundles(tiny, tiny_ds, tiny_eval, tmp_path):
    """jobs=2 splits the targets by backend into this process and a spawned worker: same manifests, byte for byte."""
    from nilmc.compiler.driver import _split_plans, plan_targets

    targets = [Target("onnxruntime", "fp32"), Target("onnxruntime", "int8"), Target("dpu", "b2304"), Target("tensorrt", "int8"),
               Target("tensorrt", "fp16"), Target("dpu", "b4096")]
    reg = default_registry()
    here, there = _split_plans(plan_targets(tiny, targets, reg, CompileOptions()), reg, CompileOptions(jobs=2))
    assert here and there and {targets[i].backend for i in here}.isdisjoint({targets[i].backend for i in there})
    one = compile_model(tiny, tiny_eval, targets, tmp_path / "one", calib=tiny_ds, budget={"eacc": 100})
    two = compile_model(tiny, tiny_eval, targets, tmp_path / "two", calib=tiny_ds, budget={"eacc": 100}, options=CompileOptions(jobs=2))
    assert [str(r.target) for r in two.results] == [str(t) for t in targets] and two.exit_code == one.exit_code == 0
    for t in targets:
        b = f"{t.backend}-{t.precision}"
        assert (tmp_path / "one" / b / "manifest.json").read_bytes() == (tmp_path / "two" / b / "manifest.json").read_bytes()


def test_targets_registered_in_process_only_stay_in_this_process(registry, tiny):
    from nilmc.compiler.driver import _split_plans, plan_targets

    targets = [Target("mini", "int8"), Target("onnxruntime", "fp32"), Target("dpu", "b2304"), Target("tensorrt", "fp16")]
    here, there = _split_plans(plan_targets(tiny, targets, registry, CompileOptions()), registry, CompileOptions(jobs=2))
    assert there == [] and len(here) == 4

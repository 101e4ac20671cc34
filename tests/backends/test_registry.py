from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

from nilmc.backends.base import Artifact, Capabilities, Verification
from nilmc.backends.registry import PluginLoadError, Registry, Target, default_registry
from nilmc.compiler.errors import BadInputError, UnknownBackendError

ROOT = Path(__file__).resolve().parents[2]


class _Dummy:
    name = "dummy"
    capabilities = Capabilities(precisions=("fp32", "int8"))

    def lower(self, model, out_dir, *, precision, options=None):
        return Artifact(self.name, precision, out_dir, "x")

    def runner(self, artifact):
        raise NotImplementedError


def test_fresh_registry_is_empty_and_isolated():
    a, b = Registry(), Registry()
    a.register(_Dummy())
    assert a.names() == ["dummy"] and b.names() == []


def test_builtins_registered_in_one_place():
    reg = default_registry(plugins=False)
    assert "onnxruntime" in reg
    assert reg.get("onnxruntime").capabilities.precisions[0] == "fp32"


def test_parse_targets_and_errors():
    reg = Registry()
    reg.register(_Dummy())
    assert reg.parse_targets("dummy:fp32, dummy:int8,dummy:fp32") == [Target("dummy", "fp32"), Target("dummy", "int8")]
    assert reg.parse_targets("dummy:all") == [Target("dummy", "fp32"), Target("dummy", "int8")]
    with pytest.raises(UnknownBackendError, match="unknown backend 'nope'.*available: dummy"):
        reg.parse_targets("nope:fp32")
    with pytest.raises(UnknownBackendError, match="no precision 'fp8'.*fp32, int8"):
        reg.parse_target("dummy:fp8")
    with pytest.raises(UnknownBackendError, match="names no precision"):
        reg.parse_target("dummy")


def test_register_rejects_bad_backends():
    reg = Registry()
    reg.register(_Dummy())
    with pytest.raises(BadInputError, match="already registered"):
        reg.register(_Dummy())

    class NoCaps:
        name = "nocaps"

    with pytest.raises(BadInputError, match="Capabilities"):
        reg.register(NoCaps())  # type: ignore[arg-type]


def test_broken_plugin_is_a_placeholder_that_raises_on_use(monkeypatch):
    class EP:
        name = "brokenthing"
        value = "nowhere:register"

        def load(self):
            raise ImportError("No module named 'nowhere'")

    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group=None: [EP()])
    reg = Registry()
    reg.load_entry_points()  # must not raise
    assert "brokenthing" in reg.names()
    status = {r["name"]: r for r in reg.status()}
    assert status["brokenthing"]["available"] is False and "nowhere" in status["brokenthing"]["reason"]
    with pytest.raises(PluginLoadError, match="brokenthing.*No module named 'nowhere'"):
        reg.get("brokenthing")


def test_missing_dependency_reported_with_extra():
    from nilmc.backends.base import availability

    class NeedsX(_Dummy):
        name = "needsx"
        capabilities = Capabilities(precisions=("fp32",), requires=("definitely_not_installed_mod",), extra="xtra")

    ok, why = availability(NeedsX())
    assert not ok and "definitely_not_installed_mod" in why and "nilmc[xtra]" in why


@pytest.mark.slow
def test_example_plugin_installs_and_runs_end_to_end(tmp_path, tiny, tiny_eval):
    """Install examples/nilmc-example-plugin into a temp dir and use it through the entry point."""
    target = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "--target", str(target), str(ROOT / "examples" / "nilmc-example-plugin")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    sys.path.insert(0, str(target))
    try:
        reg = default_registry()
        assert "onnxref" in reg.names()
        from nilmc.compiler.driver import compile_model

        summary = compile_model(tiny, tiny_eval, [Target("onnxref", "fp32"), Target("onnxruntime", "fp32")], tmp_path / "out", registry=reg)
        rows = {str(r.target): r for r in summary.results}
        assert rows["onnxref:fp32"].report.verification == Verification.MEASURED.value
        # Two independent FP32 runtimes agree to float precision.
        assert abs(rows["onnxref:fp32"].report.deltas["eacc"]) < 1e-3
        assert summary.passed
    finally:
        sys.path.remove(str(target))
        for m in [m for m in sys.modules if m.startswith("nilmc_example_plugin")]:
            del sys.modules[m]

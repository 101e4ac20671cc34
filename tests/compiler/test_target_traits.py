"""The traits a target's shared parameters are derived under follow its typed options (the driver's plan), so the
manifest's overflow and coverage sections describe the parameters the artifact deploys."""
from __future__ import annotations

import pytest

from nilmc.backends.registry import default_registry
from nilmc.compiler.driver import _target_traits


@pytest.mark.parametrize("backend,precision", [("tflite", "int8"), ("eiq", "int8"), ("eiq", "int8_pt")])
def test_cpu_layers_none_derives_full_integer_parameters(backend, precision):
    caps = default_registry().get(backend).capabilities
    auto = _target_traits(caps, precision, caps.options())
    none = _target_traits(caps, precision, caps.options(cpu_layers="none"))
    assert auto == caps.traits[precision] and auto.float_layers  # the defaults are what the backend declares
    assert not none.float_layers and none.io_dtype == auto.io_dtype


def test_tflite_per_tensor_option_reaches_the_shared_traits():
    caps = default_registry().get("tflite").capabilities
    t = _target_traits(caps, "int8", caps.options(per_tensor=True))
    assert t.per_channel_weights is False and t.float_layers
    assert _target_traits(caps, "qat_int8", caps.options(per_tensor=True)) == caps.traits["qat_int8"]  # QAT: unchanged


def test_backends_without_the_hook_keep_their_declared_traits():
    caps = default_registry().get("onnxruntime").capabilities
    assert _target_traits(caps, "int8", None) == caps.traits["int8"]
    assert _target_traits(caps, "fp32", None) is None


def test_coverage_leaves_out_what_the_artifact_runs_in_float() -> None:
    """The driver's coverage is of what the artifact quantizes: tensors its recorded parameters name float (the DPU's
    CPU-stage tensors) and a float prefix's layers (TFLite/eIQ under the SQNR floor) are added to the shared parameters'
    keep_float; a DPU CPU-tail layer is not (it reads the DPU's int8 output); a QAT record (Keras-keyed) gives nothing."""
    from types import SimpleNamespace

    from nilmc.compiler.driver import _deployed_float
    from nilmc.quantization.params import PARAMS_VERSION

    shared = SimpleNamespace(layers=[SimpleNamespace(name=n) for n in ("conv1", "conv2", "conv3", "head")], keep_float=("conv1",))

    def art(keep, prefix=None, version=PARAMS_VERSION):
        prov = {"float_prefix": {"layers": prefix}} if prefix else {}
        return SimpleNamespace(info={"quantization": {"params_version": version, "keep_float": keep, "provenance": prov}})

    assert _deployed_float(art(["conv1", "head", "gru_out", "output"]), shared) == ["gru_out", "output"]
    assert _deployed_float(art(["conv1", "conv2", "conv3"], prefix=["conv2", "conv3"]), shared) == ["conv2", "conv3"]
    assert _deployed_float(art(["conv1"]), shared) == []
    assert _deployed_float(art(["gru_out"], version=None), shared) == []
    assert _deployed_float(SimpleNamespace(info={}), shared) == []

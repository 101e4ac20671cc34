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

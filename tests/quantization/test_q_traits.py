"""traits: presets as data, validation, JSON."""
from __future__ import annotations

import pytest

from nilmc.compiler.errors import QuantizationError
from nilmc.quantization.intops import Rounding
from nilmc.quantization.traits import DPU_POT, EIQ_PER_TENSOR, GENERIC_INT8, PRESETS, TENSORRT_INT8, TFLITE_INT8, QuantTraits, preset


def test_presets_encode_vendor_rules() -> None:
    assert GENERIC_INT8.per_channel_weights and not GENERIC_INT8.symmetric_activations
    assert GENERIC_INT8.activation_range.name == "uint8" and GENERIC_INT8.weight_range.name == "int8"
    assert TFLITE_INT8.weight_range.name == "int8_narrow" and TFLITE_INT8.activation_range.name == "int8"
    assert TFLITE_INT8.accumulator_bits == 32 and TFLITE_INT8.io_dtype == "int8"
    assert TENSORRT_INT8.symmetric_activations and TENSORRT_INT8.symmetric_weights and TENSORRT_INT8.per_channel_weights
    assert not EIQ_PER_TENSOR.per_channel_weights and not EIQ_PER_TENSOR.symmetric_activations
    assert EIQ_PER_TENSOR.requant_multiplier_bits == 16
    assert DPU_POT.power_of_two and DPU_POT.rounding is Rounding.HALF_UP and not DPU_POT.per_channel_weights
    assert DPU_POT.symmetric_activations and DPU_POT.requant_shift_range == (0, 16) and DPU_POT.bias_bits == 8
    assert set(PRESETS) == {"generic_int8", "tflite_int8", "tflite_int16x8", "tensorrt_int8", "eiq_per_tensor", "dpu_pot"}


def test_traits_are_frozen_and_roundtrip() -> None:
    with pytest.raises(AttributeError):
        DPU_POT.power_of_two = False  # type: ignore[misc]
    for t in PRESETS.values():
        assert QuantTraits.from_json(t.to_json()) == t
    assert DPU_POT.with_(accumulator_bits=32).accumulator_bits == 32


@pytest.mark.parametrize(
    "kwargs",
    [
        {"io_dtype": "fp8"},
        {"symmetric_activations": True, "activation_signed": False},
        {"narrow_range_weights": True, "symmetric_weights": False},
        {"accumulator_bits": 4},
        {"weight_bits": 4},
        {"rounding": "stochastic"},
    ],
)
def test_invalid_traits_raise(kwargs: dict) -> None:
    with pytest.raises(QuantizationError):
        QuantTraits(**kwargs)


def test_unknown_preset() -> None:
    with pytest.raises(QuantizationError, match="available"):
        preset("npu9000")
    assert preset("dpu_pot") is DPU_POT

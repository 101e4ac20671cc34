"""Per-target quantization traits, as data (STYLE.md 5).

Every difference between targets that the algorithms care about is a field of
the frozen :class:`QuantTraits`; the algorithms read fields, never backend names.
Named presets below are the records backends declare in their ``capabilities``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from nilmc.compiler.errors import QuantizationError
from nilmc.quantization.intops import IntRange, Rounding, int_range_for

_IO_DTYPES = ("int8", "uint8", "int16", "float")


@dataclass(frozen=True)
class QuantTraits:
    """How one target quantizes.

    Defaults describe a plain onnxruntime-style INT8 target. Fields:

    * ``per_channel_weights`` (True): one weight scale per output channel.
    * ``symmetric_activations`` (False) / ``symmetric_weights`` (True): zero point 0.
    * ``power_of_two`` (False): scales are exact powers of two (``2**-fix_position``).
    * ``narrow_range_weights`` (False): weights use [-127, 127].
    * ``weight_bits`` / ``activation_bits`` (8) and ``accumulator_bits`` (32).
    * ``rounding`` (HALF_EVEN): tie rule used when nilmc itself rounds (weights, bias, emulators).
    * ``io_dtype`` ("float"): what the deployed model takes and returns: "int8", "uint8" or "float".
    * ``allow_int16_activations`` (False): whether a tensor may be promoted to int16.
    * ``activation_signed`` (True): int8 (True) or uint8 (False) activation codes.
    * ``float_layers`` (False): the target runs a layer in float beside INT8 ones (mixed precision; the
      techniques pipeline then keeps the layers reading the graph input float, see ``api.Techniques``).
    * ``inner_float_layers`` (False): any layer, not only those reading the input, may run in float (a QDQ graph
      leaves it unquantized): the techniques pipeline may then keep layers float to hold the calibration SQNR floor
      (``api.Techniques.min_calib_sqnr``).
    * ``bias_bits`` (32): 32 = int32 bias with scale ``s_in * s_w``; smaller = own
      per-tensor scale (the DPU stores an 8-bit bias with its own fix position).
    * ``requant_shift_range`` (None): allowed ``fw + fi - fo`` for power-of-two targets (DPU shift_cut).
    * ``requant_multiplier_bits`` (32): width of the normalized requantization multiplier
      (16 for the NXP NPU emulation).
    * ``pool_shares_grid`` (False): an AveragePool's output takes its input's parameters (TFLite's int8
      AVERAGE_POOL_2D requires the input's scale and zero point on its output; averaging stays inside the range).
    * ``fixed_lut_grids`` (False): a Sigmoid's / Tanh's 8-bit output takes the fixed grid TFLite's builtin LOGISTIC /
      TANH kernels require (scale 1/256 from 0.0, scale 1/128 around 0.0; :func:`params.pin_lut_grids`): on any other
      grid only the XNNPACK delegate runs the op, the builtin kernels refuse the model at allocation.
    """

    name: str = "custom"
    per_channel_weights: bool = True
    symmetric_activations: bool = False
    symmetric_weights: bool = True
    power_of_two: bool = False
    narrow_range_weights: bool = False
    weight_bits: int = 8
    activation_bits: int = 8
    accumulator_bits: int = 32
    rounding: Rounding = Rounding.HALF_EVEN
    io_dtype: str = "float"
    allow_int16_activations: bool = False
    activation_signed: bool = True
    float_layers: bool = False
    inner_float_layers: bool = False
    bias_bits: int = 32
    requant_shift_range: tuple[int, int] | None = None
    requant_multiplier_bits: int = 32
    pool_shares_grid: bool = False
    fixed_lut_grids: bool = False

    def __post_init__(self) -> None:
        if self.io_dtype not in _IO_DTYPES:
            raise QuantizationError(f"traits {self.name!r}: unknown io_dtype {self.io_dtype!r}", f"use one of {', '.join(_IO_DTYPES)}")
        if self.symmetric_activations and not self.activation_signed:
            raise QuantizationError(f"traits {self.name!r}: symmetric activations need signed codes", "set activation_signed=True")
        if self.narrow_range_weights and not self.symmetric_weights:
            raise QuantizationError(f"traits {self.name!r}: narrow-range weights must be symmetric", "set symmetric_weights=True")
        if not 8 <= self.accumulator_bits <= 64:
            raise QuantizationError(f"traits {self.name!r}: accumulator_bits={self.accumulator_bits} is out of [8, 64]", "use 16, 24 or 32")
        _ = self.weight_range  # validate bit widths against the integer table
        _ = self.activation_range
        object.__setattr__(self, "rounding", Rounding.parse(self.rounding))

    @property
    def weight_range(self) -> IntRange:
        return int_range_for(self.weight_bits, signed=True, narrow=self.narrow_range_weights)

    @property
    def activation_range(self) -> IntRange:
        return int_range_for(self.activation_bits, signed=self.activation_signed)

    @property
    def bias_range(self) -> IntRange:
        return int_range_for(self.bias_bits, signed=True)

    @property
    def bias_uses_product_scale(self) -> bool:
        """True when bias is stored at ``s_in * s_w`` (int32); otherwise with its own scale."""
        return self.bias_bits == 32

    def with_(self, **changes: Any) -> QuantTraits:
        return replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["rounding"] = self.rounding.value
        d["requant_shift_range"] = None if self.requant_shift_range is None else list(self.requant_shift_range)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> QuantTraits:
        d = dict(d)
        if d.get("requant_shift_range") is not None:
            d["requant_shift_range"] = tuple(int(v) for v in d["requant_shift_range"])
        try:
            return cls(**d)
        except TypeError as exc:
            raise QuantizationError(f"quantization traits are malformed ({exc})", "write them with QuantTraits.to_json") from None


# onnxruntime / OpenVINO: per-channel symmetric int8 weights, asymmetric uint8 activations, float I/O (QDQ).
GENERIC_INT8 = QuantTraits(name="generic_int8", activation_signed=False, float_layers=True, inner_float_layers=True)

# TFLite full-integer: per-channel narrow int8 weights, asymmetric int8 activations, int32 accumulators,
# C round() (half away) when quantizing, int8 I/O.
# AVERAGE_POOL_2D keeps its input's grid (pool_shares_grid): on a grid of its own, the example CtRNN's integer stage
# gave 6.6 dB (the kernel averages codes without requantizing), shared 19.4 dB.
TFLITE_INT8 = QuantTraits(name="tflite_int8", narrow_range_weights=True, rounding=Rounding.HALF_AWAY, io_dtype="int8",
                          pool_shares_grid=True, fixed_lut_grids=True)

# TFLite with precise input (tflite:int8, eiq:int8 by default): the same grids, but the layers reading the graph input
# run as float32 TFLite ops (a QUANTIZE onto nilmc's grid after them), so the input is never on an 8-bit grid
# (backends/tflite_int8.py, float_input_layers). TFLITE_INT8 stays the full-integer record (tflm, cpu_layers=none).
TFLITE_INT8_FLOAT_INPUT = TFLITE_INT8.with_(name="tflite_int8_float_input", float_layers=True)

# TFLite 16x8 (tflite:int16x8; the converter's EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8 mode): int16
# activations, symmetric (TFLite's int16 kernels require zero point 0), per-channel narrow int8 weights, bias stored as
# int64 at s_in * s_w (nilmc derives it on the int32 range the QDQ reference uses) and int64 accumulators. Full integer
# (cpu_layers=none); the _FLOAT_INPUT record is the default precise input, as for int8: a raw-scale input (normalization
# A, features 1e6 apart) loses its small features on any per-tensor grid, 16-bit included.
TFLITE_INT16X8 = TFLITE_INT8.with_(name="tflite_int16x8", activation_bits=16, symmetric_activations=True, allow_int16_activations=True,
                                   accumulator_bits=64, io_dtype="int16")
TFLITE_INT16X8_FLOAT_INPUT = TFLITE_INT16X8.with_(name="tflite_int16x8_float_input", float_layers=True)

# TensorRT explicit Q/DQ: symmetric everywhere (zero point 0), per-channel weights on the output-channel axis,
# amax/127 scales, round half to even, float I/O.
TENSORRT_INT8 = QuantTraits(name="tensorrt_int8", symmetric_activations=True, narrow_range_weights=True, float_layers=True,
                            inner_float_layers=True)

# NXP eIQ (i.MX 8M Plus NPU) per-tensor path: per-tensor asymmetric weights and activations (the legacy
# per-tensor layout this NPU runs fastest), 16-bit normalized requantization multiplier.
EIQ_PER_TENSOR = QuantTraits(
    name="eiq_per_tensor",
    per_channel_weights=False,
    symmetric_weights=False,
    rounding=Rounding.HALF_AWAY,
    io_dtype="int8",
    requant_multiplier_bits=16,
)

# Vitis AI DPU: per-tensor symmetric int8, power-of-two scales, DPU_ROUND, 8-bit bias with its own fix
# position, shift_cut in [0, 16], ~24-bit accumulator headroom (REFERENCE.md: inferred, not documented).
DPU_POT = QuantTraits(
    name="dpu_pot",
    per_channel_weights=False,
    symmetric_activations=True,
    power_of_two=True,
    accumulator_bits=24,
    rounding=Rounding.HALF_UP,
    io_dtype="int8",
    bias_bits=8,
    requant_shift_range=(0, 16),
    float_layers=True,  # the layers reading the graph input run in FP32 on the board's CPU (backends/dpu/partition.py)
)

PRESETS: dict[str, QuantTraits] = {t.name: t for t in (GENERIC_INT8, TFLITE_INT8, TFLITE_INT16X8, TENSORRT_INT8, EIQ_PER_TENSOR, DPU_POT)}


def preset(name: str) -> QuantTraits:
    """A named preset (see :data:`PRESETS`)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise QuantizationError(f"unknown quantization traits preset {name!r}", f"available: {', '.join(PRESETS)}") from None

"""The DPU's ops, one record each: a new op is one entry in :data:`OPS` plus its reference function in
:mod:`nilmc.quantization.intops`.

A record says, for one :class:`OpKind`:

* **IR conversion** - ``onnx_types``: the ONNX op types :func:`nilmc.backends.dpu.ir.from_onnx` turns into it
  (conv and dense come from :func:`nilmc.quantization.graph.analyze`'s fused layers instead);
* **quantizer** - ``rule``: how :func:`nilmc.quantization.pot.refine_pot` chooses its output fix point;
* **emulator** - ``emulate``: its integer semantics, a composition of ``intops`` reference functions;
* **xmodel writer / reader** - ``xir_type`` and ``xir_attrs`` (IR attrs -> XIR attrs) / ``ir_attrs`` (back);
* **inspector** - ``inspect``: the reasons (under a target's limits) it would fall back to the CPU.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import numpy as np

from nilmc.quantization import intops
from nilmc.quantization.intops import Rounding
from nilmc.quantization.pot import PotRule

if TYPE_CHECKING:
    from nilmc.backends.dpu.ir import DpuOp
    from nilmc.bitstreams import DPUTarget

DPU_LEAKY_ALPHA = intops.LEAKY_NUM / 2**intops.LEAKY_SHIFT
_LEAKY_TOLERANCE = 0.002  # vai_q maps slopes of ~0.1 to 26/256


class OpKind(StrEnum):
    """Kinds of DPU IR ops (a ``StrEnum``: ``OpKind.CONV2D == "conv2d"``, so JSON and messages show the name)."""

    INPUT = "input"
    CONV2D = "conv2d"
    DENSE = "dense"
    FLATTEN = "flatten"
    MAXPOOL = "maxpool"
    AVGPOOL = "avgpool"
    ADD = "add"
    RELU = "relu"
    LEAKY_RELU = "leaky_relu"
    UNSUPPORTED = "unsupported"


class Step:
    """What one emulated op reads besides its inputs' codes: fix points, integer weights, rounding, caches."""

    def __init__(self, fis: list[int], fo: int, weights: Any, rounding: Rounding, cache: dict[str, Any]) -> None:
        self.fis, self.fo, self.weights, self.rounding, self.cache = fis, fo, weights, rounding, cache

    def matmul(self, op: DpuOp) -> intops.IntegerMatmul:
        """The op's :class:`intops.IntegerMatmul`, built once per weight set (cached by the emulator)."""
        key = f"{op.name}/{id(self.weights.weight_q)}"
        if key not in self.cache:
            w = self.weights.weight_q
            self.cache[key] = intops.IntegerMatmul(w.reshape(w.shape[0], -1).T if op.kind == OpKind.CONV2D else w)
        return self.cache[key]


EmulateFn = Callable[["DpuOp", list[np.ndarray], Step], np.ndarray]
InspectFn = Callable[["DpuOp", "DPUTarget"], tuple[list[str], dict[str, Any]]]


# --------------------------------------------------------------------------- emulator: intops compositions
def accumulate(op: DpuOp, x: np.ndarray, weight_q: np.ndarray, matmul: intops.IntegerMatmul | None = None, *,
               scratch: bool = False) -> np.ndarray:
    """Exact integer accumulator of a conv2d / dense op (no bias); ``scratch``: see :class:`intops.IntegerMatmul`."""
    if op.kind == OpKind.CONV2D:
        a = op.attrs
        return intops.conv2d_accumulate(x, weight_q, a["stride"], a["pads"], a.get("dilation", (1, 1)), matmul=matmul,
                                        scratch=scratch)
    return intops.dense_accumulate(x, weight_q, matmul=matmul, scratch=scratch)


def _weighted(op: DpuOp, args: list[np.ndarray], s: Step) -> np.ndarray:
    wq, fi = s.weights, s.fis[0]
    mm = s.matmul(op)
    acc = accumulate(op, args[0], wq.weight_q, mm, scratch=True)  # patches and accumulator in mm's buffers, consumed here
    shift_bias = fi + wq.fw - (wq.fb or 0)
    bias_bound = 0.0 if wq.bias_q is None else float(np.max(np.abs(wq.bias_q))) * 2.0 ** max(shift_bias, 0)
    return intops.pot_requantize(acc, wq.bias_q, shift_cut=fi + wq.fw - s.fo, shift_bias=shift_bias, activation=op.activation,
                                 rounding=s.rounding, acc_bound=mm.bound + bias_bound, overwrite=True)


def _flatten(op: DpuOp, args: list[np.ndarray], s: Step) -> np.ndarray:
    return intops.pot_rescale(args[0].reshape(len(args[0]), -1), s.fis[0], s.fo, rounding=s.rounding)


def _maxpool(op: DpuOp, args: list[np.ndarray], s: Step) -> np.ndarray:
    a = op.attrs
    return intops.pot_max_pool(args[0], a["kernel"], a["stride"], a["pads"], s.fis[0], s.fo, s.rounding)


def _avgpool(op: DpuOp, args: list[np.ndarray], s: Step) -> np.ndarray:
    a = op.attrs
    return intops.pot_avg_pool(args[0], a["kernel"], a["stride"], a["pads"], s.fis[0], s.fo, s.rounding)


def _add(op: DpuOp, args: list[np.ndarray], s: Step) -> np.ndarray:
    return intops.pot_eltwise_add(args, s.fis, s.fo, op.activation, s.rounding)


def _activation(op: DpuOp, args: list[np.ndarray], s: Step) -> np.ndarray:
    return intops.pot_activation(args[0], str(op.kind), s.fis[0], s.fo, s.rounding)


# --------------------------------------------------------------------------- xmodel: IR attrs <-> XIR attrs
def _pool_xir(op: DpuOp) -> dict[str, Any]:
    (kh, kw), (sh, sw) = op.attrs["kernel"], op.attrs["stride"]
    pt, pl, pb, pr = op.attrs["pads"]
    return {"kernel": [kw, kh], "stride": [sw, sh], "pad_mode": "FLOOR", "pad": [pl, pr, pt, pb], "global": False}


def _avgpool_xir(op: DpuOp) -> dict[str, Any]:
    return {**_pool_xir(op), "count_include_pad": True, "count_include_invalid": True}


def _pool_ir(a: Mapping[str, Any]) -> dict[str, Any]:
    (kw, kh), (sw, sh) = a["kernel"], a["stride"]
    pl, pr, pt, pb = a.get("pad") or [0, 0, 0, 0]
    return {"kernel": (kh, kw), "stride": (sh, sw), "pads": (pt, pl, pb, pr)}


def _conv_xir(op: DpuOp) -> dict[str, Any]:
    (kh, kw), (sh, sw), (dh, dw) = op.attrs["kernel"], op.attrs["stride"], op.attrs["dilation"]
    pt, pl, pb, pr = op.attrs["pads"]
    return {"kernel": [kw, kh], "stride": [sw, sh], "dilation": [dw, dh], "pad_mode": "FLOOR", "pad": [pl, pr, pt, pb]}


def _none(op: DpuOp) -> dict[str, Any]:
    return {}


def _no_ir_attrs(a: Mapping[str, Any]) -> dict[str, Any]:
    return {}


# --------------------------------------------------------------------------- inspector rules
def _range(value: int, bounds: Any, what: str) -> list[str]:
    lo, hi = (int(v) for v in bounds)
    return [] if lo <= value <= hi else [f"{what} {value} is outside [{lo}, {hi}]"]


def leaky_reasons(alpha: float) -> list[str]:
    if abs(alpha - 0.1) <= _LEAKY_TOLERANCE or abs(alpha - DPU_LEAKY_ALPHA) < 1e-9:
        return []
    return [f"LeakyReLU slope {alpha:g} is not the DPU's 26/256 (vai_q maps only slopes of ~0.1); retrain with alpha=0.1"]


def _fused_activation(op: DpuOp, allowed: Any) -> list[str]:
    if op.activation is None:
        return []
    if op.activation not in allowed:
        return [f"activation {op.activation} cannot be fused (allowed: {', '.join(allowed)})"]
    return leaky_reasons(float(op.attrs.get("alpha", 0.0))) if op.activation == "leaky_relu" else []


def _conv_rules(op: DpuOp, t: DPUTarget) -> tuple[list[str], dict[str, Any]]:
    lim = t.limits
    (kh, kw), (sh, sw), (dh, dw) = op.attrs["kernel"], op.attrs["stride"], op.attrs["dilation"]
    ic, oc = op.attrs["in_channels"], op.attrs["out_channels"]
    pt, pl, pb, pr = op.attrs["pads"]
    in_size = t.conv_in_size(kw, kh, ic)
    r = _range(kw, lim["conv_kernel"], "kernel width") + _range(kh, lim["conv_kernel"], "kernel height")
    r += _range(sw, lim["conv_stride"], "stride width") + _range(sh, lim["conv_stride"], "stride height")
    if max(pl, pr) > (kw - 1) * dw or max(pt, pb) > (kh - 1) * dh:
        r.append(f"padding {list(op.attrs['pads'])} exceeds (kernel - 1) * dilation")
    if in_size > t.bank_depth:
        r.append(f"kernel_w * kernel_h * ceil(in_channels / {t.channel_parallel}) = {in_size} exceeds the bank depth {t.bank_depth}")
    if ic > t.max_channels:
        r.append(f"{ic} input channels exceed 256 * channel_parallel = {t.max_channels}")
    if oc > t.max_channels:
        r.append(f"{oc} output channels exceed 256 * channel_parallel = {t.max_channels}")
    if max(dh, dw) > 1 and max(dh, dw) * ic > t.max_channels:
        r.append(f"dilation {max(dh, dw)} * {ic} input channels exceed {t.max_channels}")
    r += _fused_activation(op, lim["conv_activations"])
    return r, {"in_size": in_size, "bank_depth": t.bank_depth, "kernel": [kh, kw], "stride": [sh, sw],
               "channels": [ic, oc], "max_channels": t.max_channels}


def _dense_rules(op: DpuOp, t: DPUTarget) -> tuple[list[str], dict[str, Any]]:
    n_in, n_out = op.attrs["in_features"], op.attrs["out_features"]
    r = []
    if n_in > t.max_channels:
        r.append(f"{n_in} input features exceed 256 * channel_parallel = {t.max_channels} (inner product as a 1x1 conv)")
    if n_out > t.max_channels:
        r.append(f"{n_out} output features exceed 256 * channel_parallel = {t.max_channels}")
    in_size = math.ceil(n_in / t.channel_parallel)
    if in_size > t.bank_depth:
        r.append(f"ceil({n_in} / {t.channel_parallel}) = {in_size} exceeds the bank depth {t.bank_depth}")
    r += _fused_activation(op, t.limits["conv_activations"])
    return r, {"features": [n_in, n_out], "max_channels": t.max_channels}


def _pool_rules(op: DpuOp, t: DPUTarget) -> tuple[list[str], dict[str, Any]]:
    lim = t.limits
    (kh, kw), (sh, sw) = op.attrs["kernel"], op.attrs["stride"]
    r = _range(kw, lim["pool_kernel"], "pool kernel width") + _range(kh, lim["pool_kernel"], "pool kernel height")
    r += _range(sw, lim["pool_stride"], "pool stride width") + _range(sh, lim["pool_stride"], "pool stride height")
    pt, pl, pb, pr = op.attrs["pads"]
    if max(pl, pr) > kw - 1 or max(pt, pb) > kh - 1:
        r.append(f"pool padding {list(op.attrs['pads'])} exceeds kernel - 1")
    # No square-kernel rule for average pooling: PG338 v4.0 (DPUCZDX8G for Vitis AI 2.x/3.x) says the AveragePool
    # feature "is always enabled, and supports rectangle sizes" (the 2x2..8x8 square-only rule is the older IP's), so
    # a Keras AveragePooling1D (a 1 x k pool over H = 1) is a DPU pool; the emulator's 1/(kh*kw) factor is VART's.
    return r, {"kernel": [kh, kw], "stride": [sh, sw]}


def _add_rules(op: DpuOp, t: DPUTarget) -> tuple[list[str], dict[str, Any]]:
    c = op.shape[-1] if op.shape else 0
    r = [] if c <= t.max_channels else [f"{c} channels exceed 256 * channel_parallel = {t.max_channels}"]
    if len(op.inputs) != int(t.limits["eltwise_inputs"]):
        r.append(f"element-wise add of {len(op.inputs)} inputs (the DPU adds {t.limits['eltwise_inputs']})")
    r += _fused_activation(op, t.limits["eltwise_activations"])
    return r, {"channels": c}


def _input_rules(op: DpuOp, t: DPUTarget) -> tuple[list[str], dict[str, Any]]:
    return [], {"note": "host buffer, quantized with DPU rounding at the input fix point"}


def _flatten_rules(op: DpuOp, t: DPUTarget) -> tuple[list[str], dict[str, Any]]:
    return [], {"note": "layout only; vai_c_xir folds it into the next inner product"}


def _activation_rules(op: DpuOp, t: DPUTarget) -> tuple[list[str], dict[str, Any]]:
    return (leaky_reasons(float(op.attrs.get("alpha", 0.0))) if op.kind == OpKind.LEAKY_RELU else []), {}


def _unsupported_rules(op: DpuOp, t: DPUTarget) -> tuple[list[str], dict[str, Any]]:
    return [op.reason or f"{op.attrs.get('op_type')} is not a DPU operator"], {}


# --------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class OpRecord:
    """Everything nilmc knows about one DPU op kind (module docstring)."""

    kind: OpKind
    onnx_types: tuple[str, ...]
    rule: PotRule | None
    emulate: EmulateFn | None
    xir_type: str | None
    xir_attrs: Callable[[DpuOp], dict[str, Any]]
    ir_attrs: Callable[[Mapping[str, Any]], dict[str, Any]]
    inspect: InspectFn
    weighted: bool = False


def _leaky_xir(op: DpuOp) -> dict[str, Any]:
    return {"alpha": DPU_LEAKY_ALPHA}


def _leaky_ir(a: Mapping[str, Any]) -> dict[str, Any]:
    return {"alpha": DPU_LEAKY_ALPHA}


def _relu_ir(a: Mapping[str, Any]) -> dict[str, Any]:
    return {"alpha": 0.0}


def _flatten_xir(op: DpuOp) -> dict[str, Any]:
    return {"start_axis": 1, "end_axis": -1}


def _dense_xir(op: DpuOp) -> dict[str, Any]:
    return {"transpose_a": False, "transpose_b": True}


_K = OpKind
OPS: dict[OpKind, OpRecord] = {r.kind: r for r in (
    OpRecord(_K.INPUT, (), PotRule.INPUT, None, "data", _none, _no_ir_attrs, _input_rules),
    OpRecord(_K.CONV2D, ("Conv",), PotRule.WEIGHTED, _weighted, "conv2d", _conv_xir, _no_ir_attrs, _conv_rules, weighted=True),
    OpRecord(_K.DENSE, ("MatMul", "Gemm"), PotRule.WEIGHTED, _weighted, "matmul", _dense_xir, _no_ir_attrs, _dense_rules, weighted=True),
    OpRecord(_K.FLATTEN, ("Flatten", "Reshape"), PotRule.PASSTHROUGH, _flatten, "flatten", _flatten_xir, _no_ir_attrs, _flatten_rules),
    OpRecord(_K.MAXPOOL, ("MaxPool",), PotRule.PASSTHROUGH, _maxpool, "maxpool2d", _pool_xir, _pool_ir, _pool_rules),
    OpRecord(_K.AVGPOOL, ("AveragePool", "GlobalAveragePool"), PotRule.PASSTHROUGH, _avgpool, "avgpool2d", _avgpool_xir, _pool_ir,
             _pool_rules),
    OpRecord(_K.ADD, ("Add",), PotRule.ELEMENTWISE, _add, "add", _none, _no_ir_attrs, _add_rules),
    OpRecord(_K.RELU, ("Relu",), PotRule.ELEMENTWISE, _activation, "relu", _none, _relu_ir, _activation_rules),
    OpRecord(_K.LEAKY_RELU, ("LeakyRelu",), PotRule.ELEMENTWISE, _activation, "leaky-relu", _leaky_xir, _leaky_ir, _activation_rules),
    OpRecord(_K.UNSUPPORTED, (), None, None, None, _none, _no_ir_attrs, _unsupported_rules),
)}
BY_XIR_TYPE: dict[str, OpRecord] = {r.xir_type: r for r in OPS.values() if r.xir_type}
ACTIVATION_XIR = {OpKind.RELU.value: "relu", OpKind.LEAKY_RELU.value: "leaky-relu"}  # fused activations, by IR name


def record(kind: str | OpKind) -> OpRecord:
    """The table entry of ``kind`` (a KeyError names an op kind nilmc does not know)."""
    return OPS[OpKind(kind)]

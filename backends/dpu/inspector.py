"""Which layers the DPU runs and which fall back to the CPU, and why.

:func:`inspect_graph` checks every op of a :class:`~nilmc.backends.dpu.ir.DpuGraph`
against the chosen target's limits (``bitstreams/<target>/target.json``, from AMD
UG1414 "Currently Supported Operators"): conv kernel 1-16, stride 1-8, padding
at most ``(kernel - 1) * dilation``, ``kw * kh * ceil(ic / cp) <= bank_depth``, input
and output channels at most ``256 * cp``, ``dilation * ic <= 256 * cp``, group 1;
ReLU / LeakyReLU (slope ~0.1, computed as 26/256) fused; pooling kernel and
stride 1-8 (average pooling square); two-input element-wise add with ReLU. An op
that breaks a rule, or that is no DPU operator at all (an LSTM, a Sigmoid), is
placed on the CPU: ``vai_c_xir`` would cut the graph there and run it on the ARM
cores between DPU subgraphs. The report counts those subgraphs.

The fully connected rule (``in_features <= 256 * cp``) treats an inner product as
a 1x1 convolution over the flattened features; that reading of the conv rules is
nilmc's, not a documented DPUCZDX8G limit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from nilmc.backends.dpu.ir import DpuGraph, DpuOp
from nilmc.bitstreams import DPUTarget

DPU, CPU = "DPU", "CPU"
DPU_LEAKY_ALPHA = 26 / 256
_LEAKY_TOLERANCE = 0.002  # vai_q maps slopes of ~0.1 to 26/256


@dataclass(frozen=True)
class Placement:
    op: str
    kind: str
    device: str  # "DPU" | "CPU"
    reasons: tuple[str, ...] = ()
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"op": self.op, "kind": self.kind, "device": self.device, "reasons": list(self.reasons), **self.details}


@dataclass
class InspectionReport:
    target: str
    placements: list[Placement]
    dpu_subgraphs: int

    @property
    def cpu_ops(self) -> list[Placement]:
        return [p for p in self.placements if p.device == CPU]

    @property
    def all_on_dpu(self) -> bool:
        return not self.cpu_ops

    def placement(self, op: str) -> Placement:
        for p in self.placements:
            if p.op == op:
                return p
        raise KeyError(op)

    def summary(self) -> str:
        n = len(self.placements)
        if self.all_on_dpu:
            return f"all {n} ops run on the {self.target} DPU ({self.dpu_subgraphs} DPU subgraph)"
        worst = "; ".join(f"{p.op}: {p.reasons[0]}" for p in self.cpu_ops[:3])
        return f"{len(self.cpu_ops)} of {n} ops fall back to the CPU ({self.dpu_subgraphs} DPU subgraphs): {worst}"

    def to_json(self) -> dict[str, Any]:
        return {"target": self.target, "all_on_dpu": self.all_on_dpu, "dpu_subgraphs": self.dpu_subgraphs,
                "cpu_ops": [p.op for p in self.cpu_ops], "summary": self.summary(),
                "layers": [p.to_json() for p in self.placements]}


# --------------------------------------------------------------------------- rules
def _range(value: int, bounds: Any, what: str) -> list[str]:
    lo, hi = (int(v) for v in bounds)
    return [] if lo <= value <= hi else [f"{what} {value} is outside [{lo}, {hi}]"]


def _leaky(alpha: float) -> list[str]:
    if abs(alpha - 0.1) <= _LEAKY_TOLERANCE or abs(alpha - DPU_LEAKY_ALPHA) < 1e-9:
        return []
    return [f"LeakyReLU slope {alpha:g} is not the DPU's 26/256 (vai_q maps only slopes of ~0.1); retrain with alpha=0.1"]


def _activation(op: DpuOp, allowed: Any) -> list[str]:
    if op.activation is None:
        return []
    if op.activation not in allowed:
        return [f"activation {op.activation} cannot be fused (allowed: {', '.join(allowed)})"]
    return _leaky(float(op.attrs.get("alpha", 0.0))) if op.activation == "leaky_relu" else []


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
    r += _activation(op, lim["conv_activations"])
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
    r += _activation(op, t.limits["conv_activations"])
    return r, {"features": [n_in, n_out], "max_channels": t.max_channels}


def _pool_rules(op: DpuOp, t: DPUTarget) -> tuple[list[str], dict[str, Any]]:
    lim = t.limits
    (kh, kw), (sh, sw) = op.attrs["kernel"], op.attrs["stride"]
    r = _range(kw, lim["pool_kernel"], "pool kernel width") + _range(kh, lim["pool_kernel"], "pool kernel height")
    r += _range(sw, lim["pool_stride"], "pool stride width") + _range(sh, lim["pool_stride"], "pool stride height")
    pt, pl, pb, pr = op.attrs["pads"]
    if max(pl, pr) > kw - 1 or max(pt, pb) > kh - 1:
        r.append(f"pool padding {list(op.attrs['pads'])} exceeds kernel - 1")
    if op.kind == "avgpool" and kh != kw:
        r.append(f"average pooling needs a square kernel, got {kh}x{kw}")
    return r, {"kernel": [kh, kw], "stride": [sh, sw]}


def _add_rules(op: DpuOp, t: DPUTarget) -> tuple[list[str], dict[str, Any]]:
    c = op.shape[-1] if op.shape else 0
    r = [] if c <= t.max_channels else [f"{c} channels exceed 256 * channel_parallel = {t.max_channels}"]
    if len(op.inputs) != int(t.limits["eltwise_inputs"]):
        r.append(f"element-wise add of {len(op.inputs)} inputs (the DPU adds {t.limits['eltwise_inputs']})")
    r += _activation(op, t.limits["eltwise_activations"])
    return r, {"channels": c}


def _place(op: DpuOp, t: DPUTarget) -> Placement:
    if op.kind == "unsupported":
        return Placement(op.name, op.attrs.get("op_type", "unsupported"), CPU, (op.reason,))
    if op.kind == "input":
        return Placement(op.name, "input", DPU, (), {"note": "host buffer, quantized with DPU rounding at the input fix point"})
    if op.kind == "flatten":
        return Placement(op.name, "flatten", DPU, (), {"note": "layout only; vai_c_xir folds it into the next inner product"})
    if op.kind in ("relu", "leaky_relu"):
        reasons = _leaky(float(op.attrs.get("alpha", 0.0))) if op.kind == "leaky_relu" else []
        return Placement(op.name, op.kind, CPU if reasons else DPU, tuple(reasons))
    rules = {"conv2d": _conv_rules, "dense": _dense_rules, "maxpool": _pool_rules, "avgpool": _pool_rules, "add": _add_rules}
    reasons, details = rules[op.kind](op, t)
    return Placement(op.name, op.kind, CPU if reasons else DPU, tuple(reasons), details)


def _count_dpu_subgraphs(graph: DpuGraph, placements: dict[str, Placement]) -> int:
    """Connected runs of DPU ops (a CPU op between two DPU ops splits them)."""
    device_of = {op.output: placements[op.name].device for op in graph.ops}
    parent: dict[str, str] = {}

    def find(a: str) -> str:
        while parent.get(a, a) != a:
            a = parent[a]
        return a

    dpu_ops = [op for op in graph.ops if op.kind != "input" and placements[op.name].device == DPU]
    for op in dpu_ops:
        parent.setdefault(op.name, op.name)
        for t in op.inputs:
            if device_of.get(t) == DPU:
                src = graph.producer(t)
                if src.kind != "input":
                    parent.setdefault(src.name, src.name)
                    parent[find(op.name)] = find(src.name)
    return len({find(op.name) for op in dpu_ops})


def inspect_graph(graph: DpuGraph, target: DPUTarget) -> InspectionReport:
    """Place every op of ``graph`` on the DPU or the CPU under ``target``'s limits."""
    placements = {op.name: _place(op, target) for op in graph.ops}
    return InspectionReport(target.name, [placements[op.name] for op in graph.ops], _count_dpu_subgraphs(graph, placements))

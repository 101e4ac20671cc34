"""Which layers the DPU runs and which fall back to the CPU, and why.

:func:`inspect_graph` checks every op of a :class:`~nilmc.backends.dpu.ir.DpuGraph`
against the chosen target's limits (``bitstreams/<target>/target.json``, from AMD
UG1414 "Currently Supported Operators"): conv kernel 1-16, stride 1-8, padding
at most ``(kernel - 1) * dilation``, ``kw * kh * ceil(ic / cp) <= bank_depth``, input
and output channels at most ``256 * cp``, ``dilation * ic <= 256 * cp``, group 1;
ReLU / LeakyReLU (slope ~0.1, computed as 26/256) fused; pooling kernel and
stride 1-8 (average pooling rectangular too, PG338 v4.0); two-input element-wise add with ReLU. An op
that breaks a rule, or that is no DPU operator at all (an LSTM, a Sigmoid), is
placed on the CPU: ``vai_c_xir`` would cut the graph there and run it on the ARM
cores between DPU subgraphs. The report counts those subgraphs.

The fully connected rule (``in_features <= 256 * cp``) treats an inner product as
a 1x1 convolution over the flattened features; that reading of the conv rules is
nilmc's, not a documented DPUCZDX8G limit.

With a :class:`~nilmc.backends.dpu.partition.Partition`, the ops of its CPU stages are placed on the CPU with the
partition's reason (``stage`` ``cpu_pre`` / ``cpu_post``): planned FP32 pre-/post-processing, not fallbacks.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from nilmc.backends.dpu.ir import DpuGraph, DpuOp
from nilmc.backends.dpu.ops import DPU_LEAKY_ALPHA, OpKind, record
from nilmc.bitstreams import DPUTarget

if TYPE_CHECKING:
    from nilmc.backends.dpu.partition import Partition

DPU, CPU = "DPU", "CPU"
__all__ = ["CPU", "DPU", "DPU_LEAKY_ALPHA", "InspectionReport", "Placement", "inspect_graph"]


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

    @property
    def fallbacks(self) -> list[Placement]:
        """CPU ops that are not a planned CPU stage: the DPU cannot take them where they are."""
        return [p for p in self.cpu_ops if "stage" not in p.details]

    def placement(self, op: str) -> Placement:
        for p in self.placements:
            if p.op == op:
                return p
        raise KeyError(op)

    def summary(self) -> str:
        n = len(self.placements)
        if self.all_on_dpu:
            return f"all {n} ops run on the {self.target} DPU ({self.dpu_subgraphs} DPU subgraph)"
        if not self.fallbacks:
            from nilmc.backends.dpu.partition import listing

            cpu = listing([p.op for p in self.cpu_ops])
            return (f"{n - len(self.cpu_ops)} of {n} ops run on the {self.target} DPU ({self.dpu_subgraphs} DPU subgraph); "
                    f"{len(self.cpu_ops)} in FP32 on the CPU as pre-/post-processing ({cpu})")
        worst = "; ".join(f"{p.op}: {p.reasons[0]}" for p in self.fallbacks[:3])
        more = f"; and {len(self.fallbacks) - 3} more" if len(self.fallbacks) > 3 else ""
        return f"{len(self.fallbacks)} of {n} ops fall back to the CPU ({self.dpu_subgraphs} DPU subgraphs): {worst}{more}"

    def to_json(self) -> dict[str, Any]:
        return {"target": self.target, "all_on_dpu": self.all_on_dpu, "dpu_subgraphs": self.dpu_subgraphs,
                "cpu_ops": [p.op for p in self.cpu_ops], "fallbacks": [p.op for p in self.fallbacks], "summary": self.summary(),
                "layers": [p.to_json() for p in self.placements]}


# --------------------------------------------------------------------------- placement (rules: the op table's ``inspect``)
def _place(op: DpuOp, t: DPUTarget) -> Placement:
    reasons, details = record(op.kind).inspect(op, t)
    kind = op.attrs.get("op_type", "unsupported") if op.kind == OpKind.UNSUPPORTED else str(op.kind)
    return Placement(op.name, kind, CPU if reasons else DPU, tuple(reasons), details)


def _count_dpu_subgraphs(graph: DpuGraph, placements: dict[str, Placement]) -> int:
    """Connected runs of DPU ops (a CPU op between two DPU ops splits them)."""
    device_of = {op.output: placements[op.name].device for op in graph.ops}
    parent: dict[str, str] = {}

    def find(a: str) -> str:
        while parent.get(a, a) != a:
            a = parent[a]
        return a

    dpu_ops = [op for op in graph.ops if op.kind != OpKind.INPUT and placements[op.name].device == DPU]
    for op in dpu_ops:
        parent.setdefault(op.name, op.name)
        for t in op.inputs:
            if device_of.get(t) == DPU:
                src = graph.producer(t)
                if src.kind != OpKind.INPUT:
                    parent.setdefault(src.name, src.name)
                    parent[find(op.name)] = find(src.name)
    return len({find(op.name) for op in dpu_ops})


def inspect_graph(graph: DpuGraph, target: DPUTarget, partition: Partition | None = None) -> InspectionReport:
    """Place every op of ``graph`` on the DPU or the CPU under ``target``'s limits (and ``partition``'s CPU stages)."""
    placements = {op.name: _place(op, target) for op in graph.ops}
    for stage, ops in (("cpu_pre", partition.pre if partition else {}), ("cpu_post", partition.post if partition else {})):
        for name, why in ops.items():
            p = placements[name]
            placements[name] = Placement(p.op, p.kind, CPU, (why,), {**p.details, "stage": stage})
    return InspectionReport(target.name, [placements[op.name] for op in graph.ops], _count_dpu_subgraphs(graph, placements))

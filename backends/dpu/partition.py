"""Where each op of a DPU deployment runs: in FP32 on the board's CPU, or in INT8 on the DPU.

A deployment is up to three stages, and every part of nilmc's DPU lowering (refinement, QAT, emulator, xmodel,
inspector, board script) reads the same :class:`Partition`:

1. **CPU pre-processing** (``cpu_pre.onnx``, an ONNX sub-graph of the model run in FP32): the layers the shared
   parameters keep float because they read the graph input (precise input, ``QuantTraits.float_layers`` of
   DPU_POT), and layout-only ops before them. The graph input is then never quantized: its 8-bit power-of-two
   grid capped the shipped model near 25 dB (``benchmarks/bench_dpu_fidelity.py``). A graph input that is not
   in NHWC order (the ``(N, C, W)`` input of a PyTorch Conv1d export) is put in NHWC order here as well (exact).
   Under ``cpu_layers="auto"`` the backend may extend it by whole layers (``prefix``, :func:`next_prefix`) when the
   emulated deployment misses the calibration SQNR floor: a raw-feature model whose conv1 output no 8-bit
   per-tensor grid holds (the DPU cannot keep an inner layer float, as the QDQ targets do).
2. **DPU** (``quantized.xmodel``): everything else; its inputs are the CPU stage's outputs in NHWC order, each
   quantized at its own fix point.
3. **CPU post-processing** (``cpu_post.onnx``, FP32, fed the DPU's dequantized outputs): the **CPU tail**, the
   accelerator/CPU partition ``vai_c_xir`` makes with CPU subgraphs, kept to one DPU subgraph: the first op the DPU
   has no operator for (a GRU, a ``Sigmoid``, a ``ConvTranspose``, tf2onnx's ``Shape``/``Slice``/``Pad``
   arithmetic, or trailing data movement such as a PyTorch ``view`` or a final ``Clip``), or whose operator the
   target's limits reject there (``rejected``: the inspector's reasons, e.g. a global average pool over 120 steps
   against a pool kernel of at most 8), and every op after it, including layers the DPU could run (a dense head
   after a GRU: a second DPU subgraph is not made). Each op
   carries its reason. With ``cpu_layers="auto"`` also the **head** (precise output): a dense layer without
   activation whose output is the graph output, when a weighted layer stays on the DPU. Its 8-bit power-of-two
   grid must hold the contract's peak power on a symmetric range, so one output LSB was 25 W on the shipped T-P
   model, and the 0 W floor turned that rounding noise into a one-sided bias on every "off" window
   (``benchmarks/bench_dpu_fidelity.py``: EACC delta +0.19..+0.55 points with the head on the DPU).

The split is refused (one line, from the graph alone, before any parameters: :attr:`Partition.problems`) when no
weighted layer is left for the DPU, or when it is not one pre -> DPU -> post chain (a CPU tail op reading the
graph input or the pre stage, a graph output straight from the DPU beside others from the tail). When the precise-input
layers and the tail leave the DPU nothing (a Conv1D reading the input, then an LSTM) that is said in one line, and
``cpu_layers="none"`` (the input layer on the DPU) may still lower it: the backend's pre-check, which sees no options,
then leaves the refusal to ``lower``. ``cpu_layers``:
``"auto"`` (input layers and head on the CPU), ``"input"`` (only the input layers), ``"none"`` (every layer on the
DPU, the graph input quantized, as before).
"""
from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from nilmc.backends.dpu.ir import ELEMENTWISE_CONST_OPS, FLAT, DpuGraph, DpuOp, nhwc_perm, onnx_dims, same_order, valid_layout
from nilmc.backends.dpu.ops import OpKind
from nilmc.compiler.errors import InternalError
from nilmc.quantization.graph import prune_dead

CPU_PRE, CPU_POST = "cpu_pre.onnx", "cpu_post.onnx"
NHWC_SUFFIX = ":nhwc"  # a CPU stage's tensor in the DPU's NHWC order (pre outputs, post inputs)
CPU_LAYERS = ("auto", "input", "none")
# Ops that only move data: before the first DPU layer they run on the CPU with the float layers.
LEADING_OPS = frozenset({"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity"})
# After the last DPU op: data movement, shape arithmetic, and a final clamp.
TRAILING_OPS = LEADING_OPS | frozenset({"Shape", "Gather", "Concat", "Slice", "Cast", "Clip", "Relu"})
PRECISE_INPUT = "precise input: reads the float graph input, runs in FP32 on the CPU (the input is never quantized)"
CPU_TAIL = "runs in FP32 on the board's CPU (CPU post stage)"
PRECISE_HEAD = ("precise output: the head (dense, no activation) runs in FP32 on the CPU on the DPU's int8 features (an 8-bit "
                "output grid holding the peak power costs a coarse LSB, biased by the 0 W floor)")


@dataclass(frozen=True)
class Partition:
    """``pre`` / ``post``: IR op name -> why it runs on the CPU before / after the DPU; ``inputs``: the IR tensors
    the DPU subgraph reads (the CPU stage's outputs, or the graph inputs when there is none); ``outputs``: the IR
    tensors it hands to the CPU post stage (empty without one); ``problems``: why the split cannot be made."""

    pre: dict[str, str] = field(default_factory=dict)
    post: dict[str, str] = field(default_factory=dict)
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    layouts: dict[str, tuple[str, tuple[int, ...]]] = field(default_factory=dict)  # cut tensor -> (ONNX layout, NHWC shape)
    problems: tuple[str, ...] = ()

    @property
    def has_pre(self) -> bool:
        return bool(self.pre)

    @property
    def has_post(self) -> bool:
        return bool(self.post)

    def device(self, op: str) -> str:
        return "CPU" if op in self.pre or op in self.post else "DPU"

    def to_json(self) -> dict[str, Any]:
        return {"cpu_pre": [{"op": k, "why": v} for k, v in self.pre.items()],
                "cpu_post": [{"op": k, "why": v} for k, v in self.post.items()],
                "dpu_inputs": list(self.inputs), "dpu_outputs": list(self.outputs)}


def _producers(graph: DpuGraph) -> dict[str, DpuOp]:
    return {op.output: op for op in graph.ops}


def _consumers(graph: DpuGraph) -> dict[str, list[DpuOp]]:
    out: dict[str, list[DpuOp]] = {}
    for op in graph.ops:
        for t in op.inputs:
            out.setdefault(t, []).append(op)
    return out


def _op_type(op: DpuOp) -> str:
    return str(op.attrs.get("op_type", "")) if op.kind == OpKind.UNSUPPORTED else ""


def _const_elementwise(op: DpuOp) -> bool:
    """A CPU op computing x * c, x + c, ... of one tensor, whose output keeps that tensor's layout (ir._elementwise_view)."""
    return op.kind == OpKind.UNSUPPORTED and _op_type(op) in ELEMENTWISE_CONST_OPS and len(op.inputs) == 1 and bool(op.onnx_layout)


def _layout_only(op: DpuOp) -> bool:
    """Data movement only: an IR flatten, or an op the DPU has no operator for among :data:`LEADING_OPS`."""
    return op.kind == OpKind.FLATTEN or (op.kind == OpKind.UNSUPPORTED and _op_type(op) in LEADING_OPS)


def plan_partition(graph: DpuGraph, float_layers: Collection[str] = (), *, mode: str = "auto",
                   rejected: Mapping[str, str] | None = None, prefix: Mapping[str, str] | None = None) -> Partition:
    """The CPU/DPU split of ``graph`` (module docstring). ``float_layers``: layers the shared parameters keep float
    (only those reading the graph input, through CPU ops, move to the CPU); ``mode`` ``"auto"`` (default: those and the
    head, see the module docstring), ``"input"`` (those only) or ``"none"`` (no CPU layers; layout conversion of the graph
    input and trailing ops still run on the CPU); ``rejected`` (default none): op name -> why the target's limits keep
    a DPU op off the DPU (the inspector's reason): such an op starts the CPU tail like an op with no DPU operator;
    ``prefix`` (default none): op name -> why it runs in the CPU pre stage as well (:func:`next_prefix`: the
    calibration SQNR floor's extension); an op whose inputs are not all computed on the CPU stays off it."""
    producers, consumers = _producers(graph), _consumers(graph)
    on_cpu = {op.name for op in graph.ops if op.kind == OpKind.INPUT}
    pre: dict[str, str] = {}
    prefix = prefix or {}
    for op in graph.ops:
        if op.kind == OpKind.INPUT or not op.inputs or not all(producers[t].name in on_cpu for t in op.inputs if t in producers):
            continue
        if mode in ("auto", "input") and op.name in float_layers:
            pre[op.name] = PRECISE_INPUT
        elif op.name in prefix:
            pre[op.name] = prefix[op.name]
        elif _layout_only(op) and _leads_to(op, float_layers, consumers, mode):
            pre[op.name] = f"{_op_type(op) or op.kind} before a CPU layer: data movement, runs on the CPU with it"
        elif _const_elementwise(op) and any(o.weighted for o in graph.ops if o.name in pre):
            # x * c + c' right after the pre stage (a Keras BatchNormalization after the precise-input conv's ReLU): no DPU
            # operator, and as the CPU tail it would leave nothing after it for the DPU; the pre stage computes it instead
            pre[op.name] = f"{_op_type(op)} with constants right after the CPU pre stage (no DPU operator): runs in FP32 with it"
        else:
            continue
        on_cpu.add(op.name)
    post = _tail(graph, pre, consumers, rejected or {})
    if mode == "auto":
        head = _head(graph, pre, post, consumers)
        if head is not None and head.name not in post:
            post[head.name] = PRECISE_HEAD
    _reordering_flatten_with_its_reader(graph, pre, post, consumers)
    post = {op.name: post[op.name] for op in graph.ops if op.name in post}  # graph order
    return _cut(graph, pre, post, producers)


def _reordering_flatten_with_its_reader(graph: DpuGraph, pre: dict[str, str], post: dict[str, str],
                                        consumers: Mapping[str, list[DpuOp]]) -> None:
    """A channel-major flatten (``attrs["onnx_order"]``, :meth:`~nilmc.backends.dpu.ir._Builder._flatten`) leaves its
    vector in the DPU's order, which only its dense reader's reordered weights know: it runs where its reader runs, so
    a cut never carries that vector (the cut is the flatten's labelled input, converted as any other). In place."""
    for op in graph.ops:
        if op.kind != OpKind.FLATTEN or op.attrs.get("onnx_order") is None:
            continue
        users = consumers.get(op.output, [])
        if op.name in pre and not any(u.name in pre for u in users):
            del pre[op.name]  # its reader runs on the DPU: so does the flatten
        elif op.name not in pre and op.name not in post and any(u.name in post for u in users):
            post[op.name] = f"flatten before a CPU layer ({users[0].name}): its channel-major order is the ONNX graph's, {CPU_TAIL}"


def next_prefix(graph: DpuGraph, part: Partition) -> list[str]:
    """The ops that extend ``part``'s CPU pre stage by one whole weighted layer: in topological order, the ops after the
    pre stage up to and including the next weighted layer (pooling / flatten / add ops before it come with it). Empty
    when no weighted layer is left outside the CPU stages, or when an op on the way is not computable from the pre
    stage alone (it reads a CPU tail op): the pre stage stays one prefix of the graph."""
    out: list[str] = []
    on_cpu = {op.name for op in graph.ops if op.kind == OpKind.INPUT} | set(part.pre)
    producers = _producers(graph)
    for op in graph.ops:
        if op.name in on_cpu:
            continue
        if op.name in part.post or not all(producers[t].name in on_cpu for t in op.inputs if t in producers):
            return []
        out.append(op.name)
        on_cpu.add(op.name)
        if op.weighted:
            return out
    return []


def _live(graph: DpuGraph, consumers: Mapping[str, list[DpuOp]]) -> set[str]:
    """Ops with a path to a graph output (shape arithmetic whose consumer was folded away is not live)."""
    live: set[str] = set()
    for op in reversed(graph.ops):
        if op.output in graph.outputs or any(u.name in live for u in consumers.get(op.output, [])):
            live.add(op.name)
    return live


def _tail_reason(op: DpuOp, first: DpuOp, rejected: Mapping[str, str]) -> str:
    if op is first and op.name in rejected:
        return f"{op.kind} outside the target's limits ({rejected[op.name]}): {CPU_TAIL}"
    if op.kind != OpKind.UNSUPPORTED:
        return (f"{op.kind} after {first.name} ({_op_type(first) or first.kind}, a CPU op): the DPU subgraph ends before it "
                f"(one DPU subgraph), so it {CPU_TAIL}")
    t = _op_type(op)
    if t in TRAILING_OPS and op.reason.startswith(f"{t} is not a DPUCZDX8G operator"):
        return f"{t} after the last DPU op: no DPU operator, {CPU_TAIL}"
    if op.reason.startswith(f"{t} is not a DPUCZDX8G operator"):
        return f"{t} is not a DPUCZDX8G operator: {CPU_TAIL}"
    return f"{op.reason}: {CPU_TAIL}"


def _tail(graph: DpuGraph, pre: Mapping[str, str], consumers: Mapping[str, list[DpuOp]], rejected: Mapping[str, str]
          ) -> dict[str, str]:
    """The CPU tail: every live op the DPU has no operator for, or the target rejects (outside the pre stage), and
    every op after one."""
    live, producers = _live(graph, consumers), _producers(graph)
    first: dict[str, DpuOp] = {}  # tail op -> the CPU op it follows (itself for a seed)
    for op in graph.ops:  # topological order: a producer is decided before its consumers
        if op.name in pre or op.kind == OpKind.INPUT:
            continue
        if (op.kind == OpKind.UNSUPPORTED or op.name in rejected) and op.name in live:
            first[op.name] = op
        for t in op.inputs:
            src = producers.get(t)
            if src is not None and src.name in first and op.name not in first:
                first[op.name] = first[src.name]
    return {op.name: _tail_reason(op, first[op.name], rejected) for op in graph.ops if op.name in first}


def _head(graph: DpuGraph, pre: Mapping[str, str], post: Mapping[str, str], consumers: Mapping[str, list[DpuOp]]) -> DpuOp | None:
    """The dense layer without activation that makes the graph's only output (directly or through trailing CPU ops),
    when another weighted layer stays on the DPU (None otherwise)."""
    if len(graph.outputs) != 1:
        return None
    for op in graph.ops:
        users = consumers.get(op.output, [])
        feeds_out = op.output in graph.outputs or (users and all(u.name in post for u in users))
        if op.kind == OpKind.DENSE and op.activation is None and op.name not in pre and feeds_out:
            if any(o.weighted and o.name not in pre and o is not op for o in graph.ops):
                return op
    return None


def _leads_to(op: DpuOp, float_layers: Collection[str], consumers: Mapping[str, list[DpuOp]], mode: str) -> bool:
    """Whether a leading layout op feeds (through other layout ops) a float layer that will run on the CPU."""
    if mode not in ("auto", "input"):
        return False
    todo, seen = [op], set()
    while todo:
        cur = todo.pop()
        for u in consumers.get(cur.output, []):
            if u.name in float_layers:
                return True
            if _layout_only(u) and u.name not in seen:
                seen.add(u.name)
                todo.append(u)
    return False


def _cut(graph: DpuGraph, pre: dict[str, str], post: dict[str, str], producers: Mapping[str, DpuOp]) -> Partition:
    inputs: list[str] = []
    outputs: list[str] = []
    problems: list[str] = []
    layouts: dict[str, tuple[str, tuple[int, ...]]] = {}
    dpu_ops = [op for op in graph.ops if op.kind != OpKind.INPUT and op.name not in pre and op.name not in post]
    for op in dpu_ops:
        for t in op.inputs:
            src = producers.get(t)
            if src is not None and (src.kind == OpKind.INPUT or src.name in pre) and t not in inputs:
                inputs.append(t)
    early: list[tuple[str, str]] = []  # (tail op, tensor) read from the graph input / pre stage
    for op in graph.ops:
        if op.name in post:
            for t in op.inputs:
                src = producers.get(t)
                if src is not None and (src.kind == OpKind.INPUT or src.name in pre):
                    early.append((op.name, t))
                elif src is not None and src.name not in post and t not in outputs:
                    outputs.append(t)
    cpu = list(dict.fromkeys(_op_type(op) for op in graph.ops if op.name in post and op.kind == OpKind.UNSUPPORTED))
    # compute ops first: tf2onnx's Shape/Reshape/Unsqueeze plumbing is what the user would not replace
    cpu = [t for t in cpu if t not in TRAILING_OPS] + [t for t in cpu if t in TRAILING_OPS]
    pre_layers = [op.name for op in graph.ops if op.name in pre and op.weighted]
    if early and pre_layers and not any(op.weighted for op in dpu_ops):
        # the float input layer(s) and the first op with no DPU operator are adjacent: one line says so (Conv1D -> LSTM)
        first = early[0][0]
        why = post[first].removesuffix(f": {CPU_TAIL}")
        ops = f"; the CPU would run {listing(cpu)}" if cpu else ""
        problems.append(f"nothing is left for the DPU: {listing(pre_layers)} reads the float graph input and runs in FP32 on the CPU "
                        f"(precise input), and the CPU tail starts right after it at {first!r} ({why}){ops}")
    elif early:  # one problem, however many ops (tf2onnx's LSTM plumbing reads the input through several)
        more = f" (and {len(early) - 1} more tail op(s))" if len(early) > 1 else ""
        problems.append(f"the CPU tail op {early[0][0]!r} reads {early[0][1]!r} from the graph input / CPU pre stage{more}: not one "
                        "pre -> DPU -> post chain")
    if post and any(producers[t].name not in post for t in graph.outputs if t in producers):
        problems.append("a graph output comes straight from the DPU while others pass through CPU post-processing")
    for t in (*inputs, *outputs):
        src = producers[t]
        layout = src.onnx_layout if src.kind != OpKind.INPUT else _input_layout(src)
        if not valid_layout(layout, tuple(src.shape)):
            problems.append(f"tensor {t!r} between the CPU and the DPU has no known layout or shape ({layout or 'unknown'}, {src.shape})")
        layouts[t] = (layout, tuple(src.shape))
    if not any(op.weighted for op in dpu_ops) and not (early and pre_layers):
        left = f" (only {', '.join(sorted({str(op.kind) for op in dpu_ops}))})" if dpu_ops else ""
        why = f"; the CPU would run {listing(cpu)}" if cpu else ""
        problems.append(f"no weighted layer is left for the DPU{left}{why}")
    if pre:  # graph inputs only the CPU stage reads stay float
        first = {op.name: "graph input: read in FP32 by the CPU pre stage" for op in graph.ops
                 if op.kind == OpKind.INPUT and op.output not in inputs}
        pre = {**first, **pre}
    conversion = any(not same_order(*layouts[t]) for t in inputs if producers[t].kind == OpKind.INPUT)
    if conversion:  # the graph input in NHWC order for the DPU: a CPU stage of layout ops only
        for op in graph.ops:
            if op.kind == OpKind.INPUT and op.output in inputs:
                pre.setdefault(op.name, f"graph input in {layouts[op.output][0].upper()} order: put in the DPU's NHWC order on the CPU (exact)")
    return Partition(pre, post, tuple(inputs), tuple(outputs), layouts, tuple(problems))


def listing(items: Sequence[str], first: int = 3) -> str:
    """``a, b, c and N more``: a refusal stays one readable line whatever the graph's size."""
    items = list(items)
    more = f" and {len(items) - first} more" if len(items) > first else ""
    return ", ".join(items[:first]) + more


def _input_layout(op: DpuOp) -> str:
    return op.onnx_layout or ("nhwc" if len(op.shape) == 3 else FLAT)


def dpu_graph(graph: DpuGraph, part: Partition) -> DpuGraph:
    """The DPU subgraph: an ``input`` op per cut tensor (named after it, its NHWC shape), then every DPU op."""
    if not part.has_pre and not part.has_post:
        return graph
    producers = _producers(graph)
    ops: list[DpuOp] = []
    for t in part.inputs:
        src = producers[t]
        ops.append(DpuOp(t, OpKind.INPUT, (), t, tuple(src.shape), onnx_layout=part.layouts[t][0]))
    ops += [op for op in graph.ops if op.kind != OpKind.INPUT and op.name not in part.pre and op.name not in part.post]
    if part.has_post:
        names = {t: t for t in part.outputs}
    else:
        names = dict(graph.output_names)
    return DpuGraph(ops, list(part.inputs), list(names.values()), names, {t: tuple(producers[t].shape) for t in part.inputs})


# --------------------------------------------------------------------------- the CPU stages as ONNX sub-graphs
def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    return m


def _to_nhwc(t: str, layout: str, shape: tuple[int, ...], out: str) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes taking ONNX tensor ``t`` (``layout``) to ``out`` in NHWC order ``(N, *shape)``: a Transpose putting its
    axes in NHWC order (when its values are not in that order already), then a Reshape."""
    target = numpy_helper.from_array(np.array([-1, *shape], np.int64), f"{out}/shape")
    nodes, src = [], t
    if not same_order(layout, shape):
        nodes.append(helper.make_node("Transpose", [t], [f"{out}/ordered"], name=f"{out}/transpose", perm=list(nhwc_perm(layout))))
        src = f"{out}/ordered"
    return [*nodes, helper.make_node("Reshape", [src, target.name], [out], name=f"{out}/reshape")], [target]


def _from_nhwc(inp: str, layout: str, shape: tuple[int, ...], t: str) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes taking ``inp`` in NHWC order ``(N, *shape)`` back to ONNX tensor ``t`` in ``layout`` (the inverse of
    :func:`_to_nhwc`: a Reshape, then the inverse Transpose when the orders differ)."""
    dims = onnx_dims(layout, shape)
    if same_order(layout, shape):
        s = numpy_helper.from_array(np.array([-1, *dims], np.int64), f"{t}/onnx_shape")
        return [helper.make_node("Reshape", [inp, s.name], [t], name=f"{t}/from_nhwc")], [s]
    perm = nhwc_perm(layout)
    s = numpy_helper.from_array(np.array([-1, *(dims[p - 1] for p in perm[1:])], np.int64), f"{t}/ordered_shape")
    inverse = [perm.index(i) for i in range(len(perm))]
    return [helper.make_node("Reshape", [inp, s.name], [f"{t}/ordered"], name=f"{t}/to_ordered"),
            helper.make_node("Transpose", [f"{t}/ordered"], [t], name=f"{t}/from_nhwc", perm=inverse)], [s]


def _value(name: str, shape: tuple[int, ...]) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", *shape])


def cpu_pre_model(onnx_model: onnx.ModelProto, part: Partition) -> onnx.ModelProto | None:
    """The CPU pre-processing stage: the model from its input to the cut tensors, each returned in NHWC order as
    ``<tensor>:nhwc`` (None without a pre stage)."""
    if not part.has_pre:
        return None
    m = _copy(onnx_model)
    g = m.graph
    del g.output[:]
    del g.value_info[:]
    for t in part.inputs:
        layout, shape = part.layouts[t]
        nodes, inits = _to_nhwc(t, layout, shape, t + NHWC_SUFFIX)
        g.node.extend(nodes)
        g.initializer.extend(inits)
        g.output.append(_value(t + NHWC_SUFFIX, shape))
    prune_dead(g)
    onnx.checker.check_model(m)
    return m


def cpu_post_model(onnx_model: onnx.ModelProto, graph: DpuGraph, part: Partition) -> onnx.ModelProto | None:
    """The CPU post-processing stage: inputs ``<tensor>:nhwc`` (the DPU's outputs, NHWC order), the post ops and the
    view-only ONNX nodes between them (tf2onnx's Squeeze / Transpose around a Conv1D, which have no IR op), the
    model's outputs (None without a post stage)."""
    if not part.has_post:
        return None
    nodes_of = {n for op in graph.ops if op.name in part.post for n in (op.onnx_nodes or (op.name,))}
    m = _copy(onnx_model)
    g = m.graph
    avail = {"", *part.outputs, *(t.name for t in g.initializer)}
    kept = []
    for n in g.node:  # every node computable from the DPU's outputs (prune_dead below keeps what the outputs need)
        if not any(o in part.outputs for o in n.output) and all(i in avail for i in n.input):
            kept.append(n)
            avail.update(n.output)
    missing = sorted((nodes_of & {n.name for n in g.node}) - {n.name for n in kept})
    if missing:
        raise InternalError(f"the CPU post stage cannot compute {missing[:3]} from the DPU's outputs {list(part.outputs)}",
                            "report this as a nilmc bug")
    del g.node[:]
    del g.input[:]
    del g.value_info[:]
    for t in part.outputs:
        layout, shape = part.layouts[t]
        nodes, inits = _from_nhwc(t + NHWC_SUFFIX, layout, shape, t)
        g.node.extend(nodes)
        g.initializer.extend(inits)
        g.input.append(_value(t + NHWC_SUFFIX, shape))
    g.node.extend(kept)
    prune_dead(g)
    onnx.checker.check_model(m)
    return m


# --------------------------------------------------------------------------- running the stages
class CpuStage:
    """An ONNX CPU stage on onnxruntime (FP32), ``batch`` windows per call (default 1024)."""

    def __init__(self, model: onnx.ModelProto | bytes, *, batch: int = 1024) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        data = model if isinstance(model, bytes) else model.SerializeToString()
        self.session = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.batch = batch

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = {k: np.asarray(feeds[k], np.float32) for k in self.inputs}
        n = len(next(iter(x.values())))
        parts = [self.session.run(None, {k: v[i:i + self.batch] for k, v in x.items()}) for i in range(0, max(n, 1), self.batch)]
        return {name: np.concatenate([p[j] for p in parts]) for j, name in enumerate(self.outputs)}


class Deployment:
    """The whole deployment on this machine: CPU pre stage (FP32, onnxruntime) -> DPU emulator -> CPU post stage."""

    def __init__(self, emulator: Any, pre: CpuStage | None = None, post: CpuStage | None = None) -> None:
        self.emulator, self.pre, self.post = emulator, pre, post

    def dpu_feeds(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """What the DPU subgraph reads: the pre stage's outputs (``<tensor>:nhwc`` -> ``<tensor>``) or ``feeds``."""
        if self.pre is None:
            return dict(feeds)
        return {k.removesuffix(NHWC_SUFFIX): v for k, v in self.pre.run(feeds).items()}

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self.emulator.infer(self.dpu_feeds(feeds))
        if self.post is None:
            return outs
        return self.post.run({k + NHWC_SUFFIX: v for k, v in outs.items()})


def stages(onnx_model: onnx.ModelProto, graph: DpuGraph, part: Partition) -> tuple[CpuStage | None, CpuStage | None]:
    """The two CPU stages of ``part`` ready to run (None where there is none)."""
    pre, post = cpu_pre_model(onnx_model, part), cpu_post_model(onnx_model, graph, part)
    return (None if pre is None else CpuStage(pre)), (None if post is None else CpuStage(post))


__all__ = ["CPU_LAYERS", "CPU_POST", "CPU_PRE", "CpuStage", "Deployment", "Partition", "cpu_post_model", "cpu_pre_model", "dpu_graph", "listing",
           "next_prefix", "plan_partition", "stages"]

"""Compute cost of an ONNX graph per prediction (one window): MACs, FLOPs, parameters, and seed 002's energy estimate.

Shapes are read by running the graph once on onnxruntime with batch 1 and every intermediate tensor exposed
(exact for any graph onnxruntime runs, including reshapes that static inference leaves open). Counted
multiply-accumulates per op, for one window:

* ``Conv``           output elements x (input channels / groups) x kernel size
* ``ConvTranspose``  input elements x (output channels / groups) x kernel size
* ``MatMul``/``Gemm`` output elements x the reduced dimension (dense layers and attention's Q.K^T, A.V alike)
* ``GRU``            sequence length x directions x 3 x hidden x (input + hidden) (the three gates' matrix products)
* ``LSTM``           the same with 4 gates

FLOPs = 2 x MACs (a multiply and an add), as the layer equations seed 002 uses ([36], [44]) count them;
element-wise ops, pooling, softmax and normalization are not counted (they are under 1 % here; say so when quoting).

Energy per prediction (seed 002, Section IV-A and Figure 5): the paper estimates energy from FLOPs on an
NVIDIA A100; its own numbers, 41.8 MJ for 10 M CtRNN predictions at 0.85 GFLOPs each (Table III), imply
``E = FLOPs x 4.92 nJ/FLOP`` (41.8e6 J / 1e7 / 0.85e9 FLOP). :data:`SEED002_J_PER_FLOP` is that coefficient;
the estimate is the paper's method applied to this model, not a measurement.
"""
from __future__ import annotations

from collections.abc import Collection
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

SEED002_J_PER_FLOP = 41.8e6 / 1e7 / 0.85e9  # 4.92e-9 J per FLOP, implied by seed 002 (Fig. 5 + Table III)


def tensor_shapes(graph: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape for one window (batch 1), by running the graph on onnxruntime."""
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(graph)
    known = {o.name for o in m.graph.output}
    for node in m.graph.node:
        for out in node.output:
            if out and out not in known:
                m.graph.output.add().name = out
                known.add(out)
    inits = {t.name for t in m.graph.initializer}
    feeds = {}
    for inp in m.graph.input:
        if inp.name in inits:
            continue
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in inp.type.tensor_type.shape.dim]
        feeds[inp.name] = np.zeros(dims, np.float32)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    outs = sess.run(names, feeds)
    shapes = {n: tuple(np.shape(v)) for n, v in zip(names, outs)}
    shapes.update({k: tuple(v.shape) for k, v in feeds.items()})
    shapes.update({t.name: tuple(t.dims) for t in m.graph.initializer})
    return shapes


def graph_cost(graph: onnx.ModelProto) -> dict[str, Any]:
    """``{"macs", "flops", "weights", "macs_by_op", "energy_j_per_prediction_seed002", "energy_formula"}`` for one window."""
    return _cost(graph)[0]


def _cost(graph: onnx.ModelProto) -> tuple[dict[str, Any], dict[str, int]]:
    """:func:`graph_cost` and the MACs of each node (by node name)."""
    shapes = tensor_shapes(graph)
    by_op: dict[str, int] = {}
    by_node: dict[str, int] = {}
    for i, node in enumerate(graph.graph.node):
        macs = node_macs(node, shapes)
        if macs:
            by_op[node.op_type] = by_op.get(node.op_type, 0) + macs
            name = node.name or f"{node.op_type}_{i}"  # an unnamed node as quantization.graph.node_names names it
            by_node[name] = by_node.get(name, 0) + macs
    macs = int(sum(by_op.values()))
    weights = int(sum(int(np.prod(t.dims)) for t in graph.graph.initializer if numpy_helper.to_array(t).dtype.kind == "f"))
    return {"macs": macs, "flops": 2 * macs, "weights": weights, "macs_by_op": dict(sorted(by_op.items())),
            "energy_j_per_prediction_seed002": 2 * macs * SEED002_J_PER_FLOP,
            "energy_formula": "E = FLOPs x 4.92 nJ/FLOP (seed 002: 41.8 MJ per 10 M predictions at 0.85 GFLOPs, NVIDIA A100); FLOPs = 2 x MACs"}, by_node


def node_macs(node: onnx.NodeProto, shapes: dict[str, tuple[int, ...]]) -> int:
    def shape(i: int, out: bool = False) -> tuple[int, ...]:
        names = node.output if out else node.input
        return shapes.get(names[i], ()) if i < len(names) and names[i] else ()

    groups = next((a.i for a in node.attribute if a.name == "group"), 1)
    if node.op_type == "Conv":
        w, y = shape(1), shape(0, True)
        return int(np.prod(y) * w[1] * np.prod(w[2:])) if w and y else 0
    if node.op_type == "ConvTranspose":
        w, x = shape(1), shape(0)
        return int(np.prod(x) * (w[1] * groups // max(groups, 1)) * np.prod(w[2:])) if w and x else 0
    if node.op_type in ("MatMul", "Gemm", "MatMulInteger"):
        a, y = shape(0), shape(0, True)
        trans_a = next((a_.i for a_ in node.attribute if a_.name == "transA"), 0)
        k = (a[-2] if trans_a else a[-1]) if a else 0
        return int(np.prod(y) * k) if y else 0
    if node.op_type in ("GRU", "LSTM", "RNN"):
        x, w, r = shape(0), shape(1), shape(2)
        if not (x and w and r):
            return 0
        seq = x[0] if next((a.i for a in node.attribute if a.name == "layout"), 0) == 0 else x[1]
        return int(seq * w[0] * w[1] * (w[2] + r[2]))  # w: [dirs, gates*H, I], r: [dirs, gates*H, H]
    return 0


def manifest_cost(graph: onnx.ModelProto, int8_layers: Collection[str] | None = None) -> dict[str, Any]:
    """The manifest's ``cost`` section: :func:`graph_cost` of the FP32 graph (the same operations run on every
    target, in its precision), or why it could not be counted (never a failed compile over a statistic).
    ``int8_layers`` (the node names a quantizing target runs in INT8) adds ``int8_macs`` and ``int8_macs_share``:
    an "int8" artifact whose precision fallbacks kept most layers float must not look like an INT8 model."""
    try:
        cost, by_node = _cost(graph)
    except Exception as exc:  # noqa: BLE001 - onnxruntime rejects some graphs the backends still take; say so
        return {"macs": None, "flops": None, "counted": False, "reason": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    if int8_layers is not None:
        cost["int8_macs"] = int(sum(by_node.get(n, 0) for n in set(int8_layers)))
        cost["int8_macs_share"] = round(cost["int8_macs"] / cost["macs"], 4) if cost["macs"] else None
    return {**cost, "energy_j_per_prediction_seed002": float(f"{cost['energy_j_per_prediction_seed002']:.6g}"), "counted": True,
            "counted_on": "the FP32 ONNX graph, one window (batch 1); element-wise ops, pooling, softmax and normalization not counted"}

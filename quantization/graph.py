"""Where a graph is quantized: fused layers, quantization points, shared parameters.

An integer target never materialises every float tensor of a tf2onnx graph. A
*layer* is a weighted op (Conv, MatMul, Gemm with a constant weight) fused with
a following constant bias ``Add`` and an activation (Relu, LeakyRelu, Clip):
its pre-bias and pre-activation tensors live only in the int32 accumulator.
The tensors that do exist as int8 are the *quantization points*: the graph
inputs, every layer's fused output, and the output of any other float op.
Data-movement ops (Transpose, Reshape, Flatten, Squeeze, Unsqueeze, Identity,
MaxPool) do not requantize: their outputs *share* the parameters of their input.

Pattern (what :func:`analyze` matches -> what it records)::

    x -> Conv(W[, b]) [-> Add(b)] [-> Relu]   =>  Layer(kind="conv",  weight axis 0 of OIHW)
    x -> MatMul(W)    [-> Add(b)] [-> Relu]   =>  Layer(kind="dense", weight axis 1 of [in, out])
    x -> Gemm(W, b)               [-> Relu]   =>  Layer(kind="dense", axis 0 if transB else 1)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from nilmc.compiler.errors import QuantizationError

PASSTHROUGH_OPS = frozenset({"Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "MaxPool"})
ACTIVATION_OPS = frozenset({"Relu", "LeakyRelu", "Clip"})
FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16})


@dataclass(frozen=True)
class Layer:
    """One fused weighted layer."""

    name: str  # name of the weighted node
    kind: str  # "conv" | "dense"
    op_type: str
    input: str
    weight: str  # constant name
    weight_axis: int  # output-channel axis of the weight as stored in ONNX
    bias: str | None  # constant name, or None
    bias_node: str | None  # the Add node holding the bias, when it is not an input of the weighted node
    output: str  # fused output (after bias and activation)
    activation: str | None
    internal: tuple[str, ...] = ()  # tensors living only in the accumulator


@dataclass
class QuantGraph:
    """Result of :func:`analyze`."""

    layers: list[Layer]
    quant_points: list[str]  # tensors with their own activation parameters, topological order
    shared: dict[str, str]  # passthrough output -> quant point it shares parameters with
    internal: set[str]
    inputs: list[str]
    outputs: list[str]
    constants: dict[str, np.ndarray] = field(repr=False)

    def root(self, tensor: str) -> str:
        """The quant point whose parameters ``tensor`` uses."""
        return self.shared.get(tensor, tensor)

    def layer_by_name(self, name: str) -> Layer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise QuantizationError(f"no layer named {name!r}", f"layers: {', '.join(l.name for l in self.layers)}")


def constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializers and ``Constant`` node values, by tensor name."""
    out = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    out[node.output[0]] = numpy_helper.to_array(attr.t)
    return out


def float_tensors(model: onnx.ModelProto) -> dict[str, int]:
    """Non-constant tensors whose (inferred) element type is floating point -> that ONNX element type."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # inference is best effort; fall back to declared types
        inferred = model
    g = inferred.graph
    consts = constants(model)
    out = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        elem = vi.type.tensor_type.elem_type
        if elem in FLOAT_TYPES and vi.name not in consts:
            out[vi.name] = elem
    return out


def node_names(model: onnx.ModelProto) -> None:
    """Give every unnamed node a stable name (``<op>_<index>``), in place."""
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"


_Consumers = dict[str, list[onnx.NodeProto]]


def _consumers(model: onnx.ModelProto) -> _Consumers:
    out: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def _weight_axis(node: onnx.NodeProto, w: np.ndarray) -> int | None:
    if node.op_type == "Conv":
        return 0
    if w.ndim != 2:
        return None
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return 1


def _bias_add(
    tensor: str, channels: int, from_end: int, cons: _Consumers, consts: dict[str, np.ndarray], outputs: set[str]
) -> onnx.NodeProto | None:
    """The constant ``Add`` after ``tensor`` when it is a per-output-channel bias.

    ``from_end`` is where the channel axis sits counted from the end of the output
    (3 for NCHW Conv, 1 for Dense), so a ``(C,)`` constant after an NCHW Conv, which would
    broadcast over the width, is not mistaken for a bias.
    """
    users = cons.get(tensor, [])
    if len(users) != 1 or tensor in outputs or users[0].op_type != "Add":
        return None
    other = [n for n in users[0].input if n != tensor]
    if len(other) != 1 or other[0] not in consts:
        return None
    shape = consts[other[0]].shape
    if int(np.prod(shape)) != channels:
        return None
    if channels == 1:
        return users[0]
    return users[0] if len(shape) >= from_end and shape[-from_end] == channels else None


def _activation(tensor: str, cons: _Consumers, outputs: set[str]) -> onnx.NodeProto | None:
    users = cons.get(tensor, [])
    if len(users) == 1 and tensor not in outputs and users[0].op_type in ACTIVATION_OPS:
        return users[0]
    return None


def _match_layer(node: onnx.NodeProto, cons: _Consumers, consts: dict[str, np.ndarray], outputs: set[str]) -> Layer | None:
    if node.op_type not in ("Conv", "MatMul", "Gemm") or len(node.input) < 2 or node.input[1] not in consts:
        return None
    w = consts[node.input[1]]
    axis = _weight_axis(node, w)
    if axis is None:
        return None
    bias = node.input[2] if len(node.input) > 2 and node.input[2] in consts else None
    out, internal, bias_node = node.output[0], [], None
    from_end = 3 if node.op_type == "Conv" else 1
    add = None if bias else _bias_add(out, w.shape[axis], from_end, cons, consts, outputs)
    if add is not None:
        bias = next(n for n in add.input if n != out)
        bias_node, internal, out = add.name, [out], add.output[0]
    act = _activation(out, cons, outputs)
    if act is not None:
        internal.append(out)
        out = act.output[0]
    kind = "conv" if node.op_type == "Conv" else "dense"
    return Layer(node.name, kind, node.op_type, node.input[0], node.input[1], axis, bias, bias_node, out,
                 act.op_type if act is not None else None, tuple(internal))


def analyze(model: onnx.ModelProto) -> QuantGraph:
    """Find layers, quantization points and shared tensors of ``model`` (nodes are named in place if unnamed)."""
    node_names(model)
    consts = constants(model)
    cons = _consumers(model)
    floats = float_tensors(model)
    outputs = {o.name for o in model.graph.output}
    inputs = [i.name for i in model.graph.input if i.name not in consts]
    layers: list[Layer] = []
    fused: dict[str, Layer] = {}  # node name -> layer it belongs to
    points = [i for i in inputs if i in floats]
    shared: dict[str, str] = {}
    internal: set[str] = set()
    for node in model.graph.node:
        if node.name in fused or node.op_type == "Constant":
            continue
        layer = _match_layer(node, cons, consts, outputs)
        if layer is not None:
            layers.append(layer)
            internal.update(layer.internal)
            for n in [node.name, layer.bias_node] + [c.name for t in layer.internal for c in cons.get(t, [])]:
                if n:
                    fused[n] = layer
            points.append(layer.output)
            continue
        _classify_plain(node, floats, cons, outputs, shared, internal, points)
    return QuantGraph(layers, points, shared, internal, inputs, [o.name for o in model.graph.output], consts)


def _classify_plain(
    node: onnx.NodeProto, floats: dict[str, int], cons: _Consumers, outputs: set[str],
    shared: dict[str, str], internal: set[str], points: list[str],
) -> None:
    """A node outside any layer: passthrough (shares its input's parameters), fused into a following
    activation, or a quantization point of its own. Further float outputs that something reads (an LSTM/GRU's
    ``Y_h``/``Y_c``, what a PyTorch export's head reads) are points of their own."""
    for extra in node.output[1:]:
        if extra in floats and (extra in outputs or cons.get(extra)) and node.op_type not in PASSTHROUGH_OPS:
            points.append(extra)
    out = node.output[0] if node.output else ""
    if out not in floats:
        return
    src = node.input[0] if node.input else ""
    if node.op_type in PASSTHROUGH_OPS and src in floats and src not in internal:
        shared[out] = shared.get(src, src)
        return
    if _activation(out, cons, outputs) is not None:
        internal.add(out)  # fused into the activation that follows; that one is the point
        return
    points.append(out)


def input_layers(model: onnx.ModelProto, g: QuantGraph) -> list[Layer] | None:
    """The weighted layers that read the graph input (through passthrough ops), or None when any other
    op reads it too (then keeping these layers float would not leave the whole input float)."""
    found = input_readers(model, g)
    if found is None or found[1]:
        return None
    return found[0] or None


def input_readers(model: onnx.ModelProto, g: QuantGraph) -> tuple[list[Layer], list[onnx.NodeProto], list[str]] | None:
    """Who reads the graph input (through passthrough ops): ``(weighted layers reading it as their input, every other
    op reading it, the tensors sharing the input's parameters)``; None for a graph of several inputs."""
    if len(g.inputs) != 1:
        return None
    root = g.root(g.inputs[0])
    family = {root} | {t for t, r in g.shared.items() if r == root}
    weighted = {layer.name: layer for layer in g.layers}
    layers: list[Layer] = []
    others: list[onnx.NodeProto] = []
    for node in model.graph.node:
        if not family.intersection(node.input):
            continue
        if node.name in weighted and weighted[node.name].input in family:
            layers.append(weighted[node.name])
        elif not (node.op_type in PASSTHROUGH_OPS and node.output and node.output[0] in family):
            others.append(node)
    return layers, others, sorted(family)


def prune_dead(graph: onnx.GraphProto) -> None:
    """Drop, in place, the nodes and initializers no graph output depends on any more."""
    needed = {o.name for o in graph.output}
    keep: list[onnx.NodeProto] = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(node.input)
    keep.reverse()
    del graph.node[:]
    graph.node.extend(keep)
    inits = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)

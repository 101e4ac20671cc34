"""The DPU view of a model: NHWC ops in topological order, layouts resolved.

nilmc's canonical ONNX comes from tf2onnx, so a Keras ``Conv2D`` appears as an
NCHW ``Conv`` between ``Transpose`` / ``Reshape`` nodes. XIR (and the DPU) is NHWC.
:func:`from_onnx` walks the ONNX graph once and records, per ONNX tensor, which
NHWC tensor it views and in which layout, so that layout-only nodes disappear:

* ``Transpose(perm=[0,3,1,2])`` / ``[0,2,3,1]`` and a ``Reshape`` that only moves a
  size-1 axis switch the *view* (NHWC <-> NCHW) of the same tensor;
* a rank-3 ``(N, C, W)`` graph input read by a 1-D ``Conv`` (a PyTorch Conv1d export) is an NCW view of the
  NHWC tensor ``(N, 1, W, C)``; 1-D convs become ``conv2d`` ops with a ``1 x k`` kernel;
* ``Conv``/``MatMul``/``Gemm`` fused with bias ``Add`` and ``Relu``/``LeakyRelu``
  (the layers of :func:`nilmc.quantization.graph.analyze`) become ``conv2d`` /
  ``dense`` ops with OHWI / ``[in, out]`` float weights;
* ``Reshape``/``Flatten`` to rank 2 of an NHWC tensor becomes ``flatten`` (NHWC order,
  as Keras flattens);
* ``MaxPool``, ``AveragePool``, ``GlobalAveragePool``, a two-input ``Add`` (eltwise,
  optionally with a fused ``Relu``), and a standalone ``Relu``/``LeakyRelu``;
* anything else becomes an ``unsupported`` op with the ONNX op type and the reason;
  the inspector places it on the CPU and the emulator refuses to run it.

Every IR tensor is named after the ONNX tensor whose quantization parameters it
uses (``QuantParams[name]``), so the IR, the parameters, the emulator and the xmodel
agree on names without a mapping table.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper

from nilmc.backends.dpu.ops import OPS, OpKind
from nilmc.quantization.graph import Layer, analyze

NHWC, NCHW, FLAT = "nhwc", "nchw", "flat"
NCW = "ncw"  # an ONNX (N, C, W) tensor (a PyTorch Conv1d's) viewing the NHWC tensor (N, 1, W, C)
KINDS = tuple(OpKind)


@dataclass
class DpuOp:
    """One op of the DPU graph (NHWC).

    ``inputs`` / ``output`` are IR tensor names; ``shape`` is the output shape
    without the batch axis (``(H, W, C)`` or ``(features,)``). Conv weights are
    OHWI float32, dense weights ``[in, out]``; ``attrs`` holds kernel, stride,
    pads ``(top, left, bottom, right)``, dilation, pooling kernel, LeakyReLU slope.
    """

    name: str
    kind: str
    inputs: tuple[str, ...]
    output: str
    shape: tuple[int, ...]
    attrs: dict[str, Any] = field(default_factory=dict)
    weight: np.ndarray | None = field(default=None, repr=False)
    bias: np.ndarray | None = field(default=None, repr=False)
    activation: str | None = None  # "relu" | "leaky_relu" | None
    weight_name: str | None = None  # ONNX constant names (for parameters)
    bias_name: str | None = None
    onnx_nodes: tuple[str, ...] = ()
    reason: str = ""  # for "unsupported"
    onnx_layout: str = ""  # layout of the ONNX tensor ``output`` names (NHWC / NCHW / flat): how to read its FP32 value

    def __post_init__(self) -> None:
        self.kind = OpKind(self.kind)

    @property
    def weighted(self) -> bool:
        return OPS[self.kind].weighted


@dataclass
class DpuGraph:
    ops: list[DpuOp]
    inputs: list[str]
    outputs: list[str]  # IR tensor names of the graph outputs
    output_names: dict[str, str]  # ONNX graph output name -> IR tensor
    input_shapes: dict[str, tuple[int, ...]]

    def op(self, name: str) -> DpuOp:
        for o in self.ops:
            if o.name == name:
                return o
        raise KeyError(name)

    def producer(self, tensor: str) -> DpuOp:
        for o in self.ops:
            if o.output == tensor:
                return o
        raise KeyError(tensor)

    @property
    def unsupported(self) -> list[DpuOp]:
        return [o for o in self.ops if o.kind == OpKind.UNSUPPORTED]


@dataclass
class _View:
    tensor: str  # IR tensor
    layout: str  # NHWC / NCHW / FLAT / "" (unknown, after an unsupported op)
    shape: tuple[int, ...]  # NHWC shape (or flat / unknown) without batch


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _static_shape(vi: onnx.ValueInfoProto) -> tuple[int, ...]:
    dims = vi.type.tensor_type.shape.dim
    return tuple(int(d.dim_value) if d.HasField("dim_value") else -1 for d in dims)


def _shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # inference is best effort
        inferred = model
    g = inferred.graph
    return {vi.name: _static_shape(vi) for vi in list(g.input) + list(g.value_info) + list(g.output)}


def _conv_out(size: int, k: int, s: int, d: int, p0: int, p1: int) -> int:
    return (size + p0 + p1 - ((k - 1) * d + 1)) // s + 1


class _Builder:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.qg = analyze(model)
        self.consts = self.qg.constants
        self.shapes = _shapes(model)
        self.views: dict[str, _View] = {}
        self.ops: list[DpuOp] = []
        self.layer_of = {l.name: l for l in self.qg.layers}
        self.fused: set[str] = set()
        for l in self.qg.layers:
            self.fused.update(n for n in (l.bias_node,) if n)
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in model.graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)

    # ------------------------------------------------------------------ helpers
    def view(self, name: str) -> _View:
        try:
            return self.views[name]
        except KeyError:
            return _View(name, "", ())

    def add(self, op: DpuOp, layout: str, onnx_out: str | None = None) -> None:
        op.onnx_layout = layout
        self.ops.append(op)
        self.views[onnx_out or op.output] = _View(op.output, layout, op.shape)

    def unsupported(self, node: onnx.NodeProto, reason: str) -> None:
        ins = tuple(self.view(i).tensor for i in node.input if i and i not in self.consts)
        for out in node.output:
            shape = tuple(d for d in self.shapes.get(out, ())[1:])
            # a rank-2 result is a flat feature vector whatever ran before: a dense op after it can be a DPU op again
            layout = FLAT if len(shape) == 1 and shape[0] > 0 else ""
            self.add(DpuOp(node.name, OpKind.UNSUPPORTED, ins, out, shape, {"op_type": node.op_type}, onnx_nodes=(node.name,),
                           reason=reason), layout)

    # ------------------------------------------------------------------ entry
    def build(self) -> DpuGraph:
        inputs = []
        for inp in self.model.graph.input:
            if inp.name in self.consts:
                continue
            shape = _static_shape(inp)[1:]
            layout = NHWC if len(shape) == 3 else FLAT
            if len(shape) == 2 and self._read_by_conv1d(inp.name):
                shape, layout = (1, shape[1], shape[0]), NCW
            self.add(DpuOp(inp.name, OpKind.INPUT, (), inp.name, shape, onnx_nodes=()), layout)
            inputs.append(inp.name)
        for node in self.model.graph.node:
            if node.op_type == "Constant" or node.name in self.fused:
                continue
            if node.name in self.layer_of:
                self.layer(self.layer_of[node.name])
                continue
            self.plain(node)
        outputs = {o.name: self.view(o.name).tensor for o in self.model.graph.output}
        return DpuGraph(self.ops, inputs, list(outputs.values()), outputs, {i: self.view(i).shape for i in inputs})

    def _read_by_conv1d(self, name: str) -> bool:
        return any(n.op_type == "Conv" and n.input[0] == name and len(self.consts.get(n.input[1], np.zeros((0, 0, 0, 0))).shape) == 3
                   for n in self.consumers.get(name, []))

    # ------------------------------------------------------------------ layers
    def _skip_activation_nodes(self, layer: Layer) -> None:
        for t in layer.internal:
            for c in self.consumers.get(t, []):
                self.fused.add(c.name)

    def layer(self, layer: Layer) -> None:
        self._skip_activation_nodes(layer)
        node = next(n for n in self.model.graph.node if n.name == layer.name)
        act, alpha = self._activation(layer)
        if layer.kind == "conv":
            self.conv(node, layer, act, alpha)
        else:
            self.dense(node, layer, act, alpha)

    def _activation(self, layer: Layer) -> tuple[str | None, float]:
        if layer.activation is None:
            return None, 0.0
        if layer.activation == "Relu":
            return "relu", 0.0
        if layer.activation == "LeakyRelu":
            node = next(n for n in self.model.graph.node if layer.output in n.output)
            return "leaky_relu", float(_attrs(node).get("alpha", 0.01))
        return "clip", 0.0

    def conv(self, node: onnx.NodeProto, layer: Layer, act: str | None, alpha: float) -> None:
        src = self.view(layer.input)
        a = _attrs(node)
        w = np.asarray(self.consts[layer.weight], np.float32)  # OIHW (OIW for a 1-D conv)
        group = int(a.get("group", 1))
        reason = ""
        if w.ndim == 3 and src.layout == NCW:  # Conv1d over (N, C, W): a 1 x k conv2d over (N, 1, W, C)
            w, a = w[:, :, None, :], _as_2d(a)
        if src.layout not in (NCHW, NCW) or len(src.shape) != 3 or w.ndim != 4:
            reason = f"Conv input {layer.input!r} is not an NCHW view of an NHWC tensor (layout {src.layout or 'unknown'})"
        elif group != 1:
            reason = f"grouped/depthwise convolution (group={group}) is not handled by nilmc's DPU lowering"
        elif act == "clip":
            reason = "Clip activation (ReLU6) is not handled by nilmc's DPU lowering"
        if reason:
            self.unsupported(node, reason)
            self.views[layer.output] = self.views[node.output[0]]
            return
        kh, kw = (int(v) for v in a.get("kernel_shape", w.shape[2:]))
        sh, sw = (int(v) for v in a.get("strides", (1, 1)))
        dh, dw = (int(v) for v in a.get("dilations", (1, 1)))
        pads = tuple(int(v) for v in a.get("pads", (0, 0, 0, 0)))  # (top, left, bottom, right)
        if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            self.unsupported(node, f"auto_pad={a['auto_pad']!r} is not handled; export with explicit pads")
            self.views[layer.output] = self.views[node.output[0]]
            return
        h, wd, _ = src.shape
        oh, ow = _conv_out(h, kh, sh, dh, pads[0], pads[2]), _conv_out(wd, kw, sw, dw, pads[1], pads[3])
        bias = None if layer.bias is None else np.asarray(self.consts[layer.bias], np.float32).reshape(-1)
        attrs = {"kernel": (kh, kw), "stride": (sh, sw), "dilation": (dh, dw), "pads": pads, "alpha": alpha,
                 "in_channels": int(w.shape[1]), "out_channels": int(w.shape[0])}
        op = DpuOp(layer.name, OpKind.CONV2D, (src.tensor,), layer.output, (oh, ow, int(w.shape[0])), attrs,
                   np.ascontiguousarray(w.transpose(0, 2, 3, 1)), bias, act, layer.weight, layer.bias,
                   tuple(n for n in (layer.name, layer.bias_node) if n))
        self.add(op, src.layout)

    def dense(self, node: onnx.NodeProto, layer: Layer, act: str | None, alpha: float) -> None:
        src = self.view(layer.input)
        w = np.asarray(self.consts[layer.weight], np.float32)
        if layer.weight_axis == 0:  # Gemm transB: [out, in]
            w = w.T
        if node.op_type == "Gemm":
            a = _attrs(node)
            if a.get("transA", 0) or float(a.get("alpha", 1.0)) != 1.0 or float(a.get("beta", 1.0)) != 1.0:
                self.unsupported(node, "Gemm with transA or alpha/beta != 1 is not handled by nilmc's DPU lowering")
                self.views[layer.output] = self.views[node.output[0]]
                return
        if src.layout != FLAT or len(src.shape) != 1 or act == "clip":
            why = "Clip activation (ReLU6) is not handled" if act == "clip" else f"dense input {layer.input!r} is not a flat (N, features) tensor"
            self.unsupported(node, why)
            self.views[layer.output] = self.views[node.output[0]]
            return
        bias = None if layer.bias is None else np.asarray(self.consts[layer.bias], np.float32).reshape(-1)
        attrs = {"in_features": int(w.shape[0]), "out_features": int(w.shape[1]), "alpha": alpha}
        op = DpuOp(layer.name, OpKind.DENSE, (src.tensor,), layer.output, (int(w.shape[1]),), attrs, np.ascontiguousarray(w), bias,
                   act, layer.weight, layer.bias, tuple(n for n in (layer.name, layer.bias_node) if n))
        self.add(op, FLAT)

    # ------------------------------------------------------------------ plain nodes
    def plain(self, node: onnx.NodeProto) -> None:
        handler = {
            "Transpose": self.transpose, "Reshape": self.reshape, "Flatten": self.flatten, "Identity": self.identity,
            "MaxPool": self.pool, "AveragePool": self.pool, "GlobalAveragePool": self.pool,
            "Add": self.eltwise, "Relu": self.activation, "LeakyRelu": self.activation,
        }.get(node.op_type)
        if handler is None:
            self.unsupported(node, f"{node.op_type} is not a DPUCZDX8G operator (it runs on the CPU after vai_c_xir partitions the graph)")
            return
        handler(node)

    def identity(self, node: onnx.NodeProto) -> None:
        self.views[node.output[0]] = self.view(node.input[0])

    def transpose(self, node: onnx.NodeProto) -> None:
        src = self.view(node.input[0])
        perm = tuple(int(p) for p in _attrs(node).get("perm", ()))
        if src.layout == NHWC and perm == (0, 3, 1, 2):
            self.views[node.output[0]] = _View(src.tensor, NCHW, src.shape)
        elif src.layout == NCHW and perm == (0, 2, 3, 1):
            self.views[node.output[0]] = _View(src.tensor, NHWC, src.shape)
        else:
            self.unsupported(node, f"Transpose perm={list(perm)} of a {src.layout or 'unknown'} tensor is not a layout change nilmc folds")

    def _target_shape(self, node: onnx.NodeProto) -> tuple[int, ...] | None:
        if len(node.input) > 1 and node.input[1] in self.consts:
            return tuple(int(v) for v in np.asarray(self.consts[node.input[1]]).ravel())
        shape = self.shapes.get(node.output[0])
        return shape if shape and all(d >= 0 for d in shape[1:]) else None

    def reshape(self, node: onnx.NodeProto) -> None:
        src = self.view(node.input[0])
        target = self._target_shape(node)
        if target is None:
            self.unsupported(node, "Reshape with a run-time shape is not handled")
            return
        rest = tuple(target[1:])
        if src.layout == NHWC and len(src.shape) == 3:
            h, w, c = src.shape
            if c == 1 and rest == (1, h, w):  # tf2onnx writes NHWC->NCHW as a Reshape when C == 1
                self.views[node.output[0]] = _View(src.tensor, NCHW, src.shape)
                return
            if len(rest) == 1 and rest[0] in (-1, h * w * c):
                self._flatten(node, src)
                return
        if src.layout == NCHW and len(src.shape) == 3:
            h, w, c = src.shape
            if c == 1 and rest == (h, w, 1):
                self.views[node.output[0]] = _View(src.tensor, NHWC, src.shape)
                return
            if len(rest) == 1 and (c == 1 or h * w == 1):  # NCHW and NHWC orders agree
                self._flatten(node, src)
                return
        if src.layout == FLAT and len(rest) == 1:
            self.views[node.output[0]] = src
            return
        self.unsupported(node, f"Reshape of a {src.layout or 'unknown'} tensor {src.shape} to {list(target)} changes the data order")

    def flatten(self, node: onnx.NodeProto) -> None:
        src = self.view(node.input[0])
        if int(_attrs(node).get("axis", 1)) == 1 and src.layout == NHWC:
            self._flatten(node, src)
        else:
            self.unsupported(node, f"Flatten of a {src.layout or 'unknown'} tensor is not handled (needs NHWC, axis 1)")

    def _flatten(self, node: onnx.NodeProto, src: _View) -> None:
        size = int(np.prod(src.shape))
        self.add(DpuOp(node.name, OpKind.FLATTEN, (src.tensor,), node.output[0], (size,), onnx_nodes=(node.name,)), FLAT)

    def pool(self, node: onnx.NodeProto) -> None:
        src = self.view(node.input[0])
        if src.layout != NCHW or len(src.shape) != 3:
            self.unsupported(node, f"{node.op_type} input is not an NCHW view of an NHWC tensor")
            return
        a = _attrs(node)
        h, w, c = src.shape
        if node.op_type == "GlobalAveragePool":
            kh, kw, sh, sw, pads = h, w, 1, 1, (0, 0, 0, 0)
        else:
            kh, kw = (int(v) for v in a["kernel_shape"])
            sh, sw = (int(v) for v in a.get("strides", (1, 1)))
            pads = tuple(int(v) for v in a.get("pads", (0, 0, 0, 0)))
        if node.op_type == "AveragePool" and any(pads) and not int(a.get("count_include_pad", 0)):
            self.unsupported(node, "AveragePool with padding excluded from the count is not a DPU average pool")
            return
        if int(a.get("ceil_mode", 0)):
            self.unsupported(node, "ceil_mode pooling is not handled by nilmc's DPU lowering")
            return
        kind = OpKind.MAXPOOL if node.op_type == "MaxPool" else OpKind.AVGPOOL
        shape = (_conv_out(h, kh, sh, 1, pads[0], pads[2]), _conv_out(w, kw, sw, 1, pads[1], pads[3]), c)
        self.add(DpuOp(node.name, kind, (src.tensor,), node.output[0], shape,
                       {"kernel": (kh, kw), "stride": (sh, sw), "pads": pads}, onnx_nodes=(node.name,)), NCHW)

    def eltwise(self, node: onnx.NodeProto) -> None:
        ins = [i for i in node.input]
        if any(i in self.consts for i in ins) or len(ins) != 2:
            self.unsupported(node, "Add with a constant (not a fused bias) is not handled by nilmc's DPU lowering")
            return
        a, b = self.view(ins[0]), self.view(ins[1])
        if a.layout != b.layout or a.shape != b.shape or not a.layout:
            self.unsupported(node, f"Add of tensors with different layouts/shapes ({a.layout}{a.shape}, {b.layout}{b.shape}) needs broadcasting")
            return
        out, act, nodes = node.output[0], None, [node.name]
        users = self.consumers.get(out, [])
        if out in self.qg.internal and len(users) == 1 and users[0].op_type == "Relu":
            out, act = users[0].output[0], "relu"
            nodes.append(users[0].name)
            self.fused.add(users[0].name)
        self.add(DpuOp(node.name, OpKind.ADD, (a.tensor, b.tensor), out, a.shape, {}, activation=act, onnx_nodes=tuple(nodes)), a.layout)

    def activation(self, node: onnx.NodeProto) -> None:
        src = self.view(node.input[0])
        if node.input[0] in self.qg.internal:
            # the input is an internal tensor of a fused op we did not fuse (e.g. an Add feeding LeakyRelu)
            self.unsupported(node, f"{node.op_type} after an op nilmc could not fuse it into")
            return
        kind = OpKind.RELU if node.op_type == "Relu" else OpKind.LEAKY_RELU
        alpha = float(_attrs(node).get("alpha", 0.01)) if kind == OpKind.LEAKY_RELU else 0.0
        self.add(DpuOp(node.name, kind, (src.tensor,), node.output[0], src.shape, {"alpha": alpha}, onnx_nodes=(node.name,)),
                 src.layout)


def _as_2d(a: dict[str, Any]) -> dict[str, Any]:
    """1-D Conv attributes as those of the equivalent 1 x k 2-D conv."""
    out = dict(a)
    if "kernel_shape" in a:
        out["kernel_shape"] = (1, int(a["kernel_shape"][0]))
    out["strides"] = (1, int(a.get("strides", (1,))[0]))
    out["dilations"] = (1, int(a.get("dilations", (1,))[0]))
    p = tuple(int(v) for v in a.get("pads", (0, 0)))
    out["pads"] = (0, p[0], 0, p[1])
    return out


def from_onnx(model: onnx.ModelProto) -> DpuGraph:
    """The DPU graph of ``model`` (a copy is analysed; unnamed nodes get the names :func:`analyze` gives them)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    return _Builder(m).build()

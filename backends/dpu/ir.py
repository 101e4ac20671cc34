"""The DPU view of a model: NHWC ops in topological order, layouts resolved.

nilmc's canonical ONNX comes from tf2onnx, so a Keras ``Conv2D`` appears as an
NCHW ``Conv`` between ``Transpose`` / ``Reshape`` nodes. XIR (and the DPU) is NHWC.
:func:`from_onnx` walks the ONNX graph once and records, per ONNX tensor, which
NHWC tensor it views and in which layout, so that layout-only nodes disappear:

* ``Transpose(perm=[0,3,1,2])`` / ``[0,2,3,1]`` and a ``Reshape`` that only moves a
  size-1 axis switch the *view* (NHWC <-> NCHW) of the same tensor;
* a rank-3 ``(N, C, W)`` graph input read by a 1-D ``Conv`` (a PyTorch Conv1d export) is an NCW view of the
  NHWC tensor ``(N, 1, W, C)``; 1-D convs become ``conv2d`` ops with a ``1 x k`` kernel;
* a Keras ``Conv1D`` / ``AveragePooling1D`` as tf2onnx writes it (``Unsqueeze``/``ExpandDims`` -> 2-D ``Conv`` or
  ``AveragePool`` with a 1-sized axis -> ``Squeeze``, Transposes between NWC and NCW/NCHW): every such view is a
  *layout* (below), so ``Squeeze``/``Unsqueeze``, a ``Reshape`` that only adds or drops 1-sized axes and any
  ``Transpose`` that keeps the batch axis first only change the view; a conv or pool whose two spatial ONNX axes
  are the NHWC tensor's (W, H) is the same conv2d with kernel, stride, dilation and pads swapped. A rank-3
  ``(N, W, C)`` graph input is an NWC view of ``(N, 1, W, C)``, and a ``(N, L, 1, 1)`` one (a sequence declared
  as an image) is read as ``(N, 1, L, 1)``: 1-D data is NHWC with H = 1; so is a rank-2 ``(N, T)`` input that every
  reader gives more axes (``Unsqueeze``, a ``Reshape`` to rank > 2: PyTorch's ``x.unsqueeze(1)`` before a Conv1d), an
  ``nw`` view of ``(N, 1, T, 1)`` (one read by a dense layer stays a flat feature vector);
* ``Conv``/``MatMul``/``Gemm`` fused with bias ``Add`` and ``Relu``/``LeakyRelu``
  (the layers of :func:`nilmc.quantization.graph.analyze`) become ``conv2d`` /
  ``dense`` ops with OHWI / ``[in, out]`` float weights;
* ``Reshape``/``Flatten`` to rank 2 of an NHWC tensor becomes ``flatten`` (NHWC order,
  as Keras flattens);
* ``MaxPool``, ``AveragePool``, ``GlobalAveragePool``, a two-input ``Add`` (eltwise,
  optionally with a fused ``Relu``), and a standalone ``Relu``/``LeakyRelu``;
* anything else becomes an ``unsupported`` op with the ONNX op type and the reason;
  the inspector places it on the CPU and the emulator refuses to run it.

A **layout** names, per ONNX axis after the batch, which NHWC axis it holds: ``"n"`` then one of ``h``/``w``/``c``
per axis, or ``1`` for an axis of size 1 (``"nchw"``, ``"ncw"``, ``"nwc"``, ``"nc1w"`` ...); an NHWC axis of size 1
may be missing or named. The ONNX tensor is then a transpose of the NHWC data with 1-sized axes added or
dropped (:func:`to_nhwc`, :func:`nhwc_perm`); ``"flat"`` is a rank-2 ``(N, features)`` tensor.

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
ELEMENTWISE_CONST_OPS = frozenset({"Mul", "Add", "Sub", "Div"})  # with constant operands: no DPU op, the layout kept
NWC = "nwc"  # an ONNX (N, W, C) tensor (a Keras Conv1D's) viewing the NHWC tensor (N, 1, W, C)
KINDS = tuple(OpKind)
_AXIS = {"h": 0, "w": 1, "c": 2}  # NHWC axis (without the batch) of each layout letter


# --------------------------------------------------------------------------- layouts (module docstring)
def _labels(layout: str) -> str:
    return layout[1:] if layout.startswith("n") and layout != FLAT else ""


def _unit(label: str, shape: tuple[int, ...]) -> bool:
    return label == "1" or shape[_AXIS[label]] == 1


def valid_layout(layout: str, shape: tuple[int, ...]) -> bool:
    """Whether ``layout`` names an ONNX view of the NHWC tensor of ``shape`` ((H, W, C), or (features,) for flat)."""
    if layout == FLAT:
        return len(shape) == 1 and shape[0] > 0
    if not layout.startswith("n") or len(shape) != 3 or any(d < 1 for d in shape):
        return False
    named = [a for a in layout[1:] if a != "1"]
    if any(a not in _AXIS for a in named) or len(set(named)) != len(named):
        return False
    return all(a in named for a, d in zip("hwc", shape) if d > 1)


def onnx_dims(layout: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The ONNX tensor's dimensions after the batch axis."""
    if layout == FLAT:
        return tuple(shape)
    return tuple(1 if a == "1" else shape[_AXIS[a]] for a in _labels(layout))


def nhwc_perm(layout: str) -> tuple[int, ...]:
    """ONNX axes (batch first) in NHWC order: the named axes by h, w, c, then the 1-sized ones (a Transpose perm)."""
    axes = _labels(layout)
    order = sorted(range(len(axes)), key=lambda i: (_AXIS.get(axes[i], 3), i))
    return (0, *(i + 1 for i in order))


def same_order(layout: str, shape: tuple[int, ...]) -> bool:
    """Whether the ONNX tensor holds its values in NHWC order (a Reshape alone converts it)."""
    if layout == FLAT:
        return True
    named = [a for a in _labels(layout) if not _unit(a, shape)]
    return named == sorted(named, key=_AXIS.__getitem__)


def to_nhwc(value: np.ndarray, layout: str, shape: tuple[int, ...]) -> np.ndarray:
    """An ONNX tensor of ``layout`` as the NHWC array ``(N, *shape)`` (unknown layouts are reshaped as they are)."""
    v = np.asarray(value)
    if layout and layout != FLAT and v.ndim == len(layout):
        v = v.transpose(nhwc_perm(layout))
    return v.reshape(len(v), *shape)


def _canon(layout: str, shape: tuple[int, ...]) -> str:
    """``layout`` with every 1-sized axis written ``1`` (two views of one tensor agree iff these agree)."""
    if layout in ("", FLAT) or len(shape) != 3:
        return layout
    return "n" + "".join("1" if _unit(a, shape) else a for a in _labels(layout))


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
    layout: str  # a layout (module docstring): "nhwc", "nchw", "ncw", "nwc", ..., FLAT, or "" (unknown, after an unsupported op)
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

    def unsupported(self, node: onnx.NodeProto, reason: str, layer: Layer | None = None) -> None:
        """A CPU op for ``node``; for a weighted ``layer`` that cannot be a DPU op, one op for the whole fused layer
        (node, bias Add, activation), whose output is the layer's: its quantization point (a bias Add's output, e.g. a
        Keras Dense's MatMul + BiasAdd) is then the CPU stage's tensor, not an alias of the MatMul's."""
        ins = tuple(self.view(i).tensor for i in node.input if i and i not in self.consts)
        kept = self._elementwise_view(node) if layer is None else None
        for out in (node.output if layer is None else [layer.output]):
            shape = tuple(d for d in self.shapes.get(out, ())[1:])
            # a rank-2 result is a flat feature vector whatever ran before: a dense op after it can be a DPU op again
            layout = FLAT if len(shape) == 1 and shape[0] > 0 else ""
            if kept is not None:  # x * c, x + c, ... keeps x's layout: the ops after it can be DPU ops again
                shape, layout = kept.shape, kept.layout
            self.add(DpuOp(node.name, OpKind.UNSUPPORTED, ins, out, shape, {"op_type": node.op_type}, onnx_nodes=(node.name,),
                           reason=reason), layout)

    def _elementwise_view(self, node: onnx.NodeProto) -> _View | None:
        """The view of the one data input of an element-wise op with constant operands (Mul/Add/Sub/Div: a Keras
        BatchNormalization after an activation, written as a per-channel Mul and Add) when its output has that input's
        shape: the values stay in that layout. None otherwise."""
        if node.op_type not in ELEMENTWISE_CONST_OPS or len(node.output) != 1:
            return None
        data = [i for i in node.input if i and i not in self.consts]
        if len(data) != 1:
            return None
        src = self.view(data[0])
        out = tuple(self.shapes.get(node.output[0], ())[1:])
        if not _labelled(src) or out != onnx_dims(src.layout, src.shape):
            return None
        return src

    # ------------------------------------------------------------------ entry
    def build(self) -> DpuGraph:
        inputs = []
        for inp in self.model.graph.input:
            if inp.name in self.consts:
                continue
            shape = _static_shape(inp)[1:]
            layout = NHWC if len(shape) == 3 else FLAT
            if len(shape) == 3 and shape[0] > 1 and shape[1:] == (1, 1):  # a sequence declared as an image: H = 1
                shape, layout = (1, shape[0], 1), "nw11"
            elif len(shape) == 3 and shape[0] == 1 and shape[2] > 1 and self._read_by_conv(inp.name, 4):
                # a PyTorch Conv2d's one-channel NCHW input (N, 1, T, F): the NHWC tensor (T, F, 1)
                shape, layout = (shape[1], shape[2], 1), NCHW
            elif len(shape) == 2 and self._read_by_conv(inp.name, 3):
                shape, layout = (1, shape[1], shape[0]), NCW
            elif len(shape) == 2:  # a Keras sequence (N, W, C)
                shape, layout = (1, shape[0], shape[1]), NWC
            elif len(shape) == 1 and shape[0] > 1 and self._read_as_sequence(inp.name):
                # an (N, T) series given 1-sized axes before a conv (PyTorch's x.unsqueeze(1)): NHWC (1, T, 1)
                shape, layout = (1, shape[0], 1), "nw"
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

    def _read_as_sequence(self, name: str) -> bool:
        """Whether every reader of the rank-2 input ``name`` gives it more axes (``Unsqueeze``, a ``Reshape`` to rank > 2):
        a time series, not a feature vector (a dense layer reading it needs the flat view)."""
        users = self.consumers.get(name, [])

        def more_axes(n: onnx.NodeProto) -> bool:
            if n.op_type == "Unsqueeze":
                return True
            target = self._target_shape(n) if n.op_type == "Reshape" else None
            return target is not None and len(target) > 2

        return bool(users) and all(more_axes(n) for n in users)

    def _read_by_conv(self, name: str, weight_rank: int) -> bool:
        """Whether a ``Conv`` with a weight of ``weight_rank`` (3: 1-D, 4: 2-D) reads ``name`` directly (channel-first)."""
        return any(n.op_type == "Conv" and n.input[0] == name and len(self.consts.get(n.input[1], np.zeros(())).shape) == weight_rank
                   for n in self.consumers.get(name, []))

    # ------------------------------------------------------------------ layers
    def _skip_activation_nodes(self, layer: Layer) -> list[str]:
        names = []
        for t in layer.internal:
            for c in self.consumers.get(t, []):
                self.fused.add(c.name)
                names.append(c.name)
        return names

    def layer(self, layer: Layer) -> None:
        fused = self._skip_activation_nodes(layer)
        node = next(n for n in self.model.graph.node if n.name == layer.name)
        act, alpha = self._activation(layer)
        n_ops = len(self.ops)
        if layer.kind == "conv":
            self.conv(node, layer, act, alpha)
        else:
            self.dense(node, layer, act, alpha)
        for op in self.ops[n_ops:]:  # every ONNX node the op stands for (a CPU stage copies them)
            op.onnx_nodes = tuple(dict.fromkeys((*op.onnx_nodes, *fused)))

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
        orient, reason = _orientation(src, w.ndim - 2, f"Conv input {layer.input!r}")
        if not reason and group != 1:
            reason = (f"grouped/depthwise convolution (group={group}) is not handled by nilmc's DPU lowering "
                      "(tflite:int8 and eiq:int8 take it)")
        if not reason and act == "clip":
            reason = "Clip activation (ReLU6) is not handled by nilmc's DPU lowering"
        if reason:
            self.unsupported(node, reason, layer)
            return
        w, a = _hw_weights(w, orient), _hw_attrs(a, orient)  # the conv2d over (H, W) of the NHWC tensor
        kh, kw = (int(v) for v in a.get("kernel_shape", w.shape[2:]))
        sh, sw = (int(v) for v in a.get("strides", (1, 1)))
        dh, dw = (int(v) for v in a.get("dilations", (1, 1)))
        pads = tuple(int(v) for v in a.get("pads", (0, 0, 0, 0)))  # (top, left, bottom, right)
        if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            self.unsupported(node, f"auto_pad={a['auto_pad']!r} is not handled; export with explicit pads", layer)
            return
        h, wd, _ = src.shape
        oh, ow = _conv_out(h, kh, sh, dh, pads[0], pads[2]), _conv_out(wd, kw, sw, dw, pads[1], pads[3])
        bias = None if layer.bias is None else np.asarray(self.consts[layer.bias], np.float32).reshape(-1)
        attrs = {"kernel": (kh, kw), "stride": (sh, sw), "dilation": (dh, dw), "pads": pads, "alpha": alpha,
                 "in_channels": int(w.shape[1]), "out_channels": int(w.shape[0])}
        op = DpuOp(layer.name, OpKind.CONV2D, (src.tensor,), layer.output, (oh, ow, int(w.shape[0])), attrs,
                   np.ascontiguousarray(w.transpose(0, 2, 3, 1)), bias, act, layer.weight, layer.bias,
                   tuple(n for n in (layer.name, layer.bias_node) if n))
        self.add(op, _OUT_LAYOUT[orient])

    def dense(self, node: onnx.NodeProto, layer: Layer, act: str | None, alpha: float) -> None:
        src = self.view(layer.input)
        w = np.asarray(self.consts[layer.weight], np.float32)
        if layer.weight_axis == 0:  # Gemm transB: [out, in]
            w = w.T
        if node.op_type == "Gemm":
            a = _attrs(node)
            if a.get("transA", 0) or float(a.get("alpha", 1.0)) != 1.0 or float(a.get("beta", 1.0)) != 1.0:
                self.unsupported(node, "Gemm with transA or alpha/beta != 1 is not handled by nilmc's DPU lowering", layer)
                return
        if src.layout != FLAT or len(src.shape) != 1 or act == "clip":
            why = "Clip activation (ReLU6) is not handled" if act == "clip" else f"dense input {layer.input!r} is not a flat (N, features) tensor"
            self.unsupported(node, why, layer)
            return
        bias = None if layer.bias is None else np.asarray(self.consts[layer.bias], np.float32).reshape(-1)
        attrs = {"in_features": int(w.shape[0]), "out_features": int(w.shape[1]), "alpha": alpha}
        order = self._flatten_order(src.tensor)
        if order is not None:  # a channel-major flatten before it (_flatten): the weight rows in the IR's NHWC order
            w = w[order]
            attrs["in_order"] = order
        op = DpuOp(layer.name, OpKind.DENSE, (src.tensor,), layer.output, (int(w.shape[1]),), attrs, np.ascontiguousarray(w), bias,
                   act, layer.weight, layer.bias, tuple(n for n in (layer.name, layer.bias_node) if n))
        self.add(op, FLAT)

    # ------------------------------------------------------------------ plain nodes
    def plain(self, node: onnx.NodeProto) -> None:
        handler = {
            "Transpose": self.transpose, "Reshape": self.reshape, "Flatten": self.flatten, "Identity": self.identity,
            "MaxPool": self.pool, "AveragePool": self.pool, "GlobalAveragePool": self.pool,
            "Add": self.eltwise, "Relu": self.activation, "LeakyRelu": self.activation,
            "Squeeze": self.squeeze, "Unsqueeze": self.unsqueeze,
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
        if _labelled(src) and len(perm) == len(src.layout) and perm[:1] == (0,) and sorted(perm) == list(range(len(perm))):
            self.views[node.output[0]] = _View(src.tensor, "".join(src.layout[p] for p in perm), src.shape)
        else:
            self.unsupported(node, f"Transpose perm={list(perm)} of a {src.layout or 'unknown'} tensor is not a layout change nilmc folds")

    def _axes(self, node: onnx.NodeProto) -> list[int] | None:
        if len(node.input) > 1 and node.input[1]:
            v = self.consts.get(node.input[1])
            return None if v is None else [int(a) for a in np.asarray(v).ravel()]
        attr = _attrs(node).get("axes")
        return None if attr is None else [int(a) for a in attr]

    def squeeze(self, node: onnx.NodeProto) -> None:
        """Dropping 1-sized axes: the same NHWC tensor in a shorter view."""
        src, axes = self.view(node.input[0]), self._axes(node)
        if not _labelled(src):
            self.unsupported(node, f"Squeeze of a {src.layout or 'unknown'} tensor is not a layout change nilmc folds")
            return
        labels, rank = src.layout[1:], len(src.layout)
        axes = [i for i in range(1, rank) if _unit(labels[i - 1], src.shape)] if axes is None else [a % rank for a in axes]
        if 0 in axes or any(not _unit(labels[a - 1], src.shape) for a in axes):
            self.unsupported(node, f"Squeeze axes {axes} of a {src.layout} tensor {onnx_dims(src.layout, src.shape)} drop data")
            return
        layout = "n" + "".join(l for i, l in enumerate(labels, 1) if i not in axes)
        if len(layout) == 2 and same_order(src.layout, src.shape):  # (N, C) left: a flat feature vector (a Keras GAP head)
            self._flatten(node, src)
            return
        self.views[node.output[0]] = _View(src.tensor, layout, src.shape)

    def unsqueeze(self, node: onnx.NodeProto) -> None:
        """Adding 1-sized axes (a Keras Conv1D's ExpandDims): the same NHWC tensor in a longer view."""
        src, axes = self.view(node.input[0]), self._axes(node)
        if not _labelled(src) or axes is None:
            self.unsupported(node, f"Unsqueeze of a {src.layout or 'unknown'} tensor is not a layout change nilmc folds")
            return
        rank = len(src.layout) + len(axes)
        axes = sorted(a % rank for a in axes)
        if 0 in axes:
            self.unsupported(node, "Unsqueeze before the batch axis is not a layout change nilmc folds")
            return
        labels = list(src.layout[1:])
        for a in axes:
            labels.insert(a - 1, "1")
        self.views[node.output[0]] = _View(src.tensor, "n" + "".join(labels), src.shape)

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
        if _labelled(src):
            size = int(np.prod(src.shape))
            if len(rest) == 1 and rest[0] in (-1, size) and same_order(src.layout, src.shape):  # NHWC order: Keras's flatten
                self._flatten(node, src)
                return
            if len(rest) == 1 and rest[0] in (-1, size) and self._dense_readers_only(node.output[0]):  # PyTorch's view(N, -1)
                self._flatten(node, src, reorder=True)
                return
            dims = _reshape_dims(onnx_dims(src.layout, src.shape), target)
            moved = _move_units(src.layout, src.shape, dims) if dims is not None else None
            if moved is not None:  # only 1-sized axes added or dropped (tf2onnx writes NHWC->NCHW so when C == 1)
                self.views[node.output[0]] = _View(src.tensor, moved, src.shape)
                return
        if src.layout == FLAT and len(rest) == 1:
            self.views[node.output[0]] = src
            return
        self.unsupported(node, f"Reshape of a {src.layout or 'unknown'} tensor {src.shape} to {list(target)} changes the data order")

    def flatten(self, node: onnx.NodeProto) -> None:
        src = self.view(node.input[0])
        if int(_attrs(node).get("axis", 1)) == 1 and _labelled(src) and same_order(src.layout, src.shape):
            self._flatten(node, src)
        elif int(_attrs(node).get("axis", 1)) == 1 and _labelled(src) and self._dense_readers_only(node.output[0]):
            self._flatten(node, src, reorder=True)
        else:
            self.unsupported(node, f"Flatten of a {src.layout or 'unknown'} tensor is not handled (needs NHWC, axis 1)")

    def _flatten(self, node: onnx.NodeProto, src: _View, *, reorder: bool = False) -> None:
        """A flatten of the NHWC tensor. ``reorder``: the ONNX Flatten is channel-major (PyTorch's flatten of an NCHW /
        NCW tensor), so the IR's NHWC-order vector holds the same values in another order: ``attrs["onnx_order"][i]``
        is the ONNX index of IR element i, and the dense layers reading it (its only readers) take their weight rows in
        that order (:meth:`dense`), so the head of a PyTorch CNN runs on the DPU, exactly. A CPU stage never receives
        the reordered vector (:func:`~nilmc.backends.dpu.partition.plan_partition` keeps such a flatten with its readers)."""
        size = int(np.prod(src.shape))
        attrs: dict[str, Any] = {}
        if reorder:
            index = np.arange(size, dtype=np.int64).reshape(1, *onnx_dims(src.layout, src.shape))
            attrs["onnx_order"] = to_nhwc(index, src.layout, src.shape).reshape(-1).astype(np.int64)
        self.add(DpuOp(node.name, OpKind.FLATTEN, (src.tensor,), node.output[0], (size,), attrs, onnx_nodes=(node.name,)), FLAT)

    def _flatten_order(self, tensor: str) -> np.ndarray | None:
        """``onnx_order`` of the reordering flatten that makes IR ``tensor`` (None for any other producer)."""
        for op in reversed(self.ops):
            if op.output == tensor:
                order = op.attrs.get("onnx_order") if op.kind == OpKind.FLATTEN else None
                return None if order is None else np.asarray(order)
        return None

    def _dense_readers_only(self, tensor: str) -> bool:
        """Whether the one reader of ``tensor`` is a weighted dense layer reading it as its input (and it is no graph output)."""
        users = self.consumers.get(tensor, [])
        outputs = {o.name for o in self.model.graph.output}
        return (len(users) == 1 and tensor not in outputs and users[0].name in self.layer_of
                and self.layer_of[users[0].name].kind == "dense" and self.layer_of[users[0].name].input == tensor)

    def pool(self, node: onnx.NodeProto) -> None:
        src = self.view(node.input[0])
        a = _attrs(node)
        spatial = len(a["kernel_shape"]) if "kernel_shape" in a else len(src.layout) - 2
        orient, reason = _orientation(src, spatial, f"{node.op_type} input")
        if reason:
            self.unsupported(node, reason)
            return
        a = _hw_attrs(a, orient)
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
                       {"kernel": (kh, kw), "stride": (sh, sw), "pads": pads}, onnx_nodes=(node.name,)), _OUT_LAYOUT[orient])

    def eltwise(self, node: onnx.NodeProto) -> None:
        ins = [i for i in node.input]
        if any(i in self.consts for i in ins) or len(ins) != 2:
            self.unsupported(node, "Add with a constant (not a fused bias) is not handled by nilmc's DPU lowering")
            return
        a, b = self.view(ins[0]), self.view(ins[1])
        if _canon(a.layout, a.shape) != _canon(b.layout, b.shape) or a.shape != b.shape or not a.layout:
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


def _labelled(v: _View) -> bool:
    return v.layout not in ("", FLAT) and valid_layout(v.layout, v.shape)


# How the spatial ONNX axes of a Conv / pool input map to NHWC: "hw" (NCHW), "wh" (NCWH: H and W swapped), and
# for a 1-D op "w" (NCW: along W, H = 1) or "h" (along H, W = 1).
_OUT_LAYOUT = {"hw": NCHW, "wh": "ncwh", "w": NCW, "h": "nch"}


def _orientation(src: _View, spatial: int, what: str) -> tuple[str, str]:
    """``(orientation, "")`` of an op reading ``src`` as ``(N, C, *spatial axes)``, or ``("", why not)``."""
    labels = src.layout[1:] if _labelled(src) else ""
    if len(labels) != 1 + spatial or spatial not in (1, 2):
        return "", f"{what} is not an NCHW/NCW view of an NHWC tensor (layout {src.layout or 'unknown'})"
    if not (labels[0] == "c" or _unit(labels[0], src.shape)) or any(a == "c" and not _unit(a, src.shape) for a in labels[1:]):
        return "", f"{what} holds the channels on a spatial axis (layout {src.layout}): not a conv/pool over NHWC channels"
    sp = [a if not _unit(a, src.shape) else "1" for a in labels[1:]]
    if spatial == 1:
        return ("h" if sp[0] == "h" else "w"), ""
    return ("wh" if sp[0] == "w" or sp[1] == "h" else "hw"), ""


def _hw_weights(w: np.ndarray, orient: str) -> np.ndarray:
    """ONNX Conv weights as OIHW of the NHWC conv2d."""
    if orient == "w":
        return w[:, :, None, :]
    if orient == "h":
        return w[:, :, :, None]
    return np.ascontiguousarray(w.transpose(0, 1, 3, 2)) if orient == "wh" else w


def _hw_attrs(a: dict[str, Any], orient: str) -> dict[str, Any]:
    """Conv / pool attributes as those of the equivalent 2-D op over (H, W) (pads ``(top, left, bottom, right)``)."""
    out = dict(a)
    if orient == "hw":
        return out
    if orient == "wh":
        def swap(v: Any) -> tuple[int, ...]:
            return tuple(int(x) for x in v)[::-1]

        for k in ("kernel_shape", "strides", "dilations"):
            if k in a:
                out[k] = swap(a[k])
        if "pads" in a:
            b0, b1, e0, e1 = (int(v) for v in a["pads"])
            out["pads"] = (b1, b0, e1, e0)
        return out
    first = orient == "w"  # the unit axis goes first (H = 1) or last (W = 1)

    def two(v: int, unit: int) -> tuple[int, int]:
        return (unit, v) if first else (v, unit)

    if "kernel_shape" in a:
        out["kernel_shape"] = two(int(a["kernel_shape"][0]), 1)
    out["strides"] = two(int(a.get("strides", (1,))[0]), 1)
    out["dilations"] = two(int(a.get("dilations", (1,))[0]), 1)
    p = tuple(int(v) for v in a.get("pads", (0, 0)))
    out["pads"] = (0, p[0], 0, p[1]) if first else (p[0], 0, p[1], 0)
    return out


def _reshape_dims(src: tuple[int, ...], target: tuple[int, ...]) -> tuple[int, ...] | None:
    """The dimensions after the batch of ``Reshape(x, target)`` for ``x`` of ``(N, *src)`` (None: batch not kept)."""
    size = int(np.prod(src))
    rest = [src[i - 1] if v == 0 and 0 < i <= len(src) else int(v) for i, v in enumerate(target) if i > 0]
    if target[0] not in (-1, 0) or rest.count(-1) > 1 or (target[0] == -1 and -1 in rest):
        return None
    if -1 in rest:
        known = int(np.prod([v for v in rest if v != -1]))
        if known <= 0 or size % known:
            return None
        rest[rest.index(-1)] = size // known
    return tuple(rest) if int(np.prod(rest)) == size else None


def _move_units(layout: str, shape: tuple[int, ...], dims: tuple[int, ...]) -> str | None:
    """The layout after a Reshape to ``dims`` that only adds or drops 1-sized axes (None when it moves data)."""
    src = [(a, d) for a, d in zip(layout[1:], onnx_dims(layout, shape)) if d != 1]
    if [d for _, d in src] != [d for d in dims if d != 1]:
        return None
    names = iter(a for a, _ in src)
    return "n" + "".join(next(names) if d != 1 else "1" for d in dims)


def from_onnx(model: onnx.ModelProto) -> DpuGraph:
    """The DPU graph of ``model`` (a copy is analysed; unnamed nodes get the names :func:`analyze` gives them)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    return _Builder(m).build()

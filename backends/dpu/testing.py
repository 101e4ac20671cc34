"""Small ONNX graphs in tf2onnx's form (NHWC input, NCHW ops between Transposes), for tests and benchmarks.

No TensorFlow needed. :func:`seq2point` builds the seed-003 T-P CNN shape
(five convs 5/5/3/3/3 with 32/32/64/64/32 filters, dense 192 and 96, one output)
with random He-initialised weights; the other builders make one-layer graphs.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

if TYPE_CHECKING:
    from nilmc.backends.dpu.ir import DpuGraph

OPSET, IR_VERSION = 17, 10
SEQ2POINT_CONVS = ((5, 32), (5, 32), (3, 64), (3, 64), (3, 32))
SEQ2POINT_DENSE = (192, 96)


def _model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], in_shape: Sequence[int], out_shape: Sequence[int],
           *, outputs: Sequence[str] = ("output",)) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "dpu_test", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *in_shape])],
                          [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["N", *out_shape]) for o in outputs], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])
    m.ir_version = IR_VERSION
    onnx.checker.check_model(m)
    return m


def _he(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
    return rng.normal(0.0, np.sqrt(2.0 / fan_in), shape).astype(np.float32)


def conv_layer(*, in_shape: tuple[int, int, int] = (10, 9, 4), filters: int = 8, kernel: tuple[int, int] = (3, 3),
               stride: tuple[int, int] = (1, 1), dilation: tuple[int, int] = (1, 1), pads: tuple[int, int, int, int] | None = None,
               activation: str | None = "Relu", alpha: float = 26 / 256, bias: bool = True, seed: int = 0) -> onnx.ModelProto:
    """NHWC input -> Transpose -> Conv(+bias) [-> activation] -> Transpose -> output."""
    rng = np.random.default_rng(seed)
    h, w, c = in_shape
    kh, kw = kernel
    if pads is None:
        pads = ((kh - 1) * dilation[0] // 2, (kw - 1) * dilation[1] // 2, (kh - 1) * dilation[0] // 2, (kw - 1) * dilation[1] // 2)
    inits = [numpy_helper.from_array(_he(rng, (filters, c, kh, kw), c * kh * kw), "W")]
    ins = ["t0", "W"]
    if bias:
        inits.append(numpy_helper.from_array(rng.normal(0, 0.1, filters).astype(np.float32), "B"))
        ins.append("B")
    nodes = [helper.make_node("Transpose", ["input"], ["t0"], name="to_nchw", perm=[0, 3, 1, 2]),
             helper.make_node("Conv", ins, ["c"], name="conv", kernel_shape=list(kernel), strides=list(stride),
                              dilations=list(dilation), pads=list(pads))]
    last = "c"
    if activation == "Relu":
        nodes.append(helper.make_node("Relu", ["c"], ["a"], name="act"))
        last = "a"
    elif activation == "LeakyRelu":
        nodes.append(helper.make_node("LeakyRelu", ["c"], ["a"], name="act", alpha=alpha))
        last = "a"
    nodes.append(helper.make_node("Transpose", [last], ["output"], name="to_nhwc", perm=[0, 2, 3, 1]))
    oh = (h + pads[0] + pads[2] - (kh - 1) * dilation[0] - 1) // stride[0] + 1
    ow = (w + pads[1] + pads[3] - (kw - 1) * dilation[1] - 1) // stride[1] + 1
    return _model(nodes, inits, in_shape, (oh, ow, filters))


def dense_layer(*, features: int = 90, units: int = 16, activation: str | None = "Relu", gemm: bool = False,
                weight_scale: float = 1.0, bias_value: float | None = None, seed: int = 0) -> onnx.ModelProto:
    """``(N, features)`` -> MatMul + Add (or Gemm transB) [-> activation]."""
    rng = np.random.default_rng(seed)
    w = _he(rng, (features, units), features) * weight_scale
    b = rng.normal(0, 0.1, units).astype(np.float32) if bias_value is None else np.full(units, bias_value, np.float32)
    last = "a" if activation else "output"
    if gemm:
        inits = [numpy_helper.from_array(np.ascontiguousarray(w.T), "W"), numpy_helper.from_array(b, "B")]
        nodes = [helper.make_node("Gemm", ["input", "W", "B"], [last], name="dense", transB=1)]
    else:
        inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")]
        nodes = [helper.make_node("MatMul", ["input", "W"], ["m"], name="dense"),
                 helper.make_node("Add", ["m", "B"], [last], name="dense_bias")]
    if activation:
        nodes.append(helper.make_node(activation, [last], ["output"], name="act"))
    return _model(nodes, inits, (features,), (units,))


def pool_layer(kind: str = "MaxPool", *, in_shape: tuple[int, int, int] = (8, 6, 3), kernel: tuple[int, int] = (2, 2),
               stride: tuple[int, int] = (2, 2)) -> onnx.ModelProto:
    """NHWC input -> Transpose -> MaxPool / AveragePool -> Transpose."""
    h, w, c = in_shape
    attrs = {"kernel_shape": list(kernel), "strides": list(stride)}
    nodes = [helper.make_node("Transpose", ["input"], ["t0"], name="to_nchw", perm=[0, 3, 1, 2]),
             helper.make_node(kind, ["t0"], ["p"], name="pool", **attrs),
             helper.make_node("Transpose", ["p"], ["output"], name="to_nhwc", perm=[0, 2, 3, 1])]
    return _model(nodes, [], in_shape, ((h - kernel[0]) // stride[0] + 1, (w - kernel[1]) // stride[1] + 1, c))


def add_layer(*, in_shape: tuple[int, int, int] = (6, 5, 4), relu: bool = True, seed: int = 0) -> onnx.ModelProto:
    """Two 1x1 convs of one input (different ranges) -> Add [-> Relu]: an element-wise add of two activations."""
    rng = np.random.default_rng(seed)
    c = in_shape[2]
    inits = [numpy_helper.from_array(_he(rng, (c, c, 1, 1), c), "Wa"), numpy_helper.from_array(_he(rng, (c, c, 1, 1), c) * 4, "Wb")]
    nodes = [helper.make_node("Transpose", ["input"], ["t0"], name="to_nchw", perm=[0, 3, 1, 2]),
             helper.make_node("Conv", ["t0", "Wa"], ["ca"], name="conv_a", kernel_shape=[1, 1]),
             helper.make_node("Relu", ["ca"], ["ra"], name="relu_a"),
             helper.make_node("Conv", ["t0", "Wb"], ["cb"], name="conv_b", kernel_shape=[1, 1]),
             helper.make_node("Add", ["ra", "cb"], ["s"], name="add")]
    last = "s"
    if relu:
        nodes.append(helper.make_node("Relu", ["s"], ["r"], name="add_relu"))
        last = "r"
    nodes.append(helper.make_node("Transpose", [last], ["output"], name="to_nhwc", perm=[0, 2, 3, 1]))
    return _model(nodes, inits, in_shape, in_shape)


def lstm_model(*, frames: int = 10, features: int = 9, hidden: int = 8, seed: int = 0) -> onnx.ModelProto:
    """``(N, frames, features, 1)`` -> LSTM over the frames -> Dense(1): a recurrent layer the DPU cannot run."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(np.array([-1, frames, features], np.int64), "shape3"),
             numpy_helper.from_array(rng.normal(0, 0.2, (1, 4 * hidden, features)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.normal(0, 0.2, (1, 4 * hidden, hidden)).astype(np.float32), "R"),
             numpy_helper.from_array(np.array([-1, hidden], np.int64), "shape2"),
             numpy_helper.from_array(rng.normal(0, 0.3, (hidden, 1)).astype(np.float32), "Wd"),
             numpy_helper.from_array(np.zeros(1, np.float32), "Bd")]
    nodes = [helper.make_node("Reshape", ["input", "shape3"], ["seq"], name="to_sequence"),
             helper.make_node("Transpose", ["seq"], ["tseq"], name="time_major", perm=[1, 0, 2]),
             helper.make_node("LSTM", ["tseq", "W", "R"], ["", "h"], name="lstm", hidden_size=hidden),
             helper.make_node("Reshape", ["h", "shape2"], ["hflat"], name="last_state"),
             helper.make_node("MatMul", ["hflat", "Wd"], ["m"], name="head"),
             helper.make_node("Add", ["m", "Bd"], ["output"], name="head_bias")]
    return _model(nodes, inits, (frames, features, 1), (1,))


def seq2point(*, frames: int = 10, features: int = 9, convs: Sequence[tuple[int, int]] = SEQ2POINT_CONVS,
              dense: Sequence[int] = SEQ2POINT_DENSE, seed: int = 0) -> onnx.ModelProto:
    """The seed-003 seq2point CNN as tf2onnx writes it (input Reshape to NCHW for C == 1, 'same' convs + ReLU,
    Transpose back, Flatten, Dense + ReLU, linear head), random He weights."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(np.array([-1, 1, frames, features], np.int64), "to_nchw_shape")]
    nodes = [helper.make_node("Reshape", ["input", "to_nchw_shape"], ["x0"], name="to_nchw")]
    x, c = "x0", 1
    for i, (k, f) in enumerate(convs, 1):
        inits += [numpy_helper.from_array(_he(rng, (f, c, k, k), c * k * k), f"conv{i}/W"),
                  numpy_helper.from_array(rng.normal(0, 0.02, f).astype(np.float32), f"conv{i}/b")]
        p = (k - 1) // 2
        nodes += [helper.make_node("Conv", [x, f"conv{i}/W", f"conv{i}/b"], [f"conv{i}"], name=f"conv{i}", kernel_shape=[k, k],
                                   pads=[p, p, p, p]),
                  helper.make_node("Relu", [f"conv{i}"], [f"relu{i}"], name=f"relu{i}")]
        x, c = f"relu{i}", f
    flat = frames * features * c
    inits.append(numpy_helper.from_array(np.array([-1, flat], np.int64), "flat_shape"))
    nodes += [helper.make_node("Transpose", [x], ["nhwc"], name="to_nhwc", perm=[0, 2, 3, 1]),
              helper.make_node("Reshape", ["nhwc", "flat_shape"], ["flat"], name="flatten")]
    x, n = "flat", flat
    for i, units in enumerate([*dense, 1], 1):
        last = i == len(dense) + 1
        inits += [numpy_helper.from_array(_he(rng, (n, units), n), f"dense{i}/W"),
                  numpy_helper.from_array(rng.normal(0, 0.02, units).astype(np.float32), f"dense{i}/b")]
        out = "output" if last else f"dense{i}_b"
        nodes += [helper.make_node("MatMul", [x, f"dense{i}/W"], [f"dense{i}"], name=f"dense{i}"),
                  helper.make_node("Add", [f"dense{i}", f"dense{i}/b"], [out], name=f"dense{i}_bias")]
        if not last:
            nodes.append(helper.make_node("Relu", [out], [f"dense{i}_relu"], name=f"dense{i}_relu"))
            x = f"dense{i}_relu"
        n = units
    return _model(nodes, inits, (frames, features, 1), (1,))


def float_forward(graph: DpuGraph, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every tensor of ``graph`` in float64, computed from the IR alone (NHWC, its own kernels, strides, pads and
    weights): the FP32 route the DPU lowering claims equals the ONNX model. ``feeds``: the graph inputs as ONNX
    tensors. Average pools count their padding, as the DPU's do."""
    from numpy.lib.stride_tricks import sliding_window_view

    from nilmc.backends.dpu.ir import to_nhwc
    from nilmc.backends.dpu.ops import OpKind
    from nilmc.backends.dpu.quant import float_accumulate

    vals: dict[str, np.ndarray] = {}
    for op in graph.ops:
        args = [vals[t] for t in op.inputs]
        if op.kind == OpKind.INPUT:
            out = to_nhwc(np.asarray(feeds[op.output], np.float64), op.onnx_layout, op.shape)
        elif op.weighted:
            out = float_accumulate(op, args[0], op.weight) + (0.0 if op.bias is None else op.bias)
        elif op.kind == OpKind.FLATTEN:
            out = args[0].reshape(len(args[0]), -1)
        elif op.kind in (OpKind.MAXPOOL, OpKind.AVGPOOL):
            (pt, pl, pb, pr), (sh, sw) = op.attrs["pads"], op.attrs["stride"]
            fill = -np.inf if op.kind == OpKind.MAXPOOL else 0.0
            x = np.pad(args[0], ((0, 0), (pt, pb), (pl, pr), (0, 0)), constant_values=fill)
            win = sliding_window_view(x, tuple(op.attrs["kernel"]), axis=(1, 2))[:, ::sh, ::sw]
            out = win.max(axis=(-1, -2)) if op.kind == OpKind.MAXPOOL else win.mean(axis=(-1, -2))
        elif op.kind == OpKind.ADD:
            out = args[0] + args[1]
        elif op.kind in (OpKind.RELU, OpKind.LEAKY_RELU):
            out = args[0]
        else:
            raise ValueError(f"op {op.name!r} ({op.attrs.get('op_type', op.kind)}) is not a DPU op: {op.reason}")
        act = str(op.kind) if op.kind in (OpKind.RELU, OpKind.LEAKY_RELU) else op.activation
        if act == "relu":
            out = np.maximum(out, 0.0)
        elif act == "leaky_relu":
            out = np.where(out < 0, out * float(op.attrs.get("alpha", 0.01)), out)
        vals[op.output] = out
    return vals


def dpu_round_qdq(qdq: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a QDQ graph whose activation QuantizeLinear round half *up* (DPU_ROUND), not half to even.

    Each ``QuantizeLinear(x, s, 0)`` becomes ``Cast<int8>(Clip(Floor(x / s + 0.5), -128, 127))``: exact in
    float32 for power-of-two ``s`` while ``x / s`` keeps within 24 significant bits (every value that is not
    saturated anyway, in the graphs nilmc writes). onnxruntime then computes what the DPU computes.
    """
    m = onnx.ModelProto()
    m.CopyFrom(qdq)
    inits = {t.name for t in m.graph.initializer}
    nodes: list[onnx.NodeProto] = []
    extra = [numpy_helper.from_array(np.float32(0.5), "dpu_round_half"), numpy_helper.from_array(np.float32(-128), "dpu_round_lo"),
             numpy_helper.from_array(np.float32(127), "dpu_round_hi")]
    for node in m.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in inits:
            nodes.append(node)
            continue
        x, scale, out, p = node.input[0], node.input[1], node.output[0], node.name
        nodes += [helper.make_node("Div", [x, scale], [p + "_div"], name=p + "_div"),
                  helper.make_node("Add", [p + "_div", "dpu_round_half"], [p + "_add"], name=p + "_add"),
                  helper.make_node("Floor", [p + "_add"], [p + "_floor"], name=p + "_floor"),
                  helper.make_node("Clip", [p + "_floor", "dpu_round_lo", "dpu_round_hi"], [p + "_clip"], name=p + "_clip"),
                  helper.make_node("Cast", [p + "_clip"], [out], name=p + "_cast", to=TensorProto.INT8)]
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    m.graph.initializer.extend(extra)
    onnx.checker.check_model(m)
    return m

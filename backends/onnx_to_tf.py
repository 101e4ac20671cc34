"""An ONNX model (a PyTorch export) to TFLite: onnx2tf, then the TFLite converter, then nilmc's own INT8 parameters.

This is how ``tflite:*`` and ``eiq:*`` lower a model that was given as ``.onnx`` (no Keras source).

The route
    1. :func:`tf_ready_graph`: the model's ONNX graph with run-time Reshape shapes (PyTorch's
       ``view(x.size(0), ...)`` as ``Shape -> Gather -> Unsqueeze -> Concat -> Reshape``) made constant
       ``[-1, ...]``, measured with onnxruntime at two batch sizes; dead shape ops pruned. Tensor names are
       kept, so nilmc's parameters (keyed by them) still apply.
    2. :func:`onnx_keras`: onnx2tf turns it into a tf_keras model. The input keeps the ONNX layout (an NCW
       ``(N, 1, T)`` model keeps ``(N, 1, T)``; onnx2tf transposes inside), so the artifact is a drop-in for the
       user's model. The float TFLite conversion is checked against onnxruntime on random windows.
    3. Float precisions: the TFLite converter on that model (:func:`convert_onnx`).
    4. INT8 (:func:`build_int8_from_onnx`): the converter runs once in full-integer mode to get the graph
       TFLite wants (op choice, Conv1d as EXPAND_DIMS + CONV_2D, fused ReLU, int32 biases); then every
       quantized tensor is overwritten with nilmc's parameters, as for a Keras source
       (:func:`nilmc.backends.tflite_int8.apply_plan`). The k-th CONV_2D / FULLY_CONNECTED is the k-th weighted
       layer of nilmc's quantization graph; its weights are re-quantized from the ONNX float weights, laid out
       as TFLite wants (found by comparing with the converter's own codes), its bias at ``s_in * s_w``. A fused
       ReLU that the ONNX graph has as a separate Clip/Relu after a Reshape takes that activation's parameters.
       Data-movement ops share their input's grid. Any quantized tensor left unmatched is an error.

The same planner serves Keras sources nilmc's Keras mapping cannot place (:func:`build_int8_from_keras`: Conv1D,
BatchNormalization as MUL + ADD whose constants nilmc requantizes, LSTM kept float32): the converter's graph of the Keras
model against the tf2onnx graph the parameters were derived on; a bias tf2onnx splits off a Conv1D is fused back.

Why onnx2tf 1.28.8: onnx2tf 2.x needs Python >= 3.12 (nilmc runs on 3.11); 1.29.x pins tensorflow==2.19,
numpy==1.26.4 and onnx==1.19, which pip cannot resolve beside nilmc's pins; 1.28.8 declares no pins and works
with TensorFlow 2.21 / tf-keras 2.21 (checked). It runs without onnxsim (``not_use_onnxsim``): step 1 folds
what onnxsim would.

Determinism: onnx2tf and the converter are deterministic for the same graph; the process-global tf_keras
name counters (which end up in tensor names) are reset before each conversion, so the same inputs give a
byte-identical ``.tflite`` in any process.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import onnx.utils
from onnx import helper, numpy_helper

from nilmc.backends.tflite_int8 import (
    CONCATENATION,
    CONV_2D,
    DEPTHWISE_CONV_2D,
    FULLY_CONNECTED,
    FullIntegerSpec,
    FullIntegerTFLite,
    IntegerParams,
    TensorPlan,
    apply_plan,
    check_params,
    check_plan_complete,
    clear_orphan_buffers,
    convert_keras,
    float_input_layers,
    load_flatbuffer,
    op_code,
    op_name,
    pack_flatbuffer,
    propagate_plan,
    shared_integer_params,
    tensor_name,
)
from nilmc.compiler.errors import BadInputError, InternalError, MissingDependencyError, QuantizationError
from nilmc.quantization.graph import ACTIVATION_OPS, PASSTHROUGH_OPS, prune_dead
from nilmc.quantization.graph import constants as onnx_constants
from nilmc.quantization.params import QuantParams, TensorQuant, bias_quant, weight_quant

if TYPE_CHECKING:
    from nilmc.compiler.model import Model

ONNX2TF = "onnx2tf==1.28.8"
STRUCTURE_WINDOWS = 32  # representative windows for the structural conversion (its ranges are all overwritten)
_CHECK_BATCH, _CHECK_SEED, _CHECK_RTOL = 4, 0, 1e-4
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# TFLite fused activation codes (schema.fbs ActivationFunctionType) and the ONNX activations they stand for.
_FUSED = {1: "RELU", 2: "RELU_N1_TO_1", 3: "RELU6"}
INT8_TENSOR_TYPES = (9, 3)  # TensorType int8, uint8
# Global average pooling (PyTorch's AdaptiveAvgPool1d(1), a mean over time): onnx2tf writes a TFLite MEAN.
MEAN_OPS = frozenset({"GlobalAveragePool", "ReduceMean"})

# ONNX ops the INT8 route places: weighted layers, their fused activations, data movement, and the shape math
# of a Reshape (never on the data path). Anything else on the data path is refused by the pre-check.
# AveragePool: TFLite's int8 AVERAGE_POOL_2D keeps its input's grid, as the TFLite traits' parameters do (pool_shares_grid).
# Sigmoid (a PyTorch ON/OFF classifier's head): TFLite's int8 LOGISTIC, a lookup table from nilmc's input grid to its output grid.
INT8_DATA_OPS = frozenset({"Conv", "Gemm", "MatMul", "Add", "Dropout", "AveragePool", "Sigmoid"}) | ACTIVATION_OPS | PASSTHROUGH_OPS | MEAN_OPS


def require_onnx2tf(purpose: str = "lowering an ONNX model to TFLite") -> Any:
    """The onnx2tf module (imported lazily; its import pulls TensorFlow), or :class:`MissingDependencyError`."""
    from nilmc.compiler.tfcompat import import_tf, stderr_silenced

    import_tf(purpose)
    try:
        with stderr_silenced(), contextlib.redirect_stdout(io.StringIO()):
            return importlib.import_module("onnx2tf")
    except ImportError:
        raise MissingDependencyError(ONNX2TF.split("==")[0], "tflite", purpose) from None


def onnx2tf_available() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("onnx2tf", "onnx_graphsurgeon", "sng4onnx"))


# --------------------------------------------------------------------------- 1. the graph onnx2tf gets
NHWC_INPUT = "nilmc_onnx2tf_input_layout"  # metadata key: the graph's input was channel-last (see _channel_first_input)


def tf_ready_graph(graph: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``graph`` onnx2tf converts faithfully: run-time Reshape shapes constant ``[-1, ...]`` where the
    per-sample shape is fixed (measured with onnxruntime at batch 2 and 3), shape ops no output needs any more pruned,
    and a channel-last export (tf2onnx's form of a Keras model) made channel-first (:func:`_channel_first_input`,
    :func:`_channel_first_flatten`). Exact in FP32; every tensor nilmc's parameters name keeps its name."""
    proto = _constant_reshapes(graph)
    if _channel_first_input(proto):
        proto.metadata_props.add(key=NHWC_INPUT, value="channel-last")
        _channel_first_flatten(proto)
    return proto


def _permutation(node: onnx.NodeProto) -> list[int]:
    return [int(v) for a in node.attribute if a.name == "perm" for v in a.ints]


def _channel_first_input(proto: onnx.ModelProto) -> bool:
    """Take the layout change off a channel-last input, in place: when the graph input ``(N, ..., C)`` (rank 3 or 4)
    is read by one Transpose to ``(N, C, ...)``, or by a Reshape that equals it (``C == 1``), that node goes and the input
    is declared channel-first. onnx2tf then turns the channel-first input back into the channel-last one TensorFlow
    takes, i.e. the model's own input layout; given the original graph it put the Reshape's output in the wrong layout
    (the shipped tf2onnx export failed in onnx2tf's Conv: "Depth of output (32) is not a multiple of the number of groups (9)")."""
    g = proto.graph
    if len(g.input) != 1:
        return False
    inp = g.input[0]
    dims = [d.dim_value if d.HasField("dim_value") else 0 for d in inp.type.tensor_type.shape.dim]
    rank = len(dims)
    if rank not in (3, 4) or not all(dims[1:]):
        return False
    perm = [0, rank - 1, *range(1, rank - 1)]
    readers = [n for n in g.node if inp.name in n.input]
    if len(readers) != 1 or readers[0].input[0] != inp.name:
        return False
    node = readers[0]
    consts = onnx_constants(proto)
    if node.op_type == "Transpose":
        ok = _permutation(node) == perm
    elif node.op_type == "Reshape" and len(node.input) > 1 and node.input[1] in consts:
        ok = dims[-1] == 1 and np.asarray(consts[node.input[1]]).ravel()[1:].tolist() == [dims[p] for p in perm[1:]]
    else:
        ok = False
    if not ok:
        return False
    out = node.output[0]
    g.node.remove(node)
    for n in g.node:
        n.input[:] = [inp.name if i == out else i for i in n.input]
    for k, p in enumerate(perm[1:], 1):
        inp.type.tensor_type.shape.dim[k].dim_value = dims[p]
    prune_dead(g)
    return True


def _channel_first_flatten(proto: onnx.ModelProto) -> None:
    """Flatten channel-first, in place: a Transpose to channel-last (``[0, 2, 3, 1]`` / ``[0, 2, 1]``) read only by a
    Reshape to ``[-1, K]`` read only by a MatMul with a constant weight goes, and the weight's rows are permuted to the
    channel-first order. onnx2tf turned the channel-last flatten of tf2onnx's Keras export into a channel-first one
    (its Reshape transposes what it takes for an NHWC tensor back first): the shipped model's output differed by 0.23."""
    g = proto.graph
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in onnx.shape_inference.infer_shapes(proto).graph.value_info}
    inits = {t.name: t for t in g.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    for node in list(g.node):
        shape = shapes.get(node.input[0] if node.input else "", [])
        if node.op_type != "Transpose" or len(shape) not in (3, 4) or not all(shape[1:]) or _permutation(node) != [0, *range(2, len(shape)), 1]:
            continue
        nxt = readers.get(node.output[0], [])
        if len(nxt) != 1 or nxt[0].op_type != "Reshape" or nxt[0].input[0] != node.output[0]:
            continue
        mm = readers.get(nxt[0].output[0], [])
        w = inits.get(mm[0].input[1]) if len(mm) == 1 and mm[0].op_type == "MatMul" and mm[0].input[0] == nxt[0].output[0] else None
        if w is None or len(readers.get(w.name, [])) != 1 or shapes.get(nxt[0].output[0], [0, 0])[1:] != [int(np.prod(shape[1:]))]:
            continue
        channels, spatial = shape[1], shape[2:]
        # row r of the channel-first flatten (c, *s) is row (*s, c) of the channel-last one
        rows = np.arange(int(np.prod(shape[1:]))).reshape(*spatial, channels).transpose(len(spatial), *range(len(spatial))).ravel()
        w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w)[rows], w.name))
        nxt[0].input[0] = node.input[0]
        g.node.remove(node)
    prune_dead(g)


def _constant_reshapes(graph: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``graph`` whose run-time Reshape shapes are constant where the per-sample shape is fixed."""
    import onnxruntime as ort

    proto = onnx.ModelProto()
    proto.CopyFrom(graph)
    del proto.metadata_props[:]
    g = proto.graph
    consts = {t.name for t in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}
    dynamic = [n for n in g.node if n.op_type == "Reshape" and len(n.input) > 1 and n.input[1] not in consts]
    if not dynamic:
        return proto
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(helper.make_tensor_value_info(n.output[0], onnx.TensorProto.FLOAT, None)
                              for n in dynamic if n.output[0] not in known)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    dims = [d if isinstance(d, int) else 1 for d in inp.shape[1:]]
    names = [n.output[0] for n in dynamic]
    shapes = [[o.shape for o in sess.run(names, {inp.name: np.zeros([b, *dims], np.float32)})] for b in (2, 3)]
    for node, s2, s3 in zip(dynamic, *shapes):
        if s2[0] == 2 and s3[0] == 3 and s2[1:] == s3[1:]:
            name = f"{node.name or node.output[0]}/nilmc_const_shape"
            g.initializer.append(numpy_helper.from_array(np.array([-1, *s2[1:]], np.int64), name))
            node.input[1] = name
    prune_dead(g)
    return proto


def graph_digest(graph: onnx.ModelProto) -> str:
    return hashlib.sha256(graph.SerializeToString(deterministic=True)).hexdigest()


# --------------------------------------------------------------------------- 2. onnx2tf
_KERAS_SLOTS = 2
_KERAS: OrderedDict[str, Any] = OrderedDict()  # graph digest -> tf_keras model (onnx2tf's)
_STRUCTURES: OrderedDict[tuple[str, str, str], bytes] = OrderedDict()  # (digest, windows, io dtype) -> flatbuffer
_STRUCTURE_SLOTS = 8


def onnx_keras(model: Model) -> Any:
    """onnx2tf's tf_keras model of ``model.graph`` (cached per process by graph content), checked against onnxruntime."""
    proto = tf_ready_graph(model.graph)
    key = graph_digest(proto)
    if key in _KERAS:
        _KERAS.move_to_end(key)
        return _KERAS[key]
    keras_model = _run_onnx2tf(proto, model)
    _check_float_conversion(keras_model, model)
    _KERAS[key] = keras_model
    while len(_KERAS) > _KERAS_SLOTS:
        _KERAS.popitem(last=False)
    return keras_model


def _run_onnx2tf(proto: onnx.ModelProto, model: Model) -> Any:
    import tempfile

    from nilmc.compiler.tfcompat import import_tf_keras, stderr_silenced

    onnx2tf = require_onnx2tf()
    import_tf_keras().backend.reset_uids()  # layer-name counters end up in tensor names: same graph, same bytes
    # A channel-first input keeps its layout (a PyTorch export stays a drop-in); one made channel-first from a
    # channel-last export (tf_ready_graph) is turned back into channel-last by onnx2tf, its original layout.
    channel_last = any(p.key == NHWC_INPUT for p in proto.metadata_props)
    # onnx2tf asserts on keep_ncw... for any input that is not 3D/4D/5D; a rank-2 (N, T) input has no layout to keep
    rank = len(proto.graph.input[0].type.tensor_type.shape.dim)
    keep = {} if channel_last or not 3 <= rank <= 5 else {"keep_ncw_or_nchw_or_ncdhw_input_names": [proto.graph.input[0].name]}
    try:
        with tempfile.TemporaryDirectory() as tmp, stderr_silenced(), contextlib.redirect_stdout(io.StringIO()):
            return onnx2tf.convert(onnx_graph=proto, output_folder_path=tmp, not_use_onnxsim=True, non_verbose=True,
                                   disable_model_save=True, **keep)
    except (SystemExit, Exception) as exc:  # onnx2tf reports unsupported ops by sys.exit or by raising
        text = ANSI_ESCAPE.sub("", str(exc)).strip().splitlines()  # onnx2tf colours its messages
        raise BadInputError(f"onnx2tf could not convert {model.source or 'the ONNX model'} "
                            f"({type(exc).__name__}: {text[0][:200] if text else 'no message'})",
                            "lower it with an ONNX target (onnxruntime:int8, openvino:int8), or export it with plainer ops") from None


def _check_float_conversion(keras_model: Any, model: Model) -> None:
    """The float TFLite conversion must give onnxruntime's outputs of the model's own graph (before
    :func:`tf_ready_graph`), in the ONNX output's shape, on random windows."""
    import onnxruntime as ort
    from ai_edge_litert.interpreter import Interpreter

    fb = convert_keras(keras_model, "fp32")
    shape = model.contract.model_input_shape()
    x = np.random.default_rng(_CHECK_SEED).normal(size=(_CHECK_BATCH, *shape)).astype(np.float32)
    sess = ort.InferenceSession(model.graph.SerializeToString(), providers=["CPUExecutionProvider"])
    ref = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    it = Interpreter(model_content=fb, num_threads=1)
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    it.resize_tensor_input(inp["index"], list(x.shape), strict=False)
    it.allocate_tensors()
    it.set_tensor(inp["index"], x)
    it.invoke()
    got = np.asarray(it.get_tensor(out["index"]))
    if got.shape != ref.shape:
        raise BadInputError(f"onnx2tf changed the model's output shape {ref.shape} -> {got.shape}",
                            "lower it with an ONNX target (onnxruntime:int8, openvino:int8)")
    err = float(np.max(np.abs(got - ref)))
    if err > 1e-4 + _CHECK_RTOL * float(np.max(np.abs(ref))):
        raise InternalError(f"onnx2tf's TensorFlow model differs from the ONNX model by {err:.3g} on random windows",
                            "report this model; lower it with an ONNX target meanwhile")


def convert_onnx(model: Model, mode: str) -> bytes:
    """The TFLite converter on onnx2tf's model of ``model``: ``fp32``, ``fp16`` or ``dynamic_int8``."""
    return convert_keras(onnx_keras(model), mode)


def structural_onnx_tflite(model: Model, representative: np.ndarray, *, io_dtype: str) -> bytes:
    """The converter's full-integer graph of onnx2tf's model (per-channel weights, ``io_dtype`` I/O), whose
    parameters :func:`build_int8_from_onnx` overwrites; converted once per process per (graph, windows, I/O dtype)."""
    rep = np.ascontiguousarray(representative[:STRUCTURE_WINDOWS], np.float32)
    key = (graph_digest(tf_ready_graph(model.graph)), hashlib.sha256(repr(rep.shape).encode() + rep.tobytes()).hexdigest(), io_dtype)
    if key not in _STRUCTURES:
        _STRUCTURES[key] = convert_keras(onnx_keras(model), "full_int8", representative=rep, io_dtype=io_dtype)
        while len(_STRUCTURES) > _STRUCTURE_SLOTS:
            _STRUCTURES.popitem(last=False)
    _STRUCTURES.move_to_end(key)
    return _STRUCTURES[key]


def clear_caches() -> None:
    """Forget converted models (tests, long-running processes)."""
    _KERAS.clear()
    _STRUCTURES.clear()


# --------------------------------------------------------------------------- 4. nilmc's parameters in the flatbuffer
@dataclass(frozen=True)
class _OnnxLayer:
    """One weighted layer of nilmc's quantization graph, with the float values to quantize."""

    name: str
    kind: str
    op_type: str
    input: TensorQuant
    output: TensorQuant
    after_activation: TensorQuant | None  # the separate Relu/Clip behind data movement, for a fused TFLite ReLU
    weight_q: TensorQuant
    weight: np.ndarray  # ONNX layout
    trans_b: bool
    bias_q: TensorQuant | None
    bias: np.ndarray | None
    bias_output: TensorQuant | None = None  # the separate bias Add (tf2onnx's Conv1D: Conv -> Squeeze -> Add), which TFLite fuses


def _data_consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """Tensor -> the nodes that read its values (shape math reads only its shape)."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        if n.op_type != "Shape":
            for i in dict.fromkeys(n.input):
                consumers.setdefault(i, []).append(n)
    return consumers


def _epilogue(graph: onnx.GraphProto, tensor: str, consts: set[str], *, want_bias: bool) -> tuple[str | None, str | None, str | None]:
    """What follows a weighted layer's output ``tensor`` through data movement: ``(bias constant, bias Add output,
    Relu/Clip output)``. The bias is looked for only when the layer has none (``want_bias``): tf2onnx writes a Keras
    Conv1D as Conv -> Squeeze -> Add(bias), which TFLite fuses into one CONV_2D."""
    consumers = _data_consumers(graph)
    bias = bias_out = None
    while True:
        nxt = consumers.get(tensor, [])
        if len(nxt) != 1:
            return bias, bias_out, None
        node = nxt[0]
        if node.op_type in ("Relu", "Clip"):
            return bias, bias_out, node.output[0]
        if want_bias and bias is None and node.op_type == "Add" and sum(i in consts for i in node.input) == 1 and len(node.input) == 2:
            bias, bias_out = next(i for i in node.input if i in consts), node.output[0]
        elif node.op_type not in PASSTHROUGH_OPS:
            return bias, bias_out, None
        tensor = node.output[0]


def _onnx_layers(graph: onnx.ModelProto, params: QuantParams) -> list[_OnnxLayer]:
    consts = onnx_constants(graph)
    out = []
    for layer in params.layers:
        node = next(n for n in graph.graph.node if n.name == layer.name or layer.output in n.output or layer.internal[:1] == tuple(n.output[:1]))
        trans_b = bool(next((a.i for a in node.attribute if a.name == "transB"), 0)) if node.op_type == "Gemm" else False
        bias_name, bias_out, act = _epilogue(graph.graph, layer.output, set(consts), want_bias=layer.bias is None)
        if layer.activation:
            act = None
        bias_name = layer.bias or bias_name
        bias = None if bias_name is None else np.asarray(params.constant(bias_name, consts), np.float32).ravel()
        out.append(_OnnxLayer(layer.name, layer.kind, layer.op_type, params[layer.input], params[layer.output],
                              params[act] if act is not None and act in params else None, params.tensors[layer.weight],
                              np.asarray(consts[layer.weight], np.float32), trans_b,
                              params.tensors.get(layer.bias) if layer.bias else None, bias,
                              params[bias_out] if bias_out is not None and bias_out in params else None))
    return out


def _layouts(layer: _OnnxLayer, depthwise: bool = False) -> list[np.ndarray]:
    """Candidate TFLite layouts of an ONNX weight: Conv1d (O,I,K) -> (O,1,K,I) or (O,K,1,I); Conv2d OIHW -> OHWI (a
    grouped conv too: I is the input channels per group); Gemm / MatMul -> [out, in]. ``depthwise``: a
    DEPTHWISE_CONV_2D's ``(1, KH, KW, O)`` from ONNX's ``(O, 1, K)`` / ``(O, 1, KH, KW)``."""
    w = layer.weight
    if depthwise:
        if layer.kind != "conv" or w.shape[1] != 1:
            return []
        return [w.transpose(1, 2, 0)[:, None], w.transpose(1, 2, 0)[:, :, None]] if w.ndim == 3 else [w.transpose(1, 2, 3, 0)]
    if layer.kind == "conv":
        if w.ndim == 3:
            t = w.transpose(0, 2, 1)
            return [t[:, None], t[:, :, None]]
        return [w.transpose(0, 2, 3, 1)] if w.ndim == 4 else []
    if layer.op_type == "Gemm":
        return [w if layer.trans_b else w.T]
    return [w.T]


def _along(v: np.ndarray, dim: int, ndim: int) -> np.ndarray:
    """Per-channel values ``v`` shaped to broadcast along axis ``dim`` of an ``ndim`` tensor (a scalar when one)."""
    return v.reshape([-1 if a == dim else 1 for a in range(ndim)]) if len(v) > 1 else v[0]


def _converter_weights(t: Any, buf: Any) -> np.ndarray | None:
    """The converter's own int8 weights, dequantized (its per-channel scales along its quantized dimension)."""
    if buf is None or not len(buf) or t.quantization is None or t.quantization.scale is None or not len(t.quantization.scale):
        return None
    codes = np.frombuffer(np.asarray(buf, np.uint8).tobytes(), np.int8).reshape([int(d) for d in t.shape]).astype(np.float64)
    s = np.asarray(t.quantization.scale, np.float64)
    z = np.asarray(t.quantization.zeroPoint if t.quantization.zeroPoint is not None else [0], np.float64)
    z = z if len(z) == len(s) else np.zeros_like(s)  # weights are symmetric; an element-wise op's constant may not be
    dim = int(t.quantization.quantizedDimension or 0)
    return (codes - _along(z, dim, codes.ndim)) * _along(s, dim, codes.ndim)


def _tflite_weight(m: Any, t: Any, layer: _OnnxLayer, depthwise: bool = False) -> np.ndarray:
    """The ONNX weight in the TFLite tensor's layout: the candidate layout of the right shape whose values match
    the converter's own codes within half a step (so a wrong pairing or layout is never written)."""
    shape = tuple(int(d) for d in t.shape)
    deq = _converter_weights(t, m.buffers[t.buffer].data)
    q = t.quantization
    s = np.asarray(q.scale, np.float64) if q is not None and q.scale is not None and len(q.scale) else np.zeros(1)
    dim = int(q.quantizedDimension or 0) if q is not None else 0
    tol = 0.5 * _along(s, dim, len(shape)) * 1.001 + 1e-12
    for cand in _layouts(layer, depthwise):
        if cand.shape == shape and (deq is None or np.all(np.abs(cand - deq) <= tol)):
            return np.ascontiguousarray(cand, np.float32)
    raise QuantizationError(f"TFLite weight {tensor_name(t)!r} {shape} does not match ONNX layer {layer.name!r} {layer.weight.shape}",
                            "onnx2tf laid the layer out in a way nilmc does not map; lower it with an ONNX target (onnxruntime:int8)")


def plan_onnx_tensors(m: Any, graph: onnx.ModelProto, params: QuantParams) -> TensorPlan:
    """Which of nilmc's parameters (derived on ``graph``) go to which tensor of the converter's full-integer graph."""
    sg = m.subgraphs[0]
    ops = [i for i, op in enumerate(sg.operators) if op_code(m, op) in (CONV_2D, FULLY_CONNECTED, DEPTHWISE_CONV_2D)]
    layers = _onnx_layers(graph, params)
    if len(ops) != len(layers):
        raise QuantizationError(f"the TFLite graph has {len(ops)} CONV_2D/DEPTHWISE_CONV_2D/FULLY_CONNECTED ops but nilmc's graph "
                                f"{len(layers)} weighted layers",
                                "onnx2tf split or fused layers nilmc cannot map; lower it with an ONNX target (onnxruntime:int8)")
    plan = TensorPlan()
    for i, layer in _pair_layers(m, ops, layers):
        _plan_onnx_layer(m, i, layer, params, plan)
    consts = onnx_constants(graph)
    while True:  # element-wise ops, same-grid ops and data movement, to a fixed point
        before = (len(plan.activations), len(plan.layer_of_op))
        _place_elementwise(m, graph.graph, params, consts, plan)
        _place_same_grid(m, plan)
        propagate_plan(m, plan)
        if (len(plan.activations), len(plan.layer_of_op)) == before:
            break
    check_plan_complete(m, plan)
    return plan


# TFLite ops placed from the ONNX op they stand for, found from tensors already placed: a BatchNormalization after a
# ReLU (TFLite keeps it as MUL + ADD), a residual Add, a Concat, a global average pool (TFLite's int8 MEAN requantizes
# to its own output grid: nilmc's grid of the pool's output). A constant operand is requantized by nilmc.
_ELEMENTWISE = {"ADD": "Add", "MUL": "Mul", "SUB": "Sub", "LOGISTIC": "Sigmoid", "TANH": "Tanh", "CONCATENATION": "Concat",
                "MEAN": "GlobalAveragePool"}


def _reached(consumers: Mapping[str, list[onnx.NodeProto]], tensor: str) -> list[onnx.NodeProto]:
    """ONNX nodes reading ``tensor``, looking through data movement (the nodes TFLite's op after it can stand for)."""
    out, todo, seen = [], [tensor], set()
    while todo:
        for node in consumers.get(todo.pop(), []):
            if id(node) in seen:
                continue
            seen.add(id(node))
            if node.op_type in PASSTHROUGH_OPS:
                todo.append(node.output[0])
            else:
                out.append(node)
    return out


def _const_data(m: Any, t: Any) -> bool:
    buf = m.buffers[t.buffer].data if 0 < t.buffer < len(m.buffers) else None
    return buf is not None and len(buf) > 0


def _place_elementwise(m: Any, graph: onnx.GraphProto, params: QuantParams, consts: Mapping[str, np.ndarray], plan: TensorPlan) -> None:
    """Give each int8 element-wise TFLite op whose data inputs are placed the grid of the one ONNX op of its kind that
    reads the same tensors; its constant operand gets nilmc's symmetric per-tensor grid (checked against the converter's)."""
    sg = m.subgraphs[0]
    consumers = _data_consumers(graph)
    for i, op in enumerate(sg.operators):
        onnx_type = _ELEMENTWISE.get(op_name(op_code(m, op)))
        out = op.outputs[0]
        if onnx_type is None or out in plan.activations or sg.tensors[out].type not in INT8_TENSOR_TYPES:
            continue
        data = [t for t in op.inputs if t >= 0 and not _const_data(m, sg.tensors[t])]
        if not data or any(t not in plan.activations for t in data):
            continue
        found: dict[int, onnx.NodeProto] | None = None
        for t in data:
            hits = {id(n): n for n in _reached(consumers, plan.activations[t].name)
                    if n.op_type == onnx_type or (onnx_type in MEAN_OPS and n.op_type in MEAN_OPS)}
            found = hits if found is None else {k: v for k, v in found.items() if k in hits}
        if found is None or len(found) != 1:
            continue  # not found or ambiguous: check_plan_complete names the tensor
        node = next(iter(found.values()))
        if node.output[0] not in params:
            continue
        for t in op.inputs:  # int8 constants only: MEAN's int32 axes are no values
            if t >= 0 and _const_data(m, sg.tensors[t]) and t not in plan.weights and sg.tensors[t].type in INT8_TENSOR_TYPES:
                _plan_constant(m, t, node, params, consts, plan)
        plan.activations[out] = params[node.output[0]]
        plan.layer_of_op[i] = node.name or node.output[0]


def _plan_constant(m: Any, index: int, node: onnx.NodeProto, params: QuantParams, consts: Mapping[str, np.ndarray], plan: TensorPlan) -> None:
    t = m.subgraphs[0].tensors[index]
    shape = tuple(int(d) for d in t.shape)
    names = [n for n in node.input if n in consts]
    size = int(np.prod(shape, dtype=np.int64))
    cands = [np.asarray(params.constant(n, consts), np.float32) for n in names]
    deq = _converter_weights(t, m.buffers[t.buffer].data)
    for values in cands:
        if values.size != size:
            continue
        v = values.reshape(shape)
        q = t.quantization
        step = float(np.max(np.asarray(q.scale, np.float64))) if q is not None and q.scale is not None and len(q.scale) else 0.0
        if deq is None or np.all(np.abs(v - deq) <= 0.5 * step * 1.001 + 1e-12):
            plan.weights[index] = (weight_quant(f"{node.name or node.output[0]}/constant", v, None, params.traits), v)
            return
    raise QuantizationError(f"the constant operand {tensor_name(t)!r} {shape} of TFLite's {node.op_type} does not match ONNX node "
                            f"{node.name!r}", "lower it with an ONNX target (onnxruntime:int8, openvino:int8)")


def _place_same_grid(m: Any, plan: TensorPlan) -> None:
    """TFLite's int8 CONCATENATION needs every input on the output's grid (as the converter writes it): they get it."""
    sg = m.subgraphs[0]
    for op in sg.operators:
        if op_code(m, op) == CONCATENATION and op.outputs[0] in plan.activations:
            for t in op.inputs:
                if t >= 0 and t not in plan.weights:
                    plan.activations[t] = plan.activations[op.outputs[0]]


def _pair_layers(m: Any, ops: list[int], layers: list[_OnnxLayer]) -> list[tuple[int, _OnnxLayer]]:
    """Each CONV_2D / FULLY_CONNECTED op (graph order) with the first ONNX layer left, in ONNX order, of its kind whose
    weight the op's weight is (:func:`_tflite_weight`: shape and values): the k-th op with the k-th layer on a chain,
    and the right branch where the converter orders parallel layers otherwise (fuzzed: two Dense heads of a Keras
    model, concatenated, were paired crosswise and refused). An op no layer matches keeps the k-th pairing, whose
    check then says what differs."""
    sg = m.subgraphs[0]
    left = list(range(len(layers)))  # indices of the layers not paired yet, in ONNX order
    pairs = []
    for k, i in enumerate(ops):
        op = sg.operators[i]
        depthwise = op_code(m, op) == DEPTHWISE_CONV_2D
        kind = "conv" if op_code(m, op) in (CONV_2D, DEPTHWISE_CONV_2D) else "dense"
        found = next((j for j in left if layers[j].kind == kind and _weight_matches(m, sg.tensors[op.inputs[1]], layers[j], depthwise)), None)
        j = found if found is not None else (left[0] if left else k)
        if j in left:
            left.remove(j)
        pairs.append((i, layers[j]))
    return pairs


def _weight_matches(m: Any, t: Any, layer: _OnnxLayer, depthwise: bool = False) -> bool:
    try:
        _tflite_weight(m, t, layer, depthwise)
    except QuantizationError:
        return False
    return True


def _plan_onnx_layer(m: Any, op_index: int, layer: _OnnxLayer, params: QuantParams, plan: TensorPlan) -> None:
    sg = m.subgraphs[0]
    op = sg.operators[op_index]
    expected = ("CONV_2D", "DEPTHWISE_CONV_2D") if layer.kind == "conv" else ("FULLY_CONNECTED",)
    if op_name(op_code(m, op)) not in expected:
        raise QuantizationError(f"ONNX layer {layer.name!r} ({layer.op_type}) pairs with a TFLite {op_name(op_code(m, op))}",
                                "onnx2tf reordered the layers; lower it with an ONNX target (onnxruntime:int8)")
    depthwise = op_code(m, op) == DEPTHWISE_CONV_2D
    w = _tflite_weight(m, sg.tensors[op.inputs[1]], layer, depthwise)
    if depthwise:  # weights (1, KH, KW, O): per-channel scales along the last axis
        plan.weight_dims[op.inputs[1]] = 3
    fused = int(getattr(op.builtinOptions, "fusedActivationFunction", 0) or 0)
    has_bias = len(op.inputs) > 2 and op.inputs[2] >= 0
    output = layer.output
    if has_bias and layer.bias_output is not None:
        output = layer.bias_output  # TFLite's op adds the bias tf2onnx wrote as a separate Add
    if fused and layer.after_activation is not None:
        output = layer.after_activation  # the converter fused the Relu/Clip that follows a Reshape into this op
    plan.layer_of_op[op_index] = layer.name
    plan.activations[op.inputs[0]] = layer.input
    plan.activations[op.outputs[0]] = output
    plan.weights[op.inputs[1]] = (layer.weight_q, w)
    bias = layer.bias
    if has_bias:
        values = np.zeros(layer.weight.shape[0], np.float32) if bias is None else bias
        bq = layer.bias_q if layer.bias_q is not None else bias_quant(f"{layer.name}/bias", values, layer.input, layer.weight_q, params.traits)
        plan.biases[op.inputs[2]] = (bq, values)
    elif bias is not None and np.any(bias != 0) and layer.bias_output is None:  # a separate bias Add is placed on its own
        raise InternalError(f"the converter dropped the non-zero bias of layer {layer.name!r}", "report this model")


def build_int8_from_onnx(model: Model, params: QuantParams, representative: np.ndarray, spec: FullIntegerSpec, *,
                         float_input: int = 0, float_prefix: Mapping[str, str] | None = None) -> FullIntegerTFLite:
    """A full-integer TFLite flatbuffer of ``model`` (an ONNX source) carrying exactly nilmc's ``params``; ``float_input``
    (default 0): layers reading the input kept float by precise input, ``float_prefix`` the float prefix after them
    (:func:`~nilmc.backends.tflite_int8.float_input_layers`)."""
    _check_weight_traits(params, spec)
    return _write_params(structural_onnx_tflite(model, representative, io_dtype=spec.io_dtype), tf_ready_graph(model.graph), params, spec,
                         float_input=float_input, float_prefix=float_prefix)


def build_int8_from_keras(keras_model: Any, model: Model, params: QuantParams, representative: np.ndarray,
                          spec: FullIntegerSpec, *, float_input: int = 0, float_prefix: Mapping[str, str] | None = None
                          ) -> FullIntegerTFLite:
    """A full-integer TFLite flatbuffer of a Keras source that nilmc's Keras mapping cannot place (Conv1D,
    BatchNormalization, TensorFlowOpLayers, recurrent layers), carrying nilmc's ``params`` keyed by the model's ONNX graph.

    The converter's graph of the Keras model (from a batch-1 signature when it has recurrent layers, whose cells stay
    float32: :data:`~nilmc.backends.tflite_int8.FLOAT_KEPT_OPS`) is planned as an onnx2tf graph is: the k-th
    CONV_2D / FULLY_CONNECTED is the k-th weighted layer of the ONNX graph the parameters were derived on."""
    from nilmc.backends.tflite_int8 import FLOAT_KEPT_OPS, recurrent_layers, structural_tflite

    _check_weight_traits(params, spec)
    float_ops = FLOAT_KEPT_OPS if recurrent_layers(keras_model) else ()
    rep = np.asarray(representative, np.float32)[:STRUCTURE_WINDOWS]
    return _write_params(structural_tflite(keras_model, rep, io_dtype=spec.io_dtype, float_ops=float_ops), model.graph, params, spec,
                         float_input=float_input, float_prefix=float_prefix)


def split_keras(keras_model: Any, tail: FloatTail, check: np.ndarray) -> tuple[Any, Any]:
    """``(integer stage, float tail)`` Keras models of ``keras_model`` cut before layer ``tail.layer``: the model up to
    that layer's input, and that layer and every one after it rebuilt (same configuration and weights) on that input.
    Checked on ``check`` windows: the two in sequence must give the model's output (else the layers after the cut are
    not one chain, and nothing is written)."""
    from nilmc.compiler.tfcompat import import_tf

    tf = import_tf("splitting the Keras model")
    names = [layer.name for layer in keras_model.layers]
    if tail.layer not in names:
        raise QuantizationError(f"the float tail starts at Keras layer {tail.layer!r} (ONNX {tail.first_op!r}), which the Keras model "
                                "does not have", "lower it with onnxruntime:int8 or openvino:int8")
    k = names.index(tail.layer)
    head = tf.keras.Model(keras_model.inputs, keras_model.layers[k].input, name=f"{keras_model.name}_int8_stage")
    inp = tf.keras.Input(shape=tuple(keras_model.layers[k].input.shape[1:]), name="cut")
    x = inp
    for layer in keras_model.layers[k:]:
        clone = type(layer).from_config(layer.get_config())
        x = clone(x)
        clone.set_weights(layer.get_weights())
    rest = tf.keras.Model(inp, x, name=f"{keras_model.name}_float_tail")
    w = np.asarray(check, np.float32)
    want, got = np.asarray(keras_model(w, training=False)), np.asarray(rest(head(w, training=False), training=False))
    if want.shape != got.shape or not np.allclose(want, got, rtol=1e-4, atol=1e-5 * max(1.0, float(np.max(np.abs(want))))):
        raise QuantizationError(f"the Keras layers from {tail.layer!r} to the output are not one chain after the cut (the two stages "
                                f"differ from the model by {float(np.max(np.abs(want - got))) if want.shape == got.shape else 'shape'})",
                                "lower it with onnxruntime:int8 or openvino:int8 (they keep float layers inside the graph)")
    return head, rest


def build_int8_with_float_tail(keras_model: Any, model: Model, params: QuantParams, representative: np.ndarray, spec: FullIntegerSpec,
                               tail: FloatTail, *, float_input: int = 0, float_prefix: Mapping[str, str] | None = None
                               ) -> tuple[FullIntegerTFLite, bytes]:
    """``(integer stage, float32 tail flatbuffer)`` of a Keras source with a :func:`float_tail`: the model up to the cut
    as :func:`build_int8_from_keras` writes it (batch-1 signature, nilmc's ``params`` keyed by the ONNX graph up to the
    cut), and the tail converted in float32 (batch 1 when it has recurrent layers)."""
    from dataclasses import replace

    from nilmc.backends.tflite_int8 import convert_keras, structural_tflite

    _check_weight_traits(params, spec)
    rep = np.asarray(representative, np.float32)[:STRUCTURE_WINDOWS]
    head, rest = split_keras(keras_model, tail, rep[:8])
    source = onnx.ModelProto()
    source.CopyFrom(model.graph)
    if tail.cut not in {v.name for v in source.graph.value_info}:  # the extractor names its outputs from value_info
        source.graph.value_info.append(helper.make_tensor_value_info(tail.cut, onnx.TensorProto.FLOAT, None))
    graph = onnx.utils.Extractor(source).extract_model([model.input_name], [tail.cut])
    kept = {n.name for n in graph.graph.node} | {o for n in graph.graph.node for o in n.output}
    head_params = replace(params, layers=[layer for layer in params.layers if layer.name in kept or layer.output in kept])
    result = _write_params(structural_tflite(head, rep, io_dtype=spec.io_dtype, batch1=True), graph, head_params, spec,
                           float_input=float_input, float_prefix=float_prefix)
    return result, convert_keras(rest, "fp32")


def _check_weight_traits(params: QuantParams, spec: FullIntegerSpec) -> None:
    if spec.per_tensor and any(t.per_channel for t in params.by_role("weight")):
        raise InternalError(f"{spec.label}: per-tensor weights asked for but the parameters are per channel", "derive them with per-tensor traits")
    for t in params.by_role("weight"):
        if any(z != 0 for z in t.zero_point):
            raise QuantizationError(f"weight {t.name!r} has a non-zero zero point, but TFLite's int8 kernels need symmetric weights",
                                    "derive the parameters with symmetric_weights=True")


def _write_params(structure: bytes, graph: onnx.ModelProto, params: QuantParams, spec: FullIntegerSpec, *,
                  float_input: int = 0, float_prefix: Mapping[str, str] | None = None) -> FullIntegerTFLite:
    """nilmc's ``params`` (keyed by ``graph``) written into every quantized tensor of the converter's ``structure``;
    with ``float_input`` (and ``spec.float_input``) the layers reading the input, and ``float_prefix``, then run in float32."""
    m = load_flatbuffer(structure)
    clear_orphan_buffers(m)  # same inputs, same bytes
    plan = plan_onnx_tensors(m, graph, params)
    apply_plan(m, plan, params.traits)
    floats = float_input_layers(m, plan, expected=float_input, prefix=float_prefix) if float_input and spec.float_input else []
    fb = pack_flatbuffer(m)
    result = FullIntegerTFLite(fb, plan, spec.io_dtype, spec.per_tensor, float_layers=floats)
    result.check = check_params(fb, plan)
    if not result.check["ok"]:
        raise InternalError(f"the written TFLite file does not carry nilmc's parameters: {result.check['mismatches'][:3]}", "report this")
    return result


def onnx_integer_params(model: Model, spec: FullIntegerSpec, options: Mapping[str, Any], *, estimator: str | None = None,
                        tail: FloatTail | None = None) -> IntegerParams:
    """nilmc's shared parameters for ``spec`` (``options["params"]`` when the driver derived them under its traits), after
    the overflow checks; ``kq`` is None (there is no Keras model); ``tail``: a :func:`float_tail`'s layers and activations
    kept float."""
    return shared_integer_params(model, spec, options, estimator=estimator, float_tail=() if tail is None else tail.nodes | tail.tensors)


def output_cover_watts(params: QuantParams, model: Model) -> dict[str, Any]:
    """The watts the output grid can represent, and whether it reaches the contract's peak power."""
    lo, hi = params[model.output_name].representable()
    return cover_watts(float(np.min(lo)), float(np.max(hi)), model.contract)


def cover_watts(lo: float, hi: float, contract: Any) -> dict[str, Any]:
    """The watts an output grid from ``lo`` to ``hi`` (graph output values) represents, and whether it reaches the
    contract's peak power (element-wise de-normalization: a sequence output's grid holds every step)."""
    w = np.asarray(contract.values_to_watts(np.array([lo, hi], np.float32)), np.float64)
    return {"representable_w": [float(w.min()), float(w.max())], "peak_power_w": contract.peak_power_w,
            "covers_peak": contract.peak_power_w is None or float(w.max()) >= contract.peak_power_w}


# --------------------------------------------------------------------------- pre-check (the graph alone, milliseconds)
def data_path_ops(graph: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Nodes on the float data path from the graph input: shape math (behind a Shape, or a Reshape's shape input) excluded."""
    g = graph.graph
    live = {i.name for i in g.input}
    out = []
    for node in g.node:  # ONNX nodes are topologically sorted
        data_inputs = node.input[:1] if node.op_type in ("Reshape", "Expand", "Tile", "Slice", "Gather") else node.input
        if node.op_type == "Shape" or not any(i in live for i in data_inputs):
            continue
        out.append(node)
        live.update(node.output)
    return out


def int8_precheck(graph: onnx.ModelProto, target: str) -> str | None:
    """Why the ONNX INT8 route cannot place ``graph`` (one line with a remedy after ``; ``), or None."""
    nodes = data_path_ops(graph)
    bad = sorted({n.op_type for n in nodes if n.op_type not in INT8_DATA_OPS})
    if bad:
        return (f"{target} from an ONNX model places Conv/Gemm/MatMul layers (grouped and depthwise too) with Relu/Clip, pooling, a "
                f"Sigmoid and data movement only; "
                f"the graph has {', '.join(bad)}; lower it with onnxruntime:int8 or openvino:int8 (or try tflite:fp32: onnx2tf "
                "converts many such graphs in float, not all)")
    adds = [n for n in nodes if n.op_type == "Add" and not _bias_add(n, graph)]
    if adds:
        return (f"{target} from an ONNX model does not place a residual Add ({adds[0].name or adds[0].output[0]}); "
                "lower it with onnxruntime:int8 or openvino:int8")
    padded = [n.name or n.output[0] for n in nodes if n.op_type == "AveragePool" and _padded_excluding_pad(n)]
    if padded:  # measured on onnx2tf 1.28 + TF 2.21 (a count_include_pad=1 pool is a PAD + AVERAGE_POOL_2D, which is placed)
        return (f"{target} does not place the padded AveragePool {padded[0]!r} (count_include_pad=0): onnx2tf writes it as PAD + "
                "AVERAGE_POOL_2D + a MUL by per-position correction constants that nilmc has no parameters for; lower it with "
                "onnxruntime:int8 or openvino:int8, or export the pool with count_include_pad=True or without padding")
    dilated = [n.name for n in nodes if n.op_type == "Conv" and any(a.name == "dilations" and max(a.ints, default=1) > 1 for a in n.attribute)]
    if dilated:  # measured on onnx2tf 1.28 + TF 2.21: the pre-bias CONV_2D output has no ONNX tensor to take a grid from
        return (f"{target} does not place the dilated Conv {dilated[0]!r}: the converter writes it as SPACE_TO_BATCH_ND + a CONV_2D "
                "without bias + BATCH_TO_SPACE_ND + a bias ADD, and nilmc has no parameters for the pre-bias tensor; "
                "lower it with onnxruntime:int8 or openvino:int8 (or try tflite:fp32: onnx2tf converts many such graphs in float, not all)")
    return None


def _padded_excluding_pad(node: onnx.NodeProto) -> bool:
    """An AveragePool with padding that its average leaves out (``count_include_pad`` 0, ONNX's default)."""
    a = {x.name: x for x in node.attribute}
    pads = list(a["pads"].ints) if "pads" in a else []
    auto = a["auto_pad"].s.decode() if "auto_pad" in a else "NOTSET"
    return (any(pads) or auto in ("SAME_UPPER", "SAME_LOWER")) and not (a["count_include_pad"].i if "count_include_pad" in a else 0)


# ONNX ops (tf2onnx's form of a Keras model) on the data path that the Keras full-integer route places or keeps float:
# weighted layers, BatchNormalization as Mul/Add, Sigmoid/Tanh, data movement around recurrent layers, the LSTM (kept float).
KERAS_INT8_DATA_OPS = INT8_DATA_OPS | frozenset({"Mul", "Sub", "Sigmoid", "Tanh", "Concat", "Slice", "Squeeze", "Unsqueeze", "LSTM"})
# Recurrent ONNX ops the TFLite converter turns into a WHILE loop: its full-integer quantizer crashes the process on them
# (a segmentation fault, TensorFlow 2.21, with or without the loop deny-listed; measured on a Keras BiGRU).
LOOP_RECURRENT_OPS = frozenset({"GRU", "RNN"})


@dataclass(frozen=True)
class FloatTail:
    """The layers of a Keras model from the first one the full-integer route cannot take to the output, run as a
    float32 TFLite stage after the integer one (the accelerator/CPU split: seed 002's CtRNN keeps its conv blocks in
    int8 and its transposed conv, GRU and dense head in float). ``cut``: the ONNX tensor entering it (the integer
    stage's output); ``layer``: the Keras name of its first layer; ``nodes`` / ``tensors``: its ONNX nodes and tensors."""

    cut: str
    layer: str
    first_op: str
    nodes: frozenset[str]
    tensors: frozenset[str]


def _refused_keras_ops(nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    return [n for n in nodes if n.op_type in LOOP_RECURRENT_OPS or n.op_type not in KERAS_INT8_DATA_OPS]


def _keras_scope(node: onnx.NodeProto, g: onnx.GraphProto) -> str | None:
    """The tf2onnx name scope ``<model>/<layer>/`` of ``node``, or of its nearest producer that has one (tf2onnx names the
    GRU node it fuses ``GRU__42``; the transpose before it is ``ctrnn/gru/...``)."""
    producers = {o: n for n in g.node for o in n.output}
    todo, seen = [node], {id(node)}
    while todo:
        n = todo.pop(0)
        parts = n.name.split("/")
        if len(parts) >= 3:
            return "/".join(parts[:2]) + "/"
        for i in n.input:
            p = producers.get(i)
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                todo.append(p)
    return None


def float_tail(graph: onnx.ModelProto) -> FloatTail | None:
    """The float tail of a tf2onnx graph (a Keras source), or None: it starts at the Keras layer (tf2onnx name scope
    ``<model>/<layer>/``) of the first data-path op the full-integer route refuses, is entered through one tensor, and
    holds every refused op and the graph output; nothing after the cut reads a tensor before it (one pre -> tail chain)."""
    nodes = data_path_ops(graph)
    refused = _refused_keras_ops(nodes)
    g = graph.graph
    scope = _keras_scope(refused[0], g) if refused else None
    if scope is None:
        return None
    consts = {t.name for t in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}
    scoped = [n for n in g.node if n.name.startswith(scope)]
    produced = {o for n in scoped for o in n.output}
    entering = list(dict.fromkeys(i for n in scoped for i in n.input if i and i not in produced and i not in consts))
    if not entering:
        return None
    cut = entering[0]  # the scope's first input; the others must come from the cut too (tf2onnx's unscoped helper nodes)
    if cut in {i.name for i in g.input}:
        return None  # nothing would be left for the integer stage
    tensors, tail = {cut}, []
    for node in g.node:  # topological: everything that depends on the cut
        if any(i in tensors for i in node.input):
            tail.append(node)
            tensors.update(node.output)
    outside = {i for n in tail for i in n.input if i and i not in tensors and i not in consts} | (set(entering) - tensors)
    names = {n.name for n in tail}
    if outside or any(o.name not in tensors for o in g.output) or any(n.name not in names for n in refused):
        return None
    return FloatTail(cut, scope.split("/")[1], refused[0].name, frozenset(names), frozenset(tensors - {cut}))


def _empty_integer_stage(graph: onnx.ModelProto, tail: FloatTail, target: str) -> str | None:
    """Why a float tail leaves the integer stage nothing to run in INT8 (its only weighted layers read the float graph
    input: precise input keeps them float), or None."""
    from nilmc.quantization.graph import analyze, input_layers

    m = onnx.ModelProto()
    m.CopyFrom(graph)
    g = analyze(m)
    head = [la.name for la in g.layers if la.name not in tail.nodes]
    reading = {la.name for la in input_layers(m, g) or ()}
    if head and not set(head) <= reading:
        return None
    before = f"before it only {', '.join(head)}, which reads the float input (precise input: kept float)" if head else "no layer before it"
    return (f"{target} would run the layers from {tail.first_op} on in a float32 tail stage, and {before}: nothing would run in "
            "INT8; lower it with tflite:fp32, or onnxruntime:int8 / openvino:int8")


def keras_int8_precheck(graph: onnx.ModelProto, target: str, *, qat: bool = False, tail: bool = False) -> str | None:
    """Why the full-integer route cannot take a Keras source whose ONNX form is ``graph`` (one line, remedy after
    ``; ``), or None. From the graph alone, in milliseconds, before any calibration. ``tail`` (default False): the target
    runs a :func:`float_tail` of the ops it refuses as a float32 stage (tflite:int8)."""
    nodes = data_path_ops(graph)
    ops = {n.op_type for n in nodes}
    backend = target.split(":")[0]
    found = float_tail(graph) if _refused_keras_ops(nodes) else None
    if tail and not qat and found is not None:
        return _empty_integer_stage(graph, found, target)
    loops = sorted(ops & LOOP_RECURRENT_OPS)
    if loops:
        where = ("; tflite:int8 and eiq:int8 run it in a float32 tail stage after the integer one" if found is not None and not tail
                 else ", and it is not in a float tail (one tensor into the layers from it to the output)")
        return (f"{target} cannot take {', '.join(loops)}: the TFLite converter lowers it to a WHILE loop and its full-integer "
                f"quantizer crashes on that loop (TensorFlow 2.21){where}; lower it with onnxruntime:int8 or openvino:int8, or tflite:fp32")
    if qat and ops & {"LSTM"}:
        return f"{target} fine-tunes Conv2D/Dense Keras models and the model has LSTM; use {backend}:int8 (PTQ, the LSTM kept float32)"
    bad = sorted(ops - KERAS_INT8_DATA_OPS)
    if bad:
        return (f"{target} from a Keras model places Conv1D/Conv2D, Dense, BatchNormalization, element-wise ops and LSTM (kept float); "
                f"the graph has {', '.join(bad)}; lower it with onnxruntime:int8 or openvino:int8")
    return None


# onnx2tf 1.28 behind a rank-2 (N, T) input, measured on outside models: a Conv reading the input unsqueezed to
# (N, 1, T) fails (tf.nn.convolution gets the wrong layout: onnx2tf cannot know that tensor is NCW), an LSTM fails
# (its initial_state check); a Gemm / MatMul chain converts and passes the float check (the same numbers).
def onnx2tf_precheck(graph: onnx.ModelProto, target: str) -> str | None:
    """Why onnx2tf cannot convert ``graph`` for ``target`` (one line, remedy after ``; ``), or None: from the graph alone."""
    if len(graph.graph.input[0].type.tensor_type.shape.dim) != 2:
        return None
    ops = {n.op_type for n in data_path_ops(graph)}
    recurrent = sorted(ops & {"LSTM", "GRU", "RNN"})
    if recurrent:
        return (f"{target} converts an ONNX model through onnx2tf, which fails on the {', '.join(recurrent)} of a model with a "
                "rank-2 (N, T) input (its initial_state check); lower it with onnxruntime:fp32, openvino:fp32 or onnxruntime:int8")
    conv = sorted(ops & {"Conv", "ConvTranspose"})
    if conv:
        return (f"{target} converts an ONNX model through onnx2tf, which does not convert {', '.join(conv)} behind a rank-2 (N, T) "
                "input (it cannot tell the layout of the tensor the model unsqueezes); export the model with an (N, T, 1) or "
                "(N, 1, T) input, or lower it with onnxruntime:fp32, onnxruntime:int8 or openvino:int8")
    return None


def _bias_add(node: onnx.NodeProto, graph: onnx.ModelProto) -> bool:
    consts = {t.name for t in graph.graph.initializer} | {o for n in graph.graph.node if n.op_type == "Constant" for o in n.output}
    return any(i in consts for i in node.input)

"""The ideal INT8 reference: an ONNX QDQ graph written from nilmc's own parameters.

Hand-written, not ``onnxruntime.quantization.quantize_static``. The library can take
per-tensor scale/zero-point overrides (``TensorQuantOverrides``), but it decides by
itself *where* Q/DQ go: on tf2onnx graphs it quantizes the ``MatMul`` output before the
bias ``Add`` (an extra int8 rounding no integer target performs), computes weight
codes and the int32 bias with its own rounding, and may delete ``Relu`` nodes. Here
the placement follows :mod:`graph` (fused layers: one requantization after
weight -> bias -> activation) and every integer in the graph comes from :mod:`params`
and :mod:`intops`, so the scales and zero points in the graph equal the parameters
bit for bit.

What is written:

* every quantization point and every passthrough tensor: ``QuantizeLinear`` ->
  ``DequantizeLinear`` right after its producer (graph inputs too; a graph output keeps
  its name on the ``DequantizeLinear`` output). Passthrough tensors repeat their
  source's parameters, so the extra pair is exact (idempotent) and every weighted op
  reads a ``DequantizeLinear`` directly, as TensorRT's Q/DQ rules want.
* weights as integer initializers + ``DequantizeLinear`` (per-channel ``axis`` = 0 for
  Conv OIHW, 1 for MatMul ``[in, out]``).
* bias as an *integer* initializer + ``DequantizeLinear``: int32 at ``s_in * s_w`` (what
  integer kernels add to the accumulator, so the reference sees the same bias rounding)
  or, for 8-bit-bias traits (DPU), int8 with its own scale.

Mixed precision: names in ``keep_float`` (the keyword option, united with
``params.keep_float``) stay float. A *layer* name keeps that layer's weight and bias
float and leaves its input activation unquantized, so the layer computes in FP32; an
*activation* name leaves that tensor (and every passthrough tensor sharing its
parameters) unquantized. Bias-corrected values in ``params.adjusted`` replace the
graph's constants (quantized, or written as float for kept layers).

Activation rounding in the graph is onnxruntime's QuantizeLinear (half to even)
whatever ``traits.rounding`` says; weight and bias codes use ``traits.rounding``.
Writes ONNX IR 10; the default-domain opset is raised to 13 (per-channel
DequantizeLinear) or 21 when an int16 tensor is present.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any, cast

import numpy as np
import onnx
from onnx import helper, numpy_helper

from nilmc.compiler.errors import QuantizationError
from nilmc.compiler.model import ONNX_IR_VERSION
from nilmc.quantization.graph import QuantGraph, analyze
from nilmc.quantization.params import QuantParams, TensorQuant, quantize_constant
from nilmc.quantization.statistics import model_digest

_MIN_OPSET = 13
_INT16_OPSET = 21


def _scale_zp_inits(prefix: str, tq: TensorQuant) -> list[onnx.TensorProto]:
    scale = tq.scales() if tq.per_channel else np.float32(tq.scale[0])
    zp = tq.zero_points().astype(tq.rng.np_dtype)
    zp = zp if tq.per_channel else zp[0]
    return [numpy_helper.from_array(np.asarray(scale, np.float32), prefix + "_scale"),
            numpy_helper.from_array(np.asarray(zp, tq.rng.np_dtype), prefix + "_zero_point")]


def _axis(tq: TensorQuant) -> dict[str, Any]:  # Any: make_node's other keywords are typed
    return {"axis": int(cast(int, tq.axis))} if tq.per_channel else {}


def _dq_node(src: str, dst: str, prefix: str, tq: TensorQuant) -> onnx.NodeProto:
    return helper.make_node("DequantizeLinear", [src, prefix + "_scale", prefix + "_zero_point"], [dst],
                            name=prefix + "_DequantizeLinear", **_axis(tq))


def _q_node(src: str, dst: str, prefix: str) -> onnx.NodeProto:
    return helper.make_node("QuantizeLinear", [src, prefix + "_scale", prefix + "_zero_point"], [dst],
                            name=prefix + "_QuantizeLinear")


def _constant_qdq(name: str, params: QuantParams, g: QuantGraph) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    tq = params.tensors[name]
    codes = quantize_constant(tq, params.constant(name, g.constants), params.traits)
    inits = [numpy_helper.from_array(codes, name + "_quantized"), *_scale_zp_inits(name, tq)]
    return [_dq_node(name + "_quantized", name + "_dequantized", name, tq)], inits


def _rename_inputs(nodes: list[onnx.NodeProto], old: str, new: str, skip: set[str]) -> None:
    for node in nodes:
        if node.name in skip:
            continue
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new


def _activation_qdq(
    tensor: str, params: QuantParams, nodes: list[onnx.NodeProto], outputs: set[str]
) -> tuple[str, list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Q/DQ pair for one activation; returns the tensor the pair hangs off, its nodes and initializers."""
    tq = params[tensor]
    prefix = tensor + "_act"
    src, dst = tensor, tensor + "_dequantized"
    q, dq = _q_node(src, tensor + "_quantized", prefix), _dq_node(tensor + "_quantized", dst, prefix, tq)
    if tensor in outputs:  # the graph output keeps its name: the producer writes <name>_float instead
        src, dst = tensor + "_float", tensor
        for node in nodes:
            node.output[:] = [src if o == tensor else o for o in node.output]
        q.input[0], dq.output[0] = src, dst
    else:
        _rename_inputs(nodes, tensor, dst, skip={q.name})
    return src, [q, dq], _scale_zp_inits(prefix, tq)


def float_sets(g: QuantGraph, names: Iterable[str]) -> tuple[set[str], set[str]]:
    """Resolve ``keep_float`` names: (activation tensors left unquantized, constants left float).

    A layer name keeps its weight and bias float and its input activation (with every
    tensor sharing that activation's parameters) unquantized; an activation name keeps
    that activation and its sharers. Unknown names raise :class:`QuantizationError`.
    """
    layers = {l.name: l for l in g.layers}
    points = set(g.quant_points) | set(g.shared)
    roots: set[str] = set()
    consts: set[str] = set()
    unknown = []
    for name in names:
        if name in layers:
            layer = layers[name]
            consts.update(n for n in (layer.weight, layer.bias) if n)
            roots.add(g.root(layer.input))
        elif name in points:
            roots.add(g.root(name))
        else:
            unknown.append(name)
    if unknown:
        raise QuantizationError(f"keep_float names {sorted(unknown)} are neither layers nor activation tensors of this model",
                                f"layers: {', '.join(layers)}; activations: {', '.join(g.quant_points)}")
    tensors = {t for t in points if g.root(t) in roots}
    return tensors, consts


def _check(onnx_model: onnx.ModelProto, params: QuantParams, g: QuantGraph, skip: set[str] = frozenset()) -> None:  # type: ignore[assignment]
    if params.model_digest and params.model_digest != model_digest(onnx_model):
        raise QuantizationError("the quantization parameters were derived for a different model",
                                "derive them again for this graph (derive_params)")
    missing = [t for t in g.quant_points + list(g.shared) if t not in skip and t not in params]
    missing += [n for l in g.layers for n in (l.weight, l.bias) if n and n not in skip and n not in params.tensors]
    if missing:
        raise QuantizationError(f"no quantization parameters for tensors {missing}", "derive parameters for this model")


def _set_opset(model: onnx.ModelProto, params: QuantParams) -> None:
    needed = _INT16_OPSET if any(t.range_name == "int16" for t in params.tensors.values()) else _MIN_OPSET
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            if op.version < _MIN_OPSET:
                raise QuantizationError(f"the model uses opset {op.version}; QDQ needs at least {_MIN_OPSET}",
                                        "re-export the model with opset 13 or newer (tf2onnx --opset 17)")
            op.version = max(op.version, needed)
    model.ir_version = ONNX_IR_VERSION


def _drop_unused(model: onnx.ModelProto) -> None:
    used = {n for node in model.graph.node for n in node.input} | {o.name for o in model.graph.output}
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    nodes = [n for n in model.graph.node if n.op_type != "Constant" or any(o in used for o in n.output)]
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def _float_constants(model: onnx.ModelProto, names: set[str], params: QuantParams) -> None:
    """Write adjusted (bias-corrected) float values over the graph's own for constants that stay float."""
    for init in model.graph.initializer:
        if init.name in names and init.name in params.adjusted:
            init.CopyFrom(numpy_helper.from_array(np.asarray(params.adjusted[init.name], np.float32).reshape(tuple(init.dims)), init.name))
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] in names and node.output[0] in params.adjusted:
            for attr in node.attribute:
                if attr.name == "value":
                    value = np.asarray(params.adjusted[node.output[0]], np.float32).reshape(tuple(attr.t.dims))
                    attr.t.CopyFrom(numpy_helper.from_array(value, attr.t.name))


def _weights_qdq(
    g: QuantGraph, params: QuantParams, nodes: list[onnx.NodeProto], skip: set[str] = frozenset()  # type: ignore[assignment]
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Integer initializers + DequantizeLinear for every layer's weight and bias; consumers rewired."""
    head: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    done: set[str] = set()
    for layer in g.layers:
        for name in (layer.weight, layer.bias):
            if name is None or name in done or name in skip:
                continue
            dq, extra = _constant_qdq(name, params, g)
            head += dq
            inits += extra
            done.add(name)
            _rename_inputs(nodes, name, name + "_dequantized", skip=set())
    return head, inits


def portable_weights(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of a QDQ ``model`` whose int8 constants read by a ``DequantizeLinear`` (weights) are stored as uint8 codes
    ``c + 128`` with zero point ``z + 128`` (128 for symmetric weights): the same dequantized values, bit for bit.
    Returns the copy and the names of the constants rewritten (``model`` itself when there are none).

    Why: onnxruntime's x86 CPU kernels fuse a DQ -> Conv/MatMul pair with uint8 activations and int8 weights into a
    u8 x s8 GEMM whose AVX2 / AVX-512 (non-VNNI) kernel sums pairs of products with ``vpmaddubsw``, which saturates at
    int16: ``255 * 127 * 2`` does not fit. Measured on an AVX2 AMD EPYC (tests/quantization's seq2point, generic INT8):
    10.7 dB output SQNR against 30.8 dB with the same codes unfused; with uint8 weights 30.8 dB (the u8 x u8 kernel
    widens to 16 bits before multiplying). onnxruntime's docs and OpenVINO's "saturation issue" page describe the
    same; their remedy, 7-bit weights, costs a bit of precision on every CPU, this storage none."""
    inits = {t.name: t for t in model.graph.initializer}
    todo = []
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or len(node.input) < 3:
            continue
        codes, zp = inits.get(node.input[0]), inits.get(node.input[2])
        if codes is None or zp is None or codes.data_type != onnx.TensorProto.INT8 or zp.data_type != onnx.TensorProto.INT8:
            continue
        todo.append((node.input[0], node.input[2]))
    if not todo:
        return model, []
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name: t for t in out.graph.initializer}
    shared = {name for name, _ in todo} & {z for _, z in todo}
    if shared:
        raise QuantizationError(f"a DequantizeLinear reads {sorted(shared)[0]!r} as codes and as a zero point", "report this model")
    rewritten = {c for c, _ in todo}
    other_readers = {n.input[2] for n in out.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                     and len(n.input) > 2 and n.input[0] not in rewritten}
    if other_readers & {z for _, z in todo}:  # a zero point an activation's Q/DQ reads too: it must stay int8
        raise QuantizationError(f"zero point {sorted(other_readers & {z for _, z in todo})[0]!r} is shared by a weight and an "
                                "activation", "give each quantized tensor its own zero point")
    for name in rewritten | {z for _, z in todo}:  # each initializer once, however many nodes read it
        v = numpy_helper.to_array(inits[name]).astype(np.int16)
        inits[name].CopyFrom(numpy_helper.from_array((v + 128).astype(np.uint8), name))
    return out, sorted(rewritten)


def build_qdq_model(onnx_model: onnx.ModelProto, params: QuantParams, *, keep_float: Iterable[str] = ()) -> onnx.ModelProto:
    """An ONNX QDQ model (IR 10) of ``onnx_model`` with exactly the scales and zero points in ``params``.

    ``keep_float`` (default empty; united with ``params.keep_float``): layer names and
    activation tensors left at FP32 (see the module docstring). Raises
    :class:`QuantizationError` when ``params`` belong to another model, miss a tensor,
    or ``keep_float`` names something the model does not have.
    """
    model = onnx.ModelProto()
    model.CopyFrom(onnx_model)
    g = analyze(model)
    float_acts, float_consts = float_sets(g, [*params.keep_float, *keep_float])
    _check(onnx_model, params, g, float_acts | float_consts)
    _float_constants(model, float_consts, params)
    nodes = list(model.graph.node)
    head, inits = _weights_qdq(g, params, nodes, float_consts)
    after: dict[str, list[onnx.NodeProto]] = {}  # tensor -> Q/DQ nodes that follow its producer
    for tensor in g.quant_points + list(g.shared):
        if tensor in float_acts:
            continue
        anchor, qdq, extra = _activation_qdq(tensor, params, nodes, set(g.outputs))
        inits += extra
        after.setdefault(anchor, []).extend(qdq)
    ordered = head + [n for t in g.inputs for n in after.get(t, [])]
    for node in nodes:
        ordered.append(node)
        for out in node.output:
            ordered += after.get(out, [])
    del model.graph.node[:]
    model.graph.node.extend(ordered)
    model.graph.initializer.extend(inits)
    _drop_unused(model)
    _set_opset(model, params)
    onnx.checker.check_model(model)
    return model

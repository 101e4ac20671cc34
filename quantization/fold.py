"""Fold the input normalization and the target de-normalization into the graph.

The folded model takes **raw features** and returns **watts**; its contract says
``folded=True`` (``contract.prepare`` passes raw windows through, ``to_watts`` is the
identity). Every normalization A–E is affine per feature, ``n = x * s + o``, and the
target scaling is ``watts = y * std + mean``, so both fold exactly — where the graph
allows it.

Input side (``input_mode``):

* ``"weights"``: into the first weighted layer, ``w' = w * s`` and ``b' = b + w . o``.
  Exact for a dense first layer (MatMul/Gemm; ``s``/``o`` are carried through the
  Reshape/Transpose chain in front of it element by element). For a Conv it is exact
  only when ``s`` and ``o`` are constant over the spatial axes (per input channel) **and**
  either the Conv has no padding or ``o`` is 0: zero padding pads the *normalized* input
  with 0, which the raw input can only reproduce with the raw value ``-o/s`` — folding the
  offset into the bias would add ``w . o`` at border positions where the original graph
  added nothing. In seq2point graphs the features lie along the Conv's *width* axis
  (``(N, 1, frames, features)``), so ``s`` varies spatially and weight folding is
  impossible anyway.
* ``"ops"``: an explicit ``Mul(s)`` + ``Add(o)`` at the graph input. Always exact.
  INT8 targets want this form even for dense layers: the normalized tensor stays a
  quantization point of its own, while per-tensor INT8 quantization of *raw* features
  would lose the small ones (what :func:`normalization_check.check_feature_scales` flags).
  The raw input and the ``Mul`` output are listed in ``FoldResult.float_tensors`` so the
  QDQ graph leaves them float (``build_qdq_model(..., keep_float=...)``).
* ``"auto"`` (default): weights when exact, else ops. ``"skip"``: leave the input alone.

Partial folds (one side ``"skip"``) keep ``folded=False`` and say what changed instead:
normalization ``A`` (the graph takes raw features) or an identity target scaling (it
returns watts).

Output side (``output_mode``): ``"weights"`` folds ``std`` and ``mean`` into the last
layer when it is linear (no activation) and has a bias: ``w' = w * std``,
``b' = b * std + mean``; ``"ops"`` appends ``Mul(std)`` + ``Add(mean)``; ``"auto"``
weights when possible. A contract with ``mean = 0, std = 1`` needs nothing.

:func:`verify_fold` runs both graphs in FP32 and returns the largest output difference
relative to the largest output (watts); :func:`fold_normalization` raises
:class:`InternalError` when that exceeds ``rtol`` (default 1e-4) on the windows given.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import onnx
from onnx import helper, numpy_helper

from nilmc.compiler.contract import ModelContract
from nilmc.compiler.errors import InternalError, QuantizationError
from nilmc.compiler.model import ONNX_IR_VERSION, Model
from nilmc.quantization import _ort
from nilmc.quantization.graph import Layer, QuantGraph, analyze, node_names

MODES = ("auto", "weights", "ops", "skip")
_LINEAR_PASSTHROUGH = frozenset({"Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"})
FEATURE_AXIS = 2  # of (N, frames, features, 1)


@dataclass
class FoldResult:
    """The folded model and how it was folded."""

    model: Model
    input_mode: str  # weights | ops | none
    output_mode: str  # weights | ops | none
    notes: list[str] = field(default_factory=list)
    float_tensors: tuple[str, ...] = ()  # keep these float in INT8 graphs (raw input, Mul output)
    max_rel_error: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"input_mode": self.input_mode, "output_mode": self.output_mode, "notes": list(self.notes),
                "float_tensors": list(self.float_tensors), "max_rel_error": self.max_rel_error}


# --------------------------------------------------------------------------- graph helpers
def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    return m


def _uses(model: onnx.ModelProto, name: str) -> int:
    return sum(1 for n in model.graph.node for i in n.input if i == name)


def _set_constant(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    for init in model.graph.initializer:
        if init.name == name:
            init.CopyFrom(numpy_helper.from_array(np.asarray(value, np.float32).reshape(tuple(init.dims)), name))
            return
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            for attr in node.attribute:
                if attr.name == "value":
                    attr.t.CopyFrom(numpy_helper.from_array(np.asarray(value, np.float32).reshape(tuple(attr.t.dims)), attr.t.name))
                    return
    raise InternalError(f"constant {name!r} not found while folding", "report this as a nilmc bug")


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    node: onnx.NodeProto = next(n for n in model.graph.node if n.name == name)
    return node


def _producer_chain(model: onnx.ModelProto, g: QuantGraph, start: str, end: str) -> list[onnx.NodeProto] | None:
    """Nodes from graph input ``start`` to tensor ``end`` when they form a single chain of linear passthrough ops."""
    chain, tensor = [], end
    producers = {o: n for n in model.graph.node for o in n.output}
    while tensor != start:
        node = producers.get(tensor)
        if node is None or node.op_type not in _LINEAR_PASSTHROUGH:
            return None
        chain.append(node)
        tensor = node.input[0]
    if _uses(model, start) != 1 or any(_uses(model, n.output[0]) != 1 for n in chain):
        return None  # every tensor on the way must feed only the chain (and the layer)
    return chain[::-1]


def _per_element(vec: np.ndarray, shape: tuple[int, ...], axis: int) -> np.ndarray:
    """Broadcast a per-feature vector over one window ``shape`` (without batch) along ``axis`` (with batch)."""
    b = [1] * (len(shape) + 1)
    b[axis] = -1
    return np.broadcast_to(np.asarray(vec, np.float32).reshape(b), (1, *shape)).copy()


# --------------------------------------------------------------------------- input side
def _insert_input_ops(model: onnx.ModelProto, name: str, scale: np.ndarray, offset: np.ndarray, ndim: int) -> tuple[str, str]:
    shape = [1] * ndim
    shape[FEATURE_AXIS] = -1
    s = numpy_helper.from_array(np.asarray(scale, np.float32).reshape(shape), "nilmc_fold/input_scale")
    o = numpy_helper.from_array(np.asarray(offset, np.float32).reshape(shape), "nilmc_fold/input_offset")
    scaled, normalized = "nilmc_fold/input_scaled", "nilmc_fold/input_normalized"
    for node in model.graph.node:
        node.input[:] = [normalized if i == name else i for i in node.input]
    mul = helper.make_node("Mul", [name, s.name], [scaled], name="nilmc_fold/input_mul")
    add = helper.make_node("Add", [scaled, o.name], [normalized], name="nilmc_fold/input_add")
    nodes = [mul, add, *model.graph.node]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.initializer.extend([s, o])
    return scaled, normalized


def _first_layer(g: QuantGraph, name: str) -> Layer | None:
    readers = [l for l in g.layers if g.root(l.input) == name]
    return readers[0] if len(readers) == 1 else None


def _carried(model: onnx.ModelProto, layer: Layer, tensor: np.ndarray) -> np.ndarray:
    """``tensor`` (one window of per-element values) pushed through the passthrough chain to the layer's input."""
    if layer.input in {i.name for i in model.graph.input}:
        return tensor
    return _ort.run(model, tensor, [layer.input], batch_size=1)[layer.input]


def _fold_input_weights(model: onnx.ModelProto, g: QuantGraph, layer: Layer, s_el: np.ndarray, o_el: np.ndarray) -> str | None:
    """Fold into ``layer``'s weights in place; returns why it cannot be done exactly (None when done)."""
    if layer.bias is None:
        return "the first layer has no bias to take the offset"
    if _uses(model, layer.weight) != 1 or _uses(model, layer.bias) != 1:
        return "the first layer's weight or bias is shared with other nodes"
    s_at, o_at = _carried(model, layer, s_el), _carried(model, layer, o_el)
    w = np.asarray(g.constants[layer.weight], np.float64)
    b = np.asarray(g.constants[layer.bias], np.float64)
    node = _node(model, layer.name)
    if layer.kind == "dense":
        if node.op_type == "Gemm" and (_attr(node, "alpha", 1.0) != 1.0 or _attr(node, "beta", 1.0) != 1.0 or _attr(node, "transA", 0)):
            return "Gemm with alpha/beta/transA"
        s_vec, o_vec = s_at.reshape(-1).astype(np.float64), o_at.reshape(-1).astype(np.float64)
        w_in_out = w.T if layer.weight_axis == 0 else w  # [in, out]
        new_w = w_in_out * s_vec[:, None]
        new_b = b.reshape(-1) + o_vec @ w_in_out
        _set_constant(model, layer.weight, new_w.T if layer.weight_axis == 0 else new_w)
        _set_constant(model, layer.bias, new_b.reshape(b.shape))
        return None
    return _fold_conv_input(model, node, layer, w, b, s_at, o_at)


def _fold_conv_input(model: onnx.ModelProto, node: onnx.NodeProto, layer: Layer, w: np.ndarray, b: np.ndarray,
                     s_at: np.ndarray, o_at: np.ndarray) -> str | None:
    if _attr(node, "group", 1) != 1:
        return "grouped convolution"
    s_c, o_c = s_at[0, :, :1, :1], o_at[0, :, :1, :1]
    if not (np.allclose(s_at[0], s_c, rtol=0, atol=0) and np.allclose(o_at[0], o_c, rtol=0, atol=0)):
        return ("the normalization varies along the convolution's spatial axes (features lie on its width axis), "
                "so no per-channel weight scaling can express it")
    padded = any(_attr(node, "pads", [0]) or [0]) or _attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID", "NOTSET", "VALID")
    if padded and np.any(o_c != 0):
        return ("the convolution zero-pads: padding the raw input with 0 is not padding the normalized input with 0, "
                "so folding the offset into the bias would be wrong at the borders")
    s_vec, o_vec = s_c.reshape(-1).astype(np.float64), o_c.reshape(-1).astype(np.float64)
    _set_constant(model, layer.weight, w * s_vec[None, :, None, None])
    _set_constant(model, cast(str, layer.bias), (b.reshape(-1) + np.einsum("oikl,i->o", w, o_vec)).reshape(b.shape))
    return None


def _fold_input(model: onnx.ModelProto, mdl: Model, mode: str, notes: list[str]) -> tuple[str, tuple[str, ...]]:
    aff = mdl.contract.normalization.affine()
    if mode == "skip" or aff is None:
        if aff is None:
            notes.append("input: normalization A (raw features), nothing to fold")
        return "none", ()
    scale, offset = aff
    g = analyze(_copy(model))
    name = g.inputs[0]
    shape = tuple(mdl.contract.input_shape)
    if mode in ("auto", "weights"):
        layer = _first_layer(g, name)
        why = "the input feeds several layers or passes through a non-linear op first"
        if layer is not None and _producer_chain(model, g, name, layer.input) is not None:
            trial = _copy(model)
            why = _fold_input_weights(trial, g, layer, _per_element(scale, shape, FEATURE_AXIS), _per_element(offset, shape, FEATURE_AXIS)) or ""
            if not why:
                model.CopyFrom(trial)
                notes.append(f"input: normalization {mdl.contract.normalization.kind.value} folded into the weights of {layer.name!r}")
                return "weights", ()
        if mode == "weights":
            raise QuantizationError(f"the input normalization cannot be folded exactly into the first layer's weights: {why}",
                                    "use input_mode='ops' (an explicit Mul/Add at the input, always exact) or 'auto'")
        notes.append(f"input: explicit Mul/Add at the input ({why})")
    else:
        notes.append("input: explicit Mul/Add at the input")
    scaled, _ = _insert_input_ops(model, name, scale, offset, len(shape) + 1)
    return "ops", (name, scaled)


# --------------------------------------------------------------------------- output side
def _last_layer(g: QuantGraph, output: str) -> Layer | None:
    for layer in g.layers:
        if layer.output == output or g.root(output) == layer.output:
            return layer
    return None


def _fold_output_weights(model: onnx.ModelProto, g: QuantGraph, layer: Layer | None, mean: float, std: float) -> str | None:
    if layer is None:
        return "no weighted layer produces the output"
    if layer.activation is not None:
        return f"the last layer ends in {layer.activation}"
    if layer.bias is None:
        return "the last layer has no bias to take the mean"
    if _uses(model, layer.weight) != 1 or _uses(model, layer.bias) != 1:
        return "the last layer's weight or bias is shared with other nodes"
    w = np.asarray(g.constants[layer.weight], np.float64)
    b = np.asarray(g.constants[layer.bias], np.float64)
    _set_constant(model, layer.weight, w * std)
    _set_constant(model, layer.bias, b * std + mean)
    return None


def _append_output_ops(model: onnx.ModelProto, output: str, mean: float, std: float) -> None:
    inner = output + "/nilmc_model_units"
    for node in model.graph.node:
        node.output[:] = [inner if o == output else o for o in node.output]
    s = numpy_helper.from_array(np.array(std, np.float32), "nilmc_fold/target_std")
    m = numpy_helper.from_array(np.array(mean, np.float32), "nilmc_fold/target_mean")
    model.graph.initializer.extend([s, m])
    model.graph.node.extend([
        helper.make_node("Mul", [inner, s.name], [output + "/nilmc_scaled"], name="nilmc_fold/target_mul"),
        helper.make_node("Add", [output + "/nilmc_scaled", m.name], [output], name="nilmc_fold/target_add"),
    ])


def _fold_output(model: onnx.ModelProto, mdl: Model, mode: str, notes: list[str]) -> str:
    t = mdl.contract.target
    if mode == "skip" or (t.mean == 0.0 and t.std == 1.0):
        notes.append("output: already in watts" if mode != "skip" else "output: left in model units")
        return "none"
    output = model.graph.output[0].name
    if mode in ("auto", "weights"):
        g = analyze(_copy(model))
        trial = _copy(model)
        why = _fold_output_weights(trial, g, _last_layer(g, output), float(t.mean), float(t.std))
        if why is None:
            model.CopyFrom(trial)
            notes.append("output: target scaling folded into the last layer (w*std, b*std + mean)")
            return "weights"
        if mode == "weights":
            raise QuantizationError(f"the target scaling cannot be folded into the last layer: {why}", "use output_mode='ops' or 'auto'")
        notes.append(f"output: explicit Mul/Add after the output ({why})")
    _append_output_ops(model, output, float(t.mean), float(t.std))
    return "ops"


# --------------------------------------------------------------------------- public
def fold_normalization(
    model: Model,
    *,
    input_mode: str = "auto",
    output_mode: str = "auto",
    verify_x: np.ndarray | None = None,
    rtol: float = 1e-4,
) -> FoldResult:
    """A copy of ``model`` that takes raw features and returns watts (contract ``folded=True``).

    ``input_mode`` / ``output_mode`` (default ``"auto"``; also ``"weights"``, ``"ops"``,
    ``"skip"``) as in the module docstring. ``verify_x`` (default None): raw windows on
    which both graphs run in FP32; a relative difference above ``rtol`` (default 1e-4)
    raises :class:`InternalError`. The folded model has no ``keras_path`` (the Keras file
    is not folded).
    """
    for what, mode in (("input_mode", input_mode), ("output_mode", output_mode)):
        if mode not in MODES:
            raise QuantizationError(f"unknown {what} {mode!r}", f"use one of {', '.join(MODES)}")
    if model.contract.folded:
        raise QuantizationError("the model is already folded (contract.folded is true)", "fold the unfolded model once")
    graph = _copy(model.graph)
    node_names(graph)  # layers are found by node name
    notes: list[str] = []
    in_mode, float_tensors = _fold_input(graph, model, input_mode, notes)
    out_mode = _fold_output(graph, model, output_mode, notes)
    graph.ir_version = ONNX_IR_VERSION
    onnx.checker.check_model(graph)
    folded = Model(graph, _folded_contract(model.contract, in_mode, out_mode), source=f"{model.source} (folded)", keras_path=None)
    result = FoldResult(folded, in_mode, out_mode, notes, float_tensors)
    if verify_x is not None:
        result.max_rel_error = verify_fold(model, folded, verify_x)
        if not result.max_rel_error <= rtol:
            raise InternalError(f"the folded model differs from the original by {result.max_rel_error:.3g} (relative) > {rtol:g}",
                                "report this as a nilmc bug; use fold_normalization=False meanwhile")
    return result


def _folded_contract(contract: ModelContract, in_mode: str, out_mode: str) -> ModelContract:
    """``folded=True`` when both sides are done; a partial fold says what the graph now takes or returns instead."""
    from nilmc.calibration_data.normalization import Normalization, NormalizationSpec, TargetScaling

    input_done = in_mode != "none" or contract.normalization.kind is Normalization.A
    output_done = out_mode != "none" or (contract.target.mean == 0.0 and contract.target.std == 1.0)
    if input_done and output_done:
        return contract.with_(folded=True)
    if input_done:
        return contract.with_(normalization=NormalizationSpec(Normalization.A))
    if output_done:
        return contract.with_(target=TargetScaling())
    return contract


def verify_fold(original: Model, folded: Model, raw_x: np.ndarray) -> float:
    """``max|folded(raw) - to_watts(original(prepare(raw)))| / max|reference|`` in FP32."""
    ref = original.contract.to_watts(_ort.output(original.graph, original.contract.prepare(raw_x))).astype(np.float64)
    got = folded.contract.to_watts(_ort.output(folded.graph, folded.contract.prepare(raw_x))).astype(np.float64)
    return float(np.max(np.abs(got - ref)) / max(float(np.max(np.abs(ref))), 1e-30))


def keep_float_for_int8(result: FoldResult) -> Sequence[str]:
    """Tensors an INT8 graph of the folded model must leave float (the raw input side of an ops-mode fold)."""
    return result.float_tensors

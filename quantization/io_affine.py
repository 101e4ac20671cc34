"""Float stages at the graph's edges: normalization a model carries, and input rescaling for raw-scale models.

Two passes, both exact in FP32 and both recorded in the model contract as float
pre-/post-processing (:meth:`ModelContract.with_stages`), so every backend sees a plain
graph that takes normalized input and every artifact is verified end to end with the
stage (``contract.prepare -> runner -> contract.to_watts``):

* :func:`strip_io_affine` — **normalization inside the graph**. Pattern: the graph input
  feeds a chain of single-consumer ``Mul`` / ``Add`` / ``Sub`` / ``Div`` (with a constant
  operand), ``Identity`` or inference ``BatchNormalization`` nodes whose composition is a
  constant per-feature (or scalar) affine ``x * scale + offset`` — what tf2onnx writes for a
  Keras ``Normalization`` or ``Rescaling`` layer, a PyTorch forward's ``(x - mu) / sigma``,
  or a BatchNormalization on the input. At the output, a chain of the same ops with scalar
  constants after the last layer (``y * std + mean``; a bias ``Add`` right after a
  ``MatMul`` is the layer's own and stays). Rewrite: the chain is removed, the input
  affine becomes the contract's ``affine`` normalization (composed onto the declared
  one), the output affine composes into the target scaling. Refused (graph left alone,
  reason reported) when the composition varies along any axis but the feature axis, or
  when the rewritten graph is not within ``1e-5`` (relative) of the original. Every input
  layout of the contract is read (:func:`_graph_layout`): the feature axis is axis 2 of an
  ``NTF1`` / ``NWC`` graph input, axis 1 of ``NCW``; an ``NW`` input has one feature, so
  only a scalar affine is taken out. The stage is recorded in canonical feature order and
  runs in ``contract.prepare`` before the layout transform.
  :func:`strip_keras_input_affine` removes the same leading layers from a Keras model,
  for the targets that lower from Keras (tflite, eiq, the DPU's QAT).
* :func:`repair_input_scales` — **raw-scale models**. A model trained on raw features
  whose feature ranges differ by decades starves per-tensor INT8 input quantization (the
  ``input_features`` overflow finding). The repair puts a per-feature rescaling
  ``z = x * s`` in front as a float stage and folds its inverse into the first weighted
  layer's weights along the feature axis, exactly (see its docstring for how a
  convolution that slides over the features is handled).

This module lives in ``quantization/`` because both passes exist for quantization's sake
(quantize after the normalization); the frontend calls :func:`strip_io_affine` on load.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from nilmc.compiler.contract import CANONICAL_LAYOUT, LAYOUTS, to_layout
from nilmc.compiler.errors import BadInputError
from nilmc.quantization import _ort
from nilmc.quantization.graph import prune_dead

if TYPE_CHECKING:
    from nilmc.calibration_data.normalization import FeatureStats
    from nilmc.compiler.contract import ModelContract
    from nilmc.compiler.model import Model

FEATURE_AXIS = 2  # of (N, frames, features, channels); other layouts: :func:`_graph_layout`
RTOL = 1e-5  # the pass must be exact: FP32 outputs before and after within this (relative to max |output|)
ORIGIN_GRAPH = "graph input"  # prefix of the origin of an input stage taken out of the graph
ORIGIN_REPAIR = "input rescaling"  # prefix of the origin of a stage put in front by repair_input_scales
_AFFINE_OPS = frozenset({"Mul", "Add", "Sub", "Div"})
_LAYER_OPS = frozenset({"MatMul", "Gemm", "Conv"})
_VERIFY_WINDOWS = 32
_KERAS_SLOTS = 4
_KERAS_STRIPPED: OrderedDict[tuple[int, str], tuple[Any, Any]] = OrderedDict()


@dataclass
class StageFound:
    """One side's affine chain: the ONNX nodes and the composed ``x * scale + offset``."""

    nodes: list[str]
    scale: np.ndarray
    offset: np.ndarray

    def to_json(self) -> dict[str, Any]:
        return {"nodes": self.nodes, "scale": [float(v) for v in self.scale.reshape(-1)],
                "offset": [float(v) for v in self.offset.reshape(-1)]}


@dataclass
class IoAffineReport:
    """What :func:`strip_io_affine` took out of the graph (``input`` / ``output``) and what it refused."""

    input: StageFound | None = None
    output: StageFound | None = None
    refused: list[str] = field(default_factory=list)
    max_rel_error: float = 0.0

    @property
    def changed(self) -> bool:
        return self.input is not None or self.output is not None

    def to_json(self) -> dict[str, Any]:
        return {"input": None if self.input is None else self.input.to_json(),
                "output": None if self.output is None else self.output.to_json(),
                "refused": list(self.refused), "max_rel_error": self.max_rel_error}


# --------------------------------------------------------------------------- graph helpers
def _graph_input(graph: onnx.GraphProto) -> str:
    inits = {t.name for t in graph.initializer}
    name: str = next(i.name for i in graph.input if i.name not in inits)
    return name


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {o: node for node in graph.node for o in node.output}


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _float_const(consts: dict[str, np.ndarray], name: str) -> np.ndarray | None:
    value = consts.get(name)
    if value is None or not np.issubdtype(value.dtype, np.floating):
        return None
    return np.asarray(value, np.float64)


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    out = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            out[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return out


def _rename_uses(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        node.input[:] = [new if n == old else n for n in node.input]


# --------------------------------------------------------------------------- input side
def _step_input(node: onnx.NodeProto, cur: str, consts: dict[str, np.ndarray], s: np.ndarray, o: np.ndarray,
                full: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray] | None:
    """``(s, o)`` after ``node`` (which reads ``cur = x * s + o``), or None when ``node`` is not such an affine op."""
    if node.op_type == "Identity":
        return s, o
    if node.op_type == "BatchNormalization":
        if node.input[0] != cur or _attr(node, "training_mode", 0) or len(full) < 2:
            return None
        vals = [_float_const(consts, n) for n in node.input[1:5]]
        if any(v is None for v in vals) or sum(1 for out in node.output if out) != 1:
            return None
        gamma, beta, mean, var = (np.asarray(v).reshape(-1) for v in vals)
        k = gamma / np.sqrt(var + float(_attr(node, "epsilon", 1e-5)))
        shape = [1] * len(full)
        shape[1] = -1
        try:
            k_b, c_b = k.reshape(shape), (beta - mean * k).reshape(shape)
            return np.broadcast_to(s * k_b, full), np.broadcast_to(o * k_b + c_b, full)
        except ValueError:
            return None
    if node.op_type not in _AFFINE_OPS or len(node.input) != 2:
        return None
    first = node.input[0] == cur
    other = node.input[1] if first else node.input[0]
    c = _float_const(consts, other)
    if c is None or other == cur:
        return None
    try:
        if np.broadcast_shapes(full, c.shape) != full:
            return None
    except ValueError:
        return None
    c = np.broadcast_to(c, full)
    if node.op_type == "Mul":
        return s * c, o * c
    if node.op_type == "Add":
        return s, o + c
    if node.op_type == "Sub":
        return (s, o - c) if first else (-s, c - o)
    if not first or np.any(c == 0):  # c / x is not affine
        return None
    return s / c, o / c


def _per_feature(a: np.ndarray, axis: int | None = FEATURE_AXIS) -> np.ndarray | None:
    """The per-feature vector of a full-shape array that varies only along the feature ``axis`` (else None;
    ``axis`` None: the input has one feature, so only a scalar is per-feature)."""
    if axis is None or a.ndim <= axis:
        flat = a.reshape(-1)
        return flat[:1] if np.all(flat == flat[0]) else None
    moved = np.moveaxis(a, axis, -1).reshape(-1, a.shape[axis])
    vec = moved[0]
    return vec.copy() if np.all(moved == vec[None, :]) else None


def _find_input_chain(graph: onnx.GraphProto, full: tuple[int, ...],
                      axis: int | None = FEATURE_AXIS) -> tuple[StageFound | None, str, str, str]:
    """The longest affine chain from the graph input (of shape ``full``; behind the shape-only ops it goes through
    first, :func:`_behind_shape_ops`) that is per-feature along ``axis`` (:func:`_per_feature`): (stage, the tensor it
    starts from, its last tensor, why it stopped)."""
    consts = _constants(graph)
    cons = _consumers(graph)
    outputs = {o.name for o in graph.output}
    cur = _graph_input(graph)
    start, full, axis = _behind_shape_ops(cur, cons, outputs, consts, full, axis)
    cur = start
    s, o = np.ones(full), np.zeros(full)
    chain: list[str] = []
    best: tuple[StageFound | None, str] = (None, cur)
    why = stop = ""  # why: the chain stopped being per-feature (the reason that matters); stop: where it ended
    while True:
        users = cons.get(cur, [])
        if len(users) != 1 or cur in outputs:
            stop = f"{cur!r} feeds {len(users)} nodes" if len(users) != 1 else f"{cur!r} is a graph output"
            break
        node = users[0]
        step = _step_input(node, cur, consts, s, o, full)
        if step is None or len(node.output) != 1:
            stop = f"{node.op_type} {node.name!r} is not a constant affine op"
            break
        s, o = step
        chain.append(node.name or node.op_type)
        cur = node.output[0]
        vs, vo = _per_feature(s, axis), _per_feature(o, axis)
        if vs is not None and vo is not None and not np.any(vs == 0):
            best = (StageFound(list(chain), vs, vo), cur)
        elif not why:
            why = (f"the affine after {node.name!r} varies along an axis other than the features" if axis is not None else
                   f"the affine after {node.name!r} is not one scalar (the input has one feature per step)")
    return best[0], start, best[1], why or stop


# Ops that only reshape the input before its normalization (a PyTorch (N, T) input unsqueezed to (N, 1, T) for a
# BatchNorm1d(1)): a scalar affine commutes with them, so one behind them is taken out too (scalar stages only).
_SHAPE_ONLY_OPS = frozenset({"Unsqueeze", "Squeeze", "Reshape", "Flatten", "Transpose", "Identity"})


def _behind_shape_ops(cur: str, cons: dict[str, list[onnx.NodeProto]], outputs: set[str], consts: dict[str, np.ndarray],
                      full: tuple[int, ...], axis: int | None) -> tuple[str, tuple[int, ...], int | None]:
    """``(tensor, its shape, feature axis)`` after the shape-only ops the graph input goes through first, each its
    only reader's; the input itself, its shape and ``axis`` when there are none. Behind them the axis is None: only a
    scalar stage is per-feature (the feature axis is not followed through a reshape)."""
    x = np.zeros(full, np.float32)
    moved = False
    while True:
        users = cons.get(cur, [])
        if len(users) != 1 or cur in outputs or users[0].op_type not in _SHAPE_ONLY_OPS or len(users[0].output) != 1:
            break
        y = _apply_shape_op(users[0], x, consts)
        if y is None:
            break
        x, cur, moved = y, users[0].output[0], True
    return (cur, tuple(x.shape), None) if moved else (cur, full, axis)


def _apply_shape_op(node: onnx.NodeProto, x: np.ndarray, consts: dict[str, np.ndarray]) -> np.ndarray | None:
    """``node`` (a shape-only op) on ``x``, or None when its shape or axes are not constants."""
    const = consts.get(node.input[1]) if len(node.input) > 1 and node.input[1] else None
    try:
        if node.op_type == "Identity":
            return x
        if node.op_type == "Transpose":
            return np.transpose(x, _attr(node, "perm", None))
        if node.op_type == "Flatten":
            a = int(_attr(node, "axis", 1)) % max(x.ndim, 1)
            return x.reshape(int(np.prod(x.shape[:a])), -1)
        if node.op_type == "Reshape":
            if const is None:
                return None
            dims = [x.shape[i] if d == 0 and not _attr(node, "allowzero", 0) else int(d) for i, d in enumerate(np.asarray(const).ravel())]
            return x.reshape(dims)
        axes = [int(a) for a in np.asarray(const).ravel()] if const is not None else _attr(node, "axes", None)
        if node.op_type == "Unsqueeze":
            if axes is None:
                return None
            return np.expand_dims(x, tuple(sorted(a % (x.ndim + len(axes)) for a in axes)))
        return np.squeeze(x) if axes is None else np.squeeze(x, tuple(a % x.ndim for a in axes))  # Squeeze
    except (ValueError, TypeError):  # numpy.exceptions.AxisError is a ValueError
        return None


def _strip_input(graph: onnx.GraphProto, stage_start: str, stage_end: str) -> None:
    """The stage from ``stage_start`` (the graph input, or the last shape-only op in front of the stage) to
    ``stage_end`` taken out: its readers read ``stage_start``."""
    _rename_uses(graph, stage_end, stage_start)
    prune_dead(graph)


# --------------------------------------------------------------------------- output side
def _find_output_chain(graph: onnx.GraphProto) -> tuple[StageFound | None, str]:
    """The scalar affine chain ending at the graph output: (stage, the tensor before it)."""
    consts = _constants(graph)
    cons = _consumers(graph)
    prod = _producers(graph)
    inputs = {i.name for i in graph.input}
    cur = graph.output[0].name
    a, b = 1.0, 0.0
    chain: list[str] = []
    while cur in prod:
        node = prod[cur]
        if node.op_type == "Identity":
            data: str = node.input[0]
        elif node.op_type in _AFFINE_OPS and len(node.input) == 2:
            consts_in = [_float_const(consts, n) for n in node.input]
            if (consts_in[0] is None) == (consts_in[1] is None):
                break
            first = consts_in[1] is not None
            c_arr = consts_in[1] if first else consts_in[0]
            data = node.input[0] if first else node.input[1]
            if c_arr is None or c_arr.size != 1:
                break
            c = float(c_arr.reshape(-1)[0])
            src = prod.get(data)
            if node.op_type in ("Add", "Sub") and src is not None and src.op_type in _LAYER_OPS:
                break  # the bias of the last layer is the layer's own
            if node.op_type == "Mul":
                a *= c
            elif node.op_type == "Add":
                b += a * c
            elif node.op_type == "Sub":
                b, a = (b - a * c, a) if first else (b + a * c, -a)
            elif first and c != 0.0:
                a /= c
            else:
                break
        else:
            break
        if data in inputs or len(cons.get(data, [])) != 1:
            break
        chain.append(node.name or node.op_type)
        cur = data
    if not chain or a == 0.0:
        return None, cur
    return StageFound(chain, np.array([a]), np.array([b])), cur


def _strip_output(graph: onnx.GraphProto, new_end: str) -> None:
    out = graph.output[0].name
    prod = _producers(graph)
    node = prod[new_end]
    node.output[:] = [out if n == new_end else n for n in node.output]
    _rename_uses(graph, new_end, out)
    # the chain nodes now read their own output or nothing: drop them
    chain_nodes = [n for n in graph.node if n is not node and out in n.output]
    for n in chain_nodes:
        graph.node.remove(n)
    prune_dead(graph)


# --------------------------------------------------------------------------- the pass
def _verify_x(contract: ModelContract, stats: FeatureStats | None = None) -> np.ndarray:
    """Windows as the *original* graph takes them (normalized by the contract, then in its layout), drawn from
    ``stats`` (default: the contract's training statistics; standard normal without any)."""
    rng = np.random.default_rng(0)
    canon = tuple(int(d) for d in contract.input_shape)  # (T, F, 1): the windows before the layout transform
    shape = (_VERIFY_WINDOWS, *canon)
    stats = stats if stats is not None else contract.normalization.stats
    if stats is None or len(canon) < FEATURE_AXIS or stats.n_features != canon[FEATURE_AXIS - 1]:
        return _in_layout(rng.standard_normal(shape).astype(np.float32), contract)
    bshape = [1] * (len(canon) + 1)
    bshape[FEATURE_AXIS] = -1
    raw = stats.mean.reshape(bshape) + stats.std.reshape(bshape) * rng.standard_normal(shape)
    return _in_layout(raw.astype(np.float32) if contract.folded else contract.normalization.apply(raw), contract)


def _in_layout(x: np.ndarray, contract: ModelContract) -> np.ndarray:
    """Canonical windows -> the graph input's layout, as :meth:`ModelContract.prepare` does after normalizing."""
    return np.ascontiguousarray(to_layout(x, contract.layout))


def _graph_layout(contract: ModelContract) -> tuple[tuple[int, ...], int | None]:
    """The graph input's shape (batch 1) and its feature axis per the contract's layout: ``NTF1`` 2, ``NWC``
    ``(N, T, F)`` 2, ``NCW`` ``(N, F, T)`` 1, ``NW`` ``(N, T)`` None (one feature: only a scalar is per-feature)."""
    f_axis = LAYOUTS[contract.layout or CANONICAL_LAYOUT][2]
    return (1, *(int(d) for d in contract.model_input_shape())), None if f_axis is None else f_axis + 1


def _rel_error(ref: np.ndarray, got: np.ndarray) -> float:
    if ref.shape != got.shape:
        return float("inf")
    return float(np.max(np.abs(got - ref)) / max(float(np.max(np.abs(ref))), 1e-30))


def strip_io_affine(
    graph: onnx.ModelProto, contract: ModelContract, *, rtol: float = RTOL
) -> tuple[onnx.ModelProto, ModelContract, IoAffineReport]:
    """Take a constant per-feature affine off the graph input and a scalar affine off its output.

    Returns ``(graph, contract, report)``: a new graph without the chains and the contract
    whose ``prepare`` / ``to_watts`` apply them in float (:meth:`ModelContract.with_stages`);
    unchanged inputs (the same objects) when nothing was found or the result was not within
    ``rtol`` (default 1e-5, relative to max |output|) of the original in FP32.
    """
    report = IoAffineReport()
    full, axis = _graph_layout(contract)
    new = onnx.ModelProto()
    new.CopyFrom(graph)
    stage_in, start_in, end_in, why = _find_input_chain(new.graph, full, axis)
    if stage_in is not None:
        _strip_input(new.graph, start_in, end_in)
        report.input = stage_in
    elif any(n.op_type in _AFFINE_OPS and _graph_input(graph.graph) in n.input for n in graph.graph.node):
        report.refused.append(f"input: {why}")  # an affine-looking op on the input that is not a constant per-feature affine
    stage_out, end_out = _find_output_chain(new.graph)
    if stage_out is not None:
        _strip_output(new.graph, end_out)
        report.output = stage_out
    if not report.changed:
        return graph, contract, report
    origin_in = "" if stage_in is None else f"{ORIGIN_GRAPH}: {' -> '.join(stage_in.nodes)} removed from the graph"
    origin_out = "" if stage_out is None else f"graph output: {' -> '.join(stage_out.nodes)} removed from the graph"
    new_contract = contract
    if stage_in is not None:
        new_contract = new_contract.with_stages(input_affine=(stage_in.scale, stage_in.offset), origin=origin_in)
    if stage_out is not None:
        new_contract = new_contract.with_stages(output_affine=(float(stage_out.scale[0]), float(stage_out.offset[0])), origin=origin_out)
    x = _verify_x(contract)
    try:
        onnx.checker.check_model(new)
        ref = _ort.output(graph, x)
        xin = x if stage_in is None else _apply_features(x, stage_in.scale, stage_in.offset, axis)
        got = _ort.output(new, xin)
        if stage_out is not None:
            got = got * float(stage_out.scale[0]) + float(stage_out.offset[0])
        report.max_rel_error = _rel_error(ref, got)
    except Exception as exc:  # onnx checker / onnxruntime errors: the rewrite is refused, never fatal
        report.refused.append(f"the rewritten graph does not run ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})")
        report.input = report.output = None
        return graph, contract, report
    if not report.max_rel_error <= rtol:
        report.refused.append(f"the rewritten graph differs from the original by {report.max_rel_error:.3g} (relative) > {rtol:g}")
        report.input = report.output = None
        return graph, contract, report
    return new, new_contract, report


def _apply_features(x: np.ndarray, scale: np.ndarray, offset: np.ndarray, axis: int | None = FEATURE_AXIS) -> np.ndarray:
    """``x * scale + offset`` per feature along ``axis`` (None: a scalar stage on a one-feature input)."""
    shape = [1] * x.ndim
    if axis is not None:
        shape[axis] = -1
    out: np.ndarray = (np.asarray(x, np.float64) * scale.reshape(shape) + offset.reshape(shape)).astype(np.float32)
    return out


def strip_model_io_affine(model: Model) -> tuple[Model, IoAffineReport]:
    """:func:`strip_io_affine` on a :class:`Model` (the same object back when nothing changed)."""
    from nilmc.compiler.model import Model

    graph, contract, report = strip_io_affine(model.graph, model.contract)
    if not report.changed:
        return model, report
    return Model(graph, contract, source=model.source, keras_path=model.keras_path), report


# --------------------------------------------------------------------------- Keras
def _keras_api(keras_model: Any) -> Any:
    """The Keras the model's layers belong to: tf_keras (``tf.keras`` here) or Keras 3 (whose classes are its own)."""
    from nilmc.compiler.tfcompat import import_keras3, import_tf

    tf = import_tf("reading the input normalization of a Keras model")
    if isinstance(keras_model, tf.keras.Model) or not type(keras_model).__module__.startswith("keras"):
        return tf.keras
    return import_keras3("reading the input normalization of a Keras 3 model")


def _keras_affine_layer_types(api: Any) -> tuple[type, ...]:
    layers = api.layers
    return tuple(t for t in (getattr(layers, n, None) for n in ("Normalization", "Rescaling", "BatchNormalization")) if t is not None)


def _keras_prefix(keras_model: Any) -> tuple[list[Any], list[Any]]:
    """(leading Normalization / Rescaling / BatchNormalization layers, the layers after them)."""
    api = _keras_api(keras_model)
    affine_types = _keras_affine_layer_types(api)
    try:
        layers = [l for l in keras_model.layers if not isinstance(l, api.layers.InputLayer)]
    except AttributeError:  # not a layered model (a bare tf.Module): nothing to strip
        return [], []
    k = 0
    while k < len(layers) and isinstance(layers[k], affine_types):
        k += 1
    return layers[:k], layers[k:]


def _run_prefix(prefix: Sequence[Any], x: np.ndarray) -> np.ndarray:
    h: Any = x
    for layer in prefix:
        h = layer(h, training=False)
    return np.asarray(h, np.float64)


def _keras_layer_affine(layer: Any, full: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray] | None:
    """Full-shape float64 ``(scale, offset)`` of one Normalization / Rescaling / BatchNormalization layer,
    read from its parameters (probing in float32 loses the scale of a feature with a large mean)."""
    kind = type(layer).__name__

    def arr(v: Any) -> np.ndarray:
        return np.asarray(v.numpy() if hasattr(v, "numpy") else v, np.float64)

    def along(v: np.ndarray, axes: Sequence[int]) -> np.ndarray:
        if v.size == 1:
            return v.reshape(())
        shape = [1] * len(full)
        for a in axes:
            shape[a % len(full)] = full[a % len(full)]
        return v.reshape(shape)

    if kind == "Rescaling":
        return np.broadcast_to(arr(layer.scale), full), np.broadcast_to(arr(layer.offset), full)
    if kind == "Normalization":
        mean, var = arr(layer.mean), arr(layer.variance)
        std = np.maximum(np.sqrt(var), 1e-7)  # keras.backend.epsilon()
        if getattr(layer, "invert", False):
            return np.broadcast_to(std, full), np.broadcast_to(mean, full)
        return np.broadcast_to(1.0 / std, full), np.broadcast_to(-mean / std, full)
    if kind == "BatchNormalization":
        axes = layer.axis if isinstance(layer.axis, (list, tuple)) else [layer.axis]
        k = 1.0 / np.sqrt(arr(layer.moving_variance) + float(layer.epsilon))
        gamma, beta = getattr(layer, "gamma", None), getattr(layer, "beta", None)  # Keras 3 leaves them unset without scale/center
        if gamma is not None:
            k = k * arr(gamma)
        c = -arr(layer.moving_mean) * k + (arr(beta) if beta is not None else 0.0)
        return np.broadcast_to(along(k, axes), full), np.broadcast_to(along(c, axes), full)
    return None


def _prefix_affine(prefix: Sequence[Any], input_shape: tuple[int, ...],
                   axis: int | None = FEATURE_AXIS) -> tuple[np.ndarray, np.ndarray] | None:
    """The per-feature ``(scale, offset)`` (features along ``axis`` of the model input of ``input_shape``) the prefix
    layers compute, from their parameters, then checked by running them at the features' own scale (None: not a
    constant per-feature affine)."""
    full = (1, *input_shape)
    s, o = np.ones(full), np.zeros(full)
    for layer in prefix:
        try:
            aff = _keras_layer_affine(layer, full)
        except (AttributeError, TypeError, ValueError):
            return None
        if aff is None:
            return None
        s, o = s * aff[0], o * aff[0] + aff[1]
    vs, vo = _per_feature(s, axis), _per_feature(o, axis)
    if vs is None or vo is None or np.any(vs == 0):
        return None
    z = np.random.default_rng(0).standard_normal((8, *input_shape))
    x = _apply_features(z, 1.0 / vs, -vo / vs, axis)  # raw features around the ones the stage maps to N(0, 1)
    if float(np.max(np.abs(_run_prefix(prefix, x) - z))) > 1e-4:
        return None
    return vs, vo


def _without_prefix(keras_model: Any, rest: Sequence[Any], input_shape: tuple[int, ...]) -> Any:
    api = _keras_api(keras_model)  # a Keras 3 model is rebuilt with Keras 3's Input/Model
    if len(rest) == 1 and isinstance(rest[0], api.Model):
        return rest[0]  # Sequential([Normalization, model]): the nested model is the rest
    inp = api.Input(shape=tuple(input_shape), name="input")
    h = inp
    for layer in rest:
        h = layer(h)
    return api.Model(inp, h, name=f"{keras_model.name}_without_input_stage")


def strip_keras_model_affine(keras_model: Any, contract: ModelContract) -> tuple[Any, ModelContract, StageFound | None]:
    """Take leading Keras ``Normalization`` / ``Rescaling`` / ``BatchNormalization`` layers off a model
    before it is converted to ONNX: ``(model without them, contract with their affine as the input stage, stage)``.

    ``keras_model`` and ``contract`` come back unchanged when there are no such layers, when they are
    not a constant per-feature affine, or when the stripped model is not within ``1e-5`` of the full one.
    (Converting them is what fails otherwise: tf2onnx turns the constants they capture into graph inputs.)
    """
    full, axis = _graph_layout(contract)
    input_shape = full[1:]  # the Keras model's own input (the contract's layout), without batch
    prefix, rest = _keras_prefix(keras_model)
    if not prefix or not rest:
        return keras_model, contract, None
    aff = _prefix_affine(prefix, input_shape, axis)
    if aff is None:
        return keras_model, contract, None
    sub = _without_prefix(keras_model, rest, input_shape)
    if _keras_strip_error(keras_model, sub, aff, input_shape, axis) > RTOL:
        return keras_model, contract, None
    stage = StageFound([l.name for l in prefix], aff[0], aff[1])
    origin = f"{ORIGIN_GRAPH}: Keras layers {' -> '.join(stage.nodes)} removed from the model"
    return sub, contract.with_stages(input_affine=aff, origin=origin), stage


def _keras_strip_error(full: Any, sub: Any, aff: tuple[np.ndarray, np.ndarray], input_shape: tuple[int, ...],
                       axis: int | None = FEATURE_AXIS) -> float:
    z = np.random.default_rng(1).standard_normal((8, *input_shape)).astype(np.float32)
    x = _apply_features(z, 1.0 / aff[0], -aff[1] / aff[0], axis)
    ref = np.asarray(full(x, training=False), np.float64)
    return _rel_error(ref, np.asarray(sub(_apply_features(x, aff[0], aff[1], axis), training=False), np.float64))


def strip_keras_input_affine(keras_model: Any, contract: ModelContract) -> Any:
    """The Keras model without the leading affine layers whose affine the contract's input stage holds.

    For the targets that lower from Keras (tflite, eiq, the DPU's QAT): nothing is stripped
    (``keras_model`` itself comes back) unless the contract's input stage came out of the
    model (origin ``graph input``). The leading layers' affine must equal that stage (over
    its ``base``); else :class:`BadInputError`. Results are cached per model and stage.
    """
    from nilmc.calibration_data.normalization import Normalization

    spec = contract.normalization
    if spec.kind is not Normalization.AFFINE or ORIGIN_GRAPH not in spec.origin:
        return keras_model
    key = (id(keras_model), json.dumps(spec.to_json(), sort_keys=True))
    if key in _KERAS_STRIPPED:
        return _KERAS_STRIPPED[key][1]
    sub = _strip_keras_checked(keras_model, contract)
    _KERAS_STRIPPED[key] = (keras_model, sub)  # the original is held so its id() stays its own
    while len(_KERAS_STRIPPED) > _KERAS_SLOTS:
        _KERAS_STRIPPED.popitem(last=False)
    return sub


def _strip_keras_checked(keras_model: Any, contract: ModelContract) -> Any:
    full, axis = _graph_layout(contract)
    input_shape = full[1:]
    prefix, rest = _keras_prefix(keras_model)
    want = contract.normalization.relative_to_base()
    assert want is not None
    aff = _prefix_affine(prefix, input_shape, axis) if prefix else (np.ones(1), np.zeros(1))
    names = ", ".join(l.name for l in prefix) or "none"
    ok = aff is not None and bool(np.allclose(np.broadcast_to(aff[0], want[0].shape), want[0], rtol=1e-5, atol=0)
                                  and np.allclose(np.broadcast_to(aff[1], want[1].shape), want[1], rtol=1e-5,
                                                  atol=1e-6 * float(np.max(np.abs(want[1]), initial=1.0))))
    if not ok or not prefix:
        raise BadInputError(
            f"the Keras model's leading normalization layers ({names}) do not compute the input stage taken out of its graph "
            f"({contract.normalization.origin})",
            "use the ONNX-lowered targets for this model (onnxruntime, openvino, tensorrt, dpu PTQ), or put the "
            "normalization in a Keras Normalization/Rescaling layer")
    return _without_prefix(keras_model, rest, input_shape)


# --------------------------------------------------------------------------- raw-scale models: input rescaling
MIN_FEATURE_CODES = 16  # the input_features overflow check's limit


@dataclass
class RepairReport:
    """What :func:`repair_input_scales` did (``applied`` False: nothing needed it, or it could not be done: ``note``)."""

    applied: bool
    mode: str  # "none" | "weights" (per input channel / dense row) | "features_to_channels" (conv over features rewritten)
    layer: str | None = None
    scale: list[float] = field(default_factory=list)  # the stage: graph_input = old_graph_input * scale[f]
    codes_before: list[float] = field(default_factory=list)  # INT8 codes each feature spans under one per-tensor scale
    codes_after: list[float] = field(default_factory=list)
    max_rel_error: float = 0.0
    note: str = ""

    def summary(self) -> str:
        if not self.applied:
            return f"input rescaling not applied: {self.note}"
        lost = sum(1 for c in self.codes_before if c < MIN_FEATURE_CODES)
        return (f"input rescaling applied ({self.mode}, layer {self.layer!r}): {lost} of {len(self.codes_before)} features spanned "
                f"< {MIN_FEATURE_CODES} INT8 codes; now each spans >= {min(self.codes_after):.0f}; the inverse scales are in "
                f"{self.layer!r}'s weights (FP32 max relative change {self.max_rel_error:.2g})")

    def to_json(self) -> dict[str, Any]:
        return {"applied": self.applied, "mode": self.mode, "layer": self.layer, "scale": self.scale,
                "codes_before": self.codes_before, "codes_after": self.codes_after,
                "max_rel_error": self.max_rel_error, "note": self.note, "summary": self.summary()}


def _feature_codes(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Codes each feature's range spans when one per-tensor INT8 grid covers them all (min/max)."""
    step = (max(float(np.max(hi)), 0.0) - min(float(np.min(lo)), 0.0)) / 255.0
    return np.asarray((hi - lo) / max(step, 1e-30), np.float64)


def _input_ranges(contract: ModelContract, stats: FeatureStats) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature range of the graph input (raw ranges through the contract's stage)."""
    lo, hi = np.asarray(stats.minimum, np.float64), np.asarray(stats.maximum, np.float64)
    aff = None if contract.folded else contract.normalization.affine()
    if aff is None:
        return lo, hi
    a, b = lo * aff[0] + aff[1], hi * aff[0] + aff[1]
    return np.minimum(a, b), np.maximum(a, b)


def _first_layer(graph: onnx.ModelProto) -> tuple[Any, str] | tuple[None, str]:
    """The one weighted layer the graph input reaches through data-movement ops only (or None and why)."""
    from nilmc.quantization.graph import PASSTHROUGH_OPS, analyze

    m = onnx.ModelProto()
    m.CopyFrom(graph)
    g = analyze(m)
    cons = _consumers(m.graph)
    frontier, readers = [g.inputs[0]], []
    while frontier:
        t = frontier.pop()
        for node in cons.get(t, []):
            if node.op_type in PASSTHROUGH_OPS and node.op_type != "MaxPool":
                frontier.extend(node.output)
            else:
                readers.append(node.name)
    layers = [l for l in g.layers if l.name in readers]
    if len(readers) != 1 or len(layers) != 1:
        return None, f"the input reaches {sorted(set(readers))} (needs exactly one weighted layer through data-movement ops)"
    return layers[0], ""


def _feature_map(graph: onnx.ModelProto, layer_input: str, contract: ModelContract) -> np.ndarray:
    """Which feature each element of the first layer's input comes from (the data-movement ops run on feature ids,
    given in the graph's layout)."""
    full = (1, *(int(d) for d in contract.input_shape))
    ids = np.broadcast_to(np.arange(full[FEATURE_AXIS], dtype=np.float32).reshape([1] * FEATURE_AXIS + [-1] + [1] * (len(full) - 3)), full)
    out = _ort.run(graph, _in_layout(np.ascontiguousarray(ids), contract), [layer_input])[layer_input]
    fmap: np.ndarray = np.rint(out[0]).astype(np.int64)
    return fmap


def _set_init(graph: onnx.GraphProto, name: str, value: np.ndarray) -> None:
    for i, t in enumerate(graph.initializer):
        if t.name == name:
            graph.initializer[i].CopyFrom(numpy_helper.from_array(value.astype(numpy_helper.to_array(t).dtype), name))
            return
    raise BadInputError(f"weight {name!r} is not an initializer", "export the model with constant weights")


def _fold_rows(graph: onnx.ModelProto, layer: Any, fmap: np.ndarray, inv: np.ndarray) -> str:
    """Dense / conv over feature channels: divide the weights reading feature f by its scale (exact)."""
    consts = _constants(graph.graph)
    w = np.asarray(consts[layer.weight], np.float64)
    if layer.kind == "dense":
        rows = fmap.reshape(-1)
        w_in_out = w.T if layer.weight_axis == 0 else w
        new = w_in_out * inv[rows][:, None]
        _set_init(graph.graph, layer.weight, new.T if layer.weight_axis == 0 else new)
        return "weights"
    chan = fmap.reshape(fmap.shape[0], -1)[:, 0]
    _set_init(graph.graph, layer.weight, w * inv[chan].reshape(1, -1, *[1] * (w.ndim - 2)))  # Conv1d or Conv2d weights
    return "weights"


def _conv_over_features(graph: onnx.ModelProto, layer: Any, fmap: np.ndarray, inv: np.ndarray) -> str | None:
    """Rewrite a Conv whose width axis is the feature axis into a Conv with the features as input channels.

    ``Conv(X[N, C, H, F], W[O, C, KH, KW])`` becomes ``Transpose -> Reshape (N, F*C, H, 1) -> Conv(W2[F_out*O, F*C, KH, 1])
    [-> activation] -> Reshape (N, F_out, O, H_out) -> Transpose (N, O, H_out, F_out)`` with
    ``W2[j*O + o, f*C + c, kh] = W[o, c, kh, f - j + pad_left] / scale[f]`` (zero outside the kernel): the same
    sums, so the width padding and stride-1 sliding are exact, and each feature's inverse scale sits on its own
    input channel. Returns why not (None when done).
    """
    node = next(n for n in graph.graph.node if n.name == layer.name)
    if node.op_type != "Conv" or _attr(node, "group", 1) != 1 or any(d != 1 for d in _attr(node, "dilations", [1, 1])):
        return "only plain convolutions (group 1, dilation 1) are rewritten"
    if _attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or list(_attr(node, "strides", [1, 1]))[1] != 1:
        return "the convolution uses auto_pad or strides along the features"
    if fmap.ndim != 3:
        return f"only a 2-D convolution over the features is rewritten (its input has {fmap.ndim} axes without batch)"
    c_in, h, f = fmap.shape
    if not np.all(fmap == np.arange(f)[None, None, :]):
        return "the features do not lie along the convolution's width axis in order"
    consts = _constants(graph.graph)
    w = np.asarray(consts[layer.weight], np.float64)
    o, _, kh, kw = w.shape
    pt, pl, pb, pr = (list(_attr(node, "pads", [0, 0, 0, 0])) + [0, 0, 0, 0])[:4]
    f_out = f + pl + pr - kw + 1
    w2 = np.zeros((f_out, o, f, c_in, kh), np.float64)
    for j in range(f_out):
        for k in range(kw):
            src = j + k - pl
            if 0 <= src < f:
                w2[j, :, src, :, :] = w[:, :, :, k] * inv[src]
    bias = np.asarray(consts[layer.bias], np.float64).reshape(-1) if layer.bias else np.zeros(o)
    sh = int(list(_attr(node, "strides", [1, 1]))[0])
    h_out = (h + pt + pb - kh) // sh + 1
    name = layer.name
    g = graph.graph
    x_in, out = node.input[0], layer.output
    act = None if layer.activation is None else next(n for n in g.node if n.op_type == layer.activation and n.output[0] == out)
    inits = {f"{name}/nilmc_w": w2.reshape(f_out * o, f * c_in, kh, 1), f"{name}/nilmc_b": np.tile(bias, f_out),
             f"{name}/nilmc_in_shape": np.array([-1, f * c_in, h, 1], np.int64),
             f"{name}/nilmc_out_shape": np.array([-1, f_out, o, h_out], np.int64)}
    for k_name, v in inits.items():
        g.initializer.append(numpy_helper.from_array(v.astype(np.int64 if v.dtype == np.int64 else np.float32), k_name))
    nodes = [helper.make_node("Transpose", [x_in], [f"{name}/nilmc_fc"], name=f"{name}/features_first", perm=[0, 3, 1, 2]),
             helper.make_node("Reshape", [f"{name}/nilmc_fc", f"{name}/nilmc_in_shape"], [f"{name}/nilmc_x"], name=f"{name}/features_to_channels"),
             helper.make_node("Conv", [f"{name}/nilmc_x", f"{name}/nilmc_w", f"{name}/nilmc_b"], [f"{name}/nilmc_y"], name=name,
                              kernel_shape=[kh, 1], pads=[pt, 0, pb, 0], strides=[sh, 1])]
    y = f"{name}/nilmc_y"
    if act is not None:
        nodes.append(helper.make_node(act.op_type, [y], [f"{name}/nilmc_act"], name=act.name, **{a.name: helper.get_attribute_value(a) for a in act.attribute}))
        y = f"{name}/nilmc_act"
    nodes += [helper.make_node("Reshape", [y, f"{name}/nilmc_out_shape"], [f"{name}/nilmc_r"], name=f"{name}/channels_to_features"),
              helper.make_node("Transpose", [f"{name}/nilmc_r"], [out], name=f"{name}/features_last", perm=[0, 2, 3, 1])]
    old = [n for n in g.node if n is node or n is act or (layer.bias_node and n.name == layer.bias_node)]
    at = min(list(g.node).index(n) for n in old)
    for n in old:
        g.node.remove(n)
    for i, n in enumerate(nodes):
        g.node.insert(at + i, n)
    prune_dead(g)
    return None


def repair_input_scales(
    model: Model, statistics: FeatureStats | None = None, *, min_codes: int = MIN_FEATURE_CODES
) -> tuple[Model, RepairReport]:
    """Repair a raw-scale model whose input features starve per-tensor INT8 quantization.

    When a feature of the graph input spans fewer than ``min_codes`` (default 16) codes under one
    per-tensor INT8 grid (the ``input_features`` overflow finding, judged on ``statistics``: the raw
    training statistics, default the contract's), a float pre-processing stage ``z = x * s[f]`` with
    ``s[f] = 1 / max|x_f|`` is put in front (recorded as the contract's ``affine`` input stage, origin
    ``input rescaling``) and its inverse is folded into the first weighted layer: along its input rows
    (dense) or input channels (a conv over feature channels), or, for a conv that slides over the
    features, by rewriting it so the features are its input channels (:func:`_conv_over_features`).
    A pure scale (no offset) keeps zero padding exact. The result is checked in FP32 (``1e-5``
    relative); anything that cannot be done exactly leaves the model as it is, with the reason in
    the report. Returns ``(model, report)``.
    """
    from nilmc.compiler.model import Model as _Model

    stats = statistics if statistics is not None else model.contract.normalization.stats
    if stats is None:
        return model, RepairReport(False, "none", note="no feature statistics (pass the training statistics)")
    full = (1, *(int(d) for d in model.contract.input_shape))  # canonical; the graph's own layout: _graph_layout
    if len(full) <= FEATURE_AXIS or stats.n_features != full[FEATURE_AXIS]:
        return model, RepairReport(False, "none", note=f"statistics for {stats.n_features} features, input shape {full[1:]}")
    lo, hi = _input_ranges(model.contract, stats)
    before = _feature_codes(lo, hi)
    report = RepairReport(False, "none", codes_before=[float(c) for c in before])
    if np.all(before >= min_codes):
        report.note = f"every feature spans >= {min_codes} codes"
        return model, report
    scale = 1.0 / np.maximum(np.maximum(np.abs(lo), np.abs(hi)), 1e-30)
    layer, why = _first_layer(model.graph)
    if layer is None:
        report.note = why
        return model, report
    graph = onnx.ModelProto()
    graph.CopyFrom(model.graph)
    fmap = _feature_map(graph, layer.input, model.contract)
    inv = 1.0 / scale
    if layer.kind == "dense" or np.all(fmap == fmap.reshape(fmap.shape[0], -1)[:, :1].reshape(fmap.shape[0], *[1] * (fmap.ndim - 1))):
        report.mode = _fold_rows(graph, layer, fmap, inv)
    else:
        why_not = _conv_over_features(graph, layer, fmap, inv)
        if why_not is not None:
            report.note = why_not
            return model, report
        report.mode = "features_to_channels"
    contract = model.contract.with_stages(input_affine=(scale, np.zeros_like(scale)),
                                          origin=f"{ORIGIN_REPAIR}: x * (1 / max|x|) per feature; inverse folded into {layer.name!r} ({report.mode})")
    repaired = _Model(graph, contract, source=f"{model.source} (input rescaled)", keras_path=None)
    x = _verify_x(model.contract, stats)
    axis = _graph_layout(model.contract)[1]
    try:
        onnx.checker.check_model(graph)
        report.max_rel_error = _rel_error(_ort.output(model.graph, x), _ort.output(graph, _apply_features(x, scale, np.zeros_like(scale), axis)))
    except Exception as exc:  # a rewrite onnxruntime refuses is not applied
        report.note = f"the rewritten graph does not run ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})"
        report.mode = "none"
        return model, report
    if not report.max_rel_error <= RTOL:
        report.note = f"the rewritten graph differs by {report.max_rel_error:.3g} (relative) > {RTOL:g}"
        report.mode = "none"
        return model, report
    report.applied, report.layer, report.scale = True, layer.name, [float(v) for v in scale]
    report.codes_after = [float(c) for c in _feature_codes(lo * scale, hi * scale)]
    return repaired, report

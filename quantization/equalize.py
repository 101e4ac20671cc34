"""Cross-layer equalization (Nagel et al., "Data-Free Quantization Through Weight Equalization and Bias
Correction", ICCV 2019): an FP32-exact rewrite that balances per-channel ranges before per-tensor INT8.

Pattern (what :func:`equalize_graph` matches -> what it rewrites)::

    L1: Conv/MatMul/Gemm(W1[, b1]) [-> Add(b1)] [-> Relu | LeakyRelu] -> L2: Conv(group 1)/MatMul/Gemm(W2)
    =>  W1[c] / s[c], b1[c] / s[c]   (L1's output channel c)
        W2[:, c] * s[c]              (L2's input channel c)

L1 -> L2 may also be joined through a chain of single-reader ops that carry every channel to one channel and
commute with a positive per-channel scale (:func:`find_pairs`): the Squeeze/Unsqueeze/Reshape/Transpose that
tf2onnx writes around a Keras Conv1D or a 1-D pooling (axis moves followed on the tensors' shapes), pooling, zero
padding and slicing off the channel axis, Mul/Div by a constant; L2 may be a ConvTranspose (input channels on axis 0
of its weight). A reshape that merges the channel axis with another (a Flatten before a Dense) stops the chain.

Exact for ``s > 0`` because the activation between is positively homogeneous (``f(x / s) = f(x) / s``),
so ``L2(f(L1(x)))`` is unchanged. With ``r1[c]`` the calibration range (max ``|.|``) of L1's output channel
``c`` and ``r2[c]`` the range of W2's input-channel ``c`` weights, ``s[c] = sqrt(r1[c] / r2[c])`` leaves both at
``sqrt(r1[c] * r2[c])``: a per-tensor activation grid no longer starves the channels a few large ones dwarf,
and the weight ranges of L2 are balanced the same way (``s`` is divided by its geometric mean, since only the
ratios matter). Activation ranges come from the calibration windows, not from the weights (the data-free
variant): on raw-scale inputs the weights do not show which channels carry large values.

Skipped, with the reason recorded: an activation that is not positively homogeneous (``Clip``), an L1 output
read by more than one node or by a graph output, anything but a direct L1 -> L2 edge (a ``Transpose``/
``Reshape`` moves the channel axis), grouped convolutions, weights that are not initializers or are shared,
a pair whose imbalance is under ``min_imbalance``, and a pair whose rewritten graph is not within
:data:`RTOL` of the original on the windows (checked numerically per pair).

Pairs are rewritten last to first: a pair's scales read L2's weights after L2's own pair has scaled its output
channels, and the pair before it only touches L2's input channels; the activation ranges are those of the
original graph (a pair never changes the output of its L2). :func:`equalize_keras` applies the very same
float32 arrays to the Keras twin of the graph, so every lowering (ONNX or Keras route) sees one model.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from onnx import numpy_helper

from nilmc.compiler.errors import BadInputError
from nilmc.quantization import _ort
from nilmc.quantization.graph import Layer, analyze

if TYPE_CHECKING:
    from nilmc.calibration_data.dataset import NilmDataset
    from nilmc.compiler.model import Model
    from nilmc.quantization.context import QuantContext

HOMOGENEOUS = frozenset({None, "Relu", "LeakyRelu"})  # f(x / s) == f(x) / s for every s > 0
RTOL = 1e-5  # exactness: max |out' - out| <= RTOL * max |out| on the windows (float32 reassociation is ~1e-7)
DEAD = 1e-6  # a channel whose range is under DEAD * the largest is left alone (s = 1)
DEFAULT_MIN_IMBALANCE = 4.0  # pairs whose channel ranges differ less than this are left alone


@dataclass(frozen=True)
class EqualizedPair:
    """One rewritten L1 -> L2 pair; ``imbalance_*``: max / min per-channel range of L1's output (live channels)."""

    first: str
    second: str
    channels: int
    imbalance_before: float
    imbalance_after: float
    scale_min: float
    scale_max: float
    max_abs_diff: float  # FP32 graph output, this pair applied vs not, on the windows
    tensors: tuple[str | None, ...] = ()  # (W1, b1, W2) initializer names
    path: tuple[str, ...] = ()  # op types between L1 and L2 (empty: a direct edge)

    def to_json(self) -> dict[str, Any]:
        d = {"first": self.first, "second": self.second, "channels": self.channels,
             "imbalance_before": round(self.imbalance_before, 3), "imbalance_after": round(self.imbalance_after, 3),
             "scale_min": float(f"{self.scale_min:.6g}"), "scale_max": float(f"{self.scale_max:.6g}"),
             "max_abs_diff": float(f"{self.max_abs_diff:.3g}")}
        if self.path:
            d["through"] = list(self.path)
        return d


@dataclass(frozen=True)
class SkippedPair:
    first: str
    second: str | None
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"first": self.first, "second": self.second, "reason": self.reason}


@dataclass
class EqualizationResult:
    """What :func:`equalize_graph` did. ``graph`` is the input graph itself when nothing was rewritten."""

    graph: onnx.ModelProto
    pairs: list[EqualizedPair] = field(default_factory=list)
    skipped: list[SkippedPair] = field(default_factory=list)
    weights: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # rewritten initializers (float32)
    max_abs_diff: float = 0.0  # whole graph, equalized vs original, on the windows
    output_peak: float = 0.0  # max |original output| on the windows (the tolerance is RTOL times this)
    windows: int = 0
    keras: str = "not applicable"  # what happened to the Keras twin: "equalized", "no Keras source", or why not

    @property
    def changed(self) -> bool:
        return bool(self.pairs)

    def to_json(self) -> dict[str, Any]:
        return {
            "applied": self.changed,
            "method": "cross-layer equalization (Nagel et al. 2019), s = sqrt(r_act / r_weight) from calibration ranges",
            "pairs": [p.to_json() for p in self.pairs],
            "skipped": [s.to_json() for s in self.skipped],
            "exactness": {"max_abs_diff": float(f"{self.max_abs_diff:.3g}"), "output_peak": float(f"{self.output_peak:.6g}"),
                          "rtol": RTOL, "windows": self.windows, "passed": self.max_abs_diff <= RTOL * self.output_peak},
            "keras": self.keras,
        }


# ---------------------------------------------------------------- matching
@dataclass(frozen=True)
class _Second:
    """L2 when it is not a :class:`Layer` of :func:`analyze` (a ConvTranspose): what the rewrite needs."""

    name: str
    weight: str
    input: str


@dataclass(frozen=True)
class _Pair:
    first: Layer
    second: Layer | _Second
    out_axis: int  # channel axis of L1's output tensor
    in_axis: int  # input-channel axis of W2 as stored
    path: tuple[str, ...] = ()  # op types between L1's output and L2 (channel-preserving, positively homogeneous)


# Ops a pair may be joined through: each maps channel c of its input to one channel of its output, and commutes with
# a positive per-channel scale (f(x / s) == f(x) / s): elementwise homogeneous ops, pooling over the other axes, moves
# of the other axes (Squeeze/Unsqueeze/Reshape/Flatten/Transpose, checked on the tensors' shapes), zero padding and
# slicing of the other axes, and Mul/Div by a constant. This is how tf2onnx writes a Keras Conv1D (Unsqueeze -> Conv ->
# Squeeze) and a 1-D pooling (Unsqueeze -> Reshape -> AveragePool -> Squeeze).
_PASS_OPS = frozenset({"Relu", "LeakyRelu", "Identity", "Dropout"})
_POOL_OPS = frozenset({"AveragePool", "MaxPool", "GlobalAveragePool", "GlobalMaxPool"})
_SHAPE_OPS = frozenset({"Squeeze", "Unsqueeze", "Reshape", "Flatten"})
_MAX_PATH = 12
_CARRY_OPS = _PASS_OPS | _POOL_OPS | _SHAPE_OPS | {"Transpose", "Pad", "Slice", "Mul", "Div"}  # what _carry may follow
_SHAPE_READERS = frozenset({"Shape", "Size"})  # read only a tensor's shape, which a per-channel scale does not change


def _data_readers(readers: Mapping[str, list[onnx.NodeProto]], tensor: str) -> list[onnx.NodeProto]:
    return [n for n in readers.get(tensor, []) if n.op_type not in _SHAPE_READERS]


def find_pairs(model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]] | None = None, *,
               paths: bool = True) -> tuple[list[_Pair], list[SkippedPair]]:
    """Every L1 -> L2 pair of weighted layers, and the layers that cannot be paired with the reason (topological order).

    L1 -> L2 is a direct edge, or a chain of single-reader ops that carry each channel to one channel (``_PASS_OPS``
    and the like, see above); ``shapes`` (tensor -> shape on the windows, :func:`path_shapes`) is needed to follow the
    ops that move axes (without it only the elementwise ones are followed). L2 is a Conv/MatMul/Gemm layer or a
    ConvTranspose whose input channels are the carried channel axis.
    """
    g = analyze(model)
    consts = {t.name: t for t in model.graph.initializer}
    inits = set(consts)
    uses: dict[str, int] = {}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
            readers.setdefault(name, []).append(node)
    nodes = {n.name: n for n in model.graph.node}
    by_node = {layer.name: layer for layer in g.layers}
    outputs = set(g.outputs)
    pairs, skipped = [], []
    for l1 in g.layers:
        users = _data_readers(readers, l1.output)
        if len(users) != 1 or l1.output in outputs:
            if l1.output not in outputs:
                skipped.append(SkippedPair(l1.name, None, f"its output has {len(users)} readers"))
            continue
        out_axis = 1 if l1.kind == "conv" else -1
        l2, path, why = _walk(l1.output, out_axis, readers, outputs, by_node, consts, shapes)
        if l2 is not None and path and not paths:
            l2, why = None, f"joined through {' -> '.join(path)}, and only direct pairs were asked for"
        if l2 is None:
            skipped.append(SkippedPair(l1.name, users[0].name, why))
            continue
        reason = _unpairable(l1, l2, nodes, inits, uses)
        if reason:
            skipped.append(SkippedPair(l1.name, l2.name, reason))
            continue
        pairs.append(_Pair(l1, l2, out_axis, _input_axis(nodes[l2.name]), path))
    return pairs, skipped


def _walk(tensor: str, axis: int, readers: Mapping[str, list[onnx.NodeProto]], outputs: set[str], by_node: Mapping[str, Layer],
          consts: Mapping[str, onnx.TensorProto], shapes: Mapping[str, tuple[int, ...]] | None) -> tuple[Layer | _Second | None, tuple[str, ...], str]:
    """Follow ``tensor``'s channel ``axis`` to the weighted layer reading it: ``(L2, op types between, "")`` or
    ``(None, ops, why not)``."""
    path: list[str] = []

    def stop(why: str) -> tuple[None, tuple[str, ...], str]:
        via = f"through {' -> '.join(path)}: " if path else ""
        return None, tuple(path), via + why

    for _ in range(_MAX_PATH + 1):
        users = _data_readers(readers, tensor)
        if len(users) != 1 or tensor in outputs:
            return stop(f"{tensor!r} has {len(users)} readers" if tensor not in outputs else f"{tensor!r} is a graph output")
        node = users[0]
        rank = len(shapes[tensor]) if shapes is not None and tensor in shapes else None
        c = axis % rank if rank is not None else axis
        layer = by_node.get(node.name)
        if layer is not None:
            if layer.input != tensor:
                return stop(f"read by {node.op_type} {node.name!r} as its weight, not its input")
            want = 1 if node.op_type == "Conv" else -1
            if not path or (rank is not None and c == want % rank) or (rank is None and axis == want):
                return layer, tuple(path), ""
            return stop(f"the channels reach {node.op_type} {node.name!r} on axis {c}, not its input-channel axis")
        if node.op_type == "ConvTranspose":
            if node.input[0] == tensor and len(node.input) > 1 and node.input[1] in consts and (c == 1):
                return _Second(node.name, node.input[1], tensor), tuple(path), ""
            return stop(f"read by ConvTranspose {node.name!r} off its input-channel axis")
        nxt = _carry(node, tensor, c, rank, consts, shapes)
        path.append(node.op_type)
        if nxt is None:
            return stop(f"read by {node.op_type} {node.name!r}, which does not carry each channel to one channel" if len(path) == 1
                        else f"{node.op_type} {node.name!r} does not carry each channel to one channel")
        tensor, axis = nxt
    return stop(f"more than {_MAX_PATH} ops between the layers")


def _carry(node: onnx.NodeProto, tensor: str, c: int, rank: int | None, consts: Mapping[str, onnx.TensorProto],
           shapes: Mapping[str, tuple[int, ...]] | None) -> tuple[str, int] | None:
    """``(output, its channel axis)`` when ``node`` maps channel ``c`` of ``tensor`` to one channel and commutes with a
    positive per-channel scale; None otherwise."""
    out = node.output[0] if node.output else ""
    if len([o for o in node.output if o]) != 1 or node.input[0] != tensor:
        return None
    if node.op_type in _PASS_OPS:
        return out, c
    if node.op_type in ("Mul", "Div"):
        return (out, c) if len(node.input) == 2 and node.input[1] in consts else None
    if shapes is None or rank is None or tensor not in shapes or out not in shapes:
        return None
    s_in, s_out = shapes[tensor], shapes[out]
    if node.op_type in _POOL_OPS:
        return (out, c) if c == 1 and s_out[1] == s_in[1] else None
    if node.op_type == "Transpose":
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), list(range(rank))[::-1])
        return out, perm.index(c)
    if node.op_type in _SHAPE_OPS:
        k = _reshaped_axis(s_in, s_out, c)
        return None if k is None else (out, k)
    if node.op_type == "Pad":
        mode = next((a.s.decode() for a in node.attribute if a.name == "mode"), "constant")
        value = node.input[2] if len(node.input) > 2 and node.input[2] else None
        zero = value is None or (value in consts and not np.any(numpy_helper.to_array(consts[value])))
        return (out, c) if mode == "constant" and zero and len(s_out) == rank and s_out[c] == s_in[c] else None
    if node.op_type == "Slice":
        axes_name = node.input[3] if len(node.input) > 3 and node.input[3] else None
        if axes_name is None or axes_name not in consts:
            return None
        axes = [int(a) % rank for a in numpy_helper.to_array(consts[axes_name]).reshape(-1)]
        return (out, c) if c not in axes and len(s_out) == rank and s_out[c] == s_in[c] else None
    return None


def path_shapes(model: onnx.ModelProto, x: np.ndarray) -> dict[str, tuple[int, ...]]:
    """Shapes (on two windows of ``x``) of every tensor a pair's path may cross: from each layer's output through
    single-reader candidate ops; what :func:`find_pairs` needs to follow axis moves."""
    g = analyze(model)
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    names: list[str] = []
    for layer in g.layers:
        tensor = layer.output
        names.append(tensor)
        for _ in range(_MAX_PATH):
            users = _data_readers(readers, tensor)
            if len(users) != 1 or users[0].op_type not in _CARRY_OPS or users[0].input[0] != tensor or not users[0].output:
                break
            tensor = users[0].output[0]
            names.append(tensor)
    names = list(dict.fromkeys(names))
    if not names or len(x) == 0:
        return {}
    acts = _ort.run(model, x[:2], names)
    return {n: tuple(int(d) for d in a.shape) for n, a in acts.items()}


def _reshaped_axis(s_in: tuple[int, ...], s_out: tuple[int, ...], c: int) -> int | None:
    """Where a reshape puts channel axis ``c``: the output axis with the same extent and the same element counts
    before and after it (row-major, so every element keeps its channel); None when the channel axis is merged or split."""
    before, n = int(np.prod(s_in[:c], dtype=np.int64)), s_in[c]
    acc = 1
    for k, d in enumerate(s_out):
        if acc == before and d == n:
            return k
        acc *= int(d)
        if acc > before:
            break
    return None


def _input_axis(node: onnx.NodeProto) -> int:
    if node.op_type == "ConvTranspose":
        return 0  # (C_in, C_out / group, k...)
    if node.op_type == "Conv":
        return 1  # OIHW
    if node.op_type == "Gemm" and _attr(node, "transB", 0):
        return 1  # [out, in]
    return 0  # MatMul / Gemm: [in, out]


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((int(a.i) for a in node.attribute if a.name == name), default)


def _unpairable(l1: Layer, l2: Layer | _Second, nodes: Mapping[str, onnx.NodeProto], inits: set[str], uses: Mapping[str, int]) -> str:
    """Why ``l1 -> l2`` cannot be equalized exactly ("" when it can)."""
    if l1.activation not in HOMOGENEOUS:
        return f"{l1.activation} between them is not positively homogeneous"
    n1, n2 = nodes[l1.name], nodes[l2.name]
    for node in (n1, n2):
        if node.op_type in ("Conv", "ConvTranspose") and _attr(node, "group", 1) != 1:
            return f"{node.name} is a grouped convolution"
        if node.op_type == "Gemm" and _attr(node, "transA", 0):
            return f"{node.name} is a Gemm with transA"
    for name in (l1.weight, l1.bias, l2.weight):
        if name is None:
            continue
        if name not in inits:
            return f"{name} is not an initializer"
        if uses.get(name, 0) != 1:
            return f"{name} is shared by {uses.get(name, 0)} nodes"
    if l1.kind == "dense" and getattr(l2, "kind", "conv") == "conv":
        return "a dense layer feeding a convolution"
    return ""


# ---------------------------------------------------------------- ranges and scales
def channel_ranges(model: onnx.ModelProto, x: np.ndarray, pairs: list[_Pair]) -> dict[str, np.ndarray]:
    """Per-channel max ``|.|`` of each pair's L1 output over the windows ``x`` (one onnxruntime pass)."""
    names = [p.first.output for p in pairs]
    acts = _ort.run(model, x, names)
    out = {}
    for p in pairs:
        a = np.abs(acts[p.first.output].astype(np.float64))
        a = np.moveaxis(a, p.out_axis, 0).reshape(a.shape[p.out_axis], -1)
        out[p.first.output] = a.max(axis=1)
    return out


def imbalance(r: np.ndarray) -> float:
    """max / min of the live (over DEAD * max) entries of ``r``; 1.0 for fewer than two."""
    live = r[r > DEAD * float(np.max(r, initial=0.0))]
    return float(live.max() / live.min()) if live.size > 1 else 1.0


def pair_scales(r_act: np.ndarray, w2: np.ndarray, in_axis: int) -> np.ndarray:
    """``s = sqrt(r_act / r_w2)`` per channel, normalised to geometric mean 1 over the live channels; 1 elsewhere."""
    r_w = np.max(np.abs(np.moveaxis(w2.astype(np.float64), in_axis, 0).reshape(w2.shape[in_axis], -1)), axis=1)
    live = (r_act > DEAD * float(np.max(r_act, initial=0.0))) & (r_w > DEAD * float(np.max(r_w, initial=0.0)))
    s = np.ones_like(r_act, dtype=np.float64)
    if not live.any():
        return s
    s[live] = np.sqrt(r_act[live] / r_w[live])
    s[live] /= np.exp(np.mean(np.log(s[live])))
    return s


def _scaled(arr: np.ndarray, s: np.ndarray, axis: int, *, divide: bool) -> np.ndarray:
    shape = [1] * arr.ndim
    shape[axis] = -1
    f = s.reshape(shape)
    out: np.ndarray = arr.astype(np.float64) / f if divide else arr.astype(np.float64) * f
    return out.astype(arr.dtype)


# ---------------------------------------------------------------- the pass
def equalize_graph(model: onnx.ModelProto, x: np.ndarray, *, min_imbalance: float = DEFAULT_MIN_IMBALANCE,
                   paths: bool = True) -> EqualizationResult:
    """Equalize every pair of ``model`` whose L1 output channels' ranges on ``x`` (windows as the graph takes
    them) differ by at least ``min_imbalance`` (default 4); returns the result (``graph``: a new ModelProto when
    anything changed, else ``model`` itself). Pure: ``model`` is not modified."""
    if len(x) == 0:
        raise BadInputError("cross-layer equalization needs calibration windows, got none", "pass --calib FILE")
    work = onnx.ModelProto()
    work.CopyFrom(model)
    pairs, skipped = find_pairs(work, path_shapes(work, x), paths=paths)
    result = EqualizationResult(model, skipped=list(skipped), windows=len(x))
    if not pairs:
        return result
    ref = _output(work, x)
    result.output_peak = float(np.max(np.abs(ref)))
    tol = RTOL * result.output_peak
    ranges = channel_ranges(work, x, pairs)
    inits = {t.name: t for t in work.graph.initializer}
    current = ref
    for p in reversed(pairs):  # last to first: see the module docstring
        r_act = ranges[p.first.output]
        before = imbalance(r_act)
        if before < min_imbalance:
            result.skipped.append(SkippedPair(p.first.name, p.second.name, f"channel ranges differ {before:.2f}x < {min_imbalance:g}x"))
            continue
        saved = {n: _array(inits[n]) for n in (p.first.weight, p.first.bias, p.second.weight) if n is not None}
        s = pair_scales(r_act, saved[p.second.weight], p.in_axis)
        new = {p.first.weight: _scaled(saved[p.first.weight], s, p.first.weight_axis, divide=True),
               p.second.weight: _scaled(saved[p.second.weight], s, p.in_axis, divide=False)}
        if p.first.bias is not None:
            b = saved[p.first.bias]
            new[p.first.bias] = (b.astype(np.float64).reshape(-1) / s).astype(b.dtype).reshape(b.shape)
        for n, v in new.items():
            inits[n].CopyFrom(numpy_helper.from_array(v, n))
        out = _output(work, x)
        diff = float(np.max(np.abs(out - ref)))
        if not diff <= tol:  # also catches NaN
            for n, v in saved.items():
                inits[n].CopyFrom(numpy_helper.from_array(v, n))
            result.skipped.append(SkippedPair(p.first.name, p.second.name,
                                              f"not exact on the windows: max |diff| {diff:.3g} > {tol:.3g}"))
            continue
        step = float(np.max(np.abs(out - current)))
        current = out
        result.weights.update(new)
        result.pairs.append(EqualizedPair(p.first.name, p.second.name, int(s.size), before, imbalance(r_act / s),
                                          float(s.min()), float(s.max()), step,
                                          (p.first.weight, p.first.bias, p.second.weight), p.path))
    result.pairs.reverse()  # topological order in the report
    if result.pairs:
        result.graph = work
        result.max_abs_diff = float(np.max(np.abs(current - ref)))
    return result


def _array(t: onnx.TensorProto) -> np.ndarray:
    return np.array(numpy_helper.to_array(t))


def _output(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return next(iter(_ort.run(model, x).values())).astype(np.float64)


# ---------------------------------------------------------------- the Keras twin
def equalize_keras(keras_model: Any, original: onnx.ModelProto, result: EqualizationResult) -> Any:
    """A clone of ``keras_model`` carrying ``result``'s rewritten weights, bit for bit.

    Each pair's kernels are matched to the Keras layer whose kernel holds the same float32 values as the
    ONNX weight in ``original`` (Conv2D kernels are HWIO, ONNX OIHW; Dense kernels ``[in, out]`` as MatMul; a
    Gemm with ``transB`` transposed); L1's bias is that layer's bias. A kernel without exactly one match raises
    :class:`BadInputError` (the caller then keeps the model unequalized). ``keras_model`` is not modified.
    """
    try:
        clone = type(keras_model).from_config(keras_model.get_config())
        clone.set_weights(keras_model.get_weights())
    except Exception as exc:  # custom or wrapped layers Keras cannot rebuild from their config
        raise BadInputError(f"the Keras model cannot be cloned ({type(exc).__name__}: {str(exc)[:120]})",
                            "compile from the .onnx file, or without equalization") from None
    before = {t.name: _array(t) for t in original.graph.initializer if t.name in result.weights}
    found: dict[str, tuple[Any, Any, str | None]] = {}  # ONNX kernel -> (Keras layer, layout map, ONNX bias), all matched first
    for pair in result.pairs:
        w1, b1, w2 = pair.tensors
        for kernel_name, bias_name in ((w1, b1), (w2, None)):
            assert kernel_name is not None
            layer, fn = _keras_layer(clone, before[kernel_name], kernel_name)
            if bias_name is not None and (getattr(layer, "bias", None) is None
                                          or not np.array_equal(layer.bias.numpy().reshape(-1), before[bias_name].reshape(-1))):
                raise BadInputError(f"the Keras layer {layer.name} has no bias equal to the ONNX {bias_name!r}",
                                    "compile from the .onnx file, or without equalization")
            if bias_name is not None or kernel_name not in found:
                found[kernel_name] = (layer, fn, bias_name)
    for kernel_name, (layer, fn, bias_name) in found.items():
        _assign(layer.kernel, fn, result.weights[kernel_name])
        if bias_name is not None:
            _assign(layer.bias, lambda a: a, result.weights[bias_name].reshape(-1))
    return clone


def _keras_layer(keras_model: Any, onnx_weight: np.ndarray, name: str) -> tuple[Any, Any]:
    hits = []
    for layer in keras_model.layers:
        kernel = getattr(layer, "kernel", None)
        if kernel is None or getattr(layer, "layer", None) is not None:  # QAT wrappers: their kernel is not a variable
            continue
        hits += [(layer, fn) for fn in _layouts(kernel.shape, onnx_weight.shape) if np.array_equal(fn(kernel.numpy()), onnx_weight)]
    if len(hits) != 1:
        raise BadInputError(f"{len(hits)} Keras layers hold the ONNX weight {name!r} (need exactly one)",
                            "compile from the .onnx file, or without equalization")
    return hits[0]


def _assign(variable: Any, fn: Any, onnx_value: np.ndarray) -> None:
    variable.assign(_inverse(fn, onnx_value, tuple(int(d) for d in variable.shape)))
    if not np.array_equal(fn(variable.numpy()), onnx_value):
        raise BadInputError(f"the Keras variable {variable.name} did not take the equalized weights exactly",
                            "compile from the .onnx file, or without equalization")


def _layouts(keras_shape: Any, onnx_shape: tuple[int, ...]) -> list[Any]:
    """Maps Keras-layout arrays to ONNX layout that fit the shapes."""
    ks = tuple(int(d) for d in keras_shape)
    fns = []
    if len(ks) == 4 and (ks[3], ks[2], ks[0], ks[1]) == onnx_shape:
        fns.append(lambda a: np.transpose(a, (3, 2, 0, 1)))  # Conv2D HWIO -> OIHW
    if len(ks) == 3 and (ks[2], ks[1], 1, ks[0]) == onnx_shape:
        # Conv1D (k, in, out) -> tf2onnx's (out, in, 1, k); Conv1DTranspose (k, out, in) -> ConvTranspose (in, out, 1, k)
        fns.append(lambda a: np.transpose(a, (2, 1, 0))[:, :, None, :])
    if ks == onnx_shape:
        fns.append(lambda a: a)  # Dense [in, out] == MatMul; biases
    if len(ks) == 2 and ks[::-1] == onnx_shape and ks != onnx_shape:
        fns.append(lambda a: a.T)  # Gemm transB
    return fns


def _inverse(fn: Any, onnx_value: np.ndarray, keras_shape: tuple[int, ...]) -> np.ndarray:
    """The Keras-layout array ``k`` with ``fn(k) == onnx_value``."""
    probe = np.arange(int(np.prod(keras_shape))).reshape(keras_shape)
    order = fn(probe).reshape(-1)  # ONNX position i holds Keras flat index order[i]
    flat = np.empty(order.size, dtype=onnx_value.dtype)
    flat[order] = onnx_value.reshape(-1)
    return flat.reshape(keras_shape)


def equalize_model(model: Model, x: np.ndarray, workdir: str | Path, *,
                   min_imbalance: float = DEFAULT_MIN_IMBALANCE, paths: bool = True) -> tuple[Model, EqualizationResult]:
    """:func:`equalize_graph` on ``model`` and, when it has a Keras source, the same weights in a Keras file
    written to ``workdir`` (the new model's ``keras_path``). When the Keras twin cannot take the weights, nothing
    is equalized (``result.keras`` says why): ONNX-route and Keras-route targets must see one model."""
    from nilmc.compiler.model import Model as _Model

    result = equalize_graph(model.graph, x, min_imbalance=min_imbalance, paths=paths)
    if not result.changed:
        return model, result
    keras_path = None
    result.keras = "no Keras source"
    if model.keras_path:
        try:
            keras_path = _equalized_keras_file(model, result, Path(workdir))
            result.keras = "equalized"
        except BadInputError as exc:
            result.keras = f"not equalized ({exc.message}); the model stays as it was"
            result.skipped.extend(SkippedPair(p.first, p.second, "the Keras twin cannot take the scales") for p in result.pairs)
            result.pairs, result.weights, result.graph, result.max_abs_diff = [], {}, model.graph, 0.0
            return model, result
    new = _Model(result.graph, model.contract, source=f"{model.source or 'model'} (equalized)", keras_path=keras_path)
    return new, result


def _equalized_keras_file(model: Model, result: EqualizationResult, workdir: Path) -> str:
    from nilmc.compiler.frontend import detect_kind, save_contract_sidecar
    from nilmc.compiler.tfcompat import read_keras

    src = Path(str(model.keras_path))
    full = read_keras(src, detect_kind(src))  # cached and shared: equalize_keras clones it
    clone = equalize_keras(full, model.graph, result)
    workdir.mkdir(parents=True, exist_ok=True)
    dst = workdir / f"equalized{src.suffix if src.suffix in ('.keras', '.h5') else '.keras'}"
    clone.save(dst)
    save_contract_sidecar(dst, model.contract)
    return str(dst)


# ---------------------------------------------------------------- when it pays
EQUALIZE_MODES = ("auto", "on", "off")
MIN_GAIN_DB = 0.5  # auto: equalize when the calibration SQNR rises by at least this


def calibration_sqnr(model: Model, calibration: NilmDataset, traits: Any = None) -> tuple[float, QuantContext]:
    """Output SQNR (dB) of ``model`` under ``traits`` (default generic INT8), with the parameters the compile
    would derive (:class:`QuantContext`'s techniques: estimator selection, precise input, ...), against its own
    FP32 output on the calibration windows; and that context (its statistics and parameters are reusable)."""
    from nilmc.compiler.metrics import sqnr_db
    from nilmc.quantization.context import QuantContext
    from nilmc.quantization.qdq import build_qdq_model
    from nilmc.quantization.traits import GENERIC_INT8

    quant = QuantContext(model, calibration)
    params = quant.params(traits or GENERIC_INT8)
    x = quant.calib_x
    step = _ort.output_step(model.contract)  # a sequence model is judged on its selected step alone
    ref, got = _ort.output(model.graph, x, step=step), _ort.output(build_qdq_model(model.graph, params), x, step=step)
    return float(sqnr_db(ref.reshape(-1), got.reshape(-1))), quant


def equalize_for_quantization(model: Model, calibration: NilmDataset, workdir: str | Path, *, mode: str = "auto",
                              min_imbalance: float = DEFAULT_MIN_IMBALANCE) -> tuple[Model, dict[str, Any], QuantContext | None]:
    """The model every quantizing target of a compile gets, the manifest record of how it was chosen, and the
    calibration context of that model when one was built deciding (reuse it: its statistics are collected).

    ``mode``: ``off`` -> ``model``; ``on`` -> :func:`equalize_model`; ``auto`` (default) -> the equalized model
    only when :func:`calibration_sqnr` rises by at least :data:`MIN_GAIN_DB` (the measured decision:
    equalization trades weight resolution for activation resolution, and on a model whose channels are already
    balanced the trade can lose; measured on the shipped z-score model it never paid, on the A model it did).
    Raises :class:`BadInputError` for an unknown mode.
    """
    if mode not in EQUALIZE_MODES:
        raise BadInputError(f"unknown equalization mode {mode!r}", f"use one of {', '.join(EQUALIZE_MODES)}")
    if mode == "off":
        return model, {"mode": mode, "applied": False}, None
    x = model.contract.prepare(calibration.raw_x())
    new, result = equalize_model(model, x, workdir, min_imbalance=min_imbalance)
    record: dict[str, Any] = {"mode": mode, **result.to_json()}
    if not result.changed or mode == "on":
        return new, record, None
    (before, q_before), (after, q_after) = calibration_sqnr(model, calibration), calibration_sqnr(new, calibration)
    scores = {"as_given": round(before, 3), "equalized": round(after, 3)}
    if any(p.path for p in result.pairs):
        # Pairs joined through other ops are newer than the direct ones and can cost what the direct ones gain
        # (measured: the cloud model's Conv1D pair turned the head pair's +0.5 dB into +0.05, and neither was kept,
        # evaluation SQNR 19.5 -> 16.8 dB): the direct pairs alone are a candidate too.
        direct, d_result = equalize_model(model, x, Path(workdir) / "direct_pairs", min_imbalance=min_imbalance, paths=False)
        if d_result.changed:
            d_after, q_direct = calibration_sqnr(direct, calibration)
            scores["equalized_direct_pairs"] = round(d_after, 3)
            if d_after > after:
                new, result, after, q_after = direct, d_result, d_after, q_direct
                record = {"mode": mode, **result.to_json()}
    keep = after >= before + MIN_GAIN_DB
    record["decision"] = {"calibration_sqnr_db": scores, "min_gain_db": MIN_GAIN_DB, "traits": "generic_int8 (the compile's techniques)",
                          "kept": ("equalized" if keep else "as given")}
    record["applied"] = keep
    return (new, record, q_after) if keep else (model, record, q_before)

"""Quantization parameters: statistics + traits + estimator -> scale, zero point, dtype per tensor.

* Activations (every quantization point of :func:`graph.analyze`): range from the
  chosen estimator, then :func:`intops.affine_params` (symmetric -> zero point 0).
* Weights: min-max, per output channel when the traits say so (Conv axis 0 of
  OIHW, MatMul axis 1 of ``[in, out]``, Gemm by ``transB``).
* Bias: int32 at ``scale = s_in * s_w`` (per channel, zero point 0) when
  ``traits.bias_bits == 32`` — what integer kernels add into the accumulator;
  otherwise its own symmetric per-tensor scale (the DPU's 8-bit bias).
* Power of two: the scale becomes ``2**-fix_position``; both neighbours of
  ``-log2(scale)`` are tried and the one with the lower quantization MSE wins
  (exact on weight values, :func:`estimators.histogram_mse` on activation
  histograms); a tie keeps the larger scale (no extra clipping).

Everything is deterministic; scales are float32 values (what ONNX stores) so a
graph written from these parameters holds exactly these numbers.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import onnx

from nilmc.compiler.errors import QuantizationError
from nilmc.quantization.estimators import ESTIMATORS, estimate_range, histogram_mse
from nilmc.quantization.graph import Layer, QuantGraph, analyze
from nilmc.quantization.intops import (
    IntRange,
    affine_params,
    dequantize,
    fix_position_candidates,
    int_range,
    pot_scale,
    quantize,
    representable_range,
)
from nilmc.quantization.statistics import Histogram, Statistics, TensorStats, model_digest
from nilmc.quantization.traits import QuantTraits

PARAMS_VERSION = 1
ErrorFn = Callable[[float, int], float]  # (scale, zero point) -> quantization error


@dataclass(frozen=True)
class TensorQuant:
    """Quantization of one tensor: per-tensor (one entry) or per-channel along ``axis``."""

    name: str
    role: str  # "activation" | "weight" | "bias"
    range_name: str  # key of intops.INT_RANGES
    scale: tuple[float, ...]
    zero_point: tuple[int, ...]
    axis: int | None = None
    lo: tuple[float, ...] = ()
    hi: tuple[float, ...] = ()
    method: str = ""
    fix_position: tuple[int, ...] | None = None

    @property
    def rng(self) -> IntRange:
        return int_range(self.range_name)

    @property
    def per_channel(self) -> bool:
        return self.axis is not None

    def scales(self) -> np.ndarray:
        return np.asarray(self.scale, np.float32)

    def zero_points(self) -> np.ndarray:
        return np.asarray(self.zero_point, np.int64)

    def representable(self) -> tuple[float, float]:
        """Real range covered by the codes (per-tensor; for per-channel the union)."""
        lows, highs = zip(*(representable_range(s, z, self.rng) for s, z in zip(self.scale, self.zero_point)))
        return float(min(lows)), float(max(highs))

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("scale", "zero_point", "lo", "hi"):
            d[k] = list(d[k])
        d["fix_position"] = None if self.fix_position is None else list(self.fix_position)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> TensorQuant:
        fp = d.get("fix_position")
        return cls(
            str(d["name"]), str(d["role"]), str(d["range_name"]), tuple(float(v) for v in d["scale"]),
            tuple(int(v) for v in d["zero_point"]), None if d.get("axis") is None else int(d["axis"]),
            tuple(float(v) for v in d.get("lo", ())), tuple(float(v) for v in d.get("hi", ())), str(d.get("method", "")),
            None if fp is None else tuple(int(v) for v in fp),
        )


@dataclass
class QuantParams:
    """Parameters for a whole model under one set of traits (JSON-serialisable).

    Besides the per-tensor parameters: ``keep_float`` (default empty) names layers
    (weighted node names) or activation tensors a target keeps at higher precision
    (mixed-precision fallback; :func:`qdq.build_qdq_model` leaves them float),
    ``adjusted`` (default empty) holds float constants that replace the graph's own
    (bias-corrected biases; quantize ``params.constant(name, constants)``), and
    ``provenance`` records how the parameters were chosen.
    """

    traits: QuantTraits
    tensors: dict[str, TensorQuant]
    shared: dict[str, str] = field(default_factory=dict)  # passthrough tensor -> tensor whose params it uses
    layers: list[Layer] = field(default_factory=list)
    estimator: str = "minmax"
    model_digest: str = ""
    # Layer names / activation tensors a target keeps at higher precision (float): mixed-precision fallback.
    keep_float: tuple[str, ...] = ()
    # Float constants that replace the model's own (bias-corrected biases); quantize these, not the graph's.
    adjusted: dict[str, np.ndarray] = field(default_factory=dict)
    # How the parameters were chosen (estimator selection, bias correction, fallback): JSON-able notes.
    provenance: dict[str, Any] = field(default_factory=dict)

    def constant(self, name: str, constants: Mapping[str, np.ndarray]) -> np.ndarray:
        """The float value to quantize for constant ``name``: the adjusted one when present, else the graph's."""
        return self.adjusted[name] if name in self.adjusted else constants[name]

    def __getitem__(self, name: str) -> TensorQuant:
        key = self.shared.get(name, name)
        try:
            return self.tensors[key]
        except KeyError:
            raise QuantizationError(f"no quantization parameters for tensor {name!r}", "derive parameters for this model (derive_params)") from None

    def __contains__(self, name: object) -> bool:
        key = cast(str, name)
        return self.shared.get(key, key) in self.tensors

    def by_role(self, role: str) -> list[TensorQuant]:
        return [t for t in self.tensors.values() if t.role == role]

    def with_tensor(self, tq: TensorQuant) -> QuantParams:
        """A copy with one tensor's parameters replaced."""
        return replace(self, tensors={**self.tensors, tq.name: tq})

    def to_json(self) -> dict[str, Any]:
        return {
            "params_version": PARAMS_VERSION, "traits": self.traits.to_json(), "estimator": self.estimator,
            "model_digest": self.model_digest, "shared": dict(self.shared),
            "layers": [asdict(l) | {"internal": list(l.internal)} for l in self.layers],
            "tensors": {n: t.to_json() for n, t in self.tensors.items()},
            "keep_float": list(self.keep_float),
            "adjusted": {n: {"shape": list(np.shape(v)), "values": np.asarray(v, np.float64).ravel().tolist()}
                         for n, v in self.adjusted.items()},
            "provenance": dict(self.provenance),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> QuantParams:
        try:
            layers = [Layer(**(dict(l) | {"internal": tuple(l["internal"])})) for l in d.get("layers", [])]
            return cls(
                QuantTraits.from_json(d["traits"]), {n: TensorQuant.from_json(t) for n, t in d["tensors"].items()},
                dict(d.get("shared", {})), layers, str(d.get("estimator", "")), str(d.get("model_digest", "")),
                tuple(str(v) for v in d.get("keep_float", ())),
                {n: np.asarray(v["values"], np.float32).reshape(v["shape"]) for n, v in d.get("adjusted", {}).items()},
                dict(d.get("provenance", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise QuantizationError(f"quantization parameters are malformed ({type(exc).__name__}: {exc})", "derive them again") from None

    def dumps(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True)

    def save(self, path: str | Path) -> Path:
        from nilmc.compiler.io import atomic_write_text

        return atomic_write_text(path, self.dumps())

    @classmethod
    def load(cls, path: str | Path) -> QuantParams:
        return cls.from_json(json.loads(Path(path).read_text()))


# --------------------------------------------------------------------------- power of two
def _values_mse(values: np.ndarray, scale: float, zp: int, rng: IntRange, traits: QuantTraits) -> float:
    q = quantize(values.astype(np.float64), scale, zp, rng, rounding=traits.rounding)
    return float(np.mean((dequantize(q, scale, zp).astype(np.float64) - values) ** 2))


def _zero_point(lo: float, scale: float, rng: IntRange, symmetric: bool) -> int:
    return 0 if symmetric else int(np.clip(np.rint(rng.lo - min(lo, 0.0) / scale), rng.lo, rng.hi))


def _pot(scale: float, lo: float, rng: IntRange, symmetric: bool, error: ErrorFn) -> tuple[float, int, int]:
    """Best power-of-two (scale, zero point, fix position) around ``scale`` under ``error(scale, zp)``."""
    best = None
    for fp in reversed(fix_position_candidates(scale)):  # larger scale (smaller fp) first: wins ties
        s = pot_scale(fp)
        zp = _zero_point(lo, s, rng, symmetric)
        err = error(s, zp)
        if best is None or err < best[0]:
            best = (err, s, zp, fp)
    assert best is not None
    return best[1], best[2], best[3]


def _grid(lo: float, hi: float, rng: IntRange, symmetric: bool, traits: QuantTraits, error: ErrorFn) -> tuple[float, int, int | None]:
    """Affine scale/zero point for ``[lo, hi]``; snapped to a power of two when the traits say so."""
    scale, zp = affine_params(lo, hi, rng, symmetric=symmetric)
    if not traits.power_of_two:
        return scale, zp, None
    return _pot(scale, lo, rng, symmetric, error)


# --------------------------------------------------------------------------- activations
def activation_from_range(
    name: str, lo: float, hi: float, traits: QuantTraits, *, rng: IntRange | None = None,
    hist: Histogram | None = None, method: str = "",
) -> TensorQuant:
    """Parameters of an activation quantized over ``[lo, hi]`` (power of two chosen on ``hist`` when given)."""
    rng = rng or traits.activation_range
    symmetric = traits.symmetric_activations or rng.name == "int16"
    if hist is not None:
        error = lambda s, z: float(histogram_mse(hist, s, z, rng)[0])  # noqa: E731
    else:
        error = lambda s, z: -s  # noqa: E731  (no data: prefer the scale that does not clip)
    scale, zp, fp = _grid(lo, hi, rng, symmetric, traits, error)
    return TensorQuant(name, "activation", rng.name, (scale,), (zp,), None, (float(lo),), (float(hi),), method,
                       None if fp is None else (fp,))


def activation_quant(
    stats: TensorStats, traits: QuantTraits, *, estimator: str = "minmax", options: Mapping[str, Any] | None = None,
    range_name: str | None = None,
) -> TensorQuant:
    """Parameters of one activation from its statistics and the named estimator."""
    rng = int_range(range_name) if range_name else traits.activation_range
    symmetric = traits.symmetric_activations or rng.name == "int16"
    lo, hi = estimate_range(estimator, stats, rng, symmetric=symmetric, **dict(options or {}))
    return activation_from_range(stats.name, lo, hi, traits, rng=rng, hist=stats.histogram, method=estimator)


# --------------------------------------------------------------------------- weights and bias
def _channels(w: np.ndarray, axis: int | None) -> list[np.ndarray]:
    if axis is None:
        return [w.ravel()]
    return [np.take(w, c, axis=axis).ravel() for c in range(w.shape[axis])]


def weight_quant(name: str, w: np.ndarray, axis: int | None, traits: QuantTraits) -> TensorQuant:
    """Min-max weight parameters, per output channel along ``axis`` (None: per tensor)."""
    rng, symmetric = traits.weight_range, traits.symmetric_weights
    axis = axis if traits.per_channel_weights else None
    w = np.asarray(w, np.float64)
    scales, zps, los, his, fps = [], [], [], [], []
    for values in _channels(w, axis):
        lo, hi = float(values.min()), float(values.max())
        error = lambda s, z, v=values: _values_mse(v, s, z, rng, traits)  # noqa: E731
        scale, zp, fp = _grid(lo, hi, rng, symmetric, traits, error)
        scales.append(scale)
        zps.append(zp)
        los.append(lo)
        his.append(hi)
        fps.append(fp)
    return TensorQuant(name, "weight", rng.name, tuple(scales), tuple(zps), axis, tuple(los), tuple(his), "minmax",
                       None if fps[0] is None else tuple(int(cast(int, f)) for f in fps))


def bias_axis(shape: tuple[int, ...]) -> int | None:
    """Channel axis of a bias constant: its one dimension > 1 (None for a single value)."""
    big = [i for i, d in enumerate(shape) if d > 1]
    return big[0] if len(big) == 1 else None


def bias_quant(name: str, b: np.ndarray, input_q: TensorQuant, weight_q: TensorQuant, traits: QuantTraits) -> TensorQuant:
    """Bias parameters: int32 at ``s_in * s_w`` (``bias_bits == 32``) or own symmetric per-tensor scale."""
    b = np.asarray(b, np.float64)
    if traits.bias_uses_product_scale:
        s = np.float32(input_q.scale[0]) * weight_q.scales()  # float32 product, as integer kernels compute it
        axis = bias_axis(b.shape) if weight_q.per_channel and b.size > 1 else None
        scales = tuple(float(v) for v in np.broadcast_to(s, (b.size,) if axis is not None else s.shape))
        return TensorQuant(name, "bias", "int32", scales, (0,) * len(scales), axis, (float(b.min()),), (float(b.max()),), "product")
    rng = traits.bias_range
    lo, hi = float(b.min()), float(b.max())
    error = lambda s, z: _values_mse(b.ravel(), s, z, rng, traits)  # noqa: E731
    scale, zp, fp = _grid(lo, hi, rng, True, traits, error)
    return TensorQuant(name, "bias", rng.name, (scale,), (0,), None, (lo,), (hi,), "minmax", None if fp is None else (fp,))


def quantize_constant(tq: TensorQuant, values: np.ndarray, traits: QuantTraits) -> np.ndarray:
    """Integer codes of a weight or bias under ``tq`` (rounding from the traits)."""
    values = np.asarray(values)
    return quantize(values.astype(np.float64), tq.scales().astype(np.float64), tq.zero_points(), tq.rng,
                    axis=tq.axis, rounding=traits.rounding)


# --------------------------------------------------------------------------- the whole model
def _check_overrides(g: QuantGraph, per_tensor: Mapping[str, Any], what: str) -> None:
    unknown = sorted(set(per_tensor) - set(g.quant_points))
    if unknown:
        raise QuantizationError(f"{what} name tensors that are not quantization points: {unknown}",
                                f"quantization points: {', '.join(g.quant_points)}")


def _activation_range_name(name: str, dtypes: Mapping[str, str], traits: QuantTraits) -> str | None:
    wanted = dtypes.get(name)
    if wanted == "int16" and not traits.allow_int16_activations:
        raise QuantizationError(f"tensor {name!r} asks for int16 but traits {traits.name!r} do not allow int16 activations",
                                "use traits with allow_int16_activations=True or drop the override")
    return wanted


def derive_params(
    onnx_model: onnx.ModelProto,
    stats: Statistics,
    traits: QuantTraits,
    *,
    estimator: str = "minmax",
    per_tensor_estimators: Mapping[str, str] | None = None,
    estimator_options: Mapping[str, Mapping[str, Any]] | None = None,
    activation_dtypes: Mapping[str, str] | None = None,
) -> QuantParams:
    """Quantization parameters for ``onnx_model`` under ``traits``.

    ``estimator`` (default ``"minmax"``; also ``"percentile"``, ``"mse"``, ``"entropy"``)
    sets activation ranges; ``per_tensor_estimators`` (default None) overrides it per
    tensor name; ``estimator_options`` (default None) maps an estimator name to its
    keyword options (e.g. ``{"percentile": {"percentile": 99.9}}``); ``activation_dtypes``
    (default None) maps tensor names to an integer range name (``"int16"`` needs
    ``traits.allow_int16_activations``). Weights use per-channel (or per-tensor) min-max.
    ``stats`` must come from this model: tensors are matched by name, and a missing one
    raises :class:`QuantizationError`.
    """
    if estimator not in ESTIMATORS:
        raise QuantizationError(f"unknown range estimator {estimator!r}", f"available: {', '.join(ESTIMATORS)}")
    model = onnx.ModelProto()
    model.CopyFrom(onnx_model)
    g = analyze(model)
    per_tensor, dtypes, options = dict(per_tensor_estimators or {}), dict(activation_dtypes or {}), dict(estimator_options or {})
    _check_overrides(g, per_tensor, "per_tensor_estimators")
    _check_overrides(g, dtypes, "activation_dtypes")
    tensors: dict[str, TensorQuant] = {}
    for name in g.quant_points:
        method = per_tensor.get(name, estimator)
        tensors[name] = activation_quant(stats[name], traits, estimator=method, options=options.get(method),
                                         range_name=_activation_range_name(name, dtypes, traits))
    if traits.pool_shares_grid:
        _share_pool_grids(model, g, tensors)
    for layer in g.layers:
        _layer_params(layer, g, tensors, traits)
    params = QuantParams(traits, tensors, dict(g.shared), list(g.layers), estimator, model_digest(onnx_model))
    return pin_lut_grids(params, model) if traits.fixed_lut_grids else params


# TFLite's builtin int8 / uint8 LOGISTIC and TANH kernels require these output grids (activations.cc: "output->params.scale
# == 1. / 256"): (scale, real value of the lowest code) per op. Measured: LiteRT 2.3's builtin resolver refused a Sigmoid
# head on nilmc's own [0, 1] grid (scale 1/255) at allocation; the default (XNNPACK) resolver ran it.
LUT_GRIDS = {"Sigmoid": (1.0 / 256, 0.0), "Tanh": (1.0 / 128, -1.0)}


def pin_lut_grids(params: QuantParams, onnx_model: onnx.ModelProto) -> QuantParams:
    """``params`` with every 8-bit Sigmoid / Tanh output on the fixed grid of :data:`LUT_GRIDS` (``traits.fixed_lut_grids``),
    and the biases that read it re-derived. Other ranges (int16) and tensors kept float are left as they are."""
    model = onnx.ModelProto()
    model.CopyFrom(onnx_model)  # analyze() annotates the graph it reads
    g = analyze(model)
    out = params
    for node in model.graph.node:
        if node.op_type not in LUT_GRIDS or not node.output:
            continue
        name = g.root(node.output[0])
        tq = out.tensors.get(name)
        if tq is None or tq.role != "activation" or tq.range_name not in ("int8", "uint8") or name in out.keep_float:
            continue
        scale, lowest = LUT_GRIDS[node.op_type]
        rng = int_range(tq.range_name)
        zp = int(round(rng.lo - lowest / scale))
        fixed = replace(tq, scale=(scale,), zero_point=(zp,), lo=(lowest,), hi=((rng.hi - zp) * scale,), method=f"fixed ({node.op_type} LUT)",
                        fix_position=None)
        out = replace_activation(out, fixed, g)
    return out


def _share_pool_grids(model: onnx.ModelProto, g: QuantGraph, tensors: dict[str, TensorQuant]) -> None:
    """Every AveragePool output that is a quantization point takes its input's parameters (``traits.pool_shares_grid``):
    it becomes a shared tensor of the input's root, and tensors sharing it follow."""
    for node in model.graph.node:
        if node.op_type != "AveragePool" or not node.output or node.output[0] not in tensors:
            continue
        root = g.root(node.input[0])
        if root not in tensors or root == node.output[0]:
            continue
        del tensors[node.output[0]]
        g.shared[node.output[0]] = root
        for name, src in list(g.shared.items()):
            if src == node.output[0]:
                g.shared[name] = root


def _layer_params(layer: Layer, g: QuantGraph, tensors: dict[str, TensorQuant], traits: QuantTraits) -> None:
    if layer.weight not in tensors:
        tensors[layer.weight] = weight_quant(layer.weight, g.constants[layer.weight], layer.weight_axis, traits)
    if layer.bias is None:
        return
    root = g.root(layer.input)
    if root not in tensors:
        raise QuantizationError(f"layer {layer.name!r} reads {layer.input!r}, which has no activation parameters",
                                "the tensor is produced by an op nilmc cannot quantize; check the graph")
    tensors[layer.bias] = bias_quant(layer.bias, g.constants[layer.bias], tensors[root], tensors[layer.weight], traits)


def replace_activation(params: QuantParams, tq: TensorQuant, g: QuantGraph) -> QuantParams:
    """``params`` with activation ``tq`` replaced and the int32 biases that depend on its scale re-derived."""
    out = params.with_tensor(tq)
    if not out.traits.bias_uses_product_scale:
        return out
    for layer in g.layers:
        if layer.bias and g.root(layer.input) == tq.name:
            bias = bias_quant(layer.bias, out.constant(layer.bias, g.constants), tq, out.tensors[layer.weight], out.traits)
            out = out.with_tensor(bias)
    return out

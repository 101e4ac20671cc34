"""Quantization-aware training (QAT) with tensorflow-model-optimization, started from nilmc's PTQ ranges.

Two parts:

* **The Keras view of nilmc's parameters** (:class:`KerasQuant`). nilmc derives its
  parameters on the canonical ONNX graph; TFLite lowering and QAT work on the
  original tf_keras model. :func:`keras_quant_from_params` maps every Conv2D / Dense
  layer of the Keras model to its ONNX layer (by the layer name that tf2onnx keeps in
  the node name, ``<model>/<layer>/Conv2D``; by order when names do not match) and
  checks the pairing numerically (per-channel weight min/max must agree), so a
  parameter set derived for another model is refused.
* **QAT** (:func:`qat_finetune`): the model is wrapped with tfmot's QAT wrappers
  (fake-quant nodes with min/max variables); every activation fake-quant (the input's
  ``QuantizeLayer`` and each layer's fused output) is initialised from nilmc's
  parameters, then the model is fine-tuned for a few epochs. Weight fake-quant follows
  the weights (tfmot ``LastValueQuantizer``: symmetric, narrow range, per output
  channel when the traits say so — Dense too, which tfmot's default scheme keeps per
  tensor). Activation ranges then move with tfmot's moving average (decay 0.999), the
  input range only widens (tfmot ``AllValuesQuantizer``).
  :func:`keras_quant_from_qat` reads the trained ranges and weights back as a
  :class:`KerasQuant` plus a plain float Keras model with the fine-tuned weights.

Power of two (``power_of_two=True``, for DPU-like traits): every fake-quant uses a
symmetric power-of-two grid ``[-128, 127] * 2**-f`` (:func:`_pot_quantizer_class`).
Activation fix positions stay at nilmc's (the PTQ choice, frozen during training);
weight fix positions follow the weights each step (the smallest power-of-two scale
that does not clip, ``ceil(log2(max|w| / 127))``), per tensor.

Determinism: ``tf.keras.utils.set_random_seed(seed)`` and TensorFlow op determinism;
the same model, data and seed give the same weights on the same machine.
Keras 2 only (``tf_keras``): :func:`nilmc.compiler.tfcompat.import_tf` sets
``TF_USE_LEGACY_KERAS=1``. Save QAT models as ``.h5`` (tf_keras cannot reload tfmot
models from ``.keras``); :func:`keras_quant_from_qat` gives a plain float model, which
saves anywhere.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from nilmc.compiler.errors import BadInputError, MissingDependencyError, QuantizationError
from nilmc.compiler.tfcompat import kernel_and_bias
from nilmc.quantization.params import QuantParams, TensorQuant, activation_from_range, bias_quant, weight_quant
from nilmc.quantization.traits import QuantTraits

if TYPE_CHECKING:
    from nilmc.compiler.contract import ModelContract

WEIGHTED_LAYERS = ("Conv2D", "Dense")
_EMA_NOTE = "tfmot moving average, decay 0.999"


# --------------------------------------------------------------------------- the Keras view of the parameters
@dataclass(frozen=True)
class KerasLayerQuant:
    """Quantization of one Conv2D / Dense layer of a Keras model.

    ``weight`` scales run along the output channel (``axis`` = last axis of the Keras
    kernel: 3 for Conv2D ``HWIO``, 1 for Dense ``[in, out]``; None when per tensor).
    ``output`` is the layer's fused output (after its built-in activation).
    """

    name: str
    kind: str  # "conv" | "dense"
    input: TensorQuant
    output: TensorQuant
    weight: TensorQuant
    bias: TensorQuant | None
    # Float bias to quantize instead of the layer's own (nilmc's bias correction), Keras layout; None: the layer's.
    bias_values: np.ndarray | None = field(default=None, compare=False, repr=False)
    # The ONNX layer these parameters were derived on (keras_quant_from_params), None otherwise.
    source: str | None = field(default=None, compare=False, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "bias_corrected": self.bias_values is not None, "kind": self.kind,
                "input": self.input.to_json(), "output": self.output.to_json(),
                "weight": self.weight.to_json(), "bias": None if self.bias is None else self.bias.to_json()}


@dataclass(frozen=True)
class KerasQuant:
    """nilmc's parameters keyed by Keras layer: what TFLite lowering and QAT consume."""

    traits: QuantTraits
    input: TensorQuant
    output: TensorQuant
    layers: tuple[KerasLayerQuant, ...]
    origin: str = "ptq"  # "ptq" (from QuantParams) | "qat" (read back from a fine-tuned model)

    def layer(self, name: str) -> KerasLayerQuant:
        for kl in self.layers:
            if kl.name == name:
                return kl
        raise QuantizationError(f"no Keras layer {name!r} in these parameters", f"layers: {', '.join(k.name for k in self.layers)}")

    def with_output(self, tq: TensorQuant) -> KerasQuant:
        """A copy whose model output (the last layer's output) uses ``tq``."""
        last = replace(self.layers[-1], output=tq)
        return replace(self, output=tq, layers=self.layers[:-1] + (last,))

    def to_json(self) -> dict[str, Any]:
        return {"origin": self.origin, "traits": self.traits.to_json(), "input": self.input.to_json(),
                "output": self.output.to_json(), "layers": [kl.to_json() for kl in self.layers]}


def weighted_layers(keras_model: Any) -> list[Any]:
    """The Conv2D / Dense layers of ``keras_model`` in order; other layers with weights are refused."""
    out = []
    for layer in keras_model.layers:
        kind = type(layer).__name__
        if kind in WEIGHTED_LAYERS:
            out.append(layer)
        elif layer.weights and kind not in ("InputLayer",):
            raise QuantizationError(f"layer {layer.name!r} ({kind}) has weights nilmc's Keras lowering cannot place",
                                    f"nilmc maps {', '.join(WEIGHTED_LAYERS)} layers; fold it into a neighbour or lower the ONNX model instead")
    if not out:
        raise QuantizationError(f"Keras model {getattr(keras_model, 'name', '?')!r} has no Conv2D or Dense layer", "pass the trained seq2point model")
    return out


def layer_kind(layer: Any) -> str:
    """"conv" for a Conv2D Keras layer, "dense" otherwise (the two weighted kinds nilmc maps)."""
    return "conv" if type(layer).__name__ == "Conv2D" else "dense"


def _channel_minmax(kernel: np.ndarray, per_channel: bool) -> tuple[np.ndarray, np.ndarray]:
    if not per_channel:
        return np.array([kernel.min()]), np.array([kernel.max()])
    flat = kernel.reshape(-1, kernel.shape[-1])
    return flat.min(axis=0), flat.max(axis=0)


def _match_onnx_layers(keras_layers: list[Any], params: QuantParams) -> list[Any]:
    """ONNX layer for each Keras layer: by name segment when every name matches once, else by order."""
    onnx_layers = list(params.layers)
    if len(onnx_layers) != len(keras_layers):
        raise QuantizationError(
            f"the Keras model has {len(keras_layers)} Conv2D/Dense layers but the parameters describe {len(onnx_layers)}",
            "derive the parameters from the ONNX conversion of this same Keras model")
    by_name = []
    for kl in keras_layers:
        hits = [l for l in onnx_layers if kl.name in l.name.split("/")]
        if len(hits) != 1:
            return onnx_layers  # names are not informative: fall back to order
        by_name.append(hits[0])
    return by_name if len({id(l) for l in by_name}) == len(by_name) else onnx_layers


def _check_pairing(layer: Any, onnx_layer: Any, wq: TensorQuant) -> None:
    kernel, _ = kernel_and_bias(layer)
    if layer_kind(layer) != onnx_layer.kind:
        raise QuantizationError(f"Keras layer {layer.name!r} ({layer_kind(layer)}) pairs with ONNX layer {onnx_layer.name!r} ({onnx_layer.kind})",
                                "derive the parameters from this Keras model's ONNX conversion")
    lo, hi = _channel_minmax(kernel, wq.per_channel)
    if len(lo) != len(wq.lo) or not (np.allclose(lo, wq.lo, rtol=1e-6, atol=1e-9) and np.allclose(hi, wq.hi, rtol=1e-6, atol=1e-9)):
        raise QuantizationError(f"weights of Keras layer {layer.name!r} do not match ONNX layer {onnx_layer.name!r} "
                                f"(per-channel min/max differ, {len(lo)} vs {len(wq.lo)} channels)",
                                "the parameters were derived for a different model; derive them again from this model")


def keras_quant_from_params(keras_model: Any, params: QuantParams) -> KerasQuant:
    """Map ``params`` (derived on the model's ONNX form) onto the Conv2D / Dense layers of ``keras_model``.

    Bias-corrected biases (``params.adjusted``) travel as ``bias_values``. Raises
    :class:`QuantizationError` when the layers cannot be paired or their weights differ.
    """
    keras_layers = weighted_layers(keras_model)
    pairs = _match_onnx_layers(keras_layers, params)
    out = []
    for layer, ol in zip(keras_layers, pairs):
        wq = params.tensors[ol.weight]
        _check_pairing(layer, ol, wq)
        axis = kernel_and_bias(layer)[0].ndim - 1 if wq.per_channel else None
        bias = params.tensors.get(ol.bias) if ol.bias else None
        adjusted = getattr(params, "adjusted", {}) or {}
        values = np.asarray(adjusted[ol.bias], np.float32).ravel() if ol.bias in adjusted else None
        out.append(KerasLayerQuant(layer.name, ol.kind, params[ol.input], params[ol.output], replace(wq, axis=axis), bias, values,
                                   source=ol.name))
    if keras_model.layers[-1] is not keras_layers[-1]:
        raise QuantizationError(f"the model's output is not produced by its last Conv2D/Dense layer {keras_layers[-1].name!r}",
                                "nilmc's Keras lowering needs the regression head (a Dense layer) as the model output")
    return KerasQuant(params.traits, out[0].input, out[-1].output, tuple(out), "ptq")


def fake_quant_range(tq: TensorQuant) -> tuple[float, float]:
    """``(min, max)`` for a TensorFlow fake-quant node that reproduces ``tq``'s grid exactly.

    ``min = (code_lo - zp) * scale``, ``max = (code_hi - zp) * scale``: TensorFlow's
    nudging then recovers the same scale and zero point (up to float32 rounding).
    """
    s, z = float(tq.scale[0]), int(tq.zero_point[0])
    return (tq.rng.lo - z) * s, (tq.rng.hi - z) * s


def required_output_range(contract: ModelContract) -> tuple[float, float] | None:
    """Model-unit range the regression head must represent: ``0 W .. peak_power_w`` (None without a peak)."""
    peak = contract.peak_power_w
    if peak is None:
        return None
    if contract.folded:
        return 0.0, float(peak)
    lo, hi = (float(v) for v in contract.target.from_watts(np.array([0.0, peak])))
    return min(lo, hi), max(lo, hi)


def widen_output(kq: KerasQuant, contract: ModelContract) -> KerasQuant:
    """``kq`` with the model output's range widened to cover the contract's physical range (no clipping at peak)."""
    need = required_output_range(contract)
    if need is None:
        return kq
    lo, hi = kq.output.representable()
    if lo <= need[0] and hi >= need[1]:
        return kq
    return kq.with_output(_covering(kq.output, need[0], need[1], kq.traits, "peak"))


def _covering(o: TensorQuant, need_lo: float, need_hi: float, traits: QuantTraits, why: str) -> TensorQuant:
    """An activation grid whose *representable* range covers ``o``'s range and ``[need_lo, need_hi]``.

    Rounding the zero point can shift the grid by up to half a step, so the range is widened
    one step at a time until the codes reach both ends.
    """
    lo = min(min(o.lo) if o.lo else 0.0, need_lo)
    hi = max(max(o.hi) if o.hi else 0.0, need_hi)
    pad = 0.0
    for _ in range(8):
        tq = activation_from_range(o.name, lo - pad, hi + pad, traits, rng=o.rng, method=(o.method + "+" + why).lstrip("+"))
        r_lo, r_hi = tq.representable()
        if r_lo <= need_lo and r_hi >= need_hi:
            return tq
        pad += tq.scale[0]
    raise QuantizationError(f"cannot place an int8 grid over [{need_lo:.4g}, {need_hi:.4g}] for {o.name!r}", "report this")


def cover_targets(kq: KerasQuant, targets: np.ndarray) -> KerasQuant:
    """``kq`` with the output range widened to the training targets' range.

    Outside its fake-quant range the output gets no gradient (straight-through estimator
    clipped), so a head whose PTQ range (from the model's own calibration outputs) does not
    reach the targets could never learn to reach them.
    """
    t = np.asarray(targets, np.float64)
    lo, hi = kq.output.representable()
    if t.size == 0 or (lo <= t.min() and hi >= t.max()):
        return kq
    return kq.with_output(_covering(kq.output, float(t.min()), float(t.max()), kq.traits, "targets"))


# --------------------------------------------------------------------------- tfmot plumbing
def _import_tfmot(purpose: str) -> tuple[Any, Any]:
    from nilmc.compiler.tfcompat import import_tf, legacy_keras_active

    tf = import_tf(purpose)
    if not legacy_keras_active():
        raise BadInputError("QAT needs Keras 2 (tf_keras) behind tf.keras, but TensorFlow was imported with Keras 3",
                            "set TF_USE_LEGACY_KERAS=1 before TensorFlow is first imported (nilmc does this when it imports TensorFlow first)")
    try:
        import tensorflow_model_optimization as tfmot
    except ImportError:
        raise MissingDependencyError("tensorflow-model-optimization", "tf", purpose) from None
    return tf, tfmot


@functools.cache
def _pot_quantizer_class() -> type:
    """A tfmot Quantizer with a symmetric power-of-two grid (built lazily: tfmot is optional)."""
    tf, tfmot = _import_tfmot("power-of-two QAT")
    base = tfmot.quantization.keras.quantizers.Quantizer
    keras = tf.keras

    class PowerOfTwoQuantizer(base):  # type: ignore[misc, valid-type]
        """Symmetric int8 on ``[-128, 127] * 2**-f``.

        ``follow=True`` (weights): ``f`` from the current values, ``2**-f`` the smallest
        power of two with ``127 * 2**-f >= max|x|``. ``follow=False`` (activations): ``f``
        from the ``max`` variable, which holds ``127 * 2**-f`` and is never updated.
        """

        def __init__(self, follow: bool = False) -> None:
            self.follow = bool(follow)

        def build(self, tensor_shape: Any, name: str, layer: Any) -> dict[str, Any]:
            mk: Callable[[str, float], Any] = lambda suffix, v: layer.add_weight(name + suffix, initializer=keras.initializers.Constant(v), trainable=False)  # noqa: E731
            return {"min_var": mk("_min", -128.0 / 16), "max_var": mk("_max", 127.0 / 16)}

        def __call__(self, inputs: Any, training: Any, weights: Mapping[str, Any], **kwargs: Any) -> Any:
            if self.follow:
                amax = tf.stop_gradient(tf.reduce_max(tf.abs(inputs)))
            else:
                amax = tf.maximum(weights["max_var"], -weights["min_var"] * 127.0 / 128.0)
            amax = tf.maximum(amax, 1e-30)
            scale = tf.pow(2.0, tf.math.ceil(tf.math.log(amax / 127.0) / math.log(2.0) - 1e-6))
            if self.follow:
                weights["min_var"].assign(-128.0 * scale)
                weights["max_var"].assign(127.0 * scale)
            return tf.quantization.fake_quant_with_min_max_vars(inputs, -128.0 * scale, 127.0 * scale, num_bits=8, narrow_range=False)

        def get_config(self) -> dict[str, Any]:
            return {"follow": self.follow}

    return PowerOfTwoQuantizer


@functools.cache
def _layer_config_class() -> type:
    """QuantizeConfig for Conv2D / Dense: weight quantizer per traits, output fake-quant after the activation."""
    _, tfmot = _import_tfmot("QAT")
    q = tfmot.quantization.keras.quantizers

    class NilmcLayerQuantizeConfig(tfmot.quantization.keras.QuantizeConfig):  # type: ignore[misc, name-defined]
        def __init__(self, per_axis: bool = True, narrow_range: bool = True, power_of_two: bool = False) -> None:
            self.per_axis, self.narrow_range, self.power_of_two = bool(per_axis), bool(narrow_range), bool(power_of_two)
            if power_of_two:
                pot = _pot_quantizer_class()
                self.weight_quantizer, self.activation_quantizer = pot(follow=True), pot(follow=False)
            else:
                self.weight_quantizer = q.LastValueQuantizer(num_bits=8, per_axis=per_axis, symmetric=True, narrow_range=narrow_range)
                self.activation_quantizer = q.MovingAverageQuantizer(num_bits=8, per_axis=False, symmetric=False, narrow_range=False)

        def get_weights_and_quantizers(self, layer: Any) -> list[tuple[Any, Any]]:
            return [(layer.kernel, self.weight_quantizer)]

        def get_activations_and_quantizers(self, layer: Any) -> list[tuple[Any, Any]]:
            return [(layer.activation, self.activation_quantizer)]

        def set_quantize_weights(self, layer: Any, quantize_weights: list[Any]) -> None:
            layer.kernel = quantize_weights[0]

        def set_quantize_activations(self, layer: Any, quantize_activations: list[Any]) -> None:
            layer.activation = quantize_activations[0]

        def get_output_quantizers(self, layer: Any) -> list[Any]:
            return []

        def get_config(self) -> dict[str, Any]:
            return {"per_axis": self.per_axis, "narrow_range": self.narrow_range, "power_of_two": self.power_of_two}

    return NilmcLayerQuantizeConfig


def qat_scope() -> Any:
    """tfmot's ``quantize_scope`` with nilmc's QAT classes, for saving / loading QAT models (``.h5``)."""
    _, tfmot = _import_tfmot("loading a QAT model")
    return tfmot.quantization.keras.quantize_scope({
        "NilmcLayerQuantizeConfig": _layer_config_class(), "PowerOfTwoQuantizer": _pot_quantizer_class()})


def _annotated_clone(keras_model: Any, traits: QuantTraits, power_of_two: bool) -> Any:
    tf, tfmot = _import_tfmot("QAT")
    annotate = tfmot.quantization.keras.quantize_annotate_layer
    config = _layer_config_class()

    def clone(layer: Any) -> Any:
        # The original layer object is annotated (as tfmot's quantize_annotate_model does); quantize_apply
        # then builds new layers and copies the weights, so training never touches ``keras_model``.
        if type(layer).__name__ in WEIGHTED_LAYERS:
            per_axis = traits.per_channel_weights and not power_of_two
            return annotate(layer, quantize_config=config(per_axis, traits.narrow_range_weights, power_of_two))
        return annotate(layer)

    with qat_scope():
        return tf.keras.models.clone_model(keras_model, clone_function=clone)


def _vars(layer: Any) -> dict[str, Any]:
    """A layer's variables by short name (``post_activation_min``, ``kernel_max``, ...)."""
    out = {}
    for v in layer.weights:
        short = v.name.split("/")[-1].split(":")[0]
        out[short] = v
    return out


def _wrappers(qat_model: Any) -> dict[str, Any]:
    """QAT wrapper layers by the name of the layer they wrap."""
    return {l.layer.name: l for l in qat_model.layers if hasattr(l, "layer") and hasattr(l, "quantize_config")}


def _input_quantize_layer(qat_model: Any) -> Any:
    found = [l for l in qat_model.layers if type(l).__name__ == "QuantizeLayer"]
    if len(found) != 1:
        raise QuantizationError(f"QAT model has {len(found)} input QuantizeLayers, expected 1", "QAT supports single-input models")
    return found[0]


def _set_range(variables: Mapping[str, Any], prefix: str, tq: TensorQuant) -> None:
    lo, hi = fake_quant_range(tq)
    variables[prefix + "min"].assign(np.float32(lo))
    variables[prefix + "max"].assign(np.float32(hi))


def _init_ranges(qat_model: Any, kq: KerasQuant, power_of_two: bool) -> None:
    """Activation fake-quant ranges from nilmc's parameters; weight ranges from the weights."""
    ql = _input_quantize_layer(qat_model)
    if power_of_two:
        ql.quantizer = _pot_quantizer_class()(follow=False)  # same variable names; used from the next call on
    qv = _vars(ql)
    prefix = next(k[: -len("min")] for k in qv if k.endswith("_min"))
    _set_range(qv, prefix, _pot_tq(kq.input, kq.traits) if power_of_two else kq.input)
    wrappers = _wrappers(qat_model)
    for kl in kq.layers:
        w = wrappers[kl.name]
        v = _vars(w)
        if "post_activation_min" not in v:
            raise QuantizationError(f"QAT wrapper of layer {kl.name!r} has no output fake-quant", "QAT supports Conv2D/Dense layers with a built-in activation")
        _set_range(v, "post_activation_", _pot_tq(kl.output, kq.traits) if power_of_two else kl.output)
        kernel, _ = kernel_and_bias(w)
        a = np.abs(kernel).reshape(-1, kernel.shape[-1]).max(axis=0) if v["kernel_min"].shape.rank else np.abs(kernel).max()
        v["kernel_min"].assign(-a.astype(np.float32))
        v["kernel_max"].assign(np.asarray(a, np.float32))


def _pot_tq(tq: TensorQuant, traits: QuantTraits) -> TensorQuant:
    """``tq`` snapped to a symmetric power-of-two int8 grid that covers its range."""
    if tq.fix_position is not None and tq.zero_point[0] == 0 and tq.rng.name == "int8":
        return tq
    lo, hi = tq.representable()
    amax = max(abs(lo), abs(hi), 1e-30)
    fp = -math.ceil(math.log2(amax / 127.0) - 1e-9)
    s = math.ldexp(1.0, -fp)
    return TensorQuant(tq.name, tq.role, "int8", (s,), (0,), None, tq.lo, tq.hi, (tq.method + "+pot").lstrip("+"), (fp,))


def _as_keras_quant(keras_model: Any, params_or_ranges: QuantParams | KerasQuant | Mapping[str, tuple[float, float]],
                    traits: QuantTraits | None) -> KerasQuant:
    if isinstance(params_or_ranges, KerasQuant):
        return params_or_ranges
    if isinstance(params_or_ranges, QuantParams):
        return keras_quant_from_params(keras_model, params_or_ranges)
    if isinstance(params_or_ranges, Mapping):
        return _keras_quant_from_ranges(keras_model, params_or_ranges, traits)
    raise BadInputError(f"QAT ranges must be QuantParams, KerasQuant or a mapping, got {type(params_or_ranges).__name__}",
                        "pass QuantContext.params(traits) or {layer name: (min, max), 'input': (min, max)}")


def _keras_quant_from_ranges(keras_model: Any, ranges: Mapping[str, tuple[float, float]], traits: QuantTraits | None) -> KerasQuant:
    """``{'input': (min, max), <Conv2D/Dense layer name>: (min, max), ...}`` -> :class:`KerasQuant`."""
    from nilmc.quantization.traits import TFLITE_INT8

    traits = traits or TFLITE_INT8
    layers = weighted_layers(keras_model)
    missing = [n for n in ["input"] + [l.name for l in layers] if n not in ranges]
    if missing:
        raise BadInputError(f"QAT ranges lack entries for {missing}", "give 'input' and every Conv2D/Dense layer name a (min, max)")
    act: Callable[[str], TensorQuant] = lambda name: activation_from_range(name, float(ranges[name][0]), float(ranges[name][1]), traits, method="given")  # noqa: E731
    prev = act("input")
    out = []
    for layer in layers:
        kernel, _ = kernel_and_bias(layer)
        wq = weight_quant(f"{layer.name}/kernel", kernel, kernel.ndim - 1, traits)
        cur = act(layer.name)
        out.append(KerasLayerQuant(layer.name, layer_kind(layer), prev, cur, wq, None))
        prev = cur
    return KerasQuant(traits, out[0].input, out[-1].output, tuple(out), "given")


# --------------------------------------------------------------------------- QAT
def qat_finetune(
    keras_model: Any,
    params_or_ranges: QuantParams | KerasQuant | Mapping[str, tuple[float, float]],
    train_x: np.ndarray,
    train_y: np.ndarray,
    *,
    epochs: int = 3,
    learning_rate: float = 1e-4,
    seed: int = 0,
    power_of_two: bool = False,
    batch_size: int = 64,
    traits: QuantTraits | None = None,
    validation: tuple[np.ndarray, np.ndarray] | None = None,
    history: dict[str, Any] | None = None,
) -> Any:
    """Fine-tune ``keras_model`` (tf_keras) with fake quantization, starting from nilmc's PTQ ranges.

    ``params_or_ranges``: :class:`QuantParams` derived on this model's ONNX form (mapped with
    :func:`keras_quant_from_params`), a :class:`KerasQuant`, or ``{'input': (min, max),
    <layer name>: (min, max)}`` (then ``traits``, default TFLITE_INT8, give the weight
    scheme). ``train_x`` are windows as the model takes them (normalized), ``train_y``
    targets in model units (labels, or the FP32 model's own outputs for distillation).
    Defaults: 3 epochs, Adam 1e-4, batch 64, MSE loss, seed 0, ``power_of_two`` False. The
    output range is first widened to cover the targets (:func:`cover_targets`).

    ``validation`` (default None): held-out ``(x, y)``; then the MSE on it is measured before
    training (the PTQ starting point, epoch 0) and after every epoch, and the model returns
    with the state (weights and fake-quant ranges) of the best epoch — possibly epoch 0, i.e.
    no fine-tuning kept. ``history`` (default None): a dict that receives ``val_loss`` per epoch
    and ``best_epoch``. Returns the tfmot QAT model (``keras_model`` is not changed).
    """
    tf, tfmot = _import_tfmot("QAT")
    kq = _as_keras_quant(keras_model, params_or_ranges, traits)
    x, y = _check_train_data(train_x, train_y, keras_model)
    val = _check_train_data(*validation, keras_model) if validation is not None else None
    if epochs < 0 or learning_rate <= 0 or batch_size < 1:
        raise BadInputError(f"QAT options out of range: epochs={epochs}, learning_rate={learning_rate}, batch_size={batch_size}",
                            "use epochs >= 0, learning_rate > 0, batch_size >= 1")
    kq = cover_targets(kq, y if val is None else np.concatenate([y, val[1]]))
    tf.keras.utils.set_random_seed(int(seed))
    tf.config.experimental.enable_op_determinism()
    annotated = _annotated_clone(keras_model, kq.traits, power_of_two)
    with qat_scope():
        qat = tfmot.quantization.keras.quantize_apply(annotated)
    _init_ranges(qat, kq, power_of_two)
    qat.compile(optimizer=tf.keras.optimizers.Adam(learning_rate), loss="mse")
    losses: list[float] = []
    best = (float("inf"), 0, None)
    for epoch in range(int(epochs) + 1):
        if epoch:
            qat.fit(x, y, batch_size=batch_size, epochs=1, shuffle=True, verbose=0)
        if val is None:
            continue
        loss = float(qat.evaluate(val[0], val[1], batch_size=512, verbose=0))
        losses.append(loss)
        if loss < best[0]:
            best = (loss, epoch, qat.get_weights())
    if val is not None and best[2] is not None and best[1] != int(epochs):
        qat.set_weights(best[2])
    if history is not None:
        history.update({"val_loss": losses, "best_epoch": best[1] if val is not None else int(epochs)})
    return qat


def _check_train_data(train_x: np.ndarray, train_y: np.ndarray, keras_model: Any) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(train_x, np.float32)
    y = np.asarray(train_y, np.float32).reshape(len(train_y), -1)
    if len(x) == 0 or len(x) != len(y):
        raise BadInputError(f"QAT needs matching windows and targets, got {len(x)} windows and {len(y)} targets", "pass labelled windows")
    want = tuple(int(d) for d in keras_model.inputs[0].shape[1:])
    if tuple(x.shape[1:]) != want:
        raise BadInputError(f"QAT windows have shape {tuple(x.shape[1:])} but the model takes {want}", "pass windows of the model's setup")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise BadInputError("QAT data contain NaN or Inf", "clean the training windows")
    return x, y


def strip_qat(qat_model: Any, template: Any) -> Any:
    """A plain float copy of ``template`` carrying the fine-tuned weights of ``qat_model``."""
    tf, _ = _import_tfmot("reading a QAT model")
    plain = tf.keras.models.clone_model(template)
    wrappers = _wrappers(qat_model)
    for layer in plain.layers:
        if not layer.weights:
            continue
        src = wrappers.get(layer.name)
        if src is None:
            raise QuantizationError(f"QAT model has no wrapper for layer {layer.name!r}", "pass the template the QAT model was built from")
        inner = {v.name.split("/")[-1]: v.numpy() for v in src.weights if v.name.startswith(src.layer.name + "/")}
        layer.set_weights([inner[v.name.split("/")[-1]] for v in layer.weights])
    return plain


def keras_quant_from_qat(qat_model: Any, template: Any, traits: QuantTraits, *, power_of_two: bool = False) -> tuple[Any, KerasQuant]:
    """Read a fine-tuned QAT model back: ``(plain float model, KerasQuant)``.

    Activation grids come from the trained fake-quant ranges; weight parameters are
    derived again (min-max per the traits) from the fine-tuned weights, biases at
    ``s_in * s_w``. ``template`` is the float model QAT started from.
    """
    plain = strip_qat(qat_model, template)
    tq_traits = traits.with_(power_of_two=True) if power_of_two else traits
    qv = _vars(_input_quantize_layer(qat_model))
    prefix = next(k[: -len("min")] for k in qv if k.endswith("_min"))
    prev = _trained_grid("input", qv, prefix, tq_traits)
    wrappers = _wrappers(qat_model)
    out = []
    for layer in weighted_layers(plain):
        kernel, bias = kernel_and_bias(layer)
        wq = weight_quant(f"{layer.name}/kernel", kernel, kernel.ndim - 1, tq_traits)
        cur = _trained_grid(f"{layer.name}/output", _vars(wrappers[layer.name]), "post_activation_", tq_traits)
        bq = bias_quant(f"{layer.name}/bias", bias, prev, wq, tq_traits) if bias is not None else None
        out.append(KerasLayerQuant(layer.name, layer_kind(layer), prev, cur, wq, bq))
        prev = cur
    return plain, KerasQuant(tq_traits, out[0].input, out[-1].output, tuple(out), "qat")


def _trained_grid(name: str, variables: Mapping[str, Any], prefix: str, traits: QuantTraits) -> TensorQuant:
    lo, hi = float(variables[prefix + "min"].numpy()), float(variables[prefix + "max"].numpy())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise QuantizationError(f"QAT range of {name!r} is not finite ({lo}, {hi})", "fine-tune with a smaller learning rate or fewer epochs")
    if traits.power_of_two:
        amax = max(hi, -lo * 127.0 / 128.0, 1e-30)
        fp = -math.ceil(math.log2(amax / 127.0) - 1e-6)
        return TensorQuant(name, "activation", "int8", (math.ldexp(1.0, -fp),), (0,), None, (lo,), (hi,), "qat", (fp,))
    return activation_from_range(name, lo, hi, traits, method="qat")


def qat_ranges(qat_model: Any) -> dict[str, tuple[float, float]]:
    """Every activation fake-quant range of a QAT model: ``{'input' | layer name: (min, max)}``."""
    qv = _vars(_input_quantize_layer(qat_model))
    prefix = next(k[: -len("min")] for k in qv if k.endswith("_min"))
    out = {"input": (float(qv[prefix + "min"].numpy()), float(qv[prefix + "max"].numpy()))}
    for name, w in _wrappers(qat_model).items():
        v = _vars(w)
        if "post_activation_min" in v:
            out[name] = (float(v["post_activation_min"].numpy()), float(v["post_activation_max"].numpy()))
    return out

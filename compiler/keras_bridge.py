"""Keras 3 -> tf_keras (Keras 2) bridge: the TFLite-family lowerings and QAT (tfmot) take tf_keras models only.

:func:`bridge_keras3` rebuilds a loaded Keras 3 Functional / Sequential model in tf_keras from its config (each
layer's config cleaned of what only Keras 3 writes: dtype-policy objects, ``module`` / ``registered_name`` /
``build_config``, ``batch_shape``, the ``{"args", "kwargs"}`` call records), copies the weights layer by layer and
then *measures* the twin against the original on deterministic probe windows; a twin outside float32 tolerance is
refused with the layers that differ. :func:`bridge_precheck` reads only a config (no TensorFlow) and names the first
layer the bridge cannot rebuild (a ``Lambda``, a custom class, a subclassed model, ...).

Why not ``tf_keras.models.load_model`` on the file: Keras 3 writes configs tf_keras cannot parse (above), and
Keras' own answer is that cross-version loading is not supported (keras-team/keras#20081). Initializers,
regularizers and constraints are dropped: they do not change inference and the weights are copied.
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nilmc.compiler.errors import ModelLoadError

# Layer classes rebuilt by config; each exists in tf_keras with the same meaning. Anything else is refused up front.
BRIDGEABLE_LAYERS = frozenset({
    "InputLayer", "Dense", "EinsumDense", "Conv1D", "Conv2D", "Conv1DTranspose", "Conv2DTranspose",
    "DepthwiseConv1D", "DepthwiseConv2D", "SeparableConv1D", "SeparableConv2D",
    "MaxPooling1D", "MaxPooling2D", "AveragePooling1D", "AveragePooling2D", "GlobalAveragePooling1D",
    "GlobalAveragePooling2D", "GlobalMaxPooling1D", "GlobalMaxPooling2D", "Flatten", "Reshape", "Permute",
    "RepeatVector", "ZeroPadding1D", "ZeroPadding2D", "Cropping1D", "Cropping2D", "UpSampling1D", "UpSampling2D",
    "Dropout", "SpatialDropout1D", "SpatialDropout2D", "GaussianNoise", "GaussianDropout", "AlphaDropout",
    "Activation", "ReLU", "LeakyReLU", "ELU", "PReLU", "Softmax", "BatchNormalization", "LayerNormalization",
    "Normalization", "Rescaling", "LSTM", "GRU", "SimpleRNN", "Bidirectional", "TimeDistributed",
    "Add", "Subtract", "Multiply", "Average", "Maximum", "Minimum", "Concatenate", "Dot",
    "Functional", "Sequential", "Model",
})
# Options only Keras 3 has, dropped when they hold a value that changes nothing at inference (None: any value).
_NEUTRAL_OPTIONS: dict[str, tuple[Any, ...] | None] = {
    "optional": (False,), "quantization_config": (None,), "lora_rank": (None,), "lora_alpha": (None,),
    "rms_scaling": (False,), "seed": None, "use_cudnn": None,
}
# tf_keras' Layer takes these besides each class's own arguments (base_layer.Layer.__init__); its RNN pops
# zero_output_for_mask / input_length from **kwargs, so no signature shows them.
_LAYER_KWARGS = frozenset({"name", "trainable", "dtype", "dynamic", "input_dim", "input_shape", "batch_input_shape",
                           "batch_size", "weights", "activity_regularizer", "autocast", "implementation",
                           "zero_output_for_mask", "input_length"})
_LAYER_MODULES = frozenset({"keras", "keras.layers", "keras.models"})
_DROPPED_SUFFIXES = ("_initializer", "_regularizer", "_constraint")  # no effect on inference; weights are copied
_ENTRY_ONLY_KEYS = ("module", "registered_name", "build_config", "compile_config", "shared_object_id")
ATOL = 1e-5  # float32 tolerance of twin vs original: |diff| <= ATOL + RTOL * max|output|
RTOL = 1e-5
PROBE_SCALES = (1.0, 10.0)  # N(0, s^2) probe batches: a normalized window and a raw-ish one
PROBE_BATCH = 4
REMEDY = ("compile the Keras 3 file for an ONNX-lowered target instead (--targets onnxruntime:int8, openvino:int8, ...: "
          "tf2onnx converts it), or save the model with tf_keras (Keras 2)")


class KerasBridgeError(ModelLoadError):
    """A Keras 3 model the tf_keras bridge cannot rebuild, or whose rebuilt twin does not compute the same outputs."""


@dataclass(frozen=True)
class BridgeReport:
    """What :func:`bridge_keras3` measured: the twin vs the Keras 3 original on ``probes`` windows."""

    keras_version: str
    layers: int
    max_abs_diff: float
    tolerance: float
    probes: int

    def to_json(self) -> dict[str, Any]:
        return {"source": "keras3", "rebuilt_as": "tf_keras", "keras_version": self.keras_version, "layers": self.layers,
                "max_abs_diff": self.max_abs_diff, "tolerance": self.tolerance, "probe_windows": self.probes,
                "verification": "measured: tf_keras twin vs Keras 3 original, N(0,1) and N(0,100) windows, seed 0"}


class _Unsupported(Exception):
    """Internal: why one layer cannot be bridged (becomes KerasBridgeError or a precheck reason)."""


# --------------------------------------------------------------------------- config only (no TensorFlow)
def bridge_precheck(config: Mapping[str, Any]) -> str | None:
    """Why the Keras 3 model with the saved ``config`` (``config.json`` of a ``.keras`` archive) cannot be rebuilt in
    tf_keras, from the layer classes alone; None when nothing is found (the rebuild may still refuse an option)."""
    try:
        _check_model_entry(config, "model")
    except _Unsupported as why:
        return str(why)
    return None


def _check_model_entry(entry: Mapping[str, Any], where: str) -> None:
    cls = str(entry.get("class_name", "?"))
    if cls not in ("Functional", "Sequential", "Model"):
        raise _Unsupported(f"{where} is a subclassed Keras model ({cls}): it has no layer graph to rebuild in tf_keras")
    for layer in (entry.get("config") or {}).get("layers") or ():
        _check_layer_entry(layer)


def _check_layer_entry(entry: Mapping[str, Any]) -> None:
    cls = str(entry.get("class_name", "?"))
    cfg = entry.get("config") or {}
    name = str(cfg.get("name", entry.get("name", "?")))
    module = str(entry.get("module") or "keras.layers")
    # keras.ops nodes (x * 2, keras.ops.relu) carry layer-like names (Multiply) but other call semantics
    if cls not in BRIDGEABLE_LAYERS or not (module in _LAYER_MODULES or module.startswith(("keras.src.layers", "keras.src.models"))):
        kind = "a Lambda (Python code)" if cls == "Lambda" else f"{cls} from {module}"
        raise _Unsupported(f"layer {name!r} is {kind}, which the Keras 3 -> tf_keras bridge does not rebuild")
    if cls in ("Functional", "Sequential", "Model"):
        _check_model_entry(entry, f"layer {name!r}")
    for key in ("layer", "backward_layer"):  # Bidirectional / TimeDistributed wrap one layer
        if isinstance(cfg.get(key), Mapping):
            _check_layer_entry(cfg[key])
    for key in ("activation", "recurrent_activation"):
        if isinstance(cfg.get(key), Mapping):
            raise _Unsupported(f"layer {name!r} ({cls}) uses a custom {key}, which the bridge does not rebuild")
    policy = cfg.get("dtype")
    if isinstance(policy, Mapping) and "Quantized" in str(policy.get("class_name", "")):
        raise _Unsupported(f"layer {name!r} ({cls}) is Keras-3-quantized ({policy.get('class_name')}); tf_keras has no such layer")


# --------------------------------------------------------------------------- config translation
def tf_keras_config(entry: Mapping[str, Any], tf_keras: Any) -> dict[str, Any]:
    """The tf_keras ``{"class_name", "config"}`` of the Keras 3 model ``entry`` (``keras.saving.serialize_keras_object``
    or ``{"class_name": type(model).__name__, "config": model.get_config()}``). Raises :class:`KerasBridgeError`."""
    try:
        _check_model_entry(entry, "the model")
        return _model_entry(entry, tf_keras)
    except _Unsupported as why:
        raise KerasBridgeError(f"cannot rebuild the Keras 3 model in tf_keras: {why}", REMEDY) from None


def _model_entry(entry: Mapping[str, Any], tf_keras: Any) -> dict[str, Any]:
    cls = "Sequential" if entry["class_name"] == "Sequential" else "Functional"
    cfg = entry.get("config") or {}
    if cls == "Sequential":
        out = {"name": cfg.get("name"), "layers": [_layer_entry(e, tf_keras, nodes=False) for e in cfg.get("layers") or ()]}
        if cfg.get("build_input_shape") is not None:
            out["build_input_shape"] = _plain(cfg["build_input_shape"])
        return {"class_name": cls, "config": out}
    layers = [_layer_entry(e, tf_keras, nodes=True) for e in cfg.get("layers") or ()]
    outputs = _plain(cfg["output_layers"])
    # tf_keras counts a nested model's own construction as its node 0 (functional._should_skip_first_node); Keras 3 does not
    nested = {e["name"] for e in layers if e["class_name"] == "Functional" or (
        e["class_name"] == "Sequential" and (e["config"]["layers"] or [{}])[0].get("class_name") == "InputLayer")}
    for ref in [r for e in layers for r in _refs(e["inbound_nodes"])] + _refs(outputs):
        ref[1] = int(ref[1]) + (ref[0] in nested)
    _check_references(layers, nested)
    return {"class_name": cls, "config": {
        "name": cfg.get("name"), "trainable": cfg.get("trainable", True), "layers": layers,
        "input_layers": _plain(cfg["input_layers"]), "output_layers": outputs}}


def _refs(value: Any) -> list[list[Any]]:
    """The ``[layer, node, tensor(, kwargs)]`` references in a tf_keras node / layer list (the lists themselves)."""
    if isinstance(value, list) and len(value) in (3, 4) and isinstance(value[0], str):
        return [value]
    return [r for v in value for r in _refs(v)] if isinstance(value, list) else []


def _check_references(layers: list[dict[str, Any]], nested: set[str]) -> None:
    """Every call reads a node that exists: tf_keras' rebuild waits forever for one that does not."""
    nodes = {e["name"]: max(1, len(e["inbound_nodes"])) + (e["name"] in nested) for e in layers}
    for entry in layers:
        for ref in _refs(entry["inbound_nodes"]):
            if ref[0] not in nodes or not 0 <= int(ref[1]) < nodes[ref[0]]:
                raise _Unsupported(f"layer {entry['name']!r} reads node {ref[1]} of {ref[0]!r}, which the config does not hold")


def _layer_entry(entry: Mapping[str, Any], tf_keras: Any, *, nodes: bool) -> dict[str, Any]:
    cls = str(entry["class_name"])
    if cls in ("Functional", "Sequential", "Model"):
        out = _model_entry(entry, tf_keras)
        name = out["config"]["name"]
    else:
        name = str((entry.get("config") or {}).get("name", entry.get("name")))
        out = {"class_name": cls, "config": _layer_config(cls, name, entry.get("config") or {}, tf_keras)}
    if nodes:
        out["name"] = entry.get("name", name)
        out["inbound_nodes"] = [_node(n, name) for n in entry.get("inbound_nodes") or ()]
    return out


def _layer_config(cls: str, name: str, cfg: Mapping[str, Any], tf_keras: Any) -> dict[str, Any]:
    accepted = _accepted_options(getattr(tf_keras.layers, cls))
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        if key.endswith(_DROPPED_SUFFIXES) or key in _ENTRY_ONLY_KEYS:
            continue
        if cls == "InputLayer" and key == "batch_shape":
            key = "batch_input_shape"
        if key in ("layer", "backward_layer") and isinstance(value, Mapping):  # wrapped layer of Bidirectional / TimeDistributed
            out[key] = _layer_entry(value, tf_keras, nodes=False)
            continue
        if key not in accepted:
            neutral = _NEUTRAL_OPTIONS.get(key, ())
            if neutral is None or value in neutral:
                continue
            raise _Unsupported(f"layer {name!r} ({cls}) sets {key}={value!r}, which tf_keras' {cls} has no option for")
        out[key] = _dtype_name(value, name, cls) if key == "dtype" else _plain(value)
    return out


def _accepted_options(layer_cls: type) -> frozenset[str]:
    """Keyword arguments tf_keras' ``layer_cls`` (and the bases its ``**kwargs`` reach) take."""
    names: set[str] = set(_LAYER_KWARGS)
    for klass in layer_cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        names.update(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return frozenset(names)


def _dtype_name(value: Any, name: str, cls: str) -> Any:
    if not isinstance(value, Mapping):
        return value
    policy = value.get("config") or {}
    if not isinstance(policy, Mapping) or "name" not in policy:
        raise _Unsupported(f"layer {name!r} ({cls}) has dtype policy {value.get('class_name')!r}, which tf_keras cannot read")
    return policy["name"]


def _plain(value: Any) -> Any:
    """Keras 3's ``__tuple__`` records and tuples as plain lists (what tf_keras configs hold)."""
    if isinstance(value, Mapping):
        if value.get("class_name") == "__tuple__":
            return [_plain(v) for v in (value.get("config") or {}).get("value", ())]
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _node(node: Any, layer: str) -> Any:
    """A Keras 3 call record ``{"args": [...], "kwargs": {...}}`` as tf_keras' ``[[name, node, tensor, kwargs], ...]``."""
    if not isinstance(node, Mapping):
        return _plain(node)  # already the tf_keras layout
    args = list(node.get("args") or ())
    # None is every call option's default (mask=None, ...), and tf_keras loops forever on a None it tries to resolve
    kwargs = {k: v for k, v in dict(node.get("kwargs") or {}).items() if v is not None}
    if len(args) != 1 or any(not isinstance(v, (bool, int, float, str)) for v in kwargs.values()):
        raise _Unsupported(f"layer {layer!r} is called with {len(args)} positional argument(s) / keyword arguments "
                           f"({', '.join(kwargs) or 'none'}); the bridge rebuilds calls on one tensor structure with plain options")

    def convert(value: Any) -> Any:
        if _is_tensor(value):
            history = list(value["config"]["keras_history"])
            return [history[0], int(history[1]), int(history[2]), kwargs]
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        raise _Unsupported(f"layer {layer!r} is called with a constant argument ({type(value).__name__}); "
                           "the bridge rebuilds calls on tensors only")

    converted = convert(args[0])
    return [converted] if _is_tensor(args[0]) else converted


def _is_tensor(value: Any) -> bool:
    return isinstance(value, Mapping) and value.get("class_name") == "__keras_tensor__"


# --------------------------------------------------------------------------- the bridge
def bridge_keras3(model: Any, *, sample_shape: Sequence[int] | None = None, seed: int = 0) -> tuple[Any, BridgeReport]:
    """``(tf_keras twin, report)`` of the loaded Keras 3 Functional / Sequential ``model``.

    The twin is rebuilt from the model's config, gets the model's weights, and is run against it on
    ``2 x 4`` deterministic windows (``seed``, default 0; N(0,1) and N(0,100)); ``sample_shape`` (the contract's
    input shape without batch, default none) fills input dimensions the model leaves open (else 16).
    Raises :class:`KerasBridgeError` naming the layer(s) when a layer cannot be rebuilt or the outputs differ by more
    than ``ATOL + RTOL * max|output|``.
    """
    from nilmc.compiler.tfcompat import import_keras3, import_tf_keras

    keras = import_keras3("reading a Keras 3 model for the tf_keras bridge")
    tf_keras = import_tf_keras("rebuilding a Keras 3 model in tf_keras")
    entry = {"class_name": type(model).__name__, "config": model.get_config()}
    translated = tf_keras_config(entry, tf_keras)
    try:
        twin = tf_keras.layers.deserialize(translated)
    except Exception as exc:  # tf_keras raises ValueError / TypeError / KeyError on what it cannot parse
        raise KerasBridgeError(f"tf_keras cannot rebuild the Keras 3 model {model.name!r} ({_one_line(exc)})", REMEDY) from None
    _copy_weights(model, twin)
    probes = _probes(model, sample_shape, seed)
    diff, tol = _max_diff(model, twin, probes)
    if not diff <= tol:  # also catches NaN
        where = _differing_layers(keras, model, twin, probes)
        raise KerasBridgeError(f"the tf_keras twin of the Keras 3 model {model.name!r} differs from it by max |diff| {diff:.3g} "
                               f"(tolerance {tol:.3g}) at {where}", REMEDY)
    report = BridgeReport(str(keras.__version__), len(_leaf_layers(model)), float(diff), float(tol),
                          int(len(PROBE_SCALES) * PROBE_BATCH))
    return twin, report


def _one_line(exc: BaseException, limit: int = 200) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_model(layer: Any) -> bool:
    return hasattr(layer, "layers") and type(layer).__name__ in ("Functional", "Sequential", "Model")


def _leaf_layers(model: Any) -> list[Any]:
    out = []
    for layer in model.layers:
        if type(layer).__name__ != "InputLayer":
            out.extend(_leaf_layers(layer) if _is_model(layer) else [layer])
    return out


def _copy_weights(src: Any, dst: Any) -> None:
    """Keras 3 weights into the twin, layer by layer by name (both keep the config's names), shapes checked."""
    import numpy as np

    for layer in src.layers:
        try:
            twin = dst.get_layer(layer.name)
        except ValueError:
            raise KerasBridgeError(f"the tf_keras twin has no layer {layer.name!r} of the Keras 3 model", REMEDY) from None
        if _is_model(layer):
            _copy_weights(layer, twin)
            continue
        values = [np.asarray(w) for w in layer.get_weights()]
        shapes = [tuple(v.shape) for v in values]
        want = [tuple(int(d) for d in w.shape) for w in twin.weights]
        if shapes != want:
            raise KerasBridgeError(f"layer {layer.name!r} ({type(layer).__name__}) has weights {shapes} in Keras 3 but "
                                   f"{want} in its tf_keras twin", REMEDY)
        if values:
            twin.set_weights(values)


def _probes(model: Any, sample_shape: Sequence[int] | None, seed: int) -> list[list[Any]]:
    """Per probe batch, one array per model input: N(0, s^2) windows of the input's shape (open dims filled)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    shapes = []
    for tensor in model.inputs:
        dims = list(tensor.shape)[1:]
        fill = list(sample_shape) if sample_shape is not None and len(sample_shape) == len(dims) else [16] * len(dims)
        shapes.append(tuple(int(d) if d is not None else int(f) for d, f in zip(dims, fill, strict=True)))
    return [[(scale * rng.standard_normal((PROBE_BATCH, *s))).astype(np.float32) for s in shapes] for scale in PROBE_SCALES]


def _outputs(model: Any, feeds: list[Any]) -> list[Any]:
    import numpy as np

    from nilmc.compiler.tfcompat import import_tf

    out = model(feeds if len(feeds) > 1 else feeds[0], training=False)
    return [np.asarray(o, np.float64) for o in import_tf().nest.flatten(out)]


def _max_diff(model: Any, twin: Any, probes: list[list[Any]]) -> tuple[float, float]:
    import numpy as np

    diff, scale = 0.0, 0.0
    for feeds in probes:
        ref, got = _outputs(model, feeds), _outputs(twin, feeds)
        if [r.shape for r in ref] != [g.shape for g in got]:
            return float("inf"), 0.0
        for r, g in zip(ref, got, strict=True):
            diff = max(diff, float(np.max(np.abs(r - g))) if r.size else 0.0)
            scale = max(scale, float(np.max(np.abs(r))) if r.size else 0.0)
    return diff, ATOL + RTOL * scale


def _differing_layers(keras: Any, model: Any, twin: Any, probes: list[list[Any]], limit: int = 3) -> str:
    """The first layers (in graph order) whose outputs differ beyond tolerance, as ``'name' (Class): diff``."""
    import numpy as np

    try:
        layers = [l for l in model.layers if type(l).__name__ != "InputLayer"]
        ins = model.inputs if len(model.inputs) > 1 else model.inputs[0]  # the structure the model was built with
        ref_probe = keras.Model(ins, [l.output for l in layers])
        tf_keras = type(twin).__module__.split(".")[0]
        import importlib

        tk = importlib.import_module(tf_keras)
        got_probe = tk.Model(twin.inputs if len(twin.inputs) > 1 else twin.inputs[0], [twin.get_layer(l.name).output for l in layers])
        feeds = probes[0]
        ref, got = _outputs(ref_probe, feeds), _outputs(got_probe, feeds)
    except Exception:  # a nested / multi-node layer has no single .output: say so instead of guessing
        return "the model output (per-layer comparison unavailable for this graph)"
    bad = []
    for layer, r, g in zip(layers, ref, got, strict=False):
        d = float(np.max(np.abs(r - g))) if r.shape == g.shape else float("inf")
        if not d <= ATOL + RTOL * float(np.max(np.abs(r), initial=0.0)):
            bad.append(f"layer {layer.name!r} ({type(layer).__name__}): max |diff| {d:.3g}")
    return "; ".join(bad[:limit]) if bad else "the model output"

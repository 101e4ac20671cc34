"""Lazy, quiet imports of TensorFlow, tf_keras (Keras 2) and Keras 3, and the Keras helpers
the frontend and the TFLite-based backends (tflite, eiq, the DPU's QAT) share.

nilmc's core must import without TensorFlow, so every TensorFlow import goes
through here, inside the function that needs it.

Shared helpers (public, one place): :func:`stderr_silenced`, :func:`read_keras` (cached per
process by file content), :func:`read_tf_keras` (a Keras 3 file bridged to tf_keras,
:mod:`nilmc.compiler.keras_bridge`), :func:`load_keras` (the tf_keras model behind a ``Model``),
:func:`keras_bridge_record`, :func:`kernel_and_bias`, :func:`require_tflite`.

Why the environment variables: QAT with ``tensorflow-model-optimization`` only
works with Keras 2 (the ``tf_keras`` package). TensorFlow picks the Keras behind
``tf.keras`` from ``TF_USE_LEGACY_KERAS``, and tfmot reads it when imported, so
:func:`import_tf` sets it (``setdefault``: a value the user chose wins) before
TensorFlow is first imported. Keras 3 stays importable as ``keras`` for reading
files Keras 3 wrote.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import os
import sys
import zipfile
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from nilmc.compiler.errors import BadInputError, MissingDependencyError, ModelLoadError, NilmcError, QuantizationError

if TYPE_CHECKING:
    import numpy as np

    from nilmc.compiler.frontend import SourceKind
    from nilmc.compiler.model import Model

_EXTRA = "tf"
NO_KERAS = "TFLite lowering needs the Keras model; pass the .keras/.h5 file"
# Loaded Keras models kept per process, keyed by file content: reading the shipped T-P model takes
# 0.5 s after TensorFlow is up (measured), and one compile read it 5 times (frontend + 4 TFLite targets).
_KERAS_SLOTS = 4
_KERAS_CACHE: OrderedDict[tuple[str, str], Any] = OrderedDict()
_BRIDGED = "keras3_bridged"  # cache kind of a Keras 3 file's tf_keras twin
# What the bridge measured (or why it refused), per Keras 3 file content: manifests read it, a refusal is not redone.
_BRIDGE_OUTCOMES: dict[str, Any] = {}


def _set_environment() -> None:
    # Both must be set before the first `import tensorflow`; later they do nothing.
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    # Keras 3 must run on TensorFlow for the TF -> ONNX conversion.
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")


def _import(package: str, module: str, purpose: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependencyError(package, _EXTRA, purpose) from None


@contextmanager
def stderr_silenced() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null for the duration.

    TensorFlow's C++ start-up lines (oneDNN, CUDA stubs) are written before absl
    logging is initialised, so ``TF_CPP_MIN_LOG_LEVEL`` cannot hide them.
    """
    try:
        sys.stderr.flush()
        saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
    except (OSError, ValueError, AttributeError):
        yield  # no real fd 2 (embedded interpreter): nothing to silence
        return
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _quiet_python_loggers() -> None:
    for name in ("tensorflow", "tf2onnx", "absl", "h5py"):
        logging.getLogger(name).setLevel(logging.ERROR)


def legacy_keras_active() -> bool:
    """True when ``tf.keras`` is Keras 2 (tf_keras), as QAT with tfmot needs.

    False when TensorFlow was imported by someone else before nilmc could set
    ``TF_USE_LEGACY_KERAS=1`` (or the user set it to 0).
    """
    if "tensorflow" not in sys.modules:
        return os.environ.get("TF_USE_LEGACY_KERAS", "1") not in ("0", "false", "False")
    tf = sys.modules["tensorflow"]
    return getattr(tf.keras, "__name__", "").startswith("tf_keras")


def import_tf(purpose: str = "loading TensorFlow / Keras models") -> ModuleType:
    """Import and return ``tensorflow``, quietly, with Keras 2 behind ``tf.keras``.

    Sets ``TF_USE_LEGACY_KERAS=1``, ``TF_CPP_MIN_LOG_LEVEL=3`` and
    ``KERAS_BACKEND=tensorflow`` (each only if unset) before the first import.
    Raises :class:`MissingDependencyError` (extra ``tf``) when TensorFlow is absent;
    ``purpose`` names what needed it in that message.
    """
    _set_environment()
    if "tensorflow" in sys.modules:
        tf = sys.modules["tensorflow"]
    else:
        with stderr_silenced():
            tf = _import("tensorflow", "tensorflow", purpose)
    tf.get_logger().setLevel(logging.ERROR)
    _quiet_python_loggers()
    return tf


def import_tf_keras(purpose: str = "loading Keras 2 (tf_keras) models") -> ModuleType:
    """Import and return the ``tf_keras`` package (Keras 2), after :func:`import_tf`."""
    import_tf(purpose)
    return _import("tf-keras", "tf_keras", purpose)


def import_keras3(purpose: str = "loading Keras 3 models") -> ModuleType:
    """Import and return Keras 3 (the ``keras`` package) on the TensorFlow backend.

    Raises :class:`MissingDependencyError` when it is absent or is not Keras 3.
    """
    import_tf(purpose)
    keras = _import("keras", "keras", purpose)
    if not str(getattr(keras, "__version__", "0")).startswith("3"):
        raise MissingDependencyError("keras>=3", _EXTRA, purpose)
    return keras


def import_tf2onnx(purpose: str = "converting TensorFlow / Keras models to ONNX") -> ModuleType:
    """Import and return ``tf2onnx`` (after TensorFlow), with its logging silenced."""
    import_tf(purpose)
    tf2onnx = _import("tf2onnx", "tf2onnx", purpose)
    _quiet_python_loggers()
    return tf2onnx


def import_h5py(purpose: str = "reading HDF5 (.h5) Keras files") -> ModuleType:
    """Import and return ``h5py`` (comes with the ``tf`` extra)."""
    return _import("h5py", "h5py", purpose)


# --------------------------------------------------------------------------- Keras models
def read_keras(path: str | Path, kind: SourceKind) -> Any:
    """Load the Keras model file ``path`` of ``kind`` (``SourceKind.KERAS3`` or ``TF_KERAS``), without compiling it.

    Cached per process by (kind, sha256 of the file): every caller gets the same object, so treat it as
    read-only (clone before training; :func:`nilmc.quantization.qat.qat_finetune` does). Raises
    :class:`ModelLoadError` when Keras cannot load it, :class:`MissingDependencyError` without TensorFlow.
    """
    from nilmc.compiler.frontend import SourceKind

    path = Path(path)
    key = (SourceKind(kind).value, _file_sha256(path))
    if key in _KERAS_CACHE:
        _KERAS_CACHE.move_to_end(key)
        return _KERAS_CACHE[key]
    model = _load_keras_file(path, SourceKind(kind))
    _cache_put(key, model)
    return model


def clear_keras_cache() -> None:
    """Forget the models :func:`read_keras` keeps (tests; a long-running process that reloads many models)."""
    _KERAS_CACHE.clear()
    _BRIDGE_OUTCOMES.clear()


def _cache_put(key: tuple[str, str], model: Any) -> None:
    _KERAS_CACHE[key] = model
    while len(_KERAS_CACHE) > _KERAS_SLOTS:
        _KERAS_CACHE.popitem(last=False)


def read_tf_keras(path: str | Path, *, sample_shape: tuple[int, ...] | None = None) -> Any:
    """The tf_keras (Keras 2) model of the Keras file ``path``: a tf_keras file as :func:`read_keras` loads it; a Keras 3
    file rebuilt in tf_keras and checked against itself (:func:`nilmc.compiler.keras_bridge.bridge_keras3`;
    ``sample_shape``, default none, fills input dimensions the model leaves open). Cached like :func:`read_keras`.

    Raises :class:`~nilmc.compiler.keras_bridge.KerasBridgeError` when the Keras 3 model cannot be rebuilt or its twin
    computes other outputs, :class:`BadInputError` for a file that is neither.
    """
    from nilmc.compiler.frontend import SourceKind, detect_kind

    path = Path(path)
    kind = detect_kind(path)
    if kind is SourceKind.TF_KERAS:
        return read_keras(path, kind)
    if kind is not SourceKind.KERAS3:
        raise BadInputError(f"{str(path)!r} is a {kind.value} model, not a Keras file",
                            "load the model from its .keras or .h5 file (nilmc compile model.keras ...)")
    digest = _file_sha256(path)
    key = (_BRIDGED, digest)
    if key in _KERAS_CACHE:
        _KERAS_CACHE.move_to_end(key)
        return _KERAS_CACHE[key]
    outcome = _BRIDGE_OUTCOMES.get(digest)
    if isinstance(outcome, NilmcError):
        raise outcome
    from nilmc.compiler.keras_bridge import KerasBridgeError, bridge_keras3

    try:
        twin, report = bridge_keras3(read_keras(path, kind), sample_shape=sample_shape)
    except KerasBridgeError as exc:
        _BRIDGE_OUTCOMES[digest] = exc
        raise
    _BRIDGE_OUTCOMES[digest] = report
    _cache_put(key, twin)
    return twin


def keras_bridge_record(model: Model) -> dict[str, Any] | None:
    """For manifests: how ``model``'s Keras 3 source became tf_keras (versions, measured max |diff|), once
    :func:`load_keras` bridged it in this process; None for tf_keras sources and models not bridged."""
    if not model.keras_path:
        return None
    try:
        outcome = _BRIDGE_OUTCOMES.get(_file_sha256(Path(model.keras_path)))
    except NilmcError:
        return None
    return outcome.to_json() if outcome is not None and not isinstance(outcome, NilmcError) else None


def _file_sha256(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        raise ModelLoadError(f"cannot read {str(path)!r} ({exc.strerror or exc})", "check the path and its permissions") from None


def _load_keras_file(path: Path, kind: SourceKind) -> Any:
    from nilmc.compiler.frontend import SourceKind

    if kind is SourceKind.KERAS3:
        keras = import_keras3(f"loading {path.name}")
        if keras.backend.backend() != "tensorflow":
            raise ModelLoadError(
                f"Keras 3 runs on the {keras.backend.backend()!r} backend here; converting {str(path)!r} needs TensorFlow",
                "set KERAS_BACKEND=tensorflow before starting Python",
            )
        loader = keras.saving.load_model
    else:
        loader = import_tf_keras(f"loading {path.name}").models.load_model
    try:
        with _quantize_scope_if_needed(path, kind):
            return loader(str(path), compile=False)
    except NilmcError:
        raise
    except Exception as exc:  # Keras raises ValueError, TypeError, OSError, KeyError...
        flavor = "Keras 3" if kind is SourceKind.KERAS3 else "Keras 2 (tf_keras)"
        raise ModelLoadError(
            f"{flavor} cannot load {str(path)!r} ({_one_line(exc)})",
            "save it again with model.save() (tfmot QAT models as .h5 or a SavedModel directory: tf_keras cannot reload them "
            "from .keras); for custom layers export to ONNX and load the .onnx",
        ) from None


def _one_line(exc: BaseException, limit: int = 200) -> str:
    """A library exception as one short line: ``Type: first line`` (the frontend's format)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _quantize_scope_if_needed(path: Path, kind: SourceKind) -> AbstractContextManager[Any]:
    """tfmot's ``quantize_scope`` for tf_keras QAT models (QuantizeWrapper layers), else a no-op."""
    from nilmc.compiler.frontend import SourceKind

    if kind is not SourceKind.TF_KERAS or not _mentions_quantize_wrapper(path):
        return nullcontext()
    try:
        import tensorflow_model_optimization as tfmot
    except ImportError:
        return nullcontext()  # the load fails and says which layer is unknown
    scope: AbstractContextManager[Any] = tfmot.quantization.keras.quantize_scope()
    return scope


def saved_keras_config(path: Path) -> dict[str, Any]:
    """The model config a saved Keras file carries (``config.json`` of a ``.keras`` archive, the ``model_config``
    attribute of an ``.h5``), read without TensorFlow; ``{}`` when it has none. Raises what the file reader raises."""
    import json

    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            config = json.loads(zf.read("config.json")) if "config.json" in zf.namelist() else {}
    else:
        with import_h5py().File(path, "r") as fh:
            raw = fh.attrs.get("model_config", b"{}")
        config = json.loads(raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw))
    return config if isinstance(config, dict) else {}


def _mentions_quantize_wrapper(path: Path) -> bool:
    """True when the saved model config names tfmot's QuantizeWrapper (reads only the config)."""
    import json

    try:
        return "QuantizeWrapper" in json.dumps(saved_keras_config(path))
    except Exception:  # unreadable here means the real load reports it
        return False


def load_keras(model: Model) -> Any:
    """The tf_keras (Keras 2) model behind ``model`` (its ``keras_path``), through :func:`read_tf_keras`, without
    the leading normalization layers the contract's float input stage took over
    (:func:`nilmc.quantization.io_affine.strip_keras_input_affine`).

    A Keras 3 file is rebuilt in tf_keras and measured against itself first (:func:`read_tf_keras`; what it measured:
    :func:`keras_bridge_record`). Raises :class:`BadInputError` when ``model`` has no Keras source,
    :class:`~nilmc.compiler.keras_bridge.KerasBridgeError` when its Keras 3 model cannot be bridged.
    """
    if not model.keras_path:
        raise BadInputError(f"model {model.source or '?'!r} has no Keras source ({NO_KERAS})",
                            "load the model from its .keras or .h5 file (nilmc compile model.keras ...), not from .onnx or a SavedModel")
    keras_model = read_tf_keras(model.keras_path, sample_shape=tuple(model.contract.input_shape))
    # normalization the graph carried is the contract's float stage now: lower the Keras model without it
    from nilmc.quantization.io_affine import strip_keras_input_affine

    return strip_keras_input_affine(keras_model, model.contract)


def keras_source_precheck(model: Model, *, remedy: str | None = None) -> str | None:
    """Why ``model``'s Keras source cannot feed a tf_keras lowering, from its saved config alone (no TensorFlow):
    a Keras 3 layer the bridge does not rebuild, then ``remedy`` (default: the bridge's, ONNX-lowered targets);
    None when nothing is found or there is no Keras source."""
    if not model.keras_path:
        return None
    from nilmc.compiler.frontend import SourceKind, detect_kind
    from nilmc.compiler.keras_bridge import REMEDY, bridge_precheck

    path = Path(model.keras_path)
    try:
        if detect_kind(path) is not SourceKind.KERAS3:
            return None
        why = bridge_precheck(saved_keras_config(path))
    except Exception:  # unreadable here: the lowering reports it with its own message
        return None
    return None if why is None else f"{why}; {remedy or REMEDY}"


def kernel_and_bias(layer: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """Float kernel and bias of a Conv2D / Dense layer, read from its variables. For a QAT wrapper pass the
    wrapper: the wrapped layer no longer lists its kernel (``layer.kernel`` is the fake-quantized tensor)."""
    import numpy as np

    inner = getattr(layer, "layer", None)
    prefix = inner.name + "/" if inner is not None else ""
    arrays = {v.name.split("/")[-1].split(":")[0]: v for v in layer.weights if v.name.startswith(prefix)}
    if "kernel" not in arrays:
        raise QuantizationError(f"layer {layer.name!r} has no kernel variable", "pass a Conv2D or Dense layer")
    bias = arrays.get("bias")
    return np.asarray(arrays["kernel"].numpy(), np.float32), None if bias is None else np.asarray(bias.numpy(), np.float32)


def require_tflite(extra: str = "tflite", purpose: str = "TFLite lowering") -> None:
    """Raise :class:`MissingDependencyError` (naming ``extra``, default ``tflite``) unless TensorFlow and
    ai_edge_litert are installed; imports neither."""
    for module, package in (("tensorflow", "tensorflow"), ("ai_edge_litert", "ai-edge-litert")):
        if importlib.util.find_spec(module) is None:
            raise MissingDependencyError(package, extra, purpose)

"""Lazy, quiet imports of TensorFlow, tf_keras (Keras 2) and Keras 3.

nilmc's core must import without TensorFlow, so every TensorFlow import goes
through here, inside the function that needs it.

Why the environment variables: QAT with ``tensorflow-model-optimization`` only
works with Keras 2 (the ``tf_keras`` package). TensorFlow picks the Keras behind
``tf.keras`` from ``TF_USE_LEGACY_KERAS``, and tfmot reads it when imported, so
:func:`import_tf` sets it (``setdefault``: a value the user chose wins) before
TensorFlow is first imported. Keras 3 stays importable as ``keras`` for reading
files Keras 3 wrote.
"""
from __future__ import annotations

import importlib
import logging
import os
import sys
from contextlib import contextmanager
from types import ModuleType
from typing import Iterator

from nilmc.compiler.errors import MissingDependencyError

_EXTRA = "tf"


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
def _stderr_silenced() -> Iterator[None]:
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
        with _stderr_silenced():
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

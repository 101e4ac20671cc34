"""The backend protocol: declared capabilities, ``lower`` (no hardware) and ``runner``."""
from __future__ import annotations

import dataclasses
import importlib.util
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from nilmc.compiler.model import Model


class Verification(str, Enum):
    """How a result was obtained on this machine."""

    MEASURED = "measured"  # the artifact itself ran in its real runtime here
    EMULATED = "emulated"  # an emulation of the target ran (e.g. Q/DQ graph in onnxruntime, numpy DPU model)
    NOT_VERIFIED = "not verified"


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do, as data.

    ``precisions`` are the precision names it lowers to (``fp32``, ``fp16``, ``int8``, ...).
    ``traits`` maps a precision to its quantization traits record (``quantization.traits``):
    a precision with traits quantizes, and the compile driver derives its parameters from the
    one calibration pass, runs the overflow checks under the user's policy and hands the
    result to ``lower`` as ``options["params"]`` (``options["overflow"]`` the report).
    ``estimators`` maps a precision to the range estimator its parameters start from
    (default: nilmc's techniques pipeline). ``requires`` lists importable modules it needs and
    ``extra`` the pip extra providing them; ``keras_precisions`` the precisions that lower from
    the Keras source (they need TensorFlow and a .keras/.h5 model).
    ``options`` is the backend's typed options record: a frozen dataclass whose fields all
    have defaults, reachable as ``--option BACKEND.FIELD=VALUE`` and from the Python API. Where an
    option changes the traits a precision derives its parameters under (e.g. ``cpu_layers=none``:
    full integer), the record defines ``quant_traits(precision, traits) -> traits`` and the driver
    derives the shared parameters under what it returns.
    ``limitations`` declares known gaps as data, so tests and reports can read them.
    """

    precisions: tuple[str, ...]
    description: str = ""
    traits: Mapping[str, Any] = field(default_factory=dict)
    requires: tuple[str, ...] = ()
    extra: str | None = None
    limitations: Mapping[str, str] = field(default_factory=dict)
    estimators: Mapping[str, str] = field(default_factory=dict)
    keras_precisions: tuple[str, ...] = ()
    options: type | None = None
    in_all: bool = True  # part of `--targets all` (False: asked for by name only, e.g. a slow interpreter)
    onnx_ml_precisions: tuple[str, ...] = ()  # precisions whose runtime runs ONNX-ML ops (TreeEnsemble...); others refuse them

    def quantizes(self, precision: str) -> bool:
        return precision in self.traits

    def needs_keras(self, precision: str) -> bool:
        return precision in self.keras_precisions


@dataclass
class Artifact:
    backend: str
    precision: str
    directory: Path
    primary: str  # file name (relative to directory) of the deployable artifact
    files: list[str] = field(default_factory=list)
    kind: str = ""  # human label, e.g. "ONNX FP32 (onnxruntime)"
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return self.directory / self.primary


@runtime_checkable
class Runner(Protocol):
    """A context-managed session running one artifact."""

    verification: Verification

    def __enter__(self) -> Runner: ...

    def __exit__(self, *exc: object) -> None: ...

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


@runtime_checkable
class Backend(Protocol):
    name: str
    capabilities: Capabilities

    def lower(self, model: Model, out_dir: Path, *, precision: str, options: Mapping[str, Any] | None = None) -> Artifact:
        """Write the artifact for ``precision`` into ``out_dir`` (needs no hardware)."""
        ...

    def runner(self, artifact: Artifact) -> Runner:
        """A runner for an artifact this backend lowered."""
        ...


def precheck(backend: Any, model: Any, precision: str) -> str | None:
    """A backend's optional ``precheck(model, precision) -> str | None``: what makes the target unable to take the model,
    found from the graph alone before any calibration (None: nothing found, or the backend has no pre-check)."""
    ml = onnx_ml_ops(model)
    if ml and precision not in getattr(backend.capabilities, "onnx_ml_precisions", ()):
        return (f"{', '.join(ml)} is an ONNX-ML op (domain ai.onnx.ml) and {backend.name}:{precision} cannot run it; "
                "only onnxruntime:fp32 runs it; use --targets onnxruntime:fp32")
    check = getattr(backend, "precheck", None)
    return check(model, precision) if callable(check) else None


def onnx_ml_ops(model: Any) -> list[str]:
    """The ONNX-ML ops (domain ``ai.onnx.ml``: TreeEnsembleRegressor, TreeEnsembleClassifier...) in ``model``'s graph."""
    return sorted({n.op_type for n in model.graph.graph.node if n.domain == "ai.onnx.ml"})


def option_fields(caps: Capabilities) -> dict[str, dataclasses.Field[Any]]:
    """The typed options a backend declares (name -> dataclass field); {} when it has none."""
    return {f.name: f for f in dataclasses.fields(caps.options)} if caps.options is not None else {}


def parse_backend_options(backend: str, caps: Capabilities, raw: Mapping[str, Any]) -> Any:
    """Build a backend's typed options record from ``raw`` (strings from the CLI, or values from Python).

    Strings are converted by the field's annotation (bool: true/false/1/0/yes/no; int; float;
    str; ``X | None`` also takes "none"). Unknown names and bad values raise
    :class:`BadInputError` naming the backend's options. Returns None when the backend has
    no options record and ``raw`` is empty.
    """
    from nilmc.compiler.errors import BadInputError

    fields = option_fields(caps)
    if not fields:
        if raw:
            raise BadInputError(f"backend {backend!r} takes no options (got {', '.join(sorted(raw))})", "remove the --option for it")
        return None
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise BadInputError(f"unknown option(s) {', '.join(f'{backend}.{u}' for u in unknown)}",
                            f"{backend} takes: {', '.join(f'{backend}.{n}' for n in fields)}")
    hints = typing.get_type_hints(caps.options)
    values = {k: _coerce(backend, k, v, hints[k]) for k, v in raw.items()}
    try:
        return caps.options(**values)
    except (TypeError, ValueError) as exc:
        raise BadInputError(f"invalid {backend} options {values} ({exc})", f"{backend} takes: {', '.join(fields)}") from None


def _coerce(backend: str, name: str, value: Any, hint: Any) -> Any:
    from nilmc.compiler.errors import BadInputError

    if not isinstance(value, str):
        return value
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    text = value.strip()
    if optional and text.lower() in ("none", "null", ""):
        return None
    try:
        if base is bool:
            low = text.lower()
            if low not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                raise ValueError(f"not a boolean: {text!r}")
            return low in ("true", "1", "yes", "on")
        if base in (int, float):
            return base(text)
    except ValueError as exc:
        raise BadInputError(f"option {backend}.{name}={value!r}: {exc}", f"{backend}.{name} is a {getattr(base, '__name__', base)}") from None
    return text


def missing_modules(modules: tuple[str, ...]) -> list[str]:
    """Modules from ``modules`` that cannot be imported here (checked without importing them)."""
    out = []
    for mod in modules:
        try:
            if importlib.util.find_spec(mod) is None:
                out.append(mod)
        except (ImportError, ValueError):
            out.append(mod)
    return out


def availability(backend: Backend) -> tuple[bool, str]:
    """Whether a backend's requirements import here, and why not."""
    missing = missing_modules(tuple(backend.capabilities.requires))
    if missing:
        extra = backend.capabilities.extra
        hint = f"pip install 'nilmc[{extra}]'" if extra else "install " + ", ".join(missing)
        return False, f"missing {', '.join(missing)} ({hint})"
    return True, "ok"

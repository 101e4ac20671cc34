"""The backend protocol: declared capabilities, ``lower`` (no hardware) and ``runner``."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Protocol, runtime_checkable

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
    ``traits`` maps a precision to its quantization traits record (``quantization.traits``),
    ``requires`` lists importable modules it needs and ``extra`` the pip extra providing them.
    ``limitations`` declares known gaps as data, so tests and reports can read them.
    """

    precisions: tuple[str, ...]
    description: str = ""
    traits: Mapping[str, Any] = field(default_factory=dict)
    requires: tuple[str, ...] = ()
    extra: str | None = None
    limitations: Mapping[str, str] = field(default_factory=dict)


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

    def __enter__(self) -> "Runner": ...

    def __exit__(self, *exc: object) -> None: ...

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


@runtime_checkable
class Backend(Protocol):
    name: str
    capabilities: Capabilities

    def lower(self, model: "Model", out_dir: Path, *, precision: str, options: Mapping[str, Any] | None = None) -> Artifact:
        """Write the artifact for ``precision`` into ``out_dir`` (needs no hardware)."""
        ...

    def runner(self, artifact: Artifact) -> Runner:
        """A runner for an artifact this backend lowered."""
        ...


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

"""The backend registry: built-ins registered in one place, plugins via entry points.

Third-party packages expose ``register(registry)`` in the entry-point group
``nilmc.backends``. A plugin that fails to import becomes a placeholder that
raises the original error only when it is used, so it never breaks the CLI.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from nilmc.backends.base import Artifact, Backend, Capabilities, availability, option_fields
from nilmc.compiler.errors import BadInputError, UnknownBackendError

ENTRY_POINT_GROUP = "nilmc.backends"


class PluginLoadError(BadInputError):
    """A backend plugin failed to load; raised when that backend is used."""


@dataclass
class BrokenPlugin:
    """Placeholder for a plugin that failed to import or register."""

    name: str
    error: str
    capabilities: Capabilities = field(default_factory=lambda: Capabilities(precisions=(), description="failed to load"))

    def _raise(self) -> None:
        raise PluginLoadError(f"backend plugin {self.name!r} failed to load: {self.error}",
                              f"fix or reinstall the package providing entry point {self.name!r} in group {ENTRY_POINT_GROUP!r}")

    def lower(self, *a: Any, **k: Any) -> Artifact:
        self._raise()
        raise AssertionError

    def runner(self, *a: Any, **k: Any) -> Any:
        self._raise()


@dataclass(frozen=True)
class Target:
    """A parsed ``backend:precision`` target."""

    backend: str
    precision: str

    def __str__(self) -> str:
        return f"{self.backend}:{self.precision}"


class Registry:
    def __init__(self) -> None:
        self._backends: dict[str, Backend | BrokenPlugin] = {}

    def register(self, backend: Backend, *, replace: bool = False) -> None:
        name = getattr(backend, "name", None)
        if not isinstance(name, str) or not name or ":" in name or "," in name:
            raise BadInputError(f"backend name {name!r} is invalid", "use a non-empty name without ':' or ','")
        if not isinstance(getattr(backend, "capabilities", None), Capabilities):
            raise BadInputError(f"backend {name!r} has no Capabilities record", "set `capabilities = Capabilities(precisions=(...))`")
        for attr in ("lower", "runner"):
            if not callable(getattr(backend, attr, None)):
                raise BadInputError(f"backend {name!r} lacks a callable {attr}()", "implement the nilmc.backends.base.Backend protocol")
        if name in self._backends and not replace:
            raise BadInputError(f"a backend named {name!r} is already registered", "choose another name or pass replace=True")
        self._backends[name] = backend

    def names(self) -> list[str]:
        return sorted(self._backends)

    def __iter__(self) -> Iterator[Backend | BrokenPlugin]:
        return iter(self._backends[n] for n in self.names())

    def __contains__(self, name: str) -> bool:
        return name in self._backends

    def get(self, name: str) -> Backend:
        try:
            b = self._backends[name]
        except KeyError:
            raise UnknownBackendError(f"unknown backend {name!r}", f"available: {', '.join(self.names()) or 'none'}; see `nilmc backends`") from None
        if isinstance(b, BrokenPlugin):
            b._raise()
        return b  # type: ignore[return-value]

    def parse_target(self, text: str) -> Target:
        name, sep, precision = text.strip().partition(":")
        backend = self.get(name)
        precs = backend.capabilities.precisions
        if not sep:
            raise UnknownBackendError(f"target {text!r} names no precision", f"write {name}:PRECISION with PRECISION one of {', '.join(precs)}")
        if precision not in precs:
            raise UnknownBackendError(f"backend {name!r} has no precision {precision!r}", f"available for {name}: {', '.join(precs)}")
        return Target(name, precision)

    def parse_targets(self, text: str) -> list[Target]:
        """Parse ``a:fp32,b:int8``; ``backend:all`` expands to every precision; ``all`` to every target."""
        out: list[Target] = []
        for part in [p for p in text.split(",") if p.strip()]:
            part = part.strip()
            if part == "all":
                for b in self:
                    if isinstance(b, BrokenPlugin) or not availability(b)[0]:  # type: ignore[arg-type]
                        continue
                    if b.capabilities.in_all:
                        out.extend(Target(b.name, p) for p in b.capabilities.precisions)
            elif part.endswith(":all"):
                b = self.get(part[:-4])
                out.extend(Target(b.name, p) for p in b.capabilities.precisions)
            else:
                out.append(self.parse_target(part))
        if not out:
            raise UnknownBackendError(f"no targets in {text!r}", "pass e.g. --targets onnxruntime:fp32")
        seen: set[Target] = set()
        return [t for t in out if not (t in seen or seen.add(t))]

    def status(self) -> list[dict[str, Any]]:
        rows = []
        for name in self.names():
            b = self._backends[name]
            if isinstance(b, BrokenPlugin):
                rows.append({"name": name, "precisions": [], "available": False, "reason": f"plugin failed to load: {b.error}", "description": ""})
                continue
            ok, why = availability(b)
            caps = b.capabilities
            rows.append({
                "name": name,
                "precisions": list(caps.precisions),
                "available": ok,
                "reason": why,
                "description": caps.description,
                "limitations": dict(caps.limitations),
                "quantizing_precisions": [p for p in caps.precisions if caps.quantizes(p)],
                "keras_precisions": list(caps.keras_precisions),
                "options": {n: {"type": str(f.type), "default": None if f.default is dataclasses.MISSING else f.default}
                            for n, f in option_fields(caps).items()},
            })
        return rows

    def load_entry_points(self, group: str = ENTRY_POINT_GROUP) -> None:
        """Load third-party backends; failures become :class:`BrokenPlugin` placeholders."""
        for ep in importlib.metadata.entry_points(group=group):
            try:
                register = ep.load()
                if not callable(register):
                    raise TypeError(f"entry point value {ep.value!r} is not callable")
                register(self)
            except Exception as exc:  # a plugin must never break the CLI
                if ep.name not in self._backends:
                    self._backends[ep.name] = BrokenPlugin(ep.name, f"{type(exc).__name__}: {exc}")


def register_builtins(registry: Registry) -> None:
    """Every built-in backend, in one place."""
    from nilmc.backends.dpu import DPUBackend
    from nilmc.backends.eiq_backend import EIQBackend
    from nilmc.backends.onnxruntime_backend import OnnxRuntimeBackend
    from nilmc.backends.openvino_backend import OpenVINOBackend
    from nilmc.backends.tensorrt_backend import TensorRTBackend
    from nilmc.backends.tflite_backend import TFLiteBackend
    from nilmc.backends.tflm_backend import TFLMBackend

    for backend in (OnnxRuntimeBackend(), TFLiteBackend(), EIQBackend(), OpenVINOBackend(), TensorRTBackend(), DPUBackend(), TFLMBackend()):
        registry.register(backend)


def default_registry(*, plugins: bool = True) -> Registry:
    """A fresh registry with the built-ins and (by default) the installed plugins."""
    reg = Registry()
    register_builtins(reg)
    if plugins:
        reg.load_entry_points()
    return reg

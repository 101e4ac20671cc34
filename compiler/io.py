"""Atomic file and directory writes (partial artifacts are never left behind) and strict JSON.

Every file nilmc writes goes through here: it is written to a hidden sibling and
renamed into place, with the permissions the user's umask gives (not the 0600/0700
of ``tempfile``), and JSON is strict (no ``NaN``/``Infinity``: a non-finite number
becomes ``null`` plus a ``<key>_nonfinite`` field saying which).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from nilmc.compiler.errors import OutputError


def umask() -> int:
    """The process umask now: from /proc (thread-safe) where Linux has it, else by setting and restoring it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def file_mode() -> int:
    return 0o666 & ~umask()


def dir_mode() -> int:
    return 0o777 & ~umask()


def _check_parent(path: Path) -> None:
    parent = path.parent if str(path.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create directory {str(parent)!r} ({exc.strerror})", "choose a writable output location") from None
    if not os.access(parent, os.W_OK):
        raise OutputError(f"directory {str(parent)!r} is not writable", "choose a writable output location or fix its permissions")


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    _check_parent(path)
    if path.is_dir():
        raise OutputError(f"{str(path)!r} is a directory, expected a file path", "choose a file name")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


# ------------------------------------------------------------------ strict JSON
def strict_json_value(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by ``None`` and a ``<key>_nonfinite`` sibling ("inf", "-inf", "nan").

    Tuples become lists, numpy scalars plain numbers; anything else unknown becomes ``str``.
    """
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            key = str(k)
            fv = _as_float(v)
            if fv is not None and not math.isfinite(fv):
                out[key] = None
                out[f"{key}_nonfinite"] = "nan" if math.isnan(fv) else ("inf" if fv > 0 else "-inf")
            else:
                out[key] = strict_json_value(v)
        return out
    if isinstance(obj, (list, tuple)):
        return [None if (f := _as_float(v)) is not None and not math.isfinite(f) else strict_json_value(v) for v in obj]
    if obj is None or isinstance(obj, (bool, str, int)):
        return obj
    f = _as_float(obj)
    if f is not None:
        if not math.isfinite(f):
            return None
        return int(obj) if hasattr(obj, "dtype") and getattr(obj.dtype, "kind", "") in "iu" else f
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):
        return strict_json_value(obj.tolist())
    return str(obj)


def _as_float(v: Any) -> float | None:
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, float):
        return v
    if hasattr(v, "dtype") and getattr(v, "shape", None) == () and getattr(v.dtype, "kind", "") in "fiu":
        return float(v)
    return None


def strict_dumps(obj: Any, *, indent: int | None = 2) -> str:
    """JSON any strict parser accepts: sorted keys, no NaN/Infinity (see :func:`strict_json_value`)."""
    return json.dumps(strict_json_value(obj), indent=indent, sort_keys=True, allow_nan=False)


def canonical_json_bytes(obj: Any) -> bytes:
    """The one byte form nilmc hashes and signs: strict, sorted keys, 2-space indent, trailing newline."""
    return (strict_dumps(obj) + "\n").encode("utf-8")


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_bytes(path, canonical_json_bytes(obj))


def strict_loads(text: str | bytes) -> Any:
    """Parse JSON refusing ``NaN``/``Infinity`` (which Python's json accepts by default)."""

    def _refuse(const: str) -> Any:
        raise ValueError(f"non-standard JSON constant {const}")

    return json.loads(text, parse_constant=_refuse)


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Build a *new* directory in a hidden sibling; move it into place only on success.

    Refuses a ``path`` that already exists: replacing directories is :class:`compiler.outdir.OutputDir`'s
    job, which never deletes what nilmc did not write.
    """
    path = Path(path)
    if not str(path) or str(path) in (".", ""):
        raise OutputError(f"output directory {str(path)!r} is not a new directory", "name a directory that does not exist yet")
    _check_parent(path)
    if path.exists():
        raise OutputError(f"{str(path)!r} already exists", "choose a new output directory, or remove it yourself")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent))
    try:
        os.chmod(tmp, dir_mode())
        yield tmp
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()

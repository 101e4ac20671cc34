"""Output directories that never lose a user's files.

An :class:`OutputDir` is the only way nilmc writes a directory of results (``compile
--out``, ``quantize --out``). Its rules:

* nilmc marks a directory it writes with ``.nilmc-output.json``, listing the top-level
  entries it wrote. Only those entries are ever replaced or removed, and a directory entry
  only when every file in it is one nilmc listed in its ``manifest.json`` (a user's file
  dropped into a bundle is never deleted: the compile is refused instead).
* A non-empty directory without the marker is refused unless ``force``; with ``force``
  nilmc writes beside the user's files and still touches none of them. An entry nilmc
  would write that already exists and is not nilmc's is always refused.
* An output directory that equals, contains or lies inside an input file or directory is
  refused (the model or data being compiled must never be overwritten).
* One writer at a time: ``.nilmc.lock`` (``flock``) holds the writer's pid; a second
  writer is refused naming it. Everything is built in ``.nilmc-part-<pid>-<token>/`` and
  renamed into place on :meth:`OutputDir.commit` with SIGINT/SIGTERM blocked; staging left
  by a killed run is removed by the next writer (which holds the lock, so it is stale).
* The umask is respected for every directory and file created.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
import shutil
import signal
from pathlib import Path
from types import TracebackType
from typing import Iterable, Sequence

import nilmc
from nilmc.compiler.errors import OutputError
from nilmc.compiler.io import atomic_write_json, dir_mode

MARKER = ".nilmc-output.json"
LOCK = ".nilmc.lock"
PART_PREFIX = ".nilmc-part-"
INTERNAL = (MARKER, LOCK)
BUNDLE_MANIFEST = "manifest.json"
BUNDLE_SIGNATURE = "manifest.sig"


def is_staging(path: Path) -> bool:
    """Whether ``path`` is (inside) an unfinished nilmc staging directory."""
    return any(p.startswith(PART_PREFIX) or p.endswith(".part") for p in Path(path).resolve().parts)


def check_output_path(path: str | Path, *, inputs: Iterable[str | Path] = (), what: str = "--out") -> Path:
    """Validate an output directory path before any work: not empty, not a file, creatable, writable, no input inside."""
    text = str(path)
    if not text.strip():
        raise OutputError(f"{what} is empty", f"pass a directory path, e.g. {what} build/")
    p = Path(text)
    if p.exists() and not p.is_dir():
        raise OutputError(f"{what} {text!r} exists and is not a directory", "choose a directory path")
    existing = p if p.exists() else next((a for a in p.absolute().parents if a.exists()), Path("/"))
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"{what} {text!r} cannot be created or written ({str(existing)!r} is not a writable directory)",
                          "choose a writable output location")
    _check_inputs(p, inputs, what)
    return p


def check_output_file(path: str | Path, *, inputs: Iterable[str | Path] = (), what: str = "--junit") -> Path:
    """Validate an output file path before any work (not a directory, parent writable, not an input)."""
    text = str(path)
    if not text.strip():
        raise OutputError(f"{what} is empty", f"pass a file path, e.g. {what} report.xml")
    p = Path(text)
    if p.is_dir():
        raise OutputError(f"{what} {text!r} is a directory", "pass a file path inside it, e.g. " + str(p / "report.xml"))
    parent = p.absolute().parent
    existing = parent if parent.exists() else next((a for a in parent.parents if a.exists()), Path("/"))
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"{what} {text!r} cannot be written ({str(existing)!r} is not a writable directory)", "choose a writable location")
    if p.exists() and not os.access(p, os.W_OK):
        raise OutputError(f"{what} {text!r} exists and is not writable", "choose another file")
    for i in inputs:
        if Path(i).exists() and p.exists() and p.resolve() == Path(i).resolve():
            raise OutputError(f"{what} {text!r} is one of the input files", "choose another output file")
    return p


def _check_inputs(out: Path, inputs: Iterable[str | Path], what: str) -> None:
    o = out.absolute().resolve()
    for i in inputs:
        ip = Path(i)
        if not ip.exists():
            continue
        r = ip.resolve()
        if r == o or o in r.parents or r in o.parents:
            relation = "is" if r == o else ("contains" if o in r.parents else "lies inside")
            raise OutputError(f"{what} {str(out)!r} {relation} the input {str(i)!r}",
                              "write the results to a separate directory (nilmc never writes over its inputs)")


def _is_nonempty(path: Path) -> bool:
    return any(e.name not in INTERNAL and not e.name.startswith(PART_PREFIX) for e in path.iterdir())


def _read_marker(path: Path) -> list[str] | None:
    m = path / MARKER
    if not m.is_file():
        return None
    try:
        data = json.loads(m.read_text())
        return [str(e) for e in data["entries"]] if data.get("tool") == "nilmc" else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def foreign_files(entry: Path) -> list[str]:
    """Files inside a nilmc entry that nilmc did not write (not listed in its manifest)."""
    if entry.is_symlink():
        return [entry.name]
    if not entry.is_dir():
        return []
    listed: set[str] = {BUNDLE_MANIFEST, BUNDLE_SIGNATURE}
    manifest = entry / BUNDLE_MANIFEST
    if manifest.is_file():
        try:
            listed |= {str(f["name"]) for f in json.loads(manifest.read_text()).get("files", [])}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass
    out = []
    for p in sorted(entry.rglob("*")):
        if p.is_symlink() or (p.is_file() and str(p.relative_to(entry)) not in listed):
            out.append(str(p.relative_to(entry.parent)))
        elif not p.is_dir() and not p.is_file():
            out.append(str(p.relative_to(entry.parent)))
    return out


class OutputDir:
    """Context manager around one writer of an output directory (module docstring).

    ``entries``: the top-level names this run will write; ``inputs``: the paths of every input
    (never written over); ``force``: allow a non-empty directory nilmc did not write (defaults False).
    """

    def __init__(self, path: str | Path, entries: Sequence[str], *, inputs: Iterable[str | Path] = (), force: bool = False,
                 what: str = "--out") -> None:
        self.path = check_output_path(path, inputs=inputs, what=what)
        self.entries = list(dict.fromkeys(entries))
        self.force = force
        self.what = what
        self.staging = Path()
        self._created = False
        self._lock_fd: int | None = None
        self._previous: list[str] = []
        self._committed = False
        self._lock_created = False
        self._marked_here = False  # this run wrote the first marker (removed again if nothing is committed)

    # ------------------------------------------------------------------ enter / exit
    def __enter__(self) -> "OutputDir":
        try:
            self._open()
        except BaseException:
            self._close(failed=True)
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._close(failed=exc_type is not None or not self._committed)

    def _open(self) -> None:
        if not self.path.exists():
            try:
                self.path.mkdir(parents=True, mode=dir_mode())
            except OSError as e:
                raise OutputError(f"cannot create {self.what} {str(self.path)!r} ({e.strerror})", "choose a writable output location") from None
            self._created = True
        self._lock()
        self._clean_stale()
        previous = _read_marker(self.path)
        if previous is None and _is_nonempty(self.path) and not self.force:
            shown = sorted(e.name for e in self.path.iterdir() if e.name not in INTERNAL)[:5]
            raise OutputError(f"{self.what} {str(self.path)!r} is not empty and was not written by nilmc (holds {', '.join(shown)}"
                              f"{', ...' if len(shown) == 5 else ''})",
                              "choose a new or empty directory, or pass --force to write beside those files (nilmc never deletes them)")
        self._previous = previous or []
        self._check_collisions()
        self.staging = self.path / f"{PART_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        self.staging.mkdir(mode=dir_mode())
        if previous is None:
            self._write_marker([])
            self._marked_here = True

    def _lock(self) -> None:
        lock_path = self.path / LOCK
        self._lock_created = not lock_path.exists()
        while True:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise OutputError(f"{self.what} {str(self.path)!r} is being written by another nilmc process (pid {holder})",
                                      "wait for it to finish, or choose another output directory") from None
                raise OutputError(f"cannot lock {str(lock_path)!r} ({e.strerror})", "choose a local, writable output directory") from None
            if os.path.exists(lock_path) and os.stat(lock_path).st_ino == os.fstat(fd).st_ino:
                break
            os.close(fd)  # the file was replaced between open and lock: try again
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _clean_stale(self) -> None:
        """Staging directories of a killed writer: ours to remove, since we hold the lock."""
        for p in self.path.iterdir():
            if p.name.startswith(PART_PREFIX) and p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)

    def _check_collisions(self) -> None:
        for name in self.entries:
            dest = self.path / name
            if not (dest.exists() or dest.is_symlink()):
                continue
            if name not in self._previous:
                raise OutputError(f"{str(dest)!r} already exists and was not written by nilmc",
                                  "move it away or choose another output directory (nilmc never overwrites files it did not write)")
            foreign = foreign_files(dest)
            if foreign:
                raise OutputError(f"{str(dest)!r} holds files nilmc did not write: {', '.join(foreign[:5])}",
                                  "move them out of the bundle or choose another output directory")

    # ------------------------------------------------------------------ commit
    def commit(self) -> list[str]:
        """Move every staged entry into place, replacing nilmc's previous entries; returns warnings."""
        staged = sorted(p.name for p in self.staging.iterdir())
        unknown = set(staged) - set(self.entries)
        if unknown:
            raise OutputError(f"internal: staged entries {sorted(unknown)} were not planned", "report this")  # pragma: no cover
        warnings: list[str] = []
        trash = self.staging.with_name(self.staging.name + "-old")
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            trash.mkdir(mode=0o700)
            for name in self._previous:
                dest = self.path / name
                if not (dest.exists() or dest.is_symlink()):
                    continue
                foreign = foreign_files(dest)
                if foreign:  # an old bundle the user added files to: left alone, no longer nilmc's
                    warnings.append(f"left {str(dest)!r} in place: it holds files nilmc did not write ({', '.join(foreign[:3])})")
                    continue
                os.rename(dest, trash / name)
            for name in staged:
                os.rename(self.staging / name, self.path / name)
            self._write_marker(staged)
            self._committed = True
        finally:
            shutil.rmtree(trash, ignore_errors=True)
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        return warnings

    def _write_marker(self, entries: list[str]) -> None:
        atomic_write_json(self.path / MARKER, {"tool": "nilmc", "nilmc_version": nilmc.__version__, "entries": sorted(entries)})

    # ------------------------------------------------------------------ close
    def _close(self, *, failed: bool) -> None:
        if self.staging != Path() and self.staging.exists():
            shutil.rmtree(self.staging, ignore_errors=True)
        if failed and self._lock_fd is not None:
            # Nothing committed: leave no trace of this run in a directory that was not nilmc's before.
            if self._marked_here:
                (self.path / MARKER).unlink(missing_ok=True)
            if self._lock_created and not (self.path / MARKER).exists():
                (self.path / LOCK).unlink(missing_ok=True)
            if self._created:
                try:
                    self.path.rmdir()
                except OSError:
                    pass
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

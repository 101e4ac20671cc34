"""Output directories that never lose a user's files.

An :class:`OutputDir` is the only way nilmc writes a directory of results (``compile
--out``, ``quantize --out``). Its rules:

* nilmc marks a directory it writes with ``.nilmc-output.json``, listing the top-level
  entries it wrote with the sha256 of every file in them. Only those entries are ever
  replaced or removed, and only while every file in them is still the one nilmc wrote (a
  user's file dropped into a bundle, or an edited one, is never deleted: a compile that
  would replace it is refused, and an old entry holding one is left in place).
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
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType

import nilmc
from nilmc.compiler.errors import OutputError
from nilmc.compiler.io import atomic_write_json, dir_mode, sha256_file

MARKER = ".nilmc-output.json"
LOCK = ".nilmc.lock"
PART_PREFIX = ".nilmc-part-"
INTERNAL = (MARKER, LOCK)
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
    _check_inputs(p, inputs, what)
    _probe_writable(p, what, text)
    return p


def _probe_writable(directory: Path, what: str, text: str) -> None:
    """Create what is missing of ``directory`` and a file in it, then remove both: permissions alone lie (root, /proc)."""
    created: list[Path] = []
    try:
        for d in [*reversed(directory.absolute().parents), directory.absolute()]:
            if not d.exists():
                d.mkdir(mode=dir_mode())
                created.append(d)
        fd, probe = tempfile.mkstemp(prefix=".nilmc-probe-", dir=directory)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"{what} {text!r} cannot be created or written ({e.strerror or e})", "choose a writable output location") from None
    finally:
        for d in reversed(created):
            try:
                d.rmdir()
            except OSError:
                pass


def check_output_file(path: str | Path, *, inputs: Iterable[str | Path] = (), what: str = "--junit") -> Path:
    """Validate an output file path before any work (not a directory, parent writable, not an input)."""
    text = str(path)
    if not text.strip():
        raise OutputError(f"{what} is empty", f"pass a file path, e.g. {what} report.xml")
    p = Path(text)
    if p.is_dir():
        raise OutputError(f"{what} {text!r} is a directory", "pass a file path inside it, e.g. " + str(p / "report.xml"))
    _probe_writable(p.absolute().parent, what, text)
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


Recorded = dict[str, str]  # relative path inside an entry ("" for a file entry) -> sha256


def _read_marker(path: Path) -> dict[str, Recorded] | None:
    m = path / MARKER
    if not m.is_file():
        return None
    try:
        data = json.loads(m.read_text())
        if data.get("tool") != "nilmc" or not isinstance(data.get("entries"), dict):
            return None
        return {str(k): {str(f): str(h) for f, h in v.items()} for k, v in data["entries"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def record_entry(entry: Path) -> Recorded:
    """The sha256 of every file of an entry nilmc wrote (what :func:`foreign_files` compares against later)."""
    if entry.is_file():
        return {"": sha256_file(entry)}
    return {p.relative_to(entry).as_posix(): sha256_file(p) for p in sorted(entry.rglob("*")) if p.is_file() and not p.is_symlink()}


def foreign_files(entry: Path, recorded: Recorded) -> list[str]:
    """Files of an entry nilmc did not write, or that changed since (a user's edits are theirs): never deleted."""
    if entry.is_symlink() or not (entry.is_file() or entry.is_dir()):
        return [entry.name]
    if entry.is_file():
        return [] if recorded.get("") == sha256_file(entry) else [entry.name]
    out = []
    for p in sorted(entry.rglob("*")):
        rel = p.relative_to(entry).as_posix()
        if p.is_dir() and not p.is_symlink():
            continue
        if p.is_symlink() or not p.is_file() or recorded.get(rel) != sha256_file(p):
            out.append(f"{entry.name}/{rel}")
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
        self._previous: dict[str, Recorded] = {}
        self._committed = False
        self._lock_created = False
        self._marked_here = False  # this run wrote the first marker (removed again if nothing is committed)

    # ------------------------------------------------------------------ enter / exit
    def __enter__(self) -> OutputDir:
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
        self._previous = previous or {}
        self._check_collisions()
        self.staging = self.path / f"{PART_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        self.staging.mkdir(mode=dir_mode())
        if previous is None:
            self._write_marker({})
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
            foreign = foreign_files(dest, self._previous[name])
            if foreign:
                raise OutputError(f"{str(dest)!r} holds files nilmc did not write or that changed since: {', '.join(foreign[:5])}",
                                  "move them out of the output directory or choose another one (nilmc never deletes them)")

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
            written = {name: record_entry(self.staging / name) for name in staged}
            for name, recorded in self._previous.items():
                dest = self.path / name
                if not (dest.exists() or dest.is_symlink()):
                    continue
                foreign = foreign_files(dest, recorded)
                if foreign:  # an old bundle the user added files to: left alone, no longer nilmc's
                    warnings.append(f"left {str(dest)!r} in place: it holds files nilmc did not write ({', '.join(foreign[:3])})")
                    continue
                os.rename(dest, trash / name)
            for name in staged:
                os.rename(self.staging / name, self.path / name)
            self._write_marker(written)
            self._committed = True
        finally:
            shutil.rmtree(trash, ignore_errors=True)
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        return warnings

    def _write_marker(self, entries: dict[str, Recorded]) -> None:
        atomic_write_json(self.path / MARKER, {"tool": "nilmc", "nilmc_version": nilmc.__version__, "entries": entries})

    # ------------------------------------------------------------------ close
    def _close(self, *, failed: bool) -> None:
        # Signals wait until the directory is tidy: an interrupt here must not leave staging behind.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            self._tidy(failed=failed and not self._committed)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def _tidy(self, *, failed: bool) -> None:
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

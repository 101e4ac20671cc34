"""Progress bars with an ETA for long work (a compile's stages, a sweep's cells), quiet where nobody watches.

A bar is drawn only on a terminal: never under ``--json``, never when stderr is not a TTY (a pipe, a log file,
pytest's capture) and never in CI (the ``CI`` variable CI services set). Where no bar is drawn, a compile prints
its stage lines as it always did (``  .. lowering tflite:int8``) unless ``--json`` asked for silence.

The driver's hook stays what it was, a callable that takes the label of a stage that begins; an object that also
has ``plan(total)`` and ``done(label)`` (:class:`StageHook`, e.g. :class:`StageProgress`) is told how many stages
come and when each one is done, which is what a bar needs for its ETA. The bars are tqdm's (a small pure-Python
core dependency); nothing here is needed for the work itself.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import IO, Any, Protocol, runtime_checkable

__all__ = ["StageHook", "StageProgress", "CellProgress", "bars_wanted", "progress_plan", "progress_done"]


@runtime_checkable
class StageHook(Protocol):
    """``compile_model(progress=...)``: called with each stage's label as it begins; ``plan``/``done`` drive a bar."""

    def __call__(self, label: str) -> None: ...

    def plan(self, total: int) -> None: ...

    def done(self, label: str) -> None: ...


def bars_wanted(*, as_json: bool = False, stream: IO[str] | None = None) -> bool:
    """True only on an interactive terminal: not under ``--json``, not in CI, not when ``stream`` (stderr) is no TTY."""
    if as_json:
        return False
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        return False
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty is not None and isatty())
    except ValueError:  # a closed stream
        return False


def progress_plan(progress: Callable[[str], None] | None, total: int) -> None:
    """Tell a :class:`StageHook` how many stages come (a plain callable is left alone)."""
    if isinstance(progress, StageHook):
        progress.plan(total)


def progress_done(progress: Callable[[str], None] | None, label: str) -> None:
    """Tell a :class:`StageHook` that a stage is done (a plain callable is left alone)."""
    if isinstance(progress, StageHook):
        progress.done(label)


class StageProgress:
    """A compile's stages as one bar (on a terminal) or as ``  .. label`` lines on stderr (elsewhere, unless quiet).

    ``bar``: draw a tqdm bar (default: :func:`bars_wanted`); ``quiet``: neither bar nor lines (``--json``).
    """

    def __init__(self, description: str = "compile", *, bar: bool | None = None, quiet: bool = False,
                 echo: Callable[[str], None] | None = None, stream: IO[str] | None = None) -> None:
        self.description = description
        self.quiet = quiet
        self.stream = sys.stderr if stream is None else stream
        self.bar_on = (not quiet) and (bars_wanted(stream=self.stream) if bar is None else bar)
        self.echo = echo or (lambda s: print(s, file=self.stream, flush=True))
        self._bar: Any = None
        self.started: list[str] = []
        self.finished: list[str] = []

    def plan(self, total: int) -> None:
        if self.bar_on and self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=self.description, unit="stage", file=self.stream, leave=False, dynamic_ncols=True)

    def __call__(self, label: str) -> None:
        self.started.append(label)
        if self._bar is not None:
            self._bar.set_postfix_str(label, refresh=True)
        elif not self.quiet:
            self.echo(f"  .. {label}")

    def done(self, label: str) -> None:
        self.finished.append(label)
        if self._bar is not None:
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> StageProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CellProgress:
    """A sweep's cells as one bar with an ETA (on a terminal), else one line per finished cell (unless quiet)."""

    def __init__(self, total: int, *, description: str = "sweep", bar: bool | None = None, quiet: bool = False,
                 stream: IO[str] | None = None) -> None:
        self.stream = sys.stderr if stream is None else stream
        self.quiet = quiet
        self.total = total
        self.count = 0
        self._bar: Any = None
        if not quiet and (bars_wanted(stream=self.stream) if bar is None else bar):
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=description, unit="cell", file=self.stream, dynamic_ncols=True)

    def cell_done(self, label: str, status: str) -> None:
        self.count += 1
        if self._bar is not None:
            self._bar.set_postfix_str(f"{label}: {status}", refresh=False)
            self._bar.update(1)
        elif not self.quiet:
            print(f"  .. [{self.count}/{self.total}] {label}: {status}", file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> CellProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

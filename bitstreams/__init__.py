"""DPU target descriptions and the board table, shipped as package data.

No vendor bitstream is shipped (see ``README.md`` beside this file): a target
description is what nilmc needs to quantize, inspect and hand off a model for one
DPU configuration. Each ``dpuczdx8g_<arch>/`` folder holds

* ``target.json`` - fingerprint, pixel / channel parallelism, bank depth and the
  operator limits the inspector checks, with the public source of each fact;
* ``arch.json`` - exactly what ``vai_c_xir -a`` takes (``{"fingerprint": "0x..."}``).

``boards.json`` is the board table of seed 003 (Table 8: TDP, cost; Table 12 as
published). Everything is read through :mod:`importlib.resources`, never by a
hard-coded path. A user whose board runs another DPU overlay points nilmc at that
overlay's own ``arch.json`` (:func:`target_from_arch_json`).
"""
from __future__ import annotations

if __name__ != "nilmc.bitstreams":  # a bare-folder import would load a second copy of every nilmc class
    raise ImportError(f"{__name__!r} is a folder of nilmc, not a package of its own: import nilmc.bitstreams instead "
                      "(install nilmc with `pip install -e .`; importing the bare folder would create a second copy of its classes)")

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from nilmc.compiler.errors import BadInputError

TARGET_FILE = "target.json"
ARCH_FILE = "arch.json"
BOARDS_FILE = "boards.json"
_PREFIX = "dpuczdx8g_"


@dataclass(frozen=True)
class DPUTarget:
    """One DPU configuration (a DPUCZDX8G architecture).

    ``limits`` holds the operator and shift limits as data (see ``target.json``);
    ``arch`` is what ``vai_c_xir -a`` reads (by default the shipped ``arch.json``;
    a user's own overlay file when loaded with :func:`target_from_arch_json`).
    """

    name: str  # DPUCZDX8G_ISA1_B2304
    arch_name: str  # B2304
    precision: str  # b2304 (the nilmc precision of target dpu:b2304)
    fingerprint: str
    pixel_parallel: int
    channel_parallel: int
    bank_depth: int
    boards: tuple[str, ...]
    limits: Mapping[str, Any] = field(repr=False)
    arch: Mapping[str, Any] = field(default_factory=dict, repr=False)
    arch_source: str = ""  # where ``arch`` came from
    sources: Mapping[str, str] = field(default_factory=dict, repr=False)

    @property
    def max_channels(self) -> int:
        """Largest input/output channel count of a conv2d: ``256 * channel_parallel``."""
        return int(self.limits["max_channels_per_channel_parallel"]) * self.channel_parallel

    def conv_in_size(self, kernel_w: int, kernel_h: int, in_channels: int) -> int:
        """``kernel_w * kernel_h * ceil(in_channels / channel_parallel)`` (must be <= ``bank_depth``)."""
        return kernel_w * kernel_h * math.ceil(in_channels / self.channel_parallel)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "arch": self.arch_name, "precision": self.precision, "fingerprint": self.fingerprint,
            "pixel_parallel": self.pixel_parallel, "channel_parallel": self.channel_parallel, "bank_depth": self.bank_depth,
            "boards": list(self.boards), "arch_json": dict(self.arch), "arch_source": self.arch_source,
        }


@dataclass(frozen=True)
class Board:
    """One row of the board table (seed 003 Table 8); ``None`` where the table gives nothing."""

    name: str
    tdp_w: float | None
    cost_usd: float | None
    dpu: str | None
    accelerator: str | None = None
    cpu: str | None = None
    memory: str | None = None
    note: str = ""
    published: Mapping[str, float] = field(default_factory=dict)  # Table 12 as printed in the paper

    def figures(self, eacc_pct: float) -> dict[str, Any]:
        """Accuracy per TDP watt and per dollar for an EACC given in percent (None where a fact is missing)."""
        return {
            "board": self.name,
            "eacc_pct": round(eacc_pct, 3),
            "tdp_w": self.tdp_w,
            "cost_usd": self.cost_usd,
            "eacc_per_tdp_watt": None if not self.tdp_w else round(eacc_pct / self.tdp_w, 3),
            "eacc_per_usd": None if not self.cost_usd else round(eacc_pct / self.cost_usd, 4),
            "published_table12": dict(self.published),
            "note": self.note,
        }


def _package_dir() -> Any:
    return resources.files(__name__)


def _read_json(ref: Any, what: str) -> dict[str, Any]:
    try:
        return json.loads(ref.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise BadInputError(f"cannot read {what} ({exc})", "reinstall nilmc; its package data is incomplete") from None


def available_targets() -> list[str]:
    """Precisions of the shipped targets, e.g. ``["b2304", "b4096"]``."""
    names = [p.name[len(_PREFIX):] for p in _package_dir().iterdir() if p.name.startswith(_PREFIX) and p.joinpath(TARGET_FILE).is_file()]
    return sorted(names)


def _normalise(name: str) -> str:
    key = str(name).strip().lower()
    for prefix in ("dpuczdx8g_isa1_", "dpuczdx8g_isa0_", _PREFIX, "dpu:"):
        if key.startswith(prefix):
            key = key[len(prefix):]
    return key


@cache
def load_target(name: str) -> DPUTarget:
    """A shipped target by precision (``b2304``), arch (``B4096``) or name (``DPUCZDX8G_ISA1_B4096``)."""
    key = _normalise(name)
    if key not in available_targets():
        raise BadInputError(f"no DPU target description for {name!r}",
                            f"available: {', '.join(available_targets())}; or pass your overlay's arch.json (options['arch_json'])")
    folder = _package_dir().joinpath(_PREFIX + key)
    d = _read_json(folder.joinpath(TARGET_FILE), f"{_PREFIX + key}/{TARGET_FILE}")
    arch = _read_json(folder.joinpath(ARCH_FILE), f"{_PREFIX + key}/{ARCH_FILE}")
    return _target_from_dict(d, arch, f"nilmc.bitstreams/{_PREFIX + key}/{ARCH_FILE}")


def _target_from_dict(d: Mapping[str, Any], arch: Mapping[str, Any], arch_source: str) -> DPUTarget:
    try:
        return DPUTarget(
            name=str(d["name"]), arch_name=str(d["arch"]), precision=str(d["precision"]), fingerprint=str(d["fingerprint"]),
            pixel_parallel=int(d["pixel_parallel"]), channel_parallel=int(d["channel_parallel"]), bank_depth=int(d["bank_depth"]),
            boards=tuple(d.get("boards", ())), limits=dict(d["limits"]), arch=dict(arch), arch_source=arch_source,
            sources=dict(d.get("sources", {})),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise BadInputError(f"DPU target description is malformed ({type(exc).__name__}: {exc})", "reinstall nilmc") from None


def target_from_arch_json(path: str | Path) -> DPUTarget:
    """The shipped description matching a board overlay's ``arch.json``; that file becomes the target's ``arch``.

    ``arch.json`` holds ``{"fingerprint": "0x..."}`` or ``{"target": "DPUCZDX8G_ISA1_B4096"}``
    (what the Vivado / Vitis flow writes for the overlay). Raises :class:`BadInputError`
    when the file is unreadable or names a DPU nilmc has no description for.
    """
    path = Path(path)
    try:
        arch = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInputError(f"cannot read arch.json {str(path)!r} ({exc})", "pass the arch.json of your board's DPU overlay") from None
    if not isinstance(arch, dict) or not ({"fingerprint", "target"} & set(arch)):
        raise BadInputError(f"{str(path)!r} has neither 'fingerprint' nor 'target'", 'an arch.json looks like {"fingerprint": "0x0101000056010407"}')
    known = [load_target(t) for t in available_targets()]
    for t in known:
        fp = str(arch.get("fingerprint", "")).lower()
        if (fp and int(fp, 16) == int(t.fingerprint, 16)) or str(arch.get("target", "")).upper() == t.name:
            return _target_from_dict(_raw_target(t.precision), arch, str(path))
    have = ", ".join(f"{t.name} ({t.fingerprint})" for t in known)
    raise BadInputError(f"{str(path)!r} names a DPU nilmc has no description for ({arch})",
                        f"known: {have}; add a target.json for it under nilmc/bitstreams/")


def _raw_target(precision: str) -> dict[str, Any]:
    return _read_json(_package_dir().joinpath(_PREFIX + precision, TARGET_FILE), TARGET_FILE)


@cache
def _boards_json() -> dict[str, Any]:
    return _read_json(_package_dir().joinpath(BOARDS_FILE), BOARDS_FILE)


def load_boards() -> dict[str, Board]:
    """The board table (seed 003 Table 8), by board name."""
    out = {}
    for name, b in _boards_json()["boards"].items():
        out[name] = Board(name, b.get("tdp_w"), b.get("cost_usd"), b.get("dpu"), b.get("accelerator"), b.get("cpu"),
                          b.get("memory"), str(b.get("note", "")), dict(b.get("table12", {})))
    return out


def boards_source() -> str:
    """Where the board table's numbers come from (for reports)."""
    d = _boards_json()
    return f"{d['source']}. {d['note']}"


def boards_for(target: DPUTarget) -> list[Board]:
    """The boards of the table that carry ``target``'s DPU."""
    boards = load_boards()
    return [boards[n] for n in target.boards if n in boards]

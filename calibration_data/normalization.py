"""The five input normalizations of seed 003, Table 1.

Statistics are fitted on the training split only and travel with the data and
with the model contract. ``A`` is the identity (raw features).

    A  x
    B  (x - min) / (max - min)              -> [0, 1]
    C  (x - mean) / std                     (z-score)
    D  (x - min) / (max - min) * 255 - 128  -> [-128, 127]
    E  (x - min) / (max - min) * 255        -> [0, 255]

Every normalization is affine per feature (``x * scale + offset``), which is
what lets quantization fold it into the first layer.

A sixth kind, ``affine``, is a float pre-processing stage with explicit per-feature
``scale`` / ``offset``: the normalization a model carried inside its graph (taken out
by :mod:`nilmc.quantization.io_affine` so quantization starts after it), or an input
rescaling nilmc put in front of a raw-scale model. It records the normalization it
was composed onto (``base``) and where it came from (``origin``), and its JSON holds
the exact formula.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, cast

import numpy as np

from nilmc.compiler.errors import DataError, NormalizationError

_EPS = 1e-12


class Normalization(str, Enum):
    A = "A"  # none
    B = "B"  # min-max to [0, 1]
    C = "C"  # z-score
    D = "D"  # min-max to [-128, 127]
    E = "E"  # min-max to [0, 255]
    AFFINE = "affine"  # explicit per-feature x * scale + offset (a stage taken from / put before the graph)

    @classmethod
    def parse(cls, value: str | Normalization) -> Normalization:
        if isinstance(value, Normalization):
            return value
        key = str(value).strip().upper()
        aliases = {"NONE": "A", "RAW": "A", "MINMAX": "B", "ZSCORE": "C", "Z-SCORE": "C", "AFFINE": "affine", "GRAPH": "affine"}
        key = aliases.get(key, key)
        try:
            return cls(key)
        except ValueError:
            raise NormalizationError(
                f"unknown normalization {value!r}",
                "use one of A (none), B (min-max [0,1]), C (z-score), D ([-128,127]), E ([0,255]) or affine (explicit scale/offset)",
            ) from None

    @property
    def description(self) -> str:
        return {
            "A": "none (raw features)",
            "B": "min-max to [0, 1]",
            "C": "z-score (x - mean) / std",
            "D": "min-max to [-128, 127]",
            "E": "min-max to [0, 255]",
            "affine": "per-feature affine x * scale + offset (float stage)",
        }[self.value]


STAT_NAMES: tuple[str, ...] = ("minimum", "maximum", "mean", "std")
_STANDIN_SIGMAS = 6.0  # stand-in range of z-score-only statistics: mean +- 6 std


@dataclass(frozen=True)
class FeatureStats:
    """Per-feature statistics of the training split (feature axis = last non-channel axis).

    ``given`` names the statistics that are real (default: all four, as :meth:`fit` gives).
    A contract may carry only what its normalization needs (z-score: mean/std; min-max:
    minimum/maximum, see :meth:`partial`); the others are then finite stand-ins, so every
    consumer still computes, and are never written out by :meth:`to_json`.
    """

    minimum: np.ndarray
    maximum: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    given: tuple[str, ...] = STAT_NAMES

    @classmethod
    def fit(cls, x: np.ndarray, feature_axis: int = 2) -> FeatureStats:
        """Fit on windows ``(N, T, F, 1)`` (default) or rows ``(N, F)`` (``feature_axis=1``)."""
        x = np.asarray(x, dtype=np.float64)
        if x.size == 0:
            raise DataError("cannot fit normalization statistics on an empty array", "pass training data with at least one window")
        axes = tuple(i for i in range(x.ndim) if i != feature_axis)
        return cls(
            minimum=x.min(axis=axes).astype(np.float64),
            maximum=x.max(axis=axes).astype(np.float64),
            mean=x.mean(axis=axes).astype(np.float64),
            std=x.std(axis=axes).astype(np.float64),
        )

    @classmethod
    def partial(cls, *, minimum: Any = None, maximum: Any = None, mean: Any = None, std: Any = None) -> FeatureStats:
        """Statistics from the pairs a normalization needs: ``mean``/``std`` (z-score) and/or
        ``minimum``/``maximum`` (min-max); each a per-feature list (all of one length).

        A missing pair gets stand-ins: range ``mean +- 6 std``, or the mean and std of a uniform
        distribution over ``[minimum, maximum]``. Raises :class:`DataError` for half a pair,
        no pair at all, or lists of different lengths.
        """
        got = {k: v for k, v in (("minimum", minimum), ("maximum", maximum), ("mean", mean), ("std", std)) if v is not None}
        try:
            arrs = {k: np.atleast_1d(np.asarray(v, dtype=np.float64)) for k, v in got.items()}
        except (TypeError, ValueError) as exc:
            raise DataError(f"normalization statistics are malformed ({exc})", "regenerate the data set or model contract") from None
        has_mm, has_ms = {"minimum", "maximum"} <= set(arrs), {"mean", "std"} <= set(arrs)
        half = [k for k in arrs if not (has_mm and k in ("minimum", "maximum")) and not (has_ms and k in ("mean", "std"))]
        if half or not (has_mm or has_ms):
            raise DataError(f"normalization statistics have {sorted(arrs) or 'nothing'}: they need mean and std, or minimum and maximum (or all four)",
                            "give both of a pair (z-score: mean/std; min-max: minimum/maximum)")
        sizes = {k: v.shape for k, v in arrs.items()}
        if len(set(sizes.values())) != 1 or next(iter(arrs.values())).ndim != 1:
            raise DataError(f"normalization statistics have inconsistent shapes {sizes}", "regenerate the data set or model contract")
        if not has_mm:
            arrs["minimum"] = arrs["mean"] - _STANDIN_SIGMAS * arrs["std"]
            arrs["maximum"] = arrs["mean"] + _STANDIN_SIGMAS * arrs["std"]
        if not has_ms:
            arrs["mean"] = (arrs["minimum"] + arrs["maximum"]) / 2.0
            arrs["std"] = np.abs(arrs["maximum"] - arrs["minimum"]) / np.sqrt(12.0)
        return cls(**arrs, given=tuple(k for k in STAT_NAMES if k in got))

    def has(self, *names: str) -> bool:
        """True when every statistic in ``names`` is real (given), not a stand-in."""
        return all(n in self.given for n in names)

    def to_json(self) -> dict[str, list[float]]:
        return {k: [float(v) for v in getattr(self, k)] for k in STAT_NAMES if k in self.given}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> FeatureStats:
        if not isinstance(d, dict):
            raise DataError(f"normalization statistics are malformed (expected an object, got {type(d).__name__})",
                            "regenerate the data set or model contract")
        present = {k: d[k] for k in STAT_NAMES if d.get(k) is not None}
        return cls.partial(**present)

    @property
    def n_features(self) -> int:
        return int(self.mean.shape[0])


AFFINE_FORMULA = "graph_input[n, t, f, c] = raw[n, t, f, c] * scale[f] + offset[f]  (f: feature axis 2 of (N, frames, features, 1))"


@dataclass(frozen=True)
class NormalizationSpec:
    """A normalization together with the statistics it was fitted with.

    Kind ``affine`` carries its own per-feature ``scale`` / ``offset`` (float64, one per
    feature), the ``origin`` of the stage (free text for the manifest) and the ``base``
    normalization it was composed onto (None: raw features); ``stats`` are then the
    statistics of the *raw* features, as for the other kinds.
    """

    kind: Normalization
    stats: FeatureStats | None = field(default=None)
    scale: np.ndarray | None = field(default=None)
    offset: np.ndarray | None = field(default=None)
    origin: str = ""
    base: NormalizationSpec | None = field(default=None)

    def __post_init__(self) -> None:
        if self.kind is Normalization.AFFINE:
            self._check_affine()
        elif self.kind is not Normalization.A and self.stats is None:
            raise NormalizationError(f"normalization {self.kind.value} needs fitted statistics", "fit them on the training split")

    def _check_affine(self) -> None:
        if self.scale is None or self.offset is None:
            raise NormalizationError("normalization affine needs per-feature scale and offset", "build it with NormalizationSpec.affine_stage")
        scale, offset = np.asarray(self.scale, np.float64), np.asarray(self.offset, np.float64)
        if scale.ndim != 1 or scale.shape != offset.shape or not scale.size:
            raise NormalizationError(f"affine scale {scale.shape} and offset {offset.shape} must be equal-length vectors",
                                     "give one scale and one offset per feature")
        if not (np.all(np.isfinite(scale)) and np.all(np.isfinite(offset)) and np.all(scale != 0)):
            raise NormalizationError("affine scale/offset must be finite and every scale non-zero", "check the stage's constants")
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "offset", offset)

    @classmethod
    def affine_stage(cls, scale: np.ndarray, offset: np.ndarray, *, origin: str, base: NormalizationSpec | None = None,
                     stats: FeatureStats | None = None) -> NormalizationSpec:
        """An explicit ``affine`` stage ``raw * scale + offset`` (already composed with ``base``, default None)."""
        return cls(Normalization.AFFINE, stats, np.asarray(scale, np.float64).reshape(-1), np.asarray(offset, np.float64).reshape(-1),
                   origin, base)

    def then(self, scale: np.ndarray, offset: np.ndarray, *, origin: str, n_features: int) -> NormalizationSpec:
        """This normalization followed by ``x * scale + offset`` (per feature or scalar) as one ``affine`` stage.

        ``base`` of the result is this spec (its own base when this is already an affine stage).
        """
        s = np.broadcast_to(np.asarray(scale, np.float64).reshape(-1), (n_features,))
        o = np.broadcast_to(np.asarray(offset, np.float64).reshape(-1), (n_features,))
        aff = self.affine()
        s0, o0 = (np.ones(n_features), np.zeros(n_features)) if aff is None else aff
        if self.kind is Normalization.AFFINE:
            base, origin = self.base, f"{self.origin}; then {origin}" if self.origin else origin
        else:
            base = self
        return NormalizationSpec.affine_stage(s0 * s, o0 * s + o, origin=origin, base=base, stats=self.stats)

    def relative_to_base(self) -> tuple[np.ndarray, np.ndarray] | None:
        """For an ``affine`` stage: the part added on top of ``base`` (``base(raw) * s + o = self(raw)``)."""
        if self.kind is not Normalization.AFFINE:
            return None
        scale, offset = cast(np.ndarray, self.scale), cast(np.ndarray, self.offset)
        aff = None if self.base is None else self.base.affine()
        if aff is None:
            return scale.copy(), offset.copy()
        s = scale / aff[0]
        return s, offset - s * aff[1]

    def affine(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Return per-feature ``(scale, offset)`` with ``normalized = raw * scale + offset`` (None for A)."""
        if self.kind is Normalization.A:
            return None
        if self.kind is Normalization.AFFINE:
            return cast(np.ndarray, self.scale).copy(), cast(np.ndarray, self.offset).copy()
        s = self.stats
        assert s is not None
        span = np.maximum(s.maximum - s.minimum, _EPS)
        if self.kind is Normalization.C:
            scale = 1.0 / np.maximum(s.std, _EPS)
            return scale, -s.mean * scale
        base_scale = 1.0 / span
        base_off = -s.minimum / span
        if self.kind is Normalization.B:
            return base_scale, base_off
        if self.kind is Normalization.D:
            return base_scale * 255.0, base_off * 255.0 - 128.0
        return base_scale * 255.0, base_off * 255.0  # E

    def apply(self, x: np.ndarray, feature_axis: int = 2) -> np.ndarray:
        """Normalize raw features; returns float32."""
        aff = self.affine()
        x = np.asarray(x)
        if aff is None:
            return x.astype(np.float32, copy=True)
        scale, offset = aff
        shape = [1] * x.ndim
        shape[feature_axis] = -1
        if x.shape[feature_axis] != scale.shape[0]:
            raise DataError(
                f"data have {x.shape[feature_axis]} features but the normalization statistics have {scale.shape[0]}",
                "use data from the same feature setup as the statistics",
            )
        return (x.astype(np.float64) * scale.reshape(shape) + offset.reshape(shape)).astype(np.float32)

    def invert(self, x: np.ndarray, feature_axis: int = 2) -> np.ndarray:
        """Undo :meth:`apply` (raw = (normalized - offset) / scale)."""
        aff = self.affine()
        if aff is None:
            return np.asarray(x, dtype=np.float32).copy()
        scale, offset = aff
        shape = [1] * np.asarray(x).ndim
        shape[feature_axis] = -1
        return ((np.asarray(x, np.float64) - offset.reshape(shape)) / scale.reshape(shape)).astype(np.float32)

    def expected_range(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Per-feature range of the normalized *training* data (None for A: raw)."""
        aff = self.affine()
        if aff is None or self.stats is None:
            return None
        scale, offset = aff
        lo = self.stats.minimum * scale + offset
        hi = self.stats.maximum * scale + offset
        return np.minimum(lo, hi), np.maximum(lo, hi)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind.value, "stats": None if self.stats is None else self.stats.to_json()}
        if self.kind is Normalization.AFFINE:
            out.update({
                "formula": AFFINE_FORMULA,
                "scale": [float(v) for v in cast(np.ndarray, self.scale)],
                "offset": [float(v) for v in cast(np.ndarray, self.offset)],
                "origin": self.origin,
                "base": None if self.base is None else self.base.to_json(),
            })
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> NormalizationSpec:
        kind = Normalization.parse(d.get("kind", "A"))
        stats = FeatureStats.from_json(d["stats"]) if d.get("stats") else None
        if kind is not Normalization.AFFINE:
            return cls(kind, stats)
        try:
            scale, offset = np.asarray(d["scale"], np.float64), np.asarray(d["offset"], np.float64)
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"affine normalization is malformed ({exc})", "write the contract again with nilmc") from None
        base = cls.from_json(d["base"]) if d.get("base") else None
        return cls(kind, stats, scale, offset, str(d.get("origin", "")), base)


TARGET_FORMULA = "watts = output * std + mean"


@dataclass(frozen=True)
class TargetScaling:
    """Target (appliance power) scaling: model output ``o`` -> watts ``o * std + mean``.

    ``origin`` (default "") says where a scaling that did not come from training came
    from (a de-normalization taken out of the graph's output); only then does the JSON
    carry ``origin`` and the ``formula``.
    """

    mean: float = 0.0
    std: float = 1.0
    origin: str = ""

    def to_watts(self, y: np.ndarray) -> np.ndarray:
        return (np.asarray(y, np.float64) * self.std + self.mean).astype(np.float32)

    def from_watts(self, w: np.ndarray) -> np.ndarray:
        return ((np.asarray(w, np.float64) - self.mean) / self.std).astype(np.float32)

    def after(self, scale: float, offset: float, *, origin: str) -> TargetScaling:
        """The scaling of a graph whose old output was ``new_output * scale + offset``."""
        note = f"{self.origin}; then {origin}" if self.origin else origin
        return TargetScaling(float(offset * self.std + self.mean), float(scale * self.std), note)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mean": float(self.mean), "std": float(self.std)}
        if self.origin:
            out.update({"formula": TARGET_FORMULA, "origin": self.origin})
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TargetScaling:
        return cls(float(d.get("mean", 0.0)), float(d.get("std", 1.0)), str(d.get("origin", "")))

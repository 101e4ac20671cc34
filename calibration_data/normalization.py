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
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np

from nilmc.compiler.errors import DataError, NormalizationError

_EPS = 1e-12


class Normalization(str, Enum):
    A = "A"  # none
    B = "B"  # min-max to [0, 1]
    C = "C"  # z-score
    D = "D"  # min-max to [-128, 127]
    E = "E"  # min-max to [0, 255]

    @classmethod
    def parse(cls, value: str | Normalization) -> Normalization:
        if isinstance(value, Normalization):
            return value
        key = str(value).strip().upper()
        aliases = {"NONE": "A", "RAW": "A", "MINMAX": "B", "ZSCORE": "C", "Z-SCORE": "C"}
        key = aliases.get(key, key)
        try:
            return cls(key)
        except ValueError:
            raise NormalizationError(
                f"unknown normalization {value!r}",
                "use one of A (none), B (min-max [0,1]), C (z-score), D ([-128,127]), E ([0,255])",
            ) from None

    @property
    def description(self) -> str:
        return {
            "A": "none (raw features)",
            "B": "min-max to [0, 1]",
            "C": "z-score (x - mean) / std",
            "D": "min-max to [-128, 127]",
            "E": "min-max to [0, 255]",
        }[self.value]


@dataclass(frozen=True)
class FeatureStats:
    """Per-feature statistics of the training split (feature axis = last non-channel axis)."""

    minimum: np.ndarray
    maximum: np.ndarray
    mean: np.ndarray
    std: np.ndarray

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

    def to_json(self) -> dict[str, list[float]]:
        return {k: [float(v) for v in getattr(self, k)] for k in ("minimum", "maximum", "mean", "std")}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> FeatureStats:
        try:
            arrs = {k: np.asarray(d[k], dtype=np.float64) for k in ("minimum", "maximum", "mean", "std")}
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"normalization statistics are malformed ({exc})", "regenerate the data set or model contract") from None
        sizes = {k: v.shape for k, v in arrs.items()}
        if len(set(sizes.values())) != 1 or arrs["mean"].ndim != 1:
            raise DataError(f"normalization statistics have inconsistent shapes {sizes}", "regenerate the data set or model contract")
        return cls(**arrs)

    @property
    def n_features(self) -> int:
        return int(self.mean.shape[0])


@dataclass(frozen=True)
class NormalizationSpec:
    """A normalization together with the statistics it was fitted with."""

    kind: Normalization
    stats: FeatureStats | None = field(default=None)

    def __post_init__(self) -> None:
        if self.kind is not Normalization.A and self.stats is None:
            raise NormalizationError(f"normalization {self.kind.value} needs fitted statistics", "fit them on the training split")

    def affine(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Return per-feature ``(scale, offset)`` with ``normalized = raw * scale + offset`` (None for A)."""
        if self.kind is Normalization.A:
            return None
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
        return {"kind": self.kind.value, "stats": None if self.stats is None else self.stats.to_json()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> NormalizationSpec:
        kind = Normalization.parse(d.get("kind", "A"))
        stats = FeatureStats.from_json(d["stats"]) if d.get("stats") else None
        return cls(kind, stats)


@dataclass(frozen=True)
class TargetScaling:
    """Target (appliance power) scaling: model output ``o`` -> watts ``o * std + mean``."""

    mean: float = 0.0
    std: float = 1.0

    def to_watts(self, y: np.ndarray) -> np.ndarray:
        return (np.asarray(y, np.float64) * self.std + self.mean).astype(np.float32)

    def from_watts(self, w: np.ndarray) -> np.ndarray:
        return ((np.asarray(w, np.float64) - self.mean) / self.std).astype(np.float32)

    def to_json(self) -> dict[str, float]:
        return {"mean": float(self.mean), "std": float(self.std)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TargetScaling:
        return cls(float(d.get("mean", 0.0)), float(d.get("std", 1.0)))

"""The on-disk data set format: one ``.npz`` (never pickle) with a JSON header.

Arrays
    x          float32 ``(N, T, F, 1)`` seq2point windows (features as stored:
               raw, normalization ``A``, unless ``meta.applied_normalization`` says otherwise)
    y          float32 ``(N, A)`` target power in watts at each window's midpoint
    meta       0-d unicode array holding a JSON object (see :class:`NilmDataset`)
"""
from __future__ import annotations

import json
import os
import tempfile
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from nilmc.calibration_data.normalization import FeatureStats, Normalization, NormalizationSpec
from nilmc.compiler.errors import DataError

FORMAT_VERSION = 1


@dataclass
class NilmDataset:
    x: np.ndarray
    y: np.ndarray
    appliances: list[str]
    feature_names: list[str]
    applied_normalization: Normalization = Normalization.A
    # Statistics of the *raw* training features; the model contract carries the same numbers.
    train_stats: FeatureStats | None = None
    # Per-appliance target statistics of the training split (watts).
    target_mean: list[float] = field(default_factory=list)
    target_std: list[float] = field(default_factory=list)
    on_thresholds: list[float] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)  # setup, generator version, seed, split, ...

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self, source: str = "data set") -> None:
        x, y = self.x, self.y
        if not isinstance(x, np.ndarray) or not isinstance(y, np.ndarray):
            raise DataError(f"{source}: x and y must be numpy arrays, got {type(x).__name__} and {type(y).__name__}", "build the data set with nilmc data generate/convert")
        if x.dtype.kind != "f":
            raise DataError(f"{source}: x has dtype {x.dtype}, expected float32", "convert the features to float32 before saving")
        if x.ndim != 4 or x.shape[-1] != 1:
            raise DataError(f"{source}: x has shape {x.shape}, expected (N, frames, features, 1)", "shape windows as (batch, frames, features, 1)")
        if x.shape[0] == 0:
            raise DataError(f"{source}: x is empty (shape {x.shape})", "provide at least one window")
        if y.ndim != 2 or y.shape[0] != x.shape[0]:
            raise DataError(f"{source}: y has shape {y.shape} for {x.shape[0]} windows, expected ({x.shape[0]}, n_appliances)", "store one target row per window")
        if y.dtype.kind != "f":
            raise DataError(f"{source}: y has dtype {y.dtype}, expected float32", "convert targets to float32 watts")
        if len(self.appliances) != y.shape[1]:
            raise DataError(f"{source}: {len(self.appliances)} appliance names for {y.shape[1]} target columns", "name every target column")
        if len(self.feature_names) != x.shape[2]:
            raise DataError(f"{source}: {len(self.feature_names)} feature names for {x.shape[2]} features", "name every feature")
        bad_x = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
        bad_y = int(np.size(y) - np.count_nonzero(np.isfinite(y)))
        if bad_x or bad_y:
            raise DataError(f"{source}: {bad_x} non-finite values (NaN/Inf) in x and {bad_y} in y", "clean or drop those windows before calibrating")
        self.x = x.astype(np.float32, copy=False)
        self.y = y.astype(np.float32, copy=False)

    # ------------------------------------------------------------------ views
    @property
    def n_windows(self) -> int:
        return int(self.x.shape[0])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(int(d) for d in self.x.shape[1:])  # type: ignore[return-value]

    def appliance_index(self, appliance: str) -> int:
        try:
            return self.appliances.index(appliance)
        except ValueError:
            raise DataError(f"appliance {appliance!r} is not in this data set", f"available: {', '.join(self.appliances)}") from None

    def raw_x(self) -> np.ndarray:
        """Features in raw units, undoing any normalization applied at build time."""
        if self.applied_normalization is Normalization.A:
            return self.x
        return NormalizationSpec(self.applied_normalization, self.train_stats).invert(self.x)

    def normalization_spec(self, kind: Normalization | str) -> NormalizationSpec:
        kind = Normalization.parse(kind)
        if kind is not Normalization.A and self.train_stats is None:
            raise DataError("this data set carries no training statistics", "regenerate it with nilmc data generate")
        return NormalizationSpec(kind, self.train_stats if kind is not Normalization.A else None)

    def subset(self, idx: np.ndarray | slice) -> "NilmDataset":
        return replace(self, x=self.x[idx], y=self.y[idx])

    # ------------------------------------------------------------------ io
    def meta(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "appliances": list(self.appliances),
            "feature_names": list(self.feature_names),
            "applied_normalization": self.applied_normalization.value,
            "train_stats": None if self.train_stats is None else self.train_stats.to_json(),
            "target_mean": [float(v) for v in self.target_mean],
            "target_std": [float(v) for v in self.target_std],
            "on_thresholds": [float(v) for v in self.on_thresholds],
            "info": self.info,
        }

    def save(self, path: str | Path) -> Path:
        """Write atomically: a partial file never appears under ``path``."""
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_suffix(".npz")
        from nilmc.compiler.io import atomic_write_bytes

        import io

        buf = io.BytesIO()
        np.savez_compressed(buf, x=self.x, y=self.y, meta=np.array(json.dumps(self.meta(), sort_keys=True)))
        atomic_write_bytes(path, _normalize_zip_times(buf.getvalue()))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "NilmDataset":
        path = Path(path)
        if not path.exists():
            raise DataError(f"data file {str(path)!r} does not exist", "check the path, or create one with nilmc data generate")
        if path.is_dir():
            raise DataError(f"{str(path)!r} is a directory, expected an .npz data file", "point at the .npz file")
        try:
            with np.load(path, allow_pickle=False) as z:
                missing = {"x", "y", "meta"} - set(z.files)
                if missing:
                    raise DataError(f"{str(path)!r} lacks array(s) {sorted(missing)} (has {sorted(z.files)})", "write it with nilmc data generate or nilmc data convert")
                x, y, meta_s = z["x"], z["y"], str(z["meta"])
        except DataError:
            raise
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
            raise DataError(f"{str(path)!r} is not a readable nilmc .npz data file ({type(exc).__name__}: {exc})", "regenerate it; nilmc never loads pickled data") from None
        try:
            m = json.loads(meta_s)
        except json.JSONDecodeError as exc:
            raise DataError(f"{str(path)!r} has a malformed JSON header ({exc})", "regenerate the data set") from None
        if m.get("format_version") != FORMAT_VERSION:
            raise DataError(f"{str(path)!r} has format version {m.get('format_version')!r}, this nilmc reads {FORMAT_VERSION}", "regenerate the data set with this nilmc")
        ds = cls.__new__(cls)
        ds.x, ds.y = x, y
        ds.appliances = list(m["appliances"])
        ds.feature_names = list(m["feature_names"])
        ds.applied_normalization = Normalization.parse(m["applied_normalization"])
        ds.train_stats = FeatureStats.from_json(m["train_stats"]) if m.get("train_stats") else None
        ds.target_mean = list(m.get("target_mean", []))
        ds.target_std = list(m.get("target_std", []))
        ds.on_thresholds = list(m.get("on_thresholds", []))
        ds.info = dict(m.get("info", {}))
        ds.validate(source=str(path))
        return ds


def _normalize_zip_times(data: bytes) -> bytes:
    """Rewrite a zip with fixed timestamps so equal arrays give byte-equal files (determinism)."""
    import io

    src = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            zi = zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0))
            zi.compress_type = zipfile.ZIP_DEFLATED
            zi.external_attr = 0o644 << 16
            dst.writestr(zi, src.read(info.filename))
    return out.getvalue()

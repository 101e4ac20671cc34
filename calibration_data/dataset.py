"""The on-disk data set format: one ``.npz`` (never pickle) with a JSON header.

Arrays
    x          float32 ``(N, T, F, 1)`` seq2point windows (features as stored:
               raw, normalization ``A``, unless ``meta.applied_normalization`` says otherwise)
    y          float32 ``(N, A)`` target power in watts at each window's midpoint
    meta       0-d unicode array holding a JSON object (see :class:`NilmDataset`)
"""
from __future__ import annotations

import json
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
            raise DataError(f"{source}: x and y must be numpy arrays, got {type(x).__name__} and {type(y).__name__}",
                            "build the data set with nilmc data generate/convert")
        for name, arr in (("x", x), ("y", y)):
            _check_dtype(source, name, arr)
        if x.ndim != 4 or x.shape[-1] != 1:
            raise DataError(f"{source}: x has shape {x.shape}, expected (N, frames, features, 1)", "shape windows as (batch, frames, features, 1)")
        if x.shape[0] == 0:
            raise DataError(f"{source}: x is empty (shape {x.shape})", "provide at least one window")
        if y.ndim != 2 or y.shape[0] != x.shape[0]:
            raise DataError(f"{source}: y has shape {y.shape} for {x.shape[0]} windows, expected ({x.shape[0]}, n_appliances)",
                            "store one target row per window")
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

    def subset(self, idx: np.ndarray | slice) -> NilmDataset:
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
        import io

        from nilmc.compiler.io import atomic_write_bytes

        buf = io.BytesIO()
        np.savez_compressed(buf, x=self.x, y=self.y, meta=np.array(json.dumps(self.meta(), sort_keys=True)))
        atomic_write_bytes(path, _normalize_zip_times(buf.getvalue()))
        return path

    @classmethod
    def load(cls, path: str | Path) -> NilmDataset:
        path = Path(path)
        if not path.exists():
            raise DataError(f"data file {str(path)!r} does not exist", "check the path, or create one with nilmc data generate")
        if path.is_dir():
            raise DataError(f"{str(path)!r} is a directory, expected an .npz data file", "point at the .npz file")
        looks = _sniff(path)
        if looks is not None:
            raise DataError(f"{str(path)!r} is not an .npz data set: it looks like {looks}", "create data sets with nilmc data generate or nilmc data convert")
        try:
            with np.load(path, allow_pickle=False) as z:
                missing = {"x", "y", "meta"} - set(z.files)
                if missing:
                    raise DataError(f"{str(path)!r} lacks array(s) {sorted(missing)} (has {sorted(z.files)})",
                                    "write it with nilmc data generate or nilmc data convert")
                x, y, meta_s = z["x"], z["y"], str(z["meta"])
        except DataError:
            raise
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
            raise DataError(f"{str(path)!r} is not a readable nilmc .npz data file ({type(exc).__name__}: {exc})",
                            "regenerate it; nilmc never loads pickled data") from None
        try:
            m = json.loads(meta_s)
        except json.JSONDecodeError as exc:
            raise DataError(f"{str(path)!r} has a malformed JSON header ({exc})", "regenerate the data set") from None
        if not isinstance(m, dict):
            raise DataError(f"{str(path)!r} has a JSON header that is a {type(m).__name__}, expected an object", "regenerate the data set")
        if m.get("format_version") != FORMAT_VERSION:
            raise DataError(f"{str(path)!r} has format version {m.get('format_version')!r}, this nilmc reads {FORMAT_VERSION}",
                            "regenerate the data set with this nilmc")
        ds = cls.__new__(cls)
        ds.x, ds.y = x, y
        try:
            ds.appliances = [str(a) for a in _list(m["appliances"])]
            ds.feature_names = [str(a) for a in _list(m["feature_names"])]
            ds.applied_normalization = Normalization.parse(m["applied_normalization"])
            ds.train_stats = FeatureStats.from_json(m["train_stats"]) if m.get("train_stats") else None
            ds.target_mean = [float(v) for v in _list(m.get("target_mean", []))]
            ds.target_std = [float(v) for v in _list(m.get("target_std", []))]
            ds.on_thresholds = [float(v) for v in _list(m.get("on_thresholds", []))]
            ds.info = dict(m.get("info", {}))
        except DataError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise DataError(f"{str(path)!r} has a malformed JSON header ({type(exc).__name__}: {exc})",
                            "regenerate the data set with nilmc data generate/convert") from None
        ds.validate(source=str(path))
        return ds


def _list(v: Any) -> list[Any]:
    if not isinstance(v, list):
        raise TypeError(f"expected a list, got {type(v).__name__}")
    return v


def _check_dtype(source: str, name: str, arr: np.ndarray) -> None:
    """The dtype rule: float32 as is; float64 converted to float32 (what every backend computes in);
    anything else refused — float16 keeps only 11 significant bits (a 3 kW reading moves in 2 W steps,
    65504 W overflows), and integer or object arrays are not measurements nilmc can calibrate on."""
    if arr.dtype in (np.float32, np.float64):
        return
    what = "float16 holds only 11 significant bits (2 W steps at 3 kW, overflow above 65504)" if arr.dtype == np.float16 else "it is not a float array"
    raise DataError(f"{source}: {name} has dtype {arr.dtype}; {what}",
                    f"store {name} as float32 (e.g. {name}.astype(np.float32) from the original data) and save again")


def _sniff(path: Path) -> str | None:
    """A name for what a non-npz file looks like, for the error message."""
    try:
        head = path.open("rb").read(512)
    except OSError:
        return None
    if head.startswith(b"PK"):
        return None
    if head[:1] == b"\x80" or head.startswith(b"\x93NUMPY") and b"'O'" in head:
        return "pickled Python data (nilmc never loads pickles)"
    if head.startswith(b"\x93NUMPY"):
        return "a single .npy array (a data set is an .npz with x, y and meta)"
    if head.startswith(b"\x89HDF"):
        return "an HDF5 file (UK-DALE/REFIT .h5: convert it with nilmc data convert ukdale|refit FILE --out data.npz)"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return None
    first = text.splitlines()[0] if text.strip() else ""
    if first.count(",") >= 1 or first.count(";") >= 1 or first.count("\t") >= 1:
        return "a CSV/text table (convert it with nilmc data convert LAYOUT FILE --out data.npz; layouts: redd_low, redd_high, ukdale, refit, ukdale_excerpt)"
    if text.lstrip().startswith(("{", "[")):
        return "JSON text, not an .npz data set"
    return "a text file, not an .npz data set"


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

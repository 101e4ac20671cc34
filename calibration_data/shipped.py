"""The shipped, versioned calibration and evaluation sets, and the ``nilmc data`` entry points.

``build_shipped()`` writes into ``calibration_data/shipped/``:

    calib_T-P.npz   ~1000 windows, raw T-P features, every target appliance as a column
    eval_T-P.npz    ~5000 windows, same layout, from days disjoint from calib and train
    manifest.json   sha256/bytes/shapes of each file, generator version and seed, sizes,
                    appliances, ON thresholds, training statistics (features and targets)

The sets are the ``calib`` and ``eval`` splits of :func:`build_splits` with the shipped
seed and default sizes, so a model trained on ``build_splits(seed=SHIPPED_SEED)["train"]``
matches them (same features, same training statistics). Same seed -> byte-identical
files (``NilmDataset.save`` fixes zip timestamps; the manifest has no dates).

Entry points for the CLI (thin wrappers):
    ``nilmc data generate``  -> :func:`generate_dataset` (from :mod:`.windows`)
    ``nilmc data convert``   -> :func:`convert_dataset` (from :mod:`.loaders`)
    ``nilmc data inspect``   -> :func:`inspect_dataset`
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from nilmc.calibration_data.dataset import NilmDataset
from nilmc.calibration_data.features import parse_setup
from nilmc.calibration_data.loaders import LAYOUTS, convert_dataset  # re-exported for the CLI
from nilmc.calibration_data.synth import GENERATOR_VERSION, TARGET_APPLIANCES, BurstOptions, Difficulty, check_seed
from nilmc.calibration_data.windows import (
    DEFAULT_SIZES,
    MIDPOINT_INDEX,
    WINDOW_FRAMES,
    build_splits,
    generate_dataset,  # re-exported for the CLI
)
from nilmc.compiler.errors import DataError
from nilmc.compiler.io import atomic_write_json, sha256_file

SHIPPED_DIR = Path(__file__).resolve().parent / "shipped"
SHIPPED_SEED = 3
SHIPPED_SETUP = "T-P"
SHIPPED_APPLIANCE = "kettle"  # the appliance the shipped reference model is trained for
SHIPPED_SIZES: dict[str, int] = dict(DEFAULT_SIZES)
MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1

__all__ = [
    "SHIPPED_DIR", "SHIPPED_SEED", "SHIPPED_SETUP", "SHIPPED_APPLIANCE", "SHIPPED_SIZES", "LAYOUTS",
    "build_shipped", "verify_shipped", "shipped_path", "shipped_paths", "load_shipped", "inspect_dataset",
    "generate_dataset", "convert_dataset",
]


def shipped_path(kind: str = "eval", setup: str = SHIPPED_SETUP, directory: str | Path | None = None) -> Path:
    """Path of a shipped set: ``kind`` ``"calib"`` or ``"eval"`` (default), setup default T-P."""
    if kind not in ("calib", "eval"):
        raise DataError(f"unknown shipped set {kind!r}", "available: calib, eval")
    return Path(directory or SHIPPED_DIR) / f"{kind}_{parse_setup(setup).name}.npz"


SHIPPED_MODEL_STEM = "tp_kettle_zscore"


def shipped_paths(directory: str | Path | None = None) -> dict[str, Path]:
    """Paths of the shipped example: the reference T-P kettle model and its sets.

    Keys: ``model`` (ONNX with the contract embedded), ``keras`` (the tf_keras source,
    its contract in ``<file>.contract.json``), ``calib`` and ``eval``. The model was
    trained with ``nilmc train --appliance kettle --seed 3 --epochs 20`` (z-score input,
    data ``build_splits("T-P", seed=3)``).
    """
    d = Path(directory or SHIPPED_DIR)
    paths = {
        "model": d / f"{SHIPPED_MODEL_STEM}.onnx",
        "keras": d / f"{SHIPPED_MODEL_STEM}.keras",
        "calib": shipped_path("calib", directory=d),
        "eval": shipped_path("eval", directory=d),
    }
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise DataError(f"shipped example files are missing: {', '.join(missing)}", "reinstall nilmc from a complete checkout")
    return paths


def build_shipped(
    out_dir: str | Path | None = None,
    *,
    seed: int = SHIPPED_SEED,
    setup: str = SHIPPED_SETUP,
    n_train: int = SHIPPED_SIZES["train"],
    n_calib: int = SHIPPED_SIZES["calib"],
    n_eval: int = SHIPPED_SIZES["eval"],
) -> dict[str, Any]:
    """Build and write the shipped sets + manifest; returns the manifest.

    Defaults: ``out_dir`` = ``calibration_data/shipped/``, seed ``SHIPPED_SEED`` (3), setup T-P,
    20000 training windows (for the statistics), 1000 calibration and 5000 evaluation windows,
    every target appliance, default difficulty and bursts.
    """
    seed = check_seed(seed)
    su = parse_setup(setup)
    out = Path(out_dir) if out_dir is not None else SHIPPED_DIR
    splits = build_splits(su.name, appliances=TARGET_APPLIANCES, seed=seed, n_train=n_train, n_calib=n_calib,
                          n_eval=n_eval, splits=("train", "calib", "eval"))
    files: dict[str, Any] = {}
    for kind in ("calib", "eval"):
        ds = splits[kind]
        path = ds.save(shipped_path(kind, su.name, out))
        files[path.name] = {
            "split": kind, "sha256": sha256_file(path), "bytes": path.stat().st_size,
            "x_shape": list(ds.x.shape), "y_shape": list(ds.y.shape),
            "on_fraction": {a: float(np.mean(ds.y[:, k] >= ds.on_thresholds[k])) for k, a in enumerate(ds.appliances)},
            # quantized outputs clip at the calibrated range: calib should reach eval's peaks
            "peak_w": {a: float(ds.y[:, k].max()) for k, a in enumerate(ds.appliances)},
        }
    ref = splits["calib"]
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "generator": GENERATOR_VERSION,
        "seed": seed,
        "setup": su.name,
        "appliances": list(ref.appliances),
        "on_thresholds": dict(zip(ref.appliances, ref.on_thresholds)),
        "shipped_model_appliance": SHIPPED_APPLIANCE,
        "window_frames": WINDOW_FRAMES,
        "midpoint_index": MIDPOINT_INDEX,
        "feature_names": list(ref.feature_names),
        "sizes": {"train": int(n_train), "calib": int(n_calib), "eval": int(n_eval)},
        "normalization": {
            "stored": "A (raw features)",
            "train_stats": ref.train_stats.to_json() if ref.train_stats is not None else None,
            "target_mean": dict(zip(ref.appliances, ref.target_mean)),
            "target_std": dict(zip(ref.appliances, ref.target_std)),
        },
        "difficulty": Difficulty().to_json(),
        "burst_options": asdict(BurstOptions()),
        "files": files,
        "rebuild": f"from nilmc.calibration_data.shipped import build_shipped; build_shipped(seed={seed})",
        "train_with": f"build_splits({su.name!r}, seed={seed}, n_train={int(n_train)})['train']",
    }
    atomic_write_json(out / MANIFEST_NAME, manifest)
    return manifest


def _read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST_NAME
    if not path.exists():
        raise DataError(f"no {MANIFEST_NAME} in {str(directory)!r}", "build the shipped sets with build_shipped()")
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{str(path)!r} is not valid JSON ({exc})", "rebuild it with build_shipped()") from None
    if not isinstance(m, dict) or not isinstance(m.get("files"), dict):
        raise DataError(f"{str(path)!r} lacks the 'files' table", "rebuild it with build_shipped()")
    return m


def verify_shipped(directory: str | Path | None = None) -> dict[str, Any]:
    """Check every file listed in the manifest exists with the recorded sha256 and size.

    Returns the manifest; raises :class:`DataError` naming the first mismatch.
    """
    d = Path(directory) if directory is not None else SHIPPED_DIR
    m = _read_manifest(d)
    for name, entry in m["files"].items():
        path = d / name
        if not path.exists():
            raise DataError(f"shipped file {str(path)!r} listed in the manifest is missing", "rebuild with build_shipped() or restore the file")
        digest = sha256_file(path)
        if digest != entry.get("sha256"):
            raise DataError(
                f"shipped file {str(path)!r} has sha256 {digest[:16]}... but the manifest records {str(entry.get('sha256'))[:16]}...",
                "the file was modified or the manifest is stale; rebuild with build_shipped()",
            )
    return m


def load_shipped(kind: str = "eval", setup: str = SHIPPED_SETUP, *, verify: bool = True,
                 directory: str | Path | None = None) -> NilmDataset:
    """Load a shipped set (default: eval T-P), checking the manifest hashes first (``verify``)."""
    if verify:
        verify_shipped(directory)
    return NilmDataset.load(shipped_path(kind, setup, directory))


def inspect_dataset(path: str | Path) -> dict[str, Any]:
    """A JSON-able summary of a data file (``nilmc data inspect``).

    Keys: path, bytes, sha256, n_windows, input_shape, setup, applied_normalization,
    has_train_stats, appliances (per appliance: mean/max W, ON threshold and ON fraction,
    training target mean/std), features (per feature: min/max/mean/std of the stored
    values), info.
    """
    path = Path(path)
    ds = NilmDataset.load(path)
    x = ds.x.astype(np.float64)
    axes = tuple(i for i in range(x.ndim) if i != 2)
    apps = {}
    for k, a in enumerate(ds.appliances):
        y = ds.y[:, k].astype(np.float64)
        thr = ds.on_thresholds[k] if k < len(ds.on_thresholds) else None
        apps[a] = {
            "mean_w": float(y.mean()), "max_w": float(y.max()),
            "on_threshold_w": thr, "on_fraction": None if thr is None else float(np.mean(y >= thr)),
            "train_target_mean": ds.target_mean[k] if k < len(ds.target_mean) else None,
            "train_target_std": ds.target_std[k] if k < len(ds.target_std) else None,
        }
    feats = {
        name: {"min": float(lo), "max": float(hi), "mean": float(mu), "std": float(sd)}
        for name, lo, hi, mu, sd in zip(ds.feature_names, x.min(axis=axes), x.max(axis=axes), x.mean(axis=axes), x.std(axis=axes))
    }
    return {
        "path": str(path),
        "bytes": path.stat().st_size,
        "sha256": sha256_file(path),
        "n_windows": ds.n_windows,
        "input_shape": list(ds.input_shape),
        "setup": ds.info.get("setup"),
        "applied_normalization": ds.applied_normalization.value,
        "has_train_stats": ds.train_stats is not None,
        "appliances": apps,
        "features": feats,
        "info": ds.info,
    }

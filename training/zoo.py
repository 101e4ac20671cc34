"""The reference models beyond the seq2point CNN, trained reproducibly by ``nilmc train --model KIND``.

``xgboost``  seed 000's edge model: XGBoost on window features, ONNX-ML trees (:mod:`nilmc.training.tree`).
``ctrnn``    seed 002's multi-label ON/OFF classifier: conv blocks + transposed conv + GRU + sigmoids
             (:mod:`nilmc.training.ctrnn`).
``cloud``    seed 000's cloud regressor: convolutional encoder + Transformer encoder layers, watts
             (:mod:`nilmc.training.cloud`).

Each writes ``OUT.onnx`` (contract embedded) and ``OUT.info.json`` (sizes, parameter count, MACs/FLOPs,
checks); data default to the synthetic low-frequency household at 8 s (:mod:`nilmc.training.lowfreq_data`),
sized so that training takes about a minute on two CPU cores.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from nilmc.calibration_data.dataset import NilmDataset
from nilmc.calibration_data.shipped import SHIPPED_DIR
from nilmc.compiler.contract import ModelContract
from nilmc.compiler.errors import BadInputError

MODEL_KINDS = ("xgboost", "ctrnn", "cloud")
# window (8 s samples) and split sizes each model trains on by default (sized for this machine)
DEFAULT_DATA: dict[str, dict[str, Any]] = {
    "xgboost": {"window": 99, "sizes": {"train": 4000, "val": 800, "calib": 300, "eval": 1500}, "on_fraction": 0.5},
    "ctrnn": {"window": 128, "sizes": {"train": 3000, "val": 600, "calib": 300, "eval": 1500}, "on_fraction": 0.5},
    "cloud": {"window": 128, "sizes": {"train": 3000, "val": 600, "calib": 300, "eval": 1500}, "on_fraction": 0.5},
}


@dataclass
class Trained:
    """A trained reference model: its ONNX graph, contract and what training measured."""

    kind: str
    graph: onnx.ModelProto
    contract: ModelContract
    info: dict[str, Any] = field(default_factory=dict)
    keras: Any = None  # the tf_keras model when the kind is a Keras model (written as OUT.keras beside OUT.onnx)


def default_splits(kind: str, appliances: Sequence[str], *, seed: int = 0, window: int | None = None,
                   sizes: dict[str, int] | None = None) -> dict[str, NilmDataset]:
    """The synthetic low-frequency splits ``kind`` trains and is compiled on by default."""
    from nilmc.training.lowfreq_data import lowfreq_splits

    spec = DEFAULT_DATA[check_kind(kind)]
    return lowfreq_splits(appliances, window=window or spec["window"], seed=seed, sizes=sizes or spec["sizes"], on_fraction=spec["on_fraction"])


def check_kind(kind: str) -> str:
    if kind not in MODEL_KINDS:
        raise BadInputError(f"unknown model {kind!r}", f"use --model {' | '.join(('seq2point', *MODEL_KINDS))}")
    return kind


def train_model(kind: str, train: NilmDataset, val: NilmDataset | None = None, *, appliances: Sequence[str],
                epochs: int | None = None, seed: int = 0, **kw: Any) -> Trained:
    """Train ``kind`` on ``train`` (``val`` for checks and early stopping). ``appliances``: the one the regressors
    predict (first name), or every appliance the classifier labels. ``epochs`` None = the model's default."""
    check_kind(kind)
    if kind == "xgboost":
        from nilmc.training.tree import TreeConfig, train_xgboost

        proto, contract, info = train_xgboost(train, val, appliance=appliances[0], config=TreeConfig(seed=seed))
        return Trained(kind, proto, contract, info)
    if kind == "cloud":
        from nilmc.training.cloud import CloudConfig, train_cloud

        ccfg = CloudConfig(seed=seed, **({"epochs": epochs} if epochs else {}), **kw)
        proto, contract, info = train_cloud(train, val, appliance=appliances[0], config=ccfg)
        return Trained(kind, proto, contract, info)
    from nilmc.training.ctrnn import CtrnnConfig, train_ctrnn

    cfg = CtrnnConfig(seed=seed, **({"epochs": epochs} if epochs else {}), **kw)
    proto, contract, info, keras = train_ctrnn(train, val, appliances=tuple(appliances), config=cfg)
    return Trained(kind, proto, contract, info, keras)


def save_model(trained: Trained, out: str | Path) -> dict[str, Path]:
    """Write ``<out>.onnx`` (contract embedded) and ``<out>.info.json`` (and, for a Keras model, ``<out>.keras`` with its
    contract sidecar), atomically."""
    from nilmc.compiler.io import atomic_write_json
    from nilmc.compiler.model import Model

    out = Path(out)
    paths: dict[str, Path] = {}
    if trained.keras is not None:
        from nilmc.training.seq2point import save_trained

        paths["keras"] = save_trained(trained.keras, trained.contract, out)["keras"]
    paths["onnx"] = Model(trained.graph, trained.contract, source=str(out)).save_onnx(out.with_suffix(".onnx"))
    paths["info"] = atomic_write_json(out.with_suffix(".info.json"), {"model": trained.kind, **trained.info})
    return paths


# ``nilmc example --all-models``: each reference model small and seeded, with the targets that can take it, and the
# edge targets it is meant for even where they fail their gate; the example prints, for every other available target,
# why it is left out (its pre-check's line). The example compiles the copies that ship in SHIPPED_MODELS_DIR (trained
# once by build_shipped_models): TensorFlow's float kernels differ between CPUs, so the same seeded training gives a
# different CtRNN on another machine (weighted F1 0.578 on an AVX2 EPYC against 0.736 on a Xeon with AMX, 8 epochs),
# and an example whose model depends on the host cannot be a reference. ``example --all-models --retrain`` trains them
# here instead (cached in OUT/models).
EXAMPLE_MODELS: dict[str, dict[str, Any]] = {
    "ctrnn": {"appliances": ("kettle", "microwave", "fridge", "washing_machine"), "epochs": 30, "source": "keras",
              "targets": ("onnxruntime:fp32", "onnxruntime:int8", "openvino:int8", "openvino:fp16", "tensorrt:int8", "tensorrt:fp16",
                          "tflite:fp32", "tflite:dynamic_int8", "tflite:int8", "eiq:int8", "dpu:b2304")},
    "cloud": {"appliances": ("fridge",), "epochs": 8,
              "targets": ("onnxruntime:fp32", "onnxruntime:int8", "openvino:int8", "openvino:fp16", "tensorrt:int8", "tensorrt:fp16")},
    "xgboost": {"appliances": ("fridge",), "epochs": None, "targets": ("onnxruntime:fp32",)},
}
EXAMPLE_SIZES = {"train": 2000, "val": 400, "calib": 300, "eval": 1000}
SHIPPED_MODELS_DIR = SHIPPED_DIR / "models"
SHIPPED_MODELS_MANIFEST = "manifest.json"


def example_key(kind: str, seed: int = 0) -> dict[str, Any]:
    """What decides the example's ``kind`` model: a cached or shipped copy is used only when its key is this one (the
    data's own settings too: a copy written before the calibration split changed is not reused)."""
    from nilmc.training.lowfreq_data import CALIB_MIN_DAYS

    spec = EXAMPLE_MODELS[check_kind(kind)]
    return {"kind": kind, "seed": seed, "sizes": EXAMPLE_SIZES, "appliances": list(spec["appliances"]), "epochs": spec["epochs"],
            "window": DEFAULT_DATA[kind]["window"], "calib_min_days": CALIB_MIN_DAYS}


def _example_paths(kind: str, directory: Path) -> dict[str, Path]:
    stem = directory / kind
    paths = {"onnx": stem.with_suffix(".onnx"), "calib": directory / f"{kind}.calib.npz", "eval": directory / f"{kind}.eval.npz"}
    paths["model"] = stem.with_suffix(".keras") if EXAMPLE_MODELS[kind].get("source") == "keras" else paths["onnx"]
    return paths


def _model_files(kind: str, directory: Path) -> list[Path]:
    """Every file ``save_model`` and the example write for ``kind`` (the Keras contract sidecar too)."""
    paths = _example_paths(kind, directory)
    files = {*paths.values(), (directory / kind).with_suffix(".info.json")}
    if paths["model"].suffix == ".keras":
        files.add(paths["model"].with_name(paths["model"].name + ".contract.json"))
    return sorted(files)


def shipped_example(kind: str, *, seed: int = 0, directory: str | Path | None = None) -> dict[str, Any] | None:
    """The shipped copy of the example's ``kind`` model (hashes checked against the manifest), or None when none ships
    for the example's current settings (:func:`example_key`)."""
    import json

    from nilmc.compiler.errors import DataError
    from nilmc.compiler.io import sha256_file

    d = Path(directory) if directory is not None else SHIPPED_MODELS_DIR
    mpath = d / SHIPPED_MODELS_MANIFEST
    if not mpath.is_file():
        return None
    entry = json.loads(mpath.read_text()).get("models", {}).get(kind)
    if not entry or entry.get("example_key") != example_key(kind, seed):
        return None
    for name, rec in entry["files"].items():
        path = d / name
        if not path.is_file() or sha256_file(path) != rec["sha256"]:
            raise DataError(f"shipped example model file {str(path)!r} is missing or differs from its manifest ({mpath})",
                            "reinstall nilmc, or train the models here: nilmc example --all-models --retrain")
    paths = _example_paths(kind, d)
    info = json.loads((d / f"{kind}.info.json").read_text())
    return {**paths, "targets": EXAMPLE_MODELS[kind]["targets"], "info": info, "cached": False, "shipped": True}


def example_model(kind: str, cache: str | Path, *, seed: int = 0, shipped: bool = True) -> dict[str, Any]:
    """The example's ``kind`` model: the shipped copy (``shipped``, when one ships for these settings), else trained
    here (or reused from ``cache/<kind>.*`` written by an earlier run with the same settings).

    Returns ``{"onnx", "calib", "eval", "model"}`` paths (``model``: the file to compile: the ``.keras`` model when the
    kind is a Keras model, so the TFLite targets lower from it, else the ONNX), ``"targets"`` (the example's list),
    ``"info"`` (training's), ``"cached"`` and ``"shipped"``."""
    import json

    if shipped:
        found = shipped_example(kind, seed=seed)
        if found is not None:
            return found
    spec = EXAMPLE_MODELS[check_kind(kind)]
    cache = Path(cache)
    key = example_key(kind, seed)
    paths = _example_paths(kind, cache)
    info_path = (cache / kind).with_suffix(".info.json")
    if info_path.is_file() and all(p.is_file() for p in paths.values()):
        info = json.loads(info_path.read_text())
        if info.get("example_key") == key:  # same settings -> same model on this host (training is seeded): reuse it
            return {**paths, "targets": spec["targets"], "info": info, "cached": True, "shipped": False}
    cache.mkdir(parents=True, exist_ok=True)
    splits = default_splits(kind, spec["appliances"], seed=seed, sizes=EXAMPLE_SIZES)
    trained = train_model(kind, splits["train"], splits["val"], appliances=spec["appliances"], epochs=spec["epochs"], seed=seed)
    trained.info["example_key"] = key
    splits["calib"].save(paths["calib"])
    splits["eval"].save(paths["eval"])
    save_model(trained, cache / kind)
    return {**paths, "targets": spec["targets"], "info": trained.info, "cached": False, "shipped": False}


def build_shipped_models(directory: str | Path | None = None, kinds: Sequence[str] = tuple(EXAMPLE_MODELS)) -> dict[str, Any]:
    """Train the example's models into ``directory`` (default: the shipped folder) and write its manifest: per model
    the example key, the CPU that trained it, and each file's sha256 and size. Run from a checkout to refresh them:
    ``python -c "from nilmc.training.zoo import build_shipped_models; build_shipped_models()"`` (about 2 min)."""
    import platform

    from nilmc.compiler.io import atomic_write_json, sha256_file

    d = Path(directory) if directory is not None else SHIPPED_MODELS_DIR
    models = {}
    for kind in kinds:
        example_model(kind, d, shipped=False)
        models[kind] = {"example_key": example_key(kind), "trained_on": f"{platform.machine()} {_cpu_name()}".strip(),
                        "files": {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in _model_files(kind, d)}}
    manifest = {"what": "nilmc example --all-models: the models beside the shipped CNN (nilmc.training.zoo.build_shipped_models)",
                "models": models}
    atomic_write_json(d / SHIPPED_MODELS_MANIFEST, manifest)
    return manifest


def _cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")

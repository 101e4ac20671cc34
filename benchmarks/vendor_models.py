"""The three models of ``bench_vendors.py``: the shipped z-score model, its raw-input variant, and the A model.

* **zscore** — the shipped T-P kettle model (normalization C), loaded from its ``.keras`` file.
* **raw** — the same model with its z-score in front as float ``Mul``/``Add`` and ``y * std + mean`` behind (raw
  features in, watts out): :func:`raw_onnx`. The targets and flows that lower from Keras take
  :func:`raw_keras` instead, the same network behind a Keras ``Normalization`` layer (the de-normalization stays
  in the contract: nilmc strips a Keras input prefix only). Both are the builders of
  ``tests/compiler/test_raw_input_models.py``, built from the loaded z-score model so every flow sees one network.
* **A** — ``nilmc train --appliance kettle --setup T-P --normalization A --seed 3 --epochs 40`` (the shipped
  model's network and data with raw inputs, trained by the raw-feature recipe of ``training/seq2point.py``),
  trained once into a cache folder through the same API calls as the CLI. The cache file is keyed by seed,
  epochs and ``RAW_RECIPE_VERSION``, so a changed recipe trains a new model instead of reusing an old one.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from nilmc.compiler.contract import ModelContract
    from nilmc.compiler.model import Model

A_SEED = 3  # the shipped sets' seed: the A model trains on the split the shipped model was trained on
A_EPOCHS = 40  # the raw-feature recipe's cosine decay needs the longer run (20 epochs: 56 % EACC, 40: 79 %)


def raw_contract(c: ModelContract, *, denorm: bool) -> ModelContract:
    """``c`` for raw-feature input (normalization A, the same statistics); ``denorm``: watts come out of the graph."""
    from nilmc.calibration_data.normalization import Normalization, NormalizationSpec, TargetScaling

    c = c.with_(normalization=NormalizationSpec(Normalization.A, c.normalization.stats))
    return c.with_(target=TargetScaling()) if denorm else c


def raw_onnx(zmodel: Model, dst: Path) -> Path:
    """``zmodel``'s graph with ``x * (1/std) + (-mean/std)`` (per feature) in front and ``y * std + mean`` behind.

    Writes ``dst`` and its contract sidecar (raw input, watts out); no contract in the ONNX metadata.
    """
    import json

    import onnx

    from nilmc.quantization.fold import fold_normalization

    c = zmodel.contract
    m = fold_normalization(zmodel, input_mode="ops", output_mode="ops").model.graph  # explicit Mul/Add on both sides
    del m.metadata_props[:]
    onnx.checker.check_model(m)
    onnx.save(m, str(dst))
    (dst.parent / (dst.name + ".contract.json")).write_text(json.dumps(raw_contract(c, denorm=True).to_json()))
    return dst


def raw_keras(zmodel: Model, dst: Path) -> Path:
    """``zmodel``'s Keras network behind a per-feature Keras ``Normalization`` layer (raw features in, model units out)."""
    from nilmc.compiler.frontend import save_contract_sidecar
    from nilmc.compiler.tfcompat import import_tf, load_keras

    tf = import_tf("building the raw-input Keras variant")
    km = load_keras(zmodel)
    c = zmodel.contract
    st = c.normalization.stats
    inp = tf.keras.Input(shape=tuple(c.input_shape), name="input")
    h = tf.keras.layers.Normalization(axis=2, mean=st.mean, variance=np.square(st.std), name="zscore")(inp)
    for layer in km.layers[1:]:  # shares the loaded model's layers (read-only): the very same weights
        h = layer(h)
    tf.keras.Model(inp, h, name="tp_raw").save(dst)
    save_contract_sidecar(dst, raw_contract(c, denorm=False))
    return dst


def a_model(cache: Path, *, say=print) -> Path:
    """The A model's ``.keras`` file in ``cache`` (trained there once; deterministic: seed, op determinism)."""
    from nilmc.training.seq2point import RAW_RECIPE_VERSION

    stem = cache / f"tp_kettle_A_seed{A_SEED}_e{A_EPOCHS}_r{RAW_RECIPE_VERSION}"
    keras_path = stem.with_suffix(".keras")
    if keras_path.is_file() and stem.with_suffix(".onnx").is_file():
        return keras_path
    from nilmc.calibration_data.windows import build_splits
    from nilmc.training import TrainConfig, save_trained, train_seq2point

    cache.mkdir(parents=True, exist_ok=True)
    say(f"training the A model (nilmc train --appliance kettle --normalization A --seed {A_SEED} --epochs {A_EPOCHS}) "
        f"into {cache} ...")
    t0 = time.perf_counter()
    splits = build_splits("T-P", seed=A_SEED, splits=("train", "val"))
    model, contract = train_seq2point(splits["train"], splits["val"], appliance="kettle", normalization="A",
                                      config=TrainConfig(epochs=A_EPOCHS, seed=A_SEED))
    save_trained(model, contract, stem)
    say(f"trained in {time.perf_counter() - t0:.0f} s")
    return keras_path

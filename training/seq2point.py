"""Reproducible training of the reference seq2point models (``nilmc train``).

Determinism: ``tf.keras.utils.set_random_seed`` + op determinism + a fixed
shuffle order, so the same data, setup and seed give the same weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nilmc.calibration_data.dataset import NilmDataset
from nilmc.calibration_data.normalization import Normalization, TargetScaling
from nilmc.compiler.contract import ModelContract
from nilmc.compiler.errors import BadInputError


@dataclass(frozen=True)
class TrainConfig:
    """Training options. Defaults: 30 epochs, batch 256, Adam 1e-3, MSE, seed 0,
    early stopping on validation loss with patience 6 (best weights restored),
    ``lr_schedule="auto"``: a cosine decay of the learning rate to 0 over the run for raw-feature
    (normalization A) models, a constant rate otherwise (``"constant"`` / ``"cosine"`` force one)."""

    epochs: int = 30
    batch_size: int = 256
    learning_rate: float = 1e-3
    seed: int = 0
    patience: int = 6
    architecture: str = "seq2point"  # or "classic"
    verbose: int = 0
    lr_schedule: str = "auto"


LR_SCHEDULES = ("auto", "constant", "cosine")
# The raw-feature (A) recipe, for caches keyed by it (benchmarks/vendor_models.py): 1 = one input scale 1/RMS folded
# into the first layer, constant rate; 2 = the same plus a cosine-decayed rate (measured, seed 3 T-P kettle, shipped
# evaluation set: EACC 75.78 % at 20 epochs constant -> 78.77 % at 40 epochs cosine; 20 epochs cosine 56.36 %).
RAW_RECIPE_VERSION = 2


def contract_for(ds: NilmDataset, appliance: str, normalization: Normalization | str) -> ModelContract:
    """The input contract a model trained on ``ds`` for ``appliance`` will carry."""
    k = ds.appliance_index(appliance)
    spec = ds.normalization_spec(normalization)
    if not ds.target_std:
        raise BadInputError("the training set carries no target statistics", "regenerate it with nilmc data generate")
    thr = ds.on_thresholds[k] if ds.on_thresholds else 10.0
    return ModelContract(
        input_shape=ds.input_shape,
        normalization=spec,
        appliance=appliance,
        target=TargetScaling(float(ds.target_mean[k]), float(max(ds.target_std[k], 1e-6))),
        on_threshold_w=float(thr),
        peak_power_w=float(np.max(ds.y[:, k])),
        feature_names=tuple(ds.feature_names),
        setup=str(ds.info.get("setup", "")),
    )


def train_seq2point(
    train: NilmDataset,
    val: NilmDataset | None = None,
    *,
    appliance: str,
    normalization: Normalization | str = "C",
    config: TrainConfig = TrainConfig(),
) -> tuple[Any, ModelContract]:
    """Train a seq2point model for one appliance; returns ``(keras_model, contract)``."""
    from nilmc.compiler.tfcompat import import_tf
    from nilmc.training.models import MODEL_BUILDERS

    tf = import_tf("training")
    contract = contract_for(train, appliance, normalization)
    k = train.appliance_index(appliance)

    def xy(ds: NilmDataset) -> tuple[np.ndarray, np.ndarray]:
        contract.check_input(ds.x, source="the validation set" if ds is val else "the training set")
        return contract.normalization.apply(ds.raw_x()), contract.target.from_watts(ds.y[:, k])[:, None]

    x, y = xy(train)
    # Raw features (A) span ~7 decades (a power variance of 1e7 beside a skewness of 1): He-initialised layers
    # start with activations ~1e7 and Adam's steps (~learning rate per weight, whatever the gradient's size) cannot
    # bring the first layer down to the 1e-7 weights it needs (measured: EACC -310 %). So train in coordinates
    # scaled by one scalar c = 1 / RMS(x) and fold c into the first layer's kernel afterwards: the same as a
    # scale-aware initialisation plus a learning rate of lr * c for that layer. The saved model takes raw features
    # (their relative scales untouched: no normalization hidden in it).
    input_scale = _raw_input_scale(x) if contract.normalization.kind is Normalization.A else 1.0
    x = (x * input_scale).astype(np.float32)
    tf.keras.utils.set_random_seed(config.seed)
    tf.config.experimental.enable_op_determinism()
    try:
        builder = MODEL_BUILDERS[config.architecture]
    except KeyError:
        raise BadInputError(f"unknown architecture {config.architecture!r}", f"available: {', '.join(MODEL_BUILDERS)}") from None
    model = builder(contract.input_shape) if config.architecture == "seq2point" else builder(contract.input_shape[0])
    model.compile(optimizer=tf.keras.optimizers.Adam(_learning_rate(tf, config, contract, len(x))), loss="mse")
    callbacks = []
    val_data = None
    if val is not None:
        xv, yv = xy(val)
        val_data = ((xv * input_scale).astype(np.float32), yv)
        callbacks.append(tf.keras.callbacks.EarlyStopping(monitor="val_loss", patience=config.patience, restore_best_weights=True))
    model.fit(x, y, batch_size=config.batch_size, epochs=config.epochs, validation_data=val_data,
              shuffle=True, callbacks=callbacks, verbose=config.verbose)
    if input_scale != 1.0:
        _fold_input_scale(model, input_scale)
    return model, contract


def _learning_rate(tf: Any, config: TrainConfig, contract: ModelContract, n: int) -> Any:
    """Adam's learning rate: the constant ``config.learning_rate`` or a cosine decay from it to 0 over every step."""
    if config.lr_schedule not in LR_SCHEDULES:
        raise BadInputError(f"unknown learning-rate schedule {config.lr_schedule!r}", f"use one of {', '.join(LR_SCHEDULES)}")
    cosine = config.lr_schedule == "cosine" or (config.lr_schedule == "auto" and contract.normalization.kind is Normalization.A)
    if not cosine:
        return config.learning_rate
    # Raw features make the loss surface steep along the dominant feature's weights: a constant rate keeps
    # jumping between minima (validation loss 0.72 -> 0.86 across epochs); decaying it lets the run settle.
    steps = max(1, config.epochs * -(-n // config.batch_size))
    return tf.keras.optimizers.schedules.CosineDecay(config.learning_rate, steps)


def _raw_input_scale(x: np.ndarray) -> float:
    """``1 / RMS(x)`` over every value (1.0 for an all-zero set)."""
    rms = float(np.sqrt(np.mean(np.square(np.asarray(x, np.float64)))))
    return 1.0 / rms if rms > 0 and np.isfinite(rms) else 1.0


def _fold_input_scale(model: Any, scale: float) -> None:
    """``model(x * scale) == model'(x)``: multiply the first weighted layer's kernel by ``scale`` (exact; bias unchanged)."""
    for layer in model.layers:
        kernel = getattr(layer, "kernel", None)
        if kernel is not None:
            kernel.assign(kernel * scale)
            return
    raise BadInputError("the model has no weighted layer to take the input scale", "use the seq2point or classic architecture")


def save_trained(model: Any, contract: ModelContract, out: str | Path) -> dict[str, Path]:
    """Write ``<out>.keras``, its contract sidecar and ``<out>.onnx`` (contract embedded), atomically."""
    import tempfile

    from nilmc.compiler.frontend import keras_to_onnx, save_contract_sidecar
    from nilmc.compiler.io import atomic_write_bytes

    out = Path(out)
    keras_path = out.with_suffix(".keras")
    onnx_path = out.with_suffix(".onnx")
    with tempfile.TemporaryDirectory() as tmp:
        tmp_keras = Path(tmp) / "model.keras"
        model.save(tmp_keras)
        atomic_write_bytes(keras_path, tmp_keras.read_bytes())
    save_contract_sidecar(keras_path, contract)
    keras_to_onnx(model, contract).save_onnx(onnx_path)
    return {"keras": keras_path, "onnx": onnx_path}

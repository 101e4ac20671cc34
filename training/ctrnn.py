"""Seed 002's CtRNN: a multi-label ON/OFF classifier on low-frequency mains windows.

The paper's network: four blocks of two convolutions + average pooling (64, 128, 256, 512 filters), a
transposed convolution, a GRU, two dense layers of 4096 and one sigmoid per appliance (ON when > 0.5), on
2550-sample windows at 6-8 s. Sized for this machine (two CPU cores, a minute of training) it keeps the
shape and scales the widths: filters doubling from ``base_filters`` (default 8: 8, 16, 32, 64), a transposed
convolution (stride 2) back to a longer sequence, a GRU of ``gru_units``, one dense layer of ``dense_units`` and
the sigmoid head; windows of 128 samples (17 minutes at 8 s) by default. The parameter count and FLOPs of
what was built are measured from its ONNX graph (:mod:`nilmc.training.cost`), not quoted.

Input ``(N, T, 1, 1)`` mains watts, z-scored with the data set's mains statistics (normalization C);
targets ``power >= ON threshold`` per appliance; binary cross-entropy. Deterministic (seeded TensorFlow with
op determinism, fixed shuffle).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from nilmc.calibration_data.dataset import NilmDataset
from nilmc.calibration_data.normalization import TargetScaling
from nilmc.compiler.contract import ModelContract
from nilmc.compiler.errors import BadInputError
from nilmc.training.fitting import TrainConfig, fit_deterministic


@dataclass(frozen=True)
class CtrnnConfig(TrainConfig):
    """CtRNN sizes and training. Defaults: base 8 filters (8/16/32/64), kernel 3, GRU 32, dense 64; 12 epochs, batch 64,
    Adam 2e-3, early stopping on validation loss (patience 4, best weights restored), seed 0."""

    base_filters: int = 8
    kernel: int = 3
    gru_units: int = 32
    dense_units: int = 64


def build_ctrnn(window: int, n_appliances: int, config: CtrnnConfig = CtrnnConfig()) -> Any:
    """The Keras CtRNN over ``(window, 1, 1)`` (``window`` divisible by 16: four poolings of 2)."""
    from nilmc.compiler.tfcompat import import_tf

    if window % 16 or window < 32:
        raise BadInputError(f"the CtRNN pools four times by 2: its window must be a multiple of 16 and >= 32, got {window}",
                            "generate data with such a window (e.g. 128)")
    tf = import_tf("building the CtRNN")
    layers = tf.keras.layers
    inp = layers.Input(shape=(window, 1, 1), name="input")
    x = layers.Reshape((window, 1), name="to_sequence")(inp)
    for b in range(4):
        f = config.base_filters * 2 ** b
        x = layers.Conv1D(f, config.kernel, padding="same", activation="relu", name=f"block{b + 1}_conv1")(x)
        x = layers.Conv1D(f, config.kernel, padding="same", activation="relu", name=f"block{b + 1}_conv2")(x)
        x = layers.AveragePooling1D(2, name=f"block{b + 1}_pool")(x)
    x = layers.Conv1DTranspose(config.base_filters * 4, config.kernel, strides=2, padding="same", activation="relu", name="tconv")(x)
    x = layers.GRU(config.gru_units, name="gru")(x)
    x = layers.Dense(config.dense_units, activation="relu", name="dense")(x)
    out = layers.Dense(n_appliances, activation="sigmoid", name="output")(x)
    return tf.keras.Model(inp, out, name="ctrnn")


def ctrnn_contract(ds: NilmDataset, appliances: tuple[str, ...]) -> ModelContract:
    """The multi-label contract of a CtRNN trained on ``ds``: z-scored mains, one probability per appliance."""
    idx = [ds.appliance_index(a) for a in appliances]
    thr = tuple(float(ds.on_thresholds[k]) if ds.on_thresholds else 10.0 for k in idx)
    return ModelContract(input_shape=ds.input_shape, normalization=ds.normalization_spec("C"), appliance=appliances[0],
                         target=TargetScaling(0.0, 1.0), peak_power_w=1.0, output_units="probability",
                         feature_names=tuple(ds.feature_names), setup=str(ds.info.get("setup", "")),
                         task="multilabel" if len(appliances) > 1 else "binary", appliances=appliances, on_thresholds_w=thr)


def train_ctrnn(train: NilmDataset, val: NilmDataset | None = None, *, appliances: tuple[str, ...],
                config: CtrnnConfig = CtrnnConfig()) -> tuple[onnx.ModelProto, ModelContract, dict[str, Any], Any]:
    """Train the CtRNN; returns ``(onnx_graph, contract, info, keras_model)`` (info: parameters, MACs/FLOPs, epochs
    run; the Keras model is what the TFLite targets lower from: onnx2tf cannot read its tf2onnx export back)."""
    from nilmc.compiler.frontend import keras_to_onnx
    from nilmc.compiler.tfcompat import import_tf
    from nilmc.training.cost import graph_cost

    if not appliances:
        raise BadInputError("the CtRNN needs at least one appliance", "pass --appliances a,b,c")
    if train.x.shape[2] != 1:
        raise BadInputError(f"the CtRNN takes one mains channel per step, the data has {train.x.shape[2]} features",
                            "use low-frequency data (nilmc data generate --setup LF-P)")
    tf = import_tf("training the CtRNN")
    contract = ctrnn_contract(train, appliances)

    def xy(ds: NilmDataset) -> tuple[np.ndarray, np.ndarray]:
        contract.check_input(ds.x)
        on = contract.select_truth(ds.y, ds.appliances) >= np.asarray(contract.on_thresholds_w)
        return contract.normalization.apply(ds.raw_x()).astype(np.float32), on.astype(np.float32)

    x, y = xy(train)
    model, hist = fit_deterministic(tf, lambda: build_ctrnn(int(x.shape[1]), len(appliances), config), x, y, None if val is None else xy(val), config,
                                    loss="binary_crossentropy")
    converted = keras_to_onnx(model, contract, source="CtRNN")
    cost = graph_cost(converted.graph)
    info = {"model": "ctrnn", "appliances": list(appliances), "window": int(x.shape[1]), "parameters": int(model.count_params()),
            "epochs_run": len(hist.history["loss"]), "config": config.to_json(), **cost}
    return converted.graph, converted.contract, info, model

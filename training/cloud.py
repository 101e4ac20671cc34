"""Seed 000's cloud model: a seq2point regressor with a convolutional encoder and Transformer encoder layers.

The paper's cloud network (Fig. 3): a multi-dimensional convolutional encoder over the mains window, then
Transformer layers (multi-head self-attention, add & layer normalization, a feed-forward block), predicting the
appliance's state at one point of the window. Sized for this machine (two CPU cores, about a minute of training)
it keeps that shape and scales the widths: two strided 1-D convolutions (window / 4 tokens of ``d_model``
channels), ``layers`` encoder layers of ``heads``-head attention with a ``ffn``-wide feed-forward block, then
a flatten + dense head to one output in the target scaling (watts = output x std + mean). Only the encoder half
is built: seq2point predicts one point, so there is no output sequence for a decoder to generate; the
parameter count and MACs of what was built are measured from its ONNX graph (:mod:`nilmc.training.cost`).

Input ``(N, T, 1, 1)`` mains watts, z-scored with the data set's statistics (normalization C); target the
appliance's power at the window midpoint, standardized; MSE. Deterministic (seeded TensorFlow with op
determinism, fixed shuffle).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from nilmc.calibration_data.dataset import NilmDataset
from nilmc.compiler.contract import ModelContract
from nilmc.compiler.errors import BadInputError
from nilmc.training.fitting import TrainConfig, fit_deterministic


@dataclass(frozen=True)
class CloudConfig(TrainConfig):
    """Cloud model sizes and training. Defaults: d_model 32, 2 heads, 2 layers, feed-forward 64, conv kernel 5;
    12 epochs, batch 64, Adam 2e-3, early stopping on validation loss (patience 4, best weights restored), seed 0."""

    d_model: int = 32
    heads: int = 2
    layers: int = 2
    ffn: int = 64
    kernel: int = 5


def build_cloud(window: int, config: CloudConfig = CloudConfig()) -> Any:
    """The Keras cloud model over ``(window, 1, 1)`` (``window`` divisible by 4: two convolutions of stride 2)."""
    from nilmc.compiler.tfcompat import import_tf

    if window % 4 or window < 8:
        raise BadInputError(f"the cloud model's encoder strides twice by 2: its window must be a multiple of 4 and >= 8, got {window}",
                            "generate data with such a window (e.g. 128)")
    tf = import_tf("building the cloud model")
    layers = tf.keras.layers
    d = config.d_model
    inp = layers.Input(shape=(window, 1, 1), name="input")
    x = layers.Reshape((window, 1), name="to_sequence")(inp)
    x = layers.Conv1D(d // 2, config.kernel, strides=2, padding="same", activation="relu", name="enc_conv1")(x)
    x = layers.Conv1D(d, config.kernel, strides=2, padding="same", activation="relu", name="enc_conv2")(x)
    for i in range(config.layers):
        att = layers.MultiHeadAttention(config.heads, d // config.heads, name=f"mha{i + 1}")(x, x)
        x = layers.LayerNormalization(epsilon=1e-5, name=f"ln{i + 1}a")(layers.Add(name=f"res{i + 1}a")([x, att]))
        f = layers.Dense(config.ffn, activation="relu", name=f"ffn{i + 1}_1")(x)
        f = layers.Dense(d, name=f"ffn{i + 1}_2")(f)
        x = layers.LayerNormalization(epsilon=1e-5, name=f"ln{i + 1}b")(layers.Add(name=f"res{i + 1}b")([x, f]))
    x = layers.Flatten(name="flatten")(x)  # the token positions matter (seq2point predicts the midpoint): no pooling
    x = layers.Dense(config.ffn, activation="relu", name="head")(x)
    out = layers.Dense(1, name="output")(x)
    return tf.keras.Model(inp, out, name="cloud_transformer")


def train_cloud(train: NilmDataset, val: NilmDataset | None = None, *, appliance: str,
                config: CloudConfig = CloudConfig()) -> tuple[onnx.ModelProto, ModelContract, dict[str, Any]]:
    """Train the cloud model for ``appliance``; returns ``(onnx_graph, contract, info)`` (parameters, MACs/FLOPs, epochs run)."""
    from nilmc.compiler.frontend import keras_to_onnx
    from nilmc.compiler.tfcompat import import_tf
    from nilmc.training.cost import graph_cost
    from nilmc.training.seq2point import contract_for

    if train.x.shape[2] != 1:
        raise BadInputError(f"the cloud model takes one mains channel per step, the data has {train.x.shape[2]} features",
                            "use low-frequency data (nilmc data generate --setup LF-P)")
    if config.d_model % config.heads or config.d_model % 2:
        raise BadInputError(f"d_model {config.d_model} must be even and divisible by heads {config.heads}", "pick sizes that divide")
    tf = import_tf("training the cloud model")
    contract = contract_for(train, appliance, "C")
    k = train.appliance_index(appliance)

    def xy(ds: NilmDataset) -> tuple[np.ndarray, np.ndarray]:
        contract.check_input(ds.x)
        return (contract.normalization.apply(ds.raw_x()).astype(np.float32),
                contract.target.from_watts(ds.y[:, k])[:, None].astype(np.float32))

    x, y = xy(train)
    model, hist = fit_deterministic(tf, lambda: build_cloud(int(x.shape[1]), config), x, y, None if val is None else xy(val), config,
                                    loss="mse")
    converted = keras_to_onnx(model, contract, source="cloud Transformer")
    cost = graph_cost(converted.graph)
    info = {"model": "cloud", "appliance": appliance, "window": int(x.shape[1]), "parameters": int(model.count_params()),
            "epochs_run": len(hist.history["loss"]), "config": config.to_json(), **cost}
    return converted.graph, converted.contract, info

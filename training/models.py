"""Reference seq2point models (Keras 2 / tf_keras, so QAT with tfmot works on them).

* :func:`build_seq2point_cnn` — the CNN of seed 003 (Figure 4): five convolutions
  and three dense layers over a ``(frames, features, 1)`` window. The paper gives
  the layer count and the parameter budget (~671 k at T-P ``(10, 9, 1)``), not the
  exact widths; the widths below are ours, chosen to land on that budget
  (672,129 parameters at ``(10, 9, 1)``).
* :func:`build_classic_seq2point` — Zhang et al. (AAAI 2018): 599-sample window,
  conv 30x10, 30x8, 40x6, 50x5, 50x5, dense 1024, dense 1 (~30.7 M parameters).
"""
from __future__ import annotations

from typing import Any

# (kernel, filters) per convolution; 'same' padding, stride 1, ReLU.
SEQ2POINT_CONVS: tuple[tuple[int, int], ...] = ((5, 32), (5, 32), (3, 64), (3, 64), (3, 32))
SEQ2POINT_DENSE: tuple[int, ...] = (192, 96)  # followed by Dense(1, linear)
CLASSIC_CONVS: tuple[tuple[int, int], ...] = ((10, 30), (8, 30), (6, 40), (5, 50), (5, 50))
CLASSIC_DENSE = 1024


def build_seq2point_cnn(input_shape: tuple[int, int, int], *, name: str = "seq2point_cnn") -> Any:
    """Seed-003 seq2point CNN for input ``(frames, features, 1)``; output one value (normalized power)."""
    from nilmc.compiler.tfcompat import import_tf

    tf = import_tf("building the seq2point CNN")
    layers = tf.keras.layers
    inp = layers.Input(shape=tuple(input_shape), name="input")
    x = inp
    for i, (k, f) in enumerate(SEQ2POINT_CONVS):
        x = layers.Conv2D(f, (k, k), padding="same", activation="relu", name=f"conv{i + 1}")(x)
    x = layers.Flatten(name="flatten")(x)
    for i, units in enumerate(SEQ2POINT_DENSE):
        x = layers.Dense(units, activation="relu", name=f"dense{i + 1}")(x)
    out = layers.Dense(1, activation="linear", name="output")(x)
    return tf.keras.Model(inp, out, name=name)


def build_classic_seq2point(window: int = 599, *, name: str = "seq2point_classic") -> Any:
    """The classic low-frequency seq2point over ``(window, 1, 1)`` mains-power windows."""
    from nilmc.compiler.tfcompat import import_tf

    tf = import_tf("building the classic seq2point model")
    layers = tf.keras.layers
    inp = layers.Input(shape=(window, 1, 1), name="input")
    x = inp
    for i, (k, f) in enumerate(CLASSIC_CONVS):
        x = layers.Conv2D(f, (k, 1), padding="same", activation="relu", name=f"conv{i + 1}")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(CLASSIC_DENSE, activation="relu", name="dense1")(x)
    out = layers.Dense(1, activation="linear", name="output")(x)
    return tf.keras.Model(inp, out, name=name)


MODEL_BUILDERS = {"seq2point": build_seq2point_cnn, "classic": build_classic_seq2point}

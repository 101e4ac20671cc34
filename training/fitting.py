"""What the small reference models (CtRNN, cloud) share in training: the config's training fields and one
deterministic Keras fit (seeded, op determinism, early stopping on validation loss with the best weights restored)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import numpy as np


@dataclass(frozen=True)
class TrainConfig:
    """Training fields. Defaults: 12 epochs, batch 64, Adam 2e-3, early stopping patience 4, seed 0."""

    epochs: int = 12
    batch_size: int = 64
    learning_rate: float = 2e-3
    patience: int = 4
    seed: int = 0

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def fit_deterministic(tf: Any, build: Callable[[], Any], x: np.ndarray, y: np.ndarray, val: tuple[np.ndarray, np.ndarray] | None,
                      config: TrainConfig, *, loss: str) -> tuple[Any, Any]:
    """``build()`` after seeding, compiled with Adam(``config.learning_rate``) and ``loss``, fitted on ``(x, y)``
    (early stopping on ``val`` when given). Returns ``(model, history)``."""
    tf.keras.utils.set_random_seed(config.seed)
    tf.config.experimental.enable_op_determinism()
    model = build()
    model.compile(optimizer=tf.keras.optimizers.Adam(config.learning_rate), loss=loss)
    callbacks = [] if val is None else [tf.keras.callbacks.EarlyStopping(monitor="val_loss", patience=config.patience,
                                                                          restore_best_weights=True)]
    hist = model.fit(x, y, batch_size=config.batch_size, epochs=config.epochs, validation_data=val, shuffle=True,
                     callbacks=callbacks, verbose=0)
    return model, hist

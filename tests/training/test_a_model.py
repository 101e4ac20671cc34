"""The raw-feature (normalization A) training recipe: its learning-rate schedule, the exact fold of the input
scale, determinism, and the benchmark cache key that follows the recipe."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from nilmc.compiler.errors import BadInputError
from nilmc.training.seq2point import RAW_RECIPE_VERSION, TrainConfig, _learning_rate, _raw_input_scale, contract_for

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))


def test_raw_input_scale_is_one_over_rms():
    x = np.array([[3.0, 4.0]], np.float32)  # RMS sqrt(12.5)
    assert _raw_input_scale(x) == pytest.approx(1 / np.sqrt(12.5))
    assert _raw_input_scale(np.zeros((2, 2))) == 1.0


def test_benchmark_cache_key_follows_the_recipe(tmp_path):
    from vendor_models import A_EPOCHS, A_SEED, a_model

    # a cached file under the recipe's key is reused (no training); one under another key is not looked at
    stem = tmp_path / f"tp_kettle_A_seed{A_SEED}_e{A_EPOCHS}_r{RAW_RECIPE_VERSION}"
    for suffix in (".keras", ".onnx"):
        stem.with_suffix(suffix).write_bytes(b"")
    assert a_model(tmp_path, say=lambda s: None) == stem.with_suffix(".keras")
    assert f"_r{RAW_RECIPE_VERSION}" in stem.name


@pytest.mark.tf
def test_schedule_cosine_for_raw_features_constant_otherwise():
    from helpers import tiny_dataset

    from nilmc.compiler.tfcompat import import_tf

    tf = import_tf("test")
    ds = tiny_dataset(50)
    raw, z = contract_for(ds, "kettle", "A"), contract_for(ds, "kettle", "C")
    cfg = TrainConfig(epochs=4, batch_size=10)
    lr = _learning_rate(tf, cfg, raw, 50)
    assert isinstance(lr, tf.keras.optimizers.schedules.CosineDecay)
    assert float(lr(0)) == pytest.approx(1e-3) and float(lr(4 * 5)) == pytest.approx(0.0, abs=1e-9)
    assert _learning_rate(tf, cfg, z, 50) == 1e-3
    assert _learning_rate(tf, TrainConfig(lr_schedule="constant"), raw, 50) == 1e-3
    with pytest.raises(BadInputError, match="cosine"):
        _learning_rate(tf, TrainConfig(lr_schedule="warm"), raw, 50)


@pytest.mark.tf
@pytest.mark.slow
def test_a_training_is_deterministic_and_takes_raw_features():
    from helpers import tiny_dataset

    from nilmc.compiler.frontend import keras_to_onnx
    from nilmc.training import train_seq2point

    ds = tiny_dataset(120, scale=1000.0)
    cfg = TrainConfig(epochs=2, batch_size=32, seed=5)
    m1, c1 = train_seq2point(ds, appliance="kettle", normalization="A", config=cfg)
    m2, _ = train_seq2point(ds, appliance="kettle", normalization="A", config=cfg)
    for a, b in zip(m1.get_weights(), m2.get_weights()):
        assert np.array_equal(a, b)
    # the saved model takes raw features: the input scale is folded into the first layer, nothing in front of it
    x = ds.raw_x()[:16]
    assert c1.prepare(x) is x or np.array_equal(c1.prepare(x), x)
    onnx_ops = [n.op_type for n in keras_to_onnx(m1, c1).graph.graph.node]
    assert "Mul" not in onnx_ops[:2]
    y = m1.predict(x, verbose=0)
    assert np.all(np.isfinite(y))

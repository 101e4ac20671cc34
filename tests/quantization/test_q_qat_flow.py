"""`nilmc quantize --qat`: QAT from the PTQ ranges, best held-out epoch kept, ideal INT8 QDQ out."""
from __future__ import annotations

import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.tf]


@pytest.fixture(scope="module")
def keras_model(tmp_path_factory, tiny_ds):
    from nilmc.compiler.frontend import load_model
    from nilmc.training import TrainConfig, save_trained, train_seq2point

    km, contract = train_seq2point(tiny_ds, None, appliance="kettle", config=TrainConfig(epochs=3, seed=0))
    return load_model(save_trained(km, contract, tmp_path_factory.mktemp("qatflow") / "m")["keras"])


def test_qat_flow_keeps_the_best_held_out_epoch(keras_model, tiny_ds):
    from nilmc.quantization.qat_flow import qat_quantize

    result, info = qat_quantize(keras_model, tiny_ds, epochs=2, learning_rate=1e-5, seed=0)
    losses = info["val_loss"]
    assert len(losses) == 3 and 0 <= info["best_epoch"] <= 2
    assert losses[info["best_epoch"]] == min(losses)
    import onnxruntime as ort

    x = keras_model.contract.prepare(tiny_ds.raw_x()[:64])
    from nilmc.quantization.qdq import portable_weights

    out = ort.InferenceSession(portable_weights(result.qdq)[0].SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    ref = ort.InferenceSession(keras_model.serialize(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    assert np.all(np.isfinite(out)) and np.max(np.abs(out - ref)) < 0.25 * max(1.0, np.abs(ref).max())


def test_qat_needs_the_keras_source(tiny, tiny_ds):
    from nilmc.compiler.errors import BadInputError
    from nilmc.quantization.qat_flow import qat_quantize

    with pytest.raises(BadInputError, match="Keras source"):
        qat_quantize(tiny, tiny_ds)

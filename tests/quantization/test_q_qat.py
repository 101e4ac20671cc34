"""QAT (quantization/qat.py): fine-tuning starts from nilmc's PTQ ranges, stays finite and accurate,
is seeded, and the power-of-two variant keeps power-of-two grids. Small seq2point model (module fixture)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from nilmc.compiler.errors import BadInputError, QuantizationError

pytestmark = [pytest.mark.slow, pytest.mark.tf]


@pytest.fixture(scope="module")
def tp(tmp_path_factory, small_tp):
    pytest.importorskip("tensorflow_model_optimization")
    from nilmc.quantization.context import QuantContext
    from nilmc.quantization.traits import TFLITE_INT8

    sp, model, keras_model = small_tp["splits"], small_tp["model"], small_tp["keras"]
    ctx = QuantContext(model, sp["calib"])
    c = model.contract
    k = sp["calib"].appliance_index("kettle")
    return {"keras": keras_model, "model": model, "params": ctx.params(TFLITE_INT8, estimator="minmax"),
            "x": ctx.calib_x, "y": c.target.from_watts(sp["calib"].y[:, k]),
            "ex": c.prepare(sp["eval"].raw_x()), "ey": sp["eval"].y[:, k]}


def _eacc(tp, pred_units):
    from nilmc.compiler.metrics import nilm_metrics

    c = tp["model"].contract
    return nilm_metrics(tp["ey"], c.to_watts(np.asarray(pred_units).reshape(-1, 1)), on_threshold_w=c.on_threshold_w).eacc


def test_keras_view_pairs_every_layer_with_its_onnx_layer(tp):
    from nilmc.quantization.qat import keras_quant_from_params

    kq = keras_quant_from_params(tp["keras"], tp["params"])
    assert [kl.name for kl in kq.layers] == ["conv1", "conv2", "conv3", "conv4", "conv5", "dense1", "dense2", "output"]
    assert kq.input.name == "input" and kq.output.name == "output"
    assert kq.layers[0].weight.axis == 3 and kq.layers[-1].weight.axis == 1
    for a, b in zip(kq.layers, kq.layers[1:]):  # every Conv/Dense+ReLU output has one range, the next layer's input
        assert a.output == b.input or a.name == "conv5"  # conv5 -> Flatten shares its grid with dense1's input
    assert kq.layers[5].input == kq.layers[4].output


def test_keras_view_refuses_parameters_of_another_model(tp):
    from nilmc.quantization.qat import keras_quant_from_params
    from nilmc.training.models import build_seq2point_cnn

    other = build_seq2point_cnn((10, 9, 1))  # same architecture, other weights
    with pytest.raises(QuantizationError, match="different model|do not match"):
        keras_quant_from_params(other, tp["params"])


def test_qat_starts_from_nilmcs_ranges(tp):
    from nilmc.quantization.qat import fake_quant_range, keras_quant_from_params, qat_finetune, qat_ranges

    kq = keras_quant_from_params(tp["keras"], tp["params"])
    qat = qat_finetune(tp["keras"], tp["params"], tp["x"], tp["y"], epochs=0)
    got = qat_ranges(qat)
    np.testing.assert_allclose(got["input"], fake_quant_range(kq.input), rtol=1e-6)
    for kl in kq.layers:
        np.testing.assert_allclose(got[kl.name], fake_quant_range(kl.output), rtol=1e-6, atol=1e-9)


def test_qat_finetune_keeps_ranges_finite_and_accuracy(tp):
    from nilmc.quantization.qat import keras_quant_from_qat, qat_finetune, qat_ranges
    from nilmc.quantization.traits import TFLITE_INT8

    fp32 = _eacc(tp, tp["keras"].predict(tp["ex"], verbose=0))
    before = tp["keras"].get_layer("conv1").get_weights()[0].copy()
    qat = qat_finetune(tp["keras"], tp["params"], tp["x"], tp["y"], epochs=2, seed=0)
    assert all(math.isfinite(lo) and math.isfinite(hi) and lo <= 0 <= hi for lo, hi in qat_ranges(qat).values())
    assert _eacc(tp, qat.predict(tp["ex"], verbose=0)) > fp32 - 0.05  # fake-quant model: EACC does not collapse
    plain, kq = keras_quant_from_qat(qat, tp["keras"], TFLITE_INT8)
    assert kq.origin == "qat" and all(kl.bias is not None for kl in kq.layers)
    lo, hi = kq.output.representable()  # the head's range was widened to the labels before training
    assert lo <= float(tp["y"].min()) + 1e-6 and hi >= float(tp["y"].max()) * 0.99
    assert plain.get_layer("conv1").get_weights()[0].shape == before.shape
    # the original model is untouched
    np.testing.assert_array_equal(tp["keras"].get_layer("conv1").get_weights()[0], before)


def test_qat_is_deterministic_with_the_seed(tp):
    from nilmc.quantization.qat import qat_finetune

    a = qat_finetune(tp["keras"], tp["params"], tp["x"][:128], tp["y"][:128], epochs=1, seed=3)
    b = qat_finetune(tp["keras"], tp["params"], tp["x"][:128], tp["y"][:128], epochs=1, seed=3)
    for wa, wb in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_array_equal(wa, wb)


def test_power_of_two_qat_keeps_power_of_two_grids(tp):
    from nilmc.quantization.qat import keras_quant_from_qat, qat_finetune, qat_ranges
    from nilmc.quantization.traits import DPU_POT

    qat = qat_finetune(tp["keras"], tp["params"], tp["x"][:128], tp["y"][:128], epochs=1, power_of_two=True)
    for lo, hi in qat_ranges(qat).values():
        assert lo == pytest.approx(-hi * 128 / 127)  # symmetric int8 grid
        assert math.log2(hi / 127) == pytest.approx(round(math.log2(hi / 127)))
    _, kq = keras_quant_from_qat(qat, tp["keras"], DPU_POT, power_of_two=True)
    assert all(kl.output.fix_position is not None and kl.weight.fix_position is not None for kl in kq.layers)


def test_ranges_mapping_needs_every_layer(tp):
    from nilmc.quantization.qat import qat_finetune

    with pytest.raises(BadInputError, match="lack entries"):
        qat_finetune(tp["keras"], {"input": (-3.0, 3.0)}, tp["x"], tp["y"], epochs=0)


def test_widen_output_covers_peak_power(tp):
    from nilmc.quantization.qat import keras_quant_from_params, required_output_range, widen_output

    kq = keras_quant_from_params(tp["keras"], tp["params"])
    narrow = kq.with_output(type(kq.output)(**{**kq.output.__dict__, "scale": (kq.output.scale[0] / 8,)}))
    wide = widen_output(narrow, tp["model"].contract)
    lo, hi = wide.output.representable()
    need = required_output_range(tp["model"].contract)
    assert lo <= need[0] + 1e-6 and hi >= need[1] - 1e-6


def test_held_out_guard_keeps_the_best_epoch(tp):
    from nilmc.quantization.qat import qat_finetune

    hist: dict = {}
    qat = qat_finetune(tp["keras"], tp["params"], tp["x"][:128], tp["y"][:128], epochs=2,
                       validation=(tp["x"][200:], tp["y"][200:]), history=hist)
    assert len(hist["val_loss"]) == 3 and hist["best_epoch"] == int(np.argmin(hist["val_loss"]))
    got = float(qat.evaluate(tp["x"][200:], tp["y"][200:], verbose=0))
    assert got == pytest.approx(min(hist["val_loss"]), rel=1e-5)

"""bias_correction: per-channel mean error of each layer removed; corrected biases reach the QDQ graph;
the held-out check decides whether it pays."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from onnx import numpy_helper

from nilmc.quantization import _ort
from nilmc.quantization.bias_correction import bias_correction_pays, correct_bias, pre_activation
from nilmc.quantization.graph import analyze, constants
from nilmc.quantization.params import QuantParams, derive_params, quantize_constant
from nilmc.quantization.qdq import build_qdq_model
from nilmc.quantization.selection import output_error
from nilmc.quantization.statistics import collect_statistics
from nilmc.quantization.traits import EIQ_PER_TENSOR, GENERIC_INT8


@pytest.fixture(scope="module")
def skewed(request):
    """The test seq2point with 8 dense1 channels of small equal weights: per-tensor INT8 rounds them all to 0,
    a systematic (not zero-mean) error that only bias correction can take out."""
    from conftest import build_seq2point, windows

    m = build_seq2point()
    for init in m.graph.initializer:
        if init.name == "dense1/W":
            w = numpy_helper.to_array(init).copy()
            step = np.abs(w).max() / 127.5
            w[:, :8] = 0.45 * step  # rounds to code 0 under one per-tensor scale
            init.CopyFrom(numpy_helper.from_array(w, init.name))
    x = windows(512, seed=1)
    return m, x, collect_statistics(m, x)


def test_correction_removes_channel_mean_error(skewed, make_windows) -> None:
    m, x, stats = skewed
    params = derive_params(m, stats, EIQ_PER_TENSOR)
    res = correct_bias(m, params, x)
    assert res.layers == ["conv1", "conv2", "dense1", "dense2"] and set(res.params.adjusted) == {"conv1/b", "conv2/b", "dense1/b", "dense2/b"}
    assert np.abs(res.shifts["dense1/b"][:8]).mean() > 10 * np.abs(res.shifts["dense1/b"][8:]).mean()  # the starved channels
    # measured on the same windows: the per-channel mean error of dense1's pre-activation is gone
    g = analyze(m)
    layer = g.layer_by_name("dense1")
    fp = _ort.run(m, x, [pre_activation(layer)])[pre_activation(layer)].mean(axis=0)
    before = _ort.run(build_qdq_model(m, params), x, [pre_activation(layer)])[pre_activation(layer)].mean(axis=0)
    after = _ort.run(build_qdq_model(m, res.params), x, [pre_activation(layer)])[pre_activation(layer)].mean(axis=0)
    assert np.abs(after - fp).max() < 0.05 * np.abs(before - fp).max()
    # and on held-out windows the model output improves a lot
    xe = make_windows(256, seed=2)
    ref = _ort.output(m, xe)
    assert output_error(m, res.params, xe, ref) < 0.5 * output_error(m, params, xe, ref)
    check = bias_correction_pays(m, params, x)
    assert check.pays and check.heldout_mse_with < 0.5 * check.heldout_mse_without


def test_corrected_bias_codes_in_graph(skewed) -> None:
    m, x, stats = skewed
    params = correct_bias(m, derive_params(m, stats, GENERIC_INT8), x).params
    new_b = params.adjusted["dense1/b"]
    assert not np.allclose(new_b, constants(m)["dense1/b"])
    tq = params.tensors["dense1/b"]
    assert np.array_equal(tq.scales(), np.float32(params["r2"].scale[0]) * params.tensors["dense1/W"].scales())
    qdq = build_qdq_model(m, params)
    inits = {t.name: numpy_helper.to_array(t) for t in qdq.graph.initializer}
    assert np.array_equal(inits["dense1/b_quantized"], quantize_constant(tq, new_b, params.traits))
    # JSON round trip keeps the corrected biases and gives the same graph
    back = QuantParams.from_json(params.to_json())
    assert np.array_equal(back.adjusted["dense1/b"], new_b)
    assert build_qdq_model(m, back).SerializeToString() == qdq.SerializeToString()


def test_float_layers_are_skipped_and_keep_corrected_values(skewed) -> None:
    m, x, stats = skewed
    params = dataclasses.replace(derive_params(m, stats, GENERIC_INT8), keep_float=("dense2",))
    res = correct_bias(m, params, x)
    assert "dense2" not in res.layers and "dense2/b" not in res.params.adjusted
    # a float layer with an adjusted bias gets the adjusted float value in the graph
    adjusted = dataclasses.replace(res.params, adjusted={**res.params.adjusted, "dense2/b": np.array([0.5], np.float32)})
    inits = {t.name: numpy_helper.to_array(t) for t in build_qdq_model(m, adjusted).graph.initializer}
    assert inits["dense2/b"].tolist() == [0.5] and "dense2/b_quantized" not in inits


def test_no_gain_is_reported_honestly(s2p_model, s2p_stats) -> None:
    """On a plain model whose INT8 error is already ~zero-mean the verdict comes from held-out data, both ways possible."""
    from conftest import windows

    params = derive_params(s2p_model, s2p_stats, GENERIC_INT8)
    check = bias_correction_pays(s2p_model, params, windows(512, seed=1))
    assert check.pays == (check.heldout_mse_with < check.heldout_mse_without)
    assert check.to_json()["folds"] == 2

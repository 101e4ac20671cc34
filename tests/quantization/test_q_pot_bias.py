"""The refinement's bias correction modes: off on request (the model's biases, rounded), decided on held-out windows."""
from __future__ import annotations

import dataclasses

import numpy as np

from nilmc.backends.dpu import DPUBackend
from nilmc.backends.dpu.ir import from_onnx
from nilmc.backends.dpu.quant import DpuQuantOptions, calibrate
from nilmc.bitstreams import load_target
from nilmc.quantization.context import QuantContext


def _calibrate(tiny, tiny_ds, **kw):
    ctx = QuantContext(tiny, tiny_ds)
    graph = from_onnx(tiny.graph)
    opts = dataclasses.replace(DpuQuantOptions(), **kw)
    return graph, calibrate(tiny.graph, graph, {tiny.input_name: ctx.calib_x}, load_target("b2304").limits, options=opts)


def test_without_bias_correction_the_biases_are_the_models(tiny, tiny_ds, tmp_path) -> None:
    art = DPUBackend().lower(tiny, tmp_path, precision="b2304",
                             options={"quant": QuantContext(tiny, tiny_ds), "dpu_quant": DpuQuantOptions(bias_correction=False)})
    assert art.info["calibration"]["bias_correction"] == "False"
    graph, params = _calibrate(tiny, tiny_ds, bias_correction=False)
    for op in graph.ops:  # the model's own biases, only rounded to their 8-bit grid
        if op.weighted and op.bias is not None:
            wq = params.weights[op.name]
            step = 2.0 ** -wq.fb
            assert np.all(np.abs(wq.bias_float() - np.clip(op.bias, -128 * step, 127 * step)) <= step / 2 + 1e-12), op.name


def test_holdout_bias_correction_is_decided_and_noted_per_layer(tiny, tiny_ds) -> None:
    graph, params = _calibrate(tiny, tiny_ds, bias_correction="holdout")
    weighted = [op for op in graph.ops if op.weighted and op.bias is not None]
    assert weighted
    for op in weighted:
        notes = " ".join(params.notes.get(op.name, []))
        assert "held-out error" in notes, op.name
    # deterministic: the same windows give the same decisions and codes
    _, again = _calibrate(tiny, tiny_ds, bias_correction="holdout")
    assert again.fix == params.fix and again.notes == params.notes
    for name, wq in params.weights.items():
        assert np.array_equal(wq.weight_q, again.weights[name].weight_q)
        assert (wq.bias_q is None and again.weights[name].bias_q is None) or np.array_equal(wq.bias_q, again.weights[name].bias_q)

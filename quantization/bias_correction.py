"""Empirical bias correction: remove the per-channel mean error quantization adds to each layer.

Quantizing weights and inputs shifts the *mean* of a layer's pre-activation output per
output channel (rounding is not zero-mean once it passes a ReLU, clipping is one-sided).
For each layer in topological order, :func:`correct_bias` runs the FP32 graph and the QDQ
graph (with the corrections found so far) over the calibration windows, takes the mean of
the pre-activation output per channel in both, and subtracts the difference from the float
bias: ``b' = b - (E[y_q] - E[y_fp])``. Layers are corrected sequentially so each correction
sees the ones before it (as NNCF's and AIMET's empirical bias correction do).

The corrected biases go into ``QuantParams.adjusted`` (the model's graph is not touched,
so its digest and every other parameter stay valid) and their quantization parameters
are re-derived (int32 at ``s_in * s_w``, or the DPU's own 8-bit scale). Layers without a
bias, and layers kept at float (``params.keep_float``), are skipped.

Whether it pays is measured, not assumed: :func:`bias_correction_pays` fits on all
calibration blocks but one and scores the model-output error on the left-out block.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, cast

import numpy as np
import onnx

from nilmc.quantization import _ort
from nilmc.quantization.graph import Layer, QuantGraph, analyze
from nilmc.quantization.params import QuantParams, bias_quant
from nilmc.quantization.qdq import build_qdq_model, float_sets


def _graph(onnx_model: onnx.ModelProto) -> QuantGraph:
    m = onnx.ModelProto()
    m.CopyFrom(onnx_model)
    return analyze(m)


def pre_activation(layer: Layer) -> str:
    """The layer's output before its activation (bias included) in the FP32 graph."""
    return layer.internal[-1] if layer.activation else layer.output


def _qdq_name(layer: Layer, g: QuantGraph) -> str:
    """The same tensor in the QDQ graph: a graph output's producer writes ``<name>_float`` there."""
    name = pre_activation(layer)
    return name + "_float" if name in g.outputs else name


def _channel_means(values: np.ndarray, layer: Layer) -> np.ndarray:
    """Mean per output channel: axis 1 for Conv (NCHW), the last axis for dense layers."""
    v = np.asarray(values, np.float64)
    axis = 1 if layer.kind == "conv" else v.ndim - 1
    means: np.ndarray = v.mean(axis=tuple(i for i in range(v.ndim) if i != axis))
    return means


@dataclass
class BiasCorrectionResult:
    """Outcome of :func:`correct_bias`."""

    params: QuantParams
    shifts: dict[str, np.ndarray] = field(default_factory=dict)  # bias name -> correction subtracted (per channel)
    layers: list[str] = field(default_factory=list)  # corrected layers
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"layers": list(self.layers), "seconds": round(self.seconds, 3),
                "max_abs_shift": {n: float(np.max(np.abs(s))) for n, s in self.shifts.items()}}


def correct_bias(onnx_model: onnx.ModelProto, params: QuantParams, x: np.ndarray, *, layers: Sequence[str] | None = None,
                 max_windows: int | None = 512) -> BiasCorrectionResult:
    """Sequential per-channel bias correction on windows ``x`` (as the graph takes them).

    ``layers`` (default: every layer with a bias) limits which layers are corrected; at most
    ``max_windows`` (default 512) evenly spaced windows are used. Returns the corrected
    parameters (``params.adjusted`` holds the new float biases) and the shifts applied.
    """
    t0 = time.perf_counter()
    g = _graph(onnx_model)
    x = _ort.subsample(x, max_windows)
    _, float_consts = float_sets(g, params.keep_float)
    todo = [l for l in g.layers if l.bias and l.bias not in float_consts and (layers is None or l.name in layers)]
    if not todo:
        return BiasCorrectionResult(params, seconds=time.perf_counter() - t0)
    fp = _ort.run(onnx_model, x, [pre_activation(l) for l in todo])
    out = replace(params, adjusted=dict(params.adjusted))
    result = BiasCorrectionResult(out)
    for layer in todo:
        name = _qdq_name(layer, g)
        q = _ort.run(build_qdq_model(onnx_model, out), x, [name])[name]
        delta = _channel_means(q, layer) - _channel_means(fp[pre_activation(layer)], layer)
        out = _corrected(out, layer, g, delta)
        result.shifts[cast(str, layer.bias)] = delta  # todo holds layers with a bias
        result.layers.append(layer.name)
    result.params = out
    result.seconds = time.perf_counter() - t0
    return result


def _corrected(params: QuantParams, layer: Layer, g: QuantGraph, delta: np.ndarray) -> QuantParams:
    bias = cast(str, layer.bias)  # called for layers with a bias only
    b = np.asarray(params.constant(bias, g.constants), np.float64)
    if b.size != delta.size and b.size != 1:
        return params  # a bias that is not per output channel: leave it
    new = (b.ravel() - (delta if b.size == delta.size else delta.mean())).reshape(b.shape).astype(np.float32)
    adjusted = {**params.adjusted, bias: new}
    out = replace(params, adjusted=adjusted)
    tq = bias_quant(bias, new, params[g.root(layer.input)], params.tensors[layer.weight], params.traits)
    return out.with_tensor(tq)


@dataclass
class BiasCorrectionCheck:
    """Held-out verdict of :func:`bias_correction_pays`."""

    pays: bool
    heldout_mse_without: float
    heldout_mse_with: float
    folds: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {"pays": self.pays, "heldout_mse_without": self.heldout_mse_without, "heldout_mse_with": self.heldout_mse_with,
                "folds": self.folds, "seconds": round(self.seconds, 3)}


def bias_correction_pays(onnx_model: onnx.ModelProto, params: QuantParams, x: np.ndarray, *, folds: int = 2,
                         max_windows: int | None = 1024, min_gain: float = 0.0) -> BiasCorrectionCheck:
    """Fit corrections on all contiguous blocks of ``x`` but one, score output MSE on the left-out one.

    It pays when the summed held-out error with correction is below ``(1 - min_gain)``
    (default 0) times the error without. ``folds`` default 2; at most ``max_windows``
    (default 1024) windows of ``x`` are used.
    """
    from nilmc.quantization.selection import fold_blocks, output_error

    t0 = time.perf_counter()
    x = _ort.subsample(x, max_windows)
    without = with_ = 0.0
    for held in fold_blocks(len(x), folds):
        train = np.setdiff1d(np.arange(len(x)), held)
        ref = _ort.output(onnx_model, x[held])
        fitted = correct_bias(onnx_model, params, x[train], max_windows=None).params
        without += output_error(onnx_model, params, x[held], ref)
        with_ += output_error(onnx_model, fitted, x[held], ref)
    return BiasCorrectionCheck(with_ < without * (1.0 - min_gain), without, with_, folds, time.perf_counter() - t0)

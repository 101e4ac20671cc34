"""Power-of-two QAT for the DPU (``dpu:b2304_qat`` / ``dpu:b4096_qat``).

Starts from the DPU PTQ result (:func:`nilmc.backends.dpu.quant.calibrate`) and fine-tunes
the tf_keras source with :func:`nilmc.quantization.qat.qat_finetune` (``power_of_two=True``):

1. every Conv2D / Dense layer of the Keras model is paired, in order, with a weighted op of
   the DPU graph and the pairing is checked numerically (kernel and bias must equal the
   graph's, in the graph's OHWI / ``[in, out]`` layout);
2. the activation fake-quants start at the PTQ fix points (input, every layer's fused
   output) and stay there; weight fix points follow the weights (no-clipping power of two);
3. training data: the calibration windows, targets the FP32 model's own outputs
   (distillation), the last ``qat_holdout`` held out; the epoch with the lowest held-out
   MSE is kept (epoch 0 = the PTQ start: then the PTQ lowering is deployed unchanged);
4. the fine-tuned float weights replace the graph's, and the DPU calibration runs again
   with the QAT fix points pinned (``DpuQuantOptions.fixed`` / ``fixed_weights``, read from
   the trained fake-quant ranges as exact powers of two); only biases (8-bit), shifts and
   the bounds repair are chosen there, aimed at the original FP32 tensors.

With a CPU/DPU partition (:mod:`nilmc.backends.dpu.partition`) only the DPU part is fine-tuned: the Keras
sub-model from the tensor the DPU reads (the output of the CPU layers, checked against the CPU pre stage on the
calibration windows) to the output, trained on the CPU pre stage's FP32 outputs; the CPU layers stay as they are.

Options (``options`` of ``lower``, the same names as ``tflite:qat_int8``): ``qat_epochs`` (3),
``qat_learning_rate`` (1e-5), ``qat_batch_size`` (64), ``qat_seed`` (0), ``qat_holdout`` (0.2).
Deterministic for a seed on one machine / TensorFlow build (op determinism on).
"""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from nilmc.backends.dpu.ir import DpuGraph, DpuOp
from nilmc.backends.dpu.quant import DpuParams, DpuQuantOptions, _tq, calibrate, fp32_outputs
from nilmc.compiler.errors import BadInputError, DataError, QuantizationError
from nilmc.quantization.traits import DPU_POT

if TYPE_CHECKING:
    from nilmc.compiler.model import Model


@dataclass(frozen=True)
class DpuQatOptions:
    """QAT knobs; defaults: 3 epochs, Adam 1e-5 (1e-4 overshoots on the shipped model), batch 64, seed 0, last 20 % of the windows held out."""

    epochs: int = 3
    learning_rate: float = 1e-5
    batch_size: int = 64
    seed: int = 0
    holdout: float = 0.2

    @classmethod
    def parse(cls, o: Mapping[str, Any]) -> DpuQatOptions:
        out = cls(int(o.get("qat_epochs", 3)), float(o.get("qat_learning_rate", 1e-5)), int(o.get("qat_batch_size", 64)),
                  int(o.get("qat_seed", 0)), float(o.get("qat_holdout", 0.2)))
        if not 0.0 < out.holdout < 1.0:
            raise BadInputError(f"qat_holdout must be in (0, 1), got {out.holdout}", "e.g. 0.2 holds out the last fifth of the windows")
        return out


def _ir_kernel(layer_kind: str, kernel: np.ndarray) -> np.ndarray:
    """Keras kernel in the DPU graph's layout: Conv2D HWIO -> OHWI, Dense ``[in, out]`` unchanged."""
    return np.ascontiguousarray(kernel.transpose(3, 0, 1, 2)) if layer_kind == "conv" else kernel


def pair_layers(keras_model: Any, graph: DpuGraph) -> list[tuple[Any, DpuOp]]:
    """``(Keras layer, DPU op)`` for every Conv2D / Dense layer, checked on the weights."""
    from nilmc.compiler.tfcompat import kernel_and_bias
    from nilmc.quantization.qat import layer_kind, weighted_layers

    layers = weighted_layers(keras_model)
    ops = [op for op in graph.ops if op.weighted]
    if len(layers) != len(ops):
        raise QuantizationError(f"the Keras model has {len(layers)} Conv2D/Dense layers but the DPU graph {len(ops)} weighted ops",
                                "load the model from the .keras file its ONNX form was converted from")
    for layer, op in zip(layers, ops):
        kernel, bias = kernel_and_bias(layer)
        w = _ir_kernel(layer_kind(layer), kernel)
        same_bias = (bias is None) == (op.bias is None) and (bias is None or np.allclose(bias, op.bias, rtol=1e-5, atol=1e-7))
        if w.shape != np.shape(op.weight) or not np.allclose(w, op.weight, rtol=1e-5, atol=1e-7) or not same_bias:
            raise QuantizationError(f"Keras layer {layer.name!r} does not match DPU op {op.name!r} (weights differ)",
                                    "the Keras source and the ONNX model are different models; convert the .keras file again")
    return list(zip(layers, ops))


def _keras_quant(pairs: list[tuple[Any, DpuOp]], graph: DpuGraph, ptq: DpuParams) -> Any:
    """The PTQ fix points as QAT's starting :class:`KerasQuant` (exact power-of-two grids)."""
    from nilmc.quantization.qat import KerasLayerQuant, KerasQuant, layer_kind

    fix = ptq.fix
    tq = lambda name, fp, role="activation": _tq_role(name, role, fp)  # noqa: E731
    rows = [KerasLayerQuant(layer.name, layer_kind(layer), tq(op.inputs[0], fix[op.inputs[0]]), tq(op.output, fix[op.output]),
                            tq(op.weight_name or op.name, ptq.weights[op.name].fw, "weight"), None) for layer, op in pairs]
    first = graph.inputs[0]
    return KerasQuant(DPU_POT, tq(first, fix[first]), rows[-1].output, tuple(rows), "ptq")


def _tq_role(name: str, role: str, fp: int) -> Any:
    from nilmc.quantization.params import TensorQuant

    return _tq(TensorQuant, name, role, int(fp))


def pot_fix(lo: float, hi: float) -> int:
    """Fix point of a power-of-two fake-quant range, as the QAT quantizer computes its scale."""
    amax = max(float(hi), -float(lo) * 127.0 / 128.0, 1e-30)
    return -math.ceil(math.log2(amax / 127.0) - 1e-6)


def _data(model: Model, graph: DpuGraph, ctx: Any, holdout: float) -> dict[str, Any]:
    x = np.asarray(ctx.calib_x, np.float32)
    n_val = int(round(len(x) * holdout))
    if n_val < 1 or len(x) - n_val < 1:
        raise DataError(f"{len(x)} calibration windows cannot be split for QAT with qat_holdout={holdout}",
                        "pass a calibration set with more windows")
    y = fp32_outputs(model.graph, x).astype(np.float32).reshape(len(x), -1)
    split = len(x) - n_val
    return {"x": x[:split], "y": y[:split], "val": (x[split:], y[split:])}


def dpu_submodel(keras_model: Any, graph: DpuGraph, pre: Any, x: np.ndarray) -> Any:
    """The Keras model from the tensor the DPU subgraph reads to the output (the CPU layers left out).

    The DPU's first weighted layers are the Keras model's last ones; the cut is the output of the last CPU
    weighted layer (after a separate activation layer, if one follows it), checked against the CPU pre stage
    (``pre``, FP32 onnxruntime) on windows ``x``."""
    from nilmc.compiler.tfcompat import import_tf_keras
    from nilmc.quantization.qat import weighted_layers

    keras = import_tf_keras("QAT of the DPU part")
    layers = weighted_layers(keras_model)
    n_cpu = len(layers) - sum(1 for op in graph.ops if op.weighted)
    if n_cpu < 1 or len(graph.inputs) != 1:
        raise QuantizationError(f"the DPU part starts after {n_cpu} Keras layer(s) with {len(graph.inputs)} input(s)",
                                "use --option dpu.cpu_layers=none for QAT of this model")
    last = layers[n_cpu - 1]
    tensor = last.output
    order = list(keras_model.layers)
    nxt = order[order.index(last) + 1] if order.index(last) + 1 < len(order) else None
    if nxt is not None and type(nxt).__name__ in ("ReLU", "Activation", "LeakyReLU") and nxt.input is tensor:
        tensor = nxt.output
    head = keras.Model(keras_model.input, tensor)
    want = next(iter(pre.run({pre.inputs[0]: x[:64]}).values()))
    got = np.asarray(head(np.asarray(x[:64], np.float32)), np.float32).reshape(want.shape)
    if not np.allclose(got, want, rtol=1e-4, atol=1e-4):
        raise QuantizationError("the Keras model's CPU layers do not compute the CPU pre stage's output "
                                f"(max difference {float(np.max(np.abs(got - want))):.3g})",
                                "convert the .keras file again, or use --option dpu.cpu_layers=none")
    return keras.Model(tensor, keras_model.output)


def qat_lower(model: Model, graph: DpuGraph, ptq: DpuParams, ctx: Any, limits: Mapping[str, Any],
              qopts: DpuQuantOptions, options: Mapping[str, Any], *, shared: Mapping[str, Any] | None = None,
              pre: Any = None) -> tuple[DpuGraph, DpuParams, dict[str, Any]]:
    """``(graph, params, info)`` after power-of-two QAT; ``graph``/``ptq`` back unchanged when epoch 0 wins.
    ``shared`` (default none): the shared ranges / start fix positions the PTQ refinement used; ``pre`` (default
    none): the CPU pre stage (:class:`~nilmc.backends.dpu.partition.CpuStage`) when the DPU reads its output."""
    from nilmc.backends.tflite_backend import load_keras
    from nilmc.compiler.tfcompat import kernel_and_bias
    from nilmc.quantization.qat import layer_kind, qat_finetune, qat_ranges, strip_qat

    opts = DpuQatOptions.parse(options)
    keras_model = load_keras(model)
    data = _data(model, graph, ctx, opts.holdout)
    if pre is not None and graph.inputs[0] != model.input_name:
        keras_model = dpu_submodel(keras_model, graph, pre, np.asarray(ctx.calib_x, np.float32))
        dpu_x = {k: next(iter(pre.run({pre.inputs[0]: v}).values())) for k, v in (("x", data["x"]), ("val", data["val"][0]))}
        data = {"x": dpu_x["x"], "y": data["y"], "val": (dpu_x["val"], data["val"][1])}
    pairs = pair_layers(keras_model, graph)
    t0 = time.perf_counter()
    history: dict[str, Any] = {}
    qat = qat_finetune(keras_model, _keras_quant(pairs, graph, ptq), data["x"], data["y"], epochs=opts.epochs,
                       learning_rate=opts.learning_rate, seed=opts.seed, power_of_two=True, batch_size=opts.batch_size,
                       traits=DPU_POT, validation=data["val"], history=history)
    info: dict[str, Any] = {
        "train_set": "calibration", "targets": "teacher (FP32 outputs)", "windows": int(len(data["x"])),
        "held_out_windows": int(len(data["val"][0])), "epochs": opts.epochs, "learning_rate": opts.learning_rate,
        "batch_size": opts.batch_size, "seed": opts.seed, "seconds": round(time.perf_counter() - t0, 2),
        "held_out_mse_per_epoch": [round(v, 6) for v in history.get("val_loss", [])], "kept_epoch": history.get("best_epoch"),
        "trained_part": f"DPU part from {graph.inputs[0]!r} (the CPU layers stay FP32)" if graph.inputs[0] != model.input_name else "whole model",
        "note": "power-of-two fake quant from the DPU PTQ fix points (activations frozen, weights follow the weights); "
                "the epoch with the lowest held-out MSE is kept, 0 = the PTQ starting point"}
    if history.get("best_epoch") == 0:
        info["deployed"] = "PTQ parameters: no fine-tuned epoch lowered the held-out MSE"
        return graph, ptq, info
    plain = strip_qat(qat, keras_model)
    ranges = qat_ranges(qat)
    tuned = copy.deepcopy(graph)
    fixed = {graph.inputs[0]: pot_fix(*ranges["input"])}
    fixed_w: dict[str, int] = {}
    tuned_layers = {l.name: l for l in plain.layers}
    for layer, op in pairs:
        kernel, bias = kernel_and_bias(tuned_layers[layer.name])
        t = tuned.op(op.name)
        t.weight = _ir_kernel(layer_kind(layer), kernel).astype(np.float32)
        t.bias = None if bias is None else bias.astype(np.float32)
        fixed[op.output] = pot_fix(*ranges[layer.name])
        fixed_w[op.name] = pot_fix(0.0, float(np.max(np.abs(kernel))))
    params = calibrate(model.graph, tuned, {model.input_name: ctx.calib_x}, limits,
                       options=replace(qopts, fixed=fixed, fixed_weights=fixed_w), **dict(shared or {}))
    moved = {k: v for k, v in fixed.items() if params.fix.get(k) != v}
    params.method.update({"qat": True, "fix_points_from": "QAT fake-quant ranges (activations) and fine-tuned weights"})
    info.update({"deployed": f"fine-tuned weights of epoch {history.get('best_epoch')}, QAT fix points",
                 "fix_points": {k: int(v) for k, v in fixed.items()}, "weight_fix_points": fixed_w,
                 "fix_points_moved_by_bounds": moved})
    return tuned, params, info

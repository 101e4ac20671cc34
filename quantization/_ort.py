"""Small onnxruntime helpers shared by the accuracy techniques (selection, bias correction,
headroom, mixed precision, report): run a graph over windows in batches, expose extra tensors,
measure output error against FP32. Private: the public entry points are in those modules."""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

DEFAULT_BATCH = 512


def session(model: onnx.ModelProto) -> Any:
    """A CPU onnxruntime session (default graph optimizations, quiet logs) of ``model`` with its symmetric int8 weights
    stored as uint8 (:func:`~nilmc.quantization.qdq.portable_weights`: the same values, and no int16 saturation in the
    fused kernels of an x86 CPU without VNNI), so a measurement means the same on every host."""
    import onnxruntime as ort

    from nilmc.quantization.qdq import portable_weights

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # the default (all optimizations): QDQ pairs fuse into integer kernels, as the onnxruntime:int8 runner executes them
    return ort.InferenceSession(portable_weights(model)[0].SerializeToString(), opts, providers=["CPUExecutionProvider"])


def with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose graph also outputs the float tensors ``names``."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    present = {o.name for o in m.graph.output}
    for name in names:
        if name not in present:
            m.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
            present.add(name)
    return m


def input_name(model: onnx.ModelProto) -> str:
    inits = {t.name for t in model.graph.initializer}
    name: str = next(i.name for i in model.graph.input if i.name not in inits)
    return name


def run(model: onnx.ModelProto, x: np.ndarray, outputs: Sequence[str] | None = None, *,
        batch_size: int = DEFAULT_BATCH) -> dict[str, np.ndarray]:
    """Run ``model`` over ``x`` in batches; return ``outputs`` (default: the graph outputs), concatenated."""
    names = list(outputs) if outputs is not None else [o.name for o in model.graph.output]
    extra = [n for n in names if n not in {o.name for o in model.graph.output}]
    sess = session(with_outputs(model, extra) if extra else model)
    feed = input_name(model)
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    x = np.asarray(x, np.float32)
    for start in range(0, len(x), batch_size):
        outs = sess.run(names, {feed: x[start:start + batch_size]})
        for n, v in zip(names, outs):
            parts[n].append(np.asarray(v))
    return {n: np.concatenate(v, axis=0) for n, v in parts.items()}


# ``step(L) -> index`` of the prediction in a per-window output of L values (``ModelContract.output_index``), for a
# sequence model whose contract selects one step (--output midpoint|last|index:K): what the calibration SQNR floor and
# every other output-fidelity score must measure, since the artifact is judged on that step alone. None: the whole output.
OutputStep = Callable[[int], int]


def output(model: onnx.ModelProto, x: np.ndarray, *, batch_size: int = DEFAULT_BATCH, step: OutputStep | None = None) -> np.ndarray:
    """The first graph output over ``x``, as float64 ``(N, ...)``; with ``step``, the selected step ``(N,)`` of a
    sequence output (:func:`select_step`)."""
    name = model.graph.output[0].name
    y = run(model, x, [name], batch_size=batch_size)[name].astype(np.float64)
    return y if step is None else select_step(y, step)


def select_step(y: np.ndarray, step: OutputStep) -> np.ndarray:
    """The step ``step(L)`` of each window's output of L values, ``(N,)``; an output of one value per window as it is."""
    flat = np.asarray(y).reshape(len(y), -1)
    return flat if flat.shape[1] == 1 else flat[:, step(flat.shape[1])]


def output_step(contract: Any) -> OutputStep | None:
    """The output step a contract selects (its ``output_index``), or None when it selects none (or there is none)."""
    select = None if contract is None else getattr(contract, "output_select", None)
    if not select:
        return None
    step: OutputStep = contract.output_index
    return step


def mse(reference: np.ndarray, candidate: np.ndarray) -> float:
    return float(np.mean((np.asarray(candidate, np.float64) - np.asarray(reference, np.float64)) ** 2))


def sqnr_db(reference: np.ndarray, candidate: np.ndarray) -> float:
    """``10 log10(sum ref^2 / sum (ref - cand)^2)``; +inf when identical."""
    ref = np.asarray(reference, np.float64)
    noise = float(np.sum((np.asarray(candidate, np.float64) - ref) ** 2))
    signal = float(np.sum(ref ** 2))
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def subsample(x: np.ndarray, max_windows: int | None) -> np.ndarray:
    """At most ``max_windows`` windows, evenly spaced (deterministic); all when None."""
    if max_windows is None or len(x) <= max_windows:
        return x
    idx = np.linspace(0, len(x) - 1, max_windows).round().astype(int)
    picked: np.ndarray = x[idx]
    return picked

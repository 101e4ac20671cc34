"""Calibrate once: statistics for every activation tensor in one pass of the FP32 model.

:func:`collect_statistics` exposes every float tensor of the graph (the inputs
and every node output) as an extra graph output, runs the FP32 model once over
the calibration windows with onnxruntime in batches, and keeps per tensor: the
count, min, max, mean, std and a histogram. Weights (initializers and
``Constant`` values) are read directly from the graph, no run needed.

The histogram grows with the data instead of needing a first pass for the
range (:class:`GrowingHistogram`): bins have a power-of-two width and edges
anchored at 0 (bin ``k`` covers ``[k*w, (k+1)*w)``), so when new data fall
outside the window the width doubles by merging neighbouring bins exactly —
no count is ever interpolated — and the window slides to cover old and new
data. The observed span ``[min, max]`` is always covered by between ``bins/2``
and ``bins`` bins. For a given batch order the result is deterministic.

For the graph input, per-feature min/max along its feature axis (the last
axis of size > 1: axis 2 for ``(N, 10, F, 1)`` windows) are kept as well, for
the overflow checks on per-tensor input quantization.

:class:`Statistics` saves to ``.npz`` (``allow_pickle=False``) or JSON.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import onnx
from onnx import helper

from nilmc.compiler.errors import DataError, QuantizationError, ShapeMismatchError
from nilmc.quantization.graph import constants, float_tensors

STATS_VERSION = 1


# --------------------------------------------------------------------------- histogram
@dataclass(frozen=True)
class Histogram:
    """Counts over bins ``[(first + i) * width, (first + i + 1) * width)``, ``i = 0 .. len(counts)-1``."""

    counts: np.ndarray  # int64
    width: float
    first: int

    @property
    def edges(self) -> np.ndarray:
        return (self.first + np.arange(len(self.counts) + 1)) * self.width

    @property
    def centers(self) -> np.ndarray:
        return (self.first + np.arange(len(self.counts)) + 0.5) * self.width

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def coarsened(self, max_bins: int) -> Histogram:
        """Merge neighbouring bins (exactly, widths doubling) until at most ``max_bins`` remain."""
        h = self
        while len(h.counts) > max_bins:
            k = h.first + np.arange(len(h.counts))
            first = h.first // 2
            counts = np.bincount(k // 2 - first, weights=h.counts).astype(np.int64)
            h = Histogram(counts, h.width * 2.0, first)
        return h

    def folded(self) -> Histogram:
        """Histogram of ``|x|``: bin ``k < 0`` moves to ``-k-1`` (exact except for values lying on a bin edge)."""
        k = self.first + np.arange(len(self.counts))
        kabs = np.where(k < 0, -k - 1, k)
        counts = np.bincount(kabs, weights=self.counts, minlength=int(kabs.max()) + 1).astype(np.int64)
        return Histogram(counts, self.width, 0)


class GrowingHistogram:
    """Histogram builder with power-of-two bin width that grows by exact merging (see module docstring)."""

    def __init__(self, bins: int) -> None:
        if bins < 8 or bins % 2:
            raise QuantizationError(f"histogram needs an even number of at least 8 bins, got {bins}", "use bins=2048")
        self.bins = bins
        self.counts = np.zeros(bins, np.int64)
        self.width: float | None = None
        self.first = 0

    def add(self, values: np.ndarray) -> None:
        v = np.asarray(values, np.float64).ravel()
        if v.size == 0:
            return
        lo, hi = float(v.min()), float(v.max())
        if self.width is None:
            self.width = _initial_width(lo, hi, self.bins)
            self.first = math.floor(lo / self.width)
        a, b = self._span(lo, hi)
        while b - a + 1 > self.bins:
            self._merge()
            a, b = self._span(lo, hi)
        if a < self.first or b >= self.first + self.bins:
            self._slide(a)
        idx = np.floor(v / self.width).astype(np.int64) - self.first
        self.counts += np.bincount(idx, minlength=self.bins)

    def _span(self, lo: float, hi: float) -> tuple[int, int]:
        width = cast(float, self.width)  # set by the first add()
        a, b = math.floor(lo / width), math.floor(hi / width)
        occ = np.flatnonzero(self.counts)
        if occ.size:
            a, b = min(a, self.first + int(occ[0])), max(b, self.first + int(occ[-1]))
        return a, b

    def _merge(self) -> None:
        k = self.first + np.arange(self.bins)
        new_first = self.first // 2
        merged = np.zeros(self.bins, np.int64)
        np.add.at(merged, k // 2 - new_first, self.counts)
        self.counts, self.first, self.width = merged, new_first, cast(float, self.width) * 2.0

    def _slide(self, new_first: int) -> None:
        occ = np.flatnonzero(self.counts)
        moved = np.zeros(self.bins, np.int64)
        moved[occ + self.first - new_first] = self.counts[occ]
        self.counts, self.first = moved, new_first

    def result(self) -> Histogram:
        return Histogram(self.counts.copy(), float(self.width or 1.0), int(self.first))


def _initial_width(lo: float, hi: float, bins: int) -> float:
    span = hi - lo if hi > lo else max(abs(hi), 2.0**-40)
    return float(2.0 ** math.ceil(math.log2(span / bins)))


# --------------------------------------------------------------------------- per-tensor statistics
@dataclass(frozen=True)
class TensorStats:
    """Statistics of one tensor over the calibration set."""

    name: str
    count: int
    minimum: float
    maximum: float
    mean: float
    std: float
    histogram: Histogram
    kind: str = "activation"  # "activation" | "weight"
    shape: tuple[int, ...] = ()  # per-sample shape (activations) or full shape (weights)
    feature_axis: int | None = None
    feature_min: np.ndarray | None = None
    feature_max: np.ndarray | None = None

    @classmethod
    def from_array(cls, name: str, values: np.ndarray, *, bins: int = 2048, kind: str = "activation") -> TensorStats:
        """Statistics of an in-memory array (weights, tests)."""
        acc = _Accumulator(name, bins)
        acc.add(np.asarray(values))
        return acc.result(kind=kind, shape=tuple(np.shape(values)))

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "count": self.count, "minimum": self.minimum, "maximum": self.maximum, "mean": self.mean, "std": self.std,
            "kind": self.kind, "shape": list(self.shape),
            "histogram": {"counts": self.histogram.counts.tolist(), "width": self.histogram.width, "first": self.histogram.first},
        }
        if self.feature_axis is not None:
            d["feature_axis"] = self.feature_axis
            d["feature_min"] = np.asarray(self.feature_min).tolist()
            d["feature_max"] = np.asarray(self.feature_max).tolist()
        return d

    @classmethod
    def from_json(cls, name: str, d: Mapping[str, Any]) -> TensorStats:
        h = d["histogram"]
        fa = d.get("feature_axis")
        return cls(
            name, int(d["count"]), float(d["minimum"]), float(d["maximum"]), float(d["mean"]), float(d["std"]),
            Histogram(np.asarray(h["counts"], np.int64), float(h["width"]), int(h["first"])),
            str(d.get("kind", "activation")), tuple(int(v) for v in d.get("shape", ())),
            None if fa is None else int(fa),
            None if fa is None else np.asarray(d["feature_min"], np.float64),
            None if fa is None else np.asarray(d["feature_max"], np.float64),
        )


class _Accumulator:
    def __init__(self, name: str, bins: int, feature_axis: int | None = None) -> None:
        self.name, self.hist, self.feature_axis = name, GrowingHistogram(bins), feature_axis
        self.count, self.total, self.total_sq = 0, 0.0, 0.0
        self.lo, self.hi = math.inf, -math.inf
        self.flo: np.ndarray | None = None
        self.fhi: np.ndarray | None = None

    def add(self, values: np.ndarray) -> None:
        v = np.asarray(values, np.float64)
        if not np.all(np.isfinite(v)):
            raise QuantizationError(
                f"tensor {self.name!r} holds non-finite values on the calibration data",
                "check the model and the input normalization (an FP32 model should not overflow)",
            )
        if v.size == 0:
            return
        self.count += v.size
        self.total += float(v.sum())
        self.total_sq += float(np.square(v).sum())
        self.lo, self.hi = min(self.lo, float(v.min())), max(self.hi, float(v.max()))
        self.hist.add(v)
        if self.feature_axis is not None:
            self._add_features(v)

    def _add_features(self, v: np.ndarray) -> None:
        axes = tuple(i for i in range(v.ndim) if i != self.feature_axis)
        flo, fhi = v.min(axis=axes), v.max(axis=axes)
        self.flo = flo if self.flo is None else np.minimum(self.flo, flo)
        self.fhi = fhi if self.fhi is None else np.maximum(self.fhi, fhi)

    def result(self, *, kind: str = "activation", shape: tuple[int, ...] = ()) -> TensorStats:
        n = max(self.count, 1)
        mean = self.total / n
        std = math.sqrt(max(self.total_sq / n - mean * mean, 0.0))
        lo, hi = (self.lo, self.hi) if self.count else (0.0, 0.0)
        return TensorStats(self.name, self.count, lo, hi, mean, std, self.hist.result(), kind, shape,
                           self.feature_axis, self.flo, self.fhi)


# --------------------------------------------------------------------------- the collection
@dataclass
class Statistics:
    """Tensor name -> :class:`TensorStats`, for one model and one calibration set."""

    tensors: dict[str, TensorStats]
    model_digest: str
    input_name: str
    output_names: tuple[str, ...]
    n_samples: int
    bins: int
    skipped: tuple[str, ...] = field(default=())  # node outputs that could not be exposed (non-float / unknown type)

    def __getitem__(self, name: str) -> TensorStats:
        try:
            return self.tensors[name]
        except KeyError:
            raise QuantizationError(
                f"no statistics for tensor {name!r}",
                "collect statistics on this very model (collect_statistics) before deriving parameters",
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def activations(self) -> list[str]:
        return [n for n, t in self.tensors.items() if t.kind == "activation"]

    def weights(self) -> list[str]:
        return [n for n, t in self.tensors.items() if t.kind == "weight"]

    def to_json(self) -> dict[str, Any]:
        return {
            "stats_version": STATS_VERSION, "model_digest": self.model_digest, "input_name": self.input_name,
            "output_names": list(self.output_names), "n_samples": self.n_samples, "bins": self.bins,
            "skipped": list(self.skipped), "tensors": {n: t.to_json() for n, t in self.tensors.items()},
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Statistics:
        try:
            return cls(
                {n: TensorStats.from_json(n, t) for n, t in d["tensors"].items()}, str(d["model_digest"]),
                str(d["input_name"]), tuple(d["output_names"]), int(d["n_samples"]), int(d["bins"]), tuple(d.get("skipped", ())),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"statistics are malformed ({type(exc).__name__}: {exc})", "collect them again with collect_statistics") from None

    def save(self, path: str | Path) -> Path:
        """Write ``.npz`` (histograms as arrays, the rest as a JSON string; no pickle) or ``.json``."""
        from nilmc.compiler.io import atomic_write_bytes, atomic_write_text

        path = Path(path)
        if path.suffix == ".json":
            return atomic_write_text(path, json.dumps(self.to_json(), sort_keys=True))
        meta = self.to_json()
        arrays: dict[str, Any] = {}  # Any: np.savez's stubs would match a bool keyword
        for i, (name, t) in enumerate(self.tensors.items()):
            arrays[f"hist_{i}"] = t.histogram.counts
            meta["tensors"][name]["histogram"]["counts"] = f"hist_{i}"
        arrays["meta"] = np.array(json.dumps(meta, sort_keys=True))
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> Statistics:
        path = Path(path)
        if path.suffix == ".json":
            return cls.from_json(json.loads(path.read_text()))
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            for t in meta["tensors"].values():
                t["histogram"]["counts"] = z[t["histogram"]["counts"]]
        return cls.from_json(meta)


def model_digest(model: onnx.ModelProto) -> str:
    """Short content hash of a graph (to tell which model statistics or parameters belong to)."""
    return hashlib.sha256(model.graph.SerializeToString(deterministic=True)).hexdigest()[:16]


def _feature_axis(shape: tuple[int, ...]) -> int | None:
    """Last non-batch axis of size > 1 (axis 2 of ``(N, 10, F, 1)``; axis 1 of a feature vector ``(N, F)``); None when
    a rank-3+ input has only one axis longer than 1: a single-feature sequence (``(N, T, 1, 1)``, ``(N, 1, T)``), whose
    only long axis is time — per-position minima and maxima of a few hundred windows are not feature ranges (they made
    a low-frequency model's coverage report "122 features" outside calibration)."""
    long = [axis for axis in range(1, len(shape)) if shape[axis] > 1]
    if not long or (len(shape) > 2 and len(long) == 1):
        return None
    return long[-1]


def _exposed(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str], list[str]]:
    """A copy of ``model`` with every float node output added as a graph output; also what was skipped."""
    floats = float_tensors(model)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    present = {o.name for o in m.graph.output}
    exposed, skipped = [], []
    for node in m.graph.node:
        if node.op_type == "Constant":
            continue
        for name in node.output:
            if not name or name in present:
                continue
            if name in floats:
                m.graph.output.append(helper.make_tensor_value_info(name, floats[name], None))
                present.add(name)
            else:
                skipped.append(name)
    for o in m.graph.output:
        exposed.append(o.name)
    return m, exposed, skipped


def _session(model: onnx.ModelProto) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _check_calibration(model: onnx.ModelProto, x: np.ndarray) -> tuple[str, np.ndarray]:
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise QuantizationError(f"statistics need a single-input model, got inputs {[i.name for i in inputs]}", "export the model with one input")
    x = np.asarray(x)
    if x.size == 0 or x.ndim < 1:
        raise DataError("the calibration set is empty", "pass at least one calibration window")
    if not np.issubdtype(x.dtype, np.floating) or not np.all(np.isfinite(x)):
        raise DataError(f"calibration data must be finite floats, got dtype {x.dtype}", "normalize the data and drop non-finite windows")
    dims = inputs[0].type.tensor_type.shape.dim
    want = tuple(d.dim_value if d.HasField("dim_value") else None for d in dims[1:])
    got = tuple(x.shape[1:])
    if len(want) != len(got) or any(w is not None and w != g for w, g in zip(want, got)):
        raise ShapeMismatchError(f"the model expects windows of shape {want} but the calibration data have {got}", "use data of the model's feature setup")
    return inputs[0].name, x.astype(np.float32, copy=False)


def run_with_intermediates(
    model: onnx.ModelProto, x: np.ndarray, *, batch_size: int = 256
) -> Iterator[dict[str, np.ndarray]]:
    """Run the FP32 model over ``x`` in batches; yield every float tensor (input included) per batch."""
    input_name, x = _check_calibration(model, x)
    exposed_model, names, _ = _exposed(model)
    sess = _session(exposed_model)
    for start in range(0, len(x), batch_size):
        batch = x[start : start + batch_size]
        outs = sess.run(names, {input_name: batch})
        yield {input_name: batch, **dict(zip(names, outs))}


def _weight_stats(model: onnx.ModelProto, bins: int) -> dict[str, TensorStats]:
    out = {}
    for name, value in constants(model).items():
        if value.dtype.kind == "f" and value.size > 0:
            out[name] = TensorStats.from_array(name, value, bins=bins, kind="weight")
    return out


AUTO = "auto"


def collect_statistics(onnx_model: onnx.ModelProto, calib_x: np.ndarray, *, batch_size: int = 256, bins: int = 2048,
                       feature_axis: int | None | str = AUTO) -> Statistics:
    """One FP32 pass over ``calib_x``: :class:`Statistics` for every activation tensor, plus the weights.

    ``batch_size`` (default 256) windows per onnxruntime call; ``bins`` (default 2048)
    histogram bins per tensor; ``feature_axis`` of the graph input, batch axis 0 (default ``"auto"``: read from its
    shape, :func:`_feature_axis`; None: one feature, no per-feature ranges). A caller with the model's contract passes
    it (``ModelContract.input_feature_axis``): an ``(N, T)`` input is one feature over T steps, not T features.
    Raises :class:`DataError`/:class:`ShapeMismatchError` for bad calibration data and :class:`QuantizationError`
    when a tensor goes non-finite.
    """
    if batch_size < 1:
        raise QuantizationError(f"batch_size must be >= 1, got {batch_size}", "use the default 256")
    input_name, x = _check_calibration(onnx_model, calib_x)
    _, _, skipped = _exposed(onnx_model)
    accs: dict[str, _Accumulator] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for batch in run_with_intermediates(onnx_model, x, batch_size=batch_size):
        for name, value in batch.items():
            if name not in accs:
                axis = None
                if name == input_name:  # AUTO (a str): read from the shape
                    axis = _feature_axis(value.shape) if isinstance(feature_axis, str) else feature_axis
                accs[name], shapes[name] = _Accumulator(name, bins, axis), tuple(value.shape[1:])
            accs[name].add(value)
    tensors = {n: a.result(shape=shapes[n]) for n, a in accs.items()}
    tensors.update(_weight_stats(onnx_model, bins))
    outputs = tuple(o.name for o in onnx_model.graph.output)
    return Statistics(tensors, model_digest(onnx_model), input_name, outputs, int(len(x)), bins, tuple(skipped))

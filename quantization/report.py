"""The per-layer quantization report (``nilmc quantize --report``): JSON and a readable table.

One row per quantization point (the graph input, every fused layer's output, any other
op that requantizes), in graph order:

* ``dtype``, ``scale``, ``zero_point``, ``method`` — the activation parameters (``float``
  for tensors a mixed-precision fallback keeps at FP32);
* ``weight_scale`` — min..max of the layer's weight scales (per channel or per tensor);
* ``saturation`` — share of the FP32 values on the calibration windows that fall outside
  the representable range (measured);
* ``code_use`` — share of the integer code range the observed values span;
* ``acc_headroom_bits`` — ``log2(limit / bound)`` of the layer's worst-case accumulator,
  ``bound = sum|w_q - z_w| * max|x_q - z_x| + |b_q|`` over its worst output channel
  against ``2**(accumulator_bits - 1) - 1`` (negative: it can overflow);
* ``sqnr_db`` — SQNR of the tensor in the QDQ graph against FP32 on the calibration
  windows (cumulative: it includes every error upstream).

:func:`layer_table` works on any model + parameters; :func:`quantize_report` and
:func:`format_report` take a :class:`api.QuantizationResult`.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import onnx

from nilmc.quantization import _ort
from nilmc.quantization.graph import Layer, QuantGraph, analyze
from nilmc.quantization.intops import accumulator_limit
from nilmc.quantization.params import QuantParams, quantize_constant
from nilmc.quantization.qdq import build_qdq_model, float_sets

if TYPE_CHECKING:
    from nilmc.quantization.api import QuantizationResult


@dataclass(frozen=True)
class Row:
    tensor: str
    producer: str  # layer name, "input", or the op that makes the tensor
    dtype: str
    scale: float | None
    zero_point: int | None
    method: str
    weight_scale: tuple[float, float] | None
    saturation: float | None
    code_use: float | None
    acc_bound: float | None
    acc_headroom_bits: float | None
    sqnr_db: float | None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["weight_scale"] = None if self.weight_scale is None else list(self.weight_scale)
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def _graph(onnx_model: onnx.ModelProto) -> QuantGraph:
    m = onnx.ModelProto()
    m.CopyFrom(onnx_model)
    return analyze(m)


def _accumulator(layer: Layer, params: QuantParams, g: QuantGraph) -> tuple[float, float]:
    w_tq = params.tensors[layer.weight]
    codes = quantize_constant(w_tq, params.constant(layer.weight, g.constants), params.traits).astype(np.int64)
    zp = w_tq.zero_points()
    if w_tq.per_channel:
        shape = [1] * codes.ndim
        shape[cast(int, w_tq.axis)] = -1
        zp = zp.reshape(shape)
    w = np.moveaxis(codes - zp, layer.weight_axis, 0).reshape(codes.shape[layer.weight_axis], -1)
    x = params[layer.input]
    x_max = max(x.zero_point[0] - x.rng.lo, x.rng.hi - x.zero_point[0])
    bias = np.zeros(w.shape[0])
    if layer.bias is not None:
        s_w = np.broadcast_to(w_tq.scales().astype(np.float64), (w.shape[0],))
        b = np.broadcast_to(np.asarray(params.constant(layer.bias, g.constants), np.float64).ravel(), (w.shape[0],))
        bias = np.rint(b / (x.scale[0] * s_w))
    bound = float((np.abs(w).sum(axis=1) * x_max + np.abs(bias)).max())
    limit = accumulator_limit(params.traits.accumulator_bits)
    return bound, math.log2(limit / bound) if bound > 0 else math.inf


def _saturation(values: np.ndarray, tq: Any) -> tuple[float, float]:
    s, z, rng = tq.scale[0], tq.zero_point[0], tq.rng
    lo, hi = (rng.lo - z - 0.5) * s, (rng.hi - z + 0.5) * s
    v = np.asarray(values, np.float64)
    sat = float(np.count_nonzero((v < lo) | (v > hi)) / max(v.size, 1))
    codes = np.clip(np.rint(np.array([v.min(), v.max()]) / s) + z, rng.lo, rng.hi)
    return sat, float((codes[1] - codes[0] + 1) / rng.levels)


def _qdq_name(tensor: str, g: QuantGraph, float_acts: set[str]) -> str:
    if tensor in float_acts or tensor in g.outputs:
        return tensor
    return tensor + "_dequantized"


def layer_table(onnx_model: onnx.ModelProto, params: QuantParams, x: np.ndarray, *, max_windows: int | None = 512) -> list[Row]:
    """The per-tensor rows (module docstring) measured on windows ``x`` (as the graph takes them)."""
    g = _graph(onnx_model)
    x = _ort.subsample(np.asarray(x, np.float32), max_windows)
    float_acts, _ = float_sets(g, params.keep_float)
    inputs = set(g.inputs)
    fp = _ort.run(onnx_model, x, [t for t in g.quant_points if t not in inputs])
    fp.update({t: x for t in g.quant_points if t in inputs})
    qdq = build_qdq_model(onnx_model, params)
    names = {t: _qdq_name(t, g, float_acts) for t in g.quant_points}
    q = _ort.run(qdq, x, [n for t, n in names.items() if n not in inputs])
    q.update({n: x for n in names.values() if n in inputs})
    producers = {l.output: l for l in g.layers}
    op_of = {o: n.op_type for n in onnx_model.graph.node for o in n.output}
    rows = []
    for t in g.quant_points:
        layer = producers.get(t)
        rows.append(_row(t, layer, params, g, fp[t], q[names[t]], t in float_acts, "input" if t in inputs else op_of.get(t, "?")))
    return rows


def _row(t: str, layer: Layer | None, params: QuantParams, g: QuantGraph, fp: np.ndarray, q: np.ndarray, is_float: bool, op: str) -> Row:
    sqnr = _ort.sqnr_db(fp, q)
    wscale = acc = head = None
    if layer is not None:
        if layer.weight in params.tensors and layer.name not in params.keep_float:
            s = params.tensors[layer.weight].scales()
            wscale = (float(s.min()), float(s.max()))
            acc, head = _accumulator(layer, params, g)
    if is_float:
        return Row(t, layer.name if layer else op, "float", None, None, "kept float", wscale, None, None, acc, head, sqnr)
    tq = params[t]
    sat, use = _saturation(fp, tq)
    return Row(t, layer.name if layer else op, tq.range_name, float(tq.scale[0]), int(tq.zero_point[0]), tq.method, wscale,
               sat, use, acc, head, sqnr)


# --------------------------------------------------------------------------- result-level report
def quantize_report(result: QuantizationResult, *, max_windows: int | None = 512) -> dict[str, Any]:
    """The whole report of a :func:`api.quantize` result as a JSON-able dict."""
    rows = layer_table(result.model.graph, result.params, result.calib_x, max_windows=max_windows)
    out_ref = _ort.output(result.model.graph, _ort.subsample(result.calib_x, max_windows))
    out_q = _ort.output(result.qdq, _ort.subsample(result.calib_x, max_windows))
    prov = dict(result.params.provenance)
    return {
        "traits": result.traits.to_json(),
        "model": result.model.source,
        "contract": {"normalization": result.model.contract.normalization.kind.value, "folded": result.model.contract.folded,
                     "peak_power_w": result.model.contract.peak_power_w, "appliance": result.model.contract.appliance},
        "calibration": {"windows": int(len(result.calib_x)), "seconds": round(result.calibration_s, 3),
                        "timings_s": {k: round(v, 3) for k, v in result.timings.items()}},
        "output_sqnr_db": _ort.sqnr_db(out_ref, out_q),
        "layers": [r.to_json() for r in rows],
        "keep_float": list(result.params.keep_float),
        "bias_corrected": sorted(result.params.adjusted),
        "selection": prov.get("selection", {}).get("choices"),
        "headroom": prov.get("headroom", {}).get("headroom"),
        "bias_correction_check": prov.get("bias_correction_check"),
        "mixed_precision": prov.get("mixed_precision"),
        "normalization": None if result.normalization is None else result.normalization.to_json(),
        "feature_scales": None if result.feature_scales is None else result.feature_scales.to_json(),
        "overflow": None if result.overflow is None else result.overflow.to_json(),
        "fold": None if result.fold is None else result.fold.to_json(),
        "notes": list(result.notes),
    }


def _fmt(v: Any, spec: str, width: int) -> str:
    if v is None:
        return "-".rjust(width)
    if isinstance(v, float) and math.isinf(v):
        return ("inf" if v > 0 else "-inf").rjust(width)
    return format(v, spec).rjust(width)


def _short(name: str, width: int) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]


def format_table(rows: list[dict[str, Any]], *, name_width: int = 34) -> str:
    """Rows of :func:`quantize_report` ``["layers"]`` as a fixed-width text table."""
    head = (f"{'tensor':<{name_width}} {'dtype':<11} {'scale':>10} {'zp':>5} {'method':<18} {'w scale min..max':>21} "
            f"{'sat %':>7} {'codes %':>8} {'acc bits':>8} {'SQNR dB':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        ws = "-" if r["weight_scale"] is None else f"{r['weight_scale'][0]:.2e}..{r['weight_scale'][1]:.2e}"
        lines.append(
            f"{_short(r['tensor'], name_width):<{name_width}} {r['dtype']:<11} {_fmt(r['scale'], '.3e', 10)} {_fmt(r['zero_point'], 'd', 5)} "
            f"{_short(r['method'], 18):<18} {ws:>21} {_fmt(None if r['saturation'] is None else 100 * r['saturation'], '.3f', 7)} "
            f"{_fmt(None if r['code_use'] is None else 100 * r['code_use'], '.1f', 8)} {_fmt(r['acc_headroom_bits'], '.1f', 8)} "
            f"{_fmt(r['sqnr_db'], '.1f', 8)}")
    return "\n".join(lines)


def format_report(result: QuantizationResult, report: dict[str, Any] | None = None) -> str:
    """A readable text report: header, the per-layer table, then findings."""
    d = report if report is not None else quantize_report(result)
    c = d["contract"]
    lines = [
        f"nilmc quantization report — traits {d['traits']['name']}, model {d['model']}",
        f"normalization {c['normalization']}{' (folded: raw features in, watts out)' if c['folded'] else ''}, "
        f"appliance {c['appliance']}, peak {c['peak_power_w']} W",
        f"calibration: {d['calibration']['windows']} windows, {d['calibration']['seconds']:.2f} s "
        f"({', '.join(f'{k} {v:.2f}' for k, v in d['calibration']['timings_s'].items())})",
        f"model output SQNR vs FP32 on the calibration windows: {d['output_sqnr_db']:.2f} dB",
    ]
    if d.get("headroom") is not None:
        lines.append(f"range headroom (cross-validated): x{d['headroom']:g}")
    if d.get("bias_correction_check") is not None:
        bc = d["bias_correction_check"]
        lines.append(f"bias correction: {'applied' if d['bias_corrected'] else 'not applied'} "
                     f"(held-out output MSE {bc['heldout_mse_without']:.3g} -> {bc['heldout_mse_with']:.3g})")
    if d.get("mixed_precision"):
        mp = d["mixed_precision"]
        lines.append(f"mixed precision ({mp.get('mode')}): kept {mp.get('kept') or 'nothing'}; budget {'met' if mp.get('met') else 'NOT met'}")
    lines += ["", format_table(d["layers"]), ""]
    if d["normalization"]:
        n = d["normalization"]
        lines.append(f"normalization check: {'ok' if n['ok'] else 'FAILED (' + n['diagnosis'] + ')'}"
                     + (f" — bad features: {', '.join(n['bad_features'])}" if n["bad_features"] else ""))
    if d["feature_scales"]:
        fs = d["feature_scales"]
        lines.append("input feature scales: ok" if fs["ok"] else
                     f"input feature scales: {len(fs['lost'])} features starved ({', '.join(fs['lost'])}); tensors: {', '.join(fs['tensors'])}")
    if d["overflow"]:
        found = d["overflow"]["findings"]
        lines.append(f"overflow checks: {'no findings' if not found else str(len(found)) + ' finding(s)'}")
        for f in found[:10]:
            lines.append(f"  [{f['policy']}{', fixed' if f['fixed'] else ''}] {f['check']} {f['tensor']}: {f['reason']}")
    lines += [f"note: {n}" for n in d["notes"]]
    return "\n".join(lines)

"""The ``eiq`` backend: full-integer TFLite for the NXP i.MX 8M Plus NPU (VX delegate).

What it produces (``lower``), per precision:

* ``int8``     per-channel symmetric int8 weights, asymmetric int8 activations, int8 I/O;
* ``int8_pt``  per-tensor symmetric int8 weights (what the i.MX 8M Plus NPU runs fastest), int8 I/O;
* ``uint8_io`` as ``int8_pt`` but uint8 input/output tensors (QUANTIZE ops inside convert to int8).

Precise input (``eiq.cpu_layers=auto``, the default for ``int8`` and ``int8_pt``): the layers reading the graph input
run as float32 TFLite ops on the application CPU (Cortex-A53) — the VX delegate leaves float ops to the CPU — and a
QUANTIZE after each hands nilmc's int8 grid of its output to the NPU partition, which runs everything else in INT8.
The input is then never on an 8-bit grid (that grid capped the shipped model at 22 dB mean / 13 dB worst output SQNR
over calibration draws). The input tensor is float32, the output int8. ``info["partition"]`` and the manifest's
``placement`` say which ops run where and why; the NPU drift is emulated on the NPU partition, fed the CPU stage's
codes. ``eiq.cpu_layers=none`` (and ``uint8_io``, whose point is integer I/O) keeps the full-integer graph.

eIQ lowers through tflite's full-integer routine: each precision is a
:class:`~nilmc.backends.tflite_int8.FullIntegerSpec` in :data:`EIQ_SPECS` (eIQ traits, per-tensor option,
I/O dtype, op allow-list :data:`VX_ALLOWED_OPS`, integer-only), and
:func:`~nilmc.backends.tflite_int8.integer_params` / :func:`~nilmc.backends.tflite_int8.build_full_integer`
derive nilmc's parameters, write them into the flatbuffer and check it against the spec
(no float tensor left, every op allow-listed, per-tensor weights when asked). The TensorFlow
conversion is shared with ``tflite:int8`` and the other eIQ precisions in one process.
Files: ``model_eiq.tflite``, ``eiq_check.json`` and the board hand-off ``run_on_imx8mp.py`` /
``run_on_imx8mp.sh`` (VX delegate ``/usr/lib/libvx_delegate.so``) with ``imx8mp_windows.npy`` and
``imx8mp_cpu_reference.npy`` to compare the board's output against.

Verification: the runner is the ai_edge_litert CPU interpreter on the very artifact (MEASURED as
"CPU reference of the eIQ artifact"). The NPU itself is not available here; its coarser requantization
is *emulated* (:func:`emulate_int8`, numpy integer model of the flatbuffer with 32-bit and with 16-bit
normalized multipliers) and the predicted drift is stored in ``Artifact.info["npu_emulation"]``.

A Keras source that nilmc's Keras mapping cannot place (Conv1D, BatchNormalization, LSTM kept float32) lowers as
``tflite:int8`` does (:func:`~nilmc.backends.onnx_to_tf.build_int8_from_keras`); its ops outside the allow-list or in
float go to the CPU, as the VX delegate partitions a graph, and ``info["partition"]`` (:func:`npu_partition`) lists
where each op runs. The NPU drift emulation is then not run (label ``not verified``): it has no CPU ops.

The allow-list is an assumption: a conservative subset of the TFLite ops the VX delegate lists as
NPU-supported in NXP's i.MX Machine Learning User's Guide (IMXMLUG, "TensorFlow Lite" / VX delegate
operator table); ops outside it would fall back to the Cortex-A53 or fail, so they are refused here.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nilmc.backends import tflite_int8
from nilmc.backends.base import Artifact, Capabilities
from nilmc.backends.tflite_int8 import (  # noqa: F401  (graph_ops, UnsupportedOpError: part of this module's API)
    TAIL_RUNS,
    TAIL_SUFFIX,
    TAIL_WHY,
    FullIntegerSpec,
    UnsupportedOpError,
    build_full_integer,
    check_cpu_layers,
    check_graph,
    float_layers_phrase,
    graph_ops,
    integer_params,
    invoke_windows,
    io_quantization,
    kept_float_ignored,
    keras_placeable,
    load_flatbuffer,
    manifest_placement,
    op_code,
    op_name,
    precise_why,
    recurrent_layers,
    type_name,
)
from nilmc.compiler.errors import BadInputError
from nilmc.compiler.io import atomic_write_bytes, atomic_write_json
from nilmc.compiler.tfcompat import load_keras, require_tflite
from nilmc.quantization.intops import (
    INT_RANGES,
    IntegerMatmul,
    Rounding,
    avg_pool,
    conv2d_accumulate,
    conv2d_zero_point_offset,
    dense_accumulate,
    grouped_conv2d_accumulate,
    max_pool,
    quantize,
    quantize_multiplier,
    requantize_fast,
    wrap,
)
from nilmc.quantization.traits import QuantTraits

if TYPE_CHECKING:
    from nilmc.compiler.model import Model

VX_DELEGATE = "/usr/lib/libvx_delegate.so"
# TRANSPOSE, EXPAND_DIMS, SQUEEZE, PAD (data movement of a Conv1d / NCW model): "yes" in VeriSilicon's tflite-vx-delegate op_status.md.
# MEAN (a global average pool, as onnx2tf writes PyTorch's AdaptiveAvgPool1d(1)): "yes" there as well.
VX_ALLOWED_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "RESHAPE", "MAX_POOL_2D", "AVERAGE_POOL_2D", "ADD",
                  "QUANTIZE", "DEQUANTIZE", "SOFTMAX", "LOGISTIC", "CONCATENATION", "TRANSPOSE", "EXPAND_DIMS", "SQUEEZE", "PAD", "MEAN")
ALLOWED_TENSOR_TYPES = ("int8", "uint8", "int32")  # uint8 only on the I/O tensors of the uint8_io variant
NPU_NOTE = "NPU execution itself needs an i.MX 8M Plus board (VX delegate); verified on the CPU interpreter + NPU requantization emulation"
PRECISIONS = {"int8": (False, "int8"), "int8_pt": (True, "int8"), "uint8_io": (True, "uint8")}  # -> (per_tensor, io_dtype)
HANDOFF_WINDOWS = 64
PRIMARY = "model_eiq.tflite"


ALLOW_LIST_SOURCE = ("assumption: conservative subset of the VX delegate operator table in NXP IMXMLUG (i.MX Machine Learning User's Guide) "
                     "and VeriSilicon tflite-vx-delegate op_status.md")
NPU_PATH = "the i.MX 8M Plus NPU path"


def eiq_traits(*, per_tensor: bool = False, io_dtype: str = "int8", float_layers: bool = False) -> QuantTraits:
    """eIQ traits: symmetric narrow int8 weights (per channel, or per tensor when ``per_tensor``), asymmetric int8
    activations, C-round, ``io_dtype`` (default int8) I/O, 16-bit NPU requantization multiplier (emulation only), an
    AveragePool on its input's grid (TFLite's int8 AVERAGE_POOL_2D);
    ``float_layers`` (default False): precise input, the layers reading the graph input run in FP32 on the CPU.

    Not :data:`~nilmc.quantization.traits.EIQ_PER_TENSOR`: its asymmetric weights are refused by TFLite's int8 kernels."""
    return QuantTraits(name="eiq_int8" + ("_per_tensor" if per_tensor else "") + ("_float_input" if float_layers else ""),
                       per_channel_weights=not per_tensor, symmetric_weights=True, narrow_range_weights=True, rounding=Rounding.HALF_AWAY,
                       io_dtype=io_dtype, requant_multiplier_bits=16, float_layers=float_layers, pool_shares_grid=True,
                       fixed_lut_grids=True)


PRECISE_PRECISIONS = ("int8", "int8_pt")  # uint8_io exists for integer I/O: it stays full integer
CPU_STAGE = " on the application CPU (Cortex-A53), before the NPU partition"
TAIL_FILE = "model_eiq" + TAIL_SUFFIX  # a float tail's stage (tflite_int8.TAIL_SUFFIX), on the CPU after the NPU graph


def eiq_spec(precision: str, cpu_layers: str = "auto") -> FullIntegerSpec:
    """The eIQ constraints for ``precision`` as data (tflite's INT8 routine lowers every eIQ precision): precise input
    (``cpu_layers`` ``"auto"``, the default, for :data:`PRECISE_PRECISIONS`; the float ops then run on the CPU) or the
    full-integer, integer-only graph (``"none"``, and ``uint8_io``)."""
    per_tensor, io_dtype = PRECISIONS[precision]
    float_input = check_cpu_layers(cpu_layers, "eiq") == "auto" and precision in PRECISE_PRECISIONS
    return FullIntegerSpec(label=f"eiq:{precision}", traits=eiq_traits(per_tensor=per_tensor, float_layers=float_input), per_tensor=per_tensor,
                           io_dtype=io_dtype, allowed_ops=VX_ALLOWED_OPS, integer_only=not float_input, target=NPU_PATH,
                           allow_list_source=ALLOW_LIST_SOURCE, float_input=float_input)


EIQ_SPECS = {p: eiq_spec(p) for p in PRECISIONS}


# --------------------------------------------------------------------------- graph check
def check_vx_graph(fb: bytes, *, per_tensor: bool | None = None, integer_only: bool = True, where: str = "the TFLite graph") -> dict[str, Any]:
    """Check ``fb`` for the VX delegate: ops in :data:`VX_ALLOWED_OPS` (else :class:`UnsupportedOpError` naming them),
    no float tensor when ``integer_only`` (default True), one weight scale per tensor when ``per_tensor``.

    Returns the JSON-able report written to ``eiq_check.json``."""
    spec = replace(EIQ_SPECS["int8_pt" if per_tensor else "int8"], integer_only=integer_only)
    return check_graph(fb, spec, where=where)


def scan_keras_ops(keras_model: Any) -> list[str]:
    """Ops of the FP32 TFLite conversion of ``keras_model`` outside :data:`VX_ALLOWED_OPS`; [] when none."""
    return tflite_int8.scan_keras_ops(keras_model, VX_ALLOWED_OPS)


def npu_partition(fb: bytes, reasons: Mapping[int, str] | None = None) -> dict[str, Any]:
    """Where each op of ``fb`` runs under the VX delegate: on the NPU when it is in :data:`VX_ALLOWED_OPS` and all its
    tensors are integer, else on the CPU (the delegate partitions the graph so; the allow-list is an assumption, see
    :data:`ALLOW_LIST_SOURCE`). ``reasons``: op index -> why it runs on the CPU (precise input), else the tensor types
    or the allow-list say. ``{"npu": [op names], "cpu": [{"op", "index", "why"}], "npu_partitions": count, "summary"}``."""
    reasons = reasons or {}
    ops = graph_ops(fb)
    npu, cpu, where = [], [], []
    for i, o in enumerate(ops):
        floats = set(o["dtypes"]) - set(ALLOWED_TENSOR_TYPES)
        if o["op"] in VX_ALLOWED_OPS and not floats:
            npu.append(o["op"])
            where.append("npu")
        else:
            why = reasons.get(i) or (f"float tensors ({', '.join(sorted(floats))})" if floats else "not in the NPU allow-list")
            cpu.append({"op": o["op"], "index": i, "why": why})
            where.append("cpu")
    partitions = sum(1 for i, w in enumerate(where) if w == "npu" and (i == 0 or where[i - 1] != "npu"))
    summary = f"{len(npu)} op(s) on the NPU in {partitions} partition(s); {len(cpu)} on the CPU ({', '.join(sorted({c['op'] for c in cpu}))})"
    return {"npu": npu, "cpu": cpu, "npu_partitions": partitions, "summary": summary, "allow_list_source": ALLOW_LIST_SOURCE}


# --------------------------------------------------------------------------- integer emulation
@dataclass
class _Tensor:
    shape: tuple[int, ...]
    dtype: str
    scale: np.ndarray
    zero_point: np.ndarray
    data: np.ndarray | None  # constants


class NotEmulatedError(BadInputError):
    """An op :func:`emulate_int8` has no integer model for."""


def _read_tensors(m: Any) -> list[_Tensor]:
    sg = m.subgraphs[0]
    out = []
    for t in sg.tensors:
        dtype = type_name(t.type)
        q = t.quantization
        scale = np.asarray(q.scale if q is not None and q.scale is not None else [], np.float32)
        zp = np.asarray(q.zeroPoint if q is not None and q.zeroPoint is not None else [], np.int64)
        buf = m.buffers[t.buffer].data if t.buffer < len(m.buffers) else None
        data = None
        if buf is not None and len(buf):
            data = np.frombuffer(np.asarray(buf, np.uint8).tobytes(), np.dtype(dtype).newbyteorder("<")).reshape([int(d) for d in t.shape])
        out.append(_Tensor(tuple(int(d) for d in t.shape), dtype, scale, zp, data))
    return out


def _act_range(fused: int, scale: float, zp: int, rng: Any) -> tuple[int, int]:
    """TFLite CalculateActivationRangeQuantized: NONE 0, RELU 1, RELU_N1_TO_1 2, RELU6 3."""
    lo, hi = rng.lo, rng.hi
    q = lambda v: zp + int(np.sign(v / scale) * np.floor(abs(v / scale) + 0.5))  # noqa: E731
    if fused in (1, 3):
        lo = max(lo, zp)
    if fused == 3:
        hi = min(hi, q(6.0))
    if fused == 2:
        lo, hi = max(lo, q(-1.0)), min(hi, q(1.0))
    if fused not in (0, 1, 2, 3):
        raise NotEmulatedError(f"fused activation {fused} is not emulated", "use ReLU/ReLU6 or none")
    return lo, hi


_WINDOWS_PER_PASS = 128  # windows per pass through the graph: patches and accumulators stay in reused buffers (tens of MB)


def _multipliers(real: np.ndarray, bits: int) -> tuple[np.ndarray | int, np.ndarray | int]:
    """TFLite's normalized ``bits``-wide multipliers and shifts of ``real`` (scalars when there is one)."""
    ms = [quantize_multiplier(float(r), bits=bits) for r in np.atleast_1d(real)]
    m = np.array([v[0] for v in ms], np.int64)
    s = np.array([v[1] for v in ms], np.int64)
    return (m, s) if len(m) > 1 else (int(m[0]), int(s[0]))


@dataclass
class _Requant:
    """An op's accumulator -> output codes: real multiplier(s), output zero point and range, fused-activation limits."""

    real: np.ndarray
    zero_point: int
    rng: Any
    limits: tuple[int, int]
    fixed: dict[int, tuple[Any, Any]] = field(default_factory=dict)  # multiplier bits -> (multipliers, shifts)

    def __call__(self, acc: np.ndarray, bits: int) -> np.ndarray:
        if bits not in self.fixed:
            self.fixed[bits] = _multipliers(self.real, bits)
        m, s = self.fixed[bits]
        return requantize_fast(acc, m, s, self.zero_point, self.rng, bits=bits, limits=self.limits)


def _same_pads(size: int, k: int, stride: int, dil: int) -> tuple[int, int]:
    out = -(-size // stride)
    total = max((out - 1) * stride + (k - 1) * dil + 1 - size, 0)
    return total // 2, total - total // 2


def _output_requant(op: Any, t: list[_Tensor], xi: int, wi: int, fused: int) -> _Requant:
    if np.any(t[wi].zero_point != 0):
        raise NotEmulatedError("asymmetric weights are not emulated", "use symmetric weights (eiq_traits)")
    out = t[op.outputs[0]]
    rng = INT_RANGES[out.dtype]
    real = np.float64(t[xi].scale[0]) * t[wi].scale.astype(np.float64) / np.float64(out.scale[0])  # TFLite: double of the float scales
    zp = int(out.zero_point[0])
    return _Requant(real, zp, rng, _act_range(fused, float(out.scale[0]), zp, rng))


@dataclass
class _Weighted:
    """A CONV_2D / FULLY_CONNECTED prepared once: the exact integer GEMM of its weights (:class:`IntegerMatmul`),
    its bias and input zero point folded into one offset, its requantization.

    The accumulator is that of :func:`~nilmc.quantization.intops.conv2d_nhwc` / :func:`~nilmc.quantization.intops.dense`
    (int64 reference, wrapped to int32): raw codes times weights, plus ``bias - x_zp * (weights over the taps inside)``."""

    w: np.ndarray  # OHWI (conv) or [in, out] (dense)
    bias: np.ndarray  # int64, zeros when the op has none
    x_zero_point: int
    geometry: tuple[Any, ...] | None  # (strides, pads, dilations) of a conv, None for a dense layer
    requant: _Requant
    groups: int = 1  # a grouped CONV_2D (the filter's input depth is the input's / groups): a depthwise conv from ONNX
    matmul: IntegerMatmul = field(init=False)
    offsets: dict[tuple[int, ...], tuple[np.ndarray, bool]] = field(default_factory=dict)  # input (H, W) -> (offset, fits int32)

    def __post_init__(self) -> None:
        self.matmul = IntegerMatmul(self.w.reshape(self.w.shape[0], -1).T if self.geometry else self.w)

    def _offset(self, x: np.ndarray) -> tuple[np.ndarray, bool]:
        """``bias - x_zp * (weights over the taps inside)`` and whether ``raw + offset`` always fits int32."""
        key = x.shape[1:3] if self.geometry else ()
        if key not in self.offsets:
            if self.geometry:
                zp_term = conv2d_zero_point_offset(self.w, key, self.x_zero_point, *self.geometry)
            else:
                zp_term = -self.x_zero_point * self.w.astype(np.int64).sum(axis=0)
            offset = zp_term + self.bias
            fits = self.matmul.bound + float(np.max(np.abs(offset), initial=0)) < 2**31 - 1  # |raw| <= bound for int8 codes
            self.offsets[key] = (offset.astype(np.int32) if fits else offset, fits)
        return self.offsets[key]

    def accumulate(self, x: np.ndarray) -> np.ndarray:
        """The int32 accumulator for codes ``x``; it lives in the GEMM's scratch buffer until the next call."""
        if self.geometry and self.groups > 1:
            acc = grouped_conv2d_accumulate(x, self.w, self.groups, *self.geometry)
        elif self.geometry:
            acc = conv2d_accumulate(x, self.w, *self.geometry, matmul=self.matmul, scratch=True)
        else:
            acc = dense_accumulate(x.reshape(-1, self.w.shape[0]), self.w, matmul=self.matmul, scratch=True)
        offset, fits = self._offset(x)
        if fits and acc.dtype == np.int32:
            acc += offset  # exact in int32: nothing to wrap
            return acc
        return wrap(acc.astype(np.int64) + offset, 32)


def _conv(op: Any, t: list[_Tensor], depthwise: bool = False) -> _Weighted:
    o = op.builtinOptions
    xi, wi = op.inputs[0], op.inputs[1]
    bi = op.inputs[2] if len(op.inputs) > 2 and op.inputs[2] >= 0 else None
    w = t[wi].data
    if depthwise:  # (1, KH, KW, C * multiplier) -> OHWI with one input channel: a conv of C groups
        w = np.ascontiguousarray(w.transpose(3, 1, 2, 0))
    sh, sw, dh, dw = int(o.strideH), int(o.strideW), int(o.dilationHFactor or 1), int(o.dilationWFactor or 1)
    pads = (0, 0, 0, 0)
    if int(o.padding) == 0:  # SAME
        h, wd = t[xi].shape[1:3]
        (pt, pb), (pl, pr) = _same_pads(h, w.shape[1], sh, dh), _same_pads(wd, w.shape[2], sw, dw)
        pads = (pt, pl, pb, pr)
    requant = _output_requant(op, t, xi, wi, int(o.fusedActivationFunction))
    bias = np.zeros(w.shape[0], np.int64) if bi is None else t[bi].data.astype(np.int64)
    groups = int(t[xi].shape[3]) // int(w.shape[3])  # TFLite's grouped CONV_2D: the filter holds C / groups input channels
    return _Weighted(w, bias, int(t[xi].zero_point[0]), ((sh, sw), pads, (dh, dw)), requant, groups)


def _fc(op: Any, t: list[_Tensor]) -> _Weighted:
    o = op.builtinOptions
    xi, wi = op.inputs[0], op.inputs[1]
    bi = op.inputs[2] if len(op.inputs) > 2 and op.inputs[2] >= 0 else None
    w = t[wi].data
    requant = _output_requant(op, t, xi, wi, int(o.fusedActivationFunction))
    bias = np.zeros(w.shape[0], np.int64) if bi is None else t[bi].data.astype(np.int64)
    return _Weighted(np.ascontiguousarray(w.T), bias, int(t[xi].zero_point[0]), None, requant)


def _pool(op: Any, t: list[_Tensor], x: np.ndarray, name: str) -> np.ndarray:
    o = op.builtinOptions
    if int(o.padding) == 0 and (x.shape[1] % int(o.strideH) or x.shape[2] % int(o.strideW) or int(o.filterHeight) != int(o.strideH)
                                 or int(o.filterWidth) != int(o.strideW)):
        raise NotEmulatedError(f"{name} with SAME padding that pads is not emulated", "use VALID pooling")
    k, s = (int(o.filterHeight), int(o.filterWidth)), (int(o.strideH), int(o.strideW))
    y = max_pool(x, k, s) if name == "MAX_POOL_2D" else avg_pool(x, k, s)
    out = t[op.outputs[0]]
    rng = INT_RANGES[out.dtype]
    lo, hi = _act_range(int(o.fusedActivationFunction), float(out.scale[0]), int(out.zero_point[0]), rng)
    return np.clip(y, lo, hi).astype(rng.np_dtype)


@dataclass
class _Rescale:
    """QUANTIZE int8 <-> uint8: codes minus the input zero point, requantized to the output grid."""

    x_zero_point: int
    requant: _Requant

    def accumulate(self, x: np.ndarray) -> np.ndarray:
        return x.astype(np.int32) - np.int32(self.x_zero_point)


def _quantize_op(op: Any, t: list[_Tensor]) -> _Rescale:
    i, o = t[op.inputs[0]], t[op.outputs[0]]
    if i.dtype not in ("int8", "uint8") or o.dtype not in ("int8", "uint8"):
        raise NotEmulatedError(f"QUANTIZE {i.dtype}->{o.dtype} is not emulated", "use int8/uint8 I/O")
    rng = INT_RANGES[o.dtype]
    real = np.float64(i.scale[0]) / np.float64(o.scale[0])
    return _Rescale(int(i.zero_point[0]), _Requant(np.array([real]), int(o.zero_point[0]), rng, (rng.lo, rng.hi)))


def _depthwise(op: Any, t: list[_Tensor]) -> _Weighted:
    return _conv(op, t, depthwise=True)


_PREPARE = {"CONV_2D": _conv, "DEPTHWISE_CONV_2D": _depthwise, "FULLY_CONNECTED": _fc, "QUANTIZE": _quantize_op}  # accumulate, requantize
EMULATED_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "RESHAPE", "SQUEEZE", "EXPAND_DIMS", "MAX_POOL_2D", "AVERAGE_POOL_2D",
                "QUANTIZE", "TRANSPOSE", "PAD", "LOGISTIC")


def logistic_table(in_scale: float, in_zp: int, out_scale: float, out_zp: int, rng: Any) -> np.ndarray:
    """TFLite's int8/uint8 LOGISTIC as its kernels build it: a lookup table over every input code, in float32
    (``round(sigmoid(s_in * (q - z_in)) / s_out) + z_out``, rounding half away from zero, clamped). Indexed by
    ``code - rng.lo``. The NPU's own sigmoid unit is assumed to give the same table (not verified on a board)."""
    codes = np.arange(rng.lo, rng.hi + 1, dtype=np.int32)
    x = np.float32(in_scale) * (codes - np.int32(in_zp)).astype(np.float32)
    y = (np.float32(1.0) / (np.float32(1.0) + np.exp(-x))).astype(np.float32)
    q = np.sign(y) * np.floor(np.abs(y * (np.float32(1.0) / np.float32(out_scale))) + np.float32(0.5))
    return np.clip(q.astype(np.int64) + int(out_zp), rng.lo, rng.hi)


def _distinct(xs: list[np.ndarray]) -> tuple[list[np.ndarray], list[int]]:
    """The distinct arrays of ``xs`` (by identity) and, for each entry, its index among them."""
    seen: dict[int, int] = {}
    index = [seen.setdefault(id(x), len(seen)) for x in xs]
    return [xs[index.index(k)] for k in range(len(seen))], index


class _IntegerGraph:
    """The integer graph of a full-integer flatbuffer, prepared once and run for several multiplier widths together.

    The runs share what their inputs share: an op whose input is the same array for every width (the first
    layer's, for one) accumulates once, and where inputs differ only the windows that differ are accumulated
    again, stacked under the first run's in one GEMM. Requantization is per width."""

    def __init__(self, fb: bytes, start: tuple[int, int] | None = None) -> None:
        m = load_flatbuffer(fb)
        sg = m.subgraphs[0]
        self.t = _read_tensors(m)
        # start: (tensor, first op) of the NPU partition when a CPU stage comes first (precise input)
        self.input, self.output = (int(sg.inputs[0]) if start is None else start[0]), int(sg.outputs[0])
        self.steps: list[tuple[str, Any, Any]] = []
        for op in sg.operators[0 if start is None else start[1]:]:
            name = op_name(op_code(m, op))
            if name not in EMULATED_OPS:
                raise NotEmulatedError(f"op {name} has no integer emulation", f"emulated: {', '.join(EMULATED_OPS)}")
            self.steps.append((name, op, _PREPARE[name](op, self.t) if name in _PREPARE else None))

    def run(self, x_codes: np.ndarray, widths: tuple[int, ...]) -> dict[int, np.ndarray]:
        """Output codes of input codes ``x_codes`` for each multiplier width in ``widths``."""
        vals: dict[int, list[np.ndarray]] = {self.input: [np.asarray(x_codes)] * len(widths)}
        for name, op, prepared in self.steps:
            ins, index = _distinct(vals[op.inputs[0]])
            if prepared is None:  # reshapes, pools and lookup tables: no requantization multiplier
                done = [self._shape_op(name, op, x) for x in ins]
                outs = [done[k] for k in index]
            else:
                outs = self._accumulate_and_requantize(prepared, ins, [(k, bits) for k, bits in zip(index, widths)])
            vals[int(op.outputs[0])] = outs
        return dict(zip(widths, vals[self.output]))

    @staticmethod
    def _accumulate_and_requantize(prepared: Any, ins: list[np.ndarray], runs: list[tuple[int, int]]) -> list[np.ndarray]:
        """Output codes of an accumulating op for each run ``(index into ins, multiplier bits)``.

        Windows where an input equals the first one share its accumulator: only the windows that differ (a few
        percent after the first layers, about half at the end) join the first input's in one GEMM."""
        base, n = ins[0], len(ins[0])
        per_window = int(np.prod(base.shape[1:]))
        differ = [np.flatnonzero(np.any((x != base).reshape(n, per_window), axis=1)) for x in ins[1:]]
        acc = prepared.accumulate(np.concatenate([base, *(x[rows] for x, rows in zip(ins[1:], differ))]) if differ else base)
        ends = np.cumsum([n, *(len(rows) for rows in differ)])
        outs = []
        for k, bits in runs:
            y = prepared.requant(acc[:n], bits)
            if k:
                y[differ[k - 1]] = prepared.requant(acc[ends[k - 1]:ends[k]], bits)
            outs.append(y)
        return outs

    def _shape_op(self, name: str, op: Any, x: np.ndarray) -> np.ndarray:
        if name in ("MAX_POOL_2D", "AVERAGE_POOL_2D"):
            return _pool(op, self.t, x, name)
        if name == "TRANSPOSE":  # codes move, grid unchanged (TFLite's int8 TRANSPOSE keeps scale and zero point)
            perm = [int(v) for v in np.asarray(self.t[op.inputs[1]].data).ravel()]
            return np.ascontiguousarray(np.transpose(x, perm))
        if name == "LOGISTIC":  # a lookup table from the input grid to the output grid: no multiplier to requantize with
            src, dst = self.t[op.inputs[0]], self.t[op.outputs[0]]
            rng = INT_RANGES[dst.dtype]
            table = logistic_table(float(src.scale[0]), int(src.zero_point[0]), float(dst.scale[0]), int(dst.zero_point[0]), rng)
            return table[np.asarray(x, np.int64) - rng.lo].astype(x.dtype)
        if name == "PAD":  # filled with the zero point (0.0), grid unchanged
            pads = np.asarray(self.t[op.inputs[1]].data).reshape(-1, 2).astype(np.int64)
            return np.pad(x, [(0, 0), *(tuple(p) for p in pads[1:])], constant_values=int(self.t[op.inputs[0]].zero_point[0]))
        return x.reshape((len(x), *self.t[op.outputs[0]].shape[1:]))


def emulate_int8_widths(fb: bytes, x_codes: np.ndarray, *, multiplier_bits: tuple[int, ...] = (32, 16),
                        start: tuple[int, int] | None = None) -> dict[int, np.ndarray]:
    """Run the integer graph of ``fb`` on input codes ``x_codes`` once for each requantization multiplier width in
    ``multiplier_bits`` (default (32, 16)); returns ``{bits: output codes}``. ``start`` (default None: the graph input):
    ``(tensor, first op)`` where the integer graph begins, ``x_codes`` being that tensor's codes (:func:`npu_start`).

    Bit-exact with nilmc's :mod:`~nilmc.quantization.intops` reference ops (int64 accumulation, :func:`requantize`)
    but computed with exact integer GEMMs (:class:`IntegerMatmul`) on :data:`_WINDOWS_PER_PASS` windows at a time,
    the widths side by side. Covers :data:`EMULATED_OPS`; others raise :class:`NotEmulatedError`."""
    graph = _IntegerGraph(fb, start)
    widths = tuple(int(b) for b in multiplier_bits)
    x_codes = np.asarray(x_codes)
    parts: dict[int, list[np.ndarray]] = {b: [] for b in widths}
    for i in range(0, max(len(x_codes), 1), _WINDOWS_PER_PASS):
        for bits, y in graph.run(x_codes[i:i + _WINDOWS_PER_PASS], widths).items():
            parts[bits].append(y)
    return {bits: np.concatenate(ys) for bits, ys in parts.items()}


def emulate_int8(fb: bytes, x_codes: np.ndarray, *, multiplier_bits: int = 32, start: tuple[int, int] | None = None) -> np.ndarray:
    """Run the integer graph of ``fb`` (nilmc's :mod:`~nilmc.quantization.intops` integer semantics) on input
    codes ``x_codes``; returns the output codes. ``multiplier_bits``: 32 (default) = TFLite's requantization, 16 = the
    NPU hypothesis (16-bit normalized multiplier). Covers :data:`EMULATED_OPS`; others raise :class:`NotEmulatedError`.
    For both widths at once (sharing the work) use :func:`emulate_int8_widths`."""
    return emulate_int8_widths(fb, x_codes, multiplier_bits=(multiplier_bits,), start=start)[multiplier_bits]


def not_emulated(fb: bytes, start: tuple[int, int] | None = None) -> list[str]:
    """The ops of ``fb`` (from ``start``'s first op, :func:`npu_start`) outside :data:`EMULATED_OPS`, sorted."""
    return sorted({o["op"] for o in graph_ops(fb)[0 if start is None else start[1]:]} - set(EMULATED_OPS))


def npu_start(fb: bytes, partition: Mapping[str, Any]) -> tuple[int, int] | None:
    """``(tensor, first op)`` where the NPU partition of a precise-input graph begins: the CPU ops are the first ops and
    end in a QUANTIZE whose int8 output is the one tensor the NPU reads; None when the graph is not so (no CPU stage,
    or CPU ops elsewhere)."""
    cpu = sorted(c["index"] for c in partition["cpu"])
    if not cpu or cpu != list(range(len(cpu))):
        return None
    m = load_flatbuffer(fb)
    ops = m.subgraphs[0].operators
    last = ops[cpu[-1]]
    if op_name(op_code(m, last)) != "QUANTIZE" or len(cpu) >= len(ops):
        return None
    cut = int(last.outputs[0])
    later = {int(i) for op in ops[len(cpu):] for i in op.inputs if i >= 0}
    earlier = {int(o) for op in ops[: len(cpu)] for o in op.outputs}
    return (cut, len(cpu)) if later & earlier == {cut} else None


def stage_codes(fb: bytes, x: np.ndarray, tensor: int) -> np.ndarray:
    """Codes of ``tensor`` when the TFLite interpreter (builtin reference kernels) runs ``fb`` on model inputs ``x``:
    what the CPU stage hands the NPU partition."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    it = Interpreter(model_content=fb, num_threads=1, experimental_preserve_all_tensors=True,
                     experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    inp = it.get_input_details()[0]
    it.resize_tensor_input(inp["index"], [len(x), *[int(d) for d in inp["shape_signature"][1:]]], strict=False)
    it.allocate_tensors()
    it.set_tensor(inp["index"], np.asarray(x, inp["dtype"]))
    it.invoke()
    return np.asarray(it.get_tensor(tensor)).copy()


def _input_codes(x: np.ndarray, io: Mapping[str, Any]) -> np.ndarray:
    if io["dtype"] == "float32":  # precise input: the model takes the float windows themselves
        return np.asarray(x, np.float32)
    rng = INT_RANGES[io["dtype"]]
    return quantize(np.asarray(x, np.float32), io["scale"], io["zero_point"], rng, rounding=Rounding.HALF_AWAY)


def _units(codes: np.ndarray, io: Mapping[str, Any]) -> np.ndarray:
    # every output value per window: the contract's output selector picks the step of a sequence output
    return ((codes.astype(np.int64) - io["zero_point"]).astype(np.float32) * np.float32(io["scale"])).reshape(len(codes), -1)


def _cpu_codes(fb: bytes, x_codes: np.ndarray, *, default_delegates: bool) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    kw = {} if default_delegates else {"experimental_op_resolver_type": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES}
    it = Interpreter(model_content=fb, num_threads=1, **kw)
    it.allocate_tensors()
    return invoke_windows(it, x_codes.astype(it.get_input_details()[0]["dtype"]))


def npu_emulation(fb: bytes, x: np.ndarray, model: Model, calibration: Any = None, *, start: tuple[int, int] | None = None) -> dict[str, Any]:
    """Emulated NPU drift on windows ``x`` (normalized): 32-bit emulation vs the TFLite CPU interpreter (sanity),
    16-bit vs 32-bit emulation in output codes and watts, and EACC on ``calibration`` labels when given. ``start``
    (:func:`npu_start`): the NPU partition of a precise-input graph, fed the CPU stage's codes (:func:`stage_codes`)."""
    io = io_quantization(fb)
    xq = _input_codes(x, io["input"])
    e32, e16 = emulate_int8_widths(fb, xq if start is None else stage_codes(fb, xq, start[0]), multiplier_bits=(32, 16), start=start).values()
    cpu = _cpu_codes(fb, xq, default_delegates=True)
    ref = _cpu_codes(fb, xq, default_delegates=False)
    d = lambda a, b: np.abs(a.astype(np.int64) - b.astype(np.int64)).ravel()  # noqa: E731
    c = model.contract
    w32, w16 = (np.asarray(c.to_watts(_units(e, io["output"]))).ravel() for e in (e32, e16))
    dw = np.abs(w16 - w32)
    out: dict[str, Any] = {
        "label": "emulated", "windows": int(len(x)),
        "hypothesis": "NPU requantizes with a 16-bit normalized multiplier (gemmlowp-style high-mul + rounding shift); "
                      "accumulation, zero points, clamping as TFLite. Not measured on an i.MX 8M Plus.",
        "emulated_ops": list(EMULATED_OPS),
        "npu_input": ("the graph input's codes" if start is None else
                      "the CPU stage's int8 codes (float32 layers + QUANTIZE, TFLite builtin kernels): the NPU partition alone is emulated"),
        "check_32bit_vs_cpu_interpreter": {"max_lsb": int(d(e32, cpu).max()), "frac_differing": float(np.mean(d(e32, cpu) > 0)),
                                           "runtime": "ai_edge_litert default (XNNPACK) kernels"},
        "check_32bit_vs_cpu_builtin_kernels": {"max_lsb": int(d(e32, ref).max()), "frac_differing": float(np.mean(d(e32, ref) > 0)),
                                               "runtime": "ai_edge_litert BUILTIN_WITHOUT_DEFAULT_DELEGATES"},
        "drift_16bit_output_codes": {"max_lsb": int(d(e16, e32).max()), "mean_lsb": float(d(e16, e32).mean()),
                                     "frac_differing": float(np.mean(d(e16, e32) > 0))},
        "drift_16bit_watts": {"max_w": float(dw.max()), "mean_w": float(dw.mean()), "output_step_w": _step_w(io["output"], c)},
    }
    if calibration is not None:
        from nilmc.compiler.metrics import nilm_metrics

        y = calibration.y[: len(x), calibration.appliance_index(c.appliance)]
        e = {k: float(nilm_metrics(y, w, on_threshold_w=c.on_threshold_w).eacc) for k, w in (("32bit", w32), ("16bit", w16))}
        out["eacc_calibration"] = {**e, "delta_16_minus_32": e["16bit"] - e["32bit"]}
    return out


def _step_w(io_out: Mapping[str, Any], contract: Any) -> float:
    w = np.asarray(contract.values_to_watts(np.array([0.0, float(io_out["scale"])], np.float32))).ravel()
    return float(abs(w[1] - w[0]))


# --------------------------------------------------------------------------- hand-off
_HANDOFF_PY = '''#!/usr/bin/env python3
"""Run model_eiq.tflite on the i.MX 8M Plus NPU through the VX delegate (written by nilmc).

Usage on the board:  python3 run_on_imx8mp.py [--cpu] [--delegate {delegate}]
Compares the NPU output with imx8mp_cpu_reference.npy (the CPU interpreter's output codes, taken by nilmc).
"""
import argparse, time
from pathlib import Path
import numpy as np
try:
    from tflite_runtime.interpreter import Interpreter, load_delegate
except ImportError:
    from ai_edge_litert.interpreter import Interpreter, load_delegate

here = Path(__file__).resolve().parent
ap = argparse.ArgumentParser()
ap.add_argument("--delegate", default="{delegate}")
ap.add_argument("--cpu", action="store_true", help="no delegate (Cortex-A53 reference)")
a = ap.parse_args()
delegates = [] if a.cpu else [load_delegate(a.delegate)]
it = Interpreter(model_path=str(here / "model_eiq.tflite"), experimental_delegates=delegates, num_threads=1)
inp, out = it.get_input_details()[0], it.get_output_details()[0]
x = np.load(here / "imx8mp_windows.npy")  # input codes, {io_dtype}
it.allocate_tensors()
codes, times = [], []
for i in range(len(x)):  # batch 1, as deployed; each window a new sequence (recurrent state reset)
    it.reset_all_variables()
    it.set_tensor(inp["index"], x[i : i + 1])
    t0 = time.perf_counter(); it.invoke(); times.append(time.perf_counter() - t0)
    codes.append(it.get_tensor(out["index"]).copy())
codes = np.concatenate(codes)
ref = np.load(here / "imx8mp_cpu_reference.npy")
d = np.abs(codes.astype(np.int64) - ref.astype(np.int64))
print(f"first invoke (graph compile) {{times[0]*1e3:.1f}} ms, median {{np.median(times[1:])*1e3:.3f}} ms")
print(f"vs CPU reference: max {{d.max()}} LSB, {{np.mean(d > 0)*100:.1f}}% of outputs differ; emulated prediction in manifest npu_emulation")
np.save(here / "imx8mp_npu_output.npy", codes)
'''

_HANDOFF_SH = '''#!/bin/sh
# Run on an i.MX 8M Plus (NXP Yocto BSP with eIQ / meta-ml). Written by nilmc.
set -e
cd "$(dirname "$0")"
python3 run_on_imx8mp.py "$@"
# Latency with TFLite's benchmark tool (path as in the NXP BSP):
# /usr/bin/tensorflow-lite-*/examples/benchmark_model --graph=model_eiq.tflite --external_delegate_path={delegate}
'''


def write_handoff(out_dir: Path, fb: bytes, x: np.ndarray) -> list[str]:
    """Board hand-off: scripts, input codes of ``x`` and the CPU interpreter's output codes for them."""
    import io as _io

    io = io_quantization(fb)
    xq = _input_codes(x, io["input"])
    ref = _cpu_codes(fb, xq, default_delegates=True)
    files = {"run_on_imx8mp.py": _HANDOFF_PY.format(delegate=VX_DELEGATE, io_dtype=io["input"]["dtype"]).encode(),
             "run_on_imx8mp.sh": _HANDOFF_SH.format(delegate=VX_DELEGATE).encode()}
    for name, arr in (("imx8mp_windows.npy", xq), ("imx8mp_cpu_reference.npy", ref)):
        buf = _io.BytesIO()
        np.save(buf, arr, allow_pickle=False)
        files[name] = buf.getvalue()
    for name, data in files.items():
        atomic_write_bytes(out_dir / name, data)
    (out_dir / "run_on_imx8mp.sh").chmod(0o755)
    return list(files)


# --------------------------------------------------------------------------- backend
@dataclass(frozen=True)
class EiqOptions:
    """Typed options of the eIQ backend (``--option eiq.NAME=VALUE``): ``npu_emulation`` (default True: emulate the
    NPU's 16-bit requantization drift on the calibration windows), ``estimator`` (default: the shared pipeline's),
    ``cpu_layers`` (default ``auto``: precise input for int8 / int8_pt, the layers reading the graph input in FP32 on the
    CPU; ``none``: the full-integer graph, all on the NPU)."""

    npu_emulation: bool = True
    estimator: str | None = None
    cpu_layers: str = "auto"

    def __post_init__(self) -> None:
        check_cpu_layers(self.cpu_layers, "eiq")

    def quant_traits(self, precision: str, traits: Any) -> Any:
        """The traits ``eiq:<precision>`` derives its parameters under with these options (full integer under
        ``cpu_layers=none``), as :attr:`EIQBackend.capabilities` declares them for the defaults."""
        if precision not in PRECISIONS:
            return traits
        spec = eiq_spec(precision, self.cpu_layers)
        return spec.traits.with_(io_dtype=spec.io_dtype)


class EIQBackend:
    """NXP eIQ: full-integer TFLite for the i.MX 8M Plus NPU, checked for the VX delegate, with an NPU drift emulation."""

    name = "eiq"
    capabilities = Capabilities(
        precisions=tuple(PRECISIONS),
        description="NXP eIQ (i.MX 8M Plus NPU via the VX delegate): full-integer TFLite from nilmc's ranges, "
                    "per-channel (int8) or per-tensor (int8_pt, uint8_io) weights; CPU interpreter reference + emulated NPU drift",
        traits={p: spec.traits.with_(io_dtype=spec.io_dtype) for p, spec in EIQ_SPECS.items()},
        options=EiqOptions,
        requires=("tensorflow", "ai_edge_litert"),
        extra="eiq",
        limitations={
            "needs_keras_source": "not needed: an ONNX model (a PyTorch export) lowers through onnx2tf; Conv/Gemm/MatMul layers with Relu/Clip and data "
                           "movement only (the pre-check refuses other ops)",
            "cpu_fallback": "a Keras model with Conv1D / BatchNormalization / LSTM: ops outside the NPU allow-list or in float32 (the LSTM cells) "
                            "run on the CPU; info['partition'] lists where each op runs, and the NPU drift is then not emulated",
            "npu": NPU_NOTE,
            "ops": f"only {', '.join(VX_ALLOWED_OPS)} (allow-list assumed from NXP IMXMLUG); other ops raise UnsupportedOpError",
            "emulation": f"the NPU drift emulation covers {', '.join(EMULATED_OPS)} with a 16-bit multiplier hypothesis",
            "precise_input": "int8 / int8_pt run the layers reading the graph input in FP32 on the application CPU (float32 input "
                             "tensor, int8 output) unless eiq.cpu_layers=none; uint8_io is full integer",
        },
    )

    def lower(self, model: Model, out_dir: Path, *, precision: str = "int8", options: Mapping[str, Any] | None = None) -> Artifact:
        """Write ``model_eiq.tflite``, ``eiq_check.json`` and the board hand-off into ``out_dir``.

        Options: ``quant`` (QuantContext, required), ``calibration`` (its labels give the emulated EACC),
        ``npu_emulation`` (default True), ``estimator`` (default: the context's), ``cpu_layers`` (default ``auto``: precise
        input for int8 / int8_pt; ``none``: full integer)."""
        if precision not in PRECISIONS:
            raise BadInputError(f"eiq has no precision {precision!r}", f"available: {', '.join(PRECISIONS)}")
        require_tflite(extra="eiq")
        options = dict(options or {})
        out_dir = Path(out_dir)
        spec = eiq_spec(precision, str(options.get("cpu_layers", "auto")))
        where = f"model {model.source or '?'!r}"
        partition, tail = None, None
        if model.keras_path and keras_placeable(keras_model := load_keras(model)):
            derived = integer_params(model, keras_model, spec, options, estimator=options.get("estimator"))
            result, check = build_full_integer(keras_model, derived.kq, derived.calib_x, spec, where=where, float_input=len(derived.precise),
                                               float_prefix=derived.prefix)
        elif model.keras_path:  # Conv1D / BatchNormalization / recurrent layers: planned from the ONNX graph
            from nilmc.backends.onnx_to_tf import build_int8_from_keras, build_int8_with_float_tail, float_tail, onnx_integer_params

            tail = float_tail(model.graph)
            derived = onnx_integer_params(model, spec, options, estimator=options.get("estimator"), tail=tail)
            if tail is None:
                result = build_int8_from_keras(keras_model, model, derived.params, derived.calib_x, spec, float_input=len(derived.precise),
                                               float_prefix=derived.prefix)
            else:  # the layers from the first one the integer route refuses (a GRU, a transposed conv): float32 on the CPU
                result, tail_fb = build_int8_with_float_tail(keras_model, model, derived.params, derived.calib_x, spec, tail,
                                                             float_input=len(derived.precise), float_prefix=derived.prefix)
                atomic_write_bytes(out_dir / TAIL_FILE, tail_fb)
            # float recurrent cells, BatchNormalization's MUL: the VX delegate leaves what the NPU cannot run to the CPU
            check = check_graph(result.flatbuffer, replace(spec, allowed_ops=None, integer_only=False), where=where)
            partition = check["partition"] = npu_partition(result.flatbuffer, _cpu_reasons(result))
        else:  # an ONNX source: onnx2tf, then the same parameters written into the converter's graph
            from nilmc.backends.onnx_to_tf import build_int8_from_onnx, onnx_integer_params

            derived = onnx_integer_params(model, spec, options, estimator=options.get("estimator"))
            result = build_int8_from_onnx(model, derived.params, derived.calib_x, spec, float_input=len(derived.precise),
                                          float_prefix=derived.prefix)
            check = check_graph(result.flatbuffer, spec, where=where)
        if result.float_layers and partition is None:  # precise input: the float layers run on the CPU before the NPU
            partition = check["partition"] = npu_partition(result.flatbuffer, _cpu_reasons(result))
        calib_x = derived.calib_x
        fb = result.flatbuffer
        check["precision"], check["io"] = precision, io_quantization(fb)
        atomic_write_bytes(out_dir / PRIMARY, fb)
        atomic_write_json(out_dir / "eiq_check.json", check)
        extra = ["eiq_check.json"] + write_handoff(out_dir, fb, calib_x[:HANDOFF_WINDOWS])
        info = _info(spec, derived, result, check, extra)
        info["cpu_layers"] = "auto" if spec.float_input else "none"
        tail_why = {} if tail is None else dict.fromkeys(sorted(tail.nodes), TAIL_WHY.format(first=tail.first_op) + " on the application CPU (Cortex-A53)")
        info["placement"] = {**manifest_placement(model.graph, derived.params, result, derived.precise, where=CPU_STAGE, prefix=derived.prefix,
                                                  tail=tail_why),
                             **({"devices": _devices(fb, partition)} if partition is not None else {})}
        if tail is not None:
            names = [layer.name for layer in keras_model.layers]
            info["float_tail"] = {"file": TAIL_FILE, "cut": tail.cut, "first_op": tail.first_op, "keras_layers": names[names.index(tail.layer):],
                                  "device": "CPU (Cortex-A53), float32, after the NPU stage", "runs": TAIL_RUNS, "io": check["io"]["output"]}
            info["handoff"]["float_tail"] = (f"{PRIMARY} runs on the NPU as the scripts run it; {TAIL_FILE} then runs on the CPU on its "
                                             "dequantized output (tflite_runtime Interpreter, no delegate)")
        ignored = kept_float_ignored(derived.params, (*derived.float_layers, *(tail.nodes | tail.tensors if tail else ())))
        if ignored:
            info["keep_float_ignored"] = ignored
        if not model.keras_path:
            from nilmc.backends.onnx_to_tf import ONNX2TF

            info["tools"] = ["onnx2tf", *info["tools"]]
            info["route"] = f"ONNX -> {ONNX2TF} (tf_keras) -> TFLiteConverter (full integer) -> nilmc's parameters written into every tensor"
        if model.keras_path and not keras_placeable(keras_model):
            info["route"] = "Keras -> TFLiteConverter (full integer" + (", batch-1 signature" if recurrent_layers(keras_model) else "") + \
                            ") -> nilmc's parameters (keyed by the model's ONNX graph) written into every int8 tensor"
            info["tflite_placement"] = tflite_int8.tflite_placement(fb, {f["index"]: f["why"] for f in result.float_layers})
        start = npu_start(fb, partition) if partition is not None and partition["cpu"] else None
        if partition is not None:
            info["partition"] = partition
            info["verification_note"] = NPU_NOTE + "; ops outside the NPU partitions run on the Cortex-A53 (CPU), listed in 'partition'"
        unemulated = not_emulated(fb, start)
        if options.get("npu_emulation", True) and tail is not None:
            info["npu_emulation"] = {"label": "not verified", "why": f"a float32 tail stage ({TAIL_FILE}) follows the NPU graph: the drift "
                                                                     "emulation scores one integer graph's output, so no drift is claimed"}
        elif options.get("npu_emulation", True) and partition is not None and partition["cpu"] and start is None:
            info["npu_emulation"] = {"label": "not verified",
                                     "why": f"the integer emulation covers {', '.join(EMULATED_OPS)}; the graph also runs "
                                            f"{', '.join(sorted({c['op'] for c in partition['cpu']}))} on the CPU, so the NPU drift is not emulated"}
        elif options.get("npu_emulation", True) and unemulated:
            # e.g. MEAN: how the NPU requantizes a mean is not known, so no drift is claimed for it
            info["npu_emulation"] = {"label": "not verified",
                                     "why": f"the integer emulation covers {', '.join(EMULATED_OPS)}; the NPU partition also runs "
                                            f"{', '.join(unemulated)}, so the NPU drift is not emulated"}
        elif options.get("npu_emulation", True):
            info["npu_emulation"] = npu_emulation(fb, calib_x, model, options.get("calibration", derived.calibration), start=start)
        weights = "per-tensor" if spec.per_tensor else "per-channel"
        grown = any(f.get("float_prefix") for f in result.float_layers)
        io = (f"precise input: {len(result.float_layers)} layer(s) reading the float32 input in FP32 on the CPU, int8 output" if not grown
              else f"precise input: {float_layers_phrase(result.float_layers, ' on the CPU')}, float32 input, int8 output"
              if result.float_layers else f"{spec.io_dtype} I/O")
        emulated = (f"{len(partition['cpu'])} op(s) on the CPU, NPU drift not emulated" if partition is not None and partition["cpu"] and start is None
                    else "NPU drift not emulated" if tail is not None else "NPU emulated")
        kind = (f"eIQ {'' if result.float_layers else 'full-integer '}TFLite for the i.MX 8M Plus NPU ({weights} int8 weights, {io}; "
                f"CPU reference run, {emulated})")
        if tail is not None:
            kind = kind.removesuffix(")") + f"; float32 tail from {tail.layer} on the CPU, {TAIL_FILE})"
        return Artifact(self.name, precision, out_dir, PRIMARY, [PRIMARY, *([TAIL_FILE] if tail is not None else [])], kind=kind, info=info)

    def precheck(self, model: Model, precision: str) -> str | None:
        """What keeps ``model`` from ``eiq:<precision>``, from the graph alone in milliseconds (None: nothing found)."""
        if precision not in PRECISIONS:
            return None
        if model.keras_path:
            from nilmc.backends.onnx_to_tf import keras_int8_precheck

            return keras_int8_precheck(model.graph, f"eiq:{precision}", tail=True)
        from nilmc.backends.onnx_to_tf import ONNX2TF, int8_precheck, onnx2tf_available, onnx2tf_precheck

        if not onnx2tf_available():
            return f"eiq:{precision} lowers an ONNX model through onnx2tf, which is not installed; pip install 'nilmc[eiq]' ({ONNX2TF})"
        # what onnx2tf cannot convert is said first (as tflite does): it failed after seconds of conversion otherwise
        return onnx2tf_precheck(model.graph, f"eiq:{precision}") or int8_precheck(model.graph, f"eiq:{precision}")

    def runner(self, artifact: Artifact) -> Any:
        """The ai_edge_litert CPU interpreter on the artifact (MEASURED: CPU reference of the eIQ artifact)."""
        from nilmc.backends.tflite_backend import TFLiteRunner, tail_path

        return TFLiteRunner(artifact.path, tail=tail_path(artifact))


def _cpu_reasons(result: Any) -> dict[int, str]:
    """Op index -> why it runs on the CPU, for precise input's float layers and the QUANTIZE after each."""
    reasons = {i: why + CPU_STAGE for i, why in result.plan.float_moves.items()}
    for f in result.float_layers:
        reasons[f["index"]] = precise_why(CPU_STAGE)
        reasons[f["index"] + 1] = f"QUANTIZE of the FP32 layer's output onto nilmc's int8 grid{CPU_STAGE}: the NPU partition's input"
    return reasons


def _devices(fb: bytes, partition: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every op of ``fb`` with the device it runs on (NPU or CPU) and, for the CPU ones, why (the DPU's vocabulary)."""
    cpu = {c["index"]: c["why"] for c in partition["cpu"]}
    return [{"op": f"{o['op']}:{i}", "kind": o["op"], "device": "CPU" if i in cpu else "NPU", **({"why": cpu[i]} if i in cpu else {})}
            for i, o in enumerate(graph_ops(fb))]


def _info(spec: FullIntegerSpec, derived: Any, result: Any, check: dict[str, Any], extra: list[str]) -> dict[str, Any]:
    """The artifact's ``info``: parameters, overflow report, traits, checks and the board hand-off."""
    return {
        "tools": ["tensorflow", "ai-edge-litert"], "quantization": derived.params.to_json(), "overflow": derived.overflow.to_json(),
        "traits": spec.traits.with_(io_dtype=spec.io_dtype).to_json(), "per_tensor": spec.per_tensor, "io_dtype": spec.io_dtype,
        "param_check": {k: v for k, v in result.check.items() if k != "mismatches"}, "io": check["io"],
        "eiq_check": {k: check[k] for k in ("op_counts", "integer_only", "weights_per_tensor", "tensor_dtypes")},
        "runtime": "ai_edge_litert Interpreter (CPU, 1 thread): CPU reference of the eIQ artifact",
        "verification_note": NPU_NOTE, "npu": "not run (needs an i.MX 8M Plus board)",
        "handoff": {"command": "sh run_on_imx8mp.sh", "delegate": VX_DELEGATE,
                    "benchmark": f"benchmark_model --graph={PRIMARY} --external_delegate_path={VX_DELEGATE}"},
        "extra_files": extra,
    }


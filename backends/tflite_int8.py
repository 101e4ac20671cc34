"""TFLite conversion, and full-integer TFLite built from nilmc's own parameters.

This is the internal API the ``tflite`` and ``eiq`` backends share:

* :func:`convert_keras` — the TFLite converter for FP32, FP16, dynamic-range INT8, the
  converter's own full-integer PTQ (``vendor_ptq``, for comparisons) and the structural
  full-integer conversion used below.
* :func:`build_int8_tflite` — a full-integer flatbuffer whose every quantization
  parameter is nilmc's: ``(keras_model, KerasQuant, representative windows, per_tensor,
  io_dtype) -> FullIntegerTFLite``.

How :func:`build_int8_tflite` works, and why this route
    The converter is run once in full-integer mode to get the graph TFLite wants (op
    choice, fusion of bias and ReLU, layouts, int32 biases, the I/O (de)quantize ops);
    its representative set (a few windows) only serves that. Then, with the flatbuffer
    schema object API, every tensor's parameters are overwritten with nilmc's: activation
    scale / zero point, per-channel (or per-tensor) int8 weight codes requantized from the
    float Keras weights at nilmc's scales, int32 bias codes at ``s_in * s_w``. The
    converter's own ranges survive nowhere.

    The other route — tfmot's ``quantize_model`` with every FakeQuant min/max set from
    nilmc, converted with ``optimizations=[DEFAULT]`` — reproduced nilmc's activation
    parameters exactly (checked), but the converter refuses per-channel fake-quant on
    Dense kernels ("'tfl.transpose' op has mismatched quantized axes"), so Dense weights
    would stay per tensor while nilmc's TFLite traits (and the converter's own PTQ) are
    per channel. Rewriting keeps per-channel Dense, makes ``per_tensor`` a plain option
    and serves QAT the same way (:mod:`nilmc.quantization.qat` reads its ranges back).

Tensors are matched to nilmc's by structure: the k-th CONV_2D / FULLY_CONNECTED op is the
k-th Keras Conv2D / Dense layer (names checked when the converter kept them), its input,
output, weight and bias tensors get that layer's parameters, and RESHAPE / SQUEEZE /
EXPAND_DIMS / MAX_POOL_2D / AVERAGE_POOL_2D outputs and int8<->uint8 QUANTIZE ops share their input's grid.
Any quantized tensor left unmatched is an error, never a silent converter range.
Buffers are written 16-byte aligned.

Use (what the tflite backend does; the eiq backend the same with its own traits)::

    traits = tflite_traits(per_tensor=True)                 # or base=<traits with symmetric weights>
    params = ctx.params(traits)                             # QuantContext from options["quant"]
    kq = widen_output(keras_quant_from_params(keras_model, params), model.contract)
    res = build_int8_tflite(keras_model, kq, ctx.calib_x, per_tensor=True, io_dtype="uint8")
    res.flatbuffer, res.check                               # bytes, read-back comparison

TFLite's int8 kernels need symmetric weights (zero point 0): asymmetric weight parameters
are refused with a :class:`QuantizationError`.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nilmc.compiler.errors import BadInputError, InternalError, QuantizationError
from nilmc.quantization.intops import Rounding, quantize
from nilmc.quantization.params import TensorQuant, bias_quant
from nilmc.quantization.traits import TFLITE_INT8, QuantTraits

if TYPE_CHECKING:
    from nilmc.compiler.model import Model
    from nilmc.quantization.qat import KerasLayerQuant, KerasQuant

IO_DTYPES = ("int8", "uint8", "float")
INT16X8_IO_DTYPES = ("int16", "float")  # what the converter's 16x8 mode takes as inference_input/output_type
ACTIVATIONS = ("int8", "int16")  # the activation type of a full-integer graph: int8, or int16 (TFLite's 16x8 mode)
CONVERT_MODES = ("fp32", "fp16", "dynamic_int8", "full_int8", "full_int16x8", "vendor_ptq")
STRUCTURE_WINDOWS = 32  # representative windows for the structural conversion (ranges are overwritten)
RECURRENT_LAYERS = frozenset({"LSTM", "GRU", "SimpleRNN", "RNN", "ConvLSTM1D", "ConvLSTM2D"})
# TFLite ops the full-integer lowering keeps in float32 between its int8 neighbours: the recurrent cells nilmc has no
# parameters for (its analysis leaves ONNX LSTM/GRU float too). TFLite's own int8 LSTM needs the converter's ranges for
# every gate and a 16-bit cell state, which nilmc does not derive.
FLOAT_KEPT_OPS = ("UNIDIRECTIONAL_SEQUENCE_LSTM", "BIDIRECTIONAL_SEQUENCE_LSTM", "UNIDIRECTIONAL_SEQUENCE_RNN", "BIDIRECTIONAL_SEQUENCE_RNN")
_ALIGN = 16
# Precise input (``cpu_layers``): "auto" runs the layers reading the graph input as float32 TFLite ops (the input is never
# put on an 8-bit grid; a QUANTIZE after each puts its output on nilmc's grid), "none" keeps the full-integer graph.
CPU_LAYERS = ("auto", "none")
PRECISE_INPUT = ("precise input: reads the float graph input, runs in FP32{where} (the input is never quantized; a QUANTIZE after it puts "
                 "its output on nilmc's int8 grid)")


# A Keras source whose refused layers (a GRU's WHILE loop, a transposed conv) form a tail after one tensor
# (:func:`~nilmc.backends.onnx_to_tf.float_tail`): the integer stage up to that tensor, the tail as a second, float32 file.
TAIL_SUFFIX = "_tail_fp32.tflite"
TAIL_WHY = ("float tail: from {first} (an op the full-integer TFLite route cannot take) to the output, the layers run in a "
            "float32 TFLite stage after the integer one")
TAIL_RUNS = ("the integer stage's int8 output, dequantized with its scale and zero point, is the float32 tail's input "
             "(two interpreters in sequence, as TFLiteRunner runs them)")
TAIL_ROUTE = "the layers from {layer} on: Keras -> TFLiteConverter (float32) as a second stage"


def tail_path(artifact: Any) -> Path | None:
    """The float32 tail stage of a TFLite artifact (None without one)."""
    tail = artifact.info.get("float_tail")
    return artifact.directory / tail["file"] if isinstance(tail, dict) and tail.get("file") else None


def precise_why(where: str = "") -> str:
    """Why a layer of a precise-input graph runs in FP32, ``where`` (e.g. " on the application CPU") said."""
    return PRECISE_INPUT.format(where=where)

# TFLite builtin operator codes (schema.fbs) used here.
CONV_2D, DEPTHWISE_CONV_2D, DEQUANTIZE, FULLY_CONNECTED, MAX_POOL_2D, RESHAPE, QUANTIZE = 3, 4, 6, 9, 17, 22, 114
AVERAGE_POOL_2D = 1
SQUEEZE, TRANSPOSE, EXPAND_DIMS, PAD = 43, 39, 70, 34
STRIDED_SLICE, SLICE, REVERSE_V2, CONCATENATION = 45, 65, 105, 2
# Data movement: TFLite's int8 kernels of these keep the input's scale and zero point on the output (PAD fills with the
# zero point, i.e. 0.0: the explicit padding onnx2tf writes before a VALID conv; the slices and the reversal are what a
# Bidirectional recurrent layer becomes around its cells).
PASSTHROUGH = frozenset({RESHAPE, SQUEEZE, EXPAND_DIMS, MAX_POOL_2D, AVERAGE_POOL_2D, TRANSPOSE, PAD, STRIDED_SLICE, SLICE, REVERSE_V2})
WEIGHTED = frozenset({CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED})
# TensorType codes -> (name, lowest code) for the integer activation types we place (int16: the 16x8 mode).
INT_TYPES = {9: ("int8", -128), 3: ("uint8", 0), 7: ("int16", -32768)}
TYPE_NAMES = {0: "float32", 1: "float16", 2: "int32", 3: "uint8", 4: "int64", 7: "int16", 9: "int8"}


def tflite_traits(*, per_tensor: bool = False, io_dtype: str = "int8", base: QuantTraits = TFLITE_INT8) -> QuantTraits:
    """Traits to derive parameters with for a full-integer TFLite: ``base`` (default TFLITE_INT8)
    with per-tensor weights when ``per_tensor`` (default False) and ``io_dtype`` (default int8; int16 for a 16x8 graph)."""
    if io_dtype not in IO_DTYPES + INT16X8_IO_DTYPES:
        check_io_dtype(io_dtype)
    if not per_tensor and base.per_channel_weights is False:
        return base.with_(io_dtype=io_dtype)
    name = base.name + ("_per_tensor" if per_tensor and base.per_channel_weights else "")
    return base.with_(name=name, per_channel_weights=not per_tensor and base.per_channel_weights, io_dtype=io_dtype)


def check_io_dtype(io_dtype: str) -> str:
    if io_dtype not in IO_DTYPES:
        raise BadInputError(f"unknown TFLite I/O dtype {io_dtype!r}", f"use one of {', '.join(IO_DTYPES)}")
    return io_dtype


def check_int16x8_io(io_dtype: str) -> str:
    """``io_dtype`` when a 16x8 graph can have it (:data:`INT16X8_IO_DTYPES`), else :class:`BadInputError`."""
    if io_dtype not in INT16X8_IO_DTYPES:
        raise BadInputError(f"a TFLite 16x8 graph has int16 or float I/O, not {io_dtype!r}",
                            "use --option tflite.io_dtype=int8 (integer I/O: int16 tensors) or tflite.io_dtype=float")
    return io_dtype


def check_cpu_layers(value: Any, backend: str) -> str:
    """``value`` when it is one of :data:`CPU_LAYERS`, else :class:`BadInputError` naming ``--option <backend>.cpu_layers``."""
    if value not in CPU_LAYERS:
        raise BadInputError(f"{backend}.cpu_layers={value!r} is not one of {', '.join(CPU_LAYERS)}",
                            f"use --option {backend}.cpu_layers=auto|none (auto: the layers reading the input run in FP32)")
    return str(value)


# --------------------------------------------------------------------------- the converter
def recurrent_layers(keras_model: Any) -> list[str]:
    """``"name (Class)"`` of every recurrent layer of ``keras_model`` (inside Bidirectional wrappers and nested models too)."""
    found: list[str] = []

    def walk(layer: Any) -> None:
        kind = type(layer).__name__
        if kind in RECURRENT_LAYERS:
            found.append(f"{layer.name} ({kind})")
        for inner in (getattr(layer, "forward_layer", None), getattr(layer, "backward_layer", None)):
            if inner is not None:
                walk(inner)
        for sub in getattr(layer, "layers", ()) or ():
            walk(sub)

    for layer in keras_model.layers:
        walk(layer)
    return found


def _batch1_converter(tf: Any, keras_model: Any) -> Any:
    """The converter on a batch-1 concrete function of ``keras_model``: with a dynamic batch the converter cannot
    lower Keras LSTM/GRU (``tf.TensorListReserve`` needs a static element shape); with batch 1 it can."""
    shape = [int(d) if d is not None else None for d in keras_model.inputs[0].shape[1:]]
    if any(d is None for d in shape):
        raise BadInputError(f"the model's input {shape} has an open dimension besides the batch, which a batch-1 TFLite conversion needs fixed",
                            "save the model with a fixed window length (Input(shape=(T, ...)))")
    fn = tf.function(lambda x: keras_model(x, training=False))
    concrete = fn.get_concrete_function(tf.TensorSpec([1, *shape], keras_model.inputs[0].dtype))
    return tf.lite.TFLiteConverter.from_concrete_functions([concrete], keras_model)


def convert_keras(
    keras_model: Any,
    mode: str,
    *,
    representative: np.ndarray | None = None,
    per_tensor: bool = False,
    io_dtype: str = "float",
    float_ops: tuple[str, ...] = (),
    batch1: bool = False,
) -> bytes:
    """Run the TFLite converter on a tf_keras model.

    ``mode``: ``fp32``; ``fp16`` (float16 weights); ``dynamic_int8`` (int8 weights, float
    activations); ``full_int8`` (integer-only builtins, ``io_dtype`` I/O, per-tensor weights
    when ``per_tensor``; needs ``representative``); ``full_int16x8`` (TFLite's 16x8 mode,
    ``EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8``: int16 activations, int8 weights, int64 bias;
    ``io_dtype`` ``int16`` or ``float``; needs ``representative``); ``vendor_ptq`` (the converter's default
    full-integer PTQ: ``optimizations=[DEFAULT]`` + ``representative``, float I/O, nothing else set).
    A model with recurrent layers (:func:`recurrent_layers`) is converted from a batch-1 signature: the
    flatbuffer's input is ``[1, ...]`` and its runners loop over windows (:func:`invoke_windows`); so is any model with
    ``batch1`` (a float tail's integer stage: its Reshape then needs no SHAPE op reading the float input).
    ``float_ops`` (default none; ``full_int8`` only): TFLite ops kept in float32 between int8 neighbours, with
    DEQUANTIZE / QUANTIZE at their edges (the converter's quantizer with these ops deny-listed).
    """
    from nilmc.compiler.tfcompat import import_tf

    if mode not in CONVERT_MODES:
        raise BadInputError(f"unknown TFLite conversion mode {mode!r}", f"use one of {', '.join(CONVERT_MODES)}")
    tf = import_tf("converting to TFLite")
    batch1 = batch1 or bool(recurrent_layers(keras_model))
    conv = _batch1_converter(tf, keras_model) if batch1 else tf.lite.TFLiteConverter.from_keras_model(keras_model)
    if mode != "fp32":
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "fp16":
        conv.target_spec.supported_types = [tf.float16]
    if mode in ("full_int8", "full_int16x8", "vendor_ptq"):
        if representative is None or len(representative) == 0:
            raise BadInputError(f"TFLite {mode} conversion needs representative windows", "pass calibration windows")
        rep = np.asarray(representative, np.float32)
        conv.representative_dataset = lambda: ([rep[i : i + 1]] for i in range(len(rep)))
    if mode == "full_int8":
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        if check_io_dtype(io_dtype) != "float":
            conv.inference_input_type = getattr(tf, io_dtype)
            conv.inference_output_type = getattr(tf, io_dtype)
        if per_tensor:
            conv._experimental_disable_per_channel = True  # the documented switch for per-tensor weights
        if float_ops:
            return _run_converter(conv, mode, float_ops=float_ops, representative=rep)
    if mode == "full_int16x8":
        if float_ops:
            raise InternalError("float_ops are not supported in the 16x8 conversion", "convert without float_ops")
        conv.target_spec.supported_ops = [tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8]
        if check_int16x8_io(io_dtype) == "int16":
            conv.inference_input_type = tf.int16
            conv.inference_output_type = tf.int16
    return _run_converter(conv, mode)


def _run_converter(conv: Any, mode: str, *, float_ops: tuple[str, ...] = (), representative: np.ndarray | None = None) -> bytes:
    from nilmc.compiler.tfcompat import import_tf, stderr_silenced  # the converter prints MLIR notes on fd 2

    try:
        with stderr_silenced():
            if not float_ops:
                return bytes(conv.convert())
            # The documented way to keep chosen ops float in a full-integer model: the quantization debugger's
            # deny-list (its non-debug model is the plain quantized one); float builtins must then be allowed.
            tf = import_tf("converting to TFLite")
            conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
            rep = np.asarray(representative, np.float32)
            options = tf.lite.experimental.QuantizationDebugOptions(denylisted_ops=list(float_ops), fully_quantize=True)
            debugger = tf.lite.experimental.QuantizationDebugger(
                converter=conv, debug_dataset=lambda: ([rep[i : i + 1]] for i in range(len(rep))), debug_options=options)
            return bytes(debugger.get_nondebug_quantized_model())
    except Exception as exc:  # ConverterError, ValueError, ...
        text = str(exc).strip().splitlines()
        raise BadInputError(f"the TFLite converter failed ({mode}): {text[0][:300] if text else type(exc).__name__}",
                            "check that the model uses TFLite builtin ops (Conv2D, Dense, Flatten, ReLU)") from None


# --------------------------------------------------------------------------- one conversion, many targets
# The structural full-integer conversion (the TensorFlow part) is the expensive step of every full-integer
# target: 2.0 s per call on the shipped T-P model (measured), 4 calls for tflite:int8 + eiq:int8/int8_pt/uint8_io.
# Its output depends only on the Keras model, the representative windows and the I/O dtype: nilmc's
# parameters are written afterwards, and the per-tensor switch only changes the converter's own weight
# scales, which are all overwritten (measured: eiq:int8_pt built from the per-channel conversion is
# byte-identical to one built from a per-tensor conversion). So one conversion per (model content,
# windows, I/O dtype) serves every target in a process; the cache holds bytes, parsed afresh each time.
_CONVERSION_SLOTS = 8
_CONVERSIONS: OrderedDict[tuple[str, str, str], bytes] = OrderedDict()
_CONVERSION_COUNTS = {"hits": 0, "misses": 0}


def keras_fingerprint(keras_model: Any) -> str:
    """sha256 of a Keras model's architecture (JSON config) and every weight (name, dtype, shape, bytes)."""
    h = hashlib.sha256(keras_model.to_json().encode())
    for v in keras_model.weights:
        a = np.ascontiguousarray(v.numpy())
        h.update(f"{v.name}|{a.dtype.str}|{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def structural_tflite(keras_model: Any, representative: np.ndarray, *, io_dtype: str = "int8", float_ops: tuple[str, ...] = (),
                      activations: str = "int8", batch1: bool = False) -> bytes:
    """The converter's full-integer graph for ``keras_model`` (per-channel weights, ``io_dtype`` I/O, ``float_ops``
    kept float; ``activations`` ``int8`` (default) or ``int16``: the 16x8 mode), whose parameters :func:`build_int8_tflite`
    overwrites. Converted once per process for the same model content, ``representative`` windows, ``io_dtype``,
    ``float_ops`` and ``activations`` (see the note above); byte-identical to a fresh conversion."""
    mode = _convert_mode(activations)
    check_int16x8_io(io_dtype) if activations == "int16" else check_io_dtype(io_dtype)
    rep = np.ascontiguousarray(representative, np.float32)
    key = (keras_fingerprint(keras_model), hashlib.sha256(repr(rep.shape).encode() + rep.tobytes()).hexdigest(),
           f"{io_dtype}|{','.join(float_ops)}|{activations}|{batch1}")
    if key in _CONVERSIONS:
        _CONVERSION_COUNTS["hits"] += 1
        _CONVERSIONS.move_to_end(key)
        return _CONVERSIONS[key]
    _CONVERSION_COUNTS["misses"] += 1
    fb = convert_keras(keras_model, mode, representative=rep, io_dtype=io_dtype, float_ops=float_ops, batch1=batch1)
    _CONVERSIONS[key] = fb
    while len(_CONVERSIONS) > _CONVERSION_SLOTS:
        _CONVERSIONS.popitem(last=False)
    return fb


def _convert_mode(activations: str) -> str:
    if activations not in ACTIVATIONS:
        raise InternalError(f"unknown activation type {activations!r}", f"use one of {', '.join(ACTIVATIONS)}")
    return "full_int16x8" if activations == "int16" else "full_int8"


def conversion_cache_info() -> dict[str, int]:
    """``{"hits", "misses", "entries"}`` of the structural conversion cache in this process."""
    return {**_CONVERSION_COUNTS, "entries": len(_CONVERSIONS)}


def clear_conversion_cache() -> None:
    """Forget every cached conversion and reset the counts (tests, long-running processes)."""
    _CONVERSIONS.clear()
    _CONVERSION_COUNTS.update(hits=0, misses=0)


# --------------------------------------------------------------------------- flatbuffer helpers
def _schema() -> Any:
    from ai_edge_litert import schema_py_generated as schema

    return schema


def load_flatbuffer(fb: bytes) -> Any:
    """The flatbuffer as a mutable ``ModelT`` (schema object API)."""
    try:
        return _schema().ModelT.InitFromPackedBuf(bytearray(fb), 0)
    except Exception as exc:
        raise BadInputError(f"not a TFLite flatbuffer ({type(exc).__name__}: {exc})", "pass a .tflite file") from None


def op_code(model: Any, op: Any) -> int:
    oc = model.operatorCodes[op.opcodeIndex]
    return max(int(oc.builtinCode), int(oc.deprecatedBuiltinCode))


def op_name(code: int) -> str:
    ops = _schema().BuiltinOperator
    for name, value in vars(ops).items():
        if value == code and not name.startswith("_"):
            return name
    return f"OP_{code}"


def tensor_name(t: Any) -> str:
    name = t.name
    return name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name or "")


def _aligned_buffer_class() -> type:
    schema = _schema()

    class AlignedBufferT(schema.BufferT):  # type: ignore[misc, name-defined]
        """A buffer whose data vector starts on a 16-byte boundary (what the C++ converter writes)."""

        def Pack(self, builder: Any) -> Any:
            data = None
            if self.data is not None and len(self.data):
                raw = np.asarray(self.data, np.uint8).tobytes()
                builder.StartVector(1, len(raw), _ALIGN)
                builder.head = builder.head - len(raw)
                builder.Bytes[builder.head : builder.head + len(raw)] = raw
                data = builder.EndVector()
            schema.BufferStart(builder)
            if data is not None:
                schema.BufferAddData(builder, data)
            schema.BufferAddOffset(builder, self.offset)
            schema.BufferAddSize(builder, self.size)
            return schema.BufferEnd(builder)

    return AlignedBufferT


def clear_orphan_buffers(model: Any) -> int:
    """Empty the buffers no tensor and no metadata entry refers to, in place; returns how many. The quantization
    debugger's conversion (:data:`FLOAT_KEPT_OPS`) leaves such buffers, whose bytes change from run to run."""
    used = {int(t.buffer) for sg in model.subgraphs for t in sg.tensors} | {int(m.buffer) for m in (model.metadata or [])}
    cleared = 0
    for i, b in enumerate(model.buffers):
        if i not in used and b.data is not None and len(b.data):
            b.data = None
            cleared += 1
    return cleared


def pack_flatbuffer(model: Any) -> bytes:
    """Serialize a ``ModelT`` (file identifier ``TFL3``), buffers 16-byte aligned; deterministic."""
    import flatbuffers

    cls = _aligned_buffer_class()
    aligned = []
    for b in model.buffers:
        nb = cls()
        nb.data, nb.offset, nb.size = b.data, b.offset, b.size
        aligned.append(nb)
    model.buffers = aligned
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


# --------------------------------------------------------------------------- the mapping
@dataclass
class TensorPlan:
    """What nilmc writes into the flatbuffer, by tensor index of subgraph 0."""

    activations: dict[int, TensorQuant] = field(default_factory=dict)
    weights: dict[int, tuple[TensorQuant, np.ndarray]] = field(default_factory=dict)  # float values, TFLite layout
    biases: dict[int, tuple[TensorQuant, np.ndarray]] = field(default_factory=dict)
    layer_of_op: dict[int, str] = field(default_factory=dict)  # op index -> Keras layer name
    float_moves: dict[int, str] = field(default_factory=dict)  # op index -> why: data movement made float by precise input
    weight_dims: dict[int, int] = field(default_factory=dict)  # weight tensor -> its per-channel axis when not 0 (DEPTHWISE_CONV_2D: 3)

    def expected(self) -> Iterator[tuple[int, TensorQuant]]:
        yield from self.activations.items()
        for idx, (tq, _) in list(self.weights.items()) + list(self.biases.items()):
            yield idx, tq


def _tflite_layout(kind: str, kernel: np.ndarray) -> np.ndarray:
    """Keras kernel -> TFLite weight layout: Conv2D HWIO -> OHWI, Dense [in, out] -> [out, in]."""
    return np.ascontiguousarray(kernel.transpose(3, 0, 1, 2) if kind == "conv" else kernel.T)


def _weighted_ops(model: Any) -> list[int]:
    sg = model.subgraphs[0]
    found = []
    for i, op in enumerate(sg.operators):
        code = op_code(model, op)
        if code == DEPTHWISE_CONV_2D:
            raise QuantizationError("the TFLite graph has a DEPTHWISE_CONV_2D, which nilmc's TFLite lowering does not map",
                                    "use Conv2D / Dense layers, or lower with the converter's own PTQ")
        if code in WEIGHTED:
            found.append(i)
    return found


def _pair_ops(model: Any, ops: list[int], kq: KerasQuant) -> list[tuple[int, KerasLayerQuant]]:
    """Pair weighted ops with Keras layers: by the layer name in the weight tensor's name when unique, else by order."""
    if len(ops) != len(kq.layers):
        raise QuantizationError(f"the TFLite graph has {len(ops)} CONV_2D/FULLY_CONNECTED ops but the model {len(kq.layers)} Conv2D/Dense layers",
                                "the converter fused or split layers nilmc cannot map; report this model")
    sg = model.subgraphs[0]
    by_name = []
    for kl in kq.layers:
        hits = [i for i in ops if f"/{kl.name}/" in tensor_name(sg.tensors[sg.operators[i].inputs[1]])]
        by_name.append(hits[0] if len(hits) == 1 else None)
    if None in by_name or len(set(by_name)) != len(by_name):
        by_name = ops
    return [(i, kl) for i, kl in zip(by_name, kq.layers)]


def _plan_layer(model: Any, op_index: int, kl: KerasLayerQuant, keras_model: Any, traits: QuantTraits, plan: TensorPlan) -> None:
    from nilmc.compiler.tfcompat import kernel_and_bias

    sg = model.subgraphs[0]
    op = sg.operators[op_index]
    kernel, bias = kernel_and_bias(keras_model.get_layer(kl.name))
    if kl.bias_values is not None:
        bias = kl.bias_values  # nilmc's bias correction replaces the float bias
    w = _tflite_layout(kl.kind, kernel)
    wt = sg.tensors[op.inputs[1]]
    if tuple(int(d) for d in wt.shape) != w.shape:
        raise QuantizationError(f"TFLite weight {tensor_name(wt)!r} has shape {tuple(wt.shape)} but Keras layer {kl.name!r} gives {w.shape}",
                                "the converter laid the layer out in a way nilmc does not map; report this model")
    plan.layer_of_op[op_index] = kl.name
    plan.activations[op.inputs[0]] = kl.input
    plan.activations[op.outputs[0]] = kl.output
    plan.weights[op.inputs[1]] = (kl.weight, w)
    has_bias_input = len(op.inputs) > 2 and op.inputs[2] >= 0
    if has_bias_input:
        if bias is None:
            bias = np.zeros(w.shape[0], np.float32)
        bq = kl.bias if kl.bias is not None else bias_quant(f"{kl.name}/bias", bias, kl.input, kl.weight, traits)
        plan.biases[op.inputs[2]] = (bq, np.asarray(bias, np.float32))
    elif bias is not None and np.any(bias != 0):
        raise InternalError(f"the converter dropped the non-zero bias of layer {kl.name!r}", "report this model")


def _propagate(model: Any, plan: TensorPlan) -> None:
    """Share grids through data-movement ops and integer<->integer (de)quantize ops, both ways, to a fixed point."""
    sg = model.subgraphs[0]
    links = []
    for op in sg.operators:
        code = op_code(model, op)
        src, dst = op.inputs[0], op.outputs[0]
        integer_pair = sg.tensors[src].type in INT_TYPES and sg.tensors[dst].type in INT_TYPES
        if code in PASSTHROUGH or (code in (QUANTIZE, DEQUANTIZE) and integer_pair):
            links.append((src, dst))
    changed = True
    while changed:
        changed = False
        for a, b in links:
            for x, y in ((a, b), (b, a)):
                if x in plan.activations and y not in plan.activations:
                    plan.activations[y] = plan.activations[x]
                    changed = True


def _float_intermediates(model: Any) -> set[int]:
    """Intermediate tensors of float-kept recurrent cells: the quantizer leaves scales on them, no float kernel reads them."""
    sg = model.subgraphs[0]
    out: set[int] = set()
    for op in sg.operators:
        if op_name(op_code(model, op)) in FLOAT_KEPT_OPS and sg.tensors[op.inputs[0]].type == 0 and op.intermediates is not None:
            out.update(int(i) for i in op.intermediates)
    return out


def _check_complete(model: Any, plan: TensorPlan) -> None:
    sg = model.subgraphs[0]
    placed = set(plan.activations) | set(plan.weights) | set(plan.biases) | _float_intermediates(model)
    left = [f"{i}:{tensor_name(t)}" for i, t in enumerate(sg.tensors)
            if t.quantization is not None and t.quantization.scale is not None and len(t.quantization.scale) and i not in placed]
    if left:
        raise QuantizationError(f"{len(left)} quantized TFLite tensors have no nilmc parameters: {left[:6]}",
                                "the graph has ops nilmc's TFLite lowering does not map (supported: Conv1D/Conv2D, Dense, BatchNormalization, "
                                "Flatten/Reshape, MaxPool, LSTM kept float); lower it with onnxruntime:int8 or openvino:int8")


def propagate_plan(model: Any, plan: TensorPlan) -> None:
    """Share grids through data-movement and integer<->integer (de)quantize ops (public for the ONNX route)."""
    _propagate(model, plan)


def check_plan_complete(model: Any, plan: TensorPlan) -> None:
    """Refuse a plan that leaves a quantized tensor of ``model`` without nilmc's parameters."""
    _check_complete(model, plan)


def plan_tensors(model: Any, keras_model: Any, kq: KerasQuant) -> TensorPlan:
    """Which nilmc parameters go to which tensor of the converted graph."""
    plan = TensorPlan()
    for op_index, kl in _pair_ops(model, _weighted_ops(model), kq):
        _plan_layer(model, op_index, kl, keras_model, kq.traits, plan)
    _propagate(model, plan)
    _check_complete(model, plan)
    return plan


# --------------------------------------------------------------------------- the rewrite
def _quant_params(scales: np.ndarray, zero_points: np.ndarray, dim: int = 0) -> Any:
    q = _schema().QuantizationParametersT()
    q.scale = [float(v) for v in np.asarray(scales, np.float32).ravel()]
    q.zeroPoint = [int(v) for v in np.asarray(zero_points, np.int64).ravel()]
    q.quantizedDimension = int(dim)
    return q


def _activation_zero_point(tq: TensorQuant, tensor_type: int) -> int:
    """nilmc's zero point moved to the tensor's code range (an int8 grid stored as uint8 shifts by 128)."""
    if tensor_type not in INT_TYPES:
        raise InternalError(f"activation stored as TFLite type {tensor_type}", "report this model")
    return int(tq.zero_point[0]) + INT_TYPES[tensor_type][1] - tq.rng.lo


def _set_buffer(model: Any, tensor: Any, data: bytes, refs: dict[int, int]) -> None:
    """Give ``tensor`` the bytes ``data``: in place when it owns its buffer, else in a new one."""
    arr = np.frombuffer(data, np.uint8).copy()
    if refs.get(tensor.buffer, 0) == 1 and tensor.buffer > 0:
        model.buffers[tensor.buffer].data = arr
        return
    nb = _schema().BufferT()
    nb.data = arr
    model.buffers.append(nb)
    tensor.buffer = len(model.buffers) - 1


def _codes(tq: TensorQuant, values: np.ndarray, rounding: Rounding, dim: int = 0) -> np.ndarray:
    axis = dim if tq.per_channel else None
    scales = tq.scales().astype(np.float64)
    zps = tq.zero_points()
    if tq.per_channel and len(scales) != values.shape[dim]:
        raise InternalError(f"{len(scales)} scales for {values.shape[dim]} channels of {tq.name!r}", "report this model")
    return quantize(values.astype(np.float64), scales, zps, tq.rng, axis=axis, rounding=rounding)


def apply_plan(model: Any, plan: TensorPlan, traits: QuantTraits) -> None:
    """Overwrite every planned tensor's parameters (and constant codes) in ``model``, in place."""
    sg = model.subgraphs[0]
    refs: dict[int, int] = {}
    for t in sg.tensors:
        refs[t.buffer] = refs.get(t.buffer, 0) + 1
    for idx, tq in plan.activations.items():
        t = sg.tensors[idx]
        t.quantization = _quant_params(tq.scales(), [_activation_zero_point(tq, t.type)])
    for idx, (tq, values) in plan.weights.items():
        t = sg.tensors[idx]
        if t.type != 9:
            raise InternalError(f"weight {tensor_name(t)!r} is stored as type {t.type}, expected int8", "report this model")
        dim = plan.weight_dims.get(idx, 0)
        codes = _codes(tq, values, traits.rounding, dim).astype(np.int8)
        _set_buffer(model, t, codes.tobytes(), refs)
        t.quantization = _quant_params(tq.scales(), tq.zero_points(), dim)
    for idx, (tq, values) in plan.biases.items():
        t = sg.tensors[idx]
        codes = _codes(tq, values, traits.rounding)
        if t.type == 2:
            _set_buffer(model, t, codes.astype("<i4").tobytes(), refs)
        elif t.type == 4:
            _set_buffer(model, t, codes.astype("<i8").tobytes(), refs)
        else:
            raise InternalError(f"bias {tensor_name(t)!r} is stored as type {t.type}", "report this model")
        t.quantization = _quant_params(tq.scales(), np.zeros(len(tq.scale), np.int64), 0)


# --------------------------------------------------------------------------- precise input
FLOAT32 = 0  # TensorType


def _consumers(sg: Any) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for i, op in enumerate(sg.operators):
        for t in dict.fromkeys(int(v) for v in op.inputs if v >= 0):
            out.setdefault(t, []).append(i)
    return out


def _opcode_index(model: Any, code: int) -> int:
    """Index of builtin ``code`` in ``model.operatorCodes``, added (version 1) when the graph has none."""
    for i, oc in enumerate(model.operatorCodes):
        if max(int(oc.builtinCode), int(oc.deprecatedBuiltinCode)) == code:
            return i
    oc = _schema().OperatorCodeT()
    oc.builtinCode, oc.deprecatedBuiltinCode, oc.version = code, min(code, 127), 1  # 127: placeholder for codes above it
    model.operatorCodes.append(oc)
    return len(model.operatorCodes) - 1


def _input_region(model: Any) -> tuple[int, int | None, list[int], list[int]]:
    """What reads the graph input: ``(input tensor, its QUANTIZE op or None, data-movement ops, weighted ops)``.

    The region is the input (through the converter's QUANTIZE of a float or uint8 input) and what data movement makes of
    it; it must be read by weighted ops only at their data input. Else :class:`QuantizationError` (then the input cannot
    stay float without other ops going float too)."""
    sg = model.subgraphs[0]
    if len(sg.inputs) != 1:
        raise QuantizationError(f"precise input needs one graph input, the TFLite graph has {len(sg.inputs)}", _FULL_INTEGER_REMEDY)
    inp = int(sg.inputs[0])
    consumers = _consumers(sg)
    quant_op = None
    root = inp
    readers = consumers.get(inp, [])
    if len(readers) == 1 and op_code(model, sg.operators[readers[0]]) == QUANTIZE:  # float -> int8, or uint8 -> int8 (uint8 I/O)
        quant_op, root = readers[0], int(sg.operators[readers[0]].outputs[0])
    elif sg.tensors[inp].type == FLOAT32:
        raise QuantizationError("the float graph input is not read by one QUANTIZE op", _FULL_INTEGER_REMEDY)
    moves: list[int] = []
    weighted: list[int] = []
    todo, seen = [root], {root}
    outputs = {int(t) for t in sg.outputs}
    while todo:
        t = todo.pop()
        if t in outputs:
            raise QuantizationError("the graph input reaches the output through data movement alone", _FULL_INTEGER_REMEDY)
        for i in consumers.get(t, []):
            op = sg.operators[i]
            code = op_code(model, op)
            if code in WEIGHTED and int(op.inputs[0]) == t:
                weighted.append(i)
            elif code in PASSTHROUGH and int(op.inputs[0]) == t:
                moves.append(i)
                if int(op.outputs[0]) not in seen:
                    seen.add(int(op.outputs[0]))
                    todo.append(int(op.outputs[0]))
            else:
                raise QuantizationError(f"the graph input is also read by {op_name(code)} (op {i}), which would have to run in float too",
                                        _FULL_INTEGER_REMEDY)
    return inp, quant_op, sorted(set(moves)), sorted(set(weighted))


_FULL_INTEGER_REMEDY = "use --option tflite.cpu_layers=none (or eiq.cpu_layers=none): the full-integer graph"


def _to_float(tensor: Any) -> None:
    tensor.type = FLOAT32
    tensor.quantization = None


def _prefix_ops(model: Any, plan: TensorPlan, prefix: Mapping[str, str], region: set[int], stop: set[int]) -> list[int]:
    """The ops a float ``prefix`` (layer name -> why) adds to the precise-input ``region``: each named layer's op and every
    op it needs back to the input (``stop``: the float input and its converter QUANTIZE output). Raises
    :class:`QuantizationError` when that needs another weighted op, a QUANTIZE/DEQUANTIZE, or a layer not in the graph."""
    sg = model.subgraphs[0]
    at = {name: i for i, name in plan.layer_of_op.items()}
    missing = [n for n in prefix if n not in at]
    if missing:
        raise QuantizationError(f"the float prefix names layer(s) {missing} that no TFLite op carries", _FULL_INTEGER_REMEDY)
    producer = {int(t): i for i, op in enumerate(sg.operators) for t in op.outputs}
    added: set[int] = set()
    todo = [at[n] for n in prefix if at[n] not in region]
    while todo:
        i = todo.pop()
        if i in added or i in region:
            continue
        op = sg.operators[i]
        code = op_code(model, op)
        name = plan.layer_of_op.get(i)
        if code in (QUANTIZE, DEQUANTIZE) or (code in WEIGHTED and name not in prefix):
            raise QuantizationError(f"the float prefix through {list(prefix)[-1]} needs {name or op_name(code)} (op {i}) in float too",
                                    _FULL_INTEGER_REMEDY)
        added.add(i)
        acts = [int(op.inputs[0])] if code in WEIGHTED else [int(v) for v in op.inputs if v >= 0]
        todo += [producer[t] for t in acts if t in producer and t not in stop]
    return sorted(added)


def float_input_layers(model: Any, plan: TensorPlan, *, expected: int, prefix: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """Precise input written into a converted full-integer ``model`` (``ModelT``, parameters already applied), in place.

    The graph input becomes or stays float32 (the converter's QUANTIZE after a float or uint8 input is removed), the
    data movement reading it runs in float32, and each weighted op reading it runs as a float32 op on the float
    Keras/ONNX weights and bias the plan holds, its output going through a new QUANTIZE onto the int8 tensor that keeps
    nilmc's grid of that layer's output (the grid the next layer reads). ``plan`` loses the entries of the tensors
    made float. ``expected``: how many layers the parameters keep float (precise input); a graph in which another number
    of weighted ops reads the input raises :class:`QuantizationError`.

    ``prefix`` (layer name -> why, default none): further layers run in float32 with every op they need back to the input
    (the float prefix the calibration SQNR floor grows,
    :func:`~nilmc.quantization.mixed_precision.grow_float_prefix`); a tensor of the float region read outside it gets the
    QUANTIZE onto its nilmc grid, a tensor read only inside it is float32. Returns ``[{"name", "op", "index", "why"}]``
    (op indices of the rewritten graph); the data movement made float is added to ``plan.float_moves``."""
    sg = model.subgraphs[0]
    inp, quant_op, moves, weighted = _input_region(model)
    if len(weighted) != expected:
        raise QuantizationError(f"the parameters keep {expected} layer(s) reading the input in float, but {len(weighted)} weighted TFLite "
                                "op(s) read it", _FULL_INTEGER_REMEDY)
    prefix = dict(prefix or {})
    root = int(sg.operators[quant_op].outputs[0]) if quant_op is not None else inp
    extra = _prefix_ops(model, plan, prefix, set(moves) | set(weighted), {inp, root}) if prefix else []
    weighted = sorted(set(weighted) | {i for i in extra if op_code(model, sg.operators[i]) in WEIGHTED})
    moves = sorted(set(moves) | {i for i in extra if i not in weighted})
    names = {id(sg.operators[i]): name for i, name in plan.layer_of_op.items()}
    whys = {id(sg.operators[i]): prefix.get(plan.layer_of_op.get(i, ""), precise_why()) for i in weighted}
    in_prefix = {id(sg.operators[i]) for i in extra}
    inside = set(moves) | set(weighted)
    move_ops = [sg.operators[i] for i in moves]
    first_moves = {id(sg.operators[i]) for i in moves if i not in extra}
    refs: dict[int, int] = {}
    for t in sg.tensors:
        refs[t.buffer] = refs.get(t.buffer, 0) + 1
    consumers = _consumers(sg)
    outputs = {int(t) for t in sg.outputs}
    boundary = {int(sg.operators[i].outputs[0]) for i in inside
                if int(sg.operators[i].outputs[0]) in outputs
                or any(j not in inside for j in consumers.get(int(sg.operators[i].outputs[0]), []))}
    if quant_op is not None:
        for op in sg.operators:  # its readers read the float input itself
            op.inputs = [inp if int(v) == root else int(v) for v in op.inputs]
        _to_float(sg.tensors[root])  # left unused
        plan.activations.pop(root, None)
    for t in {inp} | ({int(sg.operators[i].outputs[0]) for i in inside} - boundary):
        _to_float(sg.tensors[t])
        plan.activations.pop(t, None)
    floats = []
    for i in sorted(inside):
        op = sg.operators[i]
        if i in weighted:
            w = int(op.inputs[1])
            _set_buffer(model, sg.tensors[w], np.ascontiguousarray(plan.weights.pop(w)[1], "<f4").tobytes(), refs)
            _to_float(sg.tensors[w])
            if len(op.inputs) > 2 and op.inputs[2] >= 0:
                b = int(op.inputs[2])
                _set_buffer(model, sg.tensors[b], np.ascontiguousarray(plan.biases.pop(b)[1], "<f4").tobytes(), refs)
                _to_float(sg.tensors[b])
        if int(op.outputs[0]) not in boundary:
            continue
        out = int(op.outputs[0])  # keeps nilmc's grid; the float op writes a float32 twin that a QUANTIZE puts on it
        flt = _schema().TensorT()
        flt.shape, flt.shapeSignature, flt.type, flt.buffer = sg.tensors[out].shape, sg.tensors[out].shapeSignature, FLOAT32, 0
        flt.name = (tensor_name(sg.tensors[out]) + "/float32").encode()
        sg.tensors.append(flt)
        twin = len(sg.tensors) - 1
        q = _schema().OperatorT()
        q.opcodeIndex, q.inputs, q.outputs = _opcode_index(model, QUANTIZE), [twin], [out]
        q.builtinOptionsType, q.builtinOptions = _schema().BuiltinOptions.QuantizeOptions, _schema().QuantizeOptionsT()
        op.outputs = [twin]
        for j in inside:  # readers inside the float region read the float twin
            sg.operators[j].inputs = [twin if int(v) == out else int(v) for v in sg.operators[j].inputs]
        floats.append((op, q))
    ops = [op for j, op in enumerate(sg.operators) if j != quant_op]
    for op, q in floats:
        ops.insert(next(j for j, o in enumerate(ops) if o is op) + 1, q)
    sg.operators = ops
    plan.layer_of_op = {j: names[id(op)] for j, op in enumerate(ops) if id(op) in names}
    plan.float_moves = {ops.index(op): f"{op_name(op_code(model, op))} of the float input before a precise-input layer: runs in FP32 with it"
                        if id(op) in first_moves else
                        f"{op_name(op_code(model, op))} inside the float prefix: runs in FP32 with its layers" for op in move_ops}
    return [{"name": names.get(id(op), f"op{ops.index(op)}"), "op": op_name(op_code(model, op)), "index": ops.index(op), "why": whys[id(op)],
             **({"float_prefix": True} if id(op) in in_prefix else {})}
            for op in ops if id(op) in whys]


def float_layers_phrase(float_layers: list[dict[str, Any]], where: str = "") -> str:
    """``"N layer(s) reading the input in FP32"`` for precise input; with a float prefix, how many layers run in FP32
    before the integer graph and why (``float_layers``: :attr:`FullIntegerTFLite.float_layers`)."""
    grown = sum(bool(f.get("float_prefix")) for f in float_layers)
    if not grown:
        return f"{len(float_layers)} layer(s) reading the input in FP32{where}"
    return (f"{len(float_layers)} layer(s) in FP32{where} before the integer graph ({len(float_layers) - grown} reading the input, {grown} "
            "more to hold the calibration SQNR floor)")


@dataclass
class FullIntegerTFLite:
    """Result of :func:`build_int8_tflite`. ``float_layers``: what precise input runs in float32 (empty: full integer)."""

    flatbuffer: bytes
    plan: TensorPlan
    io_dtype: str
    per_tensor: bool
    check: dict[str, Any] = field(default_factory=dict)  # read-back comparison (see check_params)
    float_layers: list[dict[str, Any]] = field(default_factory=list)


def _check_plan_traits(kq: KerasQuant, per_tensor: bool, activations: str = "int8") -> None:
    want = "int16" if activations == "int16" else None
    for kl in kq.layers:
        for tq in (kl.input, kl.output):
            if want is not None and (tq.range_name != want or any(z != 0 for z in tq.zero_point)):
                raise QuantizationError(f"layer {kl.name!r}: activation {tq.name!r} is on a {tq.range_name} grid (zero point "
                                        f"{tq.zero_point[0]}), but TFLite's 16x8 kernels need symmetric int16 (zero point 0)",
                                        "derive the parameters under the tflite_int16x8 traits")
            if want is None and tq.range_name == "int16":
                raise QuantizationError(f"layer {kl.name!r}: activation {tq.name!r} is int16 in an int8 graph",
                                        "lower it as tflite:int16x8, or derive the parameters under the tflite_int8 traits")
        if any(z != 0 for z in kl.weight.zero_point):
            raise QuantizationError(f"layer {kl.name!r} has asymmetric weights (zero point {kl.weight.zero_point[0]}), "
                                    "but TFLite's int8 kernels need symmetric weights (zero point 0)",
                                    "derive the parameters with symmetric_weights=True")
        if per_tensor and kl.weight.per_channel:
            raise QuantizationError(f"per_tensor=True but layer {kl.name!r} has per-channel weight scales",
                                    "derive the parameters with tflite_traits(per_tensor=True)")


def build_int8_tflite(
    keras_model: Any,
    kq: KerasQuant,
    representative: np.ndarray,
    *,
    per_tensor: bool = False,
    io_dtype: str = "int8",
    float_input: int = 0,
    activations: str = "int8",
    float_prefix: Mapping[str, str] | None = None,
) -> FullIntegerTFLite:
    """A full-integer TFLite flatbuffer carrying exactly the parameters in ``kq``.

    ``keras_model``: the tf_keras float model (weights are read from it); ``kq``: nilmc's
    parameters keyed by its Conv2D/Dense layers (:func:`nilmc.quantization.qat.keras_quant_from_params`
    or :func:`~nilmc.quantization.qat.keras_quant_from_qat`); ``representative``: a few
    normalized windows for the structural conversion (only the first
    ``STRUCTURE_WINDOWS`` are used; their ranges are overwritten). ``per_tensor`` (default
    False): per-tensor weights (``kq`` must be per tensor too). ``io_dtype`` (default
    ``int8``): ``int8`` / ``uint8`` I/O tensors, or ``float`` (QUANTIZE / DEQUANTIZE ops inside).
    ``float_input`` (default 0): the number of layers reading the graph input that the parameters keep float (precise
    input); when non-zero they run in float32 and the input is float32 (:func:`float_input_layers`).
    ``activations`` (default ``int8``): ``int16`` builds TFLite's 16x8 graph (int16 activations, which ``kq`` must hold
    on symmetric grids, int8 weights, int64 biases; ``io_dtype`` ``int16`` or ``float``).
    ``float_prefix`` (layer name -> why; with ``float_input`` only): further layers run in float32 after the input
    (:func:`float_input_layers`).
    The result's ``check`` holds the read-back comparison of :func:`check_params`.
    """
    check_int16x8_io(io_dtype) if activations == "int16" else check_io_dtype(io_dtype)
    _check_plan_traits(kq, per_tensor, activations)
    rep = np.asarray(representative, np.float32)[:STRUCTURE_WINDOWS]
    sixteen = {"activations": activations} if activations != "int8" else {}  # the int8 call keeps its old signature
    model = load_flatbuffer(structural_tflite(keras_model, rep, io_dtype=io_dtype, **sixteen))
    plan = plan_tensors(model, keras_model, kq)
    apply_plan(model, plan, kq.traits)
    floats = float_input_layers(model, plan, expected=float_input, prefix=float_prefix) if float_input else []
    out = pack_flatbuffer(model)
    result = FullIntegerTFLite(out, plan, io_dtype, per_tensor, float_layers=floats)
    result.check = check_params(out, plan)
    if not result.check["ok"]:
        raise InternalError(f"the written TFLite file does not carry nilmc's parameters: {result.check['mismatches'][:3]}", "report this")
    return result


# --------------------------------------------------------------------------- running
def invoke_windows(it: Any, x: np.ndarray) -> np.ndarray:
    """Run an allocated ``ai_edge_litert`` Interpreter ``it`` on the windows ``x`` (already in the input's dtype).

    A dynamic batch (``shape_signature[0] == -1``) runs in one invoke, the input resized to ``len(x)``; a model
    converted from a batch-1 signature (recurrent layers: its Reshapes carry the batch of 1, so resizing fails)
    runs window by window (measured on a Conv1D+BiLSTM over 495 samples: 0.6 ms per window in int8), its variable
    tensors reset before each window: the converter's fused LSTM keeps its state in variable tensors that persist across
    invokes, so without the reset a window starts from the last one's state (measured on a Conv1D->LSTM(return_sequences)
    model: up to 0.08 off in the first steps of every window after the first, 17 dB vs the ONNX graph; 1e-7 with it)."""
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    per_window = int(inp["shape_signature"][0]) != -1
    if not per_window:
        if int(inp["shape"][0]) != len(x):
            it.resize_tensor_input(inp["index"], [len(x), *[int(d) for d in inp["shape_signature"][1:]]], strict=False)
            it.allocate_tensors()
        it.set_tensor(inp["index"], x)
        it.invoke()
        return np.asarray(it.get_tensor(out["index"])).copy()
    if int(inp["shape"][0]) != 1:
        it.resize_tensor_input(inp["index"], [1, *[int(d) for d in inp["shape"][1:]]], strict=True)
        it.allocate_tensors()
    ys = []
    for i in range(len(x)):
        it.reset_all_variables()  # each window is a new sequence (the docstring)
        it.set_tensor(inp["index"], x[i : i + 1])
        it.invoke()
        ys.append(np.asarray(it.get_tensor(out["index"])).copy())
    return np.concatenate(ys) if ys else np.zeros((0, *out["shape"][1:]), out["dtype"])


# --------------------------------------------------------------------------- reading back
def tensor_details(fb: bytes) -> list[dict[str, Any]]:
    """Every tensor as the TFLite runtime (ai_edge_litert Interpreter) sees it."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=fb, num_threads=1)
    out = []
    for d in it.get_tensor_details():
        q = d["quantization_parameters"]
        out.append({"index": int(d["index"]), "name": d["name"], "dtype": np.dtype(d["dtype"]).name, "shape": [int(v) for v in d["shape"]],
                    "scales": np.asarray(q["scales"], np.float32), "zero_points": np.asarray(q["zero_points"], np.int64),
                    "quantized_dimension": int(q["quantized_dimension"])})
    return out


def check_params(fb: bytes, plan: TensorPlan) -> dict[str, Any]:
    """Compare the parameters the runtime reads from ``fb`` with nilmc's (float32 scales, zero points).

    Returns ``{"ok", "tensors_checked", "max_rel_scale_diff", "mismatches"}``.
    """
    details = {d["index"]: d for d in tensor_details(fb)}
    mismatches: list[str] = []
    worst = 0.0
    for idx, tq in plan.expected():
        d = details[idx]
        want_s = tq.scales()
        got_s = d["scales"]
        if got_s.shape != want_s.shape:
            mismatches.append(f"{d['name']}: {got_s.size} scales, nilmc has {want_s.size}")
            continue
        rel = float(np.max(np.abs(got_s.astype(np.float64) - want_s) / np.maximum(np.abs(want_s), 1e-30)))
        worst = max(worst, rel)
        want_z = tq.zero_points()
        if idx in plan.activations:
            want_z = np.array([_activation_zero_point(tq, _dtype_code(d["dtype"]))])
        if rel > 1e-6 or not np.array_equal(np.broadcast_to(want_z, d["zero_points"].shape), d["zero_points"]):
            mismatches.append(f"{d['name']}: scale {got_s[:2]} zp {d['zero_points'][:2]} vs nilmc {want_s[:2]} {want_z[:2]}")
        elif want_s.size > 1 and d["quantized_dimension"] != plan.weight_dims.get(idx, 0):
            mismatches.append(f"{d['name']}: scales along axis {d['quantized_dimension']}, nilmc's along {plan.weight_dims.get(idx, 0)}")
    return {"ok": not mismatches, "tensors_checked": len(list(plan.expected())), "max_rel_scale_diff": worst, "mismatches": mismatches}


def _dtype_code(name: str) -> int:
    return {"int8": 9, "uint8": 3, "int16": 7}.get(name, -1)


def io_quantization(fb: bytes) -> dict[str, Any]:
    """Input and output tensors: dtype, shape, scale and zero point (JSON-able)."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=fb, num_threads=1)

    def one(d: dict[str, Any]) -> dict[str, Any]:
        s, z = d["quantization"]
        return {"name": d["name"], "dtype": np.dtype(d["dtype"]).name, "shape": [int(v) for v in d["shape_signature"]],
                "scale": float(s), "zero_point": int(z)}

    return {"input": one(it.get_input_details()[0]), "output": one(it.get_output_details()[0])}


# --------------------------------------------------------------------------- full-integer targets as data
WEIGHTED_OP_NAMES = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")
INTEGER_TENSOR_TYPES = ("int8", "uint8", "int32")
INT16X8_TENSOR_TYPES = ("int16", "int8", "int64", "int32")  # the 16x8 mode: int16 activations, int8 weights, int64 biases, int32 shapes
# What a full-integer TFLite target that warns about overflow and fixes output clipping uses (tflite, eiq).
DEFAULT_OVERFLOW_POLICY = (("default", "warn"), ("output_clipping", "fix"))


class UnsupportedOpError(BadInputError):
    """The graph has ops a target's allow-list does not take; ``.ops`` names them."""

    def __init__(self, ops: list[str], where: str, *, target: str = "this target", allowed: tuple[str, ...] = ()) -> None:
        self.ops = ops
        super().__init__(f"{where} has op(s) {target} does not take: {', '.join(ops)}",
                         f"use layers that lower to {', '.join(allowed)} (Conv2D, Dense, Flatten, pooling, ReLU), or pick another target")


@dataclass(frozen=True)
class FullIntegerSpec:
    """One full-integer TFLite target as data: how its parameters are derived and what its flatbuffer must satisfy.

    ``traits``: parameters are derived under these (with int8 I/O, so I/O variants share the context's cached
    parameters); ``per_tensor`` (default False): per-tensor weights; ``io_dtype`` (default int8): I/O tensors;
    ``allowed_ops`` (default None: any builtin): op allow-list, others raise :class:`UnsupportedOpError`;
    ``integer_only`` (default False): refuse tensors outside ``INTEGER_TENSOR_TYPES``; ``target``: how errors
    name the target; ``allow_list_source``: where the allow-list comes from (reported); ``overflow_policy``
    (default: warn, fix output clipping) for :func:`nilmc.quantization.overflow.check_overflow`; ``float_input``
    (default False): precise input, the layers reading the graph input run in float32 (needs ``traits.float_layers``,
    under which the parameters keep them float, and no ``integer_only``); ``activations`` (default ``int8``): ``int16``
    is TFLite's 16x8 mode (``traits.activation_bits`` 16, symmetric; ``io_dtype`` ``int16`` or ``float``).
    """

    label: str
    traits: QuantTraits
    per_tensor: bool = False
    io_dtype: str = "int8"
    allowed_ops: tuple[str, ...] | None = None
    integer_only: bool = False
    target: str = "TFLite"
    allow_list_source: str = ""
    overflow_policy: tuple[tuple[str, str], ...] = DEFAULT_OVERFLOW_POLICY
    float_input: bool = False
    activations: str = "int8"

    def __post_init__(self) -> None:
        _convert_mode(self.activations)
        check_int16x8_io(self.io_dtype) if self.activations == "int16" else check_io_dtype(self.io_dtype)
        if (self.activations == "int16") != (self.traits.activation_bits == 16 and self.traits.symmetric_activations):
            raise InternalError(f"{self.label}: activations={self.activations} with traits {self.traits.name!r} "
                                f"({self.traits.activation_bits}-bit, symmetric={self.traits.symmetric_activations})",
                                "16x8 needs symmetric 16-bit activation traits (TFLITE_INT16X8), int8 8-bit ones")
        if self.float_input and (self.integer_only or not self.traits.float_layers):
            raise InternalError(f"{self.label}: float_input with integer_only={self.integer_only}, traits.float_layers={self.traits.float_layers}",
                                "precise input needs traits with float_layers=True and integer_only=False")
        if self.per_tensor and self.traits.per_channel_weights:
            raise InternalError(f"{self.label}: per_tensor=True with per-channel traits {self.traits.name!r}", "derive the traits with per_tensor")


@dataclass
class IntegerParams:
    """What :func:`integer_params` derives: nilmc's parameters after the overflow checks, keyed by Keras layer."""

    params: Any  # QuantParams after fixes
    overflow: Any  # OverflowReport
    kq: KerasQuant | None  # None on the ONNX route (no Keras model)
    calib_x: np.ndarray  # the context's prepared calibration windows
    calibration: Any = None  # the context's calibration NilmDataset
    precise: tuple[str, ...] = ()  # layers the parameters keep float because they read the graph input (spec.float_input)
    prefix: dict[str, str] = field(default_factory=dict)  # further layers kept float (the SQNR floor's float prefix) -> why

    @property
    def float_layers(self) -> tuple[str, ...]:
        """Every layer the flatbuffer runs in float32: precise input's, then the float prefix."""
        return (*self.precise, *self.prefix)


def graph_ops(fb: bytes) -> list[dict[str, Any]]:
    """Ops of subgraph 0: name, input/output tensor indices and the tensors' dtypes."""
    m = load_flatbuffer(fb)
    sg = m.subgraphs[0]
    out = []
    for op in sg.operators:
        ins = [int(i) for i in op.inputs if i >= 0]
        outs = [int(i) for i in op.outputs]
        out.append({"op": op_name(op_code(m, op)), "inputs": ins, "outputs": outs,
                    "dtypes": sorted({type_name(sg.tensors[i].type) for i in ins + outs})})
    return out


def type_name(code: int) -> str:
    """TFLite TensorType code -> numpy-style name (``type<code>`` when unknown)."""
    return TYPE_NAMES.get(int(code), f"type{code}")


def _weight_report(sg: Any, ops: list[dict[str, Any]]) -> list[dict[str, Any]]:
    weights = []
    for o in ops:
        if o["op"] in WEIGHTED_OP_NAMES:
            q = sg.tensors[o["inputs"][1]].quantization
            n = len(q.scale) if q is not None and q.scale is not None else 0
            zeros = bool(q is None or q.zeroPoint is None or not np.any(np.asarray(q.zeroPoint)))
            weights.append({"op": o["op"], "tensor": tensor_name(sg.tensors[o["inputs"][1]]), "dtype": type_name(sg.tensors[o["inputs"][1]].type),
                            "scales": n, "zero_points_all_zero": zeros})
    return weights


def tensor_precisions(fb: bytes) -> dict[str, Any]:
    """Every tensor of the flatbuffer's main graph with its role and stored type, read from the flatbuffer itself:
    ``{"counts": {role: {dtype: n}}, "tensors": [{"name", "role", "dtype"}]}``. Roles: ``weight`` / ``bias`` (second /
    third input of a CONV_2D, DEPTHWISE_CONV_2D or FULLY_CONNECTED), ``constant`` (other tensors holding data, e.g. shapes),
    ``activation`` (the rest: graph input, output and every intermediate). Tensors no op reads or writes are left out."""
    m = load_flatbuffer(fb)
    sg = m.subgraphs[0]
    roles: dict[int, str] = {}
    for op in sg.operators:
        if op_name(op_code(m, op)) in WEIGHTED_OP_NAMES:
            for k, role in ((1, "weight"), (2, "bias")):
                if len(op.inputs) > k and op.inputs[k] >= 0:
                    roles[int(op.inputs[k])] = role
    used = {int(v) for op in sg.operators for v in [*op.inputs, *op.outputs] if v >= 0} | {int(v) for v in [*sg.inputs, *sg.outputs]}
    tensors: list[dict[str, str]] = []
    counts: dict[str, dict[str, int]] = {}
    for i, t in enumerate(sg.tensors):
        if i not in used:  # e.g. the int8 copy of the input precise input leaves behind
            continue
        data = m.buffers[t.buffer].data if 0 < t.buffer < len(m.buffers) else None
        role = roles.get(i) or ("constant" if data is not None and len(data) else "activation")
        dtype = type_name(t.type)
        tensors.append({"name": tensor_name(t), "role": role, "dtype": dtype})
        counts.setdefault(role, {})
        counts[role][dtype] = counts[role].get(dtype, 0) + 1
    return {"counts": counts, "tensors": tensors}


def tflite_placement(fb: bytes, reasons: Mapping[int, str] | None = None) -> dict[str, Any]:
    """Which ops of the flatbuffer's main graph compute in int8 and which in float32 (QUANTIZE / DEQUANTIZE and data
    movement aside): ``{"int8": [op names], "float": [{"op", "index", "why"}], "summary"}``. ``reasons``: op index ->
    why it is float (precise input's layers), else the recurrent-cell reason or "float32 in the flatbuffer"."""
    reasons = reasons or {}
    ops = graph_ops(fb)
    moves = {"QUANTIZE", "DEQUANTIZE", "RESHAPE", "SQUEEZE", "EXPAND_DIMS", "TRANSPOSE", "PAD", "STRIDED_SLICE", "SLICE", "REVERSE_V2",
             "CONCATENATION"}
    int8, floats = [], []
    for i, o in enumerate(ops):
        if o["op"] in moves:
            continue
        if "float32" in o["dtypes"] or "float16" in o["dtypes"]:
            why = reasons.get(i) or ("recurrent cell kept float32: nilmc derives no parameters for its gates and cell state"
                                     if o["op"] in FLOAT_KEPT_OPS else "float32 in the flatbuffer")
            floats.append({"op": o["op"], "index": i, "why": why})
        else:
            int8.append(o["op"])
    summary = f"{len(int8)} op(s) in int8" + (f"; float32: {', '.join(sorted({f['op'] for f in floats}))}" if floats else "; nothing float")
    return {"int8": int8, "float": floats, "summary": summary}


def manifest_placement(graph: Any, params: Any, result: FullIntegerTFLite, precise: tuple[str, ...] = (), *, where: str = "",
                       prefix: Mapping[str, str] | None = None, tail: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The manifest's ``placement`` of a TFLite artifact, in the driver's vocabulary (:func:`nilmc.quantization.placement.op_placement`
    of the ONNX ``graph``): ``{"int8": [layers], "float": [{"name", "op", "why"}], "summary"}``, computed from the
    parameters this artifact deploys (``params``), where a layer is float only when the flatbuffer runs it in float32
    (precise input's ``precise`` layers, their reason saying ``where``, e.g. " on the application CPU"; the float
    ``prefix``'s layers with theirs), and the ops nilmc never quantizes (a recurrent cell) are float as they are in the
    flatbuffer; ``tail``: the layers of a float32 tail stage, with why."""
    from nilmc.quantization.placement import op_placement

    prefix, tail = dict(prefix or {}), dict(tail or {})
    kept = ((*precise, *prefix) if result.float_layers else ()) + tuple(tail)
    # a mixed-precision fallback is not honoured here (kept_float_ignored): its units are placed as the INT8 they are
    deployed = replace(params, keep_float=kept, provenance={k: v for k, v in params.provenance.items() if k != "mixed_precision"})
    placed = op_placement(graph, deployed)
    for f in placed["float"]:
        if f["name"] in prefix:
            f["why"] = prefix[f["name"]] + where
        elif f["name"] in tail:
            f["why"] = tail[f["name"]]
        elif f["name"] in kept:
            f["why"] = precise_why(where)
    if not placed["float"]:
        placed["summary"] += " (full integer)"
    return placed


def check_graph(fb: bytes, spec: FullIntegerSpec, *, where: str = "the TFLite graph") -> dict[str, Any]:
    """Check ``fb`` against ``spec``: ops in ``spec.allowed_ops`` (else :class:`UnsupportedOpError` naming them),
    no tensor outside ``INTEGER_TENSOR_TYPES`` when ``spec.integer_only``, one weight scale per tensor when
    ``spec.per_tensor`` (else :class:`QuantizationError`). Returns a JSON-able report."""
    ops = graph_ops(fb)
    if spec.allowed_ops is not None:
        bad = sorted({o["op"] for o in ops if o["op"] not in spec.allowed_ops})
        if bad:
            raise UnsupportedOpError(bad, where, target=spec.target, allowed=spec.allowed_ops)
    integer = INT16X8_TENSOR_TYPES if spec.activations == "int16" else INTEGER_TENSOR_TYPES
    float_ops = [f"{o['op']}({', '.join(o['dtypes'])})" for o in ops if set(o["dtypes"]) - set(integer)]
    if spec.integer_only and float_ops:
        raise QuantizationError(f"{where} is not integer-only: {float_ops[:5]}", "lower with int8/uint8 I/O (precisions int8, int8_pt, uint8_io)")
    sg = load_flatbuffer(fb).subgraphs[0]
    weights = _weight_report(sg, ops)
    quantized = [w for w in weights if w["dtype"] != "float32"]  # precise input's float layers have no scales
    per_tensor = all(w["scales"] == 1 for w in quantized)
    if spec.per_tensor and not per_tensor:
        raise QuantizationError(f"per-tensor weights were asked for but {[w['tensor'] for w in quantized if w['scales'] != 1]} have per-channel scales",
                                "derive the parameters with per-tensor traits")
    report: dict[str, Any] = {
        "ops": [o["op"] for o in ops], "op_counts": {k: sum(o["op"] == k for o in ops) for k in sorted({o["op"] for o in ops})},
        "tensor_dtypes": sorted({type_name(t.type) for t in sg.tensors}), "float_ops": float_ops, "integer_only": not float_ops,
        "weights_per_tensor": per_tensor, "weights": weights}
    if spec.allowed_ops is not None:
        report["allowed_ops"] = list(spec.allowed_ops)
        report["allow_list_source"] = spec.allow_list_source
    return report


def keras_placeable(keras_model: Any) -> bool:
    """Whether nilmc's Keras mapping (Conv2D / Dense layers, :func:`nilmc.quantization.qat.keras_quant_from_params`)
    places ``keras_model``; else its full-integer TFLite is planned from the ONNX graph
    (:func:`nilmc.backends.onnx_to_tf.build_int8_from_keras`)."""
    from nilmc.quantization.qat import weighted_layers

    try:
        weighted_layers(keras_model)
    except QuantizationError:
        return False
    return not recurrent_layers(keras_model)


def scan_keras_ops(keras_model: Any, allowed: tuple[str, ...]) -> list[str]:
    """Ops of the FP32 TFLite conversion of ``keras_model`` outside ``allowed`` (to name the culprit when the
    full-integer conversion fails); [] when none."""
    return sorted({o["op"] for o in graph_ops(convert_keras(keras_model, "fp32")) if o["op"] not in allowed})


def integer_params(model: Model, keras_model: Any, spec: FullIntegerSpec, options: Mapping[str, Any], *,
                   estimator: str | None = None) -> IntegerParams:
    """nilmc's parameters for ``spec``: ``options["params"]`` when derived under ``spec.traits`` (I/O dtype aside),
    else ``QuantContext.params(spec.traits)`` from ``options["quant"]``; then the overflow checks under
    ``spec.overflow_policy``; then keyed by Keras layer with the output widened to the contract's peak."""
    from nilmc.quantization.qat import keras_quant_from_params, widen_output

    shared = shared_integer_params(model, spec, options, estimator=estimator)
    shared.kq = widen_output(keras_quant_from_params(keras_model, shared.params), model.contract)
    return shared


def shared_integer_params(model: Model, spec: FullIntegerSpec, options: Mapping[str, Any], *, estimator: str | None = None,
                          float_tail: Collection[str] = ()) -> IntegerParams:
    """nilmc's parameters for ``spec`` keyed by the ONNX graph's tensors (``kq`` None): ``options["params"]`` when
    derived under ``spec.traits`` (I/O dtype aside), else ``QuantContext.params(spec.traits)``; then the overflow checks.
    ``float_tail`` (default none): ONNX nodes and tensors of a float32 tail stage: its layers and activations are kept
    float, so the overflow, coverage and calibration-floor checks see what is deployed."""
    from nilmc.quantization.context import require_quant
    from nilmc.quantization.overflow import check_overflow

    ctx = require_quant(options, spec.label)
    params = _given_params(options, spec.traits)
    if params is None:
        params = ctx.params(spec.traits, estimator=estimator)
        if estimator is not None:  # a fixed estimator gives plain parameters: precise input applied as the driver does
            from nilmc.quantization.api import with_precise_input

            params = with_precise_input(params, model.graph, getattr(ctx, "techniques", None))
    if float_tail:
        tail = set(float_tail)
        floats = [la.name for la in params.layers if la.name in tail] + [n for n, t in params.tensors.items() if n in tail and t.role == "activation"]
        params = replace(params, keep_float=tuple(dict.fromkeys((*params.keep_float, *floats))))
    overflow = check_overflow(model.graph, ctx.statistics, params, spec.traits, peak_output=model.contract,
                              policy=dict(spec.overflow_policy))
    precise = precise_layers(overflow.params) if spec.float_input else ()
    prefix: dict[str, str] = {}
    if precise:  # the input is float already: under the calibration SQNR floor, more layers may follow it in float
        grown = _float_prefix(model, ctx, overflow.params)
        if grown is not None:
            prefix = grown.layers
            overflow = check_overflow(model.graph, ctx.statistics, grown.params, spec.traits, peak_output=model.contract,
                                      policy=dict(spec.overflow_policy))
    final = overflow.params
    if spec.traits.fixed_lut_grids:  # whatever the techniques chose, the LOGISTIC / TANH kernels take one output grid
        from nilmc.quantization.params import pin_lut_grids

        final = pin_lut_grids(final, model.graph)
    return IntegerParams(final, overflow, None, ctx.calib_x, ctx.calibration, precise, prefix)


def _float_prefix(model: Model, ctx: Any, params: Any) -> Any:
    """The float prefix the calibration SQNR floor (``Techniques.min_calib_sqnr``) asks of a precise-input graph
    (:func:`~nilmc.quantization.mixed_precision.grow_float_prefix`), or None when the floor is off, holds already, or
    no layer raised the SQNR. TFLite's integer graph cannot keep an inner layer float as the QDQ targets do, but the
    layers after the float input can stay float before the one QUANTIZE into it."""
    from nilmc.quantization._ort import output_step
    from nilmc.quantization.api import Techniques
    from nilmc.quantization.mixed_precision import grow_float_prefix

    tech = ctx.techniques if getattr(ctx, "techniques", None) is not None else Techniques()
    if tech.min_calib_sqnr is None:
        return None
    grown = grow_float_prefix(model.graph, params, ctx.calib_x, float(tech.min_calib_sqnr), max_windows=tech.max_windows,
                              step=output_step(model.contract))
    return grown if grown.layers else None


def precise_layers(params: Any) -> tuple[str, ...]:
    """The layers ``params`` keep float because they read the graph input (``provenance["precise_input"]``)."""
    named = (params.provenance.get("precise_input") or {}).get("float_layers", ())
    return tuple(n for n in named if n in params.keep_float)


def kept_float_ignored(params: Any, precise: tuple[str, ...]) -> dict[str, Any] | None:
    """The manifest note for layers ``params`` keep float that this TFLite lowering quantizes anyway (None: none)."""
    ignored = [n for n in params.keep_float if n not in precise]
    if not ignored:
        return None
    return {"layers": ignored, "why": "this TFLite lowering runs only the layers reading the graph input in float (precise input); "
                                      "these are quantized like the rest"}


def _given_params(options: Mapping[str, Any], traits: QuantTraits) -> Any:
    """``options["params"]`` when the driver derived them under ``traits`` (I/O dtype changes no parameter), else None."""
    given = options.get("params")
    if given is None or given.traits.with_(io_dtype="int8") != traits.with_(io_dtype="int8"):
        return None
    return given


def build_full_integer(keras_model: Any, kq: KerasQuant, representative: np.ndarray, spec: FullIntegerSpec, *,
                       where: str = "the model", float_input: int = 0, float_prefix: Mapping[str, str] | None = None
                       ) -> tuple[FullIntegerTFLite, dict[str, Any]]:
    """:func:`build_int8_tflite` under ``spec`` and :func:`check_graph` of the result: ``(result, graph report)``.
    ``float_input`` (default 0): layers kept float by precise input (``IntegerParams.precise``; ``spec.float_input`` only);
    ``float_prefix``: the float prefix after them (``IntegerParams.prefix``, ONNX layer names, mapped onto ``kq``'s Keras layers).

    When the converter fails and ``spec.allowed_ops`` is set, the ops outside it are named
    (:class:`UnsupportedOpError`) instead of the converter's message."""
    keras_prefix = {kl.name: float_prefix[kl.source] for kl in kq.layers if kl.source in (float_prefix or {})}
    if len(keras_prefix) != len(float_prefix or {}):
        raise InternalError(f"the float prefix {list(float_prefix or {})} does not map onto the Keras layers "
                            f"{[kl.name for kl in kq.layers]}", "report this model")
    try:
        result = build_int8_tflite(keras_model, kq, representative, per_tensor=spec.per_tensor, io_dtype=spec.io_dtype,
                                   float_input=float_input if spec.float_input else 0, activations=spec.activations,
                                   float_prefix=keras_prefix if spec.float_input else None)
    except BadInputError:
        bad = scan_keras_ops(keras_model, spec.allowed_ops) if spec.allowed_ops is not None else []
        if bad:
            raise UnsupportedOpError(bad, where, target=spec.target, allowed=spec.allowed_ops or ()) from None
        raise
    return result, check_graph(result.flatbuffer, spec, where=where)

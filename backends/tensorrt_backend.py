"""TensorRT: strongly typed ONNX (FP16, INT8 Q/DQ) + the engine build hand-off.

TensorRT 10 builds *strongly typed* networks (``--stronglyTyped``; TensorRT 11 has no
other kind): every tensor's precision is the one written in the ONNX, so the precision
lives in the graph nilmc writes, not in builder flags.

* ``fp16`` — the model's graph with FP16 weights and FP16 compute: every float
  initializer / ``Constant`` becomes float16, a ``Cast`` to float16 follows the float32
  graph input and a ``Cast`` back to float32 produces the graph output (float32 I/O).
  Written with onnx's own helpers (:func:`to_float16`); weights beyond the FP16 range
  are refused, and when calibration statistics are at hand every activation's range
  is checked against it as well.
* ``int8`` — explicit Q/DQ per TensorRT's rules: symmetric int8, zero point 0,
  per-channel weights on the output-channel axis (Conv axis 0 of OIHW, MatMul axis 1
  of ``[in, out]``), built by :func:`nilmc.quantization.qdq.build_qdq_model` with
  :data:`TENSORRT_INT8` traits. TensorRT's ``DequantizeLinear`` takes only int8/fp8/int4
  inputs, so each int32 bias ``DequantizeLinear`` is folded into the float32 bias it
  computes (same float32 values, bit for bit). Non-quantized parts stay float32.

Beside ``model.onnx``, ``lower`` writes ``build_engine.py`` (TensorRT Python builder:
parse ONNX, strongly typed network, optimization profile for batch 1..1024 (opt 256),
serialize ``model.engine``) and ``trtexec.txt`` (the equivalent ``trtexec`` line).

Where the ``tensorrt`` extra is installed (TensorRT's Python package and libraries, Polygraphy), TensorRT imports
*and* an NVIDIA GPU is present, ``lower`` builds ``model.engine`` from that very ONNX with Polygraphy (strongly
typed, the same profile, detailed profiling verbosity), reads every layer's precision from the engine inspector
and refuses the engine when a layer meant for INT8 (a Conv / MatMul / Gemm nilmc quantized) or FP16 takes
another precision (``info["layer_precisions"]``); the runner executes the engine through Polygraphy's
``TrtRunner`` (verification MEASURED; engines are not byte-identical between builds: TensorRT times tactics).
Otherwise no engine file is written: the runner executes the strongly typed ONNX on onnxruntime's CPU provider
and the verification is EMULATED (Q/DQ and FP16 numerics as onnxruntime computes them, not TensorRT's kernels;
onnxruntime upcasts FP16 ops that lack a CPU FP16 kernel, e.g. LSTM / GRU, to float32). The ONNX itself is
deterministic. ``trtexec.txt`` also carries the ``polygraphy run`` line that compares TensorRT with onnxruntime
on every tensor.
"""
from __future__ import annotations

import ctypes
import importlib.util
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from nilmc.backends.base import Artifact, Capabilities, Verification
from nilmc.backends.onnxruntime_backend import OrtRunner
from nilmc.compiler.errors import BadInputError, InternalError, MissingDependencyError, QuantizationError, UnknownBackendError
from nilmc.compiler.model import ONNX_IR_VERSION
from nilmc.quantization.traits import TENSORRT_INT8

if TYPE_CHECKING:
    from nilmc.compiler.model import Model

ONNX_FILE, ENGINE_FILE, SCRIPT_FILE, TRTEXEC_FILE = "model.onnx", "model.engine", "build_engine.py", "trtexec.txt"
# Optimization profile of the engine: batch 1 .. MAX_BATCH, tuned for OPT_BATCH.
MIN_BATCH, OPT_BATCH, MAX_BATCH = 1, 256, 1024
FP16_MAX = float(np.finfo(np.float16).max)  # 65504
ENGINE_NOT_BUILT = ("engine not built here: needs TensorRT libraries + NVIDIA GPU; "
                    "run build_engine.py or the trtexec line")

# Ops whose float inputs/outputs may all be float16 (no float32-only attribute or input).
FP16_OPS = frozenset({
    "Add", "Sub", "Mul", "Div", "Relu", "LeakyRelu", "Clip", "Sigmoid", "Tanh", "Softmax", "Conv", "ConvTranspose",
    "MatMul", "Gemm", "Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "MaxPool", "AveragePool",
    "GlobalAveragePool", "GlobalMaxPool", "Concat", "BatchNormalization", "Pad", "Slice", "Gather", "Shape", "Cast",
    "Constant", "Split", "Max", "Min", "Abs", "Neg", "Sqrt", "Exp", "Erf", "Pow", "ReduceMean", "ReduceSum",
    # Expand (its shape input is int64), LSTM and GRU (every float input is type T, float16 allowed; sequence_lens
    # is int32; activation alpha/beta are float attributes, not tensors): the recurrent models of seeds 000 and 002
    "Expand", "LSTM", "GRU",
    # Reciprocal (Keras LayerNormalization's rsqrt) and ReduceProd (tf2onnx's shape arithmetic, int64 there): type T, float16 allowed
    "Reciprocal", "ReduceProd",
    # PyTorch exports' activations and normalizations (fuzzed: tensorrt:int8 took them, tensorrt:fp16 refused them): every
    # float input is type T, float16 allowed (LayerNormalization's Mean / InvStdDev outputs are type U, also float16)
    "Softplus", "Softsign", "Elu", "Selu", "HardSigmoid", "HardSwish", "PRelu", "LayerNormalization", "InstanceNormalization",
    "Log", "ReduceMax", "ReduceMin", "Floor", "Ceil", "Round", "Sign", "Where", "Tile", "ConstantOfShape", "Range",
    # Resize: X and roi float16; its scales input is tensor(float) in every opset, so it stays float32 (_FLOAT32_INPUTS)
    "Resize",
})
# Inputs that are float32 whatever the op's compute type: left as they are by to_float16.
_FLOAT32_INPUTS = {"Resize": (2,)}


# ---------------------------------------------------------------- FP16
def _fp16_array(name: str, values: np.ndarray) -> np.ndarray:
    finite = values[np.isfinite(values)]
    peak = float(np.max(np.abs(finite))) if finite.size else 0.0
    if peak > FP16_MAX:
        raise QuantizationError(f"constant {name!r} holds |value| {peak:.6g} beyond the FP16 range ({FP16_MAX:g})",
                                "use tensorrt:int8 or an FP32 target for this model")
    return values.astype(np.float16)


def _convert_tensor(t: TensorProto) -> TensorProto:
    if t.data_type != TensorProto.FLOAT:
        return t
    return numpy_helper.from_array(_fp16_array(t.name, numpy_helper.to_array(t)), t.name)


def _convert_node(node: onnx.NodeProto) -> None:
    if node.op_type not in FP16_OPS:
        raise QuantizationError(f"node {node.name or node.output[0]!r} ({node.op_type}) has no FP16 rule in nilmc",
                                f"supported ops: {', '.join(sorted(FP16_OPS))}; use tensorrt:int8 or report the op")
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.TENSOR:
            attr.t.CopyFrom(_convert_tensor(attr.t))
        elif node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT:
            attr.i = TensorProto.FLOAT16


def _rename_inputs(nodes: list[onnx.NodeProto], old: str, new: str) -> None:
    for node in nodes:
        node.input[:] = [new if name == old else name for name in node.input]


def _float_io(values: Any) -> list[onnx.ValueInfoProto]:
    return [v for v in values if v.type.tensor_type.elem_type == TensorProto.FLOAT]


def to_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """A strongly typed FP16 copy of ``model``: float16 weights and compute, float32 graph I/O.

    Raises :class:`QuantizationError` for an op without an FP16 rule or a constant beyond ±65504.
    """
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    nodes = list(g.node)
    keep32 = {n.input[i] for n in nodes for i in _FLOAT32_INPUTS.get(n.op_type, ()) if i < len(n.input) and n.input[i]}
    for node in nodes:
        if not (node.op_type == "Constant" and node.output[0] in keep32):
            _convert_node(node)
    inits = [t if t.name in keep32 else _convert_tensor(t) for t in g.initializer]
    head = []
    for inp in _float_io(g.input):
        cast_out = inp.name + "_fp16"
        _rename_inputs(nodes, inp.name, cast_out)
        head.append(helper.make_node("Cast", [inp.name], [cast_out], name=inp.name + "_to_fp16", to=TensorProto.FLOAT16))
    tail = []
    for out in _float_io(g.output):
        inner = out.name + "_fp16"
        for node in nodes:
            node.output[:] = [inner if name == out.name else name for name in node.output]
        _rename_inputs(nodes, out.name, inner)
        tail.append(helper.make_node("Cast", [inner], [out.name], name=out.name + "_to_fp32", to=TensorProto.FLOAT))
    del g.node[:]
    g.node.extend(head + nodes + tail)
    del g.initializer[:]
    g.initializer.extend(inits)
    del g.value_info[:]  # stale float32 annotations; shape inference rebuilds what it needs
    m.ir_version = ONNX_IR_VERSION
    onnx.checker.check_model(m, full_check=True)  # strict type inference: every op agrees on float16
    return m


def activation_peak(stats: Any) -> tuple[str, float]:
    """The activation with the largest magnitude in calibration statistics, and that magnitude."""
    name, peak = "", 0.0
    for tensor in stats.activations():
        ts = stats[tensor]
        value = max(abs(ts.minimum), abs(ts.maximum))
        if value > peak:
            name, peak = tensor, value
    return name, peak


def _check_fp16_activations(options: Mapping[str, Any] | None) -> dict[str, Any]:
    ctx = (options or {}).get("quant")
    if ctx is None:
        return {"checked": False, "why": "no calibration set given"}
    name, peak = activation_peak(ctx.statistics)
    if peak > FP16_MAX:
        raise QuantizationError(f"activation {name!r} reaches |x| = {peak:.6g} on the calibration set, beyond FP16 ({FP16_MAX:g})",
                                "normalize the input (contract normalization B-E) or use tensorrt:int8")
    return {"checked": True, "max_abs_activation": peak, "tensor": name, "limit": FP16_MAX}


# ---------------------------------------------------------------- INT8
def fold_bias_dequantize(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace every ``DequantizeLinear`` of an int32 initializer by the float32 constant it computes.

    TensorRT's DequantizeLinear accepts int8/fp8/int4 inputs only; a bias is added in
    float by TensorRT anyway. Values: ``float32((q - zero_point) * scale)``, as
    onnxruntime's DequantizeLinear computes them.
    """
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    keep, folded = [], []
    for node in g.node:
        q = inits.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if q is None or q.data_type != TensorProto.INT32:
            keep.append(node)
            continue
        folded.append(numpy_helper.from_array(_dequantize(node, inits), node.output[0]))
    del g.node[:]
    g.node.extend(keep)
    used = {name for node in keep for name in node.input}
    remaining = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(remaining + folded)
    onnx.checker.check_model(m)
    return m


def _dequantize(node: onnx.NodeProto, inits: Mapping[str, TensorProto]) -> np.ndarray:
    q = numpy_helper.to_array(inits[node.input[0]]).astype(np.int64)
    scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
    zp = numpy_helper.to_array(inits[node.input[2]]).astype(np.int64) if len(node.input) > 2 and node.input[2] else np.zeros_like(scale, np.int64)
    if scale.ndim == 1 and q.ndim > 1:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        shape = [1] * q.ndim
        shape[axis] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    return ((q - zp).astype(np.float32) * scale).astype(np.float32)


def qdq_problems(model: onnx.ModelProto) -> list[str]:
    """Where ``model`` breaks TensorRT's explicit-quantization rules (empty when it follows them)."""
    inits = {t.name: t for t in model.graph.initializer}
    problems = []
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        zp_name = node.input[2] if len(node.input) > 2 else ""
        zp = inits.get(zp_name)
        if zp is not None and (zp.data_type != TensorProto.INT8 or np.any(numpy_helper.to_array(zp) != 0)):
            problems.append(f"{node.name}: zero point {zp_name!r} is not int8 zeros")
        src = inits.get(node.input[0])
        if node.op_type == "DequantizeLinear" and src is not None and src.data_type != TensorProto.INT8:
            problems.append(f"{node.name}: dequantizes a {TensorProto.DataType.Name(src.data_type)} constant")
    return problems


def tensorrt_qdq_model(model: Model, params: Any) -> onnx.ModelProto:
    """The INT8 Q/DQ ONNX TensorRT parses: nilmc's QDQ graph with bias DequantizeLinear folded."""
    from nilmc.quantization.qdq import build_qdq_model

    proto = fold_bias_dequantize(build_qdq_model(model.graph, params))
    problems = qdq_problems(proto)
    if problems:
        raise InternalError(f"the TensorRT Q/DQ graph breaks TensorRT's rules: {problems[:5]}", "report this as a nilmc bug")
    return proto


# ---------------------------------------------------------------- hand-off files
_SCRIPT = '''#!/usr/bin/env python3
"""Build a TensorRT engine from {onnx} (written by nilmc for target tensorrt:{precision}).

Needs the TensorRT (>= 10) Python bindings and an NVIDIA GPU. The ONNX is strongly
typed: its tensor types fix every layer's precision, so no --fp16/--int8 flag is used.
Usage: python {script} [--onnx {onnx}] [--engine {engine}] [--workspace-mib 1024]
Equivalent: {trtexec}
"""
import argparse
from pathlib import Path

HERE = Path(__file__).resolve().parent
INPUT_NAME = {input_name!r}
WINDOW_SHAPE = {window_shape!r}  # one window; the batch dimension comes first
MIN_BATCH, OPT_BATCH, MAX_BATCH = {min_batch}, {opt_batch}, {max_batch}


def build(onnx_path: Path, engine_path: Path, workspace_mib: int) -> None:
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    flags = 0 if strongly_typed is None else 1 << int(strongly_typed)  # TensorRT 11: always strongly typed
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise SystemExit(f"TensorRT could not parse {{onnx_path}}:\\n{{errors}}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # every layer's precision in the engine inspector
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, (MIN_BATCH, *WINDOW_SHAPE), (OPT_BATCH, *WINDOW_SHAPE), (MAX_BATCH, *WINDOW_SHAPE))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise SystemExit("TensorRT failed to build the engine (see its log above)")
    tmp = engine_path.with_name(engine_path.name + ".partial")
    tmp.write_bytes(bytes(serialized))
    tmp.replace(engine_path)
    print(f"wrote {{engine_path}} ({{engine_path.stat().st_size}} bytes, TensorRT {{trt.__version__}})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--onnx", type=Path, default=HERE / {onnx!r})
    ap.add_argument("--engine", type=Path, default=HERE / {engine!r})
    ap.add_argument("--workspace-mib", type=int, default=1024)
    args = ap.parse_args()
    build(args.onnx, args.engine, args.workspace_mib)


if __name__ == "__main__":
    main()
'''


def _shape_arg(batch: int, window: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in (batch, *window))


def trtexec_line(input_name: str, window: tuple[int, ...]) -> str:
    """The ``trtexec`` command equivalent to ``build_engine.py`` (run in the bundle directory)."""
    shapes = " ".join(f"--{k}Shapes={input_name}:{_shape_arg(b, window)}"
                      for k, b in (("min", MIN_BATCH), ("opt", OPT_BATCH), ("max", MAX_BATCH)))
    return f"trtexec --onnx={ONNX_FILE} --stronglyTyped {shapes} --saveEngine={ENGINE_FILE}"


def write_handoff(out_dir: Path, *, precision: str, input_name: str, window: tuple[int, ...]) -> str:
    """Write ``build_engine.py`` and ``trtexec.txt``; returns the trtexec line."""
    line = trtexec_line(input_name, window)
    script = _SCRIPT.format(onnx=ONNX_FILE, engine=ENGINE_FILE, script=SCRIPT_FILE, precision=precision, trtexec=line,
                            input_name=input_name, window_shape=tuple(int(d) for d in window),
                            min_batch=MIN_BATCH, opt_batch=OPT_BATCH, max_batch=MAX_BATCH)
    (out_dir / SCRIPT_FILE).write_text(script)
    (out_dir / TRTEXEC_FILE).write_text(
        f"# Build the TensorRT engine for tensorrt:{precision} (TensorRT 10; run in this directory, on the target GPU).\n"
        "# TensorRT 11 builds every network strongly typed: drop --stronglyTyped if your trtexec rejects it.\n"
        f"{line}\n"
        "# Layer by layer against onnxruntime (Polygraphy: every tensor marked as an output in both runtimes):\n"
        f"# {polygraphy_compare_line(input_name, window)}\n")
    return line


def polygraphy_compare_line(input_name: str, window: tuple[int, ...]) -> str:
    """``polygraphy run`` comparing TensorRT with onnxruntime on every tensor of ``model.onnx`` (batch OPT_BATCH)."""
    shape = ",".join(str(int(d)) for d in (OPT_BATCH, *window))
    return (f"polygraphy run {ONNX_FILE} --trt --strongly-typed --onnxrt --trt-outputs mark all --onnx-outputs mark all "
            f"--input-shapes {input_name}:[{shape}] --atol 1e-2 --rtol 1e-2")


# ---------------------------------------------------------------- engine (only where TensorRT + a GPU exist)
def _gpu_count() -> int:
    """NVIDIA GPUs visible through the CUDA driver (0 when there is no driver)."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return int(count.value)


def engine_build_possible() -> tuple[bool, str]:
    """Whether this machine can build and run a TensorRT engine, and why not.

    Needs TensorRT's Python package with its libraries (NVIDIA's index), Polygraphy (the ``tensorrt`` extra), an NVIDIA GPU,
    and TensorRT importing (its libraries load); checked in that order, the GPU before the heavy import."""
    remedies = {"tensorrt": "pip install --extra-index-url https://pypi.nvidia.com tensorrt-cu12 (NVIDIA's index; not on PyPI)",
                "polygraphy": "pip install 'nilmc[tensorrt]'"}
    for module, remedy in remedies.items():
        if importlib.util.find_spec(module) is None:
            return False, f"the Python package '{module}' is not installed ({remedy})"
    if _gpu_count() < 1:
        return False, "no NVIDIA GPU visible"
    try:
        import tensorrt  # noqa: F401  (its shared libraries load here)
    except Exception as exc:  # an install without its libraries fails here, whatever the exception type
        return False, f"tensorrt does not import ({type(exc).__name__}: {str(exc)[:200]})"
    return True, "ok"


def build_engine(onnx_path: Path, engine_path: Path, *, input_name: str, window: tuple[int, ...], workspace_mib: int = 1024) -> str:
    """Build ``engine_path`` from the strongly typed ``onnx_path`` with Polygraphy (profile batch MIN..MAX, opt OPT;
    detailed profiling verbosity so that the engine inspector reports every layer's precision). Returns a log line."""
    import tensorrt as trt
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, Profile
    from polygraphy.exception import PolygraphyException

    from nilmc.compiler.io import atomic_write_bytes

    shape = tuple(int(d) for d in window)
    profile = Profile().add(input_name, min=(MIN_BATCH, *shape), opt=(OPT_BATCH, *shape), max=(MAX_BATCH, *shape))
    config = CreateConfig(profiles=[profile], profiling_verbosity=trt.ProfilingVerbosity.DETAILED,
                          memory_pool_limits={trt.MemoryPoolType.WORKSPACE: workspace_mib << 20})
    try:
        data = EngineBytesFromNetwork(NetworkFromOnnxPath(str(onnx_path), strongly_typed=True), config=config)()
    except PolygraphyException as exc:
        raise BadInputError(f"TensorRT could not build the engine ({str(exc)[-600:]})",
                            "check the TensorRT version (>= 10) and the log; model.onnx and build_engine.py are kept for a manual build") from None
    atomic_write_bytes(engine_path, bytes(data))
    return f"{engine_path.name}: {engine_path.stat().st_size} bytes, TensorRT {trt.__version__} (Polygraphy, strongly typed)"


def engine_layers(engine_path: Path, *, input_name: str, window: tuple[int, ...]) -> list[dict[str, Any]]:
    """The engine inspector's layers (JSON, detailed), with the input shape set to the optimum batch so that every
    tensor's format and data type is resolved (``N/A due to dynamic shapes`` otherwise)."""
    import json

    import tensorrt as trt

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    if engine is None:
        raise BadInputError(f"TensorRT could not load {str(engine_path)!r}", "rebuild it on this machine (engines are tied to the TensorRT version and GPU)")
    context = engine.create_execution_context()
    context.set_input_shape(input_name, (OPT_BATCH, *(int(d) for d in window)))
    inspector = engine.create_engine_inspector()
    inspector.execution_context = context
    info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    return [layer for layer in info.get("Layers", []) if isinstance(layer, dict)]


def tensor_precision(fmt: str) -> str:
    """``int8`` / ``fp16`` / ``fp32`` / ``unknown`` from an inspector ``Format/Datatype`` string
    (e.g. "Thirty-two wide channel vectorized row major Int8 format", "Row major linear FP16 format", "Float")."""
    low = fmt.lower()
    if "int8" in low:
        return "int8"
    if "fp16" in low or "half" in low:
        return "fp16"
    if "fp32" in low or "float" in low:
        return "fp32"
    return "unknown"


def _layer_inputs(layer: Mapping[str, Any]) -> list[str]:
    return [tensor_precision(str(t.get("Format/Datatype", ""))) for t in layer.get("Inputs", []) if isinstance(t, dict)]


def compute_nodes(proto: onnx.ModelProto, precision: str) -> list[tuple[str, ...]]:
    """The ONNX nodes whose TensorRT layers must run at ``precision``, each as the names TensorRT may give it (its own
    name; an unnamed node is ``node_of_<output>``): for ``int8`` the Conv / MatMul / Gemm nodes whose weights come from
    a DequantizeLinear (nilmc quantized them), for ``fp16`` every Conv / MatMul / Gemm."""
    compute = [n for n in proto.graph.node if n.op_type in ("Conv", "ConvTranspose", "MatMul", "Gemm")]
    if precision == "int8":
        dq_out = {o for n in proto.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
        compute = [n for n in compute if len(n.input) > 1 and n.input[1] in dq_out]
    return [(n.name,) if n.name else (f"node_of_{n.output[0]}", n.output[0]) for n in compute]


def _names(layer_name: str, candidates: tuple[str, ...]) -> bool:
    """Whether a TensorRT layer name holds one of ``candidates`` as a whole name (fused layers join names with " + ";
    Myelin regions read ``{ForeignNode[first...last]}``)."""
    return any(re.search(rf"(?<![A-Za-z0-9_/]){re.escape(c)}(?![A-Za-z0-9_])", layer_name) for c in candidates if c)


def check_layer_precisions(layers: Sequence[Mapping[str, Any]], nodes: Sequence[tuple[str, ...]], precision: str) -> dict[str, Any]:
    """Whether the engine runs each of ``nodes`` (from :func:`compute_nodes`) at ``precision``: every layer named after
    the node must take ``precision`` input (the inspector's ``Format/Datatype`` of its first input).

    Returns ``{"precision", "checked", "located", "not_located", "wrong", "layers"}``: ``wrong`` lists the layers at
    another precision (the check failed), ``not_located`` the nodes no layer is named after (the check is partial:
    ``checked`` is True only when every node was located)."""
    located: list[str] = []
    missing: list[str] = []
    wrong: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    for candidates in nodes:
        hits = [l for l in layers if _names(str(l.get("Name", "")), candidates)]
        (located if hits else missing).append(candidates[0])
        for layer in hits:
            row = {"node": candidates[0], "layer": str(layer.get("Name", "")), "type": str(layer.get("LayerType", "")),
                   "inputs": _layer_inputs(layer)}
            rows.append(row)
            if not row["inputs"] or row["inputs"][0] != precision:
                wrong.append(row)
    return {"precision": precision, "checked": bool(located) and not missing, "located": located, "not_located": missing,
            "wrong": wrong, "layers": rows}


class TensorRTEngineRunner:
    """Runs ``model.engine`` with TensorRT through Polygraphy's ``TrtRunner``, in chunks of at most ``MAX_BATCH``."""

    verification = Verification.MEASURED

    def __init__(self, engine_path: Path, *, max_batch: int = MAX_BATCH) -> None:
        self.engine_path = Path(engine_path)
        self.max_batch = max_batch
        self._runner: Any = None

    def __enter__(self) -> TensorRTEngineRunner:
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        self._runner = TrtRunner(EngineFromBytes(self.engine_path.read_bytes()))
        self._runner.activate()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._runner is not None:
            self._runner.deactivate()
        self._runner = None

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._runner is None:
            raise InternalError("TensorRTEngineRunner.infer called outside its context", "use `with backend.runner(artifact) as r:`")
        n = len(next(iter(feeds.values())))
        chunks = []
        for i in range(0, n, self.max_batch):
            out = self._runner.infer({k: np.ascontiguousarray(v[i:i + self.max_batch], np.float32) for k, v in feeds.items()})
            chunks.append({k: np.array(v, np.float32) for k, v in out.items()})  # copies: Polygraphy reuses its buffers
        return {name: np.concatenate([c[name] for c in chunks]) for name in chunks[0]}


class TensorRTOnnxEmulationRunner(OrtRunner):
    """Executes the strongly typed ONNX on onnxruntime CPU: an emulation, not TensorRT (int8 weights run as uint8 + 128,
    the same values: no int16 saturation from this host's x86 kernels, which TensorRT's do not have either)."""

    verification = Verification.EMULATED
    portable = True


# ---------------------------------------------------------------- backend
class TensorRTBackend:
    """Strongly typed ONNX for TensorRT (FP16, INT8 Q/DQ), build script + trtexec line; engine only where possible."""

    name = "tensorrt"
    capabilities = Capabilities(
        precisions=("fp16", "int8"),
        description="TensorRT strongly typed ONNX (FP16 / INT8 Q/DQ) + engine build hand-off; "
                    "verified by onnxruntime emulation unless TensorRT and a GPU are present",
        traits={"int8": TENSORRT_INT8},
        requires=(),
        extra="tensorrt",
        limitations={
            "engine": "the engine is built only where the tensorrt extra (tensorrt, polygraphy) imports and an NVIDIA GPU is present",
            "fp16": "emulated on onnxruntime CPU (float16 storage; ops without a CPU FP16 kernel run upcast to float32)",
            "int8": "emulated on onnxruntime CPU (Q/DQ numerics, not TensorRT's INT8 kernels)",
        },
    )

    def precheck(self, model: Model, precision: str) -> str | None:
        """An op without an FP16 rule, found from the graph alone (None: nothing found)."""
        if precision != "fp16":
            return None
        missing = sorted({n.op_type for n in model.graph.graph.node if n.op_type not in FP16_OPS})
        if not missing:
            return None
        return (f"op(s) {', '.join(missing)} have no FP16 rule in nilmc's strongly typed TensorRT lowering; "
                "use tensorrt:int8 or an FP32 target for this model")

    def lower(self, model: Model, out_dir: Path, *, precision: str = "fp16", options: Mapping[str, Any] | None = None) -> Artifact:
        """Write ``model.onnx``, ``build_engine.py``, ``trtexec.txt`` (+ ``model.engine`` where possible). Default ``fp16``."""
        if precision not in self.capabilities.precisions:
            raise UnknownBackendError(f"backend {self.name!r} has no precision {precision!r}",
                                      f"available: {', '.join(self.capabilities.precisions)}")
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        proto, info = self._graph(model, precision, options)
        _save(proto, model, out_dir / ONNX_FILE)
        line = write_handoff(out_dir, precision=precision, input_name=model.input_name, window=model.contract.model_input_shape())
        info.update({"strongly_typed": True, "trtexec": line, "build_script": SCRIPT_FILE,
                     "polygraphy_compare": polygraphy_compare_line(model.input_name, model.contract.model_input_shape()),
                     "optimization_profile": {"min": MIN_BATCH, "opt": OPT_BATCH, "max": MAX_BATCH}})
        files = [ONNX_FILE, SCRIPT_FILE, TRTEXEC_FILE]
        possible, why = engine_build_possible()
        if not possible:
            info.update({"engine": ENGINE_NOT_BUILT, "engine_built": False, "why_not_built": why,
                         "emulation": "onnxruntime CPU runs model.onnx; results are EMULATED, not TensorRT's"})
            return Artifact(self.name, precision, out_dir, ONNX_FILE, files, kind=_KINDS[precision] + " (engine not built)", info=info)
        window = model.contract.model_input_shape()
        log = build_engine(out_dir / ONNX_FILE, out_dir / ENGINE_FILE, input_name=model.input_name, window=window)
        check = check_layer_precisions(engine_layers(out_dir / ENGINE_FILE, input_name=model.input_name, window=window),
                                       compute_nodes(proto, precision), precision)
        if check["wrong"]:
            (out_dir / ENGINE_FILE).unlink()
            shown = "; ".join(f"{w['layer']!r} takes {'/'.join(w['inputs']) or 'an unknown type'}" for w in check["wrong"][:5])
            raise QuantizationError(f"the TensorRT engine runs {len(check['wrong'])} layer(s) meant for {precision} at another precision: {shown}",
                                    "check the TensorRT version and the Q/DQ placement (model.onnx); compare layer by layer with the "
                                    "polygraphy line in trtexec.txt")
        info.update({"engine": f"built here: {log}", "engine_built": True, "layer_precisions": check,
                     "determinism": "engines are not byte-identical between builds (TensorRT times tactics)"})
        info["tools"] = [*info["tools"], "tensorrt", "polygraphy"]
        return Artifact(self.name, precision, out_dir, ENGINE_FILE, [*files, ENGINE_FILE], kind=_KINDS[precision] + " engine", info=info)

    def _graph(self, model: Model, precision: str, options: Mapping[str, Any] | None) -> tuple[onnx.ModelProto, dict[str, Any]]:
        tools = ["onnx", "onnxruntime"]
        if precision == "fp16":
            info = {"tools": tools, "fp16_range_check": _check_fp16_activations(options), "io": "float32 (Cast to/from float16 inside)"}
            return to_float16(model.graph), info
        from nilmc.quantization.context import shared_params

        params = shared_params(options, TENSORRT_INT8, f"{self.name}:{precision}")
        info = {"tools": tools, "quantization": params.to_json(), "io": "float32 (Q/DQ inside)",
                "bias": "float32 (int32 bias DequantizeLinear folded: TensorRT dequantizes int8 only)"}
        return tensorrt_qdq_model(model, params), info

    def runner(self, artifact: Artifact) -> TensorRTEngineRunner | TensorRTOnnxEmulationRunner:
        if artifact.primary.endswith((".engine", ".plan")):
            possible, why = engine_build_possible()
            if not possible:
                raise MissingDependencyError("tensorrt", "tensorrt", f"running a TensorRT engine ({why})")
            return TensorRTEngineRunner(artifact.path)
        return TensorRTOnnxEmulationRunner(artifact.path)


def _save(proto: onnx.ModelProto, model: Model, path: Path) -> None:
    from nilmc.compiler.model import Model as _Model

    _Model(proto, model.contract, source=model.source).save_onnx(path)


_KINDS = {
    "fp16": "TensorRT strongly typed ONNX FP16",
    "int8": "TensorRT strongly typed ONNX INT8 (explicit Q/DQ)",
}

"""OpenVINO IR (``model.xml`` + ``model.bin``) on the OpenVINO CPU plugin.

Precisions:

* ``fp32`` — the model's ONNX converted by ``openvino.convert_model`` and saved
  with FP32 weights.
* ``fp16`` — the same IR saved with ``compress_to_fp16=True``: weights are stored
  as FP16 constants followed by a ``Convert`` to FP32 (about half the ``.bin``).
  **On the CPU plugin** the runner pins ``INFERENCE_PRECISION_HINT=f32``, so the
  FP16 artifact means *FP16-stored weights, FP32 arithmetic*: the runtime graph reports
  ``runtimePrecision`` f16 for Convolution/FullyConnected (the weights it reads) while
  their kernels are the ``*_f32`` ones (``runtime_layers[*].kernel``). On a GPU or NPU
  plugin the same IR would execute in FP16 — that is not measured here.
* ``int8`` — nilmc's QDQ ONNX (:func:`nilmc.quantization.qdq.build_qdq_model`, parameters
  from the shared :class:`QuantContext`) converted to IR: every Q/DQ pair becomes a
  ``FakeQuantize`` and the CPU plugin's low-precision transformations run the
  convolutions and dense layers as real u8/i8 kernels. Traits [:data:`OPENVINO_INT8`]:
  per-channel symmetric int8 weights, asymmetric uint8 activations (the CPU plugin
  folds the activation zero point into its integer kernels; both this and a
  symmetric-int8 variant were checked to execute as INT8). ``lower`` compiles the IR once
  and reads ``runtimePrecision`` of every Convolution / FullyConnected / MatMul in
  ``compiled.get_runtime_model()``; the counts go to ``Artifact.info["runtime_precisions"]``.
  The check is against nilmc's own placement (:func:`nilmc.quantization.placement.op_placement`):
  :class:`Int8NotExecutedError` is raised when nilmc put weighted layers on int8 grids and the plugin
  runs none of them in u8/i8. A model whose parameters keep every weighted layer float (precise
  input, the calibration SQNR floor; an LSTM nilmc does not quantize) gives an IR that computes in
  float, as the same parameters do in ``onnxruntime:int8``: it is lowered and verified, and
  ``info["int8_layers"]`` plus the manifest's placement say so (measured on the fuzz models
  o_ncw_gap / o_nw_lstm: with those layers forced to INT8 the plugin ran every one of them -- 1-D
  Conv after the input, Conv before GlobalAveragePool, Gemm after LSTM/Squeeze -- as u8 kernels).

Batch: the IR keeps the ONNX graph's dynamic batch dimension (``-1``; a static batch
is reshaped to dynamic), so one compiled model serves batch 1 and batched inference.

Runner: ``core.compile_model(xml, "CPU")`` with one inference thread, one stream,
``PERFORMANCE_HINT=LATENCY`` and ``INFERENCE_PRECISION_HINT=f32`` (no BF16 down-casting
on CPUs that support it), so results are deterministic; verification is MEASURED.

Determinism: the IR of a given model is byte-identical between runs (node names that
OpenVINO generates from process-wide counters are renamed by topological position), and so are
the runtime layer names in the artifact info: the plugin's own transformations name the layers
they create from the same counters (``Multiply_34707`` for a Convolution fused with a BatchNorm
scale), so such a name becomes ``<layer type>_rt<k>`` (``k``: its position among the compute layers).
"""
from __future__ import annotations

import collections
import re
import tempfile
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nilmc.backends.base import Artifact, Capabilities, Verification
from nilmc.compiler.errors import BadInputError, MissingDependencyError, QuantizationError, UnknownBackendError
from nilmc.quantization.traits import GENERIC_INT8, QuantTraits

if TYPE_CHECKING:
    from nilmc.compiler.model import Model

# Per-channel symmetric weights + asymmetric uint8 activations (float I/O) — the layout of OpenVINO's own ONNX QDQ
# examples; the CPU plugin runs it as u8 x i8 kernels. The weights use 7 bits ([-63, 63], stored as int8): on an x86 CPU
# without VNNI those kernels sum pairs of products at int16 (OpenVINO's "saturation issue"; NNCF's overflow_fix), and
# an artifact is verified on one CPU and deployed on others. Measured on an AVX2 EPYC (no VNNI): the example CtRNN
# 23.2 dB with 8-bit weights, 28.2 dB with 7-bit (onnxruntime, exact: 28.5); the shipped CNN 38.8 -> 37.2 dB, the
# bit it costs wherever nothing saturates. uint8 weight storage (onnxruntime's remedy) leaves OpenVINO's convolutions in f32.
OPENVINO_INT8: QuantTraits = GENERIC_INT8.with_(name="openvino_int8", weight_bits=7, narrow_range_weights=True)
# openvino.weight_bits=8: full 8-bit weights, for a deployment whose CPUs all have VNNI (or AMX)
OPENVINO_INT8_W8: QuantTraits = GENERIC_INT8.with_(name="openvino_int8_w8")
WEIGHT_BITS = {7: OPENVINO_INT8, 8: OPENVINO_INT8_W8}


@dataclass(frozen=True)
class OpenVINOOptions:
    """Typed options of the OpenVINO backend (``--option openvino.NAME=VALUE``): ``weight_bits`` (default 7: weights in
    [-63, 63], exact on every x86 CPU; 8: [-128, 127], whose u8 x s8 pairs saturate at int16 on CPUs without VNNI, for a
    fleet that has VNNI or AMX everywhere)."""

    weight_bits: int = 7

    def __post_init__(self) -> None:
        if self.weight_bits not in WEIGHT_BITS:
            raise BadInputError(f"openvino.weight_bits={self.weight_bits!r} is not one of {sorted(WEIGHT_BITS)}",
                                "use 7 (the default: exact on every x86 CPU) or 8 (CPUs with VNNI / AMX only)")

    def quant_traits(self, precision: str, traits: Any) -> Any:
        """The traits ``openvino:int8`` derives its parameters under with these options."""
        return WEIGHT_BITS[self.weight_bits] if precision == "int8" else traits

XML, BIN = "model.xml", "model.bin"
COMPUTE_LAYERS = frozenset({"Convolution", "FullyConnected", "MatMul", "GroupConvolution", "Deconvolution"})
INT8_PRECISIONS = frozenset({"u8", "i8"})
_GENERATED = re.compile(r"^[A-Za-z]+_\d+$")  # <Type>_<n>: a name OpenVINO drew from a process-wide counter
FP16_NOTE = ("FP16 IR = FP16-stored weights (compress_to_fp16=True). On the OpenVINO CPU plugin the runner pins "
             "INFERENCE_PRECISION_HINT=f32: weights are decompressed and the arithmetic is FP32. "
             "A GPU/NPU plugin would execute the same IR in FP16 (not measured here).")


class Int8NotExecutedError(QuantizationError):
    """The OpenVINO CPU plugin compiled the INT8 IR but runs no compute layer in u8/i8."""


def _openvino(purpose: str) -> Any:
    try:
        import openvino as ov
    except ImportError:
        raise MissingDependencyError("openvino", "openvino", purpose) from None
    return ov


def cpu_config(*, threads: int = 1) -> dict[str, Any]:
    """Deterministic CPU plugin settings. Defaults: 1 thread, 1 stream, f32 inference precision."""
    return {
        "INFERENCE_NUM_THREADS": int(threads),
        "NUM_STREAMS": 1,
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": "f32",
    }


# ---------------------------------------------------------------- conversion
def _onnx_names(proto: Any) -> set[str]:
    """Node, tensor and initializer names of an ONNX graph (OpenVINO keeps them as friendly names)."""
    g = proto.graph
    names = {n.name for n in g.node} | {o for n in g.node for o in n.output} | {t.name for t in g.initializer}
    return names | {v.name for v in (*g.input, *g.output)}


def _convert_onnx(onnx_path: Path) -> Any:
    """ONNX file -> ov.Model with a dynamic batch dimension (convert_model wants a path, not a ModelProto)."""
    import onnx

    ov = _openvino("converting ONNX to OpenVINO IR")
    ov_model = ov.convert_model(str(onnx_path))
    shapes = {}
    for inp in ov_model.inputs:
        shape = inp.get_partial_shape()
        if shape.rank.is_static and len(shape) > 0 and shape[0].is_static:
            dims = [-1] + [d.get_length() if d.is_static else -1 for d in list(shape)[1:]]
            shapes[inp.get_any_name()] = ov.PartialShape(dims)
    if shapes:
        ov_model.reshape(shapes)
    _canonical_names(ov_model, keep=_onnx_names(onnx.load(str(onnx_path), load_external_data=False)))
    return ov_model


def _canonical_names(ov_model: Any, *, keep: set[str]) -> None:
    """Rename ops whose friendly names come from OpenVINO's process-wide counters.

    Names found in the ONNX (``keep``) and graph inputs/outputs stay; a generated name
    (``<Type>_<number>``) becomes ``<Type>_nilmc<k>`` with ``k`` its topological position,
    so the IR is byte-identical however many models the process converted before.
    """
    for k, op in enumerate(ov_model.get_ordered_ops()):
        name = op.get_friendly_name()
        if _GENERATED.match(name) and name not in keep and op.get_type_name() not in ("Parameter", "Result"):
            op.set_friendly_name(f"{op.get_type_name()}_nilmc{k}")


def _save_ir(ov_model: Any, out_dir: Path, *, compress_to_fp16: bool) -> None:
    ov = _openvino("saving OpenVINO IR")
    ov.save_model(ov_model, str(out_dir / XML), compress_to_fp16=compress_to_fp16)


# ---------------------------------------------------------------- runtime inspection
def runtime_layers(compiled: Any, *, keep: Collection[str] = ()) -> list[dict[str, str]]:
    """Compute layers of a compiled model's runtime graph: name, layer type, runtime precision, kernel.

    ``keep`` (default empty): the IR's own op names. A runtime name that is not one of them and has the
    generated form ``<Type>_<number>`` (the plugin's transformations draw it from a process-wide counter, so it
    changes with what the process compiled before) becomes ``<layer type>_rt<k>``, ``k`` the layer's position
    in this list.
    """
    rows = []
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        layer_type = info["layerType"].astype(str)
        if layer_type in COMPUTE_LAYERS:
            name = op.get_friendly_name()
            rows.append({
                "name": f"{layer_type}_rt{len(rows)}" if _GENERATED.match(name) and name not in keep else name,
                "type": layer_type,
                "precision": info["runtimePrecision"].astype(str),
                "kernel": info["primitiveType"].astype(str),
            })
    return rows


def precision_counts(layers: list[dict[str, str]]) -> dict[str, dict[str, int]]:
    """``{layer type: {runtime precision: count}}``, keys sorted."""
    counts: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for row in layers:
        counts[row["type"]][row["precision"]] += 1
    return {t: dict(sorted(c.items())) for t, c in sorted(counts.items())}


def inspect_ir(xml: Path, input_shape: tuple[int, ...], *, threads: int = 1) -> list[dict[str, str]]:
    """Compile ``xml`` on the CPU plugin, run one all-zero batch-1 window (so kernels are chosen) and list its compute layers."""
    ov = _openvino("inspecting an OpenVINO IR")
    core = ov.Core()
    keep = {op.get_friendly_name() for op in core.read_model(str(xml)).get_ops()}
    compiled = core.compile_model(str(xml), "CPU", cpu_config(threads=threads))
    compiled(np.zeros((1, *input_shape), np.float32))
    return runtime_layers(compiled, keep=keep)


def _check_int8(layers: list[dict[str, str]], placed_int8: list[str]) -> dict[str, Any]:
    """``info["int8_layers"]``: the weighted layers nilmc put on int8 grids (``placed_int8``) against the runtime layers
    the plugin runs in u8/i8. Raises :class:`Int8NotExecutedError` when nilmc placed some and the plugin runs none."""
    ran = [r["name"] for r in layers if r["precision"] in INT8_PRECISIONS]
    record: dict[str, Any] = {"placed_by_nilmc": list(placed_int8), "run_by_plugin": ran}
    if not placed_int8:
        # nothing to check: the parameters keep every weighted layer float, as they do in onnxruntime:int8
        record["note"] = ("nilmc's parameters keep every weighted layer float (the manifest's placement says why), so the plugin "
                          "computes them in f32; the IR's INT8 is its activation FakeQuantize grids only")
        return record
    if not ran:
        seen = {r["name"]: r["precision"] for r in layers}
        raise Int8NotExecutedError(
            f"the OpenVINO CPU plugin runs no Convolution/FullyConnected/MatMul in int8, though nilmc put "
            f"{', '.join(placed_int8)} on int8 grids (runtime precisions: {seen})",
            "the plugin's low-precision transformations rejected every quantized layer of this graph; "
            "use openvino:fp16 / openvino:fp32, or onnxruntime:int8 / tensorrt:int8 for an INT8 artifact of this model",
        )
    return record


# ---------------------------------------------------------------- backend
class OpenVINORunner:
    """Runs an IR on the OpenVINO CPU plugin (deterministic settings, see :func:`cpu_config`)."""

    verification = Verification.MEASURED

    def __init__(self, xml: Path, *, threads: int = 1) -> None:
        self.xml = Path(xml)
        self.threads = threads
        self._compiled: Any = None
        self._request: Any = None

    def __enter__(self) -> OpenVINORunner:
        ov = _openvino("running an OpenVINO IR")
        self._compiled = ov.Core().compile_model(str(self.xml), "CPU", cpu_config(threads=self.threads))
        self._request = self._compiled.create_infer_request()
        return self

    def __exit__(self, *exc: object) -> None:
        self._request = None
        self._compiled = None

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        inputs = {name: np.ascontiguousarray(v, np.float32) for name, v in feeds.items()}
        result = self._request.infer(inputs)
        return {out.get_any_name(): np.array(result[out]) for out in self._compiled.outputs}


class OpenVINOBackend:
    """OpenVINO IR for the CPU plugin: FP32, FP16 (compressed weights) and INT8 (QDQ -> FakeQuantize)."""

    name = "openvino"
    capabilities = Capabilities(
        precisions=("fp32", "fp16", "int8"),
        description="OpenVINO IR (model.xml + model.bin) on the OpenVINO CPU plugin",
        traits={"int8": OPENVINO_INT8},
        options=OpenVINOOptions,
        requires=("openvino",),
        extra="openvino",
        limitations={
            "fp16": "measured on CPU as FP16 weights with FP32 arithmetic; FP16 execution needs a GPU/NPU plugin",
        },
    )

    def lower(self, model: Model, out_dir: Path, *, precision: str = "fp32", options: Mapping[str, Any] | None = None) -> Artifact:
        """Write ``model.xml`` + ``model.bin`` for ``precision`` (default ``fp32``); ``int8`` needs ``options["quant"]``."""
        if precision not in self.capabilities.precisions:
            raise UnknownBackendError(f"backend {self.name!r} has no precision {precision!r}",
                                      f"available: {', '.join(self.capabilities.precisions)}")
        _openvino(f"lowering to {self.name}:{precision}")
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        source, info, placed = self._source_model(model, precision, options)
        with tempfile.TemporaryDirectory() as tmp:
            onnx_path = source.save_onnx(Path(tmp) / "model.onnx")
            ov_model = _convert_onnx(onnx_path)
        _save_ir(ov_model, out_dir, compress_to_fp16=precision == "fp16")
        layers = inspect_ir(out_dir / XML, model.contract.model_input_shape())
        if placed is not None:
            info["int8_layers"] = _check_int8(layers, placed)
        info.update(self._info(precision, layers))
        return Artifact(self.name, precision, out_dir, XML, [XML, BIN], kind=_KINDS[precision], info=info)

    def _source_model(self, model: Model, precision: str,
                      options: Mapping[str, Any] | None) -> tuple[Model, dict[str, Any], list[str] | None]:
        """The model to convert, its info, and (int8) the weighted layers nilmc puts on int8 grids."""
        if precision != "int8":
            return model, {}, None
        from nilmc.compiler.model import Model as _Model
        from nilmc.quantization.context import shared_params
        from nilmc.quantization.placement import op_placement
        from nilmc.quantization.qdq import build_qdq_model

        bits = int((options or {}).get("weight_bits", OpenVINOOptions.weight_bits))
        params = shared_params(options, OpenVINOOptions(weight_bits=bits).quant_traits(precision, OPENVINO_INT8), f"{self.name}:{precision}")
        qdq = _Model(build_qdq_model(model.graph, params), model.contract, source=model.source)
        return qdq, {"quantization": params.to_json()}, op_placement(model.graph, params)["int8"]

    @staticmethod
    def _info(precision: str, layers: list[dict[str, str]]) -> dict[str, Any]:
        info: dict[str, Any] = {
            "tools": ["openvino"],
            "device": "CPU",
            "runtime_precisions": precision_counts(layers),
            "runtime_layers": layers,
            "batch": "dynamic (-1): one compiled model serves any batch size",
            "runner_config": cpu_config(),
        }
        if precision == "fp16":
            info["note"] = FP16_NOTE
        return info

    def runner(self, artifact: Artifact) -> OpenVINORunner:
        return OpenVINORunner(artifact.path)

    def precheck(self, model: Model, precision: str) -> str | None:
        """What keeps ``model`` from ``openvino:<precision>``, found before any calibration (about a second): the FP32
        graph converted with ``openvino.convert_model`` and asked of the CPU plugin (``Core.query_model``). None: nothing found."""
        if precision not in self.capabilities.precisions:
            return None
        try:
            ov = _openvino("checking a model for OpenVINO")
        except MissingDependencyError:
            return f"openvino:{precision} needs OpenVINO, which is not installed; pip install 'nilmc[openvino]'"
        with tempfile.TemporaryDirectory() as tmp:
            try:
                ov_model = ov.convert_model(str(model.save_onnx(Path(tmp) / "model.onnx")))
            except Exception as exc:  # OpenVINO's frontend names the op it has no conversion for
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
                return f"OpenVINO cannot convert {model.source or 'the model'} ({first}); lower it with onnxruntime:{precision}"
        supported = ov.Core().query_model(ov_model, "CPU")
        missing = sorted({op.get_type_name() for op in ov_model.get_ops()
                          if op.get_friendly_name() not in supported and op.get_type_name() not in ("Parameter", "Result", "Constant")})
        if missing:
            return f"the OpenVINO CPU plugin does not run {', '.join(missing)}; lower it with onnxruntime:{precision}"
        return None


_KINDS = {
    "fp32": "OpenVINO IR FP32 (CPU plugin)",
    "fp16": "OpenVINO IR FP16-compressed weights (CPU plugin computes in FP32)",
    "int8": "OpenVINO IR INT8 (FakeQuantize from QDQ; CPU plugin u8/i8 kernels)",
}

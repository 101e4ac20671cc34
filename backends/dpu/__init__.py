"""AMD Vitis AI DPU (DPUCZDX8G) backend: ``dpu:b2304`` (Ultra96) and ``dpu:b4096`` (ZCU102/ZCU104/KV260).

The precision names the DPU architecture; the arithmetic is always per-tensor
symmetric INT8 with power-of-two scales and DPU rounding. ``lower`` needs no
Vitis AI tool and writes into the bundle:

* ``quantized.xmodel`` - XIR protobuf (``xir.proto`` -> ``xir_pb2``) with float ops and
  ``fix`` ops: the input of ``vai_c_xir`` ("quantized xmodel — compile with vai_c_xir");
* ``cpu_pre.onnx`` / ``cpu_post.onnx`` - the FP32 CPU stages around the DPU subgraph
  (:mod:`nilmc.backends.dpu.partition`): by default the layers reading the graph input run there
  (precise input: the input is never quantized), and the ops from the first one the DPU cannot run (no operator, or
  outside the target's limits) onward;
* ``arch.json``, ``compile.sh`` (the exact ``vai_c_xir`` line), ``run_on_board.py`` (VART);
* ``inspector.json`` - per-layer DPU/CPU placement under the target's limits, and why;
* ``dpu_params.json`` - fix points, shift_cut / shift_bias, repairs, accumulator peaks.

The runner is the bit-accurate numpy emulator running the xmodel read back from the
bundle, between the CPU stages on onnxruntime in FP32 (:attr:`Verification.EMULATED`): the accuracy the gate sees is what the DPU
computes for that file, on this machine, without a board. ``vai_c_xir`` (in AMD's
Vitis AI docker image) and a board are needed for the compiled xmodel, latency and
power; none is claimed here. ``xir`` / ``vart`` are imported only by the board script.
"""
from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nilmc.backends.base import Artifact, Capabilities, Verification
from nilmc.backends.dpu import handoff
from nilmc.backends.dpu.emulator import DpuEmulator, EmulationError
from nilmc.backends.dpu.inspector import InspectionReport, inspect_graph
from nilmc.backends.dpu.ir import DpuGraph, from_onnx
from nilmc.backends.dpu.partition import CPU_LAYERS, CPU_POST, CPU_PRE, CpuStage, Deployment, Partition
from nilmc.backends.dpu.quant import DpuParams, DpuQuantOptions, accumulator_peaks, calibrate, check_shifts, to_quant_params
from nilmc.backends.dpu.xmodel import LABEL, build_xmodel, graph_attributes, read_xmodel, serialize
from nilmc.bitstreams import DPUTarget, available_targets, boards_for, boards_source, load_target, target_from_arch_json
from nilmc.compiler.errors import BadInputError, InternalError
from nilmc.compiler.io import atomic_write_bytes, atomic_write_json
from nilmc.quantization.mixed_precision import BACK_SEARCH_MIN_INT8_SHARE
from nilmc.quantization.pot import shared_fix_positions
from nilmc.quantization.traits import DPU_POT

if TYPE_CHECKING:
    from nilmc.compiler.model import Model

INSPECTOR = "inspector.json"
PARAMS = "dpu_params.json"
ARCHS = ("b2304", "b4096")
QAT_SUFFIX = "_qat"
PRECISIONS = ARCHS + tuple(a + QAT_SUFFIX for a in ARCHS)


UNSUPPORTED_REMEDY = "replace the op(s) named above that the DPU cannot run, or choose a target that takes them (onnxruntime, openvino, tensorrt)"
# The precise-input layers and the CPU tail left the DPU nothing, but with the input layers on the DPU it has them.
NONE_REMEDY = ("use --option dpu.cpu_layers=none to run the input layer(s) on the DPU (the graph input then quantized to 8 bits), "
               "or choose a target that runs the CPU ops (onnxruntime, openvino, tensorrt)")


class DPUUnsupportedError(BadInputError):
    """The model holds ops nilmc cannot lower to (or emulate on) the DPU."""


class DPUEmulatorRunner:
    """Runs a bundle's deployment: the CPU stages the xmodel names (FP32, onnxruntime) around ``quantized.xmodel``
    in the bit-accurate DPU emulator (no board)."""

    verification = Verification.EMULATED

    def __init__(self, xmodel: Path) -> None:
        self.path = Path(xmodel)
        self._deployment: Deployment | None = None

    def __enter__(self) -> DPUEmulatorRunner:
        if not self.path.is_file():
            raise BadInputError(f"{str(self.path)!r} does not exist", "point at a dpu bundle written by nilmc compile")
        data = self.path.read_bytes()
        graph, params = read_xmodel(data)
        files = graph_attributes(data).get("nilmc_cpu_stages") or {}
        stage = {}
        for key in ("pre", "post"):
            if key in files:
                path = self.path.parent / files[key]
                if not path.is_file():
                    raise BadInputError(f"the xmodel's CPU {key} stage {str(path)!r} is missing", "point at a complete dpu bundle")
                stage[key] = CpuStage(path.read_bytes())
        self._deployment = Deployment(DpuEmulator(graph, params), stage.get("pre"), stage.get("post"))
        return self

    def __exit__(self, *exc: object) -> None:
        self._deployment = None

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._deployment is None:
            raise InternalError("DPUEmulatorRunner.infer called outside its context", "use `with backend.runner(artifact) as r:`")
        return self._deployment.infer(feeds)


def _target(precision: str, options: Mapping[str, Any]) -> DPUTarget:
    """The shipped target for ``precision``, or the user's overlay ``arch.json`` (``options['arch_json']``)."""
    precision = precision.removesuffix(QAT_SUFFIX)
    arch = options.get("arch_json")
    if arch is None:
        return load_target(precision)
    t = target_from_arch_json(arch)
    if t.precision != precision:
        raise BadInputError(f"{arch} describes {t.name}, but the target is dpu:{precision}", f"use --targets dpu:{t.precision}")
    return t


def _shared(graph: DpuGraph, ctx: Any, options: Mapping[str, Any]) -> dict[str, Any]:
    """What the refinement takes from the compile's one calibration pass: ``ranges`` (max |value| of every
    IR tensor, shared statistics) and ``start`` (fix positions of the shared DPU_POT parameters:
    ``options["params"]`` when the driver passes them, else derived here from the same statistics)."""
    stats = ctx.statistics  # the one FP32 pass (and the normalization check), shared by every target
    ranges = {op.output: max(abs(stats[op.output].minimum), abs(stats[op.output].maximum))
              for op in graph.ops if op.output in stats}
    return {"ranges": ranges, "start": shared_fix_positions(_start_params(ctx, options))}


# Internal lower option: tensor -> fix position pinned on the DPU subgraph's activations (_hold_floor's alternative start)
PINNED_FIX = "dpu_pinned_fix"
# The calibration SQNR the shared selection's fix positions must gain over the refined ones to be taken (a judgement
# from two measurements): the example CtRNN gained 12.4 dB (7.0 -> 19.3; weighted-F1 loss fully on the DPU 29.7 ->
# 4.8 points); a Conv -> LSTM test model gained 0.9 dB on calibration and lost 3 dB on its evaluation windows
# (20+ -> 17.3 dB: the selection clips tails the evaluation data reach), so a small gain is no evidence.
SELECTION_MIN_GAIN_DB = 3.0


def _start_params(ctx: Any, options: Mapping[str, Any]) -> Any:
    """The shared DPU_POT parameters: the driver's (``options["params"]``), else derived here as the driver does
    (min-max, then precise input: the layers reading the graph input kept float)."""
    from nilmc.quantization.api import with_precise_input

    if options.get("params") is not None:
        return options["params"]
    return with_precise_input(ctx.params(DPU_POT, estimator="minmax"), ctx.model.graph, getattr(ctx, "techniques", None))


def _rejected(full: DpuGraph, target: DPUTarget) -> dict[str, str]:
    """DPU ops the target's limits keep off the DPU (the inspector's first reason each): they start the CPU tail.
    Ops with no DPU operator at all start it anyway (:mod:`nilmc.backends.dpu.partition`)."""
    from nilmc.backends.dpu.ops import OpKind

    kinds = {op.name: op.kind for op in full.ops}
    return {p.op: p.reasons[0] for p in inspect_graph(full, target).fallbacks
            if p.reasons and kinds[p.op] not in (OpKind.INPUT, OpKind.UNSUPPORTED)}


def _graph_partition(model: Model, full: DpuGraph, target: DPUTarget, mode: str = "auto", *, qat: bool = False) -> Partition:
    """The split as the graph alone gives it (precise input's layers read off the graph, as the shared parameters
    keep them): what decides, in milliseconds and before any calibration, whether the DPU can take the model."""
    from nilmc.backends.dpu.partition import plan_partition
    from nilmc.quantization.graph import analyze, input_layers

    m = onnx_copy(model.graph)
    floats = [layer.name for layer in input_layers(m, analyze(m)) or ()] if DPU_POT.float_layers else []
    return plan_partition(full, floats, mode=_mode(mode if mode in CPU_LAYERS else "auto", qat), rejected=_rejected(full, target))


def _mode(mode: str, qat: bool) -> str:
    """QAT fine-tunes the Keras model up to its output, so the head stays on the DPU there (``auto`` -> ``input``)."""
    return "input" if qat and mode == "auto" else mode


def _partition(full: DpuGraph, target: DPUTarget, ctx: Any, options: Mapping[str, Any], *, qat: bool = False) -> Partition:
    """The CPU/DPU split: the layers the shared parameters keep float (precise input) unless ``cpu_layers`` is none,
    and the head (precise output) under ``auto`` (not for QAT)."""
    from nilmc.backends.dpu.partition import plan_partition

    mode = str(options.get("cpu_layers", "auto"))
    if mode not in CPU_LAYERS:
        raise BadInputError(f"dpu.cpu_layers={mode!r} is not one of {', '.join(CPU_LAYERS)}", "use --option dpu.cpu_layers=auto|input|none")
    floats = _start_params(ctx, options).keep_float if mode in ("auto", "input") else ()
    return plan_partition(full, floats, mode=_mode(mode, qat), rejected=_rejected(full, target))


def _watts_error(model: Model) -> Any:
    """Graph-output error as the metrics see it: mean |watts| difference, negatives floored at 0 W."""
    to_watts = model.contract.to_watts

    def error(ref: np.ndarray, out: np.ndarray) -> float:
        a = np.maximum(to_watts(np.asarray(ref, np.float32)), 0.0)
        b = np.maximum(to_watts(np.asarray(out, np.float32)), 0.0)
        return float(np.mean(np.abs(a - b)))

    return error


def _peak_output(model: Model) -> float | None:
    """|head value| the output grid must hold: the contract's 0 W and peak power in model units."""
    c = model.contract
    if c.peak_power_w is None:
        return None
    if c.folded:
        return float(c.peak_power_w)
    return float(np.max(np.abs(c.target.from_watts(np.array([0.0, c.peak_power_w])))))


@dataclass(frozen=True)
class _Built:
    """One split's deployment: the partition, the DPU subgraph and its parameters, the CPU stages (ONNX and runnable)."""

    part: Partition
    graph: DpuGraph
    params: DpuParams
    qat_info: dict[str, Any] | None
    report: InspectionReport
    pre_model: Any
    post_model: Any
    pre: CpuStage | None
    post: CpuStage | None


# The least share of the weighted layers' MACs the DPU must keep when the calibration SQNR floor moves layers to the CPU
# pre stage: the SQNR floor's own rule for an "INT8" placement (a judgement, not a measurement: under it, the deployment
# is a CPU model with a DPU attached).
MIN_DPU_MACS_SHARE = BACK_SEARCH_MIN_INT8_SHARE


def _sqnr_meter(model: Model, x: np.ndarray) -> Any:
    """``measure(built) -> dB``: the output SQNR vs FP32 (the ONNX model on onnxruntime) of a split's emulated
    deployment on windows ``x``, in model units as the other targets' calibration SQNR floor measures it."""
    from nilmc.backends.dpu.quant import fp32_outputs
    from nilmc.compiler.metrics import sqnr_db
    from nilmc.quantization._ort import output_step, select_step

    step = output_step(model.contract)  # a sequence model is judged on its selected step alone
    ref = fp32_outputs(model.graph, x)

    def measure(built: _Built) -> float:
        dep = Deployment(DpuEmulator(built.graph, built.params), built.pre, built.post)
        got = next(iter(dep.infer({model.input_name: x}).values())).reshape(ref.shape)
        return float(sqnr_db(ref, got) if step is None else sqnr_db(select_step(ref, step), select_step(got, step)))

    return measure


def _dpu_share(model: Model, full: DpuGraph, part: Partition) -> float:
    """The DPU's share of the weighted layers' multiply-accumulates per window: :func:`_device_macs` (recurrent layers
    of the CPU tail included), or counted on the IR where that finds none (ONNX nodes without names: a conv is its
    output positions times its weights, a dense layer its weights)."""
    from nilmc.backends.dpu.ops import OpKind

    share = _device_macs(model, full, part)["dpu_share"]
    if share is not None:
        return float(share)
    macs = {op.name: int(np.prod(op.shape[:-1], dtype=np.int64)) * int(np.size(op.weight)) if op.kind == OpKind.CONV2D
            else int(np.size(op.weight)) for op in full.ops if op.weighted}
    total = sum(macs.values())
    return sum(m for n, m in macs.items() if part.device(n) == "DPU") / total if total else 0.0


def _floor_step(model: Model, full: DpuGraph, built: _Built, db: float) -> dict[str, Any]:
    """One measured split of the floor's search, for the manifest (``pre_through``: its last CPU pre layer)."""
    layers = [op.name for op in full.ops if op.weighted and op.name in built.part.pre]
    return {"pre_through": layers[-1] if layers else "no layer", "cpu_pre_layers": layers, "sqnr_db": round(db, 2),
            "dpu_macs_share": round(_dpu_share(model, full, built.part), 4)}


INPUT_SIGMAS = 4.0


def _input_floor(model: Model, sigmas: float = INPUT_SIGMAS) -> float | None:
    """``sigmas`` training standard deviations of the widest normalized feature (None without statistics)."""
    c = model.contract
    stats, aff = c.normalization.stats, None if c.folded else c.normalization.affine()
    if stats is None:
        return None
    scale = np.ones_like(np.asarray(stats.std, np.float64)) if aff is None else np.abs(aff[0])
    return float(sigmas * np.max(np.asarray(stats.std, np.float64) * scale))


@dataclass(frozen=True)
class DpuOptions:
    """Typed options of the DPU backend (``--option dpu.NAME=VALUE``).

    ``arch_json``: a board overlay's arch.json instead of the shipped target (default none);
    ``cpu_layers``: ``auto`` (default: the layers reading the graph input run in FP32 on the CPU, as the shared
    parameters' precise input keeps them float, and so does a dense head without activation: precise output, see
    :mod:`nilmc.backends.dpu.partition`; when the emulated deployment's output is under the calibration SQNR floor,
    ``Techniques.min_calib_sqnr`` 30 dB, the CPU pre stage grows by whole layers until it holds, while the DPU keeps at
    least 25 % of the weighted layers' MACs; the ``*_qat`` precisions keep the head on the DPU and their split), ``input``
    (only the input layers) or ``none`` (every layer on the DPU, the graph input quantized);
    ``qat_*``: the power-of-two QAT of the ``*_qat`` precisions (epochs 3, learning rate 1e-5,
    batch 64, seed 0, last 20 % of the calibration windows held out).
    """

    arch_json: str | None = None
    cpu_layers: str = "auto"
    qat_epochs: int = 3
    qat_learning_rate: float = 1e-5
    qat_batch_size: int = 64
    qat_seed: int = 0
    qat_holdout: float = 0.2

    def __post_init__(self) -> None:
        if self.qat_epochs < 1 or not 0.0 <= self.qat_holdout < 1.0 or self.qat_learning_rate <= 0 or self.qat_batch_size < 1:
            raise ValueError("qat_epochs >= 1, qat_batch_size >= 1, qat_learning_rate > 0 and 0 <= qat_holdout < 1")
        if self.cpu_layers not in CPU_LAYERS:
            raise ValueError(f"cpu_layers must be one of {', '.join(CPU_LAYERS)}")


class DPUBackend:
    """``dpu:<arch>``: power-of-two INT8 for a DPUCZDX8G, emulated bit-accurately, handed off to vai_c_xir."""

    name = "dpu"
    capabilities = Capabilities(
        precisions=PRECISIONS,
        description="AMD Vitis AI DPUCZDX8G (B2304 Ultra96, B4096 ZCU102/ZCU104/KV260): power-of-two INT8, quantized xmodel + "
                    "vai_c_xir hand-off, bit-accurate numpy emulation",
        traits={p: DPU_POT for p in PRECISIONS},
        # The power-of-two refinement starts from min-max ranges (quantization/pot.py searches from there).
        estimators={p: "minmax" for p in PRECISIONS},
        keras_precisions=tuple(a + QAT_SUFFIX for a in ARCHS),
        options=DpuOptions,
        requires=(),
        extra="dpu",
        limitations={
            "compile": "vai_c_xir (Vitis AI docker image) compiles quantized.xmodel; it is not run here",
            "verification": "emulated: bit-accurate numpy model of the DPU arithmetic, no board latency or power",
            "ops": "conv2d, dense, max/avg pooling, element-wise add, ReLU, LeakyReLU; other ops are reported, not lowered",
            "cpu_stages": "by default (dpu.cpu_layers=auto) the layers reading the graph input and leading layout ops run in "
                          "FP32 on the board's CPU (cpu_pre.onnx), and further whole layers in graph order while the emulated "
                          "DPU output is under the 30 dB calibration SQNR floor (the DPU keeping >= 25 % of the weighted "
                          "layers' MACs; the manifest's placement.calibration_sqnr), and so does the CPU tail: the first op the DPU has no "
                          "operator for (GRU, Sigmoid, ConvTranspose, Slice/Pad ...) or whose operator the target's limits "
                          "reject there (a pool kernel over 8, ...) and every op after it (cpu_post.onnx, "
                          "onnxruntime; one DPU subgraph); a model with no weighted layer left for the DPU, or whose tail "
                          "reads the graph input, is refused",
            "needs_keras_source": "the *_qat precisions fine-tune the tf_keras (Keras 2) model (.keras/.h5); PTQ precisions lower "
                                  "from ONNX alone",
            "qat": "b2304_qat / b4096_qat: power-of-two QAT on the calibration windows (FP32 outputs as targets, last 20 % "
                   "held out, best epoch kept) from the PTQ fix points; needs tensorflow-model-optimization",
        },
    )

    def precheck(self, model: Model, precision: str) -> str | None:
        """What makes the model unlowerable to the DPU, found from the graph alone in milliseconds (None: nothing)."""
        if precision not in PRECISIONS:
            return None
        qat = precision.endswith(QAT_SUFFIX)
        if qat and model.keras_path:
            reason = _qat_precheck(model, precision)
            if reason is not None:
                return reason
        full = from_onnx(model.graph)
        target = load_target(precision.removesuffix(QAT_SUFFIX))
        part = _graph_partition(model, full, target, qat=qat)
        report = inspect_graph(full, target, part)
        if _refused(full, part, report):
            if _deployable(model, full, target, "none"):  # dpu.cpu_layers=none would lower it: lower() knows the option
                return None
            return f"the model cannot be lowered to the DPU: {_refusal(report, part)}; {UNSUPPORTED_REMEDY}"
        return None

    def lower(self, model: Model, out_dir: Path, *, precision: str = "b2304", options: Mapping[str, Any] | None = None) -> Artifact:
        """Quantize for the DPU and write the xmodel + hand-off into ``out_dir``.

        ``options``: ``quant`` (the compile's QuantContext, required), ``arch_json`` (a board
        overlay's arch.json instead of the shipped one, default none), ``dpu_quant``
        (:class:`DpuQuantOptions`, default: watts error on the head, contract peak covered).
        ``b2304_qat`` / ``b4096_qat`` fine-tune the Keras source first (:mod:`nilmc.backends.dpu.qat`;
        ``qat_epochs`` 3, ``qat_learning_rate`` 1e-5, ``qat_batch_size`` 64, ``qat_seed`` 0, ``qat_holdout`` 0.2).
        """
        from nilmc.quantization.context import require_quant

        options = dict(options or {})
        if precision not in PRECISIONS:
            raise BadInputError(f"dpu has no precision {precision!r}",
                                f"available: {', '.join(available_targets())} (and each with {QAT_SUFFIX})")
        t0 = time.perf_counter()
        target = _target(precision, options)
        if precision.endswith(QAT_SUFFIX) and not model.keras_path:
            raise BadInputError(f"dpu:{precision} fine-tunes the Keras model, but {model.source or 'the model'!r} has no Keras source",
                                f"compile the .keras/.h5 file, or use dpu:{precision.removesuffix(QAT_SUFFIX)} (PTQ, ONNX is enough)")
        ctx = require_quant(options, f"{self.name}:{precision}")
        out_dir = Path(out_dir)
        full = from_onnx(model.graph)
        qat = precision.endswith(QAT_SUFFIX)
        mode = str(options.get("cpu_layers", "auto"))
        early = _graph_partition(model, full, target, mode, qat=qat)
        report = inspect_graph(full, target, early)
        if _refused(full, early, report):  # refused before any parameters are derived
            atomic_write_json(out_dir / INSPECTOR, report.to_json())
            remedy = NONE_REMEDY if mode != "none" and _deployable(model, full, target, "none") else UNSUPPORTED_REMEDY
            raise DPUUnsupportedError(f"the model cannot be lowered to the DPU: {_refusal(report, early)}", remedy)
        # A *_qat target trains the DPU part up to the model's output (the head stays on the DPU). When no fine-tuned
        # epoch beats the PTQ start, nothing was learned: it deploys what the PTQ target deploys (its partition, with the
        # head on the CPU under cpu_layers=auto), and the manifest's qat section says so.
        untrained = None
        for trained in ((True, False) if qat else (False,)):
            part = _partition(full, target, ctx, options, qat=trained)
            built = self._build(model, full, target, ctx, options, part, trained, out_dir)
            graph, params, qat_info = built.graph, built.params, built.qat_info
            if not (trained and qat_info is not None and qat_info.get("kept_epoch") == 0):
                break
            if _partition(full, target, ctx, options, qat=False).to_json() == part.to_json():
                break
            untrained = qat_info
        if untrained is not None:
            qat_info = {**untrained, "deployed": "the PTQ target's parameters and partition (no fine-tuned epoch lowered the "
                        "held-out MSE; the QAT partition keeps the head on the DPU, PTQ runs it on the CPU)"}
        floor_record = None
        if mode == "auto" and not qat:  # dpu.cpu_layers=input / none keep their split; QAT trains the split it was given
            built, floor_record = self._hold_floor(model, full, target, ctx, options, built, out_dir)
        part, graph, params = built.part, built.graph, built.params
        pre_model, post_model, pre, post = built.pre_model, built.post_model, built.pre, built.post
        report = built.report
        violations = check_shifts(graph, params, target.limits)
        if violations:
            raise InternalError(f"DPU shift repair left {len(violations)} violation(s): {violations[0]}", "report this as a nilmc bug")
        stage_files = {k: f for k, f, m in (("pre", CPU_PRE, pre_model), ("post", CPU_POST, post_model)) if m is not None}
        attrs: dict[str, Any] = {"target": target.name, "fingerprint": target.fingerprint}
        if stage_files:
            attrs["nilmc_cpu_stages"] = stage_files
        xmodel = build_xmodel(graph, params, name=f"nilmc_{model.contract.appliance}", graph_attrs=attrs)
        atomic_write_bytes(out_dir / handoff.XMODEL, serialize(xmodel))
        for f, m in ((CPU_PRE, pre_model), (CPU_POST, post_model)):
            if m is not None:
                atomic_write_bytes(out_dir / f, m.SerializeToString(deterministic=True))
        files = [handoff.XMODEL, *stage_files.values(), *handoff.write_handoff(out_dir, target, model.contract, stages=stage_files),
                 INSPECTOR, PARAMS]
        deployment = Deployment(DpuEmulator(graph, params), pre, post)
        peaks = accumulator_peaks(graph, params, deployment.dpu_feeds({model.input_name: ctx.calib_x}))
        atomic_write_json(out_dir / PARAMS, {**params.to_json(graph), "accumulator_peaks": peaks, "target": target.to_json(),
                                             "partition": part.to_json()})
        info = self._info(model, graph, params, target, report, ctx, peaks, time.perf_counter() - t0, deployment, full, part)
        if floor_record is not None:
            info["placement"]["calibration_sqnr"] = floor_record
            if floor_record.get("hint"):  # the driver warns with it and puts it in a failed gate's cause
                info["calibration_sqnr"] = {"floor_db": floor_record["floor_db"], "met": False, "hint": floor_record["hint"]}
        if qat_info is not None:
            info["qat"] = qat_info
            info["tools"] += ["tensorflow", "tensorflow-model-optimization"]
        return Artifact(self.name, precision, out_dir, handoff.XMODEL, files, kind=f"{LABEL} ({target.name}, {'QAT' if qat_info else 'PTQ'})", info=info)

    def _info(self, model: Model, graph: DpuGraph, params: DpuParams, target: DPUTarget, report: InspectionReport,
              ctx: Any, peaks: Mapping[str, int], lower_s: float, deployment: Deployment, full: DpuGraph, part: Partition
              ) -> dict[str, Any]:
        cpu_layers = [op.name for op in full.ops if op.weighted and part.device(op.name) == "CPU"]
        cpu_tensors = {op.output for op in full.ops if part.device(op.name) == "CPU"} - set(part.inputs)
        provenance = {"precise_input": {"float_layers": [n for n in cpu_layers if n in part.pre], "deployment_headroom": 1.0}} if cpu_layers else {}
        _, qparams = to_quant_params(model.graph, graph, params, cpu_layers=cpu_layers, cpu_tensors=cpu_tensors, provenance=provenance)
        calib = _calibration_eacc(model, deployment, ctx)
        return {
            "placement": {**_placement(full, report, part), "macs": _device_macs(model, full, part)},
            "label": LABEL,
            "quantization": qparams.to_json(),
            "tools": ["protobuf"],
            "target": target.to_json(),
            "handoff": {
                "compile": " ".join(handoff.compile_command()),
                "compile_script": handoff.COMPILE,
                "compiled_xmodel": f"{handoff.COMPILED_DIR}/{handoff.NET}.xmodel",
                "run": f"python3 {handoff.RUN} --windows windows.npy --out watts.npy",
                "needs": "vai_c_xir from AMD's Vitis AI 3.x docker image; a board image with the Vitis AI runtime (xir, vart)"
                         + ("; onnxruntime on the board for the FP32 CPU stages" if part.has_pre or part.has_post else ""),
            },
            "verification_note": "emulated: the bit-accurate numpy DPU emulator runs the quantized xmodel read back from this "
                                 "bundle; vai_c_xir and a DPU board were not run, so no DPU latency or power is claimed",
            "inspector": {k: v for k, v in report.to_json().items() if k != "layers"},
            "accumulator_peaks": dict(peaks),
            "accumulator_headroom": _headroom(peaks),
            "calibration": {**params.method, **calib},
            "boards": _board_figures(target, calib.get("eacc_dpu_pct")),
            "lower_s": round(lower_s, 3),
        }

    def _build(self, model: Model, full: DpuGraph, target: DPUTarget, ctx: Any, options: Mapping[str, Any], part: Partition,
               trained: bool, out_dir: Path) -> _Built:
        """The deployment of split ``part``: its CPU stages, and the DPU subgraph's parameters (refined once per compile
        and split: b2304 and b4096 share them; ``trained``: fine-tuned by the QAT)."""
        from nilmc.backends.dpu.partition import cpu_post_model, cpu_pre_model, dpu_graph

        graph = dpu_graph(full, part)
        report = inspect_graph(full, target, part)
        atomic_write_json(out_dir / INSPECTOR, report.to_json())
        if _refused(full, part, report):
            raise DPUUnsupportedError(f"the model cannot be lowered to the DPU: {_refusal(report, part)}", UNSUPPORTED_REMEDY)
        pre_model, post_model = cpu_pre_model(model.graph, part), cpu_post_model(model.graph, full, part)
        pre, post = (None if pre_model is None else CpuStage(pre_model)), (None if post_model is None else CpuStage(post_model))
        feeds = {model.input_name: ctx.calib_x}
        qopts = options.get("dpu_quant") or _quant_options(model, full, part, post)
        pinned = options.get(PINNED_FIX)
        if pinned and qopts.fixed is None:  # the shared selection's fix positions (see _hold_floor), inputs still refined
            searched = _judged_tensors(graph, qopts)  # and the tensors the output error judges
            qopts = replace(qopts, fixed={op.output: int(pinned[op.output]) for op in graph.ops
                                          if op.kind != "input" and op.output in pinned and op.output not in searched})
        shared = _shared(graph, ctx, options)
        # b2304 and b4096 share the DPUCZDX8G arithmetic: with equal limits and options the refinement (and QAT) is the
        # same computation, done once per compile (measured: the two PTQ and the two QAT targets were identical anyway).
        key = (repr(target.limits), _stable_repr(qopts), repr(shared), trained, repr(part.to_json()),
               repr(sorted((k, repr(v)) for k, v in options.items() if k.startswith("qat_"))))
        memo = ctx.memo.setdefault(self.name, {}) if hasattr(ctx, "memo") else {}
        if key not in memo:
            params = calibrate(model.graph, graph, feeds, target.limits, options=qopts, **shared)
            reference, qat_info = graph, None
            if trained:
                from nilmc.backends.dpu.qat import qat_lower

                graph, params, qat_info = qat_lower(model, graph, params, ctx, target.limits, qopts, options, shared=shared, pre=pre)
            memo[key] = (graph, params, qat_info, reference)
        graph, params, qat_info, _ = memo[key]
        return _Built(part, graph, params, qat_info, report, pre_model, post_model, pre, post)

    def _hold_floor(self, model: Model, full: DpuGraph, target: DPUTarget, ctx: Any, options: Mapping[str, Any], built: _Built,
                    out_dir: Path) -> tuple[_Built, dict[str, Any] | None]:
        """The calibration SQNR floor (``Techniques.min_calib_sqnr``, 30 dB) on the DPU: the emulated deployment's output
        vs FP32 on the calibration windows. Under it, the CPU pre stage grows by whole layers in topological order
        (:func:`~nilmc.backends.dpu.partition.next_prefix`), each split refined and measured again, until the floor holds,
        no layer is left, or the DPU would keep under :data:`MIN_DPU_MACS_SHARE` of the weighted layers' MACs. The split
        that holds the floor with the fewest CPU layers is deployed, else the one measured best (with a ``hint`` for the
        gate); ``(built, record)``, record None when the floor is off or the first split holds it (that deployment and
        its manifest stay as they were: the shipped z-score model, 41.4 dB). The DPU cannot keep an inner layer float as
        onnxruntime does: a prefix is what it can give back to the CPU (one pre -> DPU -> post chain)."""
        from nilmc.backends.dpu.partition import next_prefix, plan_partition
        from nilmc.quantization.api import Techniques

        tech = ctx.techniques if getattr(ctx, "techniques", None) is not None else Techniques()
        if tech.min_calib_sqnr is None:
            return built, None
        floor = float(tech.min_calib_sqnr)
        x = ctx.calib_x[:tech.max_windows]
        measure = _sqnr_meter(model, x)
        floats = _start_params(ctx, options).keep_float
        rejected = _rejected(full, target)
        steps = [_floor_step(model, full, built, measure(built))]
        best, best_db = built, steps[0]["sqnr_db"]
        if best_db >= floor:
            return built, None
        # Under the floor, first the fix positions of the shared selection (per-tensor estimator chosen by the output
        # error over the whole model, clipping allowed) instead of the refinement's per-tensor no-clipping window, whose
        # local MSE the rare large values decide: the example CtRNN (z-scored mains, kettle spikes 100x a fridge's
        # activations) kept one bit too coarse a grid on block 1 and block 3 (7.0 dB on calibration; pinned 19.3 dB).
        # Taken only when it gains SELECTION_MIN_GAIN_DB on the calibration windows; the CPU pre stage then grows from it
        # (not at all when it holds the floor: the record below says so)
        selected = {**options, PINNED_FIX: shared_fix_positions(ctx.params(DPU_POT))}
        alt = self._build(model, full, target, ctx, selected, built.part, False, out_dir)
        alt_db = round(measure(alt), 2)
        fix_record = {"refined_db": best_db, "selected_db": alt_db, "taken": "selected" if alt_db >= best_db + SELECTION_MIN_GAIN_DB else "refined",
                      "min_gain_db": SELECTION_MIN_GAIN_DB,
                      "selected": "the shared DPU_POT parameters' fix positions (estimator chosen per tensor by the output "
                                  "error), pinned on the DPU's activations; the input's still refined",
                      "refined": "per-tensor MSE over the no-clipping position and one coarser (quantization.pot)"}
        if fix_record["taken"] == "selected":
            options, built, best, best_db = selected, alt, alt, alt_db
            steps[0] = _floor_step(model, full, built, alt_db)
        prefix: dict[str, str] = {}
        stop = None
        while best_db < floor:
            names = next_prefix(full, built.part)
            if not names:
                stop = "no further layer can join the CPU pre stage (one pre -> DPU -> post chain)"
                break
            why = (f"calibration SQNR floor: {steps[-1]['sqnr_db']:.1f} dB vs FP32 with the CPU pre stage through "
                   f"{steps[-1]['pre_through']}, under the {floor:g} dB floor: runs in FP32 on the CPU pre stage")
            trial = {**prefix, **{n: why for n in names}}
            part = plan_partition(full, floats, mode="auto", rejected=rejected, prefix=trial)
            share, layer = _dpu_share(model, full, part), names[-1]
            if part.problems or share < MIN_DPU_MACS_SHARE:
                stop = (f"with {layer} on the CPU the DPU would keep {100 * share:.1f} % of the weighted layers' MACs, under "
                        f"{100 * MIN_DPU_MACS_SHARE:.0f} %" if share < MIN_DPU_MACS_SHARE
                        else f"with {layer} on the CPU the split is not one pre -> DPU -> post chain: {part.problems[0]}")
                break
            prefix, built = trial, self._build(model, full, target, ctx, options, part, False, out_dir)
            steps.append(_floor_step(model, full, built, measure(built)))
            if steps[-1]["sqnr_db"] > best_db:
                best, best_db = built, steps[-1]["sqnr_db"]
        atomic_write_json(out_dir / INSPECTOR, best.report.to_json())  # the deployed split's
        met = best_db >= floor
        summary = (f"calibration SQNR floor {floor:g} dB: fix positions {fix_record['refined_db']:.1f} dB refined, {alt_db:.1f} dB "
                   f"the shared selection's ({fix_record['taken']} taken); ") + ", ".join(
            f"{s['sqnr_db']:.1f} dB with the pre stage through {s['pre_through']}" for s in steps)
        record: dict[str, Any] = {
            "floor_db": floor, "met": met, "deployed_sqnr_db": round(best_db, 2), "windows": int(len(x)),
            "measured_on": "the emulated DPU deployment (CPU stages in FP32 on onnxruntime) vs the FP32 model, calibration windows",
            "steps": steps, "summary": summary, "min_dpu_macs_share": MIN_DPU_MACS_SHARE, "fix_positions": fix_record}
        if stop is not None:
            record["stopped"] = stop
        if not met:
            record["hint"] = (f"the DPU's 8-bit grids give {steps[0]['sqnr_db']:.1f} dB output SQNR vs FP32 on the calibration "
                              f"windows, under the {floor:g} dB floor; the best CPU pre stage gave {best_db:.1f} dB ({stop}): "
                              "this model's INT8 does not hold on the DPU; use --targets onnxruntime:int8 or openvino:int8 (they keep "
                              "inner layers float)" + (", or a model trained on normalized (z-score) inputs" if _raw_input(model) else ""))
        return best, record

    def runner(self, artifact: Artifact) -> DPUEmulatorRunner:
        return DPUEmulatorRunner(artifact.directory / artifact.primary)


def _raw_input(model: Model) -> bool:
    """Whether the model takes raw (unnormalized, normalization A) features: only then is retraining it on z-scored
    inputs a remedy worth naming (the raw-feature T-P model; the CtRNN's loss is resolution, not scale)."""
    from nilmc.calibration_data.normalization import Normalization

    return not model.contract.folded and model.contract.normalization.kind == Normalization.A


def onnx_copy(model: Any) -> Any:
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    return m


def _refused(full: DpuGraph, part: Partition, report: InspectionReport) -> bool:
    """Whether the split cannot be deployed: an op with no DPU operator left in the DPU subgraph, a problem of the
    split, or an op the target rejects that the CPU tail did not take (a dead one): the xmodel would carry an op the
    DPU cannot run, so the model is refused rather than lowered with it."""
    from nilmc.backends.dpu.partition import dpu_graph

    return bool(dpu_graph(full, part).unsupported or part.problems or report.fallbacks)


def _deployable(model: Model, full: DpuGraph, target: DPUTarget, mode: str) -> bool:
    """Whether the split under ``cpu_layers=mode`` is one pre -> DPU -> post chain the DPU can run (graph alone)."""
    part = _graph_partition(model, full, target, mode)
    return not _refused(full, part, inspect_graph(full, target, part))


def _refusal(report: InspectionReport, part: Partition) -> str:
    return "; ".join([report.summary(), *part.problems])


# Keras layer types with weights that the DPU QAT's Keras lowering (Conv2D / Dense only) cannot pair with a DPU op and
# that nilmc never strips as an input stage (leading Normalization / Rescaling / BatchNormalization can be): read
# from the saved config alone, so the refusal comes before calibration and TensorFlow (it came after 7-11 s).
QAT_UNMAPPED_LAYERS = frozenset({
    "Conv1D", "Conv1DTranspose", "Conv2DTranspose", "Conv3D", "Conv3DTranspose", "DepthwiseConv1D", "DepthwiseConv2D",
    "SeparableConv1D", "SeparableConv2D", "LocallyConnected1D", "LocallyConnected2D", "LSTM", "GRU", "SimpleRNN",
    "ConvLSTM1D", "ConvLSTM2D", "Bidirectional", "Embedding", "MultiHeadAttention", "PReLU"})


def _qat_precheck(model: Model, precision: str) -> str | None:
    """Why a ``*_qat`` precision cannot fine-tune ``model.keras_path`` (None: nothing found from its config)."""
    from nilmc.compiler.frontend import SourceKind, detect_kind
    from nilmc.quantization.qat import WEIGHTED_LAYERS

    ptq = f"dpu:{precision.removesuffix(QAT_SUFFIX)}"
    path = Path(str(model.keras_path))
    try:
        kind = detect_kind(path)
        layers = _keras_layers(path)
    except Exception:  # unreadable here: the lowering reports it with its own message
        return None
    if kind is SourceKind.KERAS3:  # QAT fine-tunes the tf_keras rebuild load_keras makes, unless the bridge cannot rebuild a layer
        from nilmc.compiler.tfcompat import keras_source_precheck

        if (why := keras_source_precheck(model, remedy=f"use --targets {ptq} (PTQ lowers the ONNX graph)")) is not None:
            return f"dpu:{precision}: {why}"
    elif kind is not SourceKind.TF_KERAS:
        return (f"dpu:{precision} fine-tunes tf_keras (Keras 2) models and {str(path)!r} is a {kind.value} model; "
                f"use --targets {ptq} (PTQ lowers the ONNX graph), or save the model with tf_keras")
    for name, cls in layers:
        if cls in QAT_UNMAPPED_LAYERS:
            return (f"dpu:{precision} fine-tunes {'/'.join(WEIGHTED_LAYERS)} Keras layers only, and layer {name!r} ({cls}) has "
                    f"weights it cannot place; use --targets {ptq} (PTQ lowers the same model from its ONNX graph)")
    return None


def _keras_layers(path: Path) -> list[tuple[str, str]]:
    """``(name, class)`` of the top-level layers in a saved Keras model's config (``.keras`` archive or ``.h5``),
    a ``TimeDistributed`` wrapper by the class it wraps; no TensorFlow import."""
    from nilmc.compiler.tfcompat import saved_keras_config

    config = saved_keras_config(path)
    out = []
    for layer in (config.get("config") or {}).get("layers") or ():
        cls, cfg = str(layer.get("class_name", "")), layer.get("config") or {}
        if cls == "TimeDistributed":
            cls = str((cfg.get("layer") or {}).get("class_name", cls))
        out.append((str(cfg.get("name", "?")), cls))
    return out


# Fix positions tried for a CPU layer's output (the DPU's input): one coarser than the no-clipping position to one
# finer, by quantization MSE. Measured (benchmarks/bench_dpu_fidelity.py, 5 draws, head on the DPU): the no-clipping
# rule (-1, 0) left conv1's output one bit coarse whenever a few calibration values ran past the finer grid
# (draws 0 and 3: 24.4 / 24.2 dB); (-1, 1) gave 34.6 / 31.2 dB there and the same on the other draws.
CPU_OUTPUT_FIX_WINDOW = (-1, 1)
# Fix positions tried for the DPU's output and the tensors that reach it through pooling/flatten alone, when a CPU post
# stage reads it: one coarser than the no-clipping position to three finer, chosen by the error after the post stage
# (pot.PotOptions.output_fix_window). Measured on the example CtRNN (emulated, eval 1000 windows): its DPU ends in
# conv -> avgpool, and the conv's grid was chosen by local MSE, where the kettle windows' peaks (120) kept a step of 1.0
# that the fridge windows' activations (about 0.5) fell under; judged through the tconv/GRU/dense tail the step is 0.25
# (clipping at 31.75): weighted-F1 loss of the deployed split +5.18 -> +1.03 points, eval SQNR 26.4 dB; whole conv stack
# on the DPU +4.78 -> +2.24. A clipping grid is taken only on a SELECTION_MIN_GAIN_DB gain in that error (clip_gain_db):
# on tests/backends/test_dpu_nw_input.py's Conv -> LSTM model (300 calibration windows) it gained 1 dB on calibration
# (22.0 -> 23.0) and lost 7.6 on evaluation (24.9 -> 17.3: the evaluation tail runs past the clipped grid). The shipped
# T-P model's five bench_vendors draws are unchanged (+0.055 / +0.195 points, 33.8 / 31.8 dB).
DPU_OUTPUT_FIX_WINDOW = (-1, 3)


def _quant_options(model: Model, full: DpuGraph, part: Partition, post: CpuStage | None) -> DpuQuantOptions:
    """The refinement's options: watts error on the head (through the CPU post stage when there is one), the
    contract's peak covered; the graph input's floor only when the DPU reads the graph input itself (a CPU layer's
    output is an activation like any other: no-clipping position and one coarser, as every inner tensor)."""
    error, judged = _watts_error(model), post is not None and len(part.outputs) == 1
    if judged:
        error = _through(post, part.outputs[0], error)
    # The peak must fit the head's grid only where the DPU computes the head (precise output: the CPU does, in FP32).
    peak = None if any(full.op(n).weighted for n in part.post) else _peak_output(model)
    judging = {"output_fix_window": DPU_OUTPUT_FIX_WINDOW, "clip_gain_db": SELECTION_MIN_GAIN_DB} if judged else {}
    reads_input = all(t in full.inputs for t in part.inputs)
    if reads_input:
        return DpuQuantOptions(peak_output=peak, output_error=error, input_floor=_input_floor(model), **judging)
    return DpuQuantOptions(peak_output=peak, output_error=error, input_fix_window=CPU_OUTPUT_FIX_WINDOW, **judging)


def _judged_tensors(graph: DpuGraph, qopts: DpuQuantOptions) -> set[str]:
    """The DPU tensors whose fix position the output error (through the CPU post stage) chooses, from the wider
    ``output_fix_window``: none without one."""
    from nilmc.backends.dpu.ops import record
    from nilmc.quantization.pot import output_chains

    if qopts.output_fix_window is None or qopts.output_error is None:
        return set()
    return set(output_chains(graph.ops, graph.outputs, lambda op: record(op.kind).rule))


def _through(post: CpuStage, tensor: str, error: Any) -> Any:
    """``error`` measured after the CPU post stage (its outputs are what the metrics see)."""
    from nilmc.backends.dpu.partition import NHWC_SUFFIX

    def through(ref: np.ndarray, out: np.ndarray) -> float:
        a, b = post.run({tensor + NHWC_SUFFIX: ref}), post.run({tensor + NHWC_SUFFIX: out})
        return error(next(iter(a.values())), next(iter(b.values())))

    through.__qualname__ = f"{getattr(error, '__qualname__', 'error')} after the CPU post stage"
    return through


def _placement(full: DpuGraph, report: InspectionReport, part: Partition) -> dict[str, Any]:
    """The manifest's ``placement``: which ops run INT8 on the DPU and which in FP32 on the CPU, and why."""
    from nilmc.backends.dpu.ops import OpKind

    weighted = [op for op in full.ops if op.weighted]
    int8 = [op.name for op in weighted if part.device(op.name) == "DPU"]
    floats = [{"name": op.name, "op": str(op.kind) if op.kind != OpKind.UNSUPPORTED else str(op.attrs.get("op_type")),
               "why": (part.pre.get(op.name) or part.post.get(op.name, ""))}
              for op in full.ops if op.kind != OpKind.INPUT and part.device(op.name) == "CPU"]
    devices = [{"op": p.op, "kind": p.kind, "device": p.device, **({"why": p.reasons[0]} if p.reasons else {}),
                **({"stage": p.details["stage"]} if "stage" in p.details else {})} for p in report.placements]
    summary = (f"{len(int8)} weighted layer(s) in INT8 on the DPU; "
               + (f"FP32 on the CPU: {len(floats)} op(s) ({', '.join(f['name'] for f in floats)})" if floats else "nothing on the CPU"))
    return {"int8": int8, "float": floats, "devices": devices, "summary": summary}


def _device_macs(model: Model, full: DpuGraph, part: Partition) -> dict[str, Any]:
    """Multiply-accumulates per window on the DPU and in each CPU stage (:func:`nilmc.compiler.cost.node_macs`)."""
    from nilmc.compiler.cost import node_macs, tensor_shapes

    shapes = tensor_shapes(model.graph)
    nodes = {n.name: n for n in model.graph.graph.node}
    out, seen = {"dpu": 0, "cpu_pre": 0, "cpu_post": 0}, set()
    for op in full.ops:  # an ONNX node with two outputs is two IR ops: count it once
        stage = "cpu_pre" if op.name in part.pre else "cpu_post" if op.name in part.post else "dpu"
        names = [n for n in op.onnx_nodes or (op.name,) if n in nodes and n not in seen]
        seen.update(names)
        out[stage] += sum(node_macs(nodes[n], shapes) for n in names)
    total = sum(out.values())
    return {**out, "dpu_share": round(out["dpu"] / total, 4) if total else None,
            "counted": "Conv, ConvTranspose, MatMul/Gemm, GRU/LSTM multiply-accumulates per window (compiler.cost)"}


def _stable_repr(options: Any) -> str:
    """A repr of a dataclass of options in which callables (built per call, e.g. the watts error closure) appear by name."""
    import dataclasses

    if not dataclasses.is_dataclass(options):
        return repr(options)
    return repr([(f.name, getattr(v, "__qualname__", None) if callable(v) else v)
                 for f in dataclasses.fields(options) for v in [getattr(options, f.name)]])


def _calibration_eacc(model: Model, deployment: Deployment, ctx: Any) -> dict[str, Any]:
    """FP32 (the ONNX model on onnxruntime) and emulated-DPU EACC on the calibration windows (they carry ground truth)."""
    from nilmc.backends.dpu.quant import fp32_outputs
    from nilmc.compiler.metrics import nilm_metrics

    ds = ctx.calibration
    if model.contract.is_classification:  # EACC is a power metric; a classifier's gate metrics are in the verification
        return {"note": "no calibration EACC for a classification contract (the gate's F1 is in the manifest's verification)"}
    try:
        truth = ds.y[:, ds.appliance_index(model.contract.appliance)]
    except (AttributeError, BadInputError, IndexError):
        return {}
    x = ctx.calib_x
    fp32 = model.contract.to_watts(fp32_outputs(model.graph, x).astype(np.float32))
    dpu = model.contract.to_watts(next(iter(deployment.infer({model.input_name: x}).values())))
    thr = model.contract.on_threshold_w
    e_ref, e_dpu = nilm_metrics(truth, fp32, on_threshold_w=thr).eacc, nilm_metrics(truth, dpu, on_threshold_w=thr).eacc
    return {"windows": int(len(x)), "eacc_fp32_pct": round(100 * e_ref, 3), "eacc_dpu_pct": round(100 * e_dpu, 3),
            "eacc_note": "on the calibration windows (the gate's numbers are in the manifest's verification)"}


ACCUMULATOR_BITS = DPU_POT.accumulator_bits  # ~24-bit headroom: inferred from the shift_bias rule, not documented


def _headroom(peaks: Mapping[str, int]) -> dict[str, Any]:
    """Largest calibration accumulator against a signed ``ACCUMULATOR_BITS``-bit accumulator."""
    limit = 2 ** (ACCUMULATOR_BITS - 1) - 1
    worst = max(peaks.values(), default=0)
    return {"bits": ACCUMULATOR_BITS, "limit": limit, "worst": worst, "within": worst <= limit,
            "note": "accumulator width inferred (shift_bias rule min(0, -(24 - (8 + shift_cut)))), not documented by AMD"}


def _board_figures(target: DPUTarget, eacc_pct: float | None) -> dict[str, Any]:
    rows = [b.figures(eacc_pct) for b in boards_for(target)] if eacc_pct is not None else []
    return {"source": boards_source(), "eacc": "emulated DPU EACC on the calibration windows, known before verification; the manifest's "
            "'hardware' section has the figures from the gate's evaluation EACC", "rows": rows,
            "formula": "EACC % / TDP W and EACC % / board cost $ (seed 003 Table 8)"}


__all__ = ["DPUBackend", "DPUEmulatorRunner", "DPUUnsupportedError", "EmulationError"]

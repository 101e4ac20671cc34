"""TFLite: FP32, FP16, dynamic-range INT8, full-integer INT8 from nilmc's ranges, and QAT INT8.

Precisions
    ``fp32``          TFLiteConverter, no optimization.
    ``fp16``          float16 weights (``optimizations=[DEFAULT]``, ``supported_types=[float16]``).
    ``dynamic_int8``  int8 weights, float activations (``optimizations=[DEFAULT]``, no data).
    ``int8``          INT8 with **every parameter nilmc's** (``QuantContext.params`` under
                      TFLite traits, output range widened to the contract's peak power), built by
                      :func:`nilmc.backends.tflite_int8.build_int8_tflite`; the read-back check
                      (runtime-visible scales / zero points == nilmc's) is in ``info["param_check"]``.
                      By default with **precise input** (``cpu_layers="auto"``, traits TFLITE_INT8_FLOAT_INPUT): the
                      layers reading the graph input run as float32 TFLite ops on the float input, a QUANTIZE after
                      each puts its output on nilmc's grid, every other op is int8 (the input's 8-bit grid capped the
                      shipped model near 22 dB mean / 13 dB worst over calibration draws); the input tensor is then
                      float32 and the output keeps ``io_dtype``. ``cpu_layers="none"``: the full-integer graph
                      (TFLITE_INT8 parameters, as ``tflm`` deploys).
    ``int16x8``       TFLite's 16x8 mode (``EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8``): int16 activations
                      (symmetric, zero point 0, as TFLite's int16 kernels require), int8 per-channel weights, int64 biases,
                      int64 accumulation, with every parameter nilmc's (traits TFLITE_INT16X8_FLOAT_INPUT: the converter
                      runs once in 16x8 mode for the structure, nilmc's grids are written into every tensor, read back and
                      checked). Precise input as for ``int8`` (``cpu_layers=auto``; ``none``: traits TFLITE_INT16X8, int16
                      input). For models whose activations an 8-bit per-tensor grid cannot hold: raw-scale (normalization A)
                      inputs, where the imbalance is between feature positions of one channel, which no equalization reaches.
                      I/O: int16 tensors (``io_dtype`` int8, the default: integer I/O) or float32 (``io_dtype=float``); a
                      Keras source with Conv2D / Dense layers only (nilmc's Keras mapping; other graphs keep ``int8``).
    ``qat_int8``      full integer after quantization-aware fine-tuning (:func:`nilmc.quantization.qat.qat_finetune`)
                      started from the TFLITE_INT8 ranges (``cpu_layers`` does not apply: QAT fake-quantizes the input).

Options (``lower(..., options=...)``; the compile driver passes ``quant`` and ``calibration``):
    ``quant``          the shared :class:`QuantContext` (int8, qat_int8).
    ``calibration``    the calibration :class:`NilmDataset`; QAT fine-tunes on its labelled windows.
    ``io_dtype``       ``"int8"`` (default), ``"uint8"`` or ``"float"``: I/O tensors of the integer models (with precise
                       input the input tensor is float32 whatever this says).
    ``cpu_layers``     ``"auto"`` (default: precise input for ``int8``) or ``"none"`` (full integer); other values raise
                       :class:`BadInputError` (``--option tflite.cpu_layers=auto|none``).
    ``per_tensor``     False (default): per-channel weights; True: per-tensor weights.
    ``estimator``      activation range estimator (default: the context's, min-max).
    ``qat_epochs`` (3), ``qat_learning_rate`` (2e-6; 1e-4 raised the held-out error from the first epoch on the
    shipped model), ``qat_batch_size`` (64), ``qat_seed`` (0),
    ``qat_train``      a labelled :class:`NilmDataset` (e.g. the training split) to fine-tune on instead of
                       the calibration set.
    ``qat_targets``    ``"auto"`` (default: ``"labels"`` with ``qat_train``, ``"teacher"`` on the calibration
                       set), ``"labels"`` (the set's targets) or ``"teacher"`` (the FP32 model's outputs:
                       distillation).
    ``qat_holdout``    0.2 (default): the last fifth of the QAT windows is held out; the epoch with the lowest
                       held-out MSE is kept (epoch 0 = the PTQ starting point).
    ``tflm``           True (default): TFLite Micro export (C array + estimate report) for int8 / qat_int8.

QAT here fine-tunes for a few epochs on the calibration set's windows (or ``qat_train``). On the
calibration set the targets are, by default, the FP32 model's own outputs (distillation): measured
on a T-P seq2point, fine-tuning on the calibration set's *labels* lost ~24 EACC points, with or
without fake quantization (1000 windows from other days overfit in 3 epochs), while the goal of
QAT is only to make the integer model follow the float one. With ``qat_train`` (e.g. the training
split) the labels are used, as in the usual QAT recipe. A held-out block guards both.

Keras sources nilmc's Keras mapping cannot place (Conv1D, BatchNormalization, TensorFlowOpLayers, LSTM): the
converter's full-integer graph of the Keras model is planned from the model's ONNX graph, as an onnx2tf graph is
(:func:`nilmc.backends.onnx_to_tf.build_int8_from_keras`). With recurrent layers the conversion starts from a
batch-1 signature (a dynamic batch fails with ``tf.TensorListReserve``) and the LSTM cells stay float32 between
DEQUANTIZE / QUANTIZE (``info["tflite_placement"]`` lists them; nilmc derives no gate or cell-state ranges).

Runner: ``ai_edge_litert.interpreter.Interpreter`` (the TFLite runtime itself, default CPU kernels
incl. the XNNPACK delegate, 1 thread) -> MEASURED. A batch is run in one invoke by resizing the
input tensor to the batch (re-allocated only when the batch size changes); a batch-1 model (recurrent
layers: its Reshapes carry the batch, resizing fails) runs window by window. Integer I/O: the
runner quantizes inputs with the input tensor's scale / zero point (round half away from zero, as
TFLite's QUANTIZE op) and dequantizes outputs with the output tensor's, so it takes and returns
float model units like every other runner.

Determinism: the converter and the rewrite are deterministic for the same model and parameters
(byte-identical flatbuffers); QAT is seeded (same machine, same TensorFlow build).
"""
from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nilmc.backends.base import Artifact, Capabilities, Verification
from nilmc.backends.tflite_int8 import (
    FLOAT_KEPT_OPS,
    TAIL_ROUTE,
    TAIL_RUNS,
    TAIL_SUFFIX,
    TAIL_WHY,
    FullIntegerSpec,
    build_full_integer,
    check_cpu_layers,
    check_int16x8_io,
    check_io_dtype,
    convert_keras,
    float_layers_phrase,
    integer_params,
    invoke_windows,
    io_quantization,
    kept_float_ignored,
    keras_placeable,
    manifest_placement,
    recurrent_layers,
    tail_path,
    tensor_precisions,
    tflite_placement,
    tflite_traits,
)
from nilmc.compiler.errors import BadInputError, DataError, MissingDependencyError
from nilmc.compiler.io import atomic_write_bytes
from nilmc.compiler.tfcompat import NO_KERAS, keras_bridge_record, keras_source_precheck, load_keras, require_tflite  # noqa: F401  (load_keras: used by dpu QAT, benchmarks)
from nilmc.quantization.intops import Rounding, int_range, quantize
from nilmc.quantization.traits import TFLITE_INT8, TFLITE_INT8_FLOAT_INPUT, TFLITE_INT16X8, TFLITE_INT16X8_FLOAT_INPUT

if TYPE_CHECKING:
    from nilmc.compiler.model import Model

FLOAT_PRECISIONS = ("fp32", "fp16", "dynamic_int8")
INT_PRECISIONS = ("int8", "int16x8", "qat_int8")
# The TFLite converter's dynamic-range mode quantizes a weight tensor only from this many elements on (its
# ``min_elements_for_weights`` default): a smaller one stays float32.
DYNAMIC_MIN_ELEMENTS = 1024
# The float-equivalence check of tflite:fp32 / fp16 against the FP32 ONNX reference: windows (calibration windows when
# given, else seeded random ones) and the least output SQNR. FP32 is the same arithmetic (measured 125-150 dB on Conv,
# Dense and LSTM models; a misconverted Keras BiLSTM 33.8 dB); FP16 rounds every weight to 11 bits (~66 dB per weight).
FLOAT_CHECK_WINDOWS = 8
FLOAT_CHECK_SEED = 0
FLOAT_CHECK_MIN_SQNR_DB = {"fp32": 60.0, "fp16": 30.0}
PTQ_PRECISIONS = ("int8", "int16x8")  # PTQ from nilmc's ranges; precise input applies (cpu_layers)


@dataclass(frozen=True)
class TFLiteOptions:
    """Parsed ``options`` of :meth:`TFLiteBackend.lower` (defaults in the module docstring)."""

    io_dtype: str = "int8"
    per_tensor: bool = False
    estimator: str | None = None
    cpu_layers: str = "auto"
    qat_epochs: int = 3
    qat_learning_rate: float = 2e-6
    qat_batch_size: int = 64
    qat_seed: int = 0
    qat_targets: str = "auto"
    qat_holdout: float = 0.2
    tflm: bool = True

    def __post_init__(self) -> None:
        check_cpu_layers(self.cpu_layers, "tflite")  # a typed error naming the flag, from the CLI too

    def quant_traits(self, precision: str, traits: Any) -> Any:
        """The traits ``tflite:<precision>`` derives its parameters under with these options (the driver's shared
        derivation, overflow and coverage sections follow them): ``int8``'s spec (full integer under
        ``cpu_layers=none``, per-tensor weights under ``per_tensor``); other precisions keep ``traits``."""
        return tflite_spec(precision, self).traits if precision in PTQ_PRECISIONS else traits

    @classmethod
    def parse(cls, options: Mapping[str, Any] | None) -> TFLiteOptions:
        o = dict(options or {})
        try:
            out = cls(
                io_dtype=check_io_dtype(str(o.get("io_dtype", "int8"))),
                per_tensor=bool(o.get("per_tensor", False)),
                estimator=o.get("estimator"),
                cpu_layers=str(o.get("cpu_layers", "auto")),
                qat_epochs=int(o.get("qat_epochs", 3)),
                qat_learning_rate=float(o.get("qat_learning_rate", 2e-6)),
                qat_batch_size=int(o.get("qat_batch_size", 64)),
                qat_seed=int(o.get("qat_seed", 0)),
                qat_targets=str(o.get("qat_targets", "auto")),
                qat_holdout=float(o.get("qat_holdout", 0.2)),
                tflm=bool(o.get("tflm", True)),
            )
        except (TypeError, ValueError) as exc:
            raise BadInputError(f"invalid TFLite option ({exc})", "see nilmc.backends.tflite_backend for the options and their types") from None
        if out.qat_targets not in QAT_TARGETS:
            raise BadInputError(f"unknown qat_targets {out.qat_targets!r}", f"use one of {', '.join(QAT_TARGETS)}")
        if not 0.0 <= out.qat_holdout < 1.0:
            raise BadInputError(f"qat_holdout must be in [0, 1), got {out.qat_holdout}", "e.g. 0.2 holds out the last fifth of the QAT windows")
        return out


# --------------------------------------------------------------------------- runner
class TFLiteRunner:
    """Runs a ``.tflite`` file with the TFLite runtime (``ai_edge_litert``), float in / float out."""

    verification = Verification.MEASURED

    def __init__(self, path: Path, *, threads: int = 1, output_name: str = "output", tail: Path | None = None) -> None:
        self.path = Path(path)
        self.threads = threads
        self.output_name = output_name
        self.tail = None if tail is None else Path(tail)  # a float32 tail stage run on the integer stage's (dequantized) output
        self._it: Any = None
        self._tail_it: Any = None
        self._batch: int | None = None

    def __enter__(self) -> TFLiteRunner:
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            raise MissingDependencyError("ai-edge-litert", "tflite", "running TFLite models") from None
        self._it = Interpreter(model_path=str(self.path), num_threads=self.threads)
        if self.tail is not None:
            self._tail_it = Interpreter(model_path=str(self.tail), num_threads=self.threads)
            self._tail_it.allocate_tensors()
        self._batch = None
        return self

    def __exit__(self, *exc: object) -> None:
        self._it = self._tail_it = None

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if len(feeds) != 1:
            raise BadInputError(f"the TFLite model takes one input, got {len(feeds)} feeds", "pass {'input': windows}")
        x = np.asarray(next(iter(feeds.values())), np.float32)
        inp, out = self._it.get_input_details()[0], self._it.get_output_details()[0]
        if self._batch is None:
            self._it.allocate_tensors()
            self._batch = 0
        # one invoke per batch (re-allocated when its size changes), or per window for a batch-1 model (recurrent layers)
        y = _from_tensor(invoke_windows(self._it, _to_tensor(x, inp)), out)
        if self._tail_it is not None:
            ti, to = self._tail_it.get_input_details()[0], self._tail_it.get_output_details()[0]
            y = _from_tensor(invoke_windows(self._tail_it, _to_tensor(y, ti)), to)
        return {self.output_name: y}


def _to_tensor(x: np.ndarray, detail: Mapping[str, Any]) -> np.ndarray:
    dtype = np.dtype(detail["dtype"])
    if dtype.kind == "f":
        return x.astype(dtype)
    scale, zp = detail["quantization"]
    rng = int_range(dtype.name)
    return quantize(x, float(scale), int(zp), rng, rounding=Rounding.HALF_AWAY).astype(dtype)


def _from_tensor(y: np.ndarray, detail: Mapping[str, Any]) -> np.ndarray:
    if np.dtype(detail["dtype"]).kind == "f":
        return np.asarray(y, np.float32).copy()
    scale, zp = detail["quantization"]
    return ((y.astype(np.int64) - int(zp)).astype(np.float32) * np.float32(scale)).astype(np.float32)


# --------------------------------------------------------------------------- helpers
QAT_TARGETS = ("auto", "teacher", "labels")


def _qat_data(model: Model, keras_model: Any, options: Mapping[str, Any], opts: TFLiteOptions) -> dict[str, Any]:
    """QAT windows and targets, split into a training part and a held-out block (the last ``qat_holdout``)."""
    given = options.get("qat_train") is not None
    ds = options.get("qat_train") if given else options.get("calibration")
    if ds is None:
        raise DataError("qat_int8 fine-tunes on labelled windows but neither options['qat_train'] nor a calibration set was given",
                        "pass --calib FILE (its windows are used) or options['qat_train']")
    c = model.contract
    c.check_input(ds.x, source="the QAT set")
    x = c.prepare(ds.raw_x())
    targets = opts.qat_targets if opts.qat_targets != "auto" else ("labels" if given else "teacher")
    if targets == "labels":
        y = c.target.from_watts(ds.y[:, ds.appliance_index(c.appliance)])[:, None]
    else:  # distillation: the FP32 model's own outputs
        y = np.asarray(keras_model.predict(x, batch_size=512, verbose=0), np.float32).reshape(len(x), -1)
    n_val = int(round(len(x) * opts.qat_holdout))
    if n_val and len(x) - n_val < 1:
        raise DataError(f"{len(x)} QAT windows leave none for training after holding out {n_val}", "pass more windows or lower qat_holdout")
    split = len(x) - n_val
    return {"x": x[:split], "y": y[:split], "val": (x[split:], y[split:]) if n_val else None,
            "source": "qat_train" if given else "calibration", "targets": targets, "held_out": n_val}


def _write(out_dir: Path, name: str, data: bytes) -> str:
    atomic_write_bytes(Path(out_dir) / name, data)
    return name


# --------------------------------------------------------------------------- backend
class TFLiteBackend:
    name = "tflite"
    capabilities = Capabilities(
        precisions=FLOAT_PRECISIONS + INT_PRECISIONS,
        description="TFLite (ai_edge_litert runtime): FP32, FP16, dynamic-range INT8, full-integer INT8 and 16x8 (int16 activations) "
                    "from nilmc's ranges, QAT INT8; TFLite Micro export",
        traits={"int8": TFLITE_INT8_FLOAT_INPUT, "int16x8": TFLITE_INT16X8_FLOAT_INPUT, "qat_int8": TFLITE_INT8},
        # QAT fine-tunes the Keras model; int16x8 is written through nilmc's Keras mapping; the others also lower from ONNX
        keras_precisions=("int16x8", "qat_int8"),
        options=TFLiteOptions,
        requires=("tensorflow", "ai_edge_litert"),
        extra="tflite",
        limitations={
            "needs_keras_source": "qat_int8 fine-tunes the tf_keras (Keras 2) model (.keras/.h5); the other precisions also lower an ONNX "
                                  "model (a PyTorch export) through onnx2tf",
            "layers": "full-integer mapping covers Conv1D/Conv2D, Dense, BatchNormalization (MUL/ADD), TensorFlowOpLayers that move data, "
                      "Flatten/Reshape, MaxPool and LSTM/BiLSTM kept float32 (Keras source; recurrent models from a batch-1 signature, run "
                      "window by window) and Conv (1-D/2-D), Gemm, MatMul with Relu/Clip and data movement (ONNX source); GRU/SimpleRNN "
                      "(a WHILE loop the converter's quantizer crashes on) and other ops are refused by the pre-check",
            "qat_int8": "fine-tunes on the calibration windows (FP32 outputs as targets) or options['qat_train'] (labels) for qat_epochs epochs",
            "tflm": "TFLite Micro Flash / arena / cycle figures are estimates from the flatbuffer, not measured on a microcontroller; "
                    "written for integer graphs only (tflite.cpu_layers=none, or the tflm target)",
            "precise_input": "int8 and int16x8 run the layers reading the graph input in FP32 (float32 input tensor) unless "
                             "tflite.cpu_layers=none; qat_int8 is full integer",
            "int16x8": "Keras sources whose weighted layers are Conv2D / Dense (nilmc's Keras mapping); no TFLite Micro export; "
                       "slow on CPU: measured on the T-P model (batch 1, 1 thread) the default op resolver ran the 16x8 graph no "
                       "faster than the reference one (4.1 ms both; int8 with XNNPACK 0.05 ms)",
        },
    )

    def lower(self, model: Model, out_dir: Path, *, precision: str = "fp32", options: Mapping[str, Any] | None = None) -> Artifact:
        """Write ``model_<precision>.tflite`` (and, for integer precisions, the TFLite Micro export) into ``out_dir``."""
        if precision not in self.capabilities.precisions:
            raise BadInputError(f"tflite has no precision {precision!r}", f"available: {', '.join(self.capabilities.precisions)}")
        if not model.keras_path and precision in self.capabilities.keras_precisions:
            load_keras(model)  # raises the clear "needs the Keras model" error before anything is imported
        require_tflite()
        out_dir = Path(out_dir)
        if not model.keras_path:
            return self._lower_onnx(model, out_dir, precision, dict(options or {}))
        keras_model = load_keras(model)  # a Keras 3 source comes back bridged to tf_keras, measured against itself
        if precision in FLOAT_PRECISIONS:
            artifact = self._lower_float(model, keras_model, out_dir, precision, dict(options or {}))
        else:
            artifact = self._lower_int(model, keras_model, out_dir, precision, dict(options or {}))
        if (bridge := keras_bridge_record(model)) is not None:
            artifact.info["keras_bridge"] = bridge
        return artifact

    def precheck(self, model: Model, precision: str) -> str | None:
        """What keeps ``model`` from ``tflite:<precision>``, from the graph alone in milliseconds (None: nothing found)."""
        if precision not in self.capabilities.precisions:
            return None
        if precision == "dynamic_int8" and (why := _dynamic_precheck(model.graph)) is not None:
            return why
        if model.keras_path:
            from nilmc.backends.onnx_to_tf import keras_int8_precheck

            if (why := keras_source_precheck(model)) is not None:  # a Keras 3 layer the tf_keras bridge cannot rebuild
                return f"tflite:{precision}: {why}"
            return (keras_int8_precheck(model.graph, f"tflite:{precision}", qat=precision == "qat_int8", tail=precision == "int8")
                    if precision in INT_PRECISIONS else None)
        from nilmc.backends.onnx_to_tf import ONNX2TF, int8_precheck, onnx2tf_available, onnx2tf_precheck

        if not onnx2tf_available():
            return f"tflite:{precision} lowers an ONNX model through onnx2tf, which is not installed; pip install 'nilmc[tflite]' ({ONNX2TF})"
        why = onnx2tf_precheck(model.graph, f"tflite:{precision}")  # no tflite precision converts it: said first
        if why is None and precision in INT_PRECISIONS:
            why = int8_precheck(model.graph, f"tflite:{precision}")
        return why

    def runner(self, artifact: Artifact) -> TFLiteRunner:
        return TFLiteRunner(artifact.path, tail=tail_path(artifact))

    # ------------------------------------------------------------------ from ONNX (onnx2tf)
    def _lower_onnx(self, model: Model, out_dir: Path, precision: str, options: dict[str, Any]) -> Artifact:
        from nilmc.backends.onnx_to_tf import ONNX2TF, build_int8_from_onnx, convert_onnx, onnx_integer_params, output_cover_watts

        tools = ["onnx2tf", "tensorflow", "ai-edge-litert"]
        route = f"ONNX -> {ONNX2TF} (tf_keras) -> TFLiteConverter"
        if precision in FLOAT_PRECISIONS:
            art = self._write_float(model, convert_onnx(model, precision), out_dir, precision, options)
            art.info.update(tools=tools, route=route)
            return art
        opts = TFLiteOptions.parse(options)
        spec = tflite_spec(precision, opts)
        derived = onnx_integer_params(model, spec, options, estimator=opts.estimator)
        result = build_int8_from_onnx(model, derived.params, derived.calib_x, spec, float_input=len(derived.precise), float_prefix=derived.prefix)
        name = _write(out_dir, f"model_{precision}.tflite", result.flatbuffer)
        info: dict[str, Any] = {"tools": tools, "route": route + " (full integer) -> nilmc's parameters written into every tensor",
                                "quantization": derived.params.to_json(), "overflow": derived.overflow.to_json(), "io_dtype": opts.io_dtype,
                                "per_tensor": opts.per_tensor, "runtime": "ai_edge_litert Interpreter (CPU, 1 thread)",
                                "param_check": {k: v for k, v in result.check.items() if k != "mismatches"},
                                "io": io_quantization(result.flatbuffer), "output_covers_w": output_cover_watts(derived.params, model),
                                "layers": dict(sorted((str(k), v) for k, v in result.plan.layer_of_op.items()))}
        info["extra_files"] = self._finish(model, result, derived, opts, out_dir, info)
        return Artifact(self.name, precision, out_dir, name, [name], kind=_kind("PTQ", opts, result, "; via onnx2tf"), info=info)

    def _finish(self, model: Model, result: Any, derived: Any, opts: TFLiteOptions, out_dir: Path, info: dict[str, Any], *,
                activations: str = "int8") -> list[str]:
        """What every integer lowering records: the placement (precise input or full integer), the keep_float layers it did
        not honour, and the TFLite Micro export of an int8 graph. Returns the extra files."""
        info["cpu_layers"] = opts.cpu_layers
        info["placement"] = manifest_placement(model.graph, derived.params, result, derived.precise, prefix=derived.prefix)
        ignored = kept_float_ignored(derived.params, derived.float_layers)
        if ignored:
            info["keep_float_ignored"] = ignored
        if activations == "int16":
            # the driver's vocabulary lists the quantized layers under "int8" (their weights): say what the activations are
            placed = info["placement"]
            placed["activations"] = "int16"
            placed["summary"] = placed["summary"].replace("in INT8", "in 16x8 (int16 activations, int8 weights, int64 bias)")
            for f in placed["float"]:
                f["why"] = f["why"].replace("int8 grid", "int16 grid")
            if opts.tflm:
                info["tflm"] = {"skipped": "the TFLite Micro export and its estimates cover int8 graphs only (tflm:cortex-m4, "
                                           "tflite:int8 with tflite.cpu_layers=none)"}
            return []
        if result.float_layers:
            if opts.tflm:
                info["tflm"] = {"skipped": "the layers reading the input run in float32 (precise input): the TFLite Micro export is "
                                           "for integer graphs (tflite.cpu_layers=none, or the tflm:cortex-m4 target)"}
            return []
        return self._tflm(result.flatbuffer, out_dir, opts, info)

    @staticmethod
    def _tflm(fb: bytes, out_dir: Path, opts: TFLiteOptions, info: dict[str, Any]) -> list[str]:
        if not opts.tflm:
            return []
        from nilmc.backends.tflite_micro import write_tflm_export

        tflm_files, report = write_tflm_export(fb, out_dir)
        info["tflm"] = {k: report[k] for k in ("flash", "arena", "compute", "budget", "fits", "cycles_verdict_robust", "estimate", "note")}
        return tflm_files

    # ------------------------------------------------------------------ float / dynamic
    def _lower_float(self, model: Model, keras_model: Any, out_dir: Path, precision: str, options: dict[str, Any]) -> Artifact:
        return self._write_float(model, convert_keras(keras_model, precision), out_dir, precision, options)

    def _write_float(self, model: Model, fb: bytes, out_dir: Path, precision: str, options: Mapping[str, Any]) -> Artifact:
        """Check the converter's float model, then write it: ``dynamic_int8`` must hold int8 weights (the kind says which),
        ``fp32`` / ``fp16`` must compute the FP32 ONNX reference's outputs (:func:`check_float_equivalence`)."""
        kinds = {"fp32": "TFLite FP32", "fp16": "TFLite FP16 weights", "dynamic_int8": "TFLite dynamic-range INT8 (int8 weights, float activations)"}
        info: dict[str, Any] = {"tools": ["tensorflow", "ai-edge-litert"], "runtime": "ai_edge_litert Interpreter (CPU, 1 thread)"}
        kind = kinds[precision]
        if precision == "dynamic_int8":
            info["weights"] = dynamic_weights(fb)
            kind = dynamic_kind(info["weights"])
        else:
            info["float_check"] = check_float_equivalence(fb, model, precision, _check_windows(model, options))
        name = _write(out_dir, f"model_{precision}.tflite", fb)
        return Artifact(self.name, precision, out_dir, name, [name], kind=kind, info=info)

    # ------------------------------------------------------------------ full integer
    def _lower_int(self, model: Model, keras_model: Any, out_dir: Path, precision: str, options: dict[str, Any]) -> Artifact:
        opts = TFLiteOptions.parse(options)
        spec = tflite_spec(precision, opts)
        if not keras_placeable(keras_model):
            if precision == "int16x8":
                raise BadInputError(f"tflite:int16x8 is written through nilmc's Keras mapping (Conv2D / Dense layers); {model.source or 'the model'} "
                                    "has other weighted or recurrent layers", "use tflite:int8 (its graph is planned from the ONNX form), "
                                    "or onnxruntime:int8")
            if precision == "qat_int8":
                raise BadInputError(f"tflite:qat_int8 fine-tunes Conv2D/Dense Keras models; {model.source or 'the model'} has other weighted "
                                    "or recurrent layers", "use tflite:int8 (PTQ from nilmc's ranges)")
            return self._lower_keras_graph(model, keras_model, out_dir, precision, opts, spec, options)
        derived = integer_params(model, keras_model, spec, options, estimator=opts.estimator)
        params, kq = derived.params, derived.kq
        info: dict[str, Any] = {"tools": ["tensorflow", "ai-edge-litert"], "quantization": params.to_json(),
                                "overflow": derived.overflow.to_json(), "io_dtype": opts.io_dtype, "per_tensor": opts.per_tensor,
                                "runtime": "ai_edge_litert Interpreter (CPU, 1 thread)"}
        if precision in PTQ_PRECISIONS:
            floor = calibration_floor(precision, params, opts, options)
            if floor is not None:
                info["calibration_sqnr"] = floor
        extra: list[str] = []
        if precision == "qat_int8":
            tuned = self._qat(model, keras_model, kq, opts, options, info)
            if tuned is not None:  # else no epoch beat the PTQ start on the held-out block: deploy the PTQ model
                keras_model, kq = tuned
                info["quantization"] = kq.to_json()  # what is deployed: the QAT ranges and re-derived weight scales
                extra.append(_write_keras(keras_model, out_dir / "qat_finetuned_float.h5"))
        result, _ = build_full_integer(keras_model, kq, derived.calib_x, spec, where=f"model {model.source or '?'!r}",
                                       float_input=len(derived.precise), float_prefix=derived.prefix)
        name = _write(out_dir, f"model_{precision}.tflite", result.flatbuffer)
        info["param_check"] = {k: v for k, v in result.check.items() if k != "mismatches"}
        info["io"] = io_quantization(result.flatbuffer)
        info["output_covers_w"] = _output_cover_watts(kq, model)
        info["tensor_precision"] = tensor_precisions(result.flatbuffer)  # per tensor, read from the written flatbuffer
        extra += self._finish(model, result, derived, opts, out_dir, info, activations=spec.activations)
        info["extra_files"] = extra  # beside the deployable model; not counted in its size
        return Artifact(self.name, precision, out_dir, name, [name],
                        kind=_kind("QAT" if precision == "qat_int8" else "PTQ", opts, result, activations=spec.activations), info=info)

    def _lower_keras_graph(self, model: Model, keras_model: Any, out_dir: Path, precision: str, opts: TFLiteOptions,
                           spec: FullIntegerSpec, options: dict[str, Any]) -> Artifact:
        """A Keras source with Conv1D / BatchNormalization / TensorFlowOpLayers / recurrent layers: the converter's graph of
        the Keras model (batch 1 and recurrent cells float32 when it has any), nilmc's parameters keyed by the ONNX graph."""
        from nilmc.backends.onnx_to_tf import build_int8_from_keras, float_tail, onnx_integer_params, output_cover_watts

        tail = float_tail(model.graph) if precision == "int8" else None
        derived = onnx_integer_params(model, spec, options, estimator=opts.estimator, tail=tail)
        files: list[str] = []
        if tail is None:
            result = build_int8_from_keras(keras_model, model, derived.params, derived.calib_x, spec, float_input=len(derived.precise),
                                           float_prefix=derived.prefix)
        else:
            from nilmc.backends.onnx_to_tf import build_int8_with_float_tail

            result, tail_fb = build_int8_with_float_tail(keras_model, model, derived.params, derived.calib_x, spec, tail,
                                                         float_input=len(derived.precise), float_prefix=derived.prefix)
            files.append(_write(out_dir, f"model_{precision}{TAIL_SUFFIX}", tail_fb))
        name = _write(out_dir, f"model_{precision}.tflite", result.flatbuffer)
        info: dict[str, Any] = {"tools": ["tensorflow", "ai-edge-litert"],
                                "route": "Keras -> TFLiteConverter (full integer" + (", batch-1 signature" if recurrent_layers(keras_model) else "")
                                         + ") -> nilmc's parameters (keyed by the model's ONNX graph) written into every int8 tensor",
                                "quantization": derived.params.to_json(), "overflow": derived.overflow.to_json(), "io_dtype": opts.io_dtype,
                                "per_tensor": opts.per_tensor, "runtime": "ai_edge_litert Interpreter (CPU, 1 thread)",
                                "param_check": {k: v for k, v in result.check.items() if k != "mismatches"},
                                "io": io_quantization(result.flatbuffer), "output_covers_w": output_cover_watts(derived.params, model),
                                "layers": dict(sorted((str(k), v) for k, v in result.plan.layer_of_op.items())),
                                "tflite_placement": tflite_placement(result.flatbuffer, {f["index"]: f["why"] for f in result.float_layers})}
        cells = any(f["op"] in FLOAT_KEPT_OPS for f in info["tflite_placement"]["float"])
        info["extra_files"] = self._finish(model, result, derived, opts, out_dir, info) if not (cells or tail) else []
        tail_why: dict[str, str] = {}
        if tail is not None:
            tail_why = dict.fromkeys(sorted(tail.nodes), TAIL_WHY.format(first=tail.first_op))
            names = [layer.name for layer in keras_model.layers]
            info["float_tail"] = {"file": files[0], "cut": tail.cut, "first_op": tail.first_op,
                                  "keras_layers": names[names.index(tail.layer):], "runs": TAIL_RUNS,
                                  "io": io_quantization(result.flatbuffer)["output"]}
            info["route"] += "; " + TAIL_ROUTE.format(layer=tail.layer)
        if cells or tail is not None:
            info["placement"] = manifest_placement(model.graph, derived.params, result, derived.precise, prefix=derived.prefix, tail=tail_why)
            ignored = kept_float_ignored(derived.params, (*derived.float_layers, *(tail.nodes | tail.tensors if tail else ())))
            if ignored:
                info["keep_float_ignored"] = ignored
            if opts.tflm:
                info["tflm"] = {"skipped": "a float32 tail stage: the TFLite Micro estimate covers one integer graph" if tail is not None
                                else "float32 recurrent cells: the TFLite Micro estimate covers integer graphs only"}
        note = f"; float32 tail from {tail.layer} ({files[0]})" if tail is not None else "; recurrent cells float32" if cells else ""
        return Artifact(self.name, precision, out_dir, name, [name, *files], kind=_kind("PTQ", opts, result, note), info=info)

    def _qat(self, model: Model, keras_model: Any, kq: Any, opts: TFLiteOptions, options: Mapping[str, Any],
             info: dict[str, Any]) -> tuple[Any, Any] | None:
        """Fine-tune; ``(float model, KerasQuant)`` of the kept epoch, or None when epoch 0 (the PTQ start) was best."""
        from nilmc.quantization.qat import keras_quant_from_qat, qat_finetune, widen_output

        data = _qat_data(model, keras_model, options, opts)
        t0 = time.perf_counter()
        history: dict[str, Any] = {}
        qat_model = qat_finetune(keras_model, kq, data["x"], data["y"], epochs=opts.qat_epochs, learning_rate=opts.qat_learning_rate,
                                 seed=opts.qat_seed, batch_size=opts.qat_batch_size, validation=data["val"], history=history)
        info["tools"].append("tensorflow-model-optimization")
        info["qat"] = {"train_set": data["source"], "targets": data["targets"], "windows": int(len(data["x"])),
                       "held_out_windows": data["held_out"], "epochs": opts.qat_epochs, "learning_rate": opts.qat_learning_rate,
                       "batch_size": opts.qat_batch_size, "seed": opts.qat_seed, "seconds": round(time.perf_counter() - t0, 2),
                       "held_out_mse_per_epoch": [round(v, 6) for v in history.get("val_loss", [])],
                       "kept_epoch": history.get("best_epoch"),
                       "note": "fine-tuned from nilmc's PTQ ranges (activation ranges then follow tfmot's moving average); "
                               "the epoch with the lowest held-out MSE is kept, 0 = the PTQ starting point; "
                               "PTQ bias correction is not carried over (QAT trains the biases)"}
        if history.get("best_epoch") == 0 and data["val"] is not None:
            info["qat"]["deployed"] = "PTQ model: no fine-tuned epoch lowered the held-out MSE"
            return None
        info["qat"]["deployed"] = f"fine-tuned weights and ranges of epoch {history.get('best_epoch')}"
        plain, kq_qat = keras_quant_from_qat(qat_model, keras_model, kq.traits)
        return plain, widen_output(kq_qat, model.contract)


def tflite_spec(precision: str, opts: TFLiteOptions) -> FullIntegerSpec:
    """The integer target ``tflite:<precision>`` as data: precise input for ``int8`` / ``int16x8`` unless
    ``opts.cpu_layers`` is none (TFLITE_INT8_FLOAT_INPUT / TFLITE_INT16X8_FLOAT_INPUT traits), else full integer
    (TFLITE_INT8 / TFLITE_INT16X8). I/O dtype changes no parameter: the traits keep int8 (16x8: int16) I/O so every I/O
    variant shares the context's cached parameters; the flatbuffer gets ``opts.io_dtype`` (16x8: int16 for integer I/O)."""
    float_input = precision in PTQ_PRECISIONS and opts.cpu_layers == "auto"
    if precision == "int16x8":
        io = check_int16x8_io("int16" if opts.io_dtype == "int8" else opts.io_dtype)
        base16 = TFLITE_INT16X8_FLOAT_INPUT if float_input else TFLITE_INT16X8
        return FullIntegerSpec(label=f"tflite:{precision}", traits=tflite_traits(per_tensor=opts.per_tensor, base=base16, io_dtype="int16"),
                               per_tensor=opts.per_tensor, io_dtype=io, float_input=float_input, activations="int16")
    base = TFLITE_INT8_FLOAT_INPUT if float_input else TFLITE_INT8
    return FullIntegerSpec(label=f"tflite:{precision}", traits=tflite_traits(per_tensor=opts.per_tensor, base=base),
                           per_tensor=opts.per_tensor, io_dtype=opts.io_dtype, float_input=float_input)


def calibration_floor(precision: str, params: Any, opts: TFLiteOptions, options: Mapping[str, Any]) -> dict[str, Any] | None:
    """The calibration SQNR floor (``Techniques.min_calib_sqnr``) checked on what ``tflite:<precision>`` deploys: the output
    SQNR vs FP32 of ``params``' QDQ reference on the calibration windows (at most 512). TFLite's integer graph cannot keep an
    inner layer float, as the QDQ targets do to hold the floor, so an ``int8`` miss is answered with the 16x8 grids: the same
    check on the parameters ``tflite:int16x8`` derives (with these options) names the target that holds it, with both
    numbers, in ``hint``. None when the floor is off or no calibration context was given."""
    from nilmc.quantization._ort import output_step
    from nilmc.quantization.api import Techniques
    from nilmc.quantization.mixed_precision import calibration_sqnr_db

    ctx = options.get("quant")
    if ctx is None:
        return None
    tech = ctx.techniques if ctx.techniques is not None else Techniques()
    if tech.min_calib_sqnr is None:
        return None
    floor = float(tech.min_calib_sqnr)
    x = ctx.calib_x

    def measured(p: Any) -> float:
        return calibration_sqnr_db(ctx.model.graph, p, x, max_windows=tech.max_windows, step=output_step(ctx.model.contract))

    db = measured(params)
    out: dict[str, Any] = {"floor_db": floor, "output_sqnr_db": round(db, 2), "met": db >= floor, "windows": int(min(len(x), tech.max_windows)),
                           "measured_on": "nilmc's QDQ reference of the deployed parameters (onnxruntime), calibration windows"}
    if precision == "int8" and db < floor:
        spec16 = tflite_spec("int16x8", opts)
        db16 = measured(ctx.params(spec16.traits))
        holds = db16 >= floor
        out["int16x8_output_sqnr_db"] = round(db16, 2)
        out["hint"] = (f"the int8 grids give {db:.1f} dB output SQNR vs FP32 on the calibration windows, under the {floor:g} dB floor; "
                       + (f"tflite:int16x8 (int16 activations) holds it: {db16:.1f} dB; use --targets tflite:int16x8" if holds
                          else f"tflite:int16x8 reaches {db16:.1f} dB, also under it; use onnxruntime:int8 or openvino:int8 "
                               "(they keep layers float to hold the floor)"))
    return out


def _kind(label: str, opts: TFLiteOptions, result: Any, note: str = "", *, activations: str = "int8") -> str:
    weights = "per-tensor" if opts.per_tensor else "per-channel"
    if activations == "int16":
        io = "float32 input" if result.float_layers else f"{result.io_dtype} input"
        precise = f"; {float_layers_phrase(result.float_layers)}" if result.float_layers else ""
        return (f"TFLite 16x8 ({label}, nilmc ranges: int16 activations, int8 {weights} weights, int64 bias{precise}; {io}, "
                f"{'float32' if result.io_dtype == 'float' else result.io_dtype} output{note})")
    if result.float_layers:
        out = result.io_dtype if result.io_dtype != "float" else "float32"
        return (f"TFLite INT8 with precise input ({label}, nilmc ranges, {weights} weights; {float_layers_phrase(result.float_layers)}, "
                f"float32 input, {out} output{note})")
    return f"TFLite full-integer INT8 ({label}, nilmc ranges, {weights} weights, {opts.io_dtype} I/O{note})"


def _write_keras(keras_model: Any, path: Path) -> str:
    """Save the fine-tuned float model as .h5 (atomically, via a temporary file)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "m.h5"
        keras_model.save(p, include_optimizer=False)
        atomic_write_bytes(path, p.read_bytes())
    return path.name


def _output_cover_watts(kq: Any, model: Model) -> dict[str, Any]:
    from nilmc.backends.onnx_to_tf import cover_watts

    lo, hi = kq.output.representable()
    return cover_watts(float(np.min(lo)), float(np.max(hi)), model.contract)


# ------------------------------------------------------------------ float / dynamic checks
def dynamic_weights(fb: bytes) -> dict[str, Any]:
    """Which weight tensors of a dynamic-range flatbuffer the converter stored as int8 and which stayed float32, read from
    the flatbuffer. Weights: constant float / int8 tensors of rank >= 2 (kernels, matrices; biases and shapes aside).
    Raises :class:`BadInputError` when none is int8: the file would be the FP32 model under an INT8 name."""
    from nilmc.backends.tflite_int8 import load_flatbuffer, tensor_name, type_name

    m = load_flatbuffer(fb)
    out: dict[str, list[dict[str, Any]]] = {"int8": [], "float32": []}
    for t in m.subgraphs[0].tensors:
        data = m.buffers[t.buffer].data if 0 < t.buffer < len(m.buffers) else None
        dtype = type_name(t.type)
        shape = [int(d) for d in (t.shape if t.shape is not None else [])]
        if data is None or not len(data) or len(shape) < 2 or dtype not in out:
            continue
        out[dtype].append({"name": tensor_name(t), "shape": shape, "elements": int(np.prod(shape))})
    n_int8, n_float = (sum(w["elements"] for w in out[k]) for k in ("int8", "float32"))
    if not out["int8"]:
        largest = max((w["elements"] for w in out["float32"]), default=0)
        raise BadInputError(f"tflite:dynamic_int8: the TFLite converter quantized none of the model's {len(out['float32'])} weight "
                            f"tensors (the largest has {largest:,} elements): it leaves weight tensors under {DYNAMIC_MIN_ELEMENTS:,} "
                            "elements float32, so the file would be the FP32 model",
                            "use tflite:fp32 (the same model) or tflite:int8 (full integer)")
    return {**out, "int8_elements": n_int8, "float32_elements": n_float,
            "note": f"the TFLite converter quantizes weight tensors of >= {DYNAMIC_MIN_ELEMENTS:,} elements only; the rest stay float32"}


def _dynamic_precheck(graph: Any) -> str | None:
    """Refuse ``dynamic_int8`` from the graph alone when no weighted layer's weight reaches the converter's
    :data:`DYNAMIC_MIN_ELEMENTS` (the file would be the FP32 model; :func:`dynamic_weights` is the check on the file)."""
    from nilmc.quantization.graph import analyze

    m = type(graph)()
    m.CopyFrom(graph)
    g = analyze(m)
    sizes = [int(np.asarray(g.constants[layer.weight]).size) for layer in g.layers if layer.weight in g.constants]
    if not sizes or max(sizes) >= DYNAMIC_MIN_ELEMENTS:
        return None
    return (f"tflite:dynamic_int8: none of the model's {len(sizes)} weights has the {DYNAMIC_MIN_ELEMENTS:,} elements the TFLite "
            f"converter quantizes from (the largest has {max(sizes):,}): the file would be the FP32 model; use tflite:fp32 "
            "(the same model) or tflite:int8 (full integer)")


def dynamic_kind(weights: Mapping[str, Any]) -> str:
    """The artifact kind of a dynamic-range model: which share of its weights is int8 (never "int8 weights" for float ones)."""
    if not weights["float32"]:
        return "TFLite dynamic-range INT8 (int8 weights, float activations)"
    total = weights["int8_elements"] + weights["float32_elements"]
    return (f"TFLite dynamic-range INT8 (int8 weights in {len(weights['int8'])} of {len(weights['int8']) + len(weights['float32'])} "
            f"weight tensors, {weights['int8_elements']:,} of {total:,} weight elements; the rest float32; float activations)")


def _check_windows(model: Model, options: Mapping[str, Any]) -> tuple[np.ndarray, str]:
    """A few model-input windows for :func:`check_float_equivalence`: the calibration windows, else seeded random ones."""
    calib = options.get("calibration")
    if calib is not None:
        return model.contract.prepare(calib.raw_x()[:FLOAT_CHECK_WINDOWS]).astype(np.float32), "calibration windows"
    shape = model.contract.model_input_shape()
    x = np.random.default_rng(FLOAT_CHECK_SEED).standard_normal((FLOAT_CHECK_WINDOWS, *shape)).astype(np.float32)
    return x, f"random normal windows (seed {FLOAT_CHECK_SEED}; no calibration windows given)"


def check_float_equivalence(fb: bytes, model: Model, precision: str, windows: tuple[np.ndarray, str]) -> dict[str, Any]:
    """The float flatbuffer against the model's FP32 ONNX graph (onnxruntime) on ``windows``: the record, or
    :class:`BadInputError` when the output SQNR is under :data:`FLOAT_CHECK_MIN_SQNR_DB` (a conversion that does not
    compute the model must not pass as ``tflite:<precision>``)."""
    import onnxruntime as ort
    from ai_edge_litert.interpreter import Interpreter

    from nilmc.compiler.metrics import sqnr_db

    x, source = windows
    sess = ort.InferenceSession(model.graph.SerializeToString(), providers=["CPUExecutionProvider"])
    ref = np.asarray(sess.run(None, {sess.get_inputs()[0].name: x})[0], np.float64).reshape(len(x), -1)
    it = Interpreter(model_content=fb, num_threads=1)
    it.allocate_tensors()
    got = np.asarray(invoke_windows(it, _to_tensor(x, it.get_input_details()[0])), np.float64).reshape(len(x), -1)
    floor = FLOAT_CHECK_MIN_SQNR_DB[precision]
    if got.shape != ref.shape:
        raise BadInputError(f"the TFLite converter's {precision} model gives {got.shape[1]} outputs per window, the model "
                            f"{ref.shape[1]}", "lower it with onnxruntime:fp32 or openvino:fp32 (they run the ONNX graph)")
    db, diff = sqnr_db(ref.ravel(), got.ravel()), float(np.max(np.abs(got - ref)))
    record = {"reference": "the FP32 ONNX graph (onnxruntime)", "windows": int(len(x)), "on": source,
              "output_sqnr_db": round(db, 2) if np.isfinite(db) else db, "max_abs_diff": diff, "min_sqnr_db": floor,
              "verification": "measured"}
    if not db >= floor:
        raise BadInputError(f"tflite:{precision}: the TFLite converter's model is not equivalent to the model: {db:.1f} dB output SQNR "
                            f"vs the FP32 ONNX reference (max |diff| {diff:.3g}) on {len(x)} {source}, under the {floor:g} dB "
                            f"an {precision} conversion must reach", "lower it with onnxruntime:fp32 or openvino:fp32 (they run the "
                            "ONNX graph)")
    return record

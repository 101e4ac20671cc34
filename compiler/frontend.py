"""Load a trained model into nilmc's canonical form: an ONNX graph plus its contract.

Accepted inputs (:func:`load_model`):

* ``.onnx`` - used as is (validated with the ONNX checker and an onnxruntime session);
* ``.keras`` - written by Keras 3 or by Keras 2 (``tf_keras``), told apart by the
  ``keras_version`` in the archive's ``metadata.json``;
* ``.h5`` / ``.hdf5`` - a whole Keras model in HDF5 (Keras 2, or Keras 3's legacy format);
* a TensorFlow SavedModel directory (``tf.saved_model.save``, ``tf_keras`` ``model.save(dir)``,
  Keras 3 ``model.export(dir)``), through its ``serving_default`` signature.

TensorFlow / Keras models are converted with tf2onnx (opset 17, IR version 10) into
the canonical form every later stage may rely on:

* exactly one graph input named ``input`` and one output named ``output``, both with a
  symbolic batch dimension ``N``;
* Reshapes whose target shape tf2onnx left as a run-time ``Shape -> Gather -> Concat``
  computation (Keras 3's ``Flatten``) use a constant ``[-1, ...]`` shape instead;
* tf2onnx's process-global name counters (``Conv2D__6``) are renumbered from 1 in graph
  order and the constants it names after its own passes are named after their reader, so
  converting the same file twice, in any process, gives byte-identical ONNX;
* the converted graph is checked numerically against the TensorFlow model.

The contract (see :mod:`nilmc.compiler.contract`) comes from, first to last: the
``contract`` argument (the CLI's ``--contract FILE`` and contract flags), the model itself
(an ONNX graph's ``metadata_props`` key ``nilmc.contract``; a Keras file's contract, see
:func:`read_keras_contract`), a sidecar file ``<model path>.contract.json`` beside the model.
TensorFlow is imported only when a TensorFlow / Keras model is actually loaded.

A Keras model carries its contract as a JSON string (or object) under the key
``nilmc.contract`` (``KERAS_CONTRACT_KEY``) in, first to last: the model's config (the dict
``get_config()`` returns, i.e. ``config.json["config"]`` of a ``.keras`` archive or the
``model_config`` attribute of an ``.h5``; a subclassed model adds it in its ``get_config``),
the top level of that saved config, a ``.keras`` archive's ``metadata.json``, an ``.h5``
file's root attributes. :func:`embed_keras_contract` writes it into a saved file.
"""
from __future__ import annotations

import json
import re
import zipfile
from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from nilmc.compiler.contract import CONTRACT_KEY, ModelContract, load_contract_file
from nilmc.compiler.errors import BadInputError, InternalError, ModelLoadError, NilmcError, ShapeMismatchError
from nilmc.compiler.model import ONNX_IR_VERSION, ONNX_OPSET, Model
from nilmc.quantization.conv_bias import fold_conv_batchnorm, fold_squeezed_conv_bias
from nilmc.quantization.graph import prune_dead

SIDECAR_SUFFIX = ".contract.json"
INPUT_NAME = "input"
OUTPUT_NAME = "output"
BATCH_DIM = "N"

ONNX_SUFFIXES = (".onnx",)
KERAS_SUFFIXES = (".keras",)
H5_SUFFIXES = (".h5", ".hdf5")
_ACCEPTED = ".onnx, .keras, .h5 / .hdf5 or a TensorFlow SavedModel directory"

_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_ZIP_MAGIC = b"PK\x03\x04"

# Conversion check: max |onnx - tf| <= _ATOL + _RTOL * max |tf| on a random batch.
_CHECK_BATCH = 4
_CHECK_SEED = 0
_ATOL = 1e-4
_RTOL = 1e-4
# Quantized (QAT, FakeQuant -> QDQ) graphs: TF and onnxruntime land on neighbouring
# quantization levels for some samples (measured: up to 2 output steps on a 5-conv QAT
# seq2point), so those get this many output quantization steps on top.
_QDQ_STEPS = 4

_TF2ONNX_COUNTER = re.compile(r"__\d+")


class SourceKind(str, Enum):
    """What kind of file a model path holds."""

    ONNX = "onnx"
    KERAS3 = "keras3"  # .keras or .h5 written by Keras 3
    TF_KERAS = "tf_keras"  # .keras or .h5 written by Keras 2 (tf_keras)
    SAVED_MODEL = "saved_model"


# --------------------------------------------------------------------------- public API


def load_model(path: str | Path, *, contract: ModelContract | None = None) -> Model:
    """Load ``path`` (.onnx, .keras, .h5, SavedModel directory) as a canonical :class:`Model`.

    ``contract`` (default None) overrides any contract found with the model; without it
    the contract comes from the ONNX metadata, then from ``<path>.contract.json``.
    Raises :class:`ModelLoadError` for a missing, malformed, truncated or unknown file,
    :class:`BadInputError` when no contract can be found, and :class:`ShapeMismatchError`
    when the contract's ``input_shape`` disagrees with the graph's input.
    """
    path = Path(path)
    kind = detect_kind(path)
    if kind is SourceKind.ONNX:
        return _load_onnx_model(path, contract)
    if kind is SourceKind.SAVED_MODEL:
        return _load_saved_model(path, contract)
    return _load_keras_file(path, kind, contract)


def keras_to_onnx(
    keras_model: Any,
    contract: ModelContract,
    *,
    source: str = "",
    keras_path: str | Path | None = None,
) -> Model:
    """Convert an in-memory Keras model (tf_keras or Keras 3) to a canonical :class:`Model`.

    ``source`` (default: the model's name) is used in messages; ``keras_path``
    (default None) is recorded on the Model for the TFLite / QAT back ends.
    The converted graph is checked numerically against ``keras_model``.
    """
    tf = _tf("converting a Keras model to ONNX")
    source = source or f"Keras model {getattr(keras_model, 'name', '?')!r}"
    input_shape = _merge_shapes(_keras_input_shape(keras_model, source), contract, source)
    keras_model, contract = _strip_keras_stages(keras_model, contract)
    spec = tf.TensorSpec((None, *input_shape), tf.float32, name=INPUT_NAME)
    function = tf.function(lambda x: keras_model(x, training=False), input_signature=[spec])
    graph = _convert_tf_function(function, spec, input_shape, source)
    graph, contract = _strip_io_stages(graph, _with_io_names(contract))
    return Model(
        graph=graph,
        contract=contract,
        source=source,
        keras_path=None if keras_path is None else str(keras_path),
    )


def sidecar_path(path: str | Path) -> Path:
    """The sidecar contract file of a model: ``model.keras`` -> ``model.keras.contract.json``."""
    path = Path(path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


def save_contract_sidecar(path: str | Path, contract: ModelContract) -> Path:
    """Write ``contract`` beside the model at ``path`` (atomically); return the sidecar path."""
    from nilmc.compiler.io import atomic_write_json

    return atomic_write_json(sidecar_path(path), contract.to_json())


def read_contract_sidecar(path: str | Path) -> ModelContract | None:
    """The contract in ``<path>.contract.json``, or None when there is no such file.

    Raises :class:`BadInputError` (naming the file) when it exists but is malformed.
    """
    side = sidecar_path(path)
    if not side.is_file():
        return None
    return load_contract_file(side)


def detect_kind(path: str | Path) -> SourceKind:
    """Tell what ``path`` holds, from its suffix and its first bytes (no TensorFlow needed).

    Raises :class:`ModelLoadError` for a missing path, a directory that is not a
    SavedModel, an unknown suffix, or content that does not match the suffix.
    """
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"model {str(path)!r} does not exist", f"check the path; nilmc reads {_ACCEPTED}")
    if path.is_dir():
        return _check_saved_model_dir(path)
    suffix = path.suffix.lower()
    magic = _read_magic(path)
    if suffix in ONNX_SUFFIXES:
        _refuse_foreign(path, magic, expected="an ONNX protobuf")
        return SourceKind.ONNX
    if suffix in KERAS_SUFFIXES:
        if not magic.startswith(_ZIP_MAGIC):
            _refuse_foreign(path, magic, expected="a .keras zip archive")
            raise ModelLoadError(f"{str(path)!r} is not a .keras zip archive (truncated or malformed)", "save the model again with model.save('model.keras')")
        return _keras_zip_flavor(path)
    if suffix in H5_SUFFIXES:
        if not magic.startswith(_HDF5_MAGIC):
            _refuse_foreign(path, magic, expected="an HDF5 file")
            raise ModelLoadError(f"{str(path)!r} is not an HDF5 file (truncated or malformed)", "save the model again with model.save('model.h5')")
        return _keras_h5_flavor(path)
    if path.name == "saved_model.pb":
        raise ModelLoadError(f"{str(path)!r} is one file of a SavedModel", f"pass its directory {str(path.parent)!r} instead")
    raise ModelLoadError(f"{str(path)!r} has an unknown model suffix {path.suffix or '(none)'!r}", f"nilmc reads {_ACCEPTED}")


# --------------------------------------------------------------------------- kinds of file


def _read_magic(path: Path) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(8)
    except OSError as exc:
        raise ModelLoadError(f"cannot read model {str(path)!r} ({exc.strerror})", "check the file's permissions") from None


def _refuse_foreign(path: Path, magic: bytes, *, expected: str) -> None:
    """Raise when the file is recognisably another kind of model file than its suffix says."""
    if magic.startswith(_HDF5_MAGIC) and expected != "an HDF5 file":
        raise ModelLoadError(f"{str(path)!r} is an HDF5 file, not {expected}", "rename it to .h5 if it is a Keras model")
    if magic.startswith(_ZIP_MAGIC) and expected != "a .keras zip archive":
        raise ModelLoadError(f"{str(path)!r} is a zip archive, not {expected}", "rename it to .keras if it is a Keras model")
    if len(magic) == 0:
        raise ModelLoadError(f"model {str(path)!r} is empty", "write the model again")


def _check_saved_model_dir(path: Path) -> SourceKind:
    if (path / "saved_model.pb").is_file() or (path / "saved_model.pbtxt").is_file():
        return SourceKind.SAVED_MODEL
    raise ModelLoadError(
        f"{str(path)!r} is a directory but not a TensorFlow SavedModel (no saved_model.pb)",
        f"pass a model file or a SavedModel directory; nilmc reads {_ACCEPTED}",
    )


def _keras_zip_flavor(path: Path) -> SourceKind:
    try:
        with zipfile.ZipFile(path) as zf:
            meta = json.loads(zf.read("metadata.json"))
            zf.getinfo("config.json")
    except (zipfile.BadZipFile, KeyError, ValueError, OSError, EOFError) as exc:
        raise ModelLoadError(f"{str(path)!r} is not a readable .keras archive ({_short(exc)})", "save the model again with model.save('model.keras')") from None
    return _flavor_from_version(str(meta.get("keras_version", "")) if isinstance(meta, dict) else "")


def _keras_h5_flavor(path: Path) -> SourceKind:
    from nilmc.compiler.tfcompat import import_h5py

    h5py = import_h5py()
    try:
        with h5py.File(path, "r") as fh:
            has_config = "model_config" in fh.attrs
            version = fh.attrs.get("keras_version", b"")
    except Exception as exc:  # h5py raises OSError, KeyError, RuntimeError... for bad files
        raise ModelLoadError(f"{str(path)!r} is not a readable HDF5 file ({_short(exc)})", "save the model again with model.save('model.h5')") from None
    if not has_config:
        raise ModelLoadError(f"{str(path)!r} holds no model config (weights only?)", "save the whole model with model.save(), not save_weights()")
    if isinstance(version, bytes):
        version = version.decode("utf-8", "replace")
    return _flavor_from_version(str(version))


def _flavor_from_version(version: str) -> SourceKind:
    # Keras 3 writes "3.x"; tf_keras writes its own version ("2.x").
    return SourceKind.KERAS3 if version.startswith("3") else SourceKind.TF_KERAS


# --------------------------------------------------------------------------- ONNX files


def _load_onnx_model(path: Path, contract: ModelContract | None) -> Model:
    proto = _read_onnx(path)
    _check_onnx(proto, path)
    _single_io(proto, str(path))
    embedded = _embedded_contract(proto, path)
    found = _resolve_contract(path, contract, embedded)
    _rename_io(proto)
    fold_squeezed_conv_bias(proto)  # as for converted models: a tf2onnx Conv1D's bias and ReLU back onto its Conv (exact)
    fold_conv_batchnorm(proto)  # a PyTorch export's Conv -> BatchNormalization into the Conv's weights (exact, checked)
    _check_graph_shape(_graph_input_shape(proto), found, str(path))
    _close_open_input_dims(proto, found)
    proto, found = _strip_io_stages(proto, _with_io_names(found))
    return Model(graph=proto, contract=found, source=str(path))


def _close_open_input_dims(proto: onnx.ModelProto, contract: ModelContract) -> None:
    """Write the contract's window into the graph input's open (symbolic) non-batch dimensions, in place, and into
    every dimension of the graph that names the same symbol: a model exported with a dynamic time axis, compiled with
    --window T, is the model at T (onnx2tf and the DPU lowering need static shapes: fuzzed, tflite:int8 and dpu:b2304
    failed on a (N, 1, 'T') Conv1d export at --window 64 and passed on the same export at a fixed 64)."""
    dims = _graph_inputs(proto.graph)[0].type.tensor_type.shape.dim
    want = contract.model_input_shape()
    if len(dims) != len(want) + 1:
        return
    symbols: dict[str, int] = {}
    for d, w in zip(list(dims)[1:], want):
        if not (d.HasField("dim_value") and d.dim_value > 0):
            if d.HasField("dim_param") and d.dim_param:
                symbols[d.dim_param] = int(w)
            d.dim_value = int(w)
    if not symbols:
        return
    for vi in (*proto.graph.input, *proto.graph.output, *proto.graph.value_info):
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_param") and d.dim_param in symbols:
                d.dim_value = symbols[d.dim_param]


def _read_onnx(path: Path) -> onnx.ModelProto:
    try:
        proto = onnx.load(str(path))
    except Exception as exc:  # protobuf DecodeError, missing external data, ...
        raise ModelLoadError(f"{str(path)!r} is not a readable ONNX model ({_short(exc)})",
                             "export it again; the file may be truncated or of another kind") from None
    if not proto.HasField("graph") or len(proto.graph.node) == 0 or len(proto.opset_import) == 0:
        raise ModelLoadError(f"{str(path)!r} is not a complete ONNX model (no graph, nodes or opset)",
                             "export it again; the file may be truncated or of another kind")
    return proto


def _check_onnx(proto: onnx.ModelProto, path: Path) -> None:
    """ONNX checker, then an onnxruntime session: a model that loads here also runs."""
    import onnxruntime as ort

    proto.ir_version = min(proto.ir_version or ONNX_IR_VERSION, ONNX_IR_VERSION)
    try:
        onnx.checker.check_model(proto)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.intra_op_num_threads = 1
        ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnx.checker.ValidationError, onnxruntime's Fail/InvalidGraph...
        raise ModelLoadError(f"{str(path)!r} is not a valid ONNX model ({_short(exc)})",
                             "export it again with opset <= 21 and a supported IR version") from None


def _embedded_contract(proto: onnx.ModelProto, path: Path) -> ModelContract | None:
    for prop in proto.metadata_props:
        if prop.key == CONTRACT_KEY:
            try:
                return ModelContract.loads(prop.value)
            except NilmcError as exc:
                raise BadInputError(f"the contract stored in {str(path)!r} is unusable: {exc.message}",
                                    "pass a contract file instead (--contract FILE)") from None
    return None


# --------------------------------------------------------------------------- TensorFlow sources


def _tf(purpose: str) -> Any:
    from nilmc.compiler.tfcompat import import_tf

    return import_tf(purpose)


def _load_keras_file(path: Path, kind: SourceKind, contract: ModelContract | None) -> Model:
    from nilmc.compiler.tfcompat import read_keras

    keras_model = read_keras(path, kind)
    found = _resolve_contract(path, contract, None)
    return keras_to_onnx(keras_model, found, source=str(path), keras_path=path)


def _load_saved_model(path: Path, contract: ModelContract | None) -> Model:
    tf = _tf(f"loading the SavedModel {path.name}")
    try:
        loaded = tf.saved_model.load(str(path))
    except Exception as exc:  # tf.errors.*, ValueError, OSError...
        raise ModelLoadError(f"TensorFlow cannot load the SavedModel {str(path)!r} ({_short(exc)})",
                             "save it again with tf.saved_model.save or model.export") from None
    signature = _serving_signature(loaded, path)
    arg_name, arg_spec, out_key = _signature_io(signature, path)
    found = _resolve_contract(path, contract, None)
    model_shape = None if arg_spec.shape.rank is None else tuple(arg_spec.shape)[1:]
    input_shape = _merge_shapes(model_shape, found, str(path))
    spec = tf.TensorSpec((None, *input_shape), tf.float32, name=INPUT_NAME)
    function = tf.function(lambda x: signature(**{arg_name: x})[out_key], input_signature=[spec])
    graph = _convert_tf_function(function, spec, input_shape, str(path))
    # A tf_keras SavedModel (keras_metadata.pb) reloads as a Keras model: TFLite / QAT can use it.
    keras_path = str(path) if (path / "keras_metadata.pb").is_file() else None
    return Model(graph=graph, contract=_with_io_names(found), source=str(path), keras_path=keras_path)


def _serving_signature(loaded: Any, path: Path) -> Any:
    signatures = dict(getattr(loaded, "signatures", {}) or {})
    if "serving_default" in signatures:
        return signatures["serving_default"]
    if len(signatures) == 1:
        return next(iter(signatures.values()))
    raise ModelLoadError(
        f"the SavedModel {str(path)!r} has no 'serving_default' signature (has: {sorted(signatures) or 'none'})",
        "save it with a serving signature (tf_keras model.save(dir) or Keras 3 model.export(dir))",
    )


def _signature_io(signature: Any, path: Path) -> tuple[str, Any, str]:
    """The signature's single input (name, spec) and single output key."""
    args, kwargs = signature.structured_input_signature
    outputs = signature.structured_outputs
    if args or len(kwargs) != 1 or not isinstance(outputs, dict) or len(outputs) != 1:
        raise ModelLoadError(
            f"the SavedModel {str(path)!r} must have one input and one output "
            f"(inputs {sorted(kwargs)}, outputs {sorted(outputs) if isinstance(outputs, dict) else outputs})",
            "export a single-input, single-output seq2point model",
        )
    (arg_name, arg_spec), = kwargs.items()
    if arg_spec.dtype.name != "float32":
        raise ModelLoadError(f"the SavedModel {str(path)!r} takes {arg_spec.dtype.name} input", "export the model with a float32 input")
    return arg_name, arg_spec, next(iter(outputs))


def _keras_input_shape(keras_model: Any, source: str) -> tuple[int | None, ...] | None:
    """The model's input shape without batch, or None when the model does not declare one."""
    try:
        inputs = list(keras_model.inputs or [])
    except (AttributeError, ValueError):
        return None  # subclassed / unbuilt model: the contract gives the shape
    if not inputs:
        return None
    if len(inputs) != 1:
        raise ModelLoadError(f"{source} has {len(inputs)} inputs", "nilmc compiles single-input seq2point models")
    dtype = getattr(inputs[0], "dtype", "float32")
    if getattr(dtype, "name", str(dtype)) != "float32":
        raise ModelLoadError(f"{source} takes {getattr(dtype, 'name', dtype)} input", "build the model with a float32 input")
    return tuple(None if d is None else int(d) for d in tuple(inputs[0].shape)[1:])


# --------------------------------------------------------------------------- conversion


def _convert_tf_function(function: Any, spec: Any, input_shape: tuple[int, ...], source: str) -> onnx.ModelProto:
    from nilmc.compiler.tfcompat import import_tf2onnx

    tf2onnx = import_tf2onnx()
    try:
        proto, _ = tf2onnx.convert.from_function(function, input_signature=[spec], opset=ONNX_OPSET)
    except NilmcError:
        raise
    except Exception as exc:  # tf2onnx raises ValueError, KeyError, RuntimeError...
        raise ModelLoadError(f"tf2onnx cannot convert {source} ({_short(exc)})", "export the model to ONNX yourself (opset 17) and load the .onnx") from None
    inputs = [i.name for i in _graph_inputs(proto.graph)]
    captured = [n for n in inputs if n != spec.name]
    if len(inputs) > 1 and captured:  # the function takes one input: the others are tensors it captures that tf2onnx did not freeze
        raise ModelLoadError(f"tf2onnx turned {len(captured)} tensor(s) {source} captures into graph inputs ({', '.join(captured[:3])}): "
                             "a Keras Normalization layer's mean/variance do so unless it is the model's first layer",
                             "make the Normalization the first layer (nilmc then takes it out as the float input stage), "
                             "or export the model to ONNX yourself (opset 17) and load the .onnx")
    _single_io(proto, source)
    proto = canonicalize_converted(proto)
    _check_conversion(proto, function, input_shape, source)
    return proto


def canonicalize_converted(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Bring a tf2onnx graph into nilmc's canonical form (see the module docstring).

    Returns a new ModelProto with I/O ``input``/``output``, symbolic batch ``N``,
    constant Flatten reshapes, deterministic names, IR version 10.
    """
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    _rename_io(out)
    _symbolic_batch(out)
    _fold_dynamic_reshapes(out)
    fold_squeezed_conv_bias(out)  # Conv1D's Squeeze -> bias Add -> Relu back onto the Conv (exact; see quantization/conv_bias.py)
    fold_conv_batchnorm(out)  # a BatchNormalization tf2onnx left after a Conv/Gemm, into its weights (exact, checked)
    prune_dead(out.graph)
    _renumber_name_counters(out.graph)
    _drop_unused_opsets(out)
    out.ir_version = ONNX_IR_VERSION
    # tf2onnx writes "converted from __inference_<lambda>_355": a TF-global counter again.
    out.graph.doc_string = "converted from TensorFlow by nilmc with tf2onnx"
    return out


def _check_conversion(proto: onnx.ModelProto, function: Any, input_shape: tuple[int, ...], source: str) -> None:
    """Compare onnxruntime with TensorFlow on a seeded standard-normal batch."""
    x = np.random.default_rng(_CHECK_SEED).standard_normal((_CHECK_BATCH, *input_shape)).astype(np.float32)
    reference = np.asarray(function(x)).astype(np.float64)
    got = _run_onnx(proto, x, source).astype(np.float64)
    if got.shape != reference.shape:
        raise ModelLoadError(f"the ONNX graph converted from {source} returns shape {got.shape}, TensorFlow {reference.shape}",
                             "export the model to ONNX yourself and load the .onnx")
    diff = float(np.max(np.abs(got - reference))) if got.size else 0.0
    tolerance = _ATOL + _RTOL * float(np.max(np.abs(reference), initial=0.0)) + _QDQ_STEPS * _output_quant_step(proto)
    if not diff <= tolerance:  # also catches NaN
        raise ModelLoadError(
            f"the ONNX graph converted from {source} differs from TensorFlow by {diff:.3g} (max abs; tolerance {tolerance:.3g})",
            "the model uses an op tf2onnx converts wrongly; export it to ONNX yourself and load the .onnx",
        )


def _output_quant_step(proto: onnx.ModelProto) -> float:
    """The quantization step of the graph output: the scale of the DequantizeLinear that
    produces it, else the largest scalar DequantizeLinear scale; 0 for float graphs."""
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    scales: dict[str, float] = {}
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and len(node.input) > 1 and node.input[1] in inits:
            scale = numpy_helper.to_array(inits[node.input[1]])
            if scale.size == 1:
                scales[node.output[0]] = float(np.abs(scale).reshape(-1)[0])
    if not scales:
        return 0.0
    return scales.get(OUTPUT_NAME, max(scales.values()))


def _run_onnx(proto: onnx.ModelProto, x: np.ndarray, source: str) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    try:
        sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        return np.asarray(sess.run([OUTPUT_NAME], {INPUT_NAME: x})[0])
    except Exception as exc:  # onnxruntime errors
        raise ModelLoadError(f"onnxruntime cannot run the graph converted from {source} ({_short(exc)})",
                             "export the model to ONNX yourself and load the .onnx") from None


# --------------------------------------------------------------------------- graph edits


def _graph_inputs(graph: onnx.GraphProto) -> list[onnx.ValueInfoProto]:
    initializers = {t.name for t in graph.initializer}
    return [i for i in graph.input if i.name not in initializers]


def _single_io(proto: onnx.ModelProto, source: str) -> None:
    n_in, n_out = len(_graph_inputs(proto.graph)), len(proto.graph.output)
    if n_in != 1 or n_out != 1:
        raise ModelLoadError(f"{source} has {n_in} inputs and {n_out} outputs", single_io_remedy(proto))


def single_io_remedy(proto: onnx.ModelProto) -> str:
    """What to do with a graph of several inputs or outputs: nilmc compiles one input and one output tensor; a model
    with several heads (power and ON/OFF state, say) is cut to the one to deploy with ONNX's own extractor."""
    ins, outs = [i.name for i in _graph_inputs(proto.graph)], [o.name for o in proto.graph.output]
    if len(ins) == 1 and len(outs) > 1:
        return (f"nilmc compiles one input and one output tensor: keep the output to deploy ({', '.join(map(repr, outs[:4]))}), e.g. "
                f"python -c \"import onnx.utils; onnx.utils.extract_model('in.onnx', 'out.onnx', [{ins[0]!r}], [{outs[0]!r}])\", "
                "or export the model with that head alone")
    return "nilmc compiles models with one input and one output tensor; export the model with one input (the window) and one output"


def _rename_io(proto: onnx.ModelProto) -> None:
    graph = proto.graph
    _rename_tensor(graph, _graph_inputs(graph)[0].name, INPUT_NAME)
    _rename_tensor(graph, graph.output[0].name, OUTPUT_NAME)


def _tensor_names(graph: onnx.GraphProto) -> set[str]:
    names = {v.name for v in graph.input} | {v.name for v in graph.output} | {t.name for t in graph.initializer}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
    return names


def _rename_tensor(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Rename tensor ``old`` to ``new`` everywhere; move an unrelated ``new`` out of the way first."""
    if old == new:
        return
    if new in _tensor_names(graph):
        _rename_tensor(graph, new, _fresh_name(graph, f"{new}_renamed"))
    mapping = {old: new}
    _apply_tensor_mapping(graph, mapping)


def _fresh_name(graph: onnx.GraphProto, base: str) -> str:
    names, k, name = _tensor_names(graph), 0, base
    while name in names:
        k += 1
        name = f"{base}_{k}"
    return name


def _apply_tensor_mapping(graph: onnx.GraphProto, mapping: dict[str, str]) -> None:
    for node in graph.node:
        _rename_node_tensors(node, mapping)
    for value in [*graph.input, *graph.output, *graph.value_info, *graph.initializer]:
        value.name = mapping.get(value.name, value.name)


def _rename_node_tensors(node: onnx.NodeProto, mapping: dict[str, str]) -> None:
    for i, name in enumerate(node.input):
        node.input[i] = mapping.get(name, name)
    for i, name in enumerate(node.output):
        node.output[i] = mapping.get(name, name)
    # Control-flow bodies (If/Loop/Scan) may read outer-scope tensors by name.
    for attr in node.attribute:
        for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
            for inner in sub.node:
                _rename_node_tensors(inner, mapping)


def _symbolic_batch(proto: onnx.ModelProto) -> None:
    for value in [*_graph_inputs(proto.graph), *proto.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if len(dims):
            dims[0].Clear()
            dims[0].dim_param = BATCH_DIM
    # tf2onnx's own "unk__NN" symbols are counter-numbered: drop the inferred shapes that carry them.
    del proto.graph.value_info[:]


def _static_shapes(proto: onnx.ModelProto) -> dict[str, tuple[int | None, ...]]:
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception:  # shape inference is an optimisation here, never a reason to fail
        return {}
    shapes: dict[str, tuple[int | None, ...]] = {}
    for value in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        if value.type.tensor_type.HasField("shape"):
            shapes[value.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim)
    return shapes


def _fold_dynamic_reshapes(proto: onnx.ModelProto) -> None:
    """Give Reshapes with a run-time target shape a constant ``[-1, d1, ...]`` shape.

    Safe only when the per-sample element counts of input and output are static and
    equal, so the ``-1`` can only be the batch dimension.
    """
    graph = proto.graph
    constants = {t.name for t in graph.initializer}
    shapes = _static_shapes(proto)
    for node in graph.node:
        if node.op_type != "Reshape" or len(node.input) < 2 or node.input[1] in constants:
            continue
        src, dst = shapes.get(node.input[0]), shapes.get(node.output[0])
        if not src or not dst or None in src[1:] or None in dst[1:]:
            continue
        if int(np.prod([d for d in src[1:] if d is not None])) != int(np.prod([d for d in dst[1:] if d is not None])):
            continue
        name = _fresh_name(graph, f"{node.name}/const_shape")
        graph.initializer.append(numpy_helper.from_array(np.array([-1, *dst[1:]], np.int64), name))
        node.input[1] = name
        constants.add(name)


def _renumber_name_counters(graph: onnx.GraphProto) -> None:
    """Give tf2onnx's invented names a form that does not depend on its process state.

    tf2onnx numbers the names it invents (``Conv2D__6``) with a counter shared by every
    conversion in the process, and names some constants after the optimizer pass that
    made them, which varies with the interpreter's hash seed (the same Unsqueeze axes came
    out as ``const_fold_opt__5__6`` or ``axes_const__5__6__7``). So: node names and node
    outputs have their counters renumbered from 1 in order of first appearance (node
    order); an initializer with a counter in its name is renamed after its first reader,
    ``<node name>/in<k>``; names without a counter are kept; initializers are sorted by
    name so their order cannot depend on the old names either.
    """
    numbers: dict[str, str] = {}
    initializers = {t.name for t in graph.initializer}

    def visit(name: str) -> None:
        for match in _TF2ONNX_COUNTER.finditer(name):
            numbers.setdefault(match.group(0), f"__{len(numbers) + 1}")

    for node in graph.node:
        for name in [*(i for i in node.input if i not in initializers), node.name, *node.output]:
            visit(name)

    def renamed(name: str) -> str:
        return _TF2ONNX_COUNTER.sub(lambda m: numbers[m.group(0)], name)

    names = _tensor_names(graph)
    mapping = {n: renamed(n) for n in names if _TF2ONNX_COUNTER.search(n) and n not in initializers}
    for node in graph.node:
        node.name = renamed(node.name)
        for k, name in enumerate(node.input):
            if name in initializers and _TF2ONNX_COUNTER.search(name) and name not in mapping:
                mapping[name] = f"{node.name}/in{k}"
    unnamed = [t.name for t in graph.initializer if _TF2ONNX_COUNTER.search(t.name) and t.name not in mapping]
    for k, name in enumerate(sorted(unnamed)):  # read by no node (pruned graphs have none): kept apart, deterministically
        mapping[name] = f"unused_initializer_{k}"
    if len(set(mapping.values()) | (names - set(mapping))) != len(names):
        raise InternalError(f"renaming tf2onnx names made two tensors share a name ({sorted(mapping.items())[:5]}...)")
    _apply_tensor_mapping(graph, mapping)
    ordered = sorted(graph.initializer, key=lambda t: t.name)
    del graph.initializer[:]
    graph.initializer.extend(ordered)


def _drop_unused_opsets(proto: onnx.ModelProto) -> None:
    used = {n.domain for n in proto.graph.node} | {""}
    keep = [o for o in proto.opset_import if o.domain in used or (o.domain == "ai.onnx")]
    del proto.opset_import[:]
    proto.opset_import.extend(keep)


# --------------------------------------------------------------------------- contract & shapes

KERAS_CONTRACT_KEY = CONTRACT_KEY


def _resolve_contract(path: Path, explicit: ModelContract | None, embedded: ModelContract | None) -> ModelContract:
    if explicit is not None:
        return explicit
    if embedded is None and path.suffix.lower() in KERAS_SUFFIXES + H5_SUFFIXES:
        embedded = read_keras_contract(path)
    if embedded is not None:
        return embedded
    side = read_contract_sidecar(path)
    if side is not None:
        return side
    raise BadInputError(
        f"no model contract found for {str(path)!r} (not in the model, no {sidecar_path(path).name} beside it)",
        f"write one with `nilmc contract init {path.name} --out {sidecar_path(path).name}` (edit it; nilmc reads "
        f"{str(sidecar_path(path))!r} by itself) and pass --contract FILE, or give the contract flags (--input-norm, --appliance, ...)",
    )


def find_contract(path: str | Path) -> ModelContract | None:
    """The contract that comes with the model at ``path`` (embedded, Keras config, sidecar), or None.

    Reads no TensorFlow; raises :class:`BadInputError` when a contract is there but unusable.
    """
    path = Path(path)
    kind = detect_kind(path)
    embedded = None
    if kind is SourceKind.ONNX:
        embedded = _embedded_contract(_read_onnx(path), path)
    elif kind is not SourceKind.SAVED_MODEL:
        embedded = read_keras_contract(path)
    return embedded if embedded is not None else read_contract_sidecar(path)


def read_keras_contract(path: str | Path) -> ModelContract | None:
    """The contract a ``.keras`` / ``.h5`` file carries under ``nilmc.contract`` (module doc), or None.

    No TensorFlow needed. Raises :class:`BadInputError` (naming the file) when the value is malformed.
    """
    path = Path(path)
    try:
        found = _keras_contract_value(path)
    except (zipfile.BadZipFile, OSError, ValueError, KeyError, EOFError):
        return None  # an unreadable file is reported by the loader, with its own message
    if found is None:
        return None
    where, value = found
    text = value if isinstance(value, str) else json.dumps(value)
    try:
        return ModelContract.loads(text)
    except NilmcError as exc:
        raise BadInputError(f"the contract stored in {str(path)!r} ({where}) is unusable: {exc.message}",
                            "fix it, or pass a contract file (--contract FILE)") from None


def _keras_contract_value(path: Path) -> tuple[str, Any] | None:
    if path.suffix.lower() in KERAS_SUFFIXES:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            config = json.loads(zf.read("config.json")) if "config.json" in names else {}
            meta = json.loads(zf.read("metadata.json")) if "metadata.json" in names else {}
        return _contract_in_config(config) or _contract_in(meta, "metadata.json")
    from nilmc.compiler.tfcompat import import_h5py

    h5py = import_h5py()
    with h5py.File(path, "r") as fh:
        raw = fh.attrs.get("model_config")
        attr = fh.attrs.get(KERAS_CONTRACT_KEY)
    raw = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    config = json.loads(raw) if isinstance(raw, str) else {}
    if isinstance(attr, bytes):
        attr = attr.decode("utf-8", "replace")
    return _contract_in_config(config) or (("the root attribute", attr) if attr is not None else None)


def _contract_in_config(config: Any) -> tuple[str, Any] | None:
    inner = config.get("config") if isinstance(config, dict) else None
    return _contract_in(inner, "the model config") or _contract_in(config, "the saved config")


def _contract_in(d: Any, where: str) -> tuple[str, Any] | None:
    if isinstance(d, dict) and d.get(KERAS_CONTRACT_KEY) is not None:
        return where, d[KERAS_CONTRACT_KEY]
    return None


def embed_keras_contract(path: str | Path, contract: ModelContract) -> Path:
    """Store ``contract`` inside a saved ``.keras`` (its ``metadata.json``) or ``.h5`` (a root attribute).

    The file is rewritten atomically; Keras ignores the extra key when loading. Returns ``path``.
    """
    from nilmc.compiler.io import atomic_write_bytes

    path = Path(path)
    if path.suffix.lower() in H5_SUFFIXES:
        from nilmc.compiler.tfcompat import import_h5py

        with import_h5py().File(path, "a") as fh:
            fh.attrs[KERAS_CONTRACT_KEY] = contract.dumps()
        return path
    if path.suffix.lower() not in KERAS_SUFFIXES:
        raise BadInputError(f"{str(path)!r} is not a .keras or .h5 file", "embed contracts into Keras files; ONNX models carry them in metadata")
    import io

    buf = io.BytesIO()
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename == "metadata.json":
                meta = json.loads(data)
                meta[KERAS_CONTRACT_KEY] = contract.dumps()
                data = json.dumps(meta).encode("utf-8")
            dst.writestr(info, data)
    return atomic_write_bytes(path, buf.getvalue())


def _strip_io_stages(proto: onnx.ModelProto, contract: ModelContract) -> tuple[onnx.ModelProto, ModelContract]:
    """Normalization the graph carries at its input / output becomes the contract's float stage
    (:func:`nilmc.quantization.io_affine.strip_io_affine`; exact, or the graph is left as it is)."""
    from nilmc.quantization.io_affine import strip_io_affine

    proto, contract, _ = strip_io_affine(proto, contract)
    return proto, contract


def _strip_keras_stages(keras_model: Any, contract: ModelContract) -> tuple[Any, ModelContract]:
    """Leading Keras Normalization / Rescaling / BatchNormalization layers become the contract's float input stage
    (:func:`nilmc.quantization.io_affine.strip_keras_model_affine`; exact, or the model is left as it is)."""
    from nilmc.quantization.io_affine import strip_keras_model_affine

    keras_model, contract, _ = strip_keras_model_affine(keras_model, contract)
    return keras_model, contract


def _with_io_names(contract: ModelContract) -> ModelContract:
    if contract.input_name == INPUT_NAME and contract.output_name == OUTPUT_NAME:
        return contract
    return contract.with_(input_name=INPUT_NAME, output_name=OUTPUT_NAME)


def _graph_input_shape(proto: onnx.ModelProto) -> tuple[int | None, ...]:
    """The graph input's shape without batch; symbolic or unknown dimensions are None."""
    dims = _graph_inputs(proto.graph)[0].type.tensor_type.shape.dim
    return tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in list(dims)[1:])


def _check_graph_shape(graph_shape: tuple[int | None, ...], contract: ModelContract, source: str) -> None:
    _merge_shapes(graph_shape, contract, source)


def _merge_shapes(model_shape: Sequence[int | None] | None, contract: ModelContract, source: str) -> tuple[int, ...]:
    """The model's own input shape per the contract (canonical window in the contract's layout), checked against the model's."""
    want = contract.model_input_shape()
    if model_shape is None:
        return want
    model_shape = tuple(model_shape)
    agree = len(model_shape) == len(want) and all(m is None or m == w for m, w in zip(model_shape, want))
    if not agree:
        shown = tuple("?" if d is None else d for d in model_shape)
        raise ShapeMismatchError(
            f"the contract of {source} says input shape {want} but the model takes {shown} (without batch)",
            "pass the contract that belongs to this model or fix its input_shape",
        )
    return want


def _short(exc: BaseException, limit: int = 200) -> str:
    """A library exception as one short line: ``Type: first line``."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


__all__ = [
    "BATCH_DIM",
    "INPUT_NAME",
    "OUTPUT_NAME",
    "SIDECAR_SUFFIX",
    "SourceKind",
    "canonicalize_converted",
    "detect_kind",
    "embed_keras_contract",
    "find_contract",
    "keras_to_onnx",
    "load_model",
    "read_contract_sidecar",
    "read_keras_contract",
    "save_contract_sidecar",
    "sidecar_path",
]

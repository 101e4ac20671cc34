"""Front end: loading .onnx / .keras / .h5 / SavedModel into a canonical Model, and refusing bad input.

Tests without TensorFlow run always; TensorFlow ones carry ``slow`` and ``tf``.
"""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from nilmc.calibration_data.normalization import Normalization, NormalizationSpec, TargetScaling
from nilmc.compiler.contract import CONTRACT_KEY, ModelContract
from nilmc.compiler.errors import BadInputError, ModelLoadError, NilmcError, ShapeMismatchError
from nilmc.compiler.frontend import (
    BATCH_DIM,
    SourceKind,
    canonicalize_converted,
    detect_kind,
    load_model,
    read_contract_sidecar,
    save_contract_sidecar,
    sidecar_path,
)
from nilmc.compiler.model import Model

SHAPE = (10, 9, 1)


def make_contract(shape: tuple[int, ...] = SHAPE, appliance: str = "kettle") -> ModelContract:
    return ModelContract(
        input_shape=shape,
        normalization=NormalizationSpec(Normalization.A),
        appliance=appliance,
        target=TargetScaling(700.0, 1000.0),
        on_threshold_w=2000.0,
    )


def tiny_onnx(in_name: str = "x", out_name: str = "y", seed: int = 0) -> onnx.ModelProto:
    """Flatten -> MatMul -> Add, with non-canonical I/O names."""
    rng = np.random.default_rng(seed)
    k = int(np.prod(SHAPE))
    inits = [
        numpy_helper.from_array(np.array([-1, k], np.int64), "shape"),
        numpy_helper.from_array(rng.normal(size=(k, 1)).astype(np.float32), "w"),
        numpy_helper.from_array(np.array([0.5], np.float32), "b"),
    ]
    nodes = [
        helper.make_node("Reshape", [in_name, "shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w"], ["mm"]),
        helper.make_node("Add", ["mm", "b"], [out_name]),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info(in_name, TensorProto.FLOAT, ["batch", *SHAPE])],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, ["batch", 1])],
        inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 10
    return proto


def run(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(["output"], {"input": x})[0]


def batch(n: int = 3, shape: tuple[int, ...] = SHAPE, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, *shape)).astype(np.float32)


def reference(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    w = numpy_helper.to_array(next(t for t in proto.graph.initializer if t.name == "w"))
    return x.reshape(len(x), -1) @ w + 0.5


def assert_one_line_naming(err: NilmcError, path: Path | str) -> None:
    text = str(err)
    assert "\n" not in text
    assert str(path) in text
    assert err.remedy


# --------------------------------------------------------------------------- ONNX


def test_import_does_not_pull_tensorflow() -> None:
    code = ("import sys, nilmc.compiler.frontend, nilmc.compiler.metrics, nilmc.compiler.tfcompat; "
            "assert 'tensorflow' not in sys.modules and 'tf2onnx' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_tensorflow_is_a_typed_error() -> None:
    from nilmc.compiler import tfcompat
    from nilmc.compiler.errors import MissingDependencyError

    with pytest.raises(MissingDependencyError) as err:
        tfcompat._import("no_such_package_nilmc", "no_such_package_nilmc", "loading a Keras model")
    assert "pip install 'nilmc[tf]'" in str(err.value) and "loading a Keras model" in str(err.value)


@pytest.mark.slow
@pytest.mark.tf
def test_import_tf_gives_keras2_and_is_quiet() -> None:
    pytest.importorskip("tensorflow")
    code = (
        "from nilmc.compiler.tfcompat import import_tf, legacy_keras_active; tf = import_tf(); "
        "assert tf.keras.__name__.startswith('tf_keras'), tf.keras.__name__; assert legacy_keras_active()"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TF_USE_LEGACY_KERAS", "TF_CPP_MIN_LOG_LEVEL")}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""


def test_onnx_with_embedded_contract(tmp_path: Path) -> None:
    proto, contract = tiny_onnx(), make_contract()
    path = Model(proto, contract).save_onnx(tmp_path / "m.onnx")
    model = load_model(path)
    assert model.contract == contract
    assert (model.input_name, model.output_name) == ("input", "output")
    assert model.source == str(path) and model.keras_path is None
    x = batch()
    np.testing.assert_allclose(run(model.graph, x), reference(proto, x), rtol=1e-5, atol=1e-5)
    again = onnx.load_from_string(model.serialize())
    assert any(p.key == CONTRACT_KEY for p in again.metadata_props)


def test_onnx_with_sidecar(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(tiny_onnx(), str(path))
    contract = make_contract(appliance="fridge")
    side = save_contract_sidecar(path, contract)
    assert side == tmp_path / "m.onnx.contract.json" == sidecar_path(path)
    assert read_contract_sidecar(path) == contract
    model = load_model(path)
    assert model.contract.appliance == "fridge"


def test_explicit_contract_wins(tmp_path: Path) -> None:
    path = Model(tiny_onnx(), make_contract(appliance="kettle")).save_onnx(tmp_path / "m.onnx")
    save_contract_sidecar(path, make_contract(appliance="fridge"))
    assert load_model(path).contract.appliance == "kettle"  # embedded beats sidecar
    assert load_model(path, contract=make_contract(appliance="microwave")).contract.appliance == "microwave"


def test_contract_io_names_follow_graph(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(tiny_onnx(), str(path))
    odd = make_contract().with_(input_name="x", output_name="y")
    model = load_model(path, contract=odd)
    assert (model.contract.input_name, model.contract.output_name) == ("input", "output")


def test_onnx_without_contract(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(tiny_onnx(), str(path))
    with pytest.raises(BadInputError) as err:
        load_model(path)
    assert_one_line_naming(err.value, path)
    assert "m.onnx.contract.json" in str(err.value) and "--contract" in str(err.value)


def test_onnx_contract_shape_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(tiny_onnx(), str(path))
    with pytest.raises(ShapeMismatchError) as err:
        load_model(path, contract=make_contract((10, 7, 1)))
    assert_one_line_naming(err.value, path)
    assert "(10, 7, 1)" in str(err.value) and "(10, 9, 1)" in str(err.value)


def test_malformed_sidecar_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(tiny_onnx(), str(path))
    sidecar_path(path).write_text("{not json")
    with pytest.raises(BadInputError) as err:
        load_model(path)
    assert_one_line_naming(err.value, sidecar_path(path))


def test_onnx_in_place_of_graph_input_name_collision(tmp_path: Path) -> None:
    # an internal tensor already called "output" must not be merged with the graph output
    proto = tiny_onnx(in_name="x", out_name="y")
    for node in proto.graph.node:
        node.output[:] = ["output" if o == "mm" else o for o in node.output]
        node.input[:] = ["output" if i == "mm" else i for i in node.input]
    path = tmp_path / "m.onnx"
    onnx.save(proto, str(path))
    model = load_model(path, contract=make_contract())
    x = batch()
    np.testing.assert_allclose(run(model.graph, x), reference(proto, x), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- bad input, no TensorFlow


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_missing_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.onnx"
    with pytest.raises(ModelLoadError) as err:
        load_model(path)
    assert_one_line_naming(err.value, path)
    assert "does not exist" in str(err.value)


def test_directory_not_saved_model(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError) as err:
        load_model(tmp_path)
    assert_one_line_naming(err.value, tmp_path)
    assert "not a TensorFlow SavedModel" in str(err.value)


@pytest.mark.parametrize("name", ["model.tflite", "model", "model.txt"])
def test_unknown_suffix(tmp_path: Path, name: str) -> None:
    path = _write(tmp_path / name, b"whatever")
    with pytest.raises(ModelLoadError) as err:
        load_model(path)
    assert_one_line_naming(err.value, path)
    assert "unknown model suffix" in str(err.value)


def test_saved_model_pb_points_to_directory(tmp_path: Path) -> None:
    path = _write(tmp_path / "saved_model.pb", b"x")
    with pytest.raises(ModelLoadError, match="pass its directory"):
        load_model(path)


@pytest.mark.parametrize("cut", [100, 7, 0])
def test_truncated_onnx(tmp_path: Path, cut: int) -> None:
    path = _write(tmp_path / "cut.onnx", tiny_onnx().SerializeToString()[:cut])
    with pytest.raises(ModelLoadError) as err:
        load_model(path, contract=make_contract())
    assert_one_line_naming(err.value, path)


def test_text_file_named_onnx(tmp_path: Path) -> None:
    path = _write(tmp_path / "notes.onnx", b"this is not a model\n" * 20)
    with pytest.raises(ModelLoadError) as err:
        load_model(path, contract=make_contract())
    assert_one_line_naming(err.value, path)


def test_hdf5_renamed_onnx(tmp_path: Path) -> None:
    path = _write(tmp_path / "m.onnx", b"\x89HDF\r\n\x1a\n" + b"\0" * 200)
    with pytest.raises(ModelLoadError) as err:
        load_model(path)
    assert_one_line_naming(err.value, path)
    assert "HDF5" in str(err.value) and ".h5" in str(err.value)


def test_zip_renamed_onnx(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("metadata.json", "{}")
    with pytest.raises(ModelLoadError) as err:
        load_model(path)
    assert_one_line_naming(err.value, path)
    assert "zip archive" in str(err.value) and ".keras" in str(err.value)


def test_onnx_renamed_keras_and_h5(tmp_path: Path) -> None:
    data = tiny_onnx().SerializeToString()
    for name in ("m.keras", "m.h5"):
        path = _write(tmp_path / name, data)
        with pytest.raises(ModelLoadError) as err:
            load_model(path, contract=make_contract())
        assert_one_line_naming(err.value, path)


def test_zip_without_keras_metadata(tmp_path: Path) -> None:
    path = tmp_path / "m.keras"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("something.txt", "hello")
    with pytest.raises(ModelLoadError) as err:
        load_model(path, contract=make_contract())
    assert_one_line_naming(err.value, path)


def test_hdf5_junk(tmp_path: Path) -> None:
    pytest.importorskip("h5py")
    path = _write(tmp_path / "m.h5", b"\x89HDF\r\n\x1a\n" + b"\0" * 92)
    with pytest.raises(ModelLoadError) as err:
        load_model(path, contract=make_contract())
    assert_one_line_naming(err.value, path)


def test_onnx_with_two_outputs(tmp_path: Path) -> None:
    proto = tiny_onnx()
    proto.graph.output.append(helper.make_tensor_value_info("mm", TensorProto.FLOAT, ["batch", 1]))
    path = tmp_path / "two.onnx"
    onnx.save(proto, str(path))
    with pytest.raises(ModelLoadError) as err:
        load_model(path, contract=make_contract())
    assert_one_line_naming(err.value, path)
    assert "2 outputs" in str(err.value)
    # the remedy names the outputs and how to keep one (ONNX's own extractor), runnable as written
    remedy = err.value.remedy
    assert "'y', 'mm'" in remedy and "onnx.utils.extract_model('in.onnx', 'out.onnx', ['x'], ['y'])" in remedy
    onnx.utils.extract_model(str(path), str(tmp_path / "one.onnx"), ["x"], ["y"])
    assert load_model(tmp_path / "one.onnx", contract=make_contract()).graph.graph.output[0].name == "output"  # renamed on load


def test_onnx_invalid_graph(tmp_path: Path) -> None:
    proto = tiny_onnx()
    proto.graph.node[1].input[1] = "does_not_exist"
    path = tmp_path / "broken.onnx"
    onnx.save(proto, str(path))
    with pytest.raises(ModelLoadError) as err:
        load_model(path, contract=make_contract())
    assert_one_line_naming(err.value, path)


def test_detect_kind_onnx(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(tiny_onnx(), str(path))
    assert detect_kind(path) is SourceKind.ONNX


# --------------------------------------------------------------------------- canonical form, no TensorFlow


def tf2onnx_like(counter: int) -> onnx.ModelProto:
    """A graph shaped like tf2onnx's Keras 3 output: counter-suffixed names, run-time Flatten shape."""
    c = lambda k: f"__{counter + k}"  # noqa: E731
    k = int(np.prod(SHAPE))
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(size=(k, 1)).astype(np.float32), "model/dense/MatMul/ReadVariableOp:0"),
        numpy_helper.from_array(np.array([0], np.int64), f"const_starts{c(3)}"),
        numpy_helper.from_array(np.array([1], np.int64), f"const_ends{c(4)}"),
        numpy_helper.from_array(np.array([k], np.int64), f"const_fold_opt{c(5)}"),
    ]
    nodes = [
        helper.make_node("Relu", ["input_1"], ["model/relu/Relu:0"], name="model/relu/Relu"),
        helper.make_node("Shape", ["model/relu/Relu:0"], [f"Shape{c(1)}:0"], name=f"Shape{c(1)}"),
        helper.make_node("Slice", [f"Shape{c(1)}:0", f"const_starts{c(3)}", f"const_ends{c(4)}"], [f"model/flatten/strided_slice{c(2)}:0"],
                         name=f"model/flatten/strided_slice{c(2)}"),
        helper.make_node("Concat", [f"model/flatten/strided_slice{c(2)}:0", f"const_fold_opt{c(5)}"],
                         [f"model/flatten/Reshape/shape_Concat{c(6)}:0"], axis=0, name=f"model/flatten/Reshape/shape_Concat{c(6)}"),
        helper.make_node("Reshape", ["model/relu/Relu:0", f"model/flatten/Reshape/shape_Concat{c(6)}:0"], ["model/flatten/Reshape:0"],
                         name="model/flatten/Reshape"),
        helper.make_node("MatMul", ["model/flatten/Reshape:0", "model/dense/MatMul/ReadVariableOp:0"], ["Identity:0"], name="model/dense/MatMul"),
    ]
    graph = helper.make_graph(
        nodes, "tf2onnx",
        [helper.make_tensor_value_info("input_1", TensorProto.FLOAT, [f"unk{c(7)}", *SHAPE])],
        [helper.make_tensor_value_info("Identity:0", TensorProto.FLOAT, [f"unk{c(8)}", 1])],
        inits,
    )
    graph.doc_string = f"converted from b'__inference_<lambda>_{counter}'"
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 2)])
    proto.ir_version = 8
    return proto


def test_canonical_form_is_independent_of_tf2onnx_counters() -> None:
    a = canonicalize_converted(tf2onnx_like(10))
    b = canonicalize_converted(tf2onnx_like(9990))
    assert a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True)


def test_canonical_form_is_independent_of_tf2onnx_constant_names() -> None:
    """tf2onnx names a folded constant after the pass that made it, which varies with the interpreter's hash seed
    (measured: ``const_fold_opt__5__6`` under PYTHONHASHSEED=0, ``axes_const__5__6__7`` under 2, for the same
    Unsqueeze axes of a Keras MaxPooling1D; every later counter shifted by one): the canonical form names a
    counter-bearing constant after its reader, so both give the same bytes."""

    def graph(unsq: str, sq: str, relu: str) -> onnx.ModelProto:
        inits = [numpy_helper.from_array(np.array([1], np.int64), unsq), numpy_helper.from_array(np.array([1], np.int64), sq)]
        nodes = [helper.make_node("Unsqueeze", ["input_1", unsq], ["model/pool/ExpandDims:0"], name="model/pool/ExpandDims"),
                 helper.make_node("Squeeze", ["model/pool/ExpandDims:0", sq], [f"{relu}:0"], name=relu),
                 helper.make_node("Relu", [f"{relu}:0"], ["Identity:0"], name="model/relu/Relu")]
        g = helper.make_graph(nodes, "tf2onnx", [helper.make_tensor_value_info("input_1", TensorProto.FLOAT, ["unk__1", 4])],
                              [helper.make_tensor_value_info("Identity:0", TensorProto.FLOAT, ["unk__2", 4])], inits)
        proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        proto.ir_version = 8
        return proto

    a = canonicalize_converted(graph("const_fold_opt__5__6", "axes_const__9__10", "Squeeze__8"))
    b = canonicalize_converted(graph("axes_const__5__6__7", "axes_const__10__11", "Squeeze__9"))
    assert a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True)
    assert sorted(t.name for t in a.graph.initializer) == ["Squeeze__1/in1", "model/pool/ExpandDims/in1"]


def test_canonical_form_shape() -> None:
    proto = canonicalize_converted(tf2onnx_like(10))
    g = proto.graph
    assert [i.name for i in g.input] == ["input"] and [o.name for o in g.output] == ["output"]
    assert g.input[0].type.tensor_type.shape.dim[0].dim_param == BATCH_DIM
    assert g.output[0].type.tensor_type.shape.dim[0].dim_param == BATCH_DIM
    assert proto.ir_version == 10
    assert [o.domain for o in proto.opset_import] == [""]
    # the run-time Flatten shape became a constant and its subgraph is gone
    assert [n.op_type for n in g.node] == ["Relu", "Reshape", "MatMul"]
    shape_init = next(t for t in g.initializer if t.name == g.node[1].input[1])
    assert numpy_helper.to_array(shape_init).tolist() == [-1, int(np.prod(SHAPE))]
    # names kept readable, counters gone or renumbered from 1
    assert "model/dense/MatMul" in [n.name for n in g.node]
    assert all("__9" not in t for n in g.node for t in [*n.input, *n.output, n.name])
    # still computes the same thing
    x = batch()
    w = numpy_helper.to_array(tf2onnx_like(10).graph.initializer[0])
    np.testing.assert_allclose(run(proto, x), np.maximum(x, 0).reshape(3, -1) @ w, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- TensorFlow / Keras (slow)


@pytest.fixture(scope="module")
def tf_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Tiny Conv2D -> Flatten -> Dense models written every way nilmc reads, each with a sidecar."""
    pytest.importorskip("tensorflow")
    from nilmc.compiler.tfcompat import import_keras3, import_tf, import_tf_keras

    tf = import_tf()
    k2, k3 = import_tf_keras(), import_keras3()
    d = tmp_path_factory.mktemp("tfmodels")
    files: dict[str, Any] = {"dir": d}

    def build(keras: Any) -> Any:
        keras.utils.set_random_seed(0)
        init = keras.initializers.RandomNormal(stddev=0.3, seed=1)
        return keras.Sequential([
            keras.layers.Input(SHAPE),
            keras.layers.Conv2D(3, (3, 3), padding="same", activation="relu", bias_initializer=init),
            keras.layers.Flatten(),
            keras.layers.Dense(4, activation="relu", bias_initializer=init),
            keras.layers.Dense(1, bias_initializer=init),
        ])

    m2, m3 = build(k2), build(k3)
    files["tf_keras_model"], files["keras3_model"] = m2, m3
    m2.save(d / "k2.h5")
    m2.save(d / "k2.keras")
    m2.save(d / "k2_savedmodel")
    tf.saved_model.save(m2, str(d / "tf_savedmodel"))
    m3.save(d / "k3.keras")
    m3.export(str(d / "k3_export"), verbose=False)
    for name in ("k2.h5", "k2.keras", "k2_savedmodel", "tf_savedmodel", "k3.keras", "k3_export"):
        save_contract_sidecar(d / name, make_contract())
    return files


SOURCES = [
    ("k2.h5", "tf_keras_model", SourceKind.TF_KERAS, True),
    ("k2.keras", "tf_keras_model", SourceKind.TF_KERAS, True),
    ("k3.keras", "keras3_model", SourceKind.KERAS3, True),
    ("k2_savedmodel", "tf_keras_model", SourceKind.SAVED_MODEL, True),
    ("tf_savedmodel", "tf_keras_model", SourceKind.SAVED_MODEL, False),
    ("k3_export", "keras3_model", SourceKind.SAVED_MODEL, False),
]


@pytest.mark.slow
@pytest.mark.tf
@pytest.mark.parametrize("name, which, kind, has_keras_path", SOURCES, ids=[s[0] for s in SOURCES])
def test_tf_round_trip(tf_files: dict[str, Any], name: str, which: str, kind: SourceKind, has_keras_path: bool) -> None:
    path = tf_files["dir"] / name
    assert detect_kind(path) is kind
    model = load_model(path)
    g = model.graph
    assert (model.input_name, model.output_name) == ("input", "output")
    assert g.graph.input[0].type.tensor_type.shape.dim[0].dim_param == BATCH_DIM
    assert g.ir_version == 10 and g.opset_import[0].version == 17
    assert (model.keras_path == str(path)) is has_keras_path
    assert model.contract == make_contract()
    assert "Shape" not in [n.op_type for n in g.graph.node]  # Keras 3 Flatten folded too
    x = batch(5)
    expected = np.asarray(tf_files[which](x, training=False))
    np.testing.assert_allclose(run(g, x), expected, rtol=1e-4, atol=1e-5)
    # same file, converted again in the same process (tf2onnx counters moved on): same bytes
    assert load_model(path).serialize() == model.serialize()


@pytest.mark.slow
@pytest.mark.tf
def test_keras_to_onnx_in_memory(tf_files: dict[str, Any]) -> None:
    from nilmc.compiler.frontend import keras_to_onnx

    for which in ("tf_keras_model", "keras3_model"):
        km = tf_files[which]
        model = keras_to_onnx(km, make_contract(), keras_path="somewhere.keras")
        x = batch(2)
        np.testing.assert_allclose(run(model.graph, x), np.asarray(km(x, training=False)), rtol=1e-4, atol=1e-5)
        assert model.keras_path == "somewhere.keras"
    with pytest.raises(ShapeMismatchError, match=r"\(10, 7, 1\)"):
        keras_to_onnx(tf_files["tf_keras_model"], make_contract((10, 7, 1)))


@pytest.mark.slow
@pytest.mark.tf
def test_tf_bad_inputs(tf_files: dict[str, Any], tmp_path: Path) -> None:
    d = tf_files["dir"]
    cases = {
        "cut.h5": (d / "k2.h5").read_bytes()[:100],
        "cut.keras": (d / "k2.keras").read_bytes()[:100],
        "cut3.keras": (d / "k3.keras").read_bytes()[:100],
        "h5_as.keras": (d / "k2.h5").read_bytes(),
        "keras_as.h5": (d / "k2.keras").read_bytes(),
        "h5_as.onnx": (d / "k2.h5").read_bytes(),
    }
    for name, data in cases.items():
        path = _write(tmp_path / name, data)
        with pytest.raises(ModelLoadError) as err:
            load_model(path, contract=make_contract())
        assert_one_line_naming(err.value, path)
    # a SavedModel directory with its variables gone
    broken = tmp_path / "broken_sm"
    broken.mkdir()
    (broken / "saved_model.pb").write_bytes((d / "k2_savedmodel" / "saved_model.pb").read_bytes()[:100])
    with pytest.raises(ModelLoadError) as err:
        load_model(broken, contract=make_contract())
    assert_one_line_naming(err.value, broken)


@pytest.mark.slow
@pytest.mark.tf
def test_tf_contract_problems(tf_files: dict[str, Any], tmp_path: Path) -> None:
    src = tf_files["dir"] / "k2.keras"
    lone = _write(tmp_path / "lone.keras", src.read_bytes())
    with pytest.raises(BadInputError) as err:
        load_model(lone)
    assert_one_line_naming(err.value, lone)
    assert "lone.keras.contract.json" in str(err.value)
    with pytest.raises(ShapeMismatchError) as err2:
        load_model(lone, contract=make_contract((10, 8, 1)))
    assert_one_line_naming(err2.value, lone)
    assert "(10, 8, 1)" in str(err2.value) and "(10, 9, 1)" in str(err2.value)


@pytest.mark.slow
@pytest.mark.tf
def test_qat_model_h5_round_trip(tmp_path: Path) -> None:
    """tfmot QAT (QuantizeWrapper layers, FakeQuant -> QDQ): loads from .h5 within the looser QDQ tolerance."""
    pytest.importorskip("tensorflow")
    from nilmc.compiler.tfcompat import import_tf_keras

    k2 = import_tf_keras()
    tfmot = pytest.importorskip("tensorflow_model_optimization")
    k2.utils.set_random_seed(0)
    base = k2.Sequential([
        k2.layers.Input(SHAPE),
        k2.layers.Conv2D(3, (3, 3), padding="same", activation="relu"),
        k2.layers.Flatten(),
        k2.layers.Dense(1),
    ])
    qat = tfmot.quantization.keras.quantize_model(base)
    qat.compile(optimizer="adam", loss="mse")
    x = batch(32)
    qat.fit(x, np.ones((32, 1), np.float32), epochs=1, verbose=0)
    path = tmp_path / "qat.h5"
    qat.save(path)
    save_contract_sidecar(path, make_contract())
    model = load_model(path)
    ops = [n.op_type for n in model.graph.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    got, want = run(model.graph, x), np.asarray(qat(x, training=False))
    assert np.max(np.abs(got - want)) < 0.5 * (np.max(np.abs(want)) + 1)

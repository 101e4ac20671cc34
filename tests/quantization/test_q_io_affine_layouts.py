"""Normalization inside the graph leaves it for every input layout, not only (N, T, F, 1) (quantization/io_affine.py).

Fast: small ONNX graphs built with onnx.helper whose input is ``NW`` (N, T), ``NWC`` (N, T, F) or ``NCW`` (N, F, T),
with a per-feature ``(x - mean) / std`` in front and ``y * std + mean`` behind; the stage is recorded in canonical
feature order and applied by ``contract.prepare`` before the layout transform. One slow TensorFlow test: a Keras
``Normalization`` layer on a (T, 1) input (tf2onnx made its mean/variance graph inputs when it stayed in the model).
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from nilmc.calibration_data.normalization import FeatureStats, Normalization, NormalizationSpec, TargetScaling
from nilmc.compiler.contract import ModelContract
from nilmc.compiler.model import Model
from nilmc.quantization import _ort
from nilmc.quantization.io_affine import repair_input_scales, strip_io_affine

T = 16
MEAN = np.array([120.0, -3.0, 40.0])  # per feature, distinct so a feature-order mix-up shows
STD = np.array([55.0, 0.5, 8.0])
_RNG = np.random.default_rng(7)


def _f(layout: str) -> int:
    return 1 if layout == "NW" else 3


def _const_shape(layout: str, f: int) -> tuple[int, ...]:
    """A per-feature constant that broadcasts along the layout's feature axis."""
    return {"NW": (), "NWC": (f,), "NCW": (f, 1)}[layout]


def _graph(layout: str, pre: list[tuple[str, np.ndarray]], *, denorm: tuple[float, float] | None = None,
           conv_scale: float = 1.0) -> onnx.ModelProto:
    """``pre`` ops (op, constant) on the input, then to (N, F, T), Conv1d -> Relu -> GlobalAveragePool -> Gemm [-> Mul -> Add]."""
    f = _f(layout)
    shape = {"NW": ["batch", T], "NWC": ["batch", T, f], "NCW": ["batch", f, T]}[layout]
    inits = [numpy_helper.from_array((_RNG.normal(0, 0.5, (4, f, 3)) * conv_scale).astype(np.float32), "conv.w"),
             numpy_helper.from_array(_RNG.normal(0, 0.1, 4).astype(np.float32), "conv.b"),
             numpy_helper.from_array(_RNG.normal(0, 0.5, (1, 4)).astype(np.float32), "fc.w"),
             numpy_helper.from_array(np.array([0.1], np.float32), "fc.b"),
             numpy_helper.from_array(np.array([1], np.int64), "ax1")]
    nodes, cur = [], "input"
    for i, (op, c) in enumerate(pre):
        inits.append(numpy_helper.from_array(np.asarray(c, np.float32), f"pre{i}.c"))
        nodes.append(helper.make_node(op, [cur, f"pre{i}.c"], [f"pre{i}"], name=f"/pre{i}/{op}"))
        cur = f"pre{i}"
    nct = cur  # NCW: the input is (N, F, T) already
    if layout == "NW":
        nodes.append(helper.make_node("Unsqueeze", [cur, "ax1"], ["nct"], name="/Unsqueeze"))
        nct = "nct"
    elif layout == "NWC":
        nodes.append(helper.make_node("Transpose", [cur], ["nct"], name="/Transpose", perm=[0, 2, 1]))
        nct = "nct"
    nodes += [helper.make_node("Conv", [nct, "conv.w", "conv.b"], ["c"], name="/conv/Conv", kernel_shape=[3], pads=[1, 1]),
              helper.make_node("Relu", ["c"], ["r"], name="/relu/Relu"),
              helper.make_node("GlobalAveragePool", ["r"], ["gp"], name="/gap"),
              helper.make_node("Flatten", ["gp"], ["fl"], name="/Flatten", axis=1),
              helper.make_node("Gemm", ["fl", "fc.w", "fc.b"], ["h" if denorm else "output"], name="/fc/Gemm", transB=1)]
    if denorm:
        inits += [numpy_helper.from_array(np.array(denorm[0], np.float32), "out.std"),
                  numpy_helper.from_array(np.array(denorm[1], np.float32), "out.mean")]
        nodes += [helper.make_node("Mul", ["h", "out.std"], ["hs"], name="/Mul"),
                  helper.make_node("Add", ["hs", "out.mean"], ["output"], name="/Add")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, ["batch", 1])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _contract(layout: str, stats: FeatureStats | None = None) -> ModelContract:
    return ModelContract(input_shape=(T, _f(layout), 1), normalization=NormalizationSpec(Normalization.A, stats),
                         appliance="fridge", layout=layout)


def _raw(layout: str, n: int = 64) -> np.ndarray:
    f = _f(layout)
    z = np.random.default_rng(3).standard_normal((n, T, f, 1))
    return (MEAN[:f].reshape(1, 1, f, 1) + STD[:f].reshape(1, 1, f, 1) * z).astype(np.float32)


def _zscore(layout: str) -> list[tuple[str, np.ndarray]]:
    f = _f(layout)
    shape = _const_shape(layout, f)
    return [("Sub", MEAN[:f].reshape(shape)), ("Div", STD[:f].reshape(shape))]


def _watts(graph: onnx.ModelProto, contract: ModelContract, raw: np.ndarray) -> np.ndarray:
    return contract.to_watts(_ort.output(graph, contract.prepare(raw))).astype(np.float64)


@pytest.mark.parametrize("layout", ["NW", "NWC", "NCW"])
def test_zscore_and_denorm_leave_the_graph_for_every_layout(layout):
    graph, contract = _graph(layout, _zscore(layout), denorm=(50.0, 70.0)), _contract(layout)
    new, new_contract, report = strip_io_affine(graph, contract)
    assert report.input is not None and report.output is not None, report.refused
    assert report.input.nodes == ["/pre0/Sub", "/pre1/Div"] and report.max_rel_error <= 1e-5
    ops = [n.op_type for n in new.graph.node]
    assert not {"Sub", "Div", "Mul", "Add"} & set(ops)
    f = _f(layout)
    scale, offset = new_contract.normalization.affine()  # canonical feature order, whatever the graph's layout
    np.testing.assert_allclose(scale, 1.0 / STD[:f], rtol=1e-6)
    np.testing.assert_allclose(offset, -MEAN[:f] / STD[:f], rtol=1e-6)
    assert (new_contract.target.mean, new_contract.target.std) == pytest.approx((70.0, 50.0))
    assert new_contract.layout == layout and new.graph.input[0].name == "input"
    raw = _raw(layout)
    ref, got = _watts(graph, contract, raw), _watts(new, new_contract, raw)
    assert np.max(np.abs(got - ref)) <= 1e-5 * np.max(np.abs(ref))


@pytest.mark.parametrize(("layout", "shape"), [("NCW", (1, T)), ("NWC", (T, 1)), ("NW", (T,))])
def test_an_affine_along_time_is_refused_with_the_reason(layout, shape):
    f = _f(layout)
    per_step = np.linspace(1.0, 2.0, T).reshape(shape)
    per_step = np.broadcast_to(per_step, {"NCW": (f, T), "NWC": (T, f), "NW": (T,)}[layout]).copy()
    graph = _graph(layout, [("Mul", per_step)])
    new, contract, report = strip_io_affine(graph, _contract(layout))
    assert new is graph and report.input is None
    reason = "is not one scalar" if layout == "NW" else "varies along an axis other than the features"
    assert len(report.refused) == 1 and reason in report.refused[0]


def test_a_batchnormalization_on_an_ncw_input_is_per_feature():
    f = 3
    inits = {"bn.g": np.array([2.0, 0.5, 1.0]), "bn.b": np.array([0.1, -0.2, 0.3]), "bn.m": MEAN, "bn.v": STD ** 2}
    graph = _graph("NCW", [])
    graph.graph.initializer.extend(numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items())
    bn = helper.make_node("BatchNormalization", ["input", "bn.g", "bn.b", "bn.m", "bn.v"], ["bn"], name="/bn", epsilon=1e-5)
    for node in graph.graph.node:
        node.input[:] = ["bn" if n == "input" else n for n in node.input]
    graph.graph.node.insert(0, bn)
    new, contract, report = strip_io_affine(graph, _contract("NCW"))
    assert report.input is not None and [n.op_type for n in new.graph.node][0] == "Conv"
    k = inits["bn.g"] / np.sqrt(STD ** 2 + 1e-5)
    np.testing.assert_allclose(contract.normalization.affine()[0], k, rtol=1e-6)
    raw = _raw("NCW")
    ref, got = _watts(graph, _contract("NCW"), raw), _watts(new, contract, raw)
    assert np.max(np.abs(got - ref)) <= 1e-5 * np.max(np.abs(ref))
    assert f == len(contract.normalization.affine()[1])


def test_a_stage_on_top_of_a_declared_zscore_composes_for_ncw():
    """The contract already z-scores (C); the graph then applies ``x * 2 + 1`` per feature on (N, F, T)."""
    stats = FeatureStats.fit(_raw("NCW", 200)[..., 0])
    contract = ModelContract(input_shape=(T, 3, 1), normalization=NormalizationSpec(Normalization.C, stats),
                             appliance="fridge", target=TargetScaling(10.0, 20.0), layout="NCW")
    graph = _graph("NCW", [("Mul", np.array([2.0, 3.0, 4.0]).reshape(3, 1)), ("Add", np.array([1.0, 0.0, -1.0]).reshape(3, 1))])
    new, new_contract, report = strip_io_affine(graph, contract)
    assert report.input is not None and report.max_rel_error <= 1e-5
    raw = _raw("NCW")
    ref, got = _watts(graph, contract, raw), _watts(new, new_contract, raw)
    assert np.max(np.abs(got - ref)) <= 1e-5 * np.max(np.abs(ref))


@pytest.mark.parametrize("layout", ["NWC", "NCW"])
def test_input_rescaling_repairs_a_raw_scale_input_in_its_layout(layout):
    """Features six decades apart starve a per-tensor INT8 input; the rescaling folds into the Conv1d's channels."""
    f = 3
    spread = np.array([3e4, 1.0, 1e-2])
    raw = (np.random.default_rng(5).standard_normal((200, T, f, 1)) * spread.reshape(1, 1, f, 1) + spread.reshape(1, 1, f, 1)).astype(np.float32)
    stats = FeatureStats.fit(raw[..., 0].astype(np.float64))
    graph = _graph(layout, [], conv_scale=1e-3)
    model = Model(graph, _contract(layout, stats), source="raw-scale")
    repaired, report = repair_input_scales(model, stats)
    assert report.applied and report.mode == "weights", report.note
    assert min(report.codes_before) < 16 <= min(report.codes_after)
    ref = _watts(model.graph, model.contract, raw)
    got = _watts(repaired.graph, repaired.contract, raw)
    assert np.max(np.abs(got - ref)) <= 1e-5 * np.max(np.abs(ref))


@pytest.mark.slow
@pytest.mark.tf
@pytest.mark.parametrize("flavor", ["tf_keras", "keras3"])
def test_a_keras_normalization_on_a_t_by_1_input_loads_as_the_input_stage(tmp_path, flavor):
    pytest.importorskip("tensorflow")
    from nilmc.compiler.frontend import load_model
    from nilmc.compiler.tfcompat import import_keras3, import_tf_keras, load_keras

    k = import_tf_keras() if flavor == "tf_keras" else import_keras3()
    raw = _raw("NW", 64)[..., 0]  # (N, T, 1): the Keras (T, 1) input, NWC
    inp = k.Input((T, 1))
    h = k.layers.Normalization(axis=-1, mean=float(MEAN[0]), variance=float(STD[0] ** 2), name="zscore")(inp)
    h = k.layers.Conv1D(4, 3, padding="same", activation="relu")(h)
    h = k.layers.GlobalAveragePooling1D()(h)
    model = k.Model(inp, k.layers.Dense(1)(h))
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = load_model(path, contract=_contract("NWC").with_(input_shape=(T, 1, 1)))
    assert len(loaded.graph.graph.input) == 1  # before: tf2onnx made the Normalization's mean/variance inputs
    spec = loaded.contract.normalization
    assert spec.kind is Normalization.AFFINE and "zscore" in spec.origin
    np.testing.assert_allclose(spec.affine()[0], [1.0 / STD[0]], rtol=1e-5)
    np.testing.assert_allclose(spec.affine()[1], [-MEAN[0] / STD[0]], rtol=1e-5)
    ref = np.asarray(model(raw, training=False), np.float64).reshape(-1)
    got = loaded.contract.to_watts(_ort.output(loaded.graph, loaded.contract.prepare(raw[..., None]))).astype(np.float64)
    assert np.max(np.abs(got - ref)) <= 1e-4 * np.max(np.abs(ref))
    if flavor == "tf_keras":  # the Keras-lowered targets (tflite, eiq) take the model without the layer
        stripped = load_keras(loaded)
        assert "zscore" not in [layer.name for layer in stripped.layers]


@pytest.mark.slow
@pytest.mark.tf
def test_a_keras_normalization_behind_a_layer_is_refused_with_a_message_that_says_what_to_do():
    pytest.importorskip("tensorflow")
    from nilmc.compiler.errors import ModelLoadError
    from nilmc.compiler.frontend import keras_to_onnx
    from nilmc.compiler.tfcompat import import_tf_keras

    k = import_tf_keras()
    inp = k.Input((T, 1))
    h = k.layers.Conv1D(2, 3, padding="same")(inp)
    h = k.layers.Normalization(axis=-1, mean=[1.0, 2.0], variance=[4.0, 9.0])(h)
    model = k.Model(inp, k.layers.Dense(1)(k.layers.GlobalAveragePooling1D()(h)))
    with pytest.raises(ModelLoadError, match="captures into graph inputs") as info:
        keras_to_onnx(model, _contract("NWC").with_(input_shape=(T, 1, 1)))
    assert "first layer" in info.value.remedy


def _bn_behind_unsqueeze(gamma: float, var: float, mean: float) -> onnx.ModelProto:
    """NW (N, T) -> Unsqueeze -> BatchNormalization (one channel) -> Conv1d ...: a PyTorch BatchNorm1d(1) on the raw input."""
    graph = _graph("NW", [])
    vals = {"bn.g": [gamma], "bn.b": [0.25], "bn.m": [mean], "bn.v": [var]}
    graph.graph.initializer.extend(numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in vals.items())
    for node in graph.graph.node:
        node.input[:] = ["bn" if n == "nct" else n for n in node.input]
    at = next(i for i, n in enumerate(graph.graph.node) if n.op_type == "Unsqueeze") + 1
    graph.graph.node.insert(at, helper.make_node("BatchNormalization", ["nct", "bn.g", "bn.b", "bn.m", "bn.v"], ["bn"], name="/bn", epsilon=1e-5))
    onnx.checker.check_model(graph)
    return graph


def test_a_batchnorm_behind_the_input_unsqueeze_leaves_the_graph():
    """Fuzzed: a PyTorch model (N, T) -> unsqueeze(1) -> BatchNorm1d(1) kept its normalization in the graph (running_var
    305030 refused by tensorrt:fp16; tflite / DPU refused BatchNormalization). A scalar affine commutes with the
    Unsqueeze: the BN leaves the graph, the Unsqueeze stays."""
    graph = _bn_behind_unsqueeze(1.5, float(STD[0] ** 2), float(MEAN[0]))
    new, contract, report = strip_io_affine(graph, _contract("NW"))
    assert report.input is not None and report.input.nodes == ["/bn"] and report.max_rel_error <= 1e-5, report.refused
    assert [n.op_type for n in new.graph.node][:2] == ["Unsqueeze", "Conv"]
    k = 1.5 / np.sqrt(STD[0] ** 2 + 1e-5)
    scale, offset = contract.normalization.affine()
    np.testing.assert_allclose([scale[0], offset[0]], [k, 0.25 - MEAN[0] * k], rtol=1e-6)
    raw = _raw("NW")
    ref, got = _watts(graph, _contract("NW"), raw), _watts(new, contract, raw)
    assert np.max(np.abs(got - ref)) <= 1e-5 * np.max(np.abs(ref))


def test_behind_a_reshape_only_a_scalar_stage_is_taken():
    """NWC (N, T, 3) -> Transpose -> per-channel Mul: the feature axis is not followed through the Transpose, so the
    per-feature stage stays in the graph (refused, with the reason), never taken out along the wrong axis."""
    graph = _graph("NWC", [])
    graph.graph.initializer.append(numpy_helper.from_array(np.array([2.0, 3.0, 4.0], np.float32).reshape(3, 1), "chan"))
    for node in graph.graph.node:
        node.input[:] = ["scaled" if n == "nct" else n for n in node.input]
    at = next(i for i, n in enumerate(graph.graph.node) if n.op_type == "Transpose") + 1
    graph.graph.node.insert(at, helper.make_node("Mul", ["nct", "chan"], ["scaled"], name="/chan/Mul"))
    new, _, report = strip_io_affine(graph, _contract("NWC"))
    assert new is graph and report.input is None

"""Normalization a model carries in its graph becomes the contract's float stage (quantization/io_affine.py).

Fast: tiny TensorFlow-free models with an affine in front / behind; exactness, refusals, the JSON record,
and the INT8 result of the raw-input variant against the z-score model (onnxruntime:int8, dpu:b2304).
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from helpers import tiny_dataset
from onnx import helper, numpy_helper

from nilmc.calibration_data.normalization import Normalization, NormalizationSpec, TargetScaling
from nilmc.compiler.contract import ModelContract
from nilmc.compiler.model import Model
from nilmc.quantization import _ort
from nilmc.quantization.io_affine import strip_io_affine, strip_model_io_affine


def _prepend(model: Model, nodes: list[tuple[str, np.ndarray, bool]]) -> Model:
    """``model`` with ``op(x, const)`` nodes (or ``op(const, x)`` when the flag is False) in front of its input."""
    m = onnx.ModelProto()
    m.CopyFrom(model.graph)
    g = m.graph
    cur, new_nodes = "input", []
    for i, (op, const, x_first) in enumerate(nodes):
        g.initializer.append(numpy_helper.from_array(np.asarray(const, np.float32), f"pre{i}/c"))
        ins = [cur, f"pre{i}/c"] if x_first else [f"pre{i}/c", cur]
        new_nodes.append(helper.make_node(op, ins, [f"pre{i}/y"], name=f"pre{i}"))
        cur = f"pre{i}/y"
    for node in g.node:
        node.input[:] = [cur if n == "input" else n for n in node.input]
    for node in reversed(new_nodes):
        g.node.insert(0, node)
    onnx.checker.check_model(m)
    return Model(m, model.contract, source="prepended")


def _append(model: Model, nodes: list[tuple[str, float]]) -> Model:
    m = onnx.ModelProto()
    m.CopyFrom(model.graph)
    g = m.graph
    for node in g.node:
        node.output[:] = ["inner" if o == "output" else o for o in node.output]
    cur = "inner"
    for i, (op, c) in enumerate(nodes):
        g.initializer.append(numpy_helper.from_array(np.array(c, np.float32), f"post{i}/c"))
        out = "output" if i == len(nodes) - 1 else f"post{i}/y"
        g.node.append(helper.make_node(op, [cur, f"post{i}/c"], [out], name=f"post{i}"))
        cur = out
    onnx.checker.check_model(m)
    return Model(m, model.contract, source="appended")


def _raw_variant(zmodel: Model, *, denorm: bool = False, form: str = "mul_add") -> Model:
    """The z-score model with its z-score in front as graph ops (contract: raw input, A)."""
    scale, offset = zmodel.contract.normalization.affine()
    f = len(scale)
    if form == "mul_add":
        nodes = [("Mul", scale.reshape(1, 1, f, 1), True), ("Add", offset.reshape(1, 1, f, 1), True)]
    else:  # Keras Normalization as tf2onnx writes it: (x - mean) / std
        std = 1.0 / scale
        nodes = [("Sub", (-offset * std).reshape(f, 1), True), ("Div", std.reshape(f, 1), True)]
    raw = _prepend(zmodel, nodes)
    contract = zmodel.contract.with_(normalization=NormalizationSpec(Normalization.A, zmodel.contract.normalization.stats))
    if denorm:
        t = zmodel.contract.target
        raw = _append(raw, [("Mul", t.std), ("Add", t.mean)])
        contract = contract.with_(target=TargetScaling())
    return Model(raw.graph, contract, source="raw variant")


def _watts(model: Model, raw_x: np.ndarray) -> np.ndarray:
    return model.contract.to_watts(_ort.output(model.graph, model.contract.prepare(raw_x))).astype(np.float64)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(a)))


@pytest.mark.parametrize("form", ["mul_add", "sub_div"])
def test_input_and_output_affine_leave_the_graph_exactly(tiny, tiny_eval, form):
    raw = _raw_variant(tiny, denorm=True, form=form)
    stripped, report = strip_model_io_affine(raw)
    assert report.input is not None and report.output is not None and not report.refused
    assert [n.op_type for n in stripped.graph.graph.node] == [n.op_type for n in tiny.graph.graph.node]
    assert stripped.contract.normalization.kind is Normalization.AFFINE
    assert _rel(_watts(raw, tiny_eval.x), _watts(stripped, tiny_eval.x)) < 1e-5
    # the stage is the z-score of the original contract, and the graph is the original graph
    np.testing.assert_allclose(stripped.contract.normalization.affine()[0], tiny.contract.normalization.affine()[0], rtol=1e-6)
    assert stripped.contract.target.std == pytest.approx(tiny.contract.target.std, rel=1e-6)
    assert stripped.contract.target.mean == pytest.approx(tiny.contract.target.mean, rel=1e-6)


def test_the_stage_and_its_formula_travel_in_the_contract_json(tiny):
    stripped, _ = strip_model_io_affine(_raw_variant(tiny, denorm=True))
    d = json.loads(stripped.contract.dumps())
    assert d["normalization"]["kind"] == "affine" and "scale[f]" in d["normalization"]["formula"]
    assert "pre0" in d["normalization"]["origin"] and d["normalization"]["base"]["kind"] == "A"
    assert d["target"]["formula"] == "watts = output * std + mean" and "post" in d["target"]["origin"]
    back = ModelContract.from_json(d)
    x = tiny_dataset(20, seed=5).x
    np.testing.assert_array_equal(back.prepare(x), stripped.contract.prepare(x))
    np.testing.assert_allclose(back.normalization.invert(back.prepare(x)), x, rtol=1e-4, atol=1e-3)


def test_a_plain_model_is_left_alone_and_a_layer_bias_stays(tiny):
    graph, contract, report = strip_io_affine(tiny.graph, tiny.contract)
    assert graph is tiny.graph and contract is tiny.contract and not report.changed  # MatMul -> Add(bias) is the layer's


def test_an_affine_that_varies_along_frames_is_refused(tiny):
    frames = tiny.contract.input_shape[0]
    per_frame = np.linspace(1.0, 2.0, frames, dtype=np.float32).reshape(1, frames, 1, 1)
    raw = _prepend(tiny, [("Mul", per_frame, True)])
    graph, contract, report = strip_io_affine(raw.graph, raw.contract)
    assert graph is raw.graph and contract is raw.contract and report.refused


def test_batchnormalization_and_reversed_sub_on_the_input(tiny, tiny_eval):
    f = tiny.contract.input_shape[1]
    raw = _prepend(tiny, [("Sub", np.full((1, 1, f, 1), 3.0), False), ("Mul", np.full((1, 1, f, 1), -0.5), True)])
    stripped, report = strip_model_io_affine(raw)
    assert report.input is not None and _rel(_watts(raw, tiny_eval.x), _watts(stripped, tiny_eval.x)) < 1e-5
    # BatchNormalization (inference) directly on the input: its channel axis 1 is the frames axis here, so only
    # equal per-channel constants make it a per-feature (here scalar) affine
    m = onnx.ModelProto()
    m.CopyFrom(tiny.graph)
    frames = tiny.contract.input_shape[0]
    for name, v in (("bn/g", 1.7), ("bn/b", -0.3), ("bn/m", 250.0), ("bn/v", 90.0**2)):
        m.graph.initializer.append(numpy_helper.from_array(np.full(frames, v, np.float32), name))
    for node in m.graph.node:
        node.input[:] = ["bn_y" if n == "input" else n for n in node.input]
    m.graph.node.insert(0, helper.make_node("BatchNormalization", ["input", "bn/g", "bn/b", "bn/m", "bn/v"], ["bn_y"], name="bn", epsilon=1e-3))
    bn = Model(m, tiny.contract.with_(normalization=NormalizationSpec(Normalization.A, tiny.contract.normalization.stats)))
    stripped, report = strip_model_io_affine(bn)
    assert report.input is not None and report.input.nodes == ["bn"]
    assert _rel(_watts(bn, tiny_eval.x), _watts(stripped, tiny_eval.x)) < 1e-5


def test_a_folded_contract_becomes_explicit_stages(tiny, tiny_eval):
    from nilmc.quantization.fold import fold_normalization

    folded = fold_normalization(tiny, input_mode="ops", output_mode="ops").model
    stripped, report = strip_model_io_affine(folded)
    assert report.input is not None and report.output is not None
    assert not stripped.contract.folded and stripped.contract.normalization.kind is Normalization.AFFINE
    assert _rel(_watts(folded, tiny_eval.x), _watts(stripped, tiny_eval.x)) < 1e-5


def test_the_frontend_strips_on_load(tmp_path, tiny):
    from nilmc.compiler.frontend import load_model

    path = _raw_variant(tiny, denorm=True).save_onnx(tmp_path / "raw.onnx")
    loaded = load_model(path)
    assert loaded.contract.normalization.kind is Normalization.AFFINE
    assert not any(n.name.startswith(("pre", "post")) for n in loaded.graph.graph.node)


@pytest.mark.parametrize("target", ["onnxruntime:int8", "dpu:b2304"])
def test_raw_input_variant_quantizes_like_the_zscore_model(tmp_path, tiny, tiny_ds, tiny_eval, target):
    from nilmc.backends.registry import default_registry
    from nilmc.compiler.driver import compile_model
    from nilmc.compiler.frontend import load_model

    reg = default_registry(plugins=False)
    t = reg.parse_target(target)
    raw = load_model(_raw_variant(tiny, denorm=True).save_onnx(tmp_path / "raw.onnx"))
    res = {}
    for name, model in (("z", tiny), ("raw", raw)):
        s = compile_model(model, tiny_eval, [t], tmp_path / name, calib=tiny_ds, budget={"eacc": 100}, registry=reg)
        r = s.results[0]
        assert r.error is None, r.error
        res[name] = r
    dz, dr = (res[k].report.deltas["eacc"] for k in ("z", "raw"))
    assert abs(dz - dr) <= 0.1
    sz, sr = (res[k].report.extra["output_sqnr_db"] for k in ("z", "raw"))
    assert abs(sz - sr) <= 1.0

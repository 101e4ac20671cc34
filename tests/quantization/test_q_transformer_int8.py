"""INT8 of a transformer block: the residual stream and the decomposed LayerNorm stay float as one structural group.

A tiny post-LN encoder block built with onnx.helper (no TensorFlow): an embedding layer (the residual stream),
single-head attention (two activation x activation MatMuls and a Softmax), the
residual Add and a LayerNorm written out as tf2onnx does (ReduceMean, Sub, Mul, Sqrt, Reciprocal, ...), then a dense
head. Its windows are spiky (each step's amplitude spans 2 decades, as appliance switching does), so the per-step
variance spans 4: on one 8-bit grid each, the small variances round to 0 and ``1 / sqrt(var + eps)`` explodes.
Keeping one, or three, of those tensors float at a time does not help; the region as a group does.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import FEATURES, WINDOW, build_seq2point
from onnx import TensorProto, helper, numpy_helper

from nilmc.quantization import _ort
from nilmc.quantization.mixed_precision import raise_until_sqnr, structural_regions
from nilmc.quantization.params import derive_params
from nilmc.quantization.placement import op_placement
from nilmc.quantization.qdq import build_qdq_model
from nilmc.quantization.statistics import collect_statistics
from nilmc.quantization.traits import GENERIC_INT8, TENSORRT_INT8

D = 16


def build_block(seed: int = 0, offset: float = 0.0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)

    def w(*shape: int) -> np.ndarray:
        return (rng.normal(0.0, 1.0 / np.sqrt(shape[0]), shape)).astype(np.float32)

    inits = {"seq_shape": np.array([-1, WINDOW, FEATURES], np.int64), "flat_shape": np.array([-1, WINDOW * D], np.int64),
             "We": w(FEATURES, D), "be": (offset + rng.normal(0, 0.1, D)).astype(np.float32),
             "Wq": w(D, D), "bq": np.zeros(D, np.float32), "Wk": w(D, D), "bk": np.zeros(D, np.float32),
             "Wv": w(D, D), "bv": np.zeros(D, np.float32), "Wo": w(D, D), "bo": rng.normal(0, 0.1, D).astype(np.float32),
             "scale": np.array(1.0 / np.sqrt(D), np.float32), "eps": np.array(1e-3, np.float32),
             "gamma": (1.0 + rng.normal(0, 0.1, D)).astype(np.float32), "beta": rng.normal(0, 0.1, D).astype(np.float32),
             "Wh": w(WINDOW * D, 1), "bh": np.array([0.1], np.float32)}
    n = helper.make_node
    # node names differ from tensor names: keep_float resolves a name as a layer (node) before an activation (tensor)
    nodes = [
        n("Reshape", ["input", "seq_shape"], ["x"], name="to_sequence"),
        n("MatMul", ["x", "We"], ["e0"], name="embed/op"), n("Add", ["e0", "be"], ["h"], name="embed_bias"),
        n("MatMul", ["h", "Wq"], ["q0"], name="q/op"), n("Add", ["q0", "bq"], ["q"], name="q_bias/op"),
        n("MatMul", ["h", "Wk"], ["k0"], name="k/op"), n("Add", ["k0", "bk"], ["k"], name="k_bias/op"),
        n("MatMul", ["h", "Wv"], ["v0"], name="v/op"), n("Add", ["v0", "bv"], ["v"], name="v_bias/op"),
        n("Transpose", ["k"], ["kt"], name="k_t", perm=[0, 2, 1]),
        n("MatMul", ["q", "kt"], ["s0"], name="scores"), n("Mul", ["s0", "scale"], ["s"], name="scores_scale"),
        n("Softmax", ["s"], ["p"], name="softmax", axis=-1),
        n("MatMul", ["p", "v"], ["ctx"], name="context"),
        n("MatMul", ["ctx", "Wo"], ["o0"], name="attn_out"), n("Add", ["o0", "bo"], ["o"], name="attn_out_bias"),
        n("Add", ["h", "o"], ["res"], name="residual"),
        n("ReduceMean", ["res"], ["mean"], name="ln/mean", axes=[-1], keepdims=1),
        n("Sub", ["res", "mean"], ["d"], name="ln/sub"), n("Mul", ["d", "d"], ["sq"], name="ln/square"),
        n("ReduceMean", ["sq"], ["var"], name="ln/variance", axes=[-1], keepdims=1),
        n("Add", ["var", "eps"], ["ve"], name="ln/add_eps"), n("Sqrt", ["ve"], ["sd"], name="ln/sqrt"),
        n("Reciprocal", ["sd"], ["inv"], name="ln/reciprocal"), n("Mul", ["d", "inv"], ["nrm"], name="ln/normalize"),
        n("Mul", ["nrm", "gamma"], ["g"], name="ln/gamma"), n("Add", ["g", "beta"], ["z"], name="ln/beta"),
        n("Reshape", ["z", "flat_shape"], ["flat"], name="flatten"),
        n("MatMul", ["flat", "Wh"], ["y0"], name="head/op"), n("Add", ["y0", "bh"], ["output"], name="head_bias"),
    ]
    graph = helper.make_graph(nodes, "block", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", WINDOW, FEATURES, 1])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 1])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


LN_TENSORS = {"res", "mean", "d", "sq", "var", "ve", "sd", "inv", "nrm", "g"}


def spiky(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    amplitude = 10.0 ** rng.uniform(-1.5, 0.5, (n, WINDOW, 1, 1))
    return (rng.normal(0.0, 1.0, (n, WINDOW, FEATURES, 1)) * amplitude).astype(np.float32)


@pytest.fixture(scope="module")
def block():
    model, x = build_block(), spiky(256, seed=1)
    return model, x, collect_statistics(model, x)


def test_regions_come_from_the_graph(block) -> None:
    """Two connected regions, cut where a weighted layer reads: the attention arithmetic (up to the context, which
    the output projection reads) and the residual Add with the LayerNorm's ops. The layers' inputs (the residual
    stream h, the context, the LayerNorm output z) are in neither; the outputs of MatMuls (the projections q, k, v, o
    and the scores) are listed apart, float only with their MatMul; the attention MatMuls' float-able inputs are
    marked. A plain CNN has none."""
    model = block[0]
    attention, norm = structural_regions(model)
    assert set(attention.tensors) == {"s", "p"} and set(attention.matmul_inputs) == {"p"}
    assert set(attention.matmul_outputs) == {"q", "k", "v", "s0"} and "Softmax" in attention.ops
    assert set(norm.tensors) == LN_TENSORS and norm.matmul_outputs == ("o",) and norm.matmul_inputs == ()
    assert {"Sub", "Sqrt", "Reciprocal", "ReduceMean"} <= set(norm.ops)
    everything = attention.tensors + attention.matmul_outputs + norm.tensors + norm.matmul_outputs
    assert not {"h", "ctx", "z", "input", "output"} & set(everything)
    assert structural_regions(build_seq2point()) == []


@pytest.mark.parametrize("traits", [GENERIC_INT8, TENSORRT_INT8], ids=lambda t: t.name)
def test_the_group_restores_what_single_units_cannot(block, traits) -> None:
    model, x, stats = block
    params = derive_params(model, stats, traits, estimator="minmax")
    _, res_single = raise_until_sqnr(model, params, x, 60.0, fallback="float", max_units=3, structural=False)
    group, res = raise_until_sqnr(model, params, x, 60.0, fallback="float", max_units=0)
    assert res.initial_db < 10.0  # every tensor on its own 8-bit grid: the LayerNorm does not survive
    assert res.structural is not None and res.final_db > res.initial_db + 10.0
    assert len(res_single.kept) >= 1 and res.final_db > res_single.final_db + 5.0  # one unit at a time finds no group
    assert LN_TENSORS <= set(res.structural["float_tensors"]) and res.kept == []
    # the record is what the graph does: no Q/DQ on a float tensor, every weighted layer still INT8
    qdq = build_qdq_model(model, group)
    quantized = {node.input[0] for node in qdq.graph.node if node.op_type == "QuantizeLinear"}
    assert not quantized & set(res.structural["float_tensors"]) and {"h", "z"} <= quantized
    assert {"o", "s0"} <= quantized  # an INT8 MatMul keeps the Q/DQ on its output (OpenVINO needs it)
    inits = {t.name for t in qdq.graph.initializer}
    assert all(f"{wt}_quantized" in inits for wt in ("We", "Wq", "Wk", "Wv", "Wo", "Wh"))
    assert _ort.sqnr_db(_ort.output(model, x), _ort.output(qdq, x)) == pytest.approx(res.final_db, abs=0.5)
    # the manifest says which ops stay float and why
    whys = {f["name"]: f["why"] for f in op_placement(model, group)["float"]}
    assert all("structural region" in whys[t] for t in LN_TENSORS)
    # deterministic
    again, res2 = raise_until_sqnr(model, params, x, 60.0, fallback="float", max_units=0)
    assert again.keep_float == group.keep_float and res2.final_db == res.final_db and res2.to_json() == res.to_json()


def test_attention_matmul_inputs_stay_int8_when_that_costs_nothing(block) -> None:
    model, x, stats = block
    params = derive_params(model, stats, TENSORRT_INT8, estimator="minmax")
    _, res = raise_until_sqnr(model, params, x, 60.0, fallback="float", max_units=0)
    dbs = res.structural["variants_db"]
    bmm = {t for r in structural_regions(model) for t in r.matmul_inputs}
    if res.structural["variant"] == "attention MatMul inputs INT8":
        assert not bmm & set(res.structural["float_tensors"])
        assert dbs["attention MatMul inputs INT8"] >= dbs["all float"] - 0.5
    else:
        assert bmm <= set(res.structural["float_tensors"])
        assert dbs["attention MatMul inputs INT8"] < dbs["all float"] - 0.5


def test_a_cnn_is_scored_as_before(calib, s2p_stats) -> None:
    """No structural region in a plain CNN: the floor behaves exactly as without the structural step."""
    model = build_seq2point()
    params = derive_params(model, s2p_stats, GENERIC_INT8, estimator="minmax")
    a, ra = raise_until_sqnr(model, params, calib, 90.0, fallback="float", max_units=1)
    b, rb = raise_until_sqnr(model, params, calib, 90.0, fallback="float", max_units=1, structural=False)
    assert ra.structural is None and ra.to_json() == rb.to_json() and a.keep_float == b.keep_float

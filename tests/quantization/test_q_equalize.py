"""Cross-layer equalization (quantization/equalize.py): FP32-exact, reduces channel imbalance, skips what is not
exact, the Keras twin takes the same weights, and the compile records it per target."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import build_seq2point, run, windows
from onnx import helper, numpy_helper

from nilmc.compiler.errors import BadInputError
from nilmc.quantization.equalize import (
    RTOL,
    channel_ranges,
    equalize_for_quantization,
    equalize_graph,
    find_pairs,
    imbalance,
)


def _inits(m: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}


def _set(m: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    t = next(t for t in m.graph.initializer if t.name == name)
    t.CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))


def imbalanced(seed: int = 0) -> onnx.ModelProto:
    """``build_seq2point`` with conv1's output channels scaled over two decades and conv2's input channels
    scaled back: the same function, channel ranges 100x apart (what raw-scale inputs produce)."""
    m = build_seq2point(seed)
    w = _inits(m)
    k = np.logspace(-1, 1, w["conv1/W"].shape[0])
    _set(m, "conv1/W", w["conv1/W"] * k[:, None, None, None])
    _set(m, "conv1/b", w["conv1/b"] * k)
    _set(m, "conv2/W", w["conv2/W"] / k[None, :, None, None])
    return m


def test_equalization_is_fp32_exact_and_balances_channels():
    m = imbalanced()
    x, held_out = windows(256, seed=1), windows(128, seed=7)
    pairs, _ = find_pairs(m)
    before = imbalance(channel_ranges(m, x, pairs)["r1"])
    res = equalize_graph(m, x, min_imbalance=2.0)
    assert res.changed and [(p.first, p.second) for p in res.pairs][0] == ("conv1", "conv2")
    # exact on windows the ranges were not taken from, checked independently of the pass's own check
    ref, out = run(m, held_out), run(res.graph, held_out)
    assert np.max(np.abs(out - ref)) <= RTOL * np.max(np.abs(ref))
    assert res.to_json()["exactness"]["passed"]
    after = imbalance(channel_ranges(res.graph, x, find_pairs(res.graph)[0])["r1"])
    assert before > 50 and after < before / 5
    conv1 = res.pairs[0]
    assert conv1.imbalance_before == pytest.approx(before) and conv1.imbalance_after == pytest.approx(after, rel=1e-4)
    # the input graph is untouched
    assert np.array_equal(_inits(m)["conv1/W"], _inits(imbalanced())["conv1/W"])


def test_pairs_found_and_channel_moves_skipped():
    pairs, skipped = find_pairs(build_seq2point())
    assert [(p.first.name, p.second.name) for p in pairs] == [("conv1", "conv2"), ("dense1", "dense2")]
    assert any(s.first == "conv2" and "Transpose" in s.reason for s in skipped)


def test_non_homogeneous_activation_is_skipped():
    m = imbalanced()
    relu = next(n for n in m.graph.node if n.name == "relu1")
    relu.op_type = "Clip"  # Clip(0, 6) is not positively homogeneous: scaling would change the function
    m.graph.initializer.extend([numpy_helper.from_array(np.float32(0), "lo"), numpy_helper.from_array(np.float32(6), "hi")])
    relu.input.extend(["lo", "hi"])
    res = equalize_graph(m, windows(128), min_imbalance=2.0)
    assert ("conv1", "conv2") not in [(p.first, p.second) for p in res.pairs]
    assert any(s.first == "conv1" and "not positively homogeneous" in s.reason for s in res.skipped)
    assert np.array_equal(_inits(res.graph)["conv1/W"], _inits(m)["conv1/W"])


def test_two_readers_and_shared_weights_are_skipped():
    m = imbalanced()
    # a second reader of conv1's output (an extra graph output through Identity)
    m.graph.node.append(helper.make_node("Identity", ["r1"], ["r1_copy"], name="tap"))
    m.graph.output.append(helper.make_tensor_value_info("r1_copy", onnx.TensorProto.FLOAT, None))
    res = equalize_graph(m, windows(128), min_imbalance=2.0)
    assert all(p.first != "conv1" for p in res.pairs)
    assert any(s.first == "conv1" and "2 readers" in s.reason for s in res.skipped)


def test_balanced_pairs_left_alone():
    m = build_seq2point()
    res = equalize_graph(m, windows(128), min_imbalance=1e9)
    assert not res.changed and res.graph is m
    assert {s.first for s in res.skipped} >= {"conv1", "dense1"}


def test_unknown_mode_is_a_typed_error(tiny, tiny_ds, tmp_path):
    with pytest.raises(BadInputError, match="auto"):
        equalize_for_quantization(tiny, tiny_ds, tmp_path, mode="sometimes")


def test_compile_records_equalization_in_each_manifest(tmp_path, tiny, tiny_ds, tiny_eval):
    from nilmc.compiler.driver import CompileOptions, compile_model
    from nilmc.compiler.errors import BadInputError as Bad

    s = compile_model(tiny, tiny_eval, [_t("onnxruntime:int8")], tmp_path / "on", calib=tiny_ds,
                      options=CompileOptions(equalize="on"))
    assert s.exit_code in (0, 1)
    manifest = json.loads(next((tmp_path / "on").glob("*int8*/manifest.json")).read_text())
    eq = manifest["equalization"]
    assert eq["mode"] == "on" and eq["exactness"]["passed"]
    assert eq["applied"] == bool(eq["pairs"])
    assert all(p["imbalance_after"] <= p["imbalance_before"] for p in eq["pairs"])
    # the FP32 reference stays the model as given
    assert (tmp_path / "on" / "reference" / "model.onnx").read_bytes() == tiny.serialize()
    s = compile_model(tiny, tiny_eval, [_t("onnxruntime:int8")], tmp_path / "auto", calib=tiny_ds)
    eq = json.loads(next((tmp_path / "auto").glob("*int8*/manifest.json")).read_text())["equalization"]
    assert eq["mode"] == "auto" and ("decision" in eq or not eq["pairs"])
    with pytest.raises(Bad, match="equalization mode"):
        compile_model(tiny, tiny_eval, [_t("onnxruntime:int8")], tmp_path / "bad", calib=tiny_ds, options=CompileOptions(equalize="x"))


def _t(text: str):
    from nilmc.backends.registry import default_registry

    return default_registry(plugins=False).parse_target(text)


@pytest.mark.tf
@pytest.mark.slow
def test_keras_twin_gets_identical_weights(tmp_path):
    from helpers import tiny_dataset

    from nilmc.compiler.frontend import keras_to_onnx
    from nilmc.compiler.tfcompat import import_tf
    from nilmc.quantization.equalize import equalize_keras
    from nilmc.training.seq2point import contract_for

    tf = import_tf("test")
    ds = tiny_dataset(64)
    contract = contract_for(ds, "kettle", "C")
    tf.keras.utils.set_random_seed(0)
    inp = tf.keras.Input(shape=ds.input_shape, name="input")
    h = tf.keras.layers.Conv2D(6, (3, 3), padding="same", activation="relu", name="conv1")(inp)
    h = tf.keras.layers.Conv2D(4, (3, 3), padding="same", activation="relu", name="conv2")(h)
    h = tf.keras.layers.Flatten()(h)
    h = tf.keras.layers.Dense(8, activation="relu", name="dense1")(h)
    km = tf.keras.Model(inp, tf.keras.layers.Dense(1, name="out")(h))
    k = np.logspace(-1, 1, 6).astype(np.float32)  # imbalance conv1 (and compensate in conv2): same function
    w1, b1 = km.get_layer("conv1").get_weights()
    km.get_layer("conv1").set_weights([w1 * k, b1 * k])
    w2, b2 = km.get_layer("conv2").get_weights()
    km.get_layer("conv2").set_weights([w2 / k[None, None, :, None], b2])
    model = keras_to_onnx(km, contract)
    x = contract.prepare(ds.raw_x())
    res = equalize_graph(model.graph, x, min_imbalance=2.0)
    assert any(p.first.endswith("conv1/BiasAdd") or "conv1" in p.first for p in res.pairs)
    twin = equalize_keras(km, model.graph, res)
    onnx_w = _inits(res.graph)
    as_onnx = [np.transpose(v.numpy(), (3, 2, 0, 1)) if v.shape.rank == 4 else v.numpy() for v in twin.weights]
    for p in res.pairs:  # every rewritten kernel and bias is in the twin, bit for bit
        for name in p.tensors:
            if name is not None:
                assert any(np.array_equal(a.reshape(-1), onnx_w[name].reshape(-1)) for a in as_onnx), name
    y_twin = twin.predict(x, verbose=0)
    assert np.max(np.abs(y_twin - run(res.graph, x))) <= 1e-5 * np.max(np.abs(y_twin))
    assert np.array_equal(km.get_layer("conv1").get_weights()[0], w1 * k)  # the source model is untouched


def test_power_of_two_targets_keep_the_model_as_given(tmp_path, tiny, tiny_ds, tiny_eval):
    from nilmc.compiler.driver import CompileOptions, compile_model
    from nilmc.compiler.model import Model

    g = onnx.ModelProto()
    g.CopyFrom(tiny.graph)
    w = _inits(g)
    k = np.logspace(-1.5, 1.5, w["w1"].shape[1])  # hidden units 1000x apart, the same function
    _set(g, "w1", w["w1"] * k)
    _set(g, "b1", w["b1"] * k)
    _set(g, "w2", w["w2"] / k[:, None])
    model = Model(g, tiny.contract, source="imbalanced tiny")
    s = compile_model(model, tiny_eval, [_t("onnxruntime:int8"), _t("dpu:b2304")], tmp_path / "o", calib=tiny_ds,
                      budget={"eacc": 100.0}, options=CompileOptions(equalize="on"))
    assert not [r.error for r in s.results if r.error]
    eq = {m.parent.name: json.loads(m.read_text())["equalization"] for m in (tmp_path / "o").glob("*/manifest.json")}
    ort = next(v for k_, v in eq.items() if k_.startswith("onnxruntime"))
    dpu = next(v for k_, v in eq.items() if k_.startswith("dpu"))
    assert ort["applied"] and ort["used_by_this_target"] and ort["pairs"][0]["imbalance_before"] > 100
    assert not dpu["used_by_this_target"] and "power-of-two" in dpu["why_not"]


def conv1d_chain(seed: int = 0, *, with_pool: bool = True, transpose_out: bool = False) -> onnx.ModelProto:
    """tf2onnx's Keras Conv1D pattern on a (N, T, 1) sequence: Unsqueeze -> Conv -> Relu -> Squeeze, then
    Unsqueeze -> Reshape -> AveragePool -> Squeeze (a 1-D pooling, with a Shape reader as tf2onnx adds), then the
    next Conv1D, or a ConvTranspose (``transpose_out``); conv1's channels 100x apart, compensated in the next
    layer (the same function)."""
    rng = np.random.default_rng(seed)
    c1, c2, t = 6, 4, 16
    k = np.logspace(-1, 1, c1)
    w1 = rng.normal(0, 0.5, (c1, 1, 1, 3)) * k[:, None, None, None]
    b1 = rng.normal(0, 0.1, c1) * k
    w2 = (rng.normal(0, 0.5, (c1, c2, 1, 3)) / k[:, None, None, None] if transpose_out
          else rng.normal(0, 0.5, (c2, c1, 1, 3)) / k[None, :, None, None])
    f = np.float32
    inits = [numpy_helper.from_array(a.astype(f), n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"))]
    inits += [numpy_helper.from_array(np.array(v, np.int64), n) for v, n in
              (([2], "ax2"), ([-1, c1, 1, t], "pool_shape"), ([1], "ax1"), ([0, 1, 2], "seq_shape"))]
    nodes = [helper.make_node("Transpose", ["input"], ["seq"], name="to_channels", perm=[0, 2, 1]),  # (N, 1, T)
             helper.make_node("Unsqueeze", ["seq", "ax2"], ["x4"], name="c1/ExpandDims"),
             helper.make_node("Conv", ["x4", "w1", "b1"], ["y1"], name="c1", kernel_shape=[1, 3], pads=[0, 1, 0, 1]),
             helper.make_node("Relu", ["y1"], ["a1"], name="c1/Relu"),
             helper.make_node("Squeeze", ["a1", "ax2"], ["s1"], name="c1/Squeeze")]
    cur = "s1"
    if with_pool:
        nodes += [helper.make_node("Unsqueeze", [cur, "ax2"], ["p0"], name="pool/ExpandDims"),
                  helper.make_node("Reshape", ["p0", "pool_shape"], ["p1"], name="pool/Reshape"),
                  helper.make_node("AveragePool", ["p1"], ["p2"], name="pool", kernel_shape=[1, 2], strides=[1, 2]),
                  helper.make_node("Squeeze", ["p2", "ax2"], ["p3"], name="pool/Squeeze"),
                  helper.make_node("Shape", ["p3"], ["p3_shape"], name="pool/Shape")]
        cur = "p3"
    nodes += [helper.make_node("Unsqueeze", [cur, "ax2"], ["x2"], name="c2/ExpandDims"),
              helper.make_node("ConvTranspose" if transpose_out else "Conv", ["x2", "w2"], ["y2"], name="c2",
                               kernel_shape=[1, 3], **({"strides": [1, 2]} if transpose_out else {"pads": [0, 1, 0, 1]})),
              helper.make_node("Squeeze", ["y2", "ax2"], ["output"], name="c2/Squeeze")]
    graph = helper.make_graph(nodes, "conv1d_chain", [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [None, t, 1])],
                              [helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, [None, None, None]),
                               helper.make_tensor_value_info("p3_shape", onnx.TensorProto.INT64, [3])] if with_pool else
                              [helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, [None, None, None])], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(m)
    return m


def _seq(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (n, 16, 1)).astype(np.float32)


@pytest.mark.parametrize("with_pool", [False, True])
def test_pairs_are_followed_through_conv1d_squeezes_and_pooling(with_pool):
    from nilmc.quantization.equalize import path_shapes

    m = conv1d_chain(with_pool=with_pool)
    x, held_out = _seq(128), _seq(64, seed=9)
    # without shapes the axis moves cannot be followed: skipped with the op that stopped it (the old behaviour)
    assert not find_pairs(m)[0] and any("Squeeze" in s.reason for s in find_pairs(m)[1])
    pairs, _ = find_pairs(m, path_shapes(m, x))
    assert [(p.first.name, p.second.name) for p in pairs] == [("c1", "c2")]
    assert pairs[0].path[:2] == ("Squeeze", "Unsqueeze") and ("AveragePool" in pairs[0].path) == with_pool
    res = equalize_graph(m, x, min_imbalance=2.0)
    assert res.changed and res.pairs[0].imbalance_before > 20 and res.pairs[0].imbalance_after < res.pairs[0].imbalance_before / 4
    ref, out = run(m, held_out), run(res.graph, held_out)
    assert np.max(np.abs(out - ref)) <= RTOL * np.max(np.abs(ref))


def test_conv_transpose_is_an_equalization_target():
    m = conv1d_chain(with_pool=False, transpose_out=True)
    x, held_out = _seq(128), _seq(64, seed=9)
    res = equalize_graph(m, x, min_imbalance=2.0)
    assert [(p.first, p.second) for p in res.pairs] == [("c1", "c2")]
    w2_before, w2_after = _inits(m)["w2"], _inits(res.graph)["w2"]
    ratio = (w2_after / w2_before)[:, 0, 0, 0]  # ConvTranspose weights are (C_in, C_out, 1, k): scaled along axis 0
    assert np.allclose((w2_after / w2_before), ratio[:, None, None, None], rtol=1e-5) and ratio.max() / ratio.min() > 5
    assert np.max(np.abs(run(res.graph, held_out) - run(m, held_out))) <= RTOL * np.max(np.abs(run(m, held_out)))


def test_a_reshape_that_merges_the_channel_axis_stops_the_path():
    from nilmc.quantization.equalize import _reshaped_axis

    assert _reshaped_axis((2, 6, 16), (2, 6, 1, 16), 1) == 1  # Unsqueeze after the channels: kept
    assert _reshaped_axis((2, 6, 1, 16), (2, 1, 6, 16), 1) == 2  # the unit axis moves before them: followed
    assert _reshaped_axis((2, 16, 6), (2, 96), 2) is None  # flattened with time: channel c no longer one axis
    assert _reshaped_axis((2, 6, 16), (2, 3, 32), 1) is None  # split


def test_slice_or_pad_on_the_channel_axis_stops_the_path():
    from nilmc.quantization.equalize import path_shapes

    m = conv1d_chain(with_pool=False)
    # slice the channel axis (1) of the squeezed tensor: channels 0..3 only; a per-channel scale would not carry
    m.graph.initializer.extend([numpy_helper.from_array(np.array(v, np.int64), n) for v, n in
                                (([0], "st"), ([6], "en"), ([1], "axc"))])
    sq = next(n for n in m.graph.node if n.name == "c1/Squeeze")
    sl = helper.make_node("Slice", ["s1", "st", "en", "axc"], ["s1_sliced"], name="cut")
    nxt = next(n for n in m.graph.node if n.name == "c2/ExpandDims")
    nxt.input[0] = "s1_sliced"
    m.graph.node.insert(list(m.graph.node).index(sq) + 1, sl)
    pairs, skipped = find_pairs(m, path_shapes(m, _seq(8)))
    assert not pairs and any("Slice" in s.reason and "one channel" in s.reason for s in skipped)


@pytest.mark.tf
@pytest.mark.slow
def test_keras_conv1d_twin_takes_the_equalized_weights(tmp_path):
    """A Keras Conv1D -> AveragePooling1D -> Conv1D -> Conv1DTranspose model, through tf2onnx: the pairs are found
    through tf2onnx's squeezes and the Keras twin takes the same weights ((k, in, out) kernels)."""
    from helpers import tiny_dataset

    from nilmc.compiler.frontend import keras_to_onnx
    from nilmc.compiler.tfcompat import import_tf
    from nilmc.quantization.equalize import equalize_keras
    from nilmc.training.seq2point import contract_for

    tf = import_tf("test")
    ds = tiny_dataset(64)
    contract = contract_for(ds, "kettle", "C")
    tf.keras.utils.set_random_seed(0)
    inp = tf.keras.Input(shape=ds.input_shape, name="input")
    h = tf.keras.layers.Reshape((ds.input_shape[0], -1))(inp)
    h = tf.keras.layers.Conv1D(6, 3, padding="same", activation="relu", name="conv1")(h)
    h = tf.keras.layers.AveragePooling1D(2)(h)
    h = tf.keras.layers.Conv1D(4, 3, padding="same", activation="relu", name="conv2")(h)
    h = tf.keras.layers.Conv1DTranspose(3, 3, strides=2, padding="same", activation="relu", name="tconv")(h)
    h = tf.keras.layers.Flatten()(h)
    km = tf.keras.Model(inp, tf.keras.layers.Dense(1, name="out")(h))
    k = np.logspace(-1, 1, 6).astype(np.float32)
    w1, b1 = km.get_layer("conv1").get_weights()
    km.get_layer("conv1").set_weights([w1 * k, b1 * k])
    w2, b2 = km.get_layer("conv2").get_weights()
    km.get_layer("conv2").set_weights([w2 / k[None, :, None], b2])
    model = keras_to_onnx(km, contract)
    x = contract.prepare(ds.raw_x())
    res = equalize_graph(model.graph, x, min_imbalance=2.0)
    assert {p.first.split("/")[-2] for p in res.pairs} >= {"conv1"}, [(s.first, s.reason) for s in res.skipped]
    twin = equalize_keras(km, model.graph, res)
    y_twin = twin.predict(x, verbose=0)
    assert np.max(np.abs(y_twin - run(res.graph, x))) <= 1e-5 * np.max(np.abs(y_twin))


def test_direct_pairs_only_skips_the_joined_ones():
    """The compile's auto mode also scores the direct pairs alone (a joined pair can cost what a direct one gains)."""
    from nilmc.quantization.equalize import path_shapes

    m = conv1d_chain(with_pool=True)
    shapes = path_shapes(m, _seq(8))
    assert [p.first.name for p in find_pairs(m, shapes)[0]] == ["c1"]
    pairs, skipped = find_pairs(m, shapes, paths=False)
    assert not pairs and any(s.first == "c1" and "only direct pairs" in s.reason for s in skipped)
    res = equalize_graph(m, _seq(64), min_imbalance=2.0)
    assert res.pairs[0].path[:2] == ("Squeeze", "Unsqueeze") and res.pairs[0].to_json()["through"][0] == "Squeeze"
    assert [(p.first.name, p.second.name) for p in find_pairs(build_seq2point(), paths=False)[0]] == [("conv1", "conv2"), ("dense1", "dense2")]

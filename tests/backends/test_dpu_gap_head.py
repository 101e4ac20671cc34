"""A Keras GlobalAveragePooling1D -> Dense head on the DPU (found by taking unseen models through ``nilmc compile``).

tf2onnx writes it as ``GlobalAveragePool -> Squeeze -> MatMul -> Add``. The squeezed (N, C) tensor is a flat feature
vector the DPU's dense reads (it was taken for a labelled view, so the dense fell to the CPU); and a dense that does
fall to the CPU is one CPU op for MatMul + bias Add whose output is the layer's, so the quantization point after the
bias Add belongs to the CPU stage (it had no fix point: "the DPU graph and the ONNX model disagree", exit 2).
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from nilmc.backends.dpu import DPUBackend, quant
from nilmc.backends.dpu.ir import from_onnx
from nilmc.backends.dpu.ops import OpKind
from nilmc.compiler.model import Model
from nilmc.quantization.context import QuantContext

FRAMES, FEATURES = 10, 9


def _gap_head(tiny_ds, stride: int):
    """Keras (N, 10, 9) -> Conv1D 8 -> Conv1D 8 (``stride``) -> GlobalAveragePooling1D -> Dense 1, through nilmc's exporter."""
    from nilmc.compiler.frontend import keras_to_onnx
    from nilmc.compiler.tfcompat import import_tf
    from nilmc.training.seq2point import contract_for

    tf = import_tf("test")
    tf.keras.utils.set_random_seed(0)
    layers = tf.keras.layers
    inp = layers.Input(shape=(FRAMES, FEATURES), name="input")
    h = layers.Conv1D(8, 3, padding="same", activation="relu", name="conv1")(inp)
    h = layers.Conv1D(8, 3, strides=stride, padding="same", activation="relu", name="conv2")(h)
    h = layers.GlobalAveragePooling1D(name="gap")(h)
    km = tf.keras.Model(inp, layers.Dense(1, name="out")(h))
    return keras_to_onnx(km, contract_for(tiny_ds, "kettle", "C").with_(layout="NWC"), source=f"gap_head_s{stride}")


def _lower_and_run(model, tiny_ds, tmp_path):
    art = DPUBackend().lower(model, tmp_path, precision="b2304", options={"quant": QuantContext(model, tiny_ds)})
    x = model.contract.prepare(tiny_ds.raw_x()[:64]).astype(np.float32)
    with DPUBackend().runner(art) as r:
        y = r.infer({model.input_name: x})[model.output_name]
    ref = quant.fp32_outputs(model.graph, x)
    return art, 10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / np.sum((y - ref).astype(np.float64) ** 2))


@pytest.mark.tf
def test_a_squeezed_gap_feeds_the_dense_on_the_dpu(tiny_ds, tmp_path) -> None:
    model = _gap_head(tiny_ds, stride=2)  # 5 frames left: the GAP is a 1x5 average pool the DPU runs
    g = from_onnx(model.graph)
    assert not g.unsupported, [(op.name, op.reason) for op in g.unsupported]
    kinds = [op.kind for op in g.ops]
    assert kinds[-3:] == [OpKind.AVGPOOL, OpKind.FLATTEN, OpKind.DENSE]
    art, sqnr = _lower_and_run(model, tiny_ds, tmp_path)
    devices = {d["kind"]: d["device"] for d in art.info["placement"]["devices"]}
    assert devices["avgpool"] == "DPU" and devices["flatten"] == "DPU" and sqnr > 20, (art.info["placement"]["devices"], sqnr)


def _clip_head(tiny) -> Model:
    """The tiny MLP with a middle dense (16, ReLU) and its head clipped (Clip, a ReLU6-style activation the DPU's dense
    does not take): input -> dense 1 (CPU, precise input) -> dense 2 (DPU) -> dense 3 + Clip (CPU post stage)."""
    g = onnx.ModelProto()
    g.CopyFrom(tiny.graph)
    rng = np.random.default_rng(0)
    nodes = list(g.graph.node)
    head = next(n for n in nodes if "output" in n.output)
    head.output[0] = "pre_clip"
    mid = [helper.make_node("MatMul", ["r1", "wm"], ["mmm"]), helper.make_node("Add", ["mmm", "bm"], ["am"]),
           helper.make_node("Relu", ["am"], ["rm"])]
    for n in nodes:
        if n.op_type == "MatMul" and n.input[0] == "r1":
            n.input[0] = "rm"
    del g.graph.node[:]
    g.graph.node.extend([*nodes[:4], *mid, *nodes[4:], helper.make_node("Clip", ["pre_clip", "lo", "hi"], ["output"])])
    g.graph.initializer.extend([numpy_helper.from_array(rng.normal(0, 0.25, (16, 16)).astype(np.float32), "wm"),
                                numpy_helper.from_array(np.full(16, 0.1, np.float32), "bm"),
                                numpy_helper.from_array(np.array(-100, np.float32), "lo"), numpy_helper.from_array(np.array(100, np.float32), "hi")])
    onnx.checker.check_model(g)
    return Model(g, tiny.contract, source="clip_head")


def test_a_dense_on_the_cpu_owns_its_fused_output(tiny, tiny_ds, tmp_path) -> None:
    model = _clip_head(tiny)
    head = from_onnx(model.graph).producer("output")  # the CPU op is MatMul + bias Add + Clip, and its output is the Clip's
    assert head.kind == OpKind.UNSUPPORTED and "Clip" in head.reason and len(head.onnx_nodes) == 3, head
    art, sqnr = _lower_and_run(model, tiny_ds, tmp_path)
    where = {d["op"]: (d["device"], d.get("stage")) for d in art.info["placement"]["devices"]}
    assert where[head.name] == ("CPU", "cpu_post") and sqnr > 20, (where, sqnr)

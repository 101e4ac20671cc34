"""QDQ weights stored as uint8 + 128 (:func:`qdq.portable_weights`): the same values, and no int16 saturation.

onnxruntime fuses DQ -> MatMul/Conv with uint8 activations and int8 weights into a u8 x s8 GEMM; on x86 CPUs without
VNNI its kernel adds pairs of products with ``vpmaddubsw``, which saturates at int16 (255 * 127 * 2 > 32767). Found on
an AVX2 AMD EPYC: the quantization tests' seq2point gave 10.7 dB instead of 30.8 dB on every nilmc measurement and in
the onnxruntime:int8 artifact. The saturating graph below is exact only with the uint8 storage on such a CPU (on a
VNNI / AMX CPU both forms are exact); the storage itself is checked everywhere.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from nilmc.quantization.qdq import portable_weights


def _saturating_qdq(k: int = 64) -> onnx.ModelProto:
    """x (N, k) -> Q/DQ uint8 (scale 1) -> MatMul with int8 weights 127 (scale 1, zero point 0) -> (N, 2)."""
    inits = [numpy_helper.from_array(np.float32(1.0), "s"), numpy_helper.from_array(np.uint8(0), "zx"),
             numpy_helper.from_array(np.full((k, 2), 127, np.int8), "w_q"), numpy_helper.from_array(np.float32(1.0), "sw"),
             numpy_helper.from_array(np.int8(0), "zw")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zx"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "zx"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w_q", "sw", "zw"], ["w"]),
             helper.make_node("MatMul", ["xd", "w"], ["y"])]
    g = helper.make_graph(nodes, "sat", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m


def test_uint8_storage_keeps_every_value_and_is_exact() -> None:
    m = _saturating_qdq()
    portable, names = portable_weights(m)
    assert names == ["w_q"] and portable is not m
    inits = {t.name: numpy_helper.to_array(t) for t in portable.graph.initializer}
    assert inits["w_q"].dtype == np.uint8 and inits["zw"].dtype == np.uint8 and int(inits["zw"]) == 128
    np.testing.assert_array_equal(inits["w_q"].astype(np.int64) - int(inits["zw"]), np.full((64, 2), 127))
    assert {t.name: t.data_type for t in m.graph.initializer}["w_q"] == TensorProto.INT8  # the input is left alone
    x = np.full((3, 64), 255.0, np.float32)
    y = ort.InferenceSession(portable.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(y, np.full((3, 2), 255.0 * 127 * 64, np.float32))  # saturated pairs give 32 * 32767


def test_asymmetric_weights_keep_their_zero_point_and_float_graphs_are_untouched() -> None:
    m = _saturating_qdq(8)
    for t in m.graph.initializer:
        if t.name == "zw":
            t.CopyFrom(numpy_helper.from_array(np.int8(-3), "zw"))
    portable, _ = portable_weights(m)
    inits = {t.name: numpy_helper.to_array(t) for t in portable.graph.initializer}
    assert int(inits["zw"]) == 125 and np.all(inits["w_q"].astype(np.int64) - 125 == 130)
    plain = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "f",
                                                [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                                                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])]))
    assert portable_weights(plain) == (plain, [])


def test_the_onnxruntime_artifact_stores_its_weights_as_uint8(tmp_path) -> None:
    from conftest import build_seq2point
    from helpers import tiny_dataset

    from nilmc.backends.onnxruntime_backend import OnnxRuntimeBackend
    from nilmc.calibration_data.normalization import Normalization, NormalizationSpec
    from nilmc.compiler.contract import ModelContract
    from nilmc.compiler.model import Model
    from nilmc.quantization.context import QuantContext

    ds = tiny_dataset(200, seed=0)
    contract = ModelContract(input_shape=(10, 9, 1), normalization=NormalizationSpec(Normalization.C, ds.train_stats),
                             appliance="kettle", on_threshold_w=1000.0)
    model = Model(build_seq2point(), contract, source="s2p")
    art = OnnxRuntimeBackend().lower(model, tmp_path, precision="int8", options={"quant": QuantContext(model, ds)})
    saved = onnx.load(str(tmp_path / "model_qdq.onnx"))
    weights = {t.name: t.data_type for t in saved.graph.initializer if t.name.endswith("/W_quantized")}
    assert weights and set(weights.values()) == {TensorProto.UINT8}, weights
    assert sorted(art.info["weight_storage"]["stored_as_uint8_plus_128"]) == sorted(weights)


def test_a_zero_point_two_weights_share_is_shifted_once() -> None:
    m = _saturating_qdq(8)
    m.graph.initializer.append(numpy_helper.from_array(np.full((2, 2), 5, np.int8), "w2_q"))
    m.graph.node.extend([helper.make_node("DequantizeLinear", ["w2_q", "sw", "zw"], ["w2"]), helper.make_node("MatMul", ["y", "w2"], ["y2"])])
    inits = {t.name: numpy_helper.to_array(t) for t in portable_weights(m)[0].graph.initializer}
    assert int(inits["zw"]) == 128 and np.all(inits["w2_q"] == 133) and np.all(inits["w_q"] == 255)

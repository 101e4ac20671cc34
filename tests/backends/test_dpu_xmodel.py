"""The quantized xmodel: XIR protobuf from our own .proto, written in topological order, read back exactly."""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import nilmc.backends.dpu as dpu_pkg
from nilmc.backends.dpu import emulator as emu
from nilmc.backends.dpu import quant, testing, xir_pb2
from nilmc.backends.dpu.ir import from_onnx
from nilmc.backends.dpu.xmodel import LABEL, build_xmodel, exact_multiple, read_xmodel, serialize
from nilmc.bitstreams import load_target
from nilmc.compiler.errors import BadInputError

LIMITS = load_target("b4096").limits
DPU_DIR = Path(dpu_pkg.__file__).parent


def _quantized(model: onnx.ModelProto, seed: int = 1):
    graph = from_onnx(model)
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    x = np.random.default_rng(seed).normal(0, 1, (128, *dims)).astype(np.float32)
    return graph, quant.calibrate(model, graph, {"input": x}, LIMITS), x


MODELS = {
    "seq2point": lambda: testing.seq2point(convs=((5, 8), (3, 16)), dense=(32,)),
    "leaky_conv": lambda: testing.conv_layer(activation="LeakyRelu", stride=(2, 1)),
    "add": lambda: testing.add_layer(),
    "maxpool": lambda: testing.pool_layer("MaxPool"),
    "avgpool": lambda: testing.pool_layer("AveragePool", kernel=(3, 3), stride=(1, 1)),
    "gemm": lambda: testing.dense_layer(gemm=True),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_round_trip_restores_graph_params_and_results(name: str) -> None:
    graph, params, x = _quantized(MODELS[name]())
    data = serialize(build_xmodel(graph, params))
    g2, p2 = read_xmodel(data)
    assert [(o.kind, o.name, o.inputs, o.output, o.shape, o.activation) for o in g2.ops] == \
           [(o.kind, o.name, o.inputs, o.output, o.shape, o.activation) for o in graph.ops]
    for a, b in zip(graph.ops, g2.ops):
        for key in ("kernel", "stride", "dilation", "pads"):
            if key in a.attrs:
                assert tuple(a.attrs[key]) == tuple(b.attrs[key]), (a.name, key)
    assert p2.fix == params.fix
    for op, wq in params.weights.items():
        np.testing.assert_array_equal(p2.weights[op].weight_q, wq.weight_q)
        assert (p2.weights[op].fw, p2.weights[op].fb) == (wq.fw, wq.fb)
        if wq.bias_q is not None:
            np.testing.assert_array_equal(p2.weights[op].bias_q, wq.bias_q)
    assert g2.output_names == graph.output_names
    a = emu.DpuEmulator(graph, params).infer({"input": x})
    b = emu.DpuEmulator(g2, p2).infer({"input": x})
    np.testing.assert_array_equal(a["output"], b["output"])


def test_layout_is_topological_with_fix_ops_and_op_defs() -> None:
    graph, params, _ = _quantized(MODELS["seq2point"]())
    g = build_xmodel(graph, params, name="net")
    seen: set[str] = set()
    produced_by = {}
    for node in g.op_node:
        for arg in node.args:
            assert all(src in seen for src in arg.arg_ops), f"{node.op_name} uses an op defined later"
        seen.add(node.op_name)
        produced_by[node.op_name] = node
    types = {n.op_type for n in g.op_node}
    assert {"data", "const", "fix", "conv2d", "relu", "matmul", "flatten"} <= types
    assert {d.name for d in g.op_defs} == types
    assert list(g.subg_root.op_name) == [n.op_name for n in g.op_node] and not g.subg_root.subg_child
    for node in g.op_node:
        if node.op_type == "fix":
            a = node.op_attr
            assert a["bit_width"].int32_value == 8 and a["round_mode"].string_value == "DPU_ROUND" and a["if_signed"].bool_value
        if node.op_type == "const":
            fix = next(n for n in g.op_node if n.op_type == "fix" and n.args[0].arg_ops[0] == node.op_name)
            values = np.frombuffer(node.op_attr["data"].bytes_value.value, "<f4")
            assert exact_multiple(values, fix.op_attr["fix_point"].int32_value)
        if node.op_type in ("conv2d", "matmul", "relu", "flatten", "data"):  # every float op is followed by its fix
            consumers = [n for n in g.op_node if any(node.op_name in a.arg_ops for a in n.args)]
            assert consumers and (consumers[0].op_type == "fix" or node.op_type in ("conv2d", "matmul")), node.op_name
    conv = next(n for n in g.op_node if n.op_type == "conv2d")
    assert list(conv.op_attr["kernel"].int32_vec_value.value) == [5, 5]
    assert [a.arg_name for a in conv.args] == ["input", "weights", "bias"]
    mm = next(n for n in g.op_node if n.op_type == "matmul")
    assert mm.op_attr["transpose_b"].bool_value and len(mm.args[0].arg_ops) == 2
    assert LABEL == "quantized xmodel — compile with vai_c_xir"


def test_serialization_is_deterministic() -> None:
    graph, params, _ = _quantized(MODELS["add"]())
    assert serialize(build_xmodel(graph, params)) == serialize(build_xmodel(graph, params))


def test_garbage_is_a_typed_error() -> None:
    with pytest.raises(BadInputError, match="not an XIR xmodel"):
        read_xmodel(b"\xff\xff\xff not a protobuf")


def test_regenerating_from_the_proto_gives_the_committed_file(tmp_path: Path) -> None:
    committed = (DPU_DIR / "xir_pb2.py").read_text()
    assert "Generated by the protocol buffer compiler.  DO NOT EDIT!" in committed
    if importlib.util.find_spec("grpc_tools") is None:
        pytest.skip("grpcio-tools (protoc) is not installed")
    want = re.search(r"# Protobuf Python Version: (\S+)", committed).group(1)  # type: ignore[union-attr]
    version = subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "--version"], capture_output=True, text=True).stdout.split()[-1]
    if want.split(".", 1)[1] != version:  # gencode 7.35.1 comes from libprotoc 35.1
        pytest.skip(f"installed libprotoc {version} is not the generator of the committed file (gencode {want})")
    proc = subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{DPU_DIR}", f"--python_out={tmp_path}", str(DPU_DIR / "xir.proto")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "xir_pb2.py").read_text() == committed


def test_schema_field_numbers_follow_graph_proto_v2() -> None:
    f = {fd.name: fd.number for fd in xir_pb2.Graph.DESCRIPTOR.fields}
    assert f == {"graph_name": 1, "op_node": 5, "subg_root": 10, "graph_attr": 11, "op_defs": 101}
    assert {fd.name: fd.number for fd in xir_pb2.OPNode.DESCRIPTOR.fields} == \
        {"op_name": 1, "op_type": 2, "op_attr": 3, "args": 4, "output_tensor": 5}
    t = {fd.name: fd.number for fd in xir_pb2.Tensor.DESCRIPTOR.fields}
    assert t == {"tensor_name": 1, "tensor_dim": 2, "data_type": 5, "tensor_bit_width": 6, "tensor_attr": 10}
    a = {fd.name: fd.number for fd in xir_pb2.AttrValue.DESCRIPTOR.fields}
    assert a["bool_value"] == 4 and a["bytes_value"] == 12 and a["map_string_2_string_vec_value"] == 32 and len(a) == 29
    assert xir_pb2.DESCRIPTOR.package == "serial_v2"

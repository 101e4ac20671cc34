"""Quantized xmodel writer and reader (XIR ``Graph`` protobuf, ``xir_pb2`` generated from ``xir.proto``).

What is written is a *quantized* xmodel, the input of ``vai_c_xir`` - the closed
compiler that produces the DPU instructions - not a compiled one. Its ops, in
topological order (inputs first, as XIR loads them):

* ``data`` (attrs ``shape``, ``data_type``) then ``fix`` for every graph input;
* per conv / dense: ``const`` weights (``[OC, KH, KW, IC]`` / ``[out, in]``) and bias, each
  followed by ``fix``; ``conv2d`` (``kernel`` / ``stride`` / ``dilation`` as ``[w, h]``,
  ``pad_mode`` FLOOR, ``pad`` ``[left, right, top, bottom]``) or ``matmul``
  (``transpose_b`` true); the fused ``relu`` / ``leaky-relu`` (alpha 26/256); ``fix``;
* ``flatten``, ``maxpool2d``, ``avgpool2d``, ``add``, ``relu``, ``leaky-relu``, each followed by ``fix``.

With a CPU/DPU partition (:mod:`nilmc.backends.dpu.partition`) the xmodel holds the DPU subgraph only: its ``data``
ops are the CPU pre stage's outputs (named after the ONNX tensors they are, NHWC), and the graph attribute
``nilmc_cpu_stages`` names the ONNX files of the CPU stages beside it (``{"pre": "cpu_pre.onnx", "post": ...}``).

Every ``fix`` carries ``fix_point``, ``bit_width`` 8, ``round_mode`` "DPU_ROUND" and
``if_signed`` true; const data are float32 values that are exact multiples of
``2**-fix_point``, so the integers are recovered exactly. The graph holds the op
definitions of the op types it uses and a root subgraph listing every op.
Naming: an IR op keeps its name; its output's ``fix`` op is ``<IR tensor>_fix``;
constants are ``<op>_weights`` / ``<op>_bias``; a fused activation is ``<op>_<act>``.

:func:`read_xmodel` parses such a file back into the DPU graph and parameters the
emulator runs, so the runner verifies exactly what was written.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from nilmc.backends.dpu import xir_pb2 as pb
from nilmc.backends.dpu.ir import DpuGraph, DpuOp
from nilmc.backends.dpu.ops import ACTIVATION_XIR, BY_XIR_TYPE, DPU_LEAKY_ALPHA, OpKind, record
from nilmc.backends.dpu.quant import DpuParams, WeightQuant, quantize_values
from nilmc.compiler.errors import BadInputError

FLOAT, XINT = 4, 2  # Tensor.data_type codes
FIX_SUFFIX = "_fix"
LABEL = "quantized xmodel — compile with vai_c_xir"

# Op definitions of the op types nilmc writes: (input args, attrs), each (name, occur, annotation).
_R, _O, _REP = pb.OpArgDef.REQUIRED, pb.OpArgDef.OPTIONAL, pb.OpArgDef.REQUIRED_AND_REPEATED
_AR, _AO = pb.AttrDef.REQUIRED, pb.AttrDef.OPTIONAL
_OP_DEFS: dict[str, tuple[list[tuple[str, int, str]], list[tuple[str, int, str]]]] = {
    "data": ([], [("shape", _AR, "int32 vector, NHWC"), ("data_type", _AR, "element type, e.g. FLOAT32")]),
    "const": ([], [("shape", _AR, "int32 vector"), ("data_type", _AR, "element type"), ("data", _AR, "raw little-endian values")]),
    "fix": ([("input", _R, "tensor to quantize")],
            [("fix_point", _AR, "real = q * 2^-fix_point"), ("bit_width", _AR, "8"), ("round_mode", _AR, "DPU_ROUND"),
             ("if_signed", _AR, "signed codes")]),
    "conv2d": ([("input", _R, "NHWC feature map"), ("weights", _R, "[OC, KH, KW, IC]"), ("bias", _O, "[OC]")],
               [("kernel", _AR, "[w, h]"), ("stride", _AR, "[w, h]"), ("dilation", _AO, "[w, h]"),
                ("pad_mode", _AO, "FLOOR, CEIL, SAME or VALID"), ("pad", _AO, "[left, right, top, bottom]")]),
    "matmul": ([("input", _REP, "[a, b]"), ("bias", _O, "[out]")],
               [("transpose_a", _AO, "bool"), ("transpose_b", _AO, "bool")]),
    "relu": ([("input", _R, "")], []),
    "leaky-relu": ([("input", _R, "")], [("alpha", _AR, "negative slope")]),
    "flatten": ([("input", _R, "")], [("start_axis", _AO, "int32"), ("end_axis", _AO, "int32")]),
    "maxpool2d": ([("input", _R, "")], [("kernel", _AR, "[w, h]"), ("stride", _AR, "[w, h]"), ("pad_mode", _AO, ""),
                                         ("pad", _AO, "[left, right, top, bottom]"), ("global", _AO, "bool")]),
    "avgpool2d": ([("input", _R, "")], [("kernel", _AR, "[w, h]"), ("stride", _AR, "[w, h]"), ("pad_mode", _AO, ""),
                                         ("pad", _AO, "[left, right, top, bottom]"), ("global", _AO, "bool"),
                                         ("count_include_pad", _AO, "bool"), ("count_include_invalid", _AO, "bool")]),
    "add": ([("input", _REP, "two or more tensors")], []),
}
_ACT_TYPES = ACTIVATION_XIR


# --------------------------------------------------------------------------- attribute helpers
def _attr(value: Any) -> pb.AttrValue:
    a = pb.AttrValue()
    if isinstance(value, bool):
        a.bool_value = value
    elif isinstance(value, int):
        a.int32_value = value
    elif isinstance(value, float):
        a.float_value = value
    elif isinstance(value, str):
        a.string_value = value
    elif isinstance(value, bytes):
        a.bytes_value.value = value
    elif isinstance(value, dict):
        a.map_string_2_string_value.value.update({str(k): str(v) for k, v in value.items()})
    elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        a.string_vec_value.value.extend(value)
    elif isinstance(value, (list, tuple)):
        a.int32_vec_value.value.extend(int(v) for v in value)
    else:
        raise TypeError(f"cannot encode attribute value {value!r}")
    return a


def _value(a: pb.AttrValue) -> Any:
    kind = a.WhichOneof("value")
    if kind is None:
        return None
    v = getattr(a, kind)
    if kind == "bytes_value":
        return v.value
    if kind.startswith("map_string_2_"):
        return dict(v.value)
    if kind.endswith("_vec_value"):
        return list(v.value)
    return v


def _attrs(m: Any) -> dict[str, Any]:
    return {k: _value(v) for k, v in m.items()}


# --------------------------------------------------------------------------- writer
class _Writer:
    def __init__(self, graph: DpuGraph, params: DpuParams, name: str, graph_attrs: Mapping[str, Any]) -> None:
        self.graph, self.params = graph, params
        self.g = pb.Graph(graph_name=name)
        self.fix_op: dict[str, str] = {}  # IR tensor -> name of its fix op
        self.types: list[str] = []
        for k, v in sorted(graph_attrs.items()):
            self.g.graph_attr[k].CopyFrom(_attr(v))

    def op(self, name: str, op_type: str, args: Iterable[tuple[str, list[str]]], attrs: Mapping[str, Any],
           dims: tuple[int, ...], *, dtype: int = FLOAT, bits: int = 32) -> str:
        node = self.g.op_node.add(op_name=name, op_type=op_type)
        for k in sorted(attrs):
            node.op_attr[k].CopyFrom(_attr(attrs[k]))
        for arg, ops in args:
            node.args.add(arg_name=arg, arg_ops=ops)
        node.output_tensor.tensor_name = name
        node.output_tensor.tensor_dim.extend(int(d) for d in dims)
        node.output_tensor.data_type = dtype
        node.output_tensor.tensor_bit_width = bits
        if op_type not in self.types:
            self.types.append(op_type)
        return name

    def fix(self, name: str, src: str, fix_point: int, dims: tuple[int, ...]) -> str:
        return self.op(name, "fix", [("input", [src])],
                       {"fix_point": int(fix_point), "bit_width": 8, "round_mode": "DPU_ROUND", "if_signed": True}, dims)

    def const(self, name: str, values: np.ndarray, fix_point: int) -> str:
        v = np.ascontiguousarray(values, dtype="<f4")
        self.op(name, "const", [], {"shape": list(v.shape), "data_type": "FLOAT32", "data": v.tobytes()}, v.shape)
        return self.fix(name + FIX_SUFFIX, name, fix_point, v.shape)

    def output_fix(self, op: DpuOp, src: str) -> None:
        dims = (1, *op.shape)
        self.fix_op[op.output] = self.fix(op.output + FIX_SUFFIX, src, self.params.fix[op.output], dims)

    def activation(self, op: DpuOp, src: str) -> str:
        if op.activation is None:
            return src
        attrs = {"alpha": DPU_LEAKY_ALPHA} if op.activation == "leaky_relu" else {}
        return self.op(f"{op.name}_{op.activation}", _ACT_TYPES[op.activation], [("input", [src])], attrs, (1, *op.shape))

    def write(self) -> pb.Graph:
        for op in self.graph.ops:
            self._write_op(op)
        self.g.subg_root.subgraph_name = "root"
        self.g.subg_root.op_name.extend(n.op_name for n in self.g.op_node)
        for t in self.types:
            self.g.op_defs.append(_op_def(t))
        return self.g

    def _write_op(self, op: DpuOp) -> None:
        """One IR op as XIR ops, from its op-table record (``xir_type``, ``xir_attrs``)."""
        rec = record(op.kind)
        if rec.xir_type is None:
            raise BadInputError(f"op {op.name!r} ({op.attrs.get('op_type')}) has no XIR form in nilmc's writer: {op.reason}",
                                "the DPU lowering covers conv, dense, pooling, add, ReLU and LeakyReLU")
        if op.kind == OpKind.INPUT:
            self._input(op)
        elif rec.weighted:
            self._weighted(op, rec.xir_type, rec.xir_attrs(op))
        else:
            main = self.op(op.name, rec.xir_type, [("input", [self.fix_op[t] for t in op.inputs])], rec.xir_attrs(op), (1, *op.shape))
            self.output_fix(op, self.activation(op, main))

    def _input(self, op: DpuOp) -> None:
        dims = (1, *op.shape)
        self.op(op.name, "data", [], {"shape": list(dims), "data_type": "FLOAT32"}, dims)
        self.output_fix(op, op.name)

    def _weighted(self, op: DpuOp, op_type: str, attrs: dict[str, Any]) -> None:
        wq = self.params.weights[op.name]
        weights = wq.weight_float() if op_type != "matmul" else wq.weight_float().T  # matmul: [out, in] with transpose_b
        w = self.const(op.name + "_weights", weights, wq.fw)
        bias_args: list[tuple[str, list[str]]] = []
        if wq.bias_q is not None and wq.fb is not None:
            bias_args = [("bias", [self.const(op.name + "_bias", wq.bias_float(), wq.fb)])]
        x = [self.fix_op[op.inputs[0]]]
        args = [("input", x + [w])] + bias_args if op_type == "matmul" else [("input", x), ("weights", [w])] + bias_args
        main = self.op(op.name, op_type, args, attrs, (1, *op.shape))
        self.output_fix(op, self.activation(op, main))


def _op_def(op_type: str) -> pb.OpDef:
    args, attrs = _OP_DEFS[op_type]
    d = pb.OpDef(name=op_type, annotation=f"XIR op {op_type} (as written by nilmc)")
    for name, occur, note in args:
        d.input_args.add(name=name, occur_type=occur, data_type=FLOAT, annotation=note)
    for name, occur, note in attrs:
        d.attrs.add(name=name, occur_type=occur, annotation=note)
    return d


def build_xmodel(graph: DpuGraph, params: DpuParams, *, name: str = "nilmc", graph_attrs: Mapping[str, Any] | None = None) -> pb.Graph:
    """The XIR ``Graph`` message of ``graph`` quantized with ``params``.

    ``graph_attrs`` (default none) are extra string / string-map graph attributes; the ONNX
    output names are always recorded under ``nilmc_outputs`` (ONNX output -> IR tensor).
    """
    attrs = {"nilmc_outputs": dict(graph.output_names), "origin": "nilmc", **dict(graph_attrs or {})}
    return _Writer(graph, params, name, attrs).write()


def serialize(g: pb.Graph) -> bytes:
    """Deterministic bytes (map entries sorted), so the same model gives the same file."""
    return g.SerializeToString(deterministic=True)


# --------------------------------------------------------------------------- reader
class _Reader:
    def __init__(self, g: pb.Graph) -> None:
        self.g = g
        self.nodes = {n.op_name: n for n in g.op_node}
        self.consts: dict[str, tuple[np.ndarray, int]] = {}  # const fix op -> (float values, fix point)
        self.tensor_of: dict[str, str] = {}  # fix op -> IR tensor
        self.ops: list[DpuOp] = []
        self.params = DpuParams({}, {})
        self.pending: dict[str, DpuOp] = {}  # xmodel op name -> IR op awaiting its fix

    def read(self) -> tuple[DpuGraph, DpuParams]:
        for n in self.g.op_node:
            getattr(self, "_" + n.op_type.replace("-", "_"), self._table)(n)
        if "nilmc_outputs" in self.g.graph_attr:
            outputs = dict(_value(self.g.graph_attr["nilmc_outputs"]))
        else:  # not written by nilmc: the last op's tensor is the output
            outputs = {self.ops[-1].output: self.ops[-1].output} if self.ops else {}
        inputs = [o.name for o in self.ops if o.kind == "input"]
        graph = DpuGraph(self.ops, inputs, list(outputs.values()), outputs, {o.name: o.shape for o in self.ops if o.kind == "input"})
        return graph, self.params

    def _unknown(self, n: pb.OPNode) -> None:
        raise BadInputError(f"xmodel op {n.op_name!r} has type {n.op_type!r}, which nilmc's reader does not know",
                            "read only quantized xmodels written by nilmc")

    @staticmethod
    def _arg(n: pb.OPNode, name: str) -> list[str]:
        return next((list(a.arg_ops) for a in n.args if a.arg_name == name), [])

    def _source(self, n: pb.OPNode) -> str:
        return self._arg(n, "input")[0]

    def _ir_inputs(self, names: list[str]) -> tuple[str, ...]:
        try:
            return tuple(self.tensor_of[x] for x in names)
        except KeyError as exc:
            raise BadInputError(f"xmodel op input {exc} is not a fix op", "the xmodel is not in nilmc's quantized layout") from None

    def _data(self, n: pb.OPNode) -> None:
        shape = tuple(_value(n.op_attr["shape"]))[1:]
        self.pending[n.op_name] = DpuOp(n.op_name, "input", (), n.op_name, shape)

    def _const(self, n: pb.OPNode) -> None:
        a = _attrs(n.op_attr)
        values = np.frombuffer(a["data"], dtype="<f4").reshape(a["shape"])
        self.consts[n.op_name] = (values, 0)

    def _fix(self, n: pb.OPNode) -> None:
        src, fp = self._source(n), int(_value(n.op_attr["fix_point"]))
        if src in self.consts:
            self.consts[n.op_name] = (self.consts[src][0], fp)
            return
        op = self.pending.pop(src, None)
        if op is None:
            raise BadInputError(f"fix op {n.op_name!r} follows {src!r}, which produces no pending tensor", "the xmodel is not in nilmc's quantized layout")
        tensor = n.op_name[: -len(FIX_SUFFIX)] if n.op_name.endswith(FIX_SUFFIX) else n.op_name
        op.output = tensor
        self.ops.append(op)
        self.params.fix[tensor] = fp
        self.tensor_of[n.op_name] = tensor

    def _weights(self, n: pb.OPNode, names: list[str]) -> tuple[np.ndarray, int, np.ndarray | None, int | None]:
        w, fw = self.consts[names[0]]
        b = self._arg(n, "bias")
        bias, fb = (self.consts[b[0]] if b else (None, None))
        return np.array(w, np.float32), fw, None if bias is None else np.array(bias, np.float32).reshape(-1), fb

    def _register(self, op: DpuOp, w: np.ndarray, fw: int, bias: np.ndarray | None, fb: int | None) -> None:
        op.weight, op.bias = w, bias
        self.params.weights[op.name] = WeightQuant(fw, fb, quantize_values(w, fw), None if bias is None else quantize_values(bias, fb))  # type: ignore[arg-type]
        self.pending[op.name] = op

    def _conv2d(self, n: pb.OPNode) -> None:
        a = _attrs(n.op_attr)
        w, fw, bias, fb = self._weights(n, self._arg(n, "weights"))
        (kw, kh), (sw, sh) = a["kernel"], a["stride"]
        dw, dh = a.get("dilation") or [1, 1]
        pl, pr, pt, pb_ = a.get("pad") or [0, 0, 0, 0]
        dims = tuple(n.output_tensor.tensor_dim)[1:]
        attrs = {"kernel": (kh, kw), "stride": (sh, sw), "dilation": (dh, dw), "pads": (pt, pl, pb_, pr), "alpha": DPU_LEAKY_ALPHA,
                 "in_channels": int(w.shape[3]), "out_channels": int(w.shape[0])}
        op = DpuOp(n.op_name, "conv2d", self._ir_inputs([self._source(n)]), "", dims, attrs)
        self._register(op, w, fw, bias, fb)

    def _matmul(self, n: pb.OPNode) -> None:
        x, wname = self._arg(n, "input")
        w, fw, bias, fb = self._weights(n, [wname])
        w = np.ascontiguousarray(w.T)  # back to [in, out]
        attrs = {"in_features": int(w.shape[0]), "out_features": int(w.shape[1]), "alpha": DPU_LEAKY_ALPHA}
        op = DpuOp(n.op_name, "dense", self._ir_inputs([x]), "", tuple(n.output_tensor.tensor_dim)[1:], attrs)
        self._register(op, w, fw, bias, fb)

    def _activation(self, n: pb.OPNode, kind: str) -> None:
        src = self._source(n)
        if src in self.pending:  # fused into the op that produced src
            op = self.pending.pop(src)
            op.activation = kind
            self.pending[n.op_name] = op
            return
        self.pending[n.op_name] = DpuOp(n.op_name, kind, self._ir_inputs([src]), "", tuple(n.output_tensor.tensor_dim)[1:],
                                        {"alpha": DPU_LEAKY_ALPHA if kind == "leaky_relu" else 0.0})

    def _relu(self, n: pb.OPNode) -> None:
        self._activation(n, "relu")

    def _leaky_relu(self, n: pb.OPNode) -> None:
        self._activation(n, "leaky_relu")

    def _plain(self, n: pb.OPNode, kind: str, attrs: dict[str, Any]) -> None:
        self.pending[n.op_name] = DpuOp(n.op_name, kind, self._ir_inputs(self._arg(n, "input")), "",
                                        tuple(n.output_tensor.tensor_dim)[1:], attrs)

    def _table(self, n: pb.OPNode) -> None:
        """Ops without structure of their own (flatten, pooling, add): kind and attrs from the op table."""
        rec = BY_XIR_TYPE.get(n.op_type)
        if rec is None or rec.weighted or rec.kind in (OpKind.INPUT, OpKind.RELU, OpKind.LEAKY_RELU):
            self._unknown(n)
            return
        self._plain(n, rec.kind, rec.ir_attrs(_attrs(n.op_attr)))


def parse(data: bytes) -> pb.Graph:
    g = pb.Graph()
    try:
        g.ParseFromString(data)
    except Exception as exc:  # protobuf raises DecodeError (a bare Exception subclass)
        raise BadInputError(f"not an XIR xmodel ({type(exc).__name__}: {exc})", "pass quantized.xmodel from a nilmc dpu bundle") from None
    return g


def read_xmodel(data: bytes | pb.Graph) -> tuple[DpuGraph, DpuParams]:
    """The DPU graph and parameters stored in a quantized xmodel written by :func:`build_xmodel`."""
    g = data if isinstance(data, pb.Graph) else parse(data)
    return _Reader(g).read()


def graph_attributes(data: bytes | pb.Graph) -> dict[str, Any]:
    """The graph attributes of an xmodel (``nilmc_outputs``, ``nilmc_cpu_stages``, ``target``, ...)."""
    g = data if isinstance(data, pb.Graph) else parse(data)
    return {k: _value(v) for k, v in g.graph_attr.items()}


def fix_points(g: pb.Graph) -> dict[str, int]:
    """``fix`` op name -> fix point, for reports."""
    return {n.op_name: int(_value(n.op_attr["fix_point"])) for n in g.op_node if n.op_type == "fix"}


def exact_multiple(values: np.ndarray, fix_point: int) -> bool:
    """True when every value is an integer multiple of ``2**-fix_point`` (const data must be)."""
    scaled = np.asarray(values, np.float64) * math.ldexp(1.0, fix_point)
    return bool(np.all(scaled == np.rint(scaled)))

"""Which ops of a model run in INT8 and which stay float, under a set of quantization parameters.

A manifest that says ``int8`` must not hide the ops that stay float inside the artifact (a BiLSTM
in a QDQ graph runs in float32 while its neighbours run in INT8). :func:`op_placement` lists, from
nilmc's own graph analysis, the weighted layers that get INT8 parameters, the layers the parameters
keep at float (precise input, or the mixed-precision fallback, with the budget it held and what the unit cost at
INT8: ``provenance["mixed_precision"]["why"]``), the activations that fallback left unrounded (inputs of float ops,
the output), and every other compute op nilmc does not quantize
(recurrent cells, attention, normalization, transposed convolutions, ...). Shape and data-movement
ops (Reshape, Shape, Gather, Concat, Transpose, ...) and the element-wise ops a QDQ graph runs on
quantized tensors (Relu, Add, pooling) are not listed. A backend may place ops further (the DPU's
inspector, OpenVINO's runtime precisions): its own record is in the artifact info.
"""
from __future__ import annotations

from typing import Any

import onnx

from nilmc.quantization.graph import analyze
from nilmc.quantization.params import QuantParams

# Ops that only move or reshape data, or that a QDQ graph runs on the quantized tensors of its neighbours.
NOT_COMPUTE = frozenset({
    "Reshape", "Shape", "Gather", "GatherElements", "Unsqueeze", "Squeeze", "Concat", "Slice", "Split", "Transpose", "Cast",
    "Expand", "Identity", "Flatten", "Constant", "ConstantOfShape", "Range", "Tile", "Pad", "Dropout",
    "Relu", "LeakyRelu", "Clip", "Add", "Sub", "Mul", "Div", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool",
    "QuantizeLinear", "DequantizeLinear", "Sigmoid", "Tanh", "Max", "Min", "Neg", "Abs", "Equal", "Where", "Not", "And",
    "Less", "Greater", "ReduceMean", "ReduceMax", "ReduceSum", "Sqrt", "Pow", "Exp", "Log", "Floor", "Ceil", "Round",
})


def op_placement(model: onnx.ModelProto, params: QuantParams) -> dict[str, Any]:
    """``{"int8": [layer names], "float": [{"name", "op", "why"}], "summary": str}`` for ``model`` under ``params``."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = analyze(m)
    keep = set(params.keep_float)
    quantized = [layer for layer in g.layers if layer.name not in keep and layer.weight in params]
    q_names = {layer.name for layer in quantized}
    precise = set((params.provenance.get("precise_input") or {}).get("float_layers", ()))
    mixed = _fallback_reasons(params)
    floats: list[dict[str, str]] = []
    for layer in g.layers:
        if layer.name not in q_names:
            why = ("precise input: reads the float graph input (no 8-bit input grid)" if layer.name in precise
                   else mixed[layer.name] if layer.name in mixed
                   else "kept at float by the parameters (keep_float)" if layer.name in keep else "no INT8 parameters for its weights")
            floats.append({"name": layer.name, "op": layer.op_type, "why": why})
    producers = {o: node for node in m.graph.node for o in node.output}
    for name, why in mixed.items():  # activations a fallback left unrounded (inputs of float ops, the output)
        if name not in {layer.name for layer in g.layers}:
            node = producers.get(name)
            floats.append({"name": name, "op": f"activation of {node.op_type}" if node is not None else "activation", "why": why})
    for node in m.graph.node:
        if node.name in q_names or node.op_type in NOT_COMPUTE or any(f["name"] == node.name for f in floats):
            continue
        if any(layer.bias_node == node.name for layer in g.layers):
            continue
        floats.append({"name": node.name, "op": node.op_type, "why": "nilmc does not quantize this op: it runs in float32"})
    ops = sorted({f["op"] for f in floats if not f["op"].startswith("activation")})
    acts = sum(f["op"].startswith("activation") for f in floats)
    summary = (f"{len(quantized)} weighted layer(s) in INT8" + (f"; float: {len(floats) - acts} op(s) ({', '.join(ops)})" if floats else "; nothing float")
               + (f"; {acts} activation(s) left unrounded by a precision fallback" if acts else ""))
    return {"int8": sorted(q_names), "float": floats, "summary": summary}


def _fallback_reasons(params: QuantParams) -> dict[str, str]:
    """Unit name -> why a precision fallback kept it: the calibration SQNR floor (``provenance["sqnr_fallback"]``) or
    the mixed-precision budget (``provenance["mixed_precision"]["why"]``, which wins for a unit both kept)."""
    sf = params.provenance.get("sqnr_fallback") or {}
    floor: dict[str, str] = {
        str(name): (f"calibration SQNR floor: INT8 output {sf.get('initial_db')} dB vs FP32 on the calibration windows, under "
                    f"{sf.get('target_db'):g} dB; keeping it float added {gain:.1f} dB")
        for name, gain in (sf.get("gains_db") or {}).items()}
    back = sf.get("search") or {}  # mixed_precision._int8_back_under_floor: the greedy stalled, the search went from all-float
    if back.get("accepted"):
        for name in sf.get("kept", ()):
            floor[str(name)] = (f"calibration SQNR floor: INT8 output {sf.get('initial_db')} dB vs FP32 on the calibration windows, "
                                f"under {sf.get('target_db'):g} dB, and no single unit kept float raised it enough; from every unit "
                                f"float, {len(back.get('int8_order', ()))} went back to INT8 (most MACs first) while the floor "
                                f"held ({sf.get('final_db')} dB): this one could not")
    elif back:  # not taken: the greedy's units stay float for what they added, and the floor is missed (sqnr_floor_hint)
        for name in sf.get("kept", ()):
            floor[str(name)] = (floor.get(str(name), f"calibration SQNR floor: INT8 output {sf.get('initial_db')} dB vs FP32 on the "
                                                     f"calibration windows, under {sf.get('target_db'):g} dB")
                                + f"; the floor was not met ({sf.get('final_db')} dB): from every unit float, only "
                                f"{100 * back.get('int8_macs_share', 0.0):.1f} % of the weighted layers' MACs could go back to INT8 "
                                f"while it held, under the {100 * back.get('min_int8_macs_share', 0.25):.0f} % a placement needs")
    st = sf.get("structural") or {}  # mixed_precision.structural_regions kept float as one group
    ops = {t: ", ".join(r["ops"]) for r in st.get("regions", ()) for t in [*r["tensors"], *r.get("matmul_outputs", ())]}
    for name in st.get("float_tensors", ()):
        floor[str(name)] = (f"calibration SQNR floor, structural region: kept float as a group with the other non-weighted ops of its "
                            f"region ({ops.get(name, '?')}; residual/LayerNorm/softmax arithmetic cancels only on one grid), INT8 "
                            f"only at the inputs of weighted layers ({st.get('variant')}): {st.get('db_before')} -> "
                            f"{st.get('db_after')} dB on the calibration windows")
    for name, unit in (sf.get("with_their_op") or {}).items():
        floor[str(name)] = f"calibration SQNR floor: output of a MatMul/Gemm/Conv that runs in float ({unit} kept float)"
    return {**floor, **_mixed_precision_reasons(params)}


def _mixed_precision_reasons(params: QuantParams) -> dict[str, str]:
    """Unit name -> why the mixed-precision fallback kept it (``provenance["mixed_precision"]["why"]``)."""
    mp = params.provenance.get("mixed_precision") or {}
    budget = ", ".join(f"{k}<={v:g}" for k, v in (mp.get("budget") or {}).items())
    out: dict[str, str] = {}
    for w in mp.get("why", ()):
        alone, before = w.get("budget_loss_with_it_alone_kept"), w.get("budget_loss_all_int8")
        cost = (f" (all-INT8 loss {before:.2f} x the budget; with it alone kept {alone:.2f} x)"
                if isinstance(alone, (int, float)) and isinstance(before, (int, float)) else "")
        out[str(w["unit"])] = f"mixed precision ({mp.get('mode', 'float')}): kept to hold the budget {budget}{cost}"
    return out

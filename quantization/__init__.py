"""nilmc.quantization

Two phases (STYLE.md 5): collect statistics once, then apply them under each
target's traits.

Modules:
    intops       integer semantics in one place: range table, rounding modes, (de)quantize,
                 fixed-point requantization (32- and 16-bit multipliers), numpy reference ops
    traits       frozen ``QuantTraits`` and the presets GENERIC_INT8, TFLITE_INT8,
                 TENSORRT_INT8, EIQ_PER_TENSOR, DPU_POT
    graph        fused layers, quantization points and passthrough sharing of an ONNX graph
    statistics   ``collect_statistics``: one FP32 onnxruntime pass, every activation tensor
    estimators   min-max, percentile, MSE-optimal and entropy (KL) range estimators
    params       ``derive_params``: scales, zero points, power-of-two fix positions
    qdq          ``build_qdq_model``: the ideal INT8 reference as an ONNX QDQ graph
    overflow     ``check_overflow``: saturation, code use, accumulators, output clipping

Public API (import from the modules):
    collect_statistics(onnx_model, calib_x, *, batch_size=256, bins=2048) -> Statistics
    derive_params(onnx_model, stats, traits, *, estimator="minmax", per_tensor_estimators=None,
                  estimator_options=None, activation_dtypes=None) -> QuantParams
    build_qdq_model(onnx_model, params) -> onnx.ModelProto
    check_overflow(onnx_model, stats, params, traits, *, data=None, peak_output=None,
                   policy="warn", limits=None) -> OverflowReport
"""

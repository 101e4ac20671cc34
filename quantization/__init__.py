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
    normalization_check  calibration data vs the declared normalization; starved inputs of unnormalized models
    fold         input normalization / target de-normalization folded into the graph (raw in, watts out)
    selection    per-tensor estimator chosen by output error; cross-validated range headroom
    bias_correction  per-channel empirical bias correction (kept where held-out error drops)
    mixed_precision  NILM-metric-driven fallback to int16/float under a budget
    report       per-layer table (scale, zero point, saturation, code use, accumulator headroom, SQNR)
    api          ``quantize(model, calib, ...)`` -> QuantizationResult; ``Techniques``; ``ptq_params``

Public API (import from the modules):
    collect_statistics(onnx_model, calib_x, *, batch_size=256, bins=2048) -> Statistics
    derive_params(onnx_model, stats, traits, *, estimator="minmax", per_tensor_estimators=None,
                  estimator_options=None, activation_dtypes=None) -> QuantParams
    build_qdq_model(onnx_model, params, *, keep_float=()) -> onnx.ModelProto
    quantize(model, calib, *, traits=GENERIC_INT8, estimator="auto", bias_correction=True,
             fold_normalization=False, overflow_policy="warn", budget=None, eval_fn=None,
             advanced=None) -> QuantizationResult
    quantize_report(result) -> dict;  format_report(result) -> str
    check_overflow(onnx_model, stats, params, traits, *, data=None, peak_output=None,
                   policy="warn", limits=None) -> OverflowReport
"""

if __name__ != "nilmc.quantization":  # a bare-folder import would load a second copy of every nilmc class
    raise ImportError(f"{__name__!r} is a folder of nilmc, not a package of its own: import nilmc.quantization instead "
                      "(install nilmc with `pip install -e .`; importing the bare folder would create a second copy of its classes)")

"""onnxruntime: FP32 (the reference every artifact is compared with) and INT8.

``int8`` is nilmc's *ideal INT8 reference*: the QDQ ONNX graph built from nilmc's
own parameters (generic traits: per-channel symmetric int8 weights, asymmetric
uint8 activations) and executed by onnxruntime, whose CPU provider fuses the
Q/DQ pairs into integer kernels. It shows what INT8 costs before any vendor
toolchain is involved.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nilmc.backends.base import Artifact, Capabilities, Verification
from nilmc.quantization.traits import GENERIC_INT8

if TYPE_CHECKING:
    from nilmc.compiler.model import Model


WEIGHT_STORAGE_WHY = ("nilmc's symmetric int8 weight codes c are stored as uint8 c + 128 with zero point 128 (the same values): "
                      "onnxruntime's x86 u8 x s8 kernels saturate pairs of products at int16 on CPUs without VNNI (AVX2, "
                      "AVX-512 before VNNI), and its u8 x u8 kernels do not, so the artifact computes the same on every CPU")


class OrtRunner:
    """Runs an ONNX file on onnxruntime's CPU provider, single-threaded for determinism."""

    verification = Verification.MEASURED
    # run the file with its symmetric int8 weights stored as uint8 (qdq.portable_weights: the same values): an emulation
    # of integer numerics (TensorRT's) must not take on the int16 saturation of this host's fused x86 kernels
    portable = False

    def __init__(self, path: Path, *, threads: int = 1) -> None:
        self.path = Path(path)
        self.threads = threads
        self._sess: Any = None

    def __enter__(self) -> OrtRunner:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        source: Any = str(self.path)
        if self.portable:
            import onnx

            from nilmc.quantization.qdq import portable_weights

            source = portable_weights(onnx.load(str(self.path)))[0].SerializeToString()
        self._sess = ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
        return self

    def __exit__(self, *exc: object) -> None:
        self._sess = None

    @property
    def input_names(self) -> list[str]:
        return [i.name for i in self._sess.get_inputs()]

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [o.name for o in self._sess.get_outputs()]
        outs = self._sess.run(names, dict(feeds))
        return dict(zip(names, outs))


class OnnxRuntimeBackend:
    name = "onnxruntime"
    capabilities = Capabilities(
        precisions=("fp32", "int8"),
        description="ONNX on onnxruntime CPU: FP32 reference and nilmc's ideal INT8 (QDQ)",
        traits={"int8": GENERIC_INT8},
        requires=("onnxruntime",),
        extra=None,
        onnx_ml_precisions=("fp32",),  # onnxruntime's CPU provider runs the ai.onnx.ml tree ensembles; QDQ INT8 has nothing to quantize there
    )

    def lower(self, model: Model, out_dir: Path, *, precision: str = "fp32", options: Mapping[str, Any] | None = None) -> Artifact:
        out_dir = Path(out_dir)
        if precision == "fp32":
            model.save_onnx(out_dir / "model.onnx")
            return Artifact(self.name, precision, out_dir, "model.onnx", ["model.onnx"], kind="ONNX FP32 (onnxruntime)")
        from nilmc.compiler.model import Model as _Model
        from nilmc.quantization.context import shared_params
        from nilmc.quantization.qdq import build_qdq_model, portable_weights

        params = shared_params(options, GENERIC_INT8, f"{self.name}:{precision}")
        graph, stored_u8 = portable_weights(build_qdq_model(model.graph, params))
        qdq = _Model(graph, model.contract, source=model.source)
        qdq.save_onnx(out_dir / "model_qdq.onnx")
        return Artifact(self.name, precision, out_dir, "model_qdq.onnx", ["model_qdq.onnx"], kind="ONNX QDQ INT8 (onnxruntime)",
                        info={"quantization": params.to_json(), "weight_storage": {
                            "stored_as_uint8_plus_128": stored_u8, "why": WEIGHT_STORAGE_WHY}})

    def runner(self, artifact: Artifact) -> OrtRunner:
        return OrtRunner(artifact.path)

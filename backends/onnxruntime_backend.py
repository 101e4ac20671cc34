"""onnxruntime FP32: the reference every other artifact is compared with."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from nilmc.backends.base import Artifact, Capabilities, Verification

if TYPE_CHECKING:
    from nilmc.compiler.model import Model


class OrtRunner:
    """Runs an ONNX file on onnxruntime's CPU provider, single-threaded for determinism."""

    verification = Verification.MEASURED

    def __init__(self, path: Path, *, threads: int = 1) -> None:
        self.path = Path(path)
        self.threads = threads
        self._sess: Any = None

    def __enter__(self) -> "OrtRunner":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self._sess = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
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
        precisions=("fp32",),
        description="ONNX FP32 on onnxruntime CPU: the reference",
        requires=("onnxruntime",),
        extra=None,
    )

    def lower(self, model: "Model", out_dir: Path, *, precision: str = "fp32", options: Mapping[str, Any] | None = None) -> Artifact:
        out_dir = Path(out_dir)
        model.save_onnx(out_dir / "model.onnx")
        return Artifact(self.name, precision, out_dir, "model.onnx", ["model.onnx"], kind="ONNX FP32 (onnxruntime)")

    def runner(self, artifact: Artifact) -> OrtRunner:
        return OrtRunner(artifact.path)

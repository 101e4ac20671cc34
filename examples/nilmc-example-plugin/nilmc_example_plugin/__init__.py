"""An example nilmc backend plugin.

It lowers a model to plain FP32 ONNX and runs it on ONNX's own reference
evaluator (``onnx.reference``), an independent pure-Python runtime: a small,
real second opinion on the FP32 reference. nilmc finds it through the
entry-point group ``nilmc.backends`` declared in this package's pyproject.toml.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from nilmc.backends.base import Artifact, Capabilities, Verification


class ReferenceEvaluatorRunner:
    verification = Verification.MEASURED

    def __init__(self, path: Path) -> None:
        self.path = path
        self._ev: Any = None

    def __enter__(self) -> ReferenceEvaluatorRunner:
        import onnx
        from onnx.reference import ReferenceEvaluator

        self._ev = ReferenceEvaluator(onnx.load(str(self.path)))
        return self

    def __exit__(self, *exc: object) -> None:
        self._ev = None

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self._ev.run(None, dict(feeds))
        return {name: np.asarray(o) for name, o in zip(self._ev.output_names, outs)}


class OnnxReferenceBackend:
    name = "onnxref"
    capabilities = Capabilities(
        precisions=("fp32",),
        description="FP32 ONNX on onnx.reference.ReferenceEvaluator (example plugin)",
        requires=("onnx",),
    )

    def lower(self, model: Any, out_dir: Path, *, precision: str = "fp32", options: Mapping[str, Any] | None = None) -> Artifact:
        model.save_onnx(Path(out_dir) / "model.onnx")
        return Artifact(self.name, precision, Path(out_dir), "model.onnx", ["model.onnx"], kind="ONNX FP32 (onnx reference evaluator)")

    def runner(self, artifact: Artifact) -> ReferenceEvaluatorRunner:
        return ReferenceEvaluatorRunner(artifact.path)


def register(registry: Any) -> None:
    registry.register(OnnxReferenceBackend())

"""NVIDIA ModelOpt and AMD Quark ONNX PTQ, run in the ``bench`` virtual environment (a separate process).

    <bench-python> benchmarks/vendor_worker.py probe
    <bench-python> benchmarks/vendor_worker.py {modelopt,quark} SRC.onnx CALIB.npy DST.onnx

Why a separate interpreter: nvidia-modelopt 0.47 pins ``onnx~=1.21.0`` (and ``onnxruntime-gpu~=1.24`` on Linux
x86) and amd-quark 0.13 ``onnx>=1.21,<=1.22``, while nilmc pins ``onnx==1.23.2`` / ``onnxruntime==1.31.1``: they
cannot share nilmc's environment. This script imports nothing of nilmc; it takes the float ONNX and the calibration
windows (already as the graph takes them) and writes the quantized ONNX, which ``bench_vendors.py`` then runs on
nilmc's onnxruntime with nilmc's metric code, like every other flow.

* ``modelopt``: ``modelopt.onnx.quantization.quantize(quantize_mode="int8", calibration_method="max",
  calibration_eps=["cpu"])``, every other argument at its default (the draw as one ``{input: array}``).
* ``quark``: ``quark.onnx.ModelQuantizer(XINT8_QCONFIG).quantize_model`` (power-of-two scales, MinMSE,
  per-tensor, symmetric: the Vitis AI DPU's scheme), the draw through a calibration reader one window per step.

Exit 0 when DST was written; otherwise 1 with ``ERROR: <type>: <message>`` as the last line of stderr.
"""
from __future__ import annotations

import json
import sys
import traceback
from importlib import metadata
from typing import Any

import numpy as np


def _input_name(path: str) -> str:
    import onnx

    m = onnx.load(path)
    inits = {i.name for i in m.graph.initializer}
    return next(i.name for i in m.graph.input if i.name not in inits)


def run_modelopt(src: str, calib: np.ndarray, dst: str) -> None:
    from modelopt.onnx.quantization import quantize

    quantize(src, quantize_mode="int8", calibration_data={_input_name(src): calib}, calibration_method="max",
             calibration_eps=["cpu"], output_path=dst, log_level="WARNING")


def run_quark(src: str, calib: np.ndarray, dst: str) -> None:
    from onnxruntime.quantization import CalibrationDataReader
    from quark.onnx import XINT8_QCONFIG, ModelQuantizer

    name = _input_name(src)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(calib[i:i + 1] for i in range(len(calib)))

        def get_next(self) -> dict[str, np.ndarray] | None:
            nxt = next(self._it, None)
            return None if nxt is None else {name: nxt}

    ModelQuantizer(XINT8_QCONFIG).quantize_model(src, dst, Reader())


FLOWS = {"modelopt": run_modelopt, "quark": run_quark}
MODULES = {"modelopt": ("modelopt.onnx.quantization", "nvidia-modelopt"), "quark": ("quark.onnx", "amd-quark")}


def probe() -> dict[str, Any]:
    """Per flow: ``{"ok": version}`` or ``{"absent": one-line reason}``; plus the versions that matter beside them."""
    import importlib

    out: dict[str, Any] = {}
    for flow, (module, dist) in MODULES.items():
        try:
            importlib.import_module(module)
            out[flow] = {"ok": metadata.version(dist)}
        except Exception as exc:  # absent or broken: a reason to print, not a crash
            out[flow] = {"absent": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}
    versions = {}
    for dist in ("torch", "onnx", "onnxruntime", "onnxruntime-gpu", "numpy"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    out["versions"] = versions
    return out


def main(argv: list[str]) -> int:
    if argv[:1] == ["probe"]:
        print(json.dumps(probe()))
        return 0
    if len(argv) != 4 or argv[0] not in FLOWS:
        print(f"ERROR: UsageError: expected probe | {{{','.join(FLOWS)}}} SRC.onnx CALIB.npy DST.onnx, got {argv}", file=sys.stderr)
        return 2
    flow, src, calib_path, dst = argv
    try:
        FLOWS[flow](src, np.load(calib_path).astype(np.float32), dst)
    except Exception as exc:  # reported to the benchmark as this flow's result on this draw
        traceback.print_exc()
        msg = " ".join(str(exc).split())[:300]
        print(f"ERROR: {type(exc).__name__}: {msg}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""``tflm:cortex-m4``: the full-integer TFLite model for the seed-001 smart meter, run on the TFLite Micro interpreter.

``lower`` builds the same full-integer flatbuffer as ``tflite:int8`` (nilmc's ranges, per-channel
weights, int8 I/O) with its C array (``model_data.cc``/``.h``) and the estimate report, then **measures**
what the estimate guessed: the smallest tensor arena the TFLM interpreter (the ``tflite-micro``
package, the ``mcu`` extra) allocates and invokes the model in, found by bisection to 16 bytes, and
checked against the meter's SRAM budget (seed 001: 72 KiB for the classifier). The C array's bytes
equal the flatbuffer's (:func:`backends.tflite_micro.parse_c_array`).

The runner executes the flatbuffer on the TFLM interpreter window by window (batch 1, as on the
MCU), so the accuracy the gate reads is the interpreter's own: **measured** on this machine with
TFLM's reference kernels (which requantize a few LSB differently from LiteRT's XNNPACK: the two runtimes
agree closely, not bit for bit). A Cortex-M4 build links CMSIS-NN kernels instead (not run here), and
Flash and cycles remain estimates (``tflm_report.json`` says how each was made).

The interpreter runs ~9 ms per window of the shipped model here, so ``all`` does not include this
target: ask for it by name (``--targets tflm:cortex-m4``).
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nilmc.backends.base import Artifact, Capabilities, Verification
from nilmc.backends.tflite_micro import CORTEX_M4_SEED001, McuBudget
from nilmc.compiler.errors import BadInputError, InternalError, MissingDependencyError
from nilmc.compiler.io import atomic_write_json
from nilmc.quantization.traits import TFLITE_INT8

if TYPE_CHECKING:
    from nilmc.compiler.model import Model

PRECISIONS = ("cortex-m4",)
BUDGETS: dict[str, McuBudget] = {"cortex-m4": CORTEX_M4_SEED001}
ARENA_STEP = 16


def _runtime() -> Any:
    try:
        from tflite_micro.python.tflite_micro import runtime
    except ImportError:
        raise MissingDependencyError("tflite-micro", "mcu", "running the TFLite Micro interpreter") from None
    return runtime


def _interpreter(fb: bytes, arena: int) -> Any:
    return _runtime().Interpreter.from_bytes(fb, arena_size=int(arena))


def _runs_in(fb: bytes, arena: int) -> bool:
    """Whether TFLM allocates the model's tensors in ``arena`` bytes and invokes it once (zeros in)."""
    try:
        it = _interpreter(fb, arena)
        d = it.get_input_details(0)
        it.set_input(np.zeros(d["shape"], d["dtype"]), 0)
        it.invoke()
        return True
    except (RuntimeError, ValueError):
        return False


def measure_arena(fb: bytes, *, ceiling: int = 8 << 20) -> int:
    """The smallest arena (to :data:`ARENA_STEP` bytes) in which the TFLM interpreter runs ``fb``: measured, by bisection."""
    if not _runs_in(fb, ceiling):
        raise BadInputError(f"the TFLite Micro interpreter cannot run the model even with a {ceiling >> 20} MiB arena",
                            "check the ops against the TFLM op resolver (tflm_report.json lists them)")
    lo, hi = 0, ceiling
    while hi - lo > ARENA_STEP:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if _runs_in(fb, mid) else (mid, hi)
    return hi


class TFLMRunner:
    """Runs a full-integer ``.tflite`` on the TFLite Micro interpreter, one window per invoke; float in / float out."""

    verification = Verification.MEASURED

    def __init__(self, path: Path, *, arena: int, output_name: str = "output") -> None:
        self.path = Path(path)
        self.arena = int(arena)
        self.output_name = output_name
        self._it: Any = None

    def __enter__(self) -> TFLMRunner:
        self._it = _interpreter(self.path.read_bytes(), self.arena)
        return self

    def __exit__(self, *exc: object) -> None:
        self._it = None

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        from nilmc.quantization.intops import int_range, quantize
        from nilmc.quantization.traits import Rounding

        if self._it is None:
            raise InternalError("TFLMRunner.infer called outside its context", "use `with backend.runner(artifact) as r:`")
        x = np.asarray(next(iter(feeds.values())), np.float32)
        din, dout = self._it.get_input_details(0), self._it.get_output_details(0)
        qin, qout = din["quantization_parameters"], dout["quantization_parameters"]
        s_in, z_in = float(qin["scales"][0]), int(qin["zero_points"][0])
        s_out, z_out = float(qout["scales"][0]), int(qout["zero_points"][0])
        codes = quantize(x, s_in, z_in, int_range(np.dtype(din["dtype"]).name), rounding=Rounding.HALF_AWAY).astype(din["dtype"])
        outs = []
        for i in range(len(codes)):
            self._it.set_input(codes[i:i + 1], 0)
            self._it.invoke()
            outs.append(np.asarray(self._it.get_output(0)))
        y = np.concatenate(outs, axis=0).astype(np.int64)
        return {self.output_name: ((y - z_out).astype(np.float32) * np.float32(s_out)).astype(np.float32)}


class TFLMBackend:
    """``tflm:<mcu>``: full-integer TFLite + C array for a microcontroller, verified on the TFLM interpreter."""

    name = "tflm"
    capabilities = Capabilities(
        precisions=PRECISIONS,
        description="TFLite Micro for the seed-001 smart meter (STM32F4 Cortex-M4): full-integer TFLite + C array, "
                    "run and arena-measured on the TFLM interpreter",
        traits={p: TFLITE_INT8 for p in PRECISIONS},
        keras_precisions=PRECISIONS,
        requires=("tensorflow", "ai_edge_litert", "tflite_micro"),
        extra="mcu",
        in_all=False,
        limitations={
            "verification": "measured on the TFLM interpreter with its reference kernels on this machine (they requantize a few "
                            "LSB differently from LiteRT's XNNPACK); a Cortex-M4 build links CMSIS-NN kernels, not run here",
            "estimates": "Flash and cycles are estimates from the flatbuffer (tflm_report.json); the arena is measured",
            "speed": "~9 ms per window of the shipped model on the interpreter: not part of `all`, ask for tflm:cortex-m4",
        },
    )

    def lower(self, model: Model, out_dir: Path, *, precision: str = "cortex-m4", options: Mapping[str, Any] | None = None) -> Artifact:
        from nilmc.backends.tflite_backend import TFLiteBackend

        if precision not in PRECISIONS:
            raise BadInputError(f"tflm has no precision {precision!r}", f"available: {', '.join(PRECISIONS)}")
        _runtime()  # the clear "install nilmc[mcu]" error before any conversion
        art = TFLiteBackend().lower(model, Path(out_dir), precision="int8", options={**dict(options or {}), "tflm": True})
        fb = art.path.read_bytes()
        budget = BUDGETS[precision]
        arena = measure_arena(fb)
        report_path = Path(out_dir) / "tflm_report.json"
        import json

        report = json.loads(report_path.read_text())
        report["arena"]["measured_bytes"] = arena
        report["arena"]["measured_how"] = (f"smallest tensor arena (to {ARENA_STEP} B) in which the TFLM interpreter "
                                           "(tflite-micro, reference kernels) allocates and invokes the model: bisection")
        report["fits"]["sram_measured"] = arena <= budget.sram_bytes
        atomic_write_json(report_path, report)
        info = {k: v for k, v in art.info.items() if k != "tflm"}
        info["tools"] = [*art.info.get("tools", []), "tflite-micro"]
        info["tflm"] = {**art.info.get("tflm", {}), "arena_measured_bytes": arena, "sram_budget_bytes": budget.sram_bytes,
                        "fits_sram_measured": arena <= budget.sram_bytes, "budget": budget.name}
        kind = f"TFLite Micro full-integer INT8 for {budget.name} (C array; run on the TFLM interpreter, arena measured)"
        return Artifact(self.name, precision, Path(out_dir), art.primary, art.files, kind=kind, info=info)

    def runner(self, artifact: Artifact) -> TFLMRunner:
        arena = int(artifact.info.get("tflm", {}).get("arena_measured_bytes") or 0)
        if arena <= 0:
            raise BadInputError("the bundle records no measured arena", "recompile the tflm target")
        # a little headroom over the measured minimum: the interpreter may round allocations differently per input
        return TFLMRunner(artifact.path, arena=arena + 1024)

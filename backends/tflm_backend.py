"""``tflm:cortex-m4``: the full-integer TFLite model for the seed-001 smart meter, run on the TFLite Micro interpreter.

``lower`` builds the same full-integer flatbuffer as ``tflite:int8`` (nilmc's ranges, per-channel
weights, int8 I/O) with its C array (``model_data.cc``/``.h``) and the estimate report, then **measures**
what the estimate guessed: the smallest tensor arena the TFLM interpreter (the ``tflite-micro``
package, the ``mcu`` extra) allocates and invokes the model in, found by bisection to 16 bytes, and
checked against the meter's SRAM budget (seed 001: 72 KiB for the classifier). The C array's bytes
equal the flatbuffer's (:func:`backends.tflite_micro.parse_c_array`).

**Fitting the meter** (option ``tflm.fit``, default ``auto``): when the given model does not fit the budget
(Flash and cycles estimated, arena measured), a variant that does is made by structured pruning (filters / units
by L1 norm), a width search under the budget and distillation from the FP32 model on the calibration windows
(:mod:`nilmc.training.fit_meter`; the evaluation set stays held out) and deployed instead; ``artifact_info.fit``
records the widths, parameters, MACs, the figures against the budget and the held-out calibration cost, and the
gate compares the deployed variant with the **unpruned** FP32 model on the evaluation set. When no variant within
the budget stays within ``tflm.fit_max_loss`` EACC points, the target is refused (exit 2) with every candidate's
figures. ``tflm.fit=off`` deploys the given model and reports that it does not fit. The fitter lives in
``training/``, which only the CLI imports: ``nilmc compile`` registers :class:`FittingTFLMBackend`; from Python,
``registry.register(FittingTFLMBackend(fit_to_budget), replace=True)`` with
``from nilmc.training.fit_meter import fit_to_budget``. ``auto`` fits where the backend has a fitter and otherwise
deploys the given model, saying so in ``artifact_info.fit``; ``search`` without a fitter is refused.

The runner executes the flatbuffer on the TFLM interpreter window by window (batch 1, as on the
MCU), so the accuracy the gate reads is the interpreter's own: **measured** on this machine with
TFLM's reference kernels (which requantize a few LSB differently from LiteRT's XNNPACK: the two runtimes
agree closely, not bit for bit). A Cortex-M4 build links CMSIS-NN kernels instead (not run here), and
Flash and cycles remain estimates (``tflm_report.json`` says how each was made).

Every probe of the bisection runs in a spawned child process: a TFLM kernel that crashes natively (measured: the
LSTM kernel in too small an arena, SIGSEGV) ends that probe ("does not run in that arena"), not the compile; a crash
in the largest arena is refused with the signal. Models with recurrent layers are refused up front (``precheck``):
the converter keeps their cells float32, which is no integer graph for TFLM.

The interpreter runs ~9 ms per window of the shipped model here, so ``all`` does not include this
target: ask for it by name (``--targets tflm:cortex-m4``).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nilmc.backends.base import Artifact, Capabilities, Verification
from nilmc.backends.tflite_micro import CORTEX_M4_SEED001, CYCLES_PER_MAC, PER_CHANNEL_QUANT_BYTES, McuBudget, graph_costs, tflm_report, write_tflm_export
from nilmc.compiler.errors import BadInputError, DataError, InternalError, MissingDependencyError
from nilmc.compiler.io import atomic_write_json
from nilmc.quantization.traits import TFLITE_INT8

if TYPE_CHECKING:
    from nilmc.calibration_data.dataset import NilmDataset
    from nilmc.compiler.model import Model

PRECISIONS = ("cortex-m4",)
BUDGETS: dict[str, McuBudget] = {"cortex-m4": CORTEX_M4_SEED001}
ARENA_STEP = 16
FIT_MODES = ("auto", "search", "off")
# Flatbuffer bytes per output channel of a conv / dense besides its int8 weights: int32 bias (4) + float32 scale and
# int64 zero point of the weights' per-channel quantization (12) and of the bias's (12).
FLATBUFFER_BYTES_PER_CHANNEL = 28
REPRESENTATIVE_WINDOWS = 32  # for a candidate's structural conversion: no size depends on them
FITTED_FLOAT = "fitted_float.h5"
PROBE_TIMEOUT_S = 120.0  # one allocate + invoke of a model that fits a microcontroller takes milliseconds
# ONNX ops of recurrent layers: the TFLite converter keeps their cells float32 (or lowers them to a WHILE loop), so the
# flatbuffer is not the integer graph TFLM runs (measured: TFLM's LSTM kernel on such a graph segfaults in small arenas).
RECURRENT_OPS = frozenset({"LSTM", "GRU", "RNN", "Loop", "Scan"})


def _runtime() -> Any:
    try:
        from tflite_micro.python.tflite_micro import runtime
    except ImportError:
        raise MissingDependencyError("tflite-micro", "mcu", "running the TFLite Micro interpreter") from None
    return runtime


def _interpreter(fb: bytes, arena: int) -> Any:
    return _runtime().Interpreter.from_bytes(fb, arena_size=int(arena))


def _runs_in(fb: bytes, arena: int) -> bool:
    """Whether TFLM allocates the model's tensors in ``arena`` bytes and invokes it once (zeros in). In this process: a
    kernel that crashes natively takes the process with it (:class:`_IsolatedProbe` runs it in a child instead)."""
    try:
        it = _interpreter(fb, arena)
        d = it.get_input_details(0)
        it.set_input(np.zeros(d["shape"], d["dtype"]), 0)
        it.invoke()
        return True
    except (RuntimeError, ValueError):
        return False


def _probe_server(conn: Any, fb: bytes, probe: Callable[[bytes, int], bool]) -> None:
    """In the spawned child: answer ``probe(fb, arena)`` (:func:`_runs_in`) for every arena received, until None."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # TFLM prints "Failed to resize buffer ..." for every arena that is too small; the parent's
    os.dup2(devnull, 2)  # stdout may be the --json report
    while (arena := conn.recv()) is not None:
        conn.send(probe(fb, arena))


class _IsolatedProbe:
    """TFLM probes in a spawned child process: a native crash in a TFLM kernel (measured: the LSTM kernel dereferences
    the tensor it failed to allocate in a 4 KiB arena, SIGSEGV) ends the child, not the compile. ``runs_in`` answers
    None for a probe that crashed (or hung past ``timeout_s``) and starts a fresh child for the next one. ``probe``
    (default :func:`_runs_in`) is what the child calls: a module-level function, as spawn pickles it by name."""

    def __init__(self, fb: bytes, *, timeout_s: float = PROBE_TIMEOUT_S, probe: Callable[[bytes, int], bool] = _runs_in) -> None:
        self.fb = fb
        self.probe = probe
        self.timeout_s = timeout_s
        self.crashes: list[tuple[int, str]] = []  # (arena, how the child ended)
        self._proc: Any = None
        self._conn: Any = None

    def __enter__(self) -> _IsolatedProbe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")  # not fork: the parent may hold TensorFlow threads
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_probe_server, args=(child, self.fb, self.probe), daemon=True)
        self._proc.start()
        child.close()  # the child's end lives in the child only: its death is EOF here

    def runs_in(self, arena: int) -> bool | None:
        if self._proc is None:
            self._start()
        try:
            self._conn.send(int(arena))
            if self._conn.poll(self.timeout_s):
                return bool(self._conn.recv())
            how = f"no answer within {self.timeout_s:g} s"
        except (EOFError, OSError):
            how = ""
        code = self._stop(kill=True)
        self.crashes.append((int(arena), how or _ended(code)))
        return None

    def close(self) -> None:
        self._stop(kill=False)

    def _stop(self, *, kill: bool) -> int | None:
        """End the child (asked to, or killed); its exit code."""
        proc, conn = self._proc, self._conn
        self._proc = self._conn = None
        if proc is None:
            return None
        if not kill:
            try:
                conn.send(None)
            except OSError:
                pass
        proc.join(timeout=5)
        if proc.is_alive():
            proc.kill()
            proc.join()
        conn.close()
        return proc.exitcode


def _ended(exitcode: int | None) -> str:
    """How a child process ended, in words (``-11`` -> ``killed by SIGSEGV``)."""
    import signal

    if exitcode is not None and exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


def measure_arena(fb: bytes, *, ceiling: int = 8 << 20) -> int:
    """The smallest arena (to :data:`ARENA_STEP` bytes) in which the TFLM interpreter runs ``fb``: measured, by bisection,
    each probe in a child process (:class:`_IsolatedProbe`). A probe that crashes the interpreter counts as "does not run
    in that arena" (TFLM on the MCU would not run there either); a crash at ``ceiling`` is refused as such."""
    with _IsolatedProbe(fb) as probe:
        top = probe.runs_in(ceiling)
        if not top:
            from nilmc.backends.tflite_micro import tflm_report

            ops = ", ".join(sorted(set(tflm_report(fb)["ops"])))
            if top is None:
                raise BadInputError(f"the TFLite Micro interpreter crashed ({probe.crashes[-1][1]}) running the model's "
                                    f"full-integer flatbuffer in a {ceiling >> 20} MiB arena (ops: {ops})",
                                    "lower it with tflite:int8 or onnxruntime:int8; tflm:cortex-m4 cannot run it")
            raise BadInputError(f"the TFLite Micro interpreter cannot run the model even with a {ceiling >> 20} MiB arena "
                                f"(ops: {ops}; TFLM's op resolver must have each)",
                                "lower it with tflite:int8 or onnxruntime:int8; tflm:cortex-m4 cannot run it")
        lo, hi = 0, ceiling
        while hi - lo > ARENA_STEP:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if probe.runs_in(mid) else (mid, hi)  # None (crashed) reads as "does not run in mid"
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
        from nilmc.quantization.intops import Rounding, int_range, quantize

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


@dataclass(frozen=True)
class TFLMOptions:
    """Typed options of the ``tflm`` backend (``--option tflm.NAME=VALUE``).

    ``fit`` (default ``"auto"``): when the given model does not fit the meter's budget, make a variant that does
    and deploy it (module docstring), if this backend has a fitter (``nilmc compile`` gives it one), else deploy the
    given model and say why; ``"search"``: the same, refused without a fitter; ``"off"``: deploy the given model
    and only report that it does not fit.
    ``fit_max_loss`` (2.0): the most EACC points the variant may lose against the FP32 model on the held-out
    calibration windows. ``fit_candidates`` (2): how many widths within the budget are fine-tuned.
    ``fit_epochs`` (60): the most fine-tuning epochs (early stopping on the held-out calibration windows).
    ``fit_seed`` (0): the fine-tuning's seed.
    """

    fit: str = "auto"
    fit_max_loss: float = 2.0
    fit_candidates: int = 2
    fit_epochs: int = 60
    fit_seed: int = 0

    def __post_init__(self) -> None:
        if self.fit not in FIT_MODES:
            raise ValueError(f"fit must be one of {', '.join(FIT_MODES)}, got {self.fit!r}")
        if not self.fit_max_loss >= 0 or self.fit_candidates < 1 or self.fit_epochs < 0:
            raise ValueError(f"need fit_max_loss >= 0, fit_candidates >= 1 and fit_epochs >= 0, got "
                             f"{self.fit_max_loss}, {self.fit_candidates}, {self.fit_epochs}")


OPTION_NAMES = tuple(f.name for f in fields(TFLMOptions))


def _verdict(budget: McuBudget, flash: int, sram: int, cycles: int, *, sram_how: str) -> dict[str, Any]:
    fits = {"flash": flash <= budget.flash_bytes, "sram": sram <= budget.sram_bytes, "cycles": cycles <= budget.cycles}
    return {"flash_bytes": int(flash), "sram_bytes": int(sram), "cycles": int(cycles), "sram_how": sram_how,
            "flash_how": "estimated", "cycles_how": "estimated", "fits_each": fits, "fits": all(fits.values())}


class TFLMMeter:
    """The meter's side of the fit (:class:`nilmc.training.fit_meter.Meter`): what a variant costs, and the real check.

    ``estimate`` extrapolates from the given model's own figures (its Flash estimate and measured arena) by the
    differences in weights, channels, activations and MACs; ``measure`` converts a Keras model to full-integer TFLite
    (the converter's structure: nilmc's parameters change no size), reads the Flash and cycle estimates of
    :func:`tflm_report` and **measures** the arena on the TFLM interpreter."""

    def __init__(self, budget: McuBudget, representative: np.ndarray, given_fb: bytes) -> None:
        self.budget = budget
        self.representative = np.asarray(representative[:REPRESENTATIVE_WINDOWS], np.float32)
        self.given = self.figures(given_fb)
        self.given_costs = graph_costs(given_fb)

    def figures(self, fb: bytes) -> dict[str, Any]:
        report = tflm_report(fb, budget=self.budget)
        return _verdict(self.budget, report["flash"]["total_bytes"], measure_arena(fb), report["compute"]["cycles"],
                        sram_how="measured (TFLM interpreter arena)")

    def estimate(self, facts: Any) -> dict[str, Any]:
        g = self.given_costs
        d_channels = facts.channels - g["channels"]
        flash = self.given["flash_bytes"] + (facts.weights - g["weights"]) + FLATBUFFER_BYTES_PER_CHANNEL * d_channels
        sram = (self.given["sram_bytes"] + (facts.peak_activation_bytes - g["peak_activation_bytes"])
                + (facts.scratch_bytes - g["scratch_bytes"]) + PER_CHANNEL_QUANT_BYTES * d_channels)
        cycles = int(facts.macs * CYCLES_PER_MAC)
        return _verdict(self.budget, flash, sram, cycles, sram_how="estimated from the given model's measured arena")

    def measure(self, keras_model: Any) -> dict[str, Any]:
        from nilmc.backends.tflite_int8 import structural_tflite

        return self.figures(structural_tflite(keras_model, self.representative))


class TFLMBackend:
    """``tflm:<mcu>``: full-integer TFLite + C array for a microcontroller, verified on the TFLM interpreter."""

    name = "tflm"
    capabilities = Capabilities(
        precisions=PRECISIONS,
        description="TFLite Micro for the seed-001 smart meter (STM32F4 Cortex-M4): full-integer TFLite + C array, "
                    "run and arena-measured on the TFLM interpreter; a model over the budget is pruned and distilled to fit",
        traits={p: TFLITE_INT8 for p in PRECISIONS},
        keras_precisions=PRECISIONS,
        options=TFLMOptions,
        requires=("tensorflow", "ai_edge_litert", "tflite_micro"),
        extra="mcu",
        in_all=False,
        limitations={
            "verification": "measured on the TFLM interpreter with its reference kernels on this machine (they requantize a few "
                            "LSB differently from LiteRT's XNNPACK); a Cortex-M4 build links CMSIS-NN kernels, not run here",
            "estimates": "Flash and cycles are estimates from the flatbuffer (tflm_report.json); the arena is measured",
            "speed": "~9 ms per window of the shipped model on the interpreter: not part of `all`, ask for tflm:cortex-m4",
            "recurrent": "models with LSTM / GRU / RNN layers are refused (the converter keeps their cells float32); "
                         "use tflite:int8 or onnxruntime:int8",
            "fit": "a model over the budget is replaced by a pruned, distilled variant (tflm.fit=search, the default; needs "
                   "the fitter from nilmc.training, which `nilmc compile` wires); only Conv2D / Dense chains are pruned",
        },
    )

    def __init__(self, fitter: Callable[..., Any] | None = None, *, budget: McuBudget | None = None) -> None:
        """``fitter`` (default None): :func:`nilmc.training.fit_meter.fit_to_budget` or a callable like it (see
        :class:`FittingTFLMBackend`); ``budget`` (default None: :data:`BUDGETS` per precision) replaces the meter's budget."""
        self.fitter = fitter
        self.budget = budget

    def lower(self, model: Model, out_dir: Path, *, precision: str = "cortex-m4", options: Mapping[str, Any] | None = None) -> Artifact:
        from nilmc.backends.tflite_backend import TFLiteBackend

        if precision not in PRECISIONS:
            raise BadInputError(f"tflm has no precision {precision!r}", f"available: {', '.join(PRECISIONS)}")
        _runtime()  # the clear "install nilmc[mcu]" error before any conversion
        options = dict(options or {})
        opts = options.get("backend_options") or TFLMOptions()
        budget = self.budget or BUDGETS[precision]
        forward = {k: v for k, v in options.items() if k not in (*OPTION_NAMES, "backend_options")}
        fit, model, forward = self._fit(model, Path(out_dir), budget, opts, forward)
        # the MCU runs integer kernels only: the full-integer graph (no precise input), under this target's TFLITE_INT8 traits
        art = TFLiteBackend().lower(model, Path(out_dir), precision="int8", options={**forward, "tflm": True, "cpu_layers": "none"})
        fb = art.path.read_bytes()
        arena = measure_arena(fb)
        _, report = write_tflm_export(fb, Path(out_dir), budget=budget)  # again: the estimate against this backend's budget
        report_path = Path(out_dir) / "tflm_report.json"
        report["arena"]["measured_bytes"] = arena
        report["arena"]["measured_how"] = (f"smallest tensor arena (to {ARENA_STEP} B) in which the TFLM interpreter "
                                           "(tflite-micro, reference kernels) allocates and invokes the model: bisection")
        report["fits"]["sram_measured"] = arena <= budget.sram_bytes
        report["fits"]["all_with_measured_sram"] = bool(report["fits"]["flash"] and report["fits"]["cycles"] and arena <= budget.sram_bytes)
        atomic_write_json(report_path, report)
        info = {k: v for k, v in art.info.items() if k not in ("tflm", "extra_files")}
        info["tools"] = [*art.info.get("tools", []), "tflite-micro"]
        info["tflm"] = {**{k: report[k] for k in ("flash", "arena", "compute", "budget", "fits", "cycles_verdict_robust", "estimate", "note")},
                        "arena_measured_bytes": arena, "sram_budget_bytes": budget.sram_bytes,
                        "fits_sram_measured": arena <= budget.sram_bytes, "fits_all": report["fits"]["all_with_measured_sram"],
                        "budget": budget.name}
        info["fit"] = fit
        info["extra_files"] = [*art.info.get("extra_files", []), *([FITTED_FLOAT] if fit.get("deployed") == "fitted variant" else [])]
        kind = f"TFLite Micro full-integer INT8 for {budget.name} (C array; run on the TFLM interpreter, arena measured)"
        if fit.get("deployed") == "fitted variant":
            w = fit["variant"]
            kind += (f"; fitted variant: {w['params']:,} of {w['given_params']:,} parameters, pruned by L1 norm and "
                     "distilled from the FP32 model")
        return Artifact(self.name, precision, Path(out_dir), art.primary, art.files, kind=kind, info=info)

    def precheck(self, model: Model, precision: str) -> str | None:
        """What keeps ``model`` from ``tflm:<precision>``, from the graph alone in milliseconds (None: nothing found)."""
        if precision not in PRECISIONS:
            return None
        recurrent = sorted({n.op_type for n in model.graph.graph.node} & RECURRENT_OPS)
        if recurrent:
            return (f"tflm:{precision} runs full-integer graphs only and the model has {', '.join(recurrent)}: the TFLite "
                    "converter keeps recurrent cells float32, which TFLite Micro cannot run as an integer graph; "
                    "lower it with tflite:int8 (cells kept float32) or onnxruntime:int8")
        if not model.keras_path:
            return None  # lower() refuses an ONNX source with its own message
        from nilmc.backends.onnx_to_tf import keras_int8_precheck

        return keras_int8_precheck(model.graph, f"tflm:{precision}")

    def _fit(self, model: Model, out_dir: Path, budget: McuBudget, opts: TFLMOptions,
             forward: dict[str, Any]) -> tuple[dict[str, Any], Model, dict[str, Any]]:
        """``(fit record, model to deploy, its lowering options)``: the given model when it fits or ``fit=off``."""
        from nilmc.backends.tflite_int8 import structural_tflite
        from nilmc.compiler.tfcompat import load_keras

        calib: NilmDataset | None = forward.get("calibration")
        if calib is None:
            raise DataError("tflm:cortex-m4 quantizes and needs calibration windows", "pass --calib FILE")
        keras_model = load_keras(model)
        representative = model.contract.prepare(calib.raw_x()[:REPRESENTATIVE_WINDOWS])
        meter = TFLMMeter(budget, representative, structural_tflite(keras_model, representative))
        record: dict[str, Any] = {"mode": opts.fit, "budget": asdict(budget), "given": meter.given}
        if meter.given["fits"]:
            return {**record, "needed": False, "deployed": "given model"}, model, forward
        if opts.fit == "off":
            return {**record, "needed": True, "deployed": "given model (tflm.fit=off): it does not fit the budget"}, model, forward
        if self.fitter is None and opts.fit == "auto":
            return {**record, "needed": True, "deployed": "given model: it does not fit the budget, and this registry's tflm backend "
                    "has no fitter (nilmc compile has one; from Python register FittingTFLMBackend(fit_to_budget))"}, model, forward
        if self.fitter is None:
            raise BadInputError(f"the model does not fit {budget.name} ({_over(meter.given, budget)}) and fitting it needs the trainer "
                                "from nilmc.training, which this registry's tflm backend lacks (nilmc compile wires it; from Python: "
                                "registry.register(FittingTFLMBackend(nilmc.training.fit_meter.fit_to_budget), replace=True))",
                                "or pass --option tflm.fit=off to compile the given model as it is")
        try:
            result = self.fitter(keras_model, calib, model.contract, meter, max_loss_pts=opts.fit_max_loss,
                                 candidates=opts.fit_candidates, epochs=opts.fit_epochs, seed=opts.fit_seed)
        except BadInputError as exc:
            raise BadInputError(f"the model does not fit {budget.name} ({_over(meter.given, budget)}); {exc.message}", exc.remedy) from None
        variant = _save_variant(result.model, model, out_dir / FITTED_FLOAT)
        from nilmc.quantization.context import QuantContext

        lowered = {**{k: v for k, v in forward.items() if k not in ("params", "quant")}, "quant": QuantContext(variant, calib)}
        fitted = {**record, "needed": True, "deployed": "fitted variant", "variant": result.to_json(), "float_model": FITTED_FLOAT,
                  "note": "the deployed model is the fitted variant; the gate compares it with the unpruned FP32 model on the "
                          "evaluation set. Its INT8 parameters are this manifest's quantization record; the manifest's overflow, "
                          "placement and coverage sections were computed for the given (unpruned) model"}
        return fitted, variant, lowered

    def runner(self, artifact: Artifact) -> TFLMRunner:
        arena = int(artifact.info.get("tflm", {}).get("arena_measured_bytes") or 0)
        if arena <= 0:
            raise BadInputError("the bundle records no measured arena", "recompile the tflm target")
        # a little headroom over the measured minimum: the interpreter may round allocations differently per input
        return TFLMRunner(artifact.path, arena=arena + 1024)


class FittingTFLMBackend(TFLMBackend):
    """:class:`TFLMBackend` that can fit a model to the meter: ``fitter`` is
    :func:`nilmc.training.fit_meter.fit_to_budget` (training/ is imported only by the CLI, which registers this).
    Its own class, so the compile driver keeps its targets in this process (a worker's fresh registry lacks it)."""

    def __init__(self, fitter: Callable[..., Any], *, budget: McuBudget | None = None) -> None:
        super().__init__(fitter, budget=budget)


def _over(fig: Mapping[str, Any], budget: McuBudget) -> str:
    return (f"Flash {fig['flash_bytes']:,} B of {budget.flash_bytes:,}, SRAM {fig['sram_bytes']:,} B of {budget.sram_bytes:,} "
            f"(measured arena), {fig['cycles']:,} of {budget.cycles:,} cycles per window")


def _save_variant(keras_model: Any, model: Model, path: Path) -> Model:
    """Write the fitted float model (.h5, atomically) and return it as a :class:`Model` with the given contract."""
    import tempfile
    import warnings

    from nilmc.compiler.frontend import keras_to_onnx
    from nilmc.compiler.io import atomic_write_bytes

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # tf_keras calls HDF5 "legacy"; it is what the QAT target writes too
        tmp_path = Path(tmp) / "m.h5"
        keras_model.save(tmp_path)
        atomic_write_bytes(path, tmp_path.read_bytes())
    return keras_to_onnx(keras_model, model.contract, source=f"{model.source or 'model'} (fitted to the meter)", keras_path=path)

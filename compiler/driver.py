"""The compile driver: lower a model to every requested target, verify each
artifact against the FP32 reference in NILM metrics, write bundles, gate.

Everything that can be checked without doing the work is checked first
(:func:`preflight`): the budget, the data's shape and appliance, the normalization of
the calibration *and* evaluation sets, that every quantizing target has a calibration
set, the output paths and the signing key. A problem found inside one target keeps its
class: the compile's exit code is the most severe over every target (3 internal > 2 bad
input > 1 gate > 0), see :attr:`CompileSummary.exit_code`.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import nilmc
from nilmc.backends.base import Verification
from nilmc.backends.registry import Registry, Target, default_registry
from nilmc.calibration_data.dataset import NilmDataset
from nilmc.compiler.bundle import MANIFEST, SUMMARY, BundleWriter, VerifyResult, bundle_name, read_manifest, verify_bundle
from nilmc.compiler.compare import DEFAULT_MIN_INT8_SHARE, MIN_INT8_KEY, MIN_SQNR_KEY, Report, check_budget_for_task, compare, default_budget, validate_budget
from nilmc.compiler.contract import ModelContract
from nilmc.compiler.errors import (
    EXIT_BAD_INPUT,
    EXIT_GATE_FAILED,
    EXIT_INTERNAL,
    EXIT_OK,
    BadInputError,
    DataError,
    NilmcError,
    NormalizationError,
    QuantizationError,
    most_severe,
)
from nilmc.compiler.io import atomic_write_json, atomic_write_text, sha256_bytes
from nilmc.compiler.metrics import AnyMetrics, sqnr_db
from nilmc.compiler.model import Model
from nilmc.compiler.outdir import OutputDir, check_output_file, check_output_path
from nilmc.compiler.progress import progress_done, progress_plan

__all__ = ["MANIFEST", "SUMMARY", "CompileOptions", "CompileSummary", "TargetResult", "compile_model", "predict_watts",
           "reference_metrics", "preflight", "VerifyResult", "read_manifest", "verify_bundle"]

REFERENCE_TARGET = Target("onnxruntime", "fp32")
REFERENCE_ENTRY = "reference"
DOUBLE_NORM_WINDOWS = 2000  # windows the normalized-twice check reads (per-feature moments: more adds nothing)


@dataclass(frozen=True)
class CompileOptions:
    """Rare knobs of :func:`compile_model`.

    Defaults: batch 512 for accuracy runs, 200 single-window runs for batch-1 latency, no
    JUnit file, no signing key, ``force=False`` (a non-empty output directory nilmc did not
    write is refused), ``inputs=()`` (paths of the model and data files, never written over),
    ``debug=False`` (True: an internal error inside a target is raised, not recorded),
    ``overflow="warn"`` (the INT8 overflow policy for every quantizing target: ``warn`` records
    the findings in the manifest, ``error`` fails the target (exit 2) naming the tensors, ``fix``
    applies the fixes overflow.py knows; under ``error`` and ``fix`` output clipping is always
    fixed, since the head must cover the contract's peak power), ``backend_options={}``
    (backend name -> {option: value}, checked against the backend's typed options record),
    ``min_sqnr_db=10.0`` (the output-SQNR floor vs FP32 added to the budget as ``min_sqnr_db`` unless
    the budget names it; an all-zero output scores 0 dB, FP32 itself inf; None: no floor),
    ``min_int8_share=0.01`` (the least share of the weighted layers' MACs a quantizing target's artifact must run in
    INT8, added to the budget as ``min_int8_macs_share`` unless the budget names it: an "int8" artifact that runs
    everything in float fails; None: no floor),
    ``calib_windows=None`` (calibrate on every window given; N: select N of them, see
    :func:`calibration_data.selection.select_calibration`) with ``calib_selection="random"``
    (``"random"``, ``"stratified"`` or ``"first"``; random is the default because it gave the best
    worst-draw SQNR in benchmarks/bench_calibration_draws.py) and ``calib_seed=0``, and
    ``coverage_threshold=0.001`` (share of a tensor's evaluation values outside its calibrated range
    above which the compile warns; see :mod:`quantization.coverage`), ``equalize="auto"`` (cross-layer
    equalization of the model every quantizing target gets, :mod:`quantization.equalize`: ``auto`` applies it
    when it raises the calibration windows' output SQNR under generic per-tensor INT8, ``on`` always (pairs
    under the imbalance threshold are still left alone), ``off`` never; the FP32 reference is always the
    model as given; power-of-two targets (the DPU) always keep the model as given, see
    :meth:`_Job.uses_equalized`; each quantizing target's manifest records what was done in ``equalization``).
    """

    batch_size: int = 512
    latency_windows: int = 200
    junit: Path | None = None
    sign_key: Path | None = None
    force: bool = False
    inputs: tuple[str | Path, ...] = ()
    debug: bool = False
    overflow: str = "warn"
    backend_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    min_sqnr_db: float | None = 10.0
    min_int8_share: float | None = DEFAULT_MIN_INT8_SHARE
    calib_windows: int | None = None
    calib_selection: str = "random"
    calib_seed: int = 0
    coverage_threshold: float = 1e-3
    equalize: str = "auto"
    # Targets left out, not failed, when their pre-check refuses the model (one line each in the summary's "skipped"):
    # those a wildcard (--targets all, backend:all) brought in; a target named on its own that cannot take the model
    # is bad input (exit 2) as before.
    skip_refused: frozenset[str] = frozenset()
    # Worker processes for independent targets (1 = all in this process). With 2, the targets are split by backend
    # (backends sharing caches or parameters stay together) and one share runs in a spawned process: measured on the
    # shipped model, two concurrent halves of `nilmc example` took 50 s wall against 72 s in one process.
    jobs: int = 1


@dataclass
class TargetResult:
    target: Target
    report: Report | None
    bundle: Path | None
    artifact_kind: str = ""
    size_bytes: int = 0
    latency_ms_b1: float | None = None
    compile_s: float = 0.0
    error: str | None = None
    error_code: int | None = None  # exit code class of ``error``: 2 bad input, 3 internal
    manifest_sha256: str | None = None
    verify_s: float = 0.0  # running the artifact on the evaluation set (and batch-1 latency)
    timings: dict[str, Any] = field(default_factory=dict)  # run-to-run timings kept out of the hashed manifest
    int8_macs_share: float | None = None  # share of the weighted layers' MACs the artifact runs in INT8 (None: a float target)

    @property
    def passed(self) -> bool:
        return self.error is None and self.report is not None and bool(self.report)

    @property
    def exit_code(self) -> int:
        if self.error is not None:
            return self.error_code or EXIT_INTERNAL
        return EXIT_OK if self.passed else EXIT_GATE_FAILED

    @property
    def status(self) -> str:
        return {EXIT_OK: "PASS", EXIT_GATE_FAILED: "FAIL", EXIT_BAD_INPUT: "BAD INPUT", EXIT_INTERNAL: "INTERNAL ERROR"}[self.exit_code]

    def row(self) -> dict[str, Any]:
        r = self.report
        return {
            "target": str(self.target),
            "passed": self.passed,
            "status": self.status,
            "exit_code": self.exit_code,
            "verification": r.verification if r is not None else "not verified",
            "eacc": None if r is None or r.candidate.eacc != r.candidate.eacc else r.candidate.eacc,  # NaN: a classifier
            "mae_w": None if r is None or r.candidate.mae != r.candidate.mae else r.candidate.mae,
            **({"f1w": r.candidate.f1w, "delta_f1w_pts": r.deltas.get("f1w")} if r is not None and hasattr(r.candidate, "f1w") else {}),
            "delta_eacc_pts": None if r is None else r.deltas.get("eacc"),
            "delta_mae_w": None if r is None else r.deltas.get("mae"),
            "output_sqnr_db": None if r is None else r.extra.get("output_sqnr_db"),
            "int8_macs_share": self.int8_macs_share,
            "size_bytes": self.size_bytes,
            "latency_ms_b1": self.latency_ms_b1,
            "compile_s": round(self.compile_s, 3),
            "verify_s": round(self.verify_s, 3),
            "timings": self.timings,
            "kind": self.artifact_kind,
            "bundle": None if self.bundle is None else self.bundle.name,
            "manifest_sha256": self.manifest_sha256,
            "error": self.error,
            "violations": [] if r is None else [str(v) for v in r.worst_first()],
            "cause": None if r is None or not r.cause else r.cause,  # of a failed gate, from the analysis (README: --json)
        }


@dataclass
class CompileSummary:
    reference: AnyMetrics
    results: list[TargetResult] = field(default_factory=list)
    out_dir: Path | None = None
    calibration_s: float = 0.0
    written: bool = False  # bundles were moved into out_dir
    warnings: list[str] = field(default_factory=list)
    stages_s: dict[str, Any] = field(default_factory=dict)  # wall time per shared stage (reference, statistics, techniques, total)
    skipped: dict[str, str] = field(default_factory=dict)  # target -> why its pre-check refused the model (skip_refused)

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    @property
    def exit_code(self) -> int:
        """The most severe outcome over every target: 3 internal > 2 bad input > 1 gate > 0."""
        return most_severe([r.exit_code for r in self.results])

    def failed_targets(self) -> list[str]:
        return [str(r.target) for r in self.results if not r.passed]

    def by_status(self, status: str) -> list[str]:
        return [str(r.target) for r in self.results if r.status == status]

    def bundles(self) -> list[str]:
        return [r.bundle.name for r in self.results if r.bundle is not None]

    def to_json(self) -> dict[str, Any]:
        return {
            "nilmc_version": nilmc.__version__,
            "passed": self.passed,
            "exit_code": self.exit_code,
            "reference": self.reference.to_json(),
            "calibration_s": round(self.calibration_s, 3),
            "stages_s": self.stages_s,
            "targets": [r.row() for r in self.results],
            "bundles": {r.bundle.name: {"target": str(r.target), "manifest_sha256": r.manifest_sha256}
                        for r in self.results if r.bundle is not None},
            "warnings": list(self.warnings),
            "skipped": dict(self.skipped),
        }


# ---------------------------------------------------------------- helpers
def tool_versions(packages: Sequence[str] = ("onnx", "onnxruntime", "numpy")) -> dict[str, str]:
    out = {"nilmc": nilmc.__version__}
    for p in packages:
        try:
            out[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            out[p] = "absent"
    return out


def predict_watts(runner: Any, contract: ModelContract, raw_x: np.ndarray, *, batch_size: int = 512) -> np.ndarray:
    """Run a runner over raw feature windows; returns predictions in watts, shape ``(N,)``."""
    x = contract.prepare(raw_x)
    name = contract.input_name
    outs = []
    for i in range(0, len(x), batch_size):
        res = runner.infer({name: x[i : i + batch_size]})
        outs.append(np.asarray(next(iter(res.values()))))
    return contract.to_watts(np.concatenate(outs, axis=0))


def latency_ms_batch1(runner: Any, contract: ModelContract, raw_x: np.ndarray, *, n: int = 200) -> float:
    x = contract.prepare(raw_x[: max(1, min(n, len(raw_x)))])
    name = contract.input_name
    runner.infer({name: x[:1]})  # warm-up
    t0 = time.perf_counter()
    for i in range(len(x)):
        runner.infer({name: x[i : i + 1]})
    return (time.perf_counter() - t0) * 1e3 / len(x)


def eval_truth(model: Model, ds: NilmDataset) -> np.ndarray:
    # (N,) watts for regression; (N, M) watts of the contract's appliances for ON/OFF classification
    return model.contract.select_truth(ds.y, ds.appliances)


def check_data_for_model(model: Model, ds: NilmDataset, *, role: str) -> None:
    """Shape and appliance must agree before anything runs."""
    model.contract.check_input(ds.x, source=f"the {role} set")
    ds.appliance_index(model.contract.appliance)
    model.contract.select_truth(ds.y[:1], ds.appliances)  # every appliance a classifier names


def check_data_normalization(model: Model, ds: NilmDataset, *, role: str) -> None:
    """The same normalization check for every data set the compile reads (calibration and evaluation).

    Raw features labelled as z-scored, watts ×1000 or values like 1e30 would otherwise give a
    meaningless reference (EACC 50 %, −13378 %) and a "PASS".
    """
    from nilmc.quantization.normalization_check import check_normalization

    try:
        check_normalization(model.contract, model.contract.normalize(ds.raw_x()), policy="error")
    except NormalizationError as exc:
        raise NormalizationError(f"the {role} set: {exc.message}", exc.remedy) from None


def reference_metrics(model: Model, eval_ds: NilmDataset, *, registry: Registry | None = None, batch_size: int = 512) -> tuple[AnyMetrics, np.ndarray]:
    """The FP32 reference: the model's ONNX graph on onnxruntime, in watts."""
    import tempfile

    registry = registry or default_registry(plugins=False)
    check_data_for_model(model, eval_ds, role="evaluation")
    backend = registry.get(REFERENCE_TARGET.backend)
    with tempfile.TemporaryDirectory() as tmp:
        art = backend.lower(model, Path(tmp), precision=REFERENCE_TARGET.precision)
        with backend.runner(art) as r:
            pred = predict_watts(r, model.contract, eval_ds.raw_x(), batch_size=batch_size)
    _check_probabilities(model, pred)
    return model.contract.score(eval_truth(model, eval_ds), pred), pred


PROBABILITY_SLACK = 1e-3  # a sigmoid head's float output stays in [0, 1]; beyond this the output is not a probability


def _check_probabilities(model: Model, pred: np.ndarray) -> None:
    """A binary / multilabel contract scores probabilities: an output outside [0, 1] is a regression head under the
    wrong --task (fuzzed: outputs -1.17..3.13 taken as probabilities, F1 1.000 everywhere, no word said)."""
    if not model.contract.is_classification or pred.size == 0:
        return
    lo, hi = float(np.min(pred)), float(np.max(pred))
    if lo < -PROBABILITY_SLACK or hi > 1.0 + PROBABILITY_SLACK:
        raise BadInputError(f"--task {model.contract.task} scores per-appliance probabilities in [0, 1], but the model's FP32 outputs "
                            f"span {lo:.4g} .. {hi:.4g} on the evaluation set",
                            "a classifier needs a sigmoid head; for a model that predicts power, use --task regression with "
                            "--target-mean/--target-std")


OVERFLOW_POLICIES = ("warn", "error", "fix")


@dataclass(frozen=True)
class TargetPlan:
    """One target's pipeline as data: traits -> parameters (estimator) -> overflow policy -> lower(options) -> run -> compare.

    ``problem`` is what a pre-check found without doing any work (the target then fails at once with it).
    """

    target: Target
    traits: Any = None  # QuantTraits when the precision quantizes
    estimator: str | None = None
    options: Any = None  # the backend's typed options record (None when it has none)
    option_values: Mapping[str, Any] = field(default_factory=dict)  # the options the user set
    problem: NilmcError | None = None

    @property
    def quantizes(self) -> bool:
        return self.traits is not None


def plan_targets(model: Model, targets: Sequence[Target], registry: Registry, options: CompileOptions) -> list[TargetPlan]:
    """Each target's plan, checking the backend options (exit 2 for unknown names or bad values) first."""
    from nilmc.backends.base import parse_backend_options
    from nilmc.compiler.errors import BadInputError

    if options.overflow not in OVERFLOW_POLICIES:
        raise BadInputError(f"unknown overflow policy {options.overflow!r}", f"use one of {', '.join(OVERFLOW_POLICIES)}")
    from nilmc.quantization.equalize import EQUALIZE_MODES

    if options.equalize not in EQUALIZE_MODES:
        raise BadInputError(f"unknown equalization mode {options.equalize!r}", f"use one of {', '.join(EQUALIZE_MODES)}")
    used = {t.backend for t in targets}
    stray = sorted(set(options.backend_options) - used)
    if stray:
        raise BadInputError(f"--option names backend(s) {', '.join(stray)} that no target uses", f"targets: {', '.join(map(str, targets))}")
    typed = {b: parse_backend_options(b, registry.get(b).capabilities, dict(options.backend_options.get(b, {}))) for b in used}
    plans = []
    for t in targets:
        caps = registry.get(t.backend).capabilities
        problem = None
        if caps.needs_keras(t.precision) and model.keras_path is None:
            problem = BadInputError(f"{t} lowers from the Keras source, but {model.source or 'the model'} was given as ONNX",
                                    "pass the .keras/.h5 file instead, or choose a target that lowers from ONNX (e.g. onnxruntime:int8, openvino:int8)")
        else:
            problem = _precheck(registry, t, model)
        plans.append(TargetPlan(t, _target_traits(caps, t.precision, typed[t.backend]), caps.estimators.get(t.precision), typed[t.backend],
                                dict(options.backend_options.get(t.backend, {})), problem))
    return plans


def _deployed_float(art: Any, shared: Any) -> list[str]:
    """What an artifact runs in float beyond the shared parameters' ``keep_float``, from the parameters it records as
    deployed (``info["quantization"]``, shared format): activations it names (the DPU's CPU-stage tensors) and the
    layers of a float prefix (TFLite/eIQ under the SQNR floor). A float layer of another kind is not taken: the DPU's
    CPU tail reads the DPU's int8 output."""
    from nilmc.quantization.params import PARAMS_VERSION

    record = art.info.get("quantization")
    if not isinstance(record, dict) or record.get("params_version") != PARAMS_VERSION:
        return []  # no record, or one keyed by Keras layer (a QAT target's)
    layers = {la.name for la in shared.layers}
    prefix = ((record.get("provenance") or {}).get("float_prefix") or {}).get("layers", [])
    named = [n for n in record.get("keep_float", ()) if n not in layers or n in prefix]
    return [n for n in dict.fromkeys(named) if n not in shared.keep_float]


def target_refusals(model: Model, targets: Sequence[Target], registry: Registry) -> dict[str, str]:
    """``{target: one-line reason}`` for the targets that cannot take ``model``, found as :func:`plan_targets` finds
    them (the Keras source a target needs, the backend's graph pre-check): milliseconds, nothing lowered."""
    out = {}
    for t in targets:
        caps = registry.get(t.backend).capabilities
        if caps.needs_keras(t.precision) and model.keras_path is None:
            out[str(t)] = f"{t} lowers from the Keras source; the model was given as ONNX"
            continue
        problem = _precheck(registry, t, model)
        if problem is not None:
            out[str(t)] = problem.message
    return out


def _target_traits(caps: Any, precision: str, typed_options: Any) -> Any:
    """The traits a target's parameters are derived under: the backend's declared ones, adjusted by its typed options
    where the options record says how (``quant_traits(precision, traits)``, e.g. ``tflite.cpu_layers=none`` is full
    integer), so the shared derivation and the manifest's overflow / coverage sections describe what is deployed."""
    traits = caps.traits.get(precision)
    adjust = getattr(typed_options, "quant_traits", None)
    return traits if traits is None or adjust is None else adjust(precision, traits)


def _precheck(registry: Registry, target: Target, model: Model) -> NilmcError | None:
    """The backend's own graph pre-check (milliseconds, before calibration), as the target's problem."""
    from nilmc.backends.base import precheck
    from nilmc.compiler.errors import BadInputError

    try:
        reason = precheck(registry.get(target.backend), model, target.precision)
    except NilmcError as exc:
        return exc
    except Exception:  # a pre-check that fails to decide decides nothing: the lowering reports for itself
        return None
    if reason is None:
        return None
    head, _, remedy = reason.rpartition("; ")
    return BadInputError(head or reason, remedy if head else None)


def needs_calibration(registry: Registry, target: Target) -> bool:
    """A target quantizes (and needs a calibration set) when its backend declares traits for its precision."""
    return target.precision in registry.get(target.backend).capabilities.traits


def preflight(model: Model, eval_ds: NilmDataset, targets: Sequence[Target], out_dir: str | Path, *, calib: NilmDataset | None,
              registry: Registry, options: CompileOptions) -> list[TargetPlan]:
    """Every check that needs no compiling, before any work (each raises a :class:`BadInputError`); returns the plans."""
    if not targets:
        raise DataError("no targets to compile", "pass --targets, e.g. onnxruntime:int8,tflite:int8")
    plans = plan_targets(model, targets, registry, options)
    check_output_path(out_dir, inputs=options.inputs)
    if options.junit is not None:
        check_output_file(options.junit, inputs=options.inputs, what="--junit")
        _junit_not_in_out(Path(options.junit), Path(out_dir), targets)
    if options.sign_key is not None:
        from nilmc.compiler.signing import Signer

        Signer.load(options.sign_key)
    check_data_for_model(model, eval_ds, role="evaluation")
    quantizing = [str(t) for t in targets if needs_calibration(registry, t)]
    if quantizing and calib is None:
        raise DataError(f"target(s) {', '.join(quantizing)} quantize and need a calibration set", "pass --calib FILE (e.g. the shipped calibration set)")
    check_data_normalization(model, eval_ds, role="evaluation")
    if calib is not None:
        check_data_for_model(model, calib, role="calibration")
        check_data_normalization(model, calib, role="calibration")
    return plans


def _skip_refused(plans: list[TargetPlan], skippable: frozenset[str]) -> tuple[list[TargetPlan], dict[str, str]]:
    """The plans left once the skippable targets whose pre-check refused the model are taken out, and those
    (target -> one-line reason); :class:`DataError` when nothing is left."""
    skipped = {str(p.target): p.problem.message for p in plans if p.problem is not None and str(p.target) in skippable}
    kept = [p for p in plans if str(p.target) not in skipped]
    if plans and not kept:
        reasons = "; ".join(f"{t}: {why}" for t, why in list(skipped.items())[:3])
        raise DataError(f"none of the {len(plans)} targets can take this model ({reasons}{'; ...' if len(skipped) > 3 else ''})",
                        "name a target that runs the model's ops, e.g. --targets onnxruntime:fp32")
    return kept, skipped


def _input_warnings(model: Model, ds: NilmDataset) -> list[str]:
    """What the compile can do but the user should hear about the model's input: normalized twice (flags + graph)."""
    from nilmc.quantization.normalization_check import check_double_normalization

    twice = check_double_normalization(model.contract, ds.raw_x()[:DOUBLE_NORM_WINDOWS])
    return [] if twice is None else [twice]


def _junit_not_in_out(junit: Path, out: Path, targets: Sequence[Target]) -> None:
    planned = {REFERENCE_ENTRY, SUMMARY, *(bundle_name(t) for t in targets)}
    j, o = junit.absolute().resolve(), out.absolute().resolve()
    if o in j.parents and j.relative_to(o).parts[0] in planned:
        raise DataError(f"--junit {str(junit)!r} lies inside an entry nilmc writes in the output directory", "write it beside, e.g. --junit junit.xml")


# ---------------------------------------------------------------- compile
def compile_model(
    model: Model,
    eval_ds: NilmDataset,
    targets: Sequence[Target],
    out_dir: str | Path,
    *,
    calib: NilmDataset | None = None,
    budget: Mapping[str, float] | None = None,
    registry: Registry | None = None,
    options: CompileOptions = CompileOptions(),
    progress: Callable[[str], None] | None = None,
) -> CompileSummary:
    """Lower ``model`` to every target, verify each artifact on ``eval_ds``, write bundles.

    Checks everything it can first (:func:`preflight`; raises :class:`BadInputError`). Every
    bundle is built in a staging directory and moved into ``out_dir`` only when the whole
    compile is done (:class:`compiler.outdir.OutputDir`: nothing nilmc did not write is ever
    deleted). Returns a :class:`CompileSummary`; it does not raise on a failed gate or on an
    error inside one target (the caller decides: the CLI exits with ``summary.exit_code``).
    Default budget: ``eacc=0.5``.
    """
    registry = registry or default_registry()
    budget = dict(default_budget(model.contract.task) if budget is None else budget)
    check_budget_for_task(budget, model.contract.task)
    if options.min_sqnr_db is not None and MIN_SQNR_KEY not in budget:
        budget[MIN_SQNR_KEY] = options.min_sqnr_db  # the floor that fails an all-zero output, recorded with the budget
    if options.min_int8_share is not None and MIN_INT8_KEY not in budget:
        budget[MIN_INT8_KEY] = options.min_int8_share  # the floor that fails a float model behind an INT8 name
    budget = validate_budget(budget)
    targets = list(dict.fromkeys(targets))
    plans = preflight(model, eval_ds, targets, out_dir, calib=calib, registry=registry, options=options)
    plans, skipped = _skip_refused(plans, options.skip_refused)
    targets = [p.target for p in plans]
    calibration_record: dict[str, Any] = {}
    if calib is not None:
        from nilmc.calibration_data.selection import select_for_compile

        calib, calibration_record = select_for_compile(calib, options.calib_windows, method=options.calib_selection,
                                                       seed=options.calib_seed, appliance=model.contract.appliance)
    say = progress or (lambda s: None)
    progress_plan(progress, 1 + len(plans))  # a progress bar's total: the reference, then each target
    signer = None
    if options.sign_key is not None:
        from nilmc.compiler.signing import Signer

        signer = Signer.load(options.sign_key)

    entries = [REFERENCE_ENTRY, SUMMARY, *(bundle_name(t) for t in targets)]
    # eq_dir: the equalized Keras twin the Keras-route targets lower from (lives as long as the compile)
    with OutputDir(out_dir, entries, inputs=options.inputs, force=options.force) as out, \
            tempfile.TemporaryDirectory(prefix="nilmc-equalize-") as eq_dir:
        say("FP32 reference on onnxruntime")
        t_ref = time.perf_counter()
        ref_metrics, ref_pred = reference_metrics(model, eval_ds, registry=registry, batch_size=options.batch_size)
        summary = CompileSummary(ref_metrics, out_dir=Path(out_dir), skipped=skipped)
        summary.warnings.extend(_input_warnings(model, calib if calib is not None else eval_ds))
        summary.stages_s["reference"] = round(time.perf_counter() - t_ref, 3)
        progress_done(progress, "FP32 reference on onnxruntime")
        reference_onnx = model.serialize()
        model.save_onnx(out.staging / REFERENCE_ENTRY / "model.onnx")
        quant = None
        qmodel, equalization = model, None
        if calib is not None:
            from nilmc.quantization.context import QuantContext

            quant_eq = None
            if any(p.quantizes and p.problem is None for p in plans):
                t_eq = time.perf_counter()
                qmodel, equalization, quant_eq = _equalize(model, calib, Path(eq_dir), options, say)
                summary.stages_s["equalization"] = round(time.perf_counter() - t_eq, 3)
            # Statistics are collected once, on first use. No mixed-precision budget here: scored on
            # 1000 calibration windows the EACC is too noisy to steer it (measured: it kept conv1 in
            # float for generic INT8 and the eval delta got worse, -0.70 -> +0.83 points).
            if qmodel is model:
                quant = quant_eq or QuantContext(model, calib)
            else:  # the model as given too, for the targets equalization does not serve (built lazily, on first use)
                quant = QuantContext(model, calib)
                quant_eq = quant_eq or QuantContext(qmodel, calib)
        writer = BundleWriter(model, eval_ds, reference_sha256=sha256_bytes(reference_onnx), signer=signer)
        job = _Job(model, registry, {"calibration": calib, "quant": quant}, eval_ds, eval_truth(model, eval_ds), (ref_metrics, ref_pred),
                   budget, options, writer, calibration_record, quant_model=qmodel, equalization=equalization,
                   quant_eq=quant_eq if qmodel is not model else None)
        here, there = _split_plans(plans, registry, options)
        worker = _start_worker([(i, plans[i]) for i in there], job, out.staging, sha256_bytes(reference_onnx), say) if there else None
        results: dict[int, TargetResult] = {}
        try:
            for i in here:
                say(f"lowering {plans[i].target}")
                results[i] = job.run(plans[i], out.staging / bundle_name(plans[i].target))
                progress_done(progress, str(plans[i].target))
            if worker is not None:
                done, warnings = _collect_worker(worker, there, plans)
                results.update(done)
                job.warnings.extend(warnings)
                for i in there:
                    progress_done(progress, str(plans[i].target))
        finally:
            if worker is not None:
                worker[0].terminate()
                worker[0].join()
        summary.results.extend(results[i] for i in range(len(plans)))
        summary.warnings.extend(job.warnings)
        if job.coverage_s:
            summary.stages_s["coverage"] = round(job.coverage_s, 3)
        summary.calibration_s = quant.calibration_s if quant is not None else 0.0
        if quant is not None:
            summary.stages_s["statistics"] = round(quant.statistics_s, 3)
            summary.stages_s["techniques"] = {k: round(v, 3) for k, v in quant.techniques_s.items()}
        summary.stages_s["total"] = round(time.perf_counter() - t_ref, 3)
        atomic_write_json(out.staging / SUMMARY, summary.to_json())
        summary.warnings.extend(out.commit())
        summary.written = True
    if options.junit is not None:
        from nilmc.compiler.junit import junit_xml

        atomic_write_text(options.junit, junit_xml(summary))
    return summary


def _equalize(model: Model, calib: NilmDataset, workdir: Path, options: CompileOptions,
              say: Callable[[str], None]) -> tuple[Model, dict[str, Any], Any]:
    """The model the quantizing targets get (:func:`quantization.equalize.equalize_for_quantization` on the
    calibration windows), its manifest record, and the calibration context built deciding (or None)."""
    from nilmc.quantization.equalize import equalize_for_quantization

    if options.equalize != "off":
        say("cross-layer equalization")
    return equalize_for_quantization(model, calib, workdir, mode=options.equalize)


# ---------------------------------------------------------------- worker process
def _split_plans(plans: Sequence[TargetPlan], registry: Registry, options: CompileOptions) -> tuple[list[int], list[int]]:
    """Plan indices for (this process, one worker process).

    Backends stay whole (their caches live per process) and backends whose targets derive the same parameters stay
    together (one techniques run). The groups are balanced by a cost guess (a quantizing target 3, one lowering from
    Keras 4 more, any other 1); the worker gets the lighter half, since it pays its own start-up. Everything runs here
    when ``options.jobs < 2``, with ``debug``, for fewer than 4 targets, or when a backend of the registry is not the
    one a fresh :func:`default_registry` gives the worker (a backend registered in-process only).
    """
    everything = list(range(len(plans)))
    if options.jobs < 2 or options.debug or len(plans) < 4 or not _registry_rebuildable(registry, {p.target.backend for p in plans}):
        return everything, []
    from nilmc.quantization.context import _derivation_key

    groups: dict[str, set[str]] = {}  # backend -> the set of backends it is grouped with
    keys: dict[Any, str] = {}
    for p in plans:
        groups.setdefault(p.target.backend, {p.target.backend})
        if p.traits is None:
            continue
        other = keys.setdefault(_derivation_key(p.traits), p.target.backend)
        if other != p.target.backend:
            merged = groups[other] | groups[p.target.backend]
            for b in merged:
                groups[b] = merged
    units = {frozenset(g) for g in groups.values()}
    cost = {u: sum(1 + 2 * p.quantizes + 4 * bool(registry.get(p.target.backend).capabilities.needs_keras(p.target.precision))
                   for p in plans if p.target.backend in u) for u in units}
    bins: list[list[frozenset[str]]] = [[], []]
    load = [0, 0]
    for u in sorted(units, key=lambda u: (-cost[u], sorted(u))):
        k = 0 if load[0] <= load[1] else 1
        bins[k].append(u)
        load[k] += cost[u]
    light = 0 if load[0] < load[1] else 1
    there_backends = set().union(*bins[light]) if bins[light] else set()
    here = [i for i, p in enumerate(plans) if p.target.backend not in there_backends or p.problem is not None]
    there = [i for i in everything if i not in here]
    return (here, there) if here and there else (everything, [])


def _registry_rebuildable(registry: Registry, backends: set[str]) -> bool:
    fresh = default_registry()
    return all(b in fresh and type(fresh.get(b)) is type(registry.get(b)) for b in backends)


def _start_worker(share: list[tuple[int, TargetPlan]], job: _Job, staging: Path, reference_sha256: str,
                  say: Callable[[str], None]) -> tuple[Any, Any]:
    import multiprocessing

    quant = job.lower_options.get("quant")
    spec = {
        "model": job.model, "eval_ds": job.eval_ds, "calib": job.lower_options.get("calibration"),
        "reference": job.reference, "budget": dict(job.budget), "options": dataclasses.replace(job.options, jobs=1, junit=None),
        "calibration_record": dict(job.calibration_record), "staging": staging, "reference_sha256": reference_sha256,
        "plans": share, "has_quant": quant is not None, "quant_model": job.quant_model, "equalization": job.equalization,
    }
    for _, plan in share:
        say(f"lowering {plan.target} (worker process)")
    # spawn, not fork: the parent may hold TensorFlow and onnxruntime threads, which do not survive a fork
    pool = multiprocessing.get_context("spawn").Pool(1)
    return pool, pool.apply_async(_worker_run, (spec,))


def _collect_worker(worker: tuple[Any, Any], indices: list[int], plans: Sequence[TargetPlan]) -> tuple[dict[int, TargetResult], list[str]]:
    _, pending = worker
    try:
        results, warnings = pending.get()
    except Exception as exc:  # the worker died or could not run: its targets are internal errors, the rest stands
        msg = f"internal error: the worker process failed ({type(exc).__name__}: {exc}); rerun with --jobs 1 and report it"
        return {i: TargetResult(plans[i].target, None, None, error=msg, error_code=EXIT_INTERNAL) for i in indices}, []
    return dict(results), list(warnings)


def _worker_run(spec: dict[str, Any]) -> tuple[list[tuple[int, TargetResult]], list[str]]:
    """In the worker process: the same :class:`_Job` over its share of the plans, writing into the same staging directory."""
    from nilmc.compiler.signing import Signer

    options: CompileOptions = spec["options"]
    model, eval_ds, calib = spec["model"], spec["eval_ds"], spec["calib"]
    qmodel = spec["quant_model"] or model
    quant = quant_eq = None
    if spec["has_quant"]:
        from nilmc.quantization.context import QuantContext

        quant = QuantContext(model, calib)
        quant_eq = QuantContext(qmodel, calib) if qmodel is not model else None
    signer = Signer.load(options.sign_key) if options.sign_key is not None else None
    writer = BundleWriter(model, eval_ds, reference_sha256=spec["reference_sha256"], signer=signer)
    job = _Job(model, default_registry(), {"calibration": calib, "quant": quant}, eval_ds, eval_truth(model, eval_ds), spec["reference"],
               spec["budget"], options, writer, spec["calibration_record"], quant_model=qmodel, equalization=spec["equalization"],
               quant_eq=quant_eq)
    out = [(i, job.run(plan, Path(spec["staging"]) / bundle_name(plan.target))) for i, plan in spec["plans"]]
    return out, job.warnings


def _float_artifact_cause(target: Target, share: float) -> str:
    """Why an INT8 target's artifact failed the INT8 floor, and what to do."""
    return (f"{target} runs {100 * share:.3g} % of the weighted layers' MACs in INT8: every other layer was kept float (precise "
            f"input / output, the SQNR floor or a precision fallback: the manifest's placement says which and why), so the artifact "
            f"is a float model behind an INT8 name; use {target.backend}:fp32 (or fp16) for what it is, or lower the floor with "
            f"--min-int8-share")


MIN_INT8_MACS_SHARE = 0.5  # under this share of the MACs in INT8, an int8 target's compile warns (mostly float)


@dataclass
class _Job:
    """What every target of one compile shares."""

    model: Model
    registry: Registry
    lower_options: Mapping[str, Any]
    eval_ds: NilmDataset
    truth: np.ndarray
    reference: tuple[AnyMetrics, np.ndarray]
    budget: Mapping[str, float]
    options: CompileOptions
    writer: BundleWriter
    calibration_record: Mapping[str, Any] = field(default_factory=dict)  # how the calibration windows were chosen
    warnings: list[str] = field(default_factory=list)  # per-target warnings for the summary (coverage)
    coverage_s: float = 0.0  # the one FP32 pass over the evaluation windows
    _observation: Any = field(default=None, repr=False)  # coverage.EvaluationObservation, on first use
    # What the quantizing targets calibrate, quantize and lower: the model as given or its cross-layer equalized
    # twin (FP32-identical; the reference stays the model as given), and the manifest record of that choice.
    quant_model: Model | None = None
    equalization: Mapping[str, Any] | None = None
    quant_eq: Any = None  # QuantContext of quant_model when it is not the model as given
    _observations: dict[int, Any] = field(default_factory=dict, repr=False)  # per context: coverage.EvaluationObservation

    def uses_equalized(self, plan: TargetPlan) -> bool:
        """Power-of-two targets (the DPU) keep the model as given: measured on the shipped model over 5 draws,
        equalization raised dpu:b2304's SQNR (29.4 -> 31.7 dB mean) but worsened its EACC delta (+0.07 -> +0.34
        points mean, worst +0.55 -> +0.73), while onnxruntime/openvino/tflite/eiq gained (worst 34.9 -> 38.2 dB)."""
        return plan.quantizes and self.quant_eq is not None and not plan.traits.power_of_two

    def model_for(self, plan: TargetPlan) -> Model:
        return self.quant_model if self.uses_equalized(plan) and self.quant_model is not None else self.model

    def quant_for(self, plan: TargetPlan) -> Any:
        return self.quant_eq if self.uses_equalized(plan) else self.lower_options["quant"]

    def run(self, plan: TargetPlan, bundle: Path) -> TargetResult:
        import shutil

        target = plan.target
        t0 = time.perf_counter()
        try:
            if plan.problem is not None:
                raise plan.problem
            return self._run(plan, bundle, t0)
        except NilmcError as exc:
            shutil.rmtree(bundle, ignore_errors=True)  # never leave a partial bundle
            return TargetResult(target, None, None, error=exc.one_line(), error_code=exc.exit_code, compile_s=time.perf_counter() - t0)
        except Exception as exc:  # a bug in nilmc or a backend: recorded as internal, the other targets go on
            shutil.rmtree(bundle, ignore_errors=True)
            if self.options.debug:
                raise
            msg = f"internal error ({type(exc).__name__}: {exc}); rerun with `nilmc --debug ...` and report it"
            return TargetResult(target, None, None, error=msg, error_code=EXIT_INTERNAL, compile_s=time.perf_counter() - t0)

    def _quantize(self, plan: TargetPlan, quant: Any) -> tuple[Any, dict[str, Any], Any]:
        """Parameters from the one calibration pass under the target's traits, then the overflow checks under the policy.

        Returns the parameters, the manifest's ``overflow`` section and the overflow report."""
        from nilmc.quantization.overflow import QuantizationOverflowError, check_overflow

        graph = quant.model.graph  # the model the statistics were collected on (equalized or as given)
        params = quant.params(plan.traits, estimator=plan.estimator)
        if plan.estimator is not None:  # a target's own estimator (the DPU's start): precise input still applies (traits.float_layers)
            from nilmc.quantization.api import with_precise_input

            params = with_precise_input(params, graph, getattr(quant, "techniques", None))
        policy = {"default": self.options.overflow}
        if self.options.overflow != "warn":
            policy["output_clipping"] = "fix"
        try:
            report = check_overflow(graph, quant.statistics, params, plan.traits, peak_output=self.model.contract, policy=policy)
        except QuantizationOverflowError as exc:
            tensors = sorted({f.tensor for f in exc.report.errors})
            raise QuantizationError(f"--overflow error: {exc.message} (tensors: {', '.join(tensors)})", exc.remedy) from None
        return report.params, {"policy": self.options.overflow, **report.to_json()}, report

    def _coverage(self, params: Any, quant: Any) -> Any:
        """Coverage of ``params`` on the evaluation windows; the FP32 pass over them runs once per compile."""
        from nilmc.quantization.coverage import coverage, observe_evaluation, output_floor

        if id(quant) not in self._observations:
            t0 = time.perf_counter()
            contract = self.model.contract
            self._observations[id(quant)] = observe_evaluation(quant.model.graph, contract.prepare(self.eval_ds.raw_x()), quant.statistics,
                                                               feature_names=contract.feature_names or self.eval_ds.feature_names)
            self.coverage_s += time.perf_counter() - t0
        self._observation = self._observations[id(quant)]
        return coverage(self._observation, params, threshold=self.options.coverage_threshold, floors=output_floor(self.model.contract))

    def _run(self, plan: TargetPlan, bundle: Path, t0: float) -> TargetResult:
        target = plan.target
        ref_metrics, ref_pred = self.reference
        backend = self.registry.get(target.backend)
        model = self.model_for(plan)
        bundle.mkdir(parents=True)
        lower_options = dict(self.lower_options)
        sections: dict[str, Any] = {}
        findings: Any = None  # (overflow report, coverage report) of a quantizing target, for the cause of a failed gate
        if plan.quantizes:
            quant = self.quant_for(plan)
            lower_options["quant"] = quant
            lower_options["params"], sections["overflow"], overflow = self._quantize(plan, quant)
            from nilmc.quantization.placement import op_placement

            # which ops got INT8 parameters and which stay float inside the artifact (never hidden behind "int8")
            sections["placement"] = op_placement(model.graph, lower_options["params"])
            cover = self._coverage(lower_options["params"], quant)
            sections["coverage"] = cover.to_json()
            if self.calibration_record:
                sections["calibration"] = dict(self.calibration_record)
            if self.equalization is not None:
                sections["equalization"] = {**self.equalization, "used_by_this_target": self.uses_equalized(plan)}
                if self.quant_eq is not None and not self.uses_equalized(plan):
                    sections["equalization"]["why_not"] = "power-of-two target: keeps the model as given (measured, see the driver)"
            findings = (overflow, cover)
        if plan.options is not None:
            lower_options["backend_options"] = plan.options
            lower_options.update({k: getattr(plan.options, k) for k in plan.option_values})
            sections["backend_options"] = dataclasses.asdict(plan.options)
        art = backend.lower(model, bundle, precision=target.precision, options=lower_options)
        if findings is not None:
            extra = _deployed_float(art, lower_options["params"])
            if extra:  # the backend runs more in float than the shared parameters say: coverage of what it quantizes
                shared = lower_options["params"]
                findings = (findings[0], self._coverage(dataclasses.replace(shared, keep_float=(*shared.keep_float, *extra)), quant))
                sections["coverage"] = findings[1].to_json()
            if not findings[1]:
                self.warnings.append(f"{target}: {findings[1].warning()}")
        cal_sqnr = art.info.get("calibration_sqnr")
        hint = cal_sqnr.get("hint") if isinstance(cal_sqnr, dict) else None  # e.g. tflite:int8 under the SQNR floor: which target holds it
        if hint:
            self.warnings.append(f"{target}: {hint}")
        if isinstance(art.info.get("placement"), dict):  # a backend that places ops itself (the DPU's CPU/DPU split) has the last word
            sections["placement"] = art.info.pop("placement")
        placed_devices = [d for d in (sections.get("placement") or {}).get("devices", ()) if isinstance(d, dict)]
        compile_s = time.perf_counter() - t0
        t_run = time.perf_counter()
        raw_eval = self.eval_ds.raw_x()
        with backend.runner(art) as runner:
            verification = Verification(getattr(runner, "verification", Verification.NOT_VERIFIED))
            pred = predict_watts(runner, self.model.contract, raw_eval, batch_size=self.options.batch_size)
            lat = (latency_ms_batch1(runner, self.model.contract, raw_eval, n=self.options.latency_windows)
                   if verification is Verification.MEASURED else None)
        verify_s = time.perf_counter() - t_run
        cand = self.model.contract.score(self.truth, pred)
        # Fidelity to FP32, beside the accuracy delta: an INT8 model can "gain" EACC by luck while drifting away.
        # a classifier's outputs are probabilities, not watts: the key says which
        diff_key = "max_abs_diff_probability" if self.model.contract.is_classification else "max_abs_diff_w"
        fidelity = {"output_sqnr_db": round(float(sqnr_db(ref_pred, pred)), 3),
                    diff_key: round(float(np.max(np.abs(ref_pred - pred))), 3 if diff_key.endswith("_w") else 6)}
        from nilmc.compiler.cost import manifest_cost

        placed = sections.get("placement") if plan.quantizes else None
        int8_layers = placed.get("int8") if isinstance(placed, dict) and isinstance(placed.get("int8"), list) else None
        sections["cost"] = manifest_cost(model.graph, int8_layers)  # MACs/FLOPs and seed 002's energy per prediction
        share = sections["cost"].get("int8_macs_share")  # a quantizing target's only (int8_layers given)
        share = share if isinstance(share, float) else None
        report = compare(ref_metrics, cand, self.budget, target=str(target), verification=verification.value, extra=fidelity,
                         sqnr_db=fidelity["output_sqnr_db"], int8_share=share)
        from nilmc.compiler.trace import power_trace

        if self.truth.ndim == 1:  # a power trace; a classifier predicts no power
            sections["trace"] = power_trace(self.truth, ref_pred, pred)  # a small predicted-vs-true trace for `nilmc report`
        if not report:
            from nilmc.quantization.coverage import NO_CAUSE, likely_causes
            from nilmc.quantization.mixed_precision import sqnr_floor_hint

            cpu_ops = {d.get("op") for d in placed_devices if d.get("device") == "CPU"}  # the DPU's CPU stages run in FP32
            cpu_tensors = {o for n in model.graph.graph.node if n.name in cpu_ops for o in n.output}
            cause = likely_causes(*findings, float_tensors=cpu_tensors) if findings else ""
            floor = sqnr_floor_hint(lower_options["params"]) if plan.quantizes else None  # the SQNR floor's own verdict
            no_int8 = next((_float_artifact_cause(target, v.delta) for v in report.violations if v.metric == "int8_macs_share"), None)
            known = "; ".join(c for c in (no_int8, hint, floor) if c)
            if known and cause.endswith(NO_CAUSE):  # the backend or the floor found one: "no cause found" is not true
                cause = "likely cause: " + known
            else:
                cause = "; ".join(c for c in (cause, known) if c)
            report = dataclasses.replace(report, cause=cause)
        from nilmc.compiler.hardware import manifest_section

        sections.update(manifest_section(str(target), report))  # EACC per W / $ / FPS on the boards this target runs on
        if share is not None and share < MIN_INT8_MACS_SHARE:
            self.warnings.append(f"{target}: only {share:.0%} of the MACs run in INT8 ({len(int8_layers or ())} weighted layer(s)); "
                                 "the rest runs in float (precise input, precision fallbacks for the SQNR floor or the budget: the manifest's "
                                 "placement says which and why), so its speed and size are closer to a float model's")
        size = sum((bundle / f).stat().st_size for f in (art.files or [art.primary]))
        sha, timings = self.writer.write(bundle, target, art, report, sections)
        return TargetResult(target, report, bundle, art.kind, size, lat, compile_s, manifest_sha256=sha, timings=timings, verify_s=verify_s,
                            int8_macs_share=share)


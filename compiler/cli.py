"""The ``nilmc`` command line: a thin click layer over the Python API.

Exit codes: 0 ok, 1 accuracy gate failed, 2 bad input or usage, 3 internal error.
"""
from __future__ import annotations

import functools
import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from nilmc.compiler.errors import EXIT_BAD_INPUT, EXIT_GATE_FAILED, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK, Interrupted, NilmcError
from nilmc.compiler.io import strict_dumps


def _emit_error(msg: str, code: int, *, as_json: bool = False, kind: str = "error", remedy: str | None = None) -> None:
    """One line on stderr (or, with --json, one JSON object on stdout), then exit ``code``."""
    if as_json:
        click.echo(strict_dumps({"error": {"type": kind, "message": msg, **({"remedy": remedy} if remedy else {})}, "exit": code}))
    else:
        click.echo(f"nilmc: error: {msg}", err=True)
    sys.exit(code)


def _wants_json() -> bool:
    ctx = click.get_current_context(silent=True)
    while ctx is not None:
        if ctx.params.get("as_json"):
            return True
        ctx = ctx.parent
    return "--json" in sys.argv[1:]


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """User errors become one line and exit 2; bugs one line and exit 3; SIGINT 130, SIGTERM 143."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        as_json = bool(kwargs.get("as_json"))
        try:
            return fn(*args, **kwargs)
        except NilmcError as exc:
            _emit_error(exc.message if as_json else exc.one_line(), exc.exit_code, as_json=as_json, kind=type(exc).__name__, remedy=exc.remedy)
        except (click.exceptions.Exit, click.ClickException):
            raise
        except KeyboardInterrupt:
            _emit_error("interrupted; nothing half-written was left behind", EXIT_INTERRUPTED, as_json=as_json, kind="Interrupted")
        except Interrupted as exc:
            _emit_error(f"{'interrupted' if exc.signum == signal.SIGINT else 'terminated'} by signal {exc.signum}; "
                        "nothing half-written was left behind", exc.exit_code, as_json=as_json, kind="Interrupted")
        except Exception as exc:  # an internal bug: say so, never a bare traceback
            ctx = click.get_current_context(silent=True)
            if ctx is not None and ctx.find_root().params.get("debug"):
                raise
            _emit_error(f"internal error ({type(exc).__name__}: {exc}); rerun with `nilmc --debug ...` and report it", EXIT_INTERNAL,
                        as_json=as_json, kind="InternalError")

    return wrapper


def json_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON on stdout (errors too: {\"error\": ..., \"exit\": N}).")(fn)


def _print_json(obj: Any) -> None:
    click.echo(strict_dumps(obj))


_HANDLER_PID: list[int] = []  # the process that installed _raise_interrupted


def _raise_interrupted(signum: int, frame: Any) -> None:
    if _HANDLER_PID and os.getpid() != _HANDLER_PID[-1]:
        # A child forked by a library (OpenVINO's telemetry sender) inherits the handler: it dies of the signal as it
        # would without nilmc, instead of printing Interrupted's traceback when it is terminated at exit.
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    raise Interrupted(signum)


class NilmcGroup(click.Group):
    """The root group: usage errors as JSON under --json, SIGTERM cleaned up like SIGINT (exit 143)."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        as_json = "--json" in argv
        # SIGINT and SIGTERM raise Interrupted (cleanup runs, exit 130 / 143); a signal the caller ignores stays ignored.
        # Not KeyboardInterrupt: CPython exits with -SIGINT whenever one escapes a C-level call, whatever we exit with.
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        if threading.current_thread() is threading.main_thread():
            _HANDLER_PID[:] = [os.getpid()]
            for s, handler in previous.items():
                if handler is not signal.SIG_IGN:
                    signal.signal(s, _raise_interrupted)
        try:
            rv = super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.Abort:
            _emit_error("interrupted; nothing half-written was left behind", EXIT_INTERRUPTED, as_json=as_json, kind="Interrupted")
        except Interrupted as exc:
            _emit_error(f"{'interrupted' if exc.signum == signal.SIGINT else 'terminated'} by signal {exc.signum}; "
                        "nothing half-written was left behind", exc.exit_code, as_json=as_json, kind="Interrupted")
        except click.ClickException as exc:
            # One line, like every other error: what was wrong, then where to look.
            cmd = exc.ctx.command_path if isinstance(exc, click.UsageError) and exc.ctx is not None else "nilmc"
            msg = exc.format_message().replace("\n", " ").rstrip(". ")
            _emit_error(f"{msg}; see `{cmd} --help`.", exc.exit_code, as_json=as_json, kind=type(exc).__name__,
                        remedy=f"see `{cmd} --help`")
        finally:
            if threading.current_thread() is threading.main_thread():
                for s, handler in previous.items():
                    signal.signal(s, handler)
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=NilmcGroup)
@click.option("--debug", is_flag=True, help="Show tracebacks of internal errors.")
@click.version_option(package_name="nilmc")
def cli(debug: bool) -> None:
    """nilmc: compile seq2point NILM models for edge targets, with accuracy proven per artifact.

    Exit codes: 0 ok, 1 accuracy gate failed, 2 bad input or usage, 3 internal error,
    130 interrupted (SIGINT), 143 terminated (SIGTERM).
    """


# ------------------------------------------------------------------ backends
@cli.command("backends")
@json_option
@handle_errors
def backends_cmd(as_json: bool) -> None:
    """List backends with their precisions and whether each is available here."""
    from nilmc.backends.registry import default_registry

    rows = default_registry().status()
    if as_json:
        _print_json(rows)
        return
    for r in rows:
        mark = "yes" if r["available"] else "no"
        click.echo(f"{r['name']:<14} {','.join(r['precisions']):<32} available: {mark:<3} {'' if r['available'] else r['reason']}")
        if r.get("description"):
            click.echo(f"{'':<14} {r['description']}")


# ------------------------------------------------------------------ compile
def _load_data(path: str | Path) -> Any:
    from nilmc.calibration_data.dataset import NilmDataset

    return NilmDataset.load(path)


def print_summary(summary: Any) -> None:
    from nilmc.compiler.report import summary_table

    click.echo(summary_table(summary))


def parse_option_flags(values: tuple[str, ...]) -> dict[str, dict[str, str]]:
    """``("eiq.io_dtype=uint8", "dpu.qat_epochs=5")`` -> ``{"eiq": {"io_dtype": "uint8"}, "dpu": {"qat_epochs": "5"}}``."""
    from nilmc.compiler.errors import BadInputError

    out: dict[str, dict[str, str]] = {}
    for v in values:
        key, sep, value = v.partition("=")
        backend, dot, name = key.strip().partition(".")
        if not sep or not dot or not backend or not name:
            raise BadInputError(f"--option {v!r} is not BACKEND.NAME=VALUE",
                                "e.g. --option dpu.qat_epochs=5 (nilmc backends --json lists each backend's options)")
        if name in out.setdefault(backend, {}):
            raise BadInputError(f"--option {backend}.{name} is given twice", "give each option once")
        out[backend][name] = value
    return out


def parse_min_sqnr(text: str | None) -> float | None:
    """``--min-sqnr``: a finite number of dB, ``off`` (no floor), or None (the default, 10 dB)."""
    import math

    from nilmc.compiler.compare import DEFAULT_MIN_SQNR_DB
    from nilmc.compiler.errors import BadInputError

    if text is None:
        return DEFAULT_MIN_SQNR_DB
    if text.strip().lower() == "off":
        return None
    try:
        v = float(text)
    except ValueError:
        raise BadInputError(f"--min-sqnr {text!r} is not a number of dB", "use e.g. --min-sqnr 20, or --min-sqnr off") from None
    if not math.isfinite(v):
        raise BadInputError(f"--min-sqnr {text!r} is not finite", "use e.g. --min-sqnr 20, or --min-sqnr off to drop the floor")
    return v


def parse_min_int8_share(text: str | None) -> float | None:
    """``--min-int8-share``: a share in [0, 1] (a percentage with ``%``), ``off`` (no floor), or None (the default, 0.01)."""
    from nilmc.compiler.compare import DEFAULT_MIN_INT8_SHARE
    from nilmc.compiler.errors import BadInputError

    if text is None:
        return DEFAULT_MIN_INT8_SHARE
    t = text.strip().lower()
    if t == "off":
        return None
    try:
        v = float(t.removesuffix("%")) / (100.0 if t.endswith("%") else 1.0)
    except ValueError:
        raise BadInputError(f"--min-int8-share {text!r} is not a share", "use e.g. --min-int8-share 0.5 (or 50%), or off") from None
    if not 0.0 <= v <= 1.0:
        raise BadInputError(f"--min-int8-share {text!r} is not a share in [0, 1]", "use e.g. --min-int8-share 0.5 (or 50%), or off")
    return v


def _wire_meter_fitter(registry: Any, tlist: list[Any]) -> None:
    """The tflm backend's fitter (pruning + distillation) lives in training/, which only the CLI may import: hand it over."""
    from nilmc.backends.tflm_backend import FittingTFLMBackend, TFLMBackend

    if any(t.backend == "tflm" for t in tlist) and type(registry.get("tflm")) is TFLMBackend:
        from nilmc.training.fit_meter import fit_to_budget

        registry.register(FittingTFLMBackend(fit_to_budget), replace=True)


def run_compile(model_path: str, calib: str | None, eval_path: str, targets: str, out: str, max_delta: str | None,
                junit: str | None, as_json: bool, *, force: bool = False, sign: str | None = None, overflow: str = "warn",
                option_flags: tuple[str, ...] = (), contract_flags: Any = None, min_sqnr: str | None = None,
                calib_windows: int | None = None, calib_select: str = "random", calib_seed: int = 0, jobs: int | None = None,
                report: str | None = None, min_int8_share: str | None = None) -> None:
    from nilmc.backends.registry import default_registry
    from nilmc.compiler.compare import parse_budget
    from nilmc.compiler.contract_flags import load_model_with_flags
    from nilmc.compiler.driver import CompileOptions, compile_model
    from nilmc.compiler.outdir import check_output_file, check_output_path

    inputs = tuple(p for p in (model_path, calib, eval_path, sign) if p) + _contract_inputs(contract_flags)
    # Everything checkable without loading anything, first: a bad --out or --junit is found in milliseconds.
    check_output_path(out, inputs=inputs)
    if junit:
        check_output_file(junit, inputs=inputs, what="--junit")
    if report:
        from nilmc.compiler.html_report import check_report_path

        check_report_path(report, out, inputs=inputs)
    registry = default_registry()
    tlist = registry.parse_targets(targets)
    named = {str(t) for part in targets.split(",") if part.strip() and not _wildcard(part) for t in registry.parse_targets(part)}
    _wire_meter_fitter(registry, tlist)
    # no --max-delta: the driver picks the model's task default (eacc=0.5 for regression, f1w=1 for classifiers)
    budget = parse_budget(max_delta) if max_delta else None
    min_sqnr_db = parse_min_sqnr(min_sqnr)
    int8_floor = parse_min_int8_share(min_int8_share)
    model = load_model_with_flags(model_path, contract_flags)
    eval_ds = _load_data(eval_path)
    calib_ds = _load_data(calib) if calib else None
    from nilmc.compiler.progress import StageProgress

    # a bar with an ETA on a terminal, the stage lines elsewhere, nothing under --json
    progress = StageProgress("compile", quiet=as_json, echo=lambda s: click.echo(s, err=True))
    debug = bool(click.get_current_context().find_root().params.get("debug"))
    options = CompileOptions(junit=Path(junit) if junit else None, sign_key=Path(sign) if sign else None, force=force,
                             inputs=inputs, debug=debug, overflow=overflow, backend_options=parse_option_flags(option_flags),
                             min_sqnr_db=min_sqnr_db, min_int8_share=int8_floor, calib_windows=calib_windows, calib_selection=calib_select,
                             calib_seed=calib_seed,
                             jobs=_jobs(jobs, len(tlist)), skip_refused=frozenset(str(t) for t in tlist) - named)
    with progress:
        summary = compile_model(model, eval_ds, tlist, out, calib=calib_ds, budget=budget, registry=registry, options=options, progress=progress)
    if report and summary.written:
        from nilmc.compiler.html_report import write_report

        write_report(out, report)
    if as_json:
        _print_json(summary.to_json())
    else:
        print_summary(summary)
        for t, why in summary.skipped.items():
            click.echo(f"nilmc: skipped {t} (its pre-check refused the model; --targets named it by wildcard): {why}", err=True)
        for w in summary.warnings:
            click.echo(f"nilmc: warning: {w}", err=True)
        n = len(summary.bundles())
        missing = summary.by_status("BAD INPUT") + summary.by_status("INTERNAL ERROR")
        click.echo(f"{n} bundle{'s' if n != 1 else ''} written to {out}" + (f" (no bundle for: {', '.join(missing)})" if missing else ""))
        if report:
            click.echo(f"report: {report}")
    code = summary.exit_code
    if code != EXIT_OK and not as_json:
        parts = [f"{label}: {', '.join(summary.by_status(status))}" for status, label in
                 (("INTERNAL ERROR", "internal error in"), ("BAD INPUT", "bad input for"), ("FAIL", "accuracy gate FAILED for"))
                 if summary.by_status(status)]
        click.echo("nilmc: " + "; ".join(parts) + f" (exit {code})", err=True)
    if code != EXIT_OK:
        sys.exit(code)


def _wildcard(part: str) -> bool:
    """Whether a --targets item names targets by wildcard (``all``, ``backend:all``)."""
    part = part.strip()
    return part == "all" or part.endswith(":all")


AUTO_JOBS_MIN_TARGETS = 8  # below this a worker's start-up (imports, TensorFlow) costs more than it saves


def _jobs(jobs: int | None, n_targets: int) -> int:
    """--jobs as given, else 2 worker shares for a large compile on a machine with 2+ cores, else 1."""
    import os

    if jobs is not None:
        return jobs
    return min(2, os.cpu_count() or 1) if n_targets >= AUTO_JOBS_MIN_TARGETS else 1


def jobs_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--jobs", type=click.IntRange(1, 2), default=None,
                        help=f"Processes for independent targets (default: 2 for {AUTO_JOBS_MIN_TARGETS}+ targets on 2+ cores, else 1).")(fn)


def force_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--force", is_flag=True,
                        help="Write into a non-empty directory nilmc did not write (its files are never touched).")(fn)


def _check_layout(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    from nilmc.compiler.contract import parse_layout
    from nilmc.compiler.errors import NilmcError

    try:
        return None if value is None else parse_layout(value)
    except NilmcError as exc:
        raise click.BadParameter(f"{exc.message} ({exc.remedy})") from None


def _check_output(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    from nilmc.compiler.contract import parse_output_select
    from nilmc.compiler.errors import NilmcError

    try:
        return None if value is None else parse_output_select(value)
    except NilmcError as exc:
        raise click.BadParameter(f"{exc.message} ({exc.remedy})") from None


def _check_floats(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    from nilmc.compiler.contract_flags import parse_floats
    from nilmc.compiler.errors import NilmcError

    try:
        if value is not None:
            parse_floats(value, f"--{param.name.replace('_', '-')}" if param.name else "value", positive=param.name == "input_std")
    except NilmcError as exc:
        raise click.BadParameter(f"{exc.message} ({exc.remedy})") from None
    return value


_NORM_CHOICES = ["none", "raw", "A", "zscore", "C", "minmax", "B", "D", "E"]
_CONTRACT_OPTIONS = (
    click.option("--contract", "contract_file", type=click.Path(), default=None,
                 help="Model contract JSON (`nilmc contract init MODEL --out FILE` writes one to edit); the flags below override its fields."),
    click.option("--input-norm", type=click.Choice(_NORM_CHOICES, case_sensitive=False), default=None,
                 help="Input normalization: none/raw/A, zscore/C (needs mean/std), minmax/B, D, E (need min/max)."),
    click.option("--input-mean", callback=_check_floats, default=None, metavar="M[,M..]", help="Z-score mean, one per feature."),
    click.option("--input-std", callback=_check_floats, default=None, metavar="S[,S..]", help="Z-score std (> 0), one per feature."),
    click.option("--input-min", callback=_check_floats, default=None, metavar="LO[,LO..]", help="Min-max minimum, one per feature."),
    click.option("--input-max", callback=_check_floats, default=None, metavar="HI[,HI..]", help="Min-max maximum, one per feature."),
    click.option("--input-stats-from", type=click.Path(), default=None, metavar="DATA.npz",
                 help="Take the input statistics from this data set's training statistics."),
    click.option("--target-mean", type=float, default=None, help="Target de-normalization: watts = output * std + mean (default 0)."),
    click.option("--target-std", type=click.FloatRange(min=0, min_open=True), default=None, help="Target de-normalization std (default 1)."),
    click.option("--appliance", default=None, help="The appliance the model disaggregates (a column of the data sets)."),
    click.option("--on-threshold", type=click.FloatRange(min=0), default=None, metavar="W", help="ON threshold in watts (F1 etc.)."),
    click.option("--peak-power", type=click.FloatRange(min=0, min_open=True), default=None, metavar="W",
                 help="Largest power the output must represent (INT8 output range)."),
    click.option("--window", type=click.IntRange(min=1), default=None, metavar="T", help="Samples per window (where the model leaves it open)."),
    click.option("--output", callback=_check_output, default=None, metavar="SELECTOR",
                 help="For sequence outputs: midpoint, last or index:K (the step that is the prediction)."),
    click.option("--layout", callback=_check_layout, default=None,
                 help="The model's input layout: NTF1 (N,T,F,1), N1TF (N,1,T,F), NWC (N,T,F), NCW (N,F,T), NW (N,T); default from its rank."),
    click.option("--task", type=click.Choice(["regression", "binary", "multilabel"], case_sensitive=False), default=None,
                 help="regression (watts, the default) or ON/OFF classification: binary (one appliance), multilabel (several)."),
    click.option("--appliances", default=None, metavar="A,B,..", help="Classification: the appliance of each output probability, in order."),
    click.option("--thresholds", default=None, metavar="W[,W..]", help="Classification: ON thresholds in watts, one or one per appliance."),
)


def _contract_inputs(flags: Any) -> tuple[str, ...]:
    """The files the contract flags read (an output location must not overwrite them)."""
    return tuple(p for p in (getattr(flags, "contract_file", None), getattr(flags, "input_stats_from", None)) if p)


def contract_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The contract options (``--contract FILE`` and the field flags), passed on as one ``contract_flags`` argument."""
    names = ("contract_file", "input_norm", "input_mean", "input_std", "input_min", "input_max", "input_stats_from", "target_mean",
             "target_std", "appliance", "on_threshold", "peak_power", "window", "output", "layout", "task", "appliances",
             "thresholds")  # ContractFlags' fields

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from nilmc.compiler.contract_flags import ContractFlags

        kwargs["contract_flags"] = ContractFlags(**{n: kwargs.pop(n) for n in names})
        return fn(*args, **kwargs)

    for option in reversed(_CONTRACT_OPTIONS):
        wrapper = option(wrapper)
    return wrapper


@cli.command("compile")
@click.argument("model", type=click.Path(dir_okay=True))
@click.option("--calib", type=click.Path(), default=None, help="Calibration set (.npz).")
@click.option("--eval", "eval_path", type=click.Path(), required=True, help="Evaluation set (.npz) every artifact is verified on.")
@click.option("--targets", default="onnxruntime:fp32", show_default=True, help="Comma-separated backend:precision list; 'all' for every available target.")
@click.option("--out", type=click.Path(), required=True,
              help="Output directory (one bundle per target + summary.json); new, empty, or an earlier nilmc output.")
@click.option("--max-delta", default=None, help="Budget, e.g. 'eacc=0.5,mae=3' (EACC in points, MAE in W). Default eacc=0.5.")
@click.option("--junit", type=click.Path(), default=None, help="Write JUnit XML (one test case per target).")
@click.option("--sign", type=click.Path(), default=None, help="Ed25519 private key (nilmc keygen): sign every bundle's manifest.")
@click.option("--overflow", type=click.Choice(["warn", "error", "fix"]), default="warn", show_default=True,
              help="INT8 overflow policy for every quantizing target (findings are in each manifest's overflow section).")
@click.option("--option", "option_flags", multiple=True, metavar="BACKEND.NAME=VALUE",
              help="A backend option, e.g. dpu.qat_epochs=5 (repeatable; `nilmc backends --json` lists them).")
@click.option("--min-sqnr", "min_sqnr", default=None, metavar="DB",
              help="Fail a target whose output SQNR vs FP32 is below DB (default 10: an all-zero output scores 0 dB; 'off' drops the floor).")
@click.option("--min-int8-share", "min_int8_share", default=None, metavar="SHARE",
              help="Fail an INT8 target whose artifact runs under SHARE of the weighted layers' MACs in INT8 (default 0.01: an "
                   "'int8' artifact that runs everything in float fails; e.g. 0.5 or 50%; 'off' drops the floor).")
@click.option("--calib-windows", type=click.IntRange(min=1), default=None,
              help="Calibrate on N windows selected from --calib (default: every window given).")
@click.option("--calib-select", type=click.Choice(["random", "stratified", "first"]), default="random", show_default=True,
              help="How --calib-windows picks them: at random over the whole set, stratified over appliance states and input levels, or the first N.")
@click.option("--calib-seed", type=int, default=0, show_default=True, help="Seed of the calibration selection.")
@click.option("--report", "report", type=click.Path(), default=None, metavar="FILE.html",
              help="Also write the HTML report (nilmc report) of this compile to FILE.html (needs the [report] extra).")
@contract_options
@jobs_option
@force_option
@json_option
@handle_errors
def compile_cmd(model: str, calib: str | None, eval_path: str, targets: str, out: str, max_delta: str | None, junit: str | None,
                sign: str | None, overflow: str, option_flags: tuple[str, ...], force: bool, as_json: bool, contract_flags: Any = None,
                min_sqnr: str | None = None, calib_windows: int | None = None, calib_select: str = "random", calib_seed: int = 0,
                jobs: int | None = None, report: str | None = None, min_int8_share: str | None = None) -> None:
    """Lower MODEL to every target, verify each artifact against FP32, gate on the budget.

    Exit code: the most severe over every target (3 internal > 2 bad input > 1 gate failed > 0).
    """
    run_compile(model, calib, eval_path, targets, out, max_delta, junit, as_json, force=force, sign=sign, overflow=overflow,
                option_flags=option_flags, contract_flags=contract_flags, min_sqnr=min_sqnr, calib_windows=calib_windows,
                calib_select=calib_select, calib_seed=calib_seed, jobs=jobs, report=report, min_int8_share=min_int8_share)


@cli.command("example")
@click.option("--out", type=click.Path(), default="nilmc-example-out", show_default=True, help="Output directory.")
@click.option("--targets", default="all", show_default=True, help="Targets to compile (default: every available one).")
@jobs_option
@force_option
@click.option("--all-models", is_flag=True, help="Also compile the shipped CtRNN, cloud Transformer and XGBoost tree model, each for the "
              "targets that take it: one table per model, OUT/<model>/.")
@click.option("--retrain", is_flag=True, help="--all-models: train those three here (small, seeded; cached in OUT/models) instead of "
              "compiling the shipped copies; TensorFlow's kernels differ between CPUs, so the models differ from the shipped ones.")
@json_option
@handle_errors
def example_cmd(out: str, targets: str, jobs: int | None, force: bool, as_json: bool, all_models: bool = False, retrain: bool = False) -> None:
    """Compile the shipped reference T-P model with the shipped calibration/evaluation sets."""
    from nilmc.calibration_data.shipped import shipped_paths

    p = shipped_paths()
    if retrain and not all_models:
        from nilmc.compiler.errors import BadInputError

        raise BadInputError("--retrain applies to the models of --all-models only (the CNN always ships)", "add --all-models")
    if all_models:
        _example_all_models(out, targets, jobs, force, as_json, retrain=retrain)
        return
    # The Keras source (not the .onnx) so that Keras-based targets (TFLite, QAT) can lower too.
    run_compile(str(p["keras"]), str(p["calib"]), str(p["eval"]), targets, out, None, None, as_json, force=force, jobs=jobs)


def _example_all_models(out: str, targets: str, jobs: int | None, force: bool, as_json: bool, *, retrain: bool = False) -> None:
    """``example --all-models``: the shipped CNN into OUT/cnn, then each zoo model into OUT/<model>; exit with the worst code."""
    from nilmc.backends.registry import default_registry
    from nilmc.calibration_data.shipped import shipped_paths
    from nilmc.training.zoo import EXAMPLE_MODELS, example_model

    available = {f"{r['name']}:{p}" for r in default_registry().status() if r["available"] for p in r["precisions"]}
    p, codes = shipped_paths(), []

    def one(name: str, *args: Any) -> None:
        if not as_json:
            click.echo(f"\n== {name} ==")
        try:
            run_compile(*args, None, None, as_json, force=force, jobs=jobs)
            codes.append(EXIT_OK)
        except SystemExit as exc:  # a failed gate of one model does not stop the others
            codes.append(int(exc.code or 0))

    one("cnn (shipped seq2point, seed 003)", str(p["keras"]), str(p["calib"]), str(p["eval"]), targets, str(Path(out) / "cnn"))
    for kind, spec in EXAMPLE_MODELS.items():
        m = example_model(kind, Path(out) / "models", shipped=not retrain)
        tl = targets if targets != "all" else ",".join(t for t in spec["targets"] if t in available)
        if not as_json:
            info = m["info"]
            ops = (f"{info['macs']:,} MACs/prediction" if "macs" in info else f"{info.get('comparisons_per_prediction', 0):,} comparisons/prediction")
            origin = " (shipped)" if m.get("shipped") else (" (trained here, cached)" if m["cached"] else " (trained here)")
            click.echo(f"\n{kind}: {info.get('parameters', 0):,} parameters, {ops}{origin}")
            if targets == "all":  # every other available target says in one line why it is not in the table
                for line in _example_refusals(str(m["model"]), [t for t in sorted(available) if t not in tl.split(",")]):
                    click.echo(line)
        one(kind, str(m["model"]), str(m["calib"]), str(m["eval"]), tl, str(Path(out) / kind))
    if max(codes) != EXIT_OK:
        sys.exit(max(codes))


def _example_refusals(model_path: str, others: list[str]) -> list[str]:
    """For ``example --all-models``: the available targets a model's table leaves out, one line per reason (the
    targets' pre-checks, milliseconds), then those whose pre-checks pass but are not in the example's list (a pre-check
    passing is no promise the lowering will: onnx2tf fails on the cloud model's convolution, for one)."""
    from nilmc.backends.registry import default_registry
    from nilmc.compiler.driver import target_refusals
    from nilmc.compiler.frontend import load_model

    if not others:
        return []
    registry = default_registry()
    refused = target_refusals(load_model(model_path), registry.parse_targets(",".join(others)), registry)
    groups: dict[str, list[str]] = {}
    for t in others:
        if t in refused:
            why = refused[t].removeprefix(f"{t} ").replace(t, "this target")
            groups.setdefault(why, []).append(t)
    lines = [f"  not in the table: {', '.join(ts)}: {why}" for why, ts in groups.items()]
    fit = [t for t in others if t not in refused]
    if fit:
        lines.append(f"  not in the table, their pre-checks pass (not compiled here): {', '.join(fit)}")
    return lines


# ------------------------------------------------------------------ verify
@cli.command("verify")
@click.argument("bundle", type=click.Path())
@click.option("--eval", "eval_path", type=click.Path(), required=True, help="Evaluation set (.npz).")
@click.option("--max-delta", default=None, help="Override the budget stored in the bundle.")
@click.option("--trust", type=click.Path(), default=None, help="Ed25519 public key (nilmc keygen): require every manifest signed by it.")
@json_option
@handle_errors
def verify_cmd(bundle: str, eval_path: str, max_delta: str | None, trust: str | None, as_json: bool) -> None:
    """Re-check an existing bundle (integrity, signature, then metrics) without recompiling.

    BUNDLE is a target bundle directory, or a compile output directory (every bundle in it).
    Exit 2 when a bundle does not match its manifest (tampered), 1 when the gate fails.
    """
    from nilmc.compiler.bundle import MANIFEST, verify_bundle
    from nilmc.compiler.compare import parse_budget
    from nilmc.compiler.errors import BundleError
    from nilmc.compiler.outdir import is_staging

    root = Path(bundle)
    if not root.exists():
        raise BundleError(f"bundle {bundle!r} does not exist", "pass a directory written by nilmc compile")
    if is_staging(root):
        raise BundleError(f"{bundle!r} is an unfinished staging directory of an interrupted nilmc run", "verify the finished output directory")
    bundles = [root] if (root / MANIFEST).is_file() else sorted(p.parent for p in root.glob(f"*/{MANIFEST}") if not is_staging(p.parent))
    if not bundles:
        raise BundleError(f"{bundle!r} holds no {MANIFEST}", "pass a directory written by nilmc compile")
    trusted = None
    if trust:
        from nilmc.compiler.signing import TrustedKey

        trusted = TrustedKey.load(trust)
    eval_ds = _load_data(eval_path)
    budget = parse_budget(max_delta) if max_delta else None
    results = [verify_bundle(b, eval_ds, budget=budget, trust=trusted) for b in bundles]
    tampered = [r for r in results if r.hash_problems]
    failed = [r for r in results if not r.passed and not r.hash_problems]
    code = EXIT_BAD_INPUT if tampered else (EXIT_GATE_FAILED if failed else EXIT_OK)
    if as_json:
        _print_json({"passed": code == EXIT_OK, "exit": code, "bundles": [r.to_json() for r in results]})
    else:
        for r in results:
            if r.hash_problems:
                click.echo(f"{r.bundle}: TAMPERED: " + "; ".join(r.hash_problems))
            else:
                click.echo(f"{r.bundle}: {r.report}" + "".join(f" [{n}]" for n in r.notes))
        if tampered:
            click.echo("nilmc: error: bundle(s) do not match their manifest: " + ", ".join(str(r.bundle) for r in tampered)
                       + "; recompile them from trusted inputs", err=True)
        elif failed:
            click.echo("nilmc: accuracy gate FAILED for: " + ", ".join(str(r.bundle) for r in failed), err=True)
    if code != EXIT_OK:
        sys.exit(code)


# ------------------------------------------------------------------ keygen
@cli.command("keygen")
@click.option("--out", required=True, type=click.Path(), help="Prefix: writes PREFIX.key (private, mode 0600) and PREFIX.pub.")
@json_option
@handle_errors
def keygen_cmd(out: str, as_json: bool) -> None:
    """Create an Ed25519 key pair for `compile --sign` / `verify --trust`."""
    from nilmc.compiler.signing import keygen

    if not out.strip():
        from nilmc.compiler.errors import BadInputError

        raise BadInputError("--out is empty", "pass a prefix, e.g. --out keys/nilmc")
    key, pub = keygen(out)
    if as_json:
        _print_json({"private_key": str(key), "public_key": str(pub)})
    else:
        click.echo(f"private key: {key} (keep it secret)\npublic key:  {pub}")


# ------------------------------------------------------------------ train
@cli.command("train")
@click.option("--data", "data_path", type=click.Path(), default=None, help="Training set (.npz); default: generate train/val splits with --setup/--seed.")
@click.option("--setup", default="T-P", show_default=True, help="Feature setup when generating data (e.g. T-P, TF-VIP, LF-P).")
@click.option("--val", "val_path", type=click.Path(), default=None, help="Validation set (.npz) for early stopping.")
@click.option("--appliance", default=None, help="Appliance to disaggregate (a target column of the data); --model seq2point/xgboost.")
@click.option("--normalization", default="C", show_default=True, help="Input normalization A-E (Table 1 of seed 003).")
@click.option("--architecture", type=click.Choice(["seq2point", "classic"]), default="seq2point", show_default=True)
@click.option("--model", "model_kind", type=click.Choice(["seq2point", "xgboost", "ctrnn", "cloud"]), default="seq2point", show_default=True,
              help="seq2point CNN (seed 003); xgboost edge regressor (seed 000, needs the [tree] extra); ctrnn multi-label ON/OFF classifier "
                   "(seed 002); cloud conv-encoder + Transformer regressor (seed 000). The last three train on synthetic "
                   "low-frequency data unless --data is given.")
@click.option("--appliances", "appliance_list", default=None, metavar="A,B,..", help="--model ctrnn: the appliances it labels ON/OFF.")
@click.option("--epochs", type=click.IntRange(1, 10000), default=None, help="Training epochs (default 30; ctrnn: its own default).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(), required=True, help="Output stem: writes OUT.keras, OUT.keras.contract.json, OUT.onnx.")
@json_option
@handle_errors
def train_cmd(data_path: str | None, setup: str, val_path: str | None, appliance: str | None, normalization: str, architecture: str,
              epochs: int | None, seed: int, out: str, as_json: bool, model_kind: str = "seq2point", appliance_list: str | None = None) -> None:
    """Train a reference model reproducibly (the seq2point CNN by default; --model for the others)."""
    if model_kind != "seq2point":
        _train_zoo(model_kind, data_path, val_path, appliance, appliance_list, epochs, seed, out, as_json)
        return
    if appliance is None:
        from nilmc.compiler.errors import BadInputError

        raise BadInputError("--appliance is missing", "pass --appliance NAME (a target column of the data), e.g. --appliance kettle")
    epochs = 30 if epochs is None else epochs
    from nilmc.calibration_data.normalization import Normalization
    from nilmc.compiler.driver import reference_metrics
    from nilmc.compiler.frontend import load_model
    from nilmc.training import TrainConfig, save_trained, train_seq2point

    norm = Normalization.parse(normalization)
    if data_path is None:
        from nilmc.calibration_data.windows import build_splits

        splits = build_splits(setup, seed=seed, splits=("train", "val"))
        train, val = splits["train"], splits["val"]
    else:
        train = _load_data(data_path)
        val = _load_data(val_path) if val_path else None
    model, contract = train_seq2point(train, val, appliance=appliance, normalization=norm,
                                      config=TrainConfig(epochs=epochs, seed=seed, architecture=architecture))
    paths = save_trained(model, contract, out)
    result: dict[str, Any] = {"files": {k: str(v) for k, v in paths.items()}, "parameters": int(model.count_params())}
    if val is not None:
        m, _ = reference_metrics(load_model(paths["onnx"]), val)
        result["val_metrics"] = m.to_json()
    if as_json:
        _print_json(result)
    else:
        click.echo(f"trained {architecture} for {appliance} ({result['parameters']:,} parameters) -> {paths['onnx']}")
        if "val_metrics" in result:
            click.echo("validation (FP32, onnxruntime): " + ", ".join(f"{k}={v:.4g}" for k, v in result["val_metrics"].items() if isinstance(v, float)))


def _train_zoo(kind: str, data_path: str | None, val_path: str | None, appliance: str | None, appliance_list: str | None,
               epochs: int | None, seed: int, out: str, as_json: bool) -> None:
    """``nilmc train --model xgboost|ctrnn``: nilmc.training.zoo, then the FP32 validation metrics of the written ONNX."""
    from nilmc.compiler.driver import reference_metrics
    from nilmc.compiler.frontend import load_model
    from nilmc.training.lowfreq_data import DEFAULT_APPLIANCES
    from nilmc.training.zoo import default_splits, save_model, train_model

    apps = tuple(a.strip() for a in (appliance_list or appliance or ",".join(DEFAULT_APPLIANCES)).split(",") if a.strip())
    if data_path is None:
        splits = default_splits(kind, apps, seed=seed)
        train, val = splits["train"], splits["val"]
    else:
        train, val = _load_data(data_path), (_load_data(val_path) if val_path else None)
    trained = train_model(kind, train, val, appliances=apps, epochs=epochs, seed=seed)
    paths = save_model(trained, out)
    result: dict[str, Any] = {"files": {k: str(v) for k, v in paths.items()}, **trained.info}
    if val is not None:
        m, _ = reference_metrics(load_model(paths["onnx"]), val)
        result["val_metrics"] = m.to_json()
    if as_json:
        _print_json(result)
        return
    click.echo(f"trained {kind} for {', '.join(apps)} ({result.get('parameters', 0):,} parameters) -> {paths['onnx']}")
    if "val_metrics" in result:
        flat = {k: v for k, v in result["val_metrics"].items() if isinstance(v, float)}
        click.echo("validation (FP32, onnxruntime): " + ", ".join(f"{k}={v:.4g}" for k, v in flat.items()))


# ------------------------------------------------------------------ quantize
QUANTIZE_ENTRIES = ("model_qdq.onnx", "params.json", "report.json")


@cli.command("quantize")
@click.argument("model", type=click.Path(dir_okay=True))
@click.option("--calib", type=click.Path(), required=True, help="Calibration set (.npz).")
@click.option("--traits", "traits_name", default="generic_int8", show_default=True,
              help="Quantization traits preset: generic_int8, tflite_int8, tensorrt_int8, eiq_per_tensor, dpu_pot.")
@click.option("--estimator", default="auto", show_default=True, help="auto (per tensor by output error), minmax, percentile, mse, entropy.")
@click.option("--overflow", "overflow_policy", type=click.Choice(["warn", "error", "fix"]), default="warn", show_default=True)
@click.option("--fold-normalization", is_flag=True, help="Fold input normalization and output de-normalization into the graph.")
@click.option("--report", "show_report", is_flag=True, help="Print the per-layer report (scale, zero point, saturation, code use, accumulator headroom, SQNR).")
@click.option("--out", type=click.Path(), default=None, help="Directory for model_qdq.onnx, params.json and report.json.")
@click.option("--qat", is_flag=True, help="Quantization-aware fine-tuning from the PTQ ranges first (needs the .keras/.h5 model).")
@click.option("--epochs", type=click.IntRange(1, 1000), default=3, show_default=True, help="QAT epochs.")
@click.option("--seed", type=int, default=0, show_default=True, help="QAT seed.")
@click.option("--learning-rate", type=click.FloatRange(min=0, min_open=True), default=2e-6, show_default=True, help="QAT learning rate (Adam).")
@contract_options
@force_option
@json_option
@handle_errors
def quantize_cmd(model: str, calib: str, traits_name: str, estimator: str, overflow_policy: str, fold_normalization: bool,
                 show_report: bool, out: str | None, qat: bool, epochs: int, seed: int, learning_rate: float, force: bool, as_json: bool,
                 contract_flags: Any = None) -> None:
    """Normalization-aware PTQ (or QAT with --qat) of MODEL into nilmc's ideal INT8 reference (ONNX QDQ),
    with overflow checks. Per-target QAT artifacts: `nilmc compile --targets tflite:qat_int8`.
    """
    from nilmc.compiler.contract_flags import load_model_with_flags
    from nilmc.quantization.api import quantize
    from nilmc.quantization.report import format_report, quantize_report
    from nilmc.quantization.traits import preset

    if out is not None:
        from nilmc.compiler.outdir import check_output_path

        check_output_path(out, inputs=(model, calib, *_contract_inputs(contract_flags)))
    kw = dict(traits=preset(traits_name), estimator=estimator, overflow_policy=overflow_policy, fold_normalization=fold_normalization)
    if qat:
        from nilmc.quantization.qat_flow import qat_quantize

        result, qat_info = qat_quantize(load_model_with_flags(model, contract_flags), _load_data(calib), epochs=epochs, seed=seed,
                                        learning_rate=learning_rate, **kw)
    else:
        result, qat_info = quantize(load_model_with_flags(model, contract_flags), _load_data(calib), **kw), None
    report = quantize_report(result)
    if qat_info is not None:
        report["qat"] = qat_info
    if out:
        from nilmc.compiler.outdir import OutputDir

        with OutputDir(out, QUANTIZE_ENTRIES, inputs=(model, calib, *_contract_inputs(contract_flags)), force=force) as od:
            result.save(od.staging)
            od.commit()
    if as_json:
        _print_json(report)
    elif show_report:
        click.echo(format_report(result, report))
    else:
        click.echo(f"quantized with {traits_name}; output SQNR vs FP32 on calibration windows: {report.get('output_sqnr_db', float('nan')):.1f} dB"
                   + (f"; written to {out}" if out else ""))


# ------------------------------------------------------------------ contract
@cli.group("contract")
def contract_group() -> None:
    """Write and inspect model contracts (what a model's input and output mean)."""


@contract_group.command("init")
@click.argument("model", type=click.Path(dir_okay=True))
@click.option("--out", type=click.Path(), required=True, help="The contract file to write (JSON, edited by hand; pass it with --contract).")
@contract_options
@force_option
@json_option
@handle_errors
def contract_init(model: str, out: str, force: bool, as_json: bool, contract_flags: Any = None) -> None:
    """Write a documented contract file for MODEL: its contract (if it carries one) or one built from its input
    shape, with the given flags applied. Edit the fields it lists, then `nilmc compile MODEL --contract FILE ...`.
    """
    from nilmc.compiler.contract_flags import base_contract, build_contract, dumps_contract_file, placeholders
    from nilmc.compiler.errors import OutputError
    from nilmc.compiler.io import atomic_write_text

    target = Path(out)
    if target.is_dir():
        raise OutputError(f"--out {out!r} is a directory", "pass a file name, e.g. --out model.contract.json")
    if target.exists() and not force:
        raise OutputError(f"{out!r} exists", "pass --force to overwrite it, or another --out")
    if Path(model).resolve() == target.resolve():
        raise OutputError(f"--out {out!r} is the model itself", "pass another file name")
    contract = build_contract(model, contract_flags, require=False)
    todo = placeholders(contract, contract_flags, base_contract(model, contract_flags))
    atomic_write_text(target, dumps_contract_file(contract))
    if as_json:
        _print_json({"contract": str(target), "edit": todo, **contract.to_json()})
        return
    click.echo(f"contract written to {out} (input {tuple(contract.input_shape)}, layout {contract.layout or 'canonical'}, "
               f"normalization {contract.normalization.kind.value}, appliance {contract.appliance})")
    if todo:
        click.echo(f"nilmc: note: check and edit {', '.join(todo)} in {out}, then pass --contract {out}", err=True)


@contract_group.command("show")
@click.argument("model", type=click.Path(dir_okay=True))
@contract_options
@json_option
@handle_errors
def contract_show(model: str, as_json: bool, contract_flags: Any = None) -> None:
    """Print the contract `nilmc compile MODEL` would use with these flags."""
    from nilmc.compiler.contract_flags import build_contract, dumps_contract_file

    contract = build_contract(model, contract_flags)
    if as_json:
        _print_json(contract.to_json())
    else:
        click.echo(dumps_contract_file(contract), nl=False)


# ------------------------------------------------------------------ data
@cli.group("data")
def data_group() -> None:
    """Generate, convert and inspect NILM data sets (.npz, never pickle)."""


@data_group.command("generate")
@click.option("--setup", default="T-P", show_default=True, help="Feature domain and measurement, e.g. T-P, TF-VIP, TFHF-P; LF-P = classic 599 x 8 s.")
@click.option("--appliances", default=None, help="Comma-separated target appliances (default: all the generator simulates).")
@click.option("--windows", "n_windows", type=click.IntRange(1, 10_000_000), default=5000, show_default=True)
@click.option("--split", type=click.Choice(["train", "val", "calib", "eval"]), default="train", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(), required=True, help="Output .npz file.")
@json_option
@handle_errors
def data_generate(setup: str, appliances: str | None, n_windows: int, split: str, seed: int, out: str, as_json: bool) -> None:
    """Synthesize a household data set (deterministic by seed)."""
    from nilmc.calibration_data.shipped import inspect_dataset
    from nilmc.calibration_data.windows import generate_dataset

    kw: dict[str, Any] = {"appliances": appliances} if appliances else {}
    generate_dataset(setup=setup, n_windows=n_windows, seed=seed, split=split, out=out, **kw)
    _show_inspect(inspect_dataset(out), as_json)


@data_group.command("convert")
@click.argument("layout", type=click.Choice(["redd_low", "redd_high", "ukdale", "refit", "ukdale_excerpt", "csv", "windows"]))
@click.argument("path", type=click.Path())
@click.option("--setup", default="T-P", show_default=True, help="Feature setup for high-frequency layouts.")
@click.option("--appliances", default=None,
              help="Comma-separated appliances to keep (csv: appliance column names; windows: names of y's columns). Default: all.")
@click.option("--targets", "targets_path", type=click.Path(), default=None, help="REDD low_freq house directory with per-appliance targets (for redd_high).")
@click.option("--window", type=click.IntRange(min=1), default=None, metavar="T",
              help="Samples per window (default 599; redd_high: frames, default 10).")
@click.option("--step", type=click.IntRange(min=1), default=1, show_default=True, metavar="S", help="A window starts every S samples.")
@click.option("--target-offset", "offset", type=click.IntRange(min=0), default=None, metavar="K",
              help="The target is sample K of each window (default: the midpoint, T // 2).")
@click.option("--period", "period_s", type=click.FloatRange(min=0, min_open=True), default=None, metavar="SECONDS",
              help="Resample to one sample per SECONDS (default 8; csv: the file's own spacing).")
@click.option("--aggregate", default=None, metavar="COL", help="csv: the aggregate column (default: aggregate, mains, main or total).")
@click.option("--timestamp", default=None, metavar="COL",
              help="csv: the timestamp column (default: timestamp, time, unix, ts, datetime or date if present; unix s/ms/ns or ISO 8601).")
@click.option("--normalized", type=click.Choice(["zscore", "minmax"], case_sensitive=False), default=None,
              help="csv/windows: the aggregate is already normalized (give its --mean/--std or --min/--max); targets stay watts.")
@click.option("--mean", "norm_mean", type=float, default=None, help="With --normalized zscore: the mean the data were normalized with.")
@click.option("--std", "norm_std", type=click.FloatRange(min=0, min_open=True), default=None, help="With --normalized zscore: the std.")
@click.option("--min", "norm_min", type=float, default=None, help="With --normalized minmax: the minimum.")
@click.option("--max", "norm_max", type=float, default=None, help="With --normalized minmax: the maximum.")
@click.option("--chunk-rows", type=click.IntRange(min=1), default=200_000, show_default=True,
              help="csv: rows read at a time (files larger than memory stream; the result does not depend on it).")
@click.option("--out", type=click.Path(), required=True, help="Output .npz file.")
@json_option
@handle_errors
def data_convert(layout: str, path: str, setup: str, appliances: str | None, targets_path: str | None, window: int | None, step: int,
                 offset: int | None, period_s: float | None, aggregate: str | None, timestamp: str | None, normalized: str | None,
                 norm_mean: float | None, norm_std: float | None, norm_min: float | None, norm_max: float | None, chunk_rows: int,
                 out: str, as_json: bool) -> None:
    """Convert a REDD / UK-DALE / REFIT layout, a plain CSV or an npz of windows into a nilmc data set.

    \b
    nilmc data convert csv house.csv --aggregate mains --appliances kettle,fridge --window 599 --period 8 --out w.npz
    nilmc data convert windows ready.npz --appliances kettle --out w.npz
    """
    from nilmc.calibration_data.loaders import CsvOptions, convert_dataset
    from nilmc.calibration_data.shipped import inspect_dataset
    from nilmc.compiler.errors import BadInputError

    stats = {k: v for k, v in (("mean", norm_mean), ("std", norm_std), ("minimum", norm_min), ("maximum", norm_max)) if v is not None}
    csv_only = {"--aggregate": aggregate, "--timestamp": timestamp}
    if layout not in ("csv", "windows") and (normalized or stats or any(v is not None for v in csv_only.values())):
        raise BadInputError(f"--aggregate/--timestamp/--normalized/--mean/--std/--min/--max apply to layouts csv and windows, not {layout}",
                            "leave them out for this layout")
    if window is not None and offset is not None and offset >= window:
        raise BadInputError(f"--target-offset {offset} is outside a window of {window} samples", f"use 0 <= --target-offset < {window}")
    options = CsvOptions(aggregate=aggregate, timestamp=timestamp, normalized=normalized, stats=stats, chunk_rows=chunk_rows)
    convert_dataset(layout, path, out=out, setup=setup, appliances=appliances, targets_path=targets_path, step=step, window=window,
                    offset=offset, period_s=period_s, csv_options=options)
    _show_inspect(inspect_dataset(out), as_json)


@data_group.command("inspect")
@click.argument("path", type=click.Path())
@json_option
@handle_errors
def data_inspect(path: str, as_json: bool) -> None:
    """Summarize a data set: shapes, appliances, normalization statistics, provenance."""
    from nilmc.calibration_data.shipped import inspect_dataset

    _show_inspect(inspect_dataset(path), as_json)


def _show_inspect(info: dict[str, Any], as_json: bool) -> None:
    if as_json:
        _print_json(info)
        return
    for k, v in info.items():
        if isinstance(v, (dict, list)) and len(json.dumps(v, default=str)) > 100:
            v = json.dumps(v, default=str)[:97] + "..."
        click.echo(f"{k:<24} {v}")


# ------------------------------------------------------------------ sweep and report
@cli.command("sweep")
@click.argument("grid", type=click.Path())
@click.option("--out", type=click.Path(), default="nilmc-sweep-out", show_default=True,
              help="Sweep directory: results.sqlite, the trained-model cache, report.html. An earlier sweep's directory resumes it.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Worker processes (default: every core, as many as the available memory holds; 1 runs the cells in this process).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Threads per cell (default: cores // workers).")
@click.option("--ray", "ray_address", default=None, metavar="ADDRESS",
              help="Run the cells as Ray tasks on the cluster at ADDRESS (host:port; 'local' starts one for this sweep; the [sweep] extra).")
@click.option("--retry-failed", is_flag=True, help="Run the cells that failed in an earlier run again.")
@click.option("--report/--no-report", "with_report", default=True, show_default=True,
              help="Write OUT/report.html at the end (needs the [report] extra; skipped with a note when it is missing).")
@json_option
@handle_errors
def sweep_cmd(grid: str, out: str, workers: int | None, threads: int | None, ray_address: str | None, retry_failed: bool,
              with_report: bool, as_json: bool) -> None:
    """Run the experiment grid in GRID (TOML): train, compile and verify every cell; print Tables 6 and 7.

    Cells already in OUT/results.sqlite are not run again (content hash of data, model, options and nilmc version);
    an interrupted sweep resumes; a failed cell is recorded with its error and the others go on.
    """
    from nilmc.backends.registry import default_registry
    from nilmc.compiler.progress import CellProgress
    from nilmc.compiler.sweep_results import ResultsDB, format_table6, format_table7, table6, table7
    from nilmc.training.sweep import grid_cells, load_grid, run_sweep

    g = load_grid(grid)
    targets = default_registry().parse_targets(",".join(g.targets))  # unknown targets: exit 2 before any work
    with CellProgress(len(grid_cells(g)), quiet=as_json) as bar:
        summary = run_sweep(g, targets, out, workers=workers, threads=threads, ray_address=ray_address, retry_failed=retry_failed,
                            on_cell=lambda c: bar.cell_done(c["label"], c["status"] if c["status"] == "done" else f"FAILED: {c.get('error')}"))
    with ResultsDB(summary.results, create=False) as db:
        t6, t7 = table6(db), table7(db)
        # a failed cell (bad input 2, internal 3) is the sweep's exit code; a gate that failed inside a cell is a result
        failed_codes = [int(c["exit_code"] or EXIT_INTERNAL) for c in db.cells(summary.keys) if c["status"] != "done"]
    report_path = None
    if with_report:
        try:
            from nilmc.compiler.html_report import write_report

            report_path = str(write_report(summary.out_dir, summary.out_dir / "report.html"))
        except NilmcError as exc:
            click.echo(f"nilmc: note: no report: {exc.one_line()}", err=True)
    if as_json:
        _print_json({**summary.to_json(), "report": report_path, "table6": t6, "table7": t7})
    else:
        click.echo(format_table6(t6) + "\n\n" + format_table7(t7))
        click.echo(f"{summary.cells} cells: {summary.ran} run, {summary.cached} from the results, {summary.failed} failed; "
                   f"{summary.wall_s:.1f} s wall ({summary.engine}, {summary.workers} worker(s)); results: {summary.results}"
                   + (f"; report: {report_path}" if report_path else ""))
    if failed_codes:
        sys.exit(max(failed_codes))


@cli.command("report")
@click.argument("results", type=click.Path())
@click.option("--out", type=click.Path(), default=None, metavar="FILE.html",
              help="Where to write the page (default: report.html in a sweep directory; RESULTS-report.html beside a compile output).")
@json_option
@handle_errors
def report_cmd(results: str, out: str | None, as_json: bool) -> None:
    """Write a self-contained HTML report (plotly, no network) of a compile output or a sweep (needs the [report] extra)."""
    from nilmc.compiler.html_report import default_report_path, write_report

    path = write_report(results, out or default_report_path(results))
    if as_json:
        _print_json({"report": str(path)})
    else:
        click.echo(f"report: {path}")


def main() -> None:
    cli(prog_name="nilmc")


if __name__ == "__main__":
    main()

"""CPU latency, throughput and compile time of every registered backend, side by side with FP32 onnxruntime.

Claim measured: how each target's artifact runs on *this* CPU compared with the FP32
reference (onnxruntime, one thread), in one run on one model:

* latency at batch 1: median of ``--runs`` single-window inferences (ms), after warm-up;
* throughput at ``--batch`` (default 256) windows: ``batch / median batch time`` (windows/s);
* compile time: ``backend.lower`` wall time (s). The shared calibration pass is timed once,
  separately, before any target (it serves every quantized target); deriving parameters
  for a target's traits is part of its compile time (cached per traits in the shared
  context, so two targets with identical traits pay it once).

Ratios are against ``onnxruntime:fp32``: ``speedup_b1 = ref_ms / ms``,
``throughput_ratio = windows_per_s / ref_windows_per_s``, ``compile_ratio = compile_s / ref_compile_s``.
Every runner is single-threaded (nilmc's deterministic settings). Rows whose runner is
EMULATED (e.g. TensorRT without a GPU) time the *emulation* on this CPU, not the target:
the table says so in the ``verification`` column.

Backends come from ``nilmc.backends.registry.default_registry()``, so backends added
later are picked up; unavailable ones are listed as skipped with the reason.

Model: ``--model``/``--calib`` when given, else the shipped T-P model and calibration set,
else a small T-P kettle model trained here (needs TensorFlow; about 10 s) — the output says which.

Usage: python benchmarks/bench_backends_latency.py [--runs 200] [--batch 256] [--targets a:b,...] [--json [PATH]]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nilmc.backends.base import Verification, availability
from nilmc.backends.registry import BrokenPlugin, Registry, Target, default_registry
from nilmc.calibration_data.dataset import NilmDataset
from nilmc.compiler.model import Model
from nilmc.quantization.context import QuantContext

REFERENCE = "onnxruntime:fp32"


@dataclass
class Row:
    target: str
    verification: str = ""
    compile_s: float | None = None
    size_bytes: int | None = None
    latency_ms_b1: float | None = None
    windows_per_s: float | None = None
    speedup_b1: float | None = None
    throughput_ratio: float | None = None
    compile_ratio: float | None = None
    kind: str = ""
    error: str | None = None


# ---------------------------------------------------------------- model
def load_inputs(model_path: str | None, calib_path: str | None, say: Callable[[str], None]) -> tuple[Model, NilmDataset, str]:
    """(model, calibration set, where they came from): explicit paths, else shipped, else trained here."""
    from nilmc.compiler.frontend import load_model

    if model_path:
        if not calib_path:
            raise SystemExit("--model needs --calib (the calibration set for the INT8 targets)")
        return _with_keras(load_model(model_path), Path(model_path)), NilmDataset.load(calib_path), f"given: {model_path}"
    shipped = _shipped()
    if shipped is not None:
        model_file, calib_file = shipped
        return _with_keras(load_model(model_file), model_file), NilmDataset.load(calib_file), f"shipped: {model_file}"
    say("no shipped T-P model yet: training a small T-P kettle model (TensorFlow)")
    return (*_train_small(), "trained here: small T-P kettle model (4000 windows, 5 epochs) - a stand-in for the shipped model")


def _with_keras(model: Model, onnx_path: Path) -> Model:
    keras = onnx_path.with_suffix(".keras")
    if model.keras_path is None and keras.is_file():
        model.keras_path = str(keras)  # TFLite-style backends need the Keras original
    return model


def _shipped() -> tuple[Path, Path] | None:
    try:
        from nilmc.calibration_data.shipped import shipped_paths

        paths = shipped_paths()
        model, calib = Path(paths["model"]), Path(paths["calib"])
    except (ImportError, KeyError, TypeError, OSError):
        return None
    except Exception as exc:  # a shipped-set problem must not stop the benchmark: fall back to training
        print(f"shipped sets unusable ({type(exc).__name__}: {exc}); training a stand-in", file=sys.stderr)
        return None
    return (model, calib) if model.is_file() and calib.is_file() else None


def _train_small() -> tuple[Model, NilmDataset]:
    from nilmc.calibration_data.windows import build_splits
    from nilmc.compiler.frontend import load_model
    from nilmc.training import TrainConfig, save_trained, train_seq2point

    sp = build_splits("T-P", appliances=("kettle",), n_train=4000, n_val=800, n_calib=500, splits=("train", "val", "calib"))
    keras_model, contract = train_seq2point(sp["train"], sp["val"], appliance="kettle", config=TrainConfig(epochs=5))
    out = Path(tempfile.mkdtemp(prefix="nilmc_bench_")) / "tp_kettle"
    paths = save_trained(keras_model, contract, out)
    return _with_keras(load_model(paths["onnx"]), paths["onnx"]), sp["calib"]


# ---------------------------------------------------------------- timing
def _windows(model: Model, calib: NilmDataset, n: int) -> np.ndarray:
    x = model.contract.prepare(calib.raw_x())
    reps = -(-n // len(x))
    return np.ascontiguousarray(np.concatenate([x] * reps)[:n], np.float32)


def latency_b1_ms(runner: Any, name: str, x: np.ndarray, runs: int) -> float:
    """Median wall time of ``runs`` single-window inferences, after 10 warm-up runs."""
    for i in range(10):
        runner.infer({name: x[i % len(x):i % len(x) + 1]})
    times = []
    for i in range(runs):
        window = x[i % len(x):i % len(x) + 1]
        t0 = time.perf_counter()
        runner.infer({name: window})
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def throughput_wps(runner: Any, name: str, batch: np.ndarray, reps: int) -> float:
    """Windows per second at one batch: ``len(batch) / median batch time``, after 2 warm-up runs."""
    for _ in range(2):
        runner.infer({name: batch})
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        runner.infer({name: batch})
        times.append(time.perf_counter() - t0)
    return len(batch) / statistics.median(times)


def bench_target(registry: Registry, target: Target, model: Model, options: dict[str, Any], x: np.ndarray,
                 *, runs: int, batch: int, reps: int) -> Row:
    row = Row(str(target))
    backend = registry.get(target.backend)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            t0 = time.perf_counter()
            art = backend.lower(model, Path(tmp), precision=target.precision, options=options)
            row.compile_s = time.perf_counter() - t0
            row.kind = art.kind
            row.size_bytes = sum((art.directory / f).stat().st_size for f in art.files if (art.directory / f).is_file())
            with backend.runner(art) as runner:
                row.verification = Verification(getattr(runner, "verification", Verification.NOT_VERIFIED)).value
                row.latency_ms_b1 = latency_b1_ms(runner, model.input_name, x, runs)
                row.windows_per_s = throughput_wps(runner, model.input_name, x[:batch], reps)
        except Exception as exc:  # one failing target must not hide the others
            row.error = f"{type(exc).__name__}: {exc}"
    return row


def add_ratios(rows: list[Row]) -> None:
    ref = next((r for r in rows if r.target == REFERENCE and r.error is None), None)
    if ref is None:
        return
    for r in rows:
        if r.error is not None:
            continue
        r.speedup_b1 = ref.latency_ms_b1 / r.latency_ms_b1 if r.latency_ms_b1 else None
        r.throughput_ratio = r.windows_per_s / ref.windows_per_s if ref.windows_per_s else None
        r.compile_ratio = r.compile_s / ref.compile_s if ref.compile_s else None


# ---------------------------------------------------------------- targets
def targets(registry: Registry, wanted: str | None) -> tuple[list[Target], list[dict[str, str]]]:
    """Every available (backend, precision), reference first; plus the skipped backends with why."""
    if wanted:
        chosen = registry.parse_targets(wanted)
        ref = registry.parse_target(REFERENCE)
        return [ref] + [t for t in chosen if t != ref], []
    out, skipped = [], []
    for backend in registry:
        if isinstance(backend, BrokenPlugin):
            skipped.append({"backend": backend.name, "reason": f"plugin failed to load: {backend.error}"})
            continue
        ok, why = availability(backend)
        if not ok:
            skipped.append({"backend": backend.name, "reason": why})
            continue
        out.extend(Target(backend.name, p) for p in backend.capabilities.precisions)
    out.sort(key=lambda t: str(t) != REFERENCE)
    return out, skipped


# ---------------------------------------------------------------- output
def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(rows: list[Row]) -> str:
    head = f"{'target':<20} {'verification':<12} {'b1 ms':>8} {'x ref':>6} {'win/s':>10} {'x ref':>6} {'compile s':>9} {'x ref':>7} {'size KiB':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if r.error:
            lines.append(f"{r.target:<20} error: {r.error[:100]}")
            continue
        lines.append(
            f"{r.target:<20} {r.verification:<12} {_fmt(r.latency_ms_b1, '8.3f')} {_fmt(r.speedup_b1, '6.2f')} "
            f"{_fmt(r.windows_per_s, '10.0f')} {_fmt(r.throughput_ratio, '6.2f')} {_fmt(r.compile_s, '9.3f')} "
            f"{_fmt(r.compile_ratio, '7.1f')} {_fmt(None if r.size_bytes is None else r.size_bytes / 1024, '9.1f')}")
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "python": platform.python_version(), "platform": platform.platform()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Latency/throughput/compile time of every backend vs FP32 onnxruntime")
    ap.add_argument("--model", help="model (.onnx with contract); default: shipped T-P model, else one trained here")
    ap.add_argument("--calib", help="calibration set (.npz) for quantized targets")
    ap.add_argument("--runs", type=int, default=200, help="batch-1 runs for the median (default 200)")
    ap.add_argument("--batch", type=int, default=256, help="batch size for throughput (default 256)")
    ap.add_argument("--reps", type=int, default=20, help="batched runs for the median (default 20)")
    ap.add_argument("--targets", help="comma-separated targets (default: every available backend and precision)")
    ap.add_argument("--json", nargs="?", const="-", metavar="PATH", help="write JSON (to PATH, or stdout when no PATH)")
    args = ap.parse_args(argv)
    say = (lambda s: print(s, file=sys.stderr)) if args.json == "-" else print

    model, calib, origin = load_inputs(args.model, args.calib, say)
    registry = default_registry()
    chosen, skipped = targets(registry, args.targets)
    quant = QuantContext(model, calib)
    t0 = time.perf_counter()
    _ = quant.statistics  # the shared calibration pass, once, outside every target's compile time
    calibration_s = time.perf_counter() - t0
    options = {"quant": quant, "calibration": calib}
    x = _windows(model, calib, max(args.batch, args.runs))

    rows = []
    for target in chosen:
        say(f"benchmarking {target}")
        rows.append(bench_target(registry, target, model, options, x, runs=args.runs, batch=args.batch, reps=args.reps))
    add_ratios(rows)

    result = {
        "model": origin, "machine": machine(), "threads": 1, "runs_b1": args.runs, "batch": args.batch, "reps": args.reps,
        "calibration_s": round(calibration_s, 3), "reference": REFERENCE, "rows": [asdict(r) for r in rows], "skipped": skipped,
        "note": "emulated rows time an emulation on this CPU, not the target device",
    }
    if args.json:
        text = json.dumps(result, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    if args.json != "-":
        print(f"model: {origin}\nmachine: {result['machine']['cpu']}; one thread; calibration pass {calibration_s:.2f} s (shared)")
        print(table(rows))
        for s in skipped:
            print(f"skipped {s['backend']}: {s['reason']}")
        print("x ref: speed-up / throughput ratio / compile-time ratio vs onnxruntime:fp32. " + result["note"] + ".")
    return 0 if all(r.error is None for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

"""DPU backend: emulator throughput (windows/s) and "compile time" (nilmc's lower), side by side.

Run: ``python benchmarks/bench_dpu.py [--model M.onnx] [--calib C.npz] [--eval E.npz] [--windows 2000] [--json out.json]``.

Model: ``--model`` when given (its contract is read from the ONNX); else the shipped T-P model
when it exists; else a seq2point graph of the shipped T-P shape (five convs 5/5/3/3/3 with
32/32/64/64/32 filters, dense 192/96/1, random weights; :mod:`nilmc.backends.dpu.testing`) with
random z-score-like windows - throughput depends on the shape only, so that row is representative
of speed but says nothing about accuracy. Data: ``--calib``/``--eval`` when given; else the shipped
sets when they exist; else random windows.

Rows:

* ``lower dpu:b2304`` / ``dpu:b4096`` - wall time of :meth:`DPUBackend.lower` (IR, inspector,
  sequential power-of-two calibration with the emulator, xmodel + hand-off written), i.e. nilmc's
  share of "DPU compile time". ``vai_c_xir`` itself (AMD's closed compiler in the Vitis AI docker
  image) is not available here, so the compiled-xmodel step is not timed;
* ``emulator`` - bit-accurate emulation of the quantized xmodel read back from the bundle, windows/s (and the time per op: the stage table)
  at batch 1024 and at batch 1, next to onnxruntime FP32 (one thread) on the same windows for scale. At batch 1024:
  the mean over the time budget, and the best and median of the per-batch rates (``_best``, ``_median``).

Machine load from other processes shows in every time (this machine: 2 shared cores).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from nilmc.backends.dpu import DPUBackend, testing
from nilmc.compiler.model import Model


def _synthetic() -> tuple[Model, Any, np.ndarray]:
    from nilmc.calibration_data.dataset import NilmDataset
    from nilmc.calibration_data.normalization import FeatureStats, Normalization, NormalizationSpec, TargetScaling
    from nilmc.compiler.contract import ModelContract

    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (1000, 10, 9, 1)).astype(np.float32)
    stats = FeatureStats(np.full(9, -4.0), np.full(9, 4.0), np.zeros(9), np.ones(9))
    contract = ModelContract((10, 9, 1), NormalizationSpec(Normalization.C, stats), "kettle", TargetScaling(0.0, 1.0),
                             peak_power_w=None, setup="T-P")
    ds = NilmDataset(x=x, y=np.zeros((len(x), 1), np.float32), appliances=["kettle"], feature_names=[f"f{i}" for i in range(9)],
                     train_stats=stats, target_mean=[0.0], target_std=[1.0], on_thresholds=[10.0], info={"setup": "T-P"})
    return Model(testing.seq2point(), contract, source="synthetic seq2point (T-P shape)"), ds, x


def _load(args: argparse.Namespace) -> tuple[Model, Any, np.ndarray, str]:
    from nilmc.calibration_data.dataset import NilmDataset
    from nilmc.compiler.frontend import load_model

    model_path, calib, ev = args.model, args.calib, args.eval
    if model_path is None:
        try:
            from nilmc.calibration_data.shipped import shipped_paths  # type: ignore[attr-defined]

            p = shipped_paths()
            model_path, calib, ev = (p["model"] if Path(p["model"]).is_file() else None), calib or p["calib"], ev or p["eval"]
        except Exception:  # nothing shipped yet
            pass
    if model_path is None:
        model, ds, x = _synthetic()
        return model, ds, x, model.source
    model = load_model(model_path)
    cal = NilmDataset.load(calib)
    x = model.contract.prepare(NilmDataset.load(ev).raw_x())
    return model, cal, x, str(model_path)


def _windows_per_s(fn: Any, x: np.ndarray, batch: int, budget_s: float) -> tuple[float, float, float]:
    """Mean windows/s over ``budget_s`` seconds, and the best and median of the per-batch rates."""
    fn(x[:batch])  # warm-up
    n, t0, rates = 0, time.perf_counter(), []
    while time.perf_counter() - t0 < budget_s:
        for i in range(0, len(x), batch):
            t1 = time.perf_counter()
            fn(x[i:i + batch])
            rates.append(len(x[i:i + batch]) / (time.perf_counter() - t1))
            n += len(x[i:i + batch])
            if time.perf_counter() - t0 >= budget_s:
                break
    return n / (time.perf_counter() - t0), max(rates), float(np.median(rates))


def _rate_rows(prefix: str, rates: tuple[float, float, float]) -> dict[str, float]:
    mean, best, median = rates
    return {prefix: round(mean, 1), f"{prefix}_best": round(best, 1), f"{prefix}_median": round(median, 1)}


def _stage_ms(emulator: Any, input_name: str, x: np.ndarray, repeats: int = 3) -> dict[str, float]:
    """Milliseconds per op (stage) for one batch of ``len(x)`` windows, mean of ``repeats`` runs."""
    emulator.timings.clear()
    for _ in range(repeats):
        emulator.infer({input_name: x})
    return {op: round(1e3 * t / repeats, 2) for op, t in emulator.timings.items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--calib")
    ap.add_argument("--eval")
    ap.add_argument("--windows", type=int, default=2000, help="windows for the throughput runs (default 2000)")
    ap.add_argument("--seconds", type=float, default=5.0, help="time budget per throughput row (default 5 s)")
    ap.add_argument("--json", help="write the rows here")
    a = ap.parse_args(argv)

    import onnxruntime as ort

    from nilmc.quantization.context import QuantContext

    model, calib, x, source = _load(a)
    x = x[: a.windows]
    rows: dict[str, Any] = {"model": source, "calibration_windows": int(len(calib.x)), "throughput_windows": int(len(x))}
    backend = DPUBackend()
    with tempfile.TemporaryDirectory() as tmp:
        for precision in ("b2304", "b4096"):
            t0 = time.perf_counter()
            art = backend.lower(model, Path(tmp) / precision, precision=precision, options={"quant": QuantContext(model, calib)})
            rows[f"lower_dpu:{precision}_s"] = round(time.perf_counter() - t0, 3)
        rows["xmodel_bytes"] = (art.directory / art.primary).stat().st_size
        with backend.runner(art) as r:
            emu = lambda b: r.infer({model.input_name: b})  # noqa: E731
            rows.update(_rate_rows("emulator_windows_per_s_b1024", _windows_per_s(emu, x, 1024, a.seconds)))
            rows["emulator_stage_ms_per_1024"] = _stage_ms(r._emulator, model.input_name, x[:1024])  # type: ignore[arg-type]
            rows["emulator_windows_per_s_b1"] = round(_windows_per_s(emu, x[:200], 1, a.seconds)[0], 1)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.log_severity_level = 1, 3
    sess = ort.InferenceSession(model.graph.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    fp32 = lambda b: sess.run(None, {model.input_name: b})  # noqa: E731
    rows.update(_rate_rows("onnxruntime_fp32_windows_per_s_b1024", _windows_per_s(fp32, x, 1024, a.seconds)))
    rows["vai_c_xir"] = "not available here (AMD Vitis AI docker image); compiled-xmodel time not measured"

    print(f"model: {source}")
    print(f"{'row':44s} {'value':>12s}")
    for k in ("lower_dpu:b2304_s", "lower_dpu:b4096_s", "xmodel_bytes", "emulator_windows_per_s_b1024",
              "emulator_windows_per_s_b1024_best", "emulator_windows_per_s_b1024_median", "emulator_windows_per_s_b1",
              "onnxruntime_fp32_windows_per_s_b1024", "onnxruntime_fp32_windows_per_s_b1024_best",
              "onnxruntime_fp32_windows_per_s_b1024_median"):
        print(f"{k:44s} {rows[k]:>12}")
    print(f"emulator stages at batch {min(len(x), 1024)} (ms):")
    for op, ms in rows["emulator_stage_ms_per_1024"].items():
        print(f"  {op:42s} {ms:>12}")
    ratio = rows["emulator_windows_per_s_b1024"] / max(rows["onnxruntime_fp32_windows_per_s_b1024"], 1e-9)
    print(f"emulator runs at {ratio:.2f}x onnxruntime FP32 (1 thread) at batch 1024 (exact integers: onnxruntime u8 x s8 GEMMs)")
    print(f"vai_c_xir: {rows['vai_c_xir']}")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()

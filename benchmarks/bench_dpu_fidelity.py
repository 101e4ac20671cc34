"""DPU fidelity over calibration draws: dpu:b2304 ΔEACC and output SQNR vs FP32 per draw, mean and worst, per CPU/DPU
partition (``dpu.cpu_layers``): ``auto`` (default: the layers reading the graph input and the dense head run in FP32 on
the CPU, the DPU runs everything between), ``input`` (only the input layers on the CPU, the head int8 on the DPU),
``none`` (every layer on the DPU, the graph input quantized on an 8-bit power-of-two grid).

Run: ``python benchmarks/bench_dpu_fidelity.py [--modes auto,input] [--draws 5] [--draw-size 1000] [--target b2304]
[--pool FILE] [--json out.json] [--no-shipped] [--only K ...]``.

Model and evaluation set: the shipped T-P kettle model (``calibration_data/shipped/tp_kettle_zscore.onnx``) and the
shipped evaluation set (``eval_T-P.npz``, 5000 windows; it only scores, nothing is tuned on it). Calibration: the
shipped calibration set (``calib_T-P.npz``), then draw ``k`` = windows ``[k*size, (k+1)*size)`` of the 20,000-window
pool of ``benchmarks/bench_calibration_draws.py`` (``generate_dataset(setup="T-P", split="calib", n_windows=20000,
seed=3)``, cached as ``$TMPDIR/nilmc-bench-calib/calib_T-P_20000_seed3.npz``). Every row is one
``compile_model(..., [Target("dpu", target)], calib=draw, budget={"eacc": 100}, options=CompileOptions(backend_options=
{"dpu": {"cpu_layers": mode}}))``, as ``nilmc compile`` runs it: ΔEACC in points (positive = worse) from
``report.deltas["eacc"]``, SQNR (dB) from ``report.extra["output_sqnr_db"]``. The vendor line to beat
(issue 10, same draws): AMD Quark XINT8 mean 27.4 / worst 20.5 dB; target mean >= 28.4 dB, worst >= 30 dB,
|ΔEACC| <= 0.25 per draw. The shipped calibration set is the pool's first 1000 windows: "shipped" and draw 0 coincide
(``--no-shipped`` skips the duplicate).

Measured 2026-12-01 (2 shared cores; ``--modes auto,input --no-shipped``, ~4 min; ``none`` and the "before" line from
the previous run of this file, which the changes below do not touch):

    cpu_layers           5 draws SQNR mean / worst   ΔEACC per draw (draws 0..4; draw 0 = shipped)
    none                 22.52 / 20.60               -0.860 -0.644 +0.023 +1.397 -0.391
    input, before        29.42 / 24.24               -0.250 +0.259 +0.186 -0.409 +0.551   (was "auto")
    input                32.85 / 31.20               +0.518 +0.259 +0.186 +0.414 +0.551   (draws 34.59 32.14 31.62 31.20 34.70 dB)
    auto (default)       33.83 / 31.76               +0.195 -0.059 -0.070 +0.045 +0.163   (draws 36.12 32.92 32.30 31.76 36.03 dB)

``auto`` meets the issue's DPU line: mean 33.83 dB (Quark + 6.4 dB), worst 31.76 dB, |ΔEACC| <= 0.195 on every draw.
What changed, each measured on all 5 draws (``/tmp`` harness calling ``backends/dpu/quant.calibrate`` as the backend
does, same numbers as this file to 0.01 dB):

1. **The DPU input's fix position** (the FP32 conv1's output) is chosen by quantization MSE from one coarser to one
   *finer* than the no-clipping position (``CPU_OUTPUT_FIX_WINDOW``), not only no-clipping or coarser: on draws 0 and 3
   a few calibration values ran just past the finer grid (2.09 and 3.15 against 1.98), so conv1's output sat one bit
   coarse (codes up to ~70). Head on the DPU: 24.39 -> 34.59 and 24.24 -> 31.20 dB, other draws unchanged. Head on the
   CPU but this rule off: draws 0 / 3 at 24.54 / 24.37 dB (ΔEACC -0.673 / -0.702): both changes are needed.
2. **Precise output** (``cpu_layers=auto``, :mod:`nilmc.backends.dpu.partition`): the linear dense head runs in FP32 on
   the CPU on the DPU's int8 features (96 MACs per window). On the DPU its 8-bit grid must hold the contract's peak
   (2766 W = 3.09 model units) on a symmetric range: fix 5, one LSB = 25 W; after the 0 W floor the rounding noise is a
   one-sided bias on every "off" window (truth 0 W, where ΔEACC is exactly Σ(q - r)): with the head int8 every draw
   lost +0.19..+0.55 points (draws 0 / 4: 0.24 / 0.31 of them on the 3174 windows FP32 floors to 0 W).

Tried and dropped (head on the DPU): the head's bias moved within one output LSB to the offset with the lowest
calibration error after the 0 W floor (L1 watts: ΔEACC +0.074 -0.169 -0.326 -0.119 -0.017 but SQNR 34.03 31.88 28.84
30.63 33.90; |mean| of the floored difference: ΔEACC +0.144 -0.183 -0.277 +0.109 +0.084, SQNR worst 30.38); the
precise output does better on both without a tuned offset. A uniform 1.5x headroom on the refinement's ranges
(``PotOptions.headroom``) lowered every draw in the previous measurement (2x too), so the default stays 1.0. Not tried
yet: a MinMSE/tail-aware fix search for conv2 (its evaluation maximum 2.61 still passes draw 0's grid 1.98, 84 windows
saturate), AdaRound, QAT with the head on the CPU (the ``*_qat`` precisions keep the head on the DPU).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

SHIPPED = Path(__file__).resolve().parents[1] / "calibration_data" / "shipped"
QUARK_MEAN_DB, QUARK_WORST_DB = 27.4, 20.5
TARGET_MEAN_DB, TARGET_WORST_DB, TARGET_EACC = QUARK_MEAN_DB + 1.0, 30.0, 0.25


def _pool(path: Path, n: int) -> Any:
    from nilmc.calibration_data.dataset import NilmDataset
    from nilmc.calibration_data.windows import generate_dataset

    if path.is_file():
        return NilmDataset.load(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return generate_dataset(setup="T-P", split="calib", n_windows=n, seed=3, out=path)


def _one(model: Any, eval_ds: Any, calib: Any, target: str, mode: str) -> dict[str, Any]:
    from nilmc.compiler.driver import CompileOptions, Target, compile_model

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        options = CompileOptions(backend_options={"dpu": {"cpu_layers": mode}})
        summary = compile_model(model, eval_ds, [Target("dpu", target)], Path(tmp) / "out", calib=calib, budget={"eacc": 100},
                                options=options)
        res = summary.results[0]
        if res.report is None:
            raise RuntimeError(f"dpu:{target} ({mode}) failed: {getattr(res, 'error', None)}")
        r = res.report
        manifest = json.loads((Path(tmp) / "out" / f"dpu-{target}" / "manifest.json").read_text())
        cpu = [f["name"] for f in manifest.get("placement", {}).get("float", [])]
        return {"d_eacc": float(r.deltas["eacc"]), "sqnr": float(r.extra["output_sqnr_db"]), "cpu_ops": cpu,
                "s": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", default="auto,input", help="dpu.cpu_layers values to compare (default auto,input)")
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--draw-size", type=int, default=1000)
    ap.add_argument("--pool-windows", type=int, default=20_000)
    ap.add_argument("--target", default="b2304")
    ap.add_argument("--only", type=int, nargs="*", help="draw indices to run (default all)")
    ap.add_argument("--no-shipped", action="store_true", help="skip the shipped calibration draw")
    ap.add_argument("--pool", type=Path, default=None, help="pool cache (default: bench_calibration_draws.py's)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from nilmc.calibration_data.dataset import NilmDataset
    from nilmc.compiler.frontend import load_model

    model = load_model(SHIPPED / "tp_kettle_zscore.onnx")
    eval_ds = NilmDataset.load(SHIPPED / "eval_T-P.npz")
    pool_path = args.pool or Path(os.environ.get("TMPDIR", "/tmp")) / "nilmc-bench-calib" / f"calib_T-P_{args.pool_windows}_seed3.npz"
    pool = _pool(pool_path, args.pool_windows)
    draws: dict[str, Any] = {} if args.no_shipped else {"shipped": NilmDataset.load(SHIPPED / "calib_T-P.npz")}
    for k in args.only if args.only is not None else range(args.draws):
        draws[f"draw{k}"] = pool.subset(slice(k * args.draw_size, (k + 1) * args.draw_size))
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    rows: dict[str, dict[str, Any]] = {m: {} for m in modes}
    for name, calib in draws.items():
        for mode in modes:
            rows[mode][name] = r = _one(model, eval_ds, calib, args.target, mode)
            print(f"{name:<8} cpu_layers={mode:<5} ΔEACC {r['d_eacc']:+.3f}  SQNR {r['sqnr']:6.2f} dB  CPU: {', '.join(r['cpu_ops']) or '-'}"
                  f"  ({r['s']} s)", flush=True)
    print(f"\ndpu:{args.target}, shipped model, shipped evaluation set ({len(eval_ds.x)} windows); AMD Quark XINT8 {QUARK_MEAN_DB} / "
          f"{QUARK_WORST_DB} dB; target mean >= {TARGET_MEAN_DB} dB, worst >= {TARGET_WORST_DB} dB, |ΔEACC| <= {TARGET_EACC}")
    for mode in modes:
        sel = {k: v for k, v in rows[mode].items() if k.startswith("draw")}
        line = [f"cpu_layers={mode:<5}"]
        if "shipped" in rows[mode]:
            s = rows[mode]["shipped"]
            line.append(f"shipped {s['sqnr']:.2f} dB / ΔEACC {s['d_eacc']:+.3f}")
        if sel:
            s_arr = np.array([v["sqnr"] for v in sel.values()])
            e_arr = np.array([v["d_eacc"] for v in sel.values()])
            ok = s_arr.mean() >= TARGET_MEAN_DB and s_arr.min() >= TARGET_WORST_DB and np.abs(e_arr).max() <= TARGET_EACC
            line.append(f"{len(sel)} draws: SQNR mean {s_arr.mean():.2f} / worst {s_arr.min():.2f} dB; ΔEACC per draw "
                        f"{', '.join(f'{v:+.3f}' for v in e_arr)} (worst |{np.abs(e_arr).max():.3f}|); target {'met' if ok else 'NOT met'}")
        print("  ".join(line))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

"""DPU fidelity over calibration draws: dpu:b2304 ΔEACC and output SQNR vs FP32 per draw, mean and worst, with the
CPU/DPU partition (``dpu.cpu_layers=auto``: the layers reading the graph input run in FP32 on the CPU) and without it
(``none``: every layer on the DPU, the graph input quantized on an 8-bit power-of-two grid).

Run: ``python benchmarks/bench_dpu_fidelity.py [--modes none,auto] [--draws 5] [--draw-size 1000] [--target b2304]
[--pool FILE] [--json out.json] [--no-shipped] [--only K ...]``.

Model and evaluation set: the shipped T-P kettle model (``calibration_data/shipped/tp_kettle_zscore.onnx``) and the
shipped evaluation set (``eval_T-P.npz``, 5000 windows; it only scores, nothing is tuned on it). Calibration: the
shipped calibration set (``calib_T-P.npz``), then draw ``k`` = windows ``[k*size, (k+1)*size)`` of the 20,000-window
pool of ``benchmarks/bench_calibration_draws.py`` (``generate_dataset(setup="T-P", split="calib", n_windows=20000,
seed=3)``, cached as ``$TMPDIR/nilmc-bench-calib/calib_T-P_20000_seed3.npz``). Every row is one
``compile_model(..., [Target("dpu", target)], calib=draw, budget={"eacc": 100}, options=CompileOptions(backend_options=
{"dpu": {"cpu_layers": mode}}))``, as ``nilmc compile`` runs it: ΔEACC in points (positive = worse) from
``report.deltas["eacc"]``, SQNR (dB) from ``report.extra["output_sqnr_db"]``. The vendor line to beat
(issue 10, same draws): AMD Quark XINT8 mean 27.4 / worst 20.5 dB; target mean >= 28.4 dB, |ΔEACC| <= 0.25 per draw.

Measured 2026-12-01 (2 shared cores, ~6 min; the shipped calibration set is the pool's first 1000 windows, so
"shipped" and draw 0 coincide):

    cpu_layers  shipped dB / ΔEACC   5 draws SQNR mean / worst   ΔEACC per draw (draws 0..4)
    none        20.61 / -0.860       22.52 / 20.60                -0.860 -0.644 +0.023 +1.397 -0.391
    auto        24.39 / -0.250       29.42 / 24.24                -0.250 +0.259 +0.186 -0.409 +0.551

Reading: with the input layer on the CPU the mean is 2.0 dB above Quark's 27.4 (target 28.4 met); |ΔEACC| <= 0.25 is
not met on draws 1, 3, 4. What is left on draws 0 and 3 is inner coverage: conv2's evaluation maximum (2.61) runs past
the draw's grid (1.98; 84 of 5000 windows saturate, kettle-on windows lose up to 870 W). A uniform 1.5x headroom on
the refinement's ranges (``PotOptions.headroom``) lowered every draw (shipped 24.0, draws 1-4 24.1 / 23.6 / 22.6 /
23.9 dB), 2x too, so the default stays 1.0.
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
TARGET_MEAN_DB, TARGET_EACC = QUARK_MEAN_DB + 1.0, 0.25


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
    ap.add_argument("--modes", default="none,auto", help="dpu.cpu_layers values to compare (default none,auto)")
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
          f"{QUARK_WORST_DB} dB; target mean >= {TARGET_MEAN_DB} dB, |ΔEACC| <= {TARGET_EACC}")
    for mode in modes:
        sel = {k: v for k, v in rows[mode].items() if k.startswith("draw")}
        line = [f"cpu_layers={mode:<5}"]
        if "shipped" in rows[mode]:
            s = rows[mode]["shipped"]
            line.append(f"shipped {s['sqnr']:.2f} dB / ΔEACC {s['d_eacc']:+.3f}")
        if sel:
            s_arr = np.array([v["sqnr"] for v in sel.values()])
            e_arr = np.array([v["d_eacc"] for v in sel.values()])
            ok = s_arr.mean() >= TARGET_MEAN_DB and np.abs(e_arr).max() <= TARGET_EACC
            line.append(f"{len(sel)} draws: SQNR mean {s_arr.mean():.2f} / worst {s_arr.min():.2f} dB; ΔEACC per draw "
                        f"{', '.join(f'{v:+.3f}' for v in e_arr)} (worst |{np.abs(e_arr).max():.3f}|); target {'met' if ok else 'NOT met'}")
        print("  ".join(line))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

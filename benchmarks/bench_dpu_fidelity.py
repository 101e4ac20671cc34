"""DPU fidelity over calibration draws: dpu:b2304 ΔEACC and output SQNR vs FP32, per draw, mean and worst.

Run: ``python benchmarks/bench_dpu_fidelity.py [--draws 5] [--draw-size 1000] [--target b2304] [--json out.json]
[--work DIR] [--no-shipped]``.

Model and evaluation set: the shipped T-P kettle model (``calibration_data/shipped/tp_kettle_zscore.onnx`` with its
``.keras``) and the shipped evaluation set (``eval_T-P.npz``, 5000 windows; it only scores, nothing is tuned on it).
Calibration: draw ``k`` is windows ``[k*size, (k+1)*size)`` of
``build_splits("T-P", seed=3, n_calib=draws*size, splits=("calib",))["calib"]`` (cached in ``--work``), plus the
shipped calibration set (``calib_T-P.npz``). Every draw is one ``compile_model(..., [Target("dpu", target)], calib=draw,
budget={"eacc": 100})``: ΔEACC in points (positive = worse) from ``report.deltas["eacc"]``, SQNR (dB) from
``report.extra["output_sqnr_db"]``. The vendor line to beat (REFERENCE.md): AMD Quark XINT8 mean 27.4 / worst 20.5 dB.
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


def _pool(work: Path, n: int) -> Any:
    from nilmc.calibration_data.dataset import NilmDataset
    from nilmc.calibration_data.windows import build_splits

    path = work / f"calib_seed3_{n}.npz"
    if path.is_file():
        return NilmDataset.load(path)
    ds = build_splits("T-P", seed=3, n_calib=n, splits=("calib",))["calib"]
    work.mkdir(parents=True, exist_ok=True)
    ds.save(path)
    return ds


def _one(model: Any, eval_ds: Any, calib: Any, target: str) -> dict[str, Any]:
    from nilmc.compiler.driver import Target, compile_model

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        summary = compile_model(model, eval_ds, [Target("dpu", target)], Path(tmp) / "out", calib=calib, budget={"eacc": 100})
        res = summary.results[0]
        if res.report is None:
            raise RuntimeError(f"dpu:{target} failed: {getattr(res, 'error', None)}")
        r = res.report
        return {"d_eacc": float(r.deltas["eacc"]), "sqnr": float(r.extra["output_sqnr_db"]), "s": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--draw-size", type=int, default=1000)
    ap.add_argument("--target", default="b2304")
    ap.add_argument("--only", type=int, nargs="*", help="draw indices to run (default all)")
    ap.add_argument("--no-shipped", action="store_true", help="skip the shipped calibration draw")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "nilmc-bench-dpu-fidelity")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from nilmc.calibration_data.dataset import NilmDataset
    from nilmc.compiler.frontend import load_model

    model = load_model(SHIPPED / "tp_kettle_zscore.onnx")
    eval_ds = NilmDataset.load(SHIPPED / "eval_T-P.npz")
    pool = _pool(args.work, args.draws * args.draw_size)
    rows: dict[str, dict[str, Any]] = {}
    if not args.no_shipped:
        rows["shipped"] = _one(model, eval_ds, NilmDataset.load(SHIPPED / "calib_T-P.npz"), args.target)
        print(f"shipped  ΔEACC {rows['shipped']['d_eacc']:+.3f}  SQNR {rows['shipped']['sqnr']:.2f} dB  ({rows['shipped']['s']} s)", flush=True)
    for k in args.only if args.only is not None else range(args.draws):
        draw = pool.subset(slice(k * args.draw_size, (k + 1) * args.draw_size))
        rows[f"draw{k}"] = r = _one(model, eval_ds, draw, args.target)
        print(f"draw {k}   ΔEACC {r['d_eacc']:+.3f}  SQNR {r['sqnr']:.2f} dB  ({r['s']} s)", flush=True)
    draws = [v for k, v in rows.items() if k.startswith("draw")]
    if draws:
        s = np.array([d["sqnr"] for d in draws])
        e = np.array([d["d_eacc"] for d in draws])
        print(f"dpu:{args.target} over {len(draws)} draws: SQNR mean {s.mean():.2f} / worst {s.min():.2f} dB; "
              f"ΔEACC worst |{np.abs(e).max():.3f}| (mean {e.mean():+.3f}); Quark XINT8 {QUARK_MEAN_DB} / {QUARK_WORST_DB} dB")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

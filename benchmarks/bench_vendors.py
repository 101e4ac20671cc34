"""nilmc's INT8 targets beside the vendors' own quantizers: same model, same calibration windows, same
evaluation set, same metric code, over several calibration draws.

    python benchmarks/bench_vendors.py [--draws 5] [--draw-size 1000] [--targets ...] [--json out.json]

Model: the shipped T-P kettle model (z-score, normalization C). Data: the shipped evaluation set; a
calibration pool of ``draws * draw_size`` windows of the calibration split (``build_splits`` with the
shipped seed); draw ``k`` is windows ``[k*size, (k+1)*size)``.

Flows (each scored on the same eval windows, in watts after the contract's de-normalization):

* ``nilmc <target>``                 ``compile_model`` for each nilmc INT8 target (default: every available one);
* ``ort quantize_static``            onnxruntime's static QDQ quantization, defaults (per-tensor, MinMax);
* ``ort quantize_static per-channel`` the same with ``per_channel=True``;
* ``nncf default``                   ``nncf.quantize`` on the ONNX model, defaults (OpenVINO's quantizer);
* ``tflite converter default``       ``TFLiteConverter`` + ``Optimize.DEFAULT`` + representative dataset;
* ``modelopt max`` / ``quark xint8`` NVIDIA ModelOpt ONNX PTQ and AMD Quark for ONNX (XINT8, power-of-two): they
                                     need torch (the optional ``bench`` extra); absent ones are reported as absent.

Printed per flow: ΔEACC (points, positive = worse) and ΔMAE (W) mean and worst over the draws, output SQNR vs
FP32 mean and worst (dB). A flow that fails on a draw is reported with its error, never silently dropped.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from nilmc.calibration_data.dataset import NilmDataset  # noqa: E402
from nilmc.compiler.metrics import compare_metrics, nilm_metrics, sqnr_db  # noqa: E402
from nilmc.compiler.model import Model  # noqa: E402

SEED = 3
DEFAULT_TARGETS = "onnxruntime:int8,openvino:int8,tensorrt:int8,tflite:int8,eiq:int8,dpu:b2304"


@dataclass
class Row:
    flow: str
    deltas: list[float] = field(default_factory=list)
    mae: list[float] = field(default_factory=list)
    sqnr: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    absent: str = ""


def _score(model: Model, truth: np.ndarray, ref_w: np.ndarray, ref_m: Any, pred_model_units: np.ndarray) -> tuple[float, float, float]:
    pred = model.contract.to_watts(pred_model_units)
    m = nilm_metrics(truth, pred, on_threshold_w=model.contract.on_threshold_w)
    d = compare_metrics(ref_m, m)
    return float(d["eacc"]), float(d["mae"]), float(sqnr_db(ref_w, pred))


def _ort_run(proto_bytes: bytes, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(proto_bytes, opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + 1000]})[0] for i in range(0, len(x), 1000)]).reshape(len(x), -1)


# --------------------------------------------------------------------------- vendor flows
def _reader(name: str, calib_x: np.ndarray) -> Any:
    """onnxruntime's calibration reader protocol over the draw, one window per step (what the vendors' examples do)."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(calib_x[i:i + 1] for i in range(len(calib_x)))

        def get_next(self) -> dict[str, np.ndarray] | None:
            nxt = next(self._it, None)
            return None if nxt is None else {name: nxt}

    return Reader()


def vendor_ort(model: Model, calib_x: np.ndarray, eval_x: np.ndarray, *, per_channel: bool) -> np.ndarray:
    from onnxruntime.quantization import QuantFormat, quantize_static

    name = model.input_name

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "m.onnx", Path(tmp) / "q.onnx"
        src.write_bytes(model.serialize())
        quantize_static(str(src), str(dst), _reader(name, calib_x), quant_format=QuantFormat.QDQ, per_channel=per_channel)
        return _ort_run(dst.read_bytes(), eval_x)


def vendor_nncf(model: Model, calib_x: np.ndarray, eval_x: np.ndarray) -> np.ndarray:
    import nncf

    name = model.input_name
    ds = nncf.Dataset([calib_x[i:i + 1] for i in range(len(calib_x))], lambda x: {name: x})
    q = nncf.quantize(model.with_contract_metadata(), ds, subset_size=len(calib_x))
    return _ort_run(q.SerializeToString(), eval_x)


def vendor_tflite(model: Model, calib_x: np.ndarray, eval_x: np.ndarray) -> np.ndarray:
    from bench_ptq import _tflite_convert, _tflite_predict

    from nilmc.compiler.tfcompat import load_keras

    fb = _tflite_convert(load_keras(model), calib_x)
    return np.asarray(_tflite_predict(fb, eval_x)).reshape(len(eval_x), -1)


def vendor_modelopt(model: Model, calib_x: np.ndarray, eval_x: np.ndarray) -> np.ndarray:
    from modelopt.onnx.quantization import quantize  # needs torch (the bench extra)

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "m.onnx", Path(tmp) / "q.onnx"
        src.write_bytes(model.serialize())
        quantize(str(src), calibration_data=calib_x, calibration_method="max", output_path=str(dst))
        return _ort_run(dst.read_bytes(), eval_x)


def vendor_quark(model: Model, calib_x: np.ndarray, eval_x: np.ndarray) -> np.ndarray:
    from quark.onnx import ModelQuantizer  # needs torch (the bench extra)
    from quark.onnx.quantization.config import Config, get_default_config

    name = model.input_name

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "m.onnx", Path(tmp) / "q.onnx"
        src.write_bytes(model.serialize())
        ModelQuantizer(Config(global_quant_config=get_default_config("XINT8"))).quantize_model(str(src), str(dst), _reader(name, calib_x))
        return _ort_run(dst.read_bytes(), eval_x)


VENDORS: dict[str, tuple[Callable[..., np.ndarray], str]] = {
    "ort quantize_static": (lambda m, c, e: vendor_ort(m, c, e, per_channel=False), "onnxruntime"),
    "ort quantize_static per-channel": (lambda m, c, e: vendor_ort(m, c, e, per_channel=True), "onnxruntime"),
    "nncf default": (vendor_nncf, "nncf"),
    "tflite converter default": (vendor_tflite, "tensorflow"),
    "modelopt max": (vendor_modelopt, "modelopt"),
    "quark xint8": (vendor_quark, "quark"),
}


# --------------------------------------------------------------------------- the run
def main(argv: list[str] | None = None) -> int:
    import importlib.util

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--draw-size", type=int, default=1000)
    ap.add_argument("--targets", default=DEFAULT_TARGETS)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)

    from nilmc.backends.registry import default_registry
    from nilmc.calibration_data.shipped import shipped_paths
    from nilmc.calibration_data.windows import build_splits
    from nilmc.compiler.driver import compile_model, reference_metrics
    from nilmc.compiler.frontend import load_model

    t0 = time.perf_counter()
    p = shipped_paths()
    model = load_model(p["keras"])
    eval_ds = NilmDataset.load(p["eval"])
    pool = build_splits("T-P", seed=SEED, n_calib=a.draws * a.draw_size, splits=("calib",))["calib"]
    truth = eval_ds.y[:, eval_ds.appliance_index(model.contract.appliance)]
    ref_m, ref_w = reference_metrics(model, eval_ds)
    eval_x = model.contract.prepare(eval_ds.raw_x())
    reg = default_registry()
    targets = [t for t in reg.parse_targets(a.targets)]
    rows: dict[str, Row] = {f"nilmc {t}": Row(f"nilmc {t}") for t in targets}
    for flow, (_, module) in VENDORS.items():
        rows[flow] = Row(flow, absent="" if importlib.util.find_spec(module) is not None else f"{module} not installed (pip install 'nilmc[bench]')")
    for k in range(a.draws):
        cal = pool.subset(slice(k * a.draw_size, (k + 1) * a.draw_size))
        with tempfile.TemporaryDirectory() as tmp:
            s = compile_model(model, eval_ds, targets, Path(tmp) / "o", calib=cal, budget={"eacc": 100.0}, registry=reg)
        for r in s.results:
            row = rows[f"nilmc {r.target}"]
            if r.report is None:
                row.errors.append(f"draw {k}: {r.error}")
                continue
            row.deltas.append(float(r.report.deltas["eacc"]))
            row.mae.append(float(r.report.deltas["mae"]))
            row.sqnr.append(float(r.report.extra["output_sqnr_db"]))
        calib_x = model.contract.prepare(cal.raw_x())
        for flow, (fn, _) in VENDORS.items():
            row = rows[flow]
            if row.absent:
                continue
            try:
                d, mae, q = _score(model, truth, ref_w, ref_m, fn(model, calib_x, eval_x))
            except Exception as exc:  # a vendor tool failing is a result to report, not a crash
                row.errors.append(f"draw {k}: {type(exc).__name__}: {str(exc)[:160]}")
                continue
            row.deltas.append(d)
            row.mae.append(mae)
            row.sqnr.append(q)
        print(f"draw {k} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    _print(rows, a, ref_m)
    if a.json:
        a.json.write_text(json.dumps({k: vars(v) for k, v in rows.items()}, indent=1))
    return 0


def _print(rows: dict[str, Row], a: argparse.Namespace, ref_m: Any) -> None:
    print(f"\nshipped T-P kettle model, FP32 EACC {100 * ref_m.eacc:.2f} %, {a.draws} draws of {a.draw_size} calibration windows")
    print(f"{'flow':<34} {'dEACC mean':>10} {'worst':>7} {'range':>15} {'dMAE mean':>9} {'SQNR mean':>9} {'worst':>6}")
    for r in rows.values():
        if r.absent:
            print(f"{r.flow:<34} absent: {r.absent}")
            continue
        if r.deltas:
            d = np.asarray(r.deltas)
            print(f"{r.flow:<34} {d.mean():>+10.3f} {d[np.argmax(np.abs(d))]:>+7.3f} {f'{d.min():+.2f}..{d.max():+.2f}':>15} "
                  f"{np.mean(r.mae):>+9.2f} {np.mean(r.sqnr):>9.1f} {np.min(r.sqnr):>6.1f}")
        for e in r.errors:
            print(f"{'':<34} {e}")


if __name__ == "__main__":
    sys.exit(main())

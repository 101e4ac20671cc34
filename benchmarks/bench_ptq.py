"""PTQ accuracy side by side: FP32, nilmc's ideal INT8 (plain min-max and with the techniques) and the
vendor-default flow (the TFLite converter's PTQ), over several calibration draws.

Run: ``python benchmarks/bench_ptq.py [--model M.onnx --keras M.keras] [--data DIR] [--draws 5] [--json out.json]``.

Model: ``--model``/``--keras`` when given; else the shipped T-P model when it exists; else a T-P
kettle model trained here (``nilmc.training``, default settings) on ``build_splits`` with
the shipped seed, cached in ``--work``. Data: the evaluation split (the shipped eval set's
recipe) and a calibration pool of ``draws * draw_size`` windows of the calibration split; draw
``k`` is windows ``[k*size, (k+1)*size)`` (draw 0 is the shipped calibration set's recipe).
``--data DIR`` takes saved splits instead (``calib.npz`` as the pool, ``val.npz``, ``eval.npz``), e.g.
the very splits a model was trained with. The validation split scores the mixed-precision row,
so nothing is tuned on the evaluation set.

Flows (every INT8 one on the same eval windows; deltas are losses, FP32 minus INT8, in EACC points):

* ``nilmc minmax``     :func:`derive_params` min-max, nothing else, as the onnxruntime QDQ graph;
* ``nilmc auto``       :func:`api.quantize` defaults: per-tensor estimators by output error,
                       cross-validated headroom, output range = 0 W .. peak, bias correction if it pays;
* ``nilmc auto+MP``    the same plus the mixed-precision fallback with budget ``--budget`` EACC points,
                       scored on the validation split (float fallback for generic INT8);
* ``minmax+MP``        min-max ranges (output fitted to the peak) with only the mixed-precision fallback,
                       same budget and validation scoring: what the fallback alone buys;
* ``tflite vendor``    ``TFLiteConverter.from_keras_model`` + ``optimizations=[DEFAULT]`` +
                       ``representative_dataset`` (the draw, one window per step), nothing else
                       (float I/O, the converter's own calibration), run with ai_edge_litert.

Calibration time: nilmc = statistics + techniques (``QuantizationResult.calibration_s``); min-max =
statistics + parameters; TFLite = the whole ``convert()`` (calibration included). Machine load
from other processes shows in the times; accuracy numbers are deterministic per draw.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nilmc.calibration_data.dataset import NilmDataset
from nilmc.compiler.metrics import Metrics, compare_metrics, nilm_metrics, sqnr_db
from nilmc.compiler.model import Model

SEED = 3  # the shipped sets' seed (calibration_data.shipped.SHIPPED_SEED)
APPLIANCE = "kettle"


# --------------------------------------------------------------------------- model and data
def _shipped() -> dict[str, Path] | None:
    try:
        from nilmc.calibration_data.shipped import shipped_paths  # type: ignore[attr-defined]

        p = shipped_paths()
        return p if Path(p["model"]).is_file() and Path(p.get("keras", "")).is_file() else None
    except Exception:  # not shipped yet
        return None


def _train(work: Path, splits: dict[str, NilmDataset]) -> tuple[Path, Path]:
    onnx_path, keras_path = work / "tp_kettle_C.onnx", work / "tp_kettle_C.keras"
    if not (onnx_path.is_file() and keras_path.is_file()):
        from nilmc.training import TrainConfig, save_trained, train_seq2point

        print(f"training a T-P {APPLIANCE} model (normalization C) into {work} ...", flush=True)
        keras_model, contract = train_seq2point(splits["train"], splits["val"], appliance=APPLIANCE, normalization="C", config=TrainConfig())
        save_trained(keras_model, contract, work / "tp_kettle_C")
    return onnx_path, keras_path


def load_everything(args: argparse.Namespace) -> tuple[Model, Path, dict[str, NilmDataset], str]:
    from nilmc.calibration_data.windows import build_splits
    from nilmc.compiler.frontend import load_model

    t0 = time.perf_counter()
    if args.data:  # saved splits (e.g. the ones a model was trained with): calib.npz is the pool
        splits = {k: NilmDataset.load(args.data / f"{k}.npz") for k in ("calib", "val", "eval")}
        print(f"data: {args.data} ({len(splits['calib'].x)} calibration windows in the pool)", flush=True)
    else:
        splits = build_splits("T-P", seed=SEED, n_calib=args.draws * args.draw_size)
        print(f"data: build_splits(seed={SEED}) in {time.perf_counter() - t0:.1f} s", flush=True)
    if len(splits["calib"].x) < args.draws * args.draw_size:
        raise SystemExit(f"the calibration pool has {len(splits['calib'].x)} windows, fewer than {args.draws} x {args.draw_size}")
    if args.model:
        onnx_path, keras_path, origin = Path(args.model), Path(args.keras or Path(args.model).with_suffix(".keras")), "given"
    elif (shipped := _shipped()) is not None:
        onnx_path, keras_path, origin = Path(shipped["model"]), Path(shipped["keras"]), "shipped"
        if not args.data:
            splits["eval"] = NilmDataset.load(shipped["eval"])
    else:
        args.work.mkdir(parents=True, exist_ok=True)
        onnx_path, keras_path = _train(args.work, splits)
        origin = f"trained here on build_splits(seed={SEED})"
    return load_model(onnx_path), keras_path, splits, f"{onnx_path} ({origin})"


# --------------------------------------------------------------------------- runners
def _ort_predict(graph: Any, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    from nilmc.quantization.qdq import portable_weights

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # int8 weights as uint8 + 128 (the same values): no int16 saturation from a non-VNNI host's fused kernels
    sess = ort.InferenceSession(portable_weights(graph)[0].SerializeToString(), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + 1000]})[0] for i in range(0, len(x), 1000)]).reshape(len(x), -1)[:, 0]


def _tflite_convert(keras_model: Any, rep: np.ndarray) -> bytes:
    """The vendor-default flow: full-integer PTQ by the converter, default settings."""
    from nilmc.compiler.tfcompat import import_tf

    tf = import_tf("the TFLite vendor-default PTQ")
    conv = tf.lite.TFLiteConverter.from_keras_model(keras_model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = lambda: ([rep[i:i + 1]] for i in range(len(rep)))
    import warnings

    from nilmc.compiler.tfcompat import stderr_silenced  # the converter's MLIR/calibration notes on fd 2

    with warnings.catch_warnings(), stderr_silenced():
        warnings.simplefilter("ignore")
        return bytes(conv.convert())


def _tflite_predict(flatbuffer: bytes, x: np.ndarray) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=flatbuffer, num_threads=1)
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    batch = 500
    it.resize_tensor_input(inp["index"], [batch, *x.shape[1:]])
    it.allocate_tensors()
    preds = []
    for i in range(0, len(x), batch):
        chunk = x[i:i + batch]
        if len(chunk) < batch:
            it.resize_tensor_input(inp["index"], [len(chunk), *x.shape[1:]])
            it.allocate_tensors()
        it.set_tensor(inp["index"], chunk.astype(np.float32))
        it.invoke()
        preds.append(it.get_tensor(out["index"]).reshape(len(chunk), -1)[:, 0].copy())
    return np.concatenate(preds)


# --------------------------------------------------------------------------- flows
@dataclass
class Row:
    flow: str
    draw: int
    eacc: float
    d_eacc: float
    d_mae: float
    sqnr: float
    calib_s: float
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Bench:
    model: Model
    keras_path: Path
    eval_x: np.ndarray  # as the graph takes them
    truth: np.ndarray
    ref_out: np.ndarray
    ref: Metrics
    val: NilmDataset
    rows: list[Row] = field(default_factory=list)
    _keras: Any = None

    def score(self, flow: str, draw: int, out: np.ndarray, calib_s: float, **extra: Any) -> Row:
        c = self.model.contract
        m = nilm_metrics(self.truth, c.to_watts(out), on_threshold_w=c.on_threshold_w)
        d = compare_metrics(self.ref, m)
        row = Row(flow, draw, m.eacc, d["eacc"], d["mae"], sqnr_db(self.ref_out, out), calib_s, extra)
        self.rows.append(row)
        print(f"  draw {draw} {flow:<15} EACC {100 * m.eacc:6.2f}  delta {d['eacc']:+6.3f} pts  MAE {d['mae']:+7.2f} W  "
              f"SQNR {row.sqnr:5.1f} dB  calib {calib_s:6.2f} s {extra if extra else ''}", flush=True)
        return row

    def keras(self) -> Any:
        if self._keras is None:
            from nilmc.compiler.tfcompat import import_tf

            self._keras = import_tf("loading the Keras model").keras.models.load_model(self.keras_path, compile=False)
        return self._keras


def flow_minmax(b: Bench, draw: int, cal: NilmDataset) -> None:
    from nilmc.quantization.params import derive_params
    from nilmc.quantization.qdq import build_qdq_model
    from nilmc.quantization.statistics import collect_statistics
    from nilmc.quantization.traits import GENERIC_INT8

    t0 = time.perf_counter()
    x = b.model.contract.prepare(cal.raw_x())
    params = derive_params(b.model.graph, collect_statistics(b.model.graph, x), GENERIC_INT8)
    secs = time.perf_counter() - t0
    b.score("nilmc minmax", draw, _ort_predict(build_qdq_model(b.model.graph, params), b.eval_x), secs)


def flow_auto(b: Bench, draw: int, cal: NilmDataset, budget: float | None) -> None:
    from nilmc.quantization.api import make_eval_fn, quantize

    res = quantize(b.model, cal)
    prov = res.params.provenance
    extra = {"headroom": prov.get("headroom", {}).get("headroom"), "bias_corr": bool(res.params.adjusted),
             "choices": _count(prov.get("selection", {}).get("choices", {}))}
    b.score("nilmc auto", draw, _ort_predict(res.qdq, b.eval_x), res.calibration_s, **extra)
    if budget is not None:
        t0 = time.perf_counter()
        mp = quantize(b.model, cal, budget={"eacc": budget}, eval_fn=make_eval_fn(b.model, b.val))
        mix = mp.params.provenance["mixed_precision"]
        b.score("nilmc auto+MP", draw, _ort_predict(mp.qdq, b.eval_x), time.perf_counter() - t0,
                kept=mix["kept"], val_delta=round(mix["initial_deltas"]["eacc"], 3))


def flow_minmax_mp(b: Bench, draw: int, cal: NilmDataset, budget: float) -> None:
    """Plain min-max ranges (output fitted to the peak) + only the mixed-precision fallback: what the budget alone buys."""
    from nilmc.quantization.api import Techniques, make_eval_fn, quantize

    t0 = time.perf_counter()
    tech = Techniques(select_estimators=False, headroom=False, bias_correction=False)
    res = quantize(b.model, cal, estimator="minmax", budget={"eacc": budget}, eval_fn=make_eval_fn(b.model, b.val), advanced=tech)
    mix = res.params.provenance["mixed_precision"]
    b.score("minmax+MP", draw, _ort_predict(res.qdq, b.eval_x), time.perf_counter() - t0, kept=mix["kept"],
            val_delta=round(mix["initial_deltas"]["eacc"], 3), val_final=round(mix["final_deltas"]["eacc"], 3))


def flow_qat(b: Bench, draw: int, cal: NilmDataset, epochs: int) -> None:
    """nilm quantize --qat: QAT from the PTQ ranges on the calibration windows, back into the ideal INT8 QDQ."""
    from dataclasses import replace

    from nilmc.quantization.qat_flow import qat_quantize

    t0 = time.perf_counter()
    res, info = qat_quantize(replace(b.model, keras_path=str(b.keras_path)), cal, epochs=epochs)
    b.score("nilmc QAT", draw, _ort_predict(res.qdq, b.eval_x), time.perf_counter() - t0, best_epoch=info["best_epoch"])


def _count(choices: dict[str, str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in choices.values():
        out[v] = out.get(v, 0) + 1
    return out


def flow_tflite(b: Bench, draw: int, cal: NilmDataset) -> None:
    keras_model = b.keras()
    rep = b.model.contract.prepare(cal.raw_x())
    t0 = time.perf_counter()
    flat = _tflite_convert(keras_model, rep)
    secs = time.perf_counter() - t0
    b.score("tflite vendor", draw, _tflite_predict(flat, b.eval_x), secs)


# --------------------------------------------------------------------------- summary
def summarize(b: Bench, flows: list[str]) -> list[dict[str, Any]]:
    table = []
    for flow in flows:
        rows = [r for r in b.rows if r.flow == flow]
        if not rows:
            continue
        d = np.array([r.d_eacc for r in rows])
        table.append({
            "flow": flow, "draws": len(rows), "eacc_mean": float(np.mean([r.eacc for r in rows])),
            "d_eacc_mean": float(d.mean()), "d_eacc_sd": float(d.std(ddof=1)) if len(d) > 1 else 0.0,
            "d_eacc_min": float(d.min()), "d_eacc_max": float(d.max()), "d_eacc_abs_max": float(np.abs(d).max()),
            "d_mae_mean": float(np.mean([r.d_mae for r in rows])), "sqnr_mean": float(np.mean([r.sqnr for r in rows])),
            "sqnr_min": float(np.min([r.sqnr for r in rows])), "calib_s_mean": float(np.mean([r.calib_s for r in rows])),
            "per_draw_d_eacc": [round(float(v), 3) for v in d],
        })
    return table


def print_table(b: Bench, table: list[dict[str, Any]], origin: str) -> None:
    print(f"\nmodel: {origin}\neval: {len(b.truth)} windows; FP32 EACC {100 * b.ref.eacc:.2f} %, MAE {b.ref.mae:.2f} W")
    head = (f"{'flow':<15} {'EACC %':>7} {'delta pts mean±sd':>18} {'min..max':>16} {'|d| max':>8} {'dMAE W':>8} "
            f"{'SQNR dB mean/min':>17} {'calib s':>8}")
    print(head + "\n" + "-" * len(head))
    print(f"{'fp32':<15} {100 * b.ref.eacc:7.2f} {'-':>18} {'-':>16} {'-':>8} {'-':>8} {'-':>17} {'-':>8}")
    for t in table:
        print(f"{t['flow']:<15} {100 * t['eacc_mean']:7.2f} {t['d_eacc_mean']:+9.3f} ± {t['d_eacc_sd']:6.3f} "
              f"{t['d_eacc_min']:+7.3f}..{t['d_eacc_max']:+6.3f} {t['d_eacc_abs_max']:8.3f} {t['d_mae_mean']:+8.2f} "
              f"{t['sqnr_mean']:8.1f}/{t['sqnr_min']:<8.1f} {t['calib_s_mean']:8.2f}")
    print("per-draw EACC deltas (pts): " + "; ".join(f"{t['flow']}: {t['per_draw_d_eacc']}" for t in table))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="ONNX model (default: shipped, else trained here)")
    ap.add_argument("--keras", help="its tf_keras file for the TFLite flow (default: beside --model)")
    ap.add_argument("--draws", type=int, default=5, help="calibration draws (default 5)")
    ap.add_argument("--draw-size", type=int, default=1000, help="windows per draw (default 1000, the shipped size)")
    ap.add_argument("--budget", type=float, default=0.5, help="EACC budget (pts) of the mixed-precision row; <0 skips it")
    ap.add_argument("--skip-tflite", action="store_true", help="leave out the TFLite vendor flow")
    ap.add_argument("--qat-epochs", type=int, default=3, help="epochs of the QAT row (default 3); 0 skips it")
    ap.add_argument("--data", type=Path, help="directory with calib.npz (the pool), val.npz, eval.npz (default: build_splits)")
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "nilmc-bench-ptq", help="cache for a trained model")
    ap.add_argument("--json", type=Path, help="write the rows and the summary here")
    args = ap.parse_args(argv)

    model, keras_path, splits, origin = load_everything(args)
    contract = model.contract
    ev = splits["eval"]
    eval_x = contract.prepare(ev.raw_x())
    ref_out = _ort_predict(model.graph, eval_x)
    truth = ev.y[:, ev.appliance_index(contract.appliance)]
    ref = nilm_metrics(truth, contract.to_watts(ref_out), on_threshold_w=contract.on_threshold_w)
    b = Bench(model, keras_path, eval_x, truth, ref_out, ref, splits["val"])
    print(f"model {origin}: FP32 EACC {100 * ref.eacc:.2f} % on {len(truth)} eval windows", flush=True)
    budget = None if args.budget < 0 else args.budget
    pool = splits["calib"]
    for k in range(args.draws):
        cal = pool.subset(slice(k * args.draw_size, (k + 1) * args.draw_size))
        flow_minmax(b, k, cal)
        flow_auto(b, k, cal, budget)
        if budget is not None:
            flow_minmax_mp(b, k, cal, budget)
        if args.qat_epochs > 0:
            flow_qat(b, k, cal, args.qat_epochs)
        if not args.skip_tflite:
            flow_tflite(b, k, cal)
    flows = ["nilmc minmax", "minmax+MP", "nilmc auto", "nilmc auto+MP", "nilmc QAT", "tflite vendor"]
    table = summarize(b, flows)
    print_table(b, table, origin)
    if args.json:
        args.json.write_text(json.dumps({"model": origin, "fp32": ref.to_json(), "summary": table,
                                         "rows": [r.__dict__ for r in b.rows]}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""TFLite INT8 on the T-P model: the converter's default PTQ vs nilmc PTQ vs nilmc QAT, side by side.

Run: ``python benchmarks/bench_tflite_ptq.py [--model M.keras --calib C.npz --eval E.npz] [--draws 3]
[--qat-epochs 3] [--json OUT]``.

Model and data: the shipped T-P model and sets when they exist (``shipped_paths()``), else
``--model/--calib/--eval``, else the T-P splits of ``build_splits`` (shipped seed, default
sizes) and a seq2point model trained on them with ``nilmc.training`` defaults, cached
in ``--work`` (default ``/tmp/nilmc-bench-tflite``).

Rows (every INT8 row runs on the TFLite runtime, ``ai_edge_litert``; FP32 is the ONNX reference
on onnxruntime, as in ``nilmc compile``):

* ``FP32``                    the reference.
* ``TFLite default PTQ``      ``TFLiteConverter`` with ``optimizations=[DEFAULT]`` and the calibration
                              windows as representative dataset, nothing else set (float I/O).
* ``nilmc PTQ (min-max)``     ``tflite:int8`` with plain min-max ranges (``estimator="minmax"``).
* ``nilmc PTQ``               ``tflite:int8`` as ``nilmc compile`` builds it (default accuracy techniques).
* ``nilmc QAT (calib, distill)`` ``tflite:qat_int8`` as ``nilmc compile`` builds it: fine-tuned from
                              nilmc's PTQ ranges on the calibration windows with the FP32 outputs as
                              targets, best held-out epoch kept (``--qat-epochs`` epochs).
* draw 0 only (the labelled-QAT row needs the model's training split: ``--train``, the cached one,
  or the shipped seed's, checked against the contract's training statistics): ``QAT calib labels, no guard`` (the calibration labels as targets, no held-out
  block: what a naive recipe does), ``nilmc QAT (train labels)`` (``qat_train`` = the training split,
  labels), and the same fine-tunings without fake quantization (``FP32 ft ... (ctrl)``), to separate
  what QAT recovers from quantization from what the extra training adds (or costs).

Columns: EACC %, delta vs FP32 in points (positive = loss), MAE W, output SQNR vs FP32 (dB, on watts).
Calibration draws: draw 0 is the whole calibration set; draws 1.. are random halves of it
(seeded). One delta on one evaluation set is noisy (REFERENCE.md): read the spread.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def _model_and_data(args: argparse.Namespace) -> tuple[Any, Any, Any, str]:
    from nilmc.calibration_data.dataset import NilmDataset
    from nilmc.compiler.frontend import load_model

    if args.model:
        return load_model(args.model), NilmDataset.load(args.calib), NilmDataset.load(args.eval), f"given: {args.model}"
    try:
        from nilmc.calibration_data.shipped import shipped_paths  # type: ignore[attr-defined]

        p = shipped_paths()
        if Path(p["keras"]).exists():
            return load_model(p["keras"]), NilmDataset.load(p["calib"]), NilmDataset.load(p["eval"]), f"shipped: {p['keras']}"
    except (ImportError, KeyError, OSError, Exception):  # shipped model not there yet: train one below
        pass
    return _trained_fallback(Path(args.work))


def _trained_fallback(work: Path) -> tuple[Any, Any, Any, str]:
    from nilmc.calibration_data.dataset import NilmDataset
    from nilmc.compiler.frontend import load_model

    try:
        from nilmc.calibration_data.shipped import SHIPPED_SEED
    except ImportError:
        SHIPPED_SEED = 0
    keras_path, seed_file = work / "tp_kettle.keras", work / "splits_seed.txt"
    if keras_path.exists() and seed_file.exists():
        SHIPPED_SEED = int(seed_file.read_text())  # the seed the cached model was trained with
    else:
        from nilmc.calibration_data.windows import build_splits
        from nilmc.training import TrainConfig, save_trained, train_seq2point

        work.mkdir(parents=True, exist_ok=True)
        print(f"no shipped model: building T-P splits (seed {SHIPPED_SEED}) and training a seq2point model into {work} ...", flush=True)
        sp = build_splits("T-P", seed=SHIPPED_SEED)
        for name in ("train", "calib", "eval"):
            sp[name].save(work / f"{name}.npz")
        m, c = train_seq2point(sp["train"], sp["val"], appliance="kettle", normalization="C", config=TrainConfig())
        save_trained(m, c, work / "tp_kettle")
        seed_file.write_text(str(SHIPPED_SEED))
    return (load_model(keras_path), NilmDataset.load(work / "calib.npz"), NilmDataset.load(work / "eval.npz"),
            f"trained here (build_splits seed {SHIPPED_SEED}, TrainConfig defaults): {keras_path}")


def _train_split(args: argparse.Namespace, model: Any) -> Any:
    """The model's training split for QAT on labels: --train, else rebuilt with build_splits (shipped seed), else None."""
    from nilmc.calibration_data.dataset import NilmDataset

    if args.train:
        return NilmDataset.load(args.train)
    if args.model:
        return None
    cached = Path(args.work) / "train.npz"
    if model.source.startswith(str(args.work)) and cached.exists():
        return NilmDataset.load(cached)
    from nilmc.calibration_data.shipped import SHIPPED_SEED as seed
    from nilmc.calibration_data.windows import build_splits

    train = build_splits(model.contract.setup or "T-P", seed=seed, splits=("train",))["train"]
    model.contract.check_input(train.x, source="the rebuilt training split")
    stats = model.contract.normalization.stats
    if stats is not None and not np.allclose(stats.mean, train.train_stats.mean, rtol=1e-5):
        print(f"the rebuilt training split (seed {seed}) is not the model's training data: QAT on labels skipped")
        return None
    return train


def _predict(runner_cm: Any, model: Any, raw_x: np.ndarray) -> np.ndarray:
    from nilmc.compiler.driver import predict_watts

    with runner_cm as r:
        return predict_watts(r, model.contract, raw_x)


def _row(name: str, truth: np.ndarray, pred_w: np.ndarray, ref: dict[str, Any], model: Any, note: str = "") -> dict[str, Any]:
    from nilmc.compiler.metrics import nilm_metrics, sqnr_db

    m = nilm_metrics(truth, pred_w, on_threshold_w=model.contract.on_threshold_w)
    row = {"row": name, "eacc": m.eacc * 100, "mae_w": m.mae, "note": note}
    if ref:
        row["delta_eacc_pts"] = ref["eacc"] - row["eacc"]
        row["delta_mae_w"] = row["mae_w"] - ref["mae_w"]
        row["sqnr_db"] = sqnr_db(ref["pred"], pred_w)
    return row


def _fine_tuned_control(model: Any, keras_model: Any, x: np.ndarray, y: np.ndarray, epochs: int, lr: float, seed: int) -> Any:
    """The QAT recipe without fake quantization (same data, epochs, optimizer, batch, seed)."""
    from nilmc.compiler.tfcompat import import_tf

    tf = import_tf("fine-tuning")
    tf.keras.utils.set_random_seed(seed)
    m = tf.keras.models.clone_model(keras_model)
    m.set_weights(keras_model.get_weights())
    m.compile(optimizer=tf.keras.optimizers.Adam(lr), loss="mse")
    m.fit(x, y, batch_size=64, epochs=epochs, shuffle=True, verbose=0)
    return m


def run_draw(model: Any, keras_model: Any, calib: Any, ev: Any, train: Any, args: argparse.Namespace, draw: int) -> list[dict[str, Any]]:
    from nilmc.backends.onnxruntime_backend import OnnxRuntimeBackend
    from nilmc.backends.tflite_backend import TFLiteBackend, TFLiteRunner
    from nilmc.backends.tflite_int8 import convert_keras
    from nilmc.compiler.driver import eval_truth
    from nilmc.quantization.context import QuantContext

    if draw > 0:
        idx = np.sort(np.random.default_rng(draw).choice(calib.n_windows, calib.n_windows // 2, replace=False))
        calib = calib.subset(idx)
    truth, raw = eval_truth(model, ev), ev.raw_x()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ort = OnnxRuntimeBackend()
        ref_pred = _predict(ort.runner(ort.lower(model, tmp / "ref", precision="fp32")), model, raw)
        rows.append(_row("FP32", truth, ref_pred, {}, model, "onnxruntime reference"))
        ref = {"eacc": rows[0]["eacc"], "mae_w": rows[0]["mae_w"], "pred": ref_pred}

        x_cal = model.contract.prepare(calib.raw_x())
        t0 = time.perf_counter()
        (tmp / "vendor.tflite").write_bytes(convert_keras(keras_model, "vendor_ptq", representative=x_cal))
        rows.append(_row("TFLite default PTQ", truth, _predict(TFLiteRunner(tmp / "vendor.tflite"), model, raw), ref, model,
                         f"converter, {len(x_cal)} representative windows, {time.perf_counter() - t0:.0f} s"))

        backend, ctx = TFLiteBackend(), QuantContext(model, calib)
        base = {"quant": ctx, "calibration": calib, "tflm": False}
        variants = [("nilmc PTQ (min-max)", "int8", {"estimator": "minmax"}), ("nilmc PTQ", "int8", {}),
                    ("nilmc QAT (calib, distill)", "qat_int8", {"qat_epochs": args.qat_epochs})]
        if draw == 0:
            variants.append(("QAT calib labels, no guard", "qat_int8", {"qat_epochs": args.qat_epochs, "qat_targets": "labels", "qat_holdout": 0.0}))
            if train is not None:
                variants.append(("nilmc QAT (train labels)", "qat_int8", {"qat_epochs": args.qat_epochs, "qat_train": train}))
        for name, precision, extra in variants:
            out = tmp / f"v{len(rows)}"
            out.mkdir()
            t0 = time.perf_counter()
            art = backend.lower(model, out, precision=precision, options={**base, **extra})
            pred = _predict(backend.runner(art), model, raw)
            q = art.info.get("qat")
            note = f"{time.perf_counter() - t0:.0f} s"
            if q:
                mse = ", ".join(f"{v:.3g}" for v in q["held_out_mse_per_epoch"]) or "none"
                note += f", {q['targets']}, held-out MSE/epoch [{mse}], kept epoch {q['kept_epoch']}"
            rows.append(_row(name, truth, pred, ref, model, note))
        if draw == 0:
            c = model.contract
            sets = [("FP32 ft calib labels (ctrl)", calib)] + ([("FP32 ft train labels (ctrl)", train)] if train is not None else [])
            for name, ds in sets:
                x = c.prepare(ds.raw_x())
                y = c.target.from_watts(ds.y[:, ds.appliance_index(c.appliance)])[:, None]
                control = _fine_tuned_control(model, keras_model, x, y, args.qat_epochs, 1e-4, 0)
                pred = c.to_watts(control.predict(c.prepare(raw), batch_size=512, verbose=0))
                rows.append(_row(name, truth, pred, ref, model, "same fine-tuning without fake quantization, float TF"))
    for r in rows:
        r["draw"], r["calib_windows"] = draw, calib.n_windows
    return rows


def _table(rows: list[dict[str, Any]]) -> str:
    head = f"{'row':<27} {'EACC %':>7} {'dEACC pts':>9} {'MAE W':>8} {'dMAE W':>8} {'SQNR dB':>8}  note"
    lines = [head, "-" * len(head)]
    for r in rows:
        f = lambda k, fmt, r=r: format(r[k], fmt) if k in r else "-"  # noqa: E731
        lines.append(f"{r['row']:<27} {f('eacc', '7.2f')} {f('delta_eacc_pts', '9.2f')} {f('mae_w', '8.1f')} "
                     f"{f('delta_mae_w', '8.1f')} {f('sqnr_db', '8.1f')}  {r.get('note', '')}")
    return "\n".join(lines)


def _spread(rows: list[dict[str, Any]]) -> str:
    names = [r["row"] for r in rows if r["draw"] == 0 and "delta_eacc_pts" in r]
    lines = [f"{'row':<27} {'dEACC mean':>10} {'min':>7} {'max':>7} {'SQNR mean':>9}  (over {len({r['draw'] for r in rows})} calibration draws)"]
    for n in names:
        d = np.array([r["delta_eacc_pts"] for r in rows if r["row"] == n])
        s = np.array([r["sqnr_db"] for r in rows if r["row"] == n])
        lines.append(f"{n:<27} {d.mean():10.2f} {d.min():7.2f} {d.max():7.2f} {s.mean():9.1f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="tf_keras model (.keras/.h5) with its contract sidecar (default: shipped, else trained)")
    ap.add_argument("--calib", help="calibration set (.npz), with --model")
    ap.add_argument("--eval", help="evaluation set (.npz), with --model")
    ap.add_argument("--train", help="training split (.npz) for QAT on labels (default: rebuilt with build_splits, shipped seed)")
    ap.add_argument("--work", default="/tmp/nilmc-bench-tflite", help="cache for the fallback model and sets")
    ap.add_argument("--draws", type=int, default=3, help="calibration draws (0: whole set; then random halves); default 3")
    ap.add_argument("--qat-epochs", type=int, default=3, help="QAT (and control) fine-tuning epochs; default 3")
    ap.add_argument("--json", help="also write every row to this JSON file")
    args = ap.parse_args()

    from nilmc.backends.tflite_backend import load_keras

    model, calib, ev, origin = _model_and_data(args)
    keras_model = load_keras(model)
    train = _train_split(args, model)
    print(f"model: {origin}\ncalibration: {calib.n_windows} windows, evaluation: {ev.n_windows} windows, appliance {model.contract.appliance}")
    rows: list[dict[str, Any]] = []
    for draw in range(max(1, args.draws)):
        t0 = time.perf_counter()
        rows += run_draw(model, keras_model, calib, ev, train, args, draw)
        print(f"\ndraw {draw} ({rows[-1]['calib_windows']} calibration windows, {time.perf_counter() - t0:.0f} s)")
        print(_table([r for r in rows if r["draw"] == draw]), flush=True)
    print("\n" + _spread(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"model": origin, "rows": rows}, indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()

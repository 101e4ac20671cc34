"""nilmc's INT8 targets beside the vendors' own quantizers: same models, same calibration windows, same
evaluation set, same metric code, over several calibration draws.

    python benchmarks/bench_vendors.py [--models zscore,raw,A] [--draws 5] [--draw-size 1000]
                                       [--flows nilmc,ort,ort-pc,nncf,tflite,modelopt,quark] [--targets ...]
                                       [--out DIR] [--bench-python PY] [--json out.json]

Models (``--models``; see ``vendor_models.py``):

* ``zscore`` — the shipped T-P kettle model (normalization C), from its ``.keras`` file;
* ``raw``    — the same network with its z-score in front as float ``Mul``/``Add`` and ``y * std + mean`` behind
  (raw features in, watts out). The targets and flows that lower from Keras (tflite, eiq, the TFLite converter)
  take the same network behind a Keras ``Normalization`` layer;
* ``A``      — ``nilmc train --normalization A`` (raw-scale inputs, the shipped model's recipe otherwise),
  trained once into ``<out>/cache``.

Data: the shipped evaluation set (5000 windows, raw features); a calibration pool of ``draws * draw_size``
windows of the calibration split (``build_splits`` with the shipped seed); draw ``k`` is windows
``[k*size, (k+1)*size)``. Each model gets the windows in the scale its input takes (z-scored for ``zscore``,
raw for ``raw`` and ``A``).

Flows (``--flows``; each scored on the same eval windows, in watts, against the FP32 model on onnxruntime):

* ``nilmc``    ``compile_model`` for each nilmc INT8 target (``--targets``), its report's deltas and SQNR;
* ``ort``      onnxruntime ``quantize_static`` (QDQ), defaults (per-tensor, MinMax); ``ort-pc`` the same, per-channel;
* ``nncf``     ``nncf.quantize`` on the ONNX model, defaults;
* ``tflite``   ``TFLiteConverter.from_keras_model`` + ``Optimize.DEFAULT`` + representative dataset;
* ``modelopt`` NVIDIA ModelOpt ONNX PTQ (``calibration_method="max"``, CPU EP) and ``quark`` AMD Quark for ONNX
  (``XINT8_QCONFIG``: power-of-two, MinMSE): they run in the ``bench`` virtual environment (``--bench-python``,
  default ``.venv-bench/bin/python`` when it exists) through ``vendor_worker.py``, since their onnx pins
  conflict with nilmc's; the quantized ONNX they write runs here like every other flow. Absent ones are
  reported as absent with the reason.

Printed per model and flow: ΔEACC (points, positive = worse) mean and worst (largest |Δ|) over the draws and
their range, ΔMAE (W) mean and worst, output SQNR vs FP32 (dB) mean and worst, seconds per draw. A flow that
cannot take a model is printed with its one-line reason; one that fails on a draw, with its error.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import subprocess
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
from nilmc.compiler.contract import ModelContract  # noqa: E402
from nilmc.compiler.metrics import Metrics, compare_metrics, nilm_metrics, sqnr_db  # noqa: E402
from nilmc.compiler.model import Model  # noqa: E402

SEED = 3
REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "vendor_worker.py"
DEFAULT_TARGETS = "onnxruntime:int8,openvino:int8,tensorrt:int8,tflite:int8,eiq:int8,dpu:b2304"
MODELS = ("zscore", "raw", "A")
FLOW_KEYS = ("nilmc", "ort", "ort-pc", "nncf", "tflite", "modelopt", "quark")


# --------------------------------------------------------------------------- the models
@dataclass
class Case:
    """One model as every flow sees it."""

    key: str
    title: str
    compiles: list[tuple[Model, list[Any]]]  # (model, its targets) per compile_model call
    onnx_bytes: bytes  # the float ONNX the ONNX vendor flows quantize (normalization inside for ``raw``)
    onnx_contract: ModelContract  # raw features -> that graph's input; its output -> watts
    keras: Path | None  # the Keras file of the TFLite converter flow (normalization layers inside, as saved)
    keras_contract: ModelContract | None
    ref_w: np.ndarray = field(default_factory=lambda: np.zeros(0))  # FP32 (onnx_bytes on onnxruntime), watts
    ref_m: Metrics | None = None
    notes: list[str] = field(default_factory=list)


def build_case(key: str, zmodel: Model, targets: list[Any], reg: Any, out: Path, say: Callable[[str], None]) -> Case:
    """``key``'s :class:`Case`; variants are written to ``out/work``, the A model is trained into ``out/cache``."""
    from vendor_models import a_model, raw_contract, raw_keras, raw_onnx

    from nilmc.compiler.frontend import load_model

    if key == "zscore":
        return Case(key, "shipped T-P kettle model (z-score, C)", [(zmodel, targets)], zmodel.serialize(), zmodel.contract,
                    Path(str(zmodel.keras_path)), zmodel.contract)
    if key == "raw":
        work = out / "work"
        work.mkdir(parents=True, exist_ok=True)
        onnx_path, keras_path = raw_onnx(zmodel, work / "tp_kettle_raw.onnx"), raw_keras(zmodel, work / "tp_kettle_raw.keras")
        keras_side = [t for t in targets if reg.get(t.backend).capabilities.needs_keras(t.precision)]
        onnx_side = [t for t in targets if t not in keras_side]
        compiles = [(load_model(onnx_path), onnx_side)] if onnx_side else []
        if keras_side:
            compiles.append((load_model(keras_path), keras_side))
        case = Case(key, "raw-input variant (z-score as float Mul/Add in front, y*std+mean behind)", compiles,
                    onnx_path.read_bytes(), raw_contract(zmodel.contract, denorm=True), keras_path,
                    raw_contract(zmodel.contract, denorm=False))
        case.notes.append("the TFLite converter takes the Keras form (a Keras Normalization layer in front, de-normalization "
                          "in the contract)" + (f", as do {', '.join(map(str, keras_side))}" if keras_side else ""))
        return case
    if key == "A":
        am = load_model(a_model(out / "cache", say=say))
        return Case(key, f"A model (raw features, {Path(am.keras_path or am.source).name})", [(am, targets)], am.serialize(),
                    am.contract, Path(str(am.keras_path)), am.contract)
    raise SystemExit(f"unknown model {key!r}; use {', '.join(MODELS)}")


def _ort_run(proto_bytes: bytes, x: np.ndarray) -> np.ndarray:
    """Every flow's QDQ graph with its int8 weights stored as uint8 + 128 (the same values): on an x86 CPU without VNNI
    onnxruntime's fused u8 x s8 kernels saturate at int16 (qdq.portable_weights), which would score the host's kernels,
    not the quantizers; the onnxruntime:int8 artifact is written so."""
    import onnx
    import onnxruntime as ort

    from nilmc.quantization.qdq import portable_weights

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    proto = portable_weights(onnx.load_from_string(proto_bytes))[0]
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
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


def _input_name(proto_bytes: bytes) -> str:
    import onnx

    m = onnx.load_from_string(proto_bytes)
    inits = {i.name for i in m.graph.initializer}
    return next(i.name for i in m.graph.input if i.name not in inits)


def vendor_ort(case: Case, calib_x: np.ndarray, eval_x: np.ndarray, *, per_channel: bool) -> np.ndarray:
    from onnxruntime.quantization import QuantFormat, quantize_static

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "m.onnx", Path(tmp) / "q.onnx"
        src.write_bytes(case.onnx_bytes)
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # its "consider pre-processing" advice on every call; the defaults are the flow
        try:
            quantize_static(str(src), str(dst), _reader(_input_name(case.onnx_bytes), calib_x), quant_format=QuantFormat.QDQ,
                            per_channel=per_channel)
        finally:
            root.setLevel(level)
        return _ort_run(dst.read_bytes(), eval_x)


def vendor_nncf(case: Case, calib_x: np.ndarray, eval_x: np.ndarray) -> np.ndarray:
    import nncf
    import onnx

    nncf.set_log_level(logging.ERROR)
    name = _input_name(case.onnx_bytes)
    ds = nncf.Dataset([calib_x[i:i + 1] for i in range(len(calib_x))], lambda x: {name: x})
    q = nncf.quantize(onnx.load_from_string(case.onnx_bytes), ds, subset_size=len(calib_x))
    return _ort_run(q.SerializeToString(), eval_x)


def vendor_tflite(case: Case, calib_x: np.ndarray, eval_x: np.ndarray) -> np.ndarray:
    from bench_ptq import _tflite_convert, _tflite_predict

    from nilmc.compiler.frontend import detect_kind
    from nilmc.compiler.tfcompat import read_keras

    assert case.keras is not None  # checked by the flow's applicability
    # read_keras, not load_keras: the vendor flow gets the model as saved, normalization layers included
    fb = _tflite_convert(read_keras(case.keras, detect_kind(case.keras)), calib_x)
    return np.asarray(_tflite_predict(fb, eval_x)).reshape(len(eval_x), -1)


class BenchVenv:
    """ModelOpt and Quark in the ``bench`` interpreter, through ``vendor_worker.py``."""

    def __init__(self, python: Path | None, logs: Path) -> None:
        self.python, self.logs = python, logs
        self.status: dict[str, Any] = {}
        if python is None:
            self.status = {f: {"absent": "no bench interpreter (create .venv-bench, see vendor_worker.py, or pass --bench-python)"}
                           for f in ("modelopt", "quark")}
            return
        try:
            res = subprocess.run([str(python), str(WORKER), "probe"], capture_output=True, text=True, timeout=600)
            self.status = json.loads(res.stdout.strip().splitlines()[-1])
        except Exception as exc:  # a broken bench interpreter makes both flows absent, with the reason
            self.status = {f: {"absent": f"{python} probe failed: {type(exc).__name__}: {exc}"[:200]} for f in ("modelopt", "quark")}

    def absent(self, flow: str) -> str:
        return str(self.status.get(flow, {}).get("absent", ""))

    def version(self, flow: str) -> str:
        return str(self.status.get(flow, {}).get("ok", ""))

    def quantize(self, flow: str, case: Case, calib_x: np.ndarray, eval_x: np.ndarray) -> np.ndarray:
        with tempfile.TemporaryDirectory() as tmp:
            src, cal, dst = Path(tmp) / "m.onnx", Path(tmp) / "calib.npy", Path(tmp) / "q.onnx"
            src.write_bytes(case.onnx_bytes)
            np.save(cal, calib_x.astype(np.float32))
            log = self.logs / f"{flow}-{case.key}.log"
            with log.open("a") as fh:  # the tools' own chatter, kept for reading, off the console
                res = subprocess.run([str(self.python), str(WORKER), flow, str(src), str(cal), str(dst)], stdout=fh,
                                     stderr=subprocess.PIPE, text=True, cwd=tmp)
                fh.write(res.stderr)
            if res.returncode != 0 or not dst.is_file():
                last = [ln for ln in res.stderr.splitlines() if ln.startswith("ERROR: ")]
                raise RuntimeError(last[-1][7:] if last else f"exit {res.returncode} (see {log})")
            return _ort_run(dst.read_bytes(), eval_x)


@dataclass(frozen=True)
class Flow:
    key: str
    label: str
    source: str  # "onnx" or "keras": which form of the model it takes
    run: Callable[[Case, np.ndarray, np.ndarray], np.ndarray]


def vendor_flows(bench: BenchVenv) -> list[Flow]:
    return [
        Flow("ort", "ort quantize_static", "onnx", lambda c, x, e: vendor_ort(c, x, e, per_channel=False)),
        Flow("ort-pc", "ort quantize_static per-channel", "onnx", lambda c, x, e: vendor_ort(c, x, e, per_channel=True)),
        Flow("nncf", "nncf default", "onnx", vendor_nncf),
        Flow("tflite", "tflite converter default", "keras", vendor_tflite),
        Flow("modelopt", "modelopt onnx ptq max", "onnx", lambda c, x, e: bench.quantize("modelopt", c, x, e)),
        Flow("quark", "quark onnx xint8", "onnx", lambda c, x, e: bench.quantize("quark", c, x, e)),
    ]


def flow_absent(flow: Flow, bench: BenchVenv) -> str:
    """Why a vendor flow cannot run here at all ("" when it can)."""
    if flow.key in ("modelopt", "quark"):
        return bench.absent(flow.key)
    need = {"nncf": ("nncf",), "tflite": ("tensorflow", "ai_edge_litert")}.get(flow.key, ("onnxruntime",))
    missing = [m for m in need if importlib.util.find_spec(m) is None]
    return f"{', '.join(missing)} not installed (pip install 'nilmc[all]')" if missing else ""


# --------------------------------------------------------------------------- results
@dataclass
class Row:
    flow: str
    deltas: list[float] = field(default_factory=list)
    mae: list[float] = field(default_factory=list)
    sqnr: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    absent: str = ""

    def add(self, d: float, mae: float, q: float, secs: float) -> None:
        self.deltas.append(float(d))
        self.mae.append(float(mae))
        self.sqnr.append(float(q))
        self.seconds.append(round(float(secs), 2))


def _one_line(exc: BaseException | str) -> str:
    text = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
    return " ".join(str(text).split())[:300]


def score(case: Case, contract: ModelContract, truth: np.ndarray, out: np.ndarray) -> tuple[float, float, float]:
    pred = contract.to_watts(out)
    m = nilm_metrics(truth, pred, on_threshold_w=contract.on_threshold_w)
    d = compare_metrics(case.ref_m, m)
    return float(d["eacc"]), float(d["mae"]), float(sqnr_db(case.ref_w, pred))


def run_nilmc(case: Case, rows: dict[str, Row], eval_ds: NilmDataset, cal: NilmDataset, reg: Any, k: int) -> None:
    from nilmc.compiler.driver import compile_model

    for model, targets in case.compiles:
        try:
            with tempfile.TemporaryDirectory() as tmp:
                s = compile_model(model, eval_ds, targets, Path(tmp) / "o", calib=cal, budget={"eacc": 100.0}, registry=reg)
        except Exception as exc:  # a compile refused as a whole is every one of its targets' result
            for t in targets:
                rows[f"nilmc {t}"].errors.append(f"draw {k}: {_one_line(exc)}")
            continue
        for r in s.results:
            row = rows[f"nilmc {r.target}"]
            if r.report is None:
                row.errors.append(f"draw {k}: {_one_line(r.error or 'no report')}")
                continue
            row.add(r.report.deltas["eacc"], r.report.deltas["mae"], r.report.extra["output_sqnr_db"], r.compile_s + r.verify_s)


def run_case(case: Case, a: argparse.Namespace, flows: list[Flow], bench: BenchVenv, eval_ds: NilmDataset, pool: NilmDataset,
             reg: Any, t0: float) -> dict[str, Row]:
    truth = eval_ds.y[:, eval_ds.appliance_index(case.onnx_contract.appliance)]
    case.ref_w = case.onnx_contract.to_watts(_ort_run(case.onnx_bytes, case.onnx_contract.prepare(eval_ds.raw_x())))
    case.ref_m = nilm_metrics(truth, case.ref_w, on_threshold_w=case.onnx_contract.on_threshold_w)
    rows: dict[str, Row] = {}
    if "nilmc" in a.flow_keys:
        for _, targets in case.compiles:
            rows.update({f"nilmc {t}": Row(f"nilmc {t}") for t in targets})
    for f in flows:
        rows[f.label] = Row(f.label, absent=flow_absent(f, bench))
        if not rows[f.label].absent and f.source == "keras" and case.keras is None:
            rows[f.label].absent = "needs the Keras source, which this model does not have"
    eval_in = {"onnx": case.onnx_contract.prepare(eval_ds.raw_x())}
    if case.keras_contract is not None:
        eval_in["keras"] = case.keras_contract.prepare(eval_ds.raw_x())
    for k in range(a.draws):
        cal = pool.subset(slice(k * a.draw_size, (k + 1) * a.draw_size))
        if "nilmc" in a.flow_keys:
            run_nilmc(case, rows, eval_ds, cal, reg, k)
        for f in flows:
            row = rows[f.label]
            if row.absent:
                continue
            contract = case.onnx_contract if f.source == "onnx" else case.keras_contract
            assert contract is not None
            t1 = time.perf_counter()
            try:
                out = f.run(case, contract.prepare(cal.raw_x()), eval_in[f.source])
                d, mae, q = score(case, contract, truth, out)
            except Exception as exc:  # a vendor tool failing is a result to report, not a crash
                row.errors.append(f"draw {k}: {_one_line(exc)}")
                continue
            row.add(d, mae, q, time.perf_counter() - t1)
        print(f"  {case.key}: draw {k} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    return rows


# --------------------------------------------------------------------------- printing
def _reason(errors: list[str]) -> str:
    """The one-line reason when every draw failed the same way, else ""."""
    msgs = {e.split(": ", 1)[1] if e.startswith("draw ") else e for e in errors}
    return next(iter(msgs)) if len(msgs) == 1 else ""


HEAD = (f"{'flow':<34} {'dEACC mean':>10} {'worst':>7} {'range':>15} {'dMAE mean':>9} {'worst':>7} "
        f"{'SQNR mean':>9} {'worst':>6} {'s/draw':>6}")


def print_case(case: Case, rows: dict[str, Row], a: argparse.Namespace) -> None:
    assert case.ref_m is not None
    print(f"\n== {case.key}: {case.title}\n   FP32 EACC {100 * case.ref_m.eacc:.2f} %, MAE {case.ref_m.mae:.2f} W "
          f"(onnxruntime, the ONNX the vendor flows take); {a.draws} draws of {a.draw_size} calibration windows")
    for n in case.notes:
        print(f"   note: {n}")
    print(HEAD)
    for r in rows.values():
        if r.absent:
            print(f"{r.flow:<34} absent: {r.absent}")
            continue
        if not r.deltas:
            reason = _reason(r.errors)
            if reason:
                print(f"{r.flow:<34} cannot take this model: {reason}")
                continue
        if r.deltas:
            d, mae = np.asarray(r.deltas), np.asarray(r.mae)
            print(f"{r.flow:<34} {d.mean():>+10.3f} {d[np.argmax(np.abs(d))]:>+7.3f} {f'{d.min():+.2f}..{d.max():+.2f}':>15} "
                  f"{mae.mean():>+9.2f} {mae[np.argmax(np.abs(mae))]:>+7.2f} {np.mean(r.sqnr):>9.1f} {np.min(r.sqnr):>6.1f} "
                  f"{np.mean(r.seconds):>6.1f}" + (f"  ({len(d)} of {a.draws} draws)" if len(d) < a.draws else ""))
        for e in r.errors:
            print(f"{'':<34} {e}")


# --------------------------------------------------------------------------- the run
def _bench_python(arg: str | None) -> Path | None:
    if arg:  # absolute, not resolved: the workers run elsewhere, and resolving a venv's python leaves the venv
        return Path(arg).absolute()
    p = REPO / ".venv-bench" / "bin" / "python"
    return p if p.exists() else None


def _csv(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in allowed]
    if bad or not items:
        raise SystemExit(f"--{what}: unknown {', '.join(bad) or '(empty)'}; use a comma list of {', '.join(allowed)}")
    return items


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)} (default: all)")
    ap.add_argument("--flows", default=",".join(FLOW_KEYS), help=f"comma list of {', '.join(FLOW_KEYS)} (default: all)")
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--draw-size", type=int, default=1000)
    ap.add_argument("--targets", default=DEFAULT_TARGETS, help=f"nilmc INT8 targets (default {DEFAULT_TARGETS})")
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "nilmc-bench-vendors",
                    help="work folder: the A model's cache (out/cache), the raw variants, the vendor tools' logs")
    ap.add_argument("--bench-python", default=None, help="interpreter with nvidia-modelopt[onnx] and amd-quark "
                    "(default: .venv-bench/bin/python in the repository when it exists)")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    models = _csv(a.models, MODELS, "models")
    a.flow_keys = _csv(a.flows, FLOW_KEYS, "flows")

    from nilmc.backends.registry import default_registry
    from nilmc.calibration_data.shipped import shipped_paths
    from nilmc.calibration_data.windows import build_splits
    from nilmc.compiler.frontend import load_model

    t0 = time.perf_counter()
    (a.out / "logs").mkdir(parents=True, exist_ok=True)
    bench = BenchVenv(_bench_python(a.bench_python), a.out / "logs")
    flows = [f for f in vendor_flows(bench) if f.key in a.flow_keys]
    p = shipped_paths()
    zmodel = load_model(p["keras"])
    eval_ds = NilmDataset.load(p["eval"])
    pool = build_splits("T-P", seed=SEED, n_calib=a.draws * a.draw_size, splits=("calib",))["calib"]
    reg = default_registry()
    targets = list(reg.parse_targets(a.targets))
    print(f"bench_vendors: models {', '.join(models)}; flows {', '.join(a.flow_keys)}; {a.draws} x {a.draw_size} windows; "
          f"modelopt {bench.version('modelopt') or 'absent'}, quark {bench.version('quark') or 'absent'} "
          f"({bench.python or 'no bench interpreter'})", flush=True)
    results: dict[str, Any] = {"bench_venv": bench.status, "models": {}}
    done: list[tuple[Case, dict[str, Row]]] = []
    for key in models:
        case = build_case(key, zmodel, targets, reg, a.out, say=lambda s: print(s, flush=True))
        rows = run_case(case, a, flows, bench, eval_ds, pool, reg, t0)
        done.append((case, rows))
        print_case(case, rows, a)  # as soon as a model is done: a long run shows its results as it goes
        results["models"][key] = {"title": case.title, "fp32_eacc": case.ref_m.eacc if case.ref_m else None,
                                  "notes": case.notes, "rows": {k: vars(v) for k, v in rows.items()}}
        if a.json:
            a.json.write_text(json.dumps(results, indent=1))
    print(f"\n==== all models ({time.perf_counter() - t0:.0f} s)")
    for case, rows in done:
        print_case(case, rows, a)
    return 0


if __name__ == "__main__":
    sys.exit(main())

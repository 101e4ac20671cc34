"""``nilmc sweep GRID.toml``: seed 003's experiment grid as one command, cached, resumable, local or on Ray.

The grid is data (a TOML file, read with the standard library's ``tomllib``)::

    [grid]
    setups = ["T-P", "T-I"]            # feature setups (Table 6 rows); "paper" = all 20 of seed 003
    normalizations = ["A", "C"]        # Table 6 columns, A-E
    appliances = ["kettle", "fridge"]
    seeds = [3]
    epochs = [2]                       # training epochs (a reduced count for a quick grid)
    budgets = ["eacc=0.5"]             # the gate's budget, as --max-delta takes it
    targets = ["onnxruntime:int8", "tflite:fp16", "tflite:int8"]   # Table 7 rows, as --targets takes them

    [data]                             # windows per split of the synthetic household generator
    train = 4000
    val = 800
    calib = 500
    eval = 1000

    [train]                            # optional: architecture, batch_size, learning_rate, patience
    [compile]                          # optional: overflow, min_sqnr, calib_windows, options = {"dpu.qat_epochs" = "1"}
    [sweep]                            # optional: keep_bundles = true keeps every cell's bundles under cells/

Instead of training, ``[[models]]`` entries (``path``, ``calib``, ``eval``) take given models through the same
compile; then ``setups``/``normalizations``/``appliances``/``seeds``/``epochs`` must be left out.

A cell is one (setup, normalization, appliance, seed, epochs, budget): it trains (or loads) the model, compiles it
for every target through :func:`nilmc.compiler.driver.compile_model` and returns its rows. Cells are keyed by a
content hash of the data (generator version, setup, seed, sizes; or the given files' sha256), the model (training
options; or the given model's sha256), the compile options and targets, and nilmc's version: a cell already in the
results is not run again, so a rerun with nothing changed only reads the database, an interrupted sweep resumes,
and a failed cell is recorded with its error while the others go on (``--retry-failed`` runs failed cells again).
Trained models are cached by their own hash (a new target or budget recompiles without retraining).

Where cells run: local worker processes (``multiprocessing``, spawned; ``--workers N``, default from the cores and
the memory available), or Ray tasks on an existing cluster (``--ray ADDRESS``, the ``[sweep]`` extra): the same
:func:`run_cell`, so the same grid gives the same rows. nilmc schedules nothing itself. Only the parent process
writes the results (one SQLite writer).

training/ is apart from the compiler (tests/test_layout.py): this module may use the compiler's public API, but
not import a backend, so the targets arrive parsed (the CLI parses them with the backend registry).
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import time
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import nilmc
from nilmc.compiler.errors import BadInputError, NilmcError, OutputError

__all__ = ["Grid", "GivenModel", "Cell", "SweepSummary", "load_grid", "grid_cells", "cell_key", "run_cell", "run_sweep",
           "default_workers", "PAPER_SETUPS", "RESULTS_FILE", "CELL_MEMORY_BYTES"]

RESULTS_FILE = "results.sqlite"
REPORT_FILE = "report.html"
# Peak resident memory of one worker running a cell (TensorFlow + onnxruntime + data), measured with /usr/bin/time -v
# (default sizes, 2 epochs, the ten Table 7 targets, QAT included): 1.55 GB for T-P (672 k parameters), 5.9 GB for
# TFHF-VIP (the largest setup). Sized for the largest, rounded up: a grid of small setups could run more workers.
CELL_MEMORY_BYTES = 6 * 1024**3


def _paper_setups() -> tuple[str, ...]:
    from nilmc.calibration_data.features import ALL_SETUPS

    return tuple(ALL_SETUPS)


PAPER_SETUPS = _paper_setups()  # seed 003's Table 6 order: 1 T-V ... 20 TFHF-VIP
_GRID_KEYS = {"setups", "normalizations", "appliances", "seeds", "epochs", "budgets", "targets"}
_TOP_KEYS = {"grid", "data", "train", "compile", "sweep", "models"}


@dataclass(frozen=True)
class GivenModel:
    """A model to compile instead of training one: its file and its calibration and evaluation sets."""

    path: str
    calib: str
    eval: str


@dataclass(frozen=True)
class Grid:
    """A parsed grid file (defaults: one seed 0, 2 epochs, budget ``eacc=0.5``, small data sizes, no given models)."""

    targets: tuple[str, ...]
    setups: tuple[str, ...] = ("T-P",)
    normalizations: tuple[str, ...] = ("C",)
    appliances: tuple[str, ...] = ("kettle",)
    seeds: tuple[int, ...] = (0,)
    epochs: tuple[int, ...] = (2,)
    budgets: tuple[str, ...] = ("eacc=0.5",)
    sizes: Mapping[str, int] = field(default_factory=lambda: {"train": 4000, "val": 800, "calib": 500, "eval": 1000})
    train: Mapping[str, Any] = field(default_factory=dict)  # architecture, batch_size, learning_rate, patience
    compile: Mapping[str, Any] = field(default_factory=dict)  # overflow, min_sqnr, calib_windows, options
    models: tuple[GivenModel, ...] = ()
    keep_bundles: bool = False
    source: str = ""

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["sizes"], d["train"], d["compile"] = dict(self.sizes), dict(self.train), dict(self.compile)
        return d


@dataclass(frozen=True)
class Cell:
    """One cell of the grid; ``model`` is set for a given model (then setup etc. come from its contract)."""

    setup: str
    normalization: str
    appliance: str
    seed: int
    epochs: int
    budget: str
    model: GivenModel | None = None

    @property
    def label(self) -> str:
        if self.model is not None:
            return f"{Path(self.model.path).name}/{self.budget}"
        return f"{self.setup}/{self.normalization}/{self.appliance}/seed{self.seed}/e{self.epochs}/{self.budget}"


# ------------------------------------------------------------------ the grid file
def _bad(msg: str, remedy: str, path: str) -> BadInputError:
    return BadInputError(f"grid {path!r}: {msg}", remedy)


def _list(doc: Mapping[str, Any], key: str, kind: type, path: str, default: tuple[Any, ...]) -> tuple[Any, ...]:
    if key not in doc:
        return default
    v = doc[key]
    v = [v] if isinstance(v, kind) and not isinstance(v, bool) else v
    if not isinstance(v, list) or not v or not all(isinstance(x, kind) and not isinstance(x, bool) for x in v):
        raise _bad(f"[grid] {key} = {doc[key]!r} is not a non-empty list of {kind.__name__}", f"write e.g. {key} = {list(default) or ['...']!r}", path)
    if len(set(v)) != len(v):
        raise _bad(f"[grid] {key} names a value twice: {v!r}", "give each value once", path)
    return tuple(v)


def load_grid(path: str | Path) -> Grid:
    """Read and check a grid file (every problem is a :class:`BadInputError` naming the key and a fix)."""
    p = Path(path)
    text = str(path)
    if not p.is_file():
        raise BadInputError(f"grid file {text!r} does not exist", "pass a TOML grid file (see `nilmc sweep --help`)")
    try:
        doc = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise _bad(f"not valid TOML ({exc})", "fix the file's syntax (https://toml.io)", text) from None
    unknown = set(doc) - _TOP_KEYS
    if unknown:
        raise _bad(f"unknown section(s) {sorted(unknown)}", f"sections: {', '.join(sorted(_TOP_KEYS))}", text)
    g = doc.get("grid", {})
    if not isinstance(g, dict):
        raise _bad("[grid] is not a table", "write a [grid] section", text)
    unknown = set(g) - _GRID_KEYS
    if unknown:
        raise _bad(f"unknown [grid] key(s) {sorted(unknown)}", f"keys: {', '.join(sorted(_GRID_KEYS))}", text)
    targets = _list(g, "targets", str, text, ())
    if not targets:
        raise _bad("[grid] has no targets", 'add e.g. targets = ["onnxruntime:int8", "tflite:int8"]', text)
    models = tuple(_given_models(doc.get("models"), p, text))
    training_keys = {"setups", "normalizations", "appliances", "seeds", "epochs"} & set(g)
    if models and training_keys:
        raise _bad(f"[[models]] are given, so the grid trains nothing, but [grid] sets {sorted(training_keys)}",
                   "leave those keys out, or drop [[models]] to train", text)
    setups = _list(g, "setups", str, text, ("T-P",))
    if setups == ("paper",):
        setups = PAPER_SETUPS
    from nilmc.calibration_data.features import parse_setup
    from nilmc.calibration_data.normalization import Normalization

    for s in setups:
        try:
            parse_setup(s)
        except NilmcError as exc:
            raise _bad(f"setup {s!r}: {exc.message}", 'use e.g. setups = ["T-P", "TF-VIP"] or setups = ["paper"] (all 20)', text) from None
    norms = _list(g, "normalizations", str, text, ("C",))
    for n in norms:
        try:
            Normalization.parse(n)
        except (NilmcError, ValueError):
            raise _bad(f"normalization {n!r} is not one of A-E", 'use e.g. normalizations = ["A", "B", "C", "D", "E"]', text) from None
    seeds = _list(g, "seeds", int, text, (0,))
    epochs = _list(g, "epochs", int, text, (2,))
    if any(e < 1 for e in epochs):
        raise _bad(f"epochs {list(epochs)} must be >= 1", "write e.g. epochs = [2]", text)
    budgets = _list(g, "budgets", str, text, ("eacc=0.5",))
    from nilmc.compiler.compare import parse_budget

    for b in budgets:
        try:
            parse_budget(b)
        except NilmcError as exc:
            raise _bad(f"budget {b!r}: {exc.message}", exc.remedy or "write e.g. budgets = [\"eacc=0.5\"]", text) from None
    sizes = {"train": 4000, "val": 800, "calib": 500, "eval": 1000}
    data = doc.get("data", {})
    for k, v in data.items():
        if k not in sizes or not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise _bad(f"[data] {k} = {v!r}", f"[data] takes window counts >= 1 for {', '.join(sizes)}", text)
        sizes[k] = v
    train = dict(doc.get("train", {}))
    bad = set(train) - {"architecture", "batch_size", "learning_rate", "patience"}
    if bad:
        raise _bad(f"unknown [train] key(s) {sorted(bad)}", "keys: architecture, batch_size, learning_rate, patience", text)
    comp = _compile_section(doc.get("compile", {}), text)
    sweep = dict(doc.get("sweep", {}))
    if set(sweep) - {"keep_bundles"} or not isinstance(sweep.get("keep_bundles", False), bool):
        raise _bad(f"[sweep] {sweep!r}", "[sweep] takes keep_bundles = true|false", text)
    if models:
        return Grid(targets=targets, budgets=budgets, sizes=sizes, train=train, compile=comp, models=models,
                    keep_bundles=sweep.get("keep_bundles", False), source=str(p.resolve()))
    return Grid(targets=targets, setups=setups, normalizations=tuple(Normalization.parse(n).value for n in norms),
                appliances=_list(g, "appliances", str, text, ("kettle",)), seeds=seeds, epochs=epochs, budgets=budgets, sizes=sizes,
                train=train, compile=comp, keep_bundles=sweep.get("keep_bundles", False), source=str(p.resolve()))


def _compile_section(c: Any, text: str) -> dict[str, Any]:
    """[compile] as CompileOptions takes it: overflow, min_sqnr (dB or "off"), calib_windows, options {"backend.name": value}."""
    if not isinstance(c, dict):
        raise _bad("[compile] is not a table", "write a [compile] section", text)
    bad = set(c) - {"overflow", "min_sqnr", "calib_windows", "options"}
    if bad:
        raise _bad(f"unknown [compile] key(s) {sorted(bad)}", "keys: overflow, min_sqnr, calib_windows, options", text)
    out: dict[str, Any] = {}
    if "overflow" in c:
        if c["overflow"] not in ("warn", "error", "fix"):
            raise _bad(f"[compile] overflow = {c['overflow']!r}", "use warn, error or fix (as nilmc compile --overflow)", text)
        out["overflow"] = c["overflow"]
    if "min_sqnr" in c:
        v = c["min_sqnr"]
        if v == "off":
            out["min_sqnr"] = None
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v):
            out["min_sqnr"] = float(v)
        else:
            raise _bad(f"[compile] min_sqnr = {v!r}", 'use a number of dB or "off" (as nilmc compile --min-sqnr)', text)
    if "calib_windows" in c:
        v = c["calib_windows"]
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise _bad(f"[compile] calib_windows = {v!r}", "use a window count >= 1 (as nilmc compile --calib-windows)", text)
        out["calib_windows"] = v
    if "options" in c:
        opts: dict[str, dict[str, str]] = {}
        if not isinstance(c["options"], dict):
            raise _bad("[compile] options is not a table", 'write options = {"dpu.qat_epochs" = "1"} (as nilmc compile --option)', text)
        for k, v in c["options"].items():
            backend, dot, name = str(k).partition(".")
            if not dot or not backend or not name:
                raise _bad(f"[compile] options key {k!r} is not BACKEND.NAME", 'write e.g. "dpu.qat_epochs" = "1"', text)
            opts.setdefault(backend, {})[name] = str(v)
        out["options"] = opts
    return out


def _given_models(entries: Any, grid_path: Path, text: str) -> Iterator[GivenModel]:
    if entries is None:
        return
    if not isinstance(entries, list):
        raise _bad("models is not an array of tables", "write [[models]] sections with path, calib and eval", text)
    for e in entries:
        if not isinstance(e, dict) or set(e) != {"path", "calib", "eval"} or not all(isinstance(v, str) for v in e.values()):
            raise _bad(f"[[models]] entry {e!r}", "each [[models]] needs exactly path, calib and eval (file paths)", text)
        # relative paths are relative to the grid file, so a grid runs from any directory
        paths = {k: str((grid_path.parent / v).resolve()) for k, v in e.items()}
        for k, v in paths.items():
            if not Path(v).exists():
                raise _bad(f"[[models]] {k} {e[k]!r} does not exist", "fix the path (relative paths are relative to the grid file)", text)
        yield GivenModel(**paths)


def grid_cells(grid: Grid) -> list[Cell]:
    """Every cell of the grid, in a fixed order (setups outermost, as Table 6 reads)."""
    if grid.models:
        return [Cell("", "", "", 0, 0, b, m) for m in grid.models for b in grid.budgets]
    return [Cell(s, n, a, seed, e, b) for s in grid.setups for n in grid.normalizations for a in grid.appliances
            for seed in grid.seeds for e in grid.epochs for b in grid.budgets]


# ------------------------------------------------------------------ content hashes
def _sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    p = Path(path)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    for f in files:
        h.update(f.relative_to(p).as_posix().encode() if p.is_dir() else b"")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _train_config(grid: Grid, cell: Cell) -> dict[str, Any]:
    t = grid.train
    return {"architecture": t.get("architecture", "seq2point"), "batch_size": int(t.get("batch_size", 256)),
            "learning_rate": float(t.get("learning_rate", 1e-3)), "patience": int(t.get("patience", 6)), "epochs": cell.epochs,
            "seed": cell.seed}


def _data_identity(grid: Grid, cell: Cell) -> dict[str, Any]:
    if cell.model is not None:
        return {"calib_sha256": _sha256_file(cell.model.calib), "eval_sha256": _sha256_file(cell.model.eval)}
    from nilmc.calibration_data.synth import GENERATOR_VERSION

    # The generator is deterministic and versioned: these name the data as well as their bytes would.
    return {"generator": GENERATOR_VERSION, "setup": cell.setup, "seed": cell.seed, "sizes": dict(sorted(grid.sizes.items()))}


def train_key(grid: Grid, cell: Cell) -> str:
    """The trained model's content hash: data, appliance, normalization, training options, nilmc version."""
    return _digest({"nilmc": nilmc.__version__, "data": _data_identity(grid, cell), "appliance": cell.appliance,
                    "normalization": cell.normalization, "train": _train_config(grid, cell)})[:24]


def cell_key(grid: Grid, cell: Cell, targets: Sequence[Any]) -> str:
    """The cell's content hash: data, model, compile options, targets, budget and nilmc version."""
    model = {"sha256": _sha256_file(cell.model.path)} if cell.model is not None else {"trained": train_key(grid, cell)}
    return _digest({"nilmc": nilmc.__version__, "data": _data_identity(grid, cell), "model": model, "budget": cell.budget,
                    "targets": [str(t) for t in targets], "compile": dict(sorted(grid.compile.items()))})[:24]


# ------------------------------------------------------------------ one cell (runs in a worker)
_DATA_MEMO: dict[str, Any] = {}  # per worker process: the splits of the last setup/seed (cells of one setup share them)


def _splits(grid: Grid, cell: Cell) -> dict[str, Any]:
    from nilmc.calibration_data.windows import build_splits

    key = _digest(_data_identity(grid, cell))
    if key not in _DATA_MEMO:
        _DATA_MEMO.clear()
        s = grid.sizes
        _DATA_MEMO[key] = build_splits(cell.setup, seed=cell.seed, n_train=s["train"], n_val=s["val"], n_calib=s["calib"], n_eval=s["eval"])
    return dict(_DATA_MEMO[key])


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (two workers needing the same model train it once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _trained_model(grid: Grid, cell: Cell, train_ds: Any, val_ds: Any, cache: Path) -> tuple[Any, int, float]:
    """The cell's model (trained, or loaded from the cache), its parameter count and the training seconds (0 when cached)."""
    from nilmc.compiler.frontend import load_model

    stem = cache / "models" / train_key(grid, cell)
    keras_path = stem.with_suffix(".keras")
    params_path = stem.with_suffix(".json")
    t0 = time.perf_counter()
    trained = False
    with _locked(stem.with_suffix(".lock")):
        if not (keras_path.is_file() and params_path.is_file()):
            trained = True
            from nilmc.compiler.io import atomic_write_json
            from nilmc.compiler.tfcompat import import_tf
            from nilmc.training.seq2point import TrainConfig, save_trained, train_seq2point

            import_tf("training").keras.backend.clear_session()  # a worker trains many models: free the last one's graph
            cfg = _train_config(grid, cell)
            model, contract = train_seq2point(train_ds, val_ds, appliance=cell.appliance, normalization=cell.normalization,
                                              config=TrainConfig(**cfg))
            save_trained(model, contract, stem)
            atomic_write_json(params_path, {"parameters": int(model.count_params()), "train": cfg})
    train_s = time.perf_counter() - t0 if trained else 0.0
    parameters = int(json.loads(params_path.read_text())["parameters"])
    return load_model(keras_path), parameters, train_s


def _details(bundle: Path) -> dict[str, Any]:
    """What the report shows of one target, from its manifest: per-layer ranges and saturation, findings, trace."""
    from nilmc.compiler.bundle import MANIFEST

    m = json.loads((bundle / MANIFEST).read_text())
    return layer_details(m)


def layer_details(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The report's view of a manifest (shared by ``nilmc report`` on a compile output and the sweep's database)."""
    from nilmc.compiler.html_report import manifest_view

    return manifest_view(manifest)


def _set_threads(threads: int) -> None:
    # Thread pools are sized when TensorFlow/BLAS start, from these variables: a worker takes its share of the cores
    # (set before the first import in the process; a later cell in the same process keeps the first setting).
    for var in ("TF_NUM_INTRAOP_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(threads))
    os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def run_cell(task: Mapping[str, Any]) -> dict[str, Any]:
    """Run one cell: data, model (trained or cached or given), compile every target, extract the rows. Never raises:
    an error is returned as the cell's ``status = "failed"`` with its message (the other cells go on).

    ``task``: ``grid`` (:class:`Grid`), ``cell`` (:class:`Cell`), ``targets`` (parsed targets), ``key``, ``cache`` (the
    sweep directory, absolute), ``threads``.
    """
    t_start = time.perf_counter()
    grid: Grid = task["grid"]
    cell: Cell = task["cell"]
    _set_threads(int(task.get("threads", 1)))
    out: dict[str, Any] = {"key": task["key"], "label": cell.label, "setup": cell.setup or None, "normalization": cell.normalization or None,
                           "appliance": cell.appliance or None, "seed": cell.seed if cell.model is None else None,
                           "epochs": cell.epochs if cell.model is None else None, "budget": cell.budget,
                           "model": "trained" if cell.model is None else cell.model.path, "nilmc_version": nilmc.__version__,
                           "timings": {}}
    try:
        out.update(_run_cell(grid, cell, task["targets"], Path(task["cache"]), task["key"], out["timings"]))
        out["status"] = "done"
    except NilmcError as exc:
        out.update(status="failed", error=exc.one_line(), error_type=type(exc).__name__, exit_code=exc.exit_code)
    except Exception as exc:  # a bug or a library failure: recorded, the sweep goes on
        out.update(status="failed", error=f"internal error ({type(exc).__name__}: {exc})", error_type="InternalError", exit_code=3)
    out["timings"]["total_s"] = round(time.perf_counter() - t_start, 3)
    return out


def _run_cell(grid: Grid, cell: Cell, targets: Sequence[Any], cache: Path, key: str, timings: dict[str, float]) -> dict[str, Any]:
    import shutil
    import tempfile

    from nilmc.calibration_data.dataset import NilmDataset
    from nilmc.compiler.compare import parse_budget
    from nilmc.compiler.driver import CompileOptions, compile_model, eval_truth
    from nilmc.compiler.frontend import load_model

    t0 = time.perf_counter()
    if cell.model is None:
        splits = _splits(grid, cell)
        train_ds, val_ds, calib_ds, eval_ds = splits["train"], splits["val"], splits["calib"], splits["eval"]
        timings["data_s"] = round(time.perf_counter() - t0, 3)
        model, parameters, train_s = _trained_model(grid, cell, train_ds, val_ds, cache)
        timings["train_s"] = round(train_s, 3)
    else:
        calib_ds, eval_ds = NilmDataset.load(cell.model.calib), NilmDataset.load(cell.model.eval)
        timings["data_s"] = round(time.perf_counter() - t0, 3)
        model = load_model(cell.model.path)
        parameters = int(sum(int(np.prod(t.dims)) for t in model.graph.graph.initializer))
        timings["train_s"] = 0.0
    c = grid.compile
    # 20 batch-1 runs for the latency column (not in Tables 6/7): the accuracy runs are what a sweep is for
    options = CompileOptions(overflow=c.get("overflow", "warn"), min_sqnr_db=c.get("min_sqnr", 10.0), calib_windows=c.get("calib_windows"),
                             backend_options=c.get("options", {}), latency_windows=20, jobs=1)
    keep = cache / "cells" / key
    tmp = None
    if grid.keep_bundles:
        shutil.rmtree(keep, ignore_errors=True)  # a rerun of a failed cell: the earlier attempt's output goes
        build = keep
    else:
        tmp = tempfile.mkdtemp(prefix="nilmc-sweep-")
        build = Path(tmp) / "build"
    t1 = time.perf_counter()
    try:
        summary = compile_model(model, eval_ds, targets, build, calib=calib_ds, budget=parse_budget(cell.budget), options=options)
        timings["compile_s"] = round(time.perf_counter() - t1, 3)
        truth = eval_truth(model, eval_ds).astype(np.float64)
        rows = []
        details: dict[str, Any] = {}
        for r in summary.results:
            row = r.row()
            n = r.report.candidate.n if r.report is not None else None
            rows.append({
                "target": row["target"], "backend": r.target.backend, "precision": r.target.precision, "status": row["status"],
                "passed": row["passed"], "verification": row["verification"], "eacc": row["eacc"], "delta_eacc_pts": row["delta_eacc_pts"],
                "mae_w": row["mae_w"], "delta_mae_w": row["delta_mae_w"], "output_sqnr_db": row["output_sqnr_db"],
                "sum_abs_err_w": None if n is None or row["mae_w"] is None else float(row["mae_w"]) * n,
                "size_bytes": row["size_bytes"], "error": row["error"],
                "cause": None if r.report is None else (r.report.cause or None),
            })
            if r.bundle is not None:
                details[row["target"]] = _details(build / r.bundle.name)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    contract = model.contract
    ref = summary.reference
    return {
        "setup": cell.setup or contract.setup or "?", "normalization": cell.normalization or contract.normalization.kind.value,
        "appliance": cell.appliance or contract.appliance, "parameters": parameters, "eval_windows": int(ref.n),
        "sum_truth_w": float(np.sum(truth)), "fp32": ref.to_json(), "targets": rows, "details": details,
    }


# ------------------------------------------------------------------ the sweep
def default_workers() -> int:
    """Worker processes by default: every core, but no more than the memory available holds (one cell ~CELL_MEMORY_BYTES)."""
    cores = os.cpu_count() or 1
    return max(1, min(cores, _available_memory() // CELL_MEMORY_BYTES))


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return CELL_MEMORY_BYTES  # unknown: one worker's worth


@dataclass
class SweepSummary:
    """What one ``run_sweep`` did: cells in the grid, taken from the results (cached), run, failed; wall seconds."""

    out_dir: Path
    cells: int
    cached: int = 0
    ran: int = 0
    failed: int = 0
    wall_s: float = 0.0
    engine: str = "local"
    workers: int = 1
    keys: list[str] = field(default_factory=list)
    cell_seconds: list[float] = field(default_factory=list)

    @property
    def results(self) -> Path:
        return self.out_dir / RESULTS_FILE

    def to_json(self) -> dict[str, Any]:
        return {"results": str(self.results), "cells": self.cells, "cached": self.cached, "ran": self.ran, "failed": self.failed,
                "wall_s": round(self.wall_s, 3), "engine": self.engine, "workers": self.workers,
                "mean_cell_s": round(sum(self.cell_seconds) / len(self.cell_seconds), 3) if self.cell_seconds else None}


def _check_out(out_dir: Path, grid: Grid) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"--out {str(out_dir)!r} exists and is not a directory", "pass a directory path, e.g. --out sweep/")
    inputs = [Path(grid.source)] + [Path(p) for m in grid.models for p in (m.path, m.calib, m.eval)]
    o = out_dir.resolve()
    for i in inputs:
        i = i.resolve()
        if i == o or o in i.parents:
            raise OutputError(f"--out {str(out_dir)!r} holds the input {str(i)!r}", "pass an --out directory outside the inputs")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / RESULTS_FILE).is_file():
        raise OutputError(f"--out {str(out_dir)!r} is not empty and holds no {RESULTS_FILE}",
                          "pass a new directory, or the --out of an earlier sweep to resume it")


def run_sweep(grid: Grid, targets: Sequence[Any], out_dir: str | Path, *, workers: int | None = None, threads: int | None = None,
              ray_address: str | None = None, retry_failed: bool = False,
              on_cell: Callable[[Mapping[str, Any]], None] | None = None) -> SweepSummary:
    """Run every cell of ``grid`` not yet in ``out_dir/results.sqlite``; record each as it finishes.

    ``targets``: parsed targets (``Registry.parse_targets``), one per ``grid.targets``. Defaults: ``workers`` from
    :func:`default_workers` (1 runs the cells in this process), ``threads`` per cell = cores // workers, local worker
    processes unless ``ray_address`` (``"local"`` starts a Ray instance for this sweep), failed cells not retried.
    ``on_cell`` is called with each finished cell (progress).
    """
    from nilmc.compiler.sweep_results import ResultsDB

    out = Path(out_dir).absolute()
    _check_out(out, grid)
    out.mkdir(parents=True, exist_ok=True)
    cells = grid_cells(grid)
    workers = workers or default_workers()
    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    summary = SweepSummary(out, len(cells), engine="ray" if ray_address else "local", workers=workers)
    t0 = time.perf_counter()
    with _sweep_lock(out), ResultsDB(out / RESULTS_FILE) as db:
        db.set_meta("grid", grid.to_json())
        tasks = []
        for cell in cells:
            key = cell_key(grid, cell, targets)
            summary.keys.append(key)
            status = db.status(key)
            if status == "done" or (status == "failed" and not retry_failed):
                summary.cached += 1
                continue
            tasks.append({"grid": grid, "cell": cell, "targets": list(targets), "key": key, "cache": str(out), "threads": threads})
        for result in (_run_ray(tasks, ray_address, threads) if ray_address else _run_local(tasks, workers)):
            db.record(result)
            summary.ran += 1
            summary.cell_seconds.append(float(result.get("timings", {}).get("total_s") or 0.0))
            if on_cell is not None:
                on_cell(result)
        summary.failed = sum(1 for c in db.cells(summary.keys) if c["status"] != "done")
    summary.wall_s = time.perf_counter() - t0
    return summary


@contextlib.contextmanager
def _sweep_lock(out: Path) -> Iterator[None]:
    """One sweep per directory at a time (the results have one writer)."""
    path = out / ".nilmc-sweep.lock"
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            raise OutputError(f"another nilmc sweep (pid {fh.read().strip() or '?'}) is writing {str(out)!r}",
                              "wait for it to finish, or pass another --out") from None
        fh.truncate(0)
        fh.write(str(os.getpid()))
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _run_local(tasks: list[dict[str, Any]], workers: int) -> Iterator[dict[str, Any]]:
    if not tasks:
        return
    if workers <= 1 or len(tasks) == 1:
        for t in tasks:
            yield run_cell(t)
        return
    import multiprocessing

    # spawn, not fork: TensorFlow and onnxruntime threads do not survive a fork
    pool = multiprocessing.get_context("spawn").Pool(min(workers, len(tasks)))
    try:
        yield from pool.imap_unordered(run_cell, tasks, chunksize=1)
        pool.close()
    finally:
        pool.terminate()  # interrupted: running cells stop; the finished ones are in the results already
        pool.join()


def _run_ray(tasks: list[dict[str, Any]], address: str | None, threads: int) -> Iterator[dict[str, Any]]:
    if not tasks:
        return
    try:
        import ray
    except ImportError:
        raise BadInputError("--ray needs Ray, which is not installed", "install the [sweep] extra: pip install 'nilmc[sweep]'") from None
    started = False
    if not ray.is_initialized():
        kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
        if address == "local":
            ray.init(**kw)
        else:
            try:
                ray.init(address=address, **kw)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise BadInputError(f"--ray {address}: cannot connect to a Ray cluster ({exc})",
                                    "start one with `ray start --head` and pass its address, or --ray local") from None
        started = True
    remote = ray.remote(num_cpus=threads, max_retries=0)(run_cell)
    pending = [remote.remote(t) for t in tasks]
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                yield ray.get(ref)
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
        if started:
            ray.shutdown()

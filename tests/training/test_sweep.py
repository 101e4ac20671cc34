"""nilmc sweep (training/sweep.py): the grid file, content-hash caching, resume, failed cells, local vs Ray."""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from nilmc.backends.registry import default_registry
from nilmc.compiler.cli import cli
from nilmc.compiler.errors import BadInputError, OutputError
from nilmc.compiler.sweep_results import TIMING_COLUMNS, ResultsDB
from nilmc.training import sweep as sw

ROOT = Path(__file__).resolve().parents[2]


def _grid(tmp_path: Path, text: str, name: str = "grid.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def _models_grid(files, bad_eval: Path | None = None, targets: str = '"onnxruntime:fp32", "onnxruntime:int8"') -> str:
    text = f'[grid]\ntargets = [{targets}]\n\n[[models]]\npath = "{files["model"]}"\ncalib = "{files["calib"]}"\neval = "{files["eval"]}"\n'
    if bad_eval is not None:
        text += f'\n[[models]]\npath = "{files["model"]}"\ncalib = "{files["calib"]}"\neval = "{bad_eval}"\n'
    return text


def _targets(grid: sw.Grid):
    return default_registry().parse_targets(",".join(grid.targets))


# ------------------------------------------------------------------ the grid file
def test_grid_file_parsed_with_defaults(tmp_path):
    g = sw.load_grid(_grid(tmp_path, '[grid]\nsetups = ["T-P", "TF-VIP"]\nnormalizations = ["c", "A"]\nappliances = ["kettle", "fridge"]\n'
                                      'seeds = [1, 2]\nepochs = 1\ntargets = ["onnxruntime:int8"]\n[data]\ntrain = 3000\n'))
    assert g.setups == ("T-P", "TF-VIP") and g.normalizations == ("C", "A") and g.epochs == (1,)
    assert g.sizes["train"] == 3000 and g.sizes["eval"] == 1000
    cells = sw.grid_cells(g)
    assert len(cells) == 2 * 2 * 2 * 2
    assert cells[0].label == "T-P/C/kettle/seed1/e1/eacc=0.5"
    assert sw.load_grid(_grid(tmp_path, '[grid]\nsetups = ["paper"]\ntargets = ["onnxruntime:int8"]\n', "p.toml")).setups == sw.PAPER_SETUPS
    assert len(sw.PAPER_SETUPS) == 20 and sw.PAPER_SETUPS[2] == "T-P"


@pytest.mark.parametrize("text, words", [
    ("[grid]\nsetups = [\"T-Q\"]\ntargets = [\"onnxruntime:int8\"]\n", "setup 'T-Q'"),
    ("[grid]\nnormalizations = [\"Z\"]\ntargets = [\"onnxruntime:int8\"]\n", "normalization 'Z'"),
    ("[grid]\nsetups = [\"T-P\"]\n", "no targets"),
    ("[grid]\ntargets = [\"onnxruntime:int8\"]\nbudgets = [\"speed=3\"]\n", "budget 'speed=3'"),
    ("[grid]\ntargets = [\"onnxruntime:int8\"]\nepochs = [0]\n", "epochs"),
    ("[grid]\ntargets = [\"onnxruntime:int8\"]\n[data]\ntrain = -1\n", "[data] train"),
    ("[grid]\ntargets = [\"onnxruntime:int8\"]\n[compile]\noverflow = \"maybe\"\n", "overflow"),
    ("[grid]\ntargets = [\"onnxruntime:int8\"]\ncolour = 1\n", "unknown [grid] key"),
    ("[grid\n", "not valid TOML"),
])
def test_bad_grid_is_a_typed_error_with_a_remedy(tmp_path, text, words):
    with pytest.raises(BadInputError) as e:
        sw.load_grid(_grid(tmp_path, text))
    assert words in e.value.message and e.value.remedy


def test_cell_key_changes_with_what_the_cell_depends_on(tmp_path, monkeypatch):
    g = sw.load_grid(_grid(tmp_path, '[grid]\ntargets = ["onnxruntime:int8"]\n'))
    cell = sw.grid_cells(g)[0]
    t = _targets(g)
    key = sw.cell_key(g, cell, t)
    assert key == sw.cell_key(g, cell, t)  # deterministic
    assert key != sw.cell_key(g, cell, default_registry().parse_targets("onnxruntime:int8,onnxruntime:fp32"))
    g2 = sw.load_grid(_grid(tmp_path, '[grid]\ntargets = ["onnxruntime:int8"]\n[data]\neval = 999\n', "g2.toml"))
    assert key != sw.cell_key(g2, sw.grid_cells(g2)[0], t)
    monkeypatch.setattr(sw.nilmc, "__version__", "9.9.9")
    assert key != sw.cell_key(g, cell, t)


def test_default_workers_respects_memory(monkeypatch):
    monkeypatch.setattr(sw, "_available_memory", lambda: 3 * sw.CELL_MEMORY_BYTES)
    assert sw.default_workers() == min(3, os.cpu_count() or 1)
    monkeypatch.setattr(sw, "_available_memory", lambda: 0)
    assert sw.default_workers() == 1


# ------------------------------------------------------------------ given models: fast, no TensorFlow
@pytest.fixture()
def bad_eval(tmp_path):
    from helpers import tiny_dataset

    # raw features 100x off the model's training statistics: the compile refuses it (exit 2) before any work
    return tiny_dataset(300, seed=2, scale=1e4).save(tmp_path / "bad_eval.npz")


def test_failed_cell_is_recorded_and_the_rest_go_on_then_cached(tmp_path, tiny_files, bad_eval):
    g = sw.load_grid(_grid(tmp_path, _models_grid(tiny_files, bad_eval)))
    out = tmp_path / "sweep"
    seen = []
    s = sw.run_sweep(g, _targets(g), out, workers=1, on_cell=seen.append)
    assert (s.cells, s.ran, s.cached, s.failed) == (2, 2, 0, 1)
    with ResultsDB(out / sw.RESULTS_FILE, create=False) as db:
        cells = {c["model"] + "|" + str(c["cell_key"]): c for c in db.cells()}
        status = sorted(c["status"] for c in cells.values())
        assert status == ["done", "failed"]
        failed = next(c for c in cells.values() if c["status"] == "failed")
        assert failed["error_type"] == "NormalizationError" and failed["exit_code"] == 2 and "normalization" in failed["error"]
        rows = db.results()
        assert [r["target"] for r in rows] == ["onnxruntime:fp32", "onnxruntime:int8"]
        assert rows[0]["verification"] == "measured" and rows[0]["delta_eacc_pts"] == 0.0
        detail = db.details(rows[1]["cell_key"])["onnxruntime:int8"]
        assert detail["layers"] and detail["trace"]["windows"] > 0
    # nothing changed: nothing runs, in well under a second of work
    t0 = time.perf_counter()
    again = sw.run_sweep(g, _targets(g), out, workers=1)
    assert (again.ran, again.cached, again.failed) == (0, 2, 1)
    assert time.perf_counter() - t0 < 5
    retried = sw.run_sweep(g, _targets(g), out, workers=1, retry_failed=True)
    assert (retried.ran, retried.cached) == (1, 1)


def test_interrupted_sweep_resumes(tmp_path, tiny_files):
    g = sw.load_grid(_grid(tmp_path, _models_grid(tiny_files).replace("[grid]\n", '[grid]\nbudgets = ["eacc=0.5", "eacc=5"]\n')))
    out = tmp_path / "sweep"

    def stop(cell):
        raise KeyboardInterrupt  # Ctrl-C after the first cell is recorded

    with pytest.raises(KeyboardInterrupt):
        sw.run_sweep(g, _targets(g), out, workers=1, on_cell=stop)
    with ResultsDB(out / sw.RESULTS_FILE, create=False) as db:
        assert len(db.cells()) == 1
    s = sw.run_sweep(g, _targets(g), out, workers=1)
    assert (s.ran, s.cached, s.failed) == (1, 1, 0)


def test_out_dir_rules(tmp_path, tiny_files):
    g = sw.load_grid(_grid(tmp_path, _models_grid(tiny_files)))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("x")
    with pytest.raises(OutputError, match="not empty"):
        sw.run_sweep(g, _targets(g), tmp_path / "full", workers=1)
    with pytest.raises(OutputError, match="holds the input"):
        sw.run_sweep(g, _targets(g), tmp_path, workers=1)


def test_cli_sweep_json_and_exit_code(tmp_path, tiny_files, bad_eval):
    grid = _grid(tmp_path, _models_grid(tiny_files, bad_eval, targets='"onnxruntime:fp32"'))
    r = CliRunner().invoke(cli, ["sweep", str(grid), "--out", str(tmp_path / "o"), "--workers", "1", "--json", "--no-report"])
    assert r.exit_code == 2, r.output  # a cell failed on bad input
    d = json.loads(r.output)
    assert d["cells"] == 2 and d["failed"] == 1 and d["table7"]["rows"][1]["target"] == "onnxruntime:fp32"
    r = CliRunner().invoke(cli, ["sweep", str(_grid(tmp_path, '[grid]\ntargets = ["nosuch:int8"]\n', "u.toml")), "--out", str(tmp_path / "u")])
    assert r.exit_code == 2 and "nosuch" in r.output


# ------------------------------------------------------------------ training cells, locally and on Ray
TRAIN_GRID = """
[grid]
setups = ["T-P", "T-I"]
normalizations = ["C"]
appliances = ["kettle"]
seeds = [3]
epochs = [1]
targets = ["onnxruntime:fp32", "onnxruntime:int8"]

[data]
train = 2000
val = 200
calib = 200
eval = 300
"""


def _comparable(db_path: Path) -> tuple[list[dict], list[dict]]:
    con = sqlite3.connect(db_path)
    con.row_factory = sqlite3.Row
    cells = [{k: r[k] for k in r.keys() if k not in TIMING_COLUMNS} for r in con.execute("SELECT * FROM cells ORDER BY cell_key")]
    results = [dict(r) for r in con.execute("SELECT * FROM results ORDER BY cell_key, position")]
    con.close()
    return cells, results


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory):
    pytest.importorskip("tensorflow")
    tmp = tmp_path_factory.mktemp("sweep_local")
    grid = _grid(tmp, TRAIN_GRID)
    out = tmp / "out"
    t0 = time.perf_counter()
    r = CliRunner().invoke(cli, ["sweep", str(grid), "--out", str(out), "--workers", "1", "--no-report"])
    assert r.exit_code == 0, r.output
    return {"grid": grid, "out": out, "wall_s": time.perf_counter() - t0, "output": r.output}


@pytest.mark.slow
@pytest.mark.tf
def test_training_sweep_prints_tables_and_rerun_is_seconds(local_sweep):
    out = local_sweep["output"]
    assert "Table 6 layout" in out and "Table 7 layout" in out and "T-P" in out and "onnxruntime:int8" in out
    cells, results = _comparable(local_sweep["out"] / sw.RESULTS_FILE)
    assert [c["status"] for c in cells] == ["done", "done"] and len(results) == 4
    assert all(c["parameters"] == 672129 for c in cells)  # the seed-003 CNN at (10, 9, 1)
    t0 = time.perf_counter()
    r = CliRunner().invoke(cli, ["sweep", str(local_sweep["grid"]), "--out", str(local_sweep["out"]), "--workers", "1", "--no-report"])
    assert r.exit_code == 0 and "0 run, 2 from the results" in r.output
    assert time.perf_counter() - t0 < 10


@pytest.mark.slow
@pytest.mark.tf
def test_ray_cluster_gives_the_local_results_cell_by_cell(local_sweep, tmp_path):
    ray = pytest.importorskip("ray", reason="Ray comes with the [sweep] extra")
    # A local head (this machine only). Ray itself swaps 127.0.0.1 for the node's own address (resolve_ip_for_localhost).
    ctx = ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 1024**2, log_to_driver=False, configure_logging=False)
    try:
        address = ctx.address_info["gcs_address"]
        assert len(ray.nodes()) == 1
        out = tmp_path / "ray_out"
        done = subprocess.run([sys.executable, "-m", "nilmc.compiler.cli", "sweep", str(local_sweep["grid"]), "--out", str(out),
                               "--ray", address, "--workers", "1", "--json", "--no-report"],
                              capture_output=True, text=True, timeout=900, cwd=tmp_path)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
        assert json.loads(done.stdout)["engine"] == "ray"
    finally:
        ray.shutdown()
    assert _comparable(out / sw.RESULTS_FILE) == _comparable(local_sweep["out"] / sw.RESULTS_FILE)


def test_the_shipped_full_grid_file_is_seed003s_200_cells():
    """examples/grids/seed003_full.toml (the grid the README's measured full-grid time is for) parses into the
    20 setups x 5 normalizations x 2 appliances of seed 003's Table 6."""
    from nilmc.training.sweep import grid_cells, load_grid

    grid = load_grid(Path(__file__).resolve().parents[2] / "examples" / "grids" / "seed003_full.toml")
    cells = grid_cells(grid)
    assert len(cells) == 200
    assert len({c.setup for c in cells}) == 20 and {c.normalization for c in cells} == {"A", "B", "C", "D", "E"}
    assert {c.appliance for c in cells} == {"kettle", "fridge"} and grid.targets == ("onnxruntime:int8",)

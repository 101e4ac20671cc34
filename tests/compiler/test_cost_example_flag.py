"""``nilmc example --all-models`` plumbing (no training, no compiling: both are replaced by recorders)."""
from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from nilmc.compiler import cli as cli_mod


def _record(monkeypatch, fail_for: str = ""):
    calls: list[tuple] = []

    def fake_run_compile(model, calib, eval_path, targets, out, max_delta, junit, as_json, **kw):
        calls.append((model, targets, out))
        if fail_for and fail_for in str(model):
            raise SystemExit(1)  # a failed gate, as run_compile exits

    monkeypatch.setattr(cli_mod, "run_compile", fake_run_compile)
    return calls


def test_without_the_flag_the_example_is_unchanged(monkeypatch, tmp_path):
    calls = _record(monkeypatch)
    res = CliRunner().invoke(cli_mod.cli, ["example", "--out", str(tmp_path / "o")], catch_exceptions=False)
    assert res.exit_code == 0
    from nilmc.calibration_data.shipped import shipped_paths

    assert calls == [(str(shipped_paths()["keras"]), "all", str(tmp_path / "o"))]


def test_all_models_compiles_each_model_into_its_own_directory(monkeypatch, tmp_path):
    import nilmc.training.zoo as zoo

    calls = _record(monkeypatch, fail_for="ctrnn")
    trained: list[str] = []

    def fake_example_model(kind, cache, *, seed=0, shipped=True):
        trained.append(kind if shipped else f"{kind} (retrained)")
        return {"onnx": Path(cache) / f"{kind}.onnx", "model": Path(cache) / f"{kind}.model", "calib": Path(cache) / "c.npz", "eval": Path(cache) / "e.npz",
                "targets": zoo.EXAMPLE_MODELS[kind]["targets"], "info": {"parameters": 10, "macs": 20}, "cached": False}

    monkeypatch.setattr(zoo, "example_model", fake_example_model)
    asked: list[tuple] = []
    monkeypatch.setattr(cli_mod, "_example_refusals", lambda path, others: asked.append((path, others)) or [f"  not in the table: {others[0]}: why"])
    out = tmp_path / "o"
    res = CliRunner().invoke(cli_mod.cli, ["example", "--all-models", "--out", str(out)], catch_exceptions=False)
    assert trained == ["ctrnn", "cloud", "xgboost"]
    assert [c[2] for c in calls] == [str(out / d) for d in ("cnn", "ctrnn", "cloud", "xgboost")]
    assert [c[0] for c in calls[1:]] == [str(out / "models" / f"{k}.model") for k in ("ctrnn", "cloud", "xgboost")]  # the file to compile
    assert calls[0][1] == "all"  # the CNN as today
    assert calls[3][1] == "onnxruntime:fp32"  # the tree model: onnxruntime only
    assert set(calls[2][1].split(",")) <= set(zoo.EXAMPLE_MODELS["cloud"]["targets"])  # available server targets only
    assert res.exit_code == 1  # the CtRNN's failed gate did not stop the others, and sets the exit code
    assert "20 MACs/prediction" in res.output
    # every available target outside a model's list is accounted for before its compile, in one line per reason
    assert [a[0] for a in asked] == [str(out / "models" / f"{k}.model") for k in ("ctrnn", "cloud", "xgboost")]
    for (_, others), (_, shown, _) in zip(asked, calls[1:]):
        assert others and not set(others) & set(shown.split(","))
    assert res.output.count("  not in the table: ") == 3


def test_retrain_trains_the_models_here_and_needs_all_models(monkeypatch, tmp_path):
    import nilmc.training.zoo as zoo

    _record(monkeypatch)
    asked: list[tuple[str, bool]] = []

    def fake_example_model(kind, cache, *, seed=0, shipped=True):
        asked.append((kind, shipped))
        return {"onnx": Path(cache) / f"{kind}.onnx", "model": Path(cache) / f"{kind}.model", "calib": Path(cache) / "c.npz", "eval": Path(cache) / "e.npz",
                "targets": zoo.EXAMPLE_MODELS[kind]["targets"], "info": {"parameters": 10, "macs": 20}, "cached": False, "shipped": shipped}

    monkeypatch.setattr(zoo, "example_model", fake_example_model)
    monkeypatch.setattr(cli_mod, "_example_refusals", lambda path, others: [])
    res = CliRunner().invoke(cli_mod.cli, ["example", "--all-models", "--retrain", "--out", str(tmp_path / "o")], catch_exceptions=False)
    assert asked == [(k, False) for k in ("ctrnn", "cloud", "xgboost")]
    assert res.output.count("(trained here)") == 3
    res = CliRunner().invoke(cli_mod.cli, ["example", "--all-models", "--out", str(tmp_path / "p")], catch_exceptions=False)
    assert asked[3:] == [(k, True) for k in ("ctrnn", "cloud", "xgboost")] and res.output.count("(shipped)") == 3
    res = CliRunner().invoke(cli_mod.cli, ["example", "--retrain", "--out", str(tmp_path / "q")])
    assert res.exit_code == 2 and "add --all-models" in res.output and "Traceback" not in res.output

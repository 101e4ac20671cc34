"""Fitting the meter (tflm.fit): L1 structured pruning, the width search under a budget, distillation, refusal."""
from __future__ import annotations

import json

import numpy as np
import pytest

from nilmc.backends.registry import Target, default_registry

KIB = 1024


# --------------------------------------------------------------------------- no TensorFlow
def test_held_out_mask_takes_whole_blocks():
    from nilmc.training.fit_meter import held_out_mask

    m = held_out_mask(1000, 0.2)
    assert m.sum() == 200
    starts = np.flatnonzero(np.diff(m.astype(int)) == 1) + 1
    assert len(starts) == 8 and all(m[s : s + 25].all() for s in starts)  # eight blocks of 25 consecutive windows
    assert held_out_mask(60, 0.2).sum() > 0  # small sets: smaller blocks, still some held out
    from nilmc.compiler.errors import BadInputError

    with pytest.raises(BadInputError, match="too few"):
        held_out_mask(3, 0.2)


def test_mixup_is_seeded_and_convex():
    from nilmc.training.fit_meter import mixup

    x = np.random.default_rng(0).normal(size=(50, 4, 3, 1)).astype(np.float32)
    a, b, c = mixup(x, 3, 0), mixup(x, 3, 0), mixup(x, 3, 1)
    assert a.shape == (200, 4, 3, 1) and np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.array_equal(a[:50], x)
    assert a.min() >= x.min() - 1e-6 and a.max() <= x.max() + 1e-6


def test_options_are_typed_and_checked():
    from nilmc.backends.base import parse_backend_options
    from nilmc.backends.tflm_backend import TFLMBackend, TFLMOptions
    from nilmc.compiler.errors import BadInputError

    caps = TFLMBackend().capabilities
    opts = parse_backend_options("tflm", caps, {"fit": "search", "fit_max_loss": "1.5", "fit_candidates": "3"})
    assert opts == TFLMOptions(fit="search", fit_max_loss=1.5, fit_candidates=3)
    with pytest.raises(BadInputError, match="fit must be one of"):
        parse_backend_options("tflm", caps, {"fit": "sometimes"})
    with pytest.raises(BadInputError, match="tflm.fit_max_loss"):
        parse_backend_options("tflm", caps, {"fit_max_los": "1"})


def test_the_cli_hands_the_fitter_to_the_tflm_backend():
    from nilmc.backends.tflm_backend import FittingTFLMBackend, TFLMBackend
    from nilmc.compiler.cli import _wire_meter_fitter
    from nilmc.training.fit_meter import fit_to_budget

    reg = default_registry(plugins=False)
    _wire_meter_fitter(reg, [Target("onnxruntime", "fp32")])
    assert type(reg.get("tflm")) is TFLMBackend and reg.get("tflm").fitter is None
    _wire_meter_fitter(reg, [Target("tflm", "cortex-m4")])
    assert type(reg.get("tflm")) is FittingTFLMBackend and reg.get("tflm").fitter is fit_to_budget


# --------------------------------------------------------------------------- a tiny chain (TensorFlow)
def _chain_model(seed: int = 0):
    from nilmc.compiler.tfcompat import import_tf

    tf = import_tf()
    tf.keras.utils.set_random_seed(seed)
    L = tf.keras.layers
    inp = L.Input(shape=(10, 9, 1), name="input")
    x = L.Conv2D(8, (3, 3), padding="same", activation="relu", name="conv1")(inp)
    x = L.Conv2D(8, (3, 3), padding="same", activation="relu", name="conv2")(x)
    x = L.Flatten(name="flatten")(x)
    x = L.Dense(16, activation="relu", name="dense1")(x)
    return tf.keras.Model(inp, L.Dense(1, name="output")(x))


@pytest.mark.tf
def test_prune_keeps_the_largest_l1_filters_and_slices_through_flatten():
    from nilmc.training.fit_meter import net_facts, prunable, prune

    k = _chain_model()
    assert prunable(k) == {"conv1": 8, "conv2": 8, "dense1": 16}
    drop = {"conv1": [1, 4, 6], "conv2": [0, 7], "dense1": [2, 3, 5, 8, 11, 15]}
    for name, idx in drop.items():  # zeroed filters / units have the smallest L1 norm and contribute nothing
        w, b = k.get_layer(name).get_weights()
        w[..., idx], b[idx] = 0.0, 0.0
        k.get_layer(name).set_weights([w, b])
    widths = {n: prunable(k)[n] - len(i) for n, i in drop.items()}
    p = prune(k, widths)
    assert prunable(p) == widths
    x = np.random.default_rng(1).normal(size=(16, 10, 9, 1)).astype(np.float32)
    np.testing.assert_allclose(p.predict(x, verbose=0), k.predict(x, verbose=0), rtol=1e-5, atol=1e-5)
    facts = net_facts(k, widths)
    assert facts == net_facts(p) and facts.params == p.count_params()


@pytest.mark.tf
@pytest.mark.tflite
def test_net_facts_agree_with_the_flatbuffer():
    pytest.importorskip("ai_edge_litert")
    from nilmc.backends.tflite_int8 import structural_tflite
    from nilmc.backends.tflite_micro import graph_costs
    from nilmc.training.fit_meter import net_facts, prune

    p = prune(_chain_model(), {"conv1": 5, "conv2": 3, "dense1": 7})
    costs = graph_costs(structural_tflite(p, np.zeros((4, 10, 9, 1), np.float32)))
    f = net_facts(p)
    assert (costs["weights"], costs["channels"], costs["macs"]) == (f.weights, f.channels, f.macs)
    assert costs["peak_activation_bytes"] == f.peak_activation_bytes and costs["scratch_bytes"] == f.scratch_bytes


# --------------------------------------------------------------------------- end to end (TensorFlow + TFLM)
@pytest.fixture(scope="module")
def chain(small_tp, tmp_path_factory):
    """The tiny chain trained for a few epochs on the small T-P splits, saved as nilmc train saves models."""
    pytest.importorskip("tflite_micro")
    from nilmc.compiler.frontend import load_model
    from nilmc.training import save_trained
    from nilmc.training.seq2point import contract_for

    sp = small_tp["splits"]
    contract = contract_for(sp["train"], "kettle", "C")
    k = _chain_model()
    k.compile(optimizer="adam", loss="mse")
    k.fit(contract.prepare(sp["train"].raw_x()), contract.target.from_watts(sp["train"].y[:, 0])[:, None], epochs=4, batch_size=64, verbose=0)
    paths = save_trained(k, contract, tmp_path_factory.mktemp("chain") / "chain")
    return load_model(paths["keras"])


def _given_figures(model, calib):
    from nilmc.backends.tflite_int8 import structural_tflite
    from nilmc.backends.tflm_backend import BUDGETS, TFLMMeter
    from nilmc.compiler.tfcompat import load_keras

    rep = model.contract.prepare(calib.raw_x()[:32])
    return TFLMMeter(BUDGETS["cortex-m4"], rep, structural_tflite(load_keras(model), rep)).given


def _tight_budget(given):
    from nilmc.backends.tflite_micro import McuBudget

    # the framework and kernels alone take ~37 KiB of the estimate: squeeze the weights and the MACs
    return McuBudget("test meter", flash_bytes=given["flash_bytes"] - 3 * KIB, sram_bytes=64 * KIB, cycles=int(given["cycles"] * 0.6),
                     source="test")


def _compile(model, sp, out, budget, **options):
    from nilmc.backends.tflm_backend import FittingTFLMBackend
    from nilmc.compiler.driver import CompileOptions, compile_model
    from nilmc.training.fit_meter import fit_to_budget

    reg = default_registry(plugins=False)
    reg.register(FittingTFLMBackend(fit_to_budget, budget=budget), replace=True)
    opts = CompileOptions(backend_options={"tflm": options} if options else {})
    return compile_model(model, sp["eval"], [Target("tflm", "cortex-m4")], out, calib=sp["calib"],
                         budget={"eacc": 100.0}, registry=reg, options=opts)


@pytest.mark.tf
@pytest.mark.slow
def test_a_model_over_the_budget_is_fitted_and_the_artifact_fits(chain, small_tp, tmp_path):
    from nilmc.backends.tflite_micro import tflm_report
    from nilmc.backends.tflm_backend import measure_arena

    sp = small_tp["splits"]
    given = _given_figures(chain, sp["calib"])
    budget = _tight_budget(given)
    s = _compile(chain, sp, tmp_path / "out", budget, fit_candidates=1, fit_epochs=5, fit_max_loss=100.0)
    (r,) = s.results
    assert r.error is None and r.report.verification == "measured"
    m = json.loads((tmp_path / "out" / "tflm-cortex-m4" / "manifest.json").read_text())
    fit = m["artifact_info"]["fit"]
    assert fit["deployed"] == "fitted variant" and fit["given"]["fits"] is False
    v = fit["variant"]
    assert v["params"] < v["given_params"] and v["macs"] < v["given_macs"]
    assert any(kept < given_w for given_w, kept in v["widths"].values())
    assert "teacher_gap_pts" in v["held_out_calibration"] and "fitted variant" in m["artifact"]["kind"]
    # the deployed flatbuffer itself, costed and run again here: within the budget
    fb = (tmp_path / "out" / "tflm-cortex-m4" / m["artifact"]["file"]).read_bytes()
    rep = tflm_report(fb, budget=budget)
    assert rep["flash"]["total_bytes"] <= budget.flash_bytes and rep["compute"]["cycles"] <= budget.cycles
    assert measure_arena(fb) == m["artifact_info"]["tflm"]["arena_measured_bytes"] <= budget.sram_bytes
    assert m["artifact_info"]["tflm"]["fits_all"] is True
    # the gate compared the variant with the *unpruned* FP32 model
    from nilmc.compiler.io import sha256_bytes

    assert m["reference"]["reference_model_sha256"] == sha256_bytes(chain.serialize())
    assert np.isfinite(r.report.deltas["eacc"]) and r.report.candidate.eacc > 0


@pytest.mark.tf
@pytest.mark.slow
def test_no_variant_within_the_loss_budget_is_refused_with_the_figures(chain, small_tp, tmp_path):
    sp = small_tp["splits"]
    budget = _tight_budget(_given_figures(chain, sp["calib"]))
    s = _compile(chain, sp, tmp_path / "out", budget, fit="search", fit_candidates=1, fit_epochs=1, fit_max_loss=0.0)
    (r,) = s.results
    assert r.error_code == 2 and r.bundle is None
    assert "no variant within the budget stays within 0 EACC points" in r.error
    assert "parameters" in r.error and "MACs" in r.error and "gap to FP32" in r.error
    assert "tflm.fit_max_loss" in r.error and "tflm.fit=off" in r.error


@pytest.mark.tf
@pytest.mark.slow
def test_a_budget_no_width_meets_is_refused_and_fit_off_keeps_the_model(chain, small_tp, tmp_path):
    from nilmc.backends.tflite_micro import McuBudget

    sp = small_tp["splits"]
    hopeless = McuBudget("test meter", flash_bytes=16 * KIB, sram_bytes=64 * KIB, cycles=10**9, source="test")
    (r,) = _compile(chain, sp, tmp_path / "a", hopeless).results
    assert r.error_code == 2 and "no width in the grid" in r.error and "Flash" in r.error
    (r,) = _compile(chain, sp, tmp_path / "b", hopeless, fit="off").results
    assert r.error is None
    m = json.loads((tmp_path / "b" / "tflm-cortex-m4" / "manifest.json").read_text())
    assert m["artifact_info"]["fit"]["deployed"].startswith("given model (tflm.fit=off)")
    assert m["artifact_info"]["tflm"]["fits_all"] is False


@pytest.mark.tf
@pytest.mark.slow
def test_without_a_fitter_auto_says_so_and_search_is_refused(chain, small_tp, tmp_path):
    from nilmc.backends.tflm_backend import TFLMBackend, TFLMOptions
    from nilmc.quantization.context import QuantContext

    sp = small_tp["splits"]
    budget = _tight_budget(_given_figures(chain, sp["calib"]))
    options = {"calibration": sp["calib"], "quant": QuantContext(chain, sp["calib"])}
    (tmp_path / "a").mkdir()
    art = TFLMBackend(budget=budget).lower(chain, tmp_path / "a", options=options)
    assert "has no fitter" in art.info["fit"]["deployed"] and art.info["tflm"]["fits_all"] is False
    from nilmc.compiler.errors import BadInputError

    (tmp_path / "b").mkdir()
    with pytest.raises(BadInputError, match="FittingTFLMBackend"):
        TFLMBackend(budget=budget).lower(chain, tmp_path / "b", options={**options, "backend_options": TFLMOptions(fit="search")})

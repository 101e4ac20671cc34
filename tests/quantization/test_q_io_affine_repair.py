"""Raw-scale models: per-feature input rescaling as a float stage, its inverse folded into the first layer
(quantization/io_affine.repair_input_scales), and `quantize` using it when the input_features finding appears."""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import build_seq2point
from helpers import tiny_dataset, tiny_model

from nilmc.calibration_data.dataset import NilmDataset
from nilmc.calibration_data.normalization import FeatureStats, Normalization, NormalizationSpec
from nilmc.compiler.model import Model
from nilmc.quantization import _ort
from nilmc.quantization.api import Techniques
from nilmc.quantization.io_affine import repair_input_scales


def _raw_scale_ds(n: int = 400, seed: int = 0) -> NilmDataset:
    """tiny_dataset with feature ranges seven decades apart (raw watts^2 beside a skewness)."""
    ds = tiny_dataset(n, seed=seed)
    x = ds.x.astype(np.float64)
    x[:, :, 2] = x[:, :, 2] * 3e4
    x[:, :, 7] = x[:, :, 7] * 1e-3
    return NilmDataset(x=x.astype(np.float32), y=ds.y, appliances=ds.appliances, feature_names=ds.feature_names,
                       train_stats=FeatureStats.fit(x), target_mean=ds.target_mean, target_std=ds.target_std,
                       on_thresholds=ds.on_thresholds, info=ds.info)


def _a_model(graph, ds: NilmDataset) -> Model:
    base = tiny_model(tiny_dataset())
    return Model(graph, base.contract.with_(normalization=NormalizationSpec(Normalization.A)), source="raw-scale")


def _watts(model: Model, x: np.ndarray) -> np.ndarray:
    return model.contract.to_watts(_ort.output(model.graph, model.contract.prepare(x))).astype(np.float64)


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_rescaling_is_exact_and_recorded(kind):
    ds = _raw_scale_ds()
    graph = tiny_model(tiny_dataset()).graph if kind == "dense" else build_seq2point()
    model = _a_model(graph, ds)
    repaired, report = repair_input_scales(model, ds.train_stats)
    assert report.applied and report.mode == ("weights" if kind == "dense" else "features_to_channels")
    assert min(report.codes_before) < 16 <= min(report.codes_after)
    ref, got = _watts(model, ds.x), _watts(repaired, ds.x)
    assert np.max(np.abs(ref - got)) <= 1e-5 * np.max(np.abs(ref))
    d = json.loads(repaired.contract.dumps())["normalization"]
    assert d["kind"] == "affine" and d["origin"].startswith("input rescaling") and d["offset"] == [0.0] * 9
    assert repaired.keras_path is None  # the Keras file does not have the rescaled first layer


def test_nothing_to_repair_on_a_normalized_model(tiny, tiny_ds):
    same, report = repair_input_scales(tiny, tiny_ds.train_stats)
    assert same is tiny and not report.applied and "every feature" in report.note


def test_quantize_repairs_a_starved_input_and_says_so():
    from nilmc.quantization.api import quantize

    ds = _raw_scale_ds()
    model = _a_model(build_seq2point(), ds)
    result = quantize(model, ds, estimator="minmax", bias_correction=False, overflow_policy={"input_features": "fix"},
                      advanced=Techniques(precise_input=False))  # the INT8-input repair (precise input would skip it)
    assert result.notes and result.notes[0].startswith("input rescaling applied")
    assert result.feature_scales is not None and result.feature_scales.ok
    assert result.model.contract.normalization.kind is Normalization.AFFINE
    report = result.report()
    assert report["contract"]["normalization"] == "affine" and report["notes"][0].startswith("input rescaling")

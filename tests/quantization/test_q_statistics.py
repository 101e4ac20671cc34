"""statistics: one pass, every tensor, exact growing histogram, serialisation."""
from __future__ import annotations

import numpy as np
import pytest

from nilmc.compiler.errors import DataError, ShapeMismatchError
from nilmc.quantization.statistics import GrowingHistogram, Statistics, TensorStats, collect_statistics, run_with_intermediates


def test_growing_histogram_is_exact_and_tight() -> None:
    rng = np.random.default_rng(0)
    parts = [rng.normal(0, 0.01, 1000), rng.normal(3, 1, 5000), rng.uniform(-40, 2, 3000), np.zeros(500)]
    h = GrowingHistogram(256)
    for p in parts:
        h.add(p)
    res = h.result()
    allv = np.concatenate(parts)
    assert res.total == allv.size
    assert res.edges[0] <= allv.min() and res.edges[-1] > allv.max()
    occupied = np.flatnonzero(res.counts)
    assert 128 <= occupied[-1] - occupied[0] + 1 <= 256  # the span uses between bins/2 and bins bins
    # merging never interpolated: identical to a one-shot histogram on the final edges
    assert np.array_equal(res.counts, np.histogram(allv, bins=res.edges)[0])
    assert np.log2(res.width) == int(np.log2(res.width))  # power-of-two width


def test_folded_histogram() -> None:
    values = np.array([-1.45, -0.2, 0.2, 0.7, 1.55])
    f = TensorStats.from_array("x", values, bins=16).histogram.folded()
    assert f.total == 5 and f.first == 0
    assert np.array_equal(f.counts, np.histogram(np.abs(values), bins=f.edges)[0])


def test_collects_every_activation_and_weight(seq2point, calib, run_model) -> None:
    model = seq2point()
    stats = collect_statistics(model, calib, batch_size=100)
    node_outputs = [o for n in model.graph.node for o in n.output]
    assert set(node_outputs) | {"input"} == set(stats.activations())
    assert {"conv1/W", "conv1/b", "dense1/W", "dense2/b"} <= set(stats.weights())
    assert "shape" not in stats  # int64 constant, not a weight
    out = run_model(model, calib)
    o = stats["output"]
    assert o.minimum == pytest.approx(float(out.min()), rel=1e-5) and o.maximum == pytest.approx(float(out.max()), rel=1e-5)
    assert o.count == calib.shape[0] and o.histogram.total == o.count
    assert o.mean == pytest.approx(float(out.astype(np.float64).mean()), rel=1e-4)
    assert o.std == pytest.approx(float(out.astype(np.float64).std()), rel=1e-4)
    assert stats["r1"].minimum == 0.0 and stats["c1"].minimum < 0.0  # ReLU output vs pre-activation
    assert stats["input"].count == calib.size and stats.n_samples == len(calib)
    assert stats["input"].feature_axis == 2 and stats["input"].feature_min.shape == (9,)
    assert np.allclose(stats["input"].feature_max, calib.max(axis=(0, 1, 3)))


def test_batch_size_does_not_change_extremes(seq2point, calib) -> None:
    model = seq2point()
    a = collect_statistics(model, calib, batch_size=512)
    b = collect_statistics(model, calib, batch_size=37)
    for name in a.activations():
        assert (a[name].minimum, a[name].maximum, a[name].count) == (b[name].minimum, b[name].maximum, b[name].count)


def test_intermediates_match_plain_run(seq2point, calib, run_model) -> None:
    model = seq2point()
    batches = list(run_with_intermediates(model, calib, batch_size=200))
    assert len(batches) == 3
    assert np.allclose(np.concatenate([b["output"] for b in batches]), run_model(model, calib), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("suffix", [".npz", ".json"])
def test_roundtrip(seq2point, calib, tmp_path, suffix: str) -> None:
    stats = collect_statistics(seq2point(), calib[:64])
    path = stats.save(tmp_path / f"stats{suffix}")
    if suffix == ".npz":
        np.load(path, allow_pickle=False).close()  # loadable without pickle
    back = Statistics.load(path)
    assert back.model_digest == stats.model_digest and set(back.tensors) == set(stats.tensors)
    for name, t in stats.tensors.items():
        u = back[name]
        assert (u.minimum, u.maximum, u.count, u.histogram.first, u.histogram.width) == (
            t.minimum, t.maximum, t.count, t.histogram.first, t.histogram.width)
        assert np.array_equal(u.histogram.counts, t.histogram.counts)
    assert np.array_equal(back["input"].feature_min, stats["input"].feature_min)


def test_bad_calibration_data(seq2point, calib) -> None:
    model = seq2point()
    with pytest.raises(ShapeMismatchError, match=r"\(10, 9, 1\)"):
        collect_statistics(model, np.zeros((4, 10, 8, 1), np.float32))
    bad = calib[:4].copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(DataError):
        collect_statistics(model, bad)
    with pytest.raises(DataError):
        collect_statistics(model, np.zeros((0, 10, 9, 1), np.float32))


def test_feature_axis_is_not_the_time_axis_of_a_single_feature_sequence():
    from nilmc.quantization.statistics import _feature_axis

    assert _feature_axis((8, 10, 9, 1)) == 2  # (N, T, F, 1): the features
    assert _feature_axis((8, 9)) == 1  # a feature vector
    assert _feature_axis((8, 128, 1, 1)) is None  # one feature over time: per-position ranges are not features
    assert _feature_axis((8, 1, 599)) is None

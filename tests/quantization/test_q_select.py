"""selection: per-tensor estimator chosen by model-output error (greedy); cross-validated range headroom."""
from __future__ import annotations

import numpy as np
import pytest

from nilmc.compiler.errors import QuantizationError
from nilmc.quantization import _ort
from nilmc.quantization.params import derive_params
from nilmc.quantization.selection import apply_headroom, output_error, select_estimators, select_headroom
from nilmc.quantization.statistics import collect_statistics
from nilmc.quantization.traits import DPU_POT, GENERIC_INT8


def test_greedy_never_worse_and_consistent(s2p_model, s2p_stats, calib) -> None:
    res = select_estimators(s2p_model, s2p_stats, GENERIC_INT8, calib, exclude=["output"])
    assert res.final_error <= res.start_error and res.choices["output"] == "minmax"
    assert set(res.choices.values()) <= {"minmax", "percentile", "mse", "entropy"}
    assert res.params.estimator == "selected"
    again = derive_params(s2p_model, s2p_stats, GENERIC_INT8, per_tensor_estimators=res.choices)
    assert again.dumps() == derive_params(s2p_model, s2p_stats, GENERIC_INT8, per_tensor_estimators=res.choices).dumps()
    assert {t.name: t.scale for t in res.params.by_role("activation")} == {t.name: t.scale for t in again.by_role("activation")}
    assert res.final_error == pytest.approx(output_error(s2p_model, res.params, _ort.subsample(calib, 512),
                                                         _ort.output(s2p_model, _ort.subsample(calib, 512))), rel=1e-6)
    assert res.evaluations <= 1 + 4 * len(res.choices)
    with pytest.raises(QuantizationError, match="unknown range estimators"):
        select_estimators(s2p_model, s2p_stats, GENERIC_INT8, calib, candidates=["minmax", "magic"])


def test_outlier_window_makes_a_clipping_estimator_win(s2p_model, make_windows) -> None:
    x = make_windows(512, seed=1)
    x[7] *= 40.0  # one corrupt window: min-max would spread 256 codes over 40x the useful range
    stats = collect_statistics(s2p_model, x)
    clean = make_windows(256, seed=2)
    res = select_estimators(s2p_model, stats, GENERIC_INT8, clean, exclude=["output"])
    assert res.choices["input"] != "minmax"
    assert res.final_error < 0.2 * res.start_error  # measured on windows like the deployment data
    minmax = derive_params(s2p_model, stats, GENERIC_INT8)
    assert res.params["input"].scale[0] < 0.5 * minmax["input"].scale[0]


def test_power_of_two_targets_keep_exact_scales(s2p_model, s2p_stats, calib) -> None:
    res = select_estimators(s2p_model, s2p_stats, DPU_POT, calib, candidates=("minmax", "mse"), max_windows=128)
    import math

    for tq in res.params.by_role("activation"):
        assert math.frexp(tq.scale[0])[0] == 0.5


def test_apply_headroom(s2p_model, s2p_stats) -> None:
    params = derive_params(s2p_model, s2p_stats, GENERIC_INT8)
    wide = apply_headroom(params, s2p_model, s2p_stats, 2.0)
    assert wide["output"] == params["output"]  # outputs keep their (physical) range
    assert wide["r1"].hi[0] == pytest.approx(2 * params["r1"].hi[0]) and wide["r1"].scale[0] == pytest.approx(2 * params["r1"].scale[0], rel=1e-6)
    assert wide["input"].lo[0] == pytest.approx(2 * params["input"].lo[0])
    # the int32 bias scale follows the widened input scale
    assert np.array_equal(wide.tensors["conv2/b"].scales(), np.float32(wide["r1"].scale[0]) * wide.tensors["conv2/W"].scales())
    assert apply_headroom(params, s2p_model, s2p_stats, 1.0) is params
    assert apply_headroom(params, s2p_model, s2p_stats, 2.0, exclude=["r1"])["r1"] == params["r1"]
    with pytest.raises(QuantizationError):
        apply_headroom(params, s2p_model, s2p_stats, 0.5)


def test_headroom_is_chosen_on_held_out_blocks(s2p_model, make_windows) -> None:
    make = lambda s: derive_params(s2p_model, s, GENERIC_INT8)  # noqa: E731
    iid = make_windows(512, seed=1)
    res = select_headroom(s2p_model, iid, make)
    assert set(res.errors) == {1.0, 1.25, 1.5, 2.0, 3.0} and res.headroom == min(res.errors, key=lambda h: (res.errors[h], h))
    assert res.headroom <= 1.5  # same distribution in both blocks: little or no headroom pays
    # the second block holds larger events than the first (what a small calibration set does to ranges)
    shifted = iid.copy()
    shifted[256:] *= 2.0
    res2 = select_headroom(s2p_model, shifted, make)
    assert res2.headroom >= 2.0 and res2.errors[1.0] > 2 * res2.errors[res2.headroom]
    with pytest.raises(QuantizationError, match="cross-validation"):
        select_headroom(s2p_model, iid[:3], make)


@pytest.mark.parametrize("name", ["generic_int8", "tflite_int8", "tensorrt_int8", "eiq_per_tensor", "dpu_pot"])
def test_pipeline_on_every_preset(s2p_model, s2p_stats, calib, make_windows, name: str) -> None:
    """The techniques every backend gets through QuantContext.params work under each preset's traits."""
    import math

    from nilmc.quantization.api import Techniques, ptq_params
    from nilmc.quantization.qdq import build_qdq_model
    from nilmc.quantization.traits import PRESETS

    traits = PRESETS[name]
    out = ptq_params(s2p_model, s2p_stats, traits, calib, techniques=Techniques(max_windows=128, candidates=("minmax", "mse"), headroom=True))
    plain = derive_params(s2p_model, s2p_stats, traits)
    x = make_windows(256, seed=2)
    ref = _ort.output(s2p_model, x)
    got = _ort.output(build_qdq_model(s2p_model, out.params), x)
    base = _ort.output(build_qdq_model(s2p_model, plain), x)
    assert _ort.sqnr_db(ref, got) > _ort.sqnr_db(ref, base) - 3  # never much worse than plain min-max on new data
    assert out.params.provenance["techniques"]["headroom"] and "timings_s" in out.params.provenance
    if traits.power_of_two:
        assert all(math.frexp(t.scale[0])[0] == 0.5 for t in out.params.by_role("activation"))
        assert all(math.frexp(s)[0] == 0.5 for t in out.params.by_role("bias") for s in t.scale)

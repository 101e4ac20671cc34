"""The synthetic household generator: determinism, physics, knobs."""
from __future__ import annotations

import numpy as np
import pytest

from nilmc.calibration_data import synth as S
from nilmc.compiler.errors import BadInputError


def _bursts(seed: int, n: int, **kw) -> list[S.Burst]:
    it = S.iter_bursts(seed, **kw)
    return [next(it) for _ in range(n)]


def test_same_seed_same_bursts_and_other_seed_differs():
    a = _bursts(7, 3)
    b = _bursts(7, 3)
    c = _bursts(8, 3)
    for x, y in zip(a, b):
        assert x.t0 == y.t0
        np.testing.assert_array_equal(x.v, y.v)
        np.testing.assert_array_equal(x.i, y.i)
        np.testing.assert_array_equal(x.power, y.power)
    assert any(x.n_frames != z.n_frames or not np.array_equal(x.i[:5], z.i[:5]) for x, z in zip(a, c))


def test_prefix_property_and_split_streams_are_disjoint():
    long = _bursts(1, 5, split="eval")
    short = _bursts(1, 3, split="eval")
    for x, y in zip(short, long):
        np.testing.assert_array_equal(x.i, y.i)
    train = _bursts(1, 1, split="train")[0]
    assert train.day != long[0].day


def test_frame_geometry_and_power_is_mean_of_v_times_i():
    b = _bursts(0, 4)[0]
    assert b.v.shape == (b.n_frames, S.SAMPLES_PER_FRAME) and b.v.dtype == np.float32
    assert b.power.shape == (b.n_frames, len(S.ALL_DEVICES))
    p_wave = (b.v.astype(np.float64) * b.i).mean(axis=1)
    p_truth = b.power.sum(axis=1)
    # the whole-house power from the waveforms equals the sum of the devices (up to measurement noise)
    assert np.max(np.abs(p_wave - p_truth)) < 15.0 + 0.01 * p_truth.max()
    vrms = np.sqrt((b.v.astype(np.float64) ** 2).mean(axis=1))
    assert np.all((vrms > 200) & (vrms < 260))


def test_templates_have_the_documented_power_factors():
    vnom = S.nominal_voltage_harmonics()

    def pf(shape):
        p = S.active_power(vnom, shape)
        irms = np.sqrt(0.5 * np.sum(np.abs(shape) ** 2))
        return p / (S.V_RMS_NOMINAL * irms)

    assert pf(S._harmonics(S.wave_inductive(0.8, 0, 0))) == pytest.approx(0.8, abs=1e-3)
    assert 0.5 < pf(S._harmonics(S.wave_smps())) < 0.75  # switch-mode: ~0.6
    assert pf(S._harmonics(S.wave_halfwave())) < 0.9
    smps = np.abs(S._harmonics(S.wave_smps()))
    assert smps[2] > 0.5 * smps[0] and smps[1] < 1e-6  # strong 3rd, no even harmonics


def test_day_timeline_and_power_series():
    tl = S.make_day(0, 0, 5)
    ps = tl.power_series(60.0)
    assert ps.shape == (1440, len(S.ALL_DEVICES))
    assert np.all(ps >= 0)
    fridge = ps[:, S.ALL_DEVICES.index("fridge")]
    assert 0.2 < np.mean(fridge > 50) < 0.7  # duty cycle
    assert np.all(ps[:, S.ALL_DEVICES.index("base_load")] > 10)


def test_knobs_change_the_houses():
    easy = S.Difficulty(unknown_rate=0.0, lookalike_rate=0.0, overlap=0.0)
    ps = S.make_day(0, 0, 1, easy).power_series(10.0)
    for name in ("heater", "hair_dryer", "freezer", "pc", "vacuum"):
        assert ps[:, S.ALL_DEVICES.index(name)].max() == 0.0


@pytest.mark.parametrize("kw", [{"overlap": 1.5}, {"current_noise_a": -1.0}, {"voltage_drift": float("nan")}])
def test_bad_difficulty_is_rejected(kw):
    with pytest.raises(BadInputError):
        S.Difficulty(**kw)


@pytest.mark.parametrize("seed", [-1, 1.5, "3", True])
def test_bad_seed_is_rejected(seed):
    with pytest.raises(BadInputError):
        S.check_seed(seed)


def test_burst_options_validation_and_schedule():
    with pytest.raises(BadInputError):
        S.BurstOptions(min_frames=50, max_frames=20)
    with pytest.raises(BadInputError):
        S.BurstOptions(target_event_weights=(1.0, 2.0))
    sched = S.burst_schedule(S.BurstOptions())
    assert sched.shape == (24,)
    assert np.sum(sched == -1) == 24 - round(0.7 * 24)
    assert np.sum(sched == 0) >= np.sum(sched == 2)  # the kettle gets more event bursts than the fridge


def test_appliance_names():
    assert S.parse_appliances("Kettle, washing machine") == ("kettle", "washing_machine")
    with pytest.raises(BadInputError, match="available"):
        S.parse_appliances("toaster,spaceship")
    with pytest.raises(BadInputError):
        S.parse_appliances("")

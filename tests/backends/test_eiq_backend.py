"""The eiq backend: full-integer TFLite for the i.MX 8M Plus NPU, checked for the VX delegate (integer-only,
allow-listed ops, per-tensor when asked), run on the CPU interpreter; the numpy integer emulation with 32-bit
multipliers matches the interpreter, the 16-bit (NPU hypothesis) drift is reported; unsupported ops are named."""
from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import tp_context

from nilmc.backends.base import Verification
from nilmc.compiler.errors import BadInputError


@pytest.fixture(scope="module")
def tp(tmp_path_factory, small_tp):
    """A small trained T-P model (Keras), calibration / evaluation sets and the shared QuantContext."""
    return tp_context(tmp_path_factory, small_tp, "bundles")


_LOWERED: dict = {}


def lowered(tp, precision, cpu_layers="auto"):
    from nilmc.backends.eiq_backend import EIQBackend

    key = (precision, cpu_layers)
    if key not in _LOWERED:
        out = tp["dir"] / f"{precision}-{cpu_layers}"
        out.mkdir()
        _LOWERED[key] = EIQBackend().lower(tp["model"], out, precision=precision,
                                           options={"quant": tp["ctx"], "calibration": tp["calib"], "cpu_layers": cpu_layers})
    return _LOWERED[key]


# --------------------------------------------------------------------------- fast
def test_capabilities_and_traits():
    from nilmc.backends.eiq_backend import EIQBackend, eiq_traits

    caps = EIQBackend.capabilities
    assert set(caps.precisions) == {"int8", "int8_pt", "uint8_io"} and caps.extra == "eiq"
    assert "needs_keras_source" in caps.limitations and "VX delegate" in caps.limitations["npu"]
    pc, pt = eiq_traits(), eiq_traits(per_tensor=True)
    assert pc.per_channel_weights and not pt.per_channel_weights
    assert pc.symmetric_weights and pt.symmetric_weights and not pt.symmetric_activations
    assert pt.requant_multiplier_bits == 16


def test_model_without_keras_source_and_bad_precision(tiny, tmp_path):
    from nilmc.backends.eiq_backend import EIQBackend

    with pytest.raises(BadInputError, match="calibration"):  # an ONNX model now lowers (onnx2tf); without --calib it cannot quantize
        EIQBackend().lower(tiny, tmp_path, precision="int8")
    with pytest.raises(BadInputError, match="no precision"):
        EIQBackend().lower(tiny, tmp_path, precision="fp16")


# --------------------------------------------------------------------------- slow (TF)
@pytest.mark.slow
@pytest.mark.tf
@pytest.mark.parametrize("precision", ["int8", "int8_pt"])
def test_lowers_integer_only_allow_listed_and_runs(tp, precision):
    from nilmc.backends.eiq_backend import VX_ALLOWED_OPS, EIQBackend, graph_ops

    art = lowered(tp, precision, "none")  # the full-integer graph (precise input: test_tflite_precise_input.py)
    fb = art.path.read_bytes()
    assert art.primary == "model_eiq.tflite" and fb[4:8] == b"TFL3"
    for f in ("eiq_check.json", "run_on_imx8mp.py", "run_on_imx8mp.sh", "imx8mp_windows.npy", "imx8mp_cpu_reference.npy"):
        assert (art.directory / f).is_file(), f
    check = json.loads((art.directory / "eiq_check.json").read_text())
    assert check["integer_only"] and not check["float_ops"] and set(check["tensor_dtypes"]) <= {"int8", "int32"}
    for op in graph_ops(fb):
        assert op["op"] in VX_ALLOWED_OPS and set(op["dtypes"]) <= {"int8", "int32"}, op
    assert check["weights_per_tensor"] is (precision == "int8_pt")
    assert all(w["scales"] == 1 for w in check["weights"]) is (precision == "int8_pt")
    assert art.info["param_check"]["ok"]
    json.dumps(art.info)
    x = tp["model"].contract.prepare(tp["eval"].raw_x()[:64])
    with EIQBackend().runner(art) as r:
        assert r.verification is Verification.MEASURED
        y = r.infer({"input": x})["output"]
    assert y.shape == (64, 1) and np.all(np.isfinite(y))


@pytest.mark.slow
@pytest.mark.tf
@pytest.mark.parametrize("precision, cpu_layers", [("int8", "none"), ("int8_pt", "none"), ("int8", "auto")])
def test_32bit_emulation_matches_the_cpu_interpreter_and_16bit_drift_is_reported(tp, precision, cpu_layers):
    from nilmc.backends.eiq_backend import _cpu_codes, _input_codes, emulate_int8, npu_start, stage_codes

    art = lowered(tp, precision, cpu_layers)
    emu = art.info["npu_emulation"]
    assert emu["label"] == "emulated"
    assert emu["check_32bit_vs_cpu_builtin_kernels"]["max_lsb"] <= 1
    assert emu["check_32bit_vs_cpu_interpreter"]["max_lsb"] <= 2  # XNNPACK requantizes in float32
    d = emu["drift_16bit_output_codes"]
    assert d["max_lsb"] >= 0 and 0 <= d["frac_differing"] <= 1
    assert emu["drift_16bit_watts"]["max_w"] <= (d["max_lsb"] + 1e-6) * emu["drift_16bit_watts"]["output_step_w"] * 1.001
    assert set(emu["eacc_calibration"]) == {"32bit", "16bit", "delta_16_minus_32"}
    # independent re-check on evaluation windows
    fb = art.path.read_bytes()
    xq = _input_codes(tp["model"].contract.prepare(tp["eval"].raw_x()[:100]), art.info["io"]["input"])
    start = npu_start(fb, art.info["partition"]) if "partition" in art.info else None  # precise input: the NPU partition alone
    assert (start is None) is (cpu_layers == "none")
    e32 = emulate_int8(fb, xq if start is None else stage_codes(fb, xq, start[0]), multiplier_bits=32, start=start).astype(int)
    assert np.max(np.abs(e32 - _cpu_codes(fb, xq, default_delegates=False).astype(int))) <= 1


@pytest.mark.slow
@pytest.mark.tf
def test_uint8_io_variant_and_determinism(tp, tmp_path):
    from nilmc.backends.eiq_backend import EIQBackend

    art = lowered(tp, "uint8_io")
    again = EIQBackend().lower(tp["model"], tmp_path, precision="uint8_io",
                               options={"quant": tp["ctx"], "calibration": tp["calib"], "npu_emulation": False})
    for f in ("model_eiq.tflite", "eiq_check.json", "imx8mp_windows.npy", "imx8mp_cpu_reference.npy"):
        assert (tmp_path / f).read_bytes() == (art.directory / f).read_bytes(), f
    assert "npu_emulation" not in again.info
    assert art.info["io"]["input"]["dtype"] == "uint8" and art.info["io"]["output"]["dtype"] == "uint8"
    assert art.info["eiq_check"]["weights_per_tensor"]
    assert art.info["npu_emulation"]["check_32bit_vs_cpu_builtin_kernels"]["max_lsb"] <= 1


@pytest.mark.slow
@pytest.mark.tf
def test_unsupported_op_is_a_typed_error_naming_it(tp):
    import tensorflow as tf
    import tf_keras as keras

    from nilmc.backends.eiq_backend import UnsupportedOpError, check_vx_graph, scan_keras_ops
    from nilmc.backends.tflite_int8 import convert_keras

    inp = keras.Input((10, 4, 1))
    h = keras.layers.Flatten()(inp)
    h = keras.layers.Lambda(lambda t: tf.math.sin(t))(h)
    km = keras.Model(inp, keras.layers.Dense(1)(h))
    assert scan_keras_ops(km) == ["SIN"]
    with pytest.raises(UnsupportedOpError, match="SIN") as err:
        check_vx_graph(convert_keras(km, "fp32"), integer_only=False)
    assert err.value.ops == ["SIN"] and isinstance(err.value, BadInputError)

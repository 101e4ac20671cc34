"""The TFLite work tflite and eiq share: one structural conversion per (model content, windows, I/O dtype),
Keras models read once per file content, eIQ constraints as data lowered through tflite's full-integer routine,
and no private name of another module imported by the TFLite-based backends."""
from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from nilmc.compiler.errors import BadInputError

ROOT = Path(__file__).resolve().parents[2]
SHARED_USERS = ("backends/tflite_backend.py", "backends/tflite_int8.py", "backends/tflite_micro.py", "backends/eiq_backend.py")


# --------------------------------------------------------------------------- fast
@pytest.mark.parametrize("rel", SHARED_USERS)
def test_no_private_name_imported_from_another_module(rel):
    tree = ast.parse((ROOT / rel).read_text())
    private = [f"{node.module}.{a.name}" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
               and (node.module or "").startswith("nilmc") for a in node.names if a.name.startswith("_")]
    assert private == [], private


def test_eiq_constraints_are_frozen_data_for_the_shared_routine():
    from nilmc.backends.eiq_backend import EIQ_SPECS, VX_ALLOWED_OPS, EIQBackend
    from nilmc.backends.tflite_int8 import FullIntegerSpec

    assert set(EIQ_SPECS) == set(EIQBackend.capabilities.precisions)
    for precision, spec in EIQ_SPECS.items():
        assert isinstance(spec, FullIntegerSpec) and spec.allowed_ops == VX_ALLOWED_OPS
        assert spec.float_input is (precision != "uint8_io") and spec.integer_only is not spec.float_input  # precise input by default
        assert spec.per_tensor is (precision != "int8") and spec.traits.per_channel_weights is (precision == "int8")
        assert EIQBackend.capabilities.traits[precision] == spec.traits.with_(io_dtype=spec.io_dtype)
        with pytest.raises(dataclasses.FrozenInstanceError):
            spec.per_tensor = False  # type: ignore[misc]
    assert EIQ_SPECS["uint8_io"].io_dtype == "uint8" and EIQ_SPECS["int8_pt"].io_dtype == "int8"


def test_spec_refuses_inconsistent_data():
    from nilmc.backends.tflite_int8 import FullIntegerSpec, tflite_traits
    from nilmc.compiler.errors import InternalError

    with pytest.raises(BadInputError, match="I/O dtype"):
        FullIntegerSpec(label="x", traits=tflite_traits(), io_dtype="int4")
    with pytest.raises(InternalError, match="per-channel"):
        FullIntegerSpec(label="x", traits=tflite_traits(), per_tensor=True)


def test_given_params_are_used_only_under_the_specs_traits():
    from types import SimpleNamespace

    from nilmc.backends.tflite_int8 import _given_params, tflite_traits

    pc, pt = tflite_traits(), tflite_traits(per_tensor=True)
    given = SimpleNamespace(traits=pc.with_(io_dtype="uint8"))
    assert _given_params({"params": given}, pc) is given  # the I/O dtype changes no parameter
    assert _given_params({"params": given}, pt) is None
    assert _given_params({}, pc) is None


# --------------------------------------------------------------------------- slow (TF)
@pytest.fixture(scope="module")
def shared(small_tp):
    pytest.importorskip("ai_edge_litert")
    from nilmc.quantization.context import QuantContext

    sp, model = small_tp["splits"], small_tp["model"]
    return {"model": model, "calib": sp["calib"], "ctx": QuantContext(model, sp["calib"])}


@pytest.mark.slow
@pytest.mark.tf
def test_keras_file_is_read_once_per_content(shared, tmp_path):
    from nilmc.compiler.tfcompat import load_keras, read_keras

    model = shared["model"]
    first = load_keras(model)
    assert load_keras(model) is first
    copy = tmp_path / Path(model.keras_path).name
    copy.write_bytes(Path(model.keras_path).read_bytes())
    from nilmc.compiler.frontend import detect_kind

    assert read_keras(copy, detect_kind(copy)) is first  # same content, same object


@pytest.mark.slow
@pytest.mark.tf
def test_one_conversion_serves_tflite_and_every_eiq_precision_byte_identically(shared, tmp_path):
    from nilmc.backends import tflite_int8 as ti
    from nilmc.backends.eiq_backend import EIQBackend
    from nilmc.backends.tflite_backend import TFLiteBackend

    model, opts = shared["model"], {"quant": shared["ctx"], "calibration": shared["calib"], "npu_emulation": False}
    ti.clear_conversion_cache()
    arts = {"tflite:int8": TFLiteBackend().lower(model, tmp_path / "t", precision="int8", options={**opts, "tflm": False})}
    for p in ("int8", "int8_pt", "uint8_io"):
        arts[f"eiq:{p}"] = EIQBackend().lower(model, tmp_path / p, precision=p, options=opts)
    # int8 I/O (tflite:int8, eiq:int8, eiq:int8_pt) shares one conversion; uint8 I/O needs its own.
    assert ti.conversion_cache_info() == {"hits": 2, "misses": 2, "entries": 2}
    assert arts["tflite:int8"].path.read_bytes() == arts["eiq:int8"].path.read_bytes()
    # Cached == fresh: the same bytes as a conversion made for this target alone (per-tensor switch on).
    ti.clear_conversion_cache()
    original = ti.structural_tflite
    try:
        ti.structural_tflite = lambda km, rep, *, io_dtype="int8": ti.convert_keras(  # type: ignore[assignment]
            km, "full_int8", representative=rep, per_tensor=True, io_dtype=io_dtype)
        fresh = EIQBackend().lower(model, tmp_path / "fresh", precision="int8_pt", options=opts)
    finally:
        ti.structural_tflite = original
    assert fresh.path.read_bytes() == arts["eiq:int8_pt"].path.read_bytes()
    assert (tmp_path / "fresh" / "eiq_check.json").read_bytes() == (tmp_path / "int8_pt" / "eiq_check.json").read_bytes()


@pytest.mark.slow
@pytest.mark.tf
def test_changed_weights_change_the_fingerprint(shared):
    import numpy as np

    from nilmc.backends import tflite_int8 as ti
    from nilmc.compiler.tfcompat import load_keras

    km = load_keras(shared["model"])
    before = ti.keras_fingerprint(km)
    assert ti.keras_fingerprint(km) == before
    weights = km.get_weights()
    try:
        km.set_weights([weights[0] + np.float32(1e-3), *weights[1:]])
        assert ti.keras_fingerprint(km) != before  # a fine-tuned model never reuses the float model's conversion
    finally:
        km.set_weights(weights)  # the object is the shared, cached one
    assert ti.keras_fingerprint(km) == before

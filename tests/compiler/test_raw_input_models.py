"""The shipped T-P model with its z-score inside (raw-feature input), through the CLI on every INT8 target.

The z-score moves out of the graph into the contract's float stage on load (quantization/io_affine.py), so
every target must land within 0.1 EACC points and 1 dB output SQNR of the z-score model itself (issue 10).
Slow: TensorFlow conversion and five INT8 targets, twice (about 2-3 minutes on 2 cores).
"""
from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

from nilmc.calibration_data.normalization import Normalization, NormalizationSpec, TargetScaling
from nilmc.compiler.cli import cli
from nilmc.compiler.contract import ModelContract

SHIPPED = Path(__file__).resolve().parents[2] / "calibration_data" / "shipped"
TARGETS = "onnxruntime:int8,openvino:int8,tensorrt:int8,dpu:b2304,tflite:int8"
ONNX_TARGETS = "onnxruntime:int8,openvino:int8,tensorrt:int8,dpu:b2304"

pytestmark = [pytest.mark.slow, pytest.mark.tf]  # the shipped Keras model and the tflite target need TensorFlow


def _contract() -> ModelContract:
    return ModelContract.loads((SHIPPED / "tp_kettle_zscore.keras.contract.json").read_text())


def _raw_contract(c: ModelContract, *, denorm: bool) -> ModelContract:
    c = c.with_(normalization=NormalizationSpec(Normalization.A, c.normalization.stats))
    return c.with_(target=TargetScaling()) if denorm else c


def raw_onnx(dst: Path) -> Path:
    """The shipped ONNX with Mul/Add z-score in front and y * std + mean behind (raw features in, watts out):
    nilmc's own fold (quantization/fold.py, explicit ops on both sides), saved without the folded contract."""
    from nilmc.compiler.frontend import load_model
    from nilmc.quantization.fold import fold_normalization

    c = _contract()
    m = fold_normalization(load_model(SHIPPED / "tp_kettle_zscore.onnx"), input_mode="ops", output_mode="ops").model.graph
    del m.metadata_props[:]
    onnx.save(m, str(dst))
    (dst.parent / (dst.name + ".contract.json")).write_text(json.dumps(_raw_contract(c, denorm=True).to_json()))
    return dst


def raw_keras(dst: Path) -> Path:
    """The shipped .keras with a Keras Normalization layer (per feature) in front."""
    from nilmc.compiler.frontend import detect_kind, save_contract_sidecar
    from nilmc.compiler.tfcompat import import_tf, read_keras

    tf = import_tf()
    src = SHIPPED / "tp_kettle_zscore.keras"
    km = read_keras(src, detect_kind(src))
    c = _contract()
    st = c.normalization.stats
    inp = tf.keras.Input(shape=tuple(c.input_shape), name="input")
    h = tf.keras.layers.Normalization(axis=2, mean=st.mean, variance=st.std ** 2, name="zscore")(inp)
    for layer in km.layers[1:]:
        h = layer(h)
    tf.keras.Model(inp, h, name="tp_raw").save(dst)
    save_contract_sidecar(dst, _raw_contract(c, denorm=False))
    return dst


def _compile(model: Path, out: Path, targets: str) -> dict:
    res = CliRunner().invoke(cli, ["compile", str(model), "--calib", str(SHIPPED / "calib_T-P.npz"), "--eval",
                                   str(SHIPPED / "eval_T-P.npz"), "--targets", targets, "--out", str(out), "--json"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output[-2000:]
    return {t["target"]: t for t in json.loads(res.output)["targets"]}


@pytest.fixture(scope="module")
def zscore_result(tmp_path_factory) -> dict:
    return _compile(SHIPPED / "tp_kettle_zscore.keras", tmp_path_factory.mktemp("z") / "out", TARGETS)


@pytest.mark.parametrize("variant", ["onnx_mul_add_denorm", "keras_normalization"])
def test_raw_input_variant_matches_the_zscore_model_on_every_int8_target(tmp_path, zscore_result, variant):
    if variant == "onnx_mul_add_denorm":
        model, targets = raw_onnx(tmp_path / "raw.onnx"), ONNX_TARGETS  # tflite lowers from Keras
    else:
        model, targets = raw_keras(tmp_path / "raw.keras"), TARGETS
    got = _compile(model, tmp_path / "out", targets)
    for name, r in got.items():
        z = zscore_result[name]
        assert r["status"] == "PASS", (name, r.get("error"))
        assert abs(r["delta_eacc_pts"] - z["delta_eacc_pts"]) <= 0.1, (name, r["delta_eacc_pts"], z["delta_eacc_pts"])
        assert abs(r["output_sqnr_db"] - z["output_sqnr_db"]) <= 1.0, (name, r["output_sqnr_db"], z["output_sqnr_db"])
    manifest = json.loads((tmp_path / "out" / next(iter(got)).replace(":", "-") / "manifest.json").read_text())
    stage = manifest["contract"]["normalization"]
    assert stage["kind"] == "affine" and stage["formula"].startswith("graph_input") and stage["origin"]

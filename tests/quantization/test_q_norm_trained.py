"""The paper's finding on really trained models: the seq2point CNN trained on raw T-P features (A) is flagged
with its tensors named; the same architecture trained on z-scored features (C) passes. Needs TensorFlow."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    pytest.importorskip("tensorflow")
    from nilmc.calibration_data.windows import build_splits
    from nilmc.compiler.frontend import load_model
    from nilmc.training import TrainConfig, save_trained, train_seq2point

    sp = build_splits("T-P", appliances=("kettle",), n_train=2000, n_val=300, n_calib=300, n_eval=300,
                      splits=("train", "val", "calib"))
    out = tmp_path_factory.mktemp("norm_trained")
    models = {}
    for kind in ("A", "C"):
        keras_model, contract = train_seq2point(sp["train"], sp["val"], appliance="kettle", normalization=kind,
                                                config=TrainConfig(epochs=2, patience=2))
        models[kind] = load_model(save_trained(keras_model, contract, out / f"tp_{kind}")["onnx"])
    return sp, models


def test_trained_unnormalized_flagged_normalized_passes(trained) -> None:
    from nilmc.quantization.api import Techniques, quantize

    sp, models = trained
    fast = Techniques(select_estimators=False, headroom=False, bias_correction=False, precise_input=False,
                      min_calib_sqnr=None)  # the INT8-input finding, unrepaired (precise input / the SQNR floor repair it)
    a = quantize(models["A"], sp["calib"], advanced=fast)
    c = quantize(models["C"], sp["calib"], advanced=fast)
    assert c.feature_scales.ok and not c.overflow.by_check("input_features")
    assert not a.feature_scales and a.feature_scales.decades > 5
    tensors = a.feature_scales.tensors
    assert tensors[0] == "input" and any("conv1" in t for t in tensors[1:])
    assert "P.T.skewness" in " ".join(a.feature_scales.lost)
    finding = a.overflow.by_check("input_features")[0]
    assert finding.tensor == "input" and "normalize the input" in finding.suggested_fix
    # measured consequence on the calibration windows
    assert c.report()["output_sqnr_db"] > a.report()["output_sqnr_db"] + 6

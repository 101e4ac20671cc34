from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import tiny_dataset, tiny_model  # noqa: E402

# Markers that name an extra: a test carrying one is skipped, with the reason, where the extra is not installed
# (so the suite passes with only the core installed). Checked without importing the package.
EXTRA_MARKERS = {"tf": ("tensorflow", "tf"), "tflite": ("ai_edge_litert", "tflite"), "openvino": ("openvino", "openvino")}


def pytest_collection_modifyitems(config, items):
    import importlib.util

    missing = {m: spec for m, spec in EXTRA_MARKERS.items() if importlib.util.find_spec(spec[0]) is None}
    for item in items:
        for marker, (module, extra) in missing.items():
            if item.get_closest_marker(marker) is not None:
                item.add_marker(pytest.mark.skip(reason=f"needs {module} (pip install 'nilmc[{extra}]')"))


@pytest.fixture(scope="session")
def tiny_ds():
    return tiny_dataset()


@pytest.fixture(scope="session")
def tiny_eval():
    return tiny_dataset(300, seed=1)


@pytest.fixture(scope="session")
def tiny(tiny_ds):
    return tiny_model(tiny_ds)


@pytest.fixture()
def tiny_files(tmp_path, tiny, tiny_ds, tiny_eval):
    """The tiny model and sets on disk, as a user would have them."""
    model = tiny.save_onnx(tmp_path / "tiny.onnx")
    calib = tiny_ds.save(tmp_path / "calib.npz")
    ev = tiny_eval.save(tmp_path / "eval.npz")
    return {"model": model, "calib": calib, "eval": ev, "dir": tmp_path}


@pytest.fixture(scope="session")
def small_tp(tmp_path_factory):
    """A small T-P kettle model trained once per test process (TF): Keras model, nilmc Model and splits."""
    pytest.importorskip("tensorflow")
    from nilmc.calibration_data.windows import build_splits
    from nilmc.compiler.frontend import load_model
    from nilmc.training import TrainConfig, save_trained, train_seq2point

    sp = build_splits("T-P", appliances=("kettle",), seed=0, n_train=1000, n_val=100, n_calib=300, n_eval=300)
    keras_model, contract = train_seq2point(sp["train"], appliance="kettle", normalization="C",
                                            config=TrainConfig(epochs=2, batch_size=64))
    paths = save_trained(keras_model, contract, tmp_path_factory.mktemp("small_tp") / "tp")
    return {"keras": keras_model, "model": load_model(paths["keras"]), "splits": sp}

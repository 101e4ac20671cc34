from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import tiny_dataset, tiny_model  # noqa: E402


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

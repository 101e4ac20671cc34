"""One conformance suite, run against every registered backend and precision.

A backend's needs are data, read here: a precision in ``Capabilities.keras_precisions``
lowers from the Keras model, so it is exercised on a small trained Keras model (slow,
needs TensorFlow) instead of the TF-free ONNX one.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from nilmc.backends.base import Artifact, Runner, Verification, availability
from nilmc.backends.registry import BrokenPlugin, default_registry
from nilmc.quantization.context import QuantContext

REGISTRY = default_registry(plugins=False)
CASES = [
    pytest.param(b.name, p, id=f"{b.name}:{p}",
                 marks=[pytest.mark.slow, pytest.mark.tf] if b.capabilities.needs_keras(p) else [])
    for b in REGISTRY if not isinstance(b, BrokenPlugin) for p in b.capabilities.precisions
]


@pytest.fixture(scope="module")
def keras_tiny(tmp_path_factory, tiny_ds):
    """A small conv seq2point-shaped Keras model trained for one epoch (TF)."""
    from nilmc.compiler.frontend import load_model
    from nilmc.training import TrainConfig, save_trained, train_seq2point

    keras_model, contract = train_seq2point(tiny_ds, None, appliance="kettle", config=TrainConfig(epochs=2, seed=0))
    paths = save_trained(keras_model, contract, tmp_path_factory.mktemp("keras") / "tiny")
    return load_model(paths["keras"])


def _model_for(backend, precision, request):
    if backend.capabilities.needs_keras(precision):
        return request.getfixturevalue("keras_tiny")
    return request.getfixturevalue("tiny")


@pytest.mark.parametrize("name,precision", CASES)
def test_backend_conformance(name, precision, request, tmp_path, tiny_ds, tiny_eval):
    backend = REGISTRY.get(name)
    ok, why = availability(backend)
    if not ok:
        pytest.skip(f"{name} unavailable here: {why}")
    model = _model_for(backend, precision, request)
    quant = QuantContext(model, tiny_ds)
    options = {"calibration": tiny_ds, "quant": quant}

    out1, out2 = tmp_path / "a", tmp_path / "b"
    out1.mkdir(), out2.mkdir()
    art = backend.lower(model, out1, precision=precision, options=options)
    assert isinstance(art, Artifact) and art.backend == name and art.precision == precision
    assert art.path.is_file() and art.path.stat().st_size > 0
    for f in art.files:
        assert (out1 / f).is_file(), f"artifact lists {f} but did not write it"
    json.dumps(art.info)  # manifest-ready

    # No file may pretend to be a hardware artifact that was not built.
    if "engine_not_built" in art.info or art.info.get("engine_built") is False:
        assert not list(out1.rglob("*.engine")) and not list(out1.rglob("*.plan"))

    with backend.runner(art) as runner:
        assert isinstance(runner, Runner)
        assert Verification(runner.verification) in tuple(Verification)
        x = model.contract.prepare(tiny_eval.raw_x()[:37])
        y = np.asarray(next(iter(runner.infer({model.input_name: x}).values())))
    assert y.shape[0] == 37 and np.all(np.isfinite(y))

    # Same as the FP32 reference, within a loose tolerance (model units, std-scaled).
    import onnxruntime as ort

    sess = ort.InferenceSession(model.serialize(), providers=["CPUExecutionProvider"])
    ref = sess.run(None, {model.input_name: x})[0].reshape(37, -1)[:, 0]
    err = np.abs(y.reshape(37, -1)[:, 0] - ref)
    assert err.max() < 0.25 * max(1.0, np.abs(ref).max()), f"{name}:{precision} far from FP32: max err {err.max():.3g}"

    # Determinism: lowering again gives the same primary artifact, unless declared otherwise.
    if "nondeterministic_artifact" not in backend.capabilities.limitations:
        art2 = backend.lower(model, out2, precision=precision, options=options)
        assert (out2 / art2.primary).read_bytes() == art.path.read_bytes(), f"{name}:{precision} artifact is not deterministic"


def test_every_builtin_declares_capabilities():
    for b in REGISTRY:
        assert b.capabilities.precisions, b.name
        for p in b.capabilities.traits:
            assert p in b.capabilities.precisions, (b.name, p)

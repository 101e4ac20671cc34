"""``dpu:b2304_qat``: power-of-two QAT from the DPU PTQ fix points, then the same lowering (TF, slow)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from nilmc.backends.dpu import DPUBackend, DPUEmulatorRunner
from nilmc.backends.dpu.quant import fp32_outputs
from nilmc.backends.dpu.xmodel import read_xmodel
from nilmc.compiler.errors import BadInputError

pytestmark = [pytest.mark.slow, pytest.mark.tf]


@pytest.fixture(scope="module")
def keras_model(tmp_path_factory, tiny_ds):
    from nilmc.compiler.frontend import load_model
    from nilmc.training import TrainConfig, save_trained, train_seq2point

    km, contract = train_seq2point(tiny_ds, None, appliance="kettle", config=TrainConfig(epochs=3, seed=0))
    paths = save_trained(km, contract, tmp_path_factory.mktemp("dpu_qat") / "m")
    return load_model(paths["keras"])


@pytest.fixture(scope="module")
def lowered(keras_model, tiny_ds, tmp_path_factory):
    from nilmc.quantization.context import QuantContext

    ctx = QuantContext(keras_model, tiny_ds)
    out = {}
    for precision in ("b2304", "b2304_qat"):
        d = tmp_path_factory.mktemp(precision)
        # cpu_layers=input: PTQ keeps the head on the DPU as QAT does, so the two compare like for like
        opts = {"quant": ctx, "calibration": tiny_ds, "qat_epochs": 2, "qat_learning_rate": 1e-6, "cpu_layers": "input"}
        out[precision] = DPUBackend().lower(keras_model, d, precision=precision, options=opts)
    return out


def _emulated(art, model, x) -> np.ndarray:
    with DPUEmulatorRunner(art.directory / art.primary) as r:
        return next(iter(r.infer({model.input_name: x}).values())).reshape(-1)


def test_qat_precision_lowers_and_runs(lowered, keras_model, tiny_eval) -> None:
    art = lowered["b2304_qat"]
    assert "b2304_qat" in DPUBackend.capabilities.precisions and "needs_keras_source" in DPUBackend.capabilities.limitations
    qat = art.info["qat"]
    assert len(qat["held_out_mse_per_epoch"]) == 3 and qat["kept_epoch"] in (0, 1, 2)
    assert "tensorflow-model-optimization" in art.info["tools"]
    assert qat["trained_part"].startswith("DPU part from") and art.info["placement"]["float"][-1]["why"].startswith("precise input")
    y = _emulated(art, keras_model, keras_model.contract.prepare(tiny_eval.raw_x()))
    assert y.shape == (len(tiny_eval.x),) and np.isfinite(y).all()


def test_qat_fix_points_are_exact_powers_of_two(lowered) -> None:
    art = lowered["b2304_qat"]
    graph, params = read_xmodel((art.directory / art.primary).read_bytes())
    assert all(isinstance(v, int) for v in params.fix.values())
    for tq in art.info["quantization"]["tensors"].values():
        (fp,), (s,) = tq["fix_position"], tq["scale"]
        assert isinstance(fp, int) and s == math.ldexp(1.0, -fp)
    if art.info["qat"]["kept_epoch"]:  # the QAT activation fix points are what the xmodel carries
        for name, fp in art.info["qat"]["fix_points"].items():
            assert params.fix[name] == fp
        for op, fw in art.info["qat"]["weight_fix_points"].items():
            assert params.weights[op].fw == fw
    dpu_params = json.loads((art.directory / "dpu_params.json").read_text())
    assert dpu_params["method"]["traits"] == "dpu_pot"


def test_qat_not_worse_than_ptq_on_held_out_windows(lowered, keras_model, tiny_eval) -> None:
    x = keras_model.contract.prepare(tiny_eval.raw_x())
    ref = fp32_outputs(keras_model.graph, x).reshape(-1)
    mse = {p: float(np.mean((_emulated(a, keras_model, x) - ref) ** 2)) for p, a in lowered.items()}
    assert mse["b2304_qat"] <= 1.25 * mse["b2304"] + 1e-4, mse


def test_qat_is_deterministic(lowered, keras_model, tiny_ds, tmp_path) -> None:
    from nilmc.quantization.context import QuantContext

    opts = {"quant": QuantContext(keras_model, tiny_ds), "qat_epochs": 2, "qat_learning_rate": 1e-6, "cpu_layers": "input"}
    again = DPUBackend().lower(keras_model, tmp_path, precision="b2304_qat", options=opts)
    first = lowered["b2304_qat"]
    assert (tmp_path / again.primary).read_bytes() == (first.directory / first.primary).read_bytes()


def test_qat_needs_the_keras_source(tiny, tiny_ds, tmp_path) -> None:
    from nilmc.quantization.context import QuantContext

    with pytest.raises(BadInputError, match="Keras"):
        DPUBackend().lower(tiny, tmp_path, precision="b2304_qat", options={"quant": QuantContext(tiny, tiny_ds)})


def test_qat_that_learned_nothing_deploys_the_ptq_target(keras_model, tiny_ds, tmp_path) -> None:
    """Under cpu_layers=auto QAT trains with the head on the DPU; when its epoch 0 (the PTQ start) wins, the target
    deploys exactly what the PTQ target deploys (head on the CPU) and says so; otherwise the head stays on the DPU."""
    from nilmc.quantization.context import QuantContext

    ctx = QuantContext(keras_model, tiny_ds)
    arts = {p: DPUBackend().lower(keras_model, tmp_path / p, precision=p, options={"quant": ctx, "qat_epochs": 1, "qat_learning_rate": 1e-6})
            for p in ("b2304", "b2304_qat")}
    qat = arts["b2304_qat"].info["qat"]
    same = (tmp_path / "b2304_qat" / arts["b2304_qat"].primary).read_bytes() == (tmp_path / "b2304" / arts["b2304"].primary).read_bytes()
    if qat["kept_epoch"] == 0:
        assert same and "PTQ target's parameters and partition" in qat["deployed"]
    else:
        assert not same and qat["deployed"].startswith("fine-tuned weights")

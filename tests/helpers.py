"""Small, TensorFlow-free models and data sets for fast tests."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from nilmc.calibration_data.dataset import NilmDataset
from nilmc.calibration_data.normalization import FeatureStats, Normalization, NormalizationSpec, TargetScaling
from nilmc.compiler.contract import ModelContract
from nilmc.compiler.model import ONNX_IR_VERSION, ONNX_OPSET, Model


def tiny_dataset(n: int = 400, *, frames: int = 10, features: int = 9, seed: int = 0, scale: float = 100.0) -> NilmDataset:
    """Raw windows whose feature 0 of the middle frame drives a 'kettle' power."""
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(n, frames, features, 1)) * scale + 3 * scale).astype(np.float32)
    on = rng.random(n) < 0.3
    x[on, :, 0, 0] += 10 * scale
    y = np.where(on, 2000.0 + rng.normal(0, 50, n), rng.uniform(0, 5, n)).astype(np.float32)[:, None]
    stats = FeatureStats.fit(x)
    return NilmDataset(
        x=x, y=y, appliances=["kettle"], feature_names=[f"f{i}" for i in range(features)],
        train_stats=stats, target_mean=[float(y.mean())], target_std=[float(y.std())], on_thresholds=[1000.0],
        info={"setup": "tiny", "seed": seed},
    )


def tiny_model(ds: NilmDataset, *, hidden: int = 16, seed: int = 0) -> Model:
    """A two-layer MLP on the z-scored window, least-squares fitted so it predicts something real."""
    rng = np.random.default_rng(seed)
    spec = NormalizationSpec(Normalization.C, ds.train_stats)
    xn = spec.apply(ds.x).reshape(len(ds.x), -1).astype(np.float64)
    target = TargetScaling(float(ds.target_mean[0]), float(ds.target_std[0]))
    yn = target.from_watts(ds.y[:, 0]).astype(np.float64)
    w1 = rng.normal(0, 1 / np.sqrt(xn.shape[1]), size=(xn.shape[1], hidden))
    b1 = np.full(hidden, 0.1)
    h = np.maximum(xn @ w1 + b1, 0)
    a = np.c_[h, np.ones(len(h))]
    sol, *_ = np.linalg.lstsq(a, yn, rcond=None)
    w2, b2 = sol[:-1, None], sol[-1:]
    shape = list(ds.input_shape)
    inits = [
        numpy_helper.from_array(np.array([-1, int(np.prod(shape))], np.int64), "flat_shape"),
        numpy_helper.from_array(w1.astype(np.float32), "w1"), numpy_helper.from_array(b1.astype(np.float32), "b1"),
        numpy_helper.from_array(w2.astype(np.float32), "w2"), numpy_helper.from_array(b2.astype(np.float32), "b2"),
    ]
    nodes = [
        helper.make_node("Reshape", ["input", "flat_shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w1"], ["mm1"]), helper.make_node("Add", ["mm1", "b1"], ["a1"]),
        helper.make_node("Relu", ["a1"], ["r1"]),
        helper.make_node("MatMul", ["r1", "w2"], ["mm2"]), helper.make_node("Add", ["mm2", "b2"], ["output"]),
    ]
    g = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *shape])],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 1])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", ONNX_OPSET)])
    m.ir_version = ONNX_IR_VERSION
    onnx.checker.check_model(m)
    contract = ModelContract(
        input_shape=tuple(shape), normalization=spec, appliance="kettle", target=target,
        on_threshold_w=1000.0, peak_power_w=float(ds.y.max()), feature_names=tuple(ds.feature_names), setup="tiny",
    )
    return Model(m, contract, source="tiny")


def tp_context(tmp_path_factory, small_tp, dirname: str) -> dict:
    """The small trained T-P model (the ``small_tp`` fixture), its calibration / evaluation sets, the shared
    QuantContext and a fresh directory: what the TFLite / eIQ backend tests lower from."""
    import pytest

    pytest.importorskip("ai_edge_litert")
    from nilmc.quantization.context import QuantContext

    sp, model = small_tp["splits"], small_tp["model"]
    return {"model": model, "calib": sp["calib"], "eval": sp["eval"], "ctx": QuantContext(model, sp["calib"]),
            "dir": tmp_path_factory.mktemp(dirname)}

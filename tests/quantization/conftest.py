"""Small tf2onnx-shaped seq2point graphs built with onnx.helper (no TensorFlow)."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

WINDOW, FEATURES = 10, 9


def _init(name: str, value: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def build_seq2point(
    seed: int = 0, *, filters: tuple[int, int] = (8, 16), hidden: int = 32, features: int = FEATURES, weight_scale: float = 1.0
) -> onnx.ModelProto:
    """Transpose->Conv->Relu->Conv->Relu->Transpose->Reshape->MatMul->Add->Relu->MatMul->Add, as tf2onnx writes it."""
    rng = np.random.default_rng(seed)
    f1, f2 = filters
    flat = WINDOW * features * f2

    def he(shape: tuple[int, ...], fan_in: int) -> np.ndarray:
        return (rng.normal(0.0, np.sqrt(2.0 / fan_in), shape) * weight_scale).astype(np.float32)

    inits = [
        _init("conv1/W", he((f1, 1, 3, 3), 9)), _init("conv1/b", rng.normal(0, 0.1, f1).astype(np.float32)),
        _init("conv2/W", he((f2, f1, 3, 3), 9 * f1)), _init("conv2/b", rng.normal(0, 0.1, f2).astype(np.float32)),
        _init("dense1/W", he((flat, hidden), flat)), _init("dense1/b", rng.normal(0, 0.1, hidden).astype(np.float32)),
        _init("dense2/W", he((hidden, 1), hidden)), _init("dense2/b", np.array([0.05], np.float32)),
        _init("shape", np.array([-1, flat], np.int64)),
    ]
    pads = [1, 1, 1, 1]
    nodes = [
        helper.make_node("Transpose", ["input"], ["t0"], name="to_nchw", perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["t0", "conv1/W", "conv1/b"], ["c1"], name="conv1", pads=pads, kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "conv2/W", "conv2/b"], ["c2"], name="conv2", pads=pads, kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Transpose", ["r2"], ["t1"], name="to_nhwc", perm=[0, 2, 3, 1]),
        helper.make_node("Reshape", ["t1", "shape"], ["flat"], name="flatten"),
        helper.make_node("MatMul", ["flat", "dense1/W"], ["m1"], name="dense1"),
        helper.make_node("Add", ["m1", "dense1/b"], ["a1"], name="dense1_bias"),
        helper.make_node("Relu", ["a1"], ["r3"], name="relu3"),
        helper.make_node("MatMul", ["r3", "dense2/W"], ["m2"], name="dense2"),
        helper.make_node("Add", ["m2", "dense2/b"], ["output"], name="dense2_bias"),
    ]
    graph = helper.make_graph(
        nodes, "seq2point",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", WINDOW, features, 1])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 1])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


def windows(n: int, seed: int = 1, *, features: int = FEATURES, scale: float = 1.0, offset: float = 0.0) -> np.ndarray:
    """z-score-like windows (N, 10, F, 1); ``scale``/``offset`` make raw-watt-sized inputs."""
    rng = np.random.default_rng(seed)
    return (rng.normal(0.0, 1.0, (n, WINDOW, features, 1)) * scale + offset).astype(np.float32)


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    from nilmc.quantization.qdq import portable_weights  # as nilmc runs QDQ graphs: no int16 saturation on non-VNNI x86

    sess = ort.InferenceSession(portable_weights(model)[0].SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


@pytest.fixture
def seq2point() -> Callable[..., onnx.ModelProto]:
    return build_seq2point


@pytest.fixture
def make_windows() -> Callable[..., np.ndarray]:
    return windows


@pytest.fixture(scope="session")
def s2p_model() -> onnx.ModelProto:
    """The default test model (seed 0); do not mutate."""
    return build_seq2point()


@pytest.fixture(scope="session")
def s2p_stats(s2p_model: onnx.ModelProto):
    """Statistics of ``s2p_model`` on 512 calibration windows (seed 1)."""
    from nilmc.quantization.statistics import collect_statistics

    return collect_statistics(s2p_model, windows(512, seed=1))


@pytest.fixture
def calib() -> np.ndarray:
    return windows(512, seed=1)


@pytest.fixture
def evalset() -> np.ndarray:
    return windows(256, seed=2)


@pytest.fixture
def run_model() -> Callable[[onnx.ModelProto, np.ndarray], np.ndarray]:
    return run

"""Seed 000's edge model: a lightweight XGBoost regressor on simple window features, exchanged as ONNX.

The deployable model is one ONNX graph that takes the same window as every other nilmc model, ``(N, T, 1, 1)``
mains watts: a feature stage in plain ONNX ops (mean, standard deviation, minimum, maximum, the midpoint
sample, the mean of the 9 central samples, range and the largest step) feeds the trees, converted by
onnxmltools into an ONNX-ML ``TreeEnsembleRegressor`` (domain ``ai.onnx.ml``). Training reads the features
through that same ONNX feature stage on onnxruntime, so the trees see exactly the float32 values the
artifact computes; the converted graph is then checked against XGBoost's own predictions.

Only onnxruntime runs ONNX-ML ops: every other target refuses the model in its pre-check
(:func:`nilmc.backends.base.precheck`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from nilmc.calibration_data.dataset import NilmDataset
from nilmc.calibration_data.normalization import Normalization, NormalizationSpec, TargetScaling
from nilmc.compiler.contract import ModelContract
from nilmc.compiler.errors import BadInputError
from nilmc.compiler.model import ONNX_IR_VERSION, ONNX_OPSET

FEATURES = ("mean", "std", "min", "max", "midpoint", "mean_center9", "range", "max_abs_step")
CONVERTER_OPSET = 15  # the highest default-domain opset onnxmltools 1.16 converts XGBoost to


@dataclass(frozen=True)
class TreeConfig:
    """XGBoost options. Defaults: 120 trees of depth 5, learning rate 0.1, histogram method, one thread (deterministic), seed 0."""

    n_estimators: int = 120
    max_depth: int = 5
    learning_rate: float = 0.1
    seed: int = 0


def feature_graph(window: int) -> onnx.ModelProto:
    """The ONNX feature stage: ``input`` ``(N, window, 1, 1)`` (W) -> ``features`` ``(N, 8)`` (:data:`FEATURES`)."""
    mid = window // 2
    lo, hi = max(0, mid - 4), min(window, mid + 5)
    c = [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in (
        ("flat_shape", [-1, window]), ("ax1", [1]), ("mid_s", [mid]), ("mid_e", [mid + 1]), ("c_s", [lo]), ("c_e", [hi]),
        ("one", [1]), ("end", [window]), ("zero", [0]), ("last", [window - 1]))]
    n = helper.make_node
    nodes = [
        n("Reshape", ["input", "flat_shape"], ["x"]),
        n("ReduceMean", ["x"], ["f_mean"], axes=[1], keepdims=1),
        n("Sub", ["x", "f_mean"], ["xc"]), n("Mul", ["xc", "xc"], ["xc2"]),
        n("ReduceMean", ["xc2"], ["var"], axes=[1], keepdims=1), n("Sqrt", ["var"], ["f_std"]),
        n("ReduceMin", ["x"], ["f_min"], axes=[1], keepdims=1), n("ReduceMax", ["x"], ["f_max"], axes=[1], keepdims=1),
        n("Slice", ["x", "mid_s", "mid_e", "ax1"], ["f_mid"]),
        n("Slice", ["x", "c_s", "c_e", "ax1"], ["center"]), n("ReduceMean", ["center"], ["f_center"], axes=[1], keepdims=1),
        n("Sub", ["f_max", "f_min"], ["f_range"]),
        n("Slice", ["x", "one", "end", "ax1"], ["x_next"]), n("Slice", ["x", "zero", "last", "ax1"], ["x_prev"]),
        n("Sub", ["x_next", "x_prev"], ["steps"]), n("Abs", ["steps"], ["abs_steps"]),
        n("ReduceMax", ["abs_steps"], ["f_step"], axes=[1], keepdims=1),
        n("Concat", ["f_mean", "f_std", "f_min", "f_max", "f_mid", "f_center", "f_range", "f_step"], ["features"], axis=1),
    ]
    g = helper.make_graph(nodes, "window_features", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", window, 1, 1])],
                          [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", len(FEATURES)])], c)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", ONNX_OPSET)])
    m.ir_version = ONNX_IR_VERSION
    return m


def window_features(x: np.ndarray) -> np.ndarray:
    """The features of windows ``x`` ``(N, T, 1, 1)`` (W), computed by the ONNX feature stage on onnxruntime."""
    import onnxruntime as ort

    sess = ort.InferenceSession(feature_graph(int(x.shape[1])).SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(["features"], {"input": np.asarray(x, np.float32)})[0])


def tree_onnx(booster: Any, window: int) -> onnx.ModelProto:
    """Feature stage + the trees converted by onnxmltools: one graph ``input (N, T, 1, 1)`` -> ``output (N, 1)`` (W)."""
    from onnxmltools import convert_xgboost  # type: ignore[import-untyped]
    from onnxmltools.convert.common.data_types import FloatTensorType  # type: ignore[import-untyped]

    trees = convert_xgboost(booster, initial_types=[("features", FloatTensorType([None, len(FEATURES)]))],
                            target_opset=CONVERTER_OPSET)
    if any(n.domain in ("", "ai.onnx") for n in trees.graph.node):
        trees = onnx.version_converter.convert_version(trees, ONNX_OPSET)
    else:  # only ai.onnx.ml nodes: the default-domain opset is a label, raised to the feature stage's for the merge
        for imp in trees.opset_import:
            if imp.domain in ("", "ai.onnx"):
                imp.version = ONNX_OPSET
    out = trees.graph.output[0].name
    trees.graph.name = "xgboost_trees"
    trees.ir_version = ONNX_IR_VERSION
    merged = onnx.compose.merge_models(feature_graph(window), trees, io_map=[("features", "features")])
    # one output named "output", as nilmc's contracts expect
    for node in merged.graph.node:
        node.output[:] = ["output" if o == out else o for o in node.output]
    merged.graph.output[0].name = "output"
    merged.graph.name = "xgboost_edge"
    merged.graph.doc_string = ""  # the converter names its graph with a random uuid: keep the bytes deterministic
    merged.ir_version = ONNX_IR_VERSION
    del merged.metadata_props[:]
    onnx.checker.check_model(merged)
    return merged


def train_xgboost(train: NilmDataset, val: NilmDataset | None = None, *, appliance: str,
                  config: TreeConfig = TreeConfig()) -> tuple[onnx.ModelProto, ModelContract, dict[str, Any]]:
    """Train the edge regressor for ``appliance`` (watts at the window midpoint); returns ``(onnx, contract, info)``.

    ``info`` holds the parameter count (tree nodes), the MACs-free cost (comparisons per prediction) and the largest
    difference between XGBoost's predictions and the ONNX graph's on the validation (else training) windows.
    """
    import xgboost as xgb

    if train.x.shape[2] != 1:
        raise BadInputError(f"the XGBoost edge model takes one mains channel per step, the data has {train.x.shape[2]} features",
                            "use low-frequency data (nilmc data generate --setup LF-P)")
    k = train.appliance_index(appliance)
    model = xgb.XGBRegressor(n_estimators=config.n_estimators, max_depth=config.max_depth, learning_rate=config.learning_rate,
                             tree_method="hist", n_jobs=1, random_state=config.seed)
    model.fit(window_features(train.raw_x()), train.y[:, k])
    proto = tree_onnx(model, int(train.x.shape[1]))
    check = val if val is not None else train
    want = model.predict(window_features(check.raw_x()))
    import onnxruntime as ort

    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = np.asarray(sess.run(["output"], {"input": check.raw_x()})[0]).reshape(-1)
    n_nodes = sum(len(a.ints) for node in proto.graph.node if node.domain == "ai.onnx.ml" for a in node.attribute if a.name == "nodes_nodeids")
    contract = ModelContract(
        input_shape=train.input_shape, normalization=NormalizationSpec(Normalization.A, None), appliance=appliance,
        target=TargetScaling(0.0, 1.0), on_threshold_w=float(train.on_thresholds[k]) if train.on_thresholds else 10.0,
        peak_power_w=float(np.max(train.y[:, k])), feature_names=tuple(train.feature_names), setup=str(train.info.get("setup", "")),
        input_name="input", output_name="output",
    )
    info = {"model": "xgboost", "trees": config.n_estimators, "max_depth": config.max_depth, "tree_nodes": n_nodes,
            "parameters": n_nodes, "features": list(FEATURES),
            "comparisons_per_prediction": config.n_estimators * config.max_depth,
            "onnx_vs_xgboost_max_abs_diff_w": float(np.max(np.abs(got - want))), "checked_windows": int(len(want))}
    return proto, contract, info

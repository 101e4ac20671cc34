"""Input statistics from flags are one per feature: one number for a model of several features is refused, not spread."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from nilmc.compiler.contract_flags import ContractFlags, build_contract
from nilmc.compiler.errors import BadInputError


def _model(tmp_path, features: int) -> str:
    """(N, 10, F) -> ReduceMean -> (N, 1): only its input shape matters to the contract."""
    node = helper.make_node("ReduceMean", ["input"], ["output"], axes=[1, 2], keepdims=0)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 10, features])],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N"])])
    path = tmp_path / f"f{features}.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    return str(path)


def _flags(**kw) -> ContractFlags:
    return ContractFlags(appliance="fridge", layout="NWC", **kw)


@pytest.mark.parametrize(("norm", "stats", "flag"), [
    ("zscore", {"input_mean": "222.5", "input_std": "52,16,0.2"}, "--input-mean"),
    ("zscore", {"input_mean": "222,66,0.9", "input_std": "52.3"}, "--input-std"),
    ("minmax", {"input_min": "0", "input_max": "3000,1500,13"}, "--input-min"),
])
def test_one_number_for_three_features_is_refused_with_the_remedy(tmp_path, norm, stats, flag):
    with pytest.raises(BadInputError) as err:
        build_contract(_model(tmp_path, 3), _flags(input_norm=norm, **stats))
    msg = str(err.value)
    value = stats[flag[2:].replace("-", "_")]
    assert f"{flag} {float(value):g} is one number but the model takes 3 features" in msg
    assert f"{flag} {float(value):g},{float(value):g},{float(value):g}" in msg and "--input-stats-from DATA.npz" in msg


def test_one_value_per_feature_is_taken_as_given(tmp_path):
    c = build_contract(_model(tmp_path, 3), _flags(input_norm="zscore", input_mean="222,66,0.9", input_std="52,16,0.2"))
    np.testing.assert_allclose(c.normalization.stats.mean, [222, 66, 0.9])
    np.testing.assert_allclose(c.normalization.stats.std, [52, 16, 0.2])


def test_one_number_serves_a_one_feature_model(tmp_path):
    c = build_contract(_model(tmp_path, 1), _flags(input_norm="zscore", input_mean="222.5", input_std="52.4"))
    np.testing.assert_allclose(c.normalization.stats.mean, [222.5])


def test_a_wrong_count_names_the_feature_count(tmp_path):
    with pytest.raises(BadInputError, match="--input-mean has 2 values but the model takes 3 features.*give 3 comma-separated"):
        build_contract(_model(tmp_path, 3), _flags(input_norm="zscore", input_mean="1,2", input_std="1,1,1"))


def test_a_statistic_the_kind_does_not_use_is_reported_as_that(tmp_path):
    """min-max with --input-mean/--input-std: the error is the missing --input-min/--input-max, not the feature count."""
    with pytest.raises(BadInputError, match="--input-min/--input-max"):
        build_contract(_model(tmp_path, 3), _flags(input_norm="minmax", input_mean="1", input_std="2"))


def test_a_layout_that_makes_time_steps_features_says_how_it_read_the_input(tmp_path):
    """Fuzzed: a PyTorch Conv1d export (N, 1, 64) with --layout NWC was asked for 64 per-feature means, the 64 values
    spelled out; following that remedy then failed on the data. The remedy now says how the layout read the input."""
    node = helper.make_node("ReduceMean", ["input"], ["output"], axes=[1, 2], keepdims=0)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 64])],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N"])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "ncw.onnx")
    with pytest.raises(BadInputError) as err:
        build_contract(tmp_path / "ncw.onnx", _flags(input_norm="zscore", input_mean="221.8", input_std="52.3"))
    msg = str(err.value)
    assert "--layout NWC reads its input (1, 64) as T=1 steps of 64 features" in msg and "(64 values)" in msg, msg
    c = build_contract(tmp_path / "ncw.onnx", ContractFlags(appliance="fridge", input_norm="zscore", input_mean="221.8", input_std="52.3"))
    assert c.layout == "NCW" and c.input_shape == (64, 1, 1)  # left out, the layout is read from the shape

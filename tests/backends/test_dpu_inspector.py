"""The inspector places every layer on the DPU or the CPU under the chosen target's limits, with the reason."""
from __future__ import annotations

from nilmc.backends.dpu import testing
from nilmc.backends.dpu.inspector import CPU, DPU, inspect_graph
from nilmc.backends.dpu.ir import from_onnx
from nilmc.bitstreams import load_target

B2304, B4096 = load_target("b2304"), load_target("b4096")


def test_seq2point_runs_entirely_on_the_dpu() -> None:
    report = inspect_graph(from_onnx(testing.seq2point()), B2304)
    assert report.all_on_dpu and report.dpu_subgraphs == 1
    assert "all 10 ops run on the DPUCZDX8G_ISA1_B2304 DPU" in report.summary()
    conv2 = report.placement("conv2")
    assert conv2.details["in_size"] == 5 * 5 * 3 and conv2.details["max_channels"] == 3072  # ceil(32 / 12) = 3


def test_a_17_wide_kernel_falls_back_to_the_cpu() -> None:
    report = inspect_graph(from_onnx(testing.conv_layer(kernel=(1, 17), in_shape=(4, 20, 2))), B4096)
    p = report.placement("conv")
    assert p.device == CPU and p.reasons == ("kernel width 17 is outside [1, 16]",)
    assert report.cpu_ops == [p] and "1 of 2 ops fall back to the CPU" in report.summary()


def test_an_lstm_is_not_a_dpu_operator() -> None:
    report = inspect_graph(from_onnx(testing.lstm_model()), B2304)
    lstm = report.placement("lstm")
    assert lstm.device == CPU and lstm.kind == "LSTM" and "not a DPUCZDX8G operator" in lstm.reasons[0]
    head = report.placement("head")
    assert head.device == DPU  # the dense head after the CPU part is a DPU op again, in its own subgraph


def test_too_many_channels_depends_on_the_target() -> None:
    graph = from_onnx(testing.conv_layer(filters=3200, kernel=(1, 1), in_shape=(2, 2, 4)))
    on_2304 = inspect_graph(graph, B2304).placement("conv")
    on_4096 = inspect_graph(graph, B4096).placement("conv")
    assert on_2304.device == CPU and on_2304.reasons == ("3200 output channels exceed 256 * channel_parallel = 3072",)
    assert on_4096.device == DPU


def test_bank_depth_rule_uses_the_channel_parallelism() -> None:
    # 16x16 kernel over 128 channels: 256 * ceil(128/12) = 2816 > 2048 on B2304, 256 * ceil(128/16) = 2048 on B4096
    graph = from_onnx(testing.conv_layer(kernel=(16, 16), in_shape=(16, 16, 128), filters=4, pads=(0, 0, 0, 0)))
    p = inspect_graph(graph, B2304).placement("conv")
    assert p.device == CPU and "2816 exceeds the bank depth 2048" in p.reasons[0]
    assert inspect_graph(graph, B4096).placement("conv").device == DPU


def test_leaky_relu_slope_other_than_0_1_is_flagged() -> None:
    ok = inspect_graph(from_onnx(testing.conv_layer(activation="LeakyRelu", alpha=0.1)), B2304).placement("conv")
    bad = inspect_graph(from_onnx(testing.conv_layer(activation="LeakyRelu", alpha=0.3)), B2304).placement("conv")
    assert ok.device == DPU
    assert bad.device == CPU and "26/256" in bad.reasons[0]


def test_pooling_and_dense_limits() -> None:
    assert inspect_graph(from_onnx(testing.pool_layer("MaxPool")), B2304).all_on_dpu
    big_pool = inspect_graph(from_onnx(testing.pool_layer("AveragePool", in_shape=(12, 12, 2), kernel=(10, 10), stride=(1, 1))), B2304)
    assert big_pool.placement("pool").reasons[0] == "pool kernel width 10 is outside [1, 8]"
    wide = inspect_graph(from_onnx(testing.dense_layer(features=5000, units=4)), B4096).placement("dense")
    assert wide.device == CPU and "5000 input features exceed" in wide.reasons[0]


def test_report_json_lists_every_layer() -> None:
    report = inspect_graph(from_onnx(testing.lstm_model()), B2304)
    d = report.to_json()
    assert d["target"] == "DPUCZDX8G_ISA1_B2304" and not d["all_on_dpu"]
    assert len(d["layers"]) == len(report.placements) and "lstm" in d["cpu_ops"]
    assert all({"op", "device", "reasons"} <= set(row) for row in d["layers"])

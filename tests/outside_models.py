"""Models in the shapes users bring, built here (nilmc never designed for them): for the outside-model tests.

* :func:`ncw_conv1d_seq2seq` — an ONNX graph the way ``torch.onnx.export`` writes a four-layer Conv1d
  sequence-to-sequence model: input ``(N, 1, T)`` with a dynamic batch, ``Conv`` with 1-D kernels, a
  ``Shape -> Gather -> Unsqueeze -> Concat -> Reshape`` subgraph, a final ``Clip`` at 0 and a sequence output
  ``(N, 1, T)``; deterministic weights fitted so it predicts the appliance from the aggregate.
* :func:`lf_windows` — low-frequency windows ``(N, T, 1, 1)`` of aggregate power with an appliance whose
  midpoint power is the target, as nilmc's data format holds them.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from nilmc.calibration_data.dataset import NilmDataset
from nilmc.calibration_data.normalization import FeatureStats


def lf_windows(n: int = 600, t: int = 128, *, seed: int = 0, appliance: str = "fridge") -> NilmDataset:
    """Aggregate watts (a base load, noise and a fridge cycling at ~100 W) in windows; target = fridge at the midpoint."""
    rng = np.random.default_rng(seed)
    start = rng.integers(0, 40, n)
    steps = np.arange(t)[None, :] + start[:, None]
    period = 60 + rng.integers(0, 20, n)[:, None]
    fridge = np.where((steps % period) < period // 2, 100.0 + rng.normal(0, 3, (n, 1)), 0.0)
    base = 150.0 + 50.0 * rng.random((n, 1)) + rng.normal(0, 8, (n, t))
    agg = (base + fridge).astype(np.float32)
    x = agg[:, :, None, None]
    y = fridge[:, t // 2].astype(np.float32)[:, None]
    return NilmDataset(x=x, y=y, appliances=[appliance], feature_names=["P"], train_stats=FeatureStats.fit(x),
                       target_mean=[float(y.mean())], target_std=[float(y.std())], on_thresholds=[50.0],
                       info={"setup": "LF-P", "seed": seed, "window": t})


def _zscored(ds: NilmDataset, seed: int) -> tuple[np.random.Generator, int, float, float, np.ndarray]:
    """``(rng, T, mean, std, z-scored windows (N, T))`` for a builder fitting a model to ``ds``."""
    mean, std = float(ds.x.mean()), float(ds.x.std())
    return np.random.default_rng(seed), ds.x.shape[1], mean, std, ((ds.x[:, :, 0, 0] - mean) / std).astype(np.float64)


def ncw_conv1d_seq2seq(ds: NilmDataset, *, channels: int = 8, kernel: int = 9, seed: int = 0) -> onnx.ModelProto:
    """A PyTorch-style export: z-scored input (N, 1, T) -> 4 Conv1d -> Clip(0) -> (N, 1, T) appliance watts, z-scored."""
    rng, t, mean, std, xz = _zscored(ds, seed)
    pad = kernel // 2
    w1 = rng.normal(0, 1 / np.sqrt(kernel), (channels, 1, kernel))
    w2 = rng.normal(0, 1 / np.sqrt(channels * kernel), (channels, channels, kernel))
    w3 = rng.normal(0, 1 / np.sqrt(channels * kernel), (channels, channels, kernel))
    b = [np.full(channels, 0.05) for _ in range(3)]
    h = _conv1d_relu(xz[:, None, :], w1, b[0], pad)
    h = _conv1d_relu(h, w2, b[1], pad)
    h = _conv1d_relu(h, w3, b[2], pad)
    # last layer (1x1 conv) least-squares fitted to the appliance at every step it is known (the midpoint)
    mid = h[:, :, t // 2]
    y = ds.y[:, 0].astype(np.float64)
    ym, ys = float(y.mean()), float(y.std())
    sol, *_ = np.linalg.lstsq(np.c_[mid, np.ones(len(mid))], (y - ym) / ys, rcond=None)
    w4, b4 = sol[:-1].reshape(1, channels, 1), sol[-1:]
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for a, n in
             ((w1, "conv1.weight"), (b[0], "conv1.bias"), (w2, "conv2.weight"), (b[1], "conv2.bias"), (w3, "conv3.weight"),
              (b[2], "conv3.bias"), (w4, "conv4.weight"), (b4, "conv4.bias"))]
    inits += [numpy_helper.from_array(np.array(0, np.int64), "zero_idx"), numpy_helper.from_array(np.array([1], np.int64), "one"),
              numpy_helper.from_array(np.array([-1], np.int64), "minus_one"), numpy_helper.from_array(np.array(0.0, np.float32), "clip_min")]
    conv = {"kernel_shape": [kernel], "pads": [pad, pad], "strides": [1], "dilations": [1]}
    nodes = [
        helper.make_node("Conv", ["input", "conv1.weight", "conv1.bias"], ["/conv1/Conv_output_0"], name="/conv1/Conv", **conv),
        helper.make_node("Relu", ["/conv1/Conv_output_0"], ["/act1/Relu_output_0"], name="/act1/Relu"),
        helper.make_node("Conv", ["/act1/Relu_output_0", "conv2.weight", "conv2.bias"], ["/conv2/Conv_output_0"], name="/conv2/Conv", **conv),
        helper.make_node("Relu", ["/conv2/Conv_output_0"], ["/act2/Relu_output_0"], name="/act2/Relu"),
        helper.make_node("Conv", ["/act2/Relu_output_0", "conv3.weight", "conv3.bias"], ["/conv3/Conv_output_0"], name="/conv3/Conv", **conv),
        helper.make_node("Relu", ["/conv3/Conv_output_0"], ["/act3/Relu_output_0"], name="/act3/Relu"),
        helper.make_node("Conv", ["/act3/Relu_output_0", "conv4.weight", "conv4.bias"], ["/conv4/Conv_output_0"], name="/conv4/Conv",
                         kernel_shape=[1], pads=[0, 0], strides=[1], dilations=[1]),
        # torch's view(x.size(0), 1, -1): a dynamic Shape/Gather/Unsqueeze/Concat/Reshape subgraph
        helper.make_node("Shape", ["/conv4/Conv_output_0"], ["/Shape_output_0"], name="/Shape"),
        helper.make_node("Gather", ["/Shape_output_0", "zero_idx"], ["/Gather_output_0"], name="/Gather", axis=0),
        helper.make_node("Unsqueeze", ["/Gather_output_0", "zero_axes"], ["/Unsqueeze_output_0"], name="/Unsqueeze"),
        helper.make_node("Concat", ["/Unsqueeze_output_0", "one", "minus_one"], ["/Concat_output_0"], name="/Concat", axis=0),
        helper.make_node("Reshape", ["/conv4/Conv_output_0", "/Concat_output_0"], ["/Reshape_output_0"], name="/Reshape"),
        helper.make_node("Clip", ["/Reshape_output_0", "clip_min"], ["output"], name="/Clip"),
    ]
    inits.append(numpy_helper.from_array(np.array([0], np.int64), "zero_axes"))
    g = helper.make_graph(nodes, "main_graph", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch_size", 1, t])],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch_size", 1, t])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], producer_name="pytorch", producer_version="2.5.0")
    m.ir_version = 8
    onnx.checker.check_model(m)
    for key, value in (("input_mean", mean), ("input_std", std), ("target_mean", ym), ("target_std", ys)):
        m.metadata_props.add(key=f"training.{key}", value=repr(value))  # what the user's training script knows
    return m


def ncw_separable_conv1d(ds: NilmDataset, *, channels: int = 8, groups: int = 8, out_channels: int = 8, kernel: int = 9,
                         seed: int = 0) -> onnx.ModelProto:
    """A PyTorch-style depthwise-separable Conv1d export: z-scored input (N, 1, T) -> Conv1d(1, C) -> ReLU ->
    Conv1d(C, ``out_channels``, groups=``groups``) (depthwise when ``groups == C``) -> ReLU -> Conv1d 1x1 -> ReLU ->
    Flatten -> Linear (ridge fitted) -> (N, 1) appliance watts, z-scored."""
    rng, t, mean, std, xz = _zscored(ds, seed)
    pad, ci, og = kernel // 2, channels // groups, out_channels // groups
    w1 = rng.normal(0, 1 / np.sqrt(kernel), (channels, 1, kernel))
    wd = rng.normal(0, 1 / np.sqrt(kernel * ci), (out_channels, ci, kernel))
    wp = rng.normal(0, 1 / np.sqrt(out_channels), (channels, out_channels, 1))
    b1, bd, bp = np.full(channels, 0.05), np.full(out_channels, 0.05), np.full(channels, 0.05)
    h = _conv1d_relu(xz[:, None, :], w1, b1, pad)
    h = np.concatenate([_conv1d_relu(h[:, g * ci:(g + 1) * ci], wd[g * og:(g + 1) * og], bd[g * og:(g + 1) * og], pad)
                        for g in range(groups)], axis=1)
    h = _conv1d_relu(h, wp, bp, 0).reshape(len(h), -1)
    y = ds.y[:, 0].astype(np.float64)
    ym, ys = float(y.mean()), float(y.std())
    a = np.c_[h, np.ones(len(h))]
    sol = np.linalg.solve(a.T @ a + 1.0 * np.eye(a.shape[1]), a.T @ ((y - ym) / ys))
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for v, k in
             ((w1, "conv1.weight"), (b1, "conv1.bias"), (wd, "dw.weight"), (bd, "dw.bias"), (wp, "pw.weight"), (bp, "pw.bias"),
              (sol[:-1].reshape(1, -1), "fc.weight"), (sol[-1:], "fc.bias"))]
    conv = {"kernel_shape": [kernel], "pads": [pad, pad], "strides": [1], "dilations": [1]}
    nodes = [helper.make_node("Conv", ["input", "conv1.weight", "conv1.bias"], ["/conv1/Conv_output_0"], name="/conv1/Conv", **conv),
             helper.make_node("Relu", ["/conv1/Conv_output_0"], ["/act1/Relu_output_0"], name="/act1/Relu"),
             helper.make_node("Conv", ["/act1/Relu_output_0", "dw.weight", "dw.bias"], ["/dw/Conv_output_0"], name="/dw/Conv", group=groups,
                              **conv),
             helper.make_node("Relu", ["/dw/Conv_output_0"], ["/act2/Relu_output_0"], name="/act2/Relu"),
             helper.make_node("Conv", ["/act2/Relu_output_0", "pw.weight", "pw.bias"], ["/pw/Conv_output_0"], name="/pw/Conv",
                              kernel_shape=[1], pads=[0, 0], strides=[1], dilations=[1]),
             helper.make_node("Relu", ["/pw/Conv_output_0"], ["/act3/Relu_output_0"], name="/act3/Relu"),
             helper.make_node("Flatten", ["/act3/Relu_output_0"], ["/Flatten_output_0"], name="/Flatten", axis=1),
             helper.make_node("Gemm", ["/Flatten_output_0", "fc.weight", "fc.bias"], ["output"], name="/fc/Gemm", transB=1)]
    return _pytorch_export(nodes, inits, t, {"input_mean": mean, "input_std": std, "target_mean": ym, "target_std": ys})


def ncw_conv_avgpool(ds: NilmDataset, *, channels: int = 8, kernel: int = 5, sigmoid: bool = False, seed: int = 0) -> onnx.ModelProto:
    """A PyTorch-style export with pooling: z-scored input (N, 1, T) -> Conv1d -> ReLU -> AvgPool1d(2) -> Conv1d -> ReLU
    -> Flatten -> Linear (ridge fitted) -> (N, 1) appliance watts, z-scored; ``sigmoid``: a binary ON/OFF classifier,
    the Linear's output (the z-scored watts as a logit) through a Sigmoid."""
    rng, t, mean, std, xz = _zscored(ds, seed)
    pad = kernel // 2
    w1 = rng.normal(0, 1 / np.sqrt(kernel), (channels, 1, kernel))
    w2 = rng.normal(0, 1 / np.sqrt(kernel * channels), (channels, channels, kernel))
    b1, b2 = np.full(channels, 0.05), np.full(channels, 0.05)
    h = _conv1d_relu(xz[:, None, :], w1, b1, pad)
    h = h.reshape(len(h), channels, t // 2, 2).mean(axis=-1)
    h = _conv1d_relu(h, w2, b2, pad).reshape(len(h), -1)
    y = ds.y[:, 0].astype(np.float64)
    ym, ys = float(y.mean()), float(y.std())
    a = np.c_[h, np.ones(len(h))]
    sol = np.linalg.solve(a.T @ a + 1.0 * np.eye(a.shape[1]), a.T @ ((y - ym) / ys))
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for v, k in
             ((w1, "conv1.weight"), (b1, "conv1.bias"), (w2, "conv2.weight"), (b2, "conv2.bias"), (sol[:-1].reshape(1, -1), "fc.weight"),
              (sol[-1:], "fc.bias"))]
    conv = {"kernel_shape": [kernel], "pads": [pad, pad], "strides": [1], "dilations": [1]}
    nodes = [helper.make_node("Conv", ["input", "conv1.weight", "conv1.bias"], ["/conv1/Conv_output_0"], name="/conv1/Conv", **conv),
             helper.make_node("Relu", ["/conv1/Conv_output_0"], ["/act1/Relu_output_0"], name="/act1/Relu"),
             helper.make_node("AveragePool", ["/act1/Relu_output_0"], ["/pool/AveragePool_output_0"], name="/pool/AveragePool",
                              kernel_shape=[2], strides=[2]),
             helper.make_node("Conv", ["/pool/AveragePool_output_0", "conv2.weight", "conv2.bias"], ["/conv2/Conv_output_0"], name="/conv2/Conv",
                              **conv),
             helper.make_node("Relu", ["/conv2/Conv_output_0"], ["/act2/Relu_output_0"], name="/act2/Relu"),
             helper.make_node("Flatten", ["/act2/Relu_output_0"], ["/Flatten_output_0"], name="/Flatten", axis=1),
             helper.make_node("Gemm", ["/Flatten_output_0", "fc.weight", "fc.bias"], ["/fc/Gemm_output_0" if sigmoid else "output"],
                              name="/fc/Gemm", transB=1)]
    if sigmoid:
        nodes.append(helper.make_node("Sigmoid", ["/fc/Gemm_output_0"], ["output"], name="/Sigmoid"))
    return _pytorch_export(nodes, inits, t, {"input_mean": mean, "input_std": std, "target_mean": ym, "target_std": ys})


def _pytorch_export(nodes: list, inits: list, t: int, stats: dict[str, float]) -> onnx.ModelProto:
    """The (N, 1, T) -> (N, 1) graph of ``nodes`` as torch.onnx.export writes it, ``stats`` in its metadata."""
    g = helper.make_graph(nodes, "main_graph", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch_size", 1, t])],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch_size", 1])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], producer_name="pytorch", producer_version="2.5.0")
    m.ir_version = 8
    onnx.checker.check_model(m)
    for key, value in stats.items():
        m.metadata_props.add(key=f"training.{key}", value=repr(value))
    return m


def with_graph_zscore(m: onnx.ModelProto, mean: float, std: float) -> onnx.ModelProto:
    """``m`` with its input normalization inside the graph, as a PyTorch forward's ``(x - mean) / std`` (Sub, Div)."""
    out = onnx.ModelProto()
    out.CopyFrom(m)
    for n in out.graph.node:
        n.input[:] = ["xn" if i == "input" else i for i in n.input]
    out.graph.node.insert(0, helper.make_node("Div", ["xc", "in_std"], ["xn"], name="/norm/Div"))
    out.graph.node.insert(0, helper.make_node("Sub", ["input", "in_mean"], ["xc"], name="/norm/Sub"))
    out.graph.initializer.extend([numpy_helper.from_array(np.array(mean, np.float32), "in_mean"),
                                  numpy_helper.from_array(np.array(std, np.float32), "in_std")])
    onnx.checker.check_model(out)
    return out


def _conv1d_relu(x: np.ndarray, w: np.ndarray, b: np.ndarray, pad: int) -> np.ndarray:
    n, c, t = x.shape
    k = w.shape[2]
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad)))
    cols = np.stack([xp[:, :, i:i + t] for i in range(k)], axis=-1)  # (N, C, T, K)
    out = np.einsum("nctk,ock->not", cols, w) + b[None, :, None]
    return np.maximum(out, 0.0)


def export_stats(m: onnx.ModelProto) -> dict[str, float]:
    """The normalization statistics a user knows from their training script (stored here in the export's metadata)."""
    return {p.key.split(".", 1)[1]: float(p.value) for p in m.metadata_props if p.key.startswith("training.")}


def keras_conv1d_bilstm(ds: NilmDataset, path: str, *, seed: int = 0) -> None:
    """A Keras 2 model as the REDD-fridge one: (N, T, 1) -> Conv1D -> BatchNormalization -> BiLSTM -> Dropout -> Dense."""
    tf, k = _seeded_keras(seed)
    t = ds.x.shape[1]
    inp = k.Input((t, 1), name="aggregate")
    x = k.layers.Conv1D(8, 9, padding="same", activation="relu")(inp)
    x = k.layers.BatchNormalization()(x)
    x = k.layers.Bidirectional(k.layers.LSTM(8))(x)
    x = k.layers.Dropout(0.1)(x)
    out = k.layers.Dense(1)(x)
    _fit_and_save(k.Model(inp, out), ds, path, layout_axes=(t, 1))


def keras_separable_conv1d(ds: NilmDataset, path: str, *, seed: int = 0) -> None:
    """A Keras 2 model with a separable convolution: (N, T, 1) -> Conv1D -> SeparableConv1D -> Flatten -> Dense."""
    tf, k = _seeded_keras(seed)
    t = ds.x.shape[1]
    inp = k.Input((t, 1), name="aggregate")
    x = k.layers.Conv1D(8, 5, padding="same", activation="relu")(inp)
    x = k.layers.SeparableConv1D(8, 5, padding="same", activation="relu")(x)
    out = k.layers.Dense(1)(k.layers.Flatten()(x))
    _fit_and_save(k.Model(inp, out), ds, path, layout_axes=(t, 1))


def keras_bigru_tfop(ds: NilmDataset, path: str, *, seed: int = 0) -> None:
    """A Keras model as the UK-DALE-kettle one: (N, T) -> a TensorFlowOpLayer (tf.expand_dims) -> BiGRU -> Dense."""
    tf, k = _seeded_keras(seed)
    t = ds.x.shape[1]
    inp = k.Input((t,), name="aggregate")
    x = tf.expand_dims(inp, -1)  # a TFOpLambda layer in the saved model
    x = k.layers.Conv1D(4, 5, strides=4, padding="same", activation="relu")(x)
    x = k.layers.Bidirectional(k.layers.GRU(8))(x)
    out = k.layers.Dense(1)(x)
    _fit_and_save(k.Model(inp, out), ds, path, layout_axes=(t,))


def _seeded_keras(seed: int) -> tuple:
    """TensorFlow and its tf_keras, seeded for a reproducible test model."""
    from nilmc.compiler.tfcompat import import_tf

    tf = import_tf("building a test model")
    tf.keras.utils.set_random_seed(seed)
    return tf, tf.keras


def _fit_and_save(model, ds: NilmDataset, path: str, *, layout_axes: tuple[int, ...]) -> None:
    mean, std = float(ds.x.mean()), float(ds.x.std())
    x = ((ds.x[:, :, 0, 0] - mean) / std).reshape(len(ds.x), *layout_axes).astype(np.float32)
    ym, ys = float(ds.y.mean()), float(ds.y.std())
    model.compile("adam", "mse")
    model.fit(x, (ds.y[:, 0] - ym) / ys, epochs=2, batch_size=64, verbose=0)
    model.save(path)


def compile_ncw_from_flags(tmp_path, m: onnx.ModelProto, ds: NilmDataset, ev: NilmDataset, targets: str, *extra: object) -> tuple[object, dict]:
    """Save ``m``, ``ds`` (calibration) and ``ev`` (evaluation) under ``tmp_path`` and compile them for ``targets``
    through the CLI alone, the contract from flags as a PyTorch user passes them; ``(click result, {target: row})``."""
    import json

    from click.testing import CliRunner

    from nilmc.compiler.cli import cli

    onnx.save(m, tmp_path / "m.onnx")
    ds.save(tmp_path / "calib.npz")
    ev.save(tmp_path / "eval.npz")
    s = export_stats(m)
    r = CliRunner().invoke(cli, [str(a) for a in (
        "compile", tmp_path / "m.onnx", "--calib", tmp_path / "calib.npz", "--eval", tmp_path / "eval.npz", "--out", tmp_path / "out",
        "--targets", targets, "--output", "midpoint", "--input-norm", "zscore", "--input-mean", s["input_mean"],
        "--input-std", s["input_std"], "--target-mean", s["target_mean"], "--target-std", s["target_std"], "--appliance", "fridge",
        *extra, "--json")], catch_exceptions=False)
    return r, {t["target"]: t for t in json.loads(r.stdout)["targets"]}


def nchw_conv2d_tp(ds: NilmDataset, *, channels: int = 8, hidden: int = 0, groups: int = 1, seed: int = 0) -> onnx.ModelProto:
    """A PyTorch-style Conv2d export over T-P features: z-scored input (N, 1, T, F) (NCHW, one channel) -> Conv2d 3x3
    -> ReLU -> Conv2d 3x3 (``groups``; depthwise when it is ``channels``) -> ReLU -> Flatten [-> Linear ``hidden``
    -> ReLU] -> Linear (ridge fitted) -> (N, 1) appliance watts, z-scored."""
    rng = np.random.default_rng(seed)
    n, t, f = ds.x.shape[:3]
    mean, std = ds.x.mean(axis=(0, 1, 3)), ds.x.std(axis=(0, 1, 3))
    xz = ((ds.x[:, :, :, 0] - mean) / std)[:, None].astype(np.float64)  # (N, 1, T, F)
    w1 = rng.normal(0, 1 / 3, (channels, 1, 3, 3))
    ci, og = channels // groups, channels // groups
    w2 = rng.normal(0, 1 / np.sqrt(9 * ci), (channels, ci, 3, 3))
    b1, b2 = np.full(channels, 0.05), np.full(channels, 0.05)
    h = np.maximum(_conv2d(xz, w1, b1), 0)
    h = np.concatenate([_conv2d(h[:, g * ci:(g + 1) * ci], w2[g * og:(g + 1) * og], b2[g * og:(g + 1) * og]) for g in range(groups)], axis=1)
    h = np.maximum(h, 0).reshape(n, -1)  # torch.flatten: channel-major
    wh = rng.normal(0, 1 / np.sqrt(h.shape[1]), (hidden, h.shape[1]))
    bh = np.full(hidden, 0.05)
    if hidden:
        h = np.maximum(h @ wh.T + bh, 0)
    y = ds.y[:, 0].astype(np.float64)
    ym, ys = float(y.mean()), float(y.std())
    a = np.c_[h, np.ones(n)]
    sol = np.linalg.solve(a.T @ a + 1.0 * np.eye(a.shape[1]), a.T @ ((y - ym) / ys))  # ridge: moderate head weights
    inits = [numpy_helper.from_array(a.astype(np.float32), k) for a, k in
             ((w1, "conv1.weight"), (b1, "conv1.bias"), (w2, "conv2.weight"), (b2, "conv2.bias"),
              (sol[:-1].reshape(1, -1), "fc.weight"), (sol[-1:], "fc.bias"), *(((wh, "hidden.weight"), (bh, "hidden.bias")) if hidden else ()))]
    conv = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "strides": [1, 1]}
    nodes = [helper.make_node("Conv", ["input", "conv1.weight", "conv1.bias"], ["/conv1/Conv_output_0"], name="/conv1/Conv", **conv),
             helper.make_node("Relu", ["/conv1/Conv_output_0"], ["/act1/Relu_output_0"], name="/act1/Relu"),
             helper.make_node("Conv", ["/act1/Relu_output_0", "conv2.weight", "conv2.bias"], ["/conv2/Conv_output_0"], name="/conv2/Conv",
                              **conv, **({"group": groups} if groups > 1 else {})),
             helper.make_node("Relu", ["/conv2/Conv_output_0"], ["/act2/Relu_output_0"], name="/act2/Relu"),
             helper.make_node("Flatten", ["/act2/Relu_output_0"], ["/Flatten_output_0"], name="/Flatten", axis=1)]
    feat = "/Flatten_output_0"
    if hidden:
        nodes += [helper.make_node("Gemm", [feat, "hidden.weight", "hidden.bias"], ["/hidden/Gemm_output_0"], name="/hidden/Gemm", transB=1),
                  helper.make_node("Relu", ["/hidden/Gemm_output_0"], ["/act3/Relu_output_0"], name="/act3/Relu")]
        feat = "/act3/Relu_output_0"
    nodes.append(helper.make_node("Gemm", [feat, "fc.weight", "fc.bias"], ["output"], name="/fc/Gemm", transB=1))
    g = helper.make_graph(nodes, "main_graph", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch_size", 1, t, f])],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch_size", 1])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], producer_name="pytorch", producer_version="2.5.0")
    m.ir_version = 8
    onnx.checker.check_model(m)
    for i, (mu, sd) in enumerate(zip(mean, std)):
        m.metadata_props.add(key=f"training.input_mean_{i}", value=repr(float(mu)))
        m.metadata_props.add(key=f"training.input_std_{i}", value=repr(float(sd)))
    for key, value in (("target_mean", ym), ("target_std", ys)):
        m.metadata_props.add(key=f"training.{key}", value=repr(value))
    return m


def _conv2d(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """NCHW 3x3 convolution, padding 1, stride 1 (the reference the export is fitted on)."""
    n, c, hh, ww = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    cols = np.stack([xp[:, :, i:i + hh, j:j + ww] for i in range(3) for j in range(3)], axis=-1)  # (N, C, H, W, 9)
    return np.einsum("nchwk,ock->nohw", cols, w.reshape(w.shape[0], c, 9)) + b[None, :, None, None]

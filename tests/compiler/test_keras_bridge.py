"""Keras 3 -> tf_keras bridge (compiler/keras_bridge.py): tiny Keras 3 models rebuilt in tf_keras compute the same
outputs (checked here on inputs the bridge never saw), what it cannot rebuild is refused with the layer named, a twin
that drifts is refused with the layer and its max |diff|, and a Keras 3 file compiles to tflite:fp32 / tflite:int8."""
from __future__ import annotations

import json

import numpy as np
import pytest

from nilmc.compiler.keras_bridge import BRIDGEABLE_LAYERS, KerasBridgeError, bridge_precheck


def _keras3():
    from nilmc.compiler.tfcompat import import_keras3

    keras = import_keras3("test")
    keras.utils.set_random_seed(0)
    return keras


def _conv1d_dense(k):
    inp = k.Input((32, 1))
    h = k.layers.Conv1D(4, 5, padding="same", activation="relu")(inp)
    h = k.layers.MaxPooling1D(2)(h)
    h = k.layers.Dropout(0.2, seed=3)(h)
    return k.Model(inp, k.layers.Dense(1)(k.layers.Flatten()(h)))


def _conv2d_bn(k):
    inp = k.Input((8, 6, 1))
    h = k.layers.Conv2D(4, (3, 3), padding="same")(inp)
    h = k.layers.BatchNormalization()(h)
    h = k.layers.ReLU()(h)
    return k.Model(inp, k.layers.Dense(2)(k.layers.GlobalAveragePooling2D()(h)))


def _lstm(k):
    inp = k.Input((20, 1))
    h = k.layers.Conv1D(3, 3, padding="same", activation="relu")(inp)
    h = k.layers.LSTM(6)(h)
    return k.Model(inp, k.layers.Dense(1)(h))


def _norm_rescale_front(k):
    norm = k.layers.Normalization(axis=-1)
    norm.adapt(np.random.default_rng(0).normal(300.0, 80.0, (64, 24, 1)).astype(np.float32))
    inp = k.Input((24, 1))
    h = k.layers.Rescaling(0.5, offset=1.0)(norm(inp))
    h = k.layers.Conv1D(4, 3, padding="same")(h)
    h = k.layers.LayerNormalization()(h)
    return k.Model(inp, k.layers.Dense(1)(k.layers.Flatten()(h)))


def _sequential_add(k):
    inp = k.Input((16, 2))
    a = k.layers.Conv1D(4, 3, padding="same")(inp)
    b = k.layers.Conv1D(4, 1)(inp)
    body = k.Sequential([k.Input((16, 4)), k.layers.Conv1D(4, 3, padding="same", activation="relu"), k.layers.Flatten()])
    return k.Model(inp, k.layers.Dense(1)(body(k.layers.Add()([a, b]))))


def _sequential_top(k):
    return k.Sequential([k.Input((12, 1)), k.layers.Conv1D(3, 3, activation="relu"), k.layers.GlobalMaxPooling1D(), k.layers.Dense(1)])


def _nested_functional_shared(k):
    sub_in = k.Input((10, 2))
    sub = k.Model(sub_in, k.layers.Conv1D(3, 3, padding="same")(sub_in), name="sub")
    inp = k.Input((10, 2))
    shared = k.layers.Dense(2, name="shared")
    a, b = shared(inp), shared(k.layers.Activation("tanh")(inp))  # one layer, two calls (nodes 0 and 1)
    h = k.layers.Concatenate()([sub(a), sub(b)])
    return k.Model(inp, k.layers.Dense(1)(k.layers.Flatten()(h)))


@pytest.mark.tf
@pytest.mark.parametrize("build", [_conv1d_dense, _conv2d_bn, _lstm, _norm_rescale_front, _sequential_add, _sequential_top,
                                   _nested_functional_shared],
                         ids=["conv1d", "conv2d_bn", "lstm", "norm_rescale", "nested_sequential_add", "sequential",
                              "nested_functional_shared"])
def test_twin_computes_what_the_keras3_model_computes(build) -> None:
    from nilmc.compiler.keras_bridge import bridge_keras3
    from nilmc.compiler.tfcompat import import_tf

    k = _keras3()
    model = build(k)
    twin, report = bridge_keras3(model)
    assert isinstance(twin, import_tf().keras.Model) and type(twin).__module__.startswith("tf_keras")
    x = np.random.default_rng(7).normal(0.0, 3.0, (5, *model.inputs[0].shape[1:])).astype(np.float32)  # not a probe
    ref, got = np.asarray(model(x, training=False)), np.asarray(twin(x, training=False))
    assert ref.shape == got.shape and np.max(np.abs(ref - got)) <= 1e-5 * (1 + np.max(np.abs(ref)))
    assert report.max_abs_diff <= report.tolerance and report.probes == 8 and report.keras_version.startswith("3")


@pytest.mark.tf
def test_lambda_is_refused_before_any_rebuild() -> None:
    from nilmc.compiler.keras_bridge import bridge_keras3

    k = _keras3()
    inp = k.Input((8, 1))
    model = k.Model(inp, k.layers.Lambda(lambda t: t * 2.0, name="double")(k.layers.Dense(2)(inp)))
    with pytest.raises(KerasBridgeError) as err:
        bridge_keras3(model)
    text = str(err.value)
    assert "layer 'double' is a Lambda" in text and "--targets onnxruntime:int8" in text and "\n" not in text


@pytest.mark.tf
def test_keras_ops_nodes_are_refused_naming_the_first() -> None:
    from nilmc.compiler.keras_bridge import bridge_keras3

    k = _keras3()
    inp = k.Input((16, 1))
    h = k.layers.Dense(4)(inp) * 2.0  # a keras.ops Multiply node, not the Multiply layer
    model = k.Model(inp, k.layers.Dense(1)(k.layers.Flatten()(h)))
    with pytest.raises(KerasBridgeError, match=r"layer 'multiply' is Multiply from keras\.src\.ops"):
        bridge_keras3(model)


@pytest.mark.tf
def test_a_keras3_only_option_is_refused_naming_it() -> None:
    from nilmc.compiler.keras_bridge import bridge_keras3

    k = _keras3()
    inp = k.Input((8, 3))
    model = k.Model(inp, k.layers.LayerNormalization(rms_scaling=True, name="rms")(inp))
    with pytest.raises(KerasBridgeError, match=r"layer 'rms' \(LayerNormalization\) sets rms_scaling=True"):
        bridge_keras3(model)


@pytest.mark.tf
def test_a_twin_that_drifts_is_refused_with_the_layer_and_its_diff(monkeypatch) -> None:
    from nilmc.compiler import keras_bridge

    k = _keras3()
    inp = k.Input((10, 1))
    h = k.layers.Dense(4, activation="relu", name="d1")(inp)
    model = k.Model(inp, k.layers.Dense(1, name="d2")(h))
    copy = keras_bridge._copy_weights

    def copy_then_drift(src, dst):  # what a silently wrong weight layout would do
        copy(src, dst)
        kernel, bias = dst.get_layer("d2").get_weights()
        dst.get_layer("d2").set_weights([kernel, bias + 0.5])

    monkeypatch.setattr(keras_bridge, "_copy_weights", copy_then_drift)
    with pytest.raises(KerasBridgeError) as err:
        keras_bridge.bridge_keras3(model)
    text = str(err.value)
    assert "max |diff| 0.5" in text and "layer 'd2' (Dense)" in text and "'d1'" not in text, text


def test_precheck_reads_the_config_alone() -> None:
    layer = {"module": "keras.layers", "class_name": "Conv1D", "config": {"name": "c", "activation": "relu"}}
    ok = {"class_name": "Functional", "config": {"layers": [layer]}}
    assert bridge_precheck(ok) is None and "Conv1D" in BRIDGEABLE_LAYERS
    custom = {"module": "my_pkg.layers", "class_name": "Conv1D", "config": {"name": "mine"}}
    assert "layer 'mine' is Conv1D from my_pkg.layers" in str(bridge_precheck({"class_name": "Functional", "config": {"layers": [custom]}}))
    act = dict(layer, config={"name": "c", "activation": {"class_name": "swishy", "config": {}}})
    assert "custom activation" in str(bridge_precheck({"class_name": "Functional", "config": {"layers": [act]}}))
    wrapped = {"class_name": "Bidirectional", "config": {"name": "bi", "layer": {"class_name": "MyRNN", "config": {"name": "r"}}}}
    assert "layer 'r' is MyRNN" in str(bridge_precheck({"class_name": "Sequential", "config": {"layers": [wrapped]}}))
    assert "subclassed" in str(bridge_precheck({"class_name": "MyModel", "config": {}}))


@pytest.mark.slow
@pytest.mark.tf
@pytest.mark.tflite
def test_a_keras3_file_compiles_to_tflite_fp32_and_int8(tmp_path) -> None:
    from click.testing import CliRunner
    from outside_models import lf_windows

    from nilmc.compiler.cli import cli

    k = _keras3()
    inp = k.Input((32, 1))
    h = k.layers.Conv1D(6, 5, padding="same", activation="relu")(inp)
    h = k.layers.MaxPooling1D(2)(h)
    model = k.Model(inp, k.layers.Dense(1)(k.layers.Dense(8, activation="relu")(k.layers.Flatten()(h))))
    ds, ev = lf_windows(200, 32, seed=0), lf_windows(100, 32, seed=1)
    z = (ds.x[..., 0] - ds.x.mean()) / ds.x.std()
    model.compile("adam", "mse")
    model.fit(z.reshape(len(z), 32, 1), (ds.y - ds.y.mean()) / ds.y.std(), epochs=1, verbose=0)
    model.save(tmp_path / "m.keras")
    ds.save(tmp_path / "calib.npz")
    ev.save(tmp_path / "eval.npz")
    flags = ["--input-norm", "zscore", "--input-mean", float(ds.x.mean()), "--input-std", float(ds.x.std()),
             "--target-mean", float(ds.y.mean()), "--target-std", float(ds.y.std()), "--appliance", "fridge", "--on-threshold", 50]
    args = ["compile", tmp_path / "m.keras", "--calib", tmp_path / "calib.npz", "--eval", tmp_path / "eval.npz",
            "--out", tmp_path / "out", "--targets", "tflite:fp32,tflite:int8", *flags, "--json"]
    r = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    by = {t["target"]: t for t in json.loads(r.stdout)["targets"]}
    assert r.exit_code == 0, {t: v.get("error") for t, v in by.items()}
    for t, bundle in (("tflite:fp32", "tflite-fp32"), ("tflite:int8", "tflite-int8")):
        assert by[t]["passed"] and by[t]["verification"] == "measured", by[t]
        bridge = json.loads((tmp_path / "out" / bundle / "manifest.json").read_text())["artifact_info"]["keras_bridge"]
        assert bridge["source"] == "keras3" and bridge["max_abs_diff"] <= bridge["tolerance"], bridge
    assert abs(by["tflite:fp32"]["delta_eacc_pts"]) < 1e-3

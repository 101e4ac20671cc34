"""OpenVINO IR backend on the TF-free tiny model (fast)."""
from __future__ import annotations

import filecmp

import numpy as np
import onnxruntime as ort
import pytest

pytest.importorskip("openvino")

from nilmc.backends.base import Backend, Verification  # noqa: E402
from nilmc.backends.openvino_backend import (  # noqa: E402
    BIN,
    OPENVINO_INT8,
    XML,
    Int8NotExecutedError,
    OpenVINOBackend,
    _check_int8,
)
from nilmc.backends.registry import Registry  # noqa: E402
from nilmc.compiler.errors import DataError, UnknownBackendError  # noqa: E402
from nilmc.compiler.model import Model  # noqa: E402
from nilmc.quantization.context import QuantContext  # noqa: E402
from nilmc.quantization.qdq import build_qdq_model  # noqa: E402


@pytest.fixture(scope="module")
def quant(tiny, tiny_ds):
    return QuantContext(tiny, tiny_ds)


@pytest.fixture(scope="module")
def x_eval(tiny, tiny_eval):
    return tiny.contract.prepare(tiny_eval.raw_x())


@pytest.fixture(scope="module")
def lowered(tiny, quant, tmp_path_factory):
    backend = OpenVINOBackend()
    return {p: backend.lower(tiny, tmp_path_factory.mktemp(f"ov_{p}"), precision=p, options={"quant": quant})
            for p in backend.capabilities.precisions}


def _ort(proto, x):
    from nilmc.quantization.qdq import portable_weights

    return ort.InferenceSession(portable_weights(proto)[0].SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def test_is_a_backend_and_registers():
    backend = OpenVINOBackend()
    assert isinstance(backend, Backend)
    reg = Registry()
    reg.register(backend)
    assert reg.parse_target("openvino:fp16").precision == "fp16"
    assert backend.capabilities.requires == ("openvino",) and backend.capabilities.extra == "openvino"


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_artifact_is_xml_plus_bin_and_runs_measured(lowered, precision, x_eval):
    art = lowered[precision]
    assert art.primary == XML and set(art.files) == {XML, BIN}
    assert all((art.directory / f).stat().st_size > 0 for f in art.files)
    backend = OpenVINOBackend()
    with backend.runner(art) as r:
        assert r.verification is Verification.MEASURED
        batched = r.infer({"input": x_eval})["output"]
        single = np.concatenate([r.infer({"input": x_eval[i:i + 1]})["output"] for i in range(20)])
    assert batched.shape == (len(x_eval), 1)
    np.testing.assert_allclose(single, batched[:20], rtol=0, atol=1e-6)  # dynamic batch: same numbers


def test_fp32_and_fp16_match_the_onnx_reference(lowered, tiny, x_eval):
    ref = _ort(tiny.graph, x_eval)
    backend = OpenVINOBackend()
    for precision, atol in (("fp32", 1e-4), ("fp16", 2e-2)):
        with backend.runner(lowered[precision]) as r:
            np.testing.assert_allclose(r.infer({"input": x_eval})["output"], ref, rtol=0, atol=atol)


def test_int8_executes_nilmc_qdq_graph(lowered, tiny, quant, x_eval):
    """The INT8 IR computes what nilmc's QDQ graph computes in onnxruntime (same parameters)."""
    qdq = build_qdq_model(tiny.graph, quant.params(OPENVINO_INT8))
    with OpenVINOBackend().runner(lowered["int8"]) as r:
        got = r.infer({"input": x_eval})["output"]
    np.testing.assert_allclose(got, _ort(qdq, x_eval), rtol=0, atol=1e-4)


def test_int8_weights_use_seven_bits(lowered):
    """7-bit weights ([-63, 63]): pairs of u8 x s8 products fit int16, so the IR computes the same on a CPU without VNNI
    (measured on an AVX2 EPYC: the example CtRNN 23.2 dB with 8-bit weights, 28.2 dB with 7-bit)."""
    from nilmc.quantization.params import QuantParams

    params = QuantParams.from_json(lowered["int8"].info["quantization"])
    weights = [params.tensors[layer.weight] for layer in params.layers if layer.weight in params.tensors]
    assert weights and {w.range_name for w in weights} == {"int7_narrow"}, {w.range_name for w in weights}
    assert OPENVINO_INT8.weight_range.lo == -63 and OPENVINO_INT8.weight_range.hi == 63


def test_int8_layers_run_in_int8(lowered):
    info = lowered["int8"].info
    counts = info["runtime_precisions"]
    # the layer reading the input stays float (precise input: GENERIC_INT8 has float layers); the other runs INT8
    assert counts["FullyConnected"] == {"f32": 1, "u8": 1}
    assert [row["precision"] for row in info["runtime_layers"]].count("f32") <= 1
    assert "quantization" in info and info["tools"] == ["openvino"]


def test_fp32_layers_run_in_f32(lowered):
    assert lowered["fp32"].info["runtime_precisions"] == {"FullyConnected": {"f32": 2}}


def test_fp16_bin_is_about_half_and_says_what_it_means(lowered):
    fp32 = (lowered["fp32"].directory / BIN).stat().st_size
    fp16 = (lowered["fp16"].directory / BIN).stat().st_size
    assert 0.45 <= fp16 / fp32 <= 0.55
    note = lowered["fp16"].info["note"]
    assert "INFERENCE_PRECISION_HINT=f32" in note and "FP16" in note
    assert all(row["kernel"].endswith("f32") for row in lowered["fp16"].info["runtime_layers"])


def test_no_int8_layer_is_a_typed_error():
    with pytest.raises(Int8NotExecutedError, match="no Convolution/FullyConnected/MatMul in int8"):
        _check_int8([{"name": "mm", "type": "FullyConnected", "precision": "f32", "kernel": "brgemm_f32"}], ["mm"])


def test_int8_needs_calibration(tiny, tmp_path):
    with pytest.raises(DataError, match="calibration"):
        OpenVINOBackend().lower(tiny, tmp_path, precision="int8", options={})


def test_unknown_precision(tiny, tmp_path):
    with pytest.raises(UnknownBackendError, match="available: fp32, fp16, int8"):
        OpenVINOBackend().lower(tiny, tmp_path, precision="int4")


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_ir_is_byte_identical_between_lowerings(lowered, tiny, quant, tmp_path, precision):
    again = OpenVINOBackend().lower(tiny, tmp_path, precision=precision, options={"quant": quant})
    first = lowered[precision]
    assert all(filecmp.cmp(first.directory / f, again.directory / f, shallow=False) for f in first.files)


def test_static_batch_becomes_dynamic(tiny, tmp_path, x_eval):
    from onnx import TensorProto, helper

    proto = tiny.graph.__class__()
    proto.CopyFrom(tiny.graph)
    proto.graph.input[0].CopyFrom(helper.make_tensor_value_info("input", TensorProto.FLOAT, [4, *tiny.contract.input_shape]))
    static = Model(proto, tiny.contract)
    art = OpenVINOBackend().lower(static, tmp_path, precision="fp32")
    with OpenVINOBackend().runner(art) as r:
        assert r.infer({"input": x_eval[:7]})["output"].shape == (7, 1)


@pytest.mark.parametrize("flag, weight_range", [((), "int7_narrow"), (("--option", "openvino.weight_bits=8"), "int8")])
def test_weight_bits_option_through_the_cli(tmp_path, flag, weight_range):
    """``openvino.weight_bits=8`` gives the full 8-bit weights back (for CPUs with VNNI / AMX); the default is 7 bits."""
    import json

    from outside_models import compile_ncw_from_flags, lf_windows, ncw_conv1d_seq2seq

    ds, ev = lf_windows(200, 32, seed=0), lf_windows(100, 32, seed=1)
    r, by = compile_ncw_from_flags(tmp_path, ncw_conv1d_seq2seq(ds, channels=4, kernel=3), ds, ev, "openvino:int8", *flag)
    assert by["openvino:int8"]["passed"], by
    tensors = json.loads((tmp_path / "out" / "openvino-int8" / "manifest.json").read_text())["quantization"]["tensors"]
    assert {t["range_name"] for t in tensors.values() if t["role"] == "weight"} == {weight_range}


def test_weight_bits_other_than_7_or_8_is_bad_input(tmp_path):
    import json

    import onnx
    from click.testing import CliRunner
    from outside_models import lf_windows, ncw_conv1d_seq2seq

    from nilmc.compiler.cli import cli

    ds, ev = lf_windows(64, 32, seed=0), lf_windows(32, 32, seed=1)
    onnx.save(ncw_conv1d_seq2seq(ds, channels=4, kernel=3), tmp_path / "m.onnx")
    ds.save(tmp_path / "c.npz")
    ev.save(tmp_path / "e.npz")
    r = CliRunner().invoke(cli, [str(a) for a in (
        "compile", tmp_path / "m.onnx", "--calib", tmp_path / "c.npz", "--eval", tmp_path / "e.npz", "--out", tmp_path / "o",
        "--targets", "openvino:int8", "--output", "midpoint", "--input-norm", "zscore", "--input-mean", 200, "--input-std", 50,
        "--target-mean", 50, "--target-std", 40, "--appliance", "fridge", "--option", "openvino.weight_bits=6", "--json")])
    err = json.loads(r.stdout)["error"]
    assert r.exit_code == 2 and "weight_bits=6" in err["message"] and "7" in err["remedy"], err

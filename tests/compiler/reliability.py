"""The reliability corpus: bad inputs, tampered bundles, and how nilmc must answer them.

Shared by ``tests/compiler/test_reliability.py`` (one parametrized test per case) and
``benchmarks/bench_reliability.py`` (counts). A *bad input* case is handled when the CLI
exits 2 with exactly one line on stderr (``nilmc: error: ...; remedy.``), prints no
traceback, and leaves the working directory byte-for-byte as it was (nothing written,
nothing deleted). A *tamper* case is detected when ``nilmc verify`` exits non-zero with a
one-line reason.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers import tiny_dataset, tiny_model  # noqa: E402

from nilmc.compiler.cli import cli  # noqa: E402

# ---------------------------------------------------------------- the work directory


def make_workdir(root: Path) -> dict[str, Path]:
    """A user's directory: a model, calibration and evaluation sets, keys, a good compile output."""
    root.mkdir(parents=True, exist_ok=True)
    ds, ev = tiny_dataset(), tiny_dataset(300, seed=1)
    model = tiny_model(ds)
    files = {"root": root, "model": model.save_onnx(root / "model.onnx"), "calib": ds.save(root / "calib.npz"),
             "eval": ev.save(root / "eval.npz")}
    run("keygen", "--out", root / "key")
    run("keygen", "--out", root / "other")
    files.update(key=root / "key.key", pub=root / "key.pub", other_pub=root / "other.pub")
    res = run("compile", files["model"], "--calib", files["calib"], "--eval", files["eval"], "--targets",
              "onnxruntime:fp32,onnxruntime:int8", "--out", root / "good", "--max-delta", "eacc=100")
    assert res.exit_code == 0, res.output
    res = run("compile", files["model"], "--calib", files["calib"], "--eval", files["eval"], "--targets",
              "onnxruntime:fp32", "--out", root / "signed", "--sign", files["key"], "--max-delta", "eacc=100")
    assert res.exit_code == 0, res.output
    files.update(good=root / "good", signed=root / "signed")
    return files


def run(*args: object) -> Result:
    r = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=True)
    return Result(r.exit_code, r.stdout, r.stderr, r.exception if not isinstance(r.exception, SystemExit) else None)


@dataclass
class Result:
    exit_code: int
    stdout: str
    stderr: str
    exception: BaseException | None

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def snapshot(root: Path) -> dict[str, str]:
    """Every path under root with its content hash (directories as 'dir')."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "link:" + os.readlink(p)
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


# ---------------------------------------------------------------- bad inputs
@dataclass
class BadInput:
    id: str
    setup: Callable[[dict[str, Path]], list[object]]  # builds the bad file(s) under root/"bad", returns argv
    expect: int = 2


def _payloads() -> dict[str, bytes]:
    onnx_head = b"\x08\x07\x12\x07pytorch"  # a protobuf that stops mid-field
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w") as z:
        z.writestr("junk.txt", "not a keras archive")
    return {
        "empty": b"",
        "random": bytes(np.random.default_rng(0).integers(0, 256, 2048, dtype=np.uint8)),
        "text": b"hello, this is my thesis\n",
        "csv": b"timestamp,aggregate,kettle\n0,100.0,0.0\n1,2100.0,2000.0\n",
        "json_obj": b'{"model": "seq2point"}',
        "json_list": b"[1, 2, 3]",
        "pickle": pickle.dumps({"x": [1, 2, 3]}),
        "truncated_onnx": onnx_head,
        "zip_junk": zbuf.getvalue(),
        "hdf5_magic": b"\x89HDF\r\n\x1a\n" + b"\0" * 64,
    }


def _write(root: Path, name: str, data: bytes) -> Path:
    d = root / "bad"
    d.mkdir(exist_ok=True)
    p = d / name
    p.write_bytes(data)
    return p


def _model_cases() -> list[BadInput]:
    cases = []
    for pname, data in _payloads().items():
        for ext in (".onnx", ".keras", ".h5"):
            cases.append(BadInput(f"model-{pname}{ext}", lambda f, pname=pname, data=data, ext=ext: [
                "compile", _write(f["root"], f"m_{pname}{ext}", data), "--eval", f["eval"], "--out", f["root"] / "o"]))
    cases += [
        BadInput("model-missing", lambda f: ["compile", f["root"] / "nope.onnx", "--eval", f["eval"], "--out", f["root"] / "o"]),
        BadInput("model-empty-dir", lambda f: ["compile", _mkdir(f["root"] / "bad" / "emptydir"), "--eval", f["eval"], "--out", f["root"] / "o"]),
        BadInput("model-unknown-ext", lambda f: ["compile", _write(f["root"], "m.bin", b"\0" * 100), "--eval", f["eval"], "--out", f["root"] / "o"]),
        BadInput("model-fake-savedmodel", lambda f: ["compile", _fake_saved_model(f["root"]), "--eval", f["eval"], "--out", f["root"] / "o"]),
        BadInput("model-onnx-no-contract", lambda f: ["compile", _onnx_variant(f, "no_contract"), "--eval", f["eval"], "--out", f["root"] / "o"]),
        BadInput("model-onnx-bad-contract", lambda f: ["compile", _onnx_variant(f, "bad_contract"), "--eval", f["eval"], "--out", f["root"] / "o"]),
        BadInput("model-onnx-contract-list", lambda f: ["compile", _onnx_variant(f, "contract_list"), "--eval", f["eval"], "--out", f["root"] / "o"]),
        BadInput("model-onnx-two-inputs", lambda f: ["compile", _onnx_variant(f, "two_inputs"), "--eval", f["eval"], "--out", f["root"] / "o"]),
        BadInput("model-onnx-half", lambda f: ["compile", _write(f["root"], "half.onnx", f["model"].read_bytes()[: f["model"].stat().st_size // 2]),
                                                "--eval", f["eval"], "--out", f["root"] / "o"]),
    ]
    return cases


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def _fake_saved_model(root: Path) -> Path:
    d = _mkdir(root / "bad" / "saved_model")
    (d / "saved_model.pb").write_bytes(b"garbage")
    return d


def _onnx_variant(f: dict[str, Path], kind: str) -> Path:
    import onnx
    from onnx import TensorProto, helper

    m = onnx.load(str(f["model"]))
    props = {p.key: p.value for p in m.metadata_props}
    del m.metadata_props[:]
    if kind == "bad_contract":
        props["nilmc.contract"] = '{"input_shape": "ten"}'
    elif kind == "contract_list":
        props["nilmc.contract"] = "[1, 2]"
    elif kind == "no_contract":
        props.pop("nilmc.contract", None)
    elif kind == "two_inputs":
        m.graph.input.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, [1]))
    for k, v in props.items():
        m.metadata_props.add(key=k, value=v)
    p = f["root"] / "bad" / f"variant_{kind}.onnx"
    p.parent.mkdir(exist_ok=True)
    p.write_bytes(m.SerializeToString())
    return p


def _npz(root: Path, name: str, **arrays: object) -> Path:
    d = _mkdir(root / "bad")
    p = d / name
    with open(p, "wb") as fh:
        np.savez(fh, **arrays)
    return p


def _data_variants() -> dict[str, Callable[[dict[str, Path]], Path]]:
    def load(f: dict[str, Path]) -> tuple[np.ndarray, np.ndarray, dict]:
        with np.load(f["eval"]) as z:
            return z["x"], z["y"], json.loads(str(z["meta"]))

    def variant(name: str, fn: Callable[[np.ndarray, np.ndarray, dict], dict]) -> Callable[[dict[str, Path]], Path]:
        def build(f: dict[str, Path]) -> Path:
            x, y, meta = load(f)
            arrays = fn(x.copy(), y.copy(), meta)
            if "meta" in arrays and isinstance(arrays["meta"], (dict, list)):
                arrays["meta"] = np.array(json.dumps(arrays["meta"]))
            return _npz(f["root"], f"d_{name}.npz", **arrays)
        return build

    def zscored_label(x: np.ndarray, y: np.ndarray, m: dict) -> dict:
        m = dict(m, applied_normalization="C")  # raw features labelled as z-scored
        return {"x": x, "y": y, "meta": m}

    return {
        "no-x": variant("no-x", lambda x, y, m: {"y": y, "meta": m}),
        "no-y": variant("no-y", lambda x, y, m: {"x": x, "meta": m}),
        "no-meta": variant("no-meta", lambda x, y, m: {"x": x, "y": y}),
        "meta-list": variant("meta-list", lambda x, y, m: {"x": x, "y": y, "meta": [1, 2]}),
        "meta-bad-json": variant("meta-bad-json", lambda x, y, m: {"x": x, "y": y, "meta": np.array("{not json")}),
        "meta-version": variant("meta-version", lambda x, y, m: {"x": x, "y": y, "meta": dict(m, format_version=99)}),
        "meta-appliances-str": variant("meta-appliances-str", lambda x, y, m: {"x": x, "y": y, "meta": dict(m, appliances="kettle")}),
        "meta-norm-bogus": variant("meta-norm-bogus", lambda x, y, m: {"x": x, "y": y, "meta": dict(m, applied_normalization="Q")}),
        "x-float16": variant("x-float16", lambda x, y, m: {"x": x.astype(np.float16), "y": y, "meta": m}),
        "x-int32": variant("x-int32", lambda x, y, m: {"x": x.astype(np.int32), "y": y, "meta": m}),
        "y-float16": variant("y-float16", lambda x, y, m: {"x": x, "y": y.astype(np.float16), "meta": m}),
        "x-3d": variant("x-3d", lambda x, y, m: {"x": x[..., 0], "y": y, "meta": m}),
        "x-empty": variant("x-empty", lambda x, y, m: {"x": x[:0], "y": y[:0], "meta": m}),
        "y-rows": variant("y-rows", lambda x, y, m: {"x": x, "y": y[:-5], "meta": m}),
        "x-nan": variant("x-nan", lambda x, y, m: {"x": np.where(np.arange(x.size).reshape(x.shape) == 7, np.nan, x), "y": y, "meta": m}),
        "y-inf": variant("y-inf", lambda x, y, m: {"x": x, "y": np.where(np.arange(y.size).reshape(y.shape) == 3, np.inf, y), "meta": m}),
        "features-8": variant("features-8", lambda x, y, m: {"x": x[:, :, :8], "y": y, "meta": dict(m, feature_names=m["feature_names"][:8])}),
        "frames-5": variant("frames-5", lambda x, y, m: {"x": x[:, :5], "y": y, "meta": m}),
        "no-appliance": variant("no-appliance", lambda x, y, m: {"x": x, "y": y, "meta": dict(m, appliances=["fridge"])}),
        "x1000": variant("x1000", lambda x, y, m: {"x": x * 1000, "y": y, "meta": m}),
        "x1e30": variant("x1e30", lambda x, y, m: {"x": np.full_like(x, 1e30), "y": y, "meta": m}),
        "raw-labelled-zscore": variant("raw-labelled-zscore", zscored_label),
        "negative-truth": variant("negative-truth", lambda x, y, m: {"x": x, "y": y - 5000, "meta": m}),
        "x-object": variant("x-object", lambda x, y, m: {"x": np.array([object()] * 3, dtype=object), "y": y, "meta": m}),
    }


def _data_cases() -> list[BadInput]:
    cases = []
    for role in ("eval", "calib"):
        def argv(f: dict[str, Path], bad: Path, role: str = role) -> list[object]:
            ev, cal = (bad, f["calib"]) if role == "eval" else (f["eval"], bad)
            return ["compile", f["model"], "--eval", ev, "--calib", cal, "--targets", "onnxruntime:int8", "--out", f["root"] / "o"]

        for pname, data in _payloads().items():
            cases.append(BadInput(f"{role}-file-{pname}", lambda f, pname=pname, data=data, argv=argv: argv(f, _write(f["root"], f"d_{pname}.npz", data))))
        for vname, build in _data_variants().items():
            if role == "calib" and vname in ("negative-truth", "no-appliance"):
                continue  # truth and appliance of a calibration set are not used
            cases.append(BadInput(f"{role}-{vname}", lambda f, build=build, argv=argv: argv(f, build(f))))
        cases.append(BadInput(f"{role}-missing", lambda f, argv=argv: argv(f, f["root"] / "nope.npz")))
        cases.append(BadInput(f"{role}-directory", lambda f, argv=argv: argv(f, _mkdir(f["root"] / "bad" / "dir.npz"))))
    return cases


def _usage_cases() -> list[BadInput]:
    def c(**kw: object) -> Callable[[dict[str, Path]], list[object]]:
        def build(f: dict[str, Path]) -> list[object]:
            argv: list[object] = ["compile", f["model"], "--eval", f["eval"], "--calib", f["calib"]]
            targets = kw.get("targets", "onnxruntime:fp32")
            argv += ["--targets", targets]
            out = kw.get("out", f["root"] / "o")
            argv += ["--out", out(f) if callable(out) else out]
            for k in ("max_delta", "junit", "sign"):
                if k in kw:
                    v = kw[k]
                    argv += ["--" + k.replace("_", "-"), v(f) if callable(v) else v]
            return argv
        return build

    budgets = ["eacc=inf", "eacc=-1", "eacc=nan", "eacc=abc", "foo=1", "eacc=0.5,eacc=0.3", "eacc", "=1", "eacc=1e400", "mae=-0.1"]
    cases = [BadInput(f"budget-{b}", c(max_delta=b)) for b in budgets]
    targets = ["nosuch:int8", "onnxruntime:int4", "tflite", ":int8", "onnxruntime:fp32,onnxruntime:fp32x", "ONNXRUNTIME:fp32:x"]
    cases += [BadInput(f"targets-{t}", c(targets=t)) for t in targets]
    cases += [
        BadInput("out-empty", c(out="")),
        BadInput("out-proc", c(out="/proc/nilmc-x")),
        BadInput("out-is-file", c(out=lambda f: f["eval"])),
        BadInput("out-is-input-dir", c(out=lambda f: f["root"])),
        BadInput("out-dot-with-inputs", lambda f: ["compile", f["model"], "--eval", f["eval"], "--out", f["root"]]),
        BadInput("out-foreign", c(out=lambda f: _foreign(f["root"]))),
        BadInput("out-inside-input-dir", lambda f: ["compile", _fake_saved_model(f["root"]), "--eval", f["eval"],
                                                    "--out", f["root"] / "bad" / "saved_model" / "o"]),
        BadInput("junit-dir", c(junit=lambda f: _mkdir(f["root"] / "bad" / "jdir"))),
        BadInput("junit-proc", c(junit="/proc/nilmc-x/j.xml")),
        BadInput("junit-is-input", c(junit=lambda f: f["eval"])),
        BadInput("sign-missing", c(sign=lambda f: f["root"] / "nokey.key")),
        BadInput("sign-garbage", c(sign=lambda f: _write(f["root"], "g.key", b"-----BEGIN PRIVATE KEY-----\nxx\n"))),
        BadInput("sign-public-key", c(sign=lambda f: f["pub"])),
        BadInput("int8-without-calib", lambda f: ["compile", f["model"], "--eval", f["eval"], "--targets", "onnxruntime:int8", "--out", f["root"] / "o"]),
        BadInput("missing-eval-option", lambda f: ["compile", f["model"], "--out", f["root"] / "o"]),
        BadInput("unknown-option", lambda f: ["compile", f["model"], "--eval", f["eval"], "--out", f["root"] / "o", "--overwrite"]),
        BadInput("unknown-command", lambda f: ["frobnicate"]),
        BadInput("verify-missing", lambda f: ["verify", f["root"] / "nope", "--eval", f["eval"]]),
        BadInput("verify-no-manifest", lambda f: ["verify", _mkdir(f["root"] / "bad" / "empty_bundle"), "--eval", f["eval"]]),
        BadInput("verify-bad-eval", lambda f: ["verify", f["good"], "--eval", _write(f["root"], "v.npz", b"a,b\n1,2\n")]),
        BadInput("verify-trust-garbage", lambda f: ["verify", f["good"], "--eval", f["eval"], "--trust", _write(f["root"], "t.pub", b"nope")]),
        BadInput("verify-bad-budget", lambda f: ["verify", f["good"], "--eval", f["eval"], "--max-delta", "eacc=inf"]),
        BadInput("quantize-traits", lambda f: ["quantize", f["model"], "--calib", f["calib"], "--traits", "bogus"]),
        BadInput("quantize-estimator", lambda f: ["quantize", f["model"], "--calib", f["calib"], "--estimator", "bogus"]),
        BadInput("quantize-out-foreign", lambda f: ["quantize", f["model"], "--calib", f["calib"], "--out", _foreign(f["root"])]),
        BadInput("quantize-out-is-input-dir", lambda f: ["quantize", f["model"], "--calib", f["calib"], "--out", f["root"]]),
        BadInput("train-normalization", lambda f: ["train", "--appliance", "kettle", "--normalization", "Z", "--out", f["root"] / "bad" / "m"]),
        BadInput("train-epochs-0", lambda f: ["train", "--appliance", "kettle", "--epochs", "0", "--out", f["root"] / "bad" / "m"]),
        BadInput("data-generate-setup", lambda f: ["data", "generate", "--setup", "XX-Q", "--windows", "10", "--out", f["root"] / "bad" / "g.npz"]),
        BadInput("data-inspect-csv", lambda f: ["data", "inspect", _write(f["root"], "c.npz", b"a,b\n1,2\n")]),
        BadInput("data-inspect-pickle", lambda f: ["data", "inspect", _write(f["root"], "p.npz", pickle.dumps([1]))]),
        BadInput("data-convert-missing", lambda f: ["data", "convert", "refit", f["root"] / "nope.csv", "--out", f["root"] / "bad" / "c.npz"]),
        BadInput("keygen-existing", lambda f: ["keygen", "--out", f["root"] / "key"]),
        BadInput("keygen-empty", lambda f: ["keygen", "--out", ""]),
    ]
    return cases


def _foreign(root: Path) -> Path:
    d = _mkdir(root / "bad" / "thesis_dir")
    (d / "thesis.tex").write_text("my thesis")
    return d


def bad_input_cases() -> list[BadInput]:
    return _model_cases() + _data_cases() + _usage_cases()


@dataclass
class Outcome:
    handled: bool
    reasons: list[str] = field(default_factory=list)
    lost: int = 0  # files present before the case and missing or changed after it


def check_bad_input(case: BadInput, files: dict[str, Path]) -> Outcome:
    """Run one bad-input case; handled = exit 2, one error line with a remedy, no traceback, nothing written or lost."""
    argv = case.setup(files)  # the bad files are part of the "before"
    before = snapshot(files["root"])
    r = run(*argv)
    after = snapshot(files["root"])
    reasons = []
    if r.exit_code != case.expect:
        reasons.append(f"exit {r.exit_code}, expected {case.expect}")
    if r.exception is not None:
        reasons.append(f"uncaught {type(r.exception).__name__}: {r.exception}")
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("  .. ")]
    if len(lines) != 1 or not lines[0].startswith("nilmc: error: ") or "; " not in lines[0]:
        reasons.append(f"stderr is not one 'nilmc: error: ...; remedy' line: {r.stderr[-300:]!r}")
    if "Traceback" in r.output:
        reasons.append("traceback printed")
    lost = sum(1 for k, v in before.items() if after.get(k) != v)
    if before != after:
        changed = sorted(set(before.items()) ^ set(after.items()))
        reasons.append(f"files changed: {changed[:4]}")
    return Outcome(not reasons, reasons, lost)


# ---------------------------------------------------------------- tamper cases
@dataclass
class Tamper:
    id: str
    apply: Callable[[Path, dict[str, Path]], list[object]]  # mutates a copy of an output dir; returns the verify argv tail


def _manifest(b: Path) -> dict:
    return json.loads((b / "manifest.json").read_text())


def _write_manifest(b: Path, m: object) -> None:
    (b / "manifest.json").write_text(json.dumps(m, indent=2, sort_keys=True) + "\n")


def _flip(p: Path, at: int = 100) -> None:
    data = bytearray(p.read_bytes())
    data[at % len(data)] ^= 0x01
    p.write_bytes(bytes(data))


def _rehash(b: Path, m: dict) -> dict:
    for f in m["files"]:
        if (b / f["name"]).is_file():
            f["sha256"] = hashlib.sha256((b / f["name"]).read_bytes()).hexdigest()
    m["artifact"]["sha256"] = next((f["sha256"] for f in m["files"] if f["name"] == m["artifact"]["file"]), m["artifact"]["sha256"])
    return m


def _resummarize(out: Path, name: str) -> None:
    s = json.loads((out / "summary.json").read_text())
    s["bundles"][name]["manifest_sha256"] = hashlib.sha256((out / name / "manifest.json").read_bytes()).hexdigest()
    (out / "summary.json").write_text(json.dumps(s))


def _edit(fn: Callable[[dict], None], *, rehash: bool = False, resummarize: bool = False, bundle: str = "onnxruntime-int8"):
    def apply(out: Path, files: dict[str, Path]) -> list[object]:
        b = out / bundle
        m = _manifest(b)
        fn(m)
        _write_manifest(b, _rehash(b, m) if rehash else m)
        if resummarize:
            _resummarize(out, bundle)
        return [b]
    return apply


def _file_op(fn: Callable[[Path], None], bundle: str = "onnxruntime-int8"):
    def apply(out: Path, files: dict[str, Path]) -> list[object]:
        fn(out / bundle)
        return [out / bundle]
    return apply


def _record_and_manifest(record: str, section: str, mutate: Callable[[dict], None]):
    """Edit a hashed record and the manifest consistently (hashes too), leaving only summary.json to notice."""
    def apply(out: Path, files: dict[str, Path]) -> list[object]:
        b = out / "onnxruntime-int8"
        rec = json.loads((b / record).read_text())
        mutate(rec)
        (b / record).write_text(json.dumps(rec, indent=2, sort_keys=True) + "\n")
        m = _manifest(b)
        m[section] = rec
        _write_manifest(b, _rehash(b, m))
        return [b]
    return apply


def _set_path(d: dict, path: str, value: object) -> None:
    keys = path.split(".")
    for k in keys[:-1]:
        d = d[k]
    d[keys[-1]] = value


def tamper_cases() -> list[Tamper]:
    art = "model_qdq.onnx"
    cases = [
        Tamper("artifact-byte-flip", _file_op(lambda b: _flip(b / art))),
        Tamper("artifact-flip-empty-file-list", lambda out, f: (_flip(out / "onnxruntime-int8" / art), _edit(lambda m: m.update(files=[]))(out, f))[1]),
        Tamper("artifact-flip-rehashed", lambda out, f: (_flip(out / "onnxruntime-int8" / art), _edit(lambda m: None, rehash=True)(out, f))[1]),
        Tamper("extra-file", _file_op(lambda b: (b / "notes.txt").write_text("hi"))),
        Tamper("extra-dir-file", _file_op(lambda b: (_mkdir(b / "sub") / "x.bin").write_bytes(b"x"))),
        Tamper("listed-file-deleted", _file_op(lambda b: (b / "contract.json").unlink())),
        Tamper("listed-file-is-dir", _file_op(lambda b: ((b / "reference.json").unlink(), (b / "reference.json").mkdir()))),
        Tamper("artifact-symlink", _file_op(lambda b: (shutil.copy(b / art, b / "copy.onnx"), (b / art).unlink(), (b / art).symlink_to("copy.onnx")))),
        Tamper("manifest-deleted", _file_op(lambda b: (b / "manifest.json").unlink())),
        Tamper("manifest-not-json", _file_op(lambda b: (b / "manifest.json").write_text("{not json"))),
        Tamper("manifest-json-list", _file_op(lambda b: (b / "manifest.json").write_text("[1, 2]"))),
        Tamper("manifest-nan-literal", _file_op(lambda b: (b / "manifest.json").write_text(
            (b / "manifest.json").read_text().replace('"manifest_format": 2', '"manifest_format": 2, "x": NaN')))),
        Tamper("manifest-no-files-key", _edit(lambda m: m.pop("files"))),
        Tamper("manifest-format", _edit(lambda m: m.update(manifest_format=1))),
        Tamper("manifest-path-escape", _edit(lambda m: m["files"].append({"name": "../summary.json", "sha256": "0" * 64}))),
        Tamper("contract-norm-mean", _edit(lambda m: _bump_mean(m["contract"]))),
        Tamper("contract-on-threshold", _edit(lambda m: _set_path(m, "contract.on_threshold_w", 1.0))),
        Tamper("contract-record-consistent", _record_and_manifest("contract.json", "contract", lambda c: c.update(on_threshold_w=1.0))),
        Tamper("reference-eacc", _edit(lambda m: _set_path(m, "reference.metrics.eacc", 0.99))),
        Tamper("verification-reference-eacc", _edit(lambda m: _set_path(m, "verification.reference.eacc", 0.99))),
        Tamper("reference-record-consistent", _record_and_manifest("reference.json", "reference", lambda r: r["metrics"].update(eacc=0.99))),
        Tamper("budget-raised", _edit(lambda m: _set_path(m, "verification.budget", {"eacc": 1e9}), rehash=True)),
        Tamper("quantization-section", _edit(lambda m: _set_path(m, "quantization.traits", {"name": "forged"}))),
        Tamper("quantization-record-consistent", _record_and_manifest("quantization.json", "quantization", lambda q: q.update(forged=True))),
        Tamper("artifact-points-elsewhere", _edit(lambda m: m["artifact"].update(file="contract.json"))),
        Tamper("artifact-sha-changed", _edit(lambda m: m["artifact"].update(sha256="0" * 64))),
        Tamper("summary-sha-changed", lambda out, f: (
            _summary_edit(out, lambda s: s["bundles"]["onnxruntime-int8"].update(manifest_sha256="0" * 64)), [out / "onnxruntime-int8"])[1]),
        Tamper("summary-bundle-removed", lambda out, f: (_summary_edit(out, lambda s: s["bundles"].pop("onnxruntime-int8")), [out / "onnxruntime-int8"])[1]),
        Tamper("summary-malformed", lambda out, f: ((out / "summary.json").write_text("[]"), [out / "onnxruntime-int8"])[1]),
        Tamper("manifests-swapped", lambda out, f: (
            shutil.copy(out / "onnxruntime-fp32" / "manifest.json", out / "onnxruntime-int8" / "manifest.json"), [out / "onnxruntime-int8"])[1]),
        Tamper("whole-dir-one-bad", lambda out, f: (_flip(out / "onnxruntime-int8" / art), [out])[1]),
        Tamper("staging-dir", lambda out, f: (shutil.copytree(out / "onnxruntime-int8", out / ".nilmc-part-1-abcd" / "onnxruntime-int8"),
                                               [out / ".nilmc-part-1-abcd" / "onnxruntime-int8"])[1]),
        Tamper("signed-other-key", lambda out, f: [out / "onnxruntime-fp32", "--trust", f["other_pub"]]),
        Tamper("signed-edited-resummarized", lambda out, f: (_edit(lambda m: _set_path(m, "verification.budget", {"eacc": 1e9}), resummarize=True,
                                                                   bundle="onnxruntime-fp32")(out, f), [out / "onnxruntime-fp32", "--trust", f["pub"]])[1]),
        Tamper("signature-garbage", lambda out, f: (
            (out / "onnxruntime-fp32" / "manifest.sig").write_text("{}"), [out / "onnxruntime-fp32", "--trust", f["pub"]])[1]),
        Tamper("signature-removed", lambda out, f: ((out / "onnxruntime-fp32" / "manifest.sig").unlink(), [out / "onnxruntime-fp32", "--trust", f["pub"]])[1]),
    ]
    return cases


def _bump_mean(contract: dict) -> None:
    stats = contract["normalization"]["stats"]
    stats["mean"][0] = float(stats["mean"][0]) + 1.0


def _summary_edit(out: Path, fn: Callable[[dict], None]) -> None:
    s = json.loads((out / "summary.json").read_text())
    fn(s)
    (out / "summary.json").write_text(json.dumps(s))


SIGNED_CASES = ("signed-other-key", "signed-edited-resummarized", "signature-garbage", "signature-removed")


def check_tamper(case: Tamper, files: dict[str, Path], work: Path) -> Outcome:
    """Copy the good (or signed) output, tamper, verify: detected = exit != 0 and a one-line reason, no traceback."""
    src = files["signed"] if case.id in SIGNED_CASES else files["good"]
    out = work / f"t_{case.id}"
    shutil.copytree(src, out, symlinks=True)
    argv_tail = case.apply(out, files)
    r = run("verify", *argv_tail, "--eval", files["eval"])
    reasons = []
    if r.exit_code == 0:
        reasons.append("verify passed")
    if r.exception is not None:
        reasons.append(f"uncaught {type(r.exception).__name__}: {r.exception}")
    if r.exit_code == 3:
        reasons.append("internal error")
    if "Traceback" in r.output:
        reasons.append("traceback printed")
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    if len(err) != 1:
        reasons.append(f"expected one reason line on stderr, got {err!r}")
    return Outcome(not reasons, reasons)

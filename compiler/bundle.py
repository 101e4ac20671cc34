"""Bundles: one directory per target, tamper-evident, and the ``verify`` that cannot be fooled.

A bundle holds the artifact files, three records the manifest also shows —
``contract.json`` (the input/output contract), ``reference.json`` (the FP32 reference
metrics and the identity of the evaluation set they were measured on) and, for quantized
targets, ``quantization.json`` — and ``manifest.json``: the sha256 of every file, the
tool versions, those records, and the verification report. The manifest is canonical
JSON with no timing fields (those live in ``summary.json``), so two identical builds give
byte-identical manifests; its own sha256 is recorded in ``summary.json`` beside the
bundles, and ``manifest.sig`` (optional) signs it with Ed25519.

:func:`verify_bundle` refuses a staging directory and a malformed manifest, then checks
every listed file's hash, the artifact's hash, that no file is unlisted, that the
manifest's contract / quantization / reference equal the hashed records, the manifest's
hash against ``summary.json`` when the bundle sits in a compile output, and the
signature when a trusted key is given; only then does it run the artifact.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np

import nilmc
from nilmc.backends.base import Artifact
from nilmc.compiler.errors import BundleError, DataError
from nilmc.compiler.io import atomic_write_bytes, atomic_write_json, canonical_json_bytes, sha256_bytes, sha256_file, strict_json_value, strict_loads
from nilmc.compiler.outdir import BUNDLE_SIGNATURE, is_staging

if TYPE_CHECKING:
    from nilmc.backends.registry import Registry, Target
    from nilmc.calibration_data.dataset import NilmDataset
    from nilmc.compiler.compare import Report
    from nilmc.compiler.model import Model
    from nilmc.compiler.signing import Signer, TrustedKey

MANIFEST = "manifest.json"
SUMMARY = "summary.json"
MANIFEST_FORMAT = 2
CONTRACT_FILE = "contract.json"
REFERENCE_FILE = "reference.json"
QUANT_FILE = "quantization.json"
# manifest section -> the hashed record it must equal
RECORDS = {"contract": CONTRACT_FILE, "reference": REFERENCE_FILE, "quantization": QUANT_FILE}
# Manifest keys and the JSON types they must have (a manifest that lacks one is malformed).
_SCHEMA: dict[str, type | tuple[type, ...]] = {
    "manifest_format": int, "nilmc_version": str, "target": str, "backend": str, "precision": str,
    "artifact": dict, "files": list, "contract": dict, "reference": dict, "verification": dict,
}


def bundle_name(t: Target) -> str:
    return f"{t.backend}-{t.precision}"


def _array_sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def eval_identity(ds: NilmDataset) -> dict[str, Any]:
    """What makes two evaluation sets the same one: arrays *and* their normalization metadata."""
    return {
        "windows": ds.n_windows,
        "sha256_x": _array_sha(ds.x),
        "sha256_y": _array_sha(ds.y),
        "applied_normalization": ds.applied_normalization.value,
        "train_stats_sha256": sha256_bytes(canonical_json_bytes(None if ds.train_stats is None else ds.train_stats.to_json())),
        "appliances": list(ds.appliances),
    }


def _is_timing(key: str) -> bool:
    return key == "seconds" or key.endswith("_s")


def split_timings(obj: Any, path: str = "") -> tuple[Any, dict[str, Any]]:
    """``obj`` without run-to-run timing fields (keys ``seconds`` or ``*_s``, at any depth) and those fields by dotted path.

    Timings go to summary.json; the hashed manifest keeps only what two identical builds agree on.
    """
    timings: dict[str, Any] = {}
    if isinstance(obj, dict):
        clean = {}
        for k, v in obj.items():
            where = f"{path}.{k}" if path else str(k)
            if _is_timing(str(k)):
                timings[where] = v
                continue
            clean[k], sub = split_timings(v, where)
            timings.update(sub)
        return clean, timings
    if isinstance(obj, list):
        items = [split_timings(v, f"{path}[{i}]") for i, v in enumerate(obj)]
        for _, sub in items:
            timings.update(sub)
        return [c for c, _ in items], timings
    return obj, timings


@dataclass
class BundleWriter:
    """Writes the records and the canonical manifest of each bundle of one compile."""

    model: Model
    eval_ds: NilmDataset
    reference_sha256: str
    signer: Signer | None = None

    def write(self, bundle: Path, target: Target, art: Artifact, report: Report,
              sections: Mapping[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
        """Write records, manifest (and signature); returns the manifest's sha256 and the timings kept out of it.

        ``sections``: further manifest sections the driver owns (``overflow``, ``backend_options``)."""
        from nilmc.compiler.driver import tool_versions

        info, timings = split_timings({k: v for k, v in art.info.items() if k != "tools"})
        records: dict[str, Any] = {
            "contract": self.model.contract.to_json(),
            "reference": {"metrics": report.reference.to_json(), "eval_set": eval_identity(self.eval_ds),
                          "reference_model_sha256": self.reference_sha256},
        }
        if info.get("quantization") is not None:
            records["quantization"] = info["quantization"]
        for key, value in records.items():
            atomic_write_json(bundle / RECORDS[key], value)
        manifest = {
            "manifest_format": MANIFEST_FORMAT,
            "nilmc_version": nilmc.__version__,
            "target": str(target),
            "backend": target.backend,
            "precision": target.precision,
            "artifact": {"file": art.primary, "kind": art.kind, "sha256": sha256_file(bundle / art.primary)},
            "files": _files_manifest(bundle),
            "tool_versions": tool_versions(tuple(art.info.get("tools", ())) + ("onnx", "onnxruntime", "numpy")),
            **records,
            "verification": report.to_json(),
            "artifact_info": {k: v for k, v in info.items() if k != "quantization"},
        }
        extra, more_timings = split_timings(dict(sections or {}))
        manifest.update(extra)
        timings.update(more_timings)
        data = canonical_json_bytes(manifest)
        atomic_write_bytes(bundle / MANIFEST, data)
        if self.signer is not None:
            self.signer.sign_file(bundle / MANIFEST, bundle / BUNDLE_SIGNATURE)
        return sha256_bytes(data), timings


def _files_manifest(directory: Path) -> list[dict[str, Any]]:
    return [
        {"name": p.relative_to(directory).as_posix(), "sha256": sha256_file(p), "size": p.stat().st_size}
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name not in (MANIFEST, BUNDLE_SIGNATURE)
    ]


# ---------------------------------------------------------------- reading and checking
def read_manifest(bundle: Path) -> dict[str, Any]:
    """The manifest of ``bundle``, strictly parsed and schema-checked (:class:`BundleError` otherwise)."""
    bundle = Path(bundle)
    if is_staging(bundle):
        raise BundleError(f"{str(bundle)!r} is an unfinished staging directory of an interrupted nilmc run",
                          "verify the finished output directory; rerun the compile to clean it up")
    path = bundle / MANIFEST
    if not path.is_file():
        raise BundleError(f"{str(bundle)!r} has no {MANIFEST}", "point at a target bundle directory written by nilmc compile")
    try:
        manifest = strict_loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as exc:
        raise BundleError(f"{str(path)!r} is not valid JSON ({exc})", "recompile the bundle") from None
    problems = _schema_problems(manifest)
    if problems:
        raise BundleError(f"{str(path)!r} is malformed: {'; '.join(problems[:4])}", "recompile the bundle with this nilmc")
    return manifest


def _schema_problems(m: Any) -> list[str]:
    if not isinstance(m, dict):
        return [f"top level is a JSON {type(m).__name__}, expected an object"]
    out = [f"{k!r} missing or not a {t.__name__ if isinstance(t, type) else t}" for k, t in _SCHEMA.items()
           if not isinstance(m.get(k), t) or isinstance(m.get(k), bool)]
    if out:
        if "manifest_format" in str(out) and isinstance(m.get("files"), list):
            out.append(f"manifest_format {m.get('manifest_format')!r} (this nilmc writes {MANIFEST_FORMAT})")
        return out
    if m["manifest_format"] != MANIFEST_FORMAT:
        return [f"manifest_format {m['manifest_format']} is not {MANIFEST_FORMAT}, the one this nilmc writes"]
    for i, f in enumerate(m["files"]):
        if not (isinstance(f, dict) and isinstance(f.get("name"), str) and isinstance(f.get("sha256"), str)):
            out.append(f"files[{i}] is not a {{name, sha256}} record")
    art = m["artifact"]
    if not (isinstance(art.get("file"), str) and isinstance(art.get("sha256"), str)):
        out.append("artifact lacks file/sha256")
    return out


def _safe_name(name: str) -> bool:
    p = PurePosixPath(name)
    return bool(name) and not p.is_absolute() and ".." not in p.parts and "\\" not in name


def integrity_problems(bundle: Path, manifest: dict[str, Any], *, trust: TrustedKey | None = None) -> list[str]:
    """Every way the bundle's files disagree with its manifest (empty list: intact)."""
    problems: list[str] = []
    listed: dict[str, str] = {}
    for f in manifest["files"]:
        name = f["name"]
        if not _safe_name(name):
            problems.append(f"{name!r}: listed name points outside the bundle")
            continue
        listed[name] = f["sha256"]
        p = bundle / name
        if not p.is_file() or p.is_symlink():
            problems.append(f"{name}: missing")
        elif sha256_file(p) != f["sha256"]:
            problems.append(f"{name}: sha256 {sha256_file(p)[:12]}… != manifest {f['sha256'][:12]}…")
    art = manifest["artifact"]
    if art["file"] not in listed:
        problems.append(f"artifact {art['file']!r} is not among the listed files")
    elif listed[art["file"]] != art["sha256"]:
        problems.append(f"artifact {art['file']}: its sha256 differs from its file entry")
    present = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if not p.is_dir() or p.is_symlink()}
    unlisted = sorted(present - set(listed) - {MANIFEST, BUNDLE_SIGNATURE})
    if unlisted:
        problems.append(f"unlisted file(s): {', '.join(unlisted[:5])}")
    problems += _record_problems(bundle, manifest, listed)
    problems += _summary_problems(bundle)
    if trust is not None:
        reason = trust.check(bundle / MANIFEST, bundle / BUNDLE_SIGNATURE)
        if reason:
            problems.append(reason)
    return problems


def _record_problems(bundle: Path, manifest: dict[str, Any], listed: Mapping[str, str]) -> list[str]:
    out = []
    for key, fname in RECORDS.items():
        if key not in manifest and fname not in listed:
            continue
        if fname not in listed:
            out.append(f"manifest section {key!r} has no hashed record {fname}")
            continue
        if key not in manifest:
            out.append(f"{fname} is listed but the manifest lacks its section {key!r}")
            continue
        try:
            record = strict_loads((bundle / fname).read_bytes())
        except (OSError, ValueError, UnicodeDecodeError):
            out.append(f"{fname}: unreadable")
            continue
        if strict_json_value(record) != strict_json_value(manifest[key]):
            out.append(f"manifest section {key!r} differs from the hashed {fname}")
    if "reference" in manifest and isinstance(manifest.get("verification"), dict):
        ref = manifest["reference"].get("metrics") if isinstance(manifest["reference"], dict) else None
        if manifest["verification"].get("reference") != ref:
            out.append("verification.reference differs from the hashed reference metrics")
    return out


def _summary_problems(bundle: Path) -> list[str]:
    summary_path = bundle.parent / SUMMARY
    if not summary_path.is_file():
        return []  # a bundle copied on its own: only a signature can bind its manifest
    try:
        summary = strict_loads(summary_path.read_bytes())
        entry = summary["bundles"].get(bundle.name)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        return [f"{SUMMARY} beside the bundle is malformed"]
    if entry is None:
        return [f"not listed in {SUMMARY} beside it"]
    got = sha256_file(bundle / MANIFEST)
    if entry.get("manifest_sha256") != got:
        return [f"{MANIFEST} sha256 {got[:12]}… != {SUMMARY} {str(entry.get('manifest_sha256'))[:12]}…"]
    return []


# ---------------------------------------------------------------- verify
@dataclass
class VerifyResult:
    bundle: Path
    hash_problems: list[str]
    report: Report | None
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.hash_problems and self.report is not None and bool(self.report)

    @property
    def status(self) -> str:
        return "tampered" if self.hash_problems else ("passed" if self.passed else "failed")

    def to_json(self) -> dict[str, Any]:
        report = self.report.to_json() if self.report is not None else {
            "passed": False, "not_run": "the bundle does not match its manifest; the artifact was not run", "problems": self.hash_problems}
        return {"bundle": str(self.bundle), "status": self.status, "passed": self.passed, "hash_problems": self.hash_problems,
                "notes": self.notes, "report": report}


def verify_bundle(bundle: str | Path, eval_ds: NilmDataset, *, registry: Registry | None = None,
                  budget: Mapping[str, float] | None = None, trust: TrustedKey | None = None) -> VerifyResult:
    """Re-check an existing bundle: integrity first (see module docstring), then metrics, without recompiling.

    ``budget`` (default: the one stored in the manifest); ``trust`` (default None: signatures not required).
    """
    from nilmc.backends.base import Verification
    from nilmc.backends.registry import default_registry
    from nilmc.compiler.compare import check_budget_for_task, compare, validate_budget
    from nilmc.compiler.contract import ModelContract
    from nilmc.compiler.driver import predict_watts

    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    problems = integrity_problems(bundle, manifest, trust=trust)
    if problems:
        return VerifyResult(bundle, problems, None)
    notes = [] if trust is not None or not (bundle / BUNDLE_SIGNATURE).is_file() else ["signed; signature not checked (pass --trust PUBKEY)"]
    registry = registry or default_registry()
    target = registry.parse_target(manifest["target"])
    backend = registry.get(target.backend)
    contract = ModelContract.from_json(manifest["contract"])
    if budget is not None:  # an override must name the task's metrics (a classifier has no EACC): refused before any run
        check_budget_for_task(budget, contract.task)
    files = [f["name"] for f in manifest["files"]]
    art = Artifact(target.backend, target.precision, bundle, manifest["artifact"]["file"], files, manifest["artifact"].get("kind", ""),
                   {"quantization": manifest.get("quantization"), **manifest.get("artifact_info", {})})
    contract.check_input(eval_ds.x, source="the evaluation set")
    truth = contract.select_truth(eval_ds.y, eval_ds.appliances)  # (N,) W, or (N, M) W of a classifier's appliances
    ref, note = _reference_for_verify(bundle, manifest, contract, eval_ds, registry)
    notes += [note] if note else []
    with backend.runner(art) as runner:
        verification = Verification(getattr(runner, "verification", Verification.NOT_VERIFIED))
        pred = predict_watts(runner, contract, eval_ds.raw_x())
    cand = contract.score(truth, pred)  # the task's metrics: NILM metrics in W, or ON/OFF scores of a classifier
    budget = validate_budget(manifest["verification"].get("budget", {}) if budget is None else budget)
    share = (manifest.get("cost") or {}).get("int8_macs_share")  # a quantizing target's, recorded at compile
    report = compare(ref, cand, budget, target=manifest["target"], verification=verification.value,
                     int8_share=share if isinstance(share, float) else None)
    return VerifyResult(bundle, [], report, notes)


def _reference_for_verify(bundle: Path, manifest: dict[str, Any], contract: Any, eval_ds: NilmDataset,
                          registry: Registry) -> tuple[Any, str]:
    """The stored reference when the evaluation set (arrays and normalization metadata) is the same one; else rerun it."""
    from nilmc.compiler.metrics import metrics_from_json

    stored = manifest["reference"]
    if stored.get("eval_set") == eval_identity(eval_ds):
        return metrics_from_json(stored["metrics"]), ""
    ref_path = bundle.parent / "reference" / "model.onnx"
    if not ref_path.is_file():
        raise DataError("the evaluation set (or its normalization metadata) differs from the one the bundle was verified on and no "
                        "reference/model.onnx is beside the bundle", "pass the original evaluation set, or keep the compile output directory whole")
    if sha256_file(ref_path) != stored.get("reference_model_sha256"):
        raise BundleError(f"{str(ref_path)!r} is not the reference model the bundle was compiled against (sha256 differs)",
                          "recompile, or pass the original evaluation set")
    from nilmc.compiler.driver import check_data_normalization, reference_metrics
    from nilmc.compiler.frontend import load_model

    model = load_model(ref_path)
    check_data_normalization(model, eval_ds, role="evaluation")
    m, _ = reference_metrics(model, eval_ds, registry=registry)
    return m, "evaluation set differs from the compile's: FP32 reference rerun from reference/model.onnx"

"""The model contract from the command line: ``--contract FILE`` and the flags that build or override it.

A model nilmc did not write has no contract inside. The CLI then takes one from, in this order:

1. ``--contract FILE`` (a JSON file, e.g. written by ``nilmc contract init MODEL --out FILE`` and edited
   by hand), else the contract the model carries (ONNX metadata, Keras config, sidecar);
2. the contract flags on top of it, each overriding one field (:class:`ContractFlags`).

With neither a file nor a contract in the model, the flags build the whole contract: the window shape comes
from the model's input (``--window``/``--layout`` where it is open or ambiguous), and at least
``--input-norm`` and ``--appliance`` must be given (``--target-mean``/``--target-std`` default to 0/1: a model
whose output is already in watts).

Input statistics (``--input-mean``/``--input-std``, ``--input-min``/``--input-max``) are one value per feature;
one number for a model of several features is refused (features in different units never share a mean or
std), with ``--input-stats-from DATA.npz`` as the other way to give them.

An ON/OFF classifier (``--task binary|multilabel``) names its output columns with ``--appliances a,b,c`` (one
probability each, in order) and their ON thresholds in watts with ``--thresholds`` (one value, or one per
appliance; default: each appliance's usual threshold); ``--appliances`` then stands for ``--appliance``.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from nilmc.calibration_data.normalization import FeatureStats, Normalization, NormalizationSpec, TargetScaling
from nilmc.compiler.contract import (
    OUTPUT_SELECTORS_HELP,
    ModelContract,
    canonical_input_shape,
    load_contract_file,
    parse_layout,
    parse_output_select,
    parse_task,
    resolve_layout,
)
from nilmc.compiler.errors import BadInputError
from nilmc.compiler.model import Model

# the flag that sets each statistic (for messages)
_STAT_FLAGS = {"minimum": "--input-min", "maximum": "--input-max", "mean": "--input-mean", "std": "--input-std"}


@dataclass(frozen=True)
class ContractFlags:
    """The CLI's contract options, as given (None = not given). Values are checked by :func:`build_contract`."""

    contract_file: str | None = None
    input_norm: str | None = None
    input_mean: str | None = None
    input_std: str | None = None
    input_min: str | None = None
    input_max: str | None = None
    input_stats_from: str | None = None
    target_mean: float | None = None
    target_std: float | None = None
    appliance: str | None = None
    on_threshold: float | None = None
    peak_power: float | None = None
    window: int | None = None
    output: str | None = None
    layout: str | None = None
    task: str | None = None
    appliances: str | None = None  # comma list (classification output columns)
    thresholds: str | None = None  # comma list of watts, one or one per appliance

    @property
    def overrides(self) -> dict[str, Any]:
        """The field flags that were given (everything but ``--contract``)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "contract_file" and getattr(self, f.name) is not None}

    def __bool__(self) -> bool:
        return self.contract_file is not None or bool(self.overrides)


# --------------------------------------------------------------------------- parsing


def parse_floats(text: str, flag: str, *, positive: bool = False) -> list[float]:
    """``"522"`` or ``"1.5, 2, 3e2"`` -> floats; raises :class:`BadInputError` naming ``flag``."""
    try:
        values = [float(v) for v in str(text).split(",")]
    except ValueError:
        raise BadInputError(f"{flag} {text!r} is not a number or a comma list of numbers",
                            f"e.g. {flag} 522 (a one-feature model) or {flag} 1.5,2,0.25 (one per feature)") from None
    bad = [v for v in values if not math.isfinite(v) or (positive and v <= 0)]
    if bad:
        need = "finite and > 0" if positive else "finite"
        raise BadInputError(f"{flag} {text!r} holds {bad[0]!r}; every value must be {need}", f"pass {need} values to {flag}")
    return values


def read_contract_file(path: str | Path) -> ModelContract:
    """Read a contract JSON file (keys starting with ``_`` are comments); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"contract file {str(path)!r} does not exist",
                            "write one with `nilmc contract init MODEL --out FILE` and pass its path to --contract")
    return load_contract_file(path)


def model_io_shapes(path: str | Path) -> tuple[tuple[int | None, ...], tuple[int | None, ...]]:
    """The model's input and output shapes without batch (None = open), as the model declares them.

    ONNX: from the graph; Keras / SavedModel: from the loaded model (TensorFlow).
    """
    from nilmc.compiler.frontend import SourceKind, detect_kind

    path = Path(path)
    kind = detect_kind(path)
    if kind is SourceKind.ONNX:
        import onnx

        proto = onnx.load(str(path), load_external_data=False)
        inits = {t.name for t in proto.graph.initializer}
        inputs = [i for i in proto.graph.input if i.name not in inits]
        if len(inputs) != 1 or len(proto.graph.output) != 1:
            from nilmc.compiler.frontend import single_io_remedy

            raise BadInputError(f"{str(path)!r} has {len(inputs)} inputs and {len(proto.graph.output)} outputs", single_io_remedy(proto))
        return _value_shape(inputs[0]), _value_shape(proto.graph.output[0])
    if kind is SourceKind.SAVED_MODEL:
        raise BadInputError(f"nilmc cannot read the input shape of the SavedModel {str(path)!r} without a contract",
                            "write input_shape into a contract file (`nilmc contract init` on the .keras/.onnx, or by hand) and pass --contract FILE")
    from nilmc.compiler.tfcompat import read_keras

    km = read_keras(path, kind)
    return _keras_shape(km.inputs), _keras_shape(km.outputs)


def _value_shape(value: Any) -> tuple[int | None, ...]:
    dims = list(value.type.tensor_type.shape.dim)[1:]
    return tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims)


def _keras_shape(tensors: Any) -> tuple[int | None, ...]:
    tensors = list(tensors or [])
    if len(tensors) != 1:
        raise BadInputError(f"the Keras model has {len(tensors)} inputs/outputs", "nilmc compiles single-input, single-output models")
    return tuple(None if d is None else int(d) for d in tuple(tensors[0].shape)[1:])


# --------------------------------------------------------------------------- building


def base_contract(model_path: str | Path, flags: ContractFlags) -> ModelContract | None:
    """``--contract FILE`` if given, else the model's own contract (None when it has none)."""
    if flags.contract_file is not None:
        return read_contract_file(flags.contract_file)
    from nilmc.compiler.frontend import find_contract

    return find_contract(model_path)


def build_contract(model_path: str | Path, flags: ContractFlags, *, require: bool = True) -> ModelContract:
    """The contract for ``model_path``: the base (:func:`base_contract`) with ``flags`` on top.

    Without a base the flags build it from the model's input shape; ``require`` (default True)
    then insists on ``--input-norm`` and ``--appliance`` (``nilmc contract init`` passes False and
    writes placeholders for the user to edit).
    """
    base = base_contract(model_path, flags)
    layout = parse_layout(flags.layout) if flags.layout is not None else (base.layout if base else "")
    output_select = parse_output_select(flags.output) if flags.output is not None else (base.output_select if base else "")
    task = parse_task(flags.task) if flags.task is not None else (base.task if base else "regression")
    appliances = _appliance_list(flags.appliances) if flags.appliances is not None else (base.appliances if base else ())
    if base is None:
        named = flags.appliance if flags.appliance is not None else (appliances[0] if appliances else None)
        missing = [f for f, v in (("--input-norm KIND", flags.input_norm), ("--appliance NAME", named)) if v is None]
        if require and missing:
            raise BadInputError(f"{str(model_path)!r} carries no contract and {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not given",
                                "pass --contract FILE (`nilmc contract init MODEL --out FILE` writes one to edit) or the contract flags "
                                "--input-norm, --appliance, --target-mean/--target-std ...")
        in_shape, _ = model_io_shapes(model_path)
        layout = resolve_layout(in_shape, layout)
        input_shape = canonical_input_shape(in_shape, layout, window=flags.window)
    else:
        input_shape = tuple(base.input_shape)
        if flags.window is not None and flags.window != input_shape[0]:
            input_shape = (int(flags.window), *input_shape[1:])
    data = _stats_source(flags.input_stats_from)
    try:
        normalization = _normalization(flags, base, data, n_features=int(input_shape[1]))
    except BadInputError as exc:
        if base is not None or flags.layout is None or int(input_shape[1]) == 1:
            raise
        # a --layout that reads the model's input otherwise than it is meant makes time steps "features" (fuzzed: an
        # (N, 1, T) Conv1d export with --layout NWC asked for 64 per-feature means): say how the layout read it
        raise BadInputError(exc.message, f"{exc.remedy}; or, if the model does not take {int(input_shape[1])} features: --layout "
                            f"{layout} reads its input {tuple(model_io_shapes(model_path)[0])} as T={int(input_shape[0])} steps of "
                            f"{int(input_shape[1])} features; pass the layout that matches it, or leave --layout out") from None
    target = TargetScaling(
        flags.target_mean if flags.target_mean is not None else (base.target.mean if base else 0.0),
        flags.target_std if flags.target_std is not None else (base.target.std if base else 1.0),
    )
    appliance = flags.appliance if flags.appliance is not None else (
        appliances[0] if appliances and (base is None or base.appliance not in appliances) else (base.appliance if base else "appliance"))
    on_threshold = flags.on_threshold if flags.on_threshold is not None else (base.on_threshold_w if base else _default_threshold(appliance))
    feature_names = base.feature_names if base else ()
    if data is not None and len(data.feature_names) == input_shape[1] and (not feature_names or flags.input_stats_from):
        feature_names = tuple(data.feature_names)
    kw: dict[str, Any] = dict(
        input_shape=tuple(int(d) for d in input_shape), normalization=normalization, appliance=str(appliance), target=target,
        on_threshold_w=float(on_threshold), feature_names=tuple(feature_names), layout=layout, output_select=output_select,
        peak_power_w=flags.peak_power if flags.peak_power is not None else (base.peak_power_w if base else None),
    )
    kw.update(_task_fields(task, appliances, appliance, flags, base))
    if base is not None:
        return base.with_(**kw)
    setup = str(data.info.get("setup", "")) if data is not None else ""
    return ModelContract(setup=setup, **kw)


def _appliance_list(text: str) -> tuple[str, ...]:
    names = tuple(a.strip() for a in str(text).split(",") if a.strip())
    if not names:
        raise BadInputError(f"--appliances {text!r} names no appliance", "pass a comma list, e.g. --appliances kettle,microwave,fridge")
    return names


def _task_fields(task: str, appliances: tuple[str, ...], appliance: str, flags: ContractFlags, base: ModelContract | None) -> dict[str, Any]:
    """The classification fields (empty for regression: a regression contract stays as it was)."""
    if task == "regression":
        if flags.appliances is not None or flags.thresholds is not None:
            raise BadInputError("--appliances/--thresholds describe a classifier's outputs, and the task is regression",
                                "pass --task binary or --task multilabel (or --appliance NAME for a regression model)")
        return {"task": task, "appliances": (), "on_thresholds_w": ()}
    apps = appliances or (appliance,)
    if flags.thresholds is not None:
        thr = parse_floats(flags.thresholds, "--thresholds")
        thr = thr * len(apps) if len(thr) == 1 else thr
    elif base is not None and base.is_classification and tuple(base.appliances) == tuple(apps):
        thr = list(base.on_thresholds_w)
    else:
        thr = [_default_threshold(a) for a in apps]
    out: dict[str, Any] = {"task": task, "appliances": tuple(apps), "on_thresholds_w": tuple(float(t) for t in thr), "output_units": "probability"}
    if flags.peak_power is None and (base is None or not base.is_classification):
        out["peak_power_w"] = 1.0  # a sigmoid head: the output range the INT8 head must cover is [0, 1]
    if flags.target_mean is None and flags.target_std is None and (base is None or not base.is_classification):
        out["target"] = TargetScaling(0.0, 1.0)
    return out


def _default_threshold(appliance: str) -> float:
    from nilmc.calibration_data.loaders import threshold_for

    return threshold_for(appliance)


def _stats_source(path: str | None) -> Any:
    if path is None:
        return None
    from nilmc.calibration_data.dataset import NilmDataset

    ds = NilmDataset.load(path)
    if ds.train_stats is None:
        raise BadInputError(f"--input-stats-from {path!r}: the data set carries no training statistics",
                            "pass a set written by nilmc data generate/convert, or --input-mean/--input-std (--input-min/--input-max)")
    return ds


def _normalization(flags: ContractFlags, base: ModelContract | None, data: Any, *, n_features: int) -> NormalizationSpec:
    if flags.input_norm is not None:
        kind = Normalization.parse(flags.input_norm)
    else:
        kind = base.normalization.kind if base else Normalization.A
    if kind is Normalization.A:
        return NormalizationSpec(kind, None)
    stats: dict[str, np.ndarray] = {}
    if base is not None and base.normalization.stats is not None and data is None:
        s = base.normalization.stats
        stats = {k: np.asarray(getattr(s, k)) for k in s.given}
    if data is not None:
        s = data.train_stats
        stats = {k: np.asarray(getattr(s, k)) for k in s.given}
    flagged: set[str] = set()
    for name, text in (("mean", flags.input_mean), ("std", flags.input_std), ("minimum", flags.input_min), ("maximum", flags.input_max)):
        if text is not None:
            stats[name] = np.asarray(parse_floats(text, _STAT_FLAGS[name], positive=name == "std"), np.float64)
            flagged.add(name)
    if not stats:
        need = "--input-mean M --input-std S" if kind is Normalization.C else "--input-min LO --input-max HI"
        raise BadInputError(f"normalization {kind.value} ({kind.description}) needs statistics and none were given",
                            f"pass {need} (one per feature) or --input-stats-from DATA.npz")
    # only the statistics this kind uses must be per feature (a stray --input-mean under min-max is reported later)
    used = {"mean", "std"} if kind is Normalization.C else {"minimum", "maximum"}
    stats = {k: _per_feature(v, n_features, k, from_flag=k in flagged and k in used) for k, v in stats.items()}
    return NormalizationSpec(kind, FeatureStats.partial(**stats))


def _per_feature(values: np.ndarray, n: int, name: str, *, from_flag: bool = False) -> np.ndarray:
    """``values`` as ``n`` per-feature values. One value fills every feature, except one given by flag for a model of
    several features: features in different units (P in W, Q in var, I in A) never share a mean or std, and spreading
    one number over them used to normalize every feature with it silently, so that is refused with the remedy."""
    values = np.atleast_1d(np.asarray(values, np.float64))
    flag = _STAT_FLAGS[name]
    if values.size == 1 and n > 1 and from_flag:
        v = f"{float(values[0]):g}"
        raise BadInputError(f"{flag} {v} is one number but the model takes {n} features; nilmc does not spread one "
                            "statistic over every feature",
                            f"give one per feature, e.g. {flag} {','.join([v] * n) if n <= 4 else f'{v},{v},...,{v} ({n} values)'} "
                            "if every feature really shares it, "
                            "or take them from the training data: --input-stats-from DATA.npz")
    if values.size == 1:
        return np.full(n, float(values[0]))
    if values.size != n:
        raise BadInputError(f"{flag} has {values.size} values but the model takes {n} features",
                            f"give {n} comma-separated values, one per feature" if n > 1 else "give one value: the model takes one feature")
    return values


# --------------------------------------------------------------------------- loading


def load_model_with_flags(model_path: str | Path, flags: ContractFlags | None = None) -> Model:
    """:func:`nilmc.compiler.frontend.load_model` with the contract from ``flags`` (when any is given),
    then refuse a sequence output the contract selects nothing from."""
    from nilmc.compiler.frontend import load_model

    contract = build_contract(model_path, flags) if flags else None
    model = load_model(model_path, contract=contract)
    check_output(model)
    return model


def check_output(model: Model) -> None:
    """Refuse a model whose output is a sequence without an output selector (``--output``)."""
    out = model.graph.graph.output[0]
    model.contract.check_output_shape(_value_shape(out))


# --------------------------------------------------------------------------- the contract file

FIELD_HELP: dict[str, str] = {
    "input_shape": "the window as nilmc data sets hold it: [T samples, F features, 1]",
    "layout": "the model's own input layout: NTF1 (N,T,F,1), N1TF (N,1,T,F: PyTorch Conv2d), NWC (N,T,F: Keras Conv1D), "
              "NCW (N,F,T: PyTorch Conv1d), NW (N,T); flag --layout",
    "normalization": "input normalization: kind A/none, C/zscore (stats mean, std), B/minmax [0,1], D [-128,127], E [0,255] (stats minimum, maximum), "
                     "one value per feature; flags --input-norm, --input-mean/--input-std, --input-min/--input-max, --input-stats-from DATA.npz",
    "target": "the model output in watts is output * std + mean (0 and 1 when it returns watts); flags --target-mean/--target-std",
    "appliance": "the appliance the model disaggregates (a column of the data sets); flag --appliance",
    "on_threshold_w": "ON when power >= this many watts (F1/precision/recall); flag --on-threshold",
    "peak_power_w": "the largest power the output must represent (INT8 output range), null = the calibration range with the "
                    "deployment headroom; flag --peak-power",
    "output_select": f"for a sequence output: {OUTPUT_SELECTORS_HELP} ('' = one value per window); flag --output",
    "feature_names": "names of the F features (informational)",
    "folded": "true when the graph itself normalizes its input and returns watts",
}
# written into a classifier's contract file only, so a regression contract file stays as it was
CLASSIFICATION_FIELD_HELP: dict[str, str] = {
    "task": "regression (watts), binary or multilabel (ON/OFF probabilities, one per appliance); flag --task",
    "appliances": "classification: the appliance of each output column, in order; flag --appliances a,b,c",
    "on_thresholds_w": "classification: an appliance is truly ON when its power >= this many watts, one per appliance; flag --thresholds",
    "decision_threshold": "classification: predicted ON when the probability >= this (seed 002: 0.5)",
}


def contract_file_json(contract: ModelContract) -> dict[str, Any]:
    """The contract as a hand-editable file: every field written out, plus ``_help`` (ignored when read)."""
    doc = contract.to_json()
    doc["layout"] = contract.layout
    doc["output_select"] = contract.output_select
    helps = {**FIELD_HELP, **CLASSIFICATION_FIELD_HELP} if contract.is_classification else FIELD_HELP
    return {"_help": helps, **doc}


def placeholders(contract: ModelContract, flags: ContractFlags, base: ModelContract | None) -> list[str]:
    """Fields of a built contract nobody stated (defaults a user should check before compiling)."""
    if base is not None:
        return []
    given = flags.overrides
    out = []
    if "appliance" not in given and "appliances" not in given:
        out.append("appliance")
    if "input_norm" not in given:
        out.append("normalization (kind none)")
    if "target_mean" not in given and "target_std" not in given:
        out.append("target (mean 0, std 1: output already in watts)")
    return out


def dumps_contract_file(contract: ModelContract) -> str:
    return json.dumps(contract_file_json(contract), indent=2, allow_nan=False) + "\n"  # strict: no NaN/Infinity

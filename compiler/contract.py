"""The model's input contract: what it expects, and what its output means.

The contract travels inside every ONNX graph nilmc writes (``metadata_props``
key ``nilmc.contract``) and into every artifact's ``manifest.json``. For a model nilmc
did not write, it comes from a file (``nilmc contract init MODEL --out FILE``, then
``--contract FILE``), from command-line flags (:mod:`nilmc.compiler.contract_flags`), from
a Keras model's saved config or metadata (key ``nilmc.contract``, see
:mod:`nilmc.compiler.frontend`) or from a sidecar ``<model>.contract.json``.

Two fields describe models whose tensors are not nilmc's canonical ones:

``layout``
    How the model's own input tensor is laid out (``input_shape`` is always the canonical
    window ``(T, F, 1)`` of the data sets): ``NTF1`` canonical ``(N, T, F, 1)``; ``N1TF`` ``(N, 1, T, F)``
    (PyTorch Conv2d, NCHW with one channel); ``NWC`` ``(N, T, F)`` (Keras Conv1D); ``NCW`` ``(N, F, T)`` (PyTorch
    Conv1d); ``NW`` ``(N, T)``.
    Empty (the default) = not stated: the graph's input rank decides (:func:`resolve_layout`).
    The graph is left as exported: :meth:`ModelContract.prepare` puts the windows into this layout (float pre-processing).
``output_select``
    Which element of a sequence output (seq2seq / seq2subseq models) is the prediction:
    ``midpoint`` (index ``L // 2`` of an output of ``L`` steps), ``last``, or ``index:K``.
    Empty (the default): the model returns one value per window; a sequence output is then
    refused rather than silently reduced to its first step.

Three task kinds (``task``):

``regression`` (the default)
    One appliance's power: the output is de-normalized to watts (``target``) and scored in NILM metrics
    (EACC, MAE, ...; ON/OFF scores at ``on_threshold_w``).
``binary`` / ``multilabel``
    ON/OFF classification of one (``binary``) or several (``multilabel``) appliances: the model returns one
    probability per appliance in ``appliances`` (a sigmoid head, seed 002's CtRNN); an appliance is predicted
    ON when its probability is ``>= decision_threshold`` (default 0.5), and truly ON when its power in the
    data set is ``>= on_thresholds_w[k]`` watts. Scored in F1 / precision / recall / accuracy per appliance
    and their support-weighted averages (:func:`nilmc.compiler.metrics.classification_metrics`).

A regression contract writes none of the classification fields, so every contract written before them
stays byte-identical.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nilmc.calibration_data.normalization import Normalization, NormalizationSpec, TargetScaling
from nilmc.compiler.errors import BadInputError, DataError, ShapeMismatchError

if TYPE_CHECKING:
    from nilmc.compiler.metrics import AnyMetrics

CONTRACT_KEY = "nilmc.contract"
CONTRACT_VERSION = 1

CANONICAL_LAYOUT = "NTF1"
# layout -> (rank of the model's input without batch, time axis, feature axis or None), axes without batch.
LAYOUTS: dict[str, tuple[int, int, int | None]] = {"NTF1": (3, 0, 1), "N1TF": (3, 1, 2), "NWC": (2, 0, 1), "NCW": (2, 1, 0),
                                                  "NW": (1, 0, None)}
_LAYOUT_ALIASES = {"NTFC": "NTF1", "NHWC": "NTF1", "NCHW": "N1TF", "NCTF": "N1TF", "NTF": "NWC", "NTC": "NWC", "NFT": "NCW",
                   "NCT": "NCW", "NT": "NW"}
OUTPUT_SELECTORS_HELP = "midpoint, last or index:K"
TASKS = ("regression", "binary", "multilabel")
CLASSIFICATION_TASKS = ("binary", "multilabel")
_MIN_STATS = {"C": ("mean", "std"), "B": ("minimum", "maximum"), "D": ("minimum", "maximum"), "E": ("minimum", "maximum")}


def parse_layout(value: str | None) -> str:
    """``"nwc"`` -> ``"NWC"``; empty/None -> ``""`` (not stated). Raises :class:`BadInputError` when unknown."""
    key = (value or "").strip().upper()
    if not key:
        return ""
    key = _LAYOUT_ALIASES.get(key, key)
    if key not in LAYOUTS:
        raise BadInputError(f"unknown input layout {value!r}",
                            "use --layout NTF1 (N,T,F,1), N1TF (N,1,T,F), NWC (N,T,F), NCW (N,F,T) or NW (N,T)")
    return key


def parse_output_select(value: str | None) -> str:
    """``"midpoint"``, ``"last"``, ``"index:K"`` (K >= 0, or negative from the end); empty -> ``""``."""
    text = (value or "").strip().lower()
    if text in ("", "midpoint", "last"):
        return text
    head, sep, k = text.partition(":")
    if head == "index" and sep:
        try:
            return f"index:{int(k)}"
        except ValueError:
            pass
    raise BadInputError(f"unknown output selector {value!r}", f"use --output {OUTPUT_SELECTORS_HELP} (e.g. --output index:299)")


def parse_task(value: str | None) -> str:
    """``"Multilabel"`` -> ``"multilabel"``; empty/None -> ``"regression"``. Raises :class:`BadInputError` when unknown."""
    key = (value or "").strip().lower().replace("-", "")
    if not key:
        return "regression"
    if key not in TASKS:
        raise BadInputError(f"unknown task {value!r}", f"use --task {' | '.join(TASKS)}")
    return key


def resolve_layout(model_shape: Sequence[int | None], layout: str = "") -> str:
    """The layout of a model input of ``model_shape`` (without batch): ``layout`` when stated
    (checked against the rank), else from the rank: 3 -> N1TF when it is ``(N, 1, T, F)`` with F > 1 (a PyTorch
    Conv2d's NCHW), NTF1 otherwise; 1 -> NW; 2 -> NCW when the first axis is 1 (``(N, 1, T)``), NWC otherwise
    (``(N, T, F)``, ``(N, T, 1)``)."""
    rank = len(model_shape)
    if layout:
        layout = parse_layout(layout)
        if LAYOUTS[layout][0] != rank:
            raise ShapeMismatchError(f"layout {layout} needs an input of rank {LAYOUTS[layout][0] + 1} but the model's is "
                                     f"(N, {', '.join('?' if d is None else str(d) for d in model_shape)})",
                                     "pass the --layout that matches the model's input")
        return layout
    if rank == 3:  # (N, 1, T, F) is PyTorch's Conv2d input over T-P features; (N, T, F, 1) Keras' Conv2D
        return "N1TF" if model_shape[0] == 1 and model_shape[2] not in (None, 1) else "NTF1"
    if rank == 1:
        return "NW"
    if rank == 2:  # (N, 1, T) is PyTorch's Conv1d input; any other (N, a, b) is read as Keras' (N, T, F)
        return "NCW" if model_shape[0] == 1 and model_shape[1] != 1 else "NWC"
    raise ShapeMismatchError(f"a model input of rank {rank + 1} is not a window layout nilmc knows",
                             "nilmc compiles (N,T), (N,T,F), (N,F,T), (N,T,F,1) and (N,1,T,F) inputs")


def canonical_input_shape(model_shape: Sequence[int | None], layout: str = "", *, window: int | None = None) -> tuple[int, int, int]:
    """The canonical window ``(T, F, 1)`` of a model input ``model_shape`` (without batch) in ``layout``.

    ``window`` (default None) gives T where the model leaves it open (or must agree with it).
    Raises :class:`ShapeMismatchError` when T or F stays unknown or disagrees.
    """
    layout = resolve_layout(model_shape, layout)
    _, t_axis, f_axis = LAYOUTS[layout]
    t = model_shape[t_axis]
    f = 1 if f_axis is None else model_shape[f_axis]
    if window is not None:
        if t is not None and int(t) != int(window):
            raise ShapeMismatchError(f"--window {window} disagrees with the model's window of {t} samples", f"pass --window {t} or leave it out")
        t = int(window)
    if t is None:
        raise ShapeMismatchError("the model's input leaves the window length open", "pass --window T (samples per window)")
    if f is None:
        raise ShapeMismatchError("the model's input leaves the number of features open", "write input_shape [T, F, 1] into the contract file (--contract FILE)")
    if layout == "NTF1" and model_shape[2] not in (None, 1):
        raise ShapeMismatchError(f"a rank-4 model input must end in a channel of 1, got {tuple(model_shape)}",
                                 "nilmc windows are (N, T, F, 1); a PyTorch Conv2d input (N, 1, T, F) is --layout N1TF")
    if layout == "N1TF" and model_shape[0] not in (None, 1):
        raise ShapeMismatchError(f"layout N1TF is (N, 1, T, F) with one channel, got {tuple(model_shape)}",
                                 "nilmc windows hold one channel: (N, 1, T, F) or (N, T, F, 1)")
    return int(t), int(f), 1


_REMEDY = "write a contract file with `nilmc contract init MODEL --out FILE` and pass --contract FILE"


def load_contract_file(path: Path) -> ModelContract:
    """A contract JSON file (``nilmc contract init``, a sidecar): every failure a :class:`BadInputError` naming the file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInputError(f"cannot read contract file {str(path)!r} ({type(exc).__name__}: {exc})",
                            "check the path and its permissions, or write it again with `nilmc contract init MODEL --out FILE`") from None
    try:
        return ModelContract.loads(text)
    except BadInputError as exc:
        raise BadInputError(f"contract file {str(path)!r}: {exc.message}", exc.remedy) from None


def to_layout(x: np.ndarray, layout: str) -> np.ndarray:
    """Canonical windows ``(N, T, F, 1)`` -> ``layout`` (module doc): a view or a contiguous copy, values unchanged."""
    if layout in ("", CANONICAL_LAYOUT):
        return x
    if layout == "N1TF":  # one channel: the same values in the same order, the channel axis moved to the front
        return x.reshape(x.shape[0], 1, *x.shape[1:3])
    core = x[..., 0]
    if layout == "NWC":
        return core
    if layout == "NCW":
        return np.ascontiguousarray(core.transpose(0, 2, 1))
    if core.shape[2] != 1:
        raise ShapeMismatchError(f"layout NW takes one feature per step, the windows have {core.shape[2]}",
                                 "use --layout NWC (N,T,F) or NCW (N,F,T) for several features")
    return core[:, :, 0]


def check_statistics(spec: NormalizationSpec) -> None:
    """Each kind needs its own statistics: z-score mean/std, min-max (B, D, E) minimum/maximum."""
    need = _MIN_STATS.get(spec.kind.value)
    if not need or spec.stats is None or spec.stats.has(*need):
        return
    flags = "--input-mean/--input-std" if need[0] == "mean" else "--input-min/--input-max"
    raise BadInputError(f"normalization {spec.kind.value} ({spec.kind.description}) needs {need[0]}/{need[1]} statistics, "
                        f"the contract has only {'/'.join(spec.stats.given)}",
                        f"pass {flags} or --input-stats-from DATA.npz (or add them to the contract file)")


@dataclass(frozen=True)
class ModelContract:
    input_shape: tuple[int, ...]  # without batch, e.g. (10, 9, 1)
    normalization: NormalizationSpec
    appliance: str
    target: TargetScaling = field(default_factory=TargetScaling)
    on_threshold_w: float = 10.0
    peak_power_w: float | None = None  # physical output range the head must cover
    output_units: str = "W"
    feature_names: tuple[str, ...] = ()
    setup: str = ""  # e.g. "T-P"
    input_name: str = "input"
    output_name: str = "output"
    # True when the graph itself already contains the input normalization and
    # output de-normalization (it takes raw features and returns watts).
    folded: bool = False
    layout: str = ""  # the model's own input layout (module doc); "" = not stated
    output_select: str = ""  # midpoint | last | index:K for sequence outputs; "" = one value per window
    task: str = "regression"  # regression | binary | multilabel (module doc)
    appliances: tuple[str, ...] = ()  # classification: one output column per appliance, in order
    on_thresholds_w: tuple[float, ...] = ()  # classification: truly ON when power >= this (W), per appliance
    decision_threshold: float = 0.5  # classification: predicted ON when probability >= this

    def __post_init__(self) -> None:
        object.__setattr__(self, "layout", parse_layout(self.layout))
        object.__setattr__(self, "output_select", parse_output_select(self.output_select))
        object.__setattr__(self, "task", parse_task(self.task))
        check_statistics(self.normalization)
        if self.is_classification:
            self._check_classification()

    @property
    def is_classification(self) -> bool:
        return self.task in CLASSIFICATION_TASKS

    @property
    def output_appliances(self) -> tuple[str, ...]:
        """The appliance of each output column: ``appliances`` for classification, ``(appliance,)`` for regression."""
        return self.appliances if self.is_classification else (self.appliance,)

    def _check_classification(self) -> None:
        apps = tuple(str(a) for a in (self.appliances or (self.appliance,)))
        thr = tuple(float(t) for t in (self.on_thresholds_w or (self.on_threshold_w,) * len(apps)))
        if self.task == "binary" and len(apps) != 1:
            raise BadInputError(f"a binary contract classifies one appliance, got {len(apps)} ({', '.join(apps)})",
                                "pass --task multilabel for several appliances, or one name to --appliances")
        if len(set(apps)) != len(apps):
            raise BadInputError(f"--appliances names an appliance twice ({', '.join(apps)})", "name each output column once")
        if len(thr) != len(apps):
            raise BadInputError(f"{len(thr)} ON thresholds for {len(apps)} appliances ({', '.join(apps)})",
                                "pass one --thresholds value per appliance (watts), or one for all")
        if not all(math.isfinite(t) and t >= 0 for t in thr):
            raise BadInputError(f"ON thresholds must be finite watts >= 0, got {list(thr)}", "pass e.g. --thresholds 2000,200,50")
        if not 0.0 < float(self.decision_threshold) < 1.0:
            raise BadInputError(f"decision_threshold must lie in (0, 1), got {self.decision_threshold!r}",
                                "use a probability such as 0.5 (seed 002: ON when > 0.5)")
        object.__setattr__(self, "appliances", apps)
        object.__setattr__(self, "on_thresholds_w", thr)
        object.__setattr__(self, "appliance", apps[0] if self.appliance not in apps else self.appliance)
        object.__setattr__(self, "decision_threshold", float(self.decision_threshold))

    def select_truth(self, y: np.ndarray, names: Sequence[str]) -> np.ndarray:
        """The ground truth (W) of a data set's ``y`` whose columns are ``names``: ``(N,)`` for regression,
        ``(N, M)`` in ``appliances`` order for classification. Raises :class:`DataError` naming a missing appliance."""
        names = list(names)
        missing = [a for a in self.output_appliances if a not in names]
        if missing:
            raise DataError(f"appliance(s) {', '.join(missing)} of the model's contract are not in this data set",
                            f"available: {', '.join(names)}; pass data with those columns or --appliances from them")
        cols = [names.index(a) for a in self.output_appliances]
        return y[:, cols[0]] if not self.is_classification else y[:, cols]

    def score(self, truth_w: np.ndarray, pred: np.ndarray) -> AnyMetrics:
        """The task's metrics: :class:`~nilmc.compiler.metrics.Metrics` (regression, ``pred`` in W) or
        :class:`~nilmc.compiler.metrics.ClassificationMetrics` (``pred`` probabilities ``(N, M)``)."""
        from nilmc.compiler.metrics import classification_metrics, nilm_metrics

        if self.is_classification:
            return classification_metrics(truth_w, pred, appliances=self.appliances, on_thresholds_w=self.on_thresholds_w,
                                          decision_threshold=self.decision_threshold, task=self.task)
        return nilm_metrics(truth_w, pred, on_threshold_w=self.on_threshold_w)

    def check_input(self, x: np.ndarray, *, source: str = "data") -> None:
        got = tuple(int(d) for d in np.shape(x)[1:])
        if got != tuple(self.input_shape):
            raise ShapeMismatchError(
                f"the model expects windows of shape {tuple(self.input_shape)} but {source} has {got}",
                f"use data of the model's setup ({self.setup or 'see the contract'}) or a model trained for {got}",
            )

    def prepare(self, raw_x: np.ndarray) -> np.ndarray:
        """Raw features ``(N, T, F, 1)`` -> what the graph takes as input: normalized, then in the model's ``layout``.

        The layout change is a float pre-processing stage (an exact reshape/transpose), so the graph itself is left
        as the user exported it and every backend sees its plain ops.
        """
        return to_layout(self.normalize(raw_x), self.layout)

    def normalize(self, raw_x: np.ndarray) -> np.ndarray:
        """Raw features ``(N, T, F, 1)`` -> normalized, still canonical (what the normalization checks read)."""
        self.check_input(raw_x)
        return np.asarray(raw_x, np.float32) if self.folded else self.normalization.apply(raw_x)

    def input_feature_axis(self) -> int | None:
        """The feature axis of the graph input, batch axis 0; None for a one-feature input (``NW`` ``(N, T)``, or any
        layout with F = 1), whose only long axis is time."""
        f_axis = LAYOUTS[self.layout or CANONICAL_LAYOUT][2]
        features = int(self.input_shape[1]) if len(self.input_shape) > 1 else 1
        return None if f_axis is None or features == 1 else f_axis + 1

    def model_input_shape(self) -> tuple[int, ...]:
        """The graph input's shape without batch: the canonical ``input_shape`` ``(T, F, 1)`` in the model's layout."""
        t, f = int(self.input_shape[0]), int(self.input_shape[1]) if len(self.input_shape) > 1 else 1
        return {"": tuple(int(d) for d in self.input_shape), "NTF1": tuple(int(d) for d in self.input_shape), "N1TF": (1, t, f),
                "NWC": (t, f), "NCW": (f, t), "NW": (t,)}[self.layout]

    def to_watts(self, out: np.ndarray) -> np.ndarray:
        """Graph output -> watts, shape ``(N,)``; ``output_select`` picks the step of a sequence output.

        For a classification contract: the per-appliance probabilities, shape ``(N, M)`` (no watts to return).
        """
        out = np.asarray(out, np.float32).reshape(len(out), -1)
        if self.is_classification:
            if out.shape[1] != len(self.appliances):
                raise ShapeMismatchError(f"the model returns {out.shape[1]} values per window, its contract names {len(self.appliances)} "
                                         f"appliances ({', '.join(self.appliances)})", "pass one --appliances name per output column")
            return out
        return self.values_to_watts(out[:, self.output_index(out.shape[1])])

    def values_to_watts(self, values: np.ndarray) -> np.ndarray:
        """Graph output values (any shape, e.g. the ends of an output grid) -> watts, element-wise: the target
        de-normalization without :meth:`to_watts`'s step selection (identity for a folded or classification contract)."""
        v = np.asarray(values, np.float32)
        return v if self.folded or self.is_classification else self.target.to_watts(v)

    def output_index(self, length: int) -> int:
        """Index of the prediction in a per-window output of ``length`` values (``output_select``).

        Raises :class:`ShapeMismatchError` for a sequence output without a selector, or an index outside it.
        """
        sel = self.output_select
        if not sel:
            if length > 1:
                raise ShapeMismatchError(
                    f"the model returns {length} values per window (a sequence) and its contract selects none",
                    f"pass --output {OUTPUT_SELECTORS_HELP} (or set output_select in the contract file)")
            return 0
        if sel == "midpoint":
            return length // 2
        if sel == "last":
            return length - 1
        k = int(sel.split(":", 1)[1])
        if not -length <= k < length:
            raise ShapeMismatchError(f"--output {sel} is outside the model's output of {length} values per window",
                                     f"use an index in 0..{length - 1}, or --output midpoint|last")
        return k % length

    def check_output_shape(self, shape: Sequence[int | None]) -> None:
        """Refuse a sequence output (``shape`` without batch, None = unknown) that the contract selects nothing from."""
        dims = list(shape)
        known = [int(d) for d in dims if d is not None]
        if len(known) < len(dims):
            if not self.output_select and len(dims) > 1:
                raise ShapeMismatchError(f"the model's output {tuple('?' if d is None else d for d in dims)} has an open length "
                                         "and its contract selects no element", f"pass --output {OUTPUT_SELECTORS_HELP}")
            return
        if self.is_classification:
            if known and len(known) == len(dims) and int(np.prod(known)) != len(self.appliances):
                raise ShapeMismatchError(f"the model's output {tuple(dims)} does not hold one probability per appliance of its contract "
                                         f"({', '.join(self.appliances)})", "pass one --appliances name per output column")
            return
        self.output_index(int(np.prod(known)) if known else 1)

    def to_json(self) -> dict[str, Any]:
        return {
            "contract_version": CONTRACT_VERSION,
            "input_shape": list(self.input_shape),
            "normalization": self.normalization.to_json(),
            "appliance": self.appliance,
            "target": self.target.to_json(),
            "on_threshold_w": self.on_threshold_w,
            "peak_power_w": self.peak_power_w,
            "output_units": self.output_units,
            "feature_names": list(self.feature_names),
            "setup": self.setup,
            "input_name": self.input_name,
            "output_name": self.output_name,
            "folded": self.folded,
            # written only when set, so every contract written before these fields stays byte-identical
            **({"layout": self.layout} if self.layout else {}),
            **({"output_select": self.output_select} if self.output_select else {}),
            **({"task": self.task, "appliances": list(self.appliances), "on_thresholds_w": list(self.on_thresholds_w),
                "decision_threshold": self.decision_threshold} if self.is_classification else {}),
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ModelContract:
        try:
            return cls(
                input_shape=tuple(int(v) for v in d["input_shape"]),
                normalization=NormalizationSpec.from_json(d["normalization"]),
                appliance=str(d["appliance"]),
                target=TargetScaling.from_json(d.get("target", {})),
                on_threshold_w=float(d.get("on_threshold_w", 10.0)),
                peak_power_w=None if d.get("peak_power_w") is None else float(d["peak_power_w"]),
                output_units=str(d.get("output_units", "W")),
                feature_names=tuple(d.get("feature_names", ())),
                setup=str(d.get("setup", "")),
                input_name=str(d.get("input_name", "input")),
                output_name=str(d.get("output_name", "output")),
                folded=bool(d.get("folded", False)),
                layout=str(d.get("layout") or ""),
                output_select=str(d.get("output_select") or ""),
                task=str(d.get("task") or "regression"),
                appliances=tuple(str(a) for a in d.get("appliances") or ()),
                on_thresholds_w=tuple(float(t) for t in d.get("on_thresholds_w") or ()),
                decision_threshold=float(d.get("decision_threshold", 0.5)),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BadInputError(f"model contract is malformed ({type(exc).__name__}: {exc})", _REMEDY) from None

    @classmethod
    def loads(cls, s: str) -> ModelContract:
        try:
            return cls.from_json(json.loads(s))
        except json.JSONDecodeError as exc:
            raise BadInputError(f"model contract is not valid JSON ({exc})", _REMEDY) from None

    def with_(self, **kw: Any) -> ModelContract:
        return replace(self, **kw)

    def with_stages(
        self,
        *,
        input_affine: tuple[np.ndarray, np.ndarray] | None = None,
        output_affine: tuple[float, float] | None = None,
        origin: str = "",
    ) -> ModelContract:
        """The contract of the graph after float stages were taken out of it (or put in front of it).

        ``input_affine`` ``(scale, offset)`` (per feature or scalar): the old graph began with
        ``x * scale + offset``, which now runs in :meth:`prepare` (normalization kind
        ``affine``, composed onto the old normalization). ``output_affine`` ``(scale, offset)``:
        the old graph ended with ``y * scale + offset``, which now runs in :meth:`to_watts`.
        ``origin`` (default "") is recorded with each stage. A folded contract becomes
        unfolded: what the graph no longer does, the contract does.
        """
        norm, target = self.normalization, self.target
        if self.folded:  # the graph took raw features and returned watts: its stages were identities
            norm, target = NormalizationSpec(Normalization.A, self.normalization.stats), TargetScaling()
        if input_affine is not None:
            n_features = int(self.input_shape[1]) if len(self.input_shape) > 1 else int(self.input_shape[0])
            norm = norm.then(input_affine[0], input_affine[1], origin=origin, n_features=n_features)
        if output_affine is not None:
            target = target.after(float(output_affine[0]), float(output_affine[1]), origin=origin)
        return replace(self, normalization=norm, target=target, folded=False)

    @property
    def normalization_kind(self) -> Normalization:
        return self.normalization.kind

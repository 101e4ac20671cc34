"""The model's input contract: what it expects, and what its output means.

The contract travels inside every ONNX graph nilmc writes (``metadata_props``
key ``nilmc.contract``) and into every artifact's ``manifest.json``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from nilmc.calibration_data.normalization import Normalization, NormalizationSpec, TargetScaling
from nilmc.compiler.errors import BadInputError, ShapeMismatchError

CONTRACT_KEY = "nilmc.contract"
CONTRACT_VERSION = 1


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

    def check_input(self, x: np.ndarray, *, source: str = "data") -> None:
        got = tuple(int(d) for d in np.shape(x)[1:])
        if got != tuple(self.input_shape):
            raise ShapeMismatchError(
                f"the model expects windows of shape {tuple(self.input_shape)} but {source} has {got}",
                f"use data of the model's setup ({self.setup or 'see the contract'}) or a model trained for {got}",
            )

    def prepare(self, raw_x: np.ndarray) -> np.ndarray:
        """Raw features -> what the graph takes as input."""
        self.check_input(raw_x)
        if self.folded:
            return np.asarray(raw_x, np.float32)
        return self.normalization.apply(raw_x)

    def to_watts(self, out: np.ndarray) -> np.ndarray:
        """Graph output -> watts, shape ``(N,)``."""
        out = np.asarray(out, np.float32).reshape(len(out), -1)[:, 0]
        return out if self.folded else self.target.to_watts(out)

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
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BadInputError(f"model contract is malformed ({type(exc).__name__}: {exc})", "write it with nilmc train or pass --contract FILE") from None

    @classmethod
    def loads(cls, s: str) -> ModelContract:
        try:
            return cls.from_json(json.loads(s))
        except json.JSONDecodeError as exc:
            raise BadInputError(f"model contract is not valid JSON ({exc})", "write it with nilmc train or pass --contract FILE") from None

    def with_(self, **kw: Any) -> ModelContract:
        return replace(self, **kw)

    @property
    def normalization_kind(self) -> Normalization:
        return self.normalization.kind

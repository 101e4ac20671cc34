"""One calibration per compile, shared by every target.

:class:`QuantContext` holds the FP32 model, the calibration windows prepared the
way the graph takes them (contract normalization applied), the statistics
collected **once** (lazily, on first use), and caches the parameters each set of
traits derives from them. The compile driver creates one and hands it to every
backend's ``lower`` as ``options["quant"]``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from nilmc.compiler.errors import DataError
from nilmc.quantization.params import QuantParams, derive_params
from nilmc.quantization.statistics import Statistics, collect_statistics
from nilmc.quantization.traits import QuantTraits

if TYPE_CHECKING:
    from nilmc.calibration_data.dataset import NilmDataset
    from nilmc.compiler.model import Model


@dataclass
class QuantContext:
    """Calibration state of one compile. Defaults: min-max activations, 2048 histogram bins."""

    model: "Model"
    calibration: "NilmDataset"
    estimator: str = "minmax"
    bins: int = 2048
    _stats: Statistics | None = field(default=None, init=False, repr=False)
    _params: dict[tuple[Any, ...], QuantParams] = field(default_factory=dict, init=False, repr=False)
    calibration_s: float = field(default=0.0, init=False)

    @property
    def calib_x(self) -> np.ndarray:
        """Calibration windows as the graph takes them (normalized per the contract)."""
        return self.model.contract.prepare(self.calibration.raw_x())

    @property
    def statistics(self) -> Statistics:
        if self._stats is None:
            import time

            t0 = time.perf_counter()
            self._stats = collect_statistics(self.model.graph, self.calib_x, bins=self.bins)
            self.calibration_s = time.perf_counter() - t0
        return self._stats

    def params(self, traits: QuantTraits, *, estimator: str | None = None, **kw: Any) -> QuantParams:
        """Parameters for ``traits`` from the shared statistics (cached per traits + options)."""
        est = estimator or self.estimator
        key = (traits, est, repr(sorted(kw.items())))
        if key not in self._params:
            self._params[key] = derive_params(self.model.graph, self.statistics, traits, estimator=est, **kw)
        return self._params[key]


def require_quant(options: Any, target: str) -> QuantContext:
    """The shared :class:`QuantContext` from a backend's ``options``, or a clear error."""
    ctx = (options or {}).get("quant")
    if ctx is None:
        raise DataError(f"target {target} quantizes and needs a calibration set", "pass --calib FILE (e.g. the shipped calibration set)")
    return ctx

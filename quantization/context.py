"""One calibration per compile, shared by every target.

:class:`QuantContext` holds the FP32 model, the calibration windows prepared the
way the graph takes them (contract normalization applied), the statistics
collected **once** (lazily, on first use), and caches the parameters each set of
traits derives from them. The compile driver creates one and hands it to every
backend's ``lower`` as ``options["quant"]``.

``params(traits)`` runs the accuracy techniques of :func:`api.ptq_params` by default
(``techniques``, an :class:`api.Techniques`): per-tensor estimator selection by output
error, a cross-validated range headroom, the output range fitted to the contract's peak
power, and bias correction where it lowers the held-out output error — each measured on
the calibration windows. A budget in ``techniques.budget`` adds the mixed-precision
fallback, scored with NILM metrics on the calibration set (``eval_fn`` overrides).
Backends read ``params.keep_float`` (units kept at FP32) and ``params.adjusted``
(bias-corrected float biases) when they write integer graphs; ``build_qdq_model`` does.
``params(traits, estimator=...)`` (or any other keyword) gives the plain parameters of
:func:`params.derive_params`, as before; ``techniques=api.Techniques.plain()`` turns the
techniques off for a whole context.
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

    model: Model
    calibration: NilmDataset
    estimator: str = "minmax"
    bins: int = 2048
    techniques: Any = None  # api.Techniques; None -> api.Techniques() (every technique on, measured)
    eval_fn: Any = None  # for a mixed-precision budget: fn(onnx_model) -> Metrics (default: on the calibration set)
    _stats: Statistics | None = field(default=None, init=False, repr=False)
    _params: dict[tuple[Any, ...], QuantParams] = field(default_factory=dict, init=False, repr=False)
    statistics_s: float = field(default=0.0, init=False)  # the one FP32 statistics pass
    techniques_s: dict[str, float] = field(default_factory=dict, init=False)  # traits name -> seconds spent on techniques
    normalization_report: Any = field(default=None, init=False, repr=False)  # normalization_check.NormalizationReport
    # Per-compile results a backend derives from this context and may reuse for another precision with the same
    # arithmetic (e.g. the DPU's refinement for b2304 and b4096), keyed by the backend; never shared across compiles.
    memo: dict[str, dict[Any, Any]] = field(default_factory=dict, init=False, repr=False)

    @property
    def calibration_s(self) -> float:
        """Statistics pass plus every traits' techniques, seconds."""
        return self.statistics_s + sum(self.techniques_s.values())

    @property
    def calib_x(self) -> np.ndarray:
        """Calibration windows as the graph takes them (normalized per the contract)."""
        return self.model.contract.prepare(self.calibration.raw_x())

    @property
    def statistics(self) -> Statistics:
        if self._stats is None:
            import time

            t0 = time.perf_counter()
            x = self.calib_x
            tech = self.techniques
            if tech is None or tech.check_normalization:
                from nilmc.quantization.normalization_check import check_normalization

                canonical = self.model.contract.normalize(self.calibration.raw_x())  # before the model's layout
                self.normalization_report = check_normalization(self.model.contract, canonical,
                                                                policy="error" if tech is None else tech.normalization_policy)
            self._stats = collect_statistics(self.model.graph, x, bins=self.bins, feature_axis=self.model.contract.input_feature_axis())
            self.statistics_s = time.perf_counter() - t0
        return self._stats

    def params(self, traits: QuantTraits, *, estimator: str | None = None, **kw: Any) -> QuantParams:
        """Parameters for ``traits`` from the shared statistics (cached per traits + options).

        Without keywords: the techniques pipeline (module docstring), timed into
        ``techniques_s``. With ``estimator`` or :func:`derive_params` keywords: plain parameters.
        """
        if estimator is None and not kw:
            return self._advanced(traits)
        est = estimator or self.estimator
        key = (_derivation_key(traits), est, repr(sorted(kw.items())))
        if key not in self._params:
            self._params[key] = derive_params(self.model.graph, self.statistics, traits, estimator=est, **kw)
        return _as_traits(self._params[key], traits)

    def _advanced(self, traits: QuantTraits) -> QuantParams:
        import time

        from nilmc.quantization.api import Techniques, make_eval_fn, ptq_params

        tech = self.techniques if self.techniques is not None else Techniques()
        key = (_derivation_key(traits), "techniques", tech.key())
        if key not in self._params:
            stats = self.statistics
            t0 = time.perf_counter()
            eval_fn = self.eval_fn or (make_eval_fn(self.model, self.calibration) if tech.budget else None)
            outcome = ptq_params(self.model.graph, stats, traits, self.calib_x, contract=self.model.contract,
                                 estimator="auto" if tech.select_estimators else self.estimator, techniques=tech, eval_fn=eval_fn)
            self.techniques_s[traits.name] = time.perf_counter() - t0
            self._params[key] = outcome.params
        return _as_traits(self._params[key], traits)


def _derivation_key(traits: QuantTraits) -> QuantTraits:
    """What parameter derivation reads of the traits: not the name, nor the requantization multiplier width (which only
    the emulators read). tflite:int8 and eiq:int8 (and the OpenVINO/onnxruntime pair) share one techniques run: measured
    on the shipped model, calibration fell from 35 s to ... for `nilmc example`, with byte-identical artifacts."""
    return traits.with_(name="", requant_multiplier_bits=32)


def _as_traits(params: QuantParams, traits: QuantTraits) -> QuantParams:
    """``params`` labelled with the caller's traits (a shallow copy when they were derived under an equivalent set)."""
    if params.traits == traits:
        return params
    from dataclasses import replace

    return replace(params, traits=traits)


def shared_params(options: Any, traits: QuantTraits, target: str, *, estimator: str | None = None) -> QuantParams:
    """The parameters a backend deploys: ``options["params"]`` when the compile driver derived them
    under these ``traits`` (after its overflow checks and fixes), else derived here from the shared context."""
    given = (options or {}).get("params")
    if given is not None and given.traits == traits:
        p: QuantParams = given
        return p
    return require_quant(options, target).params(traits, estimator=estimator)


def require_quant(options: Any, target: str) -> QuantContext:
    """The shared :class:`QuantContext` from a backend's ``options``, or a clear error."""
    ctx: QuantContext | None = (options or {}).get("quant")
    if ctx is None:
        raise DataError(f"target {target} quantizes and needs a calibration set", "pass --calib FILE (e.g. the shipped calibration set)")
    return ctx

"""Comparison is a value: ``compare(reference, candidate, budget) -> Report``.

Deltas are losses: positive means the candidate is worse than the FP32 reference
(``ref - cand`` for higher-is-better EACC/F1, ``cand - ref`` for lower-is-better
MAE/SAE/NDE). A budget bounds the loss per metric, e.g. ``eacc=0.5`` (points), and may hold
two floors: ``min_sqnr_db``, the lowest output SQNR vs FP32 a candidate may have (dB; an all-zero
output scores 0 dB, FP32 itself inf), and ``min_int8_macs_share``, the least share of the weighted layers'
multiply-accumulates a quantizing target's artifact must run in INT8 (an "int8" artifact that runs everything in
float is a float model behind an INT8 name; float targets are not checked). The SQNR floor is checked where the SQNR is
known (at compile); ``nilmc verify``, which has only the stored reference metrics, records it as not checked, and reads
the INT8 share from the bundle's manifest.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from nilmc.compiler.errors import BadInputError
from nilmc.compiler.metrics import CLASSIFICATION_METRICS, AnyMetrics, ClassificationMetrics, compare_metrics

# EACC and F1 budgets are in percentage points; MAE in watts; SAE/NDE as fractions. The classification metrics
# (f1w = support-weighted F1, precision_w, recall_w, accuracy, f1_macro) are in percentage points too: seed 002's
# "weighted-F1 loss <= 0.01" (a fraction) is f1w=1.
REGRESSION_BUDGET_METRICS = ("eacc", "mae", "sae", "nde", "f1")
CLASSIFICATION_BUDGET_METRICS = CLASSIFICATION_METRICS
KNOWN_BUDGET_METRICS = (*REGRESSION_BUDGET_METRICS, *CLASSIFICATION_BUDGET_METRICS)
MIN_SQNR_KEY = "min_sqnr_db"  # a floor, not a loss: output SQNR vs FP32 in dB
MIN_INT8_KEY = "min_int8_macs_share"  # a floor: share (0..1) of the weighted layers' MACs run in INT8, quantizing targets
FLOOR_KEYS = (MIN_SQNR_KEY, MIN_INT8_KEY)
DEFAULT_BUDGET: dict[str, float] = {"eacc": 0.5}
DEFAULT_CLASSIFICATION_BUDGET: dict[str, float] = {"f1w": 1.0}  # one point of weighted F1 = seed 002's 0.01


def default_budget(task: str = "regression") -> dict[str, float]:
    """The budget a compile uses when none is given: ``eacc=0.5`` (regression), ``f1w=1`` (binary / multilabel)."""
    return dict(DEFAULT_CLASSIFICATION_BUDGET if task in ("binary", "multilabel") else DEFAULT_BUDGET)


def check_budget_for_task(budget: Mapping[str, float], task: str) -> None:
    """Refuse (before any work) a budget naming metrics the task's comparison does not produce."""
    allowed = CLASSIFICATION_BUDGET_METRICS if task in ("binary", "multilabel") else REGRESSION_BUDGET_METRICS
    wrong = [k for k in budget if k not in FLOOR_KEYS and k not in allowed]
    if wrong:
        raise BadInputError(f"the budget names {', '.join(wrong)}, which a {task} model is not scored in",
                            f"pass --max-delta with {', '.join(allowed)} (e.g. --max-delta {allowed[0]}=1)")
DEFAULT_MIN_SQNR_DB = 10.0  # what the compile driver adds to the budget unless told otherwise
# ... and the INT8 floor it adds: at least 1 % of the MACs in INT8, i.e. an "int8" artifact that runs none fails
DEFAULT_MIN_INT8_SHARE = 0.01


def parse_budget(text: str | None) -> dict[str, float]:
    """Parse ``eacc=0.5,mae=3`` into ``{"eacc": 0.5, "mae": 3.0}``; empty → the default ``eacc=0.5``.

    Refused (:class:`BadInputError`): unknown metrics, non-numbers, negative / infinite / NaN
    values (an infinite budget would switch the gate off) and a metric named twice.
    ``min_sqnr_db=DB`` (a floor) takes any finite number, ``min_int8_macs_share=S`` a share in [0, 1].
    """
    if text is None or not text.strip():
        return dict(DEFAULT_BUDGET)
    out: dict[str, float] = {}
    for part in [p.strip() for p in text.split(",") if p.strip()]:
        key, sep, val = part.partition("=")
        key = key.strip().lower()
        if not sep or key not in (*KNOWN_BUDGET_METRICS, *FLOOR_KEYS):
            raise BadInputError(f"budget entry {part!r} is not METRIC=VALUE with a known metric",
                                f"use e.g. eacc=0.5,mae=3; metrics: {', '.join(KNOWN_BUDGET_METRICS)} (and the floors {', '.join(FLOOR_KEYS)})")
        try:
            v = float(val)
        except ValueError:
            raise BadInputError(f"budget value {val!r} for {key} is not a number", "use e.g. eacc=0.5") from None
        if key == MIN_SQNR_KEY and not math.isfinite(v):
            raise BadInputError(f"{MIN_SQNR_KEY} value {val.strip()!r} is infinite or NaN", f"give a finite floor in dB, e.g. {MIN_SQNR_KEY}=10")
        if key == MIN_INT8_KEY and not 0.0 <= v <= 1.0:
            raise BadInputError(f"{MIN_INT8_KEY} value {val.strip()!r} is not a share in [0, 1]", f"e.g. {MIN_INT8_KEY}=0.5 (half the MACs in INT8)")
        if key != MIN_SQNR_KEY and (not v >= 0 or v == float("inf")):
            raise BadInputError(f"budget value {val.strip()!r} for {key} is negative, infinite or NaN",
                                f"a budget is a finite maximum loss >= 0, e.g. {key}=0.5 (omit the metric to leave it ungated)")
        if key in out:
            raise BadInputError(f"budget names {key} twice ({key}={out[key]:g} and {key}={v:g})", f"give each metric once, e.g. {key}={v:g}")
        out[key] = v
    return out


@dataclass(frozen=True)
class Violation:
    """A loss over its budget (``delta > limit``) or, with ``floor``, a value under its floor (``delta < limit``)."""

    metric: str
    delta: float
    limit: float
    floor: bool = False

    @property
    def excess(self) -> float:
        return self.limit - self.delta if self.floor else self.delta - self.limit

    def __str__(self) -> str:
        if self.floor and self.metric == "int8_macs_share":
            return f"INT8 MACs {100 * self.delta:.3g} % < min {100 * self.limit:g} %"
        if self.floor:
            return f"output SQNR {self.delta:.3g} dB < min {self.limit:g} dB"
        return f"{self.metric} loss {self.delta:+.4g} > budget {self.limit:g}"

    def to_json(self) -> dict[str, Any]:
        if self.floor:
            return {"metric": self.metric, "value": _finite_or_str(self.delta), "min": self.limit}
        return {"metric": self.metric, "delta": self.delta, "limit": self.limit}


def _finite_or_str(v: float) -> float | str:
    return v if math.isfinite(v) else str(v)


@dataclass(frozen=True)
class Report:
    """Outcome of comparing one candidate with the reference; truthy when it passed."""

    target: str
    reference: AnyMetrics
    candidate: AnyMetrics
    deltas: Mapping[str, float]
    budget: Mapping[str, float]
    verification: str  # measured | emulated | not verified
    violations: tuple[Violation, ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict)
    cause: str = ""  # of a failure, from the overflow and coverage analysis ("likely cause: ...")
    unchecked: tuple[str, ...] = ()  # budget entries that could not be checked (the SQNR floor without FP32 predictions)

    def __bool__(self) -> bool:
        return not self.violations

    @property
    def passed(self) -> bool:
        return bool(self)

    def worst_first(self) -> list[Violation]:
        return sorted(self.violations, key=lambda v: -v.excess)

    def __str__(self) -> str:
        if self:
            key = "f1w" if isinstance(self.reference, ClassificationMetrics) else "eacc"
            return f"{self.target}: PASS ({self.verification}) {key} delta {self.deltas.get(key, 0.0):+.3f} pts"
        return f"{self.target}: FAIL ({self.verification}) " + self.failure_line()

    def failure_line(self) -> str:
        """The violations, worst first, then the likely cause when one was diagnosed."""
        return "; ".join([str(v) for v in self.worst_first()] + ([self.cause] if self.cause else []))

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "passed": self.passed,
            "verification": self.verification,
            "reference": self.reference.to_json(),
            "candidate": self.candidate.to_json(),
            "deltas": dict(self.deltas),
            "budget": dict(self.budget),
            "violations": [v.to_json() for v in self.worst_first()],
            **({"extra": dict(self.extra)} if self.extra else {}),
            **({"cause": self.cause} if self.cause else {}),
            **({"unchecked": list(self.unchecked)} if self.unchecked else {}),
        }


def validate_budget(budget: Mapping[str, float]) -> dict[str, float]:
    """The same rules as :func:`parse_budget`, for a budget given as a mapping (Python API)."""
    return parse_budget(",".join(f"{k}={v!r}" for k, v in budget.items())) if budget else {}


def compare(reference: AnyMetrics, candidate: AnyMetrics, budget: Mapping[str, float], *, target: str = "", verification: str = "measured",
            extra: Mapping[str, Any] | None = None, sqnr_db: float | None = None, int8_share: float | None = None) -> Report:
    """Compare candidate metrics with the reference under ``budget``.

    ``sqnr_db`` (default None): the candidate's output SQNR vs FP32, checked against the budget's
    ``min_sqnr_db`` floor (NaN fails; +inf passes); without it the floor is listed in ``unchecked``.
    ``int8_share`` (default None: a float target, not checked): the share of the weighted layers' MACs the artifact
    runs in INT8, checked against ``min_int8_macs_share``.
    """
    deltas = compare_metrics(reference, candidate)
    violations = []
    unchecked = []
    for metric, limit in budget.items():
        if metric == MIN_SQNR_KEY:
            if sqnr_db is None:
                unchecked.append(metric)
            elif not sqnr_db >= limit:  # NaN fails too
                violations.append(Violation("sqnr_db", float(sqnr_db), float(limit), floor=True))
            continue
        if metric == MIN_INT8_KEY:
            if int8_share is not None and not int8_share >= limit:
                violations.append(Violation("int8_macs_share", float(int8_share), float(limit), floor=True))
            continue
        d = deltas.get(metric)
        if d is None:
            raise BadInputError(f"budget names metric {metric!r}, which the comparison does not produce", f"use one of {', '.join(sorted(deltas))}")
        if not d <= limit:  # NaN fails too
            violations.append(Violation(metric, float(d), float(limit)))
    return Report(target, reference, candidate, deltas, dict(budget), verification, tuple(violations), dict(extra or {}),
                  unchecked=tuple(unchecked))

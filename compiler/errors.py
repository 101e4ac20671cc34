"""Typed errors: one root, a message with the actual values, and a remedy.

Exit codes used by the CLI (documented in the README):
    0 ok, 1 accuracy gate failed, 2 bad input or usage, 3 internal error,
    130 interrupted (SIGINT), 143 terminated (SIGTERM).
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_GATE_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT; SIGTERM gives 143 (128 + 15)
SEVERITY = (EXIT_OK, EXIT_GATE_FAILED, EXIT_BAD_INPUT, EXIT_INTERNAL)  # least to most severe


def most_severe(codes: list[int] | tuple[int, ...]) -> int:
    """The most severe of several exit codes: 3 internal > 2 bad input > 1 gate > 0."""
    return max((c for c in codes if c in SEVERITY), key=SEVERITY.index, default=EXIT_OK)


class NilmcError(Exception):
    """Root of every error nilmc raises on purpose.

    ``message`` says what happened (with the values), ``remedy`` what to do.
    """

    exit_code = EXIT_BAD_INPUT

    def __init__(self, message: str, remedy: str | None = None) -> None:
        self.message = message
        self.remedy = remedy
        super().__init__(self.one_line())

    def one_line(self) -> str:
        text = self.message.rstrip(". ")
        if self.remedy:
            text += f"; {self.remedy.rstrip('.')}"
        return text + "."


class BadInputError(NilmcError):
    """The user handed nilmc something it cannot use (file, data, option)."""


class ModelLoadError(BadInputError):
    """A model file is missing, malformed, truncated or of an unknown kind."""


class DataError(BadInputError):
    """A data set is missing, malformed, empty, non-finite or of the wrong dtype."""


class ShapeMismatchError(BadInputError):
    """The model's input contract and the data do not agree."""


class NormalizationError(BadInputError):
    """Data do not look like the normalization the model declares."""


class UnknownBackendError(BadInputError):
    """A target names a backend or precision nilmc does not know."""


class OutputError(BadInputError):
    """The output location cannot be written."""


class MissingDependencyError(BadInputError):
    """An optional dependency (an extra) is not installed."""

    def __init__(self, package: str, extra: str, purpose: str) -> None:
        self.package = package
        self.extra = extra
        super().__init__(
            f"{purpose} needs the Python package '{package}', which is not installed here",
            f"install it with: pip install 'nilmc[{extra}]'",
        )


class QuantizationError(BadInputError):
    """Quantization cannot honour the target's rules with these statistics."""


class BundleError(BadInputError):
    """A bundle is malformed, unfinished or does not match its manifest (tampered)."""


class Interrupted(BaseException):
    """SIGINT/SIGTERM arrived: clean up and exit 128 + the signal number."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(f"interrupted by signal {signum}")


class InternalError(NilmcError):
    """A bug in nilmc, not a problem with the user's input."""

    exit_code = EXIT_INTERNAL

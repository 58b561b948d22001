"""Exception types.

Every error raised for bad input names the file (or parameter), the column, the offending value and what
was expected, so a user can act on it without reading the source.
"""

from __future__ import annotations

from pathlib import Path


class EhrmemError(Exception):
    """Base class of every error ehrmem raises on purpose."""


class InputError(EhrmemError, ValueError):
    """The user's data, configuration or command-line arguments are not what ehrmem expects."""

    def __init__(
        self,
        message: str,
        *,
        file: str | Path | None = None,
        column: str | None = None,
        value: object = None,
        expected: str | None = None,
    ) -> None:
        parts = [message]
        if file is not None:
            parts.append(f"file: {file}")
        if column is not None:
            parts.append(f"column: {column!r}")
        if value is not None:
            parts.append(f"value: {value!r}")
        if expected is not None:
            parts.append(f"expected: {expected}")
        super().__init__("\n  ".join(parts))
        self.file = file
        self.column = column
        self.value = value
        self.expected = expected


class ModelError(EhrmemError):
    """A model cannot be loaded or behaves inconsistently (e.g. batched and single scores disagree)."""


class NumericalError(EhrmemError, ArithmeticError):
    """Scores contain non-finite values that would silently corrupt a privacy metric."""


class ResultsNotReadyError(EhrmemError, RuntimeError):
    """Results of an audit were read before the audit was run."""

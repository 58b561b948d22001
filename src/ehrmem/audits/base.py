"""What every audit (T1 ... T6) shares: the context it runs in, its result, and its lifecycle.

Lifecycle: construct with the context and the test's own settings, call :meth:`Audit.run`, then read
:attr:`Audit.result`. Reading before running raises :class:`~ehrmem.errors.ResultsNotReadyError`.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import polars as pl

from ehrmem.data.cohort import Cohort
from ehrmem.data.meds import MedsDataset
from ehrmem.data.tokenizer import EncodedSubject, EventTokenizer
from ehrmem.errors import ResultsNotReadyError
from ehrmem.models.protocol import AuditModel, TokenScores

logger = logging.getLogger(__name__)

Status = Literal["ok", "skipped", "undefined"]
T = TypeVar("T")

# A progress hook: wraps an iterable with a description and a total; the CLI passes one that draws bars.
Progress = Callable[[Iterable[T], str, int | None], Iterator[T]]


def no_progress(it: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """The default progress hook: draws nothing."""
    yield from it


@dataclass
class AuditContext:
    """Everything an audit may use. Audits share this and the statistics, never each other's internals."""

    dataset: MedsDataset
    model: AuditModel
    tokenizer: EventTokenizer
    cohort: Cohort
    encoded: dict[int, EncodedSubject]
    manifest: dict | None
    model_dir: Path | None
    seed: int = 0
    batch_size: int = 16
    progress: Progress = no_progress
    # Results of earlier tests in this run, by test id (for T5/T6, which build on T1, T2 and T4).
    previous: dict[str, TestResult] = field(default_factory=dict)
    # Sampled continuations keyed by (purpose, subject, tier, prompt digest, decoding settings), so tests
    # asking for the same prompt under the same settings share one generation.
    sample_cache: dict[tuple, list] = field(default_factory=dict)


@dataclass
class TestResult:
    """The outcome of one test: a JSON-ready section and per-subject tables (the HTML plots are drawn from both)."""

    test_id: str
    title: str
    status: Status
    reason: str | None = None
    section: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, pl.DataFrame] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "reason": self.reason,
            "title": self.title,
            "warnings": self.warnings,
            **self.section,
        }

    def warn(self, message: str) -> None:
        """Record a warning in the report and log it (a result the reader should not fully trust)."""
        logger.warning("%s: %s", self.test_id, message)
        self.warnings.append(message)


def score_in_chunks(context: AuditContext, sequences: list, desc: str) -> list[TokenScores]:
    """``model.token_scores`` over chunks of a few batches, so the progress hook advances as work is done."""
    chunk = max(1, context.batch_size * 4)
    starts = range(0, len(sequences), chunk)
    out: list[TokenScores] = []
    for start in context.progress(starts, desc, len(starts)):
        out += context.model.token_scores(sequences[start : start + chunk], batch_size=context.batch_size)
    return out


def skipped(test_id: str, title: str, reason: str) -> TestResult:
    return TestResult(test_id=test_id, title=title, status="skipped", reason=reason)


class Audit(ABC):
    """Base class of the six tests."""

    test_id: ClassVar[str]
    title: ClassVar[str]

    def __init__(self, context: AuditContext) -> None:
        self.context = context
        self._result: TestResult | None = None

    @abstractmethod
    def _run(self) -> TestResult: ...

    def run(self) -> Audit:
        self._result = self._run()
        return self

    @property
    def result(self) -> TestResult:
        if self._result is None:
            raise ResultsNotReadyError(f"{type(self).__name__}.result was read before run() was called.")
        return self._result

    def write_tables(self, out_dir: Path) -> list[Path]:
        paths = []
        for name, table in self.result.tables.items():
            fp = Path(out_dir) / f"{self.test_id}_{name}.parquet"
            table.write_parquet(fp)
            paths.append(fp)
        return paths

"""The small protocol every audited model implements.

Audits only talk to a model through these three calls, so adapters for other EHR foundation-model
formats (or a remote model whose outputs were saved offline) plug in without touching the tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import numpy as np

Pooling = Literal["mean", "last"]


@dataclass(frozen=True)
class TokenScores:
    """Teacher-forced scores of one sequence.

    ``logprob[t]`` is log p(x_{t+1} | x_{<=t}): the first token has no score, so each array has one entry
    fewer than the sequence (failure kind 8). ``mean`` and ``std`` are the mean and standard deviation of
    log p(v | x_{<=t}) over the vocabulary under the model's own distribution (used by Min-K%++).
    """

    logprob: np.ndarray
    mean: np.ndarray
    std: np.ndarray


@runtime_checkable
class AuditModel(Protocol):
    """What ehrmem needs from a generative EHR model."""

    @property
    def context_length(self) -> int: ...

    @property
    def vocab_size(self) -> int: ...

    def token_scores(self, sequences: Sequence[np.ndarray], *, batch_size: int = 16) -> list[TokenScores]:
        """Per-token log-probabilities of each sequence, one forward pass per batch."""
        ...

    def embed(self, sequences: Sequence[np.ndarray], *, pooling: Pooling = "mean", batch_size: int = 16) -> np.ndarray:
        """One embedding per sequence (``n x hidden``), pooled over valid tokens only."""
        ...

    def sample(
        self,
        prompts: Sequence[np.ndarray],
        *,
        n_samples: int,
        max_new_tokens: int,
        seeds: Sequence[int],
        temperature: float = 1.0,
        top_p: float = 1.0,
        batch_size: int = 16,
        stop_token: int | None = None,
    ) -> list[list[np.ndarray]]:
        """``n_samples`` continuations of each prompt (new tokens only), reproducible per seed."""
        ...

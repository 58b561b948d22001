"""A population n-gram model: the cheapest reference that never saw the members.

Used to calibrate membership scores: a sequence that is likely under the audited model but also under a
model of the population is typical, not memorised. The model is a bigram with Jelinek-Mercer
interpolation towards an add-one unigram, so every token has a finite probability.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp

from ehrmem.errors import InputError


class BigramReference:
    """Interpolated bigram model over token ids.

    Parameters
    ----------
    vocab_size
        Number of token ids.
    interpolation
        Weight of the bigram estimate; the rest goes to the add-one unigram.
    """

    def __init__(self, vocab_size: int, *, interpolation: float = 0.7) -> None:
        if not 0 <= interpolation < 1:
            raise InputError("interpolation must be in [0, 1).", value=interpolation, expected="0 <= x < 1")
        self.vocab_size = int(vocab_size)
        self.interpolation = float(interpolation)
        self._bigram: sp.csr_matrix | None = None
        self._row_totals: np.ndarray | None = None
        self._unigram: np.ndarray | None = None
        self.n_sequences = 0

    def fit(self, sequences: Sequence[np.ndarray]) -> BigramReference:
        if not sequences:
            raise InputError(
                "The n-gram reference needs at least one sequence to fit.",
                value=0,
                expected=">= 1 reference sequence",
            )
        prev = np.concatenate([np.asarray(s[:-1], dtype=np.int64) for s in sequences])
        nxt = np.concatenate([np.asarray(s[1:], dtype=np.int64) for s in sequences])
        if prev.size and (max(prev.max(), nxt.max()) >= self.vocab_size or min(prev.min(), nxt.min()) < 0):
            raise InputError(
                "Reference sequences hold ids outside the vocabulary.",
                expected=f"0 <= id < {self.vocab_size}",
            )
        counts = sp.coo_matrix(
            (np.ones_like(prev, dtype=np.float64), (prev, nxt)), shape=(self.vocab_size, self.vocab_size)
        ).tocsr()
        counts.sum_duplicates()
        self._bigram = counts
        self._row_totals = np.asarray(counts.sum(axis=1)).ravel()
        uni = np.bincount(nxt, minlength=self.vocab_size).astype(np.float64) + 1.0
        self._unigram = uni / uni.sum()
        self.n_sequences = len(sequences)
        return self

    def token_logprobs(self, sequence: np.ndarray) -> np.ndarray:
        """log p(x_{t+1} | x_t) for t = 0..n-2 (the first token has no score)."""
        if self._bigram is None or self._unigram is None or self._row_totals is None:
            raise InputError("The n-gram reference was used before fit().", expected="call fit() first")
        s = np.asarray(sequence, dtype=np.int64)
        if s.size and (s.min() < 0 or s.max() >= self.vocab_size):
            # Failure kind 13: a negative id would silently index from the end of the tables.
            bad = int(s.min()) if s.min() < 0 else int(s.max())
            raise InputError(
                "Sequence holds an id outside the vocabulary of the n-gram reference.",
                value=bad,
                expected=f"0 <= id < {self.vocab_size}",
            )
        prev, nxt = s[:-1], s[1:]
        pair = np.asarray(self._bigram[prev, nxt]).ravel()
        totals = self._row_totals[prev]
        with np.errstate(divide="ignore", invalid="ignore"):
            p_bi = np.where(totals > 0, pair / np.maximum(totals, 1), 0.0)
        lam = np.where(totals > 0, self.interpolation, 0.0)
        return np.log(lam * p_bi + (1 - lam) * self._unigram[nxt])

"""T4's embedding test: how stable is a patient's embedding when some of their tokens are replaced?

The paper's hypothesis (Tonekaboni et al. 2025): a record the model memorised sits in a flat, stable region
of its representation space, so replacing a few of its tokens with random codes moves the embedding less
than it would for an unseen record. For each sequence:

1. the maskable positions are those whose token is not special (not ``[BOS]``, ``[PAD]``, ``[EOS]``,
   ``[UNK]``): codes, time gaps and value bins; ``n_mask = max(1, ceil(mask_fraction * n_maskable))``;
2. ``repeats`` copies are made; in copy r, ``n_mask`` positions drawn without replacement are replaced by
   code tokens drawn uniformly (with replacement) from the vocabulary's code tokens (kind 1). Copy r of
   subject s uses its own generator seeded from ``(seed, s, r)`` only, so the copies never depend on the
   batch or on the other subjects;
3. every copy is embedded (``model.embed`` with masked pooling);
4. ``variance = mean over the d embedding dimensions of the sample variance (ddof=1) across the repeats``,
   i.e. ``(1/d) * sum_j var_r(e[r, j])``, computed in float64.

The score is ``-variance``: **higher = more likely a member** (failure kind 3), since memorised records
are expected to have lower variance.

Limitations
-----------
A replacement code may by chance equal the token it replaces (probability 1 / number of code tokens), so
slightly fewer than ``n_mask`` tokens may differ from the original. Time-gap and value tokens are
replaced by codes too, as in the paper; the masked copy is therefore not always a well-formed record.
"""

from __future__ import annotations

import logging
import math

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ehrmem.audits.base import AuditContext
from ehrmem.data.prompts import prompt_seed
from ehrmem.errors import InputError, NumericalError
from ehrmem.models.protocol import Pooling

logger = logging.getLogger(__name__)

MASKING_DESCRIPTION = (
    "minus the variance of the patient embedding over {repeats} copies with {fraction:.0%} of tokens replaced "
    "by random codes (the paper's embedding test)"
)
_PURPOSE = "masking"


class MaskingConfig(BaseModel):
    """Settings of T4's masking-variance embedding test."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    mask_fraction: float = Field(0.1, gt=0, lt=1, description="share of maskable tokens replaced per copy")
    repeats: int = Field(100, ge=2, description="masked copies per sequence (the quick profile uses 20)")
    pooling: Pooling = "mean"


def n_masked(n_maskable: int, fraction: float) -> int:
    """Tokens replaced per copy: ``max(1, ceil(fraction * n_maskable))``, robust to float rounding.

    ``0.1 * 30`` is ``3.0000000000000004`` in floating point; it must give 3, not 4.
    """
    if n_maskable < 1:
        return 0
    return min(n_maskable, max(1, math.ceil(round(fraction * n_maskable, 9))))


def mask_positions(ids: np.ndarray, token_kind: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Sorted positions replaced in one copy: non-special tokens only, so never ``[BOS]``.

    Parameters
    ----------
    ids
        The sequence's token ids.
    token_kind
        The tokenizer's kind of each token id (0 = special).
    fraction
        Share of the maskable positions to replace.
    rng
        The copy's own generator.
    """
    maskable = np.flatnonzero(token_kind[np.asarray(ids, dtype=np.int64)] != 0)
    k = n_masked(maskable.size, fraction)
    return np.sort(rng.choice(maskable, size=k, replace=False)) if k else maskable[:0]


def masked_copies(
    ids: np.ndarray,
    token_kind: np.ndarray,
    *,
    fraction: float,
    repeats: int,
    seed: int,
    subject_id: int,
) -> list[np.ndarray]:
    """The ``repeats`` masked copies of one sequence, each seeded from ``(seed, subject_id, repeat)``.

    Parameters
    ----------
    ids
        The sequence's token ids.
    token_kind
        The tokenizer's kind of each token id (0 special, 1 code, 2 time gap, 3 value bin).
    fraction, repeats
        As :class:`MaskingConfig`.
    seed, subject_id
        What the copies' random streams derive from (never the batch).

    Returns
    -------
    list of numpy.ndarray
        Copies of ``ids`` (int64) with the masked positions replaced by random code tokens.
    """
    codes = np.flatnonzero(token_kind == 1)
    if codes.size == 0:
        raise InputError(
            "The vocabulary has no code tokens to mask with.", column="token_kind", expected="some tokens of kind 1"
        )
    base = np.asarray(ids, dtype=np.int64)
    out = []
    for r in range(repeats):
        rng = np.random.default_rng(prompt_seed(seed, subject_id, r, _PURPOSE))
        pos = mask_positions(base, token_kind, fraction, rng)
        copy = base.copy()
        copy[pos] = codes[rng.integers(0, codes.size, size=pos.size)]
        out.append(copy)
    return out


def masking_variance_scores(
    context: AuditContext,
    subject_ids: list[int],
    sequences: list[np.ndarray],
    cfg: MaskingConfig,
) -> np.ndarray:
    """Membership scores from the variance of each sequence's embedding under random code replacement.

    Parameters
    ----------
    context
        Supplies the model, the tokenizer (``token_kind``), the seed, the batch size and the progress hook.
    subject_ids
        The subject of each sequence (seeds the copies).
    sequences
        Token ids to mask, each within the model's context window and with at least one maskable token.
    cfg
        Mask fraction, repeats and pooling.

    Returns
    -------
    numpy.ndarray
        ``-mean_j var_r(e[r, j])`` per sequence (float64): **higher = more likely a member**. The result
        depends on the seed, the subject and the sequence only, never on the batch size or the other
        sequences.

    Raises
    ------
    InputError
        When the lengths differ or a sequence has no maskable token (e.g. ``[BOS]`` alone).
    NumericalError
        When an embedding is non-finite (failure kind 2), naming the subjects.
    """
    if len(subject_ids) != len(sequences):
        raise InputError(
            "One subject id per sequence is required.",
            column="subject_ids",
            value=f"{len(subject_ids)} subject ids, {len(sequences)} sequences",
            expected="equal counts",
        )
    kinds = context.tokenizer.token_kind
    empty = [s for s, q in zip(subject_ids, sequences, strict=True) if not np.any(kinds[np.asarray(q)] != 0)]
    if empty:
        raise InputError(
            "Some sequences have no token that can be masked (only special tokens).",
            column="sequences",
            value=f"{len(empty)} subjects, e.g. {empty[:10]}",
            expected="at least one code, time or value token per sequence; drop these subjects first",
        )
    # Bounded memory: a chunk holds whole subjects and about four batches of copies.
    per_chunk = max(1, (context.batch_size * 4) // cfg.repeats)
    starts = range(0, len(sequences), per_chunk)
    scores = np.empty(len(sequences), dtype=np.float64)
    logger.info(
        "Masking variance: %d sequences x %d copies, %.0f%% of tokens replaced",
        len(sequences),
        cfg.repeats,
        100 * cfg.mask_fraction,
    )
    for start in context.progress(starts, "T4 masking variance", len(starts)):
        chunk_ids = subject_ids[start : start + per_chunk]
        copies = [
            c
            for sid, q in zip(chunk_ids, sequences[start : start + per_chunk], strict=True)
            for c in masked_copies(
                q, kinds, fraction=cfg.mask_fraction, repeats=cfg.repeats, seed=context.seed, subject_id=sid
            )
        ]
        emb = context.model.embed(copies, pooling=cfg.pooling, batch_size=context.batch_size)
        emb = np.asarray(emb, dtype=np.float64).reshape(len(chunk_ids), cfg.repeats, -1)
        bad = [s for s, e in zip(chunk_ids, emb, strict=True) if not np.all(np.isfinite(e))]
        if bad:
            raise NumericalError(
                f"Non-finite embeddings of masked copies for {len(bad)} subjects {bad[:10]}; the masking "
                "variance would be corrupted. Check the model's dtype."
            )
        scores[start : start + len(chunk_ids)] = -emb.var(axis=1, ddof=1).mean(axis=1)
    return scores

"""T4's masking-variance embedding test: seeding, what is masked, batch invariance, polarity."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from ehrmem.audits.base import AuditContext
from ehrmem.audits.masking import (
    MaskingConfig,
    mask_positions,
    masked_copies,
    masking_variance_scores,
    n_masked,
)
from ehrmem.data.cohort import build_cohort
from ehrmem.data.meds import load_meds
from ehrmem.data.tokenizer import EventTokenizer
from ehrmem.errors import InputError
from ehrmem.stats import auc_summary


def _context(data_dir, model=None, *, batch_size=16):
    ds = load_meds(data_dir)
    train = ds.events.filter(pl.col("subject_id").is_in(ds.subject_ids("train")))
    tok = EventTokenizer.fit(train, min_code_subjects=1)
    cohort = build_cohort(
        ds, None, membership="splits", member_splits=["train"], nonmember_splits=["held_out"], match_length=False
    )
    encoded = {e.subject_id: e for e in tok.encode(ds.events)}
    ctx = AuditContext(
        dataset=ds,
        model=model,
        tokenizer=tok,
        cohort=cohort,
        encoded=encoded,
        manifest=None,
        model_dir=None,
        batch_size=batch_size,
    )
    return ctx


def _tiny_gpt2(vocab_size: int):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from ehrmem.models.hf import HFCausalLM

    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=1, n_embd=32, n_head=2, vocab_size=vocab_size, n_positions=128, bos_token_id=1, eos_token_id=2
    )
    return HFCausalLM(GPT2LMHeadModel(cfg), pad_id=0, device="cpu")


@pytest.mark.parametrize("n, fraction, expected", [(30, 0.1, 3), (31, 0.1, 4), (5, 0.1, 1), (1, 0.5, 1), (0, 0.1, 0)])
def test_n_masked_is_ceil_with_at_least_one(n, fraction, expected):
    assert n_masked(n, fraction) == expected


def test_mask_positions_skip_special_tokens():
    """Exactly ceil(fraction * maskable) positions, never [BOS] or another special token."""
    kind = np.array([0, 0, 0, 0, 1, 1, 2, 3])  # [PAD] [BOS] [EOS] [UNK] code code time value
    ids = np.array([1] + [4, 5, 6, 7] * 7 + [3, 4, 5])  # [BOS], 28 + 2 maskable, one [UNK]
    for seed in range(20):
        pos = mask_positions(ids, kind, 0.1, np.random.default_rng(seed))
        assert pos.size == 3 and len(set(pos)) == 3
        assert 0 not in pos and np.all(kind[ids[pos]] != 0)

    copies = masked_copies(ids, kind, fraction=0.1, repeats=50, seed=0, subject_id=7)
    assert len(copies) == 50
    for c in copies:
        changed = np.flatnonzero(c != ids)
        assert changed.size <= 3 and 0 not in changed
        assert c[0] == 1 and c[-3] == 3  # [BOS] and [UNK] untouched
        assert np.all(kind[c[changed]] == 1)  # replacements are code tokens
    assert len({c.tobytes() for c in copies}) > 40


def test_copies_depend_on_seed_subject_and_repeat_only():
    kind = np.array([0, 0, 0, 0] + [1] * 20)
    ids = np.array([1] + list(range(4, 24)) * 2)
    a = masked_copies(ids, kind, fraction=0.2, repeats=5, seed=3, subject_id=11)
    b = masked_copies(ids, kind, fraction=0.2, repeats=8, seed=3, subject_id=11)
    assert all(np.array_equal(x, y) for x, y in zip(a, b[:5], strict=True))
    c = masked_copies(ids, kind, fraction=0.2, repeats=5, seed=3, subject_id=12)
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_config_validation():
    assert MaskingConfig().repeats == 100 and MaskingConfig().mask_fraction == 0.1
    with pytest.raises(ValueError):
        MaskingConfig(repeats=1)
    with pytest.raises(ValueError):
        MaskingConfig(mask_fraction=0.0)
    with pytest.raises(ValueError, match="extra"):
        MaskingConfig(repeat=10)


def test_scores_do_not_depend_on_batch_size_or_neighbours(tiny_meds):
    """Failure kind 9: the same score with batch size 1 and 8, and with other subjects in the call."""
    ctx = _context(tiny_meds)
    ctx.model = _tiny_gpt2(ctx.tokenizer.vocab_size)
    ids = sorted(ctx.encoded)[:6]
    seqs = [ctx.encoded[s].ids[:40] for s in ids]
    cfg = MaskingConfig(repeats=6, mask_fraction=0.2)
    ctx.batch_size = 1
    one = masking_variance_scores(ctx, ids, seqs, cfg)
    ctx.batch_size = 8
    eight = masking_variance_scores(ctx, ids, seqs, cfg)
    np.testing.assert_allclose(one, eight, rtol=1e-5, atol=1e-10)
    alone = masking_variance_scores(ctx, ids[2:3], seqs[2:3], cfg)
    np.testing.assert_allclose(alone, eight[2:3], rtol=1e-5, atol=1e-10)
    assert np.all(np.isfinite(one)) and np.all(one < 0)


class StableForMembers:
    """Embeds every masked copy of a member's record identically (zero variance), a non-member's by content."""

    context_length = 10_000
    vocab_size = 100_000

    def __init__(self, member_copies: set[bytes]) -> None:
        self.member_copies = member_copies

    def embed(self, sequences, *, pooling="mean", batch_size=16):
        out = [
            np.zeros(3) if np.asarray(s).tobytes() in self.member_copies else np.bincount(s, minlength=40)[4:7]
            for s in sequences
        ]
        return np.asarray(out, dtype=np.float32)


class _Tokens:
    token_kind = np.array([0, 0, 0, 0] + [1] * 36)


def test_polarity_stable_embeddings_score_as_members():
    """Failure kind 3: lower variance (a memorised record) gives a higher score; the oracle has AUC 1."""
    kind = _Tokens.token_kind
    rng = np.random.default_rng(0)
    seqs = [np.concatenate([[1], rng.integers(4, 40, size=30)]) for _ in range(20)]
    labels = np.array([1] * 10 + [0] * 10)
    cfg = MaskingConfig(repeats=10, mask_fraction=0.1)
    member_copies = {
        c.tobytes()
        for sid in np.flatnonzero(labels == 1)
        for c in masked_copies(seqs[sid], kind, fraction=0.1, repeats=10, seed=0, subject_id=int(sid))
    }
    ctx = AuditContext(
        dataset=None,
        model=StableForMembers(member_copies),
        tokenizer=_Tokens(),
        cohort=None,
        encoded={},
        manifest=None,
        model_dir=None,
    )
    scores = masking_variance_scores(ctx, list(range(20)), seqs, cfg)
    assert np.all(scores[labels == 1] == 0.0) and np.all(scores[labels == 0] < 0)
    assert auc_summary(labels, scores, n_boot=100)["auc"] == 1.0
    assert auc_summary(labels, -scores, n_boot=100)["auc"] == 0.0


def test_unmaskable_sequence_is_an_error(tiny_meds):
    ctx = _context(tiny_meds)
    ctx.model = _tiny_gpt2(ctx.tokenizer.vocab_size)
    with pytest.raises(InputError, match="no token that can be masked"):
        masking_variance_scores(ctx, [1, 2], [np.array([1, 5, 6]), np.array([1])], MaskingConfig(repeats=2))
    with pytest.raises(InputError, match="subject id per sequence"):
        masking_variance_scores(ctx, [1], [np.array([1, 5]), np.array([1, 6])], MaskingConfig(repeats=2))

"""Tests for the population bigram reference (ehrmem.models.ngram)."""

from __future__ import annotations

import numpy as np
import pytest

from ehrmem.errors import InputError
from ehrmem.models.ngram import BigramReference

VOCAB = 10
TRAIN = [np.array([1, 2, 3, 4]), np.array([1, 2, 3, 5]), np.array([1, 2, 6])]


@pytest.fixture
def ref() -> BigramReference:
    return BigramReference(VOCAB).fit(TRAIN)


def test_one_score_per_token_after_the_first(ref):
    assert ref.token_logprobs(np.array([1, 2, 3, 4])).shape == (3,)
    assert ref.token_logprobs(np.array([1])).shape == (0,)
    assert ref.n_sequences == 3


def test_unseen_tokens_get_finite_but_lower_log_probabilities(ref):
    seen = ref.token_logprobs(np.array([1, 2]))[0]
    unseen_pair = ref.token_logprobs(np.array([1, 9]))[0]  # 9 never occurs at all
    unseen_row = ref.token_logprobs(np.array([9, 2]))[0]  # nothing ever followed 9: unigram only
    assert np.all(np.isfinite([seen, unseen_pair, unseen_row]))
    assert seen > unseen_pair
    assert seen > np.log(0.7)  # 1 -> 2 always: most of the bigram weight
    # A bigram seen twice beats one seen once after the same token.
    after_3 = ref.token_logprobs(np.array([3, 4]))[0], ref.token_logprobs(np.array([3, 9]))[0]
    assert after_3[0] > after_3[1]
    two, one = ref.token_logprobs(np.array([2, 3]))[0], ref.token_logprobs(np.array([2, 6]))[0]
    assert two > one


def test_every_row_is_a_probability_distribution(ref):
    for prev in range(VOCAB):
        p = np.exp([ref.token_logprobs(np.array([prev, nxt]))[0] for nxt in range(VOCAB)])
        assert p.sum() == pytest.approx(1.0)
        assert np.all(p > 0)


@pytest.mark.parametrize("bad", [-1, VOCAB, VOCAB + 5])
def test_ids_outside_the_vocabulary_are_refused(ref, bad):
    """Failure kind 13 (a negative id used to index the tables from the end, silently)."""
    with pytest.raises(InputError) as info:
        ref.token_logprobs(np.array([1, bad, 2]))
    assert str(bad) in str(info.value) and f"< {VOCAB}" in str(info.value)
    with pytest.raises(InputError, match="outside the vocabulary"):
        BigramReference(VOCAB).fit([np.array([1, bad])])


def test_use_before_fit_and_empty_fit_are_refused():
    with pytest.raises(InputError, match="before fit"):
        BigramReference(VOCAB).token_logprobs(np.array([1, 2]))
    with pytest.raises(InputError, match="at least one sequence"):
        BigramReference(VOCAB).fit([])


@pytest.mark.parametrize("interpolation", [-0.1, 1.0, 1.5])
def test_interpolation_must_leave_room_for_the_unigram(interpolation):
    with pytest.raises(InputError, match="interpolation"):
        BigramReference(VOCAB, interpolation=interpolation)

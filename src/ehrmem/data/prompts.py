"""Prompts by attacker-knowledge tier, and the true continuation each prompt is compared with.

A tier-k prompt is a patient's static codes plus their first k timed events (k = 0 is "static":
demographics only). The context window must leave room for the horizon that will be generated
(failure kind 12); when it does not, a recorded policy applies:

- ``"keep_recent"`` (default): keep ``[BOS]``, the static codes and as many of the most recent prompt
  events as fit; the prompt is marked truncated.
- ``"skip"``: the subject gets no prompt at this tier and is listed as having no budget.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
import polars as pl
from pydantic import AfterValidator

from ehrmem.data.meds import CODE, SUBJECT_ID, TIME
from ehrmem.data.tokenizer import EncodedSubject
from ehrmem.errors import InputError

TruncationPolicy = Literal["keep_recent", "skip"]
DEFAULT_TIERS = (0, 10, 20, 50)


def _check_tiers(tiers: list[int]) -> list[int]:
    if not tiers or any(k < 0 for k in tiers):
        raise ValueError(f"tiers must be a non-empty list of event counts >= 0, got {tiers}")
    return sorted(set(tiers))


#: Attacker-knowledge tiers in a configuration: event counts >= 0, at least one, sorted, without repeats.
Tiers = Annotated[list[int], AfterValidator(_check_tiers)]


def tier_name(k: int) -> str:
    return "static" if k == 0 else str(k)


@dataclass(frozen=True)
class Prompt:
    """One subject's prompt at one tier."""

    subject_id: int
    k_events: int
    ids: np.ndarray
    truncated: bool
    n_prompt_events: int

    @property
    def tier(self) -> str:
        return tier_name(self.k_events)


@dataclass
class PromptSet:
    """Prompts of one tier, with the accounting of who could not be prompted and why (failure kinds 5, 12)."""

    k_events: int
    prompts: list[Prompt]
    too_short: list[int]
    no_budget: list[int]
    truncated: list[int]
    requested: int

    def summary(self) -> dict:
        return {
            "tier": tier_name(self.k_events),
            "requested": self.requested,
            "run": len(self.prompts),
            "too_short": len(self.too_short),
            "no_context_budget": len(self.no_budget),
            "truncated": len(self.truncated),
            "no_budget_subjects": self.no_budget[:50],
        }


def prompt_tokens(
    enc: EncodedSubject,
    k_events: int,
    *,
    max_prompt_tokens: int,
    policy: TruncationPolicy = "keep_recent",
    cut_event: int | None = None,
) -> tuple[np.ndarray, np.ndarray, bool] | None:
    """The tokens of a tier-``k_events`` prompt with the event each belongs to, or ``None`` when skipped.

    Returns ``(ids, event_index, truncated)``: exactly the tokens :func:`build_prompt` puts in the prompt
    (after the truncation policy), with their :attr:`EncodedSubject.event_index` (-1 for ``[BOS]`` and
    static codes), so a prompt can be edited event by event (T5 perturbations).
    """
    k = k_events if cut_event is None else min(k_events, cut_event)
    ids = enc.prompt(k)
    ev = enc.event_index[enc.event_index < k]
    truncated = False
    if len(ids) > max_prompt_tokens:
        if policy == "skip":
            return None
        if policy != "keep_recent":
            raise InputError("Unknown truncation policy.", value=policy, expected="'keep_recent' or 'skip'")
        head = int((ev < 0).sum())  # [BOS] and static codes
        room = max_prompt_tokens - head
        if room <= 0:
            return None
        tail = ids[head:][-room:]
        tail_ev = ev[head:][-room:]
        # Do not start with a partial event (a value or time token without its code).
        if tail_ev.size and (ev == tail_ev[0]).sum() > (tail_ev == tail_ev[0]).sum():
            keep = tail_ev != tail_ev[0]
            tail = tail[keep]
            tail_ev = tail_ev[keep]
        ids = np.concatenate([ids[:head], tail])
        ev = np.concatenate([ev[:head], tail_ev])
        truncated = True
    return ids, ev, truncated


def build_prompt(
    enc: EncodedSubject,
    k_events: int,
    *,
    max_prompt_tokens: int,
    policy: TruncationPolicy = "keep_recent",
    cut_event: int | None = None,
) -> Prompt | None:
    """The tier-``k_events`` prompt of one subject, or ``None`` when the policy skips it.

    ``cut_event`` stops the prompt before that timed event (used by T2 so a prompt never contains the
    codes of the category being tested).
    """
    k = k_events if cut_event is None else min(k_events, cut_event)
    out = prompt_tokens(enc, k_events, max_prompt_tokens=max_prompt_tokens, policy=policy, cut_event=cut_event)
    if out is None:
        return None
    ids, _, truncated = out
    return Prompt(subject_id=enc.subject_id, k_events=k_events, ids=ids, truncated=truncated, n_prompt_events=k)


def build_prompts(
    encoded: Iterable[EncodedSubject],
    k_events: int,
    *,
    context_length: int,
    horizon_tokens: int,
    min_future_events: int = 1,
    policy: TruncationPolicy = "keep_recent",
    cut_events: dict[int, int] | None = None,
) -> PromptSet:
    """Prompts of every subject at one tier, leaving ``horizon_tokens`` of the context for generation."""
    max_prompt = context_length - horizon_tokens
    if max_prompt < 2:
        raise InputError(
            "The generation horizon leaves no room for a prompt in the context window.",
            value=f"horizon {horizon_tokens} tokens, context {context_length}",
            expected="a horizon shorter than the context window",
        )
    encoded = list(encoded)
    prompts, too_short, no_budget, truncated = [], [], [], []
    for enc in encoded:
        cut = None if cut_events is None else cut_events.get(enc.subject_id)
        k = k_events if cut is None else min(k_events, cut)
        if enc.n_events < k + min_future_events:
            too_short.append(enc.subject_id)
            continue
        p = build_prompt(enc, k_events, max_prompt_tokens=max_prompt, policy=policy, cut_event=cut)
        if p is None:
            no_budget.append(enc.subject_id)
            continue
        if p.truncated:
            truncated.append(enc.subject_id)
        prompts.append(p)
    return PromptSet(
        k_events=k_events,
        prompts=prompts,
        too_short=too_short,
        no_budget=no_budget,
        truncated=truncated,
        requested=len(encoded),
    )


def prompt_seed(seed: int, subject_id: int, tier: int, purpose: str = "") -> int:
    """A seed derived from (seed, subject, tier, purpose) only, so results never depend on batching."""
    words = [int(seed) & 0xFFFFFFFF, int(subject_id) & 0xFFFFFFFF, (int(subject_id) >> 32) & 0xFFFFFFFF, int(tier)]
    words += list(purpose.encode())
    return int(np.random.SeedSequence(words).generate_state(1, np.uint32)[0])


def true_continuation(enc: EncodedSubject, p: Prompt, horizon_events: int) -> np.ndarray:
    """Tokens of the ``horizon_events`` timed events after the prompt's events."""
    return enc.continuation(p.n_prompt_events, horizon_events)


def horizon_cut(tokens: Sequence[int] | np.ndarray, token_kind: np.ndarray, horizon_events: int) -> np.ndarray:
    """Generated tokens up to the end of the ``horizon_events``-th code token."""
    toks = np.asarray(tokens)
    is_code = np.isin(token_kind[toks], (1,)) if toks.size else np.zeros(0, dtype=bool)
    idx = np.flatnonzero(is_code)
    if idx.size <= horizon_events:
        return toks
    end = idx[horizon_events]  # the start of the event past the horizon
    # Drop the time-gap token that belongs to that next event as well.
    while end > 0 and token_kind[toks[end - 1]] == 2:
        end -= 1
    return toks[:end]


def category_first_events(events: pl.DataFrame, category_codes: dict[str, set[str]]) -> pl.DataFrame:
    """Per subject and category, where a prompt must stop so that it holds nothing of the category.

    That is the index of the first timed event *at the timestamp* of the subject's first code of the
    category: events sharing that timestamp (e.g. the other diagnoses of the same discharge) are cut too, so
    where a prompt ends does not betray that a code of the category comes next. ``events`` is a MEDS frame
    sorted as :func:`~ehrmem.data.meds.load_meds` returns it, so the index agrees with
    :attr:`EncodedSubject.event_index`. Static codes in a category count as event -1 (such a category is
    always in the prompt). Subjects without the category have no row for it.

    Returns ``subject_id``, ``category``, ``first_event``.
    """
    frames = []
    timed_idx = (
        pl.when(pl.col(TIME).is_null())
        .then(-1)
        .otherwise(pl.col(TIME).is_not_null().cum_sum().over(SUBJECT_ID) - 1)
        .alias("_ev")
    )
    indexed = (
        events.select(SUBJECT_ID, TIME, CODE)
        .with_columns(timed_idx)
        .with_columns(
            # The first event of each timestamp (static rows keep -1).
            pl.when(pl.col(TIME).is_null())
            .then(pl.col("_ev"))
            .otherwise(pl.col("_ev").min().over([SUBJECT_ID, TIME]))
            .alias("_ev")
        )
    )
    for name, codes in category_codes.items():
        if not codes:
            continue
        hit = indexed.filter(pl.col(CODE).is_in(list(codes)))
        frames.append(
            hit.group_by(SUBJECT_ID)
            .agg(pl.col("_ev").min().alias("first_event"))
            .with_columns(pl.lit(name).alias("category"))
        )
    if not frames:
        return pl.DataFrame(schema={SUBJECT_ID: pl.Int64, "category": pl.String, "first_event": pl.Int64})
    return (
        pl.concat(frames)
        .select(SUBJECT_ID, "category", pl.col("first_event").cast(pl.Int64))
        .sort(SUBJECT_ID, "category")
    )

"""Sampling continuations of prompts, shared by the generative tests (T1, T2, T5).

All M continuations of a prompt run in one cached, batched generation; every trajectory draws from its
own random stream derived from (seed, subject, tier, purpose, trajectory), so results never depend on
batch size or on which prompts share a batch. The effective decoding settings are recorded and duplicate
samples counted (failure kind 11).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from ehrmem.audits.base import AuditContext
from ehrmem.data.prompts import Prompt, TruncationPolicy, horizon_cut, prompt_seed
from ehrmem.data.tokenizer import EventTokenizer

logger = logging.getLogger(__name__)

STATIC_PREFIXES = ("GENDER//", "MEDS_BIRTH")

K = TypeVar("K", bound=Hashable)


class SamplingConfig(BaseModel):
    """How continuations are sampled."""

    model_config = ConfigDict(extra="forbid")

    n_samples: int = Field(10, ge=1, description="continuations per prompt (M)")
    temperature: float = Field(1.0, ge=0, description="0 means greedy decoding")
    top_p: float = Field(1.0, gt=0, le=1)
    horizon_events: int = Field(20, ge=1, description="events compared with the true continuation (H)")
    tokens_per_event: float = Field(2.5, ge=1, description="new-token budget per horizon event")
    generation_batch_size: int = Field(64, ge=1, description="trajectories per generate call")
    truncation: TruncationPolicy = "keep_recent"
    population_samples: int = Field(100, ge=2, description="unconditioned samples (population baseline)")

    @property
    def max_new_tokens(self) -> int:
        return int(math.ceil(self.horizon_events * self.tokens_per_event))

    def effective(self) -> dict:
        """The settings that actually apply (failure kind 11: temperature 0 is greedy, one sample)."""
        greedy = self.temperature == 0.0
        return {
            "decoding": "greedy" if greedy else "sampling",
            "temperature": self.temperature,
            "top_p": self.top_p if not greedy else None,
            "n_samples": 1 if greedy else self.n_samples,
            "horizon_events": self.horizon_events,
            "max_new_tokens": self.max_new_tokens,
            "seeds": "per trajectory, from (seed, subject, tier, purpose, trajectory index)",
            "truncation_policy": self.truncation,
        }


@dataclass
class EventArrays:
    """Decoded events of one continuation: codes (strings) and elapsed seconds since the prompt end."""

    codes: list[str]
    times: np.ndarray


def decode_events(tokenizer: EventTokenizer, ids: np.ndarray, *, drop_static: bool = False) -> EventArrays:
    """Decode tokens into events. ``drop_static`` removes demographics and birth and rebases time to the
    first remaining event (used for unconditioned samples, which start a record from scratch)."""
    events = tokenizer.decode(np.asarray(ids))
    if drop_static:
        events = [e for e in events if not e[0].startswith(STATIC_PREFIXES)]
        if events:
            t0 = events[0][1]
            events = [(c, t - t0, v) for c, t, v in events]
    return EventArrays(codes=[e[0] for e in events], times=np.array([e[1] for e in events], dtype=np.float64))


def duplicate_count(samples: Sequence[np.ndarray]) -> int:
    """Samples of one prompt that repeat an earlier sample exactly."""
    seen: set[bytes] = set()
    dup = 0
    for s in samples:
        key = np.asarray(s).tobytes()
        dup += key in seen
        seen.add(key)
    return dup


def sample_prompts(
    context: AuditContext,
    prompts: Sequence[Prompt],
    cfg: SamplingConfig,
    *,
    purpose: str,
    desc: str,
) -> dict[tuple[int, int], list[np.ndarray]]:
    """Sample ``n_samples`` continuations of each prompt, cut to ``horizon_events`` events.

    Returns ``{(subject_id, k_events): [token arrays]}``.
    """
    jobs = [((p.subject_id, p.k_events), p, purpose) for p in prompts]
    return sample_jobs(context, jobs, cfg, desc=desc)


def sample_jobs(
    context: AuditContext,
    jobs: Sequence[tuple[K, Prompt, str]],
    cfg: SamplingConfig,
    *,
    desc: str,
) -> dict[K, list[np.ndarray]]:
    """:func:`sample_prompts` for prompts that each carry their own key and purpose, batched together.

    ``jobs`` are ``(key, prompt, purpose)``; each prompt's random stream comes from (seed, subject, tier,
    purpose, trajectory), so several variants of one subject's prompt (T5 perturbations) get distinct,
    batch-independent streams when their purposes differ. Returns ``{key: [token arrays]}``.
    """
    eff = cfg.effective()
    n = eff["n_samples"]
    tok = context.tokenizer
    settings = (n, cfg.temperature, cfg.top_p, cfg.max_new_tokens, cfg.horizon_events)

    def cache_key(p: Prompt, purpose: str) -> tuple:
        return (purpose, p.subject_id, p.k_events, hashlib.sha1(p.ids.tobytes()).hexdigest(), settings)

    out: dict[K, list[np.ndarray]] = {}
    todo = []
    for key, p, purpose in jobs:
        hit = context.sample_cache.get(cache_key(p, purpose))
        if hit is not None:
            out[key] = hit
        else:
            todo.append((key, p, purpose))
    order = sorted(range(len(todo)), key=lambda i: len(todo[i][1].ids))
    per_call = max(1, cfg.generation_batch_size // n)
    chunks = [order[i : i + per_call] for i in range(0, len(order), per_call)]
    for chunk in context.progress(chunks, desc, len(chunks)):
        batch = [todo[i] for i in chunk]
        seeds = [prompt_seed(context.seed, p.subject_id, p.k_events, purpose) for _, p, purpose in batch]
        samples = context.model.sample(
            [p.ids for _, p, _ in batch],
            n_samples=n,
            max_new_tokens=cfg.max_new_tokens,
            seeds=seeds,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            batch_size=cfg.generation_batch_size,
        )
        for (key, p, purpose), s in zip(batch, samples, strict=True):
            cut = [horizon_cut(x, tok.token_kind, cfg.horizon_events) for x in s]
            out[key] = cut
            context.sample_cache[cache_key(p, purpose)] = cut
    return out


def population_samples(context: AuditContext, cfg: SamplingConfig, *, purpose: str = "population") -> list[EventArrays]:
    """Unconditioned samples (prompt = ``[BOS]``): the population baseline, static codes removed."""
    tok = context.tokenizer
    bos = np.array([tok.bos_id], dtype=np.int64)
    n = cfg.population_samples
    budget = min(cfg.max_new_tokens + 16, context.model.context_length - 1)
    seeds = [prompt_seed(context.seed, -1, 0, purpose)]
    samples = context.model.sample(
        [bos],
        n_samples=n,
        max_new_tokens=budget,
        seeds=seeds,
        temperature=max(cfg.temperature, 1e-6) if cfg.temperature > 0 else 1.0,
        top_p=cfg.top_p,
        batch_size=cfg.generation_batch_size,
    )[0]
    out = []
    for s in samples:
        ev = decode_events(tok, s, drop_static=True)
        out.append(EventArrays(codes=ev.codes[: cfg.horizon_events], times=ev.times[: cfg.horizon_events]))
    return out

"""Synthetic canary patients: positive controls for the memorization instrument.

``ehrmem train --canaries N --repeats r`` injects synthetic patients into the training data, each with a
*secret*: a unique, rare combination of diagnosis codes that includes one sensitive code (HIV, substance
use, mental illness) and that no training subject holds. Each canary is built in a pair with a *twin*
made by exactly the same random process; a seeded coin decides which of the two is trained on, ``r``
times, and which is kept out. Canaries and twins are therefore exchangeable before training, and the
twins are the proper negative control: any difference between the two groups is caused by training.

A canary's record is plausible but copies no real patient: ``[BOS]``, the static codes of a randomly
drawn training subject (e.g. ``GENDER//F``), then ``length_events`` timed events drawn from a first-order
Markov chain over the training tokens (so value-bin tokens follow codes that carry values and time-gap
tokens separate events as in real records), a time-gap token, and finally the ``secret_events`` codes of
the secret, all at one timestamp like a discharge's diagnoses.

Exposure (Carlini et al. 2019, "The Secret Sharer") ranks the true secret among alternative secrets
drawn from the same space, by the model's log-likelihood of the secret given the canary's prefix. With
``R`` alternatives and ``rank = 1 + #(alternatives scoring at least as high as the true secret)``,

    exposure = log2(R + 1) - log2(rank)   (bits, between 0 and log2(R + 1)).

For a record the model never saw, the rank is uniform on ``1 .. R + 1``, so ``rank / (R + 1)`` is an
exact p-value and the twins' exposures show the null distribution.

Examples
--------
>>> cs = make_canaries(tokenizer, encoded, n=10, seed=0, sensitive_codes=None)      # doctest: +SKIP
>>> train_reference_model(ds, "model", cfg, extra_sequences=cs.training_sequences(),
...                       extra_manifest={"canaries": cs.to_manifest()})             # doctest: +SKIP
>>> canary_exposure(HFCausalLM.from_pretrained("model"), cs, n_alternatives=200, seed=0)  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from ehrmem.data.meds import DEATH_CODE, SUBJECT_ID, MedsDataset
from ehrmem.data.tokenizer import SPECIAL_TOKENS, EncodedSubject, EventTokenizer
from ehrmem.errors import InputError, ModelError, NumericalError
from ehrmem.models.protocol import AuditModel
from ehrmem.models.train import TrainConfig, read_manifest, train_reference_model

logger = logging.getLogger(__name__)

CANARY_FORMAT = "ehrmem-canaries/1"

#: Code prefixes of the default sensitive codes: HIV (ICD-9 042, V08; ICD-10 B20), psychoactive substance
#: use (ICD-10 F1x), psychoses, neurotic and substance disorders (ICD-9 29x, 30x, 31x), schizophrenia and
#: mood disorders (ICD-10 F2x, F3x).
DEFAULT_SENSITIVE_PATTERNS: tuple[str, ...] = (
    "DIAGNOSIS//ICD//9//042",
    "DIAGNOSIS//ICD//10//B20",
    "DIAGNOSIS//ICD//9//V08",
    "DIAGNOSIS//ICD//10//F1",
    "DIAGNOSIS//ICD//10//F2",
    "DIAGNOSIS//ICD//10//F3",
    "DIAGNOSIS//ICD//9//29",
    "DIAGNOSIS//ICD//9//30",
    "DIAGNOSIS//ICD//9//31",
)

#: Codes of the other secret positions are drawn from diagnosis codes held by at most this share of the
#: training subjects (widened to the rarest ``_MIN_POOL_PER_EVENT * secret_events`` codes when too few).
RARE_SUBJECT_SHARE = 0.05
DIAGNOSIS_PREFIX = "DIAGNOSIS//"

#: A secret is redrawn when any training subject holds more than this share of its codes, so no training
#: subject holds the combination, nor most of it.
MAX_SHARED_FRACTION = 0.5

_MIN_POOL_PER_EVENT = 4
_MAX_DRAWS = 10_000


def vocab_fingerprint(vocab: Sequence[str]) -> str:
    """SHA-256 of a vocabulary, to check that canary token ids are read with the tokenizer that made them."""
    return hashlib.sha256("\n".join(vocab).encode()).hexdigest()


@dataclass(frozen=True)
class Canary:
    """One synthetic patient: a canary (trained on) or its twin (never trained on).

    Attributes
    ----------
    subject_id
        A negative id (``-1, -2, ...``) that can never collide with a real MEDS subject. Both members of a
        pair get their id before the coin decides which is trained, so the id reveals nothing.
    pair
        Index of the canary/twin pair.
    trained
        ``True`` for the canary that is trained on, ``False`` for its twin.
    ids
        All token ids of the record: the prefix, then the secret.
    prefix_length
        Number of tokens before the secret; the secret is ``ids[prefix_length:]``.
    sensitive_code
        The sensitive code inside the secret.
    """

    subject_id: int
    pair: int
    trained: bool
    ids: np.ndarray
    prefix_length: int
    sensitive_code: str

    @property
    def role(self) -> str:
        return "canary" if self.trained else "twin"

    @property
    def prefix(self) -> np.ndarray:
        return self.ids[: self.prefix_length]

    @property
    def secret(self) -> np.ndarray:
        return self.ids[self.prefix_length :]

    @property
    def secret_positions(self) -> np.ndarray:
        """Positions of the secret tokens in :attr:`ids`."""
        return np.arange(self.prefix_length, len(self.ids))


@dataclass
class CanarySet:
    """Canaries, their twins, and the secret space they were drawn from.

    Attributes
    ----------
    records
        Every canary and twin, pair by pair.
    repeats
        How many times each trained canary is put into the training data.
    seed
        The seed the set was built with.
    sensitive_pool, secret_pool
        Token ids of the codes a secret's sensitive position and its other positions are drawn from.
        Alternatives for the exposure are drawn from the same pools by the same rule.
    sensitive_source
        ``"given"`` (codes passed by the caller), ``"default"`` (:data:`DEFAULT_SENSITIVE_PATTERNS`) or
        ``"fallback"`` (rare diagnosis codes, because no default sensitive code was in the vocabulary).
    code_names
        The code of every token id in the two pools (secrets are made of these only).
    vocab_size, vocab_sha256
        Size and fingerprint of the tokenizer's vocabulary, to check the tokenizer an audit reads the
        canaries with.
    """

    records: list[Canary]
    repeats: int
    seed: int
    length_events: int
    secret_events: int
    sensitive_pool: np.ndarray
    secret_pool: np.ndarray
    sensitive_source: str
    code_names: dict[int, str] = field(repr=False)
    vocab_size: int
    vocab_sha256: str

    def __post_init__(self) -> None:
        if self.repeats < 1:
            raise InputError("repeats must be at least 1.", value=self.repeats, expected="an integer >= 1")

    @property
    def canaries(self) -> list[Canary]:
        """The records that are trained on."""
        return [c for c in self.records if c.trained]

    @property
    def twins(self) -> list[Canary]:
        """The records that are never trained on (negative controls)."""
        return [c for c in self.records if not c.trained]

    @property
    def space_bits(self) -> float:
        """log2 of the number of possible secrets (sensitive code x ordered other codes x its position)."""
        k, n_pool = self.secret_events, len(self.secret_pool)
        perms = math.lgamma(n_pool + 1) - math.lgamma(n_pool - (k - 1) + 1)
        return (math.log(len(self.sensitive_pool)) + perms + math.log(k)) / math.log(2)

    def training_sequences(self, repeats: int | None = None) -> list[tuple[str, np.ndarray]]:
        """``(label, token ids)`` of every trained canary, each repeated ``repeats`` times (twins never).

        The result is meant for ``train_reference_model(..., extra_sequences=...)``.
        """
        r = self.repeats if repeats is None else int(repeats)
        if r < 1:
            raise InputError("repeats must be at least 1.", value=repeats, expected="an integer >= 1")
        return [(f"canary{c.subject_id}/rep{j}", c.ids.copy()) for c in self.canaries for j in range(r)]

    def draw_secret(self, rng: np.random.Generator) -> np.ndarray:
        """One secret from the secret space: the construction shared by canaries, twins and alternatives."""
        return _draw_secret(rng, self.sensitive_pool, self.secret_pool, self.secret_events)

    # ------------------------------------------------------------------ persistence
    def to_manifest(self) -> dict:
        """A JSON-serialisable description, stored under ``"canaries"`` in the training manifest."""
        return {
            "format": CANARY_FORMAT,
            "seed": int(self.seed),
            "repeats": int(self.repeats),
            "length_events": int(self.length_events),
            "secret_events": int(self.secret_events),
            "max_shared_fraction": MAX_SHARED_FRACTION,
            "n_pairs": len({c.pair for c in self.records}),
            "n_trained_sequences": len(self.canaries) * int(self.repeats),
            "sensitive_source": self.sensitive_source,
            "sensitive_pool": [self.code_names[int(i)] for i in self.sensitive_pool],
            "secret_pool": [self.code_names[int(i)] for i in self.secret_pool],
            "sensitive_pool_ids": [int(i) for i in self.sensitive_pool],
            "secret_pool_ids": [int(i) for i in self.secret_pool],
            "space_bits": self.space_bits,
            "vocab_size": int(self.vocab_size),
            "vocab_sha256": self.vocab_sha256,
            "records": [
                {
                    "subject_id": int(c.subject_id),
                    "pair": int(c.pair),
                    "trained": bool(c.trained),
                    "prefix_length": int(c.prefix_length),
                    "sensitive_code": c.sensitive_code,
                    "secret_codes": [self.code_names[int(i)] for i in c.secret],
                    "ids": [int(i) for i in c.ids],
                }
                for c in self.records
            ],
        }

    @classmethod
    def from_manifest(cls, manifest: dict, tokenizer: EventTokenizer | None = None) -> CanarySet:
        """Rebuild a set from :meth:`to_manifest` output (or a whole training manifest holding it).

        Parameters
        ----------
        manifest
            The ``"canaries"`` entry of a training manifest, or the whole manifest.
        tokenizer
            When given, checked to be the tokenizer the canaries were built with.

        Raises
        ------
        InputError
            When the entry is not a canary description.
        ModelError
            When ``tokenizer`` is not the one the canaries were built with (failure kind 7).
        """
        d = manifest.get("canaries", manifest)
        if not isinstance(d, dict) or d.get("format") != CANARY_FORMAT or "records" not in d:
            raise InputError(
                "Unrecognised canary description in the training manifest.",
                column="canaries",
                value=d.get("format") if isinstance(d, dict) else type(d).__name__,
                expected=f"a dict with format {CANARY_FORMAT!r} and 'records'",
            )
        if tokenizer is not None and d["vocab_sha256"] != vocab_fingerprint(tokenizer.vocab):
            raise ModelError(
                f"The canaries were built with a different vocabulary (size {d['vocab_size']}) than the "
                f"model's tokenizer (size {tokenizer.vocab_size}); their token ids cannot be interpreted."
            )
        records = [
            Canary(
                subject_id=int(r["subject_id"]),
                pair=int(r["pair"]),
                trained=bool(r["trained"]),
                ids=np.asarray(r["ids"], dtype=np.int64),
                prefix_length=int(r["prefix_length"]),
                sensitive_code=str(r["sensitive_code"]),
            )
            for r in d["records"]
        ]
        sensitive = np.asarray(d["sensitive_pool_ids"], dtype=np.int64)
        pool = np.asarray(d["secret_pool_ids"], dtype=np.int64)
        ids = d["sensitive_pool_ids"] + d["secret_pool_ids"]
        names = dict(zip(ids, d["sensitive_pool"] + d["secret_pool"], strict=True))
        return cls(
            records=records,
            repeats=int(d["repeats"]),
            seed=int(d["seed"]),
            length_events=int(d["length_events"]),
            secret_events=int(d["secret_events"]),
            sensitive_pool=sensitive,
            secret_pool=pool,
            sensitive_source=str(d["sensitive_source"]),
            code_names={int(i): str(c) for i, c in names.items()},
            vocab_size=int(d["vocab_size"]),
            vocab_sha256=str(d["vocab_sha256"]),
        )


def load_canaries(model_dir: str | Path, tokenizer: EventTokenizer | None = None) -> CanarySet | None:
    """The canaries recorded in a model directory's training manifest, or ``None`` when it has none.

    ``tokenizer`` defaults to the one saved in ``model_dir``.
    """
    manifest = read_manifest(model_dir)
    if manifest is None or not manifest.get("canaries"):
        return None
    tok = tokenizer if tokenizer is not None else EventTokenizer.load(model_dir)
    return CanarySet.from_manifest(manifest["canaries"], tok)


# ---------------------------------------------------------------------- construction
def _draw_secret(rng: np.random.Generator, sensitive: np.ndarray, pool: np.ndarray, k: int) -> np.ndarray:
    """A sensitive code at a uniform position among ``k - 1`` distinct pool codes in uniform order."""
    others = pool[rng.choice(len(pool), size=k - 1, replace=False)] if k > 1 else pool[:0]
    s = sensitive[rng.integers(len(sensitive))]
    return np.insert(others, rng.integers(k), s).astype(np.int64)


def _subject_counts(train_encoded: Sequence[EncodedSubject], vocab_size: int) -> np.ndarray:
    """Number of training subjects holding each token."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    for e in train_encoded:
        counts[np.unique(e.ids)] += 1
    return counts


def _pools(
    tokenizer: EventTokenizer,
    counts: np.ndarray,
    n_subjects: int,
    sensitive_codes: Sequence[str] | None,
    secret_events: int,
) -> tuple[np.ndarray, np.ndarray, str]:
    vocab = tokenizer.vocab
    seen = np.flatnonzero((counts > 0) & (tokenizer.token_kind == 1))
    patterns = DEFAULT_SENSITIVE_PATTERNS if sensitive_codes is None else tuple(sensitive_codes)
    sensitive = np.array([i for i in seen if vocab[i].startswith(patterns)], dtype=np.int64)
    source = "default" if sensitive_codes is None else "given"
    if sensitive_codes is not None and sensitive.size == 0:
        raise InputError(
            "None of the sensitive codes given for the canaries is in the training vocabulary.",
            value=list(sensitive_codes)[:5],
            expected="codes or code prefixes held by training subjects, e.g. 'DIAGNOSIS//ICD//10//F1'",
        )
    diagnoses = np.array([i for i in seen if vocab[i].startswith(DIAGNOSIS_PREFIX)], dtype=np.int64)
    candidates = np.setdiff1d(diagnoses, sensitive)
    if candidates.size == 0:
        logger.warning(
            "The training vocabulary holds no %s codes; canary secrets use rare codes of any kind.", DIAGNOSIS_PREFIX
        )
        candidates = np.setdiff1d(seen, sensitive)
    # Rarest first (ties by id, which follows the tokenizer's deterministic frequency order).
    candidates = candidates[np.lexsort((candidates, counts[candidates]))]
    n_needed = _MIN_POOL_PER_EVENT * secret_events
    if sensitive.size == 0:
        n_sens = max(1, min(len(candidates) // 4, n_needed))
        sensitive, candidates = np.sort(candidates[:n_sens]), candidates[n_sens:]
        source = "fallback"
        logger.warning(
            "No default sensitive code (%s...) is in the training vocabulary; the canaries' sensitive "
            "position uses the %d rarest diagnosis codes instead, which are not necessarily sensitive.",
            ", ".join(DEFAULT_SENSITIVE_PATTERNS[:3]),
            n_sens,
        )
    rare = candidates[counts[candidates] <= max(1, RARE_SUBJECT_SHARE * n_subjects)]
    if rare.size < n_needed:
        rare = candidates[:n_needed]
    if rare.size < secret_events - 1:
        raise InputError(
            "Too few codes in the training vocabulary to build canary secrets.",
            value=f"{rare.size} candidate codes for secrets of {secret_events} codes",
            expected=f"at least {secret_events - 1} rare codes; lower secret_events",
        )
    return np.sort(sensitive), np.sort(rare), source


class _MarkovChain:
    """First-order Markov chain over the tokens of the training records, without the forbidden tokens."""

    def __init__(self, train_encoded: Sequence[EncodedSubject], vocab_size: int, forbidden: np.ndarray) -> None:
        prev = np.concatenate([e.ids[:-1] for e in train_encoded])
        nxt = np.concatenate([e.ids[1:] for e in train_encoded])
        ok = ~np.isin(nxt, forbidden)
        keys, counts = np.unique(prev[ok] * vocab_size + nxt[ok], return_counts=True)
        self.dst = keys % vocab_size
        self.weight = counts.astype(np.float64)
        self.starts = np.searchsorted(keys // vocab_size, np.arange(vocab_size + 1))

    def step(self, state: int, rng: np.random.Generator) -> int:
        """The next token, or -1 when ``state`` has no allowed successor."""
        lo, hi = self.starts[state], self.starts[state + 1]
        if lo == hi:
            return -1
        w = self.weight[lo:hi]
        return int(self.dst[lo + rng.choice(hi - lo, p=w / w.sum())])


def make_canaries(
    tokenizer: EventTokenizer,
    train_encoded: Sequence[EncodedSubject],
    *,
    n: int,
    seed: int,
    sensitive_codes: Sequence[str] | None = None,
    length_events: int = 64,
    secret_events: int = 8,
    repeats: int = 1,
    max_tokens: int | None = None,
) -> CanarySet:
    """Build ``n`` canary/twin pairs from the training vocabulary.

    Parameters
    ----------
    tokenizer
        The tokenizer the model is trained with.
    train_encoded
        The encoded training subjects: they provide the static codes, the token transitions of the
        prefixes, code rarity, and the check that no training subject holds a secret.
    n
        Number of pairs; ``n`` canaries are trained on and ``n`` twins are not.
    seed
        Seeds every random choice, including the coin that picks the trained member of each pair.
    sensitive_codes
        Codes or code prefixes for the secret's sensitive position. ``None`` uses
        :data:`DEFAULT_SENSITIVE_PATTERNS` and, when none of them is in the vocabulary, falls back to
        rare diagnosis codes with a warning.
    length_events
        Timed events before the secret.
    secret_events
        Codes in the secret (one sensitive, the others rare, in random order).
    repeats
        Times each canary is trained on (recorded; see :meth:`CanarySet.training_sequences`).
    max_tokens
        Longest allowed record (the model's context length); prefixes are cut short at an event boundary
        to fit, with a warning.

    Notes
    -----
    A secret is redrawn while any training subject holds more than :data:`MAX_SHARED_FRACTION` of its codes,
    or another record already has the same codes. Alternatives for the exposure are drawn from the same
    space without the check against training subjects (the audit does not see them). On the MIMIC-IV demo
    the check rejects about 3% of draws; since it removes combinations that co-occur in real records, which
    a model may rank high, the omission can only lower the exposure of canaries and twins alike.
    """
    for name, value, low in (
        ("n", n, 1),
        ("length_events", length_events, 1),
        ("secret_events", secret_events, 2),
        ("repeats", repeats, 1),
    ):
        if int(value) < low:
            raise InputError(f"{name} must be at least {low}.", value=value, expected=f"an integer >= {low}")
    if not train_encoded:
        raise InputError("Canaries need encoded training subjects.", value=0, expected="at least one subject")
    if max_tokens is not None and max_tokens < secret_events + 4:
        raise InputError(
            "max_tokens leaves no room for a canary.",
            value=max_tokens,
            expected=f">= {secret_events + 4} (secret_events + 4)",
        )
    vocab, V = tokenizer.vocab, tokenizer.vocab_size
    all_ids = np.concatenate([e.ids for e in train_encoded])
    if int(all_ids.max()) >= V or int(all_ids.min()) < 0:
        raise InputError(
            "The encoded subjects hold ids outside the tokenizer's vocabulary.",
            value=int(all_ids.max()),
            expected=f"0 <= id < {V}; encode with the same tokenizer",
        )
    counts = _subject_counts(train_encoded, V)
    sensitive, pool, source = _pools(tokenizer, counts, len(train_encoded), sensitive_codes, secret_events)

    # Static blocks of real subjects (demographics), and tokens that only ever appear there.
    static_blocks = [e.ids[e.event_index < 0][1:] for e in train_encoded]
    timed = np.unique(np.concatenate([e.ids[e.event_index >= 0] for e in train_encoded]))
    static_only = np.setdiff1d(np.unique(np.concatenate(static_blocks)), timed)
    specials = np.array([tokenizer.index[t] for t in SPECIAL_TOKENS], dtype=np.int64)
    death = np.array([tokenizer.index[DEATH_CODE]] if DEATH_CODE in tokenizer.index else [], dtype=np.int64)
    # Prefixes never hold a secret's possible codes, death, special or static-only tokens.
    forbidden = np.unique(np.concatenate([specials, static_only, sensitive, pool, death]))
    chain = _MarkovChain(train_encoded, V, forbidden)
    event_codes = np.setdiff1d(np.flatnonzero((tokenizer.token_kind == 1) & (counts > 0)), forbidden)
    if event_codes.size == 0:
        raise InputError(
            "No codes are left to build canary records from.",
            value=0,
            expected="training codes besides the secret pools",
        )
    code_p = counts[event_codes] / counts[event_codes].sum()
    time_ids = np.flatnonzero(tokenizer.token_kind == 2)
    time_use = np.bincount(all_ids, minlength=V)[time_ids].astype(np.float64)
    time_p = time_use / time_use.sum() if time_use.sum() > 0 else np.full(len(time_ids), 1 / len(time_ids))

    # Inverted index: the training subjects (rows) holding each code of the secret pools.
    rows_of: dict[int, list[int]] = {}
    pooled = set(np.concatenate([sensitive, pool]).tolist())
    for r, e in enumerate(train_encoded):
        for t in pooled.intersection(e.ids.tolist()):
            rows_of.setdefault(t, []).append(r)
    holders = {t: np.asarray(rows, dtype=np.int64) for t, rows in rows_of.items()}
    empty = np.zeros(0, dtype=np.int64)

    def max_shared(secret: np.ndarray) -> int:
        rows = np.concatenate([holders.get(int(t), empty) for t in secret])
        return int(np.bincount(rows).max()) if rows.size else 0

    rng = np.random.default_rng(int(seed))
    used: set[frozenset[int]] = set()
    n_short = 0

    def random_code() -> int:
        return int(event_codes[rng.choice(len(event_codes), p=code_p)])

    def prefix() -> list[int]:
        nonlocal n_short
        tokens = [tokenizer.bos_id, *static_blocks[rng.integers(len(static_blocks))].tolist()]
        n_events = 0
        budget = None if max_tokens is None else max_tokens - secret_events - 1
        while True:
            nxt = chain.step(tokens[-1], rng)
            if nxt < 0 or (tokenizer.token_kind[nxt] == 3 and tokenizer.token_kind[tokens[-1]] != 1):
                nxt = random_code()  # a dead end of the chain: start a new event
            kind = tokenizer.token_kind[nxt]
            if kind == 1:
                if n_events == length_events:
                    break
                if budget is not None and len(tokens) + 2 > budget:
                    n_short += 1
                    break
                n_events += 1
            elif kind == 2 and n_events == length_events:
                break
            tokens.append(nxt)
        while tokenizer.token_kind[tokens[-1]] == 2:  # end at an event, not at a dangling time gap
            tokens.pop()
        tokens.append(int(time_ids[rng.choice(len(time_ids), p=time_p)]))
        return tokens

    def secret() -> np.ndarray:
        limit = int(MAX_SHARED_FRACTION * secret_events)
        for _ in range(_MAX_DRAWS):
            s = _draw_secret(rng, sensitive, pool, secret_events)
            key = frozenset(s.tolist())
            if key not in used and max_shared(s) <= limit:
                used.add(key)
                return s
        raise InputError(
            "Could not draw a canary secret that is unique and unlike every training subject.",
            value=f"{_MAX_DRAWS} draws, {len(pool)} rare and {len(sensitive)} sensitive codes",
            expected="fewer canaries, fewer secret_events, or a larger training vocabulary",
        )

    records: list[Canary] = []
    for pair in range(int(n)):
        made = []
        for j in range(2):
            p, s = prefix(), secret()
            made.append(
                (
                    -(2 * pair + j + 1),
                    np.concatenate([np.asarray(p, dtype=np.int64), s]),
                    len(p),
                    vocab[int(np.intersect1d(s, sensitive)[0])],
                )
            )
        trained_j = int(rng.integers(2))
        for j, (sid, ids, plen, scode) in enumerate(made):
            records.append(
                Canary(
                    subject_id=sid, pair=pair, trained=j == trained_j, ids=ids, prefix_length=plen, sensitive_code=scode
                )
            )
    if n_short:
        logger.warning(
            "%d of %d canary prefixes were cut short of %d events to fit in %s tokens.",
            n_short,
            len(records),
            length_events,
            max_tokens,
        )
    cs = CanarySet(
        records=records,
        repeats=int(repeats),
        seed=int(seed),
        length_events=int(length_events),
        secret_events=int(secret_events),
        sensitive_pool=sensitive,
        secret_pool=pool,
        sensitive_source=source,
        vocab_size=V,
        vocab_sha256=vocab_fingerprint(vocab),
        code_names={int(i): vocab[i] for i in np.concatenate([sensitive, pool])},
    )
    logger.info(
        "Built %d canary/twin pairs (secret space %.1f bits, %d sensitive and %d rare codes, source %s)",
        n,
        cs.space_bits,
        len(sensitive),
        len(pool),
        source,
    )
    return cs


# ---------------------------------------------------------------------- exposure
def _secret_logprob(
    model: AuditModel, prefix: np.ndarray, secrets: Sequence[np.ndarray], batch_size: int
) -> np.ndarray:
    seqs = [np.concatenate([prefix, s]) for s in secrets]
    scores = model.token_scores(seqs, batch_size=batch_size)
    # logprob[t] scores token t + 1, so the secret starting at position p is scored by logprob[p - 1:].
    return np.array([float(sc.logprob[len(prefix) - 1 :].sum()) for sc in scores])


def canary_exposure(
    model: AuditModel,
    canary_set: CanarySet,
    *,
    n_alternatives: int = 200,
    seed: int = 0,
    batch_size: int = 16,
) -> pl.DataFrame:
    """Exposure of every canary and twin (Carlini et al. 2019), estimated from sampled alternatives.

    Parameters
    ----------
    model
        Anything implementing :class:`~ehrmem.models.protocol.AuditModel`.
    canary_set
        The canaries and twins, e.g. from :func:`load_canaries`.
    n_alternatives
        ``R``, alternative secrets per record, drawn from the secret space with a stream seeded by
        ``(seed, subject_id)`` so each record's alternatives do not depend on the others.
    seed
        Seed of the alternatives.
    batch_size
        Passed to ``model.token_scores``.

    Returns
    -------
    One row per record: ``subject_id``, ``pair``, ``role`` (``canary`` / ``twin``), ``trained``,
    ``sensitive_code``, ``secret_logprob`` (sum over the secret tokens given the prefix), ``n_alternatives``,
    ``n_at_least`` (alternatives scoring at least as high; ties count against the canary), ``rank``,
    ``exposure_bits``, ``max_exposure_bits`` (``log2(R + 1)``), ``space_bits`` (log2 of the whole secret
    space, the exposure that an exhaustive ranking could reach) and ``p_value`` (``rank / (R + 1)``, exact
    for a record the model never saw).

    Raises
    ------
    NumericalError
        When a secret's log-likelihood is not finite (failure kind 2).
    """
    if int(n_alternatives) < 1:
        raise InputError("n_alternatives must be at least 1.", value=n_alternatives, expected="an integer >= 1")
    R = int(n_alternatives)
    max_bits = math.log2(R + 1)
    rows = []
    for c in canary_set.records:
        rng = np.random.default_rng([int(seed) & (2**63 - 1), abs(int(c.subject_id))])
        true = c.secret
        alts: list[np.ndarray] = []
        while len(alts) < R:
            a = canary_set.draw_secret(rng)
            if not np.array_equal(a, true):
                alts.append(a)
        lp = _secret_logprob(model, c.prefix, [true, *alts], batch_size)
        if not np.isfinite(lp).all():
            raise NumericalError(
                f"{int((~np.isfinite(lp)).sum())} non-finite secret log-likelihoods for canary record "
                f"{c.subject_id} ({c.role}); exposure would be meaningless."
            )
        n_at_least = int((lp[1:] >= lp[0]).sum())
        rank = 1 + n_at_least
        rows.append(
            {
                SUBJECT_ID: c.subject_id,
                "pair": c.pair,
                "role": c.role,
                "trained": c.trained,
                "sensitive_code": c.sensitive_code,
                "secret_logprob": float(lp[0]),
                "n_alternatives": R,
                "n_at_least": n_at_least,
                "rank": rank,
                "exposure_bits": max_bits - math.log2(rank),
                "max_exposure_bits": max_bits,
                "space_bits": canary_set.space_bits,
                "p_value": rank / (R + 1),
            }
        )
    df = pl.DataFrame(
        rows,
        schema={
            SUBJECT_ID: pl.Int64,
            "pair": pl.Int64,
            "role": pl.String,
            "trained": pl.Boolean,
            "sensitive_code": pl.String,
            "secret_logprob": pl.Float64,
            "n_alternatives": pl.Int64,
            "n_at_least": pl.Int64,
            "rank": pl.Int64,
            "exposure_bits": pl.Float64,
            "max_exposure_bits": pl.Float64,
            "space_bits": pl.Float64,
            "p_value": pl.Float64,
        },
    )
    mean = {role: df.filter(pl.col("role") == role)["exposure_bits"].mean() for role in ("canary", "twin")}
    logger.info(
        "Exposure: canaries mean %s bits, twins mean %s bits (max %.2f)", mean["canary"], mean["twin"], max_bits
    )
    return df


# ---------------------------------------------------------------------- training
def train_with_canaries(
    dataset: MedsDataset,
    out_dir: str | Path,
    cfg: TrainConfig | None = None,
    *,
    n_canaries: int,
    repeats: int,
    seed: int | None = None,
    sensitive_codes: Sequence[str] | None = None,
    length_events: int = 64,
    secret_events: int = 8,
    progress: Callable[[int, int, float], None] | None = None,
    tokenizer: EventTokenizer | None = None,
) -> Path:
    """Train the reference model with ``n_canaries`` canaries repeated ``repeats`` times; twins held out.

    The tokenizer is fitted exactly as :func:`~ehrmem.models.train.train_reference_model` fits it (on the
    events of ``cfg.splits``) and handed to it, so the canaries' token ids are the model's. The manifest
    records the set under ``"canaries"``.

    Parameters
    ----------
    seed
        Seed of the canaries (defaults to ``cfg.seed``).
    """
    from ehrmem.models.train import check_output_dir

    cfg = cfg or TrainConfig()
    check_output_dir(Path(out_dir))
    if n_canaries < 1 or repeats < 1:
        raise InputError(
            "Canaries need n_canaries >= 1 and repeats >= 1.",
            value=f"n_canaries={n_canaries}, repeats={repeats}",
            expected="positive integers (0 canaries: train without them)",
        )
    # The same selection and fit as train_reference_model; the fitted tokenizer is then handed to it.
    subjects: list[int] = []
    for split in cfg.splits:
        subjects += dataset.subject_ids(split)
    train_events = dataset.events.filter(pl.col(SUBJECT_ID).is_in(subjects))
    if tokenizer is None:
        tokenizer = EventTokenizer.fit(
            train_events, n_value_bins=cfg.n_value_bins, min_code_subjects=cfg.min_code_subjects
        )
    encoded = tokenizer.encode(train_events, max_events=cfg.max_events)
    cs = make_canaries(
        tokenizer,
        encoded,
        n=n_canaries,
        seed=cfg.seed if seed is None else seed,
        sensitive_codes=sensitive_codes,
        length_events=length_events,
        secret_events=secret_events,
        repeats=repeats,
        max_tokens=cfg.context_length,
    )
    return train_reference_model(
        dataset,
        out_dir,
        cfg,
        tokenizer=tokenizer,
        extra_sequences=cs.training_sequences(),
        extra_manifest={"canaries": cs.to_manifest()},
        progress=progress,
    )


__all__ = [
    "Canary",
    "CanarySet",
    "DEFAULT_SENSITIVE_PATTERNS",
    "canary_exposure",
    "load_canaries",
    "make_canaries",
    "train_with_canaries",
]

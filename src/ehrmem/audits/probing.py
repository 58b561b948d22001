"""T3 embedding probes: does the model's embedding of a prompt reveal a sensitive category it never shows?

For each attacker-knowledge tier k and each sensitive category of the catalogue, every audited subject's
prompt is ``[BOS]``, their static codes and their first k timed events, **cut before the first event of
the category** (so the prompt never contains the category's codes, nor the time gap or value tokens of
that event). A subject whose category is among their static codes cannot be prompted without it and is
excluded from that category. The label is 1 when the subject's record has the category (necessarily
after the prompt), 0 otherwise.

The model embeds each distinct prompt once (``model.embed``, masked pooling). Probes from scikit-learn
(a standardised, class-balanced logistic regression and a small MLP) are cross-fitted on members only:

- members are split into ``n_folds`` stratified folds; the probe of fold f is trained on the other
  member folds and predicts the held-out fold, so every member gets an out-of-fold probability
  ("unseen members");
- every non-member gets the mean probability of the ``n_folds`` fold probes.

AUROC and AUPRC are computed from the predicted **probabilities** (never from hard 0/1 predictions,
which would throw the ranking away), with stratified bootstrap intervals. The same probes trained on a
bag of the prompt's tokens (counts of every non-special token id seen in the prompts) are the baseline:
``embedding_gain`` is what the model's embedding adds over knowing which codes the prompt holds.
Memorization shows as probes that predict unseen members better than non-members, beyond the baseline.

A split with fewer than ``min_positives`` subjects with or without the category (or members too few to
stratify ``n_folds`` folds) is reported as ``undefined`` with the counts, never as 0.5 (failure kind 1).

Limitations
-----------
- Cutting before the category's first event makes positives' prompts shorter, at tiers above that
  event, than negatives' prompts. A probe can partly read the label from the prompt length; the
  bag-of-codes baseline sees the same length, so ``embedding_gain`` is not inflated by it, but the raw
  AUROCs are. ``prompt_events`` in the report gives the mean prompt length by label.
- Non-members are scored by the average of the fold probes, members by one probe each. Averaging can
  only smooth the non-members' probabilities, which errs against finding a member advantage.
- The MLP has no class weights; under strong imbalance its probabilities rank well but are poorly
  calibrated. Only rank-based metrics are reported.
- With few subjects with the category, out-of-fold AUROC is biased below 0.5 when there is no signal
  (holding positives out of a fold shifts the training balance against them); an interval entirely
  below 0.5 raises a warning and reads as "no signal", not as an inverse signal.
- The intervals resample the evaluated subjects; they do not cover the variability of the probe across
  fold assignments or MLP initialisations.
- At the static tier few distinct prompts exist (demographics), so embedding and bag-of-codes probes
  usually rank subjects identically and ``embedding_gain`` is 0 there.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import polars as pl
import scipy.sparse as sp
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from ehrmem.audits.base import Audit, AuditContext, TestResult
from ehrmem.data.catalogue import Catalogue, default_catalogue, load_catalogue
from ehrmem.data.meds import CODE, SUBJECT_ID
from ehrmem.data.prompts import DEFAULT_TIERS, Tiers, build_prompt, category_first_events, tier_name
from ehrmem.data.tokenizer import EncodedSubject
from ehrmem.errors import InputError, NumericalError
from ehrmem.models.protocol import Pooling
from ehrmem.stats import ranking_metrics

logger = logging.getLogger(__name__)

ProbeName = Literal["logistic", "mlp"]
DEFAULT_PROBES: tuple[ProbeName, ...] = ("logistic", "mlp")
FEATURES = ("embedding", "bag_of_codes")
MLP_HIDDEN = (64,)
MLP_ALPHA = 1e-3
MLP_MAX_ITER = 500
LOGISTIC_MAX_ITER = 5000


class ProbingConfig(BaseModel):
    """Settings of T3."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    tiers: Tiers = Field(default_factory=lambda: list(DEFAULT_TIERS), description="timed events per prompt")
    pooling: Pooling = "mean"
    probes: list[ProbeName] = Field(default_factory=lambda: list(DEFAULT_PROBES), min_length=1)
    n_folds: int = Field(5, ge=2, description="stratified folds over members")
    min_positives: int = Field(
        5, ge=1, description="fewest subjects with and without the category in a split for a reported metric"
    )
    n_bootstrap: int = Field(1000, ge=100)
    categories: list[str] | None = Field(None, description="catalogue categories to probe (default: all)")
    catalogue_path: Path | None = Field(None, description="a catalogue file replacing the packaged one")

    @field_validator("probes")
    @classmethod
    def _unique_probes(cls, probes: list[str]) -> list[str]:
        return list(dict.fromkeys(probes))


# --------------------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CategoryPrompts:
    """The prompts, labels and accounting of one (category, tier).

    Attributes
    ----------
    subject_ids, member, label
        The subjects prompted (category not static), their membership (1 = member) and whether their
        record has the category (1 = yes).
    prompts
        Token ids of each subject's prompt, cut before the category's first event.
    n_prompt_events
        Timed events each prompt covers (before any truncation to the context window).
    cut
        Subjects whose prompt was stopped early because the category occurs within the first k events.
    excluded
        Subjects left out because the category is among their static codes.
    truncated
        Prompts shortened to fit the context window (most recent events kept).
    no_budget
        Subjects left out because their static codes alone overflow the context window.
    """

    category: str
    k_events: int
    subject_ids: np.ndarray
    member: np.ndarray
    label: np.ndarray
    prompts: list[np.ndarray]
    n_prompt_events: np.ndarray
    cut: int
    excluded: int
    truncated: int
    no_budget: int


def build_category_prompts(
    category: str,
    k_events: int,
    subjects: pl.DataFrame,
    encoded: dict[int, EncodedSubject],
    first_event: dict[int, int],
    *,
    max_prompt_tokens: int,
) -> CategoryPrompts:
    """Prompts of every audited subject at one tier, cut before the category's first event.

    Parameters
    ----------
    category
        The category's name (for the record only).
    k_events
        Timed events the attacker knows (0 = static codes only).
    subjects
        ``subject_id`` and ``member`` of the audited subjects.
    encoded
        The subjects' token ids by subject id.
    first_event
        Subject -> index of the first timed event with the category (-1 when it is a static code); subjects
        without the category are absent. As :func:`~ehrmem.data.prompts.category_first_events` returns.
    max_prompt_tokens
        The context window; longer prompts keep ``[BOS]``, the static codes and the most recent events.

    Returns
    -------
    CategoryPrompts
    """
    ids, members, labels, prompts, n_events = [], [], [], [], []
    cut = excluded = truncated = no_budget = 0
    for sid, member in zip(subjects[SUBJECT_ID].to_list(), subjects["member"].to_list(), strict=True):
        first = first_event.get(sid)
        if first is not None and first < 0:
            excluded += 1
            continue
        enc = encoded[sid]
        p = build_prompt(enc, k_events, max_prompt_tokens=max_prompt_tokens, cut_event=first)
        if p is None:  # keep_recent only fails when the static codes alone overflow the context window
            no_budget += 1
            continue
        cut += int(first is not None and first < k_events)
        truncated += int(p.truncated)
        ids.append(sid)
        members.append(member)
        labels.append(int(first is not None))
        prompts.append(p.ids)
        n_events.append(min(p.n_prompt_events, enc.n_events))
    return CategoryPrompts(
        category=category,
        k_events=k_events,
        subject_ids=np.asarray(ids, dtype=np.int64),
        member=np.asarray(members, dtype=np.int8),
        label=np.asarray(labels, dtype=np.int8),
        prompts=prompts,
        n_prompt_events=np.asarray(n_events, dtype=np.int64),
        cut=cut,
        excluded=excluded,
        truncated=truncated,
        no_budget=no_budget,
    )


def bag_of_codes(prompts: list[np.ndarray], token_kind: np.ndarray) -> sp.csr_matrix:
    """Counts of each non-special token id in each prompt, over the tokens seen in ``prompts`` only.

    Parameters
    ----------
    prompts
        Token ids of each prompt.
    token_kind
        The tokenizer's kind of each token id (0 = special: ``[PAD]``, ``[BOS]``, ``[EOS]``, ``[UNK]``).

    Returns
    -------
    scipy.sparse.csr_matrix
        ``len(prompts) x n_seen`` counts (codes, time gaps and value bins; specials dropped).
    """
    rows, cols, vals = [], [], []
    for r, p in enumerate(prompts):
        toks = np.asarray(p, dtype=np.int64)
        toks = toks[token_kind[toks] != 0]
        uniq, counts = np.unique(toks, return_counts=True)
        rows.append(np.full(uniq.size, r, dtype=np.int64))
        cols.append(uniq)
        vals.append(counts.astype(np.float64))
    if not prompts:
        return sp.csr_matrix((0, 0))
    col = np.concatenate(cols)
    seen, col_idx = np.unique(col, return_inverse=True)
    return sp.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), col_idx)), shape=(len(prompts), max(1, seen.size))
    )


# --------------------------------------------------------------------------------------------------------
# Probes and their evaluation
# --------------------------------------------------------------------------------------------------------


def make_probe(name: str, seed: int, *, sparse: bool = False) -> Pipeline:
    """A fresh probe: standardisation then a logistic regression or a small MLP.

    Parameters
    ----------
    name
        ``"logistic"`` (class-balanced, L2, lbfgs) or ``"mlp"`` (one hidden layer of 64, L2 penalty 1e-3,
        full-batch lbfgs as scikit-learn advises for small data sets; no early stopping).
    seed
        ``random_state`` of the MLP's initialisation.
    sparse
        Standardise without centring (keeps a sparse bag of codes sparse).
    """
    scaler = StandardScaler(with_mean=not sparse)
    if name == "logistic":
        return make_pipeline(scaler, LogisticRegression(class_weight="balanced", max_iter=LOGISTIC_MAX_ITER))
    if name == "mlp":
        mlp = MLPClassifier(
            hidden_layer_sizes=MLP_HIDDEN,
            solver="lbfgs",
            alpha=MLP_ALPHA,
            early_stopping=False,
            max_iter=MLP_MAX_ITER,
            random_state=seed,
        )
        return make_pipeline(scaler, mlp)
    raise InputError("Unknown probe.", column="probes", value=name, expected="'logistic' or 'mlp'")


@dataclass(frozen=True)
class CrossFit:
    """Out-of-fold probabilities of members and fold-averaged probabilities of non-members."""

    members: np.ndarray
    nonmembers: np.ndarray
    not_converged: int


def cross_fit(
    probe: str,
    x_members: np.ndarray | sp.spmatrix,
    y_members: np.ndarray,
    x_nonmembers: np.ndarray | sp.spmatrix,
    *,
    n_folds: int,
    seed: int,
) -> CrossFit:
    """Train the probe on member folds; predict held-out members and (averaged over folds) non-members.

    Parameters
    ----------
    probe
        ``"logistic"`` or ``"mlp"`` (see :func:`make_probe`).
    x_members, y_members
        Members' features and labels (both classes at least ``n_folds`` times; the caller checks).
    x_nonmembers
        Non-members' features (may have no rows).
    n_folds
        Stratified folds (shuffled with ``seed``).
    seed
        Seed of the folds and of the MLP.

    Returns
    -------
    CrossFit
        Probabilities of the category (``predict_proba``, column of class 1).
    """
    sparse = sp.issparse(x_members)
    folds = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    oof = np.full(len(y_members), np.nan)
    n_non = x_nonmembers.shape[0]
    acc = np.zeros(n_non)
    not_converged = 0
    for train, test in folds.split(np.zeros(len(y_members)), y_members):
        model = make_probe(probe, seed, sparse=sparse)
        # Probe problems are small: multithreaded BLAS only adds contention (5x slower on a busy machine).
        with threadpool_limits(limits=1, user_api="blas"), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            model.fit(x_members[train], y_members[train])
        not_converged += int(any(issubclass(w.category, ConvergenceWarning) for w in caught))
        pos = int(np.flatnonzero(model.classes_ == 1)[0])
        oof[test] = model.predict_proba(x_members[test])[:, pos]
        if n_non:
            acc += model.predict_proba(x_nonmembers)[:, pos]
    return CrossFit(members=oof, nonmembers=acc / n_folds, not_converged=not_converged)


def _undefined_entry(n_pos: int, n_neg: int, reason: str) -> dict[str, Any]:
    n = n_pos + n_neg
    return {
        "status": "undefined",
        "reason": reason,
        "auroc": None,
        "auroc_ci95": None,
        "auprc": None,
        "auprc_ci95": None,
        "prevalence": n_pos / n if n else None,
        "n_pos": n_pos,
        "n_neg": n_neg,
    }


def _too_few(n_pos: int, n_neg: int, need: int, who: str) -> str | None:
    if n_pos >= need and n_neg >= need:
        return None
    return f"too few {who}: {n_pos} with the category and {n_neg} without; needs at least {need} of each"


def probe_metrics(
    labels: np.ndarray, probabilities: np.ndarray, *, min_positives: int, n_boot: int, seed: int
) -> dict[str, Any]:
    """AUROC and AUPRC of predicted probabilities, with stratified bootstrap intervals.

    Parameters
    ----------
    labels
        1 = the subject has the category.
    probabilities
        The probe's probability of the category (never hard 0/1 predictions).
    min_positives
        Fewest subjects with, and without, the category for a defined metric.
    n_boot, seed
        Bootstrap replicates and their seed.

    Returns
    -------
    dict
        ``auroc``, ``auroc_ci95``, ``auprc``, ``auprc_ci95``, ``prevalence`` (the AUPRC of a random
        probe), ``n_pos``, ``n_neg``, ``status`` and ``reason``; metrics are None when undefined.
    """
    y = np.asarray(labels, dtype=np.int8)
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    reason = _too_few(n_pos, n_neg, min_positives, "subjects")
    if reason is not None:
        return _undefined_entry(n_pos, n_neg, reason)
    return {
        "status": "ok",
        "reason": None,
        **ranking_metrics(y, probabilities, n_boot=n_boot, seed=seed, min_per_class=min_positives),
        "n_pos": n_pos,
        "n_neg": n_neg,
    }


# --------------------------------------------------------------------------------------------------------
# Embeddings
# --------------------------------------------------------------------------------------------------------


class _EmbeddingCache:
    """Embeddings by prompt bytes: each distinct prompt is embedded once per run."""

    def __init__(self, context: AuditContext, pooling: Pooling) -> None:
        self.context = context
        self.pooling = pooling
        self.index: dict[bytes, int] = {}
        self.blocks: list[np.ndarray] = []
        self._matrix: np.ndarray | None = None

    def add(self, prompts: list[np.ndarray], subject_ids: list[int], desc: str) -> None:
        """Embed the prompts not seen yet (longest first, so batches carry little padding)."""
        new: dict[bytes, np.ndarray] = {}
        owner: dict[bytes, int] = {}
        for p, sid in zip(prompts, subject_ids, strict=True):
            key = np.asarray(p, dtype=np.int64).tobytes()
            if key not in self.index and key not in new:
                new[key] = np.asarray(p, dtype=np.int64)
                owner[key] = int(sid)
        if not new:
            return
        keys = sorted(new, key=lambda k: -len(k))
        seqs = [new[k] for k in keys]
        ctx = self.context
        chunk = max(1, ctx.batch_size * 4)
        starts = range(0, len(seqs), chunk)
        parts = [
            ctx.model.embed(seqs[s : s + chunk], pooling=self.pooling, batch_size=ctx.batch_size)
            for s in ctx.progress(starts, desc, len(starts))
        ]
        emb = np.concatenate(parts).astype(np.float32, copy=False)
        bad = np.flatnonzero(~np.all(np.isfinite(emb), axis=1))
        if bad.size:
            # Failure kind 2: name the subjects (one per distinct prompt) rather than probe on NaN.
            subjects = sorted({owner[keys[i]] for i in bad})
            raise NumericalError(
                f"{bad.size} of {len(seqs)} prompt embeddings have non-finite values (subjects, one per distinct "
                f"prompt: {subjects[:10]}). Probes on them would be meaningless; check the model's dtype."
            )
        offset = sum(b.shape[0] for b in self.blocks)
        for i, k in enumerate(keys):
            self.index[k] = offset + i
        self.blocks.append(emb)
        self._matrix = None
        logger.debug("Embedded %d new prompts (%d cached)", len(keys), len(self.index))

    def get(self, prompts: list[np.ndarray]) -> np.ndarray:
        if self._matrix is None:
            self._matrix = np.concatenate(self.blocks) if self.blocks else np.zeros((0, 0), dtype=np.float32)
        rows = [self.index[np.asarray(p, dtype=np.int64).tobytes()] for p in prompts]
        return self._matrix[rows]


# --------------------------------------------------------------------------------------------------------
# The audit
# --------------------------------------------------------------------------------------------------------


class ProbingAudit(Audit):
    """T3: probes on the model's prompt embeddings predict sensitive categories the prompt never shows."""

    test_id: ClassVar[str] = "T3"
    title: ClassVar[str] = "Embedding probes"

    def __init__(self, context: AuditContext, config: ProbingConfig | None = None) -> None:
        super().__init__(context)
        self.config = config or ProbingConfig()

    def _catalogue(self) -> Catalogue:
        cfg = self.config
        catalogue = load_catalogue(cfg.catalogue_path) if cfg.catalogue_path is not None else default_catalogue()
        if cfg.categories is not None:
            unknown = [c for c in cfg.categories if c not in catalogue]
            if unknown:
                raise InputError(
                    "T3 names categories that are not in the sensitivity catalogue.",
                    column="categories",
                    value=unknown,
                    expected=f"names from {', '.join(catalogue.names)}",
                )
        return catalogue

    def _category_codes(self, catalogue: Catalogue, names: list[str]) -> dict[str, set[str]]:
        """The dataset's code strings that fall into each category (descriptions searched by medications)."""
        ds = self.context.dataset
        codes = ds.events[CODE].unique()
        descriptions = None
        if ds.codes is not None and "description" in ds.codes.columns:
            d = ds.codes.select(CODE, "description").drop_nulls()
            descriptions = dict(zip(d[CODE].to_list(), d["description"].to_list(), strict=True))
        hits = catalogue.match(codes, descriptions)
        values = np.asarray(codes.to_list(), dtype=object)
        return {name: {str(c) for c in values[hits[name]]} for name in names}

    def _run(self) -> TestResult:
        ctx, cfg = self.context, self.config
        result = TestResult(test_id=self.test_id, title=self.title, status="ok")
        catalogue = self._catalogue()
        names = list(cfg.categories) if cfg.categories is not None else catalogue.names
        subjects = ctx.cohort.audited.select(SUBJECT_ID, pl.col("member").cast(pl.Int8))
        audited = subjects[SUBJECT_ID].to_list()
        code_sets = self._category_codes(catalogue, names)
        events = ctx.dataset.events.filter(pl.col(SUBJECT_ID).is_in(audited))
        firsts = category_first_events(events, code_sets)
        first_by_cat: dict[str, dict[int, int]] = {name: {} for name in names}
        for sid, cat, ev in firsts.iter_rows():
            first_by_cat[cat][int(sid)] = int(ev)
        logger.info("T3: %d categories x %d tiers over %d subjects", len(names), len(cfg.tiers), len(audited))

        cache = _EmbeddingCache(ctx, cfg.pooling)
        categories: dict[str, dict[str, Any]] = {}
        for name in names:
            members = subjects.filter(pl.col("member") == 1)[SUBJECT_ID].to_list()
            with_cat = {s for s, ev in first_by_cat[name].items() if ev >= 0}
            categories[name] = {
                "harm_tier": catalogue.harm_tier(name),
                "n_codes_in_data": len(code_sets[name]),
                "n_positive_members": len(with_cat & set(members)),
                "n_positive_nonmembers": len(with_cat - set(members)),
                "excluded": sum(1 for ev in first_by_cat[name].values() if ev < 0),
                "prompts_cut": {},
                "prompts_truncated": {},
                "no_context_budget": {},
                "prompt_events": {},
                "by_tier": {},
            }

        tables: list[pl.DataFrame] = []
        not_converged, n_fits = 0, 0
        undefined_by_tier: dict[str, list[str]] = {}
        for k in cfg.tiers:
            tier = tier_name(k)
            sets = {
                name: build_category_prompts(
                    name, k, subjects, ctx.encoded, first_by_cat[name], max_prompt_tokens=ctx.model.context_length
                )
                for name in names
            }
            cache.add(
                [p for s in sets.values() for p in s.prompts],
                [int(i) for s in sets.values() for i in s.subject_ids],
                f"T3 embedding tier {tier}",
            )
            n_trunc = max(s.truncated for s in sets.values()) if sets else 0
            n_nobudget = max(s.no_budget for s in sets.values()) if sets else 0
            if n_trunc or n_nobudget:
                result.warn(
                    f"tier {tier}: up to {n_trunc} prompts exceed the context window "
                    f"({ctx.model.context_length} tokens) and keep only their most recent events; "
                    f"{n_nobudget} subjects could not be prompted at all."
                )
            undefined: list[str] = []
            for name in ctx.progress(names, f"T3 probes tier {tier}", len(names)):
                cp = sets[name]
                entry = categories[name]
                entry["prompts_cut"][tier] = cp.cut
                entry["prompts_truncated"][tier] = cp.truncated
                entry["no_context_budget"][tier] = cp.no_budget
                entry["prompt_events"][tier] = _prompt_events(cp)
                by_probe, frame, nc, nf = self._probe_category(cp, cache)
                not_converged, n_fits = not_converged + nc, n_fits + nf
                entry["by_tier"][tier] = by_probe
                if frame is not None:
                    tables.append(frame)
                first = next(iter(by_probe.values()))
                if first["members"]["status"] != "ok" or first["nonmembers"]["status"] != "ok":
                    m, n = first["members"], first["nonmembers"]
                    undefined.append(
                        f"{name} (members {m['n_pos']}+/{m['n_neg']}-, non-members {n['n_pos']}+/{n['n_neg']}-)"
                    )
            undefined_by_tier[tier] = undefined
        # One warning per distinct list of undefined categories, naming the tiers it holds for.
        grouped: dict[tuple[str, ...], list[str]] = {}
        for tier, undefined in undefined_by_tier.items():
            if undefined:
                grouped.setdefault(tuple(undefined), []).append(tier)
        for undefined_group, tiers in grouped.items():
            result.warn(
                f"tier{'s' if len(tiers) > 1 else ''} {', '.join(tiers)}: {len(undefined_group)} of {len(names)} "
                f"categories have an undefined probe metric (fewer than {max(cfg.min_positives, cfg.n_folds)} member "
                f"or {cfg.min_positives} non-member subjects with or without the category): "
                f"{', '.join(undefined_group)}"
            )
        if not_converged:
            result.warn(
                f"{not_converged} of {n_fits} probe fits stopped before converging (MLP max_iter={MLP_MAX_ITER}, "
                f"logistic max_iter={LOGISTIC_MAX_ITER}); their probabilities may be under-fitted."
            )
        below = _below_chance(categories)
        if below:
            result.warn(
                f"{len(below)} probe AUROCs have a 95% interval entirely below 0.5 (e.g. {'; '.join(below[:3])}). "
                "With few subjects with the category, cross-validated AUROC falls below chance when the features "
                "carry no signal; read these as no signal, not as an inverse one."
            )

        result.section = {
            "n_members": int(subjects["member"].sum()),
            "n_nonmembers": int(subjects.height - subjects["member"].sum()),
            "tiers": [tier_name(k) for k in cfg.tiers],
            "categories": categories,
            "pooling": cfg.pooling,
            "n_prompts_embedded": len(cache.index),
            "settings": cfg.model_dump(mode="json"),
        }
        result.tables["probe_predictions"] = pl.concat(tables) if tables else pl.DataFrame(schema=_TABLE_SCHEMA)
        self._summarise(result, categories)
        return result

    def _probe_category(
        self, cp: CategoryPrompts, cache: _EmbeddingCache
    ) -> tuple[dict[str, Any], pl.DataFrame | None, int, int]:
        """Every probe on both feature sets for one (category, tier); entries, predictions, fit counts."""
        ctx, cfg = self.context, self.config
        is_m = cp.member == 1
        y_m, y_n = cp.label[is_m], cp.label[~is_m]
        m_pos, n_pos = int(y_m.sum()), int(y_n.sum())
        m_neg, n_neg = int(y_m.size - m_pos), int(y_n.size - n_pos)
        need = max(cfg.min_positives, cfg.n_folds)
        why = _too_few(m_pos, m_neg, need, "members to train and test a probe")
        if why is not None:
            if m_pos >= cfg.min_positives and m_neg >= cfg.min_positives:
                why += f" (n_folds={cfg.n_folds} stratified folds)"
            why_n = "no probe could be trained: " + why
            out: dict[str, Any] = {
                probe: {
                    "members": _undefined_entry(m_pos, m_neg, why),
                    "nonmembers": _undefined_entry(n_pos, n_neg, why_n),
                    "bag_of_codes_members": _undefined_entry(m_pos, m_neg, why),
                    "bag_of_codes_nonmembers": _undefined_entry(n_pos, n_neg, why_n),
                    "embedding_gain": None,
                }
                for probe in cfg.probes
            }
            return out, None, 0, 0

        features = {
            "embedding": cache.get(cp.prompts),
            "bag_of_codes": bag_of_codes(cp.prompts, ctx.tokenizer.token_kind),
        }
        idx_m, idx_n = np.flatnonzero(is_m), np.flatnonzero(~is_m)
        out = {}
        frames = []
        not_converged = n_fits = 0
        for probe in cfg.probes:
            entry: dict[str, Any] = {}
            for feature, x in features.items():
                x = x.tocsr() if sp.issparse(x) else x
                fit = cross_fit(probe, x[idx_m], y_m, x[idx_n], n_folds=cfg.n_folds, seed=ctx.seed)
                not_converged += fit.not_converged
                n_fits += cfg.n_folds
                prefix = "" if feature == "embedding" else "bag_of_codes_"
                kw = {"min_positives": cfg.min_positives, "n_boot": cfg.n_bootstrap, "seed": ctx.seed}
                entry[prefix + "members"] = probe_metrics(y_m, fit.members, **kw)
                entry[prefix + "nonmembers"] = probe_metrics(y_n, fit.nonmembers, **kw)
                prob = np.empty(cp.label.size)
                prob[idx_m], prob[idx_n] = fit.members, fit.nonmembers
                frames.append(
                    pl.DataFrame(
                        {
                            SUBJECT_ID: cp.subject_ids,
                            "member": cp.member,
                            "tier": tier_name(cp.k_events),
                            "category": cp.category,
                            "probe": probe,
                            "feature": feature,
                            "probability": prob,
                            "label": cp.label,
                        },
                        schema=_TABLE_SCHEMA,
                    )
                )
            a, b = entry["members"]["auroc"], entry["bag_of_codes_members"]["auroc"]
            entry["embedding_gain"] = a - b if a is not None and b is not None else None
            out[probe] = {key: entry[key] for key in _ENTRY_ORDER}
        return out, pl.concat(frames), not_converged, n_fits

    def _summarise(self, result: TestResult, categories: dict[str, dict[str, Any]]) -> None:
        best: tuple[float, str] | None = None
        n_defined = n_total = 0
        for name, cat in categories.items():
            for tier, by_probe in cat["by_tier"].items():
                for probe, e in by_probe.items():
                    for split in ("members", "nonmembers"):
                        n_total += 1
                        n_defined += e[split]["status"] == "ok"
                    m = e["members"]
                    if m["status"] == "ok" and (best is None or m["auroc"] > best[0]):
                        lo, hi = m["auroc_ci95"]
                        gain = e["embedding_gain"]
                        gain_txt = f", gain over bag of codes {gain:+.3f}" if gain is not None else ""
                        best = (
                            m["auroc"],
                            f"highest unseen-member AUROC: {name} at tier {tier} ({probe}) "
                            f"{m['auroc']:.3f} [{lo:.3f}, {hi:.3f}]{gain_txt} (the largest of all probes and tiers: a "
                            "selected maximum, its interval not corrected for the choice; the risk matrix corrects)",
                        )
        if n_defined == 0:
            result.status = "undefined"
            result.reason = (
                f"no probe metric could be evaluated in {len(categories)} categories: too few subjects with or "
                f"without each category (needs {self.config.min_positives} per class and split, and "
                f"{max(self.config.min_positives, self.config.n_folds)} among members)"
            )
            return
        result.reason = f"{n_defined} of {n_total} probe metrics defined" + (f"; {best[1]}" if best else "")


_ENTRY_ORDER = ("members", "nonmembers", "bag_of_codes_members", "bag_of_codes_nonmembers", "embedding_gain")
_TABLE_SCHEMA = {
    SUBJECT_ID: pl.Int64,
    "member": pl.Int8,
    "tier": pl.String,
    "category": pl.String,
    "probe": pl.String,
    "feature": pl.String,
    "probability": pl.Float64,
    "label": pl.Int8,
}


def _below_chance(categories: dict[str, dict[str, Any]]) -> list[str]:
    """Defined entries whose whole AUROC interval lies below 0.5 (the small-sample cross-validation bias)."""
    out = []
    for name, cat in categories.items():
        for tier, by_probe in cat["by_tier"].items():
            for probe, entry in by_probe.items():
                for key in _ENTRY_ORDER[:-1]:
                    e = entry[key]
                    if e["status"] == "ok" and e["auroc_ci95"][1] < 0.5:
                        lo, hi = e["auroc_ci95"]
                        out.append(f"{name} tier {tier} {probe} {key} {e['auroc']:.3f} [{lo:.3f}, {hi:.3f}]")
    return out


def _prompt_events(cp: CategoryPrompts) -> dict[str, float | None]:
    """Mean timed events per prompt with and without the category (the length confound of cutting)."""
    pos, neg = cp.n_prompt_events[cp.label == 1], cp.n_prompt_events[cp.label == 0]
    return {
        "with_category": float(pos.mean()) if pos.size else None,
        "without_category": float(neg.mean()) if neg.size else None,
    }

"""T1 reconstruction and T2 sensitive attributes: prompts by tier, decoding settings, short records, context
budget and perfect leakage (failure kinds 4, 5, 11, 12), on stand-in models with known answers and on the
tiny real model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from ehrmem.audits.base import AuditContext
from ehrmem.audits.generation import SamplingConfig, duplicate_count, sample_prompts
from ehrmem.audits.reconstruction import ReconstructionAudit, ReconstructionConfig
from ehrmem.audits.sensitive import SensitiveAudit, SensitiveConfig
from ehrmem.data.catalogue import default_catalogue
from ehrmem.data.cohort import build_cohort
from ehrmem.data.meds import CODE, SUBJECT_ID, TIME, load_meds
from ehrmem.data.prompts import (
    build_prompts,
    category_first_events,
    prompt_seed,
    tier_name,
    true_continuation,
)
from ehrmem.data.tokenizer import EventTokenizer
from ehrmem.errors import InputError
from ehrmem.models.protocol import AuditModel, TokenScores
from ehrmem.stats import clopper_pearson_interval, normalized_risk_ci, wilson_interval

HIV = "DIAGNOSIS//ICD//9//V08"
FILLER = ["LAB//A//mg", "LAB//B//mg", "DIAGNOSIS//ICD//10//I10", "MEDICATION//X", "PROCEDURE//ICD//9//8854"]
N_BOOT = 100


@pytest.fixture(autouse=True)
def _one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------------------
# Data, context and stand-in models
# --------------------------------------------------------------------------------------------------------


def _rewrite_shards(root: Path, edit) -> Path:
    """Apply ``edit`` to every data shard (sorted as load_meds sorts) and write it back."""
    for fp in sorted((root / "data").rglob("*.parquet")):
        df = pl.read_parquet(fp).sort([SUBJECT_ID, TIME], nulls_last=False, maintain_order=True)
        edit(df).write_parquet(fp)
    return root


def _timed_index() -> pl.Expr:
    return pl.when(pl.col(TIME).is_null()).then(-1).otherwise(pl.col(TIME).is_not_null().cum_sum().over(SUBJECT_ID) - 1)


def leaky_meds(root: Path, *, n_subjects: int = 40, events: tuple[int, int] = (12, 20), seed: int = 1) -> Path:
    """Tiny MEDS data where every subject carries a unique static ``ID//<sid>`` code (so that a copying model
    can tell members apart from their prompt) and HIV is the third timed event of even subjects only."""
    from conftest import write_meds

    write_meds(
        root,
        n_subjects=n_subjects,
        seed=seed,
        events_per_subject=events,
        splits={"train": 0.5, "tuning": 0.0, "held_out": 0.5},
    )

    def edit(df: pl.DataFrame) -> pl.DataFrame:
        ids = df[SUBJECT_ID].unique().sort()
        static_ids = pl.DataFrame(
            {SUBJECT_ID: ids, TIME: None, CODE: [f"ID//{s}" for s in ids], "numeric_value": None},
            schema=df.schema,
        )
        df = df.with_columns(_timed_index().alias("_ev"))
        hiv_here = (pl.col(SUBJECT_ID) % 2 == 0) & (pl.col("_ev") == 2)
        df = df.with_columns(
            pl.when(hiv_here)
            .then(pl.lit(HIV))
            .when(pl.col(CODE) == HIV)
            .then(pl.lit("MEDICATION//X"))
            .otherwise(pl.col(CODE))
            .alias(CODE),
            pl.when(hiv_here).then(None).otherwise(pl.col("numeric_value")).alias("numeric_value"),
        ).drop("_ev")
        return pl.concat([df, static_ids]).sort([SUBJECT_ID, TIME], nulls_last=False, maintain_order=True)

    return _rewrite_shards(root, edit)


def make_context(data_dir: Path, model=None, *, tokenizer: EventTokenizer | None = None) -> AuditContext:
    ds = load_meds(data_dir)
    if tokenizer is None:
        train = ds.events.filter(pl.col(SUBJECT_ID).is_in(ds.subject_ids("train")))
        tokenizer = EventTokenizer.fit(train, min_code_subjects=1)
    cohort = build_cohort(
        ds, None, membership="splits", member_splits=["train"], nonmember_splits=["held_out"], match_length=False
    )
    ids = cohort.audited[SUBJECT_ID].to_list()
    encoded = {e.subject_id: e for e in tokenizer.encode(ds.events.filter(pl.col(SUBJECT_ID).is_in(ids)))}
    return AuditContext(
        dataset=ds, model=model, tokenizer=tokenizer, cohort=cohort, encoded=encoded, manifest=None, model_dir=None
    )


def audited(ctx: AuditContext, member: int | None = None) -> list[int]:
    t = ctx.cohort.audited
    if member is not None:
        t = t.filter(pl.col("member") == member)
    return t[SUBJECT_ID].to_list()


class StandIn:
    """An :class:`AuditModel` whose continuations are known in advance.

    ``copy_of`` maps a token id to a member's full record: a prompt containing that token is continued with
    exactly the record's next tokens (a model that copies its training data). Any other prompt gets an
    unrelated continuation: far-future events of a non-HIV code, the same for every sample unless
    ``distinct`` (then sample j uses the j-th filler code). Like the HF adapter, it refuses prompts that leave
    no room for ``max_new_tokens`` in its context window. Every call is recorded.
    """

    def __init__(
        self,
        tok: EventTokenizer,
        *,
        copy_of: dict[int, np.ndarray] | None = None,
        distinct: bool = False,
        context_length: int = 100_000,
    ) -> None:
        self.tok, self.copy_of, self.distinct = tok, copy_of or {}, distinct
        self._context_length = context_length
        self.calls: list[dict] = []

    @property
    def context_length(self) -> int:
        return self._context_length

    @property
    def vocab_size(self) -> int:
        return self.tok.vocab_size

    def token_scores(self, sequences, *, batch_size=16):
        return [TokenScores(np.zeros(len(s) - 1), np.zeros(len(s) - 1), np.ones(len(s) - 1)) for s in sequences]

    def embed(self, sequences, *, pooling="mean", batch_size=16):
        return np.zeros((len(sequences), 4), dtype=np.float32)

    def _unrelated(self, j: int, n: int) -> np.ndarray:
        code = self.tok.index[FILLER[j % len(FILLER)] if self.distinct else "PROCEDURE//ICD//9//8854"]
        return np.array([self.tok.index["TIME//>70y"], code] * n, dtype=np.int64)[:n]

    def sample(
        self, prompts, *, n_samples, max_new_tokens, seeds, temperature=1.0, top_p=1.0, batch_size=16, stop_token=None
    ):
        self.calls.append(
            {
                "prompts": [np.asarray(p).copy() for p in prompts],
                "seeds": list(seeds),
                "n_samples": n_samples,
                "max_new_tokens": max_new_tokens,
                "temperature": temperature,
            }
        )
        out = []
        for p in prompts:
            if len(p) + max_new_tokens > self._context_length:
                raise InputError("Prompt plus horizon exceed the context window.", value=len(p))
            source = next((rec for t, rec in self.copy_of.items() if t in p), None)
            if source is not None:
                end = _prompt_end(source, np.asarray(p))
                cont = source[end : end + max_new_tokens]
                out.append([cont.copy() for _ in range(n_samples)])
            else:
                out.append([self._unrelated(j, max_new_tokens) for j in range(n_samples)])
        return out


def _prompt_end(record: np.ndarray, prompt: np.ndarray) -> int:
    """Where ``prompt`` ends in ``record``: a prefix, or (a prompt truncated to its most recent events) the
    record's head followed by a later contiguous piece of it."""
    if np.array_equal(record[: len(prompt)], prompt):
        return len(prompt)
    for head in range(len(prompt) - 1, 0, -1):
        if not np.array_equal(record[:head], prompt[:head]):
            continue
        tail = prompt[head:]
        for start in range(head, len(record) - len(tail) + 1):
            if np.array_equal(record[start : start + len(tail)], tail):
                return start + len(tail)
    raise AssertionError("a copied member's prompt is not a piece of its record")


def copying_model(ctx: AuditContext, **kw) -> StandIn:
    tok = ctx.tokenizer
    copy_of = {tok.index[f"ID//{s}"]: ctx.encoded[s].ids for s in audited(ctx, 1)}
    return StandIn(tok, copy_of=copy_of, **kw)


def test_stand_in_implements_the_protocol(tmp_path):
    ctx = make_context(leaky_meds(tmp_path / "m", n_subjects=12))
    assert isinstance(copying_model(ctx), AuditModel)
    # Members' ID codes are in the vocabulary, non-members' are not (they read [UNK]).
    for s in audited(ctx, 1):
        assert f"ID//{s}" in ctx.tokenizer.index
    for s in audited(ctx, 0):
        assert f"ID//{s}" not in ctx.tokenizer.index


# --------------------------------------------------------------------------------------------------------
# 1. Prompts by tier, the true continuation, and the context budget (failure kind 12)
# --------------------------------------------------------------------------------------------------------


def test_prompts_by_tier_and_true_continuation(tiny_meds):
    ctx = make_context(tiny_meds)
    tok = ctx.tokenizer
    events = ctx.dataset.events
    encoded = [ctx.encoded[s] for s in audited(ctx)]
    horizon = 3
    for k in (0, 1, 5):
        ps = build_prompts(encoded, k, context_length=10_000, horizon_tokens=20, min_future_events=horizon)
        assert ps.requested == len(encoded) and len(ps.prompts) == len(encoded) and not ps.truncated
        for p in ps.prompts:
            raw = events.filter(pl.col(SUBJECT_ID) == p.subject_id)
            static = raw.filter(pl.col(TIME).is_null())[CODE].to_list()
            timed = raw.filter(pl.col(TIME).is_not_null())[CODE].to_list()
            enc = ctx.encoded[p.subject_id]
            assert p.n_prompt_events == k and p.tier == tier_name(k)
            assert p.ids[0] == tok.bos_id
            if k == 0:
                # [BOS] + static codes, nothing else.
                assert p.tier == "static"
                assert [tok.vocab[t] for t in p.ids[1:]] == static
            # Static codes then exactly the first k timed events, nothing cut, nothing more.
            decoded = [c for c, _, _ in tok.decode(p.ids)]
            assert decoded == static + timed[:k]
            assert tok.token_kind[p.ids[-1]] != 2  # never ends with the time gap of the next event
            cont = true_continuation(enc, p, horizon)
            assert [c for c, _, _ in tok.decode(cont)] == timed[k : k + horizon]
            # Prompt and continuation are contiguous pieces of the record.
            assert np.array_equal(np.concatenate([p.ids, cont]), enc.ids[: len(p.ids) + len(cont)])


def test_context_budget_follows_the_truncation_policy(tiny_meds):
    """Failure kind 12: no room for the horizon -> keep_recent truncates (and says so), skip lists the subject."""
    ctx = make_context(tiny_meds)
    tok = ctx.tokenizer
    encoded = [ctx.encoded[s] for s in audited(ctx)]
    k, horizon = 8, 10
    full = {e.subject_id: e.prompt(k) for e in encoded}
    context = horizon + int(np.median([len(ids) for ids in full.values()]))  # about half the prompts do not fit
    too_long = {s for s, ids in full.items() if len(ids) > context - horizon}
    assert too_long and len(too_long) < len(encoded)  # both cases occur

    kept = build_prompts(encoded, k, context_length=context, horizon_tokens=horizon, policy="keep_recent")
    assert set(kept.truncated) == too_long and not kept.no_budget
    assert len(kept.prompts) == len(encoded)
    for p in kept.prompts:
        enc = ctx.encoded[p.subject_id]
        assert len(p.ids) + horizon <= context
        assert p.truncated == (p.subject_id in too_long)
        if not p.truncated:
            assert np.array_equal(p.ids, full[p.subject_id])
            continue
        head = int((enc.event_index < 0).sum())  # [BOS] and static codes are always kept
        assert np.array_equal(p.ids[:head], enc.ids[:head])
        tail = p.ids[head:]
        assert tail.size and np.array_equal(tail, full[p.subject_id][-tail.size :])  # the most recent tokens
        start = len(full[p.subject_id]) - tail.size
        first_ev = enc.event_index[start]
        assert enc.event_index[start - 1] != first_ev  # whole events only: no orphan value token
        assert tok.token_kind[tail[0]] in (1, 2)
    s = kept.summary()
    assert s["truncated"] == len(too_long) and s["run"] == s["requested"] == len(encoded)

    skipped = build_prompts(encoded, k, context_length=context, horizon_tokens=horizon, policy="skip")
    assert set(skipped.no_budget) == too_long and not skipped.truncated
    assert {p.subject_id for p in skipped.prompts} == set(full) - too_long
    s = skipped.summary()
    assert s["requested"] == len(encoded) and s["run"] == len(encoded) - len(too_long)
    assert s["no_context_budget"] == len(too_long) and set(s["no_budget_subjects"]) == too_long
    assert s["requested"] == s["run"] + s["too_short"] + s["no_context_budget"]

    # Static codes alone fill the room: even keep_recent cannot build a prompt; the subject has no budget.
    tight = build_prompts(encoded, k, context_length=horizon + 2, horizon_tokens=horizon, policy="keep_recent")
    assert not tight.prompts and len(tight.no_budget) == len(encoded)
    assert tight.summary()["run"] == 0 and tight.summary()["no_context_budget"] == len(encoded)
    with pytest.raises(InputError, match="no room"):
        build_prompts(encoded, k, context_length=horizon, horizon_tokens=horizon)


@pytest.mark.parametrize("policy", ["keep_recent", "skip"])
def test_reconstruction_respects_the_context_window(tmp_path, policy):
    """T1 under a small context window: every prompt leaves room for the horizon; the policy is recorded."""
    ctx = make_context(leaky_meds(tmp_path / "m", n_subjects=20))
    scfg = SamplingConfig(n_samples=2, horizon_events=3, population_samples=2, truncation=policy)
    context = 16 + scfg.max_new_tokens  # 16 prompt tokens: [BOS], 2 static codes and a few events
    ctx.model = copying_model(ctx, context_length=context)  # raises like the HF adapter when there is no room
    k = 6
    too_long = {s for s in audited(ctx) if len(ctx.encoded[s].prompt(k)) > 16}
    assert too_long and len(too_long) < len(audited(ctx))
    cfg = ReconstructionConfig(tiers=[k], n_bootstrap=N_BOOT, min_per_class=2, greedy_extraction=False)
    res = ReconstructionAudit(ctx, cfg, scfg).run().result
    tier = res.section["tiers"][0]
    table = res.tables["reconstruction"]
    assert res.section["decoding"]["truncation_policy"] == policy
    assert all(len(p) + scfg.max_new_tokens <= context for c in ctx.model.calls for p in c["prompts"])
    if policy == "keep_recent":
        assert tier["prompts"]["truncated"] == len(too_long) and tier["prompts"]["run"] == len(audited(ctx))
        assert set(table.filter(pl.col("truncated_prompt"))[SUBJECT_ID]) == too_long
    else:
        assert tier["prompts"]["no_context_budget"] == len(too_long)
        assert set(tier["prompts"]["no_budget_subjects"]) == too_long
        assert not set(table[SUBJECT_ID]) & too_long
        assert any("without context budget" in w and f"{len(too_long)} without" in w for w in res.warnings)


# --------------------------------------------------------------------------------------------------------
# 2. T2 prompts never contain the category
# --------------------------------------------------------------------------------------------------------


def _check_t2_prompts(ctx: AuditContext, model: StandIn, category: str, tiers: list[int], first: dict[int, int]):
    """Map every prompt the model received back to (subject, tier) through its seed and check it exactly:
    static codes plus the first min(k, first category event) events; no category code, time or value token."""
    tokens = default_catalogue().category_codes(ctx.tokenizer.vocab)[category]
    seed_of = {
        prompt_seed(ctx.seed, s, k, purpose): (s, k, purpose)
        for s in audited(ctx)
        for k in tiers
        for purpose in ("T1", f"T2/{category}")
    }
    seen = set()
    n_cut = 0
    for call in model.calls:
        for p, seed in zip(call["prompts"], call["seeds"], strict=True):
            if len(p) == 1:  # the unconditioned population baseline: [BOS]
                assert p[0] == ctx.tokenizer.bos_id
                continue
            sid, k, purpose = seed_of[seed]
            enc = ctx.encoded[sid]
            fe = first.get(sid)
            assert fe is None or fe >= 0, f"subject {sid} has {category} among static codes but was prompted"
            cut = fe is not None and fe < k
            assert purpose == (f"T2/{category}" if cut else "T1")
            n_cut += cut
            stop = min(k, fe) if cut else k
            assert not np.isin(p, list(tokens)).any()
            assert np.array_equal(p, enc.ids[enc.event_index < stop])
            if fe is not None:
                assert (enc.event_index[: len(p)] < fe).all()  # not even the time gap of that event
            seen.add((sid, k))
    return seen, n_cut


def test_t2_prompts_never_contain_the_category_tiny(tmp_path):
    """HIV (V08) is cut out of prompts; patients with HIV among static codes are excluded and counted."""
    from conftest import write_meds

    root = write_meds(tmp_path / "m", n_subjects=30, seed=3, events_per_subject=(8, 20))
    static_hiv = {1003, 1004, 1007}

    def add_static_hiv(df: pl.DataFrame) -> pl.DataFrame:
        ids = [s for s in df[SUBJECT_ID].unique().to_list() if s in static_hiv]
        extra = pl.DataFrame({SUBJECT_ID: ids, TIME: None, CODE: HIV, "numeric_value": None}, schema=df.schema)
        return pl.concat([df, extra]).sort([SUBJECT_ID, TIME], nulls_last=False, maintain_order=True)

    _rewrite_shards(root, add_static_hiv)
    ctx = make_context(root)
    model = StandIn(ctx.tokenizer)
    ctx.model = model
    tiers = [0, 3, 8]
    first_df = category_first_events(ctx.dataset.events, {"hiv": {HIV}})
    first = dict(zip(first_df[SUBJECT_ID].to_list(), first_df["first_event"].to_list(), strict=True))
    excluded = {s for s in audited(ctx) if first.get(s, 0) < 0}
    assert excluded and excluded <= static_hiv

    scfg = SamplingConfig(n_samples=2, horizon_events=3, population_samples=2)
    res = SensitiveAudit(ctx, SensitiveConfig(categories=["hiv"], tiers=tiers, n_bootstrap=N_BOOT), scfg).run().result
    entry = res.section["categories"]["hiv"]
    assert entry["excluded_static"] == len(excluded)
    table = res.tables["sensitive"]
    assert not set(table[SUBJECT_ID]) & excluded
    seen, n_cut = _check_t2_prompts(ctx, model, "hiv", tiers, first)
    assert n_cut > 0  # some prompts really were cut before HIV
    assert seen == {(s, k) for s, k in zip(table[SUBJECT_ID], table["k_events"], strict=True)}
    assert table.filter(pl.col("prompt_cut")).height == n_cut
    for k in tiers:
        counts = entry["by_tier"][tier_name(k)]["prompts"]
        assert counts["uncut"] + counts["cut_before_category"] + counts["too_short"] + counts[
            "no_context_budget"
        ] == len(audited(ctx)) - len(excluded)


def test_t2_prompts_never_contain_the_category_demo(demo_data):
    """The same on the real MIMIC-IV demo, for every category the catalogue finds in it."""
    ds = load_meds(demo_data)
    train = ds.events.filter(pl.col(SUBJECT_ID).is_in(ds.subject_ids("train")))
    ctx = make_context(demo_data, tokenizer=EventTokenizer.fit(train, min_code_subjects=1))
    events = ctx.dataset.events.filter(pl.col(SUBJECT_ID).is_in(audited(ctx)))
    catalogue = default_catalogue()
    codes = events[CODE].unique()
    hits = catalogue.match(codes)
    cat_codes = {n: set(codes.filter(pl.Series(hits[n])).to_list()) for n in catalogue.names}
    first_df = category_first_events(events, cat_codes)
    present = sorted(set(first_df["category"]))
    assert present
    tiers = [0, 20, 1000]
    scfg = SamplingConfig(n_samples=1, horizon_events=2, population_samples=2)
    n_cut_total = 0
    for name in present:
        f = first_df.filter(pl.col("category") == name)
        first = dict(zip(f[SUBJECT_ID].to_list(), f["first_event"].to_list(), strict=True))
        model = StandIn(ctx.tokenizer)
        ctx.model = model
        res = SensitiveAudit(ctx, SensitiveConfig(categories=[name], tiers=tiers, n_bootstrap=N_BOOT), scfg).run()
        entry = res.result.section["categories"][name]
        if entry["n_vocab_tokens"] == 0:
            continue  # no token can reveal it: nothing sampled for it
        assert entry["excluded_static"] == sum(e < 0 for e in first.values())
        _, n_cut = _check_t2_prompts(ctx, model, name, tiers, first)
        n_cut_total += n_cut
        # The prompt's raw events (not just tokens) stop before the category: codes mapped to [UNK] count too.
        table = res.result.tables["sensitive"].filter(pl.col("prompt_cut"))
        for sid, k in zip(table[SUBJECT_ID], table["k_events"], strict=True):
            assert first[sid] < k
    assert n_cut_total > 0


# --------------------------------------------------------------------------------------------------------
# 3. Decoding settings (failure kind 11)
# --------------------------------------------------------------------------------------------------------


def test_temperature_zero_is_recorded_as_greedy_and_warned(tmp_path):
    ctx = make_context(leaky_meds(tmp_path / "m", n_subjects=16))
    ctx.model = StandIn(ctx.tokenizer)
    eff = SamplingConfig(temperature=0.0, n_samples=3).effective()
    assert eff["decoding"] == "greedy" and eff["n_samples"] == 1 and eff["top_p"] is None
    scfg = SamplingConfig(temperature=0.0, n_samples=3, horizon_events=3, population_samples=2)
    cfg = ReconstructionConfig(tiers=[0], n_bootstrap=N_BOOT, min_per_class=2, greedy_extraction=False)
    res = ReconstructionAudit(ctx, cfg, scfg).run().result
    assert any("temperature 0 is greedy" in w for w in res.warnings)
    assert res.section["decoding"]["decoding"] == "greedy" and res.section["decoding"]["n_samples"] == 1
    prompted = [c for c in ctx.model.calls if all(len(p) > 1 for p in c["prompts"])]
    assert prompted and all(c["n_samples"] == 1 and c["temperature"] == 0.0 for c in prompted)
    assert (res.tables["reconstruction"]["n_samples"] == 1).all()
    # The greedy single sample is not a duplicate, and no duplicate warning is raised for greedy decoding.
    assert res.section["duplicate_samples"]["count"] == 0
    assert not any("repeat another sample" in w for w in res.warnings)


@pytest.mark.parametrize("distinct", [False, True])
def test_duplicate_samples_are_counted(tmp_path, distinct):
    """Identical samples -> n-1 duplicates per prompt and a warning; distinct samples -> none."""
    assert duplicate_count([np.array([1, 2]), np.array([1, 2]), np.array([1, 3])]) == 1
    ctx = make_context(leaky_meds(tmp_path / "m", n_subjects=16))
    ctx.model = StandIn(ctx.tokenizer, distinct=distinct)
    n = 3
    scfg = SamplingConfig(n_samples=n, horizon_events=3, population_samples=2)
    cfg = ReconstructionConfig(tiers=[0, 2], n_bootstrap=N_BOOT, min_per_class=2, greedy_extraction=False)
    res = ReconstructionAudit(ctx, cfg, scfg).run().result
    table = res.tables["reconstruction"]
    assert table.height > 0 and (table["n_samples"] == n).all()
    expected = 0 if distinct else n - 1
    assert (table["n_duplicate_samples"] == expected).all()
    assert res.section["duplicate_samples"] == {"count": expected * table.height, "of": n * table.height}
    assert any("repeat another sample" in w for w in res.warnings) == (not distinct)


def test_samples_do_not_depend_on_batching(tiny_model_dir):
    """The tiny real model: each prompt's samples are the same whatever the batch size or batch neighbours."""
    from ehrmem.models.hf import HFCausalLM

    data, model_dir = tiny_model_dir
    tok = EventTokenizer.load(model_dir)
    ctx = make_context(data, HFCausalLM.from_pretrained(model_dir, pad_id=tok.pad_id, device="cpu"), tokenizer=tok)
    encoded = [ctx.encoded[s] for s in audited(ctx)[:5]]
    prompts = [p for k in (0, 3) for p in build_prompts(encoded, k, context_length=64, horizon_tokens=10).prompts]
    assert len(prompts) >= 8

    def run(ps, batch_size: int):
        ctx.sample_cache.clear()
        cfg = SamplingConfig(n_samples=3, horizon_events=4, tokens_per_event=2.5, generation_batch_size=batch_size)
        return sample_prompts(ctx, ps, cfg, purpose="T1", desc="test")

    one, many = run(prompts, 1), run(prompts, 64)
    alone = run(prompts[-2:], 64)
    assert set(one) == set(many)
    for key in one:
        assert len(one[key]) == len(many[key]) == 3
        for a, b in zip(one[key], many[key], strict=True):
            assert np.array_equal(a, b), key
    for key in alone:
        assert all(np.array_equal(a, b) for a, b in zip(alone[key], many[key], strict=True))
    # Non-degenerate: sampling really varies between trajectories somewhere.
    assert any(duplicate_count(v) < len(v) - 1 for v in many.values())


# --------------------------------------------------------------------------------------------------------
# 4. Fewer attacks than requested (failure kind 5)
# --------------------------------------------------------------------------------------------------------


def test_short_records_requested_vs_run(tmp_path):
    ctx = make_context(leaky_meds(tmp_path / "m", n_subjects=40, events=(2, 14)))
    ctx.model = copying_model(ctx)
    horizon, tiers = 4, [0, 6]
    scfg = SamplingConfig(n_samples=2, horizon_events=horizon, tokens_per_event=3, population_samples=2)
    cfg = ReconstructionConfig(tiers=tiers, n_bootstrap=N_BOOT, min_per_class=2)
    res = ReconstructionAudit(ctx, cfg, scfg).run().result
    table = res.tables["reconstruction"]
    ids = audited(ctx)
    shortfall = 0
    for k, tier in zip(tiers, res.section["tiers"], strict=True):
        runnable = {s for s in ids if ctx.encoded[s].n_events >= k + horizon}
        rows = table.filter(pl.col("k_events") == k)
        p = tier["prompts"]
        assert p["requested"] == len(ids)
        assert p["run"] == len(runnable) == rows.height and p["too_short"] == len(ids) - len(runnable)
        assert set(rows[SUBJECT_ID]) == runnable
        if p["run"] < p["requested"]:
            shortfall += 1
            assert any(
                w.startswith(f"tier {tier_name(k)}: {p['run']} of {p['requested']} prompts run") for w in res.warnings
            )
        # Denominators are the prompts actually run.
        auc = tier["membership_auc"]
        assert auc["n_pos"] + auc["n_neg"] == p["run"]
        assert tier["members"]["n"] + tier["nonmembers"]["n"] == p["run"]
        mem = rows.filter(pl.col("member") == 1)
        assert tier["members"]["mean"] == pytest.approx(mem["emd_mean"].mean())
        assert tier["precision"]["members"] == pytest.approx(mem["precision"].mean())
    assert shortfall >= 1  # the data really had records too short for the deeper tier
    assert res.section["tiers"][1]["prompts"]["run"] < res.section["tiers"][0]["prompts"]["run"]


# --------------------------------------------------------------------------------------------------------
# 5. Perfect leakage (failure kind 4)
# --------------------------------------------------------------------------------------------------------


def _valid_interval(ci, point: float) -> None:
    assert ci is not None and len(ci) == 2
    lo, hi = ci
    assert math.isfinite(lo) and math.isfinite(hi)
    assert 0.0 <= lo <= point <= hi <= 1.0


def test_perfect_leakage_reconstruction(tmp_path):
    ctx = make_context(leaky_meds(tmp_path / "m"))
    ctx.model = copying_model(ctx)
    horizon, tiers = 4, [0, 3, 6]
    scfg = SamplingConfig(n_samples=2, horizon_events=horizon, tokens_per_event=3, population_samples=3)
    cfg = ReconstructionConfig(tiers=tiers, n_bootstrap=N_BOOT)
    res = ReconstructionAudit(ctx, cfg, scfg).run().result
    assert res.status == "ok"
    assert res.section["least_knowledge_significant"] == "static"
    table = res.tables["reconstruction"]
    members = table.filter(pl.col("member") == 1)
    assert members.height == len(tiers) * len(audited(ctx, 1))
    assert (members["emd_mean"].abs() < 1e-9).all()
    assert (members["recall"] == 1.0).all() and (members["greedy_prefix_events"] == horizon).all()
    for tier in res.section["tiers"]:
        assert tier["prompts"]["run"] == tier["prompts"]["requested"]
        assert tier["members"]["mean"] == pytest.approx(0.0, abs=1e-9)
        assert tier["members"]["ci95"] == pytest.approx([0.0, 0.0], abs=1e-9)
        assert tier["nonmembers"]["mean"] > 0
        auc = tier["membership_auc"]
        assert auc["status"] == "ok" and auc["auc"] == 1.0
        _valid_interval(auc["auc_ci95"], 1.0)
        assert auc["advantage"] == 1.0
        assert tier["test"]["p_value"] is not None and math.isfinite(tier["test"]["p_value"])
        assert tier["significant"] and tier["p_value_holm"] < cfg.alpha
        assert tier["lift_members"] == pytest.approx(1.0)
    json.dumps(res.to_json(), allow_nan=False)  # no NaN / inf anywhere in the section


def test_perfect_leakage_sensitive(tmp_path):
    ctx = make_context(leaky_meds(tmp_path / "m"))
    ctx.model = copying_model(ctx)
    hiv_members = [s for s in audited(ctx, 1) if s % 2 == 0]
    assert len(hiv_members) >= 5 and len(audited(ctx, 1)) - len(hiv_members) >= 5
    scfg = SamplingConfig(n_samples=2, horizon_events=4, tokens_per_event=3, population_samples=3)
    cfg = SensitiveConfig(categories=["hiv"], tiers=[0, 5], n_bootstrap=N_BOOT)
    res = SensitiveAudit(ctx, cfg, scfg).run().result
    assert res.status == "ok"
    entry = res.section["categories"]["hiv"]
    assert entry["status"] == "ok" and entry["unconditioned_rate"] == 0.0
    for tier in ("static", "5"):
        te = entry["by_tier"][tier]
        m = te["members"]
        assert m["status"] == "ok" and m["n_pos"] == len(hiv_members)
        assert m["auroc"] == 1.0 and m["auprc"] == 1.0
        _valid_interval(m["auroc_ci95"], 1.0)
        _valid_interval(m["auprc_ci95"], 1.0)
        assert m["precision"] == m["recall"] == 1.0
        _valid_interval(m["precision_ci95"], 1.0)
        _valid_interval(m["recall_ci95"], 1.0)
        assert m["recall_ci95"][0] < 1.0  # an interval, not a point
        assert m["tpr_at_fpr"]["tpr"] == 1.0
        assert te["leak_signal"]
    assert {"category": "hiv", "tier": "static"} in res.section["leaks"]
    json.dumps(res.to_json(), allow_nan=False)


@pytest.mark.parametrize("n", [1, 7, 50])
@pytest.mark.parametrize("interval", [wilson_interval, clopper_pearson_interval])
def test_binomial_intervals_at_zero_and_all(interval, n):
    lo, hi = interval(0, n)
    assert lo == 0.0 and 0.0 < hi < 1.0
    _valid_interval((lo, hi), 0.0)
    lo, hi = interval(n, n)
    assert hi == 1.0 and 0.0 < lo < 1.0
    _valid_interval((lo, hi), 1.0)
    risk = normalized_risk_ci(n, n, 0, n, n_boot=200)
    assert risk["status"] == "ok" and risk["value"] == 1.0
    # The normalised risk lives in (-inf, 1]: with one attack per side its lower bound is honestly far below 0.
    lo, hi = risk["ci95"]
    assert math.isfinite(lo) and lo < 1.0 and hi == 1.0
    if n >= 7:
        _valid_interval(risk["ci95"], 1.0)


def test_t2_cut_drops_the_whole_timestamp_of_the_first_category_code():
    """A prompt cut right before the first HIV code would keep the other codes of the same timestamp (the
    discharge's other diagnoses), so where it ends would tell that HIV comes next. The cut is at the start
    of the timestamp."""
    from datetime import datetime

    t0, t1, t2 = datetime(2100, 1, 1), datetime(2100, 1, 2), datetime(2100, 1, 3)
    rows = [
        (1, None, "GENDER//F"),
        (1, t0, "LAB//A//mg"),
        (1, t1, "DIAGNOSIS//ICD//10//I10"),  # same timestamp as HIV, sorted before it
        (1, t1, "DIAGNOSIS//ICD//10//E119"),
        (1, t1, HIV),
        (1, t2, "LAB//B//mg"),
        (2, t0, HIV),
    ]
    events = pl.DataFrame(rows, schema={SUBJECT_ID: pl.Int64, TIME: pl.Datetime("us"), CODE: pl.String}, orient="row")
    first = {
        r[SUBJECT_ID]: r["first_event"] for r in category_first_events(events, {"hiv": {HIV}}).iter_rows(named=True)
    }
    assert first == {1: 1, 2: 0}  # subject 1: events 1, 2 and 3 share HIV's timestamp; only event 0 stays

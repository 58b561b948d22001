"""T5 perturbation: each perturbation kind, the classification rules, and a run on a tiny model."""

from __future__ import annotations

import json
from datetime import datetime, timedelta

import numpy as np
import polars as pl
import pytest

from ehrmem.audits.base import AuditContext
from ehrmem.audits.base import TestResult as Result
from ehrmem.audits.generation import SamplingConfig
from ehrmem.audits.perturbation import (
    PERTURBATION_KINDS,
    PerturbationAudit,
    PerturbationConfig,
    PromptPerturber,
    classify_leak,
    effective_counts,
)
from ehrmem.data.catalogue import default_catalogue
from ehrmem.data.hierarchy import CodeHierarchy
from ehrmem.data.tokenizer import EventTokenizer

HIV = ("DIAGNOSIS//ICD//9//V08", "DIAGNOSIS//ICD//10//B20")
ALCOHOL = "DIAGNOSIS//ICD//10//F1020"
I951, I952, I959 = "DIAGNOSIS//ICD//10//I951", "DIAGNOSIS//ICD//10//I952", "DIAGNOSIS//ICD//10//I959"
B21, V09 = "DIAGNOSIS//ICD//10//B21", "DIAGNOSIS//ICD//9//V09"


@pytest.fixture(autouse=True)
def _one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------------------
# A hand-made record: static sex, birth, then a few diagnoses and labs with values.
# --------------------------------------------------------------------------------------------------------

T0 = datetime(2060, 1, 1)
RECORD = [  # (time, code, value)
    (None, "GENDER//F", None),
    (datetime(2000, 1, 1), "MEDS_BIRTH", None),
    (T0, I951, None),
    (T0 + timedelta(hours=1), "LAB//A//mg", 5.0),
    (T0 + timedelta(hours=2), ALCOHOL, None),
    (T0 + timedelta(hours=3), "LAB//B//mg", 3.0),
    (T0 + timedelta(days=1), B21, None),
    (T0 + timedelta(days=2), V09, None),
    (T0 + timedelta(days=3), "LAB//A//mg", 9.0),
]
OTHER = [
    (None, "GENDER//M", None),
    (datetime(1990, 1, 1), "MEDS_BIRTH", None),
    (T0, I952, None),
    (T0 + timedelta(hours=1), I959, None),
    (T0 + timedelta(hours=2), HIV[0], None),
    (T0 + timedelta(hours=3), HIV[1], None),
    (T0 + timedelta(hours=4), "LAB//A//mg", 1.0),
    (T0 + timedelta(hours=5), "LAB//A//mg", 7.0),
    (T0 + timedelta(hours=6), "LAB//B//mg", 1.0),
    (T0 + timedelta(hours=7), "LAB//B//mg", 8.0),
]


def _events() -> pl.DataFrame:
    rows = [(1, t, c, v) for t, c, v in RECORD] + [(2, t, c, v) for t, c, v in OTHER]
    schema = {"subject_id": pl.Int64, "time": pl.Datetime("us"), "code": pl.String, "numeric_value": pl.Float32}
    return pl.DataFrame(rows, schema=schema, orient="row")


@pytest.fixture(scope="module")
def hand():
    events = _events()
    tok = EventTokenizer.fit(events, n_value_bins=4, min_code_subjects=1)
    enc = {e.subject_id: e for e in tok.encode(events)}[1]
    cat = default_catalogue().category_codes(tok.vocab)
    sensitive = set().union(*cat.values())
    return tok, enc, sensitive, cat


def _perturber(hand, **kw) -> PromptPerturber:
    tok, _, sensitive, _ = hand
    return PromptPerturber(
        tok, hierarchy=CodeHierarchy(), protected=sensitive, static_codes={"GENDER//F", "GENDER//M"}, **kw
    )


def _codes(tok, ids) -> list[str]:
    return [tok.vocab[t] for t in ids if tok.token_kind[t] == 1]


def test_sibling_codes_come_from_the_hierarchy(hand):
    tok, enc, sensitive, _ = hand
    h = CodeHierarchy()
    pert = _perturber(hand, code_fraction=1.0)
    seen = set()
    for seed in range(30):
        out = pert.apply("sibling_codes", enc.ids, enc.event_index, np.random.default_rng(seed))
        assert out is not None and out.shape == enc.ids.shape
        changed = np.flatnonzero(out != enc.ids)
        assert changed.size >= 1
        for i in changed:
            old, new = tok.vocab[enc.ids[i]], tok.vocab[out[i]]
            parent = h.path(old)[:-1]
            assert h.path(new)[: len(parent)] == parent, (old, new)  # same parent: a sibling
            assert out[i] not in sensitive
            seen.add((old, new))
    # I95.1 only ever becomes I95.2 or I95.9; the sensitive alcohol code and labs without siblings stay.
    assert {n for o, n in seen if o == I951} == {I952, I959}
    assert {o for o, _ in seen} == {I951}


def test_siblings_never_become_sensitive_codes(hand):
    """B21's and V09's nearest relatives include HIV codes (B20, V08); widening the hierarchy never picks them."""
    tok, enc, sensitive, _ = hand
    pert = _perturber(hand, code_fraction=1.0, sibling_levels=3)
    hiv = {tok.index[c] for c in HIV}
    assert pert.siblings[tok.index[B21]] and pert.siblings[tok.index[V09]]
    for seed in range(50):
        out = pert.apply("sibling_codes", enc.ids, enc.event_index, np.random.default_rng(seed), frozenset(hiv))
        assert not np.isin(out, list(hiv)).any()
        assert set(out.tolist()) & sensitive <= set(enc.ids.tolist()) & sensitive


def test_age_shift_moves_the_birth_gap_one_bucket(hand):
    tok, enc, _, _ = hand
    pert = _perturber(hand)
    directions = set()
    for seed in range(20):
        out = pert.apply("age_shift", enc.ids, enc.event_index, np.random.default_rng(seed))
        changed = np.flatnonzero(out != enc.ids)
        assert changed.size == 1
        i = int(changed[0])
        assert tok.token_kind[enc.ids[i]] == 2 and tok.token_kind[out[i]] == 2
        birth_event = enc.event_index[enc.ids == tok.index["MEDS_BIRTH"]][0]
        assert enc.event_index[i] == birth_event + 1  # the gap between birth and the next event: the age
        step = pert.time_pos[int(out[i])] - pert.time_pos[int(enc.ids[i])]
        assert abs(step) == 1
        directions.add(step)
    assert directions == {-1, 1}
    # A prompt without the birth event (the static tier) has no age to shift.
    static = enc.event_index < 0
    assert pert.apply("age_shift", enc.ids[static], enc.event_index[static], np.random.default_rng(0)) is None


def test_value_bin_shift_moves_value_tokens_one_bin(hand):
    tok, enc, _, _ = hand
    pert = _perturber(hand, value_fraction=1.0)
    out = pert.apply("value_bin_shift", enc.ids, enc.event_index, np.random.default_rng(0))
    changed = np.flatnonzero(out != enc.ids)
    values = np.flatnonzero(tok.token_kind[enc.ids] == 3)
    assert values.size == 3 and set(changed.tolist()) == set(values.tolist())
    for i in changed:
        assert abs(pert.value_bin[int(out[i])] - pert.value_bin[int(enc.ids[i])]) == 1
    no_values = tok.token_kind[enc.ids] != 3
    rng = np.random.default_rng(0)
    assert pert.apply("value_bin_shift", enc.ids[no_values], enc.event_index[no_values], rng) is None


def test_drop_events_never_drops_sensitive_codes_or_birth(hand):
    tok, enc, sensitive, _ = hand
    pert = _perturber(hand, drop_fraction=0.9)
    before = _codes(tok, enc.ids)
    protected = [c for c in before if tok.index[c] in sensitive or c == "MEDS_BIRTH"]
    assert ALCOHOL in protected
    for seed in range(30):
        out = pert.apply("drop_events", enc.ids, enc.event_index, np.random.default_rng(seed))
        after = _codes(tok, out)
        assert len(after) < len(before)
        for c in protected:
            assert after.count(c) == before.count(c)
        # Still a well-formed record: decodes, times never go backwards, and the total span shrinks at most
        # to the buckets' resolution.
        decoded = tok.decode(out)
        times = [t for _, t, _ in decoded]
        assert times == sorted(times)
    # With only protected events left there is nothing to drop.
    keep = np.isin(enc.event_index, [-1, 0, 3])  # static, birth, alcohol
    assert pert.apply("drop_events", enc.ids[keep], enc.event_index[keep], np.random.default_rng(0)) is None


def test_drop_merges_the_time_gap_into_the_next_event(hand):
    tok, _, _, _ = hand
    pert = _perturber(hand, drop_fraction=0.01)  # one event
    t = tok.index
    names = [
        "[BOS]",
        "GENDER//F",
        "MEDS_BIRTH",
        "TIME//40y-70y",
        "LAB//A//mg",
        "TIME//1d-3d",
        "LAB//B//mg",
        "TIME//1d-3d",
        "LAB//A//mg",
    ]
    ids = np.array([t[n] for n in names])
    ev = np.array([-1, -1, 0, 1, 1, 2, 2, 3, 3])
    seen = {}
    for seed in range(40):
        out = pert.apply("drop_events", ids, ev, np.random.default_rng(seed))
        seen[tuple(tok.vocab[i] for i in out)] = seed
    head = ("[BOS]", "GENDER//F", "MEDS_BIRTH")
    assert set(seen) == {
        # the first lab dropped: its 40-70 year gap (the age) and the next 1-3 day gap merge
        (*head, "TIME//40y-70y", "LAB//B//mg", "TIME//1d-3d", "LAB//A//mg"),
        # the middle lab dropped: two 1-3 day gaps (midpoints 1.7 days) make a 3-day-to-1-week gap
        (*head, "TIME//40y-70y", "LAB//A//mg", "TIME//3d-1w", "LAB//A//mg"),
        # the last lab dropped: nothing follows it
        (*head, "TIME//40y-70y", "LAB//A//mg", "TIME//1d-3d", "LAB//B//mg"),
    }


def test_swap_demographics_swaps_one_static_code(hand):
    tok, enc, _, _ = hand
    pert = _perturber(hand)
    out = pert.apply("swap_demographics", enc.ids, enc.event_index, np.random.default_rng(0))
    changed = np.flatnonzero(out != enc.ids)
    assert [tok.vocab[enc.ids[i]] for i in changed] == ["GENDER//F"]
    assert [tok.vocab[out[i]] for i in changed] == ["GENDER//M"]
    alone = PromptPerturber(tok, static_codes={"GENDER//F"})  # no other value seen: not applicable
    assert alone.apply("swap_demographics", enc.ids, enc.event_index, np.random.default_rng(0)) is None


def test_no_kind_gives_the_prompt_the_leaked_category(hand):
    tok, enc, sensitive, cat = hand
    pert = _perturber(hand, code_fraction=1.0, sibling_levels=4, value_fraction=1.0, drop_fraction=0.5)
    hiv = frozenset(cat["hiv"])
    assert hiv
    for kind in PERTURBATION_KINDS:
        for seed in range(15):
            out = pert.apply(kind, enc.ids, enc.event_index, np.random.default_rng(seed), hiv)
            assert out is not None, kind
            assert not np.isin(out, list(hiv)).any(), kind
            assert set(out.tolist()) & sensitive <= set(enc.ids.tolist()) & sensitive, kind
    with pytest.raises(Exception, match="unknown perturbation kind"):
        pert.apply("shuffle", enc.ids, enc.event_index, np.random.default_rng(0))


# --------------------------------------------------------------------------------------------------------
# Classification on constructed rates
# --------------------------------------------------------------------------------------------------------

CFG = PerturbationConfig(n_bootstrap=500)
CLUSTERED = [(5, 10)] + [(0, 10)] * 4  # one look-alike produces it half the time, four never


def test_robust_memorization():
    ev = classify_leak((9, 10), [(8, 10)] * 8, [(0, 10)] * 5, CFG)
    assert ev["class"] == "memorization" and ev["pattern"] == "robust"
    assert ev["ci"][0] > 0 and ev["survival"] == pytest.approx(8 / 9)
    assert ev["r_member"] == 0.8 and ev["r_control"] == 0.0


def test_brittle_memorization():
    """Vanishes under small changes and look-alikes do not produce it: tied to the exact record."""
    ev = classify_leak((10, 10), [(0, 10)] * 8, [(0, 10)] * 5, CFG)
    assert ev["class"] == "memorization" and ev["pattern"] == "brittle"
    assert ev["ci_original"][0] > 0 and ev["ci"][0] <= 0


def test_generalization_when_lookalikes_produce_it_as_often():
    ev = classify_leak((5, 10), [(5, 10)] * 8, [(5, 10)] * 5, CFG)
    assert ev["class"] == "generalization"
    assert ev["risk"] == pytest.approx(0.0) and ev["ci"][0] <= 0 <= ev["ci"][1]
    every = classify_leak((10, 10), [(10, 10)] * 8, [(10, 10)] * 5, CFG)
    assert every["class"] == "generalization" and every["risk"] is None  # no room above the controls


@pytest.mark.parametrize(
    ("original", "perturbed", "controls", "why"),
    [
        ((9, 10), [(8, 10)] * 8, [(0, 10)] * 2, "controls"),  # too few look-alikes
        ((0, 10), [(0, 10)] * 8, [(0, 10)] * 5, "did not replicate"),  # the leak does not reproduce
        ((9, 10), [], [(0, 10)] * 5, "no perturbation"),
        ((1, 10), [(0, 10)] * 8, [(0, 10)] * 5, "often enough"),  # one hit in ten: too little evidence
        ((5, 10), [(0, 10)] * 8, [(5, 10)] * 5, "vanishes"),  # look-alikes produce it, perturbation kills it
        ((3, 10), [(3, 10)] * 8, CLUSTERED, "too wide"),  # survives, but the look-alikes disagree
        ((4, 10), [(1, 10)] * 8, CLUSTERED, "weakens"),
    ],
)
def test_inconclusive(original, perturbed, controls, why):
    ev = classify_leak(original, perturbed, controls, CFG)
    assert ev["class"] == "inconclusive" and why in ev["reason"]


def test_clustered_controls_widen_the_interval():
    """One look-alike that always produces the item and four that never do are not 50 independent draws."""
    controls = [(10, 10)] + [(0, 10)] * 4
    k, n, deff = effective_counts(controls)
    assert deff > 1 and n < 50 and k / n == pytest.approx(0.2, abs=0.05)
    assert effective_counts([(2, 10)] * 5) == (10, 50, 1.0)
    adjusted = classify_leak((6, 10), [(6, 10)] * 8, controls, CFG)
    naive = classify_leak((6, 10), [(6, 10)] * 8, controls, CFG.model_copy(update={"cluster_adjust": False}))
    assert adjusted["ci"][1] - adjusted["ci"][0] > naive["ci"][1] - naive["ci"][0]


def test_config_is_strict():
    with pytest.raises(ValueError):
        PerturbationConfig(unknown=1)
    with pytest.raises(ValueError):
        PerturbationConfig(n_controls=2, min_controls=3)


# --------------------------------------------------------------------------------------------------------
# End to end on a tiny model, with real T2 output and fabricated T1 output
# --------------------------------------------------------------------------------------------------------


def _context(tiny_model_dir):
    from ehrmem.data.cohort import build_cohort
    from ehrmem.data.meds import load_meds
    from ehrmem.models.hf import HFCausalLM

    data, model_dir = tiny_model_dir
    ds = load_meds(data)
    tok = EventTokenizer.load(model_dir)
    model = HFCausalLM.from_pretrained(model_dir, pad_id=tok.pad_id, device="cpu")
    cohort = build_cohort(ds, None, membership="splits", match_length=False)
    ids = cohort.audited["subject_id"].to_list()
    encoded = {e.subject_id: e for e in tok.encode(ds.events.filter(pl.col("subject_id").is_in(ids)))}
    return AuditContext(
        dataset=ds, model=model, tokenizer=tok, cohort=cohort, encoded=encoded, manifest=None, model_dir=model_dir
    )


SAMPLING = SamplingConfig(n_samples=4, horizon_events=5, population_samples=8)
T5 = PerturbationConfig(n_perturbations=4, n_controls=3, min_controls=2, max_leaks=6, n_bootstrap=200)


def _fake_t1(ctx) -> Result:
    """T1 rows saying members reproduced rare codes at the static tier ("rare" = any code, for the tiny data)."""
    members = ctx.cohort.audited.filter(pl.col("member") == 1)["subject_id"].to_list()[:3]
    table = pl.DataFrame({"subject_id": members, "member": 1, "tier": "static", "k_events": 0, "n_rare_reproduced": 1})
    return Result(
        "T1",
        "Reconstruction",
        "ok",
        section={"settings": {"rare_max_subjects": 10**6}},
        tables={"reconstruction": table},
    )


def test_end_to_end_on_a_tiny_model(tiny_model_dir):
    from ehrmem.audits.sensitive import SensitiveAudit, SensitiveConfig

    ctx = _context(tiny_model_dir)
    t2 = (
        SensitiveAudit(ctx, SensitiveConfig(categories=["hiv"], tiers=[10], n_bootstrap=100, min_positives=1), SAMPLING)
        .run()
        .result
    )
    # HIV is in most tiny records, so the unconditioned model produces it as often as prompts do; pretend it is
    # rare so that T2's rows become leaks (the rest of T2's output is real).
    t2.section["categories"]["hiv"]["unconditioned_rate"] = 0.0
    sensitive = t2.tables["sensitive"]
    three = sensitive.filter(pl.col("member") == 1)["subject_id"][:3].to_list()
    t2.tables["sensitive"] = sensitive.filter((pl.col("member") == 0) | pl.col("subject_id").is_in(three))
    ctx.previous = {"T1": _fake_t1(ctx), "T2": t2}
    res = PerturbationAudit(ctx, T5, SAMPLING).run().result
    assert res.status == "ok", res.reason
    table = res.tables["perturbation"]
    assert table.height >= 2 and set(table["source"]) == {"T1", "T2"}
    for col in (
        "subject_id",
        "tier",
        "item",
        "category",
        "r_member",
        "r_control",
        "risk",
        "ci",
        "class",
        "n_perturbed",
        "n_controls",
    ):
        assert col in table.columns
    assert set(table["class"]) <= {"memorization", "generalization", "inconclusive"}
    assert (table["n_perturbed"] <= T5.n_perturbations).all() and (table["n_controls"] <= T5.n_controls).all()
    members = set(ctx.cohort.table.filter(pl.col("member") == 1)["subject_id"].to_list())
    assert set(table["subject_id"]) <= members
    for ids in table["control_subject_ids"].to_list():
        assert not set(ids) & members  # controls are non-members
    t2_rows = table.filter(pl.col("source") == "T2")
    assert (t2_rows["category"] == "hiv").all() and (t2_rows["item"] == "hiv").all()
    # The discovery rate is what T2 recorded; the original rate comes from fresh samples of the same prompt
    # (reusing the samples that selected the leak would confirm it by construction).
    recorded = t2.tables["sensitive"].join(
        t2_rows.select("subject_id", "k_events", "r_discovery", "r_original"), on=["subject_id", "k_events"]
    )
    assert recorded.height == t2_rows.height and np.allclose(recorded["share"], recorded["r_discovery"])
    assert recorded["r_original"].is_not_null().all()
    assert any("T1 rows reproduce a different number" in w for w in res.warnings)  # T1's rows are made up

    section = res.to_json()
    text = json.dumps(section, allow_nan=False)  # JSON-ready: None, never NaN
    assert "NaN" not in text
    assert sum(section["classes"].values()) == table.height == section["n_leaks_tested"]
    assert set(section["per_kind"]) == set(PERTURBATION_KINDS)
    # report.json names subjects with categories only; a T1 leak's exact code stays in the parquet table.
    assert all(leak["item"] == "rare code" for leak in section["leaks"] if leak["source"] == "T1")
    for key in ("settings", "limitations", "decision_rules", "leak_definition", "controls", "decoding"):
        assert section[key]

    # Deterministic: a fresh run without the sample cache gives the same table.
    ctx.sample_cache.clear()
    again = PerturbationAudit(ctx, T5, SAMPLING).run().result.tables["perturbation"]
    assert again.equals(table)


def test_skipped_or_empty_when_t1_t2_give_nothing(tiny_model_dir):
    ctx = _context(tiny_model_dir)
    res = PerturbationAudit(ctx, T5, SAMPLING).run().result
    assert res.status == "skipped" and "did not run" in res.reason
    ctx.previous = {"T1": Result("T1", "Reconstruction", "skipped", reason="disabled")}
    assert PerturbationAudit(ctx, T5, SAMPLING).run().result.status == "skipped"

    empty = pl.DataFrame(
        {
            "subject_id": [1000],
            "member": [1],
            "category": ["hiv"],
            "tier": ["10"],
            "k_events": [10],
            "share": [0.0],
            "label": [1],
            "prompt_cut": [False],
        }
    )
    ctx.previous = {"T2": Result("T2", "Sensitive", "ok", tables={"sensitive": empty})}
    res = PerturbationAudit(ctx, T5, SAMPLING).run().result
    assert res.status == "ok" and res.section["n_leaks_tested"] == 0 and "no leak" in res.reason
    assert res.tables["perturbation"].height == 0
    json.dumps(res.to_json(), allow_nan=False)


def test_prompt_tokens_match_build_prompt_under_truncation(hand):
    from ehrmem.data.prompts import build_prompt, prompt_tokens

    _, enc, _, _ = hand
    for budget in (6, 9, 12, 100):
        ids, ev, truncated = prompt_tokens(enc, 6, max_prompt_tokens=budget)
        p = build_prompt(enc, 6, max_prompt_tokens=budget)
        assert np.array_equal(ids, p.ids) and truncated == p.truncated and ids.size == ev.size
        # Each kept token carries its own event index.
        pos = {(int(t), int(e)) for t, e in zip(enc.ids, enc.event_index, strict=True)}
        assert all((int(t), int(e)) in pos for t, e in zip(ids, ev, strict=True))
        assert truncated == (budget < enc.prompt(6).size)


class ChanceModel:
    """Continuations that contain HIV with probability ``p`` whatever the prompt: a model that memorised
    nobody. Each trajectory is drawn from its own (seed, trajectory) stream, like the HF adapter's."""

    def __init__(self, tok: EventTokenizer, p: float = 0.3) -> None:
        self.tok, self.p = tok, p
        self.item = tok.index[HIV[0]]
        self.filler = tok.index["LAB//A//mg"]
        self.gap = next(i for i, k in enumerate(tok.token_kind) if k == 2)

    context_length = 10_000

    @property
    def vocab_size(self) -> int:
        return self.tok.vocab_size

    def token_scores(self, sequences, *, batch_size=16):
        from ehrmem.models.protocol import TokenScores

        return [TokenScores(np.zeros(len(s) - 1), np.zeros(len(s) - 1), np.ones(len(s) - 1)) for s in sequences]

    def embed(self, sequences, *, pooling="mean", batch_size=16):
        return np.zeros((len(sequences), 4), dtype=np.float32)

    def sample(
        self, prompts, *, n_samples, max_new_tokens, seeds, temperature=1.0, top_p=1.0, batch_size=16, stop_token=None
    ):
        out = []
        for seed in seeds:
            row = []
            for j in range(n_samples):
                rng = np.random.default_rng([int(seed), j])
                toks = [self.gap, self.filler] * (max_new_tokens // 2)
                if rng.random() < self.p:
                    toks[1] = self.item  # in the first event, inside every horizon
                row.append(np.array(toks[:max_new_tokens], dtype=np.int64))
            out.append(row)
        return out


def test_leaks_are_confirmed_on_fresh_samples_not_on_the_ones_that_found_them(tiny_model_dir):
    """Selection bias: T2 calls a member a leak because its samples happened to contain the item more often
    than the unconditioned model's. Confirming the leak on those same samples would find the member's own
    prompt above the look-alikes and, since perturbed prompts regress to the mean, classify chance as
    "brittle memorization". On a model that memorised nobody, T5 must find no memorization."""
    from ehrmem.audits.sensitive import SensitiveAudit, SensitiveConfig

    ctx = _context(tiny_model_dir)
    ctx.model = ChanceModel(ctx.tokenizer)
    sampling = SamplingConfig(n_samples=20, horizon_events=5, population_samples=200)
    t2 = (
        SensitiveAudit(ctx, SensitiveConfig(categories=["hiv"], tiers=[10], n_bootstrap=100, min_positives=1), sampling)
        .run()
        .result
    )
    ctx.previous = {"T2": t2}
    cfg = PerturbationConfig(n_perturbations=8, n_controls=5, min_controls=2, n_bootstrap=500)
    res = PerturbationAudit(ctx, cfg, sampling).run().result
    table = res.tables["perturbation"]
    assert table.height >= 3, "the chance model should give T2 a few chance leaks"
    base = t2.section["categories"]["hiv"]["unconditioned_rate"]
    assert (table["r_discovery"] > base).all()  # selected for being above the population rate
    # Fresh samples regress to the model's real rate: the winner's curse is visible, not baked in.
    assert table["r_original"].mean() < table["r_discovery"].mean()
    assert not (table["r_original"] == table["r_discovery"]).all()
    assert res.section["classes"]["memorization"] == 0, table.select("r_discovery", "r_original", "class", "reason")
    assert res.section["memorization_excess"]["significant"] is False

"""Tests for synthetic canary patients and their exposure (ehrmem.models.canaries)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from ehrmem.data.meds import SUBJECT_ID, load_meds
from ehrmem.data.tokenizer import EventTokenizer
from ehrmem.errors import InputError, ModelError, NumericalError
from ehrmem.models import canaries as canaries_mod
from ehrmem.models.canaries import CanarySet, canary_exposure, load_canaries, make_canaries
from ehrmem.models.protocol import TokenScores

N_PAIRS = 3
CONTEXT = 64


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one thread; several threads on a busy machine are many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def demo_train(demo_data: Path):
    """A tokenizer fitted on 20 training subjects of the MIMIC-IV demo, and their encoded records."""
    ds = load_meds(demo_data)
    ids = ds.subject_ids("train")[:20]
    events = ds.events.filter(pl.col(SUBJECT_ID).is_in(ids))
    tok = EventTokenizer.fit(events, min_code_subjects=1)
    return tok, tok.encode(events)


@pytest.fixture(scope="module")
def cs(demo_train) -> CanarySet:
    tok, enc = demo_train
    return make_canaries(tok, enc, n=N_PAIRS, seed=0, length_events=12, secret_events=4, repeats=5, max_tokens=CONTEXT)


def tiny_gpt2(vocab_size: int, seed: int = 0) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=vocab_size,
        n_positions=CONTEXT,
        n_embd=32,
        n_layer=1,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(cfg)


def contains(seq: np.ndarray, sub: np.ndarray) -> bool:
    """Whether ``sub`` occurs as a contiguous run in ``seq``."""
    windows = np.lib.stride_tricks.sliding_window_view(seq, len(sub))
    return bool((windows == sub).all(axis=1).any())


class ShiftProbe:
    """Stand-in model: log p(token t+1 | ...) = -(token id) / 1000, or a constant when ``flat``."""

    context_length = CONTEXT

    def __init__(self, vocab_size: int, flat: float | None = None) -> None:
        self.vocab_size = vocab_size
        self.flat = flat

    def token_scores(self, sequences, *, batch_size: int = 16) -> list[TokenScores]:
        out = []
        for s in sequences:
            lp = np.full(len(s) - 1, self.flat) if self.flat is not None else -np.asarray(s[1:]) / 1000
            out.append(TokenScores(logprob=lp, mean=np.zeros_like(lp), std=np.zeros_like(lp)))
        return out


# ---------------------------------------------------------------------- construction
def test_twins_are_never_in_the_training_sequences(cs: CanarySet):
    seqs = cs.training_sequences()
    assert len(seqs) == N_PAIRS * 5
    for twin in cs.twins:
        assert not any(contains(s, twin.secret) for _, s in seqs)
        assert not any(np.array_equal(s, twin.ids) for _, s in seqs)
    for canary in cs.canaries:
        assert sum(np.array_equal(s, canary.ids) for _, s in seqs) == 5
    assert len(cs.training_sequences(repeats=2)) == N_PAIRS * 2


def test_one_canary_and_one_twin_per_pair_with_unique_secrets(cs: CanarySet, demo_train):
    tok, enc = demo_train
    assert len(cs.canaries) == len(cs.twins) == N_PAIRS
    assert sorted(c.pair for c in cs.canaries) == sorted(t.pair for t in cs.twins) == list(range(N_PAIRS))
    secrets = [frozenset(r.secret.tolist()) for r in cs.records]
    assert len(set(secrets)) == len(secrets)
    assert not {c.subject_id for c in cs.canaries} & {t.subject_id for t in cs.twins}
    limit = int(canaries_mod.MAX_SHARED_FRACTION * cs.secret_events)
    for r in cs.records:
        assert len(r.secret) == cs.secret_events == len(set(r.secret.tolist()))
        sens = np.intersect1d(r.secret, cs.sensitive_pool)
        assert len(sens) == 1 and tok.vocab[sens[0]] == r.sensitive_code
        assert r.sensitive_code.startswith(canaries_mod.DEFAULT_SENSITIVE_PATTERNS)
        # The secret's codes appear nowhere in the prefix, and no real subject holds most of them.
        assert not np.isin(r.prefix, np.concatenate([cs.sensitive_pool, cs.secret_pool])).any()
        assert max(int(np.isin(r.secret, e.ids).sum()) for e in enc) <= limit
        # A plausible record: [BOS], a real gender token, timed events, then a time gap before the secret.
        assert r.ids[0] == tok.bos_id and tok.vocab[r.ids[1]].startswith("GENDER//")
        assert tok.token_kind[r.ids[r.prefix_length - 1]] == 2
        assert (tok.token_kind[r.secret] == 1).all()
        assert len(r.ids) <= CONTEXT
        np.testing.assert_array_equal(r.secret_positions, np.arange(r.prefix_length, len(r.ids)))


def test_ids_are_negative_unique_and_do_not_reveal_training(cs: CanarySet):
    ids = [r.subject_id for r in cs.records]
    assert all(i < 0 for i in ids) and len(set(ids)) == len(ids)
    assert sorted(ids) == list(range(-2 * N_PAIRS, 0))
    for r in cs.records:  # both members of pair p get -(2p+1), -(2p+2) whatever the coin says
        assert r.subject_id in (-(2 * r.pair + 1), -(2 * r.pair + 2))


def test_construction_is_deterministic_for_a_seed(demo_train, cs: CanarySet):
    tok, enc = demo_train
    kw = dict(n=N_PAIRS, length_events=12, secret_events=4, repeats=5, max_tokens=CONTEXT)
    again = make_canaries(tok, enc, seed=0, **kw)
    other = make_canaries(tok, enc, seed=1, **kw)
    for a, b in zip(cs.records, again.records, strict=True):
        assert np.array_equal(a.ids, b.ids) and a.trained == b.trained
    assert not all(np.array_equal(a.ids, b.ids) for a, b in zip(cs.records, other.records, strict=True))


def test_manifest_round_trip(cs: CanarySet, demo_train):
    tok, enc = demo_train
    d = json.loads(json.dumps(cs.to_manifest()))
    assert d["sensitive_pool"] == [tok.vocab[i] for i in d["sensitive_pool_ids"]]
    assert CanarySet.from_manifest(d).to_manifest() == d
    back = CanarySet.from_manifest({"trained_subjects": [1], "canaries": d}, tok)
    assert back.to_manifest() == d
    for a, b in zip(cs.records, back.records, strict=True):
        assert (a.subject_id, a.pair, a.trained, a.prefix_length, a.sensitive_code) == (
            b.subject_id,
            b.pair,
            b.trained,
            b.prefix_length,
            b.sensitive_code,
        )
        np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(back.secret_pool, cs.secret_pool)
    # A tokenizer other than the one the canaries were built with is refused (failure kind 7).
    other = EventTokenizer(tok.vocab[:-1], tok.value_bins, n_value_bins=tok.n_value_bins, min_code_subjects=1)
    with pytest.raises(ModelError, match="different vocabulary"):
        CanarySet.from_manifest(d, other)
    with pytest.raises(InputError, match="Unrecognised canary"):
        CanarySet.from_manifest({"format": "something else"}, tok)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n": 0}, "n must be"),
        ({"secret_events": 1}, "secret_events must be"),
        ({"repeats": 0}, "repeats must be"),
        ({"max_tokens": 5}, "max_tokens"),
        ({"sensitive_codes": ["NOT//A//CODE"]}, "sensitive codes given"),
    ],
)
def test_bad_arguments_name_the_parameter(demo_train, kwargs, match):
    tok, enc = demo_train
    with pytest.raises(InputError, match=match):
        make_canaries(tok, enc, **{"n": 1, "seed": 0, **kwargs})


def test_given_sensitive_codes_are_used(demo_train, cs: CanarySet):
    tok, enc = demo_train
    code = cs.records[0].sensitive_code
    got = make_canaries(tok, enc, n=2, seed=0, sensitive_codes=[code], length_events=4, secret_events=3)
    assert got.sensitive_source == "given"
    assert {r.sensitive_code for r in got.records} == {code}


def test_falls_back_to_rare_diagnoses_with_a_warning(demo_train, monkeypatch, caplog):
    tok, enc = demo_train
    monkeypatch.setattr(canaries_mod, "DEFAULT_SENSITIVE_PATTERNS", ("NO//SUCH//PREFIX",))
    with caplog.at_level(logging.WARNING, logger="ehrmem.models.canaries"):
        got = make_canaries(tok, enc, n=2, seed=0, length_events=4, secret_events=3)
    assert got.sensitive_source == "fallback"
    assert "No default sensitive code" in caplog.text
    assert all(r.sensitive_code.startswith("DIAGNOSIS//") for r in got.records)


def test_secrets_that_cannot_be_unique_are_refused(demo_train):
    tok, enc = demo_train
    # Every code of these secrets is the one sensitive code plus codes nearly every subject holds.
    common = [tok.vocab[i] for i in np.flatnonzero(tok.token_kind == 1)[:2]]
    with pytest.raises(InputError):
        make_canaries(tok, enc[:1], n=5, seed=0, sensitive_codes=common, secret_events=2, length_events=2)


# ---------------------------------------------------------------------- exposure
def test_exposure_scores_only_the_secret_tokens(cs: CanarySet, demo_train):
    tok, _ = demo_train
    df = canary_exposure(ShiftProbe(tok.vocab_size), cs, n_alternatives=20, seed=0)
    for r in cs.records:
        row = df.filter(pl.col(SUBJECT_ID) == r.subject_id).row(0, named=True)
        assert row["secret_logprob"] == pytest.approx(-r.secret.sum() / 1000)
        assert row["role"] == ("canary" if r.trained else "twin")


def test_ties_count_against_the_canary_and_non_finite_scores_fail(cs: CanarySet, demo_train):
    tok, _ = demo_train
    df = canary_exposure(ShiftProbe(tok.vocab_size, flat=-1.0), cs, n_alternatives=10, seed=0)
    assert (df["rank"] == 11).all() and (df["exposure_bits"] == 0).all()
    with pytest.raises(NumericalError, match="non-finite"):
        canary_exposure(ShiftProbe(tok.vocab_size, flat=-math.inf), cs, n_alternatives=3, seed=0)
    with pytest.raises(InputError, match="n_alternatives"):
        canary_exposure(ShiftProbe(tok.vocab_size), cs, n_alternatives=0)


def test_exposure_is_bounded_and_deterministic(cs: CanarySet, demo_train):
    from ehrmem.models.hf import HFCausalLM

    tok, _ = demo_train
    model = HFCausalLM(tiny_gpt2(tok.vocab_size), pad_id=tok.pad_id, device="cpu")
    R = 30
    a = canary_exposure(model, cs, n_alternatives=R, seed=3, batch_size=8)
    b = canary_exposure(model, cs, n_alternatives=R, seed=3, batch_size=31)
    assert a.height == 2 * N_PAIRS
    assert ((a["exposure_bits"] >= 0) & (a["exposure_bits"] <= math.log2(R + 1))).all()
    assert (a["max_exposure_bits"] == math.log2(R + 1)).all()
    assert ((a["p_value"] > 0) & (a["p_value"] <= 1)).all()
    assert (a["space_bits"] > a["max_exposure_bits"]).all()
    assert a.drop("secret_logprob").equals(b.drop("secret_logprob"))
    np.testing.assert_allclose(a["secret_logprob"], b["secret_logprob"], atol=1e-4)


def test_a_trained_canary_is_more_exposed_than_its_twin(cs: CanarySet, demo_train):
    from ehrmem.models.hf import HFCausalLM

    tok, _ = demo_train
    net = tiny_gpt2(tok.vocab_size, seed=1)
    seqs = [s for _, s in cs.training_sequences()]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), tok.pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.from_numpy(s)
        mask[r, : len(s)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    net.train()
    for _ in range(100):
        loss = net(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    df = canary_exposure(HFCausalLM(net, pad_id=tok.pad_id, device="cpu"), cs, n_alternatives=50, seed=0)
    by_pair = df.pivot(on="role", index="pair", values="exposure_bits")
    assert (by_pair["canary"] > by_pair["twin"]).all()
    assert df.filter(pl.col("trained"))["rank"].to_list() == [1] * N_PAIRS


# ---------------------------------------------------------------------- training
def test_train_with_canaries_records_them_in_the_manifest(demo_data: Path, tmp_path: Path):
    from ehrmem.models.canaries import train_with_canaries
    from ehrmem.models.train import TrainConfig, read_manifest

    ds = load_meds(demo_data)
    cfg = TrainConfig(n_layer=1, n_embd=16, n_head=2, context_length=128, epochs=1, max_events=300, batch_size=32)
    out = train_with_canaries(ds, tmp_path / "model", cfg, n_canaries=2, repeats=3, length_events=16)
    manifest = read_manifest(out)
    assert manifest["canaries"]["n_pairs"] == 2 and manifest["canaries"]["n_trained_sequences"] == 6
    assert not set(manifest["trained_subjects"]) & {r["subject_id"] for r in manifest["canaries"]["records"]}
    loaded = load_canaries(out)
    assert loaded is not None and loaded.repeats == 3
    assert all(len(r.ids) <= cfg.context_length for r in loaded.records)

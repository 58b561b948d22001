"""Tests for the HuggingFace causal-LM adapter (ehrmem.models.hf): token shift, padding, sampling, loading."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ehrmem.errors import InputError, ModelError
from ehrmem.models.hf import HFCausalLM, check_batch_invariance, trajectory_seed
from ehrmem.models.protocol import AuditModel

ATOL = 1e-5
LENGTHS = (2, 5, 17, 3, 33, 9)
BATCH_SIZES = (2, 3, len(LENGTHS))


# ---------------------------------------------------------------------------------------------- models
@pytest.fixture(scope="module")
def gpt2(tiny_model_dir) -> HFCausalLM:
    return HFCausalLM.from_pretrained(tiny_model_dir[1], device="cpu")


@pytest.fixture(scope="module")
def mamba2() -> HFCausalLM:
    from transformers import Mamba2Config, Mamba2ForCausalLM

    torch.manual_seed(0)
    cfg = Mamba2Config(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        state_size=8,
        num_heads=4,
        head_dim=16,
        n_groups=1,
        expand=2,
        conv_kernel=4,
        chunk_size=16,
    )
    return HFCausalLM(Mamba2ForCausalLM(cfg), pad_id=0, device="cpu")


@pytest.fixture(scope="module")
def llama() -> HFCausalLM:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return HFCausalLM(LlamaForCausalLM(cfg), pad_id=0, device="cpu")


@pytest.fixture(params=["gpt2", "mamba2", "llama"])
def model(request) -> HFCausalLM:
    return request.getfixturevalue(request.param)


class LeakyLM(torch.nn.Module):
    """A padding-sensitive stand-in: every position sees the mean over the whole row, padding included."""

    def __init__(self, vocab_size: int = 50, hidden: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.config = SimpleNamespace(vocab_size=vocab_size, n_positions=128)
        self.emb = torch.nn.Embedding(vocab_size, hidden)
        self.head = torch.nn.Linear(hidden, vocab_size)

    def forward(self, input_ids, attention_mask=None, output_hidden_states=False, labels=None):
        h = self.emb(input_ids)
        h = h + h.mean(dim=1, keepdim=True)
        return SimpleNamespace(logits=self.head(h), hidden_states=(h,))


def sequences(m: HFCausalLM, lengths=LENGTHS, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.concatenate([[1], rng.integers(3, m.vocab_size, size=n - 1)]).astype(np.int64) for n in lengths]


def own_loss(m: HFCausalLM, seq: np.ndarray) -> float:
    ids = torch.as_tensor(seq).unsqueeze(0)
    with torch.no_grad():
        return float(m.model(input_ids=ids, labels=ids).loss)


def greedy(m: HFCausalLM, prompt: np.ndarray, n: int) -> np.ndarray:
    """Plain argmax decoding, one full forward pass per step."""
    ids = [int(t) for t in prompt]
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(m.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return np.array(ids[len(prompt) :])


# ---------------------------------------------------------------------------------------------- kind 8
def test_adapter_implements_the_protocol(model):
    assert isinstance(model, AuditModel)


def test_token_shift_matches_the_models_own_loss(model):
    for seq in sequences(model, (2, 7, 30)):
        scores = model.token_scores([seq])[0]
        assert len(scores.logprob) == len(seq) - 1  # the first token has no score
        assert len(scores.mean) == len(scores.std) == len(seq) - 1
        assert np.all(scores.logprob <= 0) and np.all(np.isfinite(scores.logprob))
        assert model.check_loss_alignment(seq) < 1e-4
        assert -scores.logprob.mean() == pytest.approx(own_loss(model, seq), abs=1e-5)


def test_token_scores_are_log_softmax_of_the_previous_position(gpt2):
    seq = sequences(gpt2, (12,))[0]
    with torch.no_grad():
        logp = torch.log_softmax(gpt2.model(input_ids=torch.as_tensor(seq)[None]).logits[0], -1).numpy()
    scores = gpt2.token_scores([seq])[0]
    np.testing.assert_allclose(scores.logprob, logp[np.arange(len(seq) - 1), seq[1:]], atol=ATOL)
    p = np.exp(logp[:-1])
    np.testing.assert_allclose(scores.mean, (p * logp[:-1]).sum(-1), atol=1e-4)
    np.testing.assert_allclose(scores.std, np.sqrt((p * logp[:-1] ** 2).sum(-1) - scores.mean**2), atol=1e-3)


def test_single_token_sequence_has_no_score(gpt2):
    assert gpt2.token_scores([np.array([1])])[0].logprob.shape == (0,)


# ---------------------------------------------------------------------------------------------- kinds 9, 10
def test_token_scores_do_not_depend_on_batching(model):
    seqs = sequences(model)
    alone = [model.token_scores([s], batch_size=1)[0] for s in seqs]
    for batch_size in BATCH_SIZES:
        batched = model.token_scores(seqs, batch_size=batch_size)
        for a, b in zip(alone, batched, strict=True):
            np.testing.assert_allclose(b.logprob, a.logprob, atol=ATOL)
            np.testing.assert_allclose(b.mean, a.mean, atol=ATOL)
            np.testing.assert_allclose(b.std, a.std, atol=1e-4)


def test_token_scores_do_not_depend_on_long_neighbours(model):
    short = sequences(model, (4, 6), seed=1)
    long = sequences(model, (60, 48), seed=2)
    alone = [model.token_scores([s])[0].logprob for s in short]
    mixed = model.token_scores([long[0], short[0], long[1], short[1]], batch_size=4)
    np.testing.assert_allclose(mixed[1].logprob, alone[0], atol=ATOL)
    np.testing.assert_allclose(mixed[3].logprob, alone[1], atol=ATOL)
    assert model.token_scores(short + long, batch_size=3)[1].logprob.shape == alone[1].shape


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_embeddings_do_not_depend_on_batching(model, pooling):
    seqs = sequences(model) + sequences(model, (60,), seed=3)
    alone = np.concatenate([model.embed([s], pooling=pooling, batch_size=1) for s in seqs])
    assert alone.shape == (len(seqs), model.model.config.hidden_size)
    assert np.abs(alone).sum() > 0
    for batch_size in BATCH_SIZES:
        np.testing.assert_allclose(model.embed(seqs, pooling=pooling, batch_size=batch_size), alone, atol=ATOL)


def test_embedding_poolings_differ_and_mean_is_masked(gpt2):
    seq = sequences(gpt2, (10,))[0]
    with torch.no_grad():
        hidden = gpt2.model(input_ids=torch.as_tensor(seq)[None], output_hidden_states=True).hidden_states[-1][0]
    np.testing.assert_allclose(gpt2.embed([seq], pooling="mean")[0], hidden.mean(0).numpy(), atol=ATOL)
    np.testing.assert_allclose(gpt2.embed([seq], pooling="last")[0], hidden[-1].numpy(), atol=ATOL)


def test_per_sequence_loss_from_token_scores_equals_unpadded_loss(model):
    """Kind 10: a masked mean over each sequence's own tokens, never the batch-level loss."""
    seqs = sequences(model, (3, 40, 8, 25))
    scores = model.token_scores(seqs, batch_size=4)
    for seq, s in zip(seqs, scores, strict=True):
        assert -s.logprob.mean() == pytest.approx(own_loss(model, seq), abs=1e-5)


def test_check_batch_invariance_passes_on_real_models(model):
    seqs = sequences(model)
    assert check_batch_invariance(model, seqs, batch_size=4) < 1e-4
    assert check_batch_invariance(model, seqs, batch_size=4, what="embeddings") < 1e-4


@pytest.mark.parametrize("what", ["scores", "embeddings"])
def test_check_batch_invariance_catches_a_padding_sensitive_model(what):
    leaky = HFCausalLM(LeakyLM(), pad_id=0, device="cpu")
    seqs = sequences(leaky, (3, 30, 12))
    with pytest.raises(ModelError, match="differ"):
        check_batch_invariance(leaky, seqs, batch_size=3, what=what)
    # One at a time there is no padding, so the stand-in is consistent with itself.
    assert check_batch_invariance(leaky, seqs, batch_size=1, what=what) == 0.0


# ---------------------------------------------------------------------------------------------- kind 13, 12
@pytest.mark.parametrize("method", ["token_scores", "embed", "sample"])
@pytest.mark.parametrize("bad", ["vocab_size", -1])
def test_ids_outside_the_vocabulary_are_refused(gpt2, method, bad):
    bad_id = gpt2.vocab_size if bad == "vocab_size" else bad
    seq = np.array([1, 5, bad_id, 6])
    call = {
        "token_scores": lambda: gpt2.token_scores([seq]),
        "embed": lambda: gpt2.embed([seq]),
        "sample": lambda: gpt2.sample([seq], n_samples=1, max_new_tokens=2, seeds=[0]),
    }[method]
    with pytest.raises(InputError) as info:
        call()
    assert "vocab" in str(info.value) and str(bad_id) in str(info.value)


def test_sequences_longer_than_the_context_are_refused(gpt2):
    assert gpt2.context_length == 64
    seq = sequences(gpt2, (65,))[0]
    for call in (lambda: gpt2.token_scores([seq]), lambda: gpt2.embed([seq])):
        with pytest.raises(InputError, match="context window"):
            call()
    assert len(gpt2.token_scores([seq[:64]])[0].logprob) == 63
    with pytest.raises(InputError, match="context window"):
        gpt2.sample([seq[:60]], n_samples=1, max_new_tokens=5, seeds=[0])


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda m: m.token_scores([np.array([], dtype=np.int64)]), "empty"),
        (lambda m: m.token_scores([np.array([1, 2])], batch_size=0), "batch_size"),
        (lambda m: m.embed([np.array([1, 2])], pooling="max"), "pooling"),
        (lambda m: m.sample([np.array([1, 2])], n_samples=1, max_new_tokens=2, seeds=[0, 1]), "seed"),
        (lambda m: m.sample([np.array([1, 2])], n_samples=0, max_new_tokens=2, seeds=[0]), "n_samples"),
    ],
)
def test_other_bad_arguments(gpt2, call, match):
    with pytest.raises(InputError, match=match):
        call(gpt2)


# ----------------------------------------------------------------------------------------- sampling (kind 11)
@pytest.fixture(scope="module")
def prompts(gpt2) -> list[np.ndarray]:
    return sequences(gpt2, (3, 9, 14, 5), seed=5)


SAMPLE = {"n_samples": 3, "max_new_tokens": 6}
SEEDS = [11, 12, 13, 14]


@pytest.fixture(scope="module")
def free(gpt2, prompts) -> list[list[np.ndarray]]:
    """Samples at the default settings, all rows in one batch."""
    return gpt2.sample(prompts, seeds=SEEDS, batch_size=16, **SAMPLE)


def test_sampling_is_reproducible_and_varies_with_the_seed(gpt2, prompts, free):
    a = free
    b = gpt2.sample(prompts, seeds=SEEDS, **SAMPLE)
    c = gpt2.sample(prompts, seeds=[s + 100 for s in SEEDS], **SAMPLE)
    assert len(a) == len(prompts) and all(len(p) == SAMPLE["n_samples"] for p in a)
    flat = lambda r: [t.tolist() for p in r for t in p]  # noqa: E731
    assert flat(a) == flat(b)
    assert flat(a) != flat(c)
    # Sampling is really on: trajectories of one prompt are not all duplicates.
    assert len({tuple(t) for t in flat(a)}) > len(prompts)
    assert all(len(t) == SAMPLE["max_new_tokens"] and t.max() < gpt2.vocab_size for p in a for t in p)


@pytest.mark.parametrize("batch_size", [1, 7])
def test_samples_do_not_depend_on_batch_size_or_batch_company(gpt2, prompts, free, batch_size):
    reference = free
    other = gpt2.sample(prompts, seeds=SEEDS, batch_size=batch_size, **SAMPLE)
    for p_ref, p_other in zip(reference, other, strict=True):
        for r, o in zip(p_ref, p_other, strict=True):
            np.testing.assert_array_equal(r, o)
    # The same prompt and seed alone, or next to different prompts, gives the same trajectories.
    alone = gpt2.sample([prompts[2]], seeds=[SEEDS[2]], batch_size=batch_size, **SAMPLE)[0]
    shuffled = gpt2.sample(
        [prompts[3], prompts[2], prompts[0]], seeds=[SEEDS[3], SEEDS[2], 99], batch_size=batch_size, **SAMPLE
    )[1]
    for r, a, s in zip(reference[2], alone, shuffled, strict=True):
        np.testing.assert_array_equal(r, a)
        np.testing.assert_array_equal(r, s)


@pytest.mark.parametrize("settings", [{"temperature": 0.0}, {"temperature": 1.0, "top_p": 1e-6}])
def test_greedy_settings_give_argmax_decoding(gpt2, prompts, settings):
    out = gpt2.sample(prompts, seeds=SEEDS, batch_size=5, **SAMPLE, **settings)
    for prompt, samples in zip(prompts, out, strict=True):
        expected = greedy(gpt2, prompt, SAMPLE["max_new_tokens"])
        for s in samples:  # temperature 0: every trajectory is the same greedy one
            np.testing.assert_array_equal(s, expected)


def test_no_stop_token_means_the_full_horizon(tiny_model_dir, prompts):
    """Without a stop token, generation must not stop at the model's own EOS (which would make a short row
    padded in a batch but not alone)."""
    m = HFCausalLM.from_pretrained(tiny_model_dir[1], device="cpu")
    first = int(greedy(m, prompts[0], 1)[0])
    m.model.generation_config.eos_token_id = first
    out = m.sample(prompts, seeds=SEEDS, temperature=0.0, batch_size=4, **SAMPLE)
    assert out[0][0][0] == first
    assert all(len(t) == SAMPLE["max_new_tokens"] for p in out for t in p)


def test_stop_token_ends_each_trajectory_consistently(gpt2, prompts, free):
    stop = int(free[1][0][2])  # a token that does occur in some trajectory
    batched = gpt2.sample(prompts, seeds=SEEDS, stop_token=stop, batch_size=12, **SAMPLE)
    single = gpt2.sample(prompts, seeds=SEEDS, stop_token=stop, batch_size=1, **SAMPLE)
    n_stopped = 0
    for f_p, b_p, s_p in zip(free, batched, single, strict=True):
        for f, b, s in zip(f_p, b_p, s_p, strict=True):
            np.testing.assert_array_equal(b, s)
            hit = np.flatnonzero(f == stop)
            expected = f[: hit[0] + 1] if hit.size else f
            np.testing.assert_array_equal(b, expected)
            n_stopped += bool(hit.size)
    assert n_stopped >= 1


@pytest.mark.parametrize(
    "settings",
    [
        {"temperature": -0.5},
        {"temperature": float("nan")},
        {"temperature": float("inf")},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_p": -0.1},
    ],
)
def test_invalid_decoding_settings_are_refused(gpt2, prompts, settings):
    with pytest.raises(InputError) as info:
        gpt2.sample(prompts, seeds=SEEDS, **SAMPLE, **settings)
    assert next(iter(settings)) in str(info.value)


def test_trajectory_seed_is_stable_and_distinct():
    seeds = {trajectory_seed(s, j) for s in range(5) for j in range(5)}
    assert len(seeds) == 25
    assert trajectory_seed(3, 1) == trajectory_seed(3, 1)
    assert all(0 <= s < 2**63 for s in seeds)


# ---------------------------------------------------------------------------------------------- loading
def test_pickled_weights_are_refused_unless_allowed(gpt2, tmp_path, tiny_model_dir):
    d = tmp_path / "pickled"
    d.mkdir()
    shutil.copy(tiny_model_dir[1] / "config.json", d / "config.json")
    torch.save(gpt2.model.state_dict(), d / "pytorch_model.bin")
    assert not list(d.glob("*.safetensors"))
    with pytest.raises(ModelError) as info:
        HFCausalLM.from_pretrained(d)
    assert "pytorch_model.bin" in str(info.value) and "allow_pickle=True" in str(info.value)
    loaded = HFCausalLM.from_pretrained(d, allow_pickle=True, device="cpu")
    seq = sequences(gpt2, (20,))[0]
    np.testing.assert_allclose(loaded.token_scores([seq])[0].logprob, gpt2.token_scores([seq])[0].logprob, atol=ATOL)


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(InputError, match="config.json"):
        HFCausalLM.from_pretrained(tmp_path)


def test_loaded_reference_model_reports_its_shape(gpt2):
    assert gpt2.architecture == "GPT2LMHeadModel"
    assert gpt2.vocab_size == gpt2.model.config.vocab_size
    assert gpt2.context_length == 64


def test_next_token_stats_match_the_textbook_formulas_even_with_impossible_tokens():
    """The in-place, batched-dot-product statistics equal log_softmax / E_p[log p] / sd_p[log p] computed
    plainly, including rows where a token has a -inf logit (0 * -inf counts as 0, not NaN)."""
    from ehrmem.models.hf import _next_token_stats

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 11, generator=g) * 4
    logits[1, 2, 5] = float("-inf")
    ids = torch.randint(0, 11, (3, 6), generator=g)
    logp = torch.log_softmax(logits, dim=-1)[:, :-1]
    p = logp.exp()
    want_tok = logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    want_mean = torch.nan_to_num(p * logp).sum(-1)
    want_sd = (torch.nan_to_num(p * logp.square()).sum(-1) - want_mean.square()).clamp_min(0).sqrt()
    tok, mean, sd = _next_token_stats(logits.clone(), ids)
    assert tok.shape == mean.shape == sd.shape == (3, 5)
    assert torch.isfinite(mean).all() and torch.isfinite(sd).all()
    torch.testing.assert_close(tok, want_tok)
    torch.testing.assert_close(mean, want_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sd, want_sd, atol=1e-4, rtol=1e-4)

"""HuggingFace causal-LM adapter (GPT-2, Llama, Mamba2 and any other ``AutoModelForCausalLM``).

Scoring and embedding right-pad each batch: in a causal model the outputs at valid positions cannot see
the padding that follows them, which also protects against architectures whose kernels ignore the
padding mask (failure kind 9). Sampling left-pads prompts and runs HuggingFace ``generate`` with a
logits processor that draws every row from its own seeded random stream, so a continuation depends on
its (seed, trajectory) only, never on the batch it ran in.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
import torch
from transformers import AutoModelForCausalLM, GenerationConfig, LogitsProcessor, LogitsProcessorList

from ehrmem.errors import InputError, ModelError
from ehrmem.models.protocol import Pooling, TokenScores

if TYPE_CHECKING:
    from transformers import GenerationMixin, PreTrainedConfig

logger = logging.getLogger(__name__)

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def pick_device(device: str | None = None) -> torch.device:
    """The requested device, else CUDA when available, else CPU."""
    if not device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise InputError("Unknown device.", value=device, expected="cpu, cuda, cuda:N or mps") from e
    available = {
        "cpu": True,
        "cuda": torch.cuda.is_available(),
        "mps": bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available(),
    }
    if not available.get(dev.type, False):
        raise InputError(
            "The requested device is not available on this machine.",
            value=device,
            expected="cpu" + (", cuda" if available["cuda"] else "") + " (or leave --device unset)",
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InputError(
            "No such CUDA device.", value=device, expected=f"cuda:0 .. cuda:{torch.cuda.device_count() - 1}"
        )
    return dev


def trajectory_seed(seed: int, trajectory: int) -> int:
    """A 63-bit seed for one trajectory of one prompt, independent of batching."""
    return int(
        np.random.SeedSequence([int(seed) & (2**63 - 1), int(trajectory)]).generate_state(2, np.uint64)[0]
        >> np.uint64(1)
    )


class _SeededSampler(LogitsProcessor):
    """Temperature / top-p sampling with one ``torch.Generator`` per row.

    It returns scores that are -inf everywhere but the drawn token, so ``generate`` run greedily picks
    exactly that token. Rows therefore never share a random stream.
    """

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float, n_valid: int | None = None) -> None:
        self.temperature = temperature
        self.top_p = top_p
        self.n_valid = n_valid
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.n_valid is not None and self.n_valid < scores.shape[-1]:
            # Embedding rows past the vocabulary table (a padded vocabulary) are never a token.
            scores = cast(torch.FloatTensor, scores.clone())
            scores[:, self.n_valid :] = float("-inf")
        if self.temperature == 0.0:
            return scores
        logits = scores.float() / self.temperature
        probs = torch.softmax(logits, dim=-1)
        if self.top_p < 1.0:
            # Nucleus: the smallest set of most likely tokens whose mass reaches top_p (the top token always).
            sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)
            cum = sorted_p.cumsum(dim=-1)
            keep = (cum - sorted_p) < self.top_p
            keep[:, 0] = True
            cum = torch.where(keep, sorted_p, torch.zeros_like(sorted_p)).cumsum(dim=-1)
        else:
            # Nothing is cut, so the inverse CDF can run in vocabulary order: no sort on the hot path.
            order = None
            cum = probs.cumsum(dim=-1)
        u = torch.stack([torch.rand((), generator=g) for g in self.generators]).to(cum.device) * cum[:, -1]
        pos = torch.searchsorted(cum, u.unsqueeze(1)).clamp_max(cum.shape[1] - 1)
        choice = pos if order is None else order.gather(1, pos)
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(1, choice, 0.0)
        return cast(torch.FloatTensor, out)


def _next_token_stats(logits: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For positions 0 .. T-2: log p of the next token, and the mean and standard deviation of log p(v) under
    p (Min-K%++). The logits at position t score token t + 1 (failure kind 8).

    ``logits`` (batch x T x vocabulary, the model's output for ``ids``) is overwritten with the
    log-probabilities: the (B, T, V) tensors are the cost of scoring beyond the forward pass itself, so the
    expectations are batched dot products over the vocabulary and only one more such tensor (the
    probabilities) is allocated. The last position, which scores nothing, is computed and dropped rather
    than sliced off first, which would copy the whole tensor.
    """
    logits = logits.contiguous()
    logp = logits.sub_(torch.logsumexp(logits, dim=-1, keepdim=True))
    tok = logp[:, :-1].gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    p = logp.exp()
    bt = p.shape[0] * p.shape[1]
    pv, lv = p.view(bt, 1, -1), logp.view(bt, -1, 1)
    mean = torch.bmm(pv, lv).view(p.shape[:2])
    second = torch.bmm(pv.mul_(logp.view(bt, 1, -1)), lv).view(p.shape[:2])
    if not (torch.isfinite(mean).all() and torch.isfinite(second).all()):
        # An impossible token (-inf logit) makes 0 * -inf: count it as 0, on the few rows concerned only.
        bad = ~(torch.isfinite(mean) & torch.isfinite(second))
        lp = logp[bad]
        q = lp.exp()
        mean[bad] = torch.nan_to_num(q * lp).sum(-1)
        second[bad] = torch.nan_to_num(q * lp.square()).sum(-1)
    std = (second - mean.square()).clamp_min(0).sqrt()
    return tok, mean[:, :-1], std[:, :-1]


class HFCausalLM:
    """An :class:`~ehrmem.models.protocol.AuditModel` over a HuggingFace causal language model.

    Parameters
    ----------
    model
        A loaded ``PreTrainedModel`` with a causal-LM head.
    pad_id
        The padding token id (never scored, never pooled).
    device
        Where to run; defaults to CUDA when available.
    """

    def __init__(
        self, model: torch.nn.Module, *, pad_id: int = 0, device: str | None = None, n_tokens: int | None = None
    ) -> None:
        self.device = pick_device(device)
        # Tokens the vocabulary defines; a model's embedding table may be padded beyond them.
        self.n_tokens = n_tokens
        self.model = model.to(self.device).eval()
        self.pad_id = int(pad_id)
        cfg = cast("PreTrainedConfig", model.config)
        self._vocab_size = int(cfg.vocab_size)
        ctx = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)
        self._context_length = int(ctx) if ctx else 2**31 - 1
        self.architecture = type(model).__name__

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        *,
        pad_id: int = 0,
        device: str | None = None,
        allow_pickle: bool = False,
        dtype: torch.dtype | None = None,
        n_tokens: int | None = None,
    ) -> HFCausalLM:
        """Load a HuggingFace model directory; refuse pickled weights unless ``allow_pickle``."""
        d = Path(model_dir)
        if not (d / "config.json").exists():
            raise InputError(
                "Not a HuggingFace model directory: config.json is missing.",
                file=d / "config.json",
                expected="a directory written by save_pretrained (config.json + *.safetensors)",
            )
        safes = list(d.glob("*.safetensors"))
        pickles = [p for p in d.iterdir() if p.suffix in _PICKLE_SUFFIXES]
        if not safes and not allow_pickle:
            raise ModelError(
                f"{d} holds no safetensors weights"
                + (f" but pickled checkpoints {[p.name for p in pickles]}" if pickles else "")
                + ". Loading a pickle can run arbitrary code; ehrmem refuses it unless you opt in with "
                "allow_pickle=True (CLI: --allow-pickle) for a checkpoint you trust, or convert it to safetensors."
            )
        try:
            model = AutoModelForCausalLM.from_pretrained(
                d, use_safetensors=bool(safes), dtype=dtype or torch.float32, local_files_only=True
            )
        except Exception as e:  # corrupt weights raise the safetensors library's own error types
            raise ModelError(f"Could not load the model in {d}: {type(e).__name__}: {e}") from e
        return cls(model, pad_id=pad_id, device=device, n_tokens=n_tokens)

    @property
    def context_length(self) -> int:
        return self._context_length

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    # ------------------------------------------------------------------ helpers
    def _check_ids(self, sequences: Sequence[np.ndarray]) -> None:
        for i, s in enumerate(sequences):
            if len(s) == 0:
                raise InputError(
                    "Cannot process an empty token sequence.",
                    value=f"sequence {i}",
                    expected="at least one token",
                )
            hi, lo = int(np.max(s)), int(np.min(s))
            if hi >= self._vocab_size or lo < 0:
                # Failure kind 13: an id past the embedding table would silently index garbage on some devices.
                raise InputError(
                    "Token id outside the model's vocabulary.",
                    value=f"sequence {i}: id {hi if hi >= self._vocab_size else lo}",
                    expected=f"0 <= id < {self._vocab_size} (the model's vocab_size)",
                )
            if len(s) > self._context_length:
                raise InputError(
                    "Sequence longer than the model's context window.",
                    value=f"sequence {i}: {len(s)} tokens",
                    expected=f"at most {self._context_length} tokens; truncate before scoring",
                )

    def _batches(self, sequences: Sequence[np.ndarray], batch_size: int):
        if batch_size < 1:
            raise InputError("batch_size must be positive.", value=batch_size, expected=">= 1")
        order = np.argsort([-len(s) for s in sequences], kind="stable")
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            seqs = [np.asarray(sequences[i], dtype=np.int64) for i in idx]
            width = max(len(s) for s in seqs)
            ids = np.full((len(seqs), width), self.pad_id, dtype=np.int64)
            mask = np.zeros((len(seqs), width), dtype=np.int64)
            for r, s in enumerate(seqs):
                ids[r, : len(s)] = s
                mask[r, : len(s)] = 1
            yield idx, torch.from_numpy(ids).to(self.device), torch.from_numpy(mask).to(self.device)

    # ------------------------------------------------------------------ protocol
    @torch.inference_mode()
    def token_scores(self, sequences: Sequence[np.ndarray], *, batch_size: int = 16) -> list[TokenScores]:
        self._check_ids(sequences)
        out: list[TokenScores | None] = [None] * len(sequences)
        for idx, ids, mask in self._batches(sequences, batch_size):
            logits = self.model(input_ids=ids, attention_mask=mask).logits.float()
            tok, mean, std = _next_token_stats(logits, ids)
            lengths = mask.sum(1).cpu().numpy()
            tok_np, mean_np, std_np = tok.cpu().numpy(), mean.cpu().numpy(), std.cpu().numpy()
            for r, i in enumerate(idx):
                n = int(lengths[r]) - 1
                out[i] = TokenScores(logprob=tok_np[r, :n].copy(), mean=mean_np[r, :n].copy(), std=std_np[r, :n].copy())
        return out  # type: ignore[return-value]

    @torch.inference_mode()
    def embed(self, sequences: Sequence[np.ndarray], *, pooling: Pooling = "mean", batch_size: int = 16) -> np.ndarray:
        if pooling not in ("mean", "last"):
            raise InputError("Unknown pooling.", value=pooling, expected="'mean' or 'last'")
        self._check_ids(sequences)
        out: np.ndarray | None = None
        for idx, ids, mask in self._batches(sequences, batch_size):
            hidden = self.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
            hidden = hidden.float()
            if pooling == "mean":
                m = mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * m).sum(1) / m.sum(1)
            else:
                last = mask.sum(1) - 1
                pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
            pooled_np = pooled.cpu().numpy()
            if out is None:
                out = np.zeros((len(sequences), pooled_np.shape[1]), dtype=np.float32)
            out[idx] = pooled_np
        return out if out is not None else np.zeros((0, 0), dtype=np.float32)

    @torch.inference_mode()
    def sample(
        self,
        prompts: Sequence[np.ndarray],
        *,
        n_samples: int,
        max_new_tokens: int,
        seeds: Sequence[int],
        temperature: float = 1.0,
        top_p: float = 1.0,
        batch_size: int = 16,
        stop_token: int | None = None,
    ) -> list[list[np.ndarray]]:
        if temperature < 0 or not np.isfinite(temperature):
            raise InputError(
                "temperature must be >= 0 (0 means greedy decoding).",
                value=temperature,
                expected="a finite number >= 0",
            )
        if not 0 < top_p <= 1:
            raise InputError("top_p must be in (0, 1].", value=top_p, expected="0 < top_p <= 1")
        if n_samples < 1 or max_new_tokens < 1:
            raise InputError(
                "n_samples and max_new_tokens must be positive.",
                value=(n_samples, max_new_tokens),
                expected=">= 1 each",
            )
        if len(seeds) != len(prompts):
            raise InputError(
                "One seed per prompt is required.",
                value=f"{len(seeds)} seeds, {len(prompts)} prompts",
                expected="equal counts",
            )
        self._check_ids(prompts)
        for i, p in enumerate(prompts):
            if len(p) + max_new_tokens > self._context_length:
                raise InputError(
                    "Prompt plus horizon exceed the context window.",
                    value=f"prompt {i}: {len(p)} + {max_new_tokens}",
                    expected=f"<= {self._context_length}; truncate the prompt first",
                )
        rows = [(i, j) for i in range(len(prompts)) for j in range(n_samples)]
        results: list[list[np.ndarray]] = [[np.zeros(0, dtype=np.int64)] * n_samples for _ in prompts]
        # generate() fills a None eos_token_id from the model's generation_config, so that rows would stop at
        # the model's EOS (and be padded when batched) although the caller asked for no stop token; an empty
        # list means "never stop early".
        gen_cfg = GenerationConfig(
            do_sample=False,
            num_beams=1,
            max_new_tokens=max_new_tokens,
            min_new_tokens=0,
            pad_token_id=self.pad_id,
            bos_token_id=None,
            eos_token_id=[] if stop_token is None else stop_token,
        )
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            seqs = [np.asarray(prompts[i], dtype=np.int64) for i, _ in chunk]
            width = max(len(s) for s in seqs)
            ids = np.full((len(seqs), width), self.pad_id, dtype=np.int64)
            mask = np.zeros((len(seqs), width), dtype=np.int64)
            for r, s in enumerate(seqs):
                ids[r, width - len(s) :] = s
                mask[r, width - len(s) :] = 1
            sampler = _SeededSampler(
                [trajectory_seed(seeds[i], j) for i, j in chunk], temperature, top_p, n_valid=self.n_tokens
            )
            # self.model is a HuggingFace causal LM, whose generate comes from GenerationMixin.
            gen = cast("GenerationMixin", self.model).generate(
                input_ids=torch.from_numpy(ids).to(self.device),
                attention_mask=torch.from_numpy(mask).to(self.device),
                generation_config=gen_cfg,
                logits_processor=LogitsProcessorList([sampler]),
            )
            new = gen[:, width:].cpu().numpy()
            for r, (i, j) in enumerate(chunk):
                toks = new[r]
                if stop_token is not None:
                    hit = np.flatnonzero(toks == stop_token)
                    toks = toks[: hit[0] + 1] if hit.size else toks
                results[i][j] = toks.astype(np.int64)
        return results

    # ------------------------------------------------------------------ self-checks
    @torch.inference_mode()
    def check_loss_alignment(self, sequence: np.ndarray, *, atol: float = 1e-4) -> float:
        """Failure kind 8: the mean of our per-token log-probabilities must equal minus the model's own loss.

        Returns the absolute difference; raises :class:`ModelError` when it exceeds ``atol``.
        """
        ids = torch.as_tensor(np.asarray(sequence, dtype=np.int64), device=self.device).unsqueeze(0)
        own = float(self.model(input_ids=ids, labels=ids).loss)
        ours = -float(self.token_scores([sequence])[0].logprob.mean())
        diff = abs(own - ours)
        if diff > atol:
            raise ModelError(
                f"Per-token log-probabilities disagree with the model's own loss: {ours:.6f} vs "
                f"{own:.6f}. The token shift is wrong for this architecture."
            )
        return diff


def check_batch_invariance(
    model, sequences: Sequence[np.ndarray], *, batch_size: int, atol: float = 2e-3, what: str = "scores"
) -> float:
    """Failure kind 9: scores of a sample of sequences batched must equal the same scores one at a time.

    Returns the largest absolute difference; raises :class:`ModelError` when it exceeds ``atol``.
    """
    seqs = list(sequences)
    if what == "scores":
        batched = model.token_scores(seqs, batch_size=batch_size)
        single = [model.token_scores([s], batch_size=1)[0] for s in seqs]
        diff = max(
            float(np.max(np.abs(b.logprob - s.logprob), initial=0.0)) for b, s in zip(batched, single, strict=True)
        )
    else:
        b = model.embed(seqs, batch_size=batch_size)
        s = np.concatenate([model.embed([x], batch_size=1) for x in seqs])
        diff = float(np.max(np.abs(b - s), initial=0.0))
    if diff > atol:
        raise ModelError(
            f"Batched and one-at-a-time {what} differ by {diff:.2e} (tolerance {atol:.0e}). The model's output "
            "depends on padding or batch neighbours, so membership scores would be corrupted; use --batch-size 1 "
            "or fix the model's padding mask."
        )
    return diff

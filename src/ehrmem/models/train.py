"""Training the reference foundation model (``ehrmem train``).

The reference model is a small HuggingFace causal LM (GPT-2 or Llama configuration) trained on the
event tokens of one or more splits. It is written as a standard HuggingFace directory (safetensors) with
the vocabulary table, the tokenizer settings and a training manifest that records exactly which subjects
were trained on, so an audit never has to guess membership.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import shutil
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Literal, cast

import numpy as np
import polars as pl
import torch
from pydantic import BaseModel, ConfigDict, Field

from ehrmem._version import __version__
from ehrmem.data.meds import SUBJECT_ID, MedsDataset
from ehrmem.data.tokenizer import EncodedSubject, EventTokenizer
from ehrmem.errors import InputError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

MANIFEST_FILE = "training_manifest.json"
MANIFEST_FORMAT = "ehrmem-training-manifest/1"


class TrainConfig(BaseModel):
    """Settings of the reference model. The defaults train a demo model in a few minutes on 2 CPU cores."""

    model_config = ConfigDict(extra="forbid")

    architecture: Literal["gpt2", "llama"] = "gpt2"
    n_layer: int = Field(4, ge=1)
    n_embd: int = Field(128, ge=8)
    n_head: int = Field(4, ge=1)
    context_length: int = Field(256, ge=16)
    max_events: int | None = Field(400, ge=1, description="timed events kept per subject (None: all)")
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(16, ge=1)
    learning_rate: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_fraction: float = Field(0.05, ge=0, le=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    seed: int = Field(0, ge=0)
    splits: list[str] = Field(default_factory=lambda: ["train"])
    min_code_subjects: int = Field(2, ge=1)
    n_value_bins: int = Field(10, ge=2)
    device: str | None = None


def windows(encoded: Sequence[EncodedSubject], context_length: int) -> list[np.ndarray]:
    """Cut each subject's tokens into consecutive windows of at most ``context_length`` tokens.

    The first window of a subject starts with ``[BOS]``; this is the window that membership inference
    scores, so it is always trained on.
    """
    out = []
    for e in encoded:
        for start in range(0, len(e.ids), context_length):
            w = e.ids[start : start + context_length]
            if len(w) >= 2:
                out.append(w)
    return out


def build_model(cfg: TrainConfig, vocab_size: int, pad_id: int) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if cfg.n_embd % cfg.n_head:
        raise InputError(
            "n_embd must be a multiple of n_head.", value=(cfg.n_embd, cfg.n_head), expected="n_embd % n_head == 0"
        )
    if cfg.architecture == "gpt2":
        gpt2_cfg = GPT2Config(
            vocab_size=vocab_size,
            n_positions=cfg.context_length,
            n_embd=cfg.n_embd,
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            resid_pdrop=cfg.dropout,
            embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.dropout,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=pad_id,
        )
        return GPT2LMHeadModel(gpt2_cfg)
    llama_cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.n_embd,
        intermediate_size=4 * cfg.n_embd,
        num_hidden_layers=cfg.n_layer,
        num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_head,
        max_position_embeddings=cfg.context_length,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=pad_id,
        attention_dropout=cfg.dropout,
    )
    return LlamaForCausalLM(llama_cfg)


def _fingerprint(arrays: Sequence[np.ndarray]) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.asarray(a, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()


def train_reference_model(
    dataset: MedsDataset,
    out_dir: str | Path,
    cfg: TrainConfig | None = None,
    *,
    extra_sequences: Sequence[tuple[str, np.ndarray]] = (),
    extra_manifest: dict | None = None,
    progress: Callable[[int, int, float], None] | None = None,
    tokenizer: EventTokenizer | None = None,
) -> Path:
    """Train the reference model on ``cfg.splits`` of ``dataset`` and write it to ``out_dir``.

    Parameters
    ----------
    extra_sequences
        Additional ``(label, token ids)`` training sequences (e.g. synthetic canaries), appended to the
        training windows as they are.
    extra_manifest
        Extra entries recorded in the training manifest.
    progress
        Called as ``progress(step, total_steps, loss)``.
    tokenizer
        A tokenizer already fitted on the training split (e.g. the one canaries were built with); by
        default one is fitted here.

    Returns
    -------
    The output directory, written atomically (a partial run never leaves a directory that looks done).
    """
    cfg = cfg or TrainConfig()
    out = Path(out_dir)
    check_output_dir(out)
    if dataset.splits is None:
        raise InputError(
            "Training needs split information to know which subjects to train on.",
            file=dataset.root,
            expected="a dataset loaded with a split file or split_source='directories'",
        )
    subjects: list[int] = []
    for split in cfg.splits:
        split_subjects = dataset.subject_ids(split)
        if not split_subjects:
            raise InputError(
                "A training split holds no subjects.",
                file=dataset.root,
                column="split",
                value=split,
                expected="a split with at least one subject",
            )
        subjects += split_subjects
    train_events = dataset.events.filter(pl.col(SUBJECT_ID).is_in(subjects))
    tokenizer = tokenizer or EventTokenizer.fit(
        train_events, n_value_bins=cfg.n_value_bins, min_code_subjects=cfg.min_code_subjects
    )
    encoded = tokenizer.encode(train_events, max_events=cfg.max_events)
    seqs = windows(encoded, cfg.context_length)
    n_real = len(seqs)
    seqs += [np.asarray(s, dtype=np.int64)[: cfg.context_length] for _, s in extra_sequences]
    if extra_sequences and len(extra_sequences) > CANARY_SHARE_WARNING * n_real:
        logger.warning(
            "The %d injected sequences are %.0f%% as many as the %d real training windows: every epoch takes that "
            "many more optimizer steps, so this model fits its real patients more closely than one trained "
            "without them, and its audit overstates the memorisation of a canary-free model. Keep canaries a "
            "small share of training (fewer canaries or repeats, or a larger dataset).",
            len(extra_sequences),
            100 * len(extra_sequences) / max(1, n_real),
            n_real,
        )
    logger.info(
        "Training %s on %d subjects of split(s) %s: %d windows of <= %d tokens, vocabulary %d",
        cfg.architecture,
        len(subjects),
        cfg.splits,
        len(seqs),
        cfg.context_length,
        tokenizer.vocab_size,
    )

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    from ehrmem.models.hf import pick_device

    device = pick_device(cfg.device)
    model = build_model(cfg, tokenizer.vocab_size, tokenizer.pad_id).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(seqs) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    warmup = int(cfg.warmup_fraction * total)

    def lr_lambda(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    history: list[float] = []
    step = 0
    start = time.perf_counter()
    model.train()
    for _epoch in range(cfg.epochs):
        order = rng.permutation(len(seqs))
        epoch_loss, epoch_tokens = 0.0, 0
        for b in range(steps_per_epoch):
            batch = [seqs[i] for i in order[b * cfg.batch_size : (b + 1) * cfg.batch_size]]
            width = max(len(s) for s in batch)
            ids = torch.full((len(batch), width), tokenizer.pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, s in enumerate(batch):
                ids[r, : len(s)] = torch.from_numpy(s)
                mask[r, : len(s)] = 1
            labels = ids.masked_fill(mask == 0, -100)
            ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            n_tok = int((labels[:, 1:] != -100).sum())
            loss_value = loss.detach().item()
            epoch_loss += loss_value * n_tok
            epoch_tokens += n_tok
            step += 1
            if progress is not None:
                progress(step, total, loss_value)
        history.append(epoch_loss / max(1, epoch_tokens))
        logger.debug("epoch %d loss %.4f", _epoch + 1, history[-1])
    model.eval()
    elapsed = time.perf_counter() - start

    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    # build_model returns a HuggingFace PreTrainedModel (GPT-2 or Llama head).
    cast("PreTrainedModel", model.to("cpu")).save_pretrained(tmp, safe_serialization=True)
    tokenizer.save(tmp)
    manifest = {
        "format": MANIFEST_FORMAT,
        "ehrmem_version": __version__,
        "created_at": datetime.now(UTC).isoformat(),
        "dataset": {"root": str(dataset.root), "data_hash": dataset.data_hash, "metadata": dataset.metadata},
        "trained_splits": list(cfg.splits),
        "trained_subjects": [int(s) for s in subjects],
        "n_trained_subjects": len(subjects),
        "n_windows": len(seqs),
        "n_real_windows": n_real,
        "n_injected_sequences": len(seqs) - n_real,
        "windows_sha256": _fingerprint(seqs),
        "settings": cfg.model_dump(),
        "n_parameters": int(n_params),
        "vocab_size": tokenizer.vocab_size,
        "vocab_sha256": hashlib.sha256("\n".join(tokenizer.vocab).encode()).hexdigest(),
        "loss_per_epoch": history,
        "train_seconds": elapsed,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
        },
    }
    if extra_manifest:
        manifest.update(extra_manifest)
    (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
    if out.exists():
        try:
            check_output_dir(out)  # again: something may have been written there during training
        except InputError:
            shutil.rmtree(tmp)
            raise
        shutil.rmtree(out)
    os.replace(tmp, out)
    logger.info("Wrote the reference model to %s (final training loss %.3f, %.0f s)", out, history[-1], elapsed)
    return out


#: Injected sequences (canaries) above this share of the real training windows draw a warning.
CANARY_SHARE_WARNING = 0.1

#: What `ehrmem train` writes into a model directory; anything else there is the user's and is never deleted.
_MODEL_FILES = ("config.json", "generation_config.json", "vocab.parquet", "tokenizer.json", MANIFEST_FILE)


def check_output_dir(out: Path) -> None:
    """Refuse, before any training, an output path whose replacement would lose something.

    A new path, an empty directory, or a model directory written by ``ehrmem train`` holding only its own
    files can be (re)written; a file, another directory, or a model directory with other files in it cannot.
    """
    if not out.exists():
        return
    if not out.is_dir():
        raise InputError("The output path is a file.", file=out, expected="a new path or a model directory")
    entries = list(out.iterdir())
    if not entries:
        return
    if not (out / MANIFEST_FILE).exists():
        raise InputError(
            "The output directory exists and is not an ehrmem model; refusing to overwrite it.",
            file=out,
            expected="a new path, or a directory written by `ehrmem train`",
        )
    foreign = sorted(p.name for p in entries if p.name not in _MODEL_FILES and p.suffix != ".safetensors")
    if foreign:
        raise InputError(
            "The output directory is an ehrmem model that also holds other files; replacing it would delete them.",
            file=out,
            value=", ".join(foreign[:5]),
            expected="a new path, or move those files out first",
        )


def read_manifest(model_dir: str | Path) -> dict | None:
    """The training manifest of a model directory, or ``None`` when it has none."""
    fp = Path(model_dir) / MANIFEST_FILE
    if not fp.exists():
        return None
    try:
        manifest = json.loads(fp.read_text())
    except json.JSONDecodeError as e:
        raise InputError("The training manifest is not valid JSON.", file=fp, value=str(e)) from e
    if manifest.get("format") != MANIFEST_FORMAT or "trained_subjects" not in manifest:
        raise InputError(
            "Unrecognised training manifest.",
            file=fp,
            column="format",
            value=manifest.get("format"),
            expected=f"{MANIFEST_FORMAT!r} with a 'trained_subjects' list",
        )
    return manifest

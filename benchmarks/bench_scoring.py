"""Benchmark: one-pass teacher-forced scoring against a naive scorer that runs one forward pass per prefix.

Both run in the same process on the same model and the same 512-token sequences from the MIMIC-IV demo,
so the ratio is robust to a noisy machine. Also reports scoring throughput against the model's raw
forward throughput (the same batches through ``model(input_ids)`` with nothing else).

Usage::

    python benchmarks/bench_scoring.py [--data DIR] [--n-naive 4] [--n-fast 64] [--seq-len 512]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

from ehrmem.data.meds import SUBJECT_ID, load_meds
from ehrmem.data.tokenizer import EventTokenizer
from ehrmem.models.hf import HFCausalLM
from ehrmem.models.train import TrainConfig, build_model

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mimic-iv-demo-meds"


@torch.inference_mode()
def naive_scores(model: torch.nn.Module, seq: np.ndarray) -> np.ndarray:
    """log p(x_t | x_<t) by one forward pass per prefix (what a per-prefix implementation does)."""
    ids = torch.as_tensor(seq, dtype=torch.long).unsqueeze(0)
    out = np.empty(len(seq) - 1)
    for t in range(1, len(seq)):
        logits = model(input_ids=ids[:, :t]).logits[0, -1].float()
        out[t - 1] = float(torch.log_softmax(logits, -1)[seq[t]])
    return out


@torch.inference_mode()
def raw_forward_seconds(model: torch.nn.Module, seqs: list[np.ndarray], batch_size: int) -> float:
    start = time.perf_counter()
    for i in range(0, len(seqs), batch_size):
        ids = torch.as_tensor(np.stack(seqs[i : i + batch_size]), dtype=torch.long)
        model(input_ids=ids).logits.sum()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--n-naive", type=int, default=4, help="sequences scored by the naive scorer")
    ap.add_argument("--n-fast", type=int, default=64, help="sequences scored for throughput")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = ap.parse_args()

    torch.manual_seed(0)
    ds = load_meds(args.data)
    train = ds.events.filter(pl.col(SUBJECT_ID).is_in(ds.subject_ids("train")))
    tok = EventTokenizer.fit(train)
    enc = [e for e in tok.encode(ds.events) if len(e.ids) >= args.seq_len]
    seqs = [e.ids[: args.seq_len] for e in enc]
    seqs = (seqs * (args.n_fast // len(seqs) + 1))[: args.n_fast]
    cfg = TrainConfig(context_length=args.seq_len)  # the reference architecture, at 512 tokens of context
    net = build_model(cfg, tok.vocab_size, tok.pad_id).eval()
    model = HFCausalLM(net, pad_id=tok.pad_id, device="cpu")
    threads = torch.get_num_threads()

    model.token_scores(seqs[:2], batch_size=2)  # warm-up
    t = time.perf_counter()
    fast_small = model.token_scores(seqs[: args.n_naive], batch_size=args.batch_size)
    fast_small_s = time.perf_counter() - t
    t = time.perf_counter()
    naive = [naive_scores(net, s) for s in seqs[: args.n_naive]]
    naive_s = time.perf_counter() - t
    max_diff = max(float(np.max(np.abs(a.logprob - b))) for a, b in zip(fast_small, naive, strict=True))

    t = time.perf_counter()
    model.token_scores(seqs, batch_size=args.batch_size)
    fast_s = time.perf_counter() - t
    raw_s = raw_forward_seconds(net, seqs, args.batch_size)
    n_tokens = len(seqs) * args.seq_len
    res = {
        "seq_len": args.seq_len,
        "torch_threads": threads,
        "n_naive_sequences": args.n_naive,
        "naive_seconds_per_sequence": naive_s / args.n_naive,
        "one_pass_seconds_per_sequence_same_sequences": fast_small_s / args.n_naive,
        "speedup_one_pass_vs_naive": naive_s / fast_small_s,
        "max_abs_logprob_diff_vs_naive": max_diff,
        "n_throughput_sequences": len(seqs),
        "scoring_tokens_per_second": n_tokens / fast_s,
        "raw_forward_tokens_per_second": n_tokens / raw_s,
        "scoring_vs_raw_forward": raw_s / fast_s,
    }
    print(json.dumps(res, indent=1))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

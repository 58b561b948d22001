"""Benchmark: one-pass teacher-forced scoring against a naive scorer that runs one forward pass per prefix.

Everything runs in one process on one model of the reference architecture (:func:`ehrmem.models.train.build_model`
with the default :class:`~ehrmem.models.train.TrainConfig`, randomly initialised, at ``--seq-len`` tokens of
context) over real ``--seq-len``-token sequences of the MIMIC-IV demo. The machine may be shared, so the
compared methods are interleaved and every figure is a median over repeats:

1. **one pass vs naive** (goal: at least 50x). For each of ``--n-naive`` sequences, the naive scorer
   (one forward pass per prefix ``x[:t]``, t = 1 .. L-1, then a log-softmax of the last position) runs once,
   between ``--fast-repeats`` runs of ``HFCausalLM.token_scores`` on that same sequence alone (batch of one)
   before and after it. The ratio of that sequence is naive time / median one-pass time; the figure is the
   median over sequences. This is measured, not extrapolated: the naive side covers every prefix of whole
   sequences. A second, derived figure divides the naive per-token cost by the one-pass per-token cost at
   ``--batch-size`` (from part 2), i.e. the speed-up at the batch size an audit uses.
2. **scoring vs raw forward** (goal: close to 1). ``--n-fast`` sequences in batches of ``--batch-size``; in
   every repeat each batch goes through ``token_scores`` and through a plain ``model(input_ids=...)``, the
   order alternating between batches and repeats. The ratio of a repeat is raw time / scoring time;
   the figure is the median over ``--repeats``.

Usage::

    .venv/bin/python benchmarks/bench_scoring.py [--data DIR] [--n-naive 3] [--n-fast 64] [--seq-len 512]

Prints a table and writes ``benchmarks/results/bench_scoring.json`` (``--json`` to change).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch
from _machine import THREADS_HELP, machine_info

from ehrmem.data.meds import SUBJECT_ID, load_meds
from ehrmem.data.tokenizer import EventTokenizer
from ehrmem.models.hf import HFCausalLM
from ehrmem.models.train import TrainConfig, build_model

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "mimic-iv-demo-meds"
DEFAULT_JSON = REPO / "benchmarks" / "results" / "bench_scoring.json"
GOAL_SPEEDUP = 50.0


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
def raw_forward(model: torch.nn.Module, batch: list[np.ndarray]) -> None:
    ids = torch.as_tensor(np.stack(batch), dtype=torch.long)
    model(input_ids=ids).logits.sum()


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - start, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--n-naive", type=int, default=3, help="whole sequences scored by the naive scorer")
    ap.add_argument("--fast-repeats", type=int, default=3, help="one-pass runs before and after each naive run")
    ap.add_argument("--n-fast", type=int, default=64, help="sequences per throughput repeat")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5, help="throughput repeats")
    ap.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON, help="write the figures here")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    ds = load_meds(args.data)
    train = ds.events.filter(pl.col(SUBJECT_ID).is_in(ds.subject_ids("train")))
    tok = EventTokenizer.fit(train)
    enc = [e for e in tok.encode(ds.events) if len(e.ids) >= args.seq_len]
    if not enc:
        raise SystemExit(f"no subject has {args.seq_len} tokens")
    seqs = [e.ids[: args.seq_len] for e in enc]
    seqs = (seqs * (args.n_fast // len(seqs) + 1))[: args.n_fast]
    cfg = TrainConfig(context_length=args.seq_len)  # the reference architecture, at seq_len tokens of context
    net = build_model(cfg, tok.vocab_size, tok.pad_id).eval()
    model = HFCausalLM(net, pad_id=tok.pad_id, device="cpu")
    n_params = sum(p.numel() for p in net.parameters())
    print(
        f"model: {cfg.architecture} {cfg.n_layer} layers x {cfg.n_embd}, vocab {tok.vocab_size}, "
        f"{n_params / 1e6:.2f} M parameters, context {args.seq_len}; torch threads {torch.get_num_threads()}, "
        f"{os.cpu_count()} CPUs"
    )

    # warm-up of both paths
    model.token_scores(seqs[:2], batch_size=2)
    raw_forward(net, seqs[:2])

    # ---------------------------------------------------------------- 1. one pass vs naive, interleaved
    per_seq = []
    max_diff = 0.0
    for i, seq in enumerate(seqs[: args.n_naive]):
        fast_times = [timed(model.token_scores, [seq], batch_size=1)[0] for _ in range(args.fast_repeats)]
        naive_s, naive = timed(naive_scores, net, seq)
        more = [timed(model.token_scores, [seq], batch_size=1) for _ in range(args.fast_repeats)]
        fast_times += [t for t, _ in more]
        fast = more[-1][1][0]  # type: ignore[index]
        max_diff = max(max_diff, float(np.max(np.abs(fast.logprob - naive))))
        fast_med = statistics.median(fast_times)
        per_seq.append({"naive_s": naive_s, "one_pass_median_s": fast_med, "speedup": naive_s / fast_med})
        print(f"  naive sequence {i + 1}/{args.n_naive}: naive {naive_s:.2f} s, one pass {fast_med * 1e3:.1f} ms")
    speedup = statistics.median(r["speedup"] for r in per_seq)
    naive_s_per_seq = statistics.median(r["naive_s"] for r in per_seq)
    one_pass_s_per_seq = statistics.median(r["one_pass_median_s"] for r in per_seq)
    n_scored = args.seq_len - 1  # tokens scored per sequence (the first has no prefix)

    # ---------------------------------------------------------------- 2. scoring vs raw forward, interleaved
    batches = [seqs[i : i + args.batch_size] for i in range(0, len(seqs), args.batch_size)]
    rep_fast, rep_raw = [], []
    for r in range(args.repeats):
        fast_s = raw_s = 0.0
        for b, batch in enumerate(batches):
            if (r + b) % 2 == 0:
                fast_s += timed(model.token_scores, batch, batch_size=args.batch_size)[0]
                raw_s += timed(raw_forward, net, batch)[0]
            else:
                raw_s += timed(raw_forward, net, batch)[0]
                fast_s += timed(model.token_scores, batch, batch_size=args.batch_size)[0]
        rep_fast.append(fast_s)
        rep_raw.append(raw_s)
    n_tokens = len(seqs) * args.seq_len
    vs_raw = statistics.median(raw / fast for raw, fast in zip(rep_raw, rep_fast, strict=True))
    scoring_tps = n_tokens / statistics.median(rep_fast)
    raw_tps = n_tokens / statistics.median(rep_raw)
    # Derived: naive per-token cost against one-pass per-token cost at the audit's batch size.
    naive_tps = n_scored / naive_s_per_seq
    one_pass_tps = n_scored / one_pass_s_per_seq
    speedup_batched = scoring_tps / naive_tps

    res = {
        "benchmark": "bench_scoring",
        "machine": machine_info(),
        "model": {
            "architecture": cfg.architecture,
            "n_layer": cfg.n_layer,
            "n_embd": cfg.n_embd,
            "n_head": cfg.n_head,
            "vocab_size": tok.vocab_size,
            "n_parameters": n_params,
            "weights": "random init (torch.manual_seed(0))",
        },
        "seq_len": args.seq_len,
        "naive": {
            "n_sequences": args.n_naive,
            "what": "every prefix of whole sequences scored (no extrapolation); one-pass side: batch of one, "
            f"median of {2 * args.fast_repeats} runs around each naive run",
            "per_sequence": per_seq,
            "naive_seconds_per_sequence_median": naive_s_per_seq,
            "one_pass_seconds_per_sequence_median": one_pass_s_per_seq,
            "naive_tokens_per_second": naive_tps,
            "speedup_one_pass_vs_naive": speedup,
            "speedup_one_pass_batched_vs_naive_derived": speedup_batched,
            "max_abs_logprob_diff_vs_naive": max_diff,
            "goal": GOAL_SPEEDUP,
        },
        "throughput": {
            "n_sequences": len(seqs),
            "batch_size": args.batch_size,
            "repeats": args.repeats,
            "scoring_seconds_per_repeat": rep_fast,
            "raw_forward_seconds_per_repeat": rep_raw,
            "scoring_tokens_per_second": scoring_tps,
            "raw_forward_tokens_per_second": raw_tps,
            "scoring_vs_raw_forward": vs_raw,
        },
    }

    rows = [
        ("naive scorer (1 forward / prefix)", f"{naive_tps:,.0f} tok/s", f"{naive_s_per_seq:.2f} s / sequence"),
        ("one pass, batch 1", f"{one_pass_tps:,.0f} tok/s", f"{one_pass_s_per_seq * 1e3:.1f} ms / sequence"),
        (f"one pass, batch {args.batch_size}", f"{scoring_tps:,.0f} tok/s", ""),
        (f"raw model(input_ids), batch {args.batch_size}", f"{raw_tps:,.0f} tok/s", ""),
    ]
    print()
    print(f"{'method':<40} {'throughput':>16}  note")
    for name, tps, note in rows:
        print(f"{name:<40} {tps:>16}  {note}")
    print()
    print(
        f"one pass vs naive (same sequences, batch 1): {speedup:.0f}x  (goal >= {GOAL_SPEEDUP:.0f}x: "
        f"{'met' if speedup >= GOAL_SPEEDUP else 'NOT met'}); at batch {args.batch_size}, derived: "
        f"{speedup_batched:.0f}x"
    )
    print(f"scoring vs raw forward throughput: {vs_raw:.3f}  (1.0 = no overhead)")
    print(f"max |logprob difference| one pass vs naive: {max_diff:.2e}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

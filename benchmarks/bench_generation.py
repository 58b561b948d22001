"""Benchmark: ehrmem's batched, per-row seeded generation against raw HuggingFace ``generate(do_sample=True)``.

One process, one model of the reference architecture (:func:`ehrmem.models.train.build_model` with the
default :class:`~ehrmem.models.train.TrainConfig`, randomly initialised, 512 tokens of context), real
prompts of the MIMIC-IV demo (tier ``--tier`` events, built by :func:`ehrmem.data.prompts.build_prompts`)
and the audit's default decoding settings (:class:`ehrmem.audits.generation.SamplingConfig`: M samples per
prompt, a horizon of ``ceil(horizon_events * tokens_per_event)`` new tokens, generation batches of
``--generation-batch-size`` rows, temperature 1, top-p 1). Three methods do the same work:

- **raw**: ``model.generate(do_sample=True, top_k=0, temperature=1, top_p=1)`` -- plain multinomial
  sampling from one shared random stream, nothing else;
- **ehrmem**: ``HFCausalLM.sample`` -- the same rows, with every row drawn from its own seeded generator
  (so a trajectory never depends on the batch it ran in);
- **sample_prompts**: :func:`ehrmem.audits.generation.sample_prompts` over the same prompts (adds seeds per
  prompt, the sample cache, sorting by prompt length and the horizon cut), with an empty cache each time.

The batches are identical for the three: prompts sorted by length, ``generation_batch_size // M`` prompts per
call, each prompt repeated M times, left-padded. Early stopping is off on every side (no EOS), and the
generated tokens are counted from what each side returns, so all do exactly the same number of steps.
The machine may be shared, so the methods are interleaved (their order rotates every repeat) and the
figures are medians over ``--repeats``: throughput (new tokens per second) of each method and the ratio of
ehrmem to raw per repeat (goal: at least 0.8).

Usage::

    .venv/bin/python benchmarks/bench_generation.py [--n-prompts 12] [--repeats 5] [--threads 1]

Prints a table and writes ``benchmarks/results/bench_generation.json`` (``--json`` to change).
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
from transformers import GenerationConfig

from ehrmem.audits.base import AuditContext
from ehrmem.audits.generation import SamplingConfig, sample_prompts
from ehrmem.data.meds import SUBJECT_ID, load_meds
from ehrmem.data.prompts import Prompt, build_prompts, horizon_cut, prompt_seed
from ehrmem.data.tokenizer import EventTokenizer
from ehrmem.models.hf import HFCausalLM
from ehrmem.models.train import TrainConfig, build_model

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "mimic-iv-demo-meds"
DEFAULT_JSON = REPO / "benchmarks" / "results" / "bench_generation.json"
GOAL = 0.8
PURPOSE = "bench"


class CountingModel:
    """Passes everything to an :class:`HFCausalLM` and counts the tokens its ``sample`` returns."""

    def __init__(self, model: HFCausalLM) -> None:
        self._model = model
        self.tokens = 0

    def __getattr__(self, name: str):
        return getattr(self._model, name)

    def sample(self, prompts, **kwargs) -> list[list[np.ndarray]]:
        out = self._model.sample(prompts, **kwargs)
        self.tokens += sum(len(t) for p in out for t in p)
        return out


def left_padded_rows(prompts: list[Prompt], n_samples: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each prompt repeated ``n_samples`` times, left-padded: the rows ``HFCausalLM.sample`` builds."""
    seqs = [p.ids for p in prompts for _ in range(n_samples)]
    width = max(len(s) for s in seqs)
    ids = np.full((len(seqs), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for r, s in enumerate(seqs):
        ids[r, width - len(s) :] = s
        mask[r, width - len(s) :] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


@torch.inference_mode()
def run_raw(net, batches, gen_cfg: GenerationConfig) -> int:
    tokens = 0
    for ids, mask in batches:
        out = net.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg)
        tokens += out.shape[0] * (out.shape[1] - ids.shape[1])
    return tokens


def run_ehrmem(model: HFCausalLM, chunks, cfg: SamplingConfig, seed: int) -> tuple[int, list]:
    tokens = 0
    samples = []
    for chunk in chunks:
        out = model.sample(
            [p.ids for p in chunk],
            n_samples=cfg.n_samples,
            max_new_tokens=cfg.max_new_tokens,
            seeds=[prompt_seed(seed, p.subject_id, p.k_events, PURPOSE) for p in chunk],
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            batch_size=cfg.generation_batch_size,
        )
        tokens += sum(len(t) for p in out for t in p)
        samples += out
    return tokens, samples


def run_sample_prompts(context: AuditContext, prompts, cfg: SamplingConfig) -> tuple[int, dict]:
    context.sample_cache.clear()
    counter = context.model
    assert isinstance(counter, CountingModel)
    counter.tokens = 0
    out = sample_prompts(context, prompts, cfg, purpose=PURPOSE, desc="bench")
    return counter.tokens, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--context-length", type=int, default=512)
    ap.add_argument("--tier", type=int, default=20, help="prompt tier: timed events in each prompt")
    ap.add_argument("--n-prompts", type=int, default=12)
    ap.add_argument("--n-samples", type=int, default=SamplingConfig().n_samples, help="M, samples per prompt")
    ap.add_argument("--horizon-events", type=int, default=SamplingConfig().horizon_events)
    ap.add_argument("--generation-batch-size", type=int, default=SamplingConfig().generation_batch_size)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help=THREADS_HELP)
    ap.add_argument("--no-sample-prompts", action="store_true", help="skip the sample_prompts side")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON, help="write the figures here")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    cfg = SamplingConfig(
        n_samples=args.n_samples,
        horizon_events=args.horizon_events,
        generation_batch_size=args.generation_batch_size,
        temperature=args.temperature,
        top_p=args.top_p,
    )
    torch.manual_seed(0)
    ds = load_meds(args.data)
    train = ds.events.filter(pl.col(SUBJECT_ID).is_in(ds.subject_ids("train")))
    tok = EventTokenizer.fit(train)
    encoded = tok.encode(ds.events)
    pset = build_prompts(encoded, args.tier, context_length=args.context_length, horizon_tokens=cfg.max_new_tokens)
    prompts = pset.prompts[: args.n_prompts]
    if len(prompts) < args.n_prompts:
        raise SystemExit(f"only {len(prompts)} prompts at tier {args.tier}")
    tcfg = TrainConfig(context_length=args.context_length)
    net = build_model(tcfg, tok.vocab_size, tok.pad_id).eval()
    model = HFCausalLM(net, pad_id=tok.pad_id, device="cpu")
    n_params = sum(p.numel() for p in net.parameters())

    # The batches of sample_jobs: prompts sorted by length, generation_batch_size // M prompts per call.
    order = sorted(prompts, key=lambda p: len(p.ids))
    per_call = max(1, cfg.generation_batch_size // cfg.n_samples)
    chunks = [order[i : i + per_call] for i in range(0, len(order), per_call)]
    raw_batches = [left_padded_rows(c, cfg.n_samples, tok.pad_id) for c in chunks]
    n_rows = len(prompts) * cfg.n_samples
    expected_tokens = n_rows * cfg.max_new_tokens
    raw_cfg = GenerationConfig(
        do_sample=True,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=0,
        num_beams=1,
        max_new_tokens=cfg.max_new_tokens,
        min_new_tokens=0,
        pad_token_id=tok.pad_id,
        bos_token_id=None,
        eos_token_id=[],  # never stop early, as HFCausalLM.sample without a stop token
    )
    context = AuditContext(
        dataset=ds,
        model=CountingModel(model),  # type: ignore[arg-type]
        tokenizer=tok,
        cohort=None,  # type: ignore[arg-type]  # not used by sample_prompts
        encoded={},
        manifest=None,
        model_dir=None,
        seed=0,
    )
    prompt_lengths = [len(p.ids) for p in prompts]
    print(
        f"model: {tcfg.architecture} {tcfg.n_layer} layers x {tcfg.n_embd}, vocab {tok.vocab_size}, "
        f"{n_params / 1e6:.2f} M parameters, context {args.context_length}; torch threads "
        f"{torch.get_num_threads()}, {os.cpu_count()} CPUs"
    )
    print(
        f"workload: {len(prompts)} prompts (tier {args.tier}, {min(prompt_lengths)}-{max(prompt_lengths)} tokens) "
        f"x {cfg.n_samples} samples x {cfg.max_new_tokens} new tokens, {len(chunks)} generate calls of "
        f"<= {per_call * cfg.n_samples} rows; {expected_tokens} new tokens per method and repeat"
    )

    # warm-up
    torch.manual_seed(0)
    run_raw(net, raw_batches[:1], raw_cfg)
    run_ehrmem(model, chunks[:1], cfg, 0)

    methods = ["raw", "ehrmem"] + ([] if args.no_sample_prompts else ["sample_prompts"])
    seconds: dict[str, list[float]] = {m: [] for m in methods}
    tokens: dict[str, list[int]] = {m: [] for m in methods}
    same_as_sample_prompts = None
    for r in range(args.repeats):
        for m in methods[r % len(methods) :] + methods[: r % len(methods)]:
            start = time.perf_counter()
            if m == "raw":
                n = run_raw(net, raw_batches, raw_cfg)
            elif m == "ehrmem":
                n, ours = run_ehrmem(model, chunks, cfg, context.seed)
            else:
                n, via_audit = run_sample_prompts(context, prompts, cfg)
            seconds[m].append(time.perf_counter() - start)
            tokens[m].append(n)
        if r == 0 and not args.no_sample_prompts:
            # sample_prompts cuts each sample at the horizon; the generations themselves must be the same.
            flat = {(p.subject_id, p.k_events): s for p, s in zip(order, ours, strict=True)}
            same_as_sample_prompts = all(
                np.array_equal(horizon_cut(a, tok.token_kind, cfg.horizon_events), b)
                for key, cut in via_audit.items()
                for a, b in zip(flat[key], cut, strict=True)
            )
        print(f"  repeat {r + 1}/{args.repeats}: " + ", ".join(f"{m} {seconds[m][-1]:.2f} s" for m in methods))
    for m in methods:
        if any(n != expected_tokens for n in tokens[m]):
            raise SystemExit(f"{m} generated {tokens[m]} tokens, expected {expected_tokens} each repeat")

    tps = {m: expected_tokens / statistics.median(seconds[m]) for m in methods}
    ratio = {
        m: statistics.median(raw / s for raw, s in zip(seconds["raw"], seconds[m], strict=True))
        for m in methods
        if m != "raw"
    }
    res = {
        "benchmark": "bench_generation",
        "machine": machine_info(),
        "model": {
            "architecture": tcfg.architecture,
            "n_layer": tcfg.n_layer,
            "n_embd": tcfg.n_embd,
            "n_head": tcfg.n_head,
            "vocab_size": tok.vocab_size,
            "context_length": args.context_length,
            "n_parameters": n_params,
            "weights": "random init (torch.manual_seed(0))",
        },
        "workload": {
            "n_prompts": len(prompts),
            "tier": args.tier,
            "prompt_tokens_min_median_max": [
                min(prompt_lengths),
                float(np.median(prompt_lengths)),
                max(prompt_lengths),
            ],
            "n_samples": cfg.n_samples,
            "max_new_tokens": cfg.max_new_tokens,
            "generate_calls": len(chunks),
            "rows_per_call": [len(c) * cfg.n_samples for c in chunks],
            "temperature": cfg.temperature,
            "top_p": cfg.top_p,
            "raw_generate": "do_sample=True, top_k=0, no EOS stop",
            "new_tokens_per_method_per_repeat": expected_tokens,
        },
        "repeats": args.repeats,
        "seconds_per_repeat": seconds,
        "tokens_per_second_median": tps,
        "ratio_to_raw_median_of_repeats": ratio,
        "goal": GOAL,
        "sample_prompts_same_generations_as_hf_sample": same_as_sample_prompts,
    }
    print()
    print(f"{'method':<46} {'new tokens/s':>13} {'vs raw':>8}")
    names = {
        "raw": "raw generate(do_sample=True)",
        "ehrmem": "ehrmem HFCausalLM.sample (per-row seeds)",
        "sample_prompts": "ehrmem sample_prompts (audit path)",
    }
    for m in methods:
        rel = "1" if m == "raw" else f"{ratio[m]:.3f}"
        print(f"{names[m]:<46} {tps[m]:>13,.0f} {rel:>8}")
    print()
    print(
        f"HFCausalLM.sample / raw generate: {ratio['ehrmem']:.3f} (goal >= {GOAL}: "
        f"{'met' if ratio['ehrmem'] >= GOAL else 'NOT met'})"
    )
    if same_as_sample_prompts is not None:
        print(f"sample_prompts gave the same generations as HFCausalLM.sample: {same_as_sample_prompts}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

"""The Python API of ehrmem's main job: audit a model on a MEDS dataset and write the report.

>>> from ehrmem.api import run_audit                               # doctest: +SKIP
>>> report = run_audit("data/meds", "models/ref", "runs/audit1")   # doctest: +SKIP
>>> report["tests"]["T4"]["attacks"]["loss"]["auc"]                # doctest: +SKIP

Each test's result is written atomically under ``RUN/.stages/<test>/`` with a key over the data, the
model weights, the configuration and the ehrmem version; an interrupted audit rerun with the same inputs
resumes from the finished stages. ``report.json`` is written last, so a partial run never looks complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from ehrmem._version import __version__
from ehrmem.audits.base import Audit, AuditContext, Progress, TestResult, no_progress, skipped
from ehrmem.audits.controls import measure_controls
from ehrmem.audits.membership import MembershipAudit, verify_reference_model
from ehrmem.audits.patients import PatientsAudit
from ehrmem.audits.perturbation import PerturbationAudit
from ehrmem.audits.probing import ProbingAudit
from ehrmem.audits.reconstruction import ReconstructionAudit
from ehrmem.audits.sensitive import SensitiveAudit
from ehrmem.config import AuditConfig, load_config
from ehrmem.data.catalogue import load_catalogue
from ehrmem.data.cohort import build_cohort
from ehrmem.data.meds import SUBJECT_ID, load_meds
from ehrmem.data.tokenizer import EventTokenizer
from ehrmem.errors import InputError, ModelError
from ehrmem.models.hf import HFCausalLM, check_batch_invariance
from ehrmem.models.train import read_manifest
from ehrmem.risk import evaluate_gate, risk_matrix

logger = logging.getLogger(__name__)

TEST_IDS = ("T1", "T2", "T3", "T4", "T5", "T6")
TEST_TITLES = {
    "T1": "Reconstruction",
    "T2": "Sensitive attributes",
    "T3": "Embedding probes",
    "T4": "Membership inference",
    "T5": "Perturbation",
    "T6": "Patients and subgroups",
}
# Stages whose result reads earlier stages: their cache keys include those stages' settings too.
STAGE_DEPENDS = {"T5": ("T1", "T2"), "T6": ("T1", "T2", "T3", "T4"), "controls": ("T4",)}
NOT_BUILT = "not implemented in ehrmem {version}; this report makes no claim about it"


def hash_model_weights(model_dir: Path) -> str:
    h = hashlib.sha256()
    files = sorted(model_dir.glob("*.safetensors")) or sorted(
        p for p in model_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")
    )
    for fp in files:
        with open(fp, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _file_digest(h: Any, fp: Path) -> None:
    h.update(fp.name.encode())
    if fp.is_file():
        with open(fp, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)


def _inputs_digest(model_dir: Path, cfg: AuditConfig) -> str:
    """What a finished stage depends on besides the data, the weights and the settings: the model's
    vocabulary, tokenizer, configuration and training manifest (the membership labels), the contents of the
    catalogue files the settings name, and the reference model. A stage is reused only when all are unchanged."""
    h = hashlib.sha256()
    for name in ("config.json", "vocab.parquet", "tokenizer.json", "training_manifest.json"):
        _file_digest(h, model_dir / name)
    for fp in [cfg.T2.catalogue, *(cfg.T2.catalogue_extend or [])]:
        if fp is not None:
            _file_digest(h, Path(fp))
    ref = cfg.T4.reference_model
    if ref is not None and Path(ref).is_dir():
        h.update(hash_model_weights(Path(ref)).encode())
        _file_digest(h, Path(ref) / "training_manifest.json")
    return h.hexdigest()


def _check_vocabulary(model_dir: Path, tokenizer: EventTokenizer, manifest: dict | None) -> None:
    """The vocabulary table is the one the model was trained with (failure kind 13)."""
    if manifest is None:
        return
    size = manifest.get("vocab_size")
    if size is not None and int(size) != tokenizer.vocab_size:
        raise InputError(
            "The vocabulary table is not the one the model was trained with.",
            file=model_dir / "vocab.parquet",
            value=f"{tokenizer.vocab_size} tokens",
            expected=f"{size} tokens, as the training manifest records",
        )
    fingerprint = manifest.get("vocab_sha256")
    if fingerprint is not None and fingerprint != hashlib.sha256("\n".join(tokenizer.vocab).encode()).hexdigest():
        raise InputError(
            "The vocabulary table is not the one the model was trained with (same size, other tokens or order).",
            file=model_dir / "vocab.parquet",
            expected="the vocab.parquet written by `ehrmem train` with this model",
        )


def _atomic_write_text(fp: Path, text: str) -> None:
    tmp = fp.with_name(f".{fp.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, fp)


def _save_stage(stage_dir: Path, key: str, result: TestResult) -> None:
    tmp = stage_dir.with_name(f".{stage_dir.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for name, table in result.tables.items():
        table.write_parquet(tmp / f"{name}.parquet")
    payload = {
        "key": key,
        "test_id": result.test_id,
        "title": result.title,
        "status": result.status,
        "reason": result.reason,
        "section": result.section,
        "warnings": result.warnings,
    }
    (tmp / "stage.json").write_text(json.dumps(payload, default=_json_default))
    if stage_dir.exists():
        shutil.rmtree(stage_dir)
    os.replace(tmp, stage_dir)


def _load_stage(stage_dir: Path, key: str) -> TestResult | None:
    fp = stage_dir / "stage.json"
    if not fp.exists():
        return None
    payload = json.loads(fp.read_text())
    if payload.get("key") != key:
        return None
    tables = {p.stem: pl.read_parquet(p) for p in stage_dir.glob("*.parquet")}
    return TestResult(
        test_id=payload["test_id"],
        title=payload["title"],
        status=payload["status"],
        reason=payload["reason"],
        section=payload["section"],
        tables=tables,
        warnings=payload["warnings"],
    )


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def run_audit(
    data_dir: str | Path,
    model_dir: str | Path,
    out_dir: str | Path,
    config: AuditConfig | None = None,
    *,
    progress: Progress = no_progress,
    resume: bool = True,
) -> dict[str, Any]:
    """Audit the model in ``model_dir`` on the MEDS dataset in ``data_dir``; write the report to ``out_dir``.

    Returns the report as a dictionary (the content of ``report.json``).
    """
    from ehrmem.report.build import build_report
    from ehrmem.report.html import write_html

    cfg = config or load_config()
    t0 = time.perf_counter()
    started = datetime.now(UTC)
    out = Path(out_dir)
    model_dir = Path(model_dir)
    if out.exists() and not out.is_dir():
        raise InputError("The run directory is a file.", file=out, expected="a directory (new or an earlier run)")
    if not model_dir.is_dir():
        raise InputError("The model directory does not exist.", file=model_dir, expected="a model directory")

    dataset = load_meds(data_dir, value_column=cfg.value_column, split_source=cfg.split_source)
    tokenizer = EventTokenizer.load(model_dir)
    manifest = read_manifest(model_dir)
    _check_vocabulary(model_dir, tokenizer, manifest)
    model = HFCausalLM.from_pretrained(
        model_dir,
        pad_id=tokenizer.pad_id,
        device=cfg.device,
        allow_pickle=cfg.allow_pickle,
        n_tokens=tokenizer.vocab_size,
    )
    if tokenizer.vocab_size > model.vocab_size:
        raise InputError(
            "The vocabulary table has more tokens than the model's embedding table.",
            file=model_dir / "vocab.parquet",
            value=f"{tokenizer.vocab_size} tokens",
            expected=f"at most the model's vocab_size ({model.vocab_size})",
        )
    model_hash = hash_model_weights(model_dir)
    checks: dict[str, Any] = {}
    notes: list[str] = []
    if manifest is not None and manifest["dataset"]["data_hash"] != dataset.data_hash:
        notes.append(
            "The audited dataset differs from the one the model was trained on (data hashes differ); "
            "membership labels still come from the manifest's subject ids."
        )

    # Failure kind 13: the tokenizer's codes checked against the dataset's codes table.
    if dataset.codes is not None:
        code_tokens = [t for t, k in zip(tokenizer.vocab, tokenizer.token_kind, strict=True) if k == 1]
        known = set(dataset.codes["code"].to_list()) | set(dataset.events["code"].unique().to_list())
        missing = [c for c in code_tokens if c not in known]
        checks["vocab_codes_missing_from_data"] = {"count": len(missing), "examples": missing[:5]}
        if code_tokens and len(missing) > len(code_tokens) / 2:
            raise InputError(
                "Most of the model's code tokens appear nowhere in this dataset: the model was probably trained "
                "on another dataset, and membership labels read from its manifest would rest on ids that "
                "merely coincide.",
                file=dataset.root,
                value=f"{len(missing)} of {len(code_tokens)} code tokens absent, e.g. {missing[:3]}",
                expected="the dataset the model was trained on (or one coded the same way)",
            )
        if missing:
            notes.append(
                f"{len(missing)} of the model's {len(code_tokens)} code tokens appear neither in "
                "codes.parquet nor in the data; was the model trained on another dataset?"
            )

    cohort = build_cohort(
        dataset,
        manifest,
        membership=cfg.membership,
        member_splits=cfg.member_splits,
        nonmember_splits=cfg.nonmember_splits,
        match_length=cfg.match_length,
        max_ratio=cfg.max_match_ratio,
        balance=cfg.match_balance,
    )
    audited_ids = cohort.audited[SUBJECT_ID].to_list()
    encoded = {
        e.subject_id: e
        for e in tokenizer.encode(
            dataset.events.filter(pl.col(SUBJECT_ID).is_in(audited_ids)), max_events=4 * model.context_length
        )
    }
    split_of = dataset.split_of(audited_ids)
    checks["unknown_token_rate_by_split"] = {
        str(split): tokenizer.unknown_rate([encoded[s] for s in audited_ids if split_of[s] == split])
        for split in sorted({str(v) for v in split_of.values()})
    }

    context = AuditContext(
        dataset=dataset,
        model=model,
        tokenizer=tokenizer,
        cohort=cohort,
        encoded=encoded,
        manifest=manifest,
        model_dir=model_dir,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        progress=progress,
    )
    checks.update(_consistency_checks(context, audited_ids, cfg))
    if cfg.T4.enabled and cfg.T4.reference_model is not None:
        # Before hours of T1-T3: a reference that cannot be used is an input error now, not at T4.
        verify_reference_model(
            Path(cfg.T4.reference_model),
            tokenizer,
            set(cohort.audited.filter(pl.col("member") == 1)[SUBJECT_ID].to_list()),
        )
    for n in notes:
        logger.warning(n)

    # Every input is readable and consistent: only now is an earlier report in the run directory removed, so
    # a rerun that fails on its inputs loses nothing; from here on no old report stands beside a new run.
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("report.json", "report.html"):
        if (out / stale).exists():
            (out / stale).unlink()
    inputs_hash = _inputs_digest(model_dir, cfg)
    stages = out / ".stages"
    stages.mkdir(exist_ok=True)
    results: dict[str, TestResult] = {}
    builders = _builders(cfg)
    for test_id in TEST_IDS:
        entry = builders.get(test_id)
        if entry is None:
            results[test_id] = skipped(test_id, TEST_TITLES[test_id], NOT_BUILT.format(version=__version__))
            continue
        enabled, build = entry
        if not enabled:
            results[test_id] = skipped(test_id, TEST_TITLES[test_id], "disabled in the configuration")
            continue
        digest = cfg.stage_digest(test_id, STAGE_DEPENDS.get(test_id, ()))
        key = hashlib.sha256(
            f"{__version__}|{dataset.data_hash}|{model_hash}|{inputs_hash}|{digest}|{test_id}".encode()
        ).hexdigest()
        cached = _load_stage(stages / test_id, key) if resume else None
        if cached is not None:
            logger.info("%s: reusing the finished stage in %s", test_id, stages / test_id)
            results[test_id] = cached
        else:
            logger.info("%s %s", test_id, TEST_TITLES[test_id])
            t_start = time.perf_counter()
            results[test_id] = build(context).run().result
            results[test_id].section["elapsed_seconds"] = round(time.perf_counter() - t_start, 2)
            _save_stage(stages / test_id, key, results[test_id])
        context.previous[test_id] = results[test_id]

    controls, controls_table = _run_controls(context, cfg, stages, dataset.data_hash, f"{model_hash}|{inputs_hash}")
    if controls_table.height:
        controls_table.write_parquet(out / "controls_canaries.parquet")

    for r in results.values():
        for name, table in r.tables.items():
            table.write_parquet(out / f"{r.test_id}_{name}.parquet")
    provenance = {
        "ehrmem_version": __version__,
        "started_at": started.isoformat(),
        "finished_at": datetime.now(UTC).isoformat(),
        "elapsed_seconds": round(time.perf_counter() - t0, 2),
        "command": " ".join(sys.argv) if sys.argv and sys.argv[0].endswith("ehrmem") else None,
        "data": {
            "path": str(Path(data_dir).resolve()),
            "sha256": dataset.data_hash,
            "metadata": dataset.metadata,
        },
        "model": {
            "path": str(model_dir.resolve()),
            "weights_sha256": model_hash,
            "architecture": model.architecture,
            "context_length": model.context_length,
            "vocab_size": model.vocab_size,
            "training_manifest": manifest is not None,
            "trained_splits": manifest.get("trained_splits") if manifest else None,
            "training_seed": manifest["settings"]["seed"] if manifest else None,
        },
        "config": cfg.model_dump(mode="json"),
        "config_digest": cfg.digest(),
        "seed": cfg.seed,
        "versions": _versions(),
        "device": str(model.device),
    }
    report = build_report(
        results=results, cohort=cohort, checks=checks, notes=notes, provenance=provenance, controls=controls
    )
    report["risk"] = risk_matrix(report, load_catalogue(cfg.T2.catalogue, extend=cfg.T2.catalogue_extend or None))
    report["gate"] = evaluate_gate(report, cfg.gate)
    report["summary"]["gate"] = {"passed": report["gate"]["passed"], "verdict": report["gate"]["verdict"]}
    _atomic_write_text(out / "report.json", json.dumps(report, indent=1, default=_json_default))
    write_html(report, out)
    logger.info("Report written to %s", out / "report.html")
    return report


def _run_controls(
    context: AuditContext, cfg: AuditConfig, stages: Path, data_hash: str, model_hash: str
) -> tuple[dict[str, Any], pl.DataFrame]:
    """The canary controls, cached like a test stage."""
    digest = cfg.stage_digest("controls", STAGE_DEPENDS["controls"])
    key = hashlib.sha256(f"{__version__}|{data_hash}|{model_hash}|{digest}|controls".encode()).hexdigest()
    stage = stages / "controls"
    fp, tp = stage / "controls.json", stage / "canaries.parquet"
    if fp.exists() and tp.exists():
        payload = json.loads(fp.read_text())
        if payload.get("key") == key:
            return payload["section"], pl.read_parquet(tp)
    logger.info("Controls: canaries and twins")
    section, table = measure_controls(context, cfg.controls)
    tmp = stages / f".controls.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    table.write_parquet(tmp / "canaries.parquet")
    (tmp / "controls.json").write_text(json.dumps({"key": key, "section": section}, default=_json_default))
    if stage.exists():
        shutil.rmtree(stage)
    os.replace(tmp, stage)
    return section, table


def _builders(cfg: AuditConfig) -> dict[str, tuple[bool, Callable[[AuditContext], Audit]]]:
    """The tests this version runs, in order, with whether the configuration enables each."""
    return {
        "T1": (cfg.T1.enabled, lambda ctx: ReconstructionAudit(ctx, cfg.T1, cfg.sampling)),
        "T2": (cfg.T2.enabled, lambda ctx: SensitiveAudit(ctx, cfg.T2, cfg.sampling)),
        "T3": (cfg.T3.enabled, lambda ctx: ProbingAudit(ctx, cfg.T3)),
        "T4": (cfg.T4.enabled, lambda ctx: MembershipAudit(ctx, cfg.T4)),
        "T5": (cfg.T5.enabled, lambda ctx: PerturbationAudit(ctx, cfg.T5, cfg.sampling)),
        "T6": (cfg.T6.enabled, lambda ctx: PatientsAudit(ctx, cfg.T6)),
    }


def _consistency_checks(context: AuditContext, audited_ids: list[int], cfg: AuditConfig) -> dict[str, Any]:
    """Failure kinds 8 and 9 on a sample: token shift against the model's own loss, batched vs single."""
    if cfg.check_sample == 0:
        return {"batch_invariance": "not checked (check_sample=0)"}
    model = context.model
    limit = model.context_length
    sample = [context.encoded[s].ids[:limit] for s in audited_ids[: cfg.check_sample]]
    out: dict[str, Any] = {}
    if isinstance(model, HFCausalLM):
        out["loss_alignment_max_abs_diff"] = max(model.check_loss_alignment(s) for s in sample[:2])
    try:
        out["batch_invariance_max_abs_diff"] = check_batch_invariance(model, sample, batch_size=len(sample))
        out["embedding_batch_invariance_max_abs_diff"] = check_batch_invariance(
            model, sample, batch_size=len(sample), what="embeddings"
        )
    except ModelError:
        raise
    return out


def _versions() -> dict[str, str]:
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "polars": pl.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
    }

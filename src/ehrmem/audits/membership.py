"""T4 membership inference: can an attacker tell that a patient was in the training set?

One teacher-forced forward pass per sequence gives per-token log-probabilities; every score below is a
function of them. Convention: higher score = more likely a member (failure kind 3).

- ``loss``: mean token log-probability (minus the loss).
- ``min_k``: mean of the lowest k% token log-probabilities (Min-K%, Shi et al. 2024).
- ``min_k_pp``: Min-K%++ (Zhang et al. 2025): the same over log-probabilities standardised by the mean
  and standard deviation of the model's own next-token distribution.
- ``ref_ngram``: mean log-probability minus that of a population bigram model fitted on subjects that
  are never audited and never trained on (the reference split).
- ``ref_model``: mean log-probability minus that of a reference model trained on non-member data, when
  one is given; verified through its training manifest before use (failure kind 7).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Annotated, Any, ClassVar, cast

import numpy as np
import polars as pl
from pydantic import BaseModel, ConfigDict, Field

from ehrmem.audits.base import Audit, AuditContext, TestResult, score_in_chunks
from ehrmem.audits.masking import MASKING_DESCRIPTION, MaskingConfig, masking_variance_scores
from ehrmem.data.meds import SUBJECT_ID
from ehrmem.data.tokenizer import EventTokenizer
from ehrmem.errors import InputError, NumericalError
from ehrmem.models.ngram import BigramReference
from ehrmem.models.protocol import TokenScores
from ehrmem.stats import auc_summary, tpr_at_fpr

logger = logging.getLogger(__name__)

#: Confidence of the simultaneous intervals over all evaluated attacks (each gets 1 - 0.05 / m).
FAMILY_CONFIDENCE = 0.95

ATTACK_DESCRIPTIONS = {
    "loss": "mean token log-probability under the audited model",
    "min_k": "mean of the lowest {k:.0%} token log-probabilities (Min-K%)",
    "min_k_pp": "Min-K%++: lowest {k:.0%} of log-probabilities standardised by the model's next-token distribution",
    "ref_ngram": "log-probability calibrated by a population bigram model fitted on the reference split",
    "ref_model": "log-probability calibrated by a reference model trained on non-member data",
    "masking": MASKING_DESCRIPTION,
}


class MembershipConfig(BaseModel):
    """Settings of T4."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    min_k_fraction: float = Field(0.2, gt=0, le=1)
    target_fprs: list[Annotated[float, Field(gt=0, lt=1)]] = Field(default_factory=lambda: [0.01, 0.001], min_length=1)
    n_bootstrap: int = Field(1000, ge=100)
    min_per_class: int = Field(5, ge=2, description="fewest members and non-members for a reported AUC")
    max_tokens: int | None = Field(None, ge=2, description="tokens scored per subject (default: context window)")
    reference_split: str | None = Field("tuning", description="split the n-gram reference is fitted on")
    reference_model: Path | None = None
    allow_nonfinite: bool = Field(False, description="drop subjects with non-finite scores instead of failing")
    masking: MaskingConfig = Field(default_factory=MaskingConfig)


def claim_interval(attack: dict) -> list:
    """The AUC interval a claim about the strongest attack must read: simultaneous over the attacks
    (``auc_ci_familywise``), or the attack's own 95% interval in reports written before it existed."""
    return attack.get("auc_ci_familywise") or attack["auc_ci95"]


def min_k(logprob: np.ndarray, fraction: float) -> float:
    """Mean of the lowest ``fraction`` of the values (at least one)."""
    k = max(1, int(np.ceil(fraction * logprob.size)))
    return float(np.mean(np.partition(logprob, k - 1)[:k]))


def attack_scores(ts: TokenScores, min_k_fraction: float) -> dict[str, float]:
    """The reference-free scores of one sequence."""
    z = (ts.logprob - ts.mean) / np.maximum(ts.std, 1e-8)
    return {
        "loss": float(np.mean(ts.logprob)),
        "min_k": min_k(ts.logprob, min_k_fraction),
        "min_k_pp": min_k(z, min_k_fraction),
    }


def evaluate_attack(labels: np.ndarray, scores: np.ndarray, cfg: MembershipConfig, seed: int) -> dict[str, Any]:
    """AUC with bootstrap interval, advantage, and TPR at each target FPR (refused when unresolvable)."""
    summary = auc_summary(labels, scores, n_boot=cfg.n_bootstrap, seed=seed, min_per_class=cfg.min_per_class)
    tprs: dict[str, Any] = {}
    refused: dict[str, str] = {}
    for target in cfg.target_fprs:
        r = tpr_at_fpr(labels, scores, target)
        key = f"{target:g}"
        if r["status"] == "ok":
            tprs[key] = {
                "tpr": r["tpr"],
                "tpr_ci95": r.get("tpr_ci95"),
                "achieved_fpr": r["achieved_fpr"],
                "threshold": r["threshold"],
                "n_nonmembers": r["n_neg"],
            }
        else:
            tprs[key] = None
            refused[key] = r["reason"]
    return {
        "status": summary["status"],
        "reason": summary["reason"],
        "auc": summary["auc"],
        "auc_ci95": summary["auc_ci95"],
        "advantage": summary["advantage"],
        "tpr_at_fpr": tprs,
        "tpr_at_fpr_refused": refused,
        "n_members": summary["n_pos"],
        "n_nonmembers": summary["n_neg"],
    }


def verify_reference_model(ref_dir: Path, tokenizer: EventTokenizer, members: set[int]) -> dict:
    """Failure kind 7: the calibration reference exists, says what it was trained on, saw none of the
    audited members and shares the audited model's vocabulary. Returns its training manifest."""
    from ehrmem.models.train import read_manifest

    if not ref_dir.is_dir():
        raise InputError("The reference model does not exist.", file=ref_dir, expected="a model directory")
    manifest = read_manifest(ref_dir)
    if manifest is None:
        raise InputError(
            "The reference model has no training manifest, so ehrmem cannot verify that it never saw the members.",
            file=ref_dir / "training_manifest.json",
            expected="a reference trained with `ehrmem train` on non-member data",
        )
    clash = {int(s) for s in manifest["trained_subjects"]} & members
    if clash:
        raise InputError(
            "The reference model was trained on audited members.",
            file=ref_dir / "training_manifest.json",
            column="trained_subjects",
            value=f"{len(clash)} members, e.g. {sorted(clash)[:5]}",
            expected="a reference trained only on non-member data",
        )
    if EventTokenizer.load(ref_dir).vocab != tokenizer.vocab:
        raise InputError(
            "The reference model's vocabulary differs from the audited model's.",
            file=ref_dir / "vocab.parquet",
            expected="the same vocabulary table: train the reference with `ehrmem train ... --vocab-from MODEL`",
        )
    return manifest


def _weights_hash(model_dir: Path) -> str:
    h = hashlib.sha256()
    for fp in sorted(model_dir.glob("*.safetensors")):
        h.update(fp.read_bytes())
    return h.hexdigest()


class MembershipAudit(Audit):
    """T4: membership inference from per-token log-probabilities."""

    test_id: ClassVar[str] = "T4"
    title: ClassVar[str] = "Membership inference"

    def __init__(self, context: AuditContext, config: MembershipConfig | None = None) -> None:
        super().__init__(context)
        self.config = config or MembershipConfig()

    def _sequences(self, subject_ids: list[int]) -> list[np.ndarray]:
        ctx = self.context
        limit = min(self.config.max_tokens or ctx.model.context_length, ctx.model.context_length)
        return [ctx.encoded[s].ids[:limit] for s in subject_ids]

    def _run(self) -> TestResult:
        ctx, cfg = self.context, self.config
        result = TestResult(test_id=self.test_id, title=self.title, status="ok")
        cohort = ctx.cohort.audited
        ids = cohort[SUBJECT_ID].to_list()
        labels = cohort["member"].to_numpy().astype(np.int8)
        seqs = self._sequences(ids)
        scores = score_in_chunks(ctx, seqs, "T4 scoring")

        # Failure kind 2: impossible tokens or NaN would silently become extreme scores.
        bad = [
            (s, int((~np.isfinite(t.logprob)).sum()))
            for s, t in zip(ids, scores, strict=True)
            if not np.all(np.isfinite(t.logprob))
        ]
        if bad:
            msg = f"{len(bad)} subjects have non-finite token log-probabilities (subject: count) {bad[:10]}"
            if not cfg.allow_nonfinite:
                raise NumericalError(
                    msg + ". Membership scores would be corrupted. Check the model's dtype and "
                    "vocabulary, or pass allow_nonfinite to drop these subjects."
                )
            result.warn(msg + "; these subjects were dropped from T4.")
            keep = {s for s, _ in bad}
            mask = np.array([s not in keep for s in ids])
            ids = [s for s, m in zip(ids, mask, strict=True) if m]
            labels, seqs = labels[mask], [q for q, m in zip(seqs, mask, strict=True) if m]
            scores = [t for t, m in zip(scores, mask, strict=True) if m]

        rows = [attack_scores(t, cfg.min_k_fraction) for t in scores]
        table = pl.DataFrame(
            {
                SUBJECT_ID: ids,
                "member": labels,
                "n_tokens_scored": [len(q) for q in seqs],
                **{a: [r[a] for r in rows] for a in ("loss", "min_k", "min_k_pp")},
            }
        ).join(cohort.select(SUBJECT_ID, "split", "n_events"), on=SUBJECT_ID, how="left")
        target_mean = np.array([r["loss"] for r in rows])
        unk = ctx.tokenizer.unk_id
        table = table.with_columns(pl.Series("unk_rate", [float(np.mean(q == unk)) for q in seqs]))

        attacks: dict[str, Any] = {}
        inputs: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # labels and scores of each attack
        for name in ("loss", "min_k", "min_k_pp"):
            inputs[name] = (labels, table[name].to_numpy())
            attacks[name] = evaluate_attack(labels, table[name].to_numpy(), cfg, ctx.seed)
            attacks[name]["description"] = ATTACK_DESCRIPTIONS[name].format(k=cfg.min_k_fraction)

        ref_table, ref_info = self._ngram_reference(ids, labels, seqs, target_mean, result)
        if ref_table is not None:
            table = table.join(ref_table, on=SUBJECT_ID, how="left")
            sub = table.filter(pl.col("ref_ngram").is_not_null())
            inputs["ref_ngram"] = (sub["member"].to_numpy(), sub["ref_ngram"].to_numpy())
            attacks["ref_ngram"] = evaluate_attack(sub["member"].to_numpy(), sub["ref_ngram"].to_numpy(), cfg, ctx.seed)
            attacks["ref_ngram"].update(description=ATTACK_DESCRIPTIONS["ref_ngram"], reference=ref_info)
        if cfg.reference_model is not None:
            ref_model_table, info = self._model_reference(ids, labels, seqs, target_mean)
            table = table.join(ref_model_table, on=SUBJECT_ID, how="left")
            sub = table.filter(pl.col("ref_model").is_not_null())
            inputs["ref_model"] = (sub["member"].to_numpy(), sub["ref_model"].to_numpy())
            attacks["ref_model"] = evaluate_attack(sub["member"].to_numpy(), sub["ref_model"].to_numpy(), cfg, ctx.seed)
            attacks["ref_model"].update(description=ATTACK_DESCRIPTIONS["ref_model"], reference=info)

        if cfg.masking.enabled:
            kinds = ctx.tokenizer.token_kind
            maskable = [i for i, q in enumerate(seqs) if np.any(kinds[np.asarray(q)] != 0)]
            if len(maskable) < len(seqs):
                result.warn(
                    f"{len(seqs) - len(maskable)} subjects have no maskable token and are left out of the "
                    "masking-variance attack."
                )
            mv = masking_variance_scores(ctx, [ids[i] for i in maskable], [seqs[i] for i in maskable], cfg.masking)
            table = table.join(
                pl.DataFrame({SUBJECT_ID: [ids[i] for i in maskable], "masking": mv}), on=SUBJECT_ID, how="left"
            )
            inputs["masking"] = (labels[maskable], mv)
            attacks["masking"] = evaluate_attack(labels[maskable], mv, cfg, ctx.seed)
            attacks["masking"].update(
                description=ATTACK_DESCRIPTIONS["masking"].format(
                    repeats=cfg.masking.repeats, fraction=cfg.masking.mask_fraction
                ),
                repeats=cfg.masking.repeats,
                mask_fraction=cfg.masking.mask_fraction,
                pooling=cfg.masking.pooling,
            )

        defined = {k: v for k, v in attacks.items() if v["status"] == "ok"}
        # The strongest of several attacks is a selected maximum: its claims rest on simultaneous intervals
        # (Bonferroni over the evaluated attacks), so picking the best of m does not inflate the evidence.
        familywise = 1.0 - (1.0 - FAMILY_CONFIDENCE) / max(1, len(defined))
        for name in defined:
            y, sc = inputs[name]
            fw = auc_summary(
                y, sc, n_boot=cfg.n_bootstrap, seed=ctx.seed, min_per_class=cfg.min_per_class, confidence=familywise
            )
            attacks[name]["auc_ci_familywise"] = fw["auc_ci95"]
        best = max(defined, key=lambda k: defined[k]["auc_ci_familywise"][0]) if defined else None
        baselines = self._baselines(table, cfg, ctx.seed)
        for name, b in baselines.items():
            if b["status"] == "ok" and not (b["auc_ci95"][0] <= 0.5 <= b["auc_ci95"][1]):
                result.warn(
                    f"The trivial baseline {name} ({b['description']}) separates members from non-members: AUC "
                    f"{b['auc']:.3f} [{b['auc_ci95'][0]:.3f}, {b['auc_ci95'][1]:.3f}]. The membership attacks' AUCs "
                    "partly reflect it; compare them with this baseline."
                )
        for name, a in attacks.items():
            if a["status"] != "ok":
                result.warn(f"attack {name}: {a['reason']}")
        refused = sorted({k for a in attacks.values() for k in a["tpr_at_fpr_refused"]})
        if refused:
            result.warn(
                f"TPR at FPR {', '.join(refused)} refused: too few non-members to resolve that rate "
                f"({cohort.height - int(labels.sum())} audited)."
            )
        unk_m = float(cast("float | None", table.filter(pl.col("member") == 1)["unk_rate"].mean()) or 0.0)
        unk_n = float(cast("float | None", table.filter(pl.col("member") == 0)["unk_rate"].mean()) or 0.0)
        if unk_n > 2 * unk_m + 0.01:
            result.warn(
                f"Non-members have more unknown tokens than members ({unk_n:.3f} vs {unk_m:.3f} of scored tokens). "
                "Codes the model never saw lower non-members' scores, which inflates membership AUC; see the "
                "vocabulary's min_code_subjects."
            )
        result.section = {
            "n_members": int(labels.sum()),
            "n_nonmembers": int(len(labels) - labels.sum()),
            "label_source": ctx.cohort.label_source,
            "tokens_scored_per_subject": {
                "max": int(max(len(q) for q in seqs)),
                "median": float(np.median([len(q) for q in seqs])),
            },
            "unknown_token_rate": {"members": unk_m, "nonmembers": unk_n},
            "attacks": attacks,
            "best_attack": best,
            "familywise": {
                "method": f"Bonferroni over the {len(defined)} evaluated attacks",
                "confidence": familywise,
                "note": "best_attack and the claims built on it (headline, risk, gate) use these simultaneous "
                "intervals (auc_ci_familywise); auc_ci95 is each attack's own 95% interval",
            },
            "baselines": baselines,
            "settings": cfg.model_dump(mode="json"),
        }
        if best is None:
            result.status = "undefined"
            result.reason = "no attack could be evaluated: " + "; ".join(a["reason"] or "" for a in attacks.values())
        else:
            b = attacks[best]
            lo, hi = b["auc_ci_familywise"]
            result.reason = (
                f"best attack {best}: AUC {b['auc']:.3f} [{lo:.3f}, {hi:.3f}] (95% simultaneous over "
                f"{len(defined)} attacks, each interval at {familywise:.1%})"
            )
        result.tables["membership_scores"] = table
        return result

    @staticmethod
    def _baselines(table: pl.DataFrame, cfg: MembershipConfig, seed: int) -> dict[str, Any]:
        """Scores any attacker has without the model's probabilities: if they separate the groups, so does
        everything built on top of them. Higher = more likely member, as for the attacks."""
        y = table["member"].to_numpy()
        out = {}
        for name, scores, what in (
            ("record_length", table["n_events"].to_numpy().astype(float), "number of timed events in the record"),
            ("unknown_rate", -table["unk_rate"].to_numpy(), "minus the share of scored tokens that are [UNK]"),
        ):
            s = auc_summary(y, scores, n_boot=cfg.n_bootstrap, seed=seed, min_per_class=cfg.min_per_class)
            out[name] = {k: s[k] for k in ("status", "reason", "auc", "auc_ci95", "n_pos", "n_neg")} | {
                "description": what
            }
        return out

    # ------------------------------------------------------------------ references
    def _ngram_reference(
        self,
        ids: list[int],
        labels: np.ndarray,
        seqs: list[np.ndarray],
        target_mean: np.ndarray,
        result: TestResult,
    ) -> tuple[pl.DataFrame | None, dict | None]:
        ctx, cfg = self.context, self.config
        if cfg.reference_split is None:
            return None, None
        ds = ctx.dataset
        if ds.splits is None:
            result.warn("No splits: the n-gram reference cannot be fitted, so ref_ngram is skipped.")
            return None, None
        ref_ids = ds.subject_ids(cfg.reference_split)
        members = {s for s, y in zip(ids, labels, strict=True) if y == 1}
        clash = set(ref_ids) & members
        if clash:
            # Failure kind 7: a reference that saw members calibrates the membership signal away.
            raise InputError(
                "The n-gram reference split holds subjects the audited model was trained on or that are audited "
                "as members.",
                column="split",
                value=f"{cfg.reference_split}: {len(clash)} such subjects, e.g. {sorted(clash)[:5]}",
                expected="a split disjoint from the members (set reference_split to another split, or None)",
            )
        if not ref_ids:
            result.warn(f"The reference split {cfg.reference_split!r} is empty; ref_ngram is skipped.")
            return None, None
        limit = len(seqs[0]) if seqs else 0
        ref_enc = ctx.tokenizer.encode(ds.events.filter(pl.col(SUBJECT_ID).is_in(ref_ids)))
        limit = max(len(q) for q in seqs)
        ref = BigramReference(ctx.tokenizer.vocab_size).fit([e.ids[:limit] for e in ref_enc])
        ref_set = set(ref_ids)
        rows = [
            (s, float(t - np.mean(ref.token_logprobs(q))))
            for s, q, t in zip(ids, seqs, target_mean, strict=True)
            if s not in ref_set
        ]
        info = {
            "kind": "population bigram",
            "split": cfg.reference_split,
            "n_subjects": len(ref_ids),
            "excluded_from_attack": len(ref_set & set(ids)),
        }
        return pl.DataFrame(rows, schema={SUBJECT_ID: pl.Int64, "ref_ngram": pl.Float64}, orient="row"), info

    def _model_reference(
        self, ids: list[int], labels: np.ndarray, seqs: list[np.ndarray], target_mean: np.ndarray
    ) -> tuple[pl.DataFrame, dict]:
        from ehrmem.models.hf import HFCausalLM

        ctx, cfg = self.context, self.config
        ref_dir = Path(cfg.reference_model)  # type: ignore[arg-type]
        members = {s for s, y in zip(ids, labels, strict=True) if y == 1}
        manifest = verify_reference_model(ref_dir, ctx.tokenizer, members)
        ref_trained = {int(s) for s in manifest["trained_subjects"]}
        ref = HFCausalLM.from_pretrained(ref_dir, pad_id=ctx.tokenizer.pad_id)
        keep = [i for i, s in enumerate(ids) if s not in ref_trained]
        ref_scores = ref.token_scores([seqs[i] for i in keep], batch_size=ctx.batch_size)
        rows = [(ids[i], float(target_mean[i] - np.mean(t.logprob))) for i, t in zip(keep, ref_scores, strict=True)]
        info = {
            "kind": "reference model",
            "path": str(ref_dir),
            "weights_sha256": _weights_hash(ref_dir),
            "trained_splits": manifest.get("trained_splits"),
            "n_trained_subjects": len(ref_trained),
            "excluded_from_attack": len(ids) - len(keep),
        }
        return pl.DataFrame(rows, schema={SUBJECT_ID: pl.Int64, "ref_model": pl.Float64}, orient="row"), info

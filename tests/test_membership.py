"""T4 on stand-in models with known answers, and on a tiny real model."""

from __future__ import annotations

import re

import numpy as np
import polars as pl
import pytest

from ehrmem.audits.base import AuditContext
from ehrmem.audits.masking import MaskingConfig
from ehrmem.audits.membership import MembershipAudit, MembershipConfig, attack_scores, min_k
from ehrmem.data.cohort import build_cohort
from ehrmem.data.meds import load_meds
from ehrmem.data.tokenizer import EventTokenizer
from ehrmem.errors import NumericalError, ResultsNotReadyError
from ehrmem.models.protocol import TokenScores

# The oracle stand-in scores tokens but has no embeddings, so the embedding (masking) attack is off.
NO_MASKING = MaskingConfig(enabled=False)


class OracleModel:
    """Scores members' tokens higher than non-members' (or the reverse), by a fixed margin."""

    context_length = 10_000
    vocab_size = 100_000

    def __init__(self, members: set[bytes], margin: float = 1.0, nonfinite: set[bytes] = frozenset()) -> None:
        self.members, self.margin, self.nonfinite = members, margin, nonfinite

    def token_scores(self, sequences, *, batch_size=16):
        out = []
        for s in sequences:
            key = np.asarray(s).tobytes()
            lp = np.full(len(s) - 1, -3.0 + (self.margin if key in self.members else 0.0))
            if key in self.nonfinite:
                lp[0] = -np.inf
            out.append(TokenScores(logprob=lp, mean=np.full_like(lp, -3.0), std=np.ones_like(lp)))
        return out


def _context(data_dir, model, *, membership="splits"):
    ds = load_meds(data_dir)
    train = ds.events.filter(pl.col("subject_id").is_in(ds.subject_ids("train")))
    tok = EventTokenizer.fit(train, min_code_subjects=1)
    cohort = build_cohort(
        ds,
        None,
        membership=membership,
        member_splits=["train"],
        nonmember_splits=["held_out"],
        match_length=False,
    )
    encoded = {e.subject_id: e for e in tok.encode(ds.events)}
    return (
        AuditContext(
            dataset=ds,
            model=model,
            tokenizer=tok,
            cohort=cohort,
            encoded=encoded,
            manifest=None,
            model_dir=None,
        ),
        cohort,
        encoded,
    )


def _keys(cohort, encoded, member: int) -> set[bytes]:
    ids = cohort.audited.filter(pl.col("member") == member)["subject_id"].to_list()
    return {encoded[s].ids.tobytes() for s in ids}


def test_min_k_takes_lowest_fraction():
    assert min_k(np.array([0.0, -1.0, -2.0, -3.0, -4.0]), 0.4) == pytest.approx(-3.5)
    assert min_k(np.array([-1.0]), 0.2) == -1.0


def test_result_before_run_raises(tiny_meds):
    ctx, _, _ = _context(tiny_meds, OracleModel(set()))
    with pytest.raises(ResultsNotReadyError):
        _ = MembershipAudit(ctx).result


@pytest.mark.parametrize("margin, expected", [(1.0, 1.0), (-1.0, 0.0)])
def test_oracle_polarity(tmp_path, margin, expected):
    """Failure kind 3: an oracle score gives AUC 1; its negation gives AUC 0."""
    from conftest import write_meds

    data = write_meds(tmp_path / "m", n_subjects=40, splits={"train": 0.5, "tuning": 0.0, "held_out": 0.5})
    ctx, cohort, encoded = _context(data, OracleModel(set()))
    ctx.model = OracleModel(_keys(cohort, encoded, 1), margin=margin)
    cfg = MembershipConfig(masking=NO_MASKING, reference_split=None, n_bootstrap=200, min_per_class=2)
    res = MembershipAudit(ctx, cfg).run().result
    assert res.status == "ok"
    for name in ("loss", "min_k", "min_k_pp"):
        assert res.section["attacks"][name]["auc"] == pytest.approx(expected)
    table = res.tables["membership_scores"]
    assert set(table["member"].unique().to_list()) == {0, 1}
    assert table.height == cohort.audited.height


def test_low_fpr_is_refused_with_reason(tmp_path):
    """Failure kind 6: fewer than 1/FPR non-members -> null with the reason, not a number."""
    from conftest import write_meds

    data = write_meds(tmp_path / "m", n_subjects=30)
    ctx, cohort, encoded = _context(data, OracleModel(set()))
    ctx.model = OracleModel(_keys(cohort, encoded, 1))
    res = (
        MembershipAudit(
            ctx, MembershipConfig(masking=NO_MASKING, reference_split=None, n_bootstrap=200, min_per_class=2)
        )
        .run()
        .result
    )
    loss = res.section["attacks"]["loss"]
    assert loss["tpr_at_fpr"]["0.01"] is None
    assert "100" in loss["tpr_at_fpr_refused"]["0.01"]
    assert any("refused" in w for w in res.warnings)


def test_too_few_per_class_is_undefined_not_half(tmp_path):
    """Failure kind 1: below the minimum group size the AUC is undefined with the counts, never 0.5."""
    from conftest import write_meds

    data = write_meds(tmp_path / "m", n_subjects=12)
    ctx, cohort, encoded = _context(data, OracleModel(set()))
    ctx.model = OracleModel(_keys(cohort, encoded, 1))
    res = (
        MembershipAudit(
            ctx, MembershipConfig(masking=NO_MASKING, reference_split=None, min_per_class=50, n_bootstrap=200)
        )
        .run()
        .result
    )
    assert res.status == "undefined"
    for a in res.section["attacks"].values():
        assert a["auc"] is None and a["status"] == "undefined"
        assert "50" in a["reason"]


def test_nonfinite_scores_fail_naming_subjects(tmp_path):
    """Failure kind 2: -inf log-probabilities abort by default and name the subject; opt-in drops them."""
    from conftest import write_meds

    data = write_meds(tmp_path / "m", n_subjects=30)
    ctx, cohort, encoded = _context(data, OracleModel(set()))
    victim = cohort.audited["subject_id"][0]
    ctx.model = OracleModel(_keys(cohort, encoded, 1), nonfinite={encoded[victim].ids.tobytes()})
    with pytest.raises(NumericalError, match=str(victim)):
        MembershipAudit(ctx, MembershipConfig(masking=NO_MASKING, reference_split=None, n_bootstrap=200)).run()
    cfg = MembershipConfig(
        masking=NO_MASKING, reference_split=None, n_bootstrap=200, allow_nonfinite=True, min_per_class=2
    )
    res = MembershipAudit(ctx, cfg).run().result
    assert victim not in res.tables["membership_scores"]["subject_id"].to_list()
    assert any(str(victim) in w for w in res.warnings)


def test_min_k_pp_standardises_by_model_distribution():
    ts = TokenScores(
        logprob=np.array([-1.0, -2.0, -6.0]), mean=np.array([-1.0, -1.0, -2.0]), std=np.array([1.0, 1.0, 2.0])
    )
    s = attack_scores(ts, 0.34)
    assert s["loss"] == pytest.approx(-3.0)
    assert s["min_k"] == pytest.approx(-4.0)
    assert s["min_k_pp"] == pytest.approx(-1.5)  # z = [0, -1, -2], lowest two


def test_reference_split_that_saw_members_is_rejected(tmp_path):
    """Failure kind 7: a calibration reference fitted on members is an error, not a quiet miscalibration."""
    from conftest import write_meds
    from ehrmem.errors import InputError

    data = write_meds(tmp_path / "m", n_subjects=30)
    ctx, cohort, encoded = _context(data, OracleModel(set()))
    ctx.model = OracleModel(_keys(cohort, encoded, 1))
    with pytest.raises(InputError, match="reference"):
        MembershipAudit(ctx, MembershipConfig(masking=NO_MASKING, reference_split="train", n_bootstrap=200)).run()


def test_real_tiny_model_end_to_end(tiny_model_dir):
    from ehrmem.api import run_audit
    from ehrmem.config import AuditConfig, MembershipConfig

    data, model = tiny_model_dir
    out = model.parent / "run"
    report = run_audit(data, model, out, AuditConfig(T4=MembershipConfig(n_bootstrap=200, min_per_class=2)))
    t4 = report["tests"]["T4"]
    assert t4["status"] == "ok"
    for name in ("loss", "min_k", "min_k_pp", "ref_ngram"):
        a = t4["attacks"][name]
        assert 0.0 <= a["auc"] <= 1.0 and a["auc_ci95"][0] <= a["auc"] <= a["auc_ci95"][1]
        assert set(a["tpr_at_fpr"]) == {"0.01", "0.001"}
    # ref_ngram excludes the reference split (tuning) from its non-members.
    assert t4["attacks"]["ref_ngram"]["n_nonmembers"] < t4["attacks"]["loss"]["n_nonmembers"]
    assert set(report["tests"]) == {"T1", "T2", "T3", "T4", "T5", "T6"}
    assert all(report["tests"][t]["status"] in ("ok", "skipped", "undefined") for t in report["tests"])
    assert report["checks"]["loss_alignment_max_abs_diff"] < 1e-4
    scores = pl.read_parquet(out / "T4_membership_scores.parquet")
    assert scores["subject_id"].dtype == pl.Int64 and scores["subject_id"].is_unique().all()
    html = (out / "report.html").read_text()
    assert "<svg" in html and "Limitations" in html
    # Self-contained: nothing is loaded from the network when the page is opened offline.
    assert not re.search(r"""(src|href)\s*=\s*["']https?://""", html)

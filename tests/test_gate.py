"""The release gate and the risk matrix on report.json dictionaries built from the audits' own section code."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest

from ehrmem.audits.base import TestResult as Result
from ehrmem.audits.membership import MembershipConfig, evaluate_attack
from ehrmem.audits.reconstruction import ReconstructionAudit, ReconstructionConfig, holm
from ehrmem.audits.sensitive import SensitiveConfig, _group_metrics
from ehrmem.data.catalogue import default_catalogue
from ehrmem.data.cohort import Cohort
from ehrmem.data.prompts import PromptSet, tier_name
from ehrmem.report.build import build_report
from ehrmem.risk import GateThresholds, evaluate_gate, risk_matrix
from ehrmem.stats import auc_comparison

N_BOOT = 100


def _t4(rng, signal: float, n: int = 300) -> Result:
    labels = np.repeat([1, 0], n).astype(np.int8)
    scores = rng.normal(size=2 * n) + signal * labels
    attack = evaluate_attack(labels, scores, MembershipConfig(n_bootstrap=N_BOOT), seed=0)
    best = "loss" if attack["status"] == "ok" else None
    return Result(
        "T4",
        "Membership inference",
        "ok" if best else "undefined",
        "stand-in",
        section={"attacks": {"loss": attack}, "best_attack": best, "n_members": n, "n_nonmembers": n},
    )


def _t1(rng, lift_by_tier: dict[int, float], n: int = 40) -> Result:
    """T1 tiers from the audit's own summary code; members' distances lowered by the given lift per tier."""
    cfg = ReconstructionConfig(n_bootstrap=N_BOOT, tiers=list(lift_by_tier))
    fake = SimpleNamespace(config=cfg)
    tiers = []
    for i, (k, lift) in enumerate(lift_by_tier.items()):
        member = np.repeat([1, 0], n)
        emd = rng.normal(10, 1, size=2 * n) * (1 - lift * member)
        sub = pl.DataFrame(
            {
                "member": member,
                "emd_mean": emd,
                "baseline_emd_mean": np.full(2 * n, 12.0),
                "precision": np.full(2 * n, 0.5),
                "recall": np.full(2 * n, 0.5),
                "longest_run": np.ones(2 * n, int),
                "greedy_prefix_events": np.ones(2 * n, int),
                "n_rare_true": np.zeros(2 * n, int),
                "n_rare_reproduced": np.zeros(2 * n, int),
            }
        )
        ps = PromptSet(k, [], [], [], [], requested=2 * n)
        tiers.append(ReconstructionAudit._tier_summary(fake, k, sub, ps, i))
    for t, p in zip(tiers, holm([t["test"].get("p_value") for t in tiers]), strict=True):
        t["p_value_holm"] = p
        t["significant"] = bool(p is not None and p < cfg.alpha and t["membership_auc"]["auc"] > 0.5)
    sig = [t["tier"] for t in tiers if t["significant"]]
    return Result(
        "T1",
        "Reconstruction",
        "ok",
        "stand-in",
        section={"tiers": tiers, "least_knowledge_significant": sig[0] if sig else None},
    )


def _t2(rng, member_signal: float, nonmember_signal: float = 0.0, n: int = 40) -> Result:
    """One stigmatised and one low-harm category, static tier, metrics from T2's own code."""
    cfg = SensitiveConfig(n_bootstrap=N_BOOT)
    cats = {}
    for name, tier in (("hiv", "stigmatised"), ("hypertension", "low")):
        entry = {"harm_tier": tier, "n_subjects_with_category": n, "unconditioned_rate": 0.1, "by_tier": {}}
        te = {}
        for grp, sig in (("members", member_signal), ("nonmembers", nonmember_signal)):
            y = np.tile([1, 0], n // 2).astype(np.int8)
            share = np.clip(rng.random(n) * 0.5 + sig * y, 0, 1)
            te[grp] = _group_metrics(y, share, 0.1, cfg, 0)
        m, nn = te["members"], te["nonmembers"]
        te["leak_signal"] = auc_comparison(m, nn)["verdict"] == "memorization"
        entry["by_tier"]["static"] = te
        entry.update(status="ok", reason=None)
        cats[name] = entry
    return Result("T2", "Sensitive attributes", "ok", "stand-in", section={"categories": cats, "leaks": []})


def _report(results: dict[str, Result], *, n_nonmembers: int = 300, controls: dict | None = None) -> dict:
    n_mem = 300
    table = pl.DataFrame(
        {
            "subject_id": list(range(n_mem + n_nonmembers)),
            "member": [1] * n_mem + [0] * n_nonmembers,
            "split": None,
            "n_events": 10,
            "matched": True,
        }
    )
    for tid in ("T1", "T2", "T3", "T4", "T5", "T6"):
        results.setdefault(tid, Result(tid, tid, "skipped", "not built in this test"))
    report = build_report(
        results=results, cohort=Cohort(table, "splits"), checks={}, notes=[], provenance={}, controls=controls
    )
    return json.loads(json.dumps(report, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


@pytest.fixture(scope="module")
def clean():
    rng = np.random.default_rng(0)
    return _report({"T1": _t1(rng, {0: 0.0, 10: 0.0}), "T2": _t2(rng, 0.0), "T4": _t4(rng, 0.0)})


@pytest.fixture(scope="module")
def overfit():
    rng = np.random.default_rng(1)
    return _report({"T1": _t1(rng, {0: 0.3, 10: 0.5}), "T2": _t2(rng, 0.6), "T4": _t4(rng, 3.0)})


def _by_name(gate: dict) -> dict[str, dict]:
    return {c["name"]: c for c in gate["checks"]}


def test_gate_fails_on_an_overfit_report(overfit):
    gate = evaluate_gate(overfit)
    assert gate["verdict"] == "fail" and gate["passed"] is False
    failed = {c["name"] for c in gate["checks"] if c["passed"] is False}
    assert "T4 membership AUC (lower 95% bound)" in failed
    assert "T4 TPR at 0.01 FPR (lower 95% bound)" in failed
    assert "T1 reconstruction (significant at a counted tier)" in failed
    assert "T2 hiv member AUROC (lower 95% bound)" in failed
    assert not any("hypertension" in n for n in failed)  # a low-harm category is not gated by default
    assert any("T4 membership AUC" in r for r in gate["reasons"])


def test_gate_passes_on_a_clean_report(clean):
    gate = evaluate_gate(clean)
    assert gate["verdict"] == "pass" and gate["passed"] is True, gate["reasons"]
    for c in gate["checks"]:
        assert {"name", "value", "threshold", "passed", "detail"} <= set(c)
    checks = _by_name(gate)
    assert checks["T4 membership AUC (lower 95% bound)"]["passed"] is True
    assert checks["T4 membership AUC (lower 95% bound)"]["value"] < 0.6
    assert checks["positive control (canaries detected)"]["passed"] is None  # no canaries: recorded, not passed
    assert gate["thresholds"] == GateThresholds().model_dump(mode="json")
    json.dumps(gate, allow_nan=False)


def test_thresholds_change_the_verdict(overfit, clean):
    lax = GateThresholds(
        max_membership_auc_lower=1.0,
        max_tpr_at_low_fpr_lower=1.0,
        t1_fail_on_significant=False,
        max_t2_member_auroc_lower=1.0,
    )
    assert evaluate_gate(overfit, lax)["verdict"] == "pass"
    # T1 alone: tolerate leakage that needs 10 known events, but not leakage from demographics.
    rng = np.random.default_rng(2)
    only_late = _report({"T1": _t1(rng, {0: 0.0, 10: 0.5}), "T4": _t4(rng, 0.0)})
    assert evaluate_gate(only_late)["verdict"] == "fail"
    tolerant = evaluate_gate(only_late, GateThresholds(t1_tolerated_from_k=10))
    assert tolerant["verdict"] == "pass", tolerant["reasons"]
    assert "tolerated" in _by_name(tolerant)["T1 reconstruction (significant at a counted tier)"]["detail"]
    # Covering low-harm categories too makes the overfit report fail on hypertension as well.
    wide = evaluate_gate(overfit, GateThresholds(t2_harm_tiers=["stigmatised", "low"]))
    assert _by_name(wide)["T2 hypertension member AUROC (lower 95% bound)"]["passed"] is False
    # Demanding more non-members than were audited: underpowered, never a pass.
    strict = evaluate_gate(clean, GateThresholds(min_nonmembers=1000))
    assert strict["verdict"] == "underpowered" and strict["passed"] is False
    with pytest.raises(ValueError):
        GateThresholds(max_membership_auc_lower=0.4)
    with pytest.raises(ValueError):
        GateThresholds(unknown=1)


def test_member_excess_option_spares_population_level_inference():
    rng = np.random.default_rng(3)
    both = _report({"T2": _t2(rng, 0.6, nonmember_signal=0.6), "T4": _t4(rng, 0.0)})
    assert evaluate_gate(both)["verdict"] == "fail"
    gate = evaluate_gate(both, GateThresholds(t2_require_member_excess=True))
    assert gate["verdict"] == "pass", gate["reasons"]


def test_missing_and_skipped_tests_are_neither_pass_nor_fail(clean):
    rng = np.random.default_rng(4)
    partial = _report({"T4": _t4(rng, 0.0)})  # T1, T2 skipped
    gate = evaluate_gate(partial)
    assert gate["verdict"] == "pass"
    assert gate["not_evaluated"][:2] == ["T1", "T2"]
    checks = _by_name(gate)
    t1 = checks["T1 reconstruction (significant at a counted tier)"]
    assert t1["status"] == "skipped" and t1["passed"] is None
    assert any("not evaluated" in r and "T1" in r for r in gate["reasons"])
    # A test missing from the report altogether (an older or partial report).
    del partial["tests"]["T2"]
    assert evaluate_gate(partial)["verdict"] == "pass"
    # Required but skipped: underpowered.
    assert evaluate_gate(partial, GateThresholds(required_tests=["T1"]))["verdict"] == "underpowered"
    # Nothing measured at all: nothing to pass.
    empty = _report({})
    gate = evaluate_gate(empty)
    assert gate["verdict"] == "underpowered" and any("nothing to pass" in r for r in gate["reasons"])
    assert evaluate_gate({})["verdict"] == "underpowered"
    # An undefined T4 attack (one class) is recorded as undefined, not as a pass.
    one_class = _report({"T4": _t4(rng, 0.0, n=3)})
    c = _by_name(evaluate_gate(one_class))["T4 membership AUC (lower 95% bound)"]
    assert c["status"] == "undefined" and c["passed"] is None and c["value"] is None


def test_a_failed_positive_control_means_the_gate_cannot_pass(clean, overfit):
    failed = {
        "status": "ok",
        "verdict": "Only 1 of 10 canaries are detected.",
        "positive_control": {"passed": False},
        "negative_control": {"passed": True},
    }
    passed = {**failed, "verdict": "All canaries detected.", "positive_control": {"passed": True}}
    clean_failed = {**clean, "controls": failed}
    gate = evaluate_gate(clean_failed)
    assert gate["verdict"] == "underpowered" and gate["passed"] is False
    assert any("positive control failed" in r for r in gate["reasons"])
    # Evidence of leakage still fails, whatever the control.
    assert evaluate_gate({**overfit, "controls": failed})["verdict"] == "fail"
    assert evaluate_gate({**clean, "controls": passed})["verdict"] == "pass"
    # Required and absent (the report's default controls section: no canaries).
    assert clean["controls"]["positive_control"]["passed"] is None
    assert evaluate_gate(clean, GateThresholds(require_positive_control=True))["verdict"] == "underpowered"
    # A failed negative control is reported but does not change a pass.
    neg = {**passed, "negative_control": {"passed": False}}
    gate = evaluate_gate({**clean, "controls": neg})
    assert gate["verdict"] == "pass" and any("miscalibrated" in r for r in gate["reasons"])


def test_risk_matrix_crosses_likelihood_with_harm(clean, overfit):
    cat = default_catalogue()
    hot = risk_matrix(overfit, cat)
    hiv = hot["categories"]["hiv"]
    assert (hiv["harm"], hiv["likelihood"], hiv["risk"]) == ("high", "high", "high")
    assert "hiv" in hiv["explanation"] and "demographics" in hiv["explanation"]
    htn = hot["categories"]["hypertension"]
    assert (htn["harm"], htn["likelihood"], htn["risk"]) == ("low", "high", "medium")
    assert hot["overall"]["likelihood"] == "high" and hot["overall"]["risk"] == "high"
    assert hot["highest"]["risk"] == "high"

    cool = risk_matrix(clean, cat)
    assert cool["categories"]["hiv"]["likelihood"] == "low"
    assert cool["categories"]["hiv"]["risk"] == "medium"  # low likelihood, high harm
    assert cool["categories"]["hypertension"]["risk"] == "low"
    # Not measured is never "low".
    cancer = cool["categories"]["cancer"]
    assert cancer["likelihood"] == "undetermined" and cancer["risk"] == "undetermined"
    assert "not reassurance" in cancer["explanation"]
    assert cool["overall"]["likelihood"] == "low"
    for entry in [*cool["categories"].values(), cool["overall"]]:
        assert entry["explanation"] and entry["explanation"].endswith(".")
    json.dumps(cool, allow_nan=False)


def test_risk_matrix_with_missing_tests(clean):
    rng = np.random.default_rng(5)
    only_t4 = _report({"T4": _t4(rng, 3.0)})
    rm = risk_matrix(only_t4)
    assert {c["likelihood"] for c in rm["categories"].values()} == {"undetermined"}
    assert rm["overall"]["likelihood"] == "high"
    assert rm["overall"]["harm"] == "high"  # categories present unknown: the most harmful tier is assumed
    assert "assumed" in rm["overall"]["explanation"]
    nothing = risk_matrix({})
    assert nothing["overall"]["risk"] == "undetermined" and nothing["highest"] is None


def test_risk_matrix_reads_embedding_probes(clean):
    """T3 alone: a probe that finds HIV for unseen members (not for non-members) at tier 10 is high likelihood."""
    m = {"status": "ok", "auroc": 0.8, "auroc_ci95": [0.7, 0.9]}
    n = {"status": "ok", "auroc": 0.5, "auroc_ci95": [0.4, 0.6]}
    t3 = {
        "status": "ok",
        "reason": None,
        "categories": {
            "hiv": {
                "harm_tier": "stigmatised",
                "n_positive_members": 10,
                "n_positive_nonmembers": 5,
                "by_tier": {
                    "10": {"logistic": {"members": m, "nonmembers": n, "embedding_gain": 0.2}},
                    "static": {"logistic": {"members": n, "nonmembers": n, "embedding_gain": 0.0}},
                },
            }
        },
    }
    report = {**clean, "tests": {**clean["tests"], "T2": {"status": "skipped"}, "T3": t3}}
    hiv = risk_matrix(report)["categories"]["hiv"]
    assert (hiv["likelihood"], hiv["risk"]) == ("high", "high")
    assert "embeddings" in hiv["explanation"] and "first 10 events" in hiv["explanation"]


@pytest.mark.parametrize("tier", [0, 10, 50])
def test_tier_names_round_trip(tier):
    from ehrmem.risk.matrix import tier_k

    assert tier_k(tier_name(tier)) == tier


def _t5_section(n_memorization: int, n_tested: int, twin_memorization: int | None = None) -> dict:
    from ehrmem.audits.perturbation import memorization_excess

    section = {
        "status": "ok",
        "reason": "stand-in",
        "classes": {"memorization": n_memorization},
        "memorization_excess": memorization_excess(n_memorization, n_tested),
    }
    if twin_memorization is not None:
        section["canaries"] = {"status": "ok", "twin": {"n": 20, "memorization": twin_memorization}}
    return section


@pytest.mark.parametrize(
    "n_mem, n_tested, status",
    [(0, 50, "pass"), (2, 50, "pass"), (9, 50, "fail"), (3, 3, "fail"), (0, 0, "undefined")],
)
def test_t5_memorization_fails_the_gate_only_beyond_chance(n_mem, n_tested, status):
    """One or two leaks classed memorization among 50 is what the per-leak rules give by chance (5% each);
    nine is not."""
    report = {"tests": {"T5": _t5_section(n_mem, n_tested)}, "cohort": {"n_nonmembers": 100}}
    check = next(c for c in evaluate_gate(report)["checks"] if c["test"] == "T5" and c["kind"] == "leakage")
    assert check["status"] == status, check
    if status == "fail":
        assert evaluate_gate(report)["verdict"] == "fail"
    off = evaluate_gate(report, GateThresholds(t5_fail_on_memorization=False))
    assert next(c for c in off["checks"] if c["test"] == "T5")["status"] == "skipped"


def test_t5_twins_classed_memorization_are_flagged_not_failed():
    report = {"tests": {"T5": _t5_section(0, 50, twin_memorization=6)}, "cohort": {"n_nonmembers": 100}}
    gate = evaluate_gate(report)
    info = next(c for c in gate["checks"] if c["kind"] == "info" and c["test"] == "T5")
    assert info["status"] == "fail" and "unreliable" in info["detail"]
    assert any("twins" in r for r in gate["reasons"])
    calm = evaluate_gate({"tests": {"T5": _t5_section(0, 50, twin_memorization=1)}, "cohort": {"n_nonmembers": 100}})
    assert next(c for c in calm["checks"] if c["kind"] == "info" and c["test"] == "T5")["status"] == "pass"


def test_risk_matrix_does_not_call_members_alone_memorisation():
    """Members above chance with too few non-members to compare is unresolved (medium), never a memorisation
    signal, and the explanation says what could not be compared; members alike non-members is population."""
    m = {"status": "ok", "auroc": 0.74, "auroc_ci95": [0.61, 0.85]}
    undefined = {"status": "undefined", "reason": "too few", "auroc": None, "auroc_ci95": None}
    alike = {"status": "ok", "auroc": 0.72, "auroc_ci95": [0.55, 0.88]}
    below = {"status": "ok", "auroc": 0.50, "auroc_ci95": [0.45, 0.55]}

    def report(nonmembers):
        t2 = {
            "categories": {
                "hiv": {"harm_tier": "stigmatised", "by_tier": {"10": {"members": m, "nonmembers": nonmembers}}}
            }
        }
        return {"tests": {"T2": {"status": "ok", **t2}}}

    hiv = risk_matrix(report(undefined))["categories"]["hiv"]
    assert hiv["likelihood"] == "medium" and not hiv["evidence"]["signals"] and hiv["evidence"]["unresolved"]
    assert "too few patients it never saw" in hiv["explanation"]
    assert "more often than for patients it never saw" not in hiv["explanation"]
    pop = risk_matrix(report(alike))["categories"]["hiv"]
    assert pop["likelihood"] == "low" and pop["evidence"]["population_level"] == ["T2@10"]
    mem = risk_matrix(report(below))["categories"]["hiv"]
    assert mem["likelihood"] == "high" and mem["evidence"]["signals"][0]["p_member_excess"] < 0.05
    assert "more often than for patients it never saw" in mem["explanation"]

"""Assembling ``report.json``: a versioned schema with tests keyed T1 ... T6."""

from __future__ import annotations

from typing import Any

from ehrmem.audits.base import TestResult
from ehrmem.audits.membership import claim_interval
from ehrmem.data.cohort import Cohort

REPORT_SCHEMA_VERSION = "1.0"

# Limitations that hold for every run of this version; run-specific ones are added by build_report.
STANDING_LIMITATIONS = [
    "A test that finds no leakage is not proof that none exists: attacks stronger than those run here may "
    "succeed, and an audit is only as sensitive as its cohort is large.",
    "Membership ground truth is the model's training manifest when it has one, otherwise the dataset's "
    "splits; wrong labels make every membership metric meaningless.",
    "Membership inference scores the first context window of each record only (static codes and the "
    "earliest events); memorisation of later parts of long records is not measured.",
    "Confidence intervals are stratified percentile bootstraps over subjects; they describe sampling "
    "variation of the audited cohort, not variation over retrained models.",
    "TPR at a low false-positive rate is only reported when there are at least 1/FPR non-members; smaller "
    "cohorts cannot resolve such rates and the report says so instead of printing a number.",
]


def _headline(results: dict[str, TestResult]) -> str:
    t4 = results.get("T4")
    if t4 is None or t4.status != "ok":
        return "Membership inference could not be evaluated; see T4."
    best = t4.section["best_attack"]
    a = t4.section["attacks"][best]
    lo, hi = claim_interval(a)
    n_attacks = sum(x.get("status") == "ok" for x in t4.section["attacks"].values())
    verdict = (
        "members are distinguishable from non-members"
        if lo > 0.5
        else "no membership signal distinguishable from chance at this cohort size"
    )
    return (
        f"Strongest of {n_attacks} membership attacks ({best}): AUC {a['auc']:.3f} (simultaneous 95% CI "
        f"{lo:.3f}-{hi:.3f}) on {a['n_members']} members and {a['n_nonmembers']} non-members: {verdict}."
    )


def build_report(
    *,
    results: dict[str, TestResult],
    cohort: Cohort,
    checks: dict[str, Any],
    notes: list[str],
    provenance: dict[str, Any],
    controls: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The content of ``report.json``."""
    limitations = list(STANDING_LIMITATIONS)
    for tid, r in results.items():
        if r.status == "skipped":
            limitations.append(f"{tid} ({r.title}) was not run: {r.reason}.")
        elif r.status == "undefined":
            limitations.append(f"{tid} ({r.title}) is undefined: {r.reason}.")
    if cohort.n_nonmembers < 100:
        limitations.append(
            f"Only {cohort.n_nonmembers} non-members were audited: intervals are wide and TPR at 1% FPR "
            "cannot be resolved."
        )
    controls = controls or {"status": "absent", "reason": "not measured", "positive_control": {"passed": None}}
    pos = controls.get("positive_control", {}).get("passed")
    if pos is False:
        limitations.insert(0, "The positive control failed: " + controls["verdict"])
    elif pos is None:
        limitations.insert(
            0,
            "No positive control: the model carries no canaries, so this report cannot show that the audit "
            "would have detected memorization in this model.",
        )
    warnings = list(notes) + list(cohort.notes) + [f"{tid}: {w}" for tid, r in results.items() for w in r.warnings]
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "status": "complete",
        "summary": {
            "headline": _headline(results),
            "tests": {tid: {"status": r.status, "reason": r.reason} for tid, r in results.items()},
        },
        "controls": controls,
        "cohort": cohort.summary(),
        "checks": checks,
        "tests": {tid: r.to_json() for tid, r in results.items()},
        "warnings": warnings,
        "limitations": limitations,
        "provenance": provenance,
    }

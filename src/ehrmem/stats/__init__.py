"""Shared statistics: exact ROC analysis, binomial and bootstrap intervals, normalized risk, two-sample tests.

Convention: label 1 = member, higher score = more likely member. Metrics that cannot be computed (one
class, too few rows, a target FPR finer than the non-members allow) are returned with
``status="undefined"`` and a reason, never as 0.5 or 0.0.
"""

from ehrmem.stats.intervals import (
    bootstrap_ci,
    clopper_pearson_interval,
    normalized_risk,
    normalized_risk_ci,
    wilson_interval,
)
from ehrmem.stats.roc import (
    RocCurve,
    auc_summary,
    auprc_summary,
    binary_rates,
    check_binary,
    ranking_metrics,
    roc_curve,
    tpr_at_fpr,
)
from ehrmem.stats.tests import auc_comparison, two_sample_test

__all__ = [
    "RocCurve",
    "auc_comparison",
    "auc_summary",
    "auprc_summary",
    "binary_rates",
    "bootstrap_ci",
    "check_binary",
    "clopper_pearson_interval",
    "normalized_risk",
    "normalized_risk_ci",
    "ranking_metrics",
    "roc_curve",
    "tpr_at_fpr",
    "two_sample_test",
    "wilson_interval",
]

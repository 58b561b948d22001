"""ROC analysis of membership scores: AUC, TPR at a fixed FPR, average precision, rates at a threshold.

Convention everywhere (failure kind 3): label 1 = member (positive), label 0 = non-member, and a higher
score means "more likely a member". A score that ranks members perfectly gives AUC 1; its negation gives 0.

Undefined is a result, not an error (failure kind 1): with a single class, or too few examples of one,
the summaries return ``status="undefined"`` with the counts and a reason, and ``None`` for the metric.
They never return 0.5 or 0.0 in place of a missing value.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.metrics import roc_curve as _sk_roc_curve

from ehrmem.errors import InputError, NumericalError
from ehrmem.stats.intervals import _check_confidence, _check_n_boot, clopper_pearson_interval, wilson_interval

__all__ = [
    "RocCurve",
    "auc_summary",
    "auprc_summary",
    "binary_rates",
    "check_binary",
    "roc_curve",
    "tpr_at_fpr",
]

logger = logging.getLogger(__name__)

# Bootstrap replicates are computed in chunks so that a chunk's count matrices stay below this many cells.
_MAX_CHUNK_CELLS = 4_000_000

# Subject ids quoted in a non-finite-score error.
_MAX_NAMED = 10


# --------------------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------------------


def _as_binary(values: ArrayLike, name: str) -> np.ndarray:
    """Return a 1-D int8 array of 0/1 values, or raise naming the values that are neither."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise InputError(f"{name} must be one-dimensional", column=name, value=arr.shape, expected="shape (n,)")

    if arr.dtype == bool:
        return arr.astype(np.int8)

    if arr.dtype.kind not in "iuf":
        raise InputError(
            f"{name} must be numeric or boolean",
            column=name,
            value=str(arr.dtype),
            expected="values in {0, 1}",
        )

    bad = (arr != 0) & (arr != 1)
    if bad.any():
        found = sorted({repr(v) for v in arr[bad].tolist()})[:_MAX_NAMED]
        raise InputError(
            f"{name} must be 0 (non-member) or 1 (member); {int(bad.sum())} values are neither",
            column=name,
            value=", ".join(found),
            expected="values in {0, 1}",
        )

    return arr.astype(np.int8)


def check_binary(
    labels: ArrayLike,
    scores: ArrayLike,
    *,
    subject_ids: Sequence[Any] | np.ndarray | None = None,
    name: str = "score",
) -> tuple[np.ndarray, np.ndarray]:
    """Validate membership labels and scores and return them as arrays.

    Parameters
    ----------
    labels : array-like
        1 = member, 0 = non-member; bools are accepted.
    scores : array-like
        Membership scores, higher = more likely member. Must all be finite.
    subject_ids : sequence, optional
        Subject id of each row, quoted in the error when some scores are non-finite.
    name : str, default "score"
        Name of the score in error messages.

    Returns
    -------
    labels : numpy.ndarray
        int8 array of 0/1.
    scores : numpy.ndarray
        float64 array.

    Raises
    ------
    InputError
        If the inputs are not 1-D, differ in length, labels are not 0/1 or scores are not numeric.
    NumericalError
        If any score is NaN or infinite (failure kind 2); the message counts them and names up to 10
        subject ids (or row positions when ``subject_ids`` is not given).
    """
    y = _as_binary(labels, "labels")

    s = np.asarray(scores)
    if s.ndim != 1:
        raise InputError(f"{name} must be one-dimensional", column=name, value=s.shape, expected="shape (n,)")

    if s.dtype.kind not in "biuf":
        raise InputError(f"{name} must be numeric", column=name, value=str(s.dtype), expected="real numbers")

    s = s.astype(np.float64)
    if s.shape[0] != y.shape[0]:
        raise InputError(
            f"labels and {name} differ in length",
            column=name,
            value=f"{y.shape[0]} labels, {s.shape[0]} scores",
            expected="one score per label",
        )

    ids = None
    if subject_ids is not None:
        ids = np.asarray(subject_ids)
        if ids.shape != s.shape:
            raise InputError(
                f"subject_ids and {name} differ in length",
                column="subject_ids",
                value=f"{ids.shape[0] if ids.ndim else 0} ids, {s.shape[0]} scores",
                expected="one subject id per score",
            )

    bad = ~np.isfinite(s)
    if bad.any():
        n_nan = int(np.isnan(s).sum())
        n_posinf = int(np.isposinf(s).sum())
        n_neginf = int(np.isneginf(s).sum())
        where = np.flatnonzero(bad)[:_MAX_NAMED]
        if ids is not None:
            named = "subject ids " + ", ".join(str(v) for v in ids[where].tolist())
        else:
            named = "row positions " + ", ".join(str(i) for i in where.tolist())

        more = " (first 10)" if bad.sum() > _MAX_NAMED else ""
        raise NumericalError(
            f"{name}: {int(bad.sum())} of {s.shape[0]} values are non-finite "
            f"({n_nan} NaN, {n_neginf} -inf, {n_posinf} +inf) at {named}{more}. "
            "Non-finite scores would silently corrupt the privacy metric; fix or drop them upstream."
        )

    return y, s


def _class_counts(y: np.ndarray) -> tuple[int, int]:
    """Return ``(n_pos, n_neg)`` for an int8 label array."""
    n_pos = int(y.sum())
    return n_pos, int(y.shape[0] - n_pos)


def _too_few_reason(n_pos: int, n_neg: int, min_per_class: int) -> str | None:
    """Reason a two-class metric is undefined, or None when both classes have ``min_per_class`` rows."""
    if n_pos == 0 or n_neg == 0:
        return (
            f"only one class present (n_pos={n_pos} members, n_neg={n_neg} non-members); "
            "the metric needs both members and non-members"
        )

    if n_pos < min_per_class or n_neg < min_per_class:
        return (
            f"too few examples: needs at least {min_per_class} members and {min_per_class} non-members, "
            f"have n_pos={n_pos}, n_neg={n_neg}"
        )

    return None


def _check_min_per_class(min_per_class: int) -> int:
    """Return ``min_per_class`` as an int, or raise unless it is a positive integer."""
    if isinstance(min_per_class, bool) or not isinstance(min_per_class, Integral) or min_per_class < 1:
        raise InputError(
            "minimum examples per class must be a positive integer",
            column="min_per_class",
            value=min_per_class,
            expected="integer >= 1",
        )

    return int(min_per_class)


# --------------------------------------------------------------------------------------------------------
# Exact ROC curve
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RocCurve:
    """Exact ROC curve with one point per unique score (failure kind 6: no fixed threshold grid).

    Attributes
    ----------
    fpr, tpr : numpy.ndarray
        False- and true-positive rates, non-decreasing, from (0, 0) to (1, 1).
    thresholds : numpy.ndarray
        A row is flagged as a member when its score is ``>= threshold``. The first threshold is ``inf``
        (nobody flagged), as in :func:`sklearn.metrics.roc_curve`.
    n_pos, n_neg : int
        Number of members and non-members.
    """

    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray
    n_pos: int
    n_neg: int


def roc_curve(labels: ArrayLike, scores: ArrayLike) -> RocCurve:
    """Exact ROC curve over all unique scores.

    Parameters
    ----------
    labels : array-like
        1 = member, 0 = non-member.
    scores : array-like
        Membership scores, higher = more likely member.

    Returns
    -------
    RocCurve
        One point per unique score plus the starting point (0, 0).

    Raises
    ------
    InputError
        If only one class is present (the curve is undefined), or the inputs are invalid.
    NumericalError
        If any score is non-finite.
    """
    y, s = check_binary(labels, scores)
    n_pos, n_neg = _class_counts(y)

    reason = _too_few_reason(n_pos, n_neg, 1)
    if reason is not None:
        raise InputError(f"ROC curve undefined: {reason}", column="labels", value=f"n_pos={n_pos}, n_neg={n_neg}")

    fpr, tpr, thresholds = _sk_roc_curve(y, s, drop_intermediate=False)

    return RocCurve(fpr=fpr, tpr=tpr, thresholds=thresholds, n_pos=n_pos, n_neg=n_neg)


# --------------------------------------------------------------------------------------------------------
# Vectorised stratified bootstrap
# --------------------------------------------------------------------------------------------------------


def _group_ids(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Map positives and negatives to the index of their score among all unique scores (ascending)."""
    uniq, inv = np.unique(s, return_inverse=True)
    return inv[y == 1], inv[y == 0], uniq.shape[0]


def _counts_per_group(idx: np.ndarray, n_groups: int) -> np.ndarray:
    """Row-wise histogram: ``out[b, g]`` = number of entries of ``idx[b]`` equal to ``g``."""
    n_rows = idx.shape[0]
    offset = idx + (np.arange(n_rows)[:, None] * n_groups)

    return np.bincount(offset.ravel(), minlength=n_rows * n_groups).reshape(n_rows, n_groups)


def _auc_from_counts(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUC per row from per-score counts of positives and negatives (columns ascending by score).

    AUC = P(score_pos > score_neg) + 0.5 P(score_pos = score_neg).
    """
    pos = pos.astype(np.float64)
    neg = neg.astype(np.float64)
    neg_below = np.cumsum(neg, axis=1) - neg  # negatives with a strictly lower score

    wins = np.sum(pos * (neg_below + 0.5 * neg), axis=1)

    return wins / (pos.sum(axis=1) * neg.sum(axis=1))


def _ap_from_counts(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """Average precision per row from per-score counts (columns ascending by score), as sklearn defines it.

    AP = sum over thresholds (descending) of (R_t - R_{t-1}) * P_t, a step-wise sum with no interpolation.
    """
    tps = np.cumsum(pos[:, ::-1], axis=1).astype(np.float64)
    fps = np.cumsum(neg[:, ::-1], axis=1).astype(np.float64)
    flagged = tps + fps

    # A score absent from a resample has no rows: its recall step is 0, so its precision is irrelevant.
    precision = np.divide(tps, flagged, out=np.zeros_like(tps), where=flagged > 0)
    recall_step = pos[:, ::-1] / tps[:, -1:]

    return np.sum(recall_step * precision, axis=1)


def _stratified_bootstrap(
    y: np.ndarray,
    s: np.ndarray,
    stat: str,
    n_boot: int,
    seed: int,
) -> np.ndarray:
    """Bootstrap replicates of AUC or AP, resampling members and non-members separately.

    Each replicate draws ``n_pos`` members and ``n_neg`` non-members with replacement, so every replicate
    has both classes at their original sizes. Replicates are computed in chunks without a Python loop over
    individual replicates.
    """
    pos_ids, neg_ids, n_groups = _group_ids(y, s)
    n_pos, n_neg = pos_ids.shape[0], neg_ids.shape[0]
    fn = _auc_from_counts if stat == "auc" else _ap_from_counts

    rng = np.random.default_rng(seed)
    chunk = max(1, _MAX_CHUNK_CELLS // max(n_groups, n_pos, n_neg))

    out = np.empty(n_boot, dtype=np.float64)
    for start in range(0, n_boot, chunk):
        m = min(chunk, n_boot - start)
        pos_draw = pos_ids[rng.integers(0, n_pos, size=(m, n_pos))]
        neg_draw = neg_ids[rng.integers(0, n_neg, size=(m, n_neg))]

        pos_counts = _counts_per_group(pos_draw, n_groups)
        neg_counts = _counts_per_group(neg_draw, n_groups)
        out[start : start + m] = fn(pos_counts, neg_counts)

    return out


def _percentile_ci(reps: np.ndarray, confidence: float) -> list[float]:
    """Two-sided percentile interval of bootstrap replicates as a list of plain floats."""
    alpha = 1.0 - confidence
    lo, hi = np.quantile(reps, [alpha / 2, 1 - alpha / 2])

    return [float(lo), float(hi)]


# --------------------------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------------------------


def auc_summary(
    labels: ArrayLike,
    scores: ArrayLike,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    min_per_class: int = 2,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """ROC AUC with a stratified bootstrap interval and the membership advantage.

    Parameters
    ----------
    labels : array-like
        1 = member, 0 = non-member.
    scores : array-like
        Membership scores, higher = more likely member.
    n_boot : int, default 1000
        Bootstrap replicates.
    seed : int, default 0
        Seed for ``numpy.random.default_rng``.
    min_per_class : int, default 2
        Fewest members and fewest non-members for which the AUC is reported.
    confidence : float, default 0.95
        Confidence level of the interval (stored under ``auc_ci95`` whatever its value).

    Returns
    -------
    dict
        ``status`` (``"ok"`` / ``"undefined"``), ``reason``, ``auc``, ``auc_ci95`` (``[lo, hi]``),
        ``n_pos``, ``n_neg`` and ``advantage`` = max(TPR - FPR) over the exact ROC. The metrics are None
        when undefined (one class or fewer than ``min_per_class`` in a class); never 0.5.

    Raises
    ------
    InputError, NumericalError
        As :func:`check_binary`, or for out-of-range parameters.

    Notes
    -----
    AUC is the Mann-Whitney probability that a random member outscores a random non-member, ties counting
    one half. The interval resamples members and non-members separately (percentile bootstrap).
    """
    n_boot = _check_n_boot(n_boot)
    confidence = _check_confidence(confidence)
    min_per_class = _check_min_per_class(min_per_class)
    y, s = check_binary(labels, scores)
    n_pos, n_neg = _class_counts(y)

    out: dict[str, Any] = {
        "status": "undefined",
        "reason": _too_few_reason(n_pos, n_neg, min_per_class),
        "auc": None,
        "auc_ci95": None,
        "n_pos": n_pos,
        "n_neg": n_neg,
        "advantage": None,
    }
    if out["reason"] is not None:
        logger.debug("AUC undefined: %s", out["reason"])
        return out

    curve = roc_curve(y, s)
    reps = _stratified_bootstrap(y, s, "auc", n_boot, seed)

    out.update(
        status="ok",
        auc=float(roc_auc_score(y, s)),
        auc_ci95=_percentile_ci(reps, confidence),
        advantage=float(np.max(curve.tpr - curve.fpr)),
    )
    return out


def _check_target_fpr(target_fpr: float) -> float:
    """Return ``target_fpr`` as a float, or raise unless it lies in (0, 1]."""
    if isinstance(target_fpr, bool) or not isinstance(target_fpr, Real) or not 0.0 < target_fpr <= 1.0:
        raise InputError("target FPR out of range", column="target_fpr", value=target_fpr, expected="0 < target <= 1")

    return float(target_fpr)


def _min_negatives(target_fpr: float) -> int:
    """Fewest non-members for which an FPR of ``target_fpr`` is resolvable: ceil(1 / target)."""
    # The small tolerance keeps e.g. 1 / 0.001 at 1000 if it rounds to 1000.0000000000001.
    return math.ceil(1.0 / target_fpr - 1e-9)


def tpr_at_fpr(labels: ArrayLike, scores: ArrayLike, target_fpr: float) -> dict[str, Any]:
    """True-positive rate at the best operating point whose false-positive rate does not exceed a target.

    Parameters
    ----------
    labels : array-like
        1 = member, 0 = non-member.
    scores : array-like
        Membership scores, higher = more likely member.
    target_fpr : float
        Largest acceptable false-positive rate, in (0, 1].

    Returns
    -------
    dict
        ``target_fpr``, ``tpr``, ``tpr_ci95`` (Clopper-Pearson, 95 %), ``achieved_fpr`` (the FPR actually
        attained, ``<= target_fpr``), ``threshold`` (flag as member when ``score >= threshold``; None when
        the best point flags nobody), ``n_neg``, ``n_pos``, ``status`` and ``reason``.

    Raises
    ------
    InputError, NumericalError
        As :func:`check_binary`, or when ``target_fpr`` is outside (0, 1].

    Notes
    -----
    The operating point is chosen on the exact ROC over all unique scores (failure kind 6): the largest
    TPR with achieved FPR <= target, and among those the lowest FPR. A target below 1 / n_neg cannot be
    resolved by the non-members available, so it is refused (``status="undefined"``) rather than
    reported as a TPR at FPR 0.
    """
    target_fpr = _check_target_fpr(target_fpr)
    y, s = check_binary(labels, scores)
    n_pos, n_neg = _class_counts(y)

    out: dict[str, Any] = {
        "target_fpr": target_fpr,
        "tpr": None,
        "tpr_ci95": None,
        "achieved_fpr": None,
        "threshold": None,
        "n_neg": n_neg,
        "n_pos": n_pos,
        "status": "undefined",
        "reason": _too_few_reason(n_pos, n_neg, 1),
    }

    needed = _min_negatives(target_fpr)
    if out["reason"] is None and n_neg < needed:
        out["reason"] = (
            f"target FPR {target_fpr:g} is below the resolution of the non-members: "
            f"needs at least ceil(1/target) = {needed} non-members, have {n_neg}"
        )

    if out["reason"] is not None:
        logger.debug("TPR@FPR=%g undefined: %s", target_fpr, out["reason"])
        return out

    curve = roc_curve(y, s)

    # Exact counts at every threshold (a row is flagged when score >= threshold).
    pos_sorted = np.sort(s[y == 1])
    neg_sorted = np.sort(s[y == 0])
    tp = n_pos - np.searchsorted(pos_sorted, curve.thresholds, side="left")
    fp = n_neg - np.searchsorted(neg_sorted, curve.thresholds, side="left")

    feasible = fp / n_neg <= target_fpr  # the same float comparison a reader of achieved_fpr would make
    best_tp = tp[feasible].max()
    i = int(np.flatnonzero(feasible & (tp == best_tp))[0])  # lowest FPR among the best TPR

    thr = float(curve.thresholds[i])
    out.update(
        tpr=int(tp[i]) / n_pos,
        tpr_ci95=list(clopper_pearson_interval(int(tp[i]), n_pos)),
        achieved_fpr=int(fp[i]) / n_neg,
        threshold=thr if math.isfinite(thr) else None,
        status="ok",
    )
    return out


def auprc_summary(
    labels: ArrayLike,
    scores: ArrayLike,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    min_per_class: int = 2,
) -> dict[str, Any]:
    """Average precision (area under the precision-recall curve) with a stratified bootstrap interval.

    Parameters
    ----------
    labels : array-like
        1 = member, 0 = non-member.
    scores : array-like
        Membership scores, higher = more likely member.
    n_boot : int, default 1000
        Bootstrap replicates.
    seed : int, default 0
        Seed for ``numpy.random.default_rng``.
    min_per_class : int, default 2
        Fewest members and fewest non-members for which the metric is reported.

    Returns
    -------
    dict
        ``status``, ``reason``, ``auprc``, ``auprc_ci95`` (95 % percentile interval), ``prevalence`` (the
        share of members: the AUPRC of a random score), ``n_pos`` and ``n_neg``. Metrics are None when
        undefined, under the same rules as :func:`auc_summary`.

    Raises
    ------
    InputError, NumericalError
        As :func:`check_binary`, or for out-of-range parameters.
    """
    n_boot = _check_n_boot(n_boot)
    min_per_class = _check_min_per_class(min_per_class)
    y, s = check_binary(labels, scores)
    n_pos, n_neg = _class_counts(y)

    out: dict[str, Any] = {
        "status": "undefined",
        "reason": _too_few_reason(n_pos, n_neg, min_per_class),
        "auprc": None,
        "auprc_ci95": None,
        "prevalence": n_pos / (n_pos + n_neg) if n_pos + n_neg else None,
        "n_pos": n_pos,
        "n_neg": n_neg,
    }
    if out["reason"] is not None:
        logger.debug("AUPRC undefined: %s", out["reason"])
        return out

    reps = _stratified_bootstrap(y, s, "ap", n_boot, seed)

    out.update(
        status="ok",
        auprc=float(average_precision_score(y, s)),
        auprc_ci95=_percentile_ci(reps, 0.95),
    )
    return out


def binary_rates(labels: ArrayLike, predictions: ArrayLike) -> dict[str, Any]:
    """Precision, recall and false-positive rate of hard member / non-member predictions.

    Parameters
    ----------
    labels : array-like
        1 = member, 0 = non-member.
    predictions : array-like
        1 = predicted member, 0 = predicted non-member.

    Returns
    -------
    dict
        Counts ``tp``, ``fp``, ``tn``, ``fn``, ``n_pos``, ``n_neg``; ``precision``, ``recall`` and ``fpr``
        with Wilson 95 % intervals (``precision_ci95`` ...). A rate whose denominator is 0 is None, as is
        its interval. ``status`` is ``"ok"`` (all three defined), ``"partial"`` or ``"undefined"`` (none
        defined); ``reason`` lists the undefined rates.

    Raises
    ------
    InputError
        If the inputs differ in length or are not 0/1.
    """
    y = _as_binary(labels, "labels")
    p = _as_binary(predictions, "predictions")
    if y.shape != p.shape:
        raise InputError(
            "labels and predictions differ in length",
            column="predictions",
            value=f"{y.shape[0]} labels, {p.shape[0]} predictions",
            expected="one prediction per label",
        )

    tp = int(np.sum((y == 1) & (p == 1)))
    fp = int(np.sum((y == 0) & (p == 1)))
    tn = int(np.sum((y == 0) & (p == 0)))
    fn = int(np.sum((y == 1) & (p == 0)))

    out: dict[str, Any] = {"tp": tp, "fp": fp, "tn": tn, "fn": fn, "n_pos": tp + fn, "n_neg": fp + tn}
    reasons = []
    rates = (
        ("precision", tp, tp + fp, "no row predicted as member"),
        ("recall", tp, tp + fn, "no members"),
        ("fpr", fp, fp + tn, "no non-members"),
    )
    for key, k, n, why in rates:
        if n == 0:
            out[key], out[f"{key}_ci95"] = None, None
            reasons.append(f"{key} undefined: {why}")
        else:
            out[key], out[f"{key}_ci95"] = k / n, list(wilson_interval(k, n))

    out["status"] = "ok" if not reasons else ("undefined" if len(reasons) == len(rates) else "partial")
    out["reason"] = "; ".join(reasons) if reasons else None

    if reasons:
        logger.debug("binary rates degraded: %s", out["reason"])

    return out


def ranking_metrics(
    labels: ArrayLike, scores: ArrayLike, *, n_boot: int = 1000, seed: int = 0, min_per_class: int = 2
) -> dict[str, Any]:
    """AUROC and AUPRC of scores (probabilities or shares, never hard labels) with their bootstrap intervals
    and the prevalence that AUPRC is read against: the block T2 and T3 report for every group."""
    auc = auc_summary(labels, scores, n_boot=n_boot, seed=seed, min_per_class=min_per_class)
    ap = auprc_summary(labels, scores, n_boot=n_boot, seed=seed, min_per_class=min_per_class)
    return {
        "auroc": auc["auc"],
        "auroc_ci95": auc["auc_ci95"],
        "auprc": ap["auprc"],
        "auprc_ci95": ap["auprc_ci95"],
        "prevalence": ap["prevalence"],
    }

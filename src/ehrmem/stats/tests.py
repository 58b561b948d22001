"""Two-sample tests: do two sets of scores (e.g. members vs. non-members) differ in distribution?"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from scipy.stats import mannwhitneyu

from ehrmem.errors import InputError
from ehrmem.stats.intervals import _check_n_boot
from ehrmem.stats.roc import _percentile_ci, _stratified_bootstrap, check_binary

__all__ = ["auc_comparison", "two_sample_test"]

logger = logging.getLogger(__name__)

_ALTERNATIVES = ("two-sided", "greater", "less")


def two_sample_test(
    x: ArrayLike,
    y: ArrayLike,
    *,
    alternative: str = "two-sided",
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Mann-Whitney U test of ``x`` against ``y`` with the rank-biserial effect size and its interval.

    Parameters
    ----------
    x, y : array-like
        The two samples, e.g. member scores (``x``) and non-member scores (``y``). Must be finite.
    alternative : {"two-sided", "greater", "less"}, default "two-sided"
        ``"greater"`` tests whether ``x`` tends to exceed ``y``.
    n_boot : int, default 1000
        Bootstrap replicates for the effect-size interval (each sample resampled separately).
    seed : int, default 0
        Seed for ``numpy.random.default_rng``.

    Returns
    -------
    dict
        ``statistic`` (U of ``x``), ``p_value``, ``effect_size`` (rank-biserial correlation
        ``2 * AUC - 1`` with ``AUC = P(x > y) + 0.5 P(x = y)``; +1 when every ``x`` exceeds every ``y``),
        ``effect_size_ci95`` (percentile bootstrap), ``n_x``, ``n_y``, ``status`` and ``reason``. When either
        sample has fewer than 2 values the status is ``"undefined"`` and the statistics are None.

    Raises
    ------
    InputError
        If ``alternative`` is unknown or a sample is not 1-D numeric.
    NumericalError
        If a sample contains NaN or infinite values.
    """
    if alternative not in _ALTERNATIVES:
        raise InputError(
            "unknown alternative hypothesis",
            column="alternative",
            value=alternative,
            expected=" | ".join(_ALTERNATIVES),
        )

    n_boot = _check_n_boot(n_boot)
    x_arr = np.asarray(x)
    y_arr = np.asarray(y)
    for name, arr in (("x", x_arr), ("y", y_arr)):
        if arr.ndim != 1:
            raise InputError(f"sample {name} must be one-dimensional", column=name, value=arr.shape)

    # Reuse the label/score validation: x are the positives, y the negatives.
    labels, scores = check_binary(
        np.concatenate([np.ones(x_arr.shape[0], np.int8), np.zeros(y_arr.shape[0], np.int8)]),
        np.concatenate([x_arr, y_arr]),
        name="sample values",
    )
    n_x, n_y = int(x_arr.shape[0]), int(y_arr.shape[0])

    out: dict[str, Any] = {
        "statistic": None,
        "p_value": None,
        "effect_size": None,
        "effect_size_ci95": None,
        "n_x": n_x,
        "n_y": n_y,
        "status": "undefined",
        "reason": None,
    }
    if n_x < 2 or n_y < 2:
        out["reason"] = f"each sample needs at least 2 values, have n_x={n_x}, n_y={n_y}"
        logger.debug("two-sample test undefined: %s", out["reason"])
        return out

    xs, ys = scores[labels == 1], scores[labels == 0]
    res = mannwhitneyu(xs, ys, alternative=alternative)
    u = float(res.statistic)

    # Bootstrap the AUC and map to the rank-biserial scale; 2 * AUC - 1 is monotone, so percentiles map too.
    reps = 2.0 * _stratified_bootstrap(labels, scores, "auc", n_boot, seed) - 1.0

    out.update(
        statistic=u,
        p_value=float(res.pvalue),
        effect_size=2.0 * u / (n_x * n_y) - 1.0,
        effect_size_ci95=_percentile_ci(reps, 0.95),
        status="ok",
    )
    return out


_Z95 = 1.959963984540054


def _se_from_ci(ci: list | tuple | None) -> float | None:
    """Standard error implied by a 95% interval (its width over 2 x 1.96)."""
    if not ci or ci[0] is None or ci[1] is None:
        return None
    return max((float(ci[1]) - float(ci[0])) / (2 * _Z95), 1e-12)


def auc_comparison(
    members: dict | None, nonmembers: dict | None, *, n_comparisons: int = 1, alpha: float = 0.05
) -> dict[str, Any]:
    """Is an attack's AUROC above chance for members, and above the non-members' AUROC?

    ``members`` and ``nonmembers`` are metric dictionaries with ``status``, ``auroc`` and ``auroc_ci95``
    (two independent groups). Both questions are one-sided z-tests with the standard errors implied by the
    95% intervals, at level ``alpha / n_comparisons`` (Bonferroni over the cells a caller examines together,
    e.g. every tier and probe of one category).

    Returns ``verdict``:

    - ``"none"``: members are not above chance (or could not be evaluated);
    - ``"memorization"``: members above chance and above non-members: the model singles out trained patients;
    - ``"population"``: members above chance, non-members alike: population-level inference;
    - ``"unresolved"``: members above chance, non-members could not be evaluated, so memorization cannot be
      told from generalization.

    plus ``p_above_chance`` and ``p_member_excess`` (None when not computed).
    """
    from scipy.stats import norm

    if n_comparisons < 1:
        raise InputError("n_comparisons must be at least 1.", value=n_comparisons, expected=">= 1")
    level = alpha / n_comparisons
    out: dict[str, Any] = {"verdict": "none", "p_above_chance": None, "p_member_excess": None, "level": level}
    if not members or members.get("status") != "ok" or members.get("auroc") is None:
        return out
    se_m = _se_from_ci(members.get("auroc_ci95"))
    if se_m is None:
        return out
    p_chance = float(norm.sf((members["auroc"] - 0.5) / se_m))
    out["p_above_chance"] = p_chance
    if p_chance >= level:
        return out
    se_n = _se_from_ci((nonmembers or {}).get("auroc_ci95"))
    if not nonmembers or nonmembers.get("status") != "ok" or nonmembers.get("auroc") is None or se_n is None:
        out["verdict"] = "unresolved"
        return out
    p_excess = float(norm.sf((members["auroc"] - nonmembers["auroc"]) / np.hypot(se_m, se_n)))
    out["p_member_excess"] = p_excess
    out["verdict"] = "memorization" if p_excess < level else "population"
    return out

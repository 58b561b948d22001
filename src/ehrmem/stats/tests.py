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

__all__ = ["two_sample_test"]

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

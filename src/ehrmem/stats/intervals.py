"""Confidence intervals for success rates and for the normalized privacy risk.

Every interval here must survive perfect leakage (failure kind 4): when every attack succeeds (k = n) or
none does (k = 0) the interval is still valid, lies in [0, 1] and contains the point estimate.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from numbers import Integral, Real
from typing import Any

import numpy as np
from scipy.stats import binomtest

from ehrmem.errors import InputError, NumericalError

__all__ = [
    "bootstrap_ci",
    "clopper_pearson_interval",
    "normalized_risk",
    "normalized_risk_ci",
    "wilson_interval",
]

logger = logging.getLogger(__name__)


def _check_confidence(confidence: float) -> float:
    """Return ``confidence`` as a float, or raise if it is not strictly between 0 and 1."""
    if isinstance(confidence, bool) or not isinstance(confidence, Real) or not 0.0 < confidence < 1.0:
        raise InputError(
            "confidence level out of range",
            column="confidence",
            value=confidence,
            expected="0 < confidence < 1",
        )

    return float(confidence)


def _check_n_boot(n_boot: int) -> int:
    """Return ``n_boot`` as an int, or raise if it is not a positive integer."""
    if isinstance(n_boot, bool) or not isinstance(n_boot, Integral) or n_boot < 1:
        raise InputError(
            "number of bootstrap replicates must be a positive integer",
            column="n_boot",
            value=n_boot,
            expected="integer >= 1",
        )

    return int(n_boot)


def _check_counts(k: int, n: int, *, k_name: str = "k", n_name: str = "n") -> tuple[int, int]:
    """Return ``(k, n)`` as ints, or raise unless ``0 <= k <= n`` and ``n >= 1``."""
    for name, val in ((k_name, k), (n_name, n)):
        if isinstance(val, bool) or not isinstance(val, Integral):
            raise InputError("count must be an integer", column=name, value=val, expected="integer")

    if n < 1:
        raise InputError("a rate needs at least one trial", column=n_name, value=n, expected=f"{n_name} >= 1")

    if not 0 <= k <= n:
        raise InputError(
            "number of successes out of range",
            column=k_name,
            value=k,
            expected=f"0 <= {k_name} <= {n_name}={n}",
        )

    return int(k), int(n)


def _binomial_interval(k: int, n: int, confidence: float, method: str) -> tuple[float, float]:
    """Binomial-proportion interval from scipy, clipped to [0, 1] and widened to contain ``k / n``."""
    k, n = _check_counts(k, n)
    confidence = _check_confidence(confidence)

    ci = binomtest(k, n).proportion_ci(confidence_level=confidence, method=method)

    # scipy can return a bound a rounding error past the point at k = 0 or k = n; pin it there.
    p = k / n
    lo = min(max(float(ci.low), 0.0), p)
    hi = max(min(float(ci.high), 1.0), p)

    return lo, hi


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion ``k / n``.

    Parameters
    ----------
    k : int
        Number of successes, ``0 <= k <= n``.
    n : int
        Number of trials, at least 1.
    confidence : float, default 0.95
        Two-sided confidence level.

    Returns
    -------
    tuple of float
        ``(lower, upper)`` within [0, 1]; valid at ``k = 0`` and ``k = n``.

    Raises
    ------
    InputError
        If ``n < 1``, ``k`` is outside ``[0, n]`` or ``confidence`` is outside (0, 1).
    """
    return _binomial_interval(k, n, confidence, "wilson")


def clopper_pearson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper-Pearson) interval for a binomial proportion ``k / n``.

    Conservative: its coverage is at least ``confidence`` for every true proportion. The lower bound is
    exactly 0 at ``k = 0`` and the upper bound exactly 1 at ``k = n``.

    Parameters
    ----------
    k : int
        Number of successes, ``0 <= k <= n``.
    n : int
        Number of trials, at least 1.
    confidence : float, default 0.95
        Two-sided confidence level.

    Returns
    -------
    tuple of float
        ``(lower, upper)`` within [0, 1].

    Raises
    ------
    InputError
        If ``n < 1``, ``k`` is outside ``[0, n]`` or ``confidence`` is outside (0, 1).
    """
    return _binomial_interval(k, n, confidence, "exact")


def bootstrap_ci(
    values_fn: Callable[[np.ndarray], float],
    data: np.ndarray,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of a statistic, resampling rows of ``data`` with replacement.

    Parameters
    ----------
    values_fn : callable
        Maps an array shaped like ``data`` (rows resampled) to a scalar statistic.
    data : numpy.ndarray
        Observations, one per row (first axis).
    n_boot : int, default 1000
        Number of bootstrap replicates.
    seed : int, default 0
        Seed for ``numpy.random.default_rng``; the same seed gives the same interval.
    confidence : float, default 0.95
        Two-sided confidence level.

    Returns
    -------
    tuple of float
        ``(lower, upper)`` percentiles of the replicate statistics.

    Raises
    ------
    InputError
        If ``data`` has no rows, or ``n_boot`` / ``confidence`` are out of range.
    NumericalError
        If ``values_fn`` returns a non-finite value for any replicate.

    Notes
    -----
    This is the generic, loop-based bootstrap. Statistics with a vectorised bootstrap (AUC, average
    precision) have their own, faster routines in :mod:`ehrmem.stats.roc`.
    """
    n_boot = _check_n_boot(n_boot)
    confidence = _check_confidence(confidence)
    data = np.asarray(data)

    if data.ndim == 0 or data.shape[0] == 0:
        raise InputError("bootstrap needs at least one row of data", column="data", value=data.shape)

    rng = np.random.default_rng(seed)
    n = data.shape[0]

    stats = np.empty(n_boot, dtype=np.float64)
    for b in range(n_boot):
        idx = rng.integers(0, n, size=n)
        stats[b] = float(values_fn(data[idx]))

    bad = ~np.isfinite(stats)
    if bad.any():
        raise NumericalError(
            f"bootstrap statistic was non-finite in {int(bad.sum())} of {n_boot} replicates; "
            "the statistic is undefined on some resamples (e.g. a resample with a single class)"
        )

    alpha = 1.0 - confidence
    lo, hi = np.quantile(stats, [alpha / 2, 1 - alpha / 2])

    return float(lo), float(hi)


def _check_rate(r: float, name: str) -> float:
    """Return the rate ``r`` as a float, or raise unless it is a finite number in [0, 1]."""
    if isinstance(r, bool) or not isinstance(r, Real) or not 0.0 <= float(r) <= 1.0:
        raise InputError("rate out of range", column=name, value=r, expected="a number in [0, 1]")

    return float(r)


def normalized_risk(r_member: float, r_control: float) -> float | None:
    """Attack success on members in excess of the control, as a fraction of the room left above it.

    ``risk = (r_member - r_control) / (1 - r_control)``: 0 when the attack does no better on members
    than on the control (non-members), 1 when it succeeds on every member. Negative values are kept
    (not clipped): they mean the attack did better on the control.

    Parameters
    ----------
    r_member : float
        Success rate of the attack on members, in [0, 1].
    r_control : float
        Success rate of the same attack on control records (non-members), in [0, 1].

    Returns
    -------
    float or None
        The normalized risk, or ``None`` when ``r_control == 1`` (no room above the control).

    Raises
    ------
    InputError
        If a rate is outside [0, 1].

    Examples
    --------
    >>> normalized_risk(0.6, 0.2)
    0.5
    >>> normalized_risk(1.0, 0.3)
    1.0
    >>> normalized_risk(0.5, 1.0) is None
    True
    """
    r_member = _check_rate(r_member, "r_member")
    r_control = _check_rate(r_control, "r_control")

    if r_control == 1.0:
        return None

    return (r_member - r_control) / (1.0 - r_control)


def _beta_draws(rng: np.random.Generator, a: float, b: float, size: int) -> np.ndarray:
    """Draw from Beta(a, b), where a zero parameter means a point mass (at 0 for a = 0, at 1 for b = 0)."""
    if a == 0:
        return np.zeros(size)

    if b == 0:
        return np.ones(size)

    return rng.beta(a, b, size=size)


def normalized_risk_ci(
    k_member: int,
    n_member: int,
    k_control: int,
    n_control: int,
    *,
    n_boot: int = 2000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Normalized risk from success counts, with a parametric (beta) resampling interval.

    Parameters
    ----------
    k_member, n_member : int
        Successful attacks and attacks run on members.
    k_control, n_control : int
        Successful attacks and attacks run on control records (non-members).
    n_boot : int, default 2000
        Number of Monte Carlo draws per bound.
    seed : int, default 0
        Seed for ``numpy.random.default_rng``.
    confidence : float, default 0.95
        Two-sided confidence level.

    Returns
    -------
    dict
        ``value`` (float or None), ``ci95`` (``[lo, hi]`` or None), ``r_member``, ``r_control``, the four
        counts, ``status`` (``"ok"`` or ``"undefined"``) and ``reason`` (None when ok).

    Raises
    ------
    InputError
        If a count is out of range or ``n_boot`` / ``confidence`` are invalid.

    Notes
    -----
    The interval is the Monte Carlo analogue of Clopper-Pearson for this ratio. The risk increases with
    the member rate and decreases with the control rate, so the lower bound draws the member rate from
    Beta(k, n - k + 1) and the control rate from Beta(k + 1, n - k) (the distributions whose quantiles
    are the exact binomial bounds), and the upper bound the other way round. A zero parameter is a point
    mass, so with every member attack successful the upper bound is exactly 1 and the interval contains
    the point 1 (failure kind 4). The risk is undefined when every control attack succeeds.
    """
    k_member, n_member = _check_counts(k_member, n_member, k_name="k_member", n_name="n_member")
    k_control, n_control = _check_counts(k_control, n_control, k_name="k_control", n_name="n_control")
    n_boot = _check_n_boot(n_boot)
    confidence = _check_confidence(confidence)

    r_member = k_member / n_member
    r_control = k_control / n_control
    out: dict[str, Any] = {
        "value": None,
        "ci95": None,
        "r_member": r_member,
        "r_control": r_control,
        "k_member": k_member,
        "n_member": n_member,
        "k_control": k_control,
        "n_control": n_control,
        "status": "undefined",
        "reason": None,
    }

    value = normalized_risk(r_member, r_control)
    if value is None:
        out["reason"] = (
            f"every control attack succeeded ({k_control}/{n_control}): the attack cannot be told apart "
            "from chance on this control, normalized risk undefined"
        )
        logger.debug("normalized risk undefined: %s", out["reason"])
        return out

    rng = np.random.default_rng(seed)
    alpha = 1.0 - confidence
    below_one = math.nextafter(1.0, 0.0)  # keeps 1 - r_control > 0 if a beta draw rounds to 1

    def risk(rm: np.ndarray, rc: np.ndarray) -> np.ndarray:
        rc = np.minimum(rc, below_one)
        return (rm - rc) / (1.0 - rc)

    low_draws = risk(
        _beta_draws(rng, k_member, n_member - k_member + 1, n_boot),
        _beta_draws(rng, k_control + 1, n_control - k_control, n_boot),
    )
    high_draws = risk(
        _beta_draws(rng, k_member + 1, n_member - k_member, n_boot),
        _beta_draws(rng, k_control, n_control - k_control + 1, n_boot),
    )

    lo = float(np.quantile(low_draws, alpha / 2))
    hi = float(np.quantile(high_draws, 1 - alpha / 2))

    out.update(value=float(value), ci95=[lo, hi], status="ok")
    return out

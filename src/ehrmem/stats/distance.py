"""Distances between event sequences: a time-aware earth mover's distance and exact-match measures.

T1 compares each sampled continuation of a prompt with the patient's true continuation. An event is a
code (an index into a vocabulary whose pairwise code distances are precomputed, see
:class:`ehrmem.data.hierarchy.CodeDistance`) and an elapsed time in seconds since the end of the prompt.

Time-aware EMD
--------------
The ground cost between event ``i`` of sequence A and event ``j`` of sequence B is

    c_ij = (D[a_i, b_j] + w * g(t_i, t_j)) / (1 + w),
    g(t_i, t_j) = u / (1 + u),   u = | log1p(t_i / tau) - log1p(t_j / tau) |,

with ``D`` a code distance in [0, 1], ``w`` the time weight and ``tau`` the time scale (1 hour). The
log scale makes an hour's offset matter for events in the first hours and little for events months
away; ``u / (1 + u)`` bounds the time term in [0, 1) while keeping it increasing in the offset, so each
cost lies in [0, 1] and grows with the code distance and with the time offset. The distance is the exact
earth mover's distance between the two sequences with uniform weights ``1/n`` and ``1/m``, so sequences
of different lengths are compared as distributions of events. It is solved exactly: by POT's network
simplex (``ot.emd2``) in general and, when both sequences have the same length (the usual case: a
sampled horizon of H events against the true next H events), as the optimal assignment
(``scipy.optimize.linear_sum_assignment``), which is the same optimum (with uniform weights the vertices
of the transport polytope are permutations) found several times faster.

Conventions: two empty sequences are at distance 0; an empty and a non-empty sequence are at distance 1,
the largest value any pair can take (every event would be maximally far from its match). Identical
sequences are at distance 0 (``D`` has a zero diagonal) and the distance is symmetric when ``D`` is.

Examples
--------
>>> import numpy as np
>>> D = np.array([[0.0, 0.5], [0.5, 0.0]])
>>> a = (np.array([0, 1]), np.array([0.0, 3600.0]))
>>> round(event_emd(a, a, D), 12)
0.0
>>> round(event_emd(a, (np.array([1, 0]), np.array([0.0, 3600.0])), D, time_weight=0.0), 3)
0.0
>>> event_emd(a, (np.array([], dtype=int), np.array([])), D)
1.0
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import linear_sum_assignment

from ehrmem.errors import InputError, NumericalError

__all__ = [
    "DEFAULT_TIME_SCALE",
    "DEFAULT_TIME_WEIGHT",
    "EMPTY_DISTANCE",
    "EventArrays",
    "PrecisionRecall",
    "code_precision_recall",
    "emd_many",
    "event_cost_matrix",
    "event_emd",
    "longest_common_run",
    "time_cost",
]

logger = logging.getLogger(__name__)

DEFAULT_TIME_WEIGHT = 1.0
DEFAULT_TIME_SCALE = 3600.0  # seconds: offsets are compared on log1p(t / 1 hour)
EMPTY_DISTANCE = 1.0  # empty vs. non-empty sequence

# Cost matrices of equally shaped pairs are built together, at most this many cells at a time.
_MAX_BATCH_CELLS = 2_000_000

EventArrays = tuple[ArrayLike, ArrayLike]
"""An event sequence: (code indices into the code-distance matrix, elapsed seconds since the prompt end)."""


# --------------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------------


def _check_matrix(code_dist: ArrayLike) -> np.ndarray:
    m = np.asarray(code_dist, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise InputError(
            "The code-distance matrix must be square.",
            column="code_dist",
            value=m.shape,
            expected="shape (V, V) over the vocabulary",
        )
    return m


def _check_params(time_weight: float, time_scale: float) -> None:
    if not (math.isfinite(time_weight) and time_weight >= 0):
        raise InputError(
            "time_weight must be finite and non-negative.",
            column="time_weight",
            value=time_weight,
            expected=">= 0 (0 ignores time)",
        )
    if not (math.isfinite(time_scale) and time_scale > 0):
        raise InputError(
            "time_scale must be finite and positive.",
            column="time_scale",
            value=time_scale,
            expected="seconds > 0, e.g. 3600",
        )


def _as_event_arrays(events: EventArrays, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Shape and type checks of one sequence; values are checked by :func:`_check_values`."""
    try:
        codes_raw, times_raw = events
    except (TypeError, ValueError):
        raise InputError(
            f"{name} must be a pair (codes, times).",
            column=name,
            value=type(events).__name__,
            expected="(int array, float array)",
        ) from None
    codes = np.asarray(codes_raw)
    times = np.asarray(times_raw, dtype=np.float64)
    if codes.ndim != 1 or times.ndim != 1 or codes.shape != times.shape:
        raise InputError(
            f"{name}: codes and times must be 1-D arrays of the same length.",
            column=name,
            value=(codes.shape, times.shape),
            expected="two arrays of shape (n,)",
        )
    if codes.size and not np.issubdtype(codes.dtype, np.integer):
        raise InputError(
            f"{name}: codes must be integer indices into the code-distance matrix.",
            column=name,
            value=str(codes.dtype),
            expected="an integer array",
        )
    return codes.astype(np.int64, copy=False), times


def _check_values(codes: np.ndarray, times: np.ndarray, n_codes: int, names: Sequence[str]) -> None:
    """Check code indices and times of a batch (rows = sequences named by ``names``)."""
    codes, times = np.atleast_2d(codes), np.atleast_2d(times)
    bad_code = ((codes < 0) | (codes >= n_codes)).any(axis=1)
    if bad_code.any():
        row = int(np.argmax(bad_code))
        values = codes[row][(codes[row] < 0) | (codes[row] >= n_codes)]
        raise InputError(
            f"{names[row]}: code index outside the code-distance matrix.",
            column=names[row],
            value=values[:5].tolist(),
            expected=f"0..{n_codes - 1}",
        )
    bad_time = (~np.isfinite(times) | (times < 0)).any(axis=1)
    if bad_time.any():
        row = int(np.argmax(bad_time))
        values = times[row][~np.isfinite(times[row]) | (times[row] < 0)]
        raise InputError(
            f"{names[row]}: elapsed times must be finite and non-negative seconds.",
            column=names[row],
            value=values[:5].tolist(),
            expected="seconds since the end of the prompt, >= 0",
        )


def _check_events(events: EventArrays, n_codes: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    codes, times = _as_event_arrays(events, name)
    if codes.size:
        _check_values(codes, times, n_codes, [name])
    return codes, times


# --------------------------------------------------------------------------------------------------------
# Ground cost and EMD
# --------------------------------------------------------------------------------------------------------


def time_cost(times_a: ArrayLike, times_b: ArrayLike, time_scale: float = DEFAULT_TIME_SCALE) -> np.ndarray:
    """The bounded time term ``u / (1 + u)``, ``u = |log1p(t_a / tau) - log1p(t_b / tau)|``, for all pairs.

    Parameters
    ----------
    times_a, times_b
        Elapsed seconds (>= 0), shapes ``(..., n)`` and ``(..., m)`` (leading dimensions are a batch).
    time_scale
        ``tau`` in seconds.

    Returns
    -------
    numpy.ndarray
        ``(..., n, m)`` values in [0, 1), increasing in the offset.
    """
    la = np.log1p(np.asarray(times_a, dtype=np.float64) / time_scale)
    lb = np.log1p(np.asarray(times_b, dtype=np.float64) / time_scale)
    u = np.abs(la[..., :, None] - lb[..., None, :])
    u /= 1.0 + u
    return u


def event_cost_matrix(
    a: EventArrays,
    b: EventArrays,
    code_dist: ArrayLike,
    time_weight: float = DEFAULT_TIME_WEIGHT,
    time_scale: float = DEFAULT_TIME_SCALE,
) -> np.ndarray:
    """Ground-cost matrix between the events of two sequences (see the module docstring).

    Parameters
    ----------
    a, b
        ``(codes, times)`` of each sequence.
    code_dist
        ``(V, V)`` code distances in [0, 1]; the cost looks them up by numpy indexing.
    time_weight, time_scale
        ``w`` and ``tau``.

    Returns
    -------
    numpy.ndarray
        ``(len(a), len(b))`` costs in [0, 1].
    """
    _check_params(time_weight, time_scale)
    m = _check_matrix(code_dist)
    ca, ta = _check_events(a, m.shape[0], "a")
    cb, tb = _check_events(b, m.shape[0], "b")
    return _cost(ca, ta, cb, tb, m, time_weight, time_scale)


def _cost(
    ca: np.ndarray, ta: np.ndarray, cb: np.ndarray, tb: np.ndarray, m: np.ndarray, time_weight: float, time_scale: float
) -> np.ndarray:
    cost = m[ca[..., :, None], cb[..., None, :]]  # one gather: no Python loop over event pairs
    if time_weight > 0:
        cost += time_weight * time_cost(ta, tb, time_scale)
    cost /= 1.0 + time_weight
    return cost


def _emd(cost: np.ndarray) -> float:
    n, k = cost.shape
    if n == 0 and k == 0:
        return 0.0
    if n == 0 or k == 0:
        return EMPTY_DISTANCE
    if n == k:
        # Uniform weights on equal-length sequences: the transport polytope is the Birkhoff polytope
        # scaled by 1/n, whose vertices are permutations, so the exact EMD is the optimal assignment.
        rows, cols = linear_sum_assignment(cost)
        value = float(cost[rows, cols].sum() / n)
    else:
        import ot  # deferred: importing POT costs seconds (it probes its torch backend)

        # Uniform marginals are valid by construction: skip POT's marginal check and dual centring.
        value, log = ot.emd2(
            np.full(n, 1.0 / n),
            np.full(k, 1.0 / k),
            np.ascontiguousarray(cost),
            log=True,
            center_dual=False,
            check_marginals=False,
        )
        if log.get("warning") is not None:
            raise NumericalError(f"The exact EMD solver did not reach the optimum: {log['warning']}")
        value = float(value)
    # Summation can land a few ulps outside [0, 1].
    return min(max(value, 0.0), 1.0)


def event_emd(
    a: EventArrays,
    b: EventArrays,
    code_dist: ArrayLike,
    time_weight: float = DEFAULT_TIME_WEIGHT,
    time_scale: float = DEFAULT_TIME_SCALE,
) -> float:
    """Time-aware earth mover's distance between two event sequences, in [0, 1].

    Parameters
    ----------
    a, b
        ``(codes, times)``: code indices into ``code_dist`` and elapsed seconds since the prompt end.
    code_dist
        ``(V, V)`` code-distance matrix in [0, 1] with a zero diagonal.
    time_weight
        Weight ``w`` of the time term relative to the code distance (0 ignores time).
    time_scale
        ``tau``, the time scale of the log offset, in seconds.

    Returns
    -------
    float
        0 for identical sequences and for two empty ones; 1 for an empty against a non-empty one.
    """
    return float(emd_many([(a, b)], code_dist, time_weight, time_scale)[0])


def emd_many(
    pairs: Sequence[tuple[EventArrays, EventArrays]],
    code_dist_matrix: ArrayLike,
    time_weight: float = DEFAULT_TIME_WEIGHT,
    time_scale: float = DEFAULT_TIME_SCALE,
) -> np.ndarray:
    """Time-aware EMD for many ``(generated, true)`` pairs with one precomputed code-distance matrix.

    Parameters
    ----------
    pairs
        ``[((codes_a, times_a), (codes_b, times_b)), ...]``.
    code_dist_matrix
        ``(V, V)`` code distances (e.g. ``CodeDistance(vocab).matrix``), looked up by numpy indexing.
    time_weight, time_scale
        See :func:`event_emd`.

    Returns
    -------
    numpy.ndarray
        ``(len(pairs),)`` float64 distances in [0, 1].

    Notes
    -----
    Pairs with the same lengths are stacked, and their cost matrices built together with one
    fancy-indexing lookup into the code-distance matrix and one broadcast time term; only the exact
    transport problem itself runs per pair (an assignment for equal lengths, POT's network simplex
    otherwise).

    Raises
    ------
    InputError
        For a malformed pair, a code index outside the matrix, or a negative or non-finite time.
    NumericalError
        If the network simplex stops before the optimum.
    """
    _check_params(time_weight, time_scale)
    m = _check_matrix(code_dist_matrix)
    seqs: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    shapes: dict[tuple[int, int], list[int]] = {}
    for k, pair in enumerate(pairs):
        try:
            a, b = pair
        except (TypeError, ValueError):
            raise InputError(
                "Each pair must be (generated, true) event sequences.",
                column=f"pairs[{k}]",
                value=type(pair).__name__,
                expected="((codes, times), (codes, times))",
            ) from None
        ca, ta = _as_event_arrays(a, f"pairs[{k}][0]")
        cb, tb = _as_event_arrays(b, f"pairs[{k}][1]")
        seqs.append((ca, ta, cb, tb))
        shapes.setdefault((ca.size, cb.size), []).append(k)

    out = np.empty(len(pairs), dtype=np.float64)
    for (n, k_len), members in shapes.items():
        if n == 0 or k_len == 0:
            out[members] = 0.0 if n == k_len else EMPTY_DISTANCE
            continue
        # Pairs of one shape are stacked so their cost matrices come from one gather and one broadcast.
        step = max(1, _MAX_BATCH_CELLS // (n * k_len))
        for start in range(0, len(members), step):
            chunk = members[start : start + step]
            ca = np.stack([seqs[i][0] for i in chunk])
            ta = np.stack([seqs[i][1] for i in chunk])
            cb = np.stack([seqs[i][2] for i in chunk])
            tb = np.stack([seqs[i][3] for i in chunk])
            _check_values(ca, ta, m.shape[0], [f"pairs[{i}][0]" for i in chunk])
            _check_values(cb, tb, m.shape[0], [f"pairs[{i}][1]" for i in chunk])
            costs = _cost(ca, ta, cb, tb, m, time_weight, time_scale)
            if not np.isfinite(costs).all():
                row = int(np.argmax(~np.isfinite(costs).reshape(len(chunk), -1).all(axis=1)))
                raise InputError(
                    "The code-distance matrix has non-finite entries for the codes of a pair.",
                    column=f"pairs[{chunk[row]}]",
                    value="nan/inf",
                    expected="code distances in [0, 1]",
                )
            for row, i in enumerate(chunk):
                out[i] = _emd(costs[row])
    return out


# --------------------------------------------------------------------------------------------------------
# Exact-match measures
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PrecisionRecall:
    """Set overlap of generated and true codes.

    ``precision`` is ``None`` when nothing was generated and ``recall`` is ``None`` when the true
    continuation is empty: undefined, not 0 (as elsewhere in :mod:`ehrmem.stats`), so such pairs stay
    out of averages; ``f1`` is ``None`` when either is.
    """

    precision: float | None
    recall: float | None
    f1: float | None
    n_generated: int
    n_true: int
    n_common: int


def code_precision_recall(generated_codes: ArrayLike, true_codes: ArrayLike) -> PrecisionRecall:
    """Precision and recall of the distinct generated codes against the distinct true codes.

    Parameters
    ----------
    generated_codes, true_codes
        Codes (indices or strings); repeats count once.

    Returns
    -------
    PrecisionRecall

    Examples
    --------
    >>> pr = code_precision_recall([1, 2, 2, 3], [2, 3, 4, 5])
    >>> pr.precision, pr.recall, pr.n_common
    (0.6666666666666666, 0.5, 2)
    >>> code_precision_recall([], [2]).precision is None
    True
    """
    gen = set(np.asarray(generated_codes).ravel().tolist())
    true = set(np.asarray(true_codes).ravel().tolist())
    common = len(gen & true)
    precision = common / len(gen) if gen else None
    recall = common / len(true) if true else None
    f1: float | None = None
    if precision is not None and recall is not None:
        f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return PrecisionRecall(precision, recall, f1, len(gen), len(true), common)


def longest_common_run(a: ArrayLike, b: ArrayLike) -> int:
    """Length of the longest contiguous run of codes that appears in both sequences, in order.

    Parameters
    ----------
    a, b
        Code sequences (indices or strings).

    Returns
    -------
    int
        0 when they share no code.

    Notes
    -----
    The longest-common-substring dynamic programme, one numpy row at a time (``O(len(a) len(b))`` work,
    ``O(len(b))`` memory).

    Examples
    --------
    >>> longest_common_run([5, 1, 2, 3, 9], [1, 2, 3, 7, 1, 2])
    3
    """
    xa, xb = np.asarray(a).ravel(), np.asarray(b).ravel()
    if xa.size == 0 or xb.size == 0:
        return 0
    if xa.dtype.kind != xb.dtype.kind and {xa.dtype.kind, xb.dtype.kind} & {"U", "S", "O"}:
        xa, xb = xa.astype(str), xb.astype(str)
    prev = np.zeros(xb.size + 1, dtype=np.int64)
    best = 0
    for value in xa:
        cur = np.zeros_like(prev)
        cur[1:] = np.where(xb == value, prev[:-1] + 1, 0)
        best = max(best, int(cur.max()))
        prev = cur
    return best

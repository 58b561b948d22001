"""Tests for ehrmem.stats: the failure kinds a membership metric must survive, checked against oracles."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score, roc_auc_score

from ehrmem.errors import InputError, NumericalError
from ehrmem.stats import (
    auc_summary,
    auprc_summary,
    binary_rates,
    bootstrap_ci,
    check_binary,
    clopper_pearson_interval,
    normalized_risk,
    normalized_risk_ci,
    roc_curve,
    tpr_at_fpr,
    two_sample_test,
    wilson_interval,
)
from ehrmem.stats.roc import _ap_from_counts, _auc_from_counts, _counts_per_group, _group_ids


def _random_data(seed: int, n_pos: int = 40, n_neg: int = 60, shift: float = 1.0):
    rng = np.random.default_rng(seed)
    labels = np.r_[np.ones(n_pos, int), np.zeros(n_neg, int)]
    scores = np.r_[rng.normal(shift, 1, n_pos), rng.normal(0, 1, n_neg)]
    return labels, scores


def _assert_plain(obj) -> None:
    """Every number in a result is a plain Python int/float (JSON-serialisable), never a numpy scalar."""
    json.dumps(obj, allow_nan=False)
    if isinstance(obj, dict):
        for v in obj.values():
            _assert_plain(v)
    elif isinstance(obj, list | tuple):
        for v in obj:
            _assert_plain(v)
    else:
        assert obj is None or type(obj) in (int, float, str, bool)


# ---------------------------------------------------------------- polarity (kind 3) and ties


def test_oracle_score_gives_auc_one_and_its_negation_zero():
    labels = np.array([1, 1, 1, 0, 0, 0])
    oracle = labels.astype(float)

    assert auc_summary(labels, oracle)["auc"] == 1.0
    assert auc_summary(labels, -oracle)["auc"] == 0.0
    assert auc_summary(labels, oracle)["advantage"] == 1.0
    assert auc_summary(labels, oracle)["auc_ci95"] == [1.0, 1.0]


def test_all_scores_equal_gives_exactly_half():
    labels = np.array([1, 0, 1, 0, 1])
    res = auc_summary(labels, np.full(5, 3.2))

    assert res["status"] == "ok"
    assert res["auc"] == 0.5
    assert res["auc_ci95"] == [0.5, 0.5]
    assert res["advantage"] == 0.0


def test_auc_matches_sklearn_on_tied_random_data():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 200)
    scores = rng.integers(0, 5, 200).astype(float)  # many ties

    res = auc_summary(labels, scores, n_boot=200)

    assert res["auc"] == pytest.approx(roc_auc_score(labels, scores))
    _assert_plain(res)


def test_bool_labels_accepted():
    res = auc_summary(np.array([True, False, True, False]), [0.9, 0.1, 0.8, 0.2])
    assert res["auc"] == 1.0


# ---------------------------------------------------------------- one class / too few (kind 1)


@pytest.mark.parametrize("labels", [[1, 1, 1, 1], [0, 0, 0, 0], []])
def test_one_class_is_undefined_not_half(labels):
    scores = np.arange(len(labels), dtype=float)

    for res in (auc_summary(labels, scores), auprc_summary(labels, scores), tpr_at_fpr(labels, scores, 0.5)):
        assert res["status"] == "undefined"
        assert "one class" in res["reason"]
        assert str(res["n_pos"]) in res["reason"]
        _assert_plain(res)

    res = auc_summary(labels, scores)
    assert res["auc"] is None and res["auc_ci95"] is None and res["advantage"] is None


def test_fewer_than_min_per_class_is_undefined():
    res = auc_summary([1, 0, 0, 0], [0.9, 0.1, 0.2, 0.3], min_per_class=2)

    assert res["status"] == "undefined"
    assert res["auc"] is None
    assert "n_pos=1" in res["reason"] and "n_neg=3" in res["reason"]


def test_roc_curve_refuses_one_class():
    with pytest.raises(InputError, match="one class"):
        roc_curve([1, 1], [0.1, 0.2])


# ---------------------------------------------------------------- input checks (kind 2)


def test_non_finite_scores_name_subject_ids():
    labels = [1, 0, 1, 0]
    scores = [0.1, np.nan, -np.inf, 0.4]

    with pytest.raises(NumericalError) as err:
        check_binary(labels, scores, subject_ids=["s1", "s2", "s3", "s4"])

    msg = str(err.value)
    assert "2 of 4" in msg
    assert "s2" in msg and "s3" in msg and "s1" not in msg


def test_non_finite_scores_fail_in_summaries():
    with pytest.raises(NumericalError, match="1 of 4"):
        auc_summary([1, 0, 1, 0], [0.1, 0.2, np.inf, 0.4])


@pytest.mark.parametrize(
    ("labels", "scores"),
    [
        ([1, 0, 2], [0.1, 0.2, 0.3]),  # label not 0/1
        ([1, 0], [0.1, 0.2, 0.3]),  # length mismatch
        (["a", "b"], [0.1, 0.2]),  # non-numeric labels
        ([1, 0], ["x", "y"]),  # non-numeric scores
    ],
)
def test_bad_inputs_raise_input_error(labels, scores):
    with pytest.raises(InputError):
        check_binary(labels, scores)


def test_check_binary_returns_typed_arrays():
    y, s = check_binary([True, False], [1, 2])
    assert y.dtype == np.int8 and s.dtype == np.float64


# ---------------------------------------------------------------- exact ROC and TPR@FPR (kind 6)


def test_roc_curve_has_a_point_per_unique_score():
    labels, scores = _random_data(0)
    curve = roc_curve(labels, scores)

    assert len(curve.fpr) == len(np.unique(scores)) + 1
    assert curve.n_pos == 40 and curve.n_neg == 60
    assert curve.fpr[0] == 0 and curve.tpr[-1] == 1


def test_tpr_at_fpr_refuses_below_resolution():
    labels, scores = _random_data(0, n_pos=20, n_neg=99)
    res = tpr_at_fpr(labels, scores, 0.01)

    assert res["status"] == "undefined"
    assert res["tpr"] is None and res["achieved_fpr"] is None
    assert "needs at least ceil(1/target) = 100 non-members, have 99" in res["reason"]

    assert tpr_at_fpr(*_random_data(0, n_pos=20, n_neg=100), 0.01)["status"] == "ok"


def test_tpr_at_fpr_perfect_attack():
    labels = np.r_[np.ones(10, int), np.zeros(10, int)]
    res = tpr_at_fpr(labels, labels.astype(float), 0.1)

    assert res["tpr"] == 1.0 and res["achieved_fpr"] == 0.0
    assert res["tpr_ci95"][1] == 1.0 and res["tpr_ci95"][0] < 1.0  # kind 4: interval at p = 1
    _assert_plain(res)


def test_tpr_at_fpr_operating_point_and_threshold():
    res = tpr_at_fpr([0, 1, 0, 1], [0.9, 0.5, 0.1, 0.2], 0.5)
    assert res["tpr"] == 1.0 and res["achieved_fpr"] == 0.5 and res["threshold"] == 0.2

    # The two top scores are non-members: within FPR 0.25 the best point flags nobody (TPR 0, FPR 0).
    res = tpr_at_fpr([0, 0, 1, 1, 0, 0], [0.9, 0.8, 0.5, 0.4, 0.2, 0.1], 0.25)
    assert res["status"] == "ok"
    assert res["tpr"] == 0.0 and res["achieved_fpr"] == 0.0 and res["threshold"] is None


def _brute_force_tpr_at_fpr(labels: np.ndarray, scores: np.ndarray, target: float) -> tuple[float, float]:
    """Try every unique score as a threshold (plus 'flag nobody'); best TPR, then lowest FPR."""
    n_pos, n_neg = labels.sum(), (1 - labels).sum()
    best = (0.0, 0.0)
    for thr in np.unique(scores):
        flagged = scores >= thr
        tpr = flagged[labels == 1].sum() / n_pos
        fpr = flagged[labels == 0].sum() / n_neg
        if fpr <= target and (tpr > best[0] or (tpr == best[0] and fpr < best[1])):
            best = (tpr, fpr)
    return best


@settings(max_examples=60, deadline=None, database=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n_pos=st.integers(1, 30),
    n_neg=st.integers(1, 60),
    n_levels=st.integers(2, 40),
    target=st.floats(0.01, 1.0),
)
def test_tpr_at_fpr_matches_brute_force(seed, n_pos, n_neg, n_levels, target):
    rng = np.random.default_rng(seed)
    labels = np.r_[np.ones(n_pos, int), np.zeros(n_neg, int)]
    scores = rng.integers(0, n_levels, n_pos + n_neg).astype(float) + labels * rng.random()

    res = tpr_at_fpr(labels, scores, target)

    if n_neg < 1 / target - 1e-9:
        assert res["status"] == "undefined" and res["tpr"] is None
        return

    tpr, fpr = _brute_force_tpr_at_fpr(labels, scores, target)
    assert res["status"] == "ok"
    assert res["achieved_fpr"] <= target
    assert res["tpr"] == pytest.approx(tpr) and res["achieved_fpr"] == pytest.approx(fpr)
    assert res["tpr_ci95"][0] <= res["tpr"] <= res["tpr_ci95"][1]


# ---------------------------------------------------------------- vectorised bootstrap vs. library


def test_vectorised_auc_and_ap_match_sklearn_on_resamples():
    labels, scores = _random_data(3, n_pos=15, n_neg=25)
    scores = np.round(scores, 1)  # ties
    pos_ids, neg_ids, n_groups = _group_ids(labels.astype(np.int8), scores)
    rng = np.random.default_rng(0)

    pi = rng.integers(0, len(pos_ids), size=(5, len(pos_ids)))
    ni = rng.integers(0, len(neg_ids), size=(5, len(neg_ids)))
    pos_c = _counts_per_group(pos_ids[pi], n_groups)
    neg_c = _counts_per_group(neg_ids[ni], n_groups)
    aucs, aps = _auc_from_counts(pos_c, neg_c), _ap_from_counts(pos_c, neg_c)

    pos_scores, neg_scores = scores[labels == 1], scores[labels == 0]
    for b in range(5):
        y = np.r_[np.ones(len(pos_ids)), np.zeros(len(neg_ids))]
        s = np.r_[pos_scores[pi[b]], neg_scores[ni[b]]]
        assert aucs[b] == pytest.approx(roc_auc_score(y, s))
        assert aps[b] == pytest.approx(average_precision_score(y, s))


@pytest.mark.parametrize("fn", [auc_summary, auprc_summary])
def test_bootstrap_ci_contains_point_and_is_deterministic(fn):
    labels, scores = _random_data(5)
    key = "auc" if fn is auc_summary else "auprc"

    a, b = fn(labels, scores, seed=7), fn(labels, scores, seed=7)
    lo, hi = a[f"{key}_ci95"]

    assert lo <= a[key] <= hi and lo < hi
    assert a == b
    assert fn(labels, scores, seed=8)[f"{key}_ci95"] != [lo, hi]
    _assert_plain(a)


def test_auprc_reports_prevalence_baseline():
    labels, scores = _random_data(2, n_pos=20, n_neg=80)
    res = auprc_summary(labels, scores, n_boot=100)

    assert res["prevalence"] == 0.2
    assert res["auprc"] == pytest.approx(average_precision_score(labels, scores))


def test_generic_bootstrap_ci():
    data = np.random.default_rng(0).normal(2.0, 1.0, 100)

    lo, hi = bootstrap_ci(np.mean, data, n_boot=300, seed=1)

    assert lo <= data.mean() <= hi
    assert (lo, hi) == bootstrap_ci(np.mean, data, n_boot=300, seed=1)
    assert type(lo) is float


def test_generic_bootstrap_ci_rejects_non_finite_statistic():
    with pytest.raises(NumericalError, match="non-finite"):
        bootstrap_ci(lambda d: float("nan"), np.arange(5.0), n_boot=10)

    with pytest.raises(InputError):
        bootstrap_ci(np.mean, np.array([]))


# ---------------------------------------------------------------- intervals (kind 4)


@pytest.mark.parametrize("interval", [wilson_interval, clopper_pearson_interval])
@pytest.mark.parametrize(("k", "n"), [(0, 1), (1, 1), (0, 10), (10, 10), (3, 7), (0, 100_000), (500, 500)])
def test_binomial_intervals_valid_at_extremes(interval, k, n):
    lo, hi = interval(k, n)

    assert 0.0 <= lo <= k / n <= hi <= 1.0
    assert lo < hi
    assert type(lo) is float and type(hi) is float


def test_binomial_interval_bounds_at_extremes():
    assert clopper_pearson_interval(0, 10)[0] == 0.0
    assert clopper_pearson_interval(10, 10)[1] == 1.0
    assert wilson_interval(0, 10)[0] == 0.0
    assert wilson_interval(10, 10)[1] == 1.0


@pytest.mark.parametrize(("k", "n"), [(0, 0), (3, 2), (-1, 5), (1.5, 3)])
def test_binomial_interval_bad_counts(k, n):
    with pytest.raises(InputError):
        wilson_interval(k, n)


def test_binary_rates_with_undefined_denominator():
    res = binary_rates([1, 1, 0, 0], [1, 0, 0, 0])
    assert res["precision"] == 1.0 and res["recall"] == 0.5 and res["fpr"] == 0.0
    assert res["status"] == "ok"
    assert res["fpr_ci95"][0] == 0.0 and res["fpr_ci95"][1] > 0.0

    res = binary_rates([1, 1, 0, 0], [0, 0, 0, 0])
    assert res["precision"] is None and res["precision_ci95"] is None
    assert res["status"] == "partial" and "precision" in res["reason"]
    _assert_plain(res)


# ---------------------------------------------------------------- normalized risk


@pytest.mark.parametrize(
    ("r_member", "r_control", "expected"),
    [(0.6, 0.2, 0.5), (0.2, 0.2, 0.0), (1.0, 0.3, 1.0), (0.0, 0.5, -1.0), (0.3, 0.0, 0.3)],
)
def test_normalized_risk_examples(r_member, r_control, expected):
    assert normalized_risk(r_member, r_control) == pytest.approx(expected)


def test_normalized_risk_undefined_when_control_always_succeeds():
    assert normalized_risk(0.5, 1.0) is None

    res = normalized_risk_ci(5, 10, 10, 10)
    assert res["status"] == "undefined" and res["value"] is None and res["ci95"] is None
    _assert_plain(res)


@pytest.mark.parametrize(
    ("k_m", "n_m", "k_c", "n_c"), [(100, 100, 0, 100), (0, 50, 0, 50), (50, 50, 10, 50), (30, 100, 10, 100)]
)
def test_normalized_risk_ci_at_extremes(k_m, n_m, k_c, n_c):
    res = normalized_risk_ci(k_m, n_m, k_c, n_c)
    lo, hi = res["ci95"]

    assert res["status"] == "ok"
    assert lo <= res["value"] <= hi <= 1.0
    assert res == normalized_risk_ci(k_m, n_m, k_c, n_c)
    _assert_plain(res)


def test_perfect_leakage_reads_one_with_interval():
    res = normalized_risk_ci(100, 100, 0, 100)
    assert res["value"] == 1.0 and res["ci95"][1] == 1.0 and res["ci95"][0] > 0.9


# ---------------------------------------------------------------- two-sample test


def test_two_sample_test_detects_shift():
    rng = np.random.default_rng(0)
    res = two_sample_test(rng.normal(1.0, 1, 200), rng.normal(0.0, 1, 200))

    assert res["status"] == "ok"
    assert res["p_value"] < 1e-6
    assert res["effect_size"] > 0.3
    assert res["effect_size_ci95"][0] <= res["effect_size"] <= res["effect_size_ci95"][1]
    _assert_plain(res)


def test_two_sample_test_identical_distribution():
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, 200)
    res = two_sample_test(x, rng.permutation(x))

    assert res["p_value"] == pytest.approx(1.0)
    assert res["effect_size"] == pytest.approx(0.0)


def test_two_sample_effect_size_polarity_and_ties():
    res = two_sample_test([3.0, 4.0, 5.0], [0.0, 1.0])
    assert res["effect_size"] == 1.0

    res = two_sample_test([1.0, 1.0], [1.0, 1.0, 1.0])
    assert res["effect_size"] == 0.0 and res["p_value"] == 1.0


def test_two_sample_test_needs_two_values():
    res = two_sample_test([1.0], [1.0, 2.0, 3.0])

    assert res["status"] == "undefined"
    assert res["p_value"] is None and "n_x=1" in res["reason"]


def test_two_sample_test_rejects_bad_alternative_and_nan():
    with pytest.raises(InputError):
        two_sample_test([1.0, 2.0], [1.0, 2.0], alternative="bigger")

    with pytest.raises(NumericalError):
        two_sample_test([1.0, np.nan], [1.0, 2.0])


def test_large_input_is_fast_enough():
    labels, scores = _random_data(0, n_pos=5000, n_neg=5000)
    res = auc_summary(labels, scores, n_boot=200)

    assert math.isclose(res["auc"], roc_auc_score(labels, scores))

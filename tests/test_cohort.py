"""Tests for membership labels and length matching (ehrmem.data.cohort)."""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from ehrmem.data.cohort import build_cohort, match_on_length
from ehrmem.data.meds import MedsDataset, load_meds
from ehrmem.errors import InputError
from ehrmem.models.train import read_manifest

SCHEMA = {"subject_id": pl.Int64, "time": pl.Datetime("us"), "code": pl.String, "numeric_value": pl.Float32}
T0 = datetime(2100, 1, 1)
# Subjects 1-4 train, 5-6 tuning, 7-8 held_out; subject s has 3 * s timed events.
SPLITS = {
    1: "train",
    2: "train",
    3: "train",
    4: "train",
    5: "tuning",
    6: "tuning",
    7: "held_out",
    8: "held_out",
}


def dataset(lengths: dict[int, int], splits: dict[int, str] | None) -> MedsDataset:
    """A small in-memory dataset: each subject has a static code and ``lengths[s]`` timed events."""
    rows = []
    for sid, n in lengths.items():
        rows.append((sid, None, "GENDER//F", None))
        rows += [(sid, T0 + timedelta(hours=h), "A", None) for h in range(n)]
    events = pl.DataFrame(rows, schema=SCHEMA, orient="row")
    table = (
        None
        if splits is None
        else pl.DataFrame(
            {"subject_id": list(splits), "split": list(splits.values())},
            schema={"subject_id": pl.Int64, "split": pl.String},
        )
    )
    return MedsDataset(root=Path("inline"), events=events, splits=table, codes=None, metadata={}, data_hash="0")


@pytest.fixture
def small() -> MedsDataset:
    return dataset({s: 3 * s for s in SPLITS}, SPLITS)


def members(cohort) -> set[int]:
    return set(cohort.table.filter(pl.col("member") == 1)["subject_id"].to_list())


def nonmembers(cohort) -> set[int]:
    return set(cohort.table.filter(pl.col("member") == 0)["subject_id"].to_list())


def log_smd(a: np.ndarray, b: np.ndarray) -> float:
    la, lb = np.log1p(a), np.log1p(b)
    return float((la.mean() - lb.mean()) / np.sqrt((la.var(ddof=1) + lb.var(ddof=1)) / 2))


# ---------------------------------------------------------------------------------------------- labels
def test_manifest_labels_are_the_trained_subjects(tiny_model_dir):
    data, model = tiny_model_dir
    ds, manifest = load_meds(data), read_manifest(model)
    cohort = build_cohort(ds, manifest, match_length=False)  # auto: the manifest wins
    assert cohort.label_source == "training manifest"
    assert members(cohort) == set(manifest["trained_subjects"]) == set(ds.subject_ids("train"))
    assert nonmembers(cohort) == set(ds.subject_ids()) - set(manifest["trained_subjects"])
    assert cohort.notes == []
    assert cohort.summary()["n_members"] + cohort.summary()["n_nonmembers"] == 30


def test_manifest_overrides_the_splits(small):
    # The model was trained on two train subjects and one tuning subject; the splits do not matter.
    manifest = {"trained_subjects": [1, 2, 5, 99]}
    cohort = build_cohort(small, manifest, membership="manifest", match_length=False)
    assert members(cohort) == {1, 2, 5}
    assert nonmembers(cohort) == {3, 4, 6, 7, 8}
    assert cohort.table.filter(pl.col("subject_id") == 5)["split"][0] == "tuning"
    assert len(cohort.notes) == 1 and "1 trained subjects" in cohort.notes[0]


def test_manifest_labels_work_without_splits():
    ds = dataset({s: 5 for s in SPLITS}, None)
    cohort = build_cohort(ds, {"trained_subjects": [1, 2, 3]}, match_length=False)
    assert members(cohort) == {1, 2, 3} and cohort.table["split"].null_count() == 8


def test_split_labels(small):
    cohort = build_cohort(small, None, match_length=False)
    assert cohort.label_source.startswith("splits")
    assert members(cohort) == {1, 2, 3, 4}
    assert nonmembers(cohort) == {5, 6, 7, 8}
    only_held_out = build_cohort(small, None, nonmember_splits=("held_out",), match_length=False)
    assert nonmembers(only_held_out) == {7, 8} and 5 not in only_held_out.table["subject_id"].to_list()


def test_split_labels_that_disagree_with_the_manifest_are_noted(small, caplog):
    """Negative control: label an unseen split as 'members'; the manifest says nobody there was trained on."""
    manifest = {"trained_subjects": [1, 2, 3, 4]}
    control = build_cohort(
        small,
        manifest,
        membership="splits",
        member_splits=("tuning",),
        nonmember_splits=("held_out",),
        match_length=False,
    )
    assert members(control) == {5, 6}
    assert len(control.notes) == 1
    assert "disagree" in control.notes[0] and "2 'members' were never trained on" in control.notes[0]
    assert "disagree" in caplog.text
    agreeing = build_cohort(small, manifest, membership="splits", match_length=False)
    assert agreeing.notes == []


def test_overlapping_member_and_nonmember_splits_are_refused(small):
    with pytest.raises(InputError) as info:
        build_cohort(small, None, member_splits=("train", "tuning"), nonmember_splits=("tuning", "held_out"))
    assert "tuning" in str(info.value) and "disjoint" in str(info.value)


def test_unknown_split_name_is_refused(small):
    with pytest.raises(InputError, match="validation"):
        build_cohort(small, None, nonmember_splits=("validation",))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"manifest": {"trained_subjects": list(SPLITS)}},  # everyone trained on
        {"manifest": {"trained_subjects": []}},  # nobody trained on
        {"manifest": None, "member_splits": ("train",), "nonmember_splits": ()},
        {"manifest": None, "exclude": [5, 6, 7, 8]},
    ],
    ids=["all-members", "no-members", "no-nonmember-split", "excluded-away"],
)
def test_one_class_only_is_refused(small, kwargs):
    """Failure kind 1: never a silent AUC over a single class."""
    with pytest.raises(InputError) as info:
        build_cohort(small, **kwargs)
    msg = str(info.value)
    assert "both members and non-members" in msg and "members" in msg
    assert re.search(r"'0 members|, 0 non-members", msg)


def test_missing_label_sources_are_refused(small):
    with pytest.raises(InputError, match="manifest"):
        build_cohort(small, None, membership="manifest")
    with pytest.raises(InputError, match="split information"):
        build_cohort(dataset({1: 3, 2: 3}, None), None, membership="splits")


def test_exclude_removes_subjects(small):
    cohort = build_cohort(small, None, exclude=[2, 7], match_length=False)
    ids = set(cohort.table["subject_id"].to_list())
    assert ids == set(SPLITS) - {2, 7}
    assert (cohort.n_members, cohort.n_nonmembers) == (3, 3)


def test_subjects_without_timed_events_are_not_audited():
    ds = dataset({1: 4, 2: 0, 3: 5, 4: 6}, {1: "train", 2: "train", 3: "held_out", 4: "held_out"})
    cohort = build_cohort(ds, None, match_length=False)
    assert 2 not in cohort.table["subject_id"].to_list()
    assert cohort.table.filter(pl.col("subject_id") == 4)["n_events"][0] == 6


# ---------------------------------------------------------------------------------------------- matching
def test_match_on_length_picks_the_nearest_partners():
    b = np.array([1, 10, 50, 100, 1000, 12])
    keep, k = match_on_length(np.array([10, 100]), b, max_ratio=1)
    assert np.flatnonzero(keep).tolist() == [1, 3] and k == 1
    keep2, k2 = match_on_length(np.array([10, 100]), b, max_ratio=2, balance=np.inf)
    assert np.flatnonzero(keep2).tolist() == [1, 2, 3, 5] and k2 == 2
    # Without replacement: two subjects of length 10 cannot share one partner.
    keep3, _ = match_on_length(np.array([10, 10]), np.array([10, 11, 1000]))
    assert np.flatnonzero(keep3).tolist() == [0, 1]


def test_match_on_length_edge_cases():
    assert not match_on_length(np.array([]), np.array([1, 2]))[0].any()
    assert not match_on_length(np.array([3]), np.array([], dtype=int))[0].any()
    # Without a balance target the ratio is len(b) // len(a).
    keep, k = match_on_length(np.array([5, 50]), np.arange(1, 8), balance=np.inf)
    assert keep.sum() == 6 and k == 3


def test_match_on_length_improves_balance_on_a_skewed_example():
    rng = np.random.default_rng(0)
    short = np.round(rng.lognormal(3.0, 0.5, size=30)).astype(int)
    long = np.round(rng.lognormal(4.0, 1.0, size=200)).astype(int)
    keep, k = match_on_length(short, long, max_ratio=2)
    assert keep.sum() == 30 * k
    before, after = abs(log_smd(long, short)), abs(log_smd(long[keep], short))
    assert before > 0.8
    assert after < 0.2 * before


def test_match_on_length_takes_the_largest_balanced_ratio():
    """Four members per non-member, members somewhat longer: taking every member (ratio 4) leaves the
    imbalance as it was, which is what a matching that never drops anyone does. The ratio falls until the
    groups are balanced."""
    rng = np.random.default_rng(1)
    non = np.round(rng.lognormal(8.0, 0.8, size=20)).astype(int)
    mem = np.round(rng.lognormal(8.4, 0.8, size=80)).astype(int)
    before = abs(log_smd(mem, non))
    assert before > 0.3
    full, _ = match_on_length(non, mem, balance=np.inf)
    assert full.all() and abs(log_smd(mem[full], non)) == pytest.approx(before)  # ratio 4 keeps everyone
    keep, k = match_on_length(non, mem)
    assert k < 4 and keep.sum() == 20 * k
    assert abs(log_smd(mem[keep], non)) <= 0.1
    if k < 3:  # the largest balanced ratio: one more partner each would break the target
        wider, _ = match_on_length(non, mem, max_ratio=k + 1, balance=np.inf)
        assert abs(log_smd(mem[wider], non)) > 0.1


def test_build_cohort_records_matching_and_its_balance():
    # Members (train) have long records, non-members (held_out) short ones.
    lengths = {s: 40 + 10 * s for s in range(1, 21)} | {s: 2 + s % 30 for s in range(21, 31)}
    lengths[20] = 34  # one member of a comparable length
    splits = {s: "train" if s <= 20 else "held_out" for s in lengths}
    cohort = build_cohort(dataset(lengths, splits), None, max_ratio=1)
    m = cohort.matching
    assert m["ratio"] == 1 and m["n_dropped"] == 10
    assert abs(m["smd_log_length_after"]) < abs(m["smd_log_length_before"])
    assert (cohort.n_members, cohort.n_nonmembers) == (10, 10)
    assert 20 in cohort.audited["subject_id"].to_list()  # the closest member is kept
    assert cohort.table.height == 30  # unmatched subjects stay in the table, flagged
    unmatched = build_cohort(dataset(lengths, splits), None, match_length=False)
    assert unmatched.matching == {"method": "none"} and unmatched.audited.height == 30

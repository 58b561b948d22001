"""Who is a member: ground truth from the model's training manifest (or the splits), matched on length.

Membership labels follow one convention everywhere: member = 1, non-member = 0 (failure kind 3).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import polars as pl

from ehrmem.data.meds import SPLIT, SPLITS, SUBJECT_ID, MedsDataset
from ehrmem.errors import InputError

logger = logging.getLogger(__name__)

MembershipSource = Literal["auto", "manifest", "splits"]


@dataclass
class Cohort:
    """The audited subjects.

    ``table`` has ``subject_id``, ``member`` (1/0), ``split`` (may be null), ``n_events`` (timed events in
    the whole record) and ``matched`` (kept after length matching).
    """

    table: pl.DataFrame
    label_source: str
    matching: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def audited(self) -> pl.DataFrame:
        return self.table.filter(pl.col("matched"))

    @property
    def n_members(self) -> int:
        return int(self.audited["member"].sum())

    @property
    def n_nonmembers(self) -> int:
        return int(self.audited.height - self.audited["member"].sum())

    def summary(self) -> dict:
        return {
            "label_source": self.label_source,
            "n_members": self.n_members,
            "n_nonmembers": self.n_nonmembers,
            "n_candidates": self.table.height,
            "matching": self.matching,
            "notes": self.notes,
        }


def _smd(a: np.ndarray, b: np.ndarray) -> float | None:
    """Standardised mean difference of log record length (balance diagnostic)."""
    if a.size < 2 or b.size < 2:
        return None
    la, lb = np.log1p(a), np.log1p(b)
    pooled = np.sqrt((la.var(ddof=1) + lb.var(ddof=1)) / 2)
    return float((la.mean() - lb.mean()) / pooled) if pooled > 0 else 0.0


#: Largest |standardised mean difference| of log record length accepted after matching (a common rule of thumb
#: for negligible imbalance).
BALANCE_TARGET = 0.1


def _greedy_partners(la: np.ndarray, lb: np.ndarray, k: int) -> np.ndarray:
    """Each subject of ``a`` takes ``k`` nearest free partners of ``b`` on log length, hardest first."""
    keep = np.zeros(len(lb), dtype=bool)
    # Hardest first: subjects of `a` with the fewest close partners pick before the others.
    order = np.argsort(np.abs(la - np.median(lb)))[::-1]
    for _round in range(k):
        for i in order:
            free = np.flatnonzero(~keep)
            if free.size == 0:
                return keep
            j = free[np.argmin(np.abs(lb[free] - la[i]))]
            keep[j] = True
    return keep


def match_on_length(
    lengths_a: np.ndarray,
    lengths_b: np.ndarray,
    *,
    max_ratio: int | None = None,
    balance: float = BALANCE_TARGET,
) -> tuple[np.ndarray, int]:
    """Greedy nearest-neighbour matching on log length, without replacement.

    ``a`` is the smaller group and is kept whole; each of its subjects gets ``k`` partners from ``b``,
    taken in order of closeness. ``k`` is the largest ratio (at most ``max_ratio`` and ``len(b) //
    len(a)``) whose matched groups have ``|SMD| <= balance`` of log length; when even one partner each
    cannot reach it, ``k = 1`` (the closest balance on offer; the caller warns). The choice uses the lengths
    only, never a score, so it cannot bias the membership metrics. Returns the mask over ``b`` of the
    partners kept and ``k``.
    """
    na, nb = len(lengths_a), len(lengths_b)
    if na == 0 or nb == 0:
        return np.zeros(nb, dtype=bool), 0
    k_max = max(1, nb // na)
    if max_ratio is not None:
        k_max = min(k_max, max_ratio)
    la, lb = np.log1p(lengths_a.astype(float)), np.log1p(lengths_b.astype(float))
    for k in range(k_max, 0, -1):
        keep = _greedy_partners(la, lb, k)
        smd = _smd(lengths_a, lengths_b[keep])
        if smd is None or abs(smd) <= balance or k == 1:
            return keep, k
    raise AssertionError("unreachable: k = 1 always returns")


def build_cohort(
    dataset: MedsDataset,
    manifest: dict | None,
    *,
    membership: MembershipSource = "auto",
    member_splits: Sequence[str] = ("train",),
    nonmember_splits: Sequence[str] = ("tuning", "held_out"),
    match_length: bool = True,
    max_ratio: int | None = None,
    balance: float = BALANCE_TARGET,
    exclude: Sequence[int] = (),
) -> Cohort:
    """Label the dataset's subjects as members or non-members.

    Parameters
    ----------
    membership
        ``"manifest"``: members are exactly the subjects the model's training manifest lists, every other
        subject is a non-member. ``"splits"``: members are the ``member_splits``, non-members the
        ``nonmember_splits`` (a negative control can label an unseen split as "members"). ``"auto"`` uses
        the manifest when there is one, else the splits.
    match_length, max_ratio, balance
        Match members and non-members on record length (see :func:`match_on_length`): the smaller group
        is kept whole and each of its subjects gets up to ``max_ratio`` partners from the larger, as many as
        keep the standardised mean difference of log length within ``balance``.
    exclude
        Subjects never audited (e.g. those a calibration reference was trained on).
    """
    for s in [*member_splits, *nonmember_splits]:
        if s not in SPLITS:
            raise InputError("Unknown split name.", value=s, expected=f"one of {list(SPLITS)}")
    overlap = set(member_splits) & set(nonmember_splits)
    if overlap:
        raise InputError(
            "A split cannot hold both members and non-members.",
            value=sorted(overlap),
            expected="disjoint member and non-member splits",
        )
    lengths = dataset.record_lengths()
    all_ids = dataset.events[SUBJECT_ID].unique().sort()
    base = (
        pl.DataFrame({SUBJECT_ID: all_ids})
        .join(lengths, on=SUBJECT_ID, how="left")
        .with_columns(pl.col("n_events").fill_null(0))
    )
    if dataset.splits is not None:
        base = base.join(dataset.splits, on=SUBJECT_ID, how="left")
    else:
        base = base.with_columns(pl.lit(None, dtype=pl.String).alias(SPLIT))
    notes: list[str] = []
    source = membership
    if membership == "auto":
        source = "manifest" if manifest is not None else "splits"
    if source == "manifest":
        if manifest is None:
            raise InputError(
                "membership='manifest' needs the model's training manifest, and it has none.",
                expected="a model written by `ehrmem train`, or membership='splits'",
            )
        trained = {int(s) for s in manifest["trained_subjects"]}
        absent = trained - set(all_ids.to_list())
        if absent:
            notes.append(f"{len(absent)} trained subjects of the manifest are not in this dataset and are not audited.")
        table = base.with_columns(pl.col(SUBJECT_ID).is_in(list(trained)).cast(pl.Int8).alias("member"))
        label_source = "training manifest"
    else:
        if dataset.splits is None:
            raise InputError(
                "membership='splits' needs split information.",
                file=dataset.root,
                expected="a split file, split_source='directories', or a model with a training manifest",
            )
        table = base.filter(pl.col(SPLIT).is_in([*member_splits, *nonmember_splits])).with_columns(
            pl.col(SPLIT).is_in(list(member_splits)).cast(pl.Int8).alias("member")
        )
        label_source = f"splits (members: {list(member_splits)}, non-members: {list(nonmember_splits)})"
        if manifest is not None:
            trained = {int(s) for s in manifest["trained_subjects"]}
            members = set(table.filter(pl.col("member") == 1)[SUBJECT_ID].to_list())
            nonmembers = set(table.filter(pl.col("member") == 0)[SUBJECT_ID].to_list())
            unseen, seen = len(members - trained), len(nonmembers & trained)
            if unseen or seen:
                notes.append(
                    f"The labels come from the splits and disagree with the model's training manifest: {unseen} "
                    f"'members' were never trained on and {seen} 'non-members' were. This is expected for a "
                    "negative control; otherwise use membership='manifest'."
                )
    if exclude:
        table = table.filter(~pl.col(SUBJECT_ID).is_in(list(exclude)))
    empty = table.filter(pl.col("n_events") == 0)
    if empty.height:
        notes.append(
            f"{empty.height} subjects have no timed event and are not audited "
            f"(e.g. {empty[SUBJECT_ID].head(5).to_list()})."
        )
    table = table.filter(pl.col("n_events") > 0)
    mem = table.filter(pl.col("member") == 1)
    non = table.filter(pl.col("member") == 0)
    matched = np.ones(table.height, dtype=bool)
    matching: dict = {"method": "none"}
    if match_length and mem.height and non.height:
        small, large = (non, mem) if non.height <= mem.height else (mem, non)
        keep_large, ratio = match_on_length(
            small["n_events"].to_numpy(), large["n_events"].to_numpy(), max_ratio=max_ratio, balance=balance
        )
        kept_ids = set(small[SUBJECT_ID].to_list()) | set(large.filter(pl.Series(keep_large))[SUBJECT_ID].to_list())
        matched = table[SUBJECT_ID].is_in(list(kept_ids)).to_numpy()
        m_after = table.filter(pl.Series(matched))
        after = _smd(
            m_after.filter(pl.col("member") == 1)["n_events"].to_numpy(),
            m_after.filter(pl.col("member") == 0)["n_events"].to_numpy(),
        )
        matching = {
            "method": "nearest neighbour on log record length, without replacement",
            "kept_whole": "non-members" if small is non else "members",
            "ratio": int(ratio),
            "balance_target": balance,
            "smd_log_length_before": _smd(mem["n_events"].to_numpy(), non["n_events"].to_numpy()),
            "smd_log_length_after": after,
            "n_dropped": int((~matched).sum()),
        }
        if after is not None and abs(after) > balance:
            notes.append(
                f"Length matching could not balance members and non-members: the standardised mean difference of "
                f"log record length is {after:.2f} after matching (target {balance}). Record length alone may "
                "separate the groups; read membership AUCs against T4's length baseline."
            )
    table = table.with_columns(pl.Series("matched", matched))
    cohort = Cohort(table=table.sort(SUBJECT_ID), label_source=label_source, matching=matching, notes=notes)
    for n in notes:
        logger.warning(n)
    if cohort.n_members == 0 or cohort.n_nonmembers == 0:
        raise InputError(
            "The audit needs both members and non-members.",
            file=dataset.root,
            value=f"{cohort.n_members} members, {cohort.n_nonmembers} non-members ({label_source})",
            expected="at least one of each; check the splits or the training manifest",
        )
    return cohort
